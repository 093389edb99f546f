"""Tests of kernels/attention_backward.py, the Triton checked attention backward (launched by
ftattn/_launch/attention_backward.py): under the Triton interpreter on a CPU-only machine
(tiny odd shapes), the compiled kernel on a CUDA one; and an sm_90 build without a GPU.

Gradients against fp64 within twice a pure-PyTorch attention's error, protection levels
bit-identical, every backward site in both passes (dQ's and dK/dV's recomputation)
detected and corrected bit for bit, a random campaign, non-finite input."""
import functools
import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs in ftattn.kernels.attention_backward

triton = pytest.importorskip("triton")

import ftattn  # noqa: E402
from ftattn import Fault, FaultDetectedError  # noqa: E402
from ftattn.faults import BACKWARD_SITES, CHECK_MASK, Check, Site  # noqa: E402
from ftattn.tools import campaign  # noqa: E402

kernel = importlib.import_module("ftattn.kernels.attention_backward")
launcher = importlib.import_module("ftattn._launch.attention_backward")
if DEVICE == "cpu" and not isinstance(kernel._bwd_dq, triton.runtime.interpreter.InterpretedFunction):
    kernel = importlib.reload(kernel)  # imported earlier without the interpreter: rebuild its jit functions
    launcher = importlib.reload(launcher)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_attention_backward import (_grads, _qkv, check_gqa_heads_that_cancel,  # noqa: E402
                                     check_gradients_within_twice_torch, gqa_loss_scaled_data)
from triton_compile import compile_without_gpu  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRID = [  # B, Hq, Hkv, N, M, D, causal
    (1, 2, 2, 1, 1, 16, False),
    (2, 2, 1, 17, 70, 59, False),
    (1, 4, 2, 70, 17, 64, True),  # N > M: rows 0..52 see no key
    (1, 2, 1, 97, 40, 40, True),
]


def _ours(*t, causal, **kw):
    return ftattn.attention(*t, causal=causal, backend="triton", **kw)


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRID, ids=str)
def test_gradients_match_fp64_within_twice_torch(shape, dtype):
    check_gradients_within_twice_torch(shape, dtype, _ours, DEVICE)


def test_loop_tiles_fit_the_h200():
    # the tiles launched on CUDA: each kernel's shared memory measured under 227 KiB (kernels/attention_backward.py)
    assert [kernel.loop_tile(d) for d in (16, 32, 64, 128, 256)] == [64, 64, 64, 32, 16]


class _Blocks:
    """Stands in for a kernel in the launcher: records each launch's (BLOCK_M, BLOCK_N)."""

    def __init__(self, fn, seen):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            self.seen.add((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return launch(*args, **kwargs)

        return run


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tile is a test hook; CUDA takes loop_tile")
@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize("shape", GRID[1:], ids=str)
def test_smaller_loop_tiles_same_gradients(monkeypatch, shape, tile):
    # the tiles CUDA launches at head dims 128 and 256, run here at small ones
    monkeypatch.setattr(launcher, "_interpreter_tile", tile)
    dq, dkdv = set(), set()
    monkeypatch.setattr(launcher, "_bwd_dq", _Blocks(launcher._bwd_dq, dq))
    monkeypatch.setattr(launcher, "_bwd_dkdv", _Blocks(launcher._bwd_dkdv, dkdv))
    check_gradients_within_twice_torch(shape, torch.float32, _ours, DEVICE)
    assert dq == {(64, tile)} and dkdv == {(tile, 64)}  # the tile was launched


_CLEAN = {}  # the fault-free gradients of the site tests' inputs, once per (seed, tile): interpreter time


def _site_case(seed, tile=None):
    q, k, v = _qkv(1, 2, 1, 70, 90, 32, torch.float32, seed=seed)  # (GQA 2:1)
    q, k, v, do = _on(DEVICE, q, k, v, torch.randn(1, 2, 70, 32, generator=torch.Generator().manual_seed(seed)))
    if (seed, tile) not in _CLEAN:
        _CLEAN[seed, tile] = _grads(lambda *t: _ours(*t, causal=True), q, k, v, do)
    return q, k, v, do, _CLEAN[seed, tile]


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tile is a test hook; CUDA takes loop_tile")
@pytest.mark.parametrize("site", BACKWARD_SITES)
def test_smaller_loop_tile_detects_and_corrects(monkeypatch, site):
    monkeypatch.setattr(launcher, "_interpreter_tile", 16)
    q, k, v, do, clean = _site_case(8, tile=16)
    fault = Fault(site, batch=0, head=1, row=66, col=60, dim=4, bit=30)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, rep = _ours(*leaves, causal=True, fault=fault, return_report=True)
    out.backward(do)
    assert rep.backward.detected > 0 and rep.backward.corrected == rep.backward.flagged_blocks
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean))


