"""ftattn.attention: fault-tolerant scaled-dot-product attention.

The op schemas live in csrc/ftattn.cpp (``ftattn::attention``,
``ftattn::attention_fwd``); the CPU kernel of ``attention_fwd`` in
csrc/attention_cpu.cpp; the CUDA one in kernels/attention.py (Triton, launched by
ftattn/_launch/attention.py, imported on first use); the pure-PyTorch reference with
the same checks in ftattn/reference.py. This file holds the fake (meta) kernels, input
validation, backend choice, the ``on_fault`` policy and the public function, which
``ftattn::attention`` runs on CPU and CUDA tensors too.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from . import backends
from ._ad import apply, eager_twin, needs_function
from .contract import check_backward_fault_encoding
from .faults import (ATTENTION_SITES, BACKWARD_SITES, Check, Fault, FaultDetectedError, OnFault,
                     Protection, Report, REPORT_BLOCK_M, fault_blocks)

__all__ = ["attention", "BACKENDS", "backend_status"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------
# fake (meta) kernels: shapes only, for torch.compile / export / opcheck


@torch.library.register_fake("ftattn::attention")
def _attention_fake(q, k, v, key_start=None, key_end=None, *, causal=False, scale=None, protection="full",
                    on_fault="correct"):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("ftattn::attention_fwd")
def _attention_fwd_fake(q, k, v, causal, scale, protection, recompute, fault=None, fault_value=None, key_start=None,
                        key_end=None, stats=None):
    B, Hq, N, D = q.shape
    nblk = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    flags = q.new_empty((B, Hq, nblk), dtype=torch.int32)
    return out, flags


@torch.library.register_fake("ftattn::attention_bwd")
def _attention_bwd_fake(q, k, v, out, grad_out, causal, scale, protection, recompute, fault=None, fault_value=None,
                        key_start=None, key_end=None, stats=None):
    B, Hq, N, D = q.shape
    nblk = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M + (k.shape[2] + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty((B, Hq, nblk), dtype=torch.int32))


# ---------------------------------------------------------------------------
# backends


def _triton_kernel():
    """The Triton launcher (ftattn/_launch/attention.py)."""
    try:
        from ._launch import attention as launcher
    except ImportError as exc:
        raise NotImplementedError(f"backend='triton' cannot run here: the Triton kernel does not import: {exc}") from exc
    return launcher


def _triton_backward():
    """The Triton backward's launcher (ftattn/_launch/attention_backward.py)."""
    try:
        from ._launch import attention_backward as launcher
    except ImportError as exc:
        raise NotImplementedError(f"backend='triton' cannot run here: the Triton kernel does not import: {exc}") from exc
    return launcher


def _cpp_reason(device: torch.device) -> Optional[str]:
    return backends.extension_reason(device, "attention_fwd")


backends.register("attention", "cpp", _cpp_reason)
backends.register("attention", "triton", backends.triton_reason)
backends.register("attention", "reference", lambda device: None, fallback=True)
BACKENDS = tuple(backends.names("attention"))  # ("auto", "cpp", "triton", "reference")


def backend_status(device: Union[str, torch.device] = "cpu") -> dict:
    """{backend: None if usable on ``device`` else the reason} (``python -m ftattn info``)."""
    return backends.status("attention", device)


