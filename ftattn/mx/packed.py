"""Packed MX linear layers, for deployment: the weights stay in MX storage.

``quantize_(model, MXConfig(weight="fp4_e2m1", packed=True))`` swaps each Linear for an
``MXPackedLinear`` that holds the weight as ``ftattn.mx.pack`` stores it (element codes,
bit-packed, plus one E8M0 scale per block: MXFP4 4.25 bits per value, MXFP8 8.25) and no
fp32 copy, and multiplies with a fused dequantize-and-multiply kernel:

* CPU: csrc/mx_linear_cpu.cpp (decode path for a few rows, dequantized panels and the
  library GEMM for more),
* CUDA (or the Triton interpreter with ``backend="triton"``): kernels/mx.py's
  ``_mx_linear_packed``,
* ``backend="torch"``: ``linear_reference``, the codes decoded by table and F.linear.

The forward is the fake-quant MXLinear's (ftattn/mx/linear.py) with the weight's
quantize-dequantize replaced by its stored codes: the dequantized weight is the same bit
for bit (``unpack(module.weight)``), so the outputs differ by the GEMM's rounding order
only. Inference only: a backward through a packed module raises.

state_dict: ``<name>.weight_codes`` (uint8 [out, bytes per row]), ``<name>.weight_scales``
(uint8 [out, blocks per row]) and ``<name>.weight_mx_meta`` (int32: the format, the
config, the shape), so a checkpoint says what it holds and loads back without
re-quantizing (``load_pretrained`` for Hugging Face models).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from .config import MXConfig
from .formats import FORMATS, ROUNDING_CODE, decode_table, get_format
from .linear import _bf, _mx
from .quantize import MXTensor, _triton_reason, decode_blocks, pack  # one Triton module (ftattn/_launch/mx.py)

__all__ = ["MXPackedLinear", "linear_packed", "linear_reference", "packable", "config_from_meta", "META_VERSION"]

# how each format's codes decode in the kernels: 0 through the value table, 1 fp8_e4m3 and
# 2 fp8_e5m2 by bit moves (e4m3 in blocks of 32: into fp32 bit patterns; else through the fp16
# converter), 3 int8 as an integer (csrc/mx_linear_cpu.cpp, Kind)
_KIND = {"fp8_e4m3": 1, "fp8_e5m2": 2, "int8": 3}
_FORMAT_IDS = list(FORMATS)  # index in the meta buffer (append new formats only)
_ROUNDINGS = [r.value for r in sorted(ROUNDING_CODE, key=ROUNDING_CODE.get)]  # index: the kernels' rounding code
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
META_VERSION = 1
# weight_mx_meta: [version, weight format, activation format (-1: none), block_size, rounding,
#                  bfloat, out_features, in_features, weight dtype, quantize_backprop]
_META_LEN = 10


def packable(config: MXConfig) -> Optional[str]:
    """None when ``config`` can be packed, else why not (a sentence with the fix)."""
    if config.weight is None:
        return ("packed=True stores the weights in MX: set weight= to a format (e.g. MXConfig(weight='fp4_e2m1', "
                "packed=True)); activation-only MX has nothing to pack")
    bits = get_format(config.weight).bits
    if (config.block_size * bits) % 8:
        step = 8 // math.gcd(bits, 8)
        return (f"packed {config.weight} ({bits}-bit codes) needs block_size * {bits} to be a multiple of 8 so every "
                f"block starts on a byte; block_size={config.block_size} is not: use a multiple of {step} (the OCP "
                "block size is 32)")
    return None


def _rows_bytes(in_features: int, config: MXConfig) -> Tuple[int, int]:
    nblk = -(-in_features // config.block_size)
    return nblk, nblk * config.block_size * get_format(config.weight).bits // 8


# ---------------------------------------------------------------------------
# the op's backends


def _cpp_reason(device: torch.device) -> Optional[str]:
    return backends.extension_reason(device, "mx_linear")


backends.register("mx_linear", "cpp", _cpp_reason)
backends.register("mx_linear", "triton", _triton_reason)
backends.register("mx_linear", "torch", lambda device: None, fallback=True)


def linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int,
                     kind: int, block_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.ops.ftattn.mx_linear in plain torch ops (any device): decode, then F.linear in x's dtype."""
    w = decode_blocks(codes, scales, table.to(codes.device), bits, block_size)[:, :x.shape[-1]]
    w = w.to(x.dtype if x.dtype == torch.bfloat16 else torch.float32)
    y = F.linear(x.to(w.dtype), w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def _register() -> None:
    if _cpp_reason(torch.device("cpu")) is not None:  # the schema lives in the C++ extension
        return

    @torch.library.register_fake("ftattn::mx_linear")
    def _mx_linear_fake(x, codes, scales, table, bits, kind, block_size, bias=None):
        return x.new_empty(tuple(x.shape[:-1]) + (codes.shape[0],))

    @torch.library.register_fake("ftattn::mx_pack")
    def _mx_pack_fake(x, log2_thresholds, ebits, mbits, emax, max_norm, block_size, rounding, bits):
        rows, K = x.shape
        nblk = -(-K // block_size)
        return (x.new_empty((rows * nblk * block_size * bits // 8,), dtype=torch.uint8),
                x.new_empty((rows, nblk), dtype=torch.uint8))

    @torch.library.impl("ftattn::mx_linear", "CUDA")
    def _mx_linear_cuda(x, codes, scales, table, bits, kind, block_size, bias=None):
        if _triton_reason(x.device) is None:
            from .._launch.mx import mx_linear as triton_mx_linear

            return triton_mx_linear(x, codes, scales, table, bits, block_size, bias)
        return linear_reference(x, codes, scales, table, bits, kind, block_size, bias)


_register()


def linear_packed(x: torch.Tensor, weight: MXTensor, bias: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> torch.Tensor:
    """y = x unpack(weight)^T (+ bias) from the packed storage, never materialising the weight.

    x: [..., in_features] float32 / bfloat16 / float16; weight: an MXTensor of
    ``pack(W, fmt, block_size, axis=-1)`` for W [out_features, in_features] whose
    block_size * bits is a multiple of 8 (e.g. block 32); bias: [out_features] or None.
    Returns [..., out_features] in x's dtype.
    """
    if not isinstance(weight, MXTensor):
        raise TypeError(f"linear_packed: weight must be an ftattn.mx.MXTensor (ftattn.mx.pack(W, fmt)), got "
                        f"{type(weight).__name__}")
    if len(weight.shape) != 2 or weight.axis != 1:
        raise ValueError(f"linear_packed: weight must be a 2-D [out, in] tensor packed along in (axis=-1), got shape "
                         f"{weight.shape} packed along axis {weight.axis}; pack it with ftattn.mx.pack(W, fmt, axis=-1)")
    f = get_format(weight.fmt)
    if (weight.block_size * f.bits) % 8:
        raise ValueError(f"linear_packed: block_size={weight.block_size} with {f.bits}-bit {f.name} codes does not "
                         "start each block on a byte; pack with a block size that is a multiple of "
                         f"{8 // math.gcd(f.bits, 8)} (the OCP block size is 32)")
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise TypeError(f"linear_packed: x must be a float32, bfloat16 or float16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"linear_packed: x has shape {tuple(x.shape)}; its last dimension must be in_features="
                         f"{in_features}")
    if x.device != weight.data_lp.device:
        raise ValueError(f"linear_packed: x is on {x.device}, the packed weight on {weight.data_lp.device}; "
                         "move one of them (module.to(device))")
    nblk = weight.scale_e8m0.shape[-1]
    codes = weight.data_lp.view(out_features, -1)
    scales = weight.scale_e8m0.view(out_features, nblk)
    table = decode_table(f).to(x.device)
    kind = _KIND.get(f.name, 0)
    be = backends.resolve("mx_linear", backend, x.device)
    if be is backends.Backend.TORCH:
        return linear_reference(x, codes, scales, table, f.bits, kind, weight.block_size, bias)
    if be is backends.Backend.TRITON and x.device.type != "cuda":
        from .._launch.mx import mx_linear as triton_mx_linear  # the Triton interpreter

        return triton_mx_linear(x, codes, scales, table, f.bits, weight.block_size, bias)
    return torch.ops.ftattn.mx_linear(x, codes, scales, table, f.bits, kind, weight.block_size, bias)


# ---------------------------------------------------------------------------
# the module


class _RefuseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, *inputs):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "ftattn.mx: backward through an MXPackedLinear: packed MX weights are for inference (the fp32 weights "
            "were freed). Train with the fake-quant MX layers (quantize_(model, MXConfig(..., packed=False))) and "
            "pack afterwards, or run the packed model under torch.no_grad() / torch.inference_mode()")


def _meta(config: MXConfig, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([META_VERSION, _FORMAT_IDS.index(config.weight),
                         -1 if config.activation is None else _FORMAT_IDS.index(config.activation),
                         config.block_size, _ROUNDINGS.index(config.rounding), config.bfloat, out_features,
                         in_features, _DTYPES.index(dtype), int(config.quantize_backprop)], dtype=torch.int32)


def config_from_meta(meta: torch.Tensor) -> Tuple[MXConfig, int, int, torch.dtype]:
    """(config, out_features, in_features, weight dtype) stored in a weight_mx_meta buffer."""
    m = [int(v) for v in meta.reshape(-1).tolist()]
    if len(m) != _META_LEN or m[0] != META_VERSION:
        raise ValueError(f"weight_mx_meta {m} is not a version-{META_VERSION} ftattn packed MX record of {_META_LEN} "
                         "ints; was the checkpoint written by another ftattn version?")
    config = MXConfig(weight=_FORMAT_IDS[m[1]], activation=None if m[2] < 0 else _FORMAT_IDS[m[2]],
                      block_size=m[3], rounding=_ROUNDINGS[m[4]], bfloat=m[5], quantize_backprop=bool(m[9]),
                      packed=True)
    return config, m[6], m[7], _DTYPES[m[8]]


class MXPackedLinear(torch.nn.Module):
    """A Linear whose weight is stored packed (MX codes + E8M0 scales); inference only.

    ``weight`` is an ``ftattn.mx.MXTensor`` view of the buffers ``weight_codes`` and
    ``weight_scales``; ``unpack(module.weight)`` is the dequantized weight, bit for bit
    the fake-quant MXLinear's. ``bias`` stays a Parameter in its dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: Optional[MXConfig] = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(config, MXConfig) or not config.packed:
            raise ValueError("MXPackedLinear needs config=MXConfig(weight=..., packed=True)")
        reason = packable(config)
        if reason is not None:
            raise ValueError(reason)
        if dtype not in _DTYPES:
            raise TypeError(f"MXPackedLinear: dtype={dtype} is not supported; use float32, bfloat16 or float16")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        nblk, row_bytes = _rows_bytes(in_features, config)
        self.register_buffer("weight_codes", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, nblk, dtype=torch.uint8, device=device))
        self.register_buffer("weight_mx_meta", _meta(config, out_features, in_features, dtype).to(device))
        self._weight_dtype = dtype
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, config: MXConfig) -> "MXPackedLinear":
        """Pack ``module``'s weight (bfloatN-rounded first, as MXLinear does); the bias Parameter is shared."""
        w = module.weight.detach()
        # the buffers' shapes and checks from __init__, without allocating them; then the packed weight
        new = cls(module.in_features, module.out_features, bias=False, config=config, device="meta", dtype=w.dtype)
        if w.device.type != "meta":
            p = pack(_bf(w, config), config.weight, config.block_size, -1, config.rounding, config.backend)
            new.weight_codes = p.data_lp.view(module.out_features, -1)
            new.weight_scales = p.scale_e8m0.view(module.out_features, -1)
            new.weight_mx_meta = _meta(config, module.out_features, module.in_features, w.dtype).to(w.device)
        new.bias = module.bias  # the same Parameter (or None)
        new.training = module.training
        return new

    @property
    def weight(self) -> MXTensor:
        return MXTensor(data_lp=self.weight_codes.view(-1), scale_e8m0=self.weight_scales, fmt=self.config.weight,
                        block_size=self.config.block_size, axis=1, shape=(self.out_features, self.in_features),
                        dtype=self._weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:  # (torch.nn.TransformerEncoder's padded batch in eval mode)
            from .._nested import on_rows

            return on_rows(x, self.forward, "MXPackedLinear")
        grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        with torch.no_grad():
            y = self._forward(x.unsqueeze(0) if x.dim() == 1 else x)
        if grad:  # a forward that works, a backward that says why it cannot
            y = _RefuseBackward.apply(y, x, *(() if self.bias is None else (self.bias,)))
        return y.squeeze(0) if x.dim() == 1 else y

    def _op_args(self, device: torch.device):
        """(codes, scales, table, bits, kind, block_size) for the C++ op, made once per buffers and device
        (the per-call cost of a small layer is mostly Python)."""
        codes, scales = self._buffers["weight_codes"], self._buffers["weight_scales"]
        cached = self.__dict__.get("_ftattn_op_args")
        # (both buffers: the scales alone reassigned kept the old ones, found by review)
        if cached is None or cached[0] is not codes or cached[1] != device or cached[2][1] is not scales:
            f = get_format(self.config.weight)
            cpp = backends.resolve("mx_linear", self.config.backend, device) is backends.Backend.CPP
            args = (codes, scales, decode_table(f).to(device), f.bits, _KIND.get(f.name, 0),
                    self.config.block_size) if cpp and codes.device == device else None
            cached = (codes, device, (args, scales))
            self.__dict__["_ftattn_op_args"] = cached
        return cached[2][0]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """MXLinear's forward (ftattn/mx/linear.py) with the weight read from its codes."""
        cfg = self.config
        qx = _mx(_bf(x, cfg), cfg.activation, -1, cfg)
        fused_bias = self.bias if cfg.bfloat == 0 else None
        args = self._op_args(x.device) if qx.dtype in _DTYPES and qx.shape[-1] == self.in_features else None
        if args is not None:  # the common case, checked once: straight to the C++ kernel
            y = torch.ops.ftattn.mx_linear(qx, *args, fused_bias)
        else:  # validation with clear errors, other backends
            y = linear_packed(qx, self.weight, fused_bias, backend=cfg.backend)
        y = _bf(y, cfg)
        if self.bias is not None and fused_bias is None:
            y = _bf(y + _bf(self.bias, cfg).to(y.dtype), cfg)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        meta_key = prefix + "weight_mx_meta"
        if prefix + "weight" in state_dict and meta_key not in state_dict:
            raise RuntimeError(
                f"{prefix or 'module.'}: the state_dict holds an unpacked '{prefix}weight' but this module is a packed "
                f"MX {self.config.weight} layer; load the checkpoint into the original model first, then "
                "ftattn.mx.quantize_(model, MXConfig(..., packed=True))")
        if meta_key in state_dict:
            theirs = state_dict[meta_key]
            if not torch.equal(theirs.to(self.weight_mx_meta.device, torch.int32), self.weight_mx_meta):
                try:
                    cfg, out_f, in_f, dt = config_from_meta(theirs)
                    what = f"{cfg.weight} block {cfg.block_size}, [{out_f}, {in_f}] {dt}"
                except ValueError as exc:
                    what = str(exc)
                raise RuntimeError(
                    f"{prefix or 'module.'}: the state_dict holds packed MX weights of {what}; this module is "
                    f"{self.config.weight} block {self.config.block_size}, [{self.out_features}, "
                    f"{self.in_features}] {self._weight_dtype}. Quantize the model with the checkpoint's config "
                    "(ftattn.mx.load_pretrained reads it from the checkpoint)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        bits = 8.0 * (self.weight_codes.numel() + self.weight_scales.numel()) / max(
            1, self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"config={self.config.label}, block_size={self.config.block_size}, packed ({bits:.2f} bits/weight)")



# ---------------------------------------------------------------------------
# Hugging Face checkpoints


def _read_state_dict(path: str) -> dict:
    import json
    import os

    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(path, name)))
        return state
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    raise FileNotFoundError(f"load_pretrained: no model.safetensors (or its index) in {path!r}; save the packed model "
                            "with model.save_pretrained(path) (safetensors, the default)")


def load_pretrained(path: str, model_cls=None, **kwargs) -> torch.nn.Module:
    """A Hugging Face model saved with ``save_pretrained`` after a packed ``quantize_``, loaded
    back packed: no fp32 weights are read and nothing is re-quantized.

    path: the directory ``model.save_pretrained(path)`` wrote; model_cls: the transformers class
    (default: the checkpoint's ``config.architectures[0]``); kwargs go to ``from_config``.
    Each module that was packed is rebuilt from its ``weight_mx_meta`` record (format,
    config, shape), so mixed formats load as they were saved. The model is returned in
    eval mode. While it is built, its other weights are allocated uninitialised before the
    checkpoint's replace them.
    """
    import transformers
    from transformers.initialization import no_init_weights

    from .workflow import _ORIGINAL

    config = transformers.AutoConfig.from_pretrained(path)
    if model_cls is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"load_pretrained: {path!r}'s config names no known architecture ({archs}); pass "
                             "model_cls=, e.g. transformers.AutoModelForCausalLM")
        model_cls = getattr(transformers, archs[0])
    state = _read_state_dict(path)
    metas = {k[: -len(".weight_mx_meta")]: v for k, v in state.items() if k.endswith(".weight_mx_meta")}
    if not metas:
        raise ValueError(f"load_pretrained: {path!r} holds no packed MX layers (no '*.weight_mx_meta' entries); load "
                         "it with transformers' from_pretrained")
    with no_init_weights():
        model = (model_cls.from_config(config, **kwargs) if hasattr(model_cls, "from_config")
                 else model_cls._from_config(config, **kwargs))
    for fqn, meta in metas.items():
        cfg, out_f, in_f, dtype = config_from_meta(meta)
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, name, None)
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (out_f, in_f):
            raise ValueError(f"load_pretrained: the checkpoint packs {fqn} as [{out_f}, {in_f}], but the model built "
                             f"from its config has {type(old).__name__} there; is model_cls the class that was saved?")
        new = MXPackedLinear(in_f, out_f, bias=old.bias is not None, config=cfg, dtype=dtype)
        new.__dict__[_ORIGINAL] = None  # packed: no fp32 weights to restore
        setattr(parent, name, new)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"load_pretrained: the checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    return model.eval()


__all__ += ["load_pretrained"]
