"""Tests of kernels/attention.py, the Triton fault-tolerant attention kernel (launched by
ftattn/_launch/attention.py).

On a CPU-only machine the kernel runs under the Triton interpreter
(TRITON_INTERPRET=1, set below before anything creates a triton.jit function), so
shapes stay tiny and odd: N, M in {1, 17, 40, 70}, head dims 16, 59 (padded to 64
inside the kernel) and 64. On a CUDA machine the same tests run the compiled kernel.

Mirrors the file's sections: correctness against an fp64 reference (the
flash-attention 2x rule), protection levels, every fault site injected, detected and
corrected, the flags contract, non-finite input, the replay on 128-row programs.
"""
import importlib
import math
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs in ftattn.kernels.attention

triton = pytest.importorskip("triton")
tl = triton.language

import ftattn  # noqa: E402
from ftattn.faults import ATTENTION_SITES, CHECK_MASK, Check, Fault, Site  # noqa: E402
from triton_compile import compile_without_gpu  # noqa: E402

kernel = importlib.import_module("ftattn.kernels.attention")
launcher = importlib.import_module("ftattn._launch.attention")
if DEVICE == "cpu" and not isinstance(kernel._attn_fwd, triton.runtime.interpreter.InterpretedFunction):
    # imported earlier in this process without the interpreter: rebuild its jit functions
    kernel = importlib.reload(kernel)
    launcher = importlib.reload(launcher)

attention_fwd = launcher.attention_fwd

PROTECTION = {"off": 0, "abft": 1, "full": 2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Error floor added to the 2x rule, per dtype: about 4 ulp at magnitude 1 of the dtype
# (the rule alone is too strict where plain PyTorch happens to round exactly).
FLOOR = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8, torch.float32: 4 * 2.0**-24}
# FAULT_MODEL.md: a fault is harmful above tau * max(1, max|O|)
TAU = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-10}


# the interpreter's numpy emulation warns on -inf - -inf and 0/0 in masked lanes,
# which the kernel discards with tl.where
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make_inputs(B, Hq, Hkv, N, M, D, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, N, D, generator=g) * scale).to(dtype)
    k = (torch.randn(B, Hkv, M, D, generator=g) * scale).to(dtype)
    v = torch.randn(B, Hkv, M, D, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def attention_math(q, k, v, causal, scale, dtype):
    """Plain PyTorch attention computed in `dtype` (float64 for the reference);
    bottom-right causal alignment; rows with no visible key are zeros."""
    q, k, v = q.cpu().to(dtype), k.cpu().to(dtype), v.cpu().to(dtype)
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(N)[:, None]
        j = torch.arange(M)[None, :]
        s = s.masked_fill(j > i + (M - N), float("-inf"))
    p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype).nan_to_num(0.0)
    return p @ v


def run(q, k, v, causal=False, protection="full", recompute=True, fault=None, **blocks):
    scale = 1.0 / math.sqrt(q.shape[-1])
    enc, value = fault.encode() if fault is not None else (None, None)
    out, flags = attention_fwd(q, k, v, causal, scale, PROTECTION[protection], recompute, enc, value, **blocks)
    return out.cpu(), flags.cpu()


# ---------------------------------------------------------------------------
# correctness: the 2x rule against fp64, no false alarm


