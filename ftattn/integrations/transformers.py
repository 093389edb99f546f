"""Hugging Face transformers backend: ``attn_implementation="ftattn"``.

After `register()` (run by ``import ftattn`` once transformers is imported)
``AutoModel.from_pretrained(path, attn_implementation="ftattn")`` sends every
attention layer through ``ftattn.attention`` (``torch.ops.ftattn``), and
``configure(model, protection=..., on_fault=...)`` chooses the protection and
fault policy of one model and keeps its counters of detected and corrected faults.

Masks. The op takes no mask: a causal flag aligned at the bottom right (key j visible
for query i iff j <= i + M - N) and per-sample key ranges (``key_start`` /
``key_end``). transformers hands this backend the boolean 4-D masks of its sdpa
backend (``sdpa_mask``, registered for "ftattn" below), ``None`` when the mask is
plain causal or absent, or a model's own boolean / additive (0 / -inf) mask. Each
sample's mask becomes one range [start, end) of visible keys, with one causal flag
for the call:
  * left padding (decoders, with or without a KV cache): keys [start, M), causal;
  * right padding of an encoder (BERT-style): keys [0, end), not causal;
  * right padding of a decoder (causal-LM fine-tuning): real row i sees keys [0, i + P]
    (P cached tokens, 0 in training) among its real keys [0, end); run as keys
    [0, N + P), causal, i.e. plain causal attention when there is no cache;
  * a StaticCache (empty slots after the seen tokens): keys [start, seen), causal;
  * left and right padding mixed in one batch.
Each sample's mask is checked to be exactly that on every row of a real token, so a
padded batch is one call per layer (it was one per sample: 1.9x faster generate() on 8
left-padded prompts). Any other pattern (sliding window, ALiBi biases, packed
sequences, holes) raises ValueError rather than silently attending to the wrong keys.
Padding rows, whose outputs no real token (and no loss: their labels are -100) reads:
rows the mask leaves without any visible key (the padding positions of a left-padded
prompt) get zeros, where eager attention returns a uniform average; the padding rows
of a right-padded decoder sample (i + P >= end) get causal attention over keys
[0, i + P], padding keys included, where sdpa and eager attend to the real keys
[0, end) (transformers' mask) and flash_attention_2 returns zeros. Their rows of the
output differ between backends; the real tokens' logits, the loss and the gradients
do not (tests/integrations/test_training.py).

Decoding: the query is the newest token (N = 1) against M cached keys: the mask
is [B, 1, 1, M] (or None), and bottom-right causality lets it see every key.

Counters: every call adds its flags to the model's counters as tensor arithmetic
(no ``.item()``), so a compiled forward keeps counting and stays one graph;
`counters(model)` reads them.

torch.compile: the forward is one graph (``fullgraph=True``), with or without a mask
(padded or the all-ones one a tokenizer returns): under compile the mask becomes key
ranges by tensor ops, and a mask no key range can express fails an assertion when the
graph runs (eagerly, a ValueError). With faults scheduled (`inject`) the bookkeeping
of every call runs eagerly (a graph break per call) and each injected fault is a
constant of its own graph (a recompile per fault): fine for a campaign, refused by
``fullgraph=True``.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..attention import _attention, _flagged
from ..attention import attention as _ftattn_attention
from ..faults import CHECK_MASK, Check, Fault, OnFault, Protection, Site

__all__ = [
    "IMPLEMENTATION",
    "register",
    "attention_forward",
    "configure",
    "unconfigure",
    "counters",
    "reset_counters",
    "Counters",
    "ScheduledFault",
    "inject",
    "injected",
]

IMPLEMENTATION = "ftattn"  # the name passed as attn_implementation=
_STATE_ATTR = "_ftattn_state"  # attribute of every submodule of a configured model

# additive masks: entries at or below this (finfo(dtype).min in transformers' masks, or -inf)
# mean "masked"; 0 means "visible"; anything else is a bias the op cannot apply.
_ADDITIVE_MASKED_BELOW = -1e4


# ---------------------------------------------------------------------------
# configuration and counters


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one model's attention runs: the op's ``protection``, ``on_fault`` and
    ``backend``, and whether calls add to the counters (``count``; off saves the
    flags' copy to the host on CUDA)."""

    protection: str = "full"
    on_fault: str = "correct"
    backend: str = "auto"
    count: bool = True

    def __post_init__(self):
        if not isinstance(self.protection, str) or self.protection.upper() not in Protection.__members__:
            raise ValueError(
                f"protection={self.protection!r} is not supported; use one of "
                f"{', '.join(repr(p.name.lower()) for p in Protection)}"
            )
        object.__setattr__(self, "protection", self.protection.lower())
        try:
            OnFault(self.on_fault)
        except ValueError:
            raise ValueError(
                f"on_fault={self.on_fault!r} is not supported; use one of "
                f"{', '.join(repr(p.value) for p in OnFault)}"
            ) from None
        from ..attention import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not supported; use one of {', '.join(map(repr, BACKENDS))}")
        if not isinstance(self.count, bool):
            raise TypeError(f"count must be a bool, got {self.count!r}")


