"""MX layers: Linear, Conv2d and matmul with MX-quantized forward and backward.

The arithmetic is microxcaling's (mx/linear.py, mx/convolution.py,
mx/matmul.py), bit for bit on CPU: bfloatN rounding of the operands, MX
quantization of both operands along the reduction dimension, the product in
fp32, bfloatN rounding of the result. In the backward pass (quantize_backprop)
every product is MX-quantized along its own reduction dimension:

    grad_w = mx(grad_out, axis=-2)^T @ mx(x, axis=-2)     (reduction over tokens)
    grad_x = mx(grad_out, axis=-1)   @ mx(w, axis=0)      (reduction over out_features)

For a 3-D input [batch, seq, in], "axis -2" is the sequence axis, as in
microxcaling (the blocks do not span batch entries).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .config import MXConfig
from .quantize import quantize, quantize_bfloat

__all__ = ["MXLinear", "MXConv2d", "linear", "matmul", "conv2d"]


def _bf(t: Optional[torch.Tensor], config: MXConfig) -> Optional[torch.Tensor]:
    if t is None or config.bfloat == 0:
        return t
    return quantize_bfloat(t, config.bfloat, config.rounding)


def _mx(t: torch.Tensor, fmt: Optional[str], axis: int, config: MXConfig) -> torch.Tensor:
    if fmt is None:
        return t
    return quantize(t, fmt, config.block_size, axis, config.rounding, config.backend)


def _check_config(config) -> MXConfig:
    if not isinstance(config, MXConfig):
        raise TypeError(f"config must be an ftattn.mx.MXConfig, got {type(config).__name__}")
    return config


def _share(cls, module: torch.nn.Module, config: MXConfig):
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)  # the same Parameter objects, in a dict of its own
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new.config = _check_config(config)
    return new


# ---------------------------------------------------------------------------
# Linear


class _MXLinearFunction(torch.autograd.Function):
    """``product`` (None: torch's own products, microxcaling's arithmetic bit for bit): a
    function ``(a, b) -> a @ b^T`` for a [..., k] and b [n, k] that makes the layer's
    three products, the forward's and the backward's two (protect_ passes the checked
    linear layer's, so an MX layer trains with every product checked)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config: MXConfig, product=None):
        bf_x = _bf(x, config)
        bf_w = _bf(weight, config)
        bf_b = _bf(bias, config)
        if config.quantize_backprop:
            ctx.save_for_backward(bf_x, bf_w)
        else:
            ctx.save_for_backward(x, weight)
        qx = _mx(bf_x, config.activation, -1, config)
        qw = _mx(bf_w, config.weight, -1, config)
        out = _bf(F.linear(qx, qw) if product is None else product(qx, qw), config)
        if bf_b is not None:
            out = _bf(out + bf_b, config)
        ctx.config = config
        ctx.product = product
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        config: MXConfig = ctx.config
        out_features, in_features = weight.shape
        product = ctx.product

        def matmul(a, b):  # a @ b, by `product` when given (a @ (b^T)^T)
            return torch.matmul(a, b) if product is None else product(a, b.transpose(0, 1))

        if not config.quantize_backprop:
            go2 = grad_out.reshape(-1, out_features)
            grad_w = matmul(go2.t(), x.reshape(-1, in_features)) if ctx.needs_input_grad[1] else None
            grad_x = matmul(grad_out, weight) if ctx.needs_input_grad[0] else None
            grad_b = go2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return grad_x, grad_w, grad_b, None, None
        grad_out = _bf(grad_out, config)
        grad_w = grad_x = grad_b = None
        if ctx.needs_input_grad[1]:
            qex_x = _mx(x, config.activation, -2, config)
            qex_go = _mx(grad_out, config.activation, -2, config)
            grad_w = matmul(qex_go.reshape(-1, out_features).transpose(0, 1), qex_x.reshape(-1, in_features))
            grad_w = _bf(grad_w, config)
        if ctx.needs_input_grad[0]:
            qos_w = _mx(weight, config.weight, 0, config)
            qos_go = _mx(grad_out, config.activation, -1, config)
            grad_x = _bf(matmul(qos_go, qos_w), config)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _bf(grad_out.reshape(-1, out_features).sum(0), config)
        return grad_x, grad_w, grad_b, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config: MXConfig) -> torch.Tensor:
    """MX ``F.linear``: x [..., in] (at least 2-D), weight [out, in], bias [out] or None -> [..., out]."""
    _check_config(config)
    if x.dim() < 2:
        raise ValueError(f"ftattn.mx.linear: x must be at least 2-D [..., in_features], got shape {tuple(x.shape)} "
                         "(use x.unsqueeze(0))")
    return _MXLinearFunction.apply(x, weight, bias, config)


