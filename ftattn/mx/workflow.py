"""quantize_(model, config, filter_fn) / restore_(model): swap a model's Linear and
Conv2d modules for MX ones in place, and back, without patching anything global.

The MX modules share the original Parameters (no copy: training through the MX
model updates the original weights) and keep a reference to the module they
replaced, so ``restore_`` puts the very same module objects back.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import MXConfig
from .linear import MXConv2d, MXLinear

__all__ = ["quantize_", "restore_", "is_quantized"]

_ORIGINAL = "_ftattn_mx_original"  # kept in __dict__, so not a registered submodule


def _swap_for(module: torch.nn.Module, config: MXConfig) -> Optional[torch.nn.Module]:
    if type(module) is torch.nn.Linear:
        return MXLinear.from_linear(module, config)
    if type(module) is torch.nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return MXConv2d.from_conv2d(module, config)
    return None


def quantize_(model: torch.nn.Module, config: MXConfig,
              filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None) -> torch.nn.Module:
    """Replace, in place, every ``torch.nn.Linear`` and ``torch.nn.Conv2d`` of ``model`` for
    which ``filter_fn(module, fully_qualified_name)`` is true (all when None) by its MX
    version; returns ``model``. Subclasses of Linear/Conv2d and Conv2d with non-zero
    padding modes or string padding are left alone, and so are modules already swapped:
    they keep the config they were swapped with. A second call therefore quantizes only
    what the first left (mixed formats: a first call with a ``filter_fn`` for some layers,
    a second for the rest); to change a swapped module's format, ``restore_`` first.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize_ expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, MXConfig):
        raise TypeError(f"quantize_ expects config=MXConfig(...), got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool, got {type(filter_fn).__name__}")
    if _swap_for(model, config) is not None:
        raise ValueError("quantize_ swaps the children of a model in place and cannot replace the model itself "
                         f"({type(model).__name__}); wrap it, e.g. torch.nn.Sequential(model)")
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{name}" if parent_name else name
            if filter_fn is not None and not filter_fn(child, fqn):
                continue
            if type(child).__name__ == "ProtectedLinear" and type(child).__module__ == "ftattn.protect":
                raise ValueError(
                    f"{fqn} is protected by ftattn.protect_, whose checks cover the weights it was given; quantize "
                    f"first: ftattn.unprotect_(model), ftattn.mx.quantize_(model, config), then ftattn.protect_(model) "
                    f"(the MX layers are then checked over their quantized weights)")
            new = _swap_for(child, config)
            if new is None:
                continue
            new.__dict__[_ORIGINAL] = child
            setattr(parent, name, new)
    return model


def restore_(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``quantize_``: put the original module objects back (with any Parameter
    the MX module was given since); returns ``model``."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            original = child.__dict__.get(_ORIGINAL)
            if original is None:
                continue
            for pname, param in child._parameters.items():
                if original._parameters.get(pname) is not param:
                    original._parameters[pname] = param
            setattr(parent, name, original)
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    """True when some module of ``model`` is an MX module swapped in by quantize_."""
    return any(_ORIGINAL in m.__dict__ for m in model.modules())