@dataclasses.dataclass(frozen=True)
class Counters:
    """Totals over the attention calls of one model since `configure` / `reset_counters`.

    calls: attention calls (one per layer per forward, more when padded samples
        with different key ranges are run one by one);
    detected: blocks of ``REPORT_BLOCK_M`` query rows of one head in which a check
        failed (one injected fault flags one block);
    corrected: of those, blocks recomputed with every check passing;
    uncorrected: blocks that failed again when recomputed (a persistent error);
    nonfinite_input: blocks whose checks failed because q, k or v hold NaN/Inf
        (bad input, not a fault; not counted in ``detected``);
    injected: faults placed by `inject` (eager runs only).
    """

    calls: int = 0
    detected: int = 0
    corrected: int = 0
    uncorrected: int = 0
    nonfinite_input: int = 0
    injected: int = 0


_TOTALS = ("calls", "detected", "corrected", "uncorrected", "nonfinite_input")


@dataclasses.dataclass(frozen=True)
class ScheduledFault:
    """A fault to inject into the attention call of layer ``layer`` at forward ``step``
    (0 = the first forward after `inject`: the prefill of ``generate()``; 1, 2, ...:
    the decoding steps). ``site``, exactly one of ``bit`` / ``bits`` / ``value`` and
    ``span`` as in `ftattn.Fault`; a coordinate left None is drawn at random, at the call, among the
    valid ones (``col`` among the keys the row sees). ``batch`` and ``col`` index the
    model's batch and its whole key sequence (cache included)."""

    step: int
    layer: int
    site: str
    bit: Optional[int] = None
    value: Optional[float] = None
    batch: Optional[int] = None
    head: Optional[int] = None
    row: Optional[int] = None
    col: Optional[int] = None
    dim: Optional[int] = None
    bits: Optional[Tuple[int, ...]] = None
    span: int = 1

    def __post_init__(self):
        object.__setattr__(self, "site", Site.parse(self.site).name.lower())
        for name in ("step", "layer"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"ScheduledFault.{name}={val!r} must be an int >= 0")
        # Fault's own checks of bit / value and of the given coordinates
        object.__setattr__(self, "bits", Fault(self.site, 0, 0, 0, bit=self.bit, value=self.value, bits=self.bits,
                                               span=self.span).bits)
        for name in ("batch", "head", "row", "col", "dim"):
            val = getattr(self, name)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
                raise ValueError(f"ScheduledFault.{name}={val!r} must be None (random) or an int >= 0")


class _Tally:
    """Counts in ``_TOTALS``' order: a tensor (what a flagged call, a compiled graph or a
    CUDA call adds, without reading the flags on the host) and ``calls``, the eager CPU
    calls that flagged nothing, counted on the host (a decode step's layer: one int add
    instead of two tensor ops, ~1.5 us)."""

    __slots__ = ("tensor", "calls")

    def __init__(self):
        self.tensor = torch.zeros(len(_TOTALS), dtype=torch.int64)
        self.calls = 0

    def values(self) -> List[int]:
        values = self.tensor.tolist()
        values[0] += self.calls
        return values

    def zero_(self) -> None:
        self.tensor.zero_()
        self.calls = 0