SHAPES = [  # B, Hq, Hkv, N, M, D, causal
    (1, 2, 1, 17, 17, 16, False),
    (1, 2, 2, 1, 70, 59, True),  # decoding: one query at the end of 70 keys
    (2, 4, 1, 70, 17, 64, True),  # N > M: the first 53 rows see no key -> zeros; GQA 4:1
    (1, 2, 1, 17, 70, 16, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}N{}M{}D{}{}".format(*s[:6], "c" if s[6] else ""))
def test_matches_fp64_reference(shape, dtype):
    B, Hq, Hkv, N, M, D, causal = shape
    q, k, v = make_inputs(B, Hq, Hkv, N, M, D, dtype, seed=N + M + D)
    out, flags = run(q, k, v, causal)
    assert out.dtype == dtype and out.shape == (B, Hq, N, D)
    scale = 1.0 / math.sqrt(D)
    ref = attention_math(q, k, v, causal, scale, torch.float64)
    plain = attention_math(q, k, v, causal, scale, dtype)
    err = (out.double() - ref).abs().max().item()
    err_plain = (plain.double() - ref).abs().max().item()
    assert err <= 2 * err_plain + FLOOR[dtype], f"kernel error {err:.3g} vs plain {dtype} {err_plain:.3g}"
    assert torch.count_nonzero(flags) == 0, f"false alarm on clean data: {flags}"
    if causal and N > M:  # rows i with i + M - N < 0 attend to nothing
        assert torch.count_nonzero(out[:, :, : N - M]) == 0


def test_peaky_softmax_and_long_keys_raise_no_alarm():
    # |q.k| up to ~1e4 (FAULT_MODEL.md clean data), 200 keys, causal with one key visible
    # to the first row
    q, k, v = make_inputs(1, 1, 1, 70, 200, 16, torch.float16, seed=3, scale=12.0)
    out, flags = run(q, k, v, causal=True)
    ref = attention_math(q, k, v, True, 0.25, torch.float64)
    assert torch.count_nonzero(flags) == 0
    assert (out.double() - ref).abs().max().item() <= 2 * (attention_math(q, k, v, True, 0.25, torch.float16).double()
                                                          - ref).abs().max().item() + FLOOR[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_protection_levels_give_the_same_output(dtype):
    q, k, v = make_inputs(1, 2, 1, 70, 40, 59, dtype, seed=1)
    outs = {p: run(q, k, v, causal=True, protection=p) for p in PROTECTION}
    for p, (out, flags) in outs.items():
        assert torch.count_nonzero(flags) == 0, p
        assert torch.equal(out, outs["off"][0]), f"protection={p} changed the output"


def test_public_function_triton_backend_matches_cpp():
    q, k, v = make_inputs(1, 4, 2, 17, 40, 16, torch.float16, seed=2)
    if DEVICE == "cpu":
        out_t, rep_t = ftattn.attention(q, k, v, causal=True, backend="triton", return_report=True)
        out_c = ftattn.attention(q, k, v, causal=True, backend="cpp")
        assert rep_t.detected == 0
        assert (out_t.double() - out_c.double()).abs().max().item() <= 2.0**-10
    else:
        out_t = ftattn.attention(q, k, v, causal=True)  # auto: Triton on CUDA
        ref = attention_math(q, k, v, True, 0.25, torch.float64)
        assert (out_t.cpu().double() - ref).abs().max().item() <= 2.0**-9


# ---------------------------------------------------------------------------
# faults: every site injectable, detected at "full", corrected to the clean output

N_F, M_F, D_F = 70, 40, 16  # two report blocks; the fault row 66 lies in block 1
# A big fault at each site and the check that must see it (FAULT_MODEL.md sites, the
# checks of kernels/attention.py's header). The bit: 30 (top exponent bit) everywhere
# but the running max, where softmax's shift invariance makes m -> ~0 harmless: bit 29
# sends m (about 2 in log2 units) to ~2^33 instead.
BIG_BIT = {"rowmax": 29}
SITE_CHECK = {
    "scores": Check.ROW_CHECKSUM | Check.COL_CHECKSUM,
    "probs": Check.PROBS_RANGE,
    "rowmax": Check.ROWMAX_INVARIANT,
    "rowsum": Check.ROWSUM_INVARIANT,
    "acc": Check.PV_CHECKSUM,
    "output": Check.OUTPUT_CHECK,
}


@pytest.fixture(scope="module")
def fault_inputs():
    q, k, v = make_inputs(1, 2, 1, N_F, M_F, D_F, torch.float16, seed=7)
    clean, flags = run(q, k, v, causal=True)
    assert torch.count_nonzero(flags) == 0
    return q, k, v, clean


@pytest.mark.parametrize("how", ["bit30", "multibit", "nan", "inf"])
@pytest.mark.parametrize("site", list(SITE_CHECK))
def test_every_site_is_detected_and_corrected(fault_inputs, site, how):
    q, k, v, clean = fault_inputs
    big = BIG_BIT.get(site, 30)
    kw = {"bit": big} if how == "bit30" else {"bits": (3, 12, big)} if how == "multibit" else {"value": float(how)}
    fault = Fault(site, batch=0, head=1, row=66, col=33, dim=5, **kw)
    raw, flags = run(q, k, v, causal=True, recompute=False, fault=fault)
    tau = TAU[torch.float16] * max(1.0, clean.abs().max().item())
    diff = (raw.float() - clean.float()).abs().nan_to_num(float("inf"))
    assert diff.max().item() > tau, "the fault did not land (harmless), the test would prove nothing"
    assert flags[0, 1, 1] & CHECK_MASK, f"{site} fault missed: flags {flags.tolist()}"
    if how in ("bit30", "multibit"):
        assert flags[0, 1, 1] & int(SITE_CHECK[site]), f"{site}: {Check(int(flags[0, 1, 1]))!r}"
    # only the struck block is flagged, and not as bad input, nor corrected without recompute
    others = flags.clone()
    others[0, 1, 1] = 0
    assert torch.count_nonzero(others) == 0
    assert not flags[0, 1, 1] & int(Check.NONFINITE_INPUT | Check.CORRECTED | Check.UNCORRECTED)
    fixed, flags_c = run(q, k, v, causal=True, recompute=True, fault=fault)
    assert flags_c[0, 1, 1] & int(Check.CORRECTED) and not flags_c[0, 1, 1] & int(Check.UNCORRECTED)
    assert flags_c[0, 1, 1] & CHECK_MASK == flags[0, 1, 1] & CHECK_MASK  # the first pass's findings are kept
    assert torch.equal(fixed, clean), "the recomputation is deterministic: it must equal the clean output"


def test_small_softmax_fault_needs_the_redundant_softmax(fault_inputs):
    # A mantissa flip of p (bit 22: p * 1.5) keeps 0 <= p <= 1, feeds PV and its checksum
    # alike, so "abft" misses it (FAULT_MODEL.md allows that, reported) and "full" sees it.
    q, k, v, clean = fault_inputs
    fault = Fault("probs", batch=0, head=1, row=66, col=33, bit=22)
    raw_abft, flags_abft = run(q, k, v, causal=True, protection="abft", recompute=False, fault=fault)
    raw_full, flags_full = run(q, k, v, causal=True, protection="full", recompute=False, fault=fault)
    assert torch.equal(raw_abft, raw_full)
    assert (raw_full.float() - clean.float()).abs().max().item() > 0
    assert flags_full[0, 1, 1] & int(Check.SOFTMAX_DMR)
    assert not flags_abft[0, 1, 1] & int(Check.SOFTMAX_DMR)


def test_fault_outside_visible_keys_does_not_land(fault_inputs):
    # causal, N=70, M=40: block 0 (rows 0..63) sees keys < 34; a rowsum fault named at key
    # 37 strikes no tile of block 0, as in the C++ kernel
    q, k, v, clean = fault_inputs
    out, flags = run(q, k, v, causal=True, recompute=False, fault=Fault("rowsum", batch=0, head=0, row=10, col=37,
                                                                        bit=30))
    assert torch.count_nonzero(flags) == 0
    assert torch.equal(out, clean)


def test_protection_off_sees_nothing(fault_inputs):
    q, k, v, clean = fault_inputs
    fault = Fault("acc", batch=0, head=1, row=66, col=33, dim=5, bit=30)
    out, flags = run(q, k, v, causal=True, protection="off", fault=fault)
    assert torch.count_nonzero(flags) == 0
    assert not torch.equal(out, clean)


@pytest.mark.parametrize("site", ["scores", "acc"])
def test_128_row_programs_flag_and_replay_only_the_struck_block(site):
    # BLOCK_M = 128: one program owns report blocks 0 and 1; the fault in row 66 must flag
    # block 1 only, and the replay must rewrite only block 1's rows
    q, k, v = make_inputs(1, 1, 1, 130, 70, 16, torch.float16, seed=11)
    blocks = {"block_m": 128, "block_n": 64}
    clean, flags0 = run(q, k, v, causal=False, **blocks)
    assert torch.count_nonzero(flags0) == 0
    fault = Fault(site, batch=0, head=0, row=66, col=65, dim=3, bit=30)
    raw, flags = run(q, k, v, causal=False, recompute=False, fault=fault, **blocks)
    assert flags.shape == (1, 1, 3)
    assert flags[0, 0, 1] & CHECK_MASK and flags[0, 0, 0] == 0 and flags[0, 0, 2] == 0
    assert torch.equal(raw[:, :, :64], clean[:, :, :64])
    fixed, flags_c = run(q, k, v, causal=False, recompute=True, fault=fault, **blocks)
    assert flags_c[0, 0, 1] & int(Check.CORRECTED) and flags_c[0, 0, 0] == 0
    assert torch.equal(fixed, clean)


def test_public_function_correct_raise_report():
    if DEVICE == "cpu":
        kw = {"backend": "triton"}
    else:
        kw = {}
    q, k, v = make_inputs(1, 2, 1, 17, 17, 16, torch.float16, seed=5)
    fault = Fault("output", batch=0, head=1, row=3, dim=2, value=1e30)
    clean = ftattn.attention(q, k, v, **kw)
    fixed, report = ftattn.attention(q, k, v, fault=fault, return_report=True, **kw)
    assert report.detected >= 1 and report.corrected == 1 and torch.equal(fixed, clean)
    with pytest.raises(ftattn.FaultDetectedError):
        ftattn.attention(q, k, v, fault=fault, on_fault="raise", **kw)
    raw = ftattn.attention(q, k, v, fault=fault, on_fault="report", **kw)
    assert raw[0, 1, 3, 2].item() == float("inf")  # 1e30 does not fit float16


# ---------------------------------------------------------------------------
# span: one corruption on consecutive values of a row (ftattn/contract.py SPAN_AXIS):
# keys for scores / probs (each value in the key tile holding it), head dims for acc /
# output, clipped at the row's end

PUBLIC = {"backend": "triton"} if DEVICE == "cpu" else {}  # (CUDA: auto is Triton)


def _changed(raw, clean):
    """[(b, h, row, dim)] where the outputs differ."""
    return [tuple(i) for i in (raw != clean).nonzero().tolist()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("site", ["acc", "output"])
def test_dim_span_changes_exactly_its_head_dims(site, dtype):
    # causal N 70, M 40, D 59 (padded to 64 in the kernel): row 66 sees keys 0..36, its
    # last key tile is 32..63, where col 33 names the acc fault's tile
    q, k, v = make_inputs(1, 2, 1, 70, 40, 59, dtype, seed=21)
    clean, _ = run(q, k, v, causal=True, protection="off")
    for dim, span in ((5, 8), (40, 32), (58, 1)):  # (40 + 32 > 59: clipped at the row's end)
        fault = Fault(site, batch=0, head=1, row=66, col=33, dim=dim, span=span, bit=31)
        raw, flags = run(q, k, v, causal=True, protection="off", fault=fault)
        hit = list(range(dim, min(59, dim + span)))
        assert _changed(raw, clean) == [(0, 1, 66, d) for d in hit], (dim, span)
        # a sign flip after the last update of the row (acc: in its last tile) negates O
        assert torch.equal(raw[0, 1, 66, hit], -clean[0, 1, 66, hit])
        assert torch.count_nonzero(flags) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("site", ["scores", "probs"])
def test_key_span_across_tiles_hits_every_key(site, dtype):
    # keys 20..51 of row 66 span the 32-key tiles 0..31 and 32..63 and run past M = 40
    # (clipped); row 66 sees keys 0..36. Scores -> -1e30 or probs -> 0 on keys 20..36
    # leave the attention of row 66 over keys 0..19 alone: every key of the span was hit
    q, k, v = make_inputs(1, 2, 1, 70, 40, 16, dtype, seed=22)
    clean, _ = run(q, k, v, causal=True, protection="off")
    value = -1e30 if site == "scores" else 0.0
    raw, flags = run(q, k, v, causal=True, protection="off",
                     fault=Fault(site, batch=0, head=1, row=66, col=20, span=32, value=value))
    assert {c[:3] for c in _changed(raw, clean)} == {(0, 1, 66)} and torch.count_nonzero(flags) == 0
    qr, kr, vr = (t.cpu().double() for t in (q[0, 1, 66], k[0, 0, :20], v[0, 0, :20]))
    want = torch.softmax(kr @ qr / 4.0, 0) @ vr
    assert (raw[0, 1, 66].double() - want).abs().max().item() <= TAU[dtype] * max(1.0, want.abs().max().item())
    # a sign flip of the same keys: row 66 changes, no other row
    raw, _ = run(q, k, v, causal=True, protection="off", fault=Fault(site, batch=0, head=1, row=66, col=20, span=32,
                                                                      bit=31 if site == "scores" else 30))
    assert {c[:3] for c in _changed(raw, clean)} == {(0, 1, 66)}


@pytest.mark.parametrize("protection", ["abft", "full"])
@pytest.mark.parametrize("site", list(SITE_CHECK))
def test_warp_fault_detected_and_corrected(site, protection):
    # a warp's 32 lanes of one row: a big exponent bit, or a replacement by 1e4; the
    # dtypes taken in turn (each site under two of them, each dtype at both levels)
    dtype = DTYPES[(list(SITE_CHECK).index(site) + list(PROTECTION).index(protection)) % len(DTYPES)]
    q, k, v = make_inputs(1, 2, 1, 70, 40, 48, dtype, seed=23)
    clean = ftattn.attention(q, k, v, causal=True, protection=protection, **PUBLIC)
    for kw in ({"bit": BIG_BIT.get(site, 30)}, {"value": 1e4}):
        fault = Fault(site, batch=0, head=1, row=66, col=5, dim=10, span=32, **kw)
        fixed, rep = ftattn.attention(q, k, v, causal=True, protection=protection, fault=fault, return_report=True,
                                      **PUBLIC)
        assert rep.detected > 0 and rep.corrected == rep.flagged_blocks == 1, (fault, rep)
        assert torch.equal(fixed, clean), fault


def test_acc_warp_that_cancels_exactly_is_caught_by_the_weighted_checksum():
    """A warp of 32 accumulator faults whose deltas sum to exactly 0 in the plain PV checksum
    (tests/attention_reference.py): abft passes it, full's weighted checksum (_pv_weight, the
    same weights as the C++ kernel and the reference) flags it and the block is made again."""
    from attention_reference import cancelling_acc_warp

    q, k, v, fault = cancelling_acc_warp()
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    clean, flags = run(q, k, v)
    assert torch.count_nonzero(flags) == 0
    raw, flags = run(q, k, v, protection="abft", recompute=False, fault=fault)
    assert (raw - clean).abs().max().item() > 2.0**-10 and torch.count_nonzero(flags) == 0
    raw, flags = run(q, k, v, recompute=False, fault=fault)
    assert flags[0, 0, 0] & int(Check.PV_CHECKSUM), Check(int(flags[0, 0, 0]))
    fixed, flags = run(q, k, v, fault=fault)
    assert flags[0, 0, 0] & int(Check.CORRECTED) and torch.equal(fixed, clean)


@triton.jit
def _store_pv_weights(out):
    offs = tl.arange(0, 256)
    tl.store(out + offs, kernel._pv_weight(offs))


def test_pv_weights_are_the_references():
    """The weighted PV checksum's weights in the kernel (_pv_weight, 64-bit integer hash) are
    ftattn.reference.pv_weight's, for every head dim the kernel can have."""
    from ftattn.reference import pv_weights

    out = torch.empty(256, device=DEVICE)
    _store_pv_weights[(1,)](out)
    assert torch.equal(out.cpu().double(), pv_weights(256))
    assert out.abs().max().item() < 1.0 and len(set(out.tolist())) > 100


@pytest.mark.parametrize("causal", [False, True], ids=["full_rows", "causal"])
def test_weighted_checksum_bound_does_not_overflow(causal):
    """D = 256, values of 1.5e36..5e36 (each 64-dim group's sum of |v| fits fp32): the weighted
    checksum's bound is the groups' sums added in fp64; as one fp32 sum over all dims it
    overflowed, and a masked key's p = 0 times it gave NaN, a false alarm at full (review).
    The groups' own fp32 bounds (sum_j p_j |v_j| summed over 64 dims) overflow here too:
    the kernel now fails a PV check whose bound is not finite (it passed any difference),
    and the public function runs such a call again on values scaled by a power of two:
    no flag, off's output bit for bit."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 4, 256, generator=g), torch.randn(1, 1, 4, 256, generator=g)
    v = 1.5e36 + 3.5e36 * torch.rand(1, 1, 4, 256, generator=g)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    off, _ = run(q, k, v, causal=causal, protection="off")
    out, rep = ftattn.attention(q, k, v, causal=causal, backend="triton", return_report=True)
    assert rep.detected == 0 and torch.equal(out.cpu(), off), rep


@pytest.mark.parametrize("protection", ["abft", "full"])
def test_score_verification_norms_of_huge_keys(protection):
    """Scores of normal data made by q 2^-64 and k 2^64 (exact): the score verification's
    noise, ||q_i o k_j||, squared k to inf and small q to 0 in fp32 (NaN noise: every
    verified score flagged, a false alarm at abft and full; second review). Now of q and k
    brought near 1 by powers of two: no flag, off's output; and a score fault on the row's
    largest key is corrected."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, 64, 64, generator=g) for _ in range(3))
    q, k, v = (q * 2.0 ** -64).to(DEVICE), (k * 2.0 ** 64).to(DEVICE), v.to(DEVICE)
    off, _ = run(q, k, v, protection="off")
    out, flags = run(q, k, v, protection=protection)
    assert torch.count_nonzero(flags) == 0 and torch.equal(out, off)
    top = int((q[0, 0, 9].double() @ k[0, 0].double().T).argmax())
    out, flags = run(q, k, v, protection=protection, fault=Fault("scores", 0, 0, row=9, col=top, bit=21))
    assert flags[0, 0, 0] & int(Check.CORRECTED) and torch.equal(out, off)


def test_seven_int_fault_is_span_one(fault_inputs):
    q, k, v, clean = fault_inputs
    scale = 1.0 / math.sqrt(D_F)
    for seven in ([int(Site.ACC), 0, 1, 66, 33, 5, 31], [int(Site.SCORES), 0, 1, 66, 33, 0, 30]):
        raw7, flags7 = attention_fwd(q, k, v, True, scale, 2, False, seven, None)
        raw8, flags8 = attention_fwd(q, k, v, True, scale, 2, False, seven + [1], None)
        torch.testing.assert_close(raw7, raw8, rtol=0, atol=0, equal_nan=True)  # (bit 30 of a score: NaN)
        assert torch.equal(flags7, flags8) and flags7[0, 1, 1] & CHECK_MASK
        changed = _changed(raw7.cpu(), clean)
        assert changed == [(0, 1, 66, 5)] if seven[0] == int(Site.ACC) else {c[:3] for c in changed} == {(0, 1, 66)}


def test_decode_fault_clips_the_span():
    decode = launcher._decode_fault  # (INJECT, (site, b, h, row, col, dim, span, xor, replace, value))
    shape = (1, 1, 70, 40, 16, True)  # B, Hq, N, M, D, causal: block 0 (rows 0..63) visits keys 0..33
    assert decode([0, 0, 0, 10, 20, 0, 31, 32], None, *shape)[1][4:7] == (20, 0, 14)
    assert decode([0, 0, 0, 66, 20, 0, 31, 32], None, *shape)[1][4:7] == (20, 0, 20)  # block 1: keys 0..39
    assert decode([1, 0, 0, 10, 36, 0, 31, 4], None, *shape)[0] is False  # no key of block 0's tiles
    assert decode([4, 0, 0, 10, 33, 10, 31, 32], None, *shape)[1][4:7] == (33, 10, 6)  # dims 10..15
    assert decode([5, 0, 0, 10, 99, 3, 31, 32], None, *shape)[1][4:7] == (99, 3, 13)
    assert decode([2, 0, 0, 10, 33, 3, 31, 32], None, *shape)[1][6] == 1  # rowmax: one value per row
    assert decode([0, 0, 0, 10, 20, 0, 31], None, *shape) == decode([0, 0, 0, 10, 20, 0, 31, 1], None, *shape)
    assert decode(None, None, *shape) == (False, (0, 0, 0, 0, 0, 0, 1, 0, 0, 0.0))
    # key ranges: sample 0's keys 5..44; a span from key 3 hits its keys 5..10
    starts, ends = torch.tensor([5]), torch.tensor([45])
    assert decode([0, 0, 0, 66, 3, 0, 31, 8], None, 1, 1, 70, 50, 16, False, starts, ends)[1][4:7] == (5, 0, 6)


# ---------------------------------------------------------------------------
# the flags contract and non-finite input


def test_flags_shape_dtype_and_blocks():
    q, k, v = make_inputs(2, 2, 1, 129, 17, 16, torch.float16, seed=9)
    out, flags = run(q, k, v, protection="abft")
    assert flags.dtype == torch.int32 and flags.shape == (2, 2, 3)  # ceil(129 / 64)
    assert torch.count_nonzero(flags) == 0
    fault = Fault("output", batch=1, head=0, row=128, dim=0, bit=30)  # the lone row of block 2
    _, flags = run(q, k, v, protection="abft", recompute=False, fault=fault)
    assert flags[1, 0, 2] == int(Check.OUTPUT_CHECK)
    flags[1, 0, 2] = 0
    assert torch.count_nonzero(flags) == 0


@pytest.mark.parametrize("where", ["q", "v"])
def test_nonfinite_input_is_reported_not_corrected(where):
    q, k, v = make_inputs(1, 1, 1, 70, 17, 16, torch.float16, seed=4)
    t = {"q": q, "v": v}[where]
    t[0, 0, 5, 3] = float("nan")  # q row 5 (block 0) or key 5 (seen by every row)
    out, flags = run(q, k, v, recompute=True)
    bits = flags[0, 0].tolist()
    assert bits[0] & int(Check.NONFINITE_INPUT) and bits[0] & CHECK_MASK
    assert not bits[0] & int(Check.CORRECTED | Check.UNCORRECTED)
    if where == "q":  # block 1 has finite rows and keys: nothing to report there
        assert bits[1] == 0
    else:
        assert bits[1] & int(Check.NONFINITE_INPUT)
    _, flags_off = run(q, k, v, protection="off")
    assert torch.count_nonzero(flags_off) == 0  # no checks, no flags


def test_rejects_what_it_cannot_run():
    # inputs are validated once, in ftattn/attention.py, for every backend; the launcher
    # validates the fault encoding (ftattn/contract.py)
    q, k, v = make_inputs(1, 1, 1, 4, 4, 16, torch.float16)
    wide = q.new_zeros(1, 1, 4, 300)
    with pytest.raises(ValueError, match="head_dim"):
        ftattn.attention(wide, wide, wide, backend="triton")
    with pytest.raises(ValueError, match="multiple"):
        ftattn.attention(q.expand(1, 3, 4, 16), k.expand(1, 2, 4, 16).contiguous(),
                         v.expand(1, 2, 4, 16).contiguous(), backend="triton")
    with pytest.raises(ValueError, match="row=9 is out of range"):
        attention_fwd(q, k, v, False, 1.0, 2, True, [0, 0, 0, 9, 0, 0, 3], None)
    with pytest.raises(ValueError, match="site 6"):
        attention_fwd(q, k, v, False, 1.0, 2, True, [6, 0, 0, 0, 0, 0, 3], None)
    with pytest.raises(ValueError, match="needs fault_value"):
        attention_fwd(q, k, v, False, 1.0, 2, True, [0, 0, 0, 0, 0, 0, -1], None)


def test_empty_sequences():
    q, k, v = make_inputs(1, 2, 1, 17, 0, 16, torch.float16)
    out, flags = run(q, k, v)
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(flags) == 0
    q0 = q[:, :, :0]
    out, flags = run(q0, k, v)
    assert out.shape == (1, 2, 0, 16) and flags.shape == (1, 2, 0)


# ---------------------------------------------------------------------------
# CUDA only: the registered op under torch.compile


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 4, 2, 130, 257, 128, torch.float16, seed=13)
    fn = torch.compile(lambda q, k, v: ftattn.attention(q, k, v, causal=True), fullgraph=True)
    eager = ftattn.attention(q, k, v, causal=True)
    assert torch.equal(fn(q, k, v), eager)


# ---------------------------------------------------------------------------
# a small campaign: random faults at "full", none harmful and missed


def _harmful(raw, clean, dtype):
    if bool((~torch.isfinite(raw) & torch.isfinite(clean)).any()):
        return True
    return (raw.double() - clean.double()).abs().max().item() > TAU[dtype] * max(1.0, clean.abs().max().item())


def test_random_campaign_full_protection(fault_inputs):
    q, k, v, clean = fault_inputs
    g = torch.Generator().manual_seed(2024)
    values = [float("nan"), float("inf"), float("-inf"), 1e30, -1e4, 1e-30]
    harmful = missed = 0
    for trial in range(18):
        site = ATTENTION_SITES[trial % len(ATTENTION_SITES)]
        row = int(torch.randint(0, N_F, (1,), generator=g))
        visible = min(M_F, row + M_F - N_F + 1)  # causal: keys this row sees
        col = int(torch.randint(0, max(visible, 1), (1,), generator=g))
        dim = int(torch.randint(0, D_F, (1,), generator=g))
        if trial % 3 == 2:
            kw = {"value": values[int(torch.randint(0, len(values), (1,), generator=g))]}
        else:
            kw = {"bit": int(torch.randint(0, 32, (1,), generator=g))}
        fault = Fault(site, batch=0, head=trial % 2, row=row, col=col, dim=dim, **kw)
        raw, flags = run(q, k, v, causal=True, recompute=False, fault=fault)
        detected = bool((flags & CHECK_MASK).any())
        if _harmful(raw, clean, torch.float16):
            harmful += 1
            missed += not detected
            assert detected, f"harmful and missed: {fault}"
        if detected:
            fixed, flags_c = run(q, k, v, causal=True, recompute=True, fault=fault)
            assert torch.equal(fixed, clean), f"not corrected: {fault}"
            assert int((flags_c & int(Check.CORRECTED)).count_nonzero()) == int(((flags & CHECK_MASK) != 0).sum())
    assert harmful >= 6, f"only {harmful} of 18 random faults were harmful: the campaign proves little"


# ---------------------------------------------------------------------------
# the compiled (not interpreted) kernel: configs and an sm_90 build without a GPU


def test_config_pruning_keeps_bounded_tiles():
    kept = list(filter(kernel.keep, kernel.configs))
    assert kept and all(c.kwargs["BLOCK_M"] in (64, 128) for c in kept)  # whole report blocks
    assert all(c.pre_hook is None for c in kept)  # torch.compile cannot run pre_hooks
    q = torch.empty(1, dtype=torch.float16)
    wide = kernel.prune_configs(kept, {"Q": q}, HEAD_DIM_PAD=256)
    assert wide and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128 for c in wide)
    assert len(kernel.prune_configs(kept, {"Q": q}, HEAD_DIM_PAD=64)) == len(kept)


def test_checked_kernel_shared_memory_model():
    # (BLOCK_M, BLOCK_N, head dim, element bytes, stages) -> what the sm_90 compiler
    # allocated (triton 3.6, launch specialisation: pipelined K / V loads)
    seen = {(64, 32, 128, 2, 2): 114688, (64, 32, 128, 2, 3): 131072, (128, 32, 128, 2, 2): 196608,
            (128, 64, 128, 2, 2): 229376, (128, 64, 128, 2, 3): 262144, (128, 128, 64, 2, 2): 212992}
    for (bm, bn, head, elem, stages), smem in seen.items():
        assert kernel.checked_smem(bm, bn, head, elem, stages) == smem
    assert kernel.checked_smem(64, 32, 128, 4, 2) >= 122880  # fp32: over-estimated, never under
    q = torch.empty(1, dtype=torch.float16)
    deep = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=4)
    # 256 KiB for the checked kernels at D 128: pruned; "off" takes 128 KiB: kept
    assert kernel.prune_configs([deep], {"Q": q}, HEAD_DIM_PAD=128, PROTECTION=0) == [deep]
    for protection in (1, 2):
        assert kernel.prune_configs([deep], {"Q": q}, HEAD_DIM_PAD=128, PROTECTION=protection) != [deep]
    shallow = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=2, num_warps=4)
    assert kernel.prune_configs([shallow], {"Q": q}, HEAD_DIM_PAD=128, PROTECTION=2) == [shallow]  # 224 KiB
    # fp32 at D 256, checked: only the 64 x 16 fallback is left
    (only,) = kernel.prune_configs(kernel.configs, {"Q": torch.empty(1)}, HEAD_DIM_PAD=256, PROTECTION=2)
    assert only.kwargs == {"BLOCK_M": 64, "BLOCK_N": 16}


