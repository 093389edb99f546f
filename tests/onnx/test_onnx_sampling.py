"""ftattn.onnx.sampling: the C sampler (csrc/sampling_cpu.cpp) against a plain full-sort
reference, and the reference against transformers' warpers.

The sampler returns tokens, not probabilities, so the tests probe it: at uniform numbers
just inside both ends of every kept token's interval of the reference's cumulative
distribution (token-id order), it must return that token. That pins the candidate set
and each probability to within the probe's margin.
"""
import numpy as np
import pytest
import torch

from ftattn.onnx.sampling import SamplingConfig, TokenSampler, draw_tokens

MARGIN = 1e-9  # probes this far inside each interval: probabilities agree to about this


def reference_distribution(scores, config):
    """The warpers written plainly: temperature, top-k by a full sort (ties with the k-th
    kept), top-p over the whole candidate set sorted by (logit, id). Returns the kept ids
    ascending and their probabilities."""
    values = scores.astype(np.float64) / config.temperature
    candidates = np.arange(values.shape[0])
    if 0 < config.top_k < values.shape[0]:
        kth = np.sort(values)[-config.top_k]
        candidates = np.flatnonzero(values >= kth)
    values = values[candidates]
    if config.top_p < 1.0:
        order = np.argsort(values, kind="stable")
        probs = np.exp(values[order] - values[order[-1]])
        probs /= probs.sum()
        remove = np.cumsum(probs) <= 1.0 - config.top_p
        remove[-1] = False
        keep = np.sort(order[~remove])
        candidates, values = candidates[keep], values[keep]
    probs = np.exp(values - values.max())
    return candidates, probs / probs.sum()


def reference_draw(logits, config, u):
    """The token at uniform number u: the inverse of the kept tokens' cumulative distribution."""
    candidates, probs = reference_distribution(logits, config)
    cdf = np.cumsum(probs)
    return int(candidates[min(np.searchsorted(cdf / cdf[-1], u, side="right"), cdf.shape[0] - 1)])


