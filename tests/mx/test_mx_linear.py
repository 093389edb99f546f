"""MXConfig, MXLinear / linear / matmul / MXConv2d and quantize_ / restore_:
forward and gradients bit-exact with microxcaling's goldens."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ftattn  # noqa: F401  (loads the C++ ops)
from ftattn import mx
from ftattn.mx.config import MXConfig
from ftattn.mx.linear import MXConv2d, MXLinear, conv2d, linear, matmul
from ftattn.mx.workflow import is_quantized, quantize_, restore_

from mx_helpers import FORMATS, assert_bitexact


def _t(golden, key, grad=False):
    return torch.from_numpy(golden[key].copy()).requires_grad_(grad)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("bfloat", (16, 0))
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_forward_backward_match_golden(golden, fmt, bfloat, backend):
    config = MXConfig(weight=fmt, activation=fmt, bfloat=bfloat, backend=backend)
    x, w, b = (_t(golden, k, True) for k in ("linear_x", "linear_w", "linear_b"))
    out = linear(x, w, b, config)
    out.backward(_t(golden, "linear_grad_out"))
    tag = f"{fmt}__bf{bfloat}"
    assert_bitexact(out, golden[f"linear_out__{tag}"], f"out {tag}")
    assert_bitexact(x.grad, golden[f"linear_grad_x__{tag}"], f"grad_x {tag}")
    assert_bitexact(w.grad, golden[f"linear_grad_w__{tag}"], f"grad_w {tag}")
    assert_bitexact(b.grad, golden[f"linear_grad_b__{tag}"], f"grad_b {tag}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_matches_golden(golden, fmt):
    out = matmul(_t(golden, "matmul_a"), _t(golden, "matmul_b"), MXConfig(weight=fmt, activation=fmt))
    assert_bitexact(out, golden[f"matmul_out__{fmt}__bf16"], fmt)


def test_quantize_model_matches_injected_golden(golden):
    """microxcaling's inject_pyt_ops (global patching) vs quantize_ on one model: same numbers."""
    config = MXConfig(weight="fp8_e4m3", activation="fp8_e4m3")
    model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight.copy_(_t(golden, "linear_w"))
        model[0].bias.copy_(_t(golden, "linear_b"))
    x = _t(golden, "linear_x")
    plain = model(x)
    torch.testing.assert_close(plain, _t(golden, "linear_ref_fp32"))  # fp32 reference, BLAS order may differ
    quantize_(model, config)
    assert isinstance(model[0], MXLinear) and is_quantized(model)
    assert_bitexact(model(x), golden["inject_linear_out__fp8_e4m3__bf16"], "module")
    assert_bitexact(linear(x, model[0].weight, model[0].bias, config), golden["inject_F_linear_out__fp8_e4m3__bf16"],
                    "functional")
    restore_(model)
    assert type(model[0]) is torch.nn.Linear and not is_quantized(model)
    assert_bitexact(model(x), plain.detach().numpy(), "restored")


def test_mixed_formats_and_one_sided_configs():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 70, generator=g), torch.randn(9, 70, generator=g)
    for cfg in (MXConfig(weight="fp4_e2m1", activation="fp8_e4m3"), MXConfig(weight="int8"),
                MXConfig(activation="fp6_e2m3", bfloat=0)):
        qx = mx.quantize(mx.quantize_bfloat(x, cfg.bfloat), cfg.activation) if cfg.activation else \
            mx.quantize_bfloat(x, cfg.bfloat)
        qw = mx.quantize(mx.quantize_bfloat(w, cfg.bfloat), cfg.weight) if cfg.weight else mx.quantize_bfloat(
            w, cfg.bfloat)
        expect = mx.quantize_bfloat(F.linear(qx, qw), cfg.bfloat)
        assert_bitexact(linear(x, w, None, cfg), expect.numpy(), cfg.label)


def test_quantize_backprop_false_gives_the_plain_gradients_of_the_quantized_forward():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 40, generator=g, requires_grad=True)
    w = torch.randn(7, 40, generator=g, requires_grad=True)
    b = torch.randn(7, generator=g, requires_grad=True)
    go = torch.randn(2, 5, 7, generator=g)
    linear(x, w, b, MXConfig(weight="fp8_e4m3", activation="fp8_e4m3", quantize_backprop=False)).backward(go)
    torch.testing.assert_close(x.grad, go @ w.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, go.reshape(-1, 7).t() @ x.detach().reshape(-1, 40), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, go.sum((0, 1)))
    # and the quantized backward differs from it (the test above can fail)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    linear(x2, w2, None, MXConfig(weight="fp4_e2m1", activation="fp4_e2m1")).backward(go)
    assert not torch.equal(x2.grad, x.grad)


