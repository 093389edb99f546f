"""What protect_ and ftattn.mx.quantize_ share when they swap a model's layers in place."""
from typing import List, Tuple

import torch


def children(parent: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """Every (name, child) entry of ``parent``: named_children() lists a module used twice in
    one parent once, and its second place was left as it was (found by review)."""
    return [(name, child) for name, child in parent._modules.items() if child is not None]


def dropped_by_swap(module: torch.nn.Module) -> str:
    """What a module has that the layer put in its place would not run ('' for nothing):
    hooks, a parametrization, pruning or the legacy weight_norm (a pre-hook that makes the
    weight from others: a protected layer kept a snapshot of it, found by review), a forward
    of its own."""
    for attr, what in (("_forward_pre_hooks", "a forward pre-hook"), ("_forward_hooks", "a forward hook"),
                       ("_backward_pre_hooks", "a backward pre-hook"), ("_backward_hooks", "a backward hook")):
        if getattr(module, attr, None):
            return what
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "a parametrization"
    if "forward" in module.__dict__:
        return "a forward of its own (set on the object)"
    return ""