def probes(probs, limit=None, rng=None):
    """(uniform numbers, index of the kept token each must give): both ends of every interval
    wider than 4 margins (of `limit` intervals, the widest and a random rest, when given)."""
    upper = np.cumsum(probs)
    upper /= upper[-1]
    lower = np.concatenate([[0.0], upper[:-1]])
    wide = np.flatnonzero(upper - lower > 4 * MARGIN)
    if limit is not None and wide.shape[0] > limit:
        widest = wide[np.argsort(upper[wide] - lower[wide])[-limit // 2:]]
        wide = np.union1d(widest, rng.choice(wide, limit // 2, replace=False))
    u = np.concatenate([lower[wide] + MARGIN, upper[wide] - MARGIN])
    return np.clip(u, 0.0, np.nextafter(1.0, 0.0)), np.concatenate([wide, wide])


def check_against_reference(logits, config, limit=None, rng=None):
    candidates, probs = reference_distribution(logits, config)
    u, index = probes(probs, limit, rng)
    rows = np.broadcast_to(logits, (u.shape[0], logits.shape[0]))  # one row, repeated (row stride 0)
    np.testing.assert_array_equal(draw_tokens(rows, u, config), candidates[index])


CONFIGS = [dict(top_p=0.9), dict(top_p=0.5), dict(top_p=0.999), dict(top_p=1e-9), dict(top_k=50, top_p=0.9),
           dict(top_k=50), dict(top_k=1), dict(temperature=0.3, top_p=0.95), dict(temperature=2.5, top_k=7),
           dict()]


@pytest.mark.parametrize("vocab", [1, 7, 511, 32000])
def test_draws_equal_full_sort_reference(vocab):
    """Every config on logits of three spreads, with ties at the top and inside the nucleus;
    top-p alone over 32000 tokens runs the quickselect through many pivots."""
    rng = np.random.default_rng(vocab)
    for trial in range(6):
        logits = (rng.standard_normal(vocab) * (0.5, 3.0, 10.0)[trial % 3]).astype(np.float32)
        if trial % 2:
            logits[rng.integers(0, vocab, 5)] = logits.max()
            logits[rng.integers(0, vocab, 20)] = np.sort(logits)[-max(1, vocab // 3)]
        for kwargs in CONFIGS:
            check_against_reference(logits, SamplingConfig(do_sample=True, **kwargs), limit=120, rng=rng)


def test_all_tied_and_masked_logits():
    """All equal: top-k keeps every tie, top-p keeps the highest ids (ties go by id); -inf
    tokens (masked) are never drawn and count as zero mass."""
    flat = np.zeros(97, dtype=np.float32)
    for kwargs in CONFIGS:
        check_against_reference(flat, SamplingConfig(do_sample=True, **kwargs))
    for size in (64, 128, 256, 1024, 4096):  # cumulative masses hit 1 - top_p exactly (powers of two): dropped
        for top_p in (0.5, 0.25, 0.75, 0.125, 0.875, 0.0625):
            check_against_reference(np.zeros(size, dtype=np.float32), SamplingConfig(do_sample=True, top_p=top_p))
    masked = np.random.default_rng(0).standard_normal(97).astype(np.float32)
    masked[::3] = -np.inf
    for kwargs in CONFIGS + [dict(top_k=90)]:  # top-k past the finite ones: -inf ties kept, never drawn
        config = SamplingConfig(do_sample=True, **kwargs)
        check_against_reference(masked, config)
        drawn = draw_tokens(np.broadcast_to(masked, (999, 97)), np.linspace(0, 1, 999, endpoint=False), config)
        assert np.isfinite(masked[drawn]).all()


def test_top_p_boundary_between_two_bins():
    """Over 2048 candidates top-p first sums 1/16-wide bins of (top - logit) / temperature; here
    the boundary falls exactly between two bins: every token of the lower bin (distinct logits
    in shuffled ids) is dropped and none of the top bin."""
    rng = np.random.default_rng(5)
    logits = np.zeros(4099, dtype=np.float32)
    low = rng.permutation(4099)[:2050]
    logits[low] = -1.0 - rng.uniform(0, 0.03, low.shape[0]).astype(np.float32)
    weights = np.exp(logits.astype(np.float64))
    top_p = 1.0 - (weights[low].sum() + 0.5) / weights.sum()  # half a top token past the lower bin
    config = SamplingConfig(do_sample=True, top_p=top_p)
    candidates, _ = reference_distribution(logits, config)
    assert np.array_equal(candidates, np.flatnonzero(logits == 0))
    check_against_reference(logits, config)


def test_reference_matches_transformers_warpers():
    """(Configs whose top-p boundary does not split the tied top tokens: which of a split tie
    torch.sort keeps first is not defined; the reference breaks ties by id.)"""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rng = np.random.default_rng(0)
    for kwargs in (dict(temperature=0.7), dict(top_k=10), dict(top_p=0.9), dict(temperature=2.5, top_k=7),
                   dict(temperature=1.3, top_k=40, top_p=0.8), dict(top_k=600)):
        config = SamplingConfig(do_sample=True, **kwargs)
        for _ in range(5):
            logits = rng.normal(0, 3, size=512).astype(np.float32)
            logits[rng.integers(0, 512, 4)] = logits.max()  # ties at the top
            scores = torch.from_numpy(logits.astype(np.float64))[None]
            for warper in (TemperatureLogitsWarper(config.temperature),
                           TopKLogitsWarper(config.top_k) if config.top_k else None,
                           TopPLogitsWarper(config.top_p) if config.top_p < 1 else None):
                if warper is not None:
                    scores = warper(None, scores)
            expected = torch.softmax(scores[0], dim=-1).numpy()
            candidates, probs = reference_distribution(logits, config)
            got = np.zeros(512)
            got[candidates] = probs
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_logits(dtype):
    """Rows are read as float32 (float16 exactly; float64 rounded), with any row stride."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 1000)) * 3).astype(dtype)
    wide = np.zeros((3, 1013), dtype=dtype)
    wide[:, :1000] = logits
    config = SamplingConfig(do_sample=True, top_k=20, top_p=0.9)
    u = rng.random(3)
    expected = [reference_draw(row.astype(np.float32), config, u[b]) for b, row in enumerate(logits)]
    assert draw_tokens(wide[:, :1000], u, config).tolist() == expected  # strided rows, read in place
    assert draw_tokens(logits, u, config).tolist() == expected


def test_token_sampler_draws_ahead_like_one_draw_per_step():
    """Uniform numbers drawn 64 steps at a time are the numbers of one rng.random(batch) per
    step; a new logits array (prefill, then the decode buffer, then a copy) is picked up."""
    config = SamplingConfig(do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    rng = np.random.default_rng(3)
    steps = [(rng.standard_normal((3, 501)) * 2).astype(np.float32) for _ in range(150)]
    buffer = np.empty((3, 501), dtype=np.float32)
    sampler, twin = TokenSampler(config, 3, np.random.default_rng(7)), np.random.default_rng(7)
    for i, logits in enumerate(steps):
        if i == 0 or i % 50 == 49:
            scores = logits  # a fresh array
        else:
            buffer[:] = logits  # the same buffer, rewritten
            scores = buffer
        assert sampler(scores) == draw_tokens(logits, twin.random(3), config).tolist()
    transposed = np.asfortranarray(steps[0])  # rows not contiguous: copied, same tokens
    assert sampler(transposed) == draw_tokens(steps[0], twin.random(3), config).tolist()


def test_bad_logits_and_arguments_are_refused():
    config = SamplingConfig(do_sample=True, top_k=5)
    logits = np.zeros((2, 10), dtype=np.float32)
    logits[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"logits of row 1 contain 1 NaN"):
        draw_tokens(logits, np.zeros(2), config)
    with pytest.raises(ValueError, match=r"largest logit of row 0 is -inf"):
        draw_tokens(np.full((1, 10), -np.inf, dtype=np.float32), np.zeros(1), config)
    with pytest.raises(ValueError, match=r"largest logit of row 0 is inf"):
        draw_tokens(np.full((1, 10), np.inf, dtype=np.float32), np.zeros(1), config)
    with pytest.raises(ValueError, match=r"uniform\[0\]=1 must be in \[0, 1\)"):
        draw_tokens(np.zeros((1, 10), dtype=np.float32), np.ones(1), config)
    with pytest.raises(ValueError, match=r"uniform: shape \(3,\) must be \(1,\)"):
        draw_tokens(np.zeros((1, 10), dtype=np.float32), np.zeros(3), config)
    with pytest.raises(TypeError, match="float32, float16 or float64"):
        draw_tokens(np.zeros((1, 10), dtype=np.int32), np.zeros(1), config)
    with pytest.raises(TypeError, match="2-D"):
        draw_tokens(np.zeros(10, dtype=np.float32), np.zeros(1), config)
    for out in (np.zeros(2, dtype=np.int32), np.zeros(4, dtype=np.int64)[::2], np.zeros(3, dtype=np.int64)):
        with pytest.raises(ValueError, match=r"out: must be a writeable contiguous int64 array of shape \(2,\)"):
            draw_tokens(np.zeros((2, 10), dtype=np.float32), np.zeros(2), config, out=out)
    out = np.full(2, -1, dtype=np.int64)
    assert draw_tokens(np.eye(2, 10, dtype=np.float32) * 50, np.full(2, 0.5), config, out=out) is out
    assert out.tolist() == [0, 1]
    # a top_k past any vocabulary (past int64 too) keeps every token, as top_k >= vocab does
    logits = np.random.default_rng(3).standard_normal((1, 50)).astype(np.float32)
    u = np.linspace(0, 1, 40, endpoint=False)
    rows = np.broadcast_to(logits, (40, 50))
    np.testing.assert_array_equal(draw_tokens(rows, u, SamplingConfig(do_sample=True, top_k=2 ** 70)),
                                  draw_tokens(rows, u, SamplingConfig(do_sample=True, top_k=50)))
    for name in ("temperature", "top_p", "repetition_penalty"):
        for value in (10 ** 400, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name}=.*: must be a finite number"):
                SamplingConfig(do_sample=True, **{name: value})


def test_importing_the_onnx_package_loads_no_transformers():
    import subprocess
    import sys

    code = "import sys, ftattn.onnx; print(sorted(m for m in ('transformers', 'onnxruntime_genai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_sampler_is_its_own_extension_and_checks_its_arrays():
    import numpy as np

    from ftattn import _C
    from ftattn.onnx import _sampling

    assert not hasattr(_C, "sample_tokens")  # the attention extension carries no sampler
    scores = np.zeros((2, 5), dtype=np.float32)
    scores[0, 3] = scores[1, 1] = 9.0
    out = np.empty(2, dtype=np.int64)
    _sampling.sample_tokens(scores, np.array([0.5, 0.5]), out, 1.0, 1, 1.0)
    assert out.tolist() == [3, 1]
    # anything but checked arrays is refused with the argument named (no addresses)
    cases = [((12345, np.zeros(2), out), "scores: must be a numpy array"),
             ((scores.astype(np.int32), np.zeros(2), out), "scores: must be a 2-D float32"),
             ((scores[:, ::2], np.zeros(2), out), "vocabulary axis must be contiguous"),
             ((scores, np.zeros(3), out), r"uniform: must be a contiguous float64 array of shape \(2,\)"),
             ((scores, np.zeros(2), out.astype(np.int32)), "out: must be a writeable contiguous int64"),
             ((scores, np.zeros(2), np.frombuffer(bytes(16), dtype=np.int64)), "out: must be a writeable")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            _sampling.sample_tokens(*args, 1.0, 0, 1.0)
    with pytest.raises(ValueError, match=r"uniform\[0\]=1.5 must be in \[0, 1\)"):
        _sampling.sample_tokens(scores, np.array([1.5, 0.5]), out, 1.0, 0, 1.0)
    # a 2-D uniform gives the draws of step `row`; the same arrays again are read from the cache
    draws = np.array([[0.5, 0.5], [1.5, 0.5]])
    for _ in range(2):
        _sampling.sample_tokens(scores, draws, out, 1.0, 1, 1.0, 0)
        assert out.tolist() == [3, 1]
    with pytest.raises(ValueError, match="uniform\\[0\\]=1.5"):
        _sampling.sample_tokens(scores, draws, out, 1.0, 1, 1.0, 1)
    with pytest.raises(ValueError, match="row=2 is out of range for uniform with 2 rows"):
        _sampling.sample_tokens(scores, draws, out, 1.0, 1, 1.0, 2)
    with pytest.raises(ValueError, match="row=1 needs a 2-D uniform"):
        _sampling.sample_tokens(scores, np.array([0.5, 0.5]), out, 1.0, 1, 1.0, 1)
