"""MXConfig: what MX quantization a layer applies (microxcaling's mx_specs, as a validated dataclass)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .formats import FORMATS, get_format, get_rounding
from .. import backends
from .quantize import Backend  # noqa: F401  (re-exported as ftattn.mx.Backend)

__all__ = ["MXConfig"]


@dataclass(frozen=True)
class MXConfig:
    """MX quantization of a Linear / Conv2d / matmul, forward and backward.

    weight, activation: element format of the weights and of the activations
        (and of the gradients), one of ftattn.mx.FORMATS (case-insensitive; the OCP
        names "mxfp8_e4m3", "mxfp4", "mxint8", ... and "fp4" are aliases), or None to
        leave that operand unquantized; at least one must be set.
    block_size: values per shared E8M0 scale. The OCP MX formats fix 32; any size >= 1
        is accepted, as in microxcaling (the last block of an axis may be shorter), for
        studies of the block size.
    rounding: "nearest" (half away from zero, microxcaling's default), "even" or "floor".
    bfloat: element-wise bfloatN rounding of inputs, weights, outputs and
        gradients around the MX products (microxcaling's ``bfloat``; 16 is
        bfloat16, 0 turns it off).
    quantize_backprop: quantize the backward pass too (gradients of inputs and
        weights), as microxcaling does by default.
    backend: which quantizer implementation runs (see ftattn.mx.Backend).
    packed: for deployment: ``quantize_`` stores each Linear's weight packed (MX codes +
        E8M0 scales, e.g. 4.25 bits per value for fp4_e2m1) instead of keeping it in fp32,
        and runs a fused dequantize-and-multiply kernel (ftattn/mx/packed.py). Needs a
        weight format and block_size * bits a multiple of 8; inference only.
    """

    weight: Optional[str] = None
    activation: Optional[str] = None
    block_size: int = 32
    rounding: str = "nearest"
    bfloat: int = 16
    quantize_backprop: bool = True
    backend: str = "auto"
    packed: bool = False

    def __post_init__(self):
        if self.weight is None and self.activation is None:
            raise ValueError("MXConfig names no format: set weight= and/or activation= to one of "
                             f"{', '.join(FORMATS)} (e.g. MXConfig(weight='fp8_e4m3', activation='fp8_e4m3'))")
        for field in ("weight", "activation"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, get_format(value).name)  # raises on unknown names
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"MXConfig.block_size must be an int, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"MXConfig.block_size={self.block_size} must be >= 1 (the OCP MX block size is 32)")
        object.__setattr__(self, "rounding", get_rounding(self.rounding).value)
        if isinstance(self.bfloat, bool) or not isinstance(self.bfloat, int) or not (
                self.bfloat == 0 or 10 <= self.bfloat <= 32):
            raise ValueError(f"MXConfig.bfloat={self.bfloat!r} is not supported; use 0 (off) or 10..32 "
                             "(16: bfloat16, microxcaling's default)")
        if not isinstance(self.quantize_backprop, bool):
            raise TypeError(f"MXConfig.quantize_backprop must be a bool, got {self.quantize_backprop!r}")
        try:
            object.__setattr__(self, "backend", backends.parse("mx_quantize", self.backend).value)
        except ValueError:
            raise ValueError(f"MXConfig.backend={self.backend!r} is not supported; use one of "
                             f"{', '.join(map(repr, backends.names('mx_quantize')))}") from None

        if not isinstance(self.packed, bool):
            raise TypeError(f"MXConfig.packed must be a bool, got {self.packed!r}")
        if self.packed:
            from .packed import packable

            reason = packable(self)
            if reason is not None:
                raise ValueError(f"MXConfig: {reason}")

    @property
    def label(self) -> str:
        """Short name, e.g. 'fp8_e4m3' or 'w:fp4_e2m1/a:fp8_e4m3'."""
        if self.weight == self.activation:
            return self.weight
        return f"w:{self.weight or 'fp32'}/a:{self.activation or 'fp32'}"
