"""ftattn.mx.quantize / pack / unpack: bit-exact with microxcaling's goldens, every backend
bit-exact with the reference, real storage round trips, bad input."""
import math

import numpy as np
import pytest
import torch

import ftattn  # noqa: F401  (loads the C++ ops)
from ftattn import mx
from ftattn.mx.formats import e8m0_to_scale_exp, scale_exp_to_e8m0
from ftattn.mx.quantize import _bfloat16_bits

from mx_helpers import FORMATS, ROUNDINGS, assert_bitexact, special_values_tensor

CPU_BACKENDS = ("torch", "cpp")


# ---------------------------------------------------------------------------
# goldens (microxcaling at 7bc4195, torch 2.13 CPU)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ("rand", "edge"))
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_golden(golden, backend, case, fmt):
    x = torch.from_numpy(golden[f"x_{case}"])
    for rounding in ROUNDINGS:
        q, scale = mx.quantize_with_scales(x, fmt, rounding=rounding, backend=backend)
        assert_bitexact(q, golden[f"q_{case}__{fmt}__{rounding}"], f"{case} {fmt} {rounding}")
    # the shared scale of the last call (it does not depend on the rounding)
    assert scale.dtype == torch.uint8
    assert_bitexact(e8m0_to_scale_exp(scale), golden[f"scale_exp_{case}__{fmt}"], f"scale {case} {fmt}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_axis_minus2_matches_golden(golden, backend, fmt):
    x = torch.from_numpy(golden["x_rand"])
    assert_bitexact(mx.quantize(x, fmt, axis=-2, backend=backend), golden[f"q_rand_axis-2__{fmt}__nearest"], fmt)
    assert_bitexact(mx.quantize(x, fmt, axis=0, backend=backend), golden[f"q_rand_axis-2__{fmt}__nearest"], fmt)


def test_golden_edge_rows_behave_as_documented(golden):
    """The quirks of MX_GOLDEN.txt, checked on our output (not only 'equal to the golden')."""
    names = list(golden["edge_row_names"])
    x = torch.from_numpy(golden["x_edge"])
    q, scale = mx.quantize_with_scales(x, "fp8_e4m3")
    se = e8m0_to_scale_exp(scale)
    zeros, nan_row, inf_row = names.index("zeros"), names.index("nan_in_block0"), names.index("inf_in_blocks")
    assert torch.equal(q[zeros], torch.zeros(80)) and bool((se[zeros] == -127).all())  # amax 0 -> 2^-127
    assert bool(torch.isnan(q[nan_row, :32]).all()) and not bool(torch.isnan(q[nan_row, 32:]).any())
    assert scale[nan_row, 0] == 0xFF
    # an Inf makes its whole block NaN, the Inf included
    inf_cols = torch.isinf(x[inf_row]).nonzero().flatten()
    for c in inf_cols.tolist():
        assert bool(torch.isnan(q[inf_row, (c // 32) * 32:(c // 32 + 1) * 32]).all())
    # amax 15.999999: torch.log2 rounds up to 4, so the shared exponent is 4 - 8 = -4 (frexp would give -5)
    below = names.index("max_just_below_pow2")
    assert se[below, 0] == -4 and math.frexp(float(x[below, :32].abs().max()))[1] - 1 == 3


# ---------------------------------------------------------------------------
# fast paths vs the reference, beyond the goldens: odd shapes, axes, block sizes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_cpp_matches_reference_special_values(fmt, rounding):
    x = special_values_tensor()
    for axis in (-1, 0):
        for block_size in (32, 1, 7):
            ref = mx.quantize_reference(x, fmt, block_size, axis, rounding)
            got, scale = mx.quantize_with_scales(x, fmt, block_size, axis, rounding, backend="cpp")
            assert_bitexact(got, ref, f"{fmt} {rounding} axis={axis} block={block_size}")
            _, ref_scale = mx.quantize_with_scales(x, fmt, block_size, axis, rounding, backend="torch")
            assert torch.equal(scale, ref_scale)


@pytest.mark.parametrize("shape,axis", [((97,), 0), ((3, 5, 67), 1), ((2, 33, 4, 5), -1), ((1, 1), 0),
                                        ((4, 0, 3), -1), ((130, 3), 0)])
def test_cpp_matches_reference_shapes(shape, axis):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    for fmt in ("fp8_e4m3", "fp4_e2m1", "int8"):
        assert_bitexact(mx.quantize(x, fmt, 32, axis, backend="cpp"), mx.quantize_reference(x, fmt, 32, axis),
                        f"{shape} {axis} {fmt}")


def test_log2_thresholds_reproduce_torch_log2_exhaustively_near_powers_of_two():
    """The fused kernels' floor(log2) == floor(torch.log2) for every float within 1000 ulp of each power of 2."""
    from ftattn.mx.quantize import _log2_thresholds

    thr = _log2_thresholds("cpu").to(torch.int64)
    pw = (torch.arange(1, 255, dtype=torch.int64) << 23)
    bits = (pw[:, None] + torch.arange(-1000, 1000)[None, :]).flatten()
    x = bits.to(torch.int32).view(torch.float32)
    expected = torch.floor(torch.log2(x)).to(torch.int64).clamp(min=-127)
    b = bits >> 23
    e = torch.where(b == 0, -127, b - 127) + (bits >= thr[b]).to(torch.int64)
    assert torch.equal(e, expected)
    assert int((e > (b - 127).clamp(min=-127)).sum()) > 1000  # the round-up band exists and is covered


def test_cpp_faster_path_is_the_default_on_cpu():
    assert mx.backend_status("cpu")["cpp"] is None
    from ftattn.mx.quantize import _resolve_backend

    assert _resolve_backend("auto", torch.device("cpu")) is mx.Backend.CPP


def test_low_precision_inputs_are_computed_in_float32():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dtype)
        got = mx.quantize(xd, "fp8_e4m3")
        assert got.dtype == dtype
        torch.testing.assert_close(got, mx.quantize_reference(xd.float(), "fp8_e4m3").to(dtype), rtol=0, atol=0)


def test_quantization_error_is_bounded_by_the_format():
    """Independent of the reference: in the scaled domain each element is within half a
    grid step of x (nearest), or clipped to max_norm (the 'max' rule lets the block
    maximum exceed the largest element, up to 2**(emax+1))."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)).float()
    for fmt in FORMATS:
        f = mx.get_format(fmt)
        q, scale = mx.quantize_with_scales(x, fmt)
        s = e8m0_to_scale_exp(scale).double().repeat_interleave(32, dim=1)
        a, qa = x.double() / 2**s, q.double() / 2**s
        if f.is_int:
            step = torch.full_like(a, 2.0 ** -f.int_scale_bits)
        else:
            p = torch.frexp(a)[1].double() - 1
            step = 2.0 ** (p.clamp(min=f.min_exp) - (f.mbits - 2))
        bound = torch.maximum(step / 2, a.abs() - f.max_norm)
        assert bool(((qa - a).abs() <= bound).all()), fmt
        assert bool((qa.abs() <= f.max_norm).all()), fmt
        assert bool((a.abs().amax(1) >= 2.0**f.emax).all()), fmt  # the block max lands in the top binade


# ---------------------------------------------------------------------------
# bfloat16 element-wise quantization (the bfloat=16 path of the layers)


@pytest.mark.parametrize("case", ("rand", "edge"))
@pytest.mark.parametrize("rounding", ("nearest", "even"))
def test_bfloat16_matches_golden(golden, case, rounding):
    x = torch.from_numpy(golden[f"x_{case}"])
    assert_bitexact(mx.quantize_bfloat(x, 16, rounding), golden[f"bf16q_{case}__{rounding}"], "fast")
    assert_bitexact(mx.quantize_bfloat_reference(x, 16, rounding), golden[f"bf16q_{case}__{rounding}"], "ref")


@pytest.mark.parametrize("rounding", ("nearest", "even"))
def test_bfloat16_fast_matches_reference_special_values(rounding):
    x = special_values_tensor(seed=5)
    x[0, :4] = torch.tensor([3.3895e38, 3.4e38, float("inf"), -0.0])
    ref = mx.quantize_bfloat_reference(x, 16, rounding)
    assert_bitexact(mx.quantize_bfloat(x, 16, rounding), ref, rounding)  # C++ op on CPU
    assert_bitexact(_bfloat16_bits(x, mx.Rounding(rounding)), ref, rounding)  # the torch integer path (CUDA)
    if rounding == "even":  # microxcaling's 'even' is torch's own round-to-nearest-even bfloat16 cast
        finite = torch.isfinite(x)
        assert torch.equal(mx.quantize_bfloat(x, 16, "even")[finite], x.bfloat16().float()[finite])


def test_bfloat_bad_width():
    with pytest.raises(ValueError, match="bfloat=8"):
        mx.quantize_bfloat(torch.ones(3), 8)


# ---------------------------------------------------------------------------
# real storage


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_pack_unpack_round_trip(fmt, rounding):
    x = special_values_tensor(shape=(5, 77), seed=7)
    for axis, block_size in ((-1, 32), (0, 32), (1, 5), (-1, 77)):
        packed = mx.pack(x, fmt, block_size, axis, rounding)
        assert packed.data_lp.dtype == torch.uint8 and packed.scale_e8m0.dtype == torch.uint8
        assert_bitexact(mx.unpack(packed), mx.quantize(x, fmt, block_size, axis, rounding),
                        f"{fmt} {rounding} axis={axis} block={block_size}")


@pytest.mark.parametrize("fmt,bits", [("fp8_e4m3", 8.25), ("fp8_e5m2", 8.25), ("fp6_e3m2", 6.25),
                                      ("fp6_e2m3", 6.25), ("fp4_e2m1", 4.25), ("int8", 8.25), ("int4", 4.25),
                                      ("int2", 2.25)])
def test_pack_storage_size(fmt, bits):
    x = torch.randn(64, 256)
    packed = mx.pack(x, fmt)
    assert packed.bits_per_value == bits
    assert packed.scale_e8m0.shape == (64, 8)


def test_pack_codes_use_the_standard_bit_layouts():
    """fp codes are those of torch.float8_* / ml_dtypes; int codes two's complement (scale 2^-(mbits-2))."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = torch.tensor([[1.0, -0.5, 0.75, 6.0, 0.0, -3.0] + [0.0] * 26])  # amax 6 -> scale 1 for fp4_e2m1 (emax 2)
    packed = mx.pack(x, "fp4_e2m1")
    codes = torch.stack([packed.data_lp & 0xF, packed.data_lp >> 4], dim=1).flatten()[:6]
    expect = np.array([1.0, -0.5, 0.75, 6.0, 0.0, -3.0], dtype=np.float32).astype(ml_dtypes.float4_e2m1fn)
    assert codes.tolist() == expect.view(np.uint8).tolist()
    assert packed.scale_e8m0.tolist() == [[127]]  # 2^0
    p8 = mx.pack(torch.tensor([[448.0, -1.0, 2.0 ** -9]]), "fp8_e4m3")  # scale 2^0
    assert p8.data_lp[:3].tolist() == torch.tensor([448.0, -1.0, 2.0 ** -9]).to(torch.float8_e4m3fn).view(
        torch.uint8).tolist()
    pi = mx.pack(torch.tensor([[1.5, -1.0, -1e-9, 0.015625]]), "int8")  # scale 2^0, unit 2^-6
    assert pi.data_lp[:4].tolist() == [96, 256 - 64, 0x80, 1]  # -1e-9 rounds to -0.0: the spare code 0x80


def test_e8m0_conversions():
    e = torch.tensor([-127.0, 0.0, 127.0, float("nan"), -5.0])
    b = scale_exp_to_e8m0(e)
    assert b.tolist() == [0, 127, 254, 255, 122]
    assert_bitexact(e8m0_to_scale_exp(b), e.numpy())


def test_unpack_bad_input():
    with pytest.raises(TypeError, match="MXTensor"):
        mx.unpack(torch.zeros(3))


# ---------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("fn", (mx.quantize, mx.quantize_reference, mx.pack))
def test_bad_input_errors(fn):
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="unknown MX element format 'fp7'.*fp8_e4m3"):
        fn(x, "fp7")
    with pytest.raises(TypeError, match="str or ElementFormat"):
        fn(x, 8)
    with pytest.raises(ValueError, match="block_size=0 must be >= 1"):
        fn(x, "fp8_e4m3", block_size=0)
    with pytest.raises(ValueError, match="block_size=-3"):
        fn(x, "fp8_e4m3", block_size=-3)
    with pytest.raises(TypeError, match="block_size must be an int"):
        fn(x, "fp8_e4m3", block_size=2.0)
    with pytest.raises(TypeError, match="torch.int32 is not supported.*x.float"):
        fn(torch.ones(4, 32, dtype=torch.int32), "fp8_e4m3")
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(np.ones((4, 32), np.float32), "fp8_e4m3")
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        fn(x, "fp8_e4m3", rounding="up")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        fn(x, "fp8_e4m3", axis=2)
    with pytest.raises(ValueError, match="0-d"):
        fn(torch.tensor(1.0), "fp8_e4m3")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend='gpu'"):
        mx.quantize(torch.ones(3), "int8", backend="gpu")
    if mx.backend_status("cpu")["triton"] is not None:
        with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
            mx.quantize(torch.ones(3), "int8", backend="triton")


def test_format_aliases_and_case():
    assert mx.get_format("FP4").name == "fp4_e2m1"
    assert mx.get_format("mxfp8_e4m3") is mx.FORMATS["fp8_e4m3"]


def test_opcheck_cpu_op():
    from ftattn.mx.quantize import _log2_thresholds

    thr = _log2_thresholds("cpu")
    for shape, scaled in (((3, 70, 1), False), ((2, 33, 5), True)):
        x = torch.randn(*shape)
        torch.library.opcheck(torch.ops.ftattn.mx_quantize.default, (x, thr, 4, 5, 8, 448.0, 32, 0, scaled))
    with pytest.raises(RuntimeError, match="must be 3-D"):
        torch.ops.ftattn.mx_quantize(torch.randn(4, 4), thr, 4, 5, 8, 448.0, 32, 0, False)


def test_quantize_of_a_tensor_requiring_grad_runs():
    x = torch.randn(3, 40, requires_grad=True)
    assert_bitexact(mx.quantize(x, "int8"), mx.quantize_reference(x.detach(), "int8").numpy())


def test_meta_tensors_give_empty_results_of_the_shape():
    x = torch.empty(4, 70, device="meta")
    for fmt in ("fp8_e4m3", "fp4_e2m1", "int8"):
        y = mx.quantize(x, fmt)
        assert y.is_meta and y.shape == x.shape
        y, scales = mx.quantize_with_scales(x, fmt)
        assert y.is_meta and y.shape == x.shape and scales.is_meta
        packed = mx.pack(x, fmt)
        assert mx.unpack(packed).is_meta and mx.unpack(packed).shape == x.shape
    assert mx.quantize_bfloat(x).is_meta
