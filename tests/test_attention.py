"""ftattn.attention on the CPU backends (C++ kernel and the PyTorch reference):
correctness against fp64, the three protection levels, every fault site, the
three fault policies, the op's registration (opcheck, torch.compile), bad input.
The Triton backend runs the same grid in tests/test_attention_triton.py."""
import math

import pytest
import torch

import ftattn
from ftattn import Check, Fault, FaultDetectedError
from ftattn.faults import CHECK_MASK
from attention_reference import (LAYOUTS, attention_ref, cancelling_acc_warp, check_forward_faults_on_cancelling_values,
                                 every_other_row_view, padded_view)

BACKENDS = ["cpp", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SITES = ["scores", "probs", "rowmax", "rowsum", "acc", "output"]
SIZES = [1, 17, 97, 257, 1025]


def assert_close_to_ref(out, q, k, v, causal, scale=None):
    """Flash-attention rule: error vs fp64 at most 2x torch's own attention in the same dtype
    (plus one unit of the dtype at the output's magnitude, for cases where torch is exact)."""
    ref = attention_ref(q, k, v, causal, scale)
    pt = attention_ref(q, k, v, causal, scale, upcast=False)
    err = (out.double() - ref).abs().max().item()
    err_pt = (pt.double() - ref).abs().max().item()
    floor = torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_pt + floor, f"error {err:.3g} > 2 x torch's {err_pt:.3g} + {floor:.3g}"


def run_all_protections(q, k, v, causal, backend):
    outs = {}
    for prot in ("off", "abft", "full"):
        out, rep = ftattn.attention(q, k, v, causal=causal, protection=prot, backend=backend, return_report=True)
        assert rep.detected == 0 and rep.uncorrected == 0, f"false alarm at protection {prot}: {rep.failures()}"
        outs[prot] = out
    assert torch.equal(outs["off"], outs["abft"]) and torch.equal(outs["off"], outs["full"])
    return outs["full"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("M", SIZES)
def test_sizes(make_qkv, backend, dtype, N, M):
    causal = (N + M) % 2 == 0 or N != M  # both flavours across the grid, causal wherever N != M
    q, k, v = make_qkv(B=1, Hq=2, N=N, M=M, D=59, dtype=dtype, seed=N * 7 + M)
    out = run_all_protections(q, k, v, causal, backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to_ref(out, q, k, v, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 59, 64, 80, 128, 256])
@pytest.mark.parametrize("N,M", [(97, 257), (257, 97)])
def test_head_dims_causal_gqa(make_qkv, backend, dtype, D, N, M):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=1, N=N, M=M, D=D, dtype=dtype, seed=D, kind="uniform")
    out = run_all_protections(q, k, v, True, backend)
    assert_close_to_ref(out, q, k, v, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_non_causal_gqa(make_qkv, backend):
    q, k, v = make_qkv(B=3, Hq=6, Hkv=2, N=33, M=70, D=40)
    out = run_all_protections(q, k, v, False, backend)
    assert_close_to_ref(out, q, k, v, False)
    out = ftattn.attention(q, k, v, scale=0.3, backend=backend)
    assert_close_to_ref(out, q, k, v, False, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.45, 0.0, 1e-3], ids=["negative", "zero", "tiny"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_negative_and_zero_scale(make_qkv, backend, scale, causal):
    # the C++ kernel scales (S - max) and so flips q for a negative scale; M = 600
    # spans two key tiles, so the running max is rescaled (alpha) at scale 0 too
    q, k, v = make_qkv(B=1, Hq=2, N=37, M=600, D=24, seed=11)
    for prot in ("off", "abft", "full"):
        out, rep = ftattn.attention(q, k, v, causal=causal, scale=scale, protection=prot, backend=backend,
                                    return_report=True)
        assert rep.detected == 0, f"false alarm at {prot}: {rep.failures()}"
        assert_close_to_ref(out, q, k, v, causal, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protection", ["off", "full"])
def test_key_tile_of_nan_scores_gives_nan(make_qkv, backend, protection):
    # every score of the first 512-key tile is NaN: the tile's max is no number, and
    # the rows must come out NaN (as torch's), not as if those keys were masked
    q, k, v = make_qkv(B=1, Hq=1, N=5, M=600, D=8, seed=3)
    k[0, 0, :512] = float("nan")
    out, rep = ftattn.attention(q, k, v, protection=protection, backend=backend, return_report=True)
    assert out.isnan().all()
    assert rep.detected == 0 and (protection == "off" or rep.nonfinite_input)


def test_cpp_concurrent_calls_of_other_shapes_match_sequential_ones(make_qkv):
    """Each worker thread keeps its scratch across calls (csrc/attention/block.h,
    thread_scratch): calls from several Python threads at once, each thread switching
    between head dims, key counts, protection levels and an injected fault, give the bits
    of the same calls made one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []
    for i, (Hq, Hkv, N, M, D) in enumerate([(4, 2, 1, 40, 16), (2, 1, 70, 600, 64), (3, 3, 33, 33, 40),
                                            (8, 2, 1, 1100, 128), (1, 1, 300, 129, 24)]):
        q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, N=N, M=M, D=D, seed=40 + i)
        for protection in ("off", "full"):
            calls.append(dict(q=q, k=k, v=v, causal=i % 2 == 1, protection=protection, return_report=True))
    calls.append(dict(calls[7], fault=Fault("scores", batch=1, head=5, row=0, col=900, bit=27)))  # (the decode one, full)
    run = lambda c: ftattn.attention(**c)  # noqa: E731
    expected = [run(c) for c in calls]
    order = [i for _ in range(6) for i in range(len(calls))]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda i: (i, run(calls[i])), order))
    for i, (out, rep) in got:
        assert torch.equal(out, expected[i][0]) and torch.equal(rep.flags, expected[i][1].flags), i
    assert expected[-1][1].corrected == 1


def test_cpp_result_does_not_depend_on_threads(make_qkv):
    # query tiles go to whichever thread asks next: the output and flags must not
    # depend on the thread count or on which thread took a tile
    q, k, v = make_qkv(B=2, Hq=3, Hkv=3, N=600, M=611, D=40, seed=21)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.ftattn.attention_fwd(q, k, v, True, 0.2, 2, True, None, None))
    finally:
        torch.set_num_threads(threads)
    for out, flags in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(flags, results[0][1])
    assert not results[0][1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_visible_key_are_zero(make_qkv, backend):
    # causal with N > M: query i sees key j iff j <= i + (M - N); rows 0..2 see nothing
    q, k, v = make_qkv(N=5, M=2, D=8)
    out, rep = ftattn.attention(q, k, v, causal=True, backend=backend, return_report=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert rep.detected == 0
    assert_close_to_ref(out, q, k, v, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_is_bottom_right_aligned(make_qkv, backend):
    # decoding: one query against M keys sees all of them under bottom-right alignment
    q, k, v = make_qkv(N=1, M=40, D=16)
    causal = ftattn.attention(q, k, v, causal=True, backend=backend)
    full = ftattn.attention(q, k, v, causal=False, backend=backend)
    assert torch.equal(causal, full)
    # with N == M it is torch SDPA's (top-left) is_causal
    q, k, v = make_qkv(N=23, M=23, D=16)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ftattn.attention(q, k, v, causal=True, backend=backend), sdpa, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(make_qkv, backend):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, N=37, M=45, D=24)
    # the [B, N, H, D] layout of most models, viewed as [B, H, N, D]
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    assert torch.equal(ftattn.attention(qt, kt, vt, causal=True, backend=backend),
                       ftattn.attention(q, k, v, causal=True, backend=backend))
    # a strided slice of a bigger tensor
    big = torch.randn(2, 4, 37, 48)
    qs = big[..., ::2]
    torch.testing.assert_close(ftattn.attention(qs, k, v, backend=backend),
                               ftattn.attention(qs.contiguous(), k, v, backend=backend), rtol=0, atol=0)


# q, k, v as the views models pass (attention_reference.LAYOUTS): the C++ kernel reads fp32
# rows in place, copying a block's query rows and packing keys and values whose rows are not
# D apart
# (B, Hq, Hkv, N, M, D): stacked heads (N <= 64, GQA), one block of rows per head, two
# key tiles of a stacked block, several query tiles (keys copied whole, not packed)
STRIDED_SHAPES = [(2, 4, 2, 37, 45, 59), (2, 3, 3, 97, 131, 24), (1, 4, 1, 37, 600, 16), (1, 2, 2, 300, 70, 8),
                  (2, 8, 2, 1, 300, 64)]  # (the last: a decode step, GQA)


@pytest.mark.parametrize("shape", STRIDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
def test_strided_views_read_in_place_match_contiguous(make_qkv, shape, layout, causal):
    B, Hq, Hkv, N, M, D = shape
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, N=N, M=M, D=D, seed=N + M)
    views = [LAYOUTS[layout](t) for t in (q, k, v)]
    assert not all(t.is_contiguous() for t in views)  # (one head, or one row, in [B, N, H, D] is)
    for prot in ("off", "abft", "full"):
        want, rep_c = ftattn.attention(q, k, v, causal=causal, protection=prot, backend="cpp", return_report=True)
        got, rep = ftattn.attention(*views, causal=causal, protection=prot, backend="cpp", return_report=True)
        assert torch.equal(got, want), prot
        assert torch.equal(rep.flags, rep_c.flags) and rep.detected == 0, prot
    # mixed: q in place, k and v contiguous; k contiguous, v a view
    assert torch.equal(ftattn.attention(views[0], k, v, causal=causal, backend="cpp"), want)
    assert torch.equal(ftattn.attention(q, k, views[2], causal=causal, backend="cpp"), want)
    # 16-bit views (converted to fp32 rows first)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    assert torch.equal(ftattn.attention(*(LAYOUTS[layout](t) for t in (qb, kb, vb)), causal=causal, backend="cpp"),
                       ftattn.attention(qb, kb, vb, causal=causal, backend="cpp"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_views_with_key_ranges(make_qkv, layout):
    q, k, v = make_qkv(B=3, Hq=4, Hkv=2, N=29, M=53, D=24, seed=5)
    start, end = torch.tensor([0, 7, 20]), torch.tensor([53, 40, 21])
    kw = dict(causal=True, key_start=start, key_end=end, backend="cpp", protection="full", return_report=True)
    want, rep_c = ftattn.attention(q, k, v, **kw)
    got, rep = ftattn.attention(*(LAYOUTS[layout](t) for t in (q, k, v)), **kw)
    assert torch.equal(got, want) and torch.equal(rep.flags, rep_c.flags) and rep.detected == 0


@pytest.mark.parametrize("shape", STRIDED_SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("site,spec", [("scores", dict(bit=30)), ("probs", dict(bit=22)), ("acc", dict(bit=27)),
                                       ("output", dict(value=float("nan")))])
def test_strided_views_fault_detected_and_corrected(make_qkv, shape, site, spec):
    """The recomputation of a faulty block packs its keys and values again."""
    B, Hq, Hkv, N, M, D = shape
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, N=N, M=M, D=D, seed=11)
    views = [padded_view(t) for t in (q, k, v)]
    clean = ftattn.attention(q, k, v, backend="cpp")
    fault = Fault(site, batch=B - 1, head=Hq - 1, row=N - 2, col=M - 3, dim=D // 2, **spec)
    raw, rep = ftattn.attention(*views, fault=fault, on_fault="report", backend="cpp", return_report=True)
    raw_c, rep_c = ftattn.attention(q, k, v, fault=fault, on_fault="report", backend="cpp", return_report=True)
    assert not torch.equal(raw, clean) and rep.detected >= 1
    torch.testing.assert_close(raw, raw_c, rtol=0, atol=0, equal_nan=True)  # what the contiguous call sees
    assert torch.equal(rep.flags, rep_c.flags)
    (fail,) = rep.failures()
    assert (fail["batch"], fail["head"]) == (B - 1, Hq - 1)
    fixed, rep = ftattn.attention(*views, fault=fault, backend="cpp", return_report=True)
    assert torch.equal(fixed, clean) and rep.corrected == 1 and rep.uncorrected == 0


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_strided_views_nonfinite_input_is_not_a_fault(make_qkv, where):
    q, k, v = make_qkv(B=1, Hq=2, N=70, M=90, D=16)
    views = {name: every_other_row_view(t) for name, t in (("q", q), ("k", k), ("v", v))}
    views[where][0, 1, 3, 5] = float("inf")
    out, rep = ftattn.attention(views["q"], views["k"], views["v"], backend="cpp", return_report=True)
    assert rep.nonfinite_input and rep.detected == 0 and rep.corrected == 0


def test_backends_agree(make_qkv):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, N=130, M=200, D=48)
    a = ftattn.attention(q, k, v, causal=True, backend="cpp")
    b = ftattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# faults


FAULTS = [dict(bit=30), dict(bit=23), dict(value=float("nan")), dict(value=float("inf")), dict(value=-1e30)]


def _faulty_call(q, k, v, backend, site, spec, prot="full", **kw):
    fault = Fault(site, batch=1, head=2, row=70, col=150, dim=5, **spec)
    return ftattn.attention(q, k, v, causal=True, fault=fault, protection=prot, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("spec", FAULTS, ids=lambda s: f"{list(s)[0]}={list(s.values())[0]}")
def test_fault_detected_and_corrected(make_qkv, backend, dtype, site, spec):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, N=97, M=200, D=64, dtype=dtype, seed=3)
    clean = ftattn.attention(q, k, v, causal=True, backend=backend)
    raw, rep = _faulty_call(q, k, v, backend, site, spec, on_fault="report", return_report=True)
    # a shifted running max cancels in acc / l (softmax is shift-invariant), so a
    # rowmax fault may be benign; every other fault here changes the output
    if site != "rowmax":
        assert not torch.equal(raw, clean), "the fault did not change the output: injection missed"
    assert rep.detected >= 1
    (fail,) = rep.failures()
    assert (fail["batch"], fail["head"]) == (1, 2) and 70 in fail["rows"] and not fail["corrected"]
    fixed, rep = _faulty_call(q, k, v, backend, site, spec, return_report=True)
    assert torch.equal(fixed, clean)
    assert rep.corrected == 1 and rep.uncorrected == 0
    assert rep.flags[1, 2, 1] & int(Check.CORRECTED)
    with pytest.raises(FaultDetectedError, match=r"batch 1, head 2, rows 64\.\.96"):
        _faulty_call(q, k, v, backend, site, spec, on_fault="raise")
    # protection off: the same fault goes through unseen
    raw_off, rep_off = _faulty_call(q, k, v, backend, site, spec, prot="off", on_fault="correct", return_report=True)
    assert rep_off.detected == 0 and (site == "rowmax" or not torch.equal(raw_off, clean))


@pytest.mark.parametrize("backend", BACKENDS)
def test_abft_leaves_probs_uncovered(make_qkv, backend):
    """A mid-mantissa flip of a probability feeds PV and its checksum alike: only the
    redundant softmax of protection "full" sees it (FAULT_MODEL.md)."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, N=97, M=200, D=64, seed=3)
    clean = ftattn.attention(q, k, v, causal=True, backend=backend)
    fault = Fault("probs", batch=1, head=2, row=70, col=150, bit=22)
    raw, rep = ftattn.attention(q, k, v, causal=True, fault=fault, protection="abft", on_fault="report",
                                backend=backend, return_report=True)
    assert not torch.equal(raw, clean) and rep.detected == 0
    _, rep = ftattn.attention(q, k, v, causal=True, fault=fault, protection="full", on_fault="report",
                              backend=backend, return_report=True)
    assert rep.detected >= 1 and "redundant softmax" in rep.failures()[0]["checks"]


def _campaign_case(seed, trial, group):
    """The input and fault of one trial of the random warp campaign (fp32, its default shape)."""
    import random

    from ftattn.tools import campaign as C

    job = C.Job("cpp", "cpu", "float32", "full", 400, seed=seed, pattern="warp")
    gen = C._unit_generator(seed, len(job.clean_units()) + group)
    q, k, v = C.make_data(C.FAULT_KINDS[group % len(C.FAULT_KINDS)], job.shape, torch.float32, "cpu", gen)
    fault = C._random_fault(random.Random(f"{seed}/{trial}"), job.shape, C.SITES[trial % len(C.SITES)], "warp")
    return q, k, v, job.shape.causal, fault


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,trial,group", [(433, 328, 13), (523, 28, 1)], ids=str)
def test_acc_warp_whose_deltas_nearly_cancel_is_caught_at_full(backend, seed, trial, group):
    """Two harmful warps of accumulator faults that random campaigns passed (a mid-mantissa bit
    of the 27 dims 32..58 of a D = 59 row: the output moves by 1.07-1.09 tau, the 27 deltas sum
    to 0.17 / 0.82 of the PV bound of the row's 64-dim group). At full a PV checksum above 1/8
    of its bound makes the block again and compares its output bit for bit: the fault is
    reported (PV_CHECKSUM) and corrected; report returns the faulty output, raise raises."""
    q, k, v, causal, fault = _campaign_case(seed, trial, group)
    assert fault.site == "acc" and fault.span == 32
    tau = 2.0**-10
    clean = ftattn.attention(q, k, v, causal=causal, backend=backend)
    raw, rep = ftattn.attention(q, k, v, causal=causal, fault=fault, on_fault="report", return_report=True,
                                backend=backend)
    assert (raw - clean).abs().max().item() > tau * max(1.0, clean.abs().max().item())  # harmful
    assert rep.detected >= 1 and rep.corrected == 0
    assert any(int(Check.PV_CHECKSUM) & int(fl) for fl in rep.flags.flatten().tolist())
    out, rep = ftattn.attention(q, k, v, causal=causal, fault=fault, return_report=True, backend=backend)
    assert rep.detected >= 1 and rep.corrected == rep.flagged_blocks and torch.equal(out, clean)
    with pytest.raises(FaultDetectedError):
        ftattn.attention(q, k, v, causal=causal, fault=fault, on_fault="raise", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targeted_acc_warp_near_both_sums_zero_is_caught(backend):
    """The adversary's warp campaign at D = 150 (seed 609, fp32, trial 172: bit 15 of dims
    64..95, 1.24 tau) whose deltas, of mixed exponents, came to ~0.03 of the plain PV bound and
    0.09 of the weighted one: full makes a block again from 1/32 of the weighted bound (it
    passed at 1/8 in C++)."""
    import random

    from ftattn.tools import campaign as C

    shape = C.Shape(head_dim=150)
    job = C.Job("cpp", "cpu", "float32", "full", 400, seed=609, pattern="warp", targeted=True, shape=shape)
    gen = C._unit_generator(609, len(job.clean_units()) + 6)
    q, k, v = C.make_data(C.TARGETED_FAULT_KINDS[6 % len(C.TARGETED_FAULT_KINDS)], shape, torch.float32, "cpu", gen)
    fault = C._targeted_fault(random.Random("609/172"), shape, C.SITES[172 % len(C.SITES)], q, k, "warp")
    assert (fault.site, fault.dim, fault.bit, fault.span) == ("acc", 64, 15, 32)
    clean = ftattn.attention(q, k, v, causal=True, backend=backend)
    raw, rep = ftattn.attention(q, k, v, causal=True, fault=fault, on_fault="report", return_report=True,
                                backend=backend)
    assert (raw - clean).abs().max().item() > 2.0**-10 * max(1.0, clean.abs().max().item())  # harmful
    assert rep.detected >= 1
    out, rep = ftattn.attention(q, k, v, causal=True, fault=fault, return_report=True, backend=backend)
    assert rep.corrected == rep.flagged_blocks >= 1 and torch.equal(out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_acc_warp_that_cancels_exactly_is_caught_by_the_weighted_checksum(backend):
    """A warp of 32 accumulator faults whose deltas (+-2^-9 of O, 16 each way) sum to exactly 0 in
    the plain PV checksum, so no bound and no verification threshold can see it there: abft
    passes it (harmful, no flag), full's second, weighted checksum flags it (PV_CHECKSUM) and the
    block is made again."""
    q, k, v, fault = cancelling_acc_warp()
    clean = ftattn.attention(q, k, v, backend=backend)
    for protection in ("abft", "full"):
        assert torch.equal(ftattn.attention(q, k, v, protection=protection, backend=backend), clean)
    raw, rep = ftattn.attention(q, k, v, fault=fault, protection="abft", on_fault="report", return_report=True,
                                backend=backend)
    moved = (raw - clean).abs()[0, 0, fault.row]
    assert torch.allclose(moved[:32], torch.full((32,), 2.0**-9)) and rep.detected == 0  # harmful, unseen
    raw, rep = ftattn.attention(q, k, v, fault=fault, on_fault="report", return_report=True, backend=backend)
    assert torch.equal(raw, ftattn.attention(q, k, v, fault=fault, protection="abft", on_fault="report",
                                             backend=backend))
    assert rep.detected == 1 and int(rep.flags.flatten()[0]) & int(Check.PV_CHECKSUM)
    out, rep = ftattn.attention(q, k, v, fault=fault, return_report=True, backend=backend)
    assert rep.corrected == 1 and torch.equal(out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full_rows", "causal"])
def test_weighted_checksum_does_not_overflow_before_the_plain_sums(backend, causal):
    """Values of 3e36 with the signs of the weights (D = 256): every 64-dim group's sum of |v|
    fits fp32, and so must the weighted sum over all 256 dims, or full alarms on clean input
    (found by review: with weights up to 1 it reached inf and full reported UNCORRECTED)."""
    from ftattn.reference import pv_weights

    g = torch.Generator().manual_seed(0)
    v = (pv_weights(256).sign().float() * 3e36).expand(1, 1, 4, 256).clone()
    q, k = torch.randn(1, 1, 3, 256, generator=g), torch.randn(1, 1, 4, 256, generator=g)
    off = ftattn.attention(q, k, v, causal=causal, protection="off", backend=backend)
    out, rep = ftattn.attention(q, k, v, causal=causal, return_report=True, backend=backend)
    assert rep.detected == 0 and torch.equal(out, off) and out.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pv_verification_raises_no_alarm_on_data_near_the_bound(backend):
    """Constant fp32 data adds its roundings up in one direction, so its PV checksums sit above
    1/8 of their bound and full makes those blocks again (every block here: the reference marks
    4 of 4, the C++ call takes ~3x off's time against ~1.4x on normal data): the recomputation
    rounds alike, so no flag, and the output is off's, bit for bit, under every policy."""
    q = torch.full((1, 2, 97, 59), 0.3)
    k = torch.full((1, 1, 1031, 59), -0.7)
    v = torch.full((1, 1, 1031, 59), 0.9)
    off = ftattn.attention(q, k, v, protection="off", backend=backend)
    for policy in ("correct", "report", "raise"):
        out, rep = ftattn.attention(q, k, v, on_fault=policy, return_report=True, backend=backend)
        assert rep.detected == 0 and torch.equal(out, off), policy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prime", [False, True], ids=["fresh", "after_a_verified_call"])
def test_pv_verification_beside_non_finite_input_and_a_fault(backend, prime):
    """A sub-block with non-finite input (a NaN query row) that also holds a row near the PV
    bound, beside a faulty sub-block that is recomputed: the non-finite one is reported as such,
    never compared with a first pass that was not kept (found by review: the C++ kernel read an
    empty buffer, a crash in a fresh process, and after an earlier verified call marked it
    UNCORRECTED from stale rows), and the faulty one is corrected."""
    N, M, D = 128, 1031, 59
    k = torch.full((1, 1, M, D), -0.7)
    v = torch.full((1, 1, M, D), 0.9)
    if prime:  # (a call whose blocks are verified: the thread's kept rows filled)
        assert ftattn.attention(torch.full((1, 1, N, D), 0.5), k, v, return_report=True,
                                backend=backend)[1].detected == 0
    q = torch.full((1, 1, N, D), 0.3)
    q[0, 0, 100] = float("nan")  # sub-block 1
    fault = Fault("acc", row=10, col=0, dim=3, bit=30)  # sub-block 0
    out, rep = ftattn.attention(q, k, v, fault=fault, return_report=True, backend=backend)
    fl = rep.flags.flatten().tolist()
    assert fl[0] & int(Check.CORRECTED) and not fl[0] & int(Check.NONFINITE_INPUT)
    assert fl[1] & int(Check.NONFINITE_INPUT) and not fl[1] & (int(Check.CORRECTED) | int(Check.UNCORRECTED))
    clean = ftattn.attention(q, k, v, backend=backend)
    assert torch.equal(out[0, 0, :64], clean[0, 0, :64])


@pytest.mark.parametrize("bit", [3, 5, 13, 22])
def test_output_fault_on_a_low_mantissa_bit_is_caught(make_qkv, bit):
    """The C++ kernel screens each output row without dividing (|O l - A| <= 2^-22 |A|) and
    divides again only where the screen fails: a flip of mantissa bit 3 and up (a change of
    more than 2^-21 of O) still fails it and is caught and corrected at abft. (Bit 2, a change
    of 2^-21 / m of O for its mantissa m in [1, 2), passes where m is near 2, as bits 0 and 1
    do: review, 7 of the 25 largest mantissas of this data; all far below harm, 2^-10.)"""
    q, k, v = make_qkv(B=1, Hq=2, N=40, M=70, D=24, seed=9)
    clean = ftattn.attention(q, k, v, backend="cpp")
    for dim in (0, 7, 23):
        fault = Fault("output", batch=0, head=1, row=17, dim=dim, bit=bit)
        raw, rep = ftattn.attention(q, k, v, fault=fault, protection="abft", on_fault="report", backend="cpp",
                                    return_report=True)
        assert not torch.equal(raw, clean) and rep.detected == 1, (dim, rep.failures())
        assert torch.equal(ftattn.attention(q, k, v, fault=fault, protection="abft", backend="cpp"), clean)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_probs_fault_on_a_masked_key_is_caught(make_qkv, backend, dtype):
    """A causal row ends anywhere in a vector of keys, and the C++ kernel runs that last vector
    whole with its masked keys' p = 0: a probability made up on the key just past the row's
    last visible one (rows 0..40 end at every lane of a 16-lane vector) must still be seen by
    the redundant softmax and corrected, and a clean call raises no alarm."""
    q, k, v = make_qkv(B=1, Hq=2, N=53, M=53, D=24, dtype=dtype, seed=5)
    clean, rep = ftattn.attention(q, k, v, causal=True, backend=backend, on_fault="raise", return_report=True)
    assert rep.detected == 0
    for row in range(0, 41, 3):
        fault = Fault("probs", batch=0, head=1, row=row, col=row + 1, value=0.5)
        raw, rep = ftattn.attention(q, k, v, causal=True, fault=fault, on_fault="report", backend=backend,
                                    return_report=True)
        assert not torch.equal(raw, clean), f"row {row}: the fault did not change the output"
        assert rep.detected >= 1 and "redundant softmax" in rep.failures()[0]["checks"], f"row {row}"
        fixed = ftattn.attention(q, k, v, causal=True, fault=fault, backend=backend)
        assert torch.equal(fixed, clean), f"row {row}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_is_not_a_fault(make_qkv, backend, where, bad):
    q, k, v = make_qkv(B=1, Hq=2, N=70, M=90, D=16)
    {"q": q, "k": k, "v": v}[where][0, 0, 3, 5] = bad
    out, rep = ftattn.attention(q, k, v, backend=backend, return_report=True)
    assert rep.nonfinite_input
    assert rep.detected == 0 and rep.corrected == 0
    # raise policy: bad input is not a fault
    ftattn.attention(q, k, v, backend=backend, on_fault="raise")
    # torch's answer has non-finite values in the same places
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    assert torch.equal(out.isfinite(), ref.isfinite())


# ---------------------------------------------------------------------------
# the op


def test_op_defaults_are_full_protection_and_correct(make_qkv):
    schema = torch.ops.ftattn.attention.default._schema
    defaults = {a.name: a.default_value for a in schema.arguments if a.kwarg_only}
    assert defaults["protection"] == "full" and defaults["on_fault"] == "correct"
    q, k, v = make_qkv(B=1, Hq=2, N=33, M=45, D=24)
    assert torch.equal(torch.ops.ftattn.attention(q, k, v), ftattn.attention(q, k, v))
    out = torch.ops.ftattn.attention(q, k, v, causal=True, scale=0.2, protection="abft", on_fault="raise")
    assert torch.equal(out, ftattn.attention(q, k, v, causal=True, scale=0.2, protection="abft"))
    with pytest.raises(ValueError, match="protection='most'"):
        torch.ops.ftattn.attention(q, k, v, protection="most")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(make_qkv, dtype):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, N=17, M=33, D=59, dtype=dtype)
    torch.library.opcheck(torch.ops.ftattn.attention.default, (q, k, v), {"causal": True})
    torch.library.opcheck(torch.ops.ftattn.attention_fwd.default, (q, k, v, True, 0.125, 2, True, None, None))
    torch.library.opcheck(torch.ops.ftattn.attention_fwd.default,
                          (q, k, v, False, 0.125, 1, False, [1, 1, 1, 3, 4, 5, 30], None))


def test_torch_compile_fullgraph(make_qkv):
    q, k, v = make_qkv(B=1, Hq=4, Hkv=2, N=37, M=50, D=32)

    def block(q, k, v):
        return torch.ops.ftattn.attention(q * 2, k, v, causal=True).relu() + 1

    def public(q, k, v):
        return ftattn.attention(q, k, v, causal=True, protection="abft") * 3

    torch._dynamo.reset()
    for fn in (block, public):
        compiled = torch.compile(fn, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_meta_tensors_give_an_empty_result_of_the_shape(dtype, backend, causal):
    # shapes only (model init on the meta device, shape propagation): no kernel runs
    q = torch.empty(2, 6, 5, 59, dtype=dtype, device="meta")
    k = torch.empty(2, 2, 7, 59, dtype=dtype, device="meta")
    for policy in ("correct", "raise", "report"):
        out = ftattn.attention(q, k, k, causal=causal, backend=backend, on_fault=policy)
        assert out.is_meta and out.shape == q.shape and out.dtype == dtype
    out = torch.ops.ftattn.attention(q, k, k, causal=causal)
    assert out.is_meta and out.shape == q.shape and out.dtype == dtype
    out, flags = torch.ops.ftattn.attention_fwd(q, k, k, causal, 0.1, 2, True, None, None)
    assert out.is_meta and flags.shape == (2, 6, 1) and flags.dtype == torch.int32
    out, rep = ftattn.attention(q, k, k, return_report=True, fault=Fault("scores", 1, 3, row=1, col=2, bit=30))
    assert out.is_meta and "meta" in repr(rep)
    # a report of a call that ran no kernel counts nothing, rather than "no fault"
    for count in ("detected", "corrected", "uncorrected", "nonfinite_input", "flagged_blocks"):
        with pytest.raises(ValueError, match="meta tensors: no kernel ran"):
            getattr(rep, count)
    with pytest.raises(ValueError, match="meta tensors: no kernel ran"):
        rep.failures()
    # bad input is still refused on meta
    with pytest.raises(ValueError, match="head_dim"):
        ftattn.attention(q, k[..., :3], k[..., :3])


EMPTY = [((0, 2, 3, 8), (0, 2, 5, 8)), ((1, 2, 0, 8), (1, 2, 5, 8)), ((1, 0, 3, 8), (1, 1, 5, 8)),
         ((1, 0, 1, 8), (1, 3, 5, 8))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_shape,kv_shape", EMPTY, ids=str)
def test_no_query_row_gives_an_empty_result(backend, causal, q_shape, kv_shape):
    # zero query heads passed the head-count check (0 % Hkv == 0) and divided by zero
    # (SIGFPE) in the C++ kernel, on the op path too
    q, k = torch.randn(*q_shape), torch.randn(*kv_shape)
    out, rep = ftattn.attention(q, k, k, causal=causal, backend=backend, return_report=True)
    assert out.shape == q.shape and rep.detected == 0 and rep.flags.shape == (*q_shape[:2], 1 if q_shape[2] else 0)
    assert torch.ops.ftattn.attention(q, k, k, causal=causal).shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_key_gives_zeros(backend):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 0, 8)
    out, rep = ftattn.attention(q, k, k, backend=backend, return_report=True)
    assert torch.equal(out, torch.zeros_like(q)) and rep.detected == 0


# ---------------------------------------------------------------------------
# bad input


def _bad_cases():
    f32 = dict(dtype=torch.float32)
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 9, 16)
    v = torch.randn(1, 2, 9, 16)
    return [
        ("3-D q", (q[0], k, v), {}, ValueError, "4-D"),
        ("k/v shapes", (q, k, v[:, :, :5]), {}, ValueError, "same shape"),
        ("batch", (q, torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)), {}, ValueError, "batch"),
        ("head dim", (q, torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)), {}, ValueError, "head_dim"),
        ("head dim 300", (torch.randn(1, 2, 3, 300), torch.randn(1, 2, 3, 300), torch.randn(1, 2, 3, 300)), {},
         ValueError, "head_dim=300 is not supported; use 1..256"),
        ("gqa", (q, torch.randn(1, 3, 9, 16), torch.randn(1, 3, 9, 16)), {}, ValueError, "multiple of key/value heads"),
        ("no heads", (q[:, :0], k[:, :0], v[:, :0]), {}, ValueError,
         r"k and v have 0 heads \(q 0\); at least one key/value head is needed"),
        ("no kv heads", (q, k[:, :0], v[:, :0]), {}, ValueError, "k and v have 0 heads"),
        ("int dtype", (q.to(torch.int32), k, v), {}, TypeError, "int32 is not supported"),
        ("float64", (q.double(), k.double(), v.double()), {}, TypeError, "float64 is not supported"),
        ("mixed dtypes", (q, k.half(), v), {}, TypeError, "share one dtype"),
        ("devices", (q, k.to("meta"), v), {}, ValueError, "one device"),
        ("scale nan", (q, k, v), {"scale": float("nan")}, ValueError, "not finite"),
        ("scale inf", (q, k, v), {"scale": float("inf")}, ValueError, "not finite"),
        ("protection", (q, k, v), {"protection": "max"}, ValueError, "protection='max'"),
        ("on_fault", (q, k, v), {"on_fault": "ignore"}, ValueError, "on_fault='ignore'"),
        ("backend", (q, k, v), {"backend": "cuda"}, ValueError, "backend='cuda'"),
        ("fault type", (q, k, v), {"fault": ("scores", 0, 0, 0, 0)}, TypeError, "ftattn.Fault"),
        ("fault row", (q, k, v), {"fault": Fault("scores", 0, 0, 8, 0, bit=3)}, ValueError, "Fault.row=8"),
        ("fault head", (q, k, v), {"fault": Fault("acc", 0, 4, 0, 0, bit=3)}, ValueError, "Fault.head=4"),
        ("fault col", (q, k, v), {"fault": Fault("probs", 0, 0, 0, 9, bit=3)}, ValueError, "Fault.col=9"),
        ("fault dim", (q, k, v), {"fault": Fault("output", 0, 0, 0, 0, dim=16, bit=3)}, ValueError, "Fault.dim=16"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, args, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        ftattn.attention(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(site="weights", batch=0, head=0, row=0), "unknown fault site 'weights'"),
        (dict(site="scores", batch=0, head=0, row=0), "exactly one of bit"),
        (dict(site="scores", batch=0, head=0, row=0, bit=1, value=1.0), "exactly one of bit"),
        (dict(site="scores", batch=0, head=0, row=0, bit=32), "use 0..31"),
        (dict(site="scores", batch=-1, head=0, row=0, bit=3), "negative"),
    ],
)
def test_bad_fault(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fault(**kwargs)


def test_raw_op_rejects_bad_input_clearly(make_qkv):
    q, k, v = make_qkv(N=4, M=4, D=8)
    # the op gives the public function's errors (one validation)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.ftattn.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="head_dim=300"):
        torch.ops.ftattn.attention(*(q.new_zeros(1, 1, 2, 300),) * 3)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.ftattn.attention_fwd(q, k, v, False, math.inf, 2, True)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.ftattn.attention_fwd(q, k, v, False, 1.0, 2, True, [0, 0, 0, 9, 0, 0, 1])


def test_triton_backend_unavailable_message(make_qkv, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(N=4, M=4, D=8)
    with pytest.raises(NotImplementedError, match="backend='triton' cannot run here"):
        ftattn.attention(q, k, v, backend="triton")


@pytest.mark.parametrize("site", SITES)
def test_flags_name_only_the_struck_64_row_block(make_qkv, site):
    """The C++ kernel computes 256-row tiles but checks and reports per 64 rows: a
    fault at row 200 flags report block 3 only, and the recomputed tile equals the
    clean output everywhere."""
    q, k, v = make_qkv(B=1, Hq=2, N=300, M=333, D=48, seed=11)
    clean = ftattn.attention(q, k, v, causal=True)
    fault = Fault(site, batch=0, head=1, row=200, col=150, dim=7, bit=30)
    out, rep = ftattn.attention(q, k, v, causal=True, fault=fault, return_report=True)
    flagged = ((rep.flags & 0xFF) != 0).nonzero().tolist()
    assert flagged == [[0, 1, 3]], rep.failures()
    assert rep.corrected == 1 and torch.equal(out, clean)


# ---------------------------------------------------------------------------
# grouped-query attention with few query rows: the C++ kernel stacks the query heads
# of a key head into one block (each head one sub-block of the checks)

# (Hq, Hkv, N, M): 4 heads a block; 20 = 16 + 4 and 40 = 16 + 16 + 8 (key sums
# precomputed, more than 2 blocks a key head); N 50: 5 heads of a 256-row block, 5 + 3;
# N 64: 4 x 64 rows, a full block
STACKED = [(8, 2, 1, 600), (20, 1, 1, 97), (40, 1, 3, 611), (16, 2, 50, 257), (4, 1, 64, 530)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hq,Hkv,N,M", STACKED, ids=lambda x: str(x))
def test_stacked_query_heads(make_qkv, backend, dtype, causal, Hq, Hkv, N, M):
    q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, N=N, M=M, D=40, dtype=dtype, seed=Hq + N)
    out = run_all_protections(q, k, v, causal, backend)
    assert_close_to_ref(out, q, k, v, causal)


@pytest.mark.parametrize("D", [40, 64, 128])
def test_stacked_decode_as_accurate_as_torch_over_seeds(make_qkv, D):
    """A stacked block's two GEMMs summed each element over the whole inner
    dimension in one register, less accurately than torch's matrix-vector products for
    one query row; at D = 128 18 seeds of 100 broke the 2x rule on an Intel AVX-512
    machine, and the AMD EPYC failure was one of them. 40 seeds per head dim, N = 1."""
    worst = 0.0
    for seed in range(40):
        q, k, v = make_qkv(B=2, Hq=20, Hkv=1, N=1, M=97, D=D, seed=1000 * D + seed)
        ref = attention_ref(q, k, v)
        err = (ftattn.attention(q, k, v).double() - ref).abs().max().item()
        err_pt = (attention_ref(q, k, v, upcast=False).double() - ref).abs().max().item()
        floor = torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
        worst = max(worst, err / (2 * err_pt + floor))
    assert worst <= 1.0, f"a seed's error is {worst:.2f} x the 2x rule's allowance"


@pytest.mark.parametrize("site", SITES)
def test_stacked_fault_names_only_its_head(make_qkv, site):
    """A fault in the third head of a stacked block flags that head only; the
    recomputed block equals the clean output (decode-like: 3 rows, 2 key tiles)."""
    q, k, v = make_qkv(B=2, Hq=8, Hkv=2, N=3, M=600, D=64, seed=13)
    clean = ftattn.attention(q, k, v, causal=True)
    fault = Fault(site, batch=1, head=6, row=2, col=550, dim=7, bit=30)
    raw, rep = ftattn.attention(q, k, v, causal=True, fault=fault, on_fault="report", return_report=True)
    flagged = ((rep.flags & CHECK_MASK) != 0).nonzero().tolist()
    assert flagged == [[1, 6, 0]], rep.failures()
    if site != "rowmax":
        assert not torch.equal(raw[1, 6], clean[1, 6])
    others = torch.ones(2, 8, dtype=torch.bool)
    others[1, 6] = False
    assert torch.equal(raw[others], clean[others])  # the other heads of the block are untouched
    out, rep = ftattn.attention(q, k, v, causal=True, fault=fault, return_report=True)
    assert rep.corrected == 1 and rep.uncorrected == 0 and torch.equal(out, clean)


@pytest.mark.parametrize("shape,row", [((1, 4, 1, 64, 530), 45), ((1, 4, 1, 64, 530), 3),
                                       ((1, 1, 1, 100, 300), 70), ((1, 1, 1, 100, 300), 98)],
                         ids=["stacked-64-second-group", "stacked-64-first-group", "block-100-row-70",
                              "block-100-last-group"])
def test_score_fault_in_any_column_group_flags_its_block(make_qkv, shape, row):
    """The C++ kernel checks the columns of S per group of 32 rows of a 64-row report block
    (a stacked head of 64 rows: two groups; a 100-row block: 32 + 32 + 32 + 4): a score
    flipped by a mid-mantissa bit in any group flags that group's report block only, and
    the recomputed call equals the clean one."""
    B, Hq, Hkv, N, M = shape
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, N=N, M=M, D=40, seed=row)
    clean = ftattn.attention(q, k, v)
    head = max(0, Hq - 2)
    s = (q[0, head, row].double() @ k[0, 0].double().T)
    fault = Fault("scores", batch=0, head=head, row=row, col=int(s.argmax()), bit=19)
    out, rep = ftattn.attention(q, k, v, fault=fault, return_report=True, backend="cpp")
    flagged = ((rep.flags & CHECK_MASK) != 0).nonzero().tolist()
    assert flagged == [[0, head, row // 64]], rep.failures()
    assert rep.corrected == 1 and rep.uncorrected == 0 and torch.equal(out, clean)


def test_stacked_nonfinite_query_names_only_its_head(make_qkv):
    q, k, v = make_qkv(B=2, Hq=8, Hkv=2, N=1, M=300, D=32, seed=17)
    q[1, 5, 0, 3] = float("nan")
    out, rep = ftattn.attention(q, k, v, return_report=True)
    assert rep.detected == 0 and rep.uncorrected == 0
    assert ((rep.flags & int(Check.NONFINITE_INPUT)) != 0).nonzero().tolist() == [[1, 5, 0]]
    assert (rep.flags[rep.flags != rep.flags[1, 5, 0]] == 0).all()
    finite = out.isfinite().flatten(2).all(-1)
    assert finite.sum() == 15 and not finite[1, 5]


def test_nonfinite_key_seen_only_by_later_rows_of_the_tile(make_qkv):
    """Causal: a NaN key visible only to the last rows of a tile still enters the
    earlier rows' raw scores; it is non-finite input there too, never uncorrected."""
    q, k, v = make_qkv(B=1, Hq=1, N=256, M=256, D=16, seed=5)
    k[0, 0, 200, 3] = float("nan")
    out, rep = ftattn.attention(q, k, v, causal=True, return_report=True)
    assert rep.nonfinite_input and rep.uncorrected == 0 and rep.detected == 0
    assert out[0, 0, :200].isfinite().all() and not out[0, 0, 200:].isfinite().all()


@pytest.mark.parametrize("N,M,D,causal,row", [(100, 300, 40, False, 70), (100, 300, 40, True, 98),
                                              (257, 1025, 64, False, 200), (64, 530, 128, True, 3)], ids=str)
def test_bf16_scores_on_the_bf16_gemm(make_qkv, monkeypatch, N, M, D, causal, row):
    """bf16 q, k, v: the C++ kernel makes S = Q K^T on the bf16 GEMM (oneDNN's brgemm where
    ftattn._C.cpu_bf16_gemm(); exact products, fp32 sums; 2-4x sgemm's speed), each column reference as three bf16 rows that add
    back to its fp32 value. Its output is within bf16's tolerance of fp64 as the sgemm
    path's (FTATTN_GEMM16=0) is, every level gives the same bits, and a mid-mantissa score
    fault in any 32-row column group is caught and corrected to the clean output."""
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, N=N, M=M, D=D, dtype=torch.bfloat16, seed=row)
    ref = attention_ref(q, k, v, causal)
    tol = 2.0**-7 * max(1.0, ref.abs().max().item())
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FTATTN_GEMM16", flag)
        outs[flag] = {p: ftattn.attention(q, k, v, causal=causal, protection=p, backend="cpp")
                      for p in ("off", "abft", "full")}
        assert torch.equal(outs[flag]["off"], outs[flag]["abft"]) and torch.equal(outs[flag]["off"], outs[flag]["full"])
        assert (outs[flag]["full"].double() - ref).abs().max().item() <= tol
    monkeypatch.setenv("FTATTN_GEMM16", "1")
    s = q[0, 1, row].double() @ k[0, 0].double().T
    col = int(s[: M - N + row + 1].argmax()) if causal else int(s.argmax())
    harmful_seen = 0
    for bit in (14, 19, 22):
        fault = Fault("scores", batch=0, head=1, row=row, col=col, bit=bit)
        raw, rep = ftattn.attention(q, k, v, causal=causal, fault=fault, on_fault="report", return_report=True,
                                    backend="cpp")
        harmful = (raw.double() - outs["1"]["full"].double()).abs().max().item() > tol
        assert rep.detected >= 1 or not harmful, (bit, rep.failures())
        harmful_seen += harmful
        out, rep = ftattn.attention(q, k, v, causal=causal, fault=fault, return_report=True, backend="cpp")
        assert rep.uncorrected == 0 and torch.equal(out, outs["1"]["full"])
    assert harmful_seen >= 1


def test_bf16_with_torch_onednn_disabled_runs_on_sgemm(make_qkv, monkeypatch):
    """The bf16 GEMM is oneDNN's brgemm, which refuses its packed operands while
    torch.backends.mkldnn is disabled: a bf16 call then runs on sgemm, bit for bit as with
    FTATTN_GEMM16=0, forward and backward, never an error from inside the kernel."""
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, N=37, M=101, D=24, dtype=torch.bfloat16, seed=3)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)

    def run():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = ftattn.attention(qq, kk, vv, causal=True, backend="cpp")
        out.backward(g)
        return [out, qq.grad, kk.grad, vv.grad]

    monkeypatch.delenv("FTATTN_GEMM16", raising=False)
    ftattn._C.cpu_bf16_gemm()  # (the machine's answer, settled with oneDNN on)
    monkeypatch.setenv("FTATTN_GEMM16", "0")
    sgemm = run()
    monkeypatch.delenv("FTATTN_GEMM16")
    with torch.backends.mkldnn.flags(enabled=False):
        assert not ftattn._C.cpu_bf16_gemm()
        off = run()
    assert all(torch.equal(a, b) for a, b in zip(off, sgemm))


@pytest.mark.parametrize("N,M,D,causal", [(100, 300, 40, False), (257, 1025, 64, True), (64, 530, 128, False),
                                          (33, 70, 200, True)], ids=str)
def test_bf16_pv_on_the_bf16_gemm(make_qkv, monkeypatch, N, M, D, causal):
    """bf16 q, k, v: the C++ kernel also runs P V on the bf16 GEMM, with each probability
    rounded to bf16 for it (as torch's CPU flash attention and the Triton kernel round P to
    the inputs' dtype) and the normaliser of the unrounded ones. The PV checksum sums the
    rounded p the product reads (else every clean call would fail it by ~2^-9), the output
    stays within bf16's tolerance of fp64, and faults on the accumulator and on a
    probability are caught and corrected to the clean output."""
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, N=N, M=M, D=D, dtype=torch.bfloat16, seed=N + D)
    ref = attention_ref(q, k, v, causal)
    tol = 2.0**-7 * max(1.0, ref.abs().max().item())
    monkeypatch.setenv("FTATTN_GEMM16", "1")
    outs = {p: ftattn.attention(q, k, v, causal=causal, protection=p, backend="cpp", return_report=True)
            for p in ("off", "abft", "full")}
    for p in ("abft", "full"):
        assert outs[p][1].detected == 0, outs[p][1].failures()
        assert torch.equal(outs["off"][0], outs[p][0])
    clean = outs["full"][0]
    assert (clean.double() - ref).abs().max().item() <= tol
    row = N - 1
    s = q[0, 1, row].double() @ k[0, 0].double().T
    col = int(s.argmax())  # (the last row sees every key, causal or not)
    harmful_seen = 0
    for fault in (Fault("acc", batch=0, head=1, row=row, col=col, dim=D // 2, bit=28),
                  Fault("acc", batch=0, head=1, row=row, col=col, dim=1, bit=22),
                  Fault("probs", batch=0, head=1, row=row, col=col, bit=22)):
        raw, rep = ftattn.attention(q, k, v, causal=causal, fault=fault, on_fault="report", return_report=True,
                                    backend="cpp")
        harmful = (raw.double() - clean.double()).abs().max().item() > tol
        assert rep.detected >= 1 or not harmful, (fault, rep.failures())
        harmful_seen += harmful
        out, rep = ftattn.attention(q, k, v, causal=causal, fault=fault, return_report=True, backend="cpp")
        assert rep.uncorrected == 0 and torch.equal(out, clean)
    assert harmful_seen >= 2


def _bf16_round_on_cvt() -> bool:
    return ftattn._C.cpu_bf16_gemm() and ftattn._C.cpu_bf16_round()


@pytest.mark.skipif(not _bf16_round_on_cvt(), reason="needs AVX512-BF16 (VCVTNEPS2BF16) and the AVX-512 kernels")
@pytest.mark.parametrize("N,M,D,causal", [(67, 131, 64, False), (129, 257, 59, True), (1, 1, 16, False),
                                          (100, 213, 128, True), (3, 17, 8, False)], ids=str)
def test_bf16_rounding_on_vcvtneps2bf16_gives_the_bits_of_the_bit_arithmetic(make_qkv, monkeypatch, N, M, D, causal):
    """On a CPU with AVX512-BF16 the probabilities (forward and backward) and dS are rounded to
    bf16 for the bf16 GEMM by VCVTNEPS2BF16, 16 a vector (the rest of a row as before);
    FTATTN_BF16_CVT=0 takes the integer arithmetic. The output and the three gradients are
    the same bits either way at every level, with no flag; faults on a probability (forward)
    and on dS (backward) are caught and corrected under it."""
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, N=N, M=M, D=D, dtype=torch.bfloat16, seed=N + M)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(D)).to(torch.bfloat16)
    monkeypatch.setenv("FTATTN_GEMM16", "1")

    def run(protection, fault=None):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, rep = ftattn.attention(*leaves, causal=causal, protection=protection, fault=fault, return_report=True,
                                    backend="cpp")
        out.backward(g)
        return [out.detach()] + [t.grad for t in leaves], rep

    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FTATTN_BF16_CVT", flag)
        assert ftattn._C.cpu_bf16_round() == (flag == "1")
        for p in ("off", "abft", "full"):
            results[flag, p], rep = run(p)
            assert rep.detected == 0 and (p == "off" or rep.backward.detected == 0)
    for p in ("off", "abft", "full"):
        assert all(torch.equal(a, b) for a, b in zip(results["1", p], results["0", p])), p
    monkeypatch.setenv("FTATTN_BF16_CVT", "1")
    row = N - 1
    col = int((q[0, 1, row].double() @ k[0, 0].double().T).argmax())  # (the last row sees every key)
    for fault in (Fault("probs", batch=0, head=1, row=row, col=col, bit=22),
                  Fault("ds", batch=0, head=1, row=row, col=col, bit=30)):
        got, rep = run("full", fault)
        flagged = rep.detected if fault.site == "probs" else rep.backward.detected
        assert flagged >= 1, fault
        assert all(torch.equal(a, b) for a, b in zip(got, results["1", "full"])), fault


@pytest.mark.skipif(not _bf16_round_on_cvt(), reason="needs AVX512-BF16 (VCVTNEPS2BF16) and the AVX-512 kernels")
@pytest.mark.parametrize("protection", ["off", "full"])
def test_bf16_probability_just_below_2_to_the_minus_126(monkeypatch, protection):
    """Where the two roundings part: a probability just below 2^-126 (a subnormal fp32) is 0
    for VCVTNEPS2BF16, which reads subnormals as 0, and 2^-126 for the integer arithmetic,
    which rounds it up. Each way the checks sum what the product reads: no flag, and the
    output is that bf16 times the value (a 1e30 value makes it visible: 1e30 2^-126 / 15),
    within bf16's tolerance of fp64."""
    D, M = 16, 16
    q = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, M, D, dtype=torch.bfloat16)
    k[0, 0, 1, 0] = -87.5  # (S - max) scale = -87.3372: p = 2^-126 (1 - 6.6e-4)
    v = torch.zeros(1, 1, M, D, dtype=torch.bfloat16)
    v[0, 0, 1, 0] = 1e30
    scale = 87.3372 / 87.5
    monkeypatch.setenv("FTATTN_GEMM16", "1")
    ref = attention_ref(q, k, v, False, scale=scale)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FTATTN_BF16_CVT", flag)
        outs[flag], rep = ftattn.attention(q, k, v, scale=scale, protection=protection, return_report=True,
                                           backend="cpp")
        assert rep.detected == 0
        assert (outs[flag].double() - ref).abs().max().item() <= 2.0**-7
    bf16_up = 2.0**-126 * float(v[0, 0, 1, 0]) / (M - 1)  # (15 keys of p = 1)
    assert outs["1"][0, 0, 0, 0].item() == 0.0
    assert outs["0"][0, 0, 0, 0].item() == pytest.approx(bf16_up, rel=2.0**-7)


@pytest.mark.skipif(not _bf16_round_on_cvt(), reason="needs AVX512-BF16 (VCVTNEPS2BF16) and the AVX-512 kernels")
@pytest.mark.parametrize("flag", ["1", "0"])
def test_bf16_levels_agree_where_a_row_tail_runs_key_by_key(monkeypatch, flag):
    """At abft and full a causal row's partly masked last vector of keys runs one key at a
    time where a value row's sums overflow fp32 (off runs it whole): that key's rounding must
    be the vector's, or off and the checked levels part. Here the probability just below
    2^-126 of a key in such a tail (row 17's key 17, value 1e30; key 20's values +-3e38)
    gives the same output at every level, either rounding (found by review: with
    VCVTNEPS2BF16 on, off gave 0 there and abft / full 2^-126 1e30 / 17)."""
    D, N = 16, 32
    q = torch.zeros(1, 1, N, D, dtype=torch.bfloat16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, N, D, dtype=torch.bfloat16)
    k[0, 0, 17, 0] = -87.5
    v = torch.zeros(1, 1, N, D, dtype=torch.bfloat16)
    v[0, 0, 17, 0] = 1e30
    v[0, 0, 20, 0], v[0, 0, 20, 1] = 3e38, -3e38  # (the sum of |v| over key 20's dims overflows fp32)
    monkeypatch.setenv("FTATTN_GEMM16", "1")
    monkeypatch.setenv("FTATTN_BF16_CVT", flag)
    outs = {}
    for p in ("off", "abft", "full"):
        outs[p], rep = ftattn.attention(q, k, v, causal=True, scale=87.3372 / 87.5, protection=p,
                                        return_report=True, backend="cpp")
        assert rep.detected == 0
    assert torch.equal(outs["off"], outs["abft"]) and torch.equal(outs["off"], outs["full"])
    assert (outs["off"][0, 0, 17, 0].item() == 0.0) == (flag == "1")


@pytest.mark.skipif(not _bf16_round_on_cvt(), reason="needs AVX512-BF16 (VCVTNEPS2BF16) and the AVX-512 kernels")
def test_bf16_backward_probability_just_below_2_to_the_minus_126(monkeypatch):
    """The backward's P for dV = P^T dO rounded either way too: a normalised probability just
    below 2^-126 (exp(x) / 15 with x = -84.63) is 0 for VCVTNEPS2BF16 and 2^-126 for the
    integer rounding, which a 1e30 gradient makes visible in dV (2^-126 1e30); no flag."""
    D, M = 16, 16
    q = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, M, D, dtype=torch.bfloat16)
    k[0, 0, 1, 0] = -84.5  # (S - max) scale = -84.63045: p = 15 2^-126 (1 - 2^-9), P = p / 15
    v = torch.zeros(1, 1, M, D, dtype=torch.bfloat16)
    g = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16)
    g[..., 0] = 1e30
    monkeypatch.setenv("FTATTN_GEMM16", "1")
    dv = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FTATTN_BF16_CVT", flag)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, rep = ftattn.attention(*leaves, scale=84.63045 / 84.5, return_report=True, backend="cpp")
        out.backward(g)
        assert rep.detected == 0 and rep.backward.detected == 0
        dv[flag] = leaves[2].grad[0, 0, 1, 0].item()
    assert dv["1"] == 0.0
    assert dv["0"] == pytest.approx(2.0**-126 * float(g[0, 0, 0, 0]), rel=2.0**-7)