def test_untuned_configs_fit_every_head_dim_and_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.empty(1, dtype=dtype)
        for head in (16, 32, 64, 128, 256):
            for protection in (0, 1, 2):
                first = kernel.prune_configs(kernel.UNTUNED_CONFIGS, {"Q": q}, HEAD_DIM_PAD=head,
                                             PROTECTION=protection)[0]
                assert kernel._smem(first, head, q.element_size(), protection > 0) <= kernel.SMEM_LIMIT, \
                    (dtype, head, protection, first)
    assert kernel.UNTUNED_CONFIGS[0].kwargs == {"BLOCK_M": 128, "BLOCK_N": 64}


@pytest.mark.parametrize("value, setting", [(None, "tune"), ("1", "tune"), ("0", "fixed"), (" 0 ", "fixed"),
                                            ("64x32", (64, 32)), ("128x16", (128, 16))])
def test_autotune_switch(monkeypatch, value, setting):
    from ftattn._launch.attention import autotune_setting

    monkeypatch.delenv("FTATTN_AUTOTUNE", raising=False)
    if value is not None:
        monkeypatch.setenv("FTATTN_AUTOTUNE", value)
    assert autotune_setting() == setting


def test_untuned_meta_pinned_where_it_fits():
    from ftattn._launch.attention import untuned_meta

    fp16, fp32 = torch.empty(1, dtype=torch.float16), torch.empty(1)
    tile = lambda m: (m["BLOCK_M"], m["BLOCK_N"], m["num_stages"])  # noqa: E731
    assert tile(untuned_meta("fixed", fp16, 128, 2)) == (128, 64, 2)  # 224 KiB: fits
    assert tile(untuned_meta((64, 32), fp16, 128, 2)) == (64, 32, 2)
    assert tile(untuned_meta((128, 128), fp16, 128, 2)) == (128, 64, 2)  # 288 KiB pinned: the fixed one
    assert tile(untuned_meta((128, 128), fp16, 128, 0)) == (128, 128, 2)  # "off": 96 KiB
    assert tile(untuned_meta("fixed", fp32, 128, 2)) == (128, 32, 2)  # 128 x 64: 256 KiB in fp32
    assert tile(untuned_meta((64, 32), fp32, 256, 2)) == (64, 16, 2)  # nothing else fits: the fallback