class MXLinear(torch.nn.Linear):
    """``torch.nn.Linear`` whose forward and backward run MX-quantized (see module docstring).

    Holds the same ``weight`` / ``bias`` Parameters as the Linear it replaces
    (``from_linear`` shares them), so swapping back restores the model exactly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: Optional[MXConfig] = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if config is None:
            raise ValueError("MXLinear needs config=MXConfig(...)")
        self.config = _check_config(config)

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, config: MXConfig) -> "MXLinear":
        """An MXLinear sharing ``module``'s Parameters, buffers and hooks (no copy)."""
        return _share(cls, module, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:  # (torch.nn.TransformerEncoder's padded batch in eval mode)
            from .._nested import on_rows

            return on_rows(x, self.forward, "MXLinear")
        if x.dim() == 1:
            return linear(x.unsqueeze(0), self.weight, self.bias, self.config).squeeze(0)
        return linear(x, self.weight, self.bias, self.config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config.label}, block_size={self.config.block_size}"


# ---------------------------------------------------------------------------
# matmul (activation x activation, e.g. attention scores)


class _MXMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, config: MXConfig, mode: str):
        fmt_a = config.activation if mode[0] == "a" else config.weight
        fmt_b = config.activation if mode[1] == "a" else config.weight
        bf_a, bf_b = _bf(a, config), _bf(b, config)
        ctx.save_for_backward(*((bf_a, bf_b) if config.quantize_backprop else (a, b)))
        out = torch.matmul(_mx(bf_a, fmt_a, -1, config), _mx(bf_b, fmt_b, -2, config))
        ctx.config, ctx.mode = config, mode
        return _bf(out, config)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        config: MXConfig = ctx.config
        if not config.quantize_backprop:
            return grad_out.matmul(b.transpose(-1, -2)), a.transpose(-1, -2).matmul(grad_out), None, None
        fmt_a = config.activation if ctx.mode[0] == "a" else config.weight
        fmt_b = config.activation if ctx.mode[1] == "a" else config.weight
        grad_out = _bf(grad_out, config)
        qa = _mx(a, fmt_a, -2, config)
        qb = _mx(b, fmt_b, -1, config)
        g1 = _mx(grad_out, config.activation, -1, config)
        g2 = _mx(grad_out, config.activation, -2, config)
        grad_a = _bf(torch.matmul(g1, qb.transpose(-1, -2)), config)
        grad_b = _bf(torch.matmul(qa.transpose(-1, -2), g2), config)
        return grad_a, grad_b, None, None


def matmul(a: torch.Tensor, b: torch.Tensor, config: MXConfig, mode: str = "aa") -> torch.Tensor:
    """MX ``torch.matmul``: a [..., m, k] quantized along k (axis -1), b [..., k, n] along k (axis -2).

    mode: which format each operand takes, "aa" (both config.activation), "aw" or "wa".
    """
    _check_config(config)
    if mode not in ("aa", "aw", "wa"):
        raise ValueError(f"mode={mode!r} is not supported; use 'aa', 'aw' or 'wa'")
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"ftattn.mx.matmul needs operands of at least 2 dims, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return _MXMatmulFunction.apply(a, b, config, mode)


# ---------------------------------------------------------------------------
# Conv2d


class _MXConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, config: MXConfig):
        bf_x, bf_w, bf_b = _bf(x, config), _bf(weight, config), _bf(bias, config)
        ctx.save_for_backward(*((bf_x, bf_w) if config.quantize_backprop else (x, weight)))
        # blocks along in_channels, the reduction dimension
        qx = _mx(bf_x, config.activation, 1, config)
        qw = _mx(bf_w, config.weight, 1, config)
        out = _bf(F.conv2d(qx, qw, bf_b, stride, padding, dilation, groups), config)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.config, ctx.has_bias = config, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        config: MXConfig = ctx.config
        stride, padding, dilation, groups = ctx.conv
        quant = config.quantize_backprop
        if quant:
            grad_out = _bf(grad_out, config)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            qx = _mx(x, config.activation, 0, config) if quant else x  # reduction over the batch
            qgo = _mx(grad_out, config.activation, 0, config) if quant else grad_out
            grad_w = torch.nn.grad.conv2d_weight(qx, weight.shape, qgo, stride, padding, dilation, groups)
            grad_w = _bf(grad_w, config) if quant else grad_w
        if ctx.needs_input_grad[0]:
            qw = _mx(weight, config.weight, 0, config) if quant else weight  # reduction over out_channels
            qgo = _mx(grad_out, config.activation, 1, config) if quant else grad_out
            grad_x = torch.nn.grad.conv2d_input(x.shape, qw, qgo, stride, padding, dilation, groups)
            grad_x = _bf(grad_x, config) if quant else grad_x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
            grad_b = _bf(grad_b, config) if quant else grad_b
        return grad_x, grad_w, grad_b, None, None, None, None, None


def conv2d(x, weight, bias, config: MXConfig, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """MX ``F.conv2d`` (x [N, C, H, W]); blocks along the channels."""
    _check_config(config)
    if isinstance(padding, str):
        raise NotImplementedError(f"padding={padding!r}: MX conv2d takes numeric padding; convert "
                                  "'same'/'valid' to the explicit amounts")
    return _MXConv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, config)


class MXConv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` with MX-quantized forward and backward (microxcaling's Conv2d)."""

    @classmethod
    def from_conv2d(cls, module: torch.nn.Conv2d, config: MXConfig) -> "MXConv2d":
        if module.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={module.padding_mode!r}: MXConv2d supports 'zeros' only; "
                                      "exclude this module with filter_fn")
        if isinstance(module.padding, str):
            raise NotImplementedError(f"padding={module.padding!r}: MXConv2d takes numeric padding; exclude "
                                      "this module with filter_fn")
        return _share(cls, module, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.config, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config.label}"
