"""ftattn.mx: MX (microscaling) quantization, bit-exact with Microsoft's microxcaling.

* formats.py   element formats, rounding modes, the E8M0 shared scale
* quantize.py  ``quantize`` (fake quantization), ``pack`` / ``unpack`` (real storage),
               each fast path beside its ``*_reference``
* config.py    ``MXConfig``
* linear.py    ``MXLinear``, ``MXConv2d``, ``linear``, ``matmul`` (quantized forward and backward)
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
]