def test_protection_levels_bit_identical_and_flags_clean():
    q, k, v = _on(DEVICE, *_qkv(1, 4, 2, 37, 53, 40, torch.float32, seed=3))
    do = torch.randn(1, 4, 37, 40).to(DEVICE)
    out = ftattn.attention(q, k, v, causal=True)
    runs = [launcher.attention_bwd(q, k, v, out, do, True, 0.15, p, True) for p in (0, 1, 2, 2)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], other[:3]))
    assert all(int((r[3] & CHECK_MASK).sum()) == 0 for r in runs)
    assert runs[0][3].shape == (1, 4, 1 + 1)  # query blocks, then key blocks


@pytest.mark.parametrize("pass_", ["dq", "dkdv"])  # the recomputation hit: dim even / odd
@pytest.mark.parametrize("site", BACKWARD_SITES)
def test_every_backward_site_detected_and_corrected(site, pass_):
    if pass_ == "dkdv" and site in ("dq", "dk", "dv"):
        pytest.skip("an accumulator site has one pass")
    q, k, v, do, clean = _site_case(7)
    flip = {"bit": 30} if pass_ == "dq" else {"bits": (2, 17, 30)}  # (dkdv: a multi-bit upset)
    fault = Fault(site, batch=0, head=1, row=66, col=60, dim=5 if pass_ == "dkdv" else 4, **flip)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, rep = _ours(*leaves, causal=True, fault=fault, return_report=True)
    out.backward(do)
    assert rep.backward.detected > 0 and rep.backward.corrected == rep.backward.flagged_blocks
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean))
    raw = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    _ours(*raw, causal=True, fault=fault, on_fault="report").backward(do)
    assert not all(torch.equal(a.grad, b) for a, b in zip(raw, clean))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with pytest.raises(FaultDetectedError, match="attention backward"):
        _ours(*leaves, causal=True, fault=fault, on_fault="raise").backward(do)


# Per-sample key ranges in the kernels: sample 0's keys [40, 101) cross the batch's key
# blocks at 64 (its own first 64 keys are not a block of the batch's), sample 1 has all 130
KR_SHAPE = (2, 2, 1, 9, 130, 24)  # B, Hq, Hkv, N, M, D
KR_RANGE = (torch.tensor([40, 0]), torch.tensor([101, 130]))
_KR = {}


