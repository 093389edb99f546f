"""ftattn.mx: MX (microscaling) quantization, bit-exact with Microsoft's microxcaling.

* formats.py   element formats, rounding modes, the E8M0 shared scale
* quantize.py  ``quantize`` (fake quantization), ``pack`` / ``unpack`` (real storage),
               each fast path beside its ``*_reference``
* config.py    ``MXConfig``
* linear.py    ``MXLinear``, ``MXConv2d``, ``linear``, ``matmul`` (quantized forward and backward)
* packed.py    ``MXPackedLinear``, ``linear_packed``, ``load_pretrained`` (packed MX for deployment)
* workflow.py  ``quantize_(model, config, filter_fn)`` / ``restore_(model)``
* eval.py      ``python -m ftattn mx-eval``

Nothing here patches torch globally.
"""
from __future__ import annotations

from .formats import FORMATS, ElementFormat, Rounding, get_format  # noqa: F401
from .quantize import (  # noqa: F401
    Backend,
    MXTensor,
    backend_status,
    pack,
    quantize,
    quantize_bfloat,
    quantize_bfloat_reference,
    quantize_reference,
    quantize_with_scales,
    unpack,
)
from .config import MXConfig  # noqa: F401
from .linear import MXConv2d, MXLinear, conv2d, linear, matmul  # noqa: F401
from .packed import MXPackedLinear, linear_packed, load_pretrained  # noqa: F401
from .workflow import is_quantized, quantize_, restore_  # noqa: F401

__all__ = [
    "FORMATS",
    "ElementFormat",
    "Rounding",
    "get_format",
    "Backend",
    "MXTensor",
    "backend_status",
    "pack",
    "unpack",
    "quantize",
    "quantize_reference",
    "quantize_with_scales",
    "quantize_bfloat",
    "quantize_bfloat_reference",
    "MXConfig",
    "MXLinear",
    "MXConv2d",
    "linear",
    "matmul",
    "conv2d",
    "MXPackedLinear",
    "linear_packed",
    "load_pretrained",
    "quantize_",
    "restore_",
    "is_quantized",
]
