"""Packed MX for deployment (ftattn/mx/packed.py, csrc/mx_linear_cpu.cpp, kernels/mx.py):
the fused pack against the reference, the packed linear kernels (C++ decode and GEMM paths,
Triton under the interpreter) against fp64 over the unpacked weight, packed modules against
the fake-quant MX modules, memory, state_dict and Hugging Face round trips, and bad input."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import ftattn
import ftattn.mx as mx
from ftattn.mx import MXConfig
from ftattn.mx.linear import _bf
from ftattn.mx.packed import MXPackedLinear, linear_packed

from mx_helpers import ROUNDINGS, assert_bitexact, special_values_tensor

PACKABLE = ("fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int2")
# |y - y64| <= TOL[dtype] * (|x| |W|^T) + tiny: the GEMM's rounding (fp32: sums of up to ~100 terms in
# any order; bfloat16: one rounding of the output, 2^-8, plus the accumulation's)
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _weights(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.exp2(torch.randint(-6, 6, (out_f, 1), generator=g).float())
    if out_f > 2 and in_f > 3:
        w[1, :3] = 0.0
        w[2, 1] = -1e-12  # rounds to -0.0 in its block
    return w


def _check_close(y, x, w_deq, bias, what):
    ref = x.double() @ w_deq.double().t() + (0 if bias is None else bias.double())
    mag = x.double().abs() @ w_deq.double().abs().t() + (0 if bias is None else bias.double().abs())
    err = (y.double() - ref).abs()
    # (+ the output's absolute rounding where it is subnormal: 2^-25 in float16, whose
    # subnormals start at 6e-5; a float16 x of 1e-5 made y 1.359e-5 against 1.356e-5 exactly)
    bound = TOL[x.dtype] * mag + (2.0 ** -24 if x.dtype == torch.float16 else 1e-30)
    assert y.dtype == x.dtype and y.shape == ref.shape, what
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}, worst ratio " \
                                       f"{(err / bound).max().item():.3g}"


# ---------------------------------------------------------------------------
# pack: the fused C++ path is the reference's storage, byte for byte


@pytest.mark.parametrize("fmt", PACKABLE)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fused_pack_is_the_torch_pack_byte_for_byte(fmt, rounding):
    x = special_values_tensor(shape=(7, 101), seed=3)
    x[3, 40] = float("nan")
    x[5, 70] = float("inf")
    for axis, block_size in ((-1, 32), (0, 16), (-1, 8), (1, 64)):
        fast = mx.pack(x, fmt, block_size, axis, rounding, backend="cpp")
        ref = mx.pack(x, fmt, block_size, axis, rounding, backend="torch")
        what = f"{fmt} {rounding} axis={axis} block={block_size}"
        assert torch.equal(fast.data_lp, ref.data_lp), what
        assert torch.equal(fast.scale_e8m0, ref.scale_e8m0), what
        assert_bitexact(mx.unpack(fast), mx.quantize(x, fmt, block_size, axis, rounding), what)


# ---------------------------------------------------------------------------
# the packed linear kernels


@pytest.mark.parametrize("fmt", PACKABLE)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_packed_linear_matches_fp64_over_the_unpacked_weight(fmt, dtype):
    # in_features 45 / 70 / 1: the last block short; rows 1 and 5 take the decode path, 9 and 37 the GEMM one;
    # block 32 the vector decoders, block 8 the table decoder
    for out_f, in_f, block_size in ((7, 45, 32), (67, 70, 8), (1, 1, 32), (130, 96, 32)):
        w = _weights(out_f, in_f, seed=out_f)
        p = mx.pack(w, fmt, block_size)
        w_deq = mx.unpack(p)
        g = torch.Generator().manual_seed(out_f * 1000 + in_f)  # (the same data in every run)
        for rows in (1, 5, 9, 37):
            for bias in (None, torch.randn(out_f, generator=g)):
                x = torch.randn(rows, in_f, generator=g).to(dtype)
                b = None if bias is None else bias.to(dtype)
                y = linear_packed(x, p, b, backend="cpp")
                _check_close(y, x, w_deq, b, f"{fmt} {dtype} [{out_f}, {in_f}] block {block_size} rows {rows}")


def test_packed_linear_every_decoder_lane_and_leading_dims():
    """Each of the 32 positions of a block carries its own code: a one-hot x reads the weight back exactly."""
    for fmt in PACKABLE:
        w = _weights(70, 96, seed=1)
        p = mx.pack(w, fmt)
        w_deq = mx.unpack(p)
        eye = torch.eye(96)
        for rows in (1, 3, 4, 8, 12, 96):  # the decode path (1 to 4 rows at a time) and the GEMM path
            y = linear_packed(eye[:rows], p, backend="cpp")
            assert torch.equal(y, w_deq[:, :rows].t()), f"{fmt} rows {rows}"  # values (a sum's zero is +0)
        x = torch.randn(2, 3, 96)
        assert linear_packed(x, p).shape == (2, 3, 70)
        _check_close(linear_packed(x, p).reshape(6, 70), x.reshape(6, 96), w_deq, None, fmt)


def test_packed_linear_nan_block_and_empty_inputs():
    w = torch.randn(5, 64)
    w[2, 40] = float("nan")  # the whole block (features 32..63 of output 2) is NaN, as in the fake quantizer
    p = mx.pack(w, "fp4_e2m1")
    for rows in (1, 20):
        y = linear_packed(torch.randn(rows, 64), p)
        assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, [0, 1, 3, 4]]).any()
    assert linear_packed(torch.randn(0, 64), p).shape == (0, 5)


def test_triton_packed_linear_under_the_interpreter():
    """The Triton kernel (CUDA) run by the Triton interpreter on small shapes, in a subprocess
    (TRITON_INTERPRET must be set before triton is imported)."""
    code = r"""
