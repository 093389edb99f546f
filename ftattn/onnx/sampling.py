"""Next-token choice from one step's logits, in numpy, following transformers' order.

transformers applies the repetition penalty (a logits processor) before the
warpers temperature -> top-k -> top-p, and so does this module, so greedy search
with a penalty gives the same tokens as ``model.generate(repetition_penalty=...)``.

The seed notebook softmaxed the whole vocabulary every step; here greedy search
is an argmax (no softmax at all) and sampling with top-k softmaxes only the k
candidates (``np.argpartition`` is O(vocab), the sort O(k log k)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise TypeError(f"{name}={value!r}: must be a finite number")
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


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices, in order, of the logits >= the k-th largest (ties kept).

    The logits fall into vocab/64 disjoint groups of 64 (strided, so that their maxima take
    one vectorised pass). The k largest group maxima are k distinct logits, so the k-th
    largest logit is at least the smallest of them: only the logits above that bound (a
    few times k) are partitioned, not the whole vocabulary (25 us instead of 55 for k 50
    of 32000).
    """
    size = scores.shape[0]
    blocks = size // 64
    if blocks >= 4 * k:
        maxima = scores[:blocks * 64].reshape(64, blocks).max(axis=0)  # strided groups: one fast pass
        bound = np.partition(maxima, blocks - k)[blocks - k]
        above = np.flatnonzero(scores >= bound)
        values = scores[above]
        kth = np.partition(values, values.shape[0] - k)[values.shape[0] - k]
        return above[values >= kth]
    kth = np.partition(scores, size - k)[size - k]
    return np.flatnonzero(scores >= kth)


def candidate_distribution(scores: np.ndarray, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may pick from one row of logits, and their probabilities.

    scores: (vocab,) logits, already penalised. Returns (token ids, probabilities)
    after temperature, top-k and top-p, matching transformers' warpers: top-k keeps
    the k largest (ties at the k-th value kept), top-p drops the tokens whose
    cumulative probability from the least likely up is <= 1 - top_p, keeping one.

    top-p sorts only the most likely tokens: the nucleus is looked for among the
    64 largest, then 4x as many, and so on (a full sort of a 32000-token vocabulary
    costs milliseconds, more than an int4 model step); every token outside the
    sorted set is strictly less likely than all in it, so their cumulative sum is
    one number and the rule gives the same tokens as transformers' full sort.
    """
    size = scores.shape[0]
    candidates = None  # None: the whole vocabulary, in order
    if 0 < config.top_k < size:
        # the k-th largest of the logits as given: dividing them by the temperature in float64
        # keeps their order and their ties, so only the candidates need converting
        candidates = _top_k(scores, config.top_k)  # ties with the k-th kept, as transformers
        values = scores[candidates].astype(np.float64) / config.temperature
    else:
        values = scores.astype(np.float64) / config.temperature
    weights = np.exp(values - values.max())  # the unnormalised softmax
    if config.top_p < 1.0:
        probs = weights / weights.sum()
        count = values.shape[0]
        take = min(count, 64)
        while True:
            if take < count:  # the `take` most likely, and every token tied with the last of them
                edge = np.partition(values, count - take)[count - take]
                inside = np.flatnonzero(values >= edge)
                below = probs.sum() - probs[inside].sum()  # the mass of the tokens left out
                # the boundary falls inside the set when its least likely token is removed
                if below + probs[inside].min() > 1.0 - config.top_p:
                    take *= 4
                    continue
                order = inside[np.argsort(values[inside], kind="stable")]  # ascending, ties by index
                remove = below + np.cumsum(probs[order]) <= 1.0 - config.top_p
            else:  # the whole set (few tokens after top-k, say): fewer numpy calls between two steps
                order = np.argsort(values, kind="stable")
                remove = np.cumsum(probs[order]) <= 1.0 - config.top_p
            break
        remove[-1] = False  # min_tokens_to_keep = 1
        keep = order[~remove]  # ascending, as transformers' sort leaves them (the draw follows this order)
        candidates = keep if candidates is None else candidates[keep]
        # the most likely token is kept, so the kept weights are exp(kept - their max) as they stand
        weights = weights[keep]
    return (np.arange(size) if candidates is None else candidates), weights / weights.sum()


def sample_row(scores: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """One token drawn from ``candidate_distribution(scores, config)`` with ``rng``.

    The draw is numpy's ``rng.choice(n, p=probs)`` written out (one uniform number
    against the cumulative distribution), so seeded results are the same, without
    choice's checks of ``p``, which cost more than the draw on a large vocabulary.
    """
    candidates, probs = candidate_distribution(scores, config)
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(candidates[min(int(cdf.searchsorted(rng.random(), side="right")), cdf.shape[0] - 1)])
