"""The launcher of the Triton linear kernel (ftattn.kernels.linear): the Triton
implementation of ``ftattn::linear_fwd``, on CUDA tensors, or CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1). Inputs are validated by the caller
(ftattn/linear.py); the fault encoding by ftattn/contract.py."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from ..contract import CHECK_MASK, Check, REPORT_BLOCK_M, Site, check_linear_fault_encoding, flip_args
from ..kernels.linear import INTERPRETER_CONFIG, _linear_fwd
from ..faults import TAU
from ..linear import ETA, check_factor

__all__ = ["linear_fwd"]
# the kernel's fault arguments without a fault (site, row, col, dim, span, xor, use_value, value)
_NO_FAULT = (0, 0, 0, 0, 1, 0, 0, 0.0)


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    """A power of two near each row's largest |x_ij|, within 2^-126 .. 2^126 so that the kernel's
    1 / scale is a normal fp32 number (1 for a non-finite row). (Unclamped, a row of subnormal
    x, |x| < 2^-126, took a scale of 2^-132, whose inverse is inf in fp32: every such call's
    bounds were NaN and the call blind, a second product made and compared.)"""
    m = x.abs().amax(1).float() if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    scale = torch.exp2(torch.clamp(torch.floor(torch.log2(m)) + 1, -126.0, 126.0))
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale)).contiguous()


def _launch(x, weight, bias, ref_cols, mag_cols, block_o, protection, fault_args, inject):
    T, K = x.shape
    out = weight.shape[0]
    y = torch.empty((T, out), dtype=x.dtype, device=x.device)
    nblk = (T + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    flags = torch.zeros((1, 1, nblk), dtype=torch.int32, device=x.device)
    if T == 0 or out == 0:
        return y, flags
    if K == 0:
        y.copy_(bias.expand(T, out) if bias is not None else torch.zeros_like(y))
        return y, flags
    checked = protection >= 1
    split = checked and ref_cols.dtype != torch.float64
    nb = triton.cdiv(out, block_o)
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        cfg = INTERPRETER_CONFIG
    else:
        cfg = dict(BLOCK_M=64 if T >= 64 else 16, BLOCK_K=64 if x.dtype != torch.float32 else 32, num_warps=8)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), nb)
    _linear_fwd[grid](
        x, weight, bias if bias is not None else dummy, y,
        ref_cols if checked else dummy, mag_cols if checked else dummy,
        _row_scale(x) if checked else dummy, flags,
        T, K, out, nb, x.stride(0), weight.stride(0), weight.stride(1),
        check_factor(K, split, block_o), ETA * (K + 1) * (block_o + 1), TAU[x.dtype], *fault_args,
        HAS_BIAS=bias is not None, PROTECTION=checked, SPLIT=split, INJECT=inject,
        IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu"), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_o, BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
    )
    return y, flags


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ref_cols, mag_cols,
               block_o: int, protection: int, recompute: bool, fault: Optional[List[int]] = None,
               fault_value: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton implementation of ``ftattn::linear_fwd`` (x [T, K] contiguous, weight
    [out, K] in either memory order). A faulty product is recomputed by a second launch
    (the flags are read on the host when ``recompute``)."""
    if block_o < 16 or block_o & (block_o - 1):
        raise ValueError(f"ftattn.linear (triton): block_o={block_o} must be a power of two >= 16")
    T, K = x.shape
    out = weight.shape[0]
    inject, fault_args = False, _NO_FAULT
    if fault is not None:
        site, _, _, row, col, dim, bit, span = check_linear_fault_encoding(fault, fault_value, T, out, K)
        inject = True
        # the span's values that exist (clipped at the row's end: also keeps col + span in int32)
        span = min(span, out - col) if site == Site.GEMM else min(span, K - dim)
        fault_args = (site, row, col, dim, span, *flip_args(bit, fault_value))
    y, flags = _launch(x, weight, bias, ref_cols, mag_cols, block_o, protection, fault_args, inject)
    if protection >= 1 and recompute:
        faulty = (flags & CHECK_MASK) != 0
        if bool(faulty.any()):  # (a host read: a second launch only when a check failed)
            y, again = _launch(x, weight, bias, ref_cols, mag_cols, block_o, protection, _NO_FAULT, False)
            status = torch.where((again & CHECK_MASK) != 0, int(Check.UNCORRECTED), int(Check.CORRECTED))
            flags = torch.where(faulty, flags | status.to(torch.int32), flags)
    return y, flags