def test_mxlinear_module_and_1d_input():
    config = MXConfig(weight="fp6_e3m2", activation="fp6_e3m2")
    layer = MXLinear(33, 4, config=config)
    x = torch.randn(33)
    assert layer(x).shape == (4,)
    assert_bitexact(layer(x), layer(x.unsqueeze(0))[0].detach().numpy())
    with pytest.raises(ValueError, match="config"):
        MXLinear(3, 4)
    with pytest.raises(ValueError, match="at least 2-D"):
        linear(torch.randn(3), torch.randn(2, 3), None, config)


def test_conv2d_forward_is_the_conv_of_channel_quantized_operands():
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(40, 6, 3, padding=1, stride=2)
    x = torch.randn(2, 40, 9, 7, generator=g, requires_grad=True)
    config = MXConfig(weight="fp8_e5m2", activation="fp4_e2m1")
    layer = MXConv2d.from_conv2d(conv, config)
    out = layer(x)
    bf = lambda t: mx.quantize_bfloat(t, 16)  # noqa: E731
    expect = bf(F.conv2d(mx.quantize(bf(x.detach()), "fp4_e2m1", axis=1), mx.quantize(bf(conv.weight.detach()),
                                                                                       "fp8_e5m2", axis=1),
                         bf(conv.bias.detach()), 2, 1))
    assert_bitexact(out, expect.numpy())
    assert_bitexact(conv2d(x, conv.weight, conv.bias, config, stride=2, padding=1), expect.numpy(), "functional")
    with pytest.raises(NotImplementedError, match="padding='same'"):
        conv2d(x, conv.weight, conv.bias, config, padding="same")
    out.sum().backward()
    assert x.grad.shape == x.shape and conv.weight.grad.shape == conv.weight.shape
    # gradients near the fp32 ones of the same quantized forward
    ref_x = x.detach().clone().requires_grad_()
    F.conv2d(ref_x, conv.weight.detach(), conv.bias.detach(), 2, 1).sum().backward()
    assert F.cosine_similarity(x.grad.flatten(), ref_x.grad.flatten(), dim=0) > 0.95


def test_quantize_and_restore_are_exact_and_local():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Sequential(torch.nn.Linear(8 * 6 * 6, 37), torch.nn.GELU(), torch.nn.Linear(37, 5)),
    )
    other = torch.nn.Linear(4, 4)  # another model: untouched
    x = torch.randn(2, 3, 8, 8)
    before = model(x).detach()
    state = copy.deepcopy(model.state_dict())
    originals = [m for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    quantize_(model, MXConfig(weight="fp4_e2m1", activation="fp4_e2m1"),
              filter_fn=lambda module, fqn: fqn != "3.2")
    assert isinstance(model[0], MXConv2d) and isinstance(model[3][0], MXLinear)
    assert type(model[3][2]) is torch.nn.Linear  # filtered out
    assert model[3][0].weight is originals[1].weight  # shared, not copied
    assert list(model.state_dict().keys()) == list(state.keys())
    after = model(x)
    assert not torch.equal(after, before)
    assert type(other) is torch.nn.Linear and F.linear is torch.nn.functional.linear
    # quantizing twice is a no-op for swapped modules
    quantize_(model, MXConfig(weight="int8", activation="int8"))
    assert model[0].config.weight == "fp4_e2m1"
    restore_(model)
    assert [m for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)] == originals
    assert torch.equal(model(x), before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_training_through_the_mx_model_updates_the_original_weights():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(32, 3))
    w0 = model[0].weight.detach().clone()
    quantize_(model, MXConfig(weight="fp8_e4m3", activation="fp8_e4m3"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    restore_(model)
    assert not torch.equal(model[0].weight, w0)


def test_workflow_bad_input():
    config = MXConfig(weight="int4")
    with pytest.raises(ValueError, match="wrap it"):
        quantize_(torch.nn.Linear(3, 3), config)
    with pytest.raises(TypeError, match="MXConfig"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(3, 3)), {"weight": "int4"})
    with pytest.raises(TypeError, match="filter_fn"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(3, 3)), config, filter_fn=3)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({}, ValueError, "names no format"),
    ({"weight": None, "activation": None}, ValueError, "names no format"),
    ({"weight": "fp9"}, ValueError, "unknown MX element format 'fp9'"),
    ({"weight": "int8", "block_size": 0}, ValueError, "block_size=0"),
    ({"weight": "int8", "block_size": "32"}, TypeError, "block_size must be an int"),
    ({"weight": "int8", "rounding": "stochastic"}, ValueError, "unknown rounding"),
    ({"weight": "int8", "bfloat": 8}, ValueError, "bfloat=8"),
    ({"weight": "int8", "quantize_backprop": 1}, TypeError, "quantize_backprop"),
    ({"weight": "int8", "backend": "cuda"}, ValueError, "backend='cuda'"),
])
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MXConfig(**kwargs)


