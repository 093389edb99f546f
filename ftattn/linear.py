"""ftattn.linear: a fault-tolerant linear layer, y = x W^T + b.

The op schemas live in csrc/ftattn.cpp (``ftattn::linear``, ``ftattn::linear_fwd``),
the CPU kernel of ``linear_fwd`` in csrc/linear_cpu.cpp (the product through the library
GEMM, the row checksums, the recomputation of a faulty product). This file holds the
weight checksums and their cache, the fake (meta) kernels, input validation, backend
choice, the ``on_fault`` policy, a pure-PyTorch reference backend with the same checks
(any device) and the public function, which ``ftattn::linear`` runs.

Weight checksums. Per block of ``BLOCK_O`` output features b: W^T e_b (the sum of the
block's rows), W^T w_b (their sum weighted by the contract's checksum_weight of each row's
place in the block: a warp's +-2^k deltas that cancel in the plain sum rarely cancel in
both) and, for the bounds, sum_{o in b} W_o^2 and sum_{o in b} w_o^2 W_o^2, computed in fp64
once per weight and cached, keyed on the weight tensor (weakly) and checked against its
data pointer, shape, strides and version counter: an in-place update (an optimizer
step, ``load_state_dict``) makes them anew, while a weight corrupted in memory behind
the version counter (a bit flip in DRAM) fails the check on every later call, until
``ftattn.scrub_weights`` repairs it.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Optional, Tuple, Union

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import backends
from ._ad import apply, eager_twin, needs_function, no_tangents
from .attention import _apply_policy
from .contract import BIT_REPLACE, fault_fields, xor_mask
from .faults import CHECK_MASK, TAU, Check, Fault, OnFault, Protection, Report, REPORT_BLOCK_M, Site, checksum_weights
from .reference import ieee_fp32_matmul

__all__ = ["linear", "weight_checksums", "BLOCK_O", "BACKENDS", "backend_status"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# output features per checksum block: out / BLOCK_O extra columns in the check's GEMMs
# (32 for out = 4096, 1.6 % of the product's work per GEMM)
BLOCK_O = 128
KAPPA = 8.0
U32 = 2.0**-24
# up to this many checksum blocks (and for fewer rows than a report block per thread, at
# any number) the C++ kernel takes fp32 x's references per row (no GEMM);
# csrc/linear_cpu.cpp kFusedBlocks
FUSED_BLOCKS = 16
# a weighted checksum's difference above this part of its bound makes the row's block blind
# (_settle compares a second product): a warp whose deltas cancel in the plain sum may leave
# only that much in the weighted one (review: 0.9 of the bound at K = 4097, a warp of 2x the
# harm threshold); clean rows sit below 0.15 of it (normal data, K 256..14336), 0.25 on
# constant data (csrc/linear_cpu.cpp kWeightedVerify, kernels/linear.py)
WEIGHTED_VERIFY = 0.25
ETA = 2.0**-149


def check_factor(k: int, split: bool, block_o: int = 128) -> float:
    """The row check's factor on scale_i sqrt(x_i^2 / scale_i^2 . mag_b), in one place for the
    reference and Triton backends (csrc/linear_cpu.cpp makes the same): kappa sqrt(K) u, the
    statistical rounding of the block's fp32 accumulators (mag_b = sum_{o in b} W_o^2). The
    fp64 references (ref_cols fp64) add at most (K + block_o) 2^-53 sum_{j, o} |x_j W_oj| <=
    (K + block_o) 2^-53 sqrt(block_o K) sqrt(x^2 . mag_b) (the fp64 sums and dot product:
    a 1e-5 part of the first term at K = 4096). bf16 hi + mid + lo parts' references run on
    the bf16 GEMM's fp32 accumulators: a second dot product (its magnitudes in mag_b, sqrt(2)
    for the two) and the parts' own rounding, 2^-26 sqrt(K). 2^-6 for magnitudes taken in
    bf16 or rounded to fp32."""
    sqrt_k = math.sqrt(max(k, 1))
    if split:
        return (KAPPA * sqrt_k * U32 * math.sqrt(2.0) + 2.0**-26 * sqrt_k) * (1.0 + 2.0**-6)
    return (KAPPA * sqrt_k * U32 + (k + block_o) * 2.0**-52 * math.sqrt(block_o * max(k, 1))) * (1.0 + 2.0**-6)


# ---------------------------------------------------------------------------
# weight checksums and their cache


@dataclasses.dataclass
class WeightChecksums:
    """The cached checksums of one weight [out, in]: ``sums`` [nb, in] fp64 (W^T e_b),
    ``row_sums`` [out] fp64 (W e, for scrub_weights; None when made with cache=False), and
    what the kernel reads, per checksum column c of 2 nb (the nb plain block sums, then the
    nb weighted ones, W^T w_b):
    ``ref_cols`` (the fp64 checksums [2 nb, in], the references then made in fp64; or, for a
    bf16 weight of more than FUSED_BLOCKS blocks, bf16 hi + mid + lo parts [3 x 2 nb, in] for
    the bf16 GEMM) and ``mag_cols`` [2 nb, in] (the magnitudes of the bounds: sum_{o in b}
    W_o^2 and sum_{o in b} w_o^2 W_o^2 in fp32, plus the checksum squared in bf16 for the
    bf16 parts, whose references carry fp32 rounding)."""

    key: tuple
    block_o: int
    sums: torch.Tensor
    row_sums: Optional[torch.Tensor]
    ref_cols: torch.Tensor
    mag_cols: torch.Tensor


# A weight's checksums live in the weight tensor's own __dict__ (_SLOT: {its views' keys:
# (a weak reference to the storage they were made of, their checksums; a protected MX layer's
# quantized weight likewise, under a key of its own: protect.py), _LAST: the per-call
# fast check's (version, data pointer, strides, storage reference, entry)}), a view's
# (weight.t(), made per call) on its base: they go with the tensor, and tensors made anew on
# its memory (.data, with version counters of their own) keep their own. No weak references
# to the weights: torch.utils.swap_tensors refuses a tensor that has any, and with it
# nn.Module.to / load_state_dict under torch.__future__.set_swap_module_params_on_conversion
# (True) refused protected weights (even after unprotect_); swap_tensors moves a tensor's
# __dict__ with its contents, so the checksums follow the memory they were made of. The
# storage's identity is part of the key: `w.data = other` keeps w's version counter, and the
# new memory often comes back at the old address (false alarms, found by review). Tensors
# made anew for each call (a detach per call) get checksums made for each call, as before.
_SLOT = "_ftattn_checksums"
_LAST = "last"  # (the views' keys are tuples)


class _Checksums(dict):
    """A tensor's checksums (_SLOT): pickled as an empty set (what torch.load with
    weights_only=True allows; the entries, tensors of this process's cache, are not saved)
    and deep-copied as empty."""

    __slots__ = ()

    def __reduce__(self):
        return (set, ())

    def __copy__(self):
        return _Checksums()

    def __deepcopy__(self, memo):
        return _Checksums()


def _slot(t: torch.Tensor, make: bool = False) -> Optional[_Checksums]:
    slot = getattr(t, _SLOT, None)
    if type(slot) is not _Checksums:  # (none yet, or a loaded copy's empty set)
        if not make:
            return None
        slot = _Checksums()
        try:
            setattr(t, _SLOT, slot)
        except (AttributeError, TypeError, RuntimeError):  # (a tensor class that takes no attributes:
            return None  # its checksums are made for each call)
    return slot


def _cached(weight: torch.Tensor, view: tuple) -> Optional[WeightChecksums]:
    slot = _slot(_base(weight))
    item = slot.get(view) if slot is not None else None
    return item[1] if item is not None and item[0]() is weight.untyped_storage() else None


def _store(weight: torch.Tensor, view: tuple, entry: WeightChecksums) -> None:
    slot = _slot(_base(weight), True)
    if slot is not None:
        slot[view] = (weakref.ref(weight.untyped_storage()), entry)


def _remember(weight: torch.Tensor, entry: WeightChecksums) -> None:
    slot = _slot(weight, True)
    if slot is not None:
        slot[_LAST] = (weight._version, weight.data_ptr(), weight.stride(), weakref.ref(weight.untyped_storage()),
                       entry)


def _after_step(optimizer, args, kwargs) -> None:
    """After a fused torch.optim step (fused=True), the parameters ftattn keeps state for
    (those that carry a _SLOT: cached checksums, a protected MX layer's quantized weight) get
    their version counters moved, as every other step's in-place updates move them: the fused
    steps (on CPU) write them without, so their cached checksums (and a protected layer's
    plan) held on and every later call failed its check as a weight corrupted in memory
    (found by review)."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                if type(getattr(p, _SLOT, None)) is _Checksums and not p.is_inference():
                    torch.autograd.graph.increment_version(p)


register_optimizer_step_post_hook(_after_step)


def _base(weight: torch.Tensor) -> torch.Tensor:
    return weight._base if weight._base is not None else weight


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference tensor tracks no version
        return None


def _key(weight: torch.Tensor, tag) -> tuple:
    """A cache key of what was made from ``weight`` (tag: the checksums' block_o, or another
    kind, as a protected MX layer's quantized weight), its version last."""
    return (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, weight.device, tag,
            _version(_base(weight)))


def _refreshed(weight: torch.Tensor, sums: Optional[WeightChecksums], flags: torch.Tensor) \
        -> Optional[WeightChecksums]:
    """For a call whose check failed on checksums cached for an inference tensor (no
    version counter: weight_checksums): its checksums made anew (and cached) when they
    differ from the cached ones, so the weight changed in place since, for the call to run
    again; None where the flags stand (the weight as it was: a fault of the call itself)."""
    if sums is None or sums.key[-1] is not None or not bool(((flags & CHECK_MASK) != 0).any()):
        return None
    slot = _slot(_base(weight))
    if slot is not None:
        slot.pop(sums.key[:-1], None)
    fresh = weight_checksums(weight, sums.block_o)
    return None if torch.equal(fresh.sums, sums.sums) else fresh


def _settle(run, args, y: torch.Tensor, flags: torch.Tensor, weight: torch.Tensor,
            sums: Optional[WeightChecksums], recompute: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """A call whose row check failed on finite input, or whose kernel found a block of rows
    blind (BLIND: a row's checksum block whose bound exceeds half the harm
    threshold, where big input channels cancel in y), settled by the product made again
    without the fault (``run(*args)`` with no fault, no recomputation): (y, flags), BLIND
    cleared.

    The product is deterministic. A blind block whose rows come out the same bits again is
    clean where the weight's checksums made anew equal the cached ones (else the weight is
    corrupted in memory: its check fails, as below); one whose rows differ had a transient
    fault: its check fails. The row check's
    bound is statistical; data whose roundings add up in one direction (constant x and W,
    identical output rows) can exceed it with no fault (x and W of 1/3, K = 1024, fp32:
    measured). So a failed block whose rows come out the same bits failed by the data or by
    a weight that is not what its checksums were made of (corrupted in memory): the weight's
    checksums are made anew, and where they equal the cached ones the block's check bit is
    cleared (no fault: the output is the product's), else it stands (UNCORRECTED under
    "correct": scrub_weights repairs the weight). A failed block whose rows differ had a
    transient fault: its bit stands, and under "correct" the call returns the product made
    again, CORRECTED where that one's check passes or a third product equals it (made by the
    data, with the weight intact), else UNCORRECTED. The first product is kept under
    "report" and "raise"."""
    flat = flags.reshape(-1)
    if sums is None or not bool(flat.any()):  # (a clean call: one op instead of six, ~50 us)
        return y, flags
    failed = (flat & int(Check.GEMM_ROW_CHECKSUM)) != 0
    blind = ((flat & int(Check.BLIND)) != 0) & ~failed
    if not bool((failed | blind).any()):
        return y, flags
    flat = flat & ~int(Check.BLIND)
    clean = (*args[:7], False, None, None)
    y2, flags2 = run(*clean)
    nblk = failed.numel()

    def same_blocks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per report block, bit for bit
        return _same_rows(a, b, nblk).to(failed.device)

    intact: Optional[bool] = None

    def weight_intact() -> bool:
        nonlocal intact
        if intact is None:
            intact = torch.equal(_block_sums(weight.detach(), sums.block_o, sums_only=True)[0], sums.sums)
        return intact

    same = same_blocks(y, y2)
    failed |= blind & ~same  # (a blind block that came out different: a transient fault)
    # a blind block that came out the same: clean, or a weight corrupted in memory whose error
    # stays within the bound (found by review): its checksums made anew decide
    if bool((blind & same).any()) and not weight_intact():
        failed |= blind & same
    flat = torch.where(failed, flat | int(Check.GEMM_ROW_CHECKSUM), flat)
    by_data = failed & same
    status = torch.zeros_like(failed, dtype=torch.int32)
    keep = failed.clone()
    if bool(by_data.any()):
        if weight_intact():
            keep &= ~by_data
        else:
            status = torch.where(by_data, int(Check.UNCORRECTED), status)
    transient = failed & ~same
    if recompute and bool(transient.any()):
        failed2 = ((flags2 & int(Check.GEMM_ROW_CHECKSUM)) != 0).reshape(-1)
        settled = transient & ~failed2
        again = transient & failed2
        if bool(again.any()):
            y3, _ = run(*clean)
            again_same = again & same_blocks(y2, y3)
            settled |= again_same if weight_intact() else torch.zeros_like(again_same)
        status = torch.where(transient, torch.where(settled, int(Check.CORRECTED), int(Check.UNCORRECTED)), status)
        y = y2
    flat = torch.where(failed & ~keep, flat & ~int(Check.GEMM_ROW_CHECKSUM), flat)
    if recompute:
        flat = flat | torch.where(keep, status, 0).to(flat.dtype)
    return y, flat.view(flags.shape)


_ONE_PASS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _block_sums(weight: torch.Tensor, block_o: int, sums_only: bool = False, row_sums: bool = True) \
        -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(the checksums [2 nb, in]: W^T e_b, then W^T w_b; their magnitudes [2 nb, in]: sum_{o in b}
    W_o^2, then sum_{o in b} w_o^2 W_o^2; W e [out], or None without ``row_sums``), fp64, a
    chunk of rows at a time (w_o W_o exact in fp64: 24 + 24 bits); ``sums_only``: (W^T e_b
    [nb, in], None, None), the same bits (the check of a weight's integrity in _settle: half
    the time, 60 ms against 117 at [4096, 4096] on this Xeon)."""
    out, k = weight.shape
    nb = -(-out // block_o)
    if weight.device.type == "cpu" and weight.dtype in _ONE_PASS_DTYPES and \
            backends.extension_reason(weight.device, "weight_block_sums") is None:
        # the C++ op: one read of W, fp64 accumulators (csrc/linear_cpu.cpp weight_block_sums_cpu;
        # the torch passes below took 3.1 ms a call for the backward's X^T at x [512, 1536] bf16)
        sums, squares, rs = torch.ops.ftattn.weight_block_sums(weight, block_o, row_sums and not sums_only)
        return (sums[:nb], None, None) if sums_only else (sums, squares, rs if row_sums else None)
    sums = torch.zeros(nb if sums_only else 2 * nb, k, dtype=torch.float64, device=weight.device)
    squares = None if sums_only else torch.zeros_like(sums)
    rs = None if sums_only or not row_sums else torch.empty(out, dtype=torch.float64, device=weight.device)
    wts = None if sums_only else checksum_weights(block_o, weight.device)[None, :, None]
    rows_per_chunk = block_o * max(1, (1 << 22) // max(1, block_o * k))
    for o0 in range(0, out, rows_per_chunk):
        w = weight[o0:o0 + rows_per_chunk].to(torch.float64)
        if rs is not None:
            rs[o0:o0 + w.shape[0]] = w.sum(1)
        blocks = torch.arange(o0 // block_o, o0 // block_o + -(-w.shape[0] // block_o), device=weight.device)
        pad = blocks.numel() * block_o - w.shape[0]
        if pad:
            w = torch.cat([w, w.new_zeros(pad, k)])
        w = w.view(blocks.numel(), block_o, k)
        sums[blocks] = w.sum(1)
        if not sums_only:
            squares[blocks] = w.square().sum(1)
            ww = w * wts
            sums[nb + blocks] = ww.sum(1)
            squares[nb + blocks] = ww.square().sum(1)
    return sums, squares, rs


def weight_checksums(weight: torch.Tensor, block_o: int = BLOCK_O, cache: bool = True) -> WeightChecksums:
    """The checksums of ``weight`` (cached: made anew when the weight changed through
    torch, its data pointer, shape, strides or version counter; ``cache=False`` for an
    operand used once, such as the activations of the backward's dW = dY^T X)."""
    if torch.compiler.is_compiling():
        # run, not traced (a graph break): traced, the checksums were made anew each call from
        # the weight as it then was, so a weight corrupted in memory passed under torch.compile
        return _weight_checksums_run(weight, block_o, cache)
    return _weight_checksums(weight, block_o, cache)


def _weight_checksums(weight: torch.Tensor, block_o: int, cache: bool) -> WeightChecksums:
    if cache and weight.is_inference() is False:
        # the last entry of this very tensor object, when its version, data pointer,
        # strides, shape and dtype are those it was made for (views share their base's
        # version counter; 0.5 us instead of the full key's 0.9 us, per call of a layer)
        slot = getattr(weight, _SLOT, None)
        last = slot.get(_LAST) if type(slot) is _Checksums else None
        if last is not None and last[0] == weight._version and last[1] == weight.data_ptr() and \
                last[2] == weight.stride() and last[4].key[1] == weight.shape and last[4].key[3] is weight.dtype \
                and last[4].block_o == block_o and last[3]() is weight.untyped_storage():
            return last[4]
    key = _key(weight, block_o)
    # an inference tensor (made under torch.inference_mode()) has no version counter, so an
    # in-place update cannot be told from a corruption: its entry (version None) is kept all
    # the same (made for each call, the fp64 checksums cost 8-10x the product: 90-100 ms a
    # call at W [4096, 4096] bf16, T = 512, against 11 ms; measured), and a call whose check
    # fails on such an entry runs once more where the checksums made anew differ
    # (_refreshed): an update raises no alarm, a weight corrupted in memory between calls
    # is not caught (as when they were made for each call)
    entry = _cached(weight, key[:-1]) if cache else None
    if entry is not None and entry.key == key:
        if key[-1] is not None:
            _remember(weight, entry)
        return entry
    with torch.no_grad():
        # (row sums for scrub_weights: not of an operand used once)
        sums, squares, row_sums = _block_sums(weight.detach(), block_o, row_sums=cache)
        nb = sums.shape[0] // 2
        if weight.dtype == torch.bfloat16 and nb > FUSED_BLOCKS:
            # many blocks: the references run on the bf16 GEMM, the checksums as hi + mid + lo
            # parts, with fp32 accumulators whose rounding the bound takes from (W^T e_b)^2
            # (three parts: their sum within 2^-26 of the checksum; with two, 2^-17, whose
            # rounding, summed over K through Cauchy-Schwarz, exceeded a quarter of bf16's
            # harm threshold on normal data at K = 4096 and made every call compare a second
            # product)
            hi = sums.to(torch.bfloat16)
            mid = (sums - hi.to(torch.float64)).to(torch.bfloat16)
            lo = (sums - hi.to(torch.float64) - mid.to(torch.float64)).to(torch.bfloat16)
            ref_cols = torch.cat([hi, mid, lo]).contiguous()
            mag_cols = (squares + sums.square()).to(torch.bfloat16).contiguous()
        else:
            # the references in fp64 from the fp64 sums (their rounding next to nothing: a
            # bound from (W^T e_b)^2 grew 128x with an input channel that every output of a
            # block weighs alike, |x_j| 100 and W_oj ~ 0.05, and passed faults up to 3x the
            # harm threshold: found by review)
            ref_cols = sums.contiguous()
            mag_cols = squares.to(torch.float32).contiguous()
    entry = WeightChecksums(key, block_o, sums[:nb], row_sums, ref_cols, mag_cols)
    if cache:
        _store(weight, key[:-1], entry)
        if key[-1] is not None:
            _remember(weight, entry)
    return entry


def carry_cast_checksums(weight: torch.Tensor, cast: torch.Tensor, block_o: int = BLOCK_O) -> None:
    """Give ``cast`` (``weight.to(dtype)``, made for this call from the weight as it is now:
    a protected layer under torch.autocast) the checksums of weight's cast as it was at its
    current version, for both layouts its products read (the forward's, and the transposed
    one of the backward's dX): made once per version of ``weight`` and kept on it (two
    checksum computations, as an fp32 layer's W and W^T after each optimizer step), then
    put on each call's cast (a few microseconds; made per call, they cost 8-10x a product).
    The cast is made from the weight each call, never kept: a weight changed behind its
    version counter (``.data`` writes, memory corruption) then fails the check, as an fp32
    layer's does, instead of a kept cast running the old weight without a word."""
    key = _key(weight, ("cast", cast.dtype, block_o))
    item = _cached(weight, key[:-1])
    if item is None or item[0] != key:
        item = (key, tuple(_weight_checksums(view, block_o, False) for view in (cast, cast.t())))
        _store(weight, key[:-1], item)
    for view, entry in zip((cast, cast.t()), item[1]):
        view_key = _key(view, block_o)
        _store(view, view_key[:-1], dataclasses.replace(entry, key=view_key))


_weight_checksums_run = torch.compiler.disable(_weight_checksums)  # (is_compiling() may stay True in it)


# ---------------------------------------------------------------------------
# fake (meta) kernels


@torch.library.register_fake("ftattn::linear")
def _linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("ftattn::weight_block_sums")
def _weight_block_sums_fake(weight, block_o, row_sums=True):
    nb = -(-weight.shape[0] // block_o)
    new = lambda *shape: weight.new_empty(shape, dtype=torch.float64)  # noqa: E731
    return new(2 * nb, weight.shape[1]), new(2 * nb, weight.shape[1]), new(weight.shape[0] if row_sums else 0)


@torch.library.register_fake("ftattn::linear_eager")
def _linear_eager_fake(x, weight, bias, ref_cols, mag_cols, block_o):
    y, flags = _linear_fwd_fake(x, weight, bias, ref_cols, mag_cols, block_o, int(ref_cols is not None), False)
    return y, flags, torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("ftattn::linear_fwd")
def _linear_fwd_fake(x, weight, bias, ref_cols, mag_cols, block_o, protection, recompute, fault=None,
                     fault_value=None):
    nblk = (math.prod(x.shape[:-1]) + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((1, 1, nblk), dtype=torch.int32)


# ---------------------------------------------------------------------------
# backends


backends.register("linear", "cpp", lambda device: backends.extension_reason(device, "linear_fwd"))
backends.register("linear", "triton", backends.triton_reason)
backends.register("linear", "reference", lambda device: None, fallback=True)
BACKENDS = tuple(backends.names("linear"))


def backend_status(device: Union[str, torch.device] = "cpu") -> dict:
    """{backend: None if usable on ``device`` else the reason}."""
    return backends.status("linear", device)


@ieee_fp32_matmul
def linear_reference(x, weight, bias, ref_cols, mag_cols, block_o, protection, recompute, fault=None,
                     fault_value=None):
    """The checked linear layer in PyTorch ops (any device): the same product (fp32
    accumulators), checks, recomputation and flags as the C++ kernel, slower."""
    T, out = x.shape[0], weight.shape[0]

    def product(w):
        return x.to(torch.float32) @ w.to(torch.float32).t()

    w_read = weight
    if fault is not None:
        site, _, _, row, col, dim, bit, span = fault_fields(fault)
    if fault is not None and site == Site.WEIGHT:
        w_read = weight.clone()
        w_read[row, dim:dim + span] = _corrupt(w_read[row, dim:dim + span].float(), bit, fault_value)
    acc = product(w_read)
    if fault is not None and site == Site.GEMM:
        acc[row, col:col + span] = _corrupt(acc[row, col:col + span], bit, fault_value)
    nblk = (T + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    flags = torch.zeros((1, 1, nblk), dtype=torch.int32)
    if protection >= 1 and T > 0 and out > 0:
        flags = _reference_check(acc, x, ref_cols, mag_cols, block_o, TAU[x.dtype], bias)
        faulty = (flags & CHECK_MASK) != 0
        if recompute and bool(faulty.any()):
            acc = product(weight)
            again = _reference_check(acc, x, ref_cols, mag_cols, block_o, 0.0)
            flags = torch.where(faulty, flags | torch.where((again & CHECK_MASK) != 0, int(Check.UNCORRECTED),
                                                            int(Check.CORRECTED)), flags)
    if bias is not None:
        acc = acc + bias.to(torch.float32)
    return acc.to(x.dtype), flags


def _corrupt(value: torch.Tensor, bit: int, fault_value) -> torch.Tensor:
    if bit == BIT_REPLACE:
        return torch.full_like(value, float(fault_value))
    as_int = value.to(torch.float32).view(torch.int32)
    return (as_int ^ torch.tensor(xor_mask(bit, fault_value), dtype=torch.int32)).view(torch.float32)


def _same_rows(a: torch.Tensor, b: torch.Tensor, nblk: int) -> torch.Tensor:
    """Per report block of rows, whether a and b [T, out] hold the same bits."""
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    out = a.shape[-1]
    rows = (a.reshape(-1, out).view(bits) == b.reshape(-1, out).view(bits)).all(1)
    pad = nblk * REPORT_BLOCK_M - rows.numel()
    return torch.nn.functional.pad(rows, (0, pad), value=True).view(nblk, REPORT_BLOCK_M).all(1)


def _reference_check(acc, x, ref_cols, mag_cols, block_o, tau, bias=None) -> torch.Tensor:
    """The flags [1, 1, nblk] of the check, with BLIND where tau > 0 and a row's block is
    blind (as csrc/linear_cpu.cpp blind_block). Per row and block two comparisons: the plain
    block sum, and the sum weighted by checksum_weights (the same bound formula on its own
    magnitudes, sum_{o in b} w_o^2 W_o^2: each accumulator's rounding weighed by w_o)."""
    T, out = acc.shape
    K = x.shape[1]
    nb = -(-out // block_o)
    pad = nb * block_o - out
    blocks = torch.nn.functional.pad(acc.to(torch.float64), (0, pad)).view(T, nb, block_o)
    s = torch.cat([blocks.sum(-1), (blocks * checksum_weights(block_o, acc.device)).sum(-1)], 1)
    split = ref_cols.dtype != torch.float64
    ref = x.to(torch.float64) @ ref_cols.to(torch.float64).t()
    if split:
        ref = ref[:, :2 * nb] + ref[:, 2 * nb:4 * nb] + ref[:, 4 * nb:]
    mag = x.to(torch.float64).square() @ mag_cols.to(torch.float64).t()
    bound = check_factor(K, split, block_o) * mag.sqrt() + ETA * (K + 1) * (block_o + 1)
    # finite magnitudes or checksums overflowed (|W| from ~1e18; bf16 parts at ~1e37), or 0 x
    # inf: no bound or no reference, blind (as C++; NaN / Inf in x or W reaches s)
    no_bound = (~torch.isfinite(mag) | ~torch.isfinite(ref)) & torch.isfinite(s)
    bad = ~((s - ref).abs() <= bound) & ~no_bound
    y = acc if bias is None else acc + bias.to(torch.float32)
    ymax = y.abs().nan_to_num(0.0).amax(1, keepdim=True).to(torch.float64)  # (the row's: as C++)
    worst = torch.where(no_bound, 0.0, bound).amax(1, keepdim=True)
    near = ~((s - ref).abs()[:, nb:] <= WEIGHTED_VERIFY * bound[:, nb:]).any(1)
    blind_rows = ~bad.any(1) & (no_bound.any(1) | near | ~(2 * worst <= tau * ymax.clamp(min=1.0)).squeeze(1)) \
        & (tau > 0)
    nonfinite = ~torch.isfinite(x).all(1) | (~torch.isfinite(ref) & ~no_bound).any(1)
    row_bits = torch.where(bad.any(1), torch.where(nonfinite, int(Check.NONFINITE_INPUT),
                                                   int(Check.GEMM_ROW_CHECKSUM)), 0).to(torch.int32)
    nblk = (T + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    padded = torch.nn.functional.pad(row_bits, (0, nblk * REPORT_BLOCK_M - T)).view(nblk, REPORT_BLOCK_M)
    out_bits = torch.zeros(nblk, dtype=torch.int32)
    for bit in (int(Check.NONFINITE_INPUT), int(Check.GEMM_ROW_CHECKSUM)):
        out_bits |= torch.where(((padded & bit) != 0).any(1).cpu(), bit, 0).to(torch.int32)
    blind = torch.nn.functional.pad(blind_rows, (0, nblk * REPORT_BLOCK_M - T)).view(nblk, REPORT_BLOCK_M).any(1)
    out_bits |= torch.where(blind, int(Check.BLIND), 0).to(torch.int32)
    return out_bits.view(1, 1, nblk)


# ---------------------------------------------------------------------------
# validation


def validate_inputs(x, weight, bias) -> None:
    """The one validation of a linear call's tensors: an error that names the value,
    what is supported and the fix."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ftattn.linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"ftattn.linear: weight must be 2-D [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("ftattn.linear: x must have at least one dim [..., in_features], got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"ftattn.linear: x has {x.shape[-1]} features (last dim of {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} takes {weight.shape[1]}; pass x [..., {weight.shape[1]}]")
    dt, dev = weight.dtype, weight.device
    if x.dtype is dt and x.device == dev and dt in SUPPORTED_DTYPES and (
            bias is None or (type(bias) is torch.nn.Parameter or type(bias) is torch.Tensor) and bias.dtype is dt
            and bias.device == dev and bias.dim() == 1 and bias.shape[0] == weight.shape[0]):
        return  # the common case, in a few comparisons (the messages below name what is wrong)
    tensors = [("x", x), ("weight", weight)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"ftattn.linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"ftattn.linear: bias must be [{weight.shape[0]}] (one per output feature), got "
                             f"{tuple(bias.shape)}")
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"ftattn.linear: {name}.dtype={t.dtype} is not supported; use float16, bfloat16 or "
                            f"float32 (e.g. {name}.to(torch.float32))")
    if len({t.dtype for _, t in tensors}) != 1:
        raise TypeError("ftattn.linear: x, weight and bias must share one dtype, got "
                        + ", ".join(f"{n} {t.dtype}" for n, t in tensors) + "; cast them to one (e.g. x.to(weight.dtype))")
    if len({t.device for _, t in tensors}) != 1:
        raise ValueError("ftattn.linear: x, weight and bias must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in tensors) + "; move them")


_PROTECTION = {"off": Protection.OFF, "abft": Protection.ABFT, "full": Protection.ABFT}
_ON_FAULT = {p.value: p for p in OnFault}
_CPU_AUTO_RESOLVED = False  # "auto" was resolved on the CPU once (then _CPP_ON_CPU holds the answer)
_CPU = torch.device("cpu")
_CPP_ON_CPU = False  # "auto" resolved to the C++ kernel on the CPU (the fast path's condition)
_EAGER_OP = torch.ops.ftattn.linear_eager.default  # (the extension is loaded: ftattn/__init__.py)
# (protection, on_fault) -> (protection as an int, recompute, policy) for the fast path
_EAGER_OPTIONS = {(name, policy.value): (int(prot), policy is OnFault.CORRECT, policy)
                  for name, prot in _PROTECTION.items() for policy in OnFault}


def _parse_options(protection, on_fault) -> Tuple[Protection, OnFault]:
    prot = _PROTECTION.get(protection) if isinstance(protection, str) else None
    if prot is None:
        raise ValueError(f"ftattn.linear: protection={protection!r} is not supported; use 'off' or 'abft' "
                         f"('full' means 'abft' for a linear layer)")
    policy = _ON_FAULT.get(on_fault) if isinstance(on_fault, str) else None
    if policy is None:
        raise ValueError(f"ftattn.linear: on_fault={on_fault!r} is not supported; use 'correct', 'raise' or "
                         f"'report'")
    return prot, policy


# ---------------------------------------------------------------------------
# the public function


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    protection: str = "abft",
    on_fault: str = "correct",
    fault: Optional[Fault] = None,
    backend: str = "auto",
    return_report: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Report]]:
    """y = x W^T + b, checked.

    Args:
        x: [..., in_features]; float32, bfloat16 or float16 (one dtype for x, weight, bias).
        weight: [out_features, in_features] (a transposed view, as a GPT-2 Conv1D's
            weight.t(), is read in place).
        bias: [out_features] or None.
        protection: "off" (the product only) or "abft" (row checksums over blocks of
            output features against the weight's cached checksums); "full" means "abft".
        on_fault: "correct" (recompute the product and return the clean result),
            "raise" (``FaultDetectedError``), "report" (return y as computed).
        fault: an ``ftattn.Fault`` with site "gemm" (the fp32 accumulator of y[row, col])
            or "weight" (W[row, dim] as the call reads it), for tests and campaigns.
        backend: "auto" (CPU: C++, CUDA: Triton), "cpp", "triton" (CPU tensors: the Triton
            interpreter), "reference" (PyTorch ops, any device).
        return_report: also return an ``ftattn.Report`` (flags per block of 64 rows of x,
            its leading dims flattened).

    Returns:
        y [..., out_features] in x's dtype, or ``(y, report)``.

    NaN/Inf in x or weight are reported as non-finite input, never as a fault. A nested
    tensor x (torch.nested) runs as the rows of its components, one product and report.
    """
    if x.is_nested:
        from ._nested import on_rows

        return on_rows(x, lambda rows: _linear(rows, weight, bias, protection, on_fault, fault, backend,
                                               return_report), "ftattn.linear")
    return _linear(x, weight, bias, protection, on_fault, fault, backend, return_report)


class _CheckedLinear(torch.autograd.Function):
    """Autograd of the checked linear layer: the backward's two products are checked
    linear layers too, with the call's protection and policy:
    dX = dY W (the "weight" W^T, its checksums cached like W's) and dW = dY^T X (the
    "weight" X^T, an operand used once: checksums made for the call); db = sum of dY.
    Forward mode (jvp: dY = dX W^T + X dW^T + db, its products checked likewise) and the
    torch.func transforms (grad, jvp, vmap) too: a dual tensor's tangent was dropped
    without a word, torch.func.jvp / grad / vmap failed inside (found by review)."""

    @staticmethod
    def forward(x, weight, bias, protection, on_fault, fault, backend):
        y, report = _linear_impl(x, weight, bias, protection, on_fault, fault, backend, True)
        return y, report.flags

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, protection, on_fault, fault, backend = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.options = (protection, on_fault, backend, bias is not None)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y, _grad_flags):
        x, weight = ctx.saved_tensors
        protection, on_fault, backend, has_bias = ctx.options
        grad_x = _grad_input(grad_y, weight, protection, on_fault, backend) if ctx.needs_input_grad[0] else None
        grad_w = _grad_weight(grad_y, x, protection, on_fault, backend) if ctx.needs_input_grad[1] else None
        grad_b = grad_y.reshape(-1, weight.shape[0]).sum(0) if has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, weight = ctx.saved_tensors
        protection, on_fault, backend, _has_bias = ctx.options
        dy = None
        # (through _linear: under torch.func.jvp these tensors are the transform's, and its
        # products go through this Function again, so they get a derivative themselves)
        if dx is not None:
            dy = _linear(dx, weight, None, protection, on_fault, None, backend, False)
        if dw is not None:
            part = _linear(x, dw, None, protection, on_fault, None, backend, False)
            dy = part if dy is None else dy + part
        if db is not None:
            dy = db.expand(*x.shape[:-1], weight.shape[0]) if dy is None else dy + db
        if dy is None:
            dy = x.new_zeros(*x.shape[:-1], weight.shape[0])
        return dy, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, protection, on_fault, fault, backend):
        x_dim, w_dim, b_dim = in_dims[:3]
        if w_dim is None and b_dim is None:  # one weight: the batch is more rows of x
            y, flags = _CheckedLinear.apply(x.movedim(x_dim, 0), weight, bias, protection, on_fault, fault, backend)
            return (y, flags), (0, None)
        # a weight per sample: one checked product per sample
        def at(t, dim, i):
            return t if t is None or dim is None else t.select(dim, i)

        outs = [_CheckedLinear.apply(at(x, x_dim, i), at(weight, w_dim, i), at(bias, b_dim, i), protection,
                                     on_fault, fault if i == 0 else None, backend) for i in range(info.batch_size)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


_CheckedLinearEager = eager_twin(_CheckedLinear)


# The backward's two products (_CheckedLinear, and a protected layer's compiled backward,
# protect.py): checked linear layers with the call's protection and policy. With
# create_graph=True (a gradient penalty) they are checked linear layers with autograd
# themselves, so a second backward is right and checked too (through the op without
# autograd it returned zeros, with only torch's warning).
def _grad_input(grad_y: torch.Tensor, weight: torch.Tensor, protection: str, on_fault: str,
                backend: str) -> torch.Tensor:
    """dX = dY W (the "weight" W^T, its checksums cached like W's)."""
    if torch.is_grad_enabled():
        return _linear(grad_y, weight.t(), None, protection, on_fault, None, backend, False)
    return _linear_impl(grad_y, weight.t(), None, protection, on_fault, None, backend, False)


def _grad_weight(grad_y: torch.Tensor, x: torch.Tensor, protection: str, on_fault: str,
                 backend: str) -> torch.Tensor:
    """dW = dY^T X (the "weight" X^T, an operand used once: checksums made for the call)."""
    g2 = grad_y.reshape(-1, grad_y.shape[-1]).t()
    x2 = x.reshape(-1, x.shape[-1]).t()
    if torch.is_grad_enabled():
        return _linear(g2, x2, None, protection, on_fault, None, backend, False)
    return _linear_impl(g2, x2, None, protection, on_fault, None, backend, False, cache=False)


def _resolve(backend: str, device: torch.device) -> str:
    """The backend ``backend`` ("auto" or a name) runs on ``device`` (backends.resolved)."""
    resolved = backends.resolved("linear", backend, device)
    if backend == "auto" and device == _CPU:
        global _CPP_ON_CPU, _CPU_AUTO_RESOLVED
        _CPP_ON_CPU, _CPU_AUTO_RESOLVED = resolved == "cpp", True
    return resolved


def _eager_cpu(x, weight, bias, protection, on_fault):
    """The common call (CPU tensors, the C++ kernel, no fault, no gradient) in a few Python
    steps: (y, flags, rows, policy, whether a flag is set), or None where the general path
    must run (anything else, and every input it would reject: it names the problem).
    (Each step is counted: a decode step calls this per layer, for a GEMV of microseconds;
    `is_cpu` instead of `device.type` saves 0.2 us a tensor.)"""
    options = _EAGER_OPTIONS.get((protection, on_fault))
    if not _CPU_AUTO_RESOLVED:
        _resolve("auto", _CPU)
    dtype = x.dtype
    if options is None or not _CPP_ON_CPU or not x.is_cpu or not weight.is_cpu or weight.dtype is not dtype \
            or dtype not in SUPPORTED_DTYPES or weight.ndim != 2 or x.ndim < 1:
        return None
    out, k = weight.shape
    shape = x.shape
    if shape[-1] != k or type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor or (
            bias is not None and (bias.dtype is not dtype or not bias.is_cpu or bias.ndim != 1
                                  or bias.shape[0] != out)):
        return None
    prot, recompute, policy = options
    rows = shape[0] if len(shape) == 2 else math.prod(shape[:-1])
    if rows == 0:
        return None
    # (loaded: _CPP_ON_CPU); x [..., in] as it is; the flags OR-ed as an int come back with y
    if prot:
        sums = weight_checksums(weight)
        y, flags, flagged = _EAGER_OP(x, weight, bias, sums.ref_cols, sums.mag_cols, sums.block_o)
        if flagged:
            y, flags, flagged = _eager_flagged(x, weight, bias, sums, y, flags, prot, recompute)
    else:
        y, flags, _ = _EAGER_OP(x, weight, bias, None, None, BLOCK_O)
        flagged = False
    return y, flags, rows, policy, flagged


def _eager_flagged(x, weight, bias, sums, y, flags, prot, recompute):
    """A checked eager call (linear_eager) whose flags are set: linear_fwd's _recheck;
    (y, flags, flagged)."""
    args = (x, weight, bias, sums.ref_cols, sums.mag_cols, sums.block_o, prot, False, None, None)
    y, flags = _recheck(torch.ops.ftattn.linear_fwd.default, args, y, flags, weight, sums, recompute, True)
    return y, flags, bool((flags != 0).any())


def _recheck(run, args, y, flags, weight, sums, recompute: bool, refresh: bool):
    """A checked call's flags settled: with ``refresh``, an inference tensor's cached
    checksums made anew where the weight changed in place (_refreshed) and the call run
    again on them; then a failed or blind block compared with a second product (_settle).
    ``args``: linear_fwd's, ``run`` the backend's."""
    fresh = _refreshed(weight, sums, flags) if refresh else None
    if fresh is not None:
        sums = fresh
        args = (*args[:3], fresh.ref_cols, fresh.mag_cols, *args[5:])
        y, flags = run(*args)
    return _settle(run, args, y, flags, weight, sums, recompute)


def _linear(x, weight, bias, protection, on_fault, fault, backend, return_report):
    derivative = needs_function(x, weight, bias)
    if fault is None and backend == "auto" and not derivative:
        fast = _eager_cpu(x, weight, bias, protection, on_fault)
        if fast is not None:
            y, flags, rows, policy, flagged = fast
            if flagged or return_report:
                report = _apply_policy(flags, policy, rows, return_report, op="linear")
                return (y, report) if return_report else y
            return y
    if derivative:
        validate_inputs(x, weight, bias)
        y, flags = apply(_CheckedLinear, _CheckedLinearEager, x, weight, bias, protection, on_fault, fault, backend)
        if return_report:
            return y, Report(flags, REPORT_BLOCK_M, math.prod(x.shape[:-1]), "linear")
        return y
    return _linear_impl(x, weight, bias, protection, on_fault, fault, backend, return_report)


def _linear_impl(x, weight, bias, protection, on_fault, fault, backend, return_report, cache=True):
    validate_inputs(x, weight, bias)
    prot, policy = _parse_options(protection, on_fault)
    lead, (out, k) = x.shape[:-1], weight.shape
    rows = math.prod(lead)
    x2 = x.reshape(rows, k)
    if fault is not None:
        if not isinstance(fault, Fault):
            raise TypeError(f"ftattn.linear: fault must be an ftattn.Fault, got {type(fault).__name__}")
        fault.validate_linear(rows, out, k)
    if x.device.type == "meta":
        backends.parse("linear", backend)
        backend = "meta"
    else:
        backend = _resolve(backend, x.device)
    fault_list, fault_value = fault.encode() if fault is not None else (None, None)
    sums = weight_checksums(weight, cache=cache) if prot >= Protection.ABFT and backend != "meta" else None
    # (the C++ kernel reads a column-major x as it is: the backward's dY^T, not copied)
    x2 = x2 if x2.is_contiguous() or (backend == "cpp" and x2.stride(0) == 1) else x2.contiguous()
    args = (x2, weight, bias, sums.ref_cols if sums else None,
            sums.mag_cols if sums else None, sums.block_o if sums else BLOCK_O, int(prot), False, fault_list,
            fault_value)
    if backend == "meta":
        run = _linear_fwd_fake
    elif backend == "reference":
        run = linear_reference
    elif backend == "triton":
        try:
            from ._launch import linear as launcher
        except ImportError as exc:
            raise NotImplementedError(f"backend='triton' cannot run here: the Triton kernel does not import: {exc}") \
                from exc
        run = launcher.linear_fwd
    else:
        run = torch.ops.ftattn.linear_fwd
    y, flags = run(*args)
    if backend != "meta":
        y, flags = _recheck(run, args, y, flags, weight, sums, policy is OnFault.CORRECT, fault is None and cache)
    report = _apply_policy(flags, policy, rows, return_report, op="linear")
    y = y.reshape(*lead, out)
    return (y, report) if return_report else y


def _register_kernels() -> None:
    for device in ("CPU", "CUDA"):
        @torch.library.impl("ftattn::linear", device)
        def _linear_op(x, weight, bias=None):
            no_tangents(x, weight, bias, op="torch.ops.ftattn.linear", instead="ftattn.linear(x, weight, bias)")
            return _linear_impl(x, weight, bias, "abft", "correct", None, "auto", False)

    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y):
        # the backward's products through the op itself: checked (abft, correct) as the forward
        x, weight = ctx.saved_tensors
        out, k = weight.shape
        g2 = grad_y.reshape(-1, out)
        grad_x = torch.ops.ftattn.linear(grad_y, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = torch.ops.ftattn.linear(g2.t(), x.reshape(-1, k).t()) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b

    torch.library.register_autograd("ftattn::linear", backward, setup_context=setup_context)


_register_kernels()