def _key_range_case():
    if not _KR:
        q, k, v = _qkv(*KR_SHAPE, torch.float32, seed=41)
        q, k, v, do = _on(DEVICE, q, k, v, torch.randn(2, 2, 9, 24, generator=torch.Generator().manual_seed(2)))
        start, end = (t.to(DEVICE) for t in KR_RANGE)
        _KR["case"] = q, k, v, do, start, end
    return _KR["case"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_ranges_run_in_the_kernels(monkeypatch, causal):
    """Per-sample key ranges in the Triton backward's kernels (before: the reference's ops):
    the gradients of one call per sample on its slice of k and v, zeros outside the ranges,
    off / abft / full bit for bit, no flag, and the reference's gradients within fp32."""
    import ftattn.reference as reference

    q, k, v, do, start, end = _key_range_case()
    called = []
    monkeypatch.setattr(reference, "attention_backward_reference", lambda *a, **kw: called.append(1))
    runs = {p: _grads(lambda *t: _ours(*t, causal=causal, key_start=start, key_end=end, protection=p), q, k, v, do)
            for p in ("off", "abft", "full")}
    assert not called  # (the kernels ran)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for p in ("abft", "full") for a, b in zip(runs["off"], runs[p]))
    got = [g.cpu() for g in runs["full"]]
    for b in range(2):
        s, e = int(KR_RANGE[0][b]), int(KR_RANGE[1][b])
        one = _grads(lambda *t: _ours(*t, causal=causal), q[b:b + 1], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                     do[b:b + 1])
        torch.testing.assert_close(got[0][b:b + 1], one[0].cpu(), rtol=0, atol=2e-6)
        for i in (1, 2):
            torch.testing.assert_close(got[i][b:b + 1, :, s:e], one[i].cpu(), rtol=0, atol=2e-6)
            assert not got[i][b, :, :s].any() and not got[i][b, :, e:].any()
    want = _grads(lambda *t: ftattn.attention(*t, causal=causal, key_start=start.cpu(), key_end=end.cpu(),
                                              backend="reference"), *(t.cpu() for t in (q, k, v, do)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, rep = _ours(*leaves, causal=causal, key_start=start, key_end=end, return_report=True)
    out.backward(do)
    assert rep.backward.detected == 0 and rep.backward.flags.shape == (2, 2, 1 + 3)


@pytest.mark.parametrize("site, dim", [(s, d) for s in BACKWARD_SITES for d in ((2, 3) if s not in ("dq", "dk", "dv")
                                                                                   else (3,))])
def test_key_ranges_faults_in_the_batchs_coordinates(site, dim):
    """A fault of sample 0 on its key 70 (the batch's key block 1; the sample's own block 0) is
    flagged in the batch's blocks (the dQ pass: the row's query block; the dK / dV pass: the
    key's block of the batch) and corrected to the clean gradients bit for bit; the same fault
    on key 20, outside the sample's range, lands nowhere (as the reference: no flag; dq's
    accumulator has no key: hit either way)."""
    q, k, v, do, start, end = _key_range_case()
    kw = dict(causal=True, key_start=start, key_end=end)
    clean = _grads(lambda *t: _ours(*t, **kw), q, k, v, do)
    dq_pass = site == "dq" or (site not in ("dk", "dv") and dim % 2 == 0)
    for col, hits in ((70, True), (20, site == "dq")):
        fault = Fault(site, batch=0, head=1, row=6, col=col, dim=dim, bit=30)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, rep = _ours(*leaves, fault=fault, return_report=True, **kw)
        out.backward(do)
        assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean)), (col, site)
        blocks = ((rep.backward.flags & CHECK_MASK) != 0).cpu()
        want = torch.zeros(2, 2, 1 + 3, dtype=torch.bool)
        if hits:
            want[0, 1, 0 if dq_pass else 1 + 70 // 64] = True
            assert rep.backward.corrected == rep.backward.flagged_blocks == 1
        assert torch.equal(blocks, want), (col, blocks)


_OUTLIER = {}


def _outlier_case():
    """The targeted backward campaign's first input (outlier channels; its generator),
    where the Triton backward without entry verification missed harmful dP and S faults
    on the most probable key (27) of row 39: each within the checksums' bounds. (In the dQ
    pass a fault on S harms from bit 13, which the row checksum also sees: that case shows
    the dQ pass's verification flags it too.)"""
    if not _OUTLIER:
        shape = campaign.Shape(batch=1, heads=2, kv_heads=1, seq=40, kv_seq=70, head_dim=24, causal=True)
        q, k, v = campaign.make_data("outlier", shape, torch.float32, DEVICE, torch.Generator().manual_seed(32))
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        _OUTLIER["case"] = q, k, v, do, _grads(lambda *t: _ours(*t, causal=True), q, k, v, do)
    return _OUTLIER["case"]


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
@pytest.mark.parametrize("site, dim, bit", [  # dim even: the dQ pass's recomputation is hit, odd: dK / dV's
    ("dp", 18, 9), ("dp", 18, 12), ("dp", 19, 10), ("dp", 19, 12), ("bwd_scores", 18, 13), ("bwd_scores", 19, 12)])
def test_entry_within_the_checksum_bounds_is_verified(backend, site, dim, bit):
    q, k, v, do, clean = _outlier_case()
    if backend != "triton":
        clean = _grads(lambda *t: ftattn.attention(*t, causal=True, backend=backend), q, k, v, do)
    fault = Fault(site, batch=0, head=0, row=39, col=27, dim=dim, bit=bit)
    run = lambda *t, **kw: ftattn.attention(*t, causal=True, backend=backend, fault=fault, **kw)  # noqa: E731
    raw = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    run(*raw, on_fault="report").backward(do)
    harmful = campaign._harmful(tuple(t.grad for t in raw), tuple(clean), 2.0**-10)
    assert harmful or backend != "triton"  # the fault matters (the other backends round apart)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, rep = run(*leaves, return_report=True)
    out.backward(do)
    assert rep.backward.detected > 0 or not harmful
    if site == "bwd_scores" and backend == "triton":  # (dP's verification shares its bit with dP's checksums)
        assert bool((rep.backward.flags & int(Check.SCORE_RECOMPUTE)).any())  # the verification saw it
    assert rep.backward.corrected == rep.backward.flagged_blocks
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean))