import torch, ftattn.mx as mx
from ftattn.mx.packed import linear_packed
torch.manual_seed(0)
for fmt in ("fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "int8", "int4"):
    for out_f, in_f, bs, rows in ((7, 45, 32, 3), (67, 70, 8, 17)):
        w = torch.randn(out_f, in_f); p = mx.pack(w, fmt, block_size=bs); wd = mx.unpack(p).double()
        for dt in (torch.float32, torch.bfloat16):
            for bias in (None, torch.randn(out_f).to(dt)):
                x = torch.randn(rows, in_f).to(dt)
                y = linear_packed(x, p, bias, backend="triton")
                ref = x.double() @ wd.t() + (0 if bias is None else bias.double())
                mag = x.double().abs() @ wd.abs().t() + (0 if bias is None else bias.double().abs())
                tol = 2e-6 if dt == torch.float32 else 1e-2
                assert y.dtype == dt and bool(((y.double() - ref).abs() <= tol * mag + 1e-30).all()), (fmt, dt, bs)
print("triton ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "triton ok" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------------------
# the module and quantize_


def _mlp(bias=True):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(45, 67, bias=bias), torch.nn.GELU(), torch.nn.Linear(67, 11))
    return m.eval()


@pytest.mark.parametrize("fmt", ("fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "int8"))
@pytest.mark.parametrize("activation", (None, "fp8_e4m3"))
@pytest.mark.parametrize("bfloat", (16, 0))
@pytest.mark.parametrize("bias", (True, False))
def test_packed_model_equals_the_fake_quant_model(fmt, activation, bfloat, bias):
    base = _mlp(bias)
    fake, packed = copy.deepcopy(base), copy.deepcopy(base)
    mx.quantize_(fake, MXConfig(weight=fmt, activation=activation, bfloat=bfloat))
    mx.quantize_(packed, MXConfig(weight=fmt, activation=activation, bfloat=bfloat, packed=True))
    assert type(packed[0]) is MXPackedLinear and type(packed[2]) is MXPackedLinear
    cfg = MXConfig(weight=fmt, bfloat=bfloat)
    for i in (0, 2):  # the dequantized weights: the fake quantizer's, bit for bit
        assert_bitexact(mx.unpack(packed[i].weight), mx.quantize(_bf(base[i].weight.detach(), cfg), fmt).numpy(),
                        f"layer {i}")
    for rows in (1, 6, 23):
        x = torch.randn(rows, 45)
        with torch.no_grad():
            yf, yp = fake(x), packed(x)
        # the same arithmetic but for the GEMM's summation order (and bfloat16 rounding of the output)
        tol = 1e-5 if bfloat == 0 else 2 ** -7
        assert torch.allclose(yp, yf, rtol=tol, atol=tol * yf.abs().max().item()), (rows, (yp - yf).abs().max())
    with torch.no_grad():
        assert torch.allclose(packed(torch.ones(45)), packed(torch.ones(1, 45))[0])  # 1-D input


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 0, 4), (0,)], ids=str)
@pytest.mark.parametrize("axis", [-1, 0])
def test_pack_of_empty_tensors_round_trips(shape, axis):
    """pack / unpack of tensors with no elements (an empty block axis too: an internal
    reshape error before, found by review) equal quantize, as for any other shape."""
    x = torch.randn(*shape)
    packed = mx.pack(x, "fp4_e2m1", axis=axis)
    assert torch.equal(mx.unpack(packed), mx.quantize(x, "fp4_e2m1", axis=axis))