_CPU = torch.device("cpu")


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that runs a call on q's device (backends.resolved, kept per device
    there); a CPU tensor's without building q.device (a decode step's call: 1.3 -> 0.5 us)."""
    if q.is_cpu:
        return backends.resolved("attention", backend, _CPU)
    device = q.device
    if device.type == "meta":  # shapes only: the op's fake kernel, whatever the backend
        backends.parse("attention", backend)
        return "meta"
    return backends.resolved("attention", backend, device)


def _run_fwd(backend, q, k, v, causal, scale, protection, recompute, fault, fault_value, key_start=None,
             key_end=None, in_op=False, stats=None):
    """(out, flags) of one backend. The public function calls the op ``attention_fwd``
    (opaque to torch.compile); inside ``ftattn::attention`` (in_op) the Triton launcher
    is called directly, not through the dispatcher a second time. stats (the C++ kernel
    only, backend "cpp"): each row's max and normaliser are written there, for the
    backward."""
    args = (q, k, v, causal, scale, protection, recompute, fault, fault_value, key_start, key_end)
    if backend == "meta":
        return _attention_fwd_fake(*args)
    if backend == "reference":
        from .reference import attention_reference

        return attention_reference(*args)
    if backend == "triton" and (in_op or q.device.type == "cpu"):  # (CPU: the Triton interpreter)
        return _triton_kernel().attention_fwd(*args)
    if stats is not None:
        return torch.ops.ftattn.attention_fwd.default(*args, stats=stats)
    return torch.ops.ftattn.attention_fwd.default(*args)  # (.default: no overload lookup per call)


# ---------------------------------------------------------------------------
# validation


def validate_inputs(q, k, v, scale) -> None:
    """The one validation of an attention call's tensors and scale (every backend, the
    public function and the ops' Python kernels): an error that names the value, what
    is supported and the fix."""
    # (each step costs: a decode step calls this per layer; is_cpu instead of building
    # three torch.device objects, torch.Size compared as it is; 4.3 -> 2 us here)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ftattn.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"ftattn.attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"ftattn.attention: {name}.dtype={t.dtype} is not supported; use float16, bfloat16 or float32 "
                f"(e.g. {name}.to(torch.float16))"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"ftattn.attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            f"cast them to one (e.g. k.to(q.dtype)), or run under torch.autocast, which casts them to its dtype "
            f"as it does torch's scaled_dot_product_attention's"
        )
    if not (q.is_cpu and k.is_cpu and v.is_cpu) and not (q.device == k.device == v.device):
        raise ValueError(
            f"ftattn.attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them"
        )
    B, Hq, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"ftattn.attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, M, Dk = k.shape
    if Bk != B:
        raise ValueError(f"ftattn.attention: batch of q ({B}) and k/v ({Bk}) differ")
    if Dk != D:
        raise ValueError(f"ftattn.attention: head_dim of q ({D}) and k/v ({Dk}) differ")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"ftattn.attention: head_dim={D} is not supported; use 1..{MAX_HEAD_DIM}")
    if Hkv < 1:  # (no query head with key / value heads is an empty call, as an empty batch)
        raise ValueError(
            f"ftattn.attention: k and v have {Hkv} heads (q {Hq}); at least one key/value head is needed: "
            f"shapes are [batch, heads, seq, head_dim], check dim 1"
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"ftattn.attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) "
            f"for grouped-query attention; repeat k/v heads or fix the head counts"
        )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"ftattn.attention: scale must be a float or None, got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"ftattn.attention: scale={scale} is not finite; pass a finite float or None (1/sqrt(D))")


_is_batched = torch._C._functorch.is_batchedtensor


def validate_key_range(q, k, key_start, key_end) -> None:
    """Per-sample key ranges: both or neither, integer tensors [B] on q's device, and
    0 <= key_start <= key_end <= M (read on the host: the kernels index k and v with them)."""
    if key_start is None and key_end is None:
        return
    if key_start is None or key_end is None:
        raise ValueError("ftattn.attention: key_start and key_end go together; pass both (or neither)")
    B, M = q.shape[0], k.shape[2]
    for name, t in (("key_start", key_start), ("key_end", key_end)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != B or t.is_floating_point() or \
                t.dtype == torch.bool:
            raise TypeError(f"ftattn.attention: {name} must be an integer tensor of shape [{B}] (one key index per "
                            f"sample), got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device and not t.is_meta and not q.is_meta:
            raise ValueError(f"ftattn.attention: {name} is on {t.device}, q on {q.device}; move it to q's device")
    if q.is_meta or key_start.is_meta:
        return
    if _is_batched(key_start) or _is_batched(key_end):
        return  # (under torch.func.vmap: checked on the folded ranges, _AttentionFunction.vmap)
    if torch.compiler.is_compiling():  # no host read in a graph: an assertion when it runs
        ok = ((key_start >= 0) & (key_start <= key_end) & (key_end <= M)).all()
        torch._assert_async(ok, "ftattn.attention: the key ranges must satisfy 0 <= key_start <= key_end <= M")
        return
    start, end = key_start.tolist(), key_end.tolist()
    for b, (s, e) in enumerate(zip(start, end)):
        if not 0 <= s <= e <= M:
            raise ValueError(f"ftattn.attention: sample {b} has keys [{s}, {e}); they must satisfy "
                             f"0 <= key_start <= key_end <= M = {M}")


def _parse_options(protection, on_fault) -> Tuple[Protection, OnFault]:
    parsed = _OPTIONS.get((protection, on_fault)) if isinstance(protection, str) and isinstance(on_fault, str) \
        else None
    if parsed is not None:
        return parsed
    try:
        prot = Protection[protection.upper()] if isinstance(protection, str) else None
    except KeyError:
        prot = None
    if prot is None:
        raise ValueError(f"ftattn.attention: protection={protection!r} is not supported; use 'off', 'abft' or 'full'")
    try:
        policy = OnFault(on_fault)
    except ValueError:
        raise ValueError(
            f"ftattn.attention: on_fault={on_fault!r} is not supported; use 'correct', 'raise' or 'report'"
        ) from None
    return prot, policy


_OPTIONS = {(p.name.lower(), f.value): (p, f) for p in Protection for f in OnFault}


def _faulty(flags: torch.Tensor, op: str = "attention") -> torch.Tensor:
    """Per block: a check failed on finite input (faults.fault_blocks)."""
    return fault_blocks(flags, op)


def _apply_policy(flags: torch.Tensor, policy: OnFault, n: int, want_report: bool,
                  op: str = "attention", keys: int = 0) -> Optional[Report]:
    """The ``on_fault`` policy of every op, in one place: "raise" raises
    FaultDetectedError when a check failed on finite input ("correct" and "report"
    return; the kernel recomputed or not). Returns the Report when asked for."""
    if policy is not OnFault.RAISE and not want_report:
        return None
    report = Report(flags, REPORT_BLOCK_M, n, op, keys)
    if policy is OnFault.RAISE and not flags.is_meta:  # (meta: no kernel ran, nothing to raise)
        faulty = _faulty(flags, op)
        if bool(faulty.any()):
            raise FaultDetectedError(report)
    return report


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    protection: str = "full",
    on_fault: str = "correct",
    fault: Optional[Fault] = None,
    backend: str = "auto",
    return_report: bool = False,
    key_start: Optional[torch.Tensor] = None,
    key_end: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Report]]:
    """softmax(q k^T * scale) v, checked inside the kernel.

    Args:
        q: [B, Hq, N, D] queries; float16, bfloat16 or float32; D in 1..256.
        k, v: [B, Hkv, M, D] keys and values; Hq a multiple of Hkv (grouped-query).
        causal: mask key j for query i when j > i + (M - N). Aligned at the bottom
            right, as flash-attention >= 2.1 and KV-cache decoding need; torch's
            ``scaled_dot_product_attention(is_causal=True)`` aligns at the top left
            (the two agree when N == M). A row with no visible key returns zeros.
        scale: multiplier of q k^T; default 1/sqrt(D).
        protection: "off" (plain fused attention), "abft" (checksums of QK^T and
            PV, invariants on the running max and normaliser), "full" (abft plus a
            redundant softmax).
        on_fault: "correct" (recompute the affected query block and return the
            clean result), "raise" (``FaultDetectedError``), "report" (return the
            output as computed).
        fault: an ``ftattn.Fault`` to inject (testing and campaigns).
        backend: "auto" (CUDA -> Triton, CPU -> C++), "cpp", "triton", "reference".
        return_report: also return an ``ftattn.Report``.
        key_start, key_end: integer tensors [B] (both or neither): sample b attends to its
            keys key_start[b] <= j < key_end[b] only, causal aligned at key_end[b], so a
            padded batch runs as one call (flash-attention's varlen keys); a sample with
            no key gets zeros. Faults and the report keep the whole batch's coordinates.

    Returns:
        out [B, Hq, N, D] in q's dtype, or ``(out, report)``.

    NaN/Inf in q, k or v are reported as non-finite input (``report.nonfinite_input``),
    never as a fault and never "corrected"; the output then holds what the
    arithmetic gives, as in torch.
    """
    return _attention(q, k, v, causal, scale, protection, on_fault, fault, backend, return_report, key_start,
                      key_end)


def _autocast(q, k, v):
    """q, k, v as torch's scaled_dot_product_attention gets them under torch.autocast (on
    autocast's lower-precision list): where autocast is on for q's device, each floating
    tensor but float64 cast to its dtype (Llama's rotary step gives fp32 q, k and a bf16 v
    under autocast bf16); else as they are (mixed dtypes then stay an error). ~0.4 us."""
    if not isinstance(q, torch.Tensor):
        return q, k, v
    device = "cpu" if q.is_cpu else q.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 and t.device == q.device else t for t in (q, k, v))


def _attention(q, k, v, causal, scale, protection, on_fault, fault, backend, return_report, key_start=None,
               key_end=None, in_op=False, want_flags=False):
    """want_flags (an inference call: no gradient, no fault; the integration's counters):
    (out, flags, whether any flag is set) with the policy applied, no Report made."""
    q, k, v = _autocast(q, k, v)
    validate_inputs(q, k, v, scale)
    validate_key_range(q, k, key_start, key_end)
    prot, policy = _parse_options(protection, on_fault)
    if fault is not None:
        if not isinstance(fault, Fault):
            raise TypeError(f"ftattn.attention: fault must be an ftattn.Fault, got {type(fault).__name__}")
        fault.validate(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])
    backend = _resolve_backend(backend, q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    fault_list, fault_value = fault.encode() if fault is not None else (None, None)
    recompute = policy is OnFault.CORRECT
    # (through the autograd.Function also for a forward-mode tangent, whose jvp says it has
    # none, and under torch.func's transforms, whose vmap rule folds the batch: a tangent was
    # dropped, torch.func.jvp gave a wrong one and vmap failed in the kernel, found by review)
    grad = needs_function(q, k, v)
    bwd_fault = None
    if fault is not None and fault.site in BACKWARD_SITES:
        if not grad:
            raise ValueError(
                f"ftattn.attention: fault site {fault.site!r} is in the backward, which this call will not run: "
                f"q, k or v must require grad (with grad enabled); forward sites are {', '.join(ATTENTION_SITES)}")
        bwd_fault, fault_list = (fault_list, fault_value), None
    if grad:
        holder = _BackwardHolder(policy, bwd_fault)
        holder.read = policy is OnFault.RAISE or return_report
        out, flags, _ = apply(_AttentionFunction, _AttentionFunctionEager, q, k, v, key_start, key_end, (
            backend, causal, float(scale), int(prot), recompute, fault_list, fault_value, in_op, holder))
        report = _apply_policy(flags, policy, q.shape[2], return_report)
        holder.report = report
        return (out, report) if return_report else out
    out, flags = _run_fwd(backend, q, k, v, causal, float(scale), int(prot), recompute, fault_list, fault_value,
                          key_start, key_end, in_op)
    flagged = False
    if (policy is OnFault.RAISE or return_report or want_flags) and _flagged(flags := _host(flags)):
        flagged = True
        if _needs_rescale(flags, policy):
            rescaled = _rescaled_fwd(backend, q, k, v, causal, float(scale), int(prot), recompute, fault_list,
                                     fault_value, key_start, key_end, in_op)
            if rescaled is not None:
                out, flags = rescaled
                flagged = _flagged(flags := _host(flags))
    report = _apply_policy(flags, policy, q.shape[2], return_report)
    if want_flags:
        return out, flags, flagged
    return (out, report) if return_report else out


# ---------------------------------------------------------------------------
# inputs near fp32's range: the call again on operands scaled by powers of two
#
# The kernels' checksums add up scores (|q . k| summed over a block's rows and keys),
# values (|v| over head dims) and products of dO and v in fp32 partial sums; from
# magnitudes around 1e36 those sums overflow on finite input: the check compared inf with
# inf (a false alarm on clean data, uncorrectable) or passed anything under an infinite
# bound (a fault missed); and from |v| ~ 1e38 the unnormalised P V accumulator overflows
# while the output would be finite. The kernels now fail a check whose bound is not finite
# (csrc/attention/common.h's within), and such a call runs again here. Attention is exact
# under power-of-two scaling: with q' = q 2^-a, k' = k 2^-b, v' = v 2^-c and scale
# 2^(a + b), S' = S 2^-(a + b) and (S' - m') scale' = (S - m) scale, so P is the same and
# O = O' 2^c; the backward with dO' = dO 2^-e gives dQ = dQ' 2^(c + e - a), dK = dK' 2^(c +
# e - b) and dV = dV' 2^e. Bit for bit, as long as nothing in the scaled run falls below
# fp32's normal range where the unscaled one did not: each operand is brought down only to
# magnitudes below 2^41 (SCALED_MAX, every checksum then far from overflow) and, unless the
# call would stay in the hazard, never so far that its smallest nonzero magnitude leaves the
# normal range; a product of p < 1 and a scaled value can still round to a subnormal the
# unscaled one did not (a change below 2^-126). A call whose checks failed where what their
# sums can reach (_hazard) is RANGE_HAZARD or more runs once more so scaled, and that run's
# checks decide. Real activations sit some 30 orders of magnitude below: a fault on them is
# never run past twice.
RANGE_HAZARD = 2.0 ** 100  # _hazard's bound on the checks' sums: from here a call may be scaled
SCALED_MAX = 40  # an operand above 2^(SCALED_MAX + 1) is scaled to below it
_OVERFLOW_NEAR = 2.0 ** 120  # _hazard from which the exact exponents do not do (fp32's sums overflow at 2^128)
_NORMAL_EXPONENT = -126  # fp32's (and bfloat16's) smallest normal is 2^-126
_MAX_SCALE = 2.0 ** 126  # scale' stays a finite, normal fp32 value with room to spare


def _finite_abs(t: torch.Tensor) -> torch.Tensor:
    """|t| in fp32 with NaN and inf as 0 (non-finite values, e.g. in keys outside every
    sample's range, neither set nor block the scaling; the kernels report them)."""
    a = t.detach().abs().float()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))


def _exponent(t: torch.Tensor) -> Tuple[float, int, int]:
    """(t's largest finite magnitude, need, exact): t 2^-need is below 2^(SCALED_MAX + 1);
    exact <= need keeps t's smallest nonzero magnitude normal (t 2^-exact exact). Both >= 0
    (nothing is scaled up)."""
    mag = _finite_abs(t)
    amax = float(mag.amax()) if mag.numel() else 0.0
    need = math.frexp(amax)[1] - 1 - SCALED_MAX  # (2^(need + SCALED_MAX) <= amax < 2^(need + SCALED_MAX + 1))
    if need <= 0:
        return amax, 0, 0
    amin = float(torch.where(mag > 0, mag, torch.full_like(mag, math.inf)).amin())
    return amax, need, max(0, min(need, math.frexp(amin)[1] - 1 - _NORMAL_EXPONENT))


def _hazard(mags, terms: int) -> float:
    """What the checks' sums can reach, from the operands' largest magnitudes (q, k, v[, dO]):
    the column and row references add q or k alone over a block's rows or keys; S, |v| sums,
    dP = dO v^T; the backward's dQ / dK checksums |dS| |k| and |dS| |q|, dS ~ dO v^T over D."""
    mq, mk, mv, md = (list(mags) + [0.0])[:4]
    d = terms[0]
    return max(mq * mk, mq, mk, mv, md * mv, md, md * mv * max(mq, mk) * d) * (terms[0] * terms[1])


def _host(flags: torch.Tensor) -> torch.Tensor:
    """flags on the CPU, read once there by _flagged, _needs_rescale and the Report (one
    device-to-host copy; none for flags that hold no values: see _flagged)."""
    if flags.is_cpu or type(flags) is not torch.Tensor or flags.is_meta or torch.compiler.is_compiling():
        return flags
    return flags.cpu()


def _flagged(flags: torch.Tensor) -> bool:
    """Whether any of a call's flags ([B, H, blocks]) is set: a few read as a list, the rest
    counted (~1 us for 4 to 1,024 blocks, on a loaded 2-core Xeon; `bool(flags.any())` took
    2.5-4.7 us, a nested list of 192 blocks 10 us); never for flags that hold no values
    (meta; traced: under torch.compile, or fake and functional tensors, a torch.Tensor
    subclass each)."""
    if type(flags) is not torch.Tensor or flags.is_meta or torch.compiler.is_compiling():
        return False
    if flags.dim() == 3 and flags.numel() <= 16:
        for per_batch in flags.tolist():
            for per_head in per_batch:
                if any(per_head):
                    return True
        return False
    return flags.count_nonzero().item() != 0


def _needs_rescale(flags: torch.Tensor, policy: OnFault) -> bool:
    """Of flags that _flagged found set: a failed check on finite input that the call did
    not settle, any at "raise" and "report" (no recomputation), an UNCORRECTED one at
    "correct"."""
    bad = _faulty(flags)
    if policy is OnFault.CORRECT:
        bad &= (flags & int(Check.UNCORRECTED)) != 0
    return bool(bad.any())


def _range_exponents(tensors, scale: float):
    """Exponents (a, b, c[, e]) for q, k, v[, dO] where the call is near fp32's range (see
    RANGE_HAZARD), else None; None too where scaling changes nothing or cannot be done
    (float16, whose range never gets there; a scale that would leave fp32). Exact exponents
    where they bring what the sums can reach below _OVERFLOW_NEAR, else the ones needed (an
    operand's elements below 2^-126 once scaled then lose bits, far below the harm
    threshold: that beats an inf output or a false alarm)."""
    if tensors[0].dtype not in (torch.float32, torch.bfloat16):
        return None
    found = [_exponent(t) for t in tensors]
    mags = [f[0] for f in found]
    q, k = tensors[0], tensors[1]
    terms = (q.shape[-1], max(q.shape[-2], k.shape[-2], 1))
    if not _hazard(mags, terms) >= RANGE_HAZARD:
        return None
    exps = [f[2] for f in found]
    if _hazard([m * 2.0 ** -e for m, e in zip(mags, exps)], terms) >= _OVERFLOW_NEAR:
        exps = [f[1] for f in found]
    a, b = exps[0], exps[1]
    if sum(exps) == 0 or not abs(scale) * 2.0 ** (a + b) < _MAX_SCALE:
        return None
    return exps


def _rescaled_fwd(backend, q, k, v, causal, scale, protection, recompute, fault, fault_value, key_start, key_end,
                  in_op, stats=None):
    """(out, flags) of the call on operands scaled by powers of two (above), or None.
    stats (the C++ kernel's, for the backward) are written with the unscaled row maxima."""
    exps = _range_exponents((q, k, v), scale)
    if exps is None:
        return None
    a, b, c = exps
    out, flags = _run_fwd(backend, _ldexp(q, -a), _ldexp(k, -b), _ldexp(v, -c), causal, scale * 2.0 ** (a + b),
                          protection, recompute, fault, fault_value, key_start, key_end, in_op, stats)
    if stats is not None:  # (each row's largest raw score, S = S' 2^(a + b); its normaliser as it is)
        stats[..., 0] = _ldexp(stats[..., 0], a + b)
    return _ldexp(out, c), flags


def _stats_finite(stats):
    """stats, or None where a row's largest raw score leaves fp32 once scaled back (scores
    beyond fp32 whose logits are not: the scaled forward is right; the backward then makes
    each row's max and normaliser itself, scaled when it runs so)."""
    return stats if stats is None or bool(torch.isfinite(stats[..., 0]).all()) else None


def _rescaled_bwd(q, k, v, out, grad_out, causal, scale, protection, recompute, fault, fault_value, key_start,
                  key_end, backend, stats=None):
    """(dq, dk, dv, flags) of the backward on operands scaled by powers of two, or None."""
    exps = _range_exponents((q, k, v, grad_out), scale)
    if exps is None:
        return None
    a, b, c, e = exps
    if stats is not None:
        stats = torch.stack((_ldexp(stats[..., 0], -(a + b)), stats[..., 1]), -1)
    dq, dk, dv, flags = _run_bwd(_ldexp(q, -a), _ldexp(k, -b), _ldexp(v, -c), _ldexp(out, -c), _ldexp(grad_out, -e),
                                 causal, scale * 2.0 ** (a + b), protection, recompute, fault, fault_value, key_start,
                                 key_end, backend=backend, stats=stats)
    return _ldexp(dq, c + e - a), _ldexp(dk, c + e - b), _ldexp(dv, e), flags


def _ldexp(t: torch.Tensor, e: int) -> torch.Tensor:
    """t 2^e, exact (steps of at most 2^+-100, each a finite fp32 scalar)."""
    t = t.detach()
    while e != 0:
        step = max(-100, min(100, e))
        t, e = t * 2.0 ** step, e - step
    return t


# ---------------------------------------------------------------------------
# the backward


def _run_bwd(q, k, v, out, grad_out, causal, scale, protection, recompute, fault, fault_value, key_start,
             key_end, backend="auto", stats=None):
    """(dq, dk, dv, flags) of the checked backward: the op ``attention_bwd`` (C++ on CPU,
    Triton on CUDA), the Triton kernel under the interpreter for backend "triton" on CPU, or
    the reference itself for backend "reference". stats: the C++ forward's (else the
    backward makes each row's max and normaliser itself)."""
    if backend == "reference":
        from .reference import attention_backward_reference

        return attention_backward_reference(q, k, v, out, grad_out, causal, scale, protection, recompute, fault,
                                            fault_value, key_start, key_end)
    if backend == "triton" and q.device.type == "cpu":  # (the Triton interpreter)
        return _triton_backward().attention_bwd(q, k, v, out, grad_out.contiguous(), causal, scale, protection,
                                                recompute, fault, fault_value, key_start, key_end)
    return torch.ops.ftattn.attention_bwd(q, k, v, out, grad_out.contiguous(), causal, scale, protection, recompute,
                                          fault, fault_value, key_start, key_end, stats)


class _BackwardHolder:
    """What a differentiable call's backward needs beyond its tensors: the policy, the
    fault for the backward and the forward's report (gains ``.backward``, then calls its
    ``on_backward`` callbacks)."""

    def __init__(self, policy: OnFault, fault):
        self.policy, self.fault = policy, fault
        self.report: Optional[Report] = None
        self.read = False  # the forward's flags are read (raise, or a report asked for)


_DOUBLE_BACKWARD = (
    "ftattn.attention: the backward of ftattn's attention is not differentiable: a second backward through "
    "its gradients (torch.autograd.grad(..., create_graph=True), then backward of a function of those "
    "gradients, e.g. a gradient penalty or gradgradcheck) is not supported; its first-order gradients are "
    "right. For second-order gradients through attention, compute the attention with "
    "torch.nn.functional.scaled_dot_product_attention (Hugging Face models: attn_implementation='sdpa' or "
    "'eager')")


class _FirstOrderOnly(torch.autograd.Function):
    """A Function whose own backward raises _DOUBLE_BACKWARD (nothing to save)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(_DOUBLE_BACKWARD)


class _NotTwiceDifferentiable(_FirstOrderOnly):
    """The first-order gradients of an attention call made with create_graph=True: the same
    values, whose own backward raises. Without it autograd saw the checked backward's op
    (no autograd kernel: torch only warns) as constant, and a second backward returned zeros.
    ``anchor``, an input of the backward that requires grad, makes the copies part of the
    graph (autograd's and torch.func's alike: torch.func forbids requires_grad_())."""

    generate_vmap_rule = True  # (clones: torch.func.vmap of per-sample gradients)

    @staticmethod
    def forward(anchor, *grads):
        return tuple(g.clone() for g in grads)


def _once_differentiable(backward):
    """A backward (ctx, *grads) -> gradients made without a graph; where autograd records one
    (create_graph=True, and the gradients depend on tensors that require grad: the
    incoming gradients or the saved inputs), its tensors are returned through
    _NotTwiceDifferentiable, so differentiating them raises instead of giving zeros
    (torch's once_differentiable does so only when the incoming gradients require grad,
    with a message that names neither the op nor the fix)."""

    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            results = backward(ctx, *grads)
        inputs = [t for t in grads + tuple(ctx.saved_tensors) if isinstance(t, torch.Tensor)]
        anchor = next((t for t in inputs if t.requires_grad), None)
        if anchor is None:
            return results
        index = [i for i, t in enumerate(results) if isinstance(t, torch.Tensor)]
        wrapped = _NotTwiceDifferentiable.apply(anchor, *(results[i] for i in index))
        results = list(results)
        for i, t in zip(index, wrapped):
            results[i] = t
        return tuple(results)

    return wrapper


class _AttentionFunction(torch.autograd.Function):
    """Autograd of ``ftattn.attention``: the forward saves q, k, v, its output and, from the
    C++ kernel, each row's max and normaliser (O(N) beyond the inputs: the backward then
    makes P without a first pass over the keys); the backward is the checked
    ``attention_bwd`` with the call's protection and policy."""

    @staticmethod
    def forward(q, k, v, key_start, key_end, options):
        backend, causal, scale, prot, recompute, fault, fault_value, in_op, holder = options
        stats = q.new_empty(q.shape[:3] + (2,), dtype=torch.float32) if backend == backends.Backend.CPP else None
        out, flags = _run_fwd(backend, q, k, v, causal, scale, prot, recompute, fault, fault_value, key_start,
                              key_end, in_op, stats)
        if holder.read and _flagged(flags := _host(flags)) and _needs_rescale(flags, holder.policy):
            rescaled = _rescaled_fwd(backend, q, k, v, causal, scale, prot, recompute, fault, fault_value,
                                     key_start, key_end, in_op, stats)
            if rescaled is not None:
                (out, flags), stats = rescaled, _stats_finite(stats)
        return out, flags, stats

    # (forward without ctx, and setup_context: the form torch.func's transforms need, so
    # torch.func.grad / vjp run through the checked backward; before, they raised)
    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, key_start, key_end, options = inputs
        out, flags, stats = output
        backend, causal, scale, prot, recompute, _, _, _, holder = options
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.key_range = (key_start, key_end)
        ctx.options = (causal, scale, prot, recompute, holder, backend)
        ctx.mark_non_differentiable(*(t for t in (flags, stats) if t is not None))

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_out, _grad_flags, _grad_stats=None):
        q, k, v, out, stats = ctx.saved_tensors
        dq, dk, dv = apply(_AttentionBackward, _AttentionBackwardEager, q, k, v, out, grad_out, stats, *ctx.key_range,
                           ctx.options)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_NO_JVP)

    @staticmethod
    def vmap(info, in_dims, q, k, v, key_start, key_end, options):
        """torch.func.vmap: the mapped dimension folded into the batch (one call of the
        kernels over n B samples; an input not mapped is repeated), the outputs unfolded;
        the flags stay one tensor [n B, H, blocks] (the policy reads them as a whole)."""
        n = info.batch_size
        q, k, v, key_start, key_end = _fold(n, (q, k, v, key_start, key_end), in_dims)
        validate_key_range(q, k, key_start, key_end)
        out, flags, stats = _AttentionFunction.apply(q, k, v, key_start, key_end, options)
        out = out.reshape(n, -1, *out.shape[1:])
        stats = stats.reshape(n, -1, *stats.shape[1:]) if stats is not None else None
        return (out, flags, stats), (0, None, 0 if stats is not None else None)