class _State:
    """Shared by every submodule of one configured model (or the default, below)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.totals = _Tally()  # flags are reported on the CPU
        self.plan: Dict[Tuple[int, int], ScheduledFault] = {}
        self.steps: Dict[int, int] = {}  # layer -> forwards seen since inject()
        self.layer_of: Dict[int, int] = {}  # id(module) -> layer, for modules without layer_idx
        self.injected: List[dict] = []
        self.rng = random.Random(0)
        self.mask_cache: Optional[tuple] = None  # (mask, version or copy, shape, layout): one mask serves every layer


# Modules of a model loaded with attn_implementation="ftattn" but never configured.
_DEFAULT_STATE = _State(Policy())


def _state_of(model: torch.nn.Module) -> _State:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not configured for ftattn; call "
            f"ftattn.integrations.transformers.configure(model) first"
        )
    return state


def configure(
    model: torch.nn.Module,
    *,
    protection: str = "full",
    on_fault: str = "correct",
    backend: str = "auto",
    count: bool = True,
) -> torch.nn.Module:
    """Run ``model``'s attention through ftattn with this protection and fault policy.

    Switches the model to ``attn_implementation="ftattn"`` when it uses another one,
    attaches one policy and one set of counters to every submodule (reversible with
    `unconfigure`) and resets the counters. Returns the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"configure() needs a torch.nn.Module, got {type(model).__name__}")
    register()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) != IMPLEMENTATION:
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"{type(model).__name__} uses attn_implementation={config._attn_implementation!r} and cannot "
                f"switch; load it with attn_implementation={IMPLEMENTATION!r}"
            )
        model.set_attn_implementation(IMPLEMENTATION)
    state = _State(Policy(protection, on_fault, backend, count))
    for module in model.modules():
        object.__setattr__(module, _STATE_ATTR, state)
    return model


def unconfigure(model: torch.nn.Module) -> None:
    """Remove what `configure` attached (the attention implementation stays ftattn,
    with the default policy: full protection, on_fault="correct")."""
    for module in model.modules():
        module.__dict__.pop(_STATE_ATTR, None)


def counters(model: Optional[torch.nn.Module] = None) -> Counters:
    """The counters of a configured model; zeros for a model never configured (its calls
    count into ``counters()``, the totals of every unconfigured ftattn model)."""
    if model is not None and getattr(model, _STATE_ATTR, None) is None:
        return Counters(injected=0, **{name: 0 for name in _TOTALS})
    state = _DEFAULT_STATE if model is None else _state_of(model)
    values = dict(zip(_TOTALS, state.totals.values()))
    return Counters(injected=len(state.injected), **values)


def reset_counters(model: Optional[torch.nn.Module] = None) -> None:
    state = _DEFAULT_STATE if model is None else _state_of(model)
    state.totals.zero_()
    state.injected.clear()


def inject(model: torch.nn.Module, faults: Sequence[ScheduledFault], seed: int = 0) -> None:
    """Schedule ``faults`` (one per (step, layer) at most: the kernel takes one fault
    per call) for the next forwards of a configured model; steps count from now.
    An empty list stops injection. ``seed`` draws the coordinates left None."""
    state = _state_of(model)
    plan: Dict[Tuple[int, int], ScheduledFault] = {}
    for f in faults:
        if not isinstance(f, ScheduledFault):
            raise TypeError(f"inject() takes ScheduledFault items, got {type(f).__name__}")
        if (f.step, f.layer) in plan:
            raise ValueError(
                f"two faults at step {f.step}, layer {f.layer}; the kernel injects one fault per call, "
                f"so schedule at most one per (step, layer)"
            )
        plan[(f.step, f.layer)] = f
    state.plan = plan
    state.steps = {}
    state.rng = random.Random(seed)


def injected(model: torch.nn.Module) -> List[dict]:
    """The faults placed so far: step, layer, the ftattn.Fault of the call, and its
    coordinates in the model's batch and key sequence."""
    return list(_state_of(model).injected)


