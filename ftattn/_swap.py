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


def _swapped(module: torch.nn.Module) -> bool:
    """A layer protect_ or ftattn.mx.quantize_ put in place of a Linear."""
    return (type(module).__name__ == "ProtectedLinear" and type(module).__module__ == "ftattn.protect") or \
        "_ftattn_mx_original" in module.__dict__


def _fast_path_off(module: torch.nn.Module, args) -> None:
    """A forward pre-hook that changes nothing: its presence turns off a
    torch.nn.TransformerEncoderLayer's fast path (sync_fast_paths)."""
    return None


def sync_fast_paths(model: torch.nn.Module) -> None:
    """Every torch.nn.TransformerEncoderLayer of ``model`` that holds a swapped layer gets
    `_fast_path_off` as a forward pre-hook, and one that holds none loses it. In eval mode
    without gradients the encoder layer runs torch._transformer_encoder_layer_fwd on
    linear1's and linear2's weights and never calls the modules: a protected model's
    feed-forward ran unchecked (no call counted) and an MX model's in fp32 (found this
    session). torch takes its slow path, which calls them, where any of the layer's modules
    has a hook; the hook is a module-level function, so the model still pickles."""
    for module in model.modules():
        if not isinstance(module, torch.nn.TransformerEncoderLayer):
            continue
        needed = any(_swapped(m) for m in module.modules())
        ours = [key for key, hook in module._forward_pre_hooks.items() if hook is _fast_path_off]
        if needed and not ours:
            module.register_forward_pre_hook(_fast_path_off)
        elif not needed:
            for key in ours:
                del module._forward_pre_hooks[key]
