"""Whole-model protection: ``protect_`` / ``unprotect_`` / ``counters`` /
``reset_counters`` / ``scrub_weights``.

``protect_(model)`` swaps, in place, every ``torch.nn.Linear`` (and Hugging Face's
``Conv1D``, GPT-2's [in, out] linear) for a `ProtectedLinear` that shares the very same
Parameters (so ``state_dict``, optimizers and tied weights see no change) and runs
``ftattn.linear``; a Hugging Face model's attention switches to
``attn_implementation="ftattn"`` with the same protection and policy. ``unprotect_``
puts the original module objects and the previous attention implementation back.
Counters: every protected linear call adds to its module's counts (host ints: its flags
come back to the host; the five counts are taken only when a check failed), every attention
call to its layer's (tensor arithmetic, no host read); ``counters(model)`` reads them.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._ad import needs_function
from ._swap import children, dropped_by_swap, sync_fast_paths
from .faults import Check, OnFault, fault_blocks
from .attention import _apply_policy
from .linear import (_EAGER_OP, _EAGER_OPTIONS, BLOCK_O, _eager_cpu, _eager_flagged, _grad_input, _grad_weight, _linear,
                     carry_cast_checksums, weight_checksums)

__all__ = ["protect_", "unprotect_", "counters", "reset_counters", "scrub_weights", "ProtectedLinear",
           "ModelCounters", "ModuleCounts", "WeightCorruptionError"]

_PROTECT_ATTR = "_ftattn_protected"  # on the model: what protect_ changed
_LAYERS: "weakref.WeakValueDictionary[int, ProtectedLinear]" = weakref.WeakValueDictionary()  # by id, for
# ftattn::protected_linear
_NEXT_ID = itertools.count()
_COUNTS = ("calls", "detected", "corrected", "uncorrected", "nonfinite_input")


def _conv1d_type():
    import sys

    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _flag_stats(flags: torch.Tensor) -> torch.Tensor:
    """[calls, detected, corrected, uncorrected, nonfinite_input] of one linear call's flags
    (its check bit names a finite row: a non-finite row of the block excuses nothing,
    Report._fault_bits)."""
    nonfinite = (flags & int(Check.NONFINITE_INPUT)) != 0
    failed = fault_blocks(flags, "linear")
    return torch.stack([
        torch.ones((), dtype=torch.int64),
        failed.sum(),
        ((flags & int(Check.CORRECTED)) != 0).sum(),
        ((flags & int(Check.UNCORRECTED)) != 0).sum(),
        nonfinite.sum(),  # (a non-finite row sets this bit instead of the check's)
    ])


class ProtectedLinear(torch.nn.Module):
    """A linear layer run by ``ftattn.linear``, sharing the Parameters of the module it
    replaces (``torch.nn.Linear``: weight [out, in]; ``Conv1D``: weight [in, out], read
    transposed in place). ``counts``: [calls, detected, corrected, uncorrected,
    nonfinite_input] since the last reset."""

    def __init__(self, original: torch.nn.Module, protection: str = "abft", on_fault: str = "correct"):
        super().__init__()
        self.transposed = not isinstance(original, torch.nn.Linear)  # Conv1D keeps [in, out]
        # an MX layer (ftattn.mx.quantize_): its arithmetic, with the product checked over
        # its quantized weights (quantized once per weight version, then cached)
        self.mx_config = getattr(original, "config", None) if _is_mx(original) else None
        self.weight = original.weight
        self.bias = original.bias
        self.protection = "abft" if protection == "full" else protection
        self.on_fault = on_fault
        self.fault = None  # an ftattn.Fault for the next call (campaigns), then cleared
        object.__setattr__(self, "original", original)  # not a submodule: its Parameters are ours
        self.counts = [0] * len(_COUNTS)  # host ints (the flags come back to the host): not in state_dict
        self._plan: Optional[tuple] = None  # the common call's operands, while they hold (_make_plan)
        self._register()

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    @in_features.setter
    def in_features(self, value: int) -> None:
        self._features_follow_the_weight("in_features", value)

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    @out_features.setter
    def out_features(self, value: int) -> None:
        # (Hugging Face's resize_token_embeddings sets a tied head's out_features after its
        # weight: an AttributeError before, found by review)
        self._features_follow_the_weight("out_features", value)

    def _features_follow_the_weight(self, name: str, value: int) -> None:
        if value != getattr(self, name):
            raise ValueError(f"ProtectedLinear.{name} follows its weight {tuple(self.weight.shape)}, so it cannot be "
                             f"set to {value}: assign a weight of that shape instead")

    def _weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight the product reads, [out, in] (``weight``: the Parameter, when read already)."""
        if self.mx_config is not None:
            return self._quantized_weight()
        weight = self.weight if weight is None else weight
        if not self.transposed:
            return weight
        if weight.is_inference():
            # a view of an inference tensor has no _base, so a new view per call would make
            # its checksums per call (8-10x the product): the same view object each call
            kept = self.__dict__.get("_ftattn_view")
            if kept is None or kept[0] is not weight:
                kept = self.__dict__["_ftattn_view"] = (weight, weight.t())
            return kept[1]
        return weight.t()

    def _quantized_weight(self) -> torch.Tensor:
        """MXLinear's quantized weight, made when the Parameter changes and kept with the
        weight's checksums (linear._cached: keyed by its data pointer, strides, dtype, version
        and storage, and followed through fused optimizer steps as they are): the checks then
        cover the weight the product reads."""
        from .linear import _cached, _key, _store
        from .mx.linear import _bf, _mx

        weight, cfg = self.weight, self.mx_config
        key = _key(weight, ("mx", cfg))
        item = _cached(weight, key[:-1])
        if item is None or item[0] != key:
            with torch.no_grad():
                item = (key, _mx(_bf(weight.detach(), cfg), cfg.weight, -1, cfg).contiguous())
            _store(weight, key[:-1], item)
        return item[1]

    def _mx_forward(self, x: torch.Tensor, fault):
        """MXLinear's forward (ftattn/mx/linear.py) with the product checked."""
        from .mx.linear import _bf, _mx

        cfg = self.mx_config
        squeeze = x.dim() == 1
        x = x.unsqueeze(0) if squeeze else x
        qx = _mx(_bf(x, cfg), cfg.activation, -1, cfg)
        y, report = _linear(qx, self._quantized_weight(), None, self.protection, self.on_fault, fault, "auto", True)
        y = _bf(y, cfg)
        if self.bias is not None:
            y = _bf(y + _bf(self.bias, cfg), cfg)
        return (y.squeeze(0) if squeeze else y), report

    def _mx_train(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fault):
        """MXLinear's forward and backward (ftattn/mx/linear.py) with every product checked:
        the forward's (``fault`` hits it; its flags counted here) and the backward's two
        (dX and dW, with the layer's protection and policy, as the plain linear layer's)."""
        from .linear import _linear_impl
        from .mx.linear import _MXLinearFunction

        prot, on_fault = self.protection, self.on_fault
        first = [fault]

        def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            # (the operands are made per call, quantized: no cached checksums)
            if first:  # the forward's product: its report counted, the fault given to it
                y, report = _linear_impl(a, b, None, prot, on_fault, first.pop(), "auto", True, cache=False)
                self._tally(report.flags)
                return y
            return _linear_impl(a, b, None, prot, on_fault, None, "auto", False, cache=False)

        squeeze = x.dim() == 1
        y = _MXLinearFunction.apply(x.unsqueeze(0) if squeeze else x, weight, bias, self.mx_config, product)
        self.counts[0] += 1
        return y.squeeze(0) if squeeze else y

    def _make_plan(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], w: torch.Tensor) -> None:
        """After a common inference call (_eager_cpu) of a Parameter weight: what the next
        such call needs, and what must not have changed for it to hold (_run's first
        lines): the Parameters themselves, the weight's version, data pointer, strides, shape,
        dtype and storage (as weight_checksums' own cache: a weight changed through torch makes
        new checksums; `weight.data = ...`, as Module.to does, keeps the version counter, and
        the new memory often comes back at the old address), x's dtype and features, the
        layer's protection and policy."""
        params = self._parameters
        if params.get("weight") is not weight or weight.is_inference() or w.shape[1] == 0:
            return
        prot, recompute, policy = _EAGER_OPTIONS[(self.protection, self.on_fault)]
        sums = weight_checksums(w) if prot else None
        self._plan = (weight, weight.shape, bias, w, x.dtype, w.shape[1], weight._version,
                      weight.data_ptr(), weight.stride(), self.protection, self.on_fault, prot, recompute, policy,
                      sums, sums.ref_cols if sums else None, sums.mag_cols if sums else None,
                      sums.block_o if sums else BLOCK_O, weakref.ref(weight.untyped_storage()))

    def _register(self) -> None:
        self._layer_id = next(_NEXT_ID)  # (ftattn::protected_linear finds the layer by it)
        _LAYERS[self._layer_id] = self

    def __getstate__(self):
        # (the plan is a cache of this process's call: not pickled, nor deep-copied)
        state = super().__getstate__()
        state["_plan"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register()  # (a copy or an unpickled layer is another layer: its own id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:  # (torch.nn.TransformerEncoder's padded batch in eval mode)
            from ._nested import on_rows

            return on_rows(x, self.forward, "ProtectedLinear")
        params = self._parameters  # (read once: Module.__getattr__ costs per name; a bias of
        # None or a weight that is not a Parameter is an attribute instead)
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        if torch.is_autocast_enabled(x.device.type):
            return self._autocast(x, weight, bias)
        if torch.compiler.is_compiling():  # (torch.export too)
            if _exporting():
                raise NotImplementedError(
                    "torch.export of a model under ftattn.protect_ is not supported: its layers' checks keep state "
                    "of this process (cached weight checksums, counts); export the model unprotected "
                    "(ftattn.unprotect_), or run it with torch.compile")
            if self.fault is None and self.mx_config is None:
                if x.dtype != weight.dtype:  # (the op casts a weight of another dtype, as under autocast)
                    from .linear import validate_inputs

                    validate_inputs(x, weight, bias)  # (its clear error)
                # traced by torch.compile: one opaque op that runs this layer as in eager mode
                # (cached checksums, counts, policy) instead of graph breaks around its host
                # reads (MiniLM compiled: protected 1.66x the unprotected time); in training its
                # autograd's two products are such ops too (a two-layer MLP's training step was
                # 13 graphs)
                return torch.ops.ftattn.protected_linear(x, weight, bias, self._layer_id, self.out_features)
        return self._run(x, weight, bias)

    def _autocast(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The call under torch.autocast, as torch's linear runs there: x, weight and bias
        (those floating, but float64) cast to autocast's dtype, the product in it. The weight's
        cast is made for the call (differentiable: its gradient comes back in the weight's
        dtype) and carries the checksums kept for the weight's version
        (linear.carry_cast_checksums): before, a protected layer refused autocast."""
        device = x.device.type
        if self.mx_config is not None or (torch.compiler.is_compiling() and self.fault is not None):
            raise NotImplementedError(
                "ftattn.protect_: a protected MX linear layer does not run under torch.autocast yet. Run the model "
                "in one dtype instead (model.to(torch.bfloat16) before protect_), or leave autocast off"
                if self.mx_config is not None else
                "ftattn.protect_: a fault scheduled on a protected layer under torch.autocast inside torch.compile "
                "is not supported; schedule it in eager mode")
        dtype = torch.get_autocast_dtype(device)

        def cast(t):
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (
                dtype, torch.float64) else t

        if torch.compiler.is_compiling():
            # the op with x and bias cast in the graph; the op casts the weight (_cast)
            return torch.ops.ftattn.protected_linear(cast(x), weight, cast(bias), self._layer_id, self.out_features)
        with torch.autocast(device, enabled=False):
            return self._run(cast(x), self._cast(weight, dtype), cast(bias))

    @staticmethod
    def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``weight`` in ``dtype`` for this call (torch.autocast), with the checksums kept for
        the weight's version (linear.carry_cast_checksums)."""
        if weight.dtype is dtype or dtype not in (torch.bfloat16, torch.float16) or \
                weight.dtype is torch.float64 or not weight.is_floating_point():
            return weight
        w = weight.to(dtype)
        carry_cast_checksums(weight, w)
        return w

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The call on ``weight`` and ``bias``: the layer's own (forward), or under
        torch.compile those ftattn::protected_linear is given (torch.func.functional_call's)."""
        plan = self._plan
        if plan is not None and self.fault is None:
            # the common inference call again (a decode step makes one per layer, each a
            # GEMV of microseconds): the operands of the last, checked to be the same in a
            # few Python steps (~1 us against ~3.5 through _eager_cpu; measured)
            if weight is plan[0] and bias is plan[2] and x.dtype is plan[4] and x.is_cpu and x.ndim \
                    and x.shape[-1] == plan[5] and weight._version == plan[6] and weight.data_ptr() == plan[7] \
                    and weight.stride() == plan[8] and weight.shape == plan[1] and weight.dtype is plan[4] \
                    and self.protection is plan[9] and self.on_fault is plan[10] and x.numel() \
                    and plan[18]() is weight.untyped_storage() and not needs_function(x, weight, bias):
                try:
                    y, flags, flagged = _EAGER_OP(x, plan[3], bias, plan[15], plan[16], plan[17])
                except RuntimeError:  # (e.g. a bias given another dtype through .data: the general path names it)
                    self._plan = None
                    return self._run(x, weight, bias)
                self.counts[0] += 1
                if flagged and plan[11]:
                    y, flags, flagged = _eager_flagged(x, plan[3], bias, plan[14], y, flags, plan[11], plan[12])
                    if flagged:
                        self._tally(flags)
                        _apply_policy(flags, plan[13], x.numel() // plan[5], False, op="linear")
                return y
            self._plan = None
        fault = self.fault
        if fault is not None:
            self.fault = None
        derivative = needs_function(x, weight, bias)
        if self.mx_config is not None and derivative:
            # training an MX layer: its autograd (MX-quantized backward), each of its three
            # products a checked linear layer
            return self._mx_train(x, weight, bias, fault)
        if self.mx_config is not None:
            y, report = self._mx_forward(x, fault)
        elif fault is None and not derivative:
            # the common inference call: the C++ kernel straight, the report only when a flag is set
            w = self._weight(weight)
            fast = _eager_cpu(x, w, bias, self.protection, self.on_fault)
            if fast is None:
                y, report = _linear(x, w, bias, self.protection, self.on_fault, None, "auto", True)
            else:
                y, flags, rows, policy, flagged = fast
                self.counts[0] += 1
                if flagged:
                    self._tally(flags)
                    _apply_policy(flags, policy, rows, False, op="linear")
                else:
                    self._make_plan(x, weight, bias, w)
                return y
        else:
            y, report = _linear(x, self._weight(weight), bias, self.protection, self.on_fault, fault, "auto", True)
        self.counts[0] += 1
        self._tally(report.flags)  # (on the host)
        return y

    def _tally(self, flags: torch.Tensor) -> None:
        if flags.numel() and bool(flags.any()):  # the five counts only when a check failed
            for i, v in enumerate(_flag_stats(flags).tolist()[1:], start=1):
                self.counts[i] += v

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"protection={self.protection!r}, on_fault={self.on_fault!r}")


def _layer(layer: int, op: str) -> "ProtectedLinear":
    module = _LAYERS.get(layer)
    if module is None:
        raise RuntimeError(
            f"ftattn::{op}: no protected layer {layer} lives in this process: the op runs a layer of "
            f"a model under ftattn.protect_ by its id (its checksums, counts and policy), so a program traced from "
            f"one cannot outlive the model or leave the process; export or save the model unprotected "
            f"(ftattn.unprotect_) instead")
    return module


@torch.library.impl("ftattn::protected_linear", "CompositeExplicitAutograd")
def _protected_linear(x, weight, bias, layer, out_features):
    # (x in another dtype than the weight: autocast's, the weight cast for the call; forward)
    module = _layer(layer, "protected_linear")
    with torch.no_grad():  # (its autograd is the op's, below)
        return module._run(x, module._cast(weight, x.dtype), bias)  # (eager: plan, checks, counts, policy)


@torch.library.register_fake("ftattn::protected_linear")
def _protected_linear_fake(x, weight, bias, layer, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


# (the backward's products take the layer's protection and on_fault as they are when the
# backward runs; eager, _CheckedLinear keeps those of its forward call: they differ only where
# the layer's policy is changed between a forward and its backward)
@torch.library.impl("ftattn::protected_linear_grad_x", "CompositeExplicitAutograd")
def _protected_linear_grad_x(grad_y, weight, layer, in_features):
    module = _layer(layer, "protected_linear_grad_x")
    weight = module._cast(weight, grad_y.dtype)  # (under autocast)
    return _grad_input(grad_y, module._weight(weight), module.protection, module.on_fault, "auto")


@torch.library.register_fake("ftattn::protected_linear_grad_x")
def _protected_linear_grad_x_fake(grad_y, weight, layer, in_features):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@torch.library.impl("ftattn::protected_linear_grad_w", "CompositeExplicitAutograd")
def _protected_linear_grad_w(grad_y, x, weight, layer):
    module = _layer(layer, "protected_linear_grad_w")
    if module.transposed:  # (a Conv1D's weight [in, out]: X^T dY, made in that layout)
        grad = _grad_weight(x, grad_y, module.protection, module.on_fault, "auto")
    else:
        grad = _grad_weight(grad_y, x, module.protection, module.on_fault, "auto")
    return grad.to(weight.dtype)  # (under autocast: made in x's dtype)


@torch.library.register_fake("ftattn::protected_linear_grad_w")
def _protected_linear_grad_w_fake(grad_y, x, weight, layer):
    return weight.new_empty(weight.shape)


def _protected_linear_setup(ctx, inputs, output):
    x, weight, bias, layer, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.layer, ctx.has_bias = layer, bias is not None


def _protected_linear_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.ftattn.protected_linear_grad_x(grad_y, weight, ctx.layer, x.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.ftattn.protected_linear_grad_w(grad_y, x, weight, ctx.layer)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None, None


torch.library.register_autograd("ftattn::protected_linear", _protected_linear_backward,
                                setup_context=_protected_linear_setup)


if hasattr(torch.fx.node, "has_side_effect"):  # (its counts and policy: never dropped as dead code)
    torch.fx.node.has_side_effect(torch.ops.ftattn.protected_linear.default)


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


@dataclasses.dataclass(frozen=True)
class ModuleCounts:
    calls: int = 0
    detected: int = 0
    corrected: int = 0
    uncorrected: int = 0
    nonfinite_input: int = 0


@dataclasses.dataclass(frozen=True)
class ModelCounters:
    """Totals over every protected linear layer and attention call of one model since
    `protect_` / `reset_counters`, and ``per_module`` (module name -> ModuleCounts; the
    attention layers under their module names)."""

    detected: int
    corrected: int
    uncorrected: int
    nonfinite_input: int
    per_module: Dict[str, ModuleCounts]


def _is_linear(module: torch.nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, torch.nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def protect_(
    model: torch.nn.Module,
    *,
    linear: bool = True,
    attention: bool = True,
    protection: str = "full",
    on_fault: str = "correct",
    filter_fn: Optional[Callable[[str, torch.nn.Module], bool]] = None,
) -> torch.nn.Module:
    """Protect ``model`` in place: every ``torch.nn.Linear`` / ``Conv1D`` (those for which
    ``filter_fn(name, module)`` is true, when given) becomes a `ProtectedLinear` sharing its
    Parameters, and a Hugging Face model's attention runs ``ftattn.attention`` with the same
    ``protection`` ("off", "abft", "full"; linear layers run "abft" for "full") and
    ``on_fault``. Returns the model; `unprotect_` undoes it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"protect_() needs a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _PROTECT_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} is already protected; call ftattn.unprotect_(model) first")
    if linear and _is_linear(model):
        raise ValueError(f"protect_ swaps the linear layers of a model in place and cannot replace the model itself "
                         f"({type(model).__name__}); wrap it, e.g. torch.nn.Sequential(model), or call ftattn.linear")
    if protection not in ("off", "abft", "full"):
        raise ValueError(f"protection={protection!r} is not supported; use 'off', 'abft' or 'full'")
    try:
        OnFault(on_fault)
    except ValueError:
        raise ValueError(f"on_fault={on_fault!r} is not supported; use 'correct', 'raise' or 'report'") from None
    swapped: List[Tuple[torch.nn.Module, str, torch.nn.Module]] = []
    made: dict = {}  # id(original) -> its ProtectedLinear: a module used at several places gets one
    if linear:
        places = []  # every layer to swap, all checked before the first is swapped (no half-protected model)
        for name, module in list(model.named_modules()):
            for child_name, child in children(module):
                full = f"{name}.{child_name}" if name else child_name
                if filter_fn is not None and not filter_fn(full, child):
                    continue
                if type(child).__name__ == "MXPackedLinear":
                    raise ValueError(
                        f"{full} is a packed MX layer (ftattn.mx.quantize_ with packed=True): protect_ cannot check "
                        f"it yet (its kernel reads the packed codes). Protect the fake-quant MX model "
                        f"(MXConfig(packed=False)), or leave it out with filter_fn")
                if not _is_linear(child):
                    continue
                dropped = dropped_by_swap(child)
                if dropped:
                    raise ValueError(
                        f"{full} has {dropped}: protect_ would drop it (the protected layer runs ftattn.linear, not "
                        f"this module's forward). Remove it first (torch.nn.utils.prune.remove, "
                        f"parametrize.remove_parametrizations, the hook's handle.remove()), or leave the module out "
                        f"with filter_fn")
                if type(child) is not torch.nn.Linear and not _is_conv1d(child) and not _is_mx(child):
                    if type(child).forward is torch.nn.Linear.forward:
                        # (nn.MultiheadAttention's out_proj: its owner reads its weight and never
                        # calls it, so a protected layer there would check nothing)
                        raise ValueError(
                            f"{full} is a {type(child).__name__} (a Linear subclass, whose owner "
                            f"{type(module).__name__} may use its weight without calling it, as "
                            f"torch.nn.MultiheadAttention does with out_proj): protect_ could not check it. Pass "
                            f"filter_fn to leave it out")
                    raise ValueError(
                        f"{full} is a {type(child).__name__} (a Linear subclass with its own forward): protect_ "
                        f"would drop what it adds. Pass filter_fn to leave it out")
                places.append((module, child_name, child))
        for module, child_name, child in places:
            if id(child) not in made:
                made[id(child)] = ProtectedLinear(child, protection, on_fault)
            setattr(module, child_name, made[id(child)])
            swapped.append((module, child_name, child))
        sync_fast_paths(model)
    previous_attn = None
    config = getattr(model, "config", None)
    if attention and config is not None and hasattr(config, "_attn_implementation"):
        from .integrations.transformers import _Tally, configure

        previous_attn = config._attn_implementation
        configure(model, protection=protection, on_fault=on_fault)
        for module in model.modules():  # (a layer's attention counts, _COUNTS' order)
            object.__setattr__(module, "_ftattn_counts", _Tally())
    object.__setattr__(model, _PROTECT_ATTR, {"swapped": swapped, "attention": previous_attn})
    return model


def _is_mx(module) -> bool:
    from .mx.linear import MXLinear

    return type(module) is MXLinear


def _is_conv1d(module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and type(module) is conv1d


def unprotect_(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `protect_`: the original module objects and the previous attention
    implementation come back."""
    state = getattr(model, _PROTECT_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not protected (ftattn.protect_ was not called on it)")
    for parent, name, original in state["swapped"]:
        protected = parent._modules.get(name)
        if not (isinstance(protected, ProtectedLinear) and protected.original is original):
            continue  # (the user put another module there since: theirs stays)
        # Parameters replaced while protected (m.weight = Parameter(...), load_state_dict(...,
        # assign=True)) go to the original module: it came back with its old ones (found by review)
        for attr in ("weight", "bias"):
            now = getattr(protected, attr)
            if now is not getattr(original, attr):
                setattr(original, attr, now)
        setattr(parent, name, original)
    sync_fast_paths(model)
    if state["attention"] is not None:
        from .integrations.transformers import unconfigure

        unconfigure(model)
        if model.config._attn_implementation != state["attention"]:
            model.set_attn_implementation(state["attention"])
        for module in model.modules():
            module.__dict__.pop("_ftattn_counts", None)
    model.__dict__.pop(_PROTECT_ATTR, None)
    return model


def _counted(model: torch.nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, ProtectedLinear):
            yield name, list(module.counts)
        elif module.__dict__.get("_ftattn_counts") is not None:
            counts = module.__dict__["_ftattn_counts"].values()
            if counts[0] > 0:
                yield name, counts


def counters(model: torch.nn.Module) -> ModelCounters:
    """Detected and corrected faults of a protected model, in total and per module."""
    if getattr(model, _PROTECT_ATTR, None) is None:
        raise ValueError(f"{type(model).__name__} is not protected; call ftattn.protect_(model) first")
    per_module = {name: ModuleCounts(*counts) for name, counts in _counted(model)}
    totals = [sum(getattr(c, f) for c in per_module.values()) for f in _COUNTS[1:]]
    return ModelCounters(*totals, per_module=per_module)


def reset_counters(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ProtectedLinear):
            module.counts = [0] * len(_COUNTS)
        counts = module.__dict__.get("_ftattn_counts")
        if counts is not None:
            counts.zero_()


class WeightCorruptionError(RuntimeError):
    """scrub_weights found more corruption in a weight than it can repair."""


def scrub_weights(model: torch.nn.Module) -> List[dict]:
    """Verify every protected weight against its cached checksums (per row: W e, per
    block of output features: W^T e_b) and repair a single corrupted element per block
    from them. Returns one dict per repaired element (module, row, col, old, new); raises
    WeightCorruptionError naming the module when a weight holds more than it can repair.
    A weight that is an inference tensor (made under torch.inference_mode()) is not
    verified: it has no version counter, so checksums kept for it cannot tell an update in
    place from a corruption (checksums made anew would only agree with themselves)."""
    repaired = []
    for name, module in model.named_modules():
        if not isinstance(module, ProtectedLinear):
            continue
        w = module._weight()
        if w.is_inference():
            continue
        sums = weight_checksums(w)  # the cached checksums (made now when none are)
        with torch.no_grad():
            wd = w.detach().to(torch.float64)
            tol = 64 * 2.0**-52 * wd.abs().sum(1) + 1e-300
            bad_rows = torch.nonzero((wd.sum(1) - sums.row_sums).abs() > tol).flatten().tolist()
            if not bad_rows:
                continue
            bo = sums.block_o
            blocks = {}
            for r in bad_rows:
                blocks.setdefault(r // bo, []).append(r)
            for blk, rows in blocks.items():
                if len(rows) > 1:
                    raise WeightCorruptionError(
                        f"{name}: rows {rows} of its weight disagree with their checksums; more than one "
                        f"element per block of {bo} rows cannot be repaired (reload the weights)")
                r = rows[0]
                lo, hi = blk * bo, min(wd.shape[0], (blk + 1) * bo)
                col_diff = wd[lo:hi].sum(0) - sums.sums[blk]
                col_tol = 64 * 2.0**-52 * wd[lo:hi].abs().sum(0) + 1e-300
                cols = torch.nonzero(col_diff.abs() > col_tol).flatten().tolist()
                if len(cols) != 1:
                    raise WeightCorruptionError(
                        f"{name}: row {r} of its weight disagrees with its checksum, but {len(cols)} columns do; "
                        f"cannot locate one element to repair (reload the weights)")
                c = cols[0]
                new = sums.sums[blk, c] - (wd[lo:hi, c].sum() - wd[r, c])
                old = float(w[r, c])
                w[r, c] = new.to(w.dtype)
                repaired.append({"module": name, "row": r, "col": c, "old": old, "new": float(w[r, c])})
    return repaired