def test_dv_warp_that_cancels_in_both_groups_is_caught_at_full():
    """tests/attention_reference.py's cancelling_dv_warp: abft passes it, full's weighted
    checksum (_weights, _weighted_check) flags it and the gradients are made again."""
    from attention_reference import check_dv_warp_caught_at_full_only

    check_dv_warp_caught_at_full_only(functools.partial(ftattn.attention, backend="triton"), DEVICE)


def test_subnormal_keys_or_queries_raise_no_alarm_at_full():
    """tests/attention_reference.py's case: the weighted checksum's bound covers the rounding of
    subnormal products k w (q w) times a large dS (review: flagged at full before)."""
    from attention_reference import check_subnormal_operand_backward_raises_no_alarm

    check_subnormal_operand_backward_raises_no_alarm(functools.partial(ftattn.attention, backend="triton"), DEVICE,
                                                     big=(1e16, 1e16))


def test_constant_rows_at_large_logits_raise_no_alarm_at_full():
    """tests/attention_reference.py's case (the reference flagged it; the kernel takes the
    forward's max and normaliser, as the C++ one)."""
    from attention_reference import check_large_logit_constant_rows_backward_no_alarm

    check_large_logit_constant_rows_backward_no_alarm(functools.partial(ftattn.attention, backend="triton"), DEVICE)


def test_near_fp32_range_no_alarm():
    """tests/attention_reference.py's case: operands whose checksums overflow fp32
    (near_range_cases: scores of 1e37 / 3e38 / 1e39, values of 1e37 / 1e38, dS |k| of 8e38,
    q alone of 1e37: each alarmed in this kernel, forward or backward, and values of 1e38
    gave inf) run again scaled: no flag, off's results bit for bit (fp64's within rounding
    where off overflows); a score fault and an accumulator fault on them corrected."""
    from attention_reference import check_near_fp32_range_no_alarm

    check_near_fp32_range_no_alarm(functools.partial(ftattn.attention, backend="triton"), DEVICE, causals=(True,))


def test_ds_faults_on_masked_entries_are_caught():
    """tests/attention_reference.py's case: both passes' dS checks now see masked entries and
    rows with no visible key (before: missed at abft and full, dQ / dK moved by ~1)."""
    from attention_reference import check_masked_ds_faults_caught

    check_masked_ds_faults_caught(functools.partial(ftattn.attention, backend="triton"), DEVICE)


def test_nonfinite_keys_outside_a_range_do_not_block_correction():
    from attention_reference import check_nonfinite_outside_key_range_does_not_block_correction

    check_nonfinite_outside_key_range_does_not_block_correction(
        functools.partial(ftattn.attention, backend="triton"), DEVICE)


def test_protection_off_sees_nothing():
    q, k, v = _on(DEVICE, *_qkv(1, 2, 1, 20, 30, 16, torch.float32, seed=9))
    do = torch.randn(1, 2, 20, 16).to(DEVICE)
    out = ftattn.attention(q, k, v)
    got = launcher.attention_bwd(q, k, v, out, do, False, 0.25, 0, True, [12, 0, 1, 3, 0, 5, 30])
    assert int(got[3].sum()) == 0


def test_nonfinite_input_is_reported_not_corrected():
    q, k, v = _on(DEVICE, *_qkv(1, 2, 1, 20, 30, 16, torch.float32, seed=9))
    k[0, 0, 4, 3] = float("nan")
    do = torch.randn(1, 2, 20, 16).to(DEVICE)
    out = ftattn.attention(q, k, v, protection="off")
    flags = launcher.attention_bwd(q, k, v, out, do, False, 0.25, 2, True)[3]
    assert bool((flags & int(Check.NONFINITE_INPUT)).any()) and not bool((flags & int(Check.CORRECTED)).any())


