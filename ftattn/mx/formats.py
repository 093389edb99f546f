"""MX element formats, rounding modes and the E8M0 shared scale.

The parameters follow Microsoft's microxcaling (``mx/formats.py``) so that the
quantizers in this package reproduce it bit for bit:

* ``mbits`` counts the sign and the implicit bit, as microxcaling does: a float
  format keeps ``mbits - 2`` explicit mantissa bits; an integer format stores
  ``k * 2**-(mbits - 2)`` for ``|k| <= 2**(mbits - 1) - 1``.
* ``emax`` is the exponent of the largest normal element; the shared exponent of
  a block is ``floor(log2(amax)) - emax``.
* ``max_norm`` is the saturation bound of the element (fp8_e4m3 uses 448, the OCP
  value, not the IEEE-like formula).
* ``min_exp`` is the smallest element exponent (below it the grid is subnormal).

Storage codes (``pack``/``unpack``): the float formats use the OCP bit layouts
of torch's ``float8_e4m3fn`` / ``float8_e5m2`` and ml_dtypes' ``float6_e3m2fn``,
``float6_e2m3fn`` and ``float4_e2m1fn``; the integer formats are two's
complement, whose otherwise unused most negative code (-2**(bits-1)) stands for
-0.0 so that the signed zeros the quantizer produces round-trip exactly.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

__all__ = [
    "ElementFormat",
    "FORMATS",
    "Rounding",
    "get_format",
    "get_rounding",
    "E8M0_BIAS",
    "E8M0_NAN",
    "SCALE_EMAX",
    "scale_exp_to_e8m0",
    "e8m0_to_scale_exp",
    "decode_table",
]

# E8M0: an unsigned biased exponent, 0xFF is NaN (OCP MX spec 1.0, section 5.4).
E8M0_BIAS = 127
E8M0_NAN = 0xFF
# microxcaling clamps the shared exponent to [-127, 127] (scale_bits = 8).
SCALE_EMAX = 127


class Rounding(str, enum.Enum):
    """Rounding of the element mantissa (microxcaling's names)."""

    NEAREST = "nearest"  # half away from zero: microxcaling's default
    EVEN = "even"  # half to even: OCP hardware, torchao, ml_dtypes
    FLOOR = "floor"  # toward zero


# integer codes used by the C++ / Triton kernels
ROUNDING_CODE = {Rounding.NEAREST: 0, Rounding.FLOOR: 1, Rounding.EVEN: 2}


@dataclass(frozen=True)
class ElementFormat:
    name: str
    ebits: int  # exponent bits (0: integer format)
    mbits: int  # sign + implicit + explicit mantissa bits (microxcaling's convention)
    emax: int  # exponent of the largest normal element
    max_norm: float  # largest finite element magnitude (saturation bound)
    bits: int  # storage bits per element code
    storage: Optional[str] = None  # torch / ml_dtypes dtype name of the codes (floats)

    @property
    def is_int(self) -> bool:
        return self.ebits == 0

    @property
    def min_exp(self) -> int:
        """Smallest normal exponent of the element (ints: unused, 0)."""
        return 0 if self.ebits == 0 else 2 - 2 ** (self.ebits - 1)

    @property
    def int_scale_bits(self) -> int:
        """Integer formats: the element is ``code * 2**-int_scale_bits``."""
        return self.mbits - 2


def _float_format(name, ebits, mbits, emax, bits, storage, max_norm=None):
    if max_norm is None:
        max_norm = 2.0**emax * float(2 ** (mbits - 1) - 1) / 2 ** (mbits - 2)
    return ElementFormat(name, ebits, mbits, emax, max_norm, bits, storage)


def _int_format(name, mbits):
    max_norm = float(2 ** (mbits - 1) - 1) / 2 ** (mbits - 2)
    return ElementFormat(name, 0, mbits, 0, max_norm, mbits, None)


FORMATS: Dict[str, ElementFormat] = {
    f.name: f
    for f in (
        _float_format("fp8_e4m3", 4, 5, 8, 8, "float8_e4m3fn", max_norm=448.0),
        _float_format("fp8_e5m2", 5, 4, 15, 8, "float8_e5m2"),
        _float_format("fp6_e3m2", 3, 4, 4, 6, "float6_e3m2fn"),
        _float_format("fp6_e2m3", 2, 5, 2, 6, "float6_e2m3fn"),
        _float_format("fp4_e2m1", 2, 3, 2, 4, "float4_e2m1fn"),
        _int_format("int8", 8),
        _int_format("int4", 4),
        _int_format("int2", 2),
    )
}

# microxcaling's aliases
_ALIASES = {"fp4": "fp4_e2m1", "mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2",
            "mxfp6_e3m2": "fp6_e3m2", "mxfp6_e2m3": "fp6_e2m3", "mxfp4": "fp4_e2m1",
            "mxfp4_e2m1": "fp4_e2m1", "mxint8": "int8", "mxint4": "int4", "mxint2": "int2"}


def get_format(fmt: Union[str, ElementFormat]) -> ElementFormat:
    """The ElementFormat named ``fmt`` (one of FORMATS, case-insensitive)."""
    if isinstance(fmt, ElementFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"MX format must be a str or ElementFormat, got {type(fmt).__name__} ({fmt!r}); "
                        f"use one of {', '.join(FORMATS)}")
    key = fmt.lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown MX element format {fmt!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[key]


def get_rounding(rounding: Union[str, Rounding]) -> Rounding:
    try:
        return Rounding(rounding)
    except ValueError:
        raise ValueError(f"unknown rounding {rounding!r}; supported: "
                         f"{', '.join(r.value for r in Rounding)}") from None


# ---------------------------------------------------------------------------
# E8M0 shared scale


def scale_exp_to_e8m0(scale_exp: torch.Tensor) -> torch.Tensor:
    """Shared exponents (float, integral in [-127, 127] or NaN) -> E8M0 bytes (uint8)."""
    nan = torch.isnan(scale_exp)
    biased = torch.where(nan, torch.full_like(scale_exp, E8M0_NAN), scale_exp + E8M0_BIAS)
    return biased.to(torch.int16).to(torch.uint8)


def e8m0_to_scale_exp(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> shared exponents as float32 (0xFF -> NaN)."""
    e = scale_e8m0.to(torch.float32) - E8M0_BIAS
    return torch.where(scale_e8m0 == E8M0_NAN, torch.full_like(e, float("nan")), e)


# ---------------------------------------------------------------------------
# element codes


_DECODE_CACHE: Dict[str, torch.Tensor] = {}


def decode_table(fmt: Union[str, ElementFormat]) -> torch.Tensor:
    """float32 value of every element code of ``fmt`` (2**bits entries, CPU).

    Float formats come from torch's float8 dtypes or from ml_dtypes (fp6, fp4);
    NaN/Inf codes, which the quantizer never produces, decode as they do there.
    """
    f = get_format(fmt)
    if f.name in _DECODE_CACHE:
        return _DECODE_CACHE[f.name]
    codes = torch.arange(2**f.bits, dtype=torch.int32)
    if f.is_int:
        signed = torch.where(codes >= 2 ** (f.bits - 1), codes - 2**f.bits, codes).to(torch.float32)
        table = signed * 2.0 ** -f.int_scale_bits
        table[2 ** (f.bits - 1)] = -0.0  # the spare most negative code is -0.0
    elif f.storage.startswith("float8"):
        table = codes.to(torch.uint8).view(getattr(torch, f.storage)).to(torch.float32)
    else:
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - ml_dtypes is a dependency of ftattn[eval]
            raise ImportError(f"packing {f.name} needs ml_dtypes for its bit layout: pip install ml_dtypes") from exc
        import numpy as np

        np_codes = np.arange(2**f.bits, dtype=np.uint8)
        table = torch.from_numpy(np_codes.view(getattr(ml_dtypes, f.storage)).astype(np.float32))
    _DECODE_CACHE[f.name] = table
    return table
