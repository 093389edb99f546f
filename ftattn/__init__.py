"""ftattn: fault-tolerant fused attention and MX quantization for PyTorch.

``import ftattn`` loads the C++ extension (op schemas + CPU kernels), registers
the Python side of the ops (fake kernels, the Triton CUDA implementation when
Triton is importable) and exposes the public API. Nothing touches CUDA here.
"""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against it)


from . import _extension

_C = _extension.load(f"{__name__}._C", "FTATTN_EXTENSION")  # registers the ftattn:: ops
from .faults import Check, Fault, FaultDetectedError, Report, REPORT_BLOCK_M  # noqa: F401
from .attention import attention  # noqa: F401
from .linear import linear  # noqa: F401
from .protect import counters, protect_, reset_counters, scrub_weights, unprotect_  # noqa: F401
from .integrations import register_on_import as _register_transformers

# attn_implementation="ftattn" once transformers' model code loads; never imports it
_register_transformers()

__version__ = "0.1.0"


def __getattr__(name):
    # ftattn.mx, ftattn.onnx, ftattn.integrations: imported on first use, so
    # `import ftattn` stays cheap and pulls in neither triton nor onnxruntime
    if name in ("mx", "onnx", "integrations", "reference", "tools"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "campaign":  # the campaign library lives with its command, in ftattn.tools
        import importlib

        return importlib.import_module(".tools.campaign", __name__)
    raise AttributeError(f"module 'ftattn' has no attribute {name!r}")


__all__ = [
    "attention",
    "linear",
    "protect_",
    "unprotect_",
    "counters",
    "reset_counters",
    "scrub_weights",
    "Fault",
    "Report",
    "Check",
    "FaultDetectedError",
    "REPORT_BLOCK_M",
    "__version__",
]
