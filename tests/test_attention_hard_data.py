"""Clean data at the edges of the number range, in every backend (C++, reference, and the
Triton kernel, under the interpreter on a CPU-only machine): subnormal inputs and huge
logits raise no alarm and give the fp64 result; at huge logits the redundant softmax
still catches a harmful fault on a probability."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ftattn  # noqa: E402
from ftattn import Fault  # noqa: E402
from attention_reference import attention_ref, make_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cpp", "reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TAU = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-10}
# (N, M, D, causal): several key tiles on the CPU kernels, tiny under the interpreter
SHAPES = {"cpp": [(5, 7, 16, False), (33, 70, 40, True), (17, 600, 64, False), (1, 1100, 128, True)],
          "reference": [(5, 7, 16, False), (33, 70, 40, True), (17, 600, 64, False)],
          "triton": [(5, 7, 16, False), (9, 70, 40, True)]}


def _backend_ok(backend):
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter was not enabled before triton loaded")
    return "cpu" if backend != "triton" else DEVICE


def _cases(backend):
    return [(backend, *shape) for shape in SHAPES[backend]]


ALL_SHAPES = [c for b in BACKENDS for c in _cases(b)]


def _run(q, k, v, causal, backend, **kw):
    device = _backend_ok(backend)
    out, rep = ftattn.attention(q.to(device), k.to(device), v.to(device), causal=causal, backend=backend,
                                return_report=True, **kw)
    return out.cpu(), rep


# fp32 only: the subnormal inputs of the other dtypes round to zero on the way in
SUBNORMAL = {"k x 1e-39": (1.0, 1e-39, 1.0), "v x 1e-40": (1.0, 1.0, 1e-40), "q x 1e-39": (1e-39, 1.0, 1.0),
             "q, k, v x 1e-30": (1e-30, 1e-30, 1e-30)}


@pytest.mark.parametrize("case", list(SUBNORMAL), ids=str)
@pytest.mark.parametrize("backend,N,M,D,causal", ALL_SHAPES, ids=str)
def test_subnormal_inputs_raise_no_alarm(backend, N, M, D, causal, case):
    fq, fk, fv = SUBNORMAL[case]
    q, k, v = make_qkv(B=1, Hq=2, N=N, M=M, D=D, seed=N + M)
    q, k, v = q * fq, k * fk, v * fv
    for protection in ("abft", "full"):
        out, rep = _run(q, k, v, causal, backend, protection=protection, on_fault="raise")
        assert rep.detected == 0 and rep.uncorrected == 0, rep.failures()
    # the house rule (tests/test_attention.py): within 2x torch's own fp32 error, which at
    # near-uniform softmax over ~1000 keys (subnormal q or k: every score ~0) is ~1e-6 of
    # max|O|, the output being a mean of v that cancels (the GEMM's blocking moves it:
    # AMD Zen 4's MKL path gave 1.04e-6, above a fixed 1e-6); the floor keeps subnormal
    # outputs (v x 1e-40) to a few units of their last place
    ref = attention_ref(q, k, v, causal)
    err_pt = (attention_ref(q, k, v, causal, upcast=False).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + 1e-6 * max(ref.abs().max().item(), 1e-300) + 1e-44, (err, err_pt)


@pytest.mark.parametrize("scale", [1e5, 1e6, 1e7, 1e9], ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,N,M,D,causal", ALL_SHAPES, ids=str)
def test_huge_logits_raise_no_alarm(backend, N, M, D, causal, dtype, scale):
    q, k, v = make_qkv(B=1, Hq=2, N=N, M=M, D=D, dtype=dtype, seed=N * M)
    for protection in ("abft", "full"):
        out, rep = _run(q, k, v, causal, backend, protection=protection, scale=scale, on_fault="raise")
        assert rep.detected == 0 and rep.uncorrected == 0, rep.failures()
    ref = attention_ref(q, k, v, causal, scale)
    if backend == "triton" and scale > 1e6:
        return  # its scores are scaled before the max is taken: ulps of a 1e8 logit are whole units
    assert (out.double() - ref).abs().max().item() <= TAU[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("bit", [17, 19, 21])
@pytest.mark.parametrize("scale", [1e4, 1e5], ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("backend,N,M,D,causal", ALL_SHAPES, ids=str)
def test_huge_logits_probability_fault_is_caught(backend, N, M, D, causal, scale, bit):
    """The redundant softmax's tolerance once grew with the logits (u |m|): a mantissa
    flip of a probability of 0.1..0.9 passed it from |m| ~ 1e5 on (a flip of the top
    probability, 1, leaves [0, 1] and fails the range check instead)."""
    q, k, v = make_qkv(B=1, Hq=2, N=N, M=M, D=D, seed=N * M + 1)
    # row N - 1 sees every key; at these logits its softmax is one-hot: a second key
    # 0.7 / scale below the top one gets a probability of about 1/2 of the top's
    qi = q[0, 1, N - 1]
    s = (qi @ k[0, 1].T).double()
    top = int(s.argmax())
    col = (top + 1) % M
    k[0, 1, col] = k[0, 1, top] - (0.7 / scale) * qi / qi.dot(qi)
    v[0, 1, col] = v[0, 1, top] + 4.0  # the two values apart: a change of weight shows
    s = (qi.double() @ k[0, 1].double().T) * scale
    p_col = math.exp(s[col] - s.max())
    assert 0.1 < p_col < 0.9, p_col
    clean, _ = _run(q, k, v, causal, backend, scale=scale)
    fault = Fault("probs", 0, 1, row=N - 1, col=col, bit=bit)
    raw, rep = _run(q, k, v, causal, backend, scale=scale, fault=fault, on_fault="report")
    harm = (raw.double() - clean.double()).abs().max().item() > TAU[torch.float32] * max(1.0, clean.abs().max().item())
    assert harm, "the fault should be harmful"
    assert rep.detected >= 1, "harmful probability fault missed"
    out, rep = _run(q, k, v, causal, backend, scale=scale, fault=fault)
    assert rep.corrected == rep.flagged_blocks >= 1 and rep.uncorrected == 0
    assert torch.equal(out, clean)


# ---------------------------------------------------------------------------
# faults an adversary picks: the most probable keys, mid-mantissa bits, LLM-like data

VERIFYING = ["cpp", "reference", "triton"]
# (backend, dtype, D, amp): the whole grid on the CPU backends, a corner of it under the
# Triton interpreter (about 0.2 s a call)
FAMILIES = [(b, dt, D, amp) for b in ("cpp", "reference") for dt in (torch.float32, torch.bfloat16)
            for D in (64, 128, 256) for amp in (5, 20, 50, 150)]
FAMILIES += [("triton", torch.float32, 64, 20), ("triton", torch.bfloat16, 128, 150)]
# a flip that moves the output by more than this many tau must be detected
MISS_ALLOWED = {"cpp": 1.0, "reference": 1.0, "triton": 1.0}


def _reproducer_outliers(dtype):
    """q has two channels at 100, k the same two at +-100 with opposite signs: q . k stays
    moderate while sum |q||k| is 2e4, so the checksums' bounds were loose (0.79..11)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 64, generator=g) for _ in range(3))
    q[..., 0] = q[..., 1] = 100
    s = torch.randn(1, 1, 64, generator=g).sign() * 100
    k[..., 0] = s
    k[..., 1] = -s
    return q.to(dtype), k.to(dtype), v.to(dtype), 0


