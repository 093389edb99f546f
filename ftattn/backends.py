"""One backend registry for every op (attention, the MX quantizer, the ops to come).

Each op registers its backends, each with a function that says why it cannot run on a
device (None: it can), in the style of xformers' ``not_supported_reasons``. "auto"
follows one rule for every op: the device's native kernel (C++ on CPU, Triton on
CUDA) when it can run, else the op's pure-PyTorch implementation. A backend named
explicitly that cannot run raises NotImplementedError with the reason.
``python -m ftattn info`` prints ``status`` of every op.
"""
from __future__ import annotations

import enum
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Union

import torch

__all__ = ["Backend", "register", "status", "parse", "resolve", "ops", "names", "triton_reason", "extension_reason"]


class Backend(str, enum.Enum):
    """The names a ``backend=`` argument takes (each op registers the ones it has)."""

    AUTO = "auto"
    CPP = "cpp"  # the C++ kernels of the extension, CPU tensors
    TRITON = "triton"  # the Triton kernels: CUDA, or CPU tensors under TRITON_INTERPRET=1
    REFERENCE = "reference"  # attention's pure-PyTorch implementation, with the same checks
    TORCH = "torch"  # the MX quantizer's pure-PyTorch implementation (quantize_reference)


# the device's native kernel, tried first by "auto"
NATIVE = {"cpu": Backend.CPP, "cuda": Backend.TRITON}

Reason = Callable[[torch.device], Optional[str]]
_REGISTRY: Dict[str, Dict[Backend, Reason]] = {}
_FALLBACK: Dict[str, Backend] = {}


def register(op: str, backend: Union[str, Backend], reason: Reason, *, fallback: bool = False) -> None:
    """Register ``backend`` for ``op``; ``reason(device)`` says why it cannot run there
    (None: it can). ``fallback``: the op's pure-PyTorch implementation, which "auto"
    takes when the native kernel cannot run."""
    backend = Backend(backend)
    _REGISTRY.setdefault(op, {})[backend] = reason
    if fallback:
        _FALLBACK[op] = backend


def ops() -> List[str]:
    return list(_REGISTRY)


def names(op: str) -> List[str]:
    """The ``backend=`` values ``op`` takes, "auto" first."""
    return [Backend.AUTO.value] + [b.value for b in _REGISTRY[op]]


def status(op: str, device: Union[str, torch.device] = "cpu") -> Dict[str, Optional[str]]:
    """{backend name: None if it runs on ``device`` else the reason}."""
    device = torch.device(device)
    return {b.value: reason(device) for b, reason in _REGISTRY[op].items()}


def parse(op: str, backend: Union[str, Backend]) -> Backend:
    """``backend=`` as a Backend of ``op`` (ValueError naming the ones it has)."""
    try:
        chosen = Backend(backend)
    except ValueError:
        chosen = None
    if chosen is None or (chosen is not Backend.AUTO and chosen not in _REGISTRY[op]):
        supported = ", ".join(map(repr, names(op)))
        raise ValueError(f"backend={backend!r} is not supported by {op}; use one of {supported}")
    return chosen


def resolve(op: str, backend: Union[str, Backend], device: torch.device) -> Backend:
    """The backend that runs ``op`` for ``backend=`` on ``device`` (the one "auto" rule;
    an explicit one that cannot run raises NotImplementedError with the reason)."""
    registered = _REGISTRY[op]
    chosen = parse(op, backend)
    if chosen is Backend.AUTO:
        native = NATIVE.get(device.type)
        if native in registered and registered[native](device) is None:
            return native
        return _FALLBACK[op]
    reason = registered[chosen](device)
    if reason is not None:
        raise NotImplementedError(f"backend={chosen.value!r} cannot run here ({op}): {reason}")
    return chosen


# ---------------------------------------------------------------------------
# reasons shared by the ops


_KEPT: Dict[tuple, str] = {}  # (op, backend=, device) -> resolve()'s name, where it cannot change


def resolved(op: str, backend: Union[str, Backend], device: torch.device) -> str:
    """``resolve(...).value``, kept per (op, backend=, device) after the first call (a
    call's resolution was 5 us of a decode step's 30), except Triton on the CPU, which
    TRITON_INTERPRET (read at each call, below) turns on and off."""
    key = (op, backend, device) if isinstance(backend, str) else None
    name = _KEPT.get(key) if key is not None else None
    if name is None:
        name = resolve(op, backend, device).value
        if key is not None and (name != "triton" or device.type != "cpu"):
            _KEPT[key] = name
    return name


def triton_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (cheap: finds triton without
    importing it, so TRITON_INTERPRET set after ``import ftattn`` still takes effect)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter; small shapes only)"
    return f"Triton runs on CUDA devices (or on CPU under TRITON_INTERPRET=1), not {device.type}"


_HAS_OP: dict = {}


def _has_op(op_name: str) -> bool:
    # (every call of "auto" asks: looked up once; a dict, not functools.lru_cache, which
    # torch.compile warns of at each trace)
    has = _HAS_OP.get(op_name)
    if has is None:
        has = _HAS_OP[op_name] = hasattr(torch.ops.ftattn, op_name)
    return has


def extension_reason(device: torch.device, op_name: str) -> Optional[str]:
    """Why the C++ kernel ``torch.ops.ftattn.<op_name>`` cannot run on ``device``."""
    if not _has_op(op_name):
        return f"the C++ extension was built without ftattn::{op_name}; reinstall ftattn"
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors; these are on {device.type}"
    return None