def test_random_campaign_full_protection():
    """Random faults at every backward site (the campaign's draw, both passes): none
    harmful missed, no false alarm, every detected fault corrected. Clean runs: the base
    shape in every data kind and the fault inputs (the rest of the campaign's clean grid,
    head dims to 256 and 8 heads, took 40 s of the interpreter; the C++ backward runs it
    whole, and this file's clean tests cover the Triton kernels' shapes)."""
    shape = campaign.Shape(batch=1, heads=2, kv_heads=1, seq=40, kv_seq=70, head_dim=24, causal=True)
    job = campaign.Job("triton", DEVICE, "float32", "full", 42, shape, 70, 5, pass_="backward")
    kinds = len(campaign.CLEAN_KINDS)
    assert job.clean_units()[:kinds] == [(shape, kind) for kind in campaign.CLEAN_KINDS]
    records = [{"result": campaign.run_units(job, a, b), "seconds": 0.0}
               for a, b in ((0, kinds), (len(job.clean_units()), job.units))]
    res = campaign._merge(job, records)
    assert res.clean_runs == kinds + 2
    assert res.failures() == [], campaign.format_table(res) + "\n" + "\n".join(res.missed_cases)
    assert sum(s.detected for s in res.sites.values()) > 0


_COMPILE_SCRIPT = r"""
import sys, warnings; warnings.simplefilter("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftattn.kernels import attention_backward as kern
POINTERS = ("Q", "K", "V", "O", "DO", "MROW", "RINV", "DELTA", "DQ", "DKH", "DVH", "Flags", "NEED")
for dim, pad in [tuple(map(int, sys.argv[1:3]))]:
    tile = kern.loop_tile(pad)  # the launcher's tiles on CUDA
    for fn in (kern._bwd_prep, kern._bwd_dq, kern._bwd_dkdv)[int(sys.argv[3]):]:
        bm, bn = (tile, 64) if fn is kern._bwd_dkdv else (64, tile)
        consts = dict(HEAD_DIM=dim, D_PAD=pad, CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, KEY_RANGE=True)
        if fn is not kern._bwd_prep:
            consts.update(PROTECTION=2, INJECT=True)
        sig = {n: "constexpr" if n in consts else "*i64" if n in ("KStart", "KEnd") else
               ("*i32" if n == "Flags" else "*fp32") if n in POINTERS
               else "fp32" if n in ("scale", "unit", "f_value") else "i32" for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": 2})
        assert pad > 64 or "ld.local" not in k.asm["ptx"], f"register spills in {fn.__name__}"
        # the H200's (H100's) 227 KiB a block: more and the launch fails
        assert k.metadata.shared <= 232448, f"{fn.__name__} D {pad}: {k.metadata.shared} B of shared memory"
print("compiled")
"""


@pytest.mark.slow
def test_compiles_for_sm90_without_a_gpu():
    # one process per head dim, side by side
    # (D256: only _bwd_dkdv, the kernel nearest the limit there, 222400 of 232448 B; D128,
    # between the two in tiles and shared memory, is left out: its three builds were the
    # largest part of the suite's slowest test, 92 s on a 2-core CI machine)
    outs = compile_without_gpu(*((_COMPILE_SCRIPT, str(dim), str(pad), str(first))
                                 for dim, pad, first in ((59, 64, 0), (256, 256, 2))))
    assert all("compiled" in out for out in outs), outs


# ---------------------------------------------------------------------------
# span: one corruption on consecutive values of a row (ftattn/contract.py SPAN_AXIS):
# keys for bwd_scores, bwd_probs, dp, ds (each in the tile / program holding it), head
# dims for dq, dk, dv, clipped at the row's end

SPAN_SHAPE = (1, 2, 1, 37, 90, 24)  # B, Hq, Hkv, N, M, D: keys in two 64-key programs


@pytest.fixture
def span_setup(monkeypatch):
    """Non-causal fp32 inputs, the interpreter's loop tile 16 (a span crosses tiles), the
    forward's output and the fault-free gradients at protection off."""
    monkeypatch.setattr(launcher, "_interpreter_tile", 16)
    q, k, v = _qkv(*SPAN_SHAPE, torch.float32, seed=31)
    q, k, v, do = _on(DEVICE, q, k, v, torch.randn(1, 2, 37, 24))
    out = _ours(q, k, v, causal=False, protection="off")
    scale = SPAN_SHAPE[-1] ** -0.5
    grads = lambda fault=None: [t.cpu() for t in launcher.attention_bwd(  # noqa: E731
        q, k, v, out, do, False, scale, 0, False, fault, None)[:3]]
    return q, k, v, out, do, scale, grads, grads()


def _changed_at(a, b):
    return {tuple(i) for i in (a != b).nonzero().tolist()}