def test_packed_layer_follows_its_scales_reassigned_alone():
    """A packed layer's operands for the C++ op are kept per buffers: reassigning the scales
    alone (the codes kept) reads the new scales (found by review: the old ones stayed)."""
    model = _mlp(True)
    mx.quantize_(model, MXConfig(weight="fp8_e4m3", packed=True, bfloat=0))
    layer, x = model[0], torch.randn(3, 45)
    with torch.no_grad():
        before = layer(x)
        layer.weight_scales = layer.weight_scales + 1  # every block's scale doubled
        after = layer(x)
    want = 2 * (before - layer.bias) + layer.bias
    assert torch.allclose(after, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("fmt", ("fp4_e2m1", "fp8_e4m3"))
def test_bf16_panel_path_under_inference_mode_on_two_threads(fmt):
    """bfloat16 activations, more than 16 rows (the panel path), two threads, under
    torch.inference_mode(): the panel's bfloat16 copy was an ATen copy_ on the pool's
    threads, which ran outside the caller's inference mode and raised (review: RuntimeError
    'Inplace update to inference tensor outside InferenceMode'); same output as no_grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300)).bfloat16()
    mx.quantize_(model, MXConfig(weight=fmt, packed=True))
    x = torch.randn(100, 64).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            one = model(x)
        torch.set_num_threads(2)
        with torch.no_grad():
            ref = model(x)
        with torch.inference_mode():
            y = model(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, ref) and torch.equal(y, one)


def test_packed_memory_is_the_packed_storage():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    weights = sum(model[i].weight.numel() * 4 for i in (0, 2))
    biases = sum(model[i].bias.numel() * 4 for i in (0, 2))
    before = nbytes(model)
    mx.quantize_(model, MXConfig(weight="fp4_e2m1", packed=True))
    after = nbytes(model)
    assert before == weights + biases
    meta = sum(model[i].weight_mx_meta.numel() * 4 for i in (0, 2))
    assert after - biases - meta <= weights * 4.25 / 32
    assert after - biases - meta == weights * 4.25 / 32  # codes + one E8M0 byte per 32 values, nothing else
    assert not any(p.dim() == 2 for p in model.parameters())  # no fp32 weight left in the model


def test_state_dict_round_trip_and_mismatches():
    src = _mlp()
    mx.quantize_(src, MXConfig(weight="fp4_e2m1", activation="fp8_e4m3", packed=True))
    state = src.state_dict()
    assert {"0.weight_codes", "0.weight_scales", "0.weight_mx_meta", "0.bias"} <= set(state)
    assert state["0.weight_codes"].dtype == torch.uint8
    dst = _mlp()
    torch.nn.init.zeros_(dst[0].weight)
    mx.quantize_(dst, MXConfig(weight="fp4_e2m1", activation="fp8_e4m3", packed=True))
    dst.load_state_dict(state)
    x = torch.randn(4, 45)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    other = _mlp()
    mx.quantize_(other, MXConfig(weight="fp8_e4m3", packed=True))
    with pytest.raises(RuntimeError, match=r"holds packed MX weights of fp4_e2m1 block 32, \[67, 45\].*this module is "
                                           r"fp8_e4m3"):
        other.load_state_dict(state)
    with pytest.raises(RuntimeError, match="unpacked '0.weight'"):
        dst.load_state_dict(_mlp().state_dict())
    wrong_shape = torch.nn.Sequential(torch.nn.Linear(45, 66), torch.nn.GELU(), torch.nn.Linear(66, 11))
    mx.quantize_(wrong_shape, MXConfig(weight="fp4_e2m1", activation="fp8_e4m3", packed=True))
    with pytest.raises(RuntimeError, match=r"\[67, 45\]"):
        wrong_shape.load_state_dict(state)


def test_restore_needs_keep_original_and_backward_is_refused():
    model = _mlp()
    mx.quantize_(model, MXConfig(weight="fp4_e2m1", packed=True))
    with pytest.raises(RuntimeError, match="keep_original=True"):
        mx.restore_(model)
    x = torch.randn(3, 45, requires_grad=True)
    y = model(x)  # the forward works
    with pytest.raises(RuntimeError, match="backward through an MXPackedLinear.*inference"):
        y.sum().backward()
    kept = _mlp()
    first = kept[0]
    mx.quantize_(kept, MXConfig(weight="fp4_e2m1", packed=True), keep_original=True)
    assert type(kept[0]) is MXPackedLinear
    mx.restore_(kept)
    assert kept[0] is first and type(kept[2]) is torch.nn.Linear


def test_tied_weights_conv_and_protect():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.proj = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    mx.quantize_(m, MXConfig(weight="fp8_e4m3", packed=True))
    assert type(m.proj) is MXPackedLinear
    assert type(m.head) is torch.nn.Linear and m.head.weight is m.emb.weight  # tied: left as it is
    assert type(m.conv) is torch.nn.Conv2d
    with pytest.raises(ValueError, match="proj is a packed MX layer.*filter_fn"):
        ftattn.protect_(m)
    ftattn.protect_(m, filter_fn=lambda name, mod: name != "proj")  # leaving it out works


def test_bad_input():
    with pytest.raises(ValueError, match="set weight= to a format"):
        MXConfig(activation="fp8_e4m3", packed=True)
    with pytest.raises(ValueError, match="multiple of 4"):
        MXConfig(weight="fp6_e2m3", block_size=6, packed=True)
    with pytest.raises(TypeError, match="packed must be a bool"):
        MXConfig(weight="fp4_e2m1", packed=1)
    with pytest.raises(TypeError, match="keep_original must be a bool"):
        mx.quantize_(_mlp(), MXConfig(weight="fp4_e2m1", packed=True), keep_original="yes")
    p = mx.pack(torch.randn(8, 64), "fp4_e2m1")
    with pytest.raises(ValueError, match="last dimension must be in_features=64"):
        linear_packed(torch.randn(3, 65), p)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        linear_packed(torch.randn(3, 64).double(), p)
    with pytest.raises(ValueError, match="packed along in"):
        linear_packed(torch.randn(3, 8), mx.pack(torch.randn(8, 64), "fp4_e2m1", axis=0))
    with pytest.raises(ValueError, match="multiple of 2"):
        linear_packed(torch.randn(3, 64), mx.pack(torch.randn(8, 64), "fp4_e2m1", block_size=5))
    with pytest.raises(TypeError, match="MXTensor"):
        linear_packed(torch.randn(3, 64), torch.randn(8, 64))


def test_op_fake_kernel_and_compile():
    p = mx.pack(torch.randn(24, 64), "fp8_e4m3")
    codes, scales = p.data_lp.view(24, -1), p.scale_e8m0
    from ftattn.mx.formats import decode_table

    args = (torch.randn(5, 64), codes, scales, decode_table("fp8_e4m3"), 8, 1, 32, torch.randn(24))
    torch.library.opcheck(torch.ops.ftattn.mx_linear.default, args)
    model = _mlp()
    mx.quantize_(model, MXConfig(weight="fp4_e2m1", packed=True))
    x = torch.randn(3, 45)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(eager, compiled)


# ---------------------------------------------------------------------------
# Hugging Face: save_pretrained, then load_pretrained without re-quantizing


def test_hugging_face_save_and_load_pretrained(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "tests", "integrations"))
    from hf_models import tiny_llama

    model = tiny_llama("sdpa", seed=3)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    mx.quantize_(model, MXConfig(weight="fp4_e2m1", packed=True), filter_fn=lambda m, fqn: "mlp" in fqn)
    mx.quantize_(model, MXConfig(weight="fp8_e4m3", packed=True))  # the attention projections: another format
    assert type(model.model.layers[0].mlp.up_proj) is MXPackedLinear
    assert model.model.layers[0].mlp.up_proj.config.weight == "fp4_e2m1"
    assert model.model.layers[0].self_attn.q_proj.config.weight == "fp8_e4m3"
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    loaded = mx.load_pretrained(str(tmp_path))
    assert type(loaded.model.layers[1].mlp.down_proj) is MXPackedLinear
    assert loaded.model.layers[1].mlp.down_proj.config.weight == "fp4_e2m1"
    assert loaded.model.layers[1].self_attn.o_proj.config.weight == "fp8_e4m3"
    packed_bytes = sum(t.numel() * t.element_size() for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert packed_bytes < fp32_bytes
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), tokens)
    # a tied head stays the embedding's (fp32), before and after the round trip
    tied = tiny_llama("sdpa", seed=4, tie_word_embeddings=True)
    mx.quantize_(tied, MXConfig(weight="fp4_e2m1", packed=True))
    assert type(tied.lm_head) is torch.nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "tied")
    back = mx.load_pretrained(str(tmp_path / "tied"))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(ids).logits, tied(ids).logits)
    with pytest.raises(ValueError, match="holds no packed MX layers"):
        fresh = tmp_path / "plain"
        tiny_llama("sdpa").save_pretrained(fresh)
        mx.load_pretrained(str(fresh))


def test_fp8_e4m3_decode_path_every_code_any_activation_scale():
    """The fp8_e4m3 decode path (gemv_e4m3_pairs: codes as fp32 bit patterns times 2^-120, x and the
    block scales carrying the 2^120 between them) reads every code exactly, subnormals and -0 included,
    for activations from 2^-100 to 2^100 (where x takes less of the 2^120 and the scales more), and
    falls back to the fp16-converter path where a scale in use would overflow by it."""
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = table[~torch.isnan(table)]  # 254 values
    rows = []
    for i in range(0, len(finite), 31):  # 31 values per block + 448, so every block's scale is 2^0
        chunk = finite[i:i + 31]
        rows.append(torch.cat([torch.tensor([448.0]), chunk, torch.zeros(31 - len(chunk))]))
    w = torch.cat(rows).reshape(-1, 96)[:, :95]  # 3 blocks per row, the last one short (a tail block alone)
    p = mx.pack(w, "fp8_e4m3")
    w_deq = mx.unpack(p)
    assert torch.equal(w_deq, w) and bool((w_deq == 0).any()) and bool((w_deq.abs() < 2.0 ** -6).any())
    eye = torch.eye(95)
    for e in (-100, -20, 0, 6, 7, 20, 100):
        for rows_x in (1, 2, 3, 4, 7):
            x = eye[:rows_x] * 2.0 ** e
            y = linear_packed(x, p, backend="cpp")
            assert torch.equal(y, w_deq[:, :rows_x].t() * 2.0 ** e), f"x = one-hot * 2^{e}, rows {rows_x}"
    x = torch.randn(3, 95) * 2.0 ** 40
    _check_close(linear_packed(x, p, backend="cpp"), x, w_deq, None, "x ~ 2^40")
    # a block of 2^118 against x's block of 2^-30 and the reverse: y is finite, but the decode path's
    # scale for the large block would overflow by x's 2^30 (the fp16-converter path takes it)
    wb = torch.randn(4, 64)
    wb[:, :32] *= 2.0 ** 118
    xb = torch.randn(1, 64)
    xb[:, :32] *= 2.0 ** -30
    xb[:, 32:] *= 2.0 ** 30
    pb = mx.pack(wb, "fp8_e4m3")
    _check_close(linear_packed(xb, pb, backend="cpp"), xb, mx.unpack(pb), None, "overflowing scale")
    xi = torch.randn(2, 95)
    xi[1, 5] = float("inf")
    ref = xi.double() @ w_deq.double().t()
    y = linear_packed(xi, p, backend="cpp")
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    _check_close(y[:1], xi[:1], w_deq, None, "the finite row beside an inf")