@pytest.mark.parametrize("M,D", [(1025, 64), (97, 59), (600, 130)], ids=str)
def test_bf16_keys_packed_once_give_the_bits_of_tiles_packed_as_read(make_qkv, monkeypatch, M, D):
    """Where several blocks read a key head (more than 256 queries forward, more than 64 in
    the backward, or query heads sharing it), its keys and values are packed for the bf16
    GEMM once per call; else each tile is packed as it is read. The same operands either
    way: the first block's rows of a longer call (packed once) equal, bit for bit, a call
    of those rows alone (packed per tile): the output's first 256 rows, dQ's first 64."""
    monkeypatch.setenv("FTATTN_GEMM16", "1")
    q, k, v = make_qkv(B=1, Hq=2, Hkv=2, N=300, M=M, D=D, dtype=torch.bfloat16, seed=M + D)
    for p in ("off", "full"):
        long_out = ftattn.attention(q, k, v, protection=p, backend="cpp")
        short_out = ftattn.attention(q[:, :, :256].contiguous(), k, v, protection=p, backend="cpp")
        assert torch.equal(long_out[:, :, :256], short_out)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)

    def dq(n):
        qq = q[:, :, :n].detach().clone().requires_grad_(True)
        ftattn.attention(qq, k, v, backend="cpp").backward(g[:, :, :n])
        return qq.grad

    assert torch.equal(dq(130)[:, :, :64], dq(64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_faults_on_cancelling_values(backend):
    """tests/attention_reference.py's case: values of 3e4 whose outputs cancel to ~0, where the
    PV checksum's bound is ~60x the harm threshold: every harmful accumulator, score, row-sum
    and output fault detected at full (the row made again and compared bit for bit) and
    corrected bit for bit; before, accumulator faults of up to 65x the threshold passed."""
    import functools

    check_forward_faults_on_cancelling_values(functools.partial(ftattn.attention, backend=backend))


def test_reference_rowsum_fault_at_long_context_is_caught():
    """The reference's row-sum tolerance, (M + 8) u relative, passes changes of l that move O by
    more than tau |O| from M ~ 16K: at M = 32768 (values ~4) a flip of bit 14 of l moved O by
    1.5 tau unseen (review). Now such rows are BLIND at full, made again and compared: detected,
    corrected bit for bit; the clean call raises nothing."""
    M, D = 32768, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, D, generator=g) * 0.1
    k = torch.randn(1, 1, M, D, generator=g)
    v = 4.0 + 0.01 * torch.randn(1, 1, M, D, generator=g)
    clean, rep = ftattn.attention(q, k, v, backend="reference", on_fault="raise", return_report=True)
    assert rep.detected == 0
    fault = Fault("rowsum", 0, 0, row=0, col=M - 1, bit=14)
    raw, rep = ftattn.attention(q, k, v, backend="reference", fault=fault, on_fault="report", return_report=True)
    assert float((raw - clean).abs().max()) > 2.0**-10 * float(clean.abs().max())
    assert rep.detected > 0
    fixed, rep = ftattn.attention(q, k, v, backend="reference", fault=fault, return_report=True)
    assert rep.corrected == rep.flagged_blocks == 1 and torch.equal(fixed, clean)


def test_reference_backend_ignores_the_matmul_precision():
    """torch.set_float32_matmul_precision("medium") (TF32 on CUDA, oneDNN's bf16 path on a CPU
    with AVX512-BF16): the reference backend's fp32 products stay IEEE fp32, as the kernels'
    (its bounds are fp32 accumulation's: forward and backward failed on every block before),
    and the setting is put back."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 131, 64, generator=g) for _ in range(3))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, rep = ftattn.attention(qq, kk, vv, backend="reference", return_report=True, on_fault="report")
        out.sum().backward()
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert rep.detected == 0 and rep.backward.detected == 0
    clean = ftattn.attention(q, k, v, backend="reference")
    assert torch.equal(out.detach(), clean)


def test_reference_matmul_precision_holds_while_calls_overlap():
    """ieee_fp32_matmul across threads: the first call in sets IEEE fp32, the last one out
    puts the setting back (a call that ended first put "medium" back under another's feet)."""
    import threading

    from ftattn.reference import ieee_fp32_matmul

    inside, leave, seen = threading.Event(), threading.Event(), []

    @ieee_fp32_matmul
    def first():
        inside.set()
        leave.wait(10)

    @ieee_fp32_matmul
    def second():
        leave.set()  # (first leaves now, while this call runs)
        worker.join(10)
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        worker = threading.Thread(target=first)
        worker.start()
        inside.wait(10)
        second()
        assert seen == ["ieee"] and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
