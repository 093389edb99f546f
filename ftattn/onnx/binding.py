"""One request's KV cache and bindings on an onnxruntime session: the prefill and
each decode step, with the cache kept in onnxruntime (IO binding) and every per-step
buffer allocated once (the generator's decode loop, ftattn/onnx/generator.py, picks the
tokens)."""
from __future__ import annotations

import numpy as np

from .model import ModelSpec, Padding


def _cells(array: np.ndarray) -> memoryview:
    """A flat memoryview of a contiguous array, for one-element stores: a numpy item
    assignment costs several times more between two model steps, when the
    interpreter's own data is out of the caches."""
    return memoryview(array).cast("B").cast(array.dtype.char)


class _StepRunner:
    """The per-token calls on an IOBinding: rebind an input by address, run.

    onnxruntime's Python wrappers build a device object for every bind and check
    graph-capture state on every run, about 6 us a token (10% of a small model's decode
    step on 2 cores). Given the C-level CPU device (``cpu_device``), this calls the
    bindings underneath them (``IOBinding._iobinding``, ``InferenceSession._sess``),
    else the public API.
    """

    @staticmethod
    def cpu_device(direct: bool):
        """onnxruntime's C-level CPU device, or None where not wanted or not there."""
        if not direct:
            return None
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            return OrtDevice.make("cpu", 0)._get_c_device()
        except (ImportError, AttributeError, TypeError):
            return None

    def __init__(self, session, io, device=None):
        self.session, self.io, self._device = session, io, device
        self._c_io, self._c_session = getattr(io, "_iobinding", None), getattr(session, "_sess", None)
        self.direct = device is not None and self._c_io is not None and self._c_session is not None

    def bind_input(self, name: str, dtype, shape, address: int):
        if self.direct:
            self._c_io.bind_input(name, self._device, dtype, shape, address)
        else:
            self.io.bind_input(name, "cpu", 0, dtype, shape, address)

    def run(self):
        if self.direct:
            self._c_session.run_with_iobinding(self._c_io, None)
        else:
            self.session.run_with_iobinding(self.io)


