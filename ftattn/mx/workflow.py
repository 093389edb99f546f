"""quantize_(model, config, filter_fn) / restore_(model): swap a model's Linear and
Conv2d modules for MX ones in place, and back, without patching anything global.

The MX modules share the original Parameters (no copy: training through the MX
model updates the original weights) and keep a reference to the module they
replaced, so ``restore_`` puts the very same module objects back. Packed MX
(``MXConfig(packed=True)``, ftattn/mx/packed.py) is the exception: its modules hold
the weights as MX codes and drop the fp32 ones, unless ``keep_original=True``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._swap import children, sync_fast_paths
from .config import MXConfig
from .linear import MXConv2d, MXLinear
from .packed import MXPackedLinear

__all__ = ["quantize_", "restore_", "is_quantized"]

_ORIGINAL = "_ftattn_mx_original"  # kept in __dict__, so not a registered submodule


def _swap_for(module: torch.nn.Module, config: MXConfig) -> Optional[torch.nn.Module]:
    if type(module) is torch.nn.Linear:
        return MXPackedLinear.from_linear(module, config) if config.packed else MXLinear.from_linear(module, config)
    if config.packed:  # packed covers Linear layers; Conv2d stays as it is
        return None
    if type(module) is torch.nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return MXConv2d.from_conv2d(module, config)
    return None


def _shared_weights(model: torch.nn.Module) -> set:
    """ids of the Parameters that more than one module holds (tied weights, e.g. lm_head and the embedding)."""
    seen, shared = set(), set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                (shared if id(p) in seen else seen).add(id(p))
    return shared


def quantize_(model: torch.nn.Module, config: MXConfig,
              filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None, *,
              keep_original: bool = False) -> torch.nn.Module:
    """Replace, in place, every ``torch.nn.Linear`` and ``torch.nn.Conv2d`` of ``model`` for
    which ``filter_fn(module, fully_qualified_name)`` is true (all when None) by its MX
    version; returns ``model``. Subclasses of Linear/Conv2d and Conv2d with non-zero
    padding modes or string padding are left alone, and so are modules already swapped:
    they keep the config they were swapped with. A second call therefore quantizes only
    what the first left (mixed formats: a first call with a ``filter_fn`` for some layers,
    a second for the rest); to change a swapped module's format, ``restore_`` first.

    ``config.packed``: each Linear becomes an ``MXPackedLinear`` holding its weight packed
    (codes + E8M0 scales) and the fp32 weight is dropped (inference only; Conv2d layers
    and Linear layers whose weight another module shares, e.g. an lm_head tied to the
    embedding, are left as they are). ``keep_original=True`` keeps the original modules
    (and their fp32 weights, outside the model's parameters) so that ``restore_`` works.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize_ expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, MXConfig):
        raise TypeError(f"quantize_ expects config=MXConfig(...), got {type(config).__name__}")
    if not isinstance(keep_original, bool):
        raise TypeError(f"keep_original must be a bool, got {keep_original!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, fqn) -> bool, got {type(filter_fn).__name__}")
    if _swap_for(model, config) is not None:
        raise ValueError("quantize_ swaps the children of a model in place and cannot replace the model itself "
                         f"({type(model).__name__}); wrap it, e.g. torch.nn.Sequential(model)")
    tied = _shared_weights(model) if config.packed else set()
    made = {}  # id(original) -> its MX module: a module used at several places gets one
    for parent_name, parent in list(model.named_modules()):
        for name, child in children(parent):
            fqn = f"{parent_name}.{name}" if parent_name else name
            if id(child) in made:
                setattr(parent, name, made[id(child)])
                continue
            if filter_fn is not None and not filter_fn(child, fqn):
                continue
            if config.packed and id(getattr(child, "weight", None)) in tied:
                continue
            if type(child).__name__ == "ProtectedLinear" and type(child).__module__ == "ftattn.protect":
                raise ValueError(
                    f"{fqn} is protected by ftattn.protect_, whose checks cover the weights it was given; quantize "
                    f"first: ftattn.unprotect_(model), ftattn.mx.quantize_(model, config), then ftattn.protect_(model) "
                    f"(the MX layers are then checked over their quantized weights)")
            new = _swap_for(child, config)
            if new is None:
                continue
            if not config.packed or keep_original:
                new.__dict__[_ORIGINAL] = child
            else:
                new.__dict__[_ORIGINAL] = None  # swapped, the original freed
            made[id(child)] = new
            setattr(parent, name, new)
    sync_fast_paths(model)
    return model


def restore_(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``quantize_``: put the original module objects back (with any Parameter
    the MX module was given since); returns ``model``."""
    freed = [f"{p}.{n}" if p else n for p, parent in model.named_modules() for n, c in parent.named_children()
             if _ORIGINAL in c.__dict__ and c.__dict__[_ORIGINAL] is None]
    if freed:
        raise RuntimeError(
            f"restore_: {len(freed)} module(s) ({', '.join(freed[:3])}{', ...' if len(freed) > 3 else ''}) were "
            "quantized with MXConfig(packed=True), which frees the fp32 weights; nothing to restore them from. "
            "Quantize with ftattn.mx.quantize_(model, config, keep_original=True) to be able to restore, or reload "
            "the model")
    for parent_name, parent in list(model.named_modules()):
        for name, child in children(parent):
            original = child.__dict__.get(_ORIGINAL)
            if original is None:
                continue
            for pname, param in child._parameters.items():
                if original._parameters.get(pname) is not param:
                    original._parameters[pname] = param
            setattr(parent, name, original)
    sync_fast_paths(model)
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    """True when some module of ``model`` is an MX module swapped in by quantize_."""
    return any(_ORIGINAL in m.__dict__ for m in model.modules())
