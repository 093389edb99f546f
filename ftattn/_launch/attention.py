"""The launcher of the Triton attention kernel (ftattn.kernels.attention): the Triton
implementation of ``ftattn::attention_fwd``, on CUDA tensors, or CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1). Inputs are validated by the caller
(ftattn/attention.py, ``validate_inputs``); the fault encoding by ftattn/contract.py.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

import torch
import triton

from ..contract import REPORT_BLOCK_M, Site, check_fault_encoding, flip_args, span_axis
from ..kernels.attention import (INTERPRETER_CONFIG, UNTUNED_CONFIGS, _attn_fwd, _attn_fwd_tuned, _attn_replay,
                                 prune_configs)

__all__ = ["attention_fwd"]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


_TILE = re.compile(r"^(64|128)x(16|32|64|128)$")


def autotune_setting():
    """FTATTN_AUTOTUNE, read at each call: "1" (default) autotunes the CUDA forward per key
    (the configs that fit, up to 12, each compiled on its key's first call) and returns
    "tune"; "0" returns
    "fixed": one config per key (kernels/attention.py UNTUNED_CONFIGS, the first that fits),
    e.g. for short-lived jobs; "BMxBN" (BM 64 or 128, BN 16..128, e.g. "64x32") returns the
    tile (BM, BN), launched wherever it fits in shared memory (else the fixed config): small
    tiles compile fastest (the checked kernel: 9 s at 64 x 32 against 55 s at 128 x 64), for
    test suites on a GPU."""
    value = os.environ.get("FTATTN_AUTOTUNE", "1").strip()
    if value in ("0", "1"):
        return "tune" if value == "1" else "fixed"
    tile = _TILE.match(value)
    if tile is None:
        raise ValueError(f"FTATTN_AUTOTUNE={value!r}: supported values are 1 (autotune the CUDA attention kernel, "
                         f"the default), 0 (one fixed config) and a tile BMxBN with BM 64 or 128 and BN 16, 32, 64 "
                         f"or 128 (e.g. 64x32); set it to one of them or unset it")
    return int(tile.group(1)), int(tile.group(2))


def untuned_meta(setting, q: torch.Tensor, head_pad: int, protection: int) -> dict:
    """The launch meta for autotune_setting() "fixed" or a pinned (BM, BN): the pinned tile
    where it fits, else the first of UNTUNED_CONFIGS that fits (prune_configs keeps the order)."""
    pinned = [] if setting == "fixed" else [
        triton.Config({"BLOCK_M": setting[0], "BLOCK_N": setting[1]}, num_stages=2, num_warps=4)]
    conf = prune_configs(pinned + UNTUNED_CONFIGS, {"Q": q}, HEAD_DIM_PAD=head_pad, PROTECTION=protection)[0]
    return {**conf.kwargs, "num_warps": conf.num_warps, "num_stages": conf.num_stages}


def _decode_fault(fault, fault_value, B, Hq, N, M, D, causal, key_start=None, key_end=None):
    """(INJECT, the kernel's fault arguments) from the op's encoding: site, batch, head,
    row, col, dim, span (clipped to the values that exist), XOR mask, replace?, value."""
    none = (False, (0, 0, 0, 0, 0, 0, 1, 0, 0, 0.0))
    if fault is None:
        return none
    site, b, h, row, col, dim, bit, span = check_fault_encoding(fault, fault_value, B, Hq, N, M, D)
    if span_axis(site) == "dim":
        span = min(span, D - dim)  # head dims dim .. D - 1 at most
    if site != Site.OUTPUT:
        # as the C++ kernel: a fault lands only in a key tile its 64-row block visits (of
        # its sample's keys, with key ranges), on the keys of them it names
        k0, mb = 0, M
        if key_start is not None:
            k0 = int(key_start[b])
            mb = int(key_end[b]) - k0
        r1 = min(N, (row // REPORT_BLOCK_M + 1) * REPORT_BLOCK_M)
        kv_end = min(mb, r1 + mb - N) if causal else mb
        if span_axis(site) == "col":  # keys col .. col + span - 1: those the block visits
            lo, hi = max(col - k0, 0), min(col - k0 + span, kv_end)
            if lo >= hi:
                return none
            col, span = k0 + lo, hi - lo
        elif not 0 <= col - k0 < kv_end:
            return none
    return True, (site, b, h, row, col, dim, span, *flip_args(bit, fault_value))


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    protection: int,
    recompute: bool,
    fault: Optional[List[int]] = None,
    fault_value: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
    key_end: Optional[torch.Tensor] = None,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton implementation of ``ftattn::attention_fwd``.

    Args:
        q: [B, Hq, N, D]; k, v: [B, Hkv, M, D]; one dtype of float16 / bfloat16 /
            float32; D in 1..256; Hq a multiple of Hkv (validated by the caller).
        causal: key j visible to query i iff j <= i + M - N.
        scale: multiplier of q k^T.
        protection: 0 off, 1 abft, 2 full.
        recompute: recompute flagged blocks (``on_fault="correct"``).
        fault: [site, batch, head, row, col, dim, bit, span] (bit -1: replace by
            ``fault_value``; span left out: 1), or None.
        key_start, key_end: int [B] on q's device (validated by the caller), or None:
            sample b's keys are [key_start[b], key_end[b]).
        block_m, block_n: force a tile shape (tests); default autotuned on CUDA
            (FTATTN_AUTOTUNE: autotune_setting), ``INTERPRETER_CONFIG`` on CPU.

    Returns:
        (out [B, Hq, N, D] in q's dtype, flags int32 [B, Hq, ceil(N / 64)]).
    """
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    protection = int(protection)
    nblk = triton.cdiv(N, REPORT_BLOCK_M)
    out = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    flags = torch.zeros((B, Hq, nblk), dtype=torch.int32, device=q.device)
    if B * Hq * N == 0:
        return out, flags
    key_range = key_start is not None
    inject, fargs = _decode_fault(fault, fault_value, B, Hq, N, M, D, causal,
                                  *((key_start.cpu(), key_end.cpu()) if key_range and fault is not None else ()))
    head_pad = max(16, _next_pow2(D))
    starts = key_start.to(torch.int64).contiguous() if key_range else flags  # (flags: unused when no range)
    ends = key_end.to(torch.int64).contiguous() if key_range else flags
    common = (
        q, k, v, out, flags, starts, ends,  #
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
        Hq, Hq // Hkv, N, M, nblk, float(scale), 1.0,  # (unit: a 1.0 the kernel cannot fold)
    )
    interpreted = q.device.type == "cpu"
    emulate = interpreted and q.dtype == torch.bfloat16
    forced = block_m is not None or block_n is not None
    setting = None if interpreted or forced else autotune_setting()
    if setting != "tune":
        if interpreted:
            meta = dict(INTERPRETER_CONFIG)
        elif forced:
            meta = {"num_warps": 4, "num_stages": 2}
        else:
            meta = untuned_meta(setting, q, head_pad, protection)
        meta["BLOCK_M"] = block_m or meta.get("BLOCK_M", 64)
        meta["BLOCK_N"] = block_n or meta.get("BLOCK_N", 64)
        if meta["BLOCK_M"] not in (64, 128) or meta["BLOCK_N"] not in (16, 32, 64, 128):
            raise ValueError(f"ftattn.attention: block_m must be 64 or 128 and block_n 16..128, got {meta}")
        grid = (triton.cdiv(N, meta["BLOCK_M"]), B * Hq)
        _attn_fwd[grid](*common, *fargs, _next_pow2(N), _next_pow2(M),  #
                        HEAD_DIM=D, HEAD_DIM_PAD=head_pad, CAUSAL=bool(causal), PROTECTION=protection,
                        INJECT=inject, EMULATE_BF16_DOT=emulate, KEY_RANGE=key_range, **meta)
    else:
        grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]), B * Hq)  # noqa: E731
        _attn_fwd_tuned[grid](*common, *fargs, _next_pow2(N), _next_pow2(M),  #
                              HEAD_DIM=D, HEAD_DIM_PAD=head_pad, CAUSAL=bool(causal), PROTECTION=protection,
                              INJECT=inject, EMULATE_BF16_DOT=False, KEY_RANGE=key_range)
        best = _attn_fwd_tuned.best_config
        meta = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        grid = (triton.cdiv(N, meta["BLOCK_M"]), B * Hq)
    if protection >= 1:
        # Always launched (no host read of the flags): programs with clean flags return at once.
        _attn_replay[grid](*common, HEAD_DIM=D, HEAD_DIM_PAD=head_pad, CAUSAL=bool(causal), PROTECTION=protection,
                           RECOMPUTE=bool(recompute), EMULATE_BF16_DOT=emulate, KEY_RANGE=key_range, **meta)
    return out, flags
