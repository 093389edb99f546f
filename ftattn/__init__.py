"""ftattn: fault-tolerant fused attention and MX quantization for PyTorch.

``import ftattn`` loads the C++ extension (op schemas + CPU kernels), registers
the Python side of the ops (fake kernels, the Triton CUDA implementation when
Triton is importable) and exposes the public API. Nothing touches CUDA here.
"""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against it)


def _load_extension():
    """The C++ extension ``ftattn._C`` (its import registers the ops). The environment
    variable FTATTN_EXTENSION (testing only) names another build of it to load instead,
    e.g. a one-ISA build: tests/test_isa_builds.py runs the kernels' grid under each."""
    import os

    path = os.environ.get("FTATTN_EXTENSION")
    if not path:
        from . import _C
        return _C
    import importlib.util
    import sys

    if not os.path.isfile(path):
        raise ImportError(f"FTATTN_EXTENSION={path!r} is not a file; unset it to load the installed ftattn._C")
    spec = importlib.util.spec_from_file_location(f"{__name__}._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_C = _load_extension()  # registers ftattn::attention and ftattn::attention_fwd
from .faults import Check, Fault, FaultDetectedError, Report, REPORT_BLOCK_M  # noqa: F401
from .attention import attention  # noqa: F401
from .integrations import register_on_import as _register_transformers

# attn_implementation="ftattn" once transformers' model code loads; never imports it
_register_transformers()

__version__ = "0.1.0"


def __getattr__(name):
    # ftattn.mx, ftattn.onnx, ftattn.integrations: imported on first use, so
    # `import ftattn` stays cheap and pulls in neither triton nor onnxruntime
    if name in ("mx", "onnx", "integrations", "campaign", "reference"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ftattn' has no attribute {name!r}")


__all__ = [
    "attention",
    "Fault",
    "Report",
    "Check",
    "FaultDetectedError",
    "REPORT_BLOCK_M",
    "__version__",
]
