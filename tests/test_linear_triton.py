"""kernels/linear.py, the Triton checked linear layer (launched by ftattn/_launch/linear.py):
under the Triton interpreter on a CPU-only machine (small odd shapes), the compiled
kernel on CUDA. Correctness against fp64 (2x F.linear plus one rounding), off == abft,
no alarm on clean data, gemm and weight faults detected and corrected, non-finite input,
a transposed (Conv1D) weight, and the same detections as the C++ kernel."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit runs in ftattn.kernels.linear

triton = pytest.importorskip("triton")

import ftattn  # noqa: E402
from ftattn import Fault  # noqa: E402

kernel = importlib.import_module("ftattn.kernels.linear")
launcher = importlib.import_module("ftattn._launch.linear")
if DEVICE == "cpu" and not isinstance(kernel._linear_fwd, triton.runtime.interpreter.InterpretedFunction):
    kernel = importlib.reload(kernel)
    launcher = importlib.reload(launcher)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TAU = {torch.float32: 2.0**-10, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _data(rows, k, out, dtype, seed=0, outliers=0, scale=1.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * scale
    if outliers:
        x[:, torch.randperm(k, generator=g)[:outliers]] *= 50.0
    w = torch.randn(out, k, generator=g) / k**0.5
    b = torch.randn(out, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(x), cast(w), cast(b)


def _lin(x, w, b, **kw):
    return ftattn.linear(x, w, b, backend="triton", **kw)


def _harmful(raw, clean, dtype):
    a, c = raw.double().cpu(), clean.double().cpu()
    if bool((~torch.isfinite(a) & torch.isfinite(c)).any()):
        return True
    return bool(((a - c).abs().nan_to_num(0).amax(1) > TAU[dtype] * c.abs().amax(1).clamp(min=1)).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, k, out, bias", [(1, 17, 40, True), (37, 97, 130, True), (70, 64, 17, False),
                                                (5, 1, 129, True)])
def test_matches_fp64_and_off_equals_abft(dtype, rows, k, out, bias):
    x, w, b = _data(rows, k, out, dtype, seed=rows + k, bias=bias)
    y, rep = _lin(x, w, b, return_report=True)
    assert rep.detected == 0 and not rep.nonfinite_input
    assert torch.equal(y, _lin(x, w, b, protection="off"))
    ref = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    err = (y.double() - ref).abs().max().item()
    err_torch = (F.linear(x.cpu().float(), w.cpu().float(), None if b is None else b.cpu().float()).to(dtype).double()
                 - ref.cpu()).abs().max().item()
    assert err <= 2 * err_torch + ULP[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clean_hard_data_no_alarm(dtype):
    for kw in (dict(outliers=3), dict(scale=1e-30 if dtype != torch.float16 else 1e-3), dict(scale=1e3 if dtype !=
                                                                                              torch.float16 else 30)):
        x, w, b = _data(33, 80, 150, dtype, seed=3, **kw)
        _, rep = _lin(x, w, b, return_report=True)
        assert rep.detected == 0, kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_faults_detected_and_corrected_as_cpp(dtype):
    x, w, b = _data(37, 64, 140, dtype, seed=5, outliers=2)
    clean = _lin(x, w, b)
    g = torch.Generator().manual_seed(1)
    harmful = 0
    for t in range(24):
        bit = [30, 29, 27, 22, 18, 14][t % 6]
        # (t % 8 == 3: a multi-bit upset, the bit and two low mantissa bits)
        kw = {"value": float("nan")} if t % 8 == 7 else {"bits": (5, 11, bit)} if t % 8 == 3 else {"bit": bit}
        if t % 2:
            f = Fault("gemm", row=int(torch.randint(37, (1,), generator=g)), col=int(torch.randint(140, (1,),
                                                                                              generator=g)), **kw)
        else:
            f = Fault("weight", row=int(torch.randint(140, (1,), generator=g)), dim=int(torch.randint(64, (1,),
                                                                                                generator=g)), **kw)
        raw, rep = _lin(x, w, b, fault=f, on_fault="report", return_report=True)
        fixed, rep2 = _lin(x, w, b, fault=f, return_report=True)
        h = _harmful(raw, clean, dtype)
        harmful += h
        assert not h or rep.detected > 0, f
        if rep2.detected:
            assert rep2.corrected == rep2.flagged_blocks and torch.equal(fixed, clean), f
        _, rep_cpp = ftattn.linear(x.cpu(), w.cpu(), None if b is None else b.cpu(), fault=f, on_fault="report",
                                   return_report=True, backend="cpp")
        if h:
            assert rep_cpp.detected > 0, f
    assert harmful >= 8


def test_transposed_weight_and_nonfinite_input():
    x, w, b = _data(20, 48, 33, torch.float32, seed=7)
    wt = w.t().contiguous()  # a Conv1D keeps [in, out]
    y, rep = _lin(x, wt.t(), b, return_report=True)
    assert rep.detected == 0 and torch.equal(y, _lin(x, w, b))
    x[3, 5] = float("inf")
    _, rep = _lin(x, w, b, return_report=True, on_fault="raise")
    assert rep.nonfinite_input and rep.detected == 0


def test_block_o_must_suit_the_kernel():
    x, w, b = _data(4, 16, 16, torch.float32)
    c = ftattn.linear.__globals__["weight_checksums"](w, 24)
    with pytest.raises(ValueError, match="block_o=24 must be a power of two"):
        launcher.linear_fwd(x, w, b, c.ref_cols, c.mag_cols, 24, 1, True)


# ---------------------------------------------------------------------------
# span: one corruption on consecutive values of a row (ftattn/contract.py SPAN_AXIS)


def _negate(t, row, cols):
    out = t.clone()
    out[row, cols] = -out[row, cols]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_span_hits_exactly_its_outputs(dtype):
    # no bias: a sign flip of the fp32 accumulator negates y exactly (rounding is symmetric)
    x, w, _ = _data(37, 50, 140, dtype, seed=11, bias=False)
    clean = _lin(x, w, None, protection="off")
    assert bool((clean != 0).all())
    for col, span, hit in ((100, 32, range(100, 132)),  # across the 128-feature block boundary
                           (125, 32, range(125, 140)),  # past the row's end: clipped
                           (7, 1, range(7, 8))):
        f = Fault("gemm", row=36, col=col, bit=31, span=span)
        y = _lin(x, w, None, fault=f, protection="off")
        assert torch.equal(y, _negate(clean, 36, list(hit))), (col, span)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_span_hits_exactly_its_inputs(dtype):
    # the faulty call equals a clean call on the weight with those entries negated
    x, w, b = _data(21, 70, 33, dtype, seed=12)
    for dim, span in ((20, 32), (50, 32), (3, 1)):  # (across the 32-wide K tiles; the second clipped at 70)
        hit = list(range(dim, min(70, dim + span)))
        y = _lin(x, w, b, fault=Fault("weight", row=30, dim=dim, bit=31, span=span), protection="off")
        assert torch.equal(y, _lin(x, _negate(w, 30, hit), b, protection="off")), (dim, span)
        assert not torch.equal(y, _lin(x, w, b, protection="off"))


@pytest.mark.parametrize("protection", ["abft", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_warp_faults_detected_and_corrected(dtype, protection):
    x, w, b = _data(37, 64, 140, dtype, seed=13)
    clean = _lin(x, w, b, protection=protection)
    for site, where in (("gemm", dict(row=36, col=110)), ("weight", dict(row=120, dim=40))):
        for kw in ({"bit": 30}, {"value": 1e4}):
            f = Fault(site, span=32, **where, **kw)
            fixed, rep = _lin(x, w, b, fault=f, protection=protection, return_report=True)
            assert rep.detected > 0 and rep.corrected == rep.flagged_blocks, (f, rep)
            assert torch.equal(fixed, clean), f


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_warp_that_cancels_in_the_block_sum_is_caught(dtype):
    """tests/test_linear.py's case: one-hot x, the values row 1 reads alternating 1.25 and 1.75,
    bit 22 flipped on 32 outputs: the deltas +-0.5 cancel in each block's plain sum (missed
    before the weighted checksum); warps at a few starts, one across the block boundary."""
    k, out = 7, 200
    x = torch.zeros(3, k)
    x[0, 2] = x[1, 0] = x[2, 5] = 1.0
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(3)) * 0.3
    w[:, 0] = torch.tensor([1.25, 1.75]).repeat(out // 2)
    x, w = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    clean = _lin(x, w, None)
    for col in (0, 48, 96, 113, 168):
        f = Fault("gemm", row=1, col=col, bit=22, span=32)
        assert _harmful(_lin(x, w, None, fault=f, protection="off"), clean, dtype)
        fixed, rep = _lin(x, w, None, fault=f, return_report=True)
        assert rep.detected == 1 and rep.corrected == 1 and torch.equal(fixed, clean), col


def test_seven_int_fault_is_span_one():
    x, w, b = _data(9, 40, 20, torch.float32, seed=14)
    c = ftattn.linear.__globals__["weight_checksums"](w, 128)
    run = lambda fault: launcher.linear_fwd(x, w, b, c.ref_cols, c.mag_cols, 128, 0, False, fault)[0]  # noqa: E731
    clean = run(None)
    for seven in ([6, 0, 0, 4, 11, 0, 31], [7, 0, 0, 15, 0, 33, 31]):
        y = run(seven)
        assert torch.equal(y, run(seven + [1])) and not torch.equal(y, clean)
        assert int((y != clean).sum()) == (1 if seven[0] == 6 else 9)  # one value / W[15, 33]: column 15 of y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, k", [("cancel", 31), ("massive", 257)])
def test_targeted_faults_where_a_block_weighs_a_channel_alike(dtype, kind, k):
    """As tests/test_linear.py's test of that name: fp64 references, and rows whose block is
    blind (big input channels that cancel in y: the bound above a quarter of the harm
    threshold) flagged BLIND and compared with a second product: every harmful mid-mantissa
    fault caught, and corrected to the clean bits."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=g)
    w = torch.randn(130, k, generator=g) / k**0.5
    if kind == "cancel":
        x *= 0.1
        x[:, 0] = x[:, 1] = 100.0
        w[:, 0], w[:, 1] = 1.0, -1.0
    else:
        w *= 0.2
        x[:, 0] = 100.0
        w[:, 0] = 0.05 + 0.01 * torch.randn(130, generator=g)
    x, w = x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    clean = _lin(x, w, None)
    y = x.double() @ w.double().t()
    harmful = 0
    for row in (0, 2):
        for col in y[row].abs().topk(1).indices.tolist():
            for bit in range(10, 23, 2):
                for f in (Fault("gemm", row=row, col=col, bit=bit), Fault("weight", row=col, dim=0, bit=bit)):
                    raw, rep = _lin(x, w, None, fault=f, on_fault="report", return_report=True)
                    h = _harmful(raw, clean, dtype)
                    harmful += h
                    assert rep.detected or not h, f
                    fixed, rep2 = _lin(x, w, None, fault=f, return_report=True)
                    assert rep2.uncorrected == 0 and (torch.equal(fixed, clean) or not rep2.detected), f
    assert harmful > 5


@pytest.mark.parametrize("magnitude", [1e-40, 1e-44, 0.0, 1e30], ids=str)
def test_rows_of_extreme_magnitude_are_checked_not_blind(magnitude):
    """Rows of subnormal (or zero, or large) x: the kernel's bounds scale each row by a power of
    two near its largest |x|, whose inverse must stay a normal fp32 number. A row of x ~1e-40
    took 2^-132, inverse inf: its bounds were NaN and every such call blind (BLIND, a second
    product made and compared). fp32, raw flags of one launch: no bit set; the product that of
    protection off."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 37, generator=g) * magnitude).to(DEVICE)
    w = (torch.randn(23, 37, generator=g) / 37**0.5).to(DEVICE)
    c = ftattn.linear.__globals__["weight_checksums"](w, 128)
    y, flags = launcher.linear_fwd(x, w, None, c.ref_cols, c.mag_cols, 128, 1, False)
    assert int(flags.max()) == 0, flags
    off, _ = launcher.linear_fwd(x, w, None, c.ref_cols, c.mag_cols, 128, 0, False)
    assert torch.equal(y, off)