@pytest.mark.parametrize("value", ["off", "2", "32x64", "64x8", "64x", "64X32"])
def test_autotune_switch_rejects(monkeypatch, value):
    from ftattn._launch.attention import autotune_setting

    monkeypatch.setenv("FTATTN_AUTOTUNE", value)
    with pytest.raises(ValueError, match=rf"FTATTN_AUTOTUNE='{value}'.*supported values are 1 .* 0 .* BMxBN"):
        autotune_setting()


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("autotune", ["0", "1", "64x32", "128x128"])
def test_cuda_untuned_and_tuned_agree_with_fp64(monkeypatch, autotune):
    monkeypatch.setenv("FTATTN_AUTOTUNE", autotune)
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 3, 131, 72, dtype=torch.float16, device="cuda") for _ in range(3))
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(72), -1) @ v.double()
    # tuned: "full" alone (12 configs compiled per protection level; the path is the same)
    for protection in ("off", "abft", "full") if autotune != "1" else ("full",):
        out = ftattn.attention(q, k, v, protection=protection)
        err = (out.double() - ref).abs().max().item()
        assert err <= 4e-3, (autotune, protection, err)


_COMPILE_SCRIPT = r"""
import warnings; warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftattn.kernels import attention as kern
for fn, extra in ((kern._attn_fwd, dict(INJECT=True)), (kern._attn_replay, dict(RECOMPUTE=True))):
    consts = dict(HEAD_DIM=13, HEAD_DIM_PAD=16, CAUSAL=True, PROTECTION=2, EMULATE_BF16_DOT=False,
                  KEY_RANGE=True, BLOCK_M=128, BLOCK_N=32, **extra)
    sig = {n: "constexpr" if n in consts else "*i64" if n in ("KStart", "KEnd") else
           ("*i32" if n == "Flags" else "*bf16") if n in ("Q", "K", "V", "Out", "Flags")
           else "fp32" if n in ("sm_scale", "unit", "F_VALUE") else "i32" for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 2})
    assert "ld.local" not in k.asm["ptx"], "register spills"
print("compiled")
"""