def _fold(n: int, tensors, dims):
    """torch.func.vmap's mapped dimension (size n) folded into each tensor's first (the
    batch): an input not mapped is repeated; None stays None."""
    def fold(t, dim):
        if t is None:
            return None
        t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(n, *t.shape)
        return t.reshape(n * t.shape[1], *t.shape[2:])

    return [fold(t, d) for t, d in zip(tensors, dims)]


class _AttentionBackward(_FirstOrderOnly):
    """The checked backward of one attention call (_AttentionFunction.backward's body): an
    autograd.Function of its own so that torch.func.vmap of a gradient (per-sample
    gradients: vmap(grad(f))) folds the batch as the forward does; before, its flags were
    read on the host from a batched tensor and it failed."""

    @staticmethod
    def forward(q, k, v, out, grad_out, stats, key_start, key_end, options):
        causal, scale, prot, recompute, holder, backend = options
        fault, fault_value = holder.fault if holder.fault is not None else (None, None)
        dq, dk, dv, flags = _run_bwd(q, k, v, out, grad_out, causal, scale, prot, recompute, fault, fault_value,
                                     key_start, key_end, backend=backend, stats=stats)
        if _flagged(flags := _host(flags)) and _needs_rescale(flags, holder.policy):
            dq, dk, dv, flags = _rescaled_bwd(q, k, v, out, grad_out, causal, scale, prot, recompute, fault,
                                              fault_value, key_start, key_end, backend, stats) or (dq, dk, dv, flags)
        report = _apply_policy(flags, holder.policy, q.shape[2], True, op="attention backward", keys=k.shape[2])
        if holder.report is not None:
            holder.report.backward = report
            for fn in holder.report.on_backward:
                fn(report)
        return dq, dk, dv

    @staticmethod
    def vmap(info, in_dims, q, k, v, out, grad_out, stats, key_start, key_end, options):
        n = info.batch_size
        grads = _AttentionBackward.apply(*_fold(n, (q, k, v, out, grad_out, stats, key_start, key_end), in_dims),
                                         options)
        return tuple(g.reshape(n, -1, *g.shape[1:]) for g in grads), (0, 0, 0)