# ---------------------------------------------------------------------------
# masks -> key ranges


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Per sample: the op's keys [start, stop) (empty: stop <= start; causal: bottom right
    at stop, which for a right-padded sample lies past its last real key, see
    _key_ranges); one causal flag for the call; the same ranges as tensors for the op."""

    start: Tuple[int, ...]
    stop: Tuple[int, ...]
    causal: bool
    key_start: torch.Tensor
    key_end: torch.Tensor

    @property
    def full(self) -> bool:
        """Every sample sees every key: no ranges needed."""
        return all(s == 0 for s in self.start) and len(set(self.stop)) == 1


def _allowed(mask: torch.Tensor, batch: int, n: int, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(allowed [B, N, M] bool, ok: a 0-dim bool that the mask is one a key range can
    express apart from its shape: no biases, the same for every head). Tensor ops only."""
    if mask.dim() != 4:
        raise ValueError(
            f"ftattn: attention_mask must be 4-D [batch, 1 or heads, queries, keys], got shape {tuple(mask.shape)}; "
            f"transformers builds it with the mask function registered for {IMPLEMENTATION!r}"
        )
    if mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, n) or mask.shape[3] < m:
        raise ValueError(
            f"ftattn: attention_mask of shape {tuple(mask.shape)} does not fit batch={batch}, queries={n}, keys={m}"
        )
    mask = mask[..., :m]
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        ok = ((mask <= _ADDITIVE_MASKED_BELOW) | allowed).all()
    else:
        raise TypeError(f"ftattn: attention_mask.dtype={mask.dtype} is not supported; pass a bool or float mask")
    if allowed.shape[1] > 1:
        ok = ok & (allowed == allowed[:, :1]).all()
    return allowed[:, 0].expand(batch, n, m), ok


def _key_ranges(allowed: torch.Tensor, n: int, m: int):
    """(start [B], end [B], plain [B], causal [B], causal_end [B]): each sample's visible
    keys [start, end); whether its mask is exactly that range for every row (plain); and
    whether it is that range with causality on one diagonal, row i seeing keys
    [start, min(i + d, end - 1)] (causal), which the op runs as keys [start, causal_end),
    causal_end = n + d, causal at bottom right (key j visible iff j <= i + d):
      * left padding, a KV cache: d = end - n, causal_end = end;
      * right padding (keys [0, end), top left: d = 0 without a cache): causal_end = n + d
        > end. The rows i + d < end (the real tokens) see exactly their keys; the rows
        past them (padding queries, i + d >= end) see [start, end) in the mask and
        [start, i + d] in the op, padding keys included: outputs that no real token reads.
    Rows with no visible key (padding queries) count either way. Tensor ops only:
    traceable, no host read."""
    device = allowed.device
    j = torch.arange(m, device=device)
    i = torch.arange(n, device=device)
    keys = allowed.any(1)  # [B, M]
    rows = allowed.any(2)  # [B, N]
    count = keys.sum(1)
    start = torch.where(count > 0, keys.int().argmax(1), torch.zeros_like(count))
    end = torch.where(count > 0, m - keys.flip(1).int().argmax(1), torch.zeros_like(count))
    # the diagonal: the largest (last visible key - row) over the rows with a key (the rows
    # before the range's end reach i + d, those past it end - 1 - i < d)
    last = (m - 1) - allowed.flip(2).int().argmax(2)  # [B, N]
    shift = torch.where(rows, last - i[None, :], torch.full_like(last, -(n + m)))
    diagonal = torch.where(count > 0, shift.amax(1), end - n)  # (a sample with no key: causal_end 0)
    causal_end = n + diagonal
    in_range = (j >= start[:, None, None]) & (j < end[:, None, None])  # [B, 1, M]
    visible = j[None, None, :] <= i[None, :, None] + diagonal[:, None, None]  # [B, N, M]
    ignore = ~rows[:, :, None]
    contiguous = count == end - start
    plain = ((allowed == in_range) | ignore).all(2).all(1) & contiguous
    causal = ((allowed == (in_range & visible)) | ignore).all(2).all(1) & contiguous & (causal_end <= m)
    return start, end, plain, causal, causal_end