_PIPELINE_SCRIPT = r"""
import warnings; warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftattn.kernels import attention as kern
fn = kern._attn_fwd
# as the JIT specialises a contiguous fp16 [2, 32, 4096, 64] launch: strides of 1 constant,
# pointers and 16-divisible ints marked divisible by 16
consts = dict(HEAD_DIM=64, HEAD_DIM_PAD=64, CAUSAL=False, PROTECTION=0, EMULATE_BF16_DOT=False,
              KEY_RANGE=False, INJECT=False, BLOCK_M=128, BLOCK_N=64, GROUP=1,
              stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
sig, attrs = {}, {}
for i, n in enumerate(fn.arg_names):
    if n in consts:
        sig[n] = "constexpr"
    elif n in ("Q", "K", "V", "Out", "Flags", "KStart", "KEnd"):
        sig[n] = "*i32" if n == "Flags" else "*i64" if n in ("KStart", "KEnd") else "*fp16"
        attrs[(i,)] = [["tt.divisibility", 16]]
    elif n in ("sm_scale", "unit", "F_VALUE"):
        sig[n] = "fp32"
    else:
        sig[n] = "i32"
        if n.startswith("stride") or n in ("Hq", "N", "M", "NUM_FLAGS", "N_BUCKET", "M_BUCKET"):
            attrs[(i,)] = [["tt.divisibility", 16]]
ptx = [triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                      target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": s}).asm["ptx"]
       for s in (2, 3)]
print("cp.async" in ptx[0], "cp.async" in ptx[1], ptx[0] != ptx[1])
"""