class KVRequest:
    """The prompts of one batch on ``session``: ``prefill()`` gives the logits of each
    row's last prompt token, then ``step(chosen, step)`` feeds one new token per row
    (pads for finished rows) and gives the next logits (a view into one buffer, valid
    until the next step).

    Prompts are padded on the right for GroupQueryAttention models (which read each
    row's length from its mask), on the left otherwise. ``shared_buffer``: past and
    present are one preallocated buffer per layer (GQA updates it in place), sized to
    the longest prompt + ``max_new_tokens``; else each step's present becomes the next
    past. ``direct_binding``: bind and run through onnxruntime's C bindings.
    """

    def __init__(self, session, spec: ModelSpec, prompts: list[list[int]], max_new_tokens: int,
                 shared_buffer: bool, direct_binding: bool):
        import onnxruntime as ort

        self._ort = ort
        self.session, self.spec, self.shared_buffer = session, spec, shared_buffer
        batch = self.batch = len(prompts)
        lengths = self.lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = self.width = int(lengths.max())
        capacity = self.capacity = width + max_new_tokens  # KV positions this request can reach
        right = self.right = spec.padding is Padding.RIGHT

        # -- prefill inputs: pads on the right for GQA, on the left otherwise
        input_ids = self.input_ids = np.full((batch, width), spec.pad_token_id, dtype=spec.input_ids_dtype)
        mask = self.mask = np.zeros((batch, capacity), dtype=spec.mask_dtype)
        for b, prompt in enumerate(prompts):
            if right:
                input_ids[b, :lengths[b]] = prompt
                mask[b, :lengths[b]] = 1
            else:
                input_ids[b, width - lengths[b]:] = prompt
                mask[b, width - lengths[b]:width] = 1

        self.kv_names_in = [n for pair in zip(spec.past_key_names, spec.past_value_names) for n in pair]
        self.kv_names_out = [n for pair in zip(spec.present_key_names, spec.present_value_names) for n in pair]
        # zeroed once per request: GQA reads only positions below each row's length, but
        # uninitialised memory could hold NaNs that a kernel multiplies by a zero weight
        kv_arrays = [np.zeros((batch, spec.num_kv_heads, spec.kv_capacity(name, capacity) if shared_buffer else 0,
                               spec.head_size), dtype=spec.kv_dtype) for name in self.kv_names_in]
        self.past = [ort.OrtValue.ortvalue_from_numpy(a) for a in kv_arrays]

        # decode-step mask and position ids live in buffers allocated once and are bound by
        # address with the step's shape: no array is made or copied per token
        self.step_mask = np.zeros(batch * capacity, dtype=spec.mask_dtype)
        self.step_positions = np.zeros((batch, 1), dtype=spec.position_ids_dtype)
        if right and batch == 1:
            self.step_mask[:] = 1  # a single row attends to every position so far
        # shared buffer: the decode mask keeps the buffer's width (batch, capacity), zeros past
        # each row's length, as onnxruntime-genai's static-buffer mode binds it: GQA takes the
        # row lengths from the row sums, so the mask is bound once and gains a 1 per row a step
        self.static_mask = shared_buffer and spec.attention_mask_name is not None
        self.mask_cells = _cells(mask)
        self.row_starts = [b * capacity + int(n) for b, n in enumerate(lengths)]  # each row's first new position
        self.mask_address, self.positions_address = self.step_mask.ctypes.data, self.step_positions.ctypes.data
        self.device = _StepRunner.cpu_device(direct_binding)
        self.shared_io = None  # shared buffer: the binding of the first decode step, kept

    # -- bindings

    def _bind_step(self, runner, total: int, step: int, bound: bool = False):
        """The decode inputs that change every step: attention mask, position ids
        (bound: the binding already holds the mask and position buffers)."""
        spec, batch, mask = self.spec, self.batch, self.mask
        if self.static_mask:
            cells = self.mask_cells
            for start in self.row_starts:
                cells[start + step] = 1
            if not bound:
                runner.bind_input(spec.attention_mask_name, mask.dtype, [batch, self.capacity], mask.ctypes.data)
        elif spec.attention_mask_name is not None:
            step_mask = self.step_mask
            if self.right:  # GQA reads each row's length from the row sum
                if batch > 1:
                    view = step_mask[:batch * total].reshape(batch, total)
                    np.less(np.arange(total)[None, :], (self.lengths + (total - self.width))[:, None], out=view,
                            casting="unsafe")
            elif batch == 1:
                step_mask[:total] = mask[0, :total]
            else:
                step_mask[:batch * total].reshape(batch, total)[:] = mask[:, :total]
            runner.bind_input(spec.attention_mask_name, step_mask.dtype, [batch, total], self.mask_address)
        if spec.position_ids_name is not None:
            np.add(self.lengths[:, None], step, out=self.step_positions, casting="unsafe")
            if not bound:
                runner.bind_input(spec.position_ids_name, self.step_positions.dtype, [batch, 1],
                                  self.positions_address)

    def _bind_ids_and_past(self, io, ids_value, cached: bool):
        spec = self.spec
        io.bind_ortvalue_input(spec.input_ids_name, ids_value)
        if spec.use_cache_branch_name is not None:  # optimum's merged decoder: which branch
            io.bind_cpu_input(spec.use_cache_branch_name, np.array([cached]))
        for name, value in zip(self.kv_names_in, self.past):
            io.bind_ortvalue_input(name, value)

    def _bind_kv_outputs(self, io):
        # shared buffer: present is written in place into the bound past; else new OrtValues
        for name, value in zip(self.kv_names_out, self.past):
            if self.shared_buffer:
                io.bind_ortvalue_output(name, value)
            else:
                io.bind_output(name, "cpu")

    # -- runs

    def prefill(self) -> np.ndarray:
        """Runs the prompts; returns the logits of each row's last prompt token (batch, vocab)
        and sets up the decode buffers (ids in, logits out, bound once)."""
        ort, spec, batch, width, mask = self._ort, self.spec, self.batch, self.width, self.mask
        io = self.session.io_binding()
        prefill_positions = np.clip(np.cumsum(mask[:, :width], axis=1) - 1, 0, None)
        if self.right:
            prefill_positions = np.broadcast_to(np.arange(width), (batch, width))
        self._bind_ids_and_past(io, ort.OrtValue.ortvalue_from_numpy(self.input_ids), False)
        if spec.attention_mask_name is not None:
            io.bind_cpu_input(spec.attention_mask_name, np.ascontiguousarray(mask[:, :width]))
        if spec.position_ids_name is not None:
            io.bind_cpu_input(spec.position_ids_name, prefill_positions.astype(spec.position_ids_dtype))
        io.bind_output(spec.logits_name, "cpu")
        self._bind_kv_outputs(io)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        prefill_logits = outputs[0].numpy()
        last = (self.lengths - 1) if self.right else np.full(batch, width - 1)
        logits = prefill_logits[np.arange(batch), last]  # (batch, vocab)
        if not self.shared_buffer:
            self.past = outputs[1:]
        del io, outputs, prefill_logits

        # -- decode buffers, bound once: ids in, logits out
        self.next_ids = np.full((batch, 1), spec.pad_token_id, dtype=spec.input_ids_dtype)
        self.next_ids_value = ort.OrtValue.ortvalue_from_numpy(self.next_ids)
        self.step_logits = np.empty((batch, 1, logits.shape[-1]), dtype=spec.logits_dtype)
        self.step_logits_value = ort.OrtValue.ortvalue_from_numpy(self.step_logits)
        self.step_scores = self.step_logits[:, 0, :]
        self.ids_cells = _cells(self.next_ids)
        return logits

    def step(self, chosen, step: int) -> np.ndarray:
        """One decode step: the new token of every row (pads for finished ones); returns
        the next logits (batch, vocab)."""
        ids_cells = self.ids_cells
        for b, token in enumerate(chosen):
            ids_cells[b] = token
        total = self.width + step + 1
        if not self.right:
            self.mask[:, total - 1] = 1
        shared_io = self.shared_io
        if shared_io is not None:  # shared buffer: ids, KV and logits stay bound
            self._bind_step(shared_io, total, step, bound=True)
            shared_io.run()
        else:
            io = self.session.io_binding()
            runner = _StepRunner(self.session, io, self.device)
            self._bind_ids_and_past(io, self.next_ids_value, True)
            self._bind_step(runner, total, step)
            io.bind_ortvalue_output(self.spec.logits_name, self.step_logits_value)
            self._bind_kv_outputs(io)
            runner.run()
            if self.shared_buffer:
                self.shared_io = runner
            else:
                self.past = io.get_outputs()[1:]
        return self.step_scores