def _reproducer_wide(dtype):
    """Plain normal data at D = 256 (bits 13..17 of the top score were the window)."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 1, 16, 256, generator=g)
    k = torch.randn(1, 1, 64, 256, generator=g)
    v = torch.randn(1, 1, 64, 256, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), 9


def _faults_on_top_keys(q, k, v, row, causal, backend, bits, keys=3, head=0):
    """(harm / tau, detected) of each flip of the given bits of the scores of the `keys`
    most probable keys of one row; also asserts the clean call raises no alarm."""
    tau = TAU[q.dtype]
    clean, rep = _run(q, k, v, causal, backend)
    assert rep.detected == 0, rep.failures()
    group = q.shape[1] // k.shape[1]
    s = k[0, head // group].double() @ q[0, head, row].double()
    N, M = q.shape[2], k.shape[2]
    if causal:
        s[row + M - N + 1:] = float("-inf")
    out = []
    for col in s.topk(keys).indices.tolist():
        for bit in bits:
            fault = Fault("scores", 0, head, row=row, col=col, bit=bit)
            raw, rep = _run(q, k, v, causal, backend, fault=fault, on_fault="report")
            harm = (raw.double() - clean.double()).abs().max().item() / (tau * max(1.0, clean.abs().max().item()))
            out.append((col, bit, harm, rep.detected > 0))
    return out


@pytest.mark.parametrize("backend", VERIFYING)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [_reproducer_outliers, _reproducer_wide], ids=["outliers", "D256"])
def test_reproducer_faults_on_the_top_score_are_caught(backend, dtype, make):
    q, k, v, row = make(dtype)
    results = _faults_on_top_keys(q, k, v, row, False, backend, range(10, 23), keys=1)
    missed = [(bit, round(h, 1)) for _, bit, h, det in results if h > MISS_ALLOWED[backend] and not det]
    assert not missed, f"harmful flips of the top score missed (bit, harm/tau): {missed}"
    assert any(h > 10 for *_, h, _ in results)  # bit 21 moves the output by > 10 tau (> 100 in fp32)


@pytest.mark.parametrize("backend,dtype,D,amp", FAMILIES, ids=str)
def test_outlier_channel_families(backend, dtype, D, amp):
    """1, 2 or 4 channels amp x larger in q and k (with and without cancelling signs), GQA
    4:1, causal and not: no harmful flip of a top-3 key's score (bits 10..22) is missed and
    no clean call alarms."""
    missed = []
    configs = [(1, False, False), (2, True, True), (4, False, True)]
    heads, bits = (0, 3), range(10, 23, 2)
    if backend == "triton":  # the interpreter: one configuration, a few bits
        configs, heads, bits = configs[1:2], (3,), (13, 17, 21)
    for seed, (count, cancel, causal) in enumerate(configs):
        g = torch.Generator().manual_seed(1000 * D + amp + seed)
        q = torch.randn(1, 4, 16, D, generator=g)
        k = torch.randn(1, 1, 200, D, generator=g)
        v = torch.randn(1, 1, 200, D, generator=g)
        channels = torch.randperm(D, generator=g)[:count].tolist()
        for c in channels:
            q[..., c] *= amp
            k[..., c] *= amp
        if cancel:
            sign = torch.randn(1, 1, 200, generator=g).sign()
            k[..., channels[1]] = -k[..., channels[0]].abs() * sign
            k[..., channels[0]] = k[..., channels[0]].abs() * sign
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        for head in heads:
            row = int(torch.randint(0, 16, (1,), generator=g))
            for col, bit, harm, det in _faults_on_top_keys(q, k, v, row, causal, backend, bits, head=head):
                if harm > MISS_ALLOWED[backend] and not det:
                    missed.append((count, cancel, causal, head, row, col, bit, round(harm, 1)))
    assert not missed, f"harmful flips missed: {missed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,M,D", [(130, 517, 96), (97, 1031, 64), (257, 300, 128)], ids=str)
def test_column_bound_rows_term_on_cancelling_outliers(N, M, D, dtype):
    """The column check's bound for key j holds noise * sqrt(n max_d sum_i q_id^2) ||k_j||:
    the GEMM's rounding summed over the rows, which nothing else in the bound covers when
    (a) each score cancels inside its dot (outlier channels q = +-A, k = s, -s: the noise
    of S is u A^2-sized while S is not) and (b) the rows' sum of q cancels (the outliers'
    signs alternate by row), so that neither sum |S| nor the reference row's
    max_d |sum_i q_id| ||k_j|| is large. Clean runs of such data raise no alarm in C++.
    Without the term, or with q summed instead of q^2 (a mutant nothing else caught),
    they alarm; a term 100x smaller still passes here (the bound is kappa sqrt(D) wide)."""
    g = torch.Generator().manual_seed(N + M)
    q, k, v = (torch.randn(1, 2, n, D, generator=g) for n in (N, M, M))
    sign = torch.ones(N)
    sign[1::2] = -1
    for ch, a in ((0, 300.0), (1, 300.0), (2, 120.0), (3, 120.0)):
        q[..., ch] = sign * a
    s = torch.randn(1, 2, M, generator=g).sign() * 300.0
    k[..., 0], k[..., 1] = s, -s
    s2 = torch.randn(1, 2, M, generator=g).sign() * 120.0
    k[..., 2], k[..., 3] = s2, -s2
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, rep = ftattn.attention(q, k, v, backend="cpp", return_report=True)
    assert rep.detected == 0, rep.failures()[:3]
    ref = attention_ref(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=4 * TAU[dtype] * max(1.0, float(ref.abs().max())))


def _warp_reproducer():
    """Input 53 of the targeted warp campaign (seed 0, fp32): outlier channels of x150 that
    cancel inside q . k. Cut to the row the adversary struck (head 3, row 79) and the 114
    keys it sees, so that the interpreter runs it too."""
    from ftattn.tools import campaign

    job = campaign.Job(targeted=True, pattern="warp", faults=1400)
    g = campaign._unit_generator(0, len(job.clean_units()) + 53)
    q, k, v = campaign.make_data("outlier-cancel", campaign.Shape(), torch.float32, "cpu", g)
    return q[:, 3:4, 79:80].contiguous(), k[:, 1:2, :114].contiguous(), v[:, 1:2, :114].contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_warp_within_the_scores_noise_is_caught(backend):
    """Bit 15 of the 32 scores from the top key: each changes by less than the fp64
    verification's noise bound (which the cancelling x150 channels make wide), together
    they move the output by 1.4 tau; fp32's own rounding of those scores moves it by up to
    0.65 tau from the exact ones, so only a bit-for-bit recomputation of S tells them apart
    (the DMR where the verified keys' noise could hide harm). Missed before it in every
    backend."""
    q, k, v = _warp_reproducer()
    clean, rep = _run(q, k, v, False, backend, on_fault="raise")
    fault = Fault("scores", 0, 0, row=0, col=0, bit=15, span=32)
    raw, rep = _run(q, k, v, False, backend, fault=fault, on_fault="report")
    harm = (raw.double() - clean.double()).abs().max().item() / (2.0**-10 * max(1.0, clean.abs().max().item()))
    assert harm > 1.2
    assert rep.detected == 1 and "recomputed score of a likely key" in rep.failures()[0]["checks"]
    fixed, rep = _run(q, k, v, False, backend, fault=fault, on_fault="correct")
    assert rep.corrected == 1 and torch.equal(fixed, clean)
    # the recomputation is full's: abft, which does not claim it, passes this warp
    raw, rep = _run(q, k, v, False, backend, fault=fault, on_fault="report", protection="abft")
    assert rep.detected == 0 and torch.equal(raw, _run(q, k, v, False, backend, fault=fault, on_fault="report")[0])


# bf16 on the C++ kernel: S = Q K^T runs on the bf16 GEMM (oneDNN's brgemm), which reads inputs below 2^-126
# as 0 and flushes results below 2^-126 to 0 (AMX, AVX512-BF16). Subnormal inputs send the
# call to sgemm on fp32 copies; tiny normal ones whose products fall below 2^-126 stay on
# the bf16 GEMM, where the bounds on S carry 2^-126 per operation (a build with 2^-149
# there raises the row-checksum alarm on the q, k x 2^-64 case wherever the hardware flushes).
# q of 1e-39 with k of 1e3: a 32-row group's sum of q is normal, its rows are not, so on the
# bf16 GEMM the column checksum would miss |sum q| |k| (a build routing subnormal q there
# raises it: checked).
BF16_TINY = {"k x 1e-39 (subnormal)": (1.0, 1e-39, 1.0), "q x 1e-39 (subnormal), k x 1e3": (1e-39, 1e3, 1.0),
             "q, k x 2^-64 (products flushed)": (2.0**-64, 2.0**-64, 1.0),
             "q x 2^-120, k x 2^-10": (2.0**-120, 2.0**-10, 1.0)}


@pytest.mark.parametrize("case", list(BF16_TINY), ids=str)
@pytest.mark.parametrize("N,M,D,causal", [(5, 7, 16, False), (33, 600, 40, True), (100, 300, 64, False)], ids=str)
def test_bf16_tiny_inputs_on_the_bf16_gemm_raise_no_alarm(N, M, D, causal, case):
    fq, fk, fv = BF16_TINY[case]
    q, k, v = make_qkv(B=1, Hq=2, N=N, M=M, D=D, seed=N + M)
    q, k, v = (q * fq).bfloat16(), (k * fk).bfloat16(), (v * fv).bfloat16()
    for protection in ("abft", "full"):
        out, rep = _run(q, k, v, causal, "cpp", protection=protection, on_fault="raise")
        assert rep.detected == 0 and rep.uncorrected == 0, rep.failures()
    ref = attention_ref(q, k, v, causal)
    err = (out.double() - ref).abs().max().item()
    assert err <= TAU[torch.bfloat16] * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_probabilities_below_2_126_with_huge_values_raise_no_alarm(causal):
    """P V on the bf16 GEMM reads a probability below 2^-126 (scores ~87.5 below the row's
    max) as 0; the kernel rounds such p' to 0 itself, so the PV checksum sums what the
    product reads. With values of 1e30 on those keys and 1e-30 on the others, a checksum of
    the unflushed p' fails every block (seen: the PV-checksum flag on clean data); the
    output, ~5e-9 in fp64, stays within bf16's tolerance either way."""
    N, M, D = 100, 300, 16  # (N > 64: not a stacked block, which keeps sgemm)
    q = torch.zeros(1, 2, N, D)
    q[..., 0] = 1.0
    k = torch.randn(1, 1, M, D, generator=torch.Generator().manual_seed(3))
    far = torch.arange(M) % 3 == 0
    k[..., 0] = 0.0  # (the scores are k_j0: the row max 0 exactly)
    k[0, 0, far, 0] = -87.5  # p = 0.85 2^-126 (as 2^(-126.24)): bf16 subnormal
    v = torch.randn(1, 1, M, D, generator=torch.Generator().manual_seed(4)) * 1e-30
    v[0, 0, far] = 1e30  # (their p v, ~1e-8, dominate the output and the PV bound)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    for protection in ("abft", "full"):
        out, rep = _run(q, k, v, causal, "cpp", protection=protection, scale=1.0, on_fault="raise")
        assert rep.detected == 0 and rep.uncorrected == 0, rep.failures()
    ref = attention_ref(q, k, v, causal, scale=1.0)
    assert (out.double() - ref).abs().max().item() <= TAU[torch.bfloat16] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("key", [15, 17, 20, 31, 47], ids=lambda j: f"key{j}")
def test_huge_value_row_past_a_causal_row_end_raises_no_alarm(dtype, key):
    """The C++ kernel runs a causal row's last, partly masked vector of keys whole, with p = 0 on
    the masked keys: those must not multiply their value sums, which overflow fp32 for a finite
    row of v ~ 1e37 (0 * inf = NaN in the PV checksum: every row whose last vector masked that
    key was reported uncorrected; found by review)."""
    q, k, v = make_qkv(B=1, Hq=2, N=64, M=64, D=64, seed=key)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    v[0, 1, key, :] = 1e37 if dtype == torch.float32 else 3e37
    for protection in ("abft", "full"):
        out, rep = _run(q, k, v, True, "cpp", protection=protection, on_fault="raise")
        assert rep.detected == 0 and rep.uncorrected == 0, rep.failures()
    ref = attention_ref(q, k, v, True)
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert err <= TAU[dtype], err