@pytest.mark.slow
def test_key_value_loads_are_pipelined():
    # the K / V tiles come in by cp.async, num_stages deep (kernels/attention.py's configs
    # tune 2 and 3): a change that makes the loads plain again fails here
    assert compile_without_gpu((_PIPELINE_SCRIPT,))[0].split() == ["True", "True", "True"]


@pytest.mark.slow
def test_compiles_for_sm90_without_a_gpu():
    assert "compiled" in compile_without_gpu((_COMPILE_SCRIPT,))[0]


def test_forward_faults_on_cancelling_values():
    """tests/attention_reference.py's case on the Triton kernel (fp16, where accumulator faults
    of bits 15-21 passed before, up to 170x the harm threshold; fp32): every harmful fault
    detected at full, through the BLIND rows _attn_replay makes again and compares, and
    corrected bit for bit."""
    import functools

    from attention_reference import check_forward_faults_on_cancelling_values

    # (bit 30 too: on an AVX2 EPYC the interpreter's fp32 accumulators of this case came out
    # such that none of bits 15-26 harmed, and the check that some fault harms failed)
    check_forward_faults_on_cancelling_values(functools.partial(ftattn.attention, backend="triton"), DEVICE,
                                              dtypes=(torch.float16, torch.float32), bits=(15, 18, 21, 26, 30),
                                              sites=("acc", "output"))
