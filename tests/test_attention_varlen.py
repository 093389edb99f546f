"""Per-sample key ranges (key_start / key_end [B]): a padded batch in one call. Each
sample attends to its own keys [key_start[b], key_end[b]) only, causal aligned at
key_end[b]; by definition equal to one call per sample on its slice of k and v, in every
backend (C++ bit for bit), with faults and reports in the whole batch's coordinates."""
import pytest
import torch

import ftattn
from ftattn import Fault, FaultDetectedError

BACKENDS = ["cpp", "reference", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (B, Hq, Hkv, N, M, D, ranges): left and right padding, an empty sample, one key,
# decode (N = 1, stacked GQA heads), more than one key tile (M = 600 > 512)
CASES = [
    (3, 4, 2, 5, 11, 16, [(0, 11), (2, 9), (4, 4)]),
    (2, 2, 1, 7, 13, 59, [(6, 13), (0, 1)]),
    (4, 8, 2, 1, 40, 64, [(0, 40), (10, 40), (39, 40), (3, 17)]),
    (2, 2, 2, 70, 600, 32, [(17, 600), (0, 333)]),
]


def _inputs(B, Hq, Hkv, N, M, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((B, Hq, N, D), (B, Hkv, M, D), (B, Hkv, M, D))]


def _small(backend, case):
    return backend != "triton" or case[4] <= 64  # the interpreter: small shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[3]}M{c[4]}D{c[5]}")
def test_equals_one_call_per_sample(backend, dtype, causal, case):
    if not _small(backend, case):
        pytest.skip("the Triton interpreter runs small shapes")
    B, Hq, Hkv, N, M, D, ranges = case
    q, k, v = _inputs(B, Hq, Hkv, N, M, D, dtype)
    start, end = (torch.tensor(x) for x in zip(*ranges))
    out, rep = ftattn.attention(q, k, v, causal=causal, backend=backend, key_start=start, key_end=end,
                                return_report=True)
    assert rep.detected == 0 and out.shape == q.shape
    ref64 = []
    for b, (s, e) in enumerate(ranges):
        one = ftattn.attention(q[b:b + 1], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], causal=causal, backend=backend)
        if backend == "cpp":
            assert torch.equal(out[b:b + 1], one), b
        else:
            torch.testing.assert_close(out[b:b + 1], one, rtol=0, atol=TOL[dtype])
        if s == e:
            assert not out[b].any()
        # against fp64: visible j in [s, e) and, causal, j <= i + e - N
        qb, kb, vb = (t[b].double().repeat_interleave(Hq // t.shape[1], 0) if t is not q else t[b].double()
                      for t in (q, k, v))
        scores = qb @ kb.transpose(-1, -2) / D ** 0.5
        j, i = torch.arange(M), torch.arange(N)[:, None]
        visible = (j >= s) & (j < e) & ((j <= i + e - N) if causal else True)
        scores = scores.masked_fill(~visible, float("-inf"))
        ref = torch.nan_to_num(torch.softmax(scores, -1)) @ vb
        ref64.append(ref.float())
    torch.testing.assert_close(out.float(), torch.stack(ref64), rtol=0, atol=4 * TOL[dtype] + 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("site", ["scores", "probs", "acc", "output"])
def test_faults_keep_the_whole_batch_coordinates(backend, site):
    """A fault at batch 1, on a key of its range (absolute index), is detected there, the
    report names batch 1, and correction gives the clean output; a fault on a key outside
    the sample's range lands nowhere."""
    q, k, v = _inputs(3, 2, 1, 6, 20, 16, torch.float32, seed=3)
    start, end = torch.tensor([0, 5, 12]), torch.tensor([20, 14, 20])
    kw = dict(key_start=start, key_end=end, backend=backend)
    clean = ftattn.attention(q, k, v, **kw)
    fault = Fault(site, 1, 1, row=4, col=9, dim=3, bit=30)
    with pytest.raises(FaultDetectedError, match=r"batch 1, head 1, rows 0\.\.5"):
        ftattn.attention(q, k, v, fault=fault, on_fault="raise", **kw)
    out, rep = ftattn.attention(q, k, v, fault=fault, return_report=True, **kw)
    assert [f["batch"] for f in rep.failures()] == [1] and rep.corrected == 1
    assert torch.equal(out, clean)
    if site != "output":
        outside = Fault(site, 1, 1, row=4, col=16, dim=3, bit=30)  # key 16 is not in [5, 14)
        out, rep = ftattn.attention(q, k, v, fault=outside, on_fault="report", return_report=True, **kw)
        assert rep.detected == 0 and torch.equal(out, clean)


def test_bad_ranges_are_refused_clearly():
    q, k, v = _inputs(2, 2, 1, 3, 8, 16, torch.float32)
    ok = torch.tensor([0, 8])
    cases = [
        (dict(key_start=ok), ValueError, "go together"),
        (dict(key_start=torch.tensor([0, 9]), key_end=torch.tensor([8, 9])), ValueError,
         r"sample 1 has keys \[9, 9\); they must satisfy 0 <= key_start <= key_end <= M = 8"),
        (dict(key_start=torch.tensor([3, 0]), key_end=torch.tensor([2, 8])), ValueError, r"sample 0 has keys \[3, 2\)"),
        (dict(key_start=torch.tensor([0.0, 1.0]), key_end=ok), TypeError, "integer tensor of shape \\[2\\]"),
        (dict(key_start=torch.tensor([0]), key_end=ok), TypeError, "integer tensor of shape \\[2\\]"),
    ]
    for backend in ("cpp", "reference"):
        for kwargs, error, match in cases:
            with pytest.raises(error, match=match):
                ftattn.attention(q, k, v, backend=backend, **kwargs)
    # the raw op checks what protects memory
    with pytest.raises(RuntimeError, match="must satisfy 0 <= key_start"):
        torch.ops.ftattn.attention_fwd(q, k, v, False, 0.25, 2, True, None, None, torch.tensor([0, 9]),
                                       torch.tensor([8, 9]))


def test_op_compile_and_meta():
    q, k, v = _inputs(2, 4, 2, 5, 9, 16, torch.float32)
    start, end = torch.tensor([0, 3]), torch.tensor([9, 9])
    torch.library.opcheck(torch.ops.ftattn.attention.default, (q, k, v),
                          {"causal": True, "key_start": start, "key_end": end})
    torch.library.opcheck(torch.ops.ftattn.attention_fwd.default, (q, k, v, True, 0.25, 2, True, None, None, start,
                                                                    end))

    def fn(q, k, v, start, end):
        return torch.ops.ftattn.attention(q, k, v, causal=True, key_start=start, key_end=end) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(q, k, v, start, end), fn(q, k, v, start, end))
    meta = [t.to("meta") for t in (q, k, v)]
    out = ftattn.attention(*meta, key_start=start.to("meta"), key_end=end.to("meta"))
    assert out.is_meta and out.shape == q.shape