@pytest.mark.parametrize("site", ["dq", "dk", "dv"])
def test_dim_span_changes_exactly_its_dims(span_setup, site):
    *_, grads, clean = span_setup
    which = {"dq": 0, "dk": 1, "dv": 2}[site]
    for dim, span in ((4, 8), (20, 32), (7, 1)):  # (20 + 32 > 24: clipped at the row's end)
        # dq: row 33 of head 1; dk, dv: key 70, head 1's contribution to kv head 0
        f = Fault(site, batch=0, head=1, row=33, col=70, dim=dim, span=span, bit=31)
        got = grads(f.encode()[0])
        at = (0, 1, 33) if site == "dq" else (0, 0, 70)
        dims = range(dim, min(24, dim + span))
        for i in range(3):
            assert _changed_at(got[i], clean[i]) == ({(*at, d) for d in dims} if i == which else set()), (dim, span)
        if site == "dq":  # one head's accumulator: a sign flip negates the gradient
            assert torch.equal(got[0][0, 1, 33, list(dims)], -clean[0][0, 1, 33, list(dims)])


@pytest.mark.parametrize("site", ["bwd_scores", "bwd_probs", "dp", "ds"])
def test_key_span_in_the_dkdv_pass_changes_exactly_its_keys(span_setup, site):
    # dim odd: the dK / dV pass's recomputation; keys 50..81 lie in key programs 0 and 1,
    # keys 80.. run past M = 90 (clipped); only those keys' dK / dV change, dQ does not
    *_, grads, clean = span_setup
    for col, span in ((50, 32), (80, 32)):
        got = grads(Fault(site, batch=0, head=1, row=33, col=col, dim=5, span=span, bit=31).encode()[0])
        assert torch.equal(got[0], clean[0])
        keys = {i[2] for i in _changed_at(got[1], clean[1]) | _changed_at(got[2], clean[2])}
        assert keys == set(range(col, min(90, col + span))), (col, span)