_NOT_KEY_PADDING = (
    "ftattn: the attention mask of sample {b} is not a key-padding mask (one contiguous range of visible keys, all "
    "rows alike or causal): ftattn supports left/right padding, a KV cache and causal masks, not sliding windows, "
    "packed sequences or holes; use another attn_implementation for this model")
_BIASED = ("ftattn: the additive attention_mask holds biases other than 0 (visible) and a large negative value "
           "(masked), e.g. ALiBi or relative-position terms, or differs between heads; ftattn applies no bias and "
           "one mask for all heads: use another attn_implementation for this model")


def _mask_layout(mask: torch.Tensor, batch: int, n: int, m: int) -> _Layout:
    """The mask as key ranges, checked (host reads: the eager path)."""
    allowed, ok = _allowed(mask, batch, n, m)
    if not bool(ok):
        raise ValueError(_BIASED)
    start, end, plain, causal, causal_end = _key_ranges(allowed, n, m)
    # one causal flag for the call: plain when every sample reads as plain, else causal
    is_causal = not bool(plain.all())
    bad = ~(causal if is_causal else plain)
    if bool(bad.any()):
        raise ValueError(_NOT_KEY_PADDING.format(b=int(bad.nonzero()[0, 0])))
    if is_causal:
        end = causal_end
    return _Layout(tuple(start.tolist()), tuple(end.tolist()), is_causal, start, end)


@torch.compiler.disable  # the eager path: host reads, cached across the layers of one forward
def _cached_layout(state: _State, mask: torch.Tensor, batch: int, n: int, m: int) -> _Layout:
    """Every layer of one forward gets the same mask object: decode it once. A mask made
    under torch.inference_mode() has no version counter: its contents are compared with
    a copy instead (one pass over the mask, against the decode's several)."""
    cached = state.mask_cache
    inference = mask.is_inference()
    if cached is not None and cached[0] is mask and cached[2] == (batch, n, m):
        if torch.equal(mask, cached[1]) if inference else cached[1] == mask._version:
            return cached[3]
    layout = _mask_layout(mask, batch, n, m)
    state.mask_cache = (mask, mask.clone() if inference else mask._version, (batch, n, m), layout)
    return layout


def _traced_ranges(module, mask: torch.Tensor, batch: int, n: int, m: int):
    """Under torch.compile: (key_start, key_end, causal) by tensor ops, no graph break; the
    causal flag from the module (decoders are causal), the mask's shape checked at run
    time by an assertion instead of an exception."""
    allowed, ok = _allowed(mask, batch, n, m)
    start, end, plain, causal_ok, causal_end = _key_ranges(allowed, n, m)
    causal = n > 1 and bool(getattr(module, "is_causal", True))
    ok = ok & (causal_ok if causal else plain).all()
    torch._assert_async(ok, _NOT_KEY_PADDING.format(b="(some)"))
    return start, causal_end if causal else end, causal


# ---------------------------------------------------------------------------
# fault injection


def _layer_index(state: _State, module: torch.nn.Module) -> int:
    layer = getattr(module, "layer_idx", None)
    if isinstance(layer, int):
        return layer
    return state.layer_of.setdefault(id(module), len(state.layer_of))


def _resolve(
    state: _State, f: ScheduledFault, q_shape, layout: Optional[_Layout], causal: bool, m: int
) -> Tuple[int, int, Fault]:
    """Draw the coordinates left None; returns (batch, key offset of its call, Fault in model coordinates)."""
    B, Hq, N, D = q_shape
    rng = state.rng
    batch = f.batch if f.batch is not None else rng.randrange(B)
    if batch >= B:
        raise ValueError(f"ScheduledFault.batch={batch} is out of range: batch size {B}")
    start, stop, row_causal = 0, m, causal
    if layout is not None:
        start, stop, row_causal = layout.start[batch], layout.stop[batch], layout.causal
    mb = stop - start
    lo_row = max(0, N - mb) if row_causal else 0  # rows that see at least one key
    row = f.row if f.row is not None else rng.randrange(lo_row, N) if lo_row < N else 0
    seen = min(mb, row + mb - N + 1) if row_causal else mb
    col = f.col if f.col is not None else start + rng.randrange(max(seen, 1))
    head = f.head if f.head is not None else rng.randrange(Hq)
    dim = f.dim if f.dim is not None else rng.randrange(D)
    fault = Fault(f.site, batch, head, row, col, dim, bit=f.bit, value=f.value, bits=f.bits, span=f.span)
    return batch, start, fault


