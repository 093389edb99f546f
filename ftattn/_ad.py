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


class Function(torch.autograd.Function):
    """torch.autograd.Function in the form torch.func needs (forward without ctx,
    setup_context), whose apply skips what torch's does on every call for that form: bind
    the arguments to forward's signature (inspect.signature, 10-100 us a call: a protected
    layer's training call 145 -> 210-256 us here). Our callers pass every argument
    positionally, so there is nothing to bind; under torch.func's transforms torch's apply
    runs as it is."""

    @classmethod
    def apply(cls, *args):
        if _functorch_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)  # (torch._C._FunctionBase.apply)
