"""What the ops' Python sides share about derivatives other than autograd's backward:
forward-mode tangents (torch.autograd.forward_ad) and the torch.func transforms.

An op's call that no tape records (no input requires grad) skipped its autograd.Function:
a dual tensor's tangent was then dropped without a word (ftattn.linear, ftattn.attention),
torch.func.jvp gave a wrong tangent and torch.func.vmap failed inside the kernels (found by
review). `needs_function` says when a call must run through its autograd.Function, whose
jvp / vmap rules then apply.
"""
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad

_functorch_active = torch._C._are_functorch_transforms_active


def has_tangent(*tensors: Optional[torch.Tensor]) -> bool:
    """A forward-mode tangent rides on one of ``tensors`` (a dual level is open)."""
    return _forward_ad._current_level >= 0 and any(
        t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def needs_function(*tensors: Optional[torch.Tensor]) -> bool:
    """The call must run through its autograd.Function: autograd records it, a torch.func
    transform runs, or a forward-mode tangent rides on an input (~0.1 us when none does)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return _functorch_active() or has_tangent(*tensors)


def no_tangents(*tensors: Optional[torch.Tensor], op: str, instead: str) -> None:
    """In an op's kernel (below autograd): a forward-mode tangent on an input raises. torch's
    custom ops have no forward-mode derivative (torch.library registers backward formulas
    only) and the tangent was dropped without a word. (Under torch.func.jvp the kernel sees
    no tangent: there a custom op's tangent comes back zero, torch's behaviour for every
    custom op; the README says so.)"""
    if has_tangent(*tensors):
        raise NotImplementedError(
            f"{op} has no forward-mode derivative (torch.library's custom ops get none: the tangent would be "
            f"dropped); call {instead}, which has one")


_NO_SETUP = torch.autograd.function._SingleLevelFunction.setup_context  # (torch's "not defined")


def eager_twin(cls):
    """An old-style twin of the autograd.Function ``cls`` (forward without ctx and
    setup_context: the form torch.func needs): its forward takes ctx and runs cls's forward
    and setup_context. torch's apply of the new form binds the arguments to forward's
    signature (inspect.signature) on every call, 10-100 us (an attention call with grad
    143-206 us here, 64-105 through the twin); `apply` takes the twin where neither
    torch.func nor torch.compile runs (overriding apply instead broke torch.compile's
    tracing of the Function)."""

    def forward(ctx, *args):
        out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out

    return type(cls.__name__ + "Eager", (cls,), {"forward": staticmethod(forward),
                                                 "setup_context": staticmethod(_NO_SETUP)})


def apply(cls, twin, *args):
    """``cls.apply(*args)``, through its `eager_twin` where no transform or compiler runs."""
    if _functorch_active() or torch.compiler.is_compiling():
        return cls.apply(*args)
    return twin.apply(*args)