@torch.compiler.disable  # Python bookkeeping per call: a graph break under compile, never baked into a graph
def _scheduled_fault(state: _State, module, q_shape, layout: Optional[_Layout], causal: bool, m: int):
    """Count this call's step for its layer; the fault scheduled for it, resolved, or None."""
    layer = _layer_index(state, module)
    step = state.steps.get(layer, 0)
    state.steps[layer] = step + 1
    scheduled = state.plan.get((step, layer))
    if scheduled is None:
        return None
    fault_at = _resolve(state, scheduled, q_shape, layout, causal, m)
    state.injected.append({"step": step, "layer": layer, "fault": fault_at[2]})
    return fault_at


# ---------------------------------------------------------------------------
# the attention function transformers calls


# the config keys of the attention-dropout probability (Llama and most decoders, GPT-2 and
# its kin, BERT and its kin)
_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def _dropout_error(module, dropout) -> NotImplementedError:
    """The error of a training call with attention dropout, naming the config key of this
    model that sets it: its modules read it when built (Llama's attention_dropout, GPT-2's
    attn_pdrop into attn_dropout.p, BERT's attention_probs_dropout_prob into dropout.p), so
    changing model.config afterwards changes nothing."""
    config = getattr(module, "config", None)
    present = [key for key in _DROPOUT_KEYS if isinstance(getattr(config, key, None), (int, float))]
    key = next((k for k in present if float(getattr(config, k)) == float(dropout)), present[0] if present else None)
    if key is None:
        build = (f"build the model with its config's attention-dropout probability at 0.0 (one of "
                 f"{', '.join(_DROPOUT_KEYS)}, by model)")
    else:
        build = (f"build the model with {key}=0.0 ({type(config).__name__}(..., {key}=0.0), or "
                 f"from_pretrained(path, {key}=0.0, attn_implementation='ftattn')): {type(module).__name__} reads "
                 f"it when built, so setting model.config.{key} afterwards changes nothing")
    return NotImplementedError(
        f"ftattn attention has no attention dropout: {type(module).__name__} trains with dropout={dropout}; "
        f"{build}; or call model.eval() (inference); or use another attn_implementation")


