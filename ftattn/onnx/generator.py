"""KV-cache token generation with an ONNX decoder on onnxruntime.

The loop:

- keeps the cache in onnxruntime: the present tensors of one step are bound as
  the next step's past as OrtValues (IO binding), never copied to numpy; for
  GroupQueryAttention models past and present are one preallocated buffer that
  GQA updates in place, sized to this request (longest prompt + max_new_tokens),
  not to the model's context length; its decode attention mask has the buffer's
  width too (zeros past each row's length, as genai binds it for static buffers), so
  nothing is rebound between two steps of one request;
- writes each decode step's logits into one preallocated array bound as the
  output, and reads the next input ids from another;
- picks tokens with an argmax (greedy) or one C++ call per step (sampling), see
  ``sampling.py``;
- decodes incrementally with the tokenizer's streaming decoder, so a multi-byte
  character split across tokens is emitted once it is whole (token by token while
  streaming or watching for stop strings, else the same way after the loop);
- binds and runs each decode step through onnxruntime's C bindings where present;
- stops each prompt on any EOS id or stop string, and counts decode tokens/s over
  the tokens actually made.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .binding import KVRequest
from .model import ModelSpec, Padding, find_decoder, load_spec, read_decoder_graph
from .sampling import SamplingConfig, apply_repetition_penalty, TokenSampler
from .text import Row, TextStreamer, render_chat_template


@dataclass
class Generation:
    """What ``Generator.generate`` returns for one prompt.

    ``token_ids`` are the new tokens (an EOS that stopped generation included, as
    in transformers); ``text`` is their decoded text without special tokens, cut
    before a stop string. ``finish_reason`` is "eos", "stop" or "length".
    ``time_to_first_token_s`` runs from the ``generate`` call to this prompt's first
    token (tokenisation and prefill included); ``decode_tokens_per_s`` counts the
    tokens after the first over the time after the first (0.0 when only one token
    was made). ``token_times_s`` holds, per new token, the time from the ``generate``
    call to the token (its first entry is ``time_to_first_token_s``): the differences
    are the inter-token latencies, whose median is steadier than the mean rate on a
    machine shared with other jobs.
    """

    token_ids: list[int]
    text: str
    prompt_token_ids: list[int]
    finish_reason: str
    time_to_first_token_s: float
    decode_time_s: float
    decode_tokens_per_s: float
    token_times_s: list[float] = field(default_factory=list)


class Generator:
    """A decoder session, its tokenizer and the model facts the loop needs.

    Build with ``Generator.from_pretrained(folder)``; see ``generate``.
    """

    def __init__(self, session, spec: ModelSpec, tokenizer, shared_buffer: bool | None = None,
                 direct_binding: bool = True):
        if shared_buffer and not spec.shared_buffer:
            raise ValueError(
                f"shared_buffer=True: {spec.folder} does not use GroupQueryAttention, whose past and "
                f"present can share one buffer; leave shared_buffer=None (automatic) for this model")
        # the loop's buffers live in host memory: with another provider onnxruntime would copy
        # the bound past to the device and the present back, and GQA would not see one buffer
        on_cpu = list(session.get_providers()) == ["CPUExecutionProvider"]
        if shared_buffer and not on_cpu:
            raise ValueError(
                f"shared_buffer=True: the shared past/present buffer is in host memory and needs the CPU "
                f"provider alone (the session has {session.get_providers()}); leave shared_buffer=None")
        self.session = session
        self.spec = spec
        self.tokenizer = tokenizer
        self.text = TextStreamer(tokenizer)  # each row's text from its new tokens
        self.shared_buffer = (spec.shared_buffer and on_cpu) if shared_buffer is None else bool(shared_buffer)
        if spec.sliding_window_ring and not self.shared_buffer:
            raise ValueError(
                f"{spec.folder}: the model's windowed attention layers (GQA local_window_size "
                f"{spec.sliding_window}, sliding_window_cache=1) need a preallocated past/present buffer of at least the window, "
                f"which the shared buffer is (CPU provider alone); leave shared_buffer=None")
        if not isinstance(direct_binding, bool):
            raise TypeError(f"direct_binding={direct_binding!r}: must be True or False")
        self.direct_binding = direct_binding
        vocab = session.get_outputs()[[o.name for o in session.get_outputs()].index(spec.logits_name)].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    @classmethod
    def from_pretrained(cls, path: str, threads: int | None = None, providers: Sequence[str] | None = None,
                        shared_buffer: bool | None = None, allow_spinning: bool = True,
                        direct_binding: bool = True) -> "Generator":
        """Load a model folder (decoder .onnx, tokenizer.json, genai_config.json or config.json).

        threads: intra-op threads (None: onnxruntime's default, one per core);
        providers: onnxruntime execution providers (None: CPU); shared_buffer: one
        past/present buffer (None: when the model supports it, i.e. GQA models);
        allow_spinning=False stops idle onnxruntime threads from busy-waiting, which
        on a machine shared with other jobs raised int4 decode tokens/s from about
        45 to 78 (2 cores, load average 6; benchmarks/test_bench_generate.py).
        direct_binding=False makes the per-token binds and runs go through
        onnxruntime's public Python API only (True: its C bindings where present,
        about 6 us a token less).
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = os.fspath(path)
        decoder_path = find_decoder(path)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise ValueError(f"threads={threads!r}: must be an integer >= 1, or None for onnxruntime's default")
        threads = int(threads) if threads is not None else None
        available = ort.get_available_providers()
        if isinstance(providers, str):
            providers = [providers]
        if providers is not None and not (isinstance(providers, (list, tuple))
                                          and all(isinstance(p, str) for p in providers) and providers):
            raise TypeError(f"providers={providers!r:.80}: must be a provider name or a non-empty list of names "
                            f"(available: {available}), or None for the CPU provider")
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"providers {missing} are not available in this onnxruntime build; available: "
                             f"{available}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not isinstance(allow_spinning, bool):
            raise TypeError(f"allow_spinning={allow_spinning!r}: must be True or False")
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        graph = read_decoder_graph(path, decoder_path)
        if graph.float16 and providers[0] == "CPUExecutionProvider":
            # onnxruntime (1.31) reuses the buffer of a Cast it inserts for float16 graphs on CPU across
            # shapes and stops at the first decode step ("Shape mismatch attempting to re-use buffer";
            # onnxruntime-genai 0.18 stops the same way on the builder's fp16 CPU models)
            options.enable_mem_reuse = False
        if graph.model_bytes is not None:  # the graph with the window the loader set; weights from the file's folder
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             os.path.dirname(os.path.abspath(decoder_path)))
        try:
            session = ort.InferenceSession(graph.model_bytes if graph.model_bytes is not None else decoder_path,
                                           sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, ...), not exported by name
            raise ValueError(f"{decoder_path}: onnxruntime cannot load the decoder ({type(exc).__name__}: "
                             f"{str(exc).strip()[:500]}); check that the file and its external data "
                             f"(.onnx.data) are complete, or export the model again") from exc
        spec = load_spec(path, decoder_path, session, graph)
        try:
            tokenizer = Tokenizer.from_file(spec.tokenizer_path)
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise ValueError(f"{spec.tokenizer_path}: the tokenizers library cannot read it ({exc}); save the "
                             f"model's fast tokenizer there again (AutoTokenizer.from_pretrained(hf_dir)"
                             f".save_pretrained(folder))") from exc
        # A saved tokenizer.json may carry the padding and truncation of its last batch
        # encode (e.g. padding Fixed(128), truncation 128): applied here they would feed
        # [PAD] tokens as input and cut long prompts silently. transformers switches both
        # off when it loads a tokenizer; so do we (a prompt past the context is an error).
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(session, spec, tokenizer, shared_buffer=shared_buffer, direct_binding=direct_binding)

    # -- prompts ------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the tokenizer config's chat template (as transformers does)."""
        if self.spec.chat_template is None:
            raise ValueError(
                f"{self.spec.folder}: the tokenizer config has no chat_template, so conversations (lists of "
                f"{{'role', 'content'}} messages) cannot be rendered; pass the prompt as a string")
        return render_chat_template(self.spec.chat_template, messages, add_generation_prompt,
                                    self.spec.bos_token or "", self.spec.eos_token or "")

    def encode(self, prompt) -> list[int]:
        """Token ids of one prompt: a string, a conversation (list of message dicts) or token ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt).ids
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            # the template writes the BOS itself, as in transformers' apply_chat_template
            return self.tokenizer.encode(self.apply_chat_template(prompt), add_special_tokens=False).ids
        if isinstance(prompt, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            return [int(t) for t in prompt]
        raise TypeError(f"prompt {prompt!r:.80}: expected a string, a conversation (a list of "
                        f"{{'role', 'content'}} dicts) or a list of token ids")

    def _prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict):
            prompts = [prompts]  # one conversation
        elif isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer)):
            prompts = [prompts]  # one prompt as token ids
        elif isinstance(prompts, np.ndarray) and prompts.ndim in (1, 2):
            prompts = [prompts] if prompts.ndim == 1 else list(prompts)  # token ids: one prompt, a batch
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts={prompts!r:.80}: give a string or a non-empty list of prompts")
        encoded = [self.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens; give at least one token")
            if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size}): {min(ids)}..{max(ids)}")
        return encoded

    # -- generation -----------------------------------------------------------------

    def generate(self, prompts, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: Callable[[int, str], None] | None = None,
                 eos_token_id: int | Sequence[int] | None = None) -> list[Generation]:
        """Generate up to ``max_new_tokens`` tokens for each prompt; one ``Generation`` per prompt.

        prompts: a string, a conversation (list of {"role", "content"} dicts, rendered
        with the chat template), token ids, or a list of these (one batch, padded).
        do_sample=False is greedy search; True samples with temperature, top_k (0:
        off) and top_p (1: off) from a numpy generator seeded with ``seed``.
        repetition_penalty follows transformers. stop: strings that end a prompt's
        generation (its text is cut before them). stream(index, piece) receives
        each prompt's text as it is decoded; the pieces join to ``text``.
        eos_token_id overrides the model's EOS ids.
        """
        start = time.perf_counter()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        max_new_tokens = int(max_new_tokens)
        if not isinstance(do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample={do_sample!r}: must be True (sample) or False (greedy search)")
        config = SamplingConfig(do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        given_stop = stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop={given_stop!r:.80}: must be a non-empty string or a list of non-empty strings")
        stop = tuple(stop)
        eos = self.spec.eos_token_ids if eos_token_id is None else self._eos_ids(eos_token_id)
        if stream is not None and not callable(stream):
            raise TypeError(f"stream={stream!r}: must be a callable stream(index, piece) or None")

        encoded = self._prompts(prompts)
        window = self.spec.sliding_window if not self.spec.sliding_window_in_graph else None
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > self.spec.context_length:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(ids) + max_new_tokens} > the model's context length {self.spec.context_length}; "
                    f"shorten the prompt or lower max_new_tokens")
            # the last new token is never fed back: the last query sees len + new - 1 positions
            if window is not None and len(ids) + max_new_tokens - 1 > window:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} the last step "
                    f"attends to {len(ids) + max_new_tokens - 1} > the model's sliding window {window} (genai_config.json), "
                    f"which its graph does not apply (no GroupQueryAttention node to set it on) and this loop "
                    f"does not apply either; stay within the window, or export the model with "
                    f"ftattn.onnx.export, whose graphs apply it")

        rng = np.random.default_rng(seed)
        results: list[Generation | None] = [None] * len(encoded)
        if self.spec.padding is Padding.NONE or self.spec.sliding_window_ring:
            # without position_ids or GQA, pads would shift the positions, and GQA's window-sized
            # rings take no padded prompt rows: each length runs as a batch of its own
            by_length: dict[int, list[int]] = {}
            for i, ids in enumerate(encoded):
                by_length.setdefault(len(ids), []).append(i)
            groups = list(by_length.values())
        else:
            groups = [list(range(len(encoded)))]
        for group in groups:
            rows = [self.text.new_row(i, encoded[i]) for i in group]
            self._run(rows, max_new_tokens, config, stop, stream, set(eos), rng)
            for row in rows:
                decode_time = row.token_times[-1] - row.token_times[0]
                made = len(row.tokens)
                results[row.index] = Generation(
                    token_ids=row.tokens,
                    text="".join(row.emitted),
                    prompt_token_ids=row.prompt,
                    finish_reason=row.finish_reason or "length",
                    time_to_first_token_s=row.token_times[0] - start,
                    decode_time_s=decode_time,
                    decode_tokens_per_s=(made - 1) / decode_time if made > 1 and decode_time > 0 else 0.0,
                    token_times_s=[t - start for t in row.token_times],
                )
        return results

    def _eos_ids(self, eos_token_id) -> tuple[int, ...]:
        one = isinstance(eos_token_id, (int, np.integer)) or (isinstance(eos_token_id, np.ndarray)
                                                                and eos_token_id.ndim == 0)
        values = [eos_token_id.item() if isinstance(eos_token_id, np.ndarray) else eos_token_id] if one \
            else eos_token_id
        if isinstance(values, (list, tuple, set, np.ndarray)) and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            ids = tuple(int(v) for v in values)
            if all(0 <= i < (self.vocab_size or 2 ** 63) for i in ids):
                return ids
        vocab = f" in [0, {self.vocab_size})" if self.vocab_size is not None else ""
        raise ValueError(f"eos_token_id={eos_token_id!r}: must be a token id or a list of token ids{vocab} "
                         f"([] never stops on a token; None uses the model's EOS ids {self.spec.eos_token_ids})")

    def _run(self, rows: list[Row], max_new_tokens: int, config: SamplingConfig, stop, stream, eos, rng):
        """Prefill and decode one batch of rows in place: the decode loop (the KV cache and
        its bindings: binding.KVRequest)."""
        spec = self.spec
        batch = len(rows)
        request = KVRequest(self.session, spec, [r.prompt for r in rows], max_new_tokens, self.shared_buffer,
                            self.direct_binding)
        seen = None
        if config.repetition_penalty != 1.0:
            vocab = self.vocab_size or int(self.session.get_outputs()[0].shape[-1])
            seen = np.zeros((batch, vocab), dtype=bool)
            for b, row in enumerate(rows):
                seen[b, row.prompt] = True
        logits = request.prefill()
        active = [True] * batch
        n_active = batch
        sampler = TokenSampler(config, batch, rng) if config.do_sample else None

        for step in range(max_new_tokens):
            scores = logits
            if seen is not None:
                scores = apply_repetition_penalty(scores.astype(np.float32, copy=True), seen, config.repetition_penalty)
            if config.do_sample:
                chosen = sampler(scores)  # finished rows' tokens are replaced by pads below
            else:
                chosen = scores.argmax(axis=-1).tolist()
                for b, token in enumerate(chosen):  # argmax picks the first NaN when there is one
                    if scores[b, token] != scores[b, token]:
                        raise ValueError(
                            f"the logits of row {b} contain NaN at new token {step}; the model's output is "
                            f"broken (check its precision and inputs), no token can be chosen from it")
            now = time.perf_counter()
            for b, row in enumerate(rows):
                if not active[b]:
                    chosen[b] = spec.pad_token_id
                    continue
                self.text.accept(row, int(chosen[b]), now, stop, stream, eos)
                if seen is not None:
                    seen[b, chosen[b]] = True
                if row.finish_reason is not None:
                    active[b] = False
                    n_active -= 1
            if n_active == 0 or step == max_new_tokens - 1:
                break
            # -- one decode step: the new token of every row (pads for finished ones)
            logits = request.step(chosen, step)
        for row in rows:
            self.text.flush(row, stream, stop)
