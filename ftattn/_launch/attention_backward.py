"""The launcher of the Triton attention backward (ftattn.kernels.attention_backward): the
Triton implementation of ``ftattn::attention_bwd``, on CUDA tensors, or CPU tensors under
the Triton interpreter (TRITON_INTERPRET=1). Inputs are validated by the caller
(ftattn/attention.py); the fault encoding by ftattn/contract.py.

A failed check recomputes the whole backward (``reference.settle_backward``: the flags are
read on the host, unlike the forward's replay kernel). Per-sample key ranges run in the
kernels (KEY_RANGE), faults and flags in the batch's key coordinates.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton

from ..contract import (REPORT_BLOCK_M, Check, Site, check_backward_fault_encoding, fault_fields, flip_args,
                        span_axis)
from ..faults import TAU
from ..kernels.attention_backward import INTERPRETER_CONFIG, _bwd_dkdv, _bwd_dq, _bwd_prep, loop_tile

__all__ = ["attention_bwd"]

BLOCK = 64  # query rows and keys per program: one report block each (ftattn/contract.py)
_interpreter_tile = INTERPRETER_CONFIG["BLOCK_N"]  # the loop's tile under the interpreter (tests set 16 / 32)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _run(qf, kf, vf, of, gf, causal, scale, protection, fault, fault_value, key_start=None, key_end=None,
         tau_h=2.0**-10):
    B, Hq, N, D = qf.shape
    Hkv, M = kf.shape[1], kf.shape[2]
    group = Hq // Hkv
    nq, nk = triton.cdiv(N, REPORT_BLOCK_M), triton.cdiv(M, REPORT_BLOCK_M)
    dev = qf.device
    dq = torch.zeros((B, Hq, N, D), dtype=torch.float32, device=dev)
    dkh = torch.zeros((B, Hq, M, D), dtype=torch.float32, device=dev)
    dvh = torch.zeros((B, Hq, M, D), dtype=torch.float32, device=dev)
    flags = torch.zeros((B, Hq, nq + nk), dtype=torch.int32, device=dev)
    # per key program (flags' layout), the blind threshold its dk and dv rows need (_bwd_dkdv, GQA)
    need = torch.zeros((B, Hq, nq + nk, 2), dtype=torch.float32, device=dev)
    if B * Hq > 0 and N > 0 and M > 0:
        inject = fault is not None
        fargs = (0, -1, -1, -1, 0, 1, 0, 0, 0.0)  # site, b * Hq + h, row, col, dim, span, xor, replace?, value
        if inject:
            site, b, h, row, col, dim, bit, span = fault_fields(fault)
            # the span's values that exist (clipped at the row's end: also keeps the sums in int32)
            span = min(span, D - dim) if span_axis(site) == "dim" else min(span, M - col)
            fargs = (site, b * Hq + h, row if site not in (Site.DK, Site.DV) else -1,
                     col if site != Site.DQ else -1, dim, span, *flip_args(bit, fault_value))
        mrow = torch.empty((B, Hq, N), dtype=torch.float32, device=dev)
        rinv = torch.empty((B, Hq, N), dtype=torch.float32, device=dev)
        delta = torch.empty((B, Hq, N), dtype=torch.float32, device=dev)
        meta = dict(INTERPRETER_CONFIG) if dev.type == "cpu" else {"num_warps": 4, "num_stages": 2}
        shape = dict(HEAD_DIM=D, D_PAD=max(16, _next_pow2(D)), CAUSAL=bool(causal))
        # each program owns one report block; the loop's tile is smaller at large head dims
        # (shared memory; under the interpreter 64 unless a test asks for another)
        tile = loop_tile(shape["D_PAD"]) if dev.type != "cpu" else _interpreter_tile
        rows_block = dict(meta, BLOCK_M=BLOCK, BLOCK_N=tile)  # prep, dq: 64 rows, keys by tile
        keys_block = dict(meta, BLOCK_M=tile, BLOCK_N=BLOCK)  # dkdv: 64 keys, rows by tile
        key_range = key_start is not None
        starts = key_start.to(device=dev, dtype=torch.int64).contiguous() if key_range else flags  # (unused
        ends = key_end.to(device=dev, dtype=torch.int64).contiguous() if key_range else flags  # without ranges)
        shape.update(KEY_RANGE=key_range)
        _bwd_prep[(nq, B * Hq)](qf, kf, of, gf, mrow, rinv, delta, starts, ends, Hq, group, N, M, float(scale),
                                **shape, **rows_block)
        _bwd_dq[(nq, B * Hq)](qf, kf, vf, gf, mrow, rinv, delta, dq, flags, starts, ends, Hq, group, N, M, nq + nk,
                              float(scale), 1.0, *fargs, **shape, PROTECTION=int(protection), INJECT=inject,
                              TAU_H=tau_h, **rows_block)
        _bwd_dkdv[(nk, B * Hq)](qf, kf, vf, gf, mrow, rinv, delta, dkh, dvh, flags, need, starts, ends, Hq, group,
                                N, M, nq, nq + nk, float(scale), 1.0, *fargs, **shape, PROTECTION=int(protection),
                                INJECT=inject, TAU_H=tau_h, **keys_block)
    dk = (dkh * scale).view(B, Hkv, group, M, D).sum(2)
    dv = dvh.view(B, Hkv, group, M, D).sum(2)
    if protection >= 2 and group > 1 and dk.numel():
        # GQA: a key program whose dk or dv rows need more than the call's harm threshold,
        # tau max(1, max |g|) of the gradients summed over the group's heads, is BLIND (made again
        # and compared, settle_backward; a NaN need too). Tensor ops: no host sync here.
        one = torch.ones((), device=dev)
        thr = torch.stack([torch.maximum(dk.abs().amax(), one), torch.maximum(dv.abs().amax(), one)]) * tau_h
        blind = (~(need[..., nq:, :] <= thr)).any(-1)
        flags[..., nq:] |= blind.to(torch.int32) * int(Check.BLIND)
    return dq, dk, dv, flags


def attention_bwd(q, k, v, out, grad_out, causal: bool, scale: float, protection: int, recompute: bool,
                  fault: Optional[List[int]] = None, fault_value: Optional[float] = None,
                  key_start: Optional[torch.Tensor] = None, key_end: Optional[torch.Tensor] = None):
    """The Triton implementation of ``ftattn::attention_bwd``: (dq, dk, dv in the inputs'
    dtypes, flags int32 [B, Hq, ceil(N / 64) + ceil(M / 64)])."""
    from ..reference import settle_backward

    B, Hq, N, D = q.shape
    if fault is not None:
        check_backward_fault_encoding(fault, fault_value, B, Hq, N, k.shape[2], D)
    f32 = [t.float().contiguous() for t in (q, k, v, out, grad_out)]
    tau_h = TAU[q.dtype]  # (the harm threshold of the inputs' dtype: the checks' BLIND rows)
    dq, dk, dv, flags = _run(*f32, causal, scale, protection, fault, fault_value, key_start, key_end, tau_h)
    rerun = lambda: _run(*f32, causal, scale, protection, None, None, key_start, key_end, tau_h)  # noqa: E731
    return settle_backward(q, k, v, out, grad_out, (dq, dk, dv), flags, recompute, rerun, key_start, key_end)