def _unsupported(module, dropout, kwargs, n_keys) -> None:
    if dropout:
        raise _dropout_error(module, dropout)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"ftattn does not support logit soft-capping (softcap={kwargs['softcap']}); use attn_implementation='eager'"
        )
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("ftattn applies no position bias (T5-style models); use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("ftattn does not support attention sinks (s_aux); use attn_implementation='eager'")
    window = kwargs.get("sliding_window")
    if window is not None and n_keys > window:
        raise NotImplementedError(
            f"ftattn does not support sliding-window attention (window {window} < {n_keys} keys); "
            f"use attn_implementation='sdpa' for this model or keep sequences within the window"
        )


def _run(state: _State, q, k, v, causal: bool, scale, fault: Optional[Fault], key_start=None, key_end=None,
         module=None) -> torch.Tensor:
    """One call of the kernel for the whole batch (padded samples: key ranges)."""
    policy = state.policy
    counts = module.__dict__.get("_ftattn_counts") if module is not None else None
    if policy.count and fault is None and q.is_cpu and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # the common call (inference on the CPU): the flags read on the host, no Report;
        # a clean call is one int add per tally (a decode step's layer, B1 Hq4 Hkv2 M26 D16:
        # 24 -> 17 us)
        out, flags, flagged = _attention(q, k, v, causal, scale, policy.protection, policy.on_fault, None,
                                         policy.backend, False, key_start, key_end, want_flags=True)
        if not flagged:
            state.totals.calls += 1
            if counts is not None:
                counts.calls += 1
            return out
        _add(state, counts, flags, 1)
        return out
    kw = dict(causal=causal, scale=scale, protection=policy.protection, on_fault=policy.on_fault, fault=fault,
              backend=policy.backend, key_start=key_start, key_end=key_end)
    if not policy.count:
        return _ftattn_attention(q, k, v, **kw)
    out, report = _ftattn_attention(q, k, v, return_report=True, **kw)
    _add(state, counts, report.flags, 1)
    # the call's backward, when one runs (training): its checks count too, not as a call
    report.on_backward.append(lambda rep: _add(state, counts, rep.flags, 0))
    return out


def _add(state: _State, counts: Optional[_Tally], flags: torch.Tensor, calls: int) -> None:
    """Count one call's flags (calls: 1 for a forward; a backward counts no call) into the
    model's totals and, under ftattn.protect_, the layer's."""
    if flags.is_cpu and not torch.compiler.is_compiling() and not _flagged(flags):
        # the common eager call, nothing flagged: the call counted on the host, not by the
        # eight reductions below (56 -> 5 us a decode step's layer)
        state.totals.calls += calls
        if counts is not None:
            counts.calls += calls
        return
    nonfinite = (flags & int(Check.NONFINITE_INPUT)) != 0
    failed = ((flags & CHECK_MASK) != 0) & ~nonfinite
    stats = torch.stack(
        [
            torch.full((), calls, dtype=torch.int64),
            failed.sum(),
            ((flags & int(Check.CORRECTED)) != 0).sum(),
            ((flags & int(Check.UNCORRECTED)) != 0).sum(),
            ((flags & CHECK_MASK) != 0).logical_and(nonfinite).sum(),
        ]
    )
    state.totals.tensor.add_(stats)
    if counts is not None:  # per-layer counts of a model under ftattn.protect_
        counts.tensor.add_(stats)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, Hq, N, D], key/value [B, Hkv, M, D]
    (Hq a multiple of Hkv), a 4-D bool or additive mask or None; returns ([B, N, Hq, D], None)."""
    state = getattr(module, _STATE_ATTR, None) or _DEFAULT_STATE
    B, Hq, N, D = query.shape
    M = key.shape[2]
    _unsupported(module, dropout, kwargs, M)
    if scaling is not None:
        scaling = float(scaling)

    layout = None
    key_start = key_end = None
    if attention_mask is None:
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        causal = bool(is_causal) and N > 1
        if causal and M > N:
            # Only a prefill into an empty StaticCache gets here (transformers materialises the mask
            # otherwise); its keys past N are empty slots, as transformers' sdpa backend assumes.
            key, value, M = key[:, :, :N], value[:, :, :N], N
    elif torch.compiler.is_compiling() and not state.plan:
        key_start, key_end, causal = _traced_ranges(module, attention_mask, B, N, M)
    else:
        layout = _cached_layout(state, attention_mask, B, N, M)
        causal = layout.causal
        if not layout.full:  # padded samples: each its own keys, in one call
            key_start, key_end = layout.key_start.to(query.device), layout.key_end.to(query.device)

    fault_at = _scheduled_fault(state, module, query.shape, layout, causal, M) if state.plan else None
    fault = fault_at[2] if fault_at is not None else None
    if layout is not None and layout.full and layout.stop[0] < M:  # every sample sees keys [0, stop): cut them
        key, value = key[:, :, :layout.stop[0]], value[:, :, :layout.stop[0]]
    out = _run(state, query, key, value, causal, scaling, fault, key_start, key_end, module)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------
# registration


def register() -> None:
    """Make ``attn_implementation="ftattn"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is attention_forward:
        return
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    # Without a mask function transformers passes no mask at all (padding would be lost);
    # sdpa's is the boolean [B, 1, N, M] mask, None when plain causal / unpadded.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