_AttentionFunctionEager = eager_twin(_AttentionFunction)
_AttentionBackwardEager = eager_twin(_AttentionBackward)

_NO_JVP = ("ftattn.attention has no forward-mode derivative (torch.autograd.forward_ad, torch.func.jvp / jacfwd); "
           "neither has torch's fused attention on CPU. Differentiate in reverse mode (backward, torch.func.grad / "
           "vjp / jacrev), or compute this attention as softmax(q k^T scale) v in torch ops for forward mode")


# ---------------------------------------------------------------------------
# the ops' Python kernels: ftattn::attention on CPU and CUDA (the public function,
# with its validation and policy), ftattn::attention_fwd on CUDA (the Triton launcher)


def _register_kernels() -> None:
    for device in ("CPU", "CUDA"):
        @torch.library.impl("ftattn::attention", device)
        def _attention_op(q, k, v, key_start=None, key_end=None, *, causal=False, scale=None, protection="full",
                          on_fault="correct"):
            return _attention(q, k, v, causal, scale, protection, on_fault, None, "auto", False, key_start, key_end,
                              in_op=True)

        # under torch.autocast the dispatcher stops at Autocast<device> first: cast there, as
        # torch does for SDPA (torch.library.register_autocast casts to one fixed dtype and
        # takes no keyword arguments), then run the op with autocast off
        @torch.library.impl("ftattn::attention", "Autocast" + device)
        def _attention_autocast(q, k, v, key_start=None, key_end=None, *, causal=False, scale=None,
                                protection="full", on_fault="correct", _device=device.lower()):
            q, k, v = _autocast(q, k, v)
            with torch.autocast(_device, enabled=False):
                return torch.ops.ftattn.attention(q, k, v, key_start, key_end, causal=causal, scale=scale,
                                                  protection=protection, on_fault=on_fault)

    @torch.library.impl("ftattn::attention_bwd", "CUDA")  # (CPU: csrc/attention_bwd_cpu.cpp)
    def _attention_bwd_op(q, k, v, out, grad_out, causal, scale, protection, recompute, fault=None,
                          fault_value=None, key_start=None, key_end=None, stats=None):
        # (stats, the C++ forward's, unused: the Triton and reference backwards make their own)
        validate_inputs(q, k, v, scale)
        validate_key_range(q, k, key_start, key_end)
        if tuple(out.shape) != tuple(q.shape) or tuple(grad_out.shape) != tuple(q.shape):
            raise ValueError(f"ftattn.attention backward: out {tuple(out.shape)} and grad_out "
                             f"{tuple(grad_out.shape)} must have q's shape {tuple(q.shape)}")
        if not 0 <= int(protection) <= 2:
            raise ValueError(f"ftattn.attention: protection {protection} must be 0 (off), 1 (abft) or 2 (full)")
        if fault is not None:
            B, Hq, N, D = q.shape
            check_backward_fault_encoding(fault, fault_value, B, Hq, N, k.shape[2], D)
        if backends.triton_reason(q.device) is None:
            return _triton_backward().attention_bwd(q, k, v, out, grad_out, causal, scale, int(protection),
                                                    recompute, fault, fault_value, key_start, key_end)
        from .reference import attention_backward_reference

        return attention_backward_reference(q, k, v, out, grad_out, causal, scale, int(protection), recompute,
                                            fault, fault_value, key_start, key_end)

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        q, k, v = inputs[:3]
        ctx.save_for_backward(q, k, v, output)
        ctx.key_range = (tuple(inputs[3:5]) + (None, None))[:2]
        ctx.options = keyword_only_inputs

    @_once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        kw = ctx.options
        prot, policy = _parse_options(kw.get("protection", "full"), kw.get("on_fault", "correct"))
        scale = kw.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        causal, recompute = kw.get("causal", False), policy is OnFault.CORRECT
        dq, dk, dv, flags = _run_bwd(q, k, v, out, grad_out, causal, scale, int(prot), recompute, None, None,
                                     *ctx.key_range)
        # (the flags read only for "raise", as the op's forward: a clean call costs no host read)
        if policy is OnFault.RAISE and _flagged(flags := _host(flags)) and _needs_rescale(flags, policy):
            dq, dk, dv, flags = _rescaled_bwd(q, k, v, out, grad_out, causal, scale, int(prot), recompute, None,
                                              None, *ctx.key_range, "auto") or (dq, dk, dv, flags)
        if policy is OnFault.RAISE:
            if torch.compiler.is_compiling():  # no host read in a graph: an assertion when it runs
                faulty = _faulty(flags)
                torch._assert_async(~faulty.any(), "ftattn.attention backward: a check failed (on_fault='raise')")
            else:
                _apply_policy(flags, policy, q.shape[2], False, op="attention backward", keys=k.shape[2])
        return dq, dk, dv, None, None

    torch.library.register_autograd("ftattn::attention", backward, setup_context=setup_context)

    @torch.library.impl("ftattn::attention_fwd", "CUDA")
    def _attention_fwd_cuda(q, k, v, causal, scale, protection, recompute, fault=None, fault_value=None,
                            key_start=None, key_end=None, stats=None):
        if stats is not None:
            raise ValueError("ftattn.attention_fwd: stats is written by the CPU (C++) kernel only; pass stats=None "
                             "on CUDA (the backward then makes each row's max and normaliser itself)")
        reason = backends.triton_reason(q.device)
        if reason is not None:
            raise NotImplementedError(f"ftattn.attention on CUDA needs the Triton kernel: {reason}")
        validate_inputs(q, k, v, scale)
        validate_key_range(q, k, key_start, key_end)
        if not 0 <= int(protection) <= 2:
            raise ValueError(f"ftattn.attention: protection {protection} must be 0 (off), 1 (abft) or 2 (full)")
        return _triton_kernel().attention_fwd(q, k, v, causal, scale, protection, recompute, fault, fault_value,
                                              key_start, key_end)


_register_kernels()