def test_public_api():
    assert mx.quantize_ is quantize_ and mx.restore_ is restore_ and mx.MXConfig is MXConfig
    assert mx.MXLinear is MXLinear and mx.matmul is matmul


def test_config_normalises_names():
    c = MXConfig(weight="FP4", activation="mxfp8_e4m3")
    assert (c.weight, c.activation, c.label) == ("fp4_e2m1", "fp8_e4m3", "w:fp4_e2m1/a:fp8_e4m3")


def test_meta_tensors_give_empty_results_of_the_shape():
    config = MXConfig(weight="fp8_e4m3", activation="fp4_e2m1")
    x = torch.empty(3, 5, 64, device="meta")
    w = torch.empty(7, 64, device="meta")
    y = linear(x, w, torch.empty(7, device="meta"), config)
    assert y.is_meta and y.shape == (3, 5, 7)
    y = matmul(x, w.t(), config)
    assert y.is_meta and y.shape == (3, 5, 7)
    y = MXLinear(64, 7, config=config, device="meta")(x)
    assert y.is_meta and y.shape == (3, 5, 7)


def test_a_second_quantize_keeps_swapped_modules_and_swaps_the_rest():
    """Documented meaning of quantizing twice: mixed formats, one call per group of layers."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    quantize_(model, MXConfig(weight="fp8_e4m3"), filter_fn=lambda module, fqn: fqn == "0")
    assert type(model[2]) is torch.nn.Linear
    quantize_(model, MXConfig(weight="fp4_e2m1"))
    assert model[0].config.weight == "fp8_e4m3" and model[2].config.weight == "fp4_e2m1"
    restore_(model)
    quantize_(model, MXConfig(weight="int8"))
    assert model[0].config.weight == "int8" and model[2].config.weight == "int8"


@pytest.mark.parametrize("block_size", [1, 7, 30, 33])
def test_any_block_size_is_microxcaling_s_meaning(block_size):
    """Block sizes other than the OCP 32 are accepted on purpose (as microxcaling): the
    last block of an axis is shorter; the fast path equals the reference."""
    x = torch.randn(5, 70)
    config = MXConfig(weight="fp8_e4m3", block_size=block_size)
    assert config.block_size == block_size
    assert torch.equal(mx.quantize(x, "fp8_e4m3", block_size=block_size),
                       mx.quantize_reference(x, "fp8_e4m3", block_size=block_size))
    # each block has its own scale: the block holding only large values loses nothing to the others
    y = torch.zeros(1, block_size * 2)
    y[0, :block_size] = 1e-3
    y[0, block_size:] = 1e3
    q = mx.quantize(y, "fp8_e4m3", block_size=block_size)
    assert torch.allclose(q[0, :block_size], y[0, :block_size], rtol=0.07)


def test_format_aliases():
    for alias, name in (("fp4", "fp4_e2m1"), ("mxfp4", "fp4_e2m1"), ("MXFP8_E4M3", "fp8_e4m3"), ("mxint8", "int8")):
        assert MXConfig(weight=alias).weight == name


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_transformer_encoder_runs_its_mx_layers(packed, nested):
    """torch.nn.TransformerEncoderLayer's eval-mode fast path read linear1's / linear2's
    fp32 weights itself: an MX-quantized encoder ran in fp32 (its output equal to the
    original's). Now its MX layers run (as on torch's slow path, which calls them), on the
    nested tensor TransformerEncoder makes of a padded batch too; restore_ gives the fast
    path back."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(36, 4, 64, batch_first=True, dropout=0.0)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    x = torch.randn(3, 7, 36)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    valid = ~mask[..., None]
    with torch.no_grad():
        fp32 = enc(x, src_key_padding_mask=mask)
    quantize_(enc, MXConfig(weight="fp4_e2m1", packed=packed), keep_original=True,
              filter_fn=lambda m, fqn: not fqn.endswith("out_proj"))
    with torch.no_grad():
        y = enc(x, src_key_padding_mask=mask)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = enc(x, src_key_padding_mask=mask)  # every module called
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert torch.allclose(y * valid, slow * valid, rtol=0, atol=1e-5)
    assert ((y - fp32) * valid).abs().max() > 1e-2  # fp4 weights, not the fp32 ones
    restore_(enc)
    assert all(len(m._forward_pre_hooks) == 0 for m in enc.layers)
    with torch.no_grad():
        assert torch.allclose(enc(x, src_key_padding_mask=mask) * valid, fp32 * valid, rtol=0, atol=1e-6)