@pytest.mark.parametrize("site", ["bwd_scores", "bwd_probs", "dp", "ds"])
def test_key_span_in_the_dq_pass_changes_its_row(span_setup, site):
    # dim even: the dQ pass's recomputation, keys 10..41 across its 16-key tiles: dQ of row
    # 33 changes, nothing else; for ds, by the sum of the span's terms (every key hit)
    q, k, v, out, do, scale, grads, clean = span_setup
    got = grads(Fault(site, batch=0, head=1, row=33, col=10, dim=4, span=32, bit=31).encode()[0])
    assert {i[:3] for i in _changed_at(got[0], clean[0])} == {(0, 1, 33)}
    assert torch.equal(got[1], clean[1]) and torch.equal(got[2], clean[2])
    if site == "ds":
        qr, kk, vv, dor, orow = (t.cpu().double() for t in (q[0, 1, 33], k[0, 0], v[0, 0], do[0, 1, 33], out[0, 1, 33]))
        p = torch.softmax(kk @ qr * scale, 0)
        ds = p * (vv @ dor - (dor * orow).sum())
        want = clean[0][0, 1, 33].double() - 2.0 * scale * (ds[10:42, None] * kk[10:42]).sum(0)
        assert (got[0][0, 1, 33].double() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (the interpreter's numpy on the huge faulty values)
@pytest.mark.parametrize("site, pass_, protection, kw", [  # (every site; passes, levels and kinds in turn)
    ("bwd_scores", "dq", "abft", {"bit": 30}), ("bwd_scores", "dkdv", "full", {"value": 1e4}),
    ("bwd_probs", "dkdv", "abft", {"bit": 30}), ("dp", "dq", "full", {"value": 1e4}),
    ("ds", "dq", "abft", {"bit": 30}), ("ds", "dkdv", "full", {"value": 1e4}), ("dq", "dq", "full", {"bit": 30}),
    ("dk", "dkdv", "abft", {"value": 1e4}), ("dv", "dkdv", "full", {"bit": 30})], ids=str)
def test_warp_fault_detected_and_corrected(monkeypatch, site, pass_, protection, kw):
    # a warp's 32 lanes (keys 50..81 across the two key programs; dims 0..31 of D 40): a
    # big exponent bit, or a replacement by 1e4
    monkeypatch.setattr(launcher, "_interpreter_tile", 16)
    q, k, v = _qkv(1, 2, 1, 37, 90, 40, torch.float32, seed=32)
    q, k, v, do = _on(DEVICE, q, k, v, torch.randn(1, 2, 37, 40))
    clean = _grads(lambda *t: _ours(*t, causal=True, protection=protection), q, k, v, do)
    fault = Fault(site, batch=0, head=1, row=33, col=50, dim=0 if pass_ == "dq" else 1, span=32, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, rep = _ours(*leaves, causal=True, protection=protection, fault=fault, return_report=True)
    out.backward(do)
    assert rep.backward.detected > 0 and rep.backward.corrected == rep.backward.flagged_blocks, (fault, rep)
    assert all(torch.equal(a.grad, b) for a, b in zip(leaves, clean)), fault


def test_seven_int_fault_is_span_one(span_setup):
    *_, grads, clean = span_setup
    for seven in ([int(Site.DP), 0, 1, 33, 50, 4, 31], [int(Site.DK), 0, 1, 0, 70, 5, 31]):
        got = grads(seven)
        assert all(torch.equal(a, b) for a, b in zip(got, grads(seven + [1])))
        assert not all(torch.equal(a, b) for a, b in zip(got, clean))
    assert _changed_at(got[1], clean[1]) == {(0, 0, 70, 5)}


def test_probs_faults_on_cancelling_values():
    """tests/attention_reference.py's case: low mantissa bits of p (forward `probs`, backward
    `bwd_probs`) where outputs cancel and values are large, each harmful at a few bits: every
    one detected at full (p made twice, compared bit for bit; the polynomial exp's tolerance
    passed them before) and corrected bit for bit; clean calls equal off's. fp32 (the
    interpreter's time); bit 16 for the backward, whose P fault reaches dQ alone here (the
    dK / dV pass makes its own P) and is harmful from bit ~15."""
    from attention_reference import check_probs_faults_on_cancelling_values

    check_probs_faults_on_cancelling_values(functools.partial(ftattn.attention, backend="triton"), DEVICE,
                                            dtypes=(torch.float32,), bits=(4, 16))


def test_backward_faults_on_cancelling_values():
    """tests/attention_reference.py's case on the Triton kernels (fp32; the gradient sites
    whose checksums the data blind, at a few bits, for the interpreter's time): every harmful
    fault detected at full (BLIND rows: settle_backward makes the backward again and compares)
    and corrected bit for bit."""
    from attention_reference import check_backward_faults_on_cancelling_values

    check_backward_faults_on_cancelling_values(functools.partial(ftattn.attention, backend="triton"), DEVICE,
                                               dtypes=(torch.float32,), bits=(20, 26, 30), sites=("dq", "dk", "dv"))


def test_ds_faults_where_dp_cancels():
    """tests/attention_reference.py's case: dS faults of 6-50x the harm threshold that the second
    dS's tolerance passed (review) are detected (dS made again bit for bit) and corrected."""
    from attention_reference import check_ds_faults_where_dp_cancels

    check_ds_faults_where_dp_cancels(functools.partial(ftattn.attention, backend="triton"), DEVICE)


def test_gqa_loss_scaled_key_blocks_are_not_blind():
    """GQA 2:1 with loss-scaled gradients (dO x1024): the dK / dV checks' blind threshold was the
    floor alone (a group's heads may cancel in dk, dv), so every key block was BLIND at full and
    the whole backward ran twice (8 of 8 key blocks here). Now the key programs store the
    threshold their rows need and the launcher compares it with tau max(1, max |g|) of the call's
    dk, dv (the heads summed): none blind, no check fails."""
    q, k, v, do = _on(DEVICE, *gqa_loss_scaled_data())
    o = _ours(q, k, v, causal=True)
    *_, flags = launcher._run(q, k, v, o, do, True, 64**-0.5, 2, None, None, None, None, 2.0**-10)
    assert not bool(((flags & int(Check.BLIND)) != 0).any())
    assert not bool(((flags & CHECK_MASK) != 0).any())


def test_gqa_heads_that_cancel_in_dk_and_dv_are_compared():
    """tests/test_attention_backward.py's case on the Triton kernels: two query heads whose dk, dv
    cancel while each head's own are ~1e3; the thresholds the key programs' rows need exceed
    the call's (cancelled) gradients' harm threshold, so the launcher marks them BLIND (made
    again and compared): faults on dk / dv accumulators, harmful there, caught. (Fails where the
    launcher's comparison is left out: a bit-10 dk fault passes.)"""
    check_gqa_heads_that_cancel("triton")
