"""
Fault-tolerant linear layer (Triton)
====================================

y = x W^T + b as a tiled GEMM (one program per BLOCK_M rows x BLOCK_N output features,
fp32 accumulation; fp32 inputs as IEEE fp32 products, never tf32: the bound assumes
u = 2^-24), with the checksum columns riding along in the same K loop. BLOCK_N is the
checksum block (ftattn/linear.py BLOCK_O, 128 output features), so a program owns the
whole block b of its columns and checks, per row i of its tile,

    sum_{o in b} acc[i, o]  vs  x_i . (W^T e_b)   and
    sum_{o in b} w_o acc[i, o]  vs  x_i . (W^T w_b)

(w: the contract's checksum_weight of o's place in the block, _pv_weight; a warp's +-2^k
deltas that cancel in the plain sum rarely cancel in both) against the weight's cached
checksums (``ref_cols``: fp64 [2 nb, K], the plain ones then the weighted ones, the
reference then accumulated in fp64; or bf16 hi + mid + lo parts [3 x 2 nb, K], in fp32),
within the statistical bound of csrc/linear_cpu.cpp (ftattn/linear.py check_factor): factor *
scale_i * sqrt(x_i^2 / scale_i^2 . mag_c) plus an underflow term, plus the tree
summation of the block's 128 accumulators (log2(128) + 1 roundings of sum |acc|; one more
for the weighted products). ``mag_cols`` [2 nb, K]: sum_{o in b} W_o^2 and sum_{o in b}
w_o^2 W_o^2 (fp32; bf16 with the checksum squared added for the bf16 parts);
``row_scale`` [T]: a power
of two near max_j |x_ij| (the launcher's), so the squares neither underflow nor overflow.
The reference products are one K-wide dot per row and tile step (1/BLOCK_N of the tile's
work) on CUDA cores, in fp64 (fp32 for the bf16 parts).

A row whose check fails ORs GEMM_ROW_CHECKSUM into flags[row // 64] (REPORT_BLOCK_M of
ftattn/contract.py), or NONFINITE_INPUT when x_i holds NaN/Inf or the checksums are not
finite (bad input, not a fault); a row whose block's bound exceeds half the harm
threshold ``tau`` ORs BLIND (ftattn/linear.py _settle compares a second product). The launcher (ftattn/_launch/linear.py) recomputes a
faulty product by a second launch without the fault.

Fault injection (INJECT constexpr; compiled out otherwise): site ``gemm`` flips a bit of
(or replaces) the fp32 accumulator of y[row, col .. col + span - 1] after the K loop,
before bias and the down-cast; site ``weight`` hits W[row, dim .. dim + span - 1] as this
program loads it (span: ftattn/contract.py, clipped at the row's end; a span crossing
tiles is hit in each tile holding one of its values).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..contract import REPORT_BLOCK_M, Check, Site
from .attention import _pv_weight

BLOCK_REPORT = tl.constexpr(REPORT_BLOCK_M)
GEMM_ROW_CHECKSUM = tl.constexpr(int(Check.GEMM_ROW_CHECKSUM))
NONFINITE_INPUT = tl.constexpr(int(Check.NONFINITE_INPUT))
BLIND = tl.constexpr(int(Check.BLIND))
SITE_GEMM = tl.constexpr(int(Site.GEMM))
SITE_WEIGHT = tl.constexpr(int(Site.WEIGHT))
U32 = tl.constexpr(5.9604644775390625e-08)  # 2^-24

# one configuration under the interpreter (CPU tensors); on CUDA BLOCK_N is fixed by the
# checksum block and BLOCK_M / BLOCK_K / warps are chosen by the launcher
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_K=32, num_warps=4)


@triton.jit
def _corrupt(x, f_xor, f_use_value, f_value):
    flipped = (x.to(tl.int32, bitcast=True) ^ f_xor).to(tl.float32, bitcast=True)
    return tl.where(f_use_value != 0, f_value, flipped)


@triton.jit
def _linear_fwd(
    X, W, Bias, Y, RefCols, MagCols, RowScale, Flags,
    T, K, OUT, NB,
    stride_xm, stride_wo, stride_wk,
    factor, abs_term, tau,
    f_site, f_row, f_col, f_dim, f_span, f_xor, f_use_value, f_value,
    HAS_BIAS: tl.constexpr, PROTECTION: tl.constexpr, SPLIT: tl.constexpr, INJECT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < T
    n_ok = rn < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT:
        ref = tl.zeros((BLOCK_M,), dtype=tl.float32)
        ref_w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        ref = tl.zeros((BLOCK_M,), dtype=tl.float64)
        ref_w = tl.zeros((BLOCK_M,), dtype=tl.float64)
    mag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mag_w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    x_bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    if PROTECTION:
        inv = 1.0 / tl.load(RowScale + rm, mask=m_ok, other=1.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn[:, None] * stride_wo + kk[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if INJECT:
            hit = (f_site == SITE_WEIGHT) & (rn[:, None] == f_row) & (kk[None, :] >= f_dim) & \
                (kk[None, :] < f_dim + f_span) & k_ok[None, :]
            w = tl.where(hit, _corrupt(w.to(tl.float32), f_xor, f_use_value, f_value).to(w.dtype), w)
        if IEEE:  # fp32 inputs, or bf16 under the interpreter (whose tl.dot multiplies raw bf16 bits)
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if PROTECTION:
            xf = x.to(tl.float32)
            if SPLIT:  # (hi, mid, lo parts of the 2 NB checksums, each part's 2 NB rows in turn)
                r = tl.load(RefCols + blk * K + kk, mask=k_ok, other=0.0).to(tl.float32)
                r_mid = tl.load(RefCols + (2 * NB + blk) * K + kk, mask=k_ok, other=0.0).to(tl.float32)
                r_lo = tl.load(RefCols + (4 * NB + blk) * K + kk, mask=k_ok, other=0.0).to(tl.float32)
                ref += tl.sum(xf * r[None, :], 1) + tl.sum(xf * r_mid[None, :], 1) + tl.sum(xf * r_lo[None, :], 1)
                r = tl.load(RefCols + (NB + blk) * K + kk, mask=k_ok, other=0.0).to(tl.float32)
                r_mid = tl.load(RefCols + (3 * NB + blk) * K + kk, mask=k_ok, other=0.0).to(tl.float32)
                r_lo = tl.load(RefCols + (5 * NB + blk) * K + kk, mask=k_ok, other=0.0).to(tl.float32)
                ref_w += tl.sum(xf * r[None, :], 1) + tl.sum(xf * r_mid[None, :], 1) + tl.sum(xf * r_lo[None, :], 1)
            else:  # (fp64 sums, fp64 products of fp32 values: exact, summed in fp64)
                r = tl.load(RefCols + blk * K + kk, mask=k_ok, other=0.0)
                ref += tl.sum(xf.to(tl.float64) * r[None, :], 1)
                r = tl.load(RefCols + (NB + blk) * K + kk, mask=k_ok, other=0.0)
                ref_w += tl.sum(xf.to(tl.float64) * r[None, :], 1)
            xs = xf * inv[:, None]
            x2 = xs * xs
            mc = tl.load(MagCols + blk * K + kk, mask=k_ok, other=0.0).to(tl.float32)
            mag += tl.sum(x2 * mc[None, :], 1)
            mc = tl.load(MagCols + (NB + blk) * K + kk, mask=k_ok, other=0.0).to(tl.float32)
            mag_w += tl.sum(x2 * mc[None, :], 1)
            x_bad = tl.maximum(x_bad, tl.max(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), 1))
    if INJECT:
        hit = (f_site == SITE_GEMM) & (rm[:, None] == f_row) & (rn[None, :] >= f_col) & \
            (rn[None, :] < f_col + f_span) & n_ok[None, :]
        acc = tl.where(hit, _corrupt(acc, f_xor, f_use_value, f_value), acc)
    if PROTECTION:
        a = tl.where(n_ok[None, :], acc, 0.0)
        s = tl.sum(a, 1)
        aw = a * _pv_weight(rn - blk * BLOCK_N)[None, :]
        s_w = tl.sum(aw, 1)
        scale = 1.0 / inv
        bound = factor * tl.sqrt(mag) * scale + abs_term + 8.0 * U32 * tl.sum(tl.abs(a), 1)
        bound_w = factor * tl.sqrt(mag_w) * scale + abs_term + 9.0 * U32 * tl.sum(tl.abs(aw), 1)
        # (a non-finite sum fails however large the bound: its sum |acc| term is then infinite too)
        # finite magnitudes or checksums overflowed (|W| from ~1e18; bf16 parts at ~1e37), or
        # 0 x inf: no bound or no reference, blind (as C++; NaN / Inf in x or W reaches s)
        s_bad = (s != s) | (tl.abs(s) == float("inf")) | (s_w != s_w) | (tl.abs(s_w) == float("inf"))
        ref_bad = (ref != ref) | (tl.abs(ref) == float("inf")) | (ref_w != ref_w) | (tl.abs(ref_w) == float("inf"))
        no_bound = ((mag != mag) | (mag == float("inf")) | (mag_w != mag_w) | (mag_w == float("inf")) | ref_bad) \
            & ~s_bad
        bad = (~((tl.abs(s - ref) <= bound) & (tl.abs(s_w - ref_w) <= bound_w)) & ~no_bound) | s_bad
        bound = tl.maximum(bound, bound_w)
        nonfinite = (x_bad != 0) | (ref_bad & ~no_bound)
        # a row whose block cannot see every harmful fault (csrc/linear_cpu.cpp blind_block):
        # BLIND, for the launcher's caller to make the product again and compare
        if HAS_BIAS:
            yb = a + tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            yb = a
        ymax = tl.max(tl.where(n_ok[None, :], tl.abs(yb), 0.0), 1)
        # (and a weighted difference above WEIGHTED_VERIFY of its bound: a warp whose deltas
        # cancel in the plain sum may leave only that much; ftattn/linear.py WEIGHTED_VERIFY)
        near = ~(tl.abs(s_w - ref_w) <= 0.25 * bound_w)
        blind = ~bad & (no_bound | near | ~(2.0 * bound <= tau * tl.maximum(ymax, 1.0)))
        bits = tl.where(bad, tl.where(nonfinite, NONFINITE_INPUT, GEMM_ROW_CHECKSUM), tl.where(blind, BLIND, 0))
        tl.atomic_or(Flags + rm // BLOCK_REPORT, bits, mask=m_ok & (bits != 0))
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * OUT + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
