"""Next-token choice from one step's logits, following transformers' order.

transformers applies the repetition penalty (a logits processor) before the
warpers temperature -> top-k -> top-p, and so does this module, so greedy search
with a penalty gives the same tokens as ``model.generate(repetition_penalty=...)``.

Greedy search is an argmax (no softmax at all) and sampling is one C++ call per step
(``ftattn.onnx._sampling.sample_tokens``, csrc/onnx/sampling.cpp): a single pass over the logits for top-k and a
weighted selection, not a sort, for top-p.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from .. import _extension

_sampling = _extension.load(f"{__package__}._sampling", "FTATTN_SAMPLING_EXTENSION")  # its own extension, no torch


@dataclass
class SamplingConfig:
    """How ``Generator.generate`` picks each token; validated on construction."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 turns top-k filtering off)")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name}={value!r:.60}: must be a finite number")
            try:
                finite = math.isfinite(value)  # (an int past float's range raises OverflowError)
            except OverflowError:
                finite = False
            if not finite:
                raise ValueError(f"{name}={value!r:.60}: must be a finite number")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r}: sampling needs temperature > 0; use "
                             f"do_sample=False for greedy search")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]; 1 turns nucleus filtering off")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: must be > 0 (1 is no penalty, "
                             f"> 1 discourages repeats)")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)):
            raise TypeError(f"seed={self.seed!r}: must be an int >= 0 or None")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be an int >= 0 (numpy's generators take no negative "
                             f"seeds) or None for a fresh one")


def apply_repetition_penalty(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor on every token in ``seen``.

    scores: (batch, vocab) float32, modified in place; seen: (batch, vocab) bool,
    the tokens of the prompt and of what was generated so far.
    """
    chosen = scores[seen]
    scores[seen] = np.where(chosen < 0, chosen * penalty, chosen / penalty)
    return scores


_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


def _rows(scores: np.ndarray) -> np.ndarray:
    """scores as the C call reads them: 2-D float32/16/64 with contiguous rows (else a copy)."""
    if not isinstance(scores, np.ndarray) or scores.ndim != 2 or scores.dtype not in _DTYPES:
        raise TypeError(f"scores: must be a 2-D float32, float16 or float64 array, got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)} {getattr(scores, 'shape', '')}")
    if scores.strides[1] != scores.itemsize or scores.strides[0] % scores.itemsize:
        return np.ascontiguousarray(scores)
    return scores


def draw_tokens(scores: np.ndarray, uniform: np.ndarray, config: SamplingConfig,
                out: np.ndarray | None = None) -> np.ndarray:
    """The token of each row of ``scores`` (batch, vocab) at its uniform number in [0, 1).

    After temperature, top-k keeps the logits >= the k-th largest (ties kept) and top-p
    drops the tokens whose cumulative probability from the least likely up is <= 1 - top_p
    (keeping the most likely), as transformers' warpers; the token is the inverse of the
    kept tokens' cumulative distribution, in token-id order, at ``uniform[b]``. One call of
    ``ftattn.onnx._sampling.sample_tokens`` (csrc/onnx/sampling.cpp) for the whole batch.
    """
    rows = _rows(scores)
    uniform = np.ascontiguousarray(uniform, dtype=np.float64)
    if uniform.shape != rows.shape[:1]:
        raise ValueError(f"uniform: shape {uniform.shape} must be ({rows.shape[0]},), one number per row")
    if out is None:
        out = np.empty(rows.shape[0], dtype=np.int64)
    _sampling.sample_tokens(rows, uniform, out, *_warpers(config))  # (it checks out)
    return out


def _warpers(config: SamplingConfig) -> tuple:
    """(temperature, top_k, top_p) as sample_tokens takes them."""
    return float(config.temperature), min(int(config.top_k), 2 ** 62), float(config.top_p)


class TokenSampler:
    """Each step's sampled tokens for a batch of ``batch`` rows: ``sampler(scores)``.

    Every step takes ``batch`` uniform numbers from ``rng`` (drawn ahead, 64 steps at a
    time: the same numbers as one ``rng.random(batch)`` a step), so a row's draws do not
    depend on when the other rows finish. The generator calls it between two model steps,
    when the caches are cold and every numpy call costs 10-20 us, so the common case (the
    same logits buffer every step) is one C call on arrays checked once.
    """

    STEPS = 64  # steps of uniform numbers drawn at a time

    def __init__(self, config: SamplingConfig, batch: int, rng: np.random.Generator):
        self.config, self.rng, self.batch = config, rng, batch
        self.uniform = np.empty((self.STEPS, batch), dtype=np.float64)
        self.tokens = np.empty(batch, dtype=np.int64)
        self._step = self.STEPS  # the next row of uniform numbers to use; STEPS: draw more first
        self._scores = None  # the last logits array checked (kept: the same buffer every step)
        self._args = _warpers(config)

    def __call__(self, scores: np.ndarray) -> list[int]:
        if self._step == self.STEPS:
            self.rng.random(out=self.uniform)
            self._step = 0
        step = self._step
        self._step = step + 1
        rows = scores
        if scores is not self._scores:  # a new logits array: check it once
            rows = _rows(scores)
            if rows.shape[0] != self.batch:
                raise ValueError(f"scores: {rows.shape[0]} rows, the sampler draws for {self.batch}")
            # a copy is not kept: the array it copies may be rewritten in place
            self._scores = scores if rows is scores else None
        _sampling.sample_tokens(rows, self.uniform, self.tokens, *self._args, step)
        return self.tokens.tolist()
