"""
Fault-tolerant attention backward (Triton)
==========================================

Algorithm: the flash-attention 2 backward (Dao 2023; the Triton tutorial
06-fused-attention.py's split into a dK/dV pass and a dQ pass, no atomics, so the
gradients are deterministic). Three launches on fp32 copies of the inputs (IEEE fp32
products, never tf32: the checks' thresholds assume u = 2^-24):
  _bwd_prep   one program per (BLOCK_M query rows, batch x query head): each row's
              max and normaliser over its visible keys (the forward does not keep them)
              and D_i = dO_i . O_i;
  _bwd_dq     the same programs: per key tile S = Q K^T, P = exp(S scale - m) / l,
              dP = dO V^T, dS = P (dP - D), dQ += dS K;
  _bwd_dkdv   one program per (BLOCK_N keys, batch x query head): per query tile the
              transposed products, dV += P^T dO, dK += dS^T Q, into a buffer per query
              head (the heads of a GQA group are summed after, in a fixed order).
Extra memory O(B * H * (N + M) * D): never an N x M matrix.
Per-sample key ranges (constexpr KEY_RANGE, varlen keys): sample b reads its keys
[KStart[b], KEnd[b]) in the batch's coordinates, causal aligned at KEnd[b]; _bwd_prep and
_bwd_dq walk those keys, _bwd_dkdv keeps its 64 keys of the batch (so the key blocks'
flags and a fault's key are the batch's) and masks those outside the range (gradient 0).

Checks (the C++ kernel's, csrc/attention_bwd_cpu.cpp, as far as a program sees them):
  _bwd_dq (a row's keys all pass through one program):
    S and dP: row checksums per tile, sum_j S_ij vs q_i . sum_j k_j, and column checksums
        over the program's 64 rows, sum_i S_ij vs (sum_i q_i) . k_j;
    P in [0, 1], each row summing to 1 over its visible keys (0 for a row with none);
    dS: each row's sum against sum_j P dP - D sum_j P;
    dQ: checksums per group of 16 head dims, sum_{d in g} dQ_id vs sum_j dS_ij
        (sum_{d in g} k_jd), made by a product of the same tiles beside dQ's.
  _bwd_dkdv (a key's queries all pass through one program, a row's keys do not):
    S and dP: column checksums per tile, sum_i S_ij vs (sum_i q_i) . k_j;
    P in [0, 1] and (the row sums being out of reach) P's and dS's second computations (the
        same operations again, bit for bit) at abft too;
    dK, dV: checksums per group of 16 head dims, as dQ's.
  both: the S / dP entries a fault within the column checksums' bounds could still move
    harmfully (their probability times the gradients they reach: outlier channels)
    compared with the same product made again, bit for bit, where a tile has any (the C++
    kernel and the reference compare them with fp64 first).
  full adds the second P and dS in _bwd_dq as well.
Not yet: 16-bit products on tensor cores (inputs are converted to fp32).

Fault injection (constexpr INJECT): bwd_scores / bwd_probs / dp / ds hit the values in
_bwd_dq's recomputation when the fault's dim is even, in _bwd_dkdv's when it is odd (each
pass recomputes them; the contract leaves dim unused for these sites); dq, dk, dv hit the
accumulator at the end of its loop. `span` consecutive values of the fault's row are hit
(ftattn/contract.py SPAN_AXIS, clipped at the row's end): keys col .. col + span - 1 of
S, P, dP, dS (each in the tile or program holding it), head dims dim .. dim + span - 1 of
dQ, dK, dV.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..contract import Check, Site
from .attention import (KAPPA, LOG2E, PV_BLIND, TAU_VERIFY, U32, UNDERFLOW, _bit_or, _corrupt, _pv_weight,
                        _qk_again, _within)

# the check bits and backward sites of ftattn/contract.py as constexprs
for _c in Check:
    globals()[_c.name] = tl.constexpr(int(_c))
for _s in Site:
    globals()[f"SITE_{_s.name}"] = tl.constexpr(int(_s))
del _c, _s

GROUP_DIMS = tl.constexpr(16)  # head dims per checksum group of dQ, dK, dV (the C++ kernel's BWD_GROUP)
# the range check's top: 1 and a few roundings (S^T = K Q^T in the dK / dV pass may round a
# score up from the one the row's max was taken of, so its P can exceed 1 by a few u), times
# the drift of the scores (_p_cap)
P_MAX = tl.constexpr(1.0 + 2.0**-20)
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def loop_tile(d_pad: int) -> int:
    """The inner loop's tile on CUDA (keys in _bwd_prep / _bwd_dq, query rows in _bwd_dkdv);
    each program's own block stays one 64-row report block. Shared memory the sm_90
    compiler allocated (fp32 operands, PROTECTION 2, triton 3.6), against the H200's 227
    KiB (232448 B) a block: D 128 _bwd_dq 64 x 64 184320 B, _bwd_dkdv 64 x 64 234240 B
    (over: no launch) and 32 x 64 149888 B; D 256 _bwd_dq 64 x 64 348160 B, 64 x 32 239616 B
    (over), 64 x 16 201728 B, _bwd_dkdv 16 x 64 222400 B. Specialised as a launch is (16-
    divisible pointers and sizes; the loads are cp.async either way) the same or 1 KiB more:
    D 128 dkdv 32 x 64 149888 B, D 256 dq 64 x 16 202752 B, dkdv 16 x 64 223424 B."""
    return 64 if d_pad <= 64 else 32 if d_pad <= 128 else 16


@triton.jit
def _groups(offs_d, HEAD_DIM: tl.constexpr):
    """E [D_PAD, 16]: E_dg = 1 when head dim d is in group g (d // 16 == g), so X E sums
    each row of X over its groups (D <= 256: at most 16 groups)."""
    g = tl.arange(0, 16)
    return ((offs_d[:, None] // GROUP_DIMS == g[None, :]) & (offs_d[:, None] < HEAD_DIM)).to(tl.float32)


@triton.jit
def _weights(offs_d, HEAD_DIM: tl.constexpr):
    """The weighted checksum's weights over every head dim (protection full): the forward's
    _pv_weight / 4, |w| < 1/16, as csrc/attention_bwd_cpu.cpp (a warp's +-2^k deltas can
    cancel in both 16-dim groups it spans). Kept apart from E, whose 17th column would
    double E at D 256 (past the shared memory of a block there)."""
    return tl.where(offs_d < HEAD_DIM, _pv_weight(offs_d) * 0.25, 0.0)



@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _key_range(KStart, KEnd, b, M, KEY_RANGE: tl.constexpr):
    """Sample b's keys [lo, hi) in the batch's key coordinates: its range (per-sample key
    ranges), else all M. Causal aligns at hi (key j is visible to row i when j <= i + hi - N),
    as the forward (kernels/attention.py) and the C++ kernels."""
    lo = tl.zeros([], tl.int32)
    hi = lo + M
    if KEY_RANGE:
        lo = tl.load(KStart + b).to(tl.int32)
        hi = tl.load(KEnd + b).to(tl.int32)
    return lo, hi


@triton.jit
def _bwd_prep(Q, K, O, DO, MROW, RINV, DELTA, KStart, KEnd, H, GROUP, N, M, scale,  #
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, KEY_RANGE: tl.constexpr):
    # (a float below 2^-126 reaches the interpreter as fp64: the kernel works in fp32)
    scale = tl.cast(scale, tl.float32)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    bk = b * (H // GROUP) + h // GROUP
    k_lo, k_hi = _key_range(KStart, KEnd, b, M, KEY_RANGE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok, d_ok = offs_m < N, offs_d < HEAD_DIM
    rmask = row_ok[:, None] & d_ok[None, :]
    rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + rows, mask=rmask, other=0.0)
    shift = k_hi - N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    hi = k_hi
    if CAUSAL:
        hi = tl.minimum(k_hi, tl.maximum(k_lo, (pid_m + 1) * BLOCK_M + shift))
    for start_n in range(k_lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        key_ok = cols < k_hi
        k = tl.load(K + (bk * M + cols[:, None]) * HEAD_DIM + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0)
        s = _dot(q, tl.trans(k)) * (scale * LOG2E)
        vis = key_ok[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] <= offs_m[:, None] + shift)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        dead = m_new == float("-inf")
        alpha = tl.where(dead, 1.0, tl.math.exp2(m_i - tl.where(dead, 0.0, m_new)))
        p = tl.where(vis & ~dead[:, None], tl.math.exp2(s - tl.where(dead, 0.0, m_new)[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    # each row's max (log2 units) and 1 / its normaliser: P = exp2(s - m) / l, the argument
    # exact near the max (from a log-sum-exp, s - lse kept the rounding of |lse|: at
    # logits ~1e3 a row of P summed to 1 +- 1e-4); a row with no visible key: 0 and 0
    empty = m_i == float("-inf")
    o = tl.load(O + rows, mask=rmask, other=0.0)
    do = tl.load(DO + rows, mask=rmask, other=0.0)
    tl.store(MROW + bh * N + offs_m, tl.where(empty, 0.0, m_i), mask=row_ok)
    tl.store(RINV + bh * N + offs_m, tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i)), mask=row_ok)
    tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _p_cap(qn, kn, ascale, HEAD_DIM: tl.constexpr):
    """The top of P's range check for query rows of norms ``qn`` against keys of norms up to
    ``kn``: a score made here may round otherwise than the one the row's max was taken of
    (another product, another order of its sums: K Q^T in the dK / dV pass; so on the
    interpreter's BLAS on an AVX2 EPYC, where the fixed 1 + 2^-20 raised PROBS_RANGE on clean
    outlier-channel data), each within the row check's noise kappa u sqrt(D + 2) ||q|| ||k||:
    P then exceeds 1 by up to exp2 of twice that in log2 units (csrc/attention_bwd_cpu.cpp's
    drift and pcap)."""
    f = 2.0 * KAPPA * U32 * tl.sqrt(tl.full([], HEAD_DIM + 2, tl.float32)) * LOG2E
    return P_MAX * tl.math.exp2(f * ascale * qn * kn)


@triton.jit
def _hit(x, where, f_xor, f_use_value, f_value):
    return tl.where(where, _corrupt(x, f_xor, f_use_value, f_value), x)


@triton.jit
def _products(l1, r1, l2, r2, m_b, r_b, d_b, vis, hit, scale, f_site, f_xor, f_use_value, f_value,
              INJECT: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The recomputed tile of either pass, with the backward sites' injection: S = l1 r1^T,
    P = exp2(S scale log2 e - m) / l, dP = l2 r2^T, dS = P (dP - D) (Q, K, dO, V in the dQ
    pass; K, Q, V, dO in the transposed dK/dV pass, with m, 1 / l, D broadcast to match)."""
    if TRANSPOSED:
        # (the dK / dV pass: S^T made as (Q K^T)^T, the product the prep pass took each row's
        # max of, so P agrees with its statistics bit for bit; K Q^T rounds otherwise, and at
        # logits of ~1e25 an ulp of the score moved P's exponent by ~1e19: dK / dV checks
        # failed on clean data on an AVX2 EPYC's BLAS, interpreter)
        s = tl.trans(_dot(r1, tl.trans(l1)))
    else:
        s = _dot(l1, tl.trans(r1))
    if INJECT:
        s = _hit(s, hit & (f_site == SITE_BWD_SCORES), f_xor, f_use_value, f_value)
    x2 = s * (scale * LOG2E) - m_b
    p = tl.where(vis, tl.math.exp2(x2) * r_b, 0.0)
    if INJECT:
        p = _hit(p, hit & (f_site == SITE_BWD_PROBS), f_xor, f_use_value, f_value)
    dp = _dot(l2, tl.trans(r2))
    if INJECT:
        dp = _hit(dp, hit & (f_site == SITE_DP), f_xor, f_use_value, f_value)
    ds = tl.where(vis, p * (dp - d_b), 0.0)
    if INJECT:
        ds = _hit(ds, hit & (f_site == SITE_DS), f_xor, f_use_value, f_value)
    return s, p, dp, ds


@triton.jit
def _checksum_bits(a, bt, xsum, f, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, bit: tl.constexpr):
    """Checksums of the product x = a bt^T over its WIDTH columns: xsum_r = sum_j x_rj vs
    a_r . sum_j bt_j within f |a_r| . sum_j |bt_j| (the roundings of both sides) plus
    underflow: the bit per row of a, and each one's bound. (Row checksums: xsum = sum(x, 1);
    column checksums of the same tile: a and bt swapped, xsum = sum(x, 0).)"""
    ref = tl.sum(a * tl.sum(bt, 0)[None, :], 1)
    mag = tl.sum(tl.abs(a) * tl.sum(tl.abs(bt), 0)[None, :], 1)
    bound = f * mag + (WIDTH * (HEAD_DIM + 1)) * UNDERFLOW
    return tl.where(tl.abs(xsum - ref) <= bound, 0, bit), bound


@triton.jit
def _entries_to_verify(p, dp, delta, gmax, reach, colb_s, colb_p, vis, ascale):
    """The entries of S and dP that a fault within the column checksums' bounds (a change of
    at most 2 colb) could still move harmfully (csrc/attention_bwd_cpu.cpp's harm_bounds,
    raised by 2^-10 against fp32 rounding): S_ij moves P_ij by P_ij (e^{change scale} - 1),
    which reaches dV_j through dO_i and dQ_i, dK_j through (dP_ij - D_i) scale k_j / q_i;
    dP_ij moves dS_ij by P_ij change (dQ_i, dK_j). reach = |scale| max(|q_i|, |k_j|); the
    arguments broadcast to the tile (either pass's orientation). A NaN bound verifies."""
    x = 2.0 * colb_s * ascale
    grow_s = tl.where(x <= 0.5, x * (1.0 + x), tl.exp(x)) * (1.0 + 2.0**-10)  # >= e^x - 1
    harm_s = p * grow_s * (2.0 * (gmax + reach * tl.abs(dp - delta)))
    harm_p = p * (2.0 * colb_p * (1.0 + 2.0**-10)) * (2.0 * reach)
    return vis & ~(harm_s < TAU_VERIFY), vis & ~(harm_p < TAU_VERIFY)


@triton.jit
def _verify_entries(x, a, b, need, unit, BA: tl.constexpr, bit: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The entries of the product x = a b^T ([BA, BB]) where ``need`` holds, against the same
    product made again, bit for bit (the gradients carry a score's error times |k| and |q|:
    with outlier channels a change below any rounding bound can still harm them, so only an
    exact comparison leaves no window). The second product's accumulator starts from zeros
    times ``unit``, a 1.0 the compiler cannot see, so the two dots are never merged into one
    (kernels/attention.py _qk_again); both are IEEE fp32 dots of the same fp32 operands,
    which round alike. (The C++ kernel and the reference compare with fp64 first, which also
    re-reads the operands from memory: outside the fault model, which hits values computed
    in the kernel; a fault in the product shows in the bit-for-bit comparison.) The bit per
    row of x ([BA, BB]). TRANSPOSED: x was made as (b a^T)^T (_products), and so again."""
    out = tl.zeros([BA], tl.int32)
    if tl.max(need.to(tl.int32)) != 0:  # (tiles with no such entry: no second product)
        if TRANSPOSED:
            again = tl.trans(_qk_again(b, a, tl.trans(x), unit, True))
        else:
            again = _qk_again(a, b, x, unit, True)
        bad = need & (again.to(tl.int32, bitcast=True) != x.to(tl.int32, bitcast=True))
        out = tl.where(tl.max(bad.to(tl.int32), 1) != 0, bit, 0)
    return out


@triton.jit
def _bwd_dq(Q, K, V, DO, MROW, RINV, DELTA, DQ, Flags, KStart, KEnd, H, GROUP, N, M, NFLAG, scale, unit,  #
            f_site, f_bh, f_row, f_col, f_dim, f_span, f_xor, f_use_value, f_value,  #
            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            CAUSAL: tl.constexpr, PROTECTION: tl.constexpr, INJECT: tl.constexpr, KEY_RANGE: tl.constexpr,
            TAU_H: tl.constexpr):
    # (a float below 2^-126 reaches the interpreter as fp64: the kernel works in fp32)
    scale = tl.cast(scale, tl.float32)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    bk = b * (H // GROUP) + h // GROUP
    k_lo, k_hi = _key_range(KStart, KEnd, b, M, KEY_RANGE)
    mb = k_hi - k_lo  # (the sample's keys: the sums' terms)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok, d_ok = offs_m < N, offs_d < HEAD_DIM
    rmask = row_ok[:, None] & d_ok[None, :]
    rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + rows, mask=rmask, other=0.0)
    do = tl.load(DO + rows, mask=rmask, other=0.0)
    mrow = tl.load(MROW + bh * N + offs_m, mask=row_ok, other=0.0)
    rinv = tl.load(RINV + bh * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
    shift = k_hi - N
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bits = tl.zeros([BLOCK_M], tl.int32)
    rs = tl.zeros([BLOCK_M], tl.float32)
    dsum = tl.zeros([BLOCK_M], tl.float32)
    pdp = tl.zeros([BLOCK_M], tl.float32)
    ta = tl.zeros([BLOCK_M], tl.float32)
    tb = tl.zeros([BLOCK_M], tl.float32)
    refq = tl.zeros([BLOCK_M, 16], tl.float32)
    magq = tl.zeros([BLOCK_M, 16], tl.float32)
    E = _groups(offs_d, HEAD_DIM)
    wts = _weights(offs_d, HEAD_DIM)
    refq_w = tl.zeros([BLOCK_M], tl.float32)
    magq_w = tl.zeros([BLOCK_M], tl.float32)
    xq = tl.zeros([BLOCK_M], tl.float32)  # (the blind rule's largest terms: _group_check)
    wq = tl.zeros([16], tl.float32)
    # roundings on both sides of a row checksum
    row_f = KAPPA * U32 * tl.sqrt(tl.full([], HEAD_DIM + BLOCK_N + 2, tl.float32))
    col_f = KAPPA * U32 * tl.sqrt(tl.full([], HEAD_DIM + BLOCK_M + 2, tl.float32))
    ascale = tl.abs(scale)
    qmax = tl.max(tl.abs(q), 1)
    qnorm = tl.sqrt(tl.sum(q * q, 1))  # (P's range: _p_cap)
    gmax = tl.max(tl.abs(do), 1)
    hit_rows = (offs_m[:, None] == f_row) & (bh == f_bh) & (f_dim % 2 == 0)
    hi = k_hi
    if CAUSAL:
        hi = tl.minimum(k_hi, tl.maximum(k_lo, (pid_m + 1) * BLOCK_M + shift))
    for start_n in range(k_lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        key_ok = cols < k_hi
        kmask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + (bk * M + cols[:, None]) * HEAD_DIM + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + (bk * M + cols[:, None]) * HEAD_DIM + offs_d[None, :], mask=kmask, other=0.0)
        vis = key_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            vis = vis & (cols[None, :] <= offs_m[:, None] + shift)
        hit = hit_rows & ((cols >= f_col) & (cols < f_col + f_span) & key_ok)[None, :]
        s, p, dp, ds = _products(q, k, do, v, mrow[:, None], rinv[:, None], delta[:, None], vis, hit, scale,
                                     f_site, f_xor, f_use_value, f_value, INJECT)
        acc = tl.dot(ds, k, acc, input_precision="ieee")
        if PROTECTION >= 1:
            # S and dP: row checksums of the tile
            bits = bits | _checksum_bits(q, k, tl.sum(s, 1), row_f, BLOCK_N, HEAD_DIM, ROW_CHECKSUM)[0]
            bits = bits | _checksum_bits(do, v, tl.sum(dp, 1), row_f, BLOCK_N, HEAD_DIM, DP_CHECKSUM)[0]
            # and column checksums over this program's rows, whose bounds say which entries
            # a fault they miss could still move harmfully: those verified
            cbit_s, colb_s = _checksum_bits(k, q, tl.sum(s, 0), col_f, BLOCK_M, HEAD_DIM, COL_CHECKSUM)
            cbit_p, colb_p = _checksum_bits(v, do, tl.sum(dp, 0), col_f, BLOCK_M, HEAD_DIM, DP_CHECKSUM)
            bits = bits | tl.reduce(cbit_s | cbit_p, 0, _bit_or)  # (a column's failure flags the block)
            reach = ascale * tl.maximum(qmax[:, None], tl.max(tl.abs(k), 1)[None, :])
            need_s, need_p = _entries_to_verify(p, dp, delta[:, None], gmax[:, None], reach, colb_s[None, :],
                                                colb_p[None, :], vis, ascale)
            bits = bits | _verify_entries(s, q, k, need_s, unit, BLOCK_M, SCORE_RECOMPUTE)
            bits = bits | _verify_entries(dp, do, v, need_p, unit, BLOCK_M, DP_CHECKSUM)
            pcap = _p_cap(qnorm, tl.max(tl.sqrt(tl.sum(k * k, 1)), 0), ascale, HEAD_DIM)
            bad_p = (p < 0.0) | (p > pcap[:, None]) | (p != p)
            bits = bits | tl.where(tl.max(bad_p.to(tl.int32), 1) != 0, PROBS_RANGE, 0)
            rs += tl.sum(p, 1)
            dsum += tl.sum(ds, 1)
            pdp += tl.sum(tl.where(vis, p * dp, 0.0), 1)
            ta += tl.sum(tl.where(vis, p * tl.abs(dp - delta[:, None]), 0.0), 1)
            tb += tl.sum(tl.where(vis, tl.abs(p * dp), 0.0), 1)
            refq += _dot(ds, _dot(k, E))
            ka = _dot(tl.abs(k), E)
            magq += _dot(tl.abs(ds), ka)
            xq = tl.maximum(xq, tl.max(tl.abs(ds), 1))
            wq = tl.maximum(wq, tl.max(ka, 0))
            if PROTECTION >= 2:
                refq_w += tl.sum(ds * tl.sum(k * wts[None, :], 1)[None, :], 1)
                # (+2^-126: a product k w rounds within 2^-150 absolute where it is subnormal; f >= 2u
                # times this covers it per unit of |dS|, as csrc/attention_bwd_cpu.cpp's group_sums)
                ka_w = tl.sum(tl.abs(k) * tl.abs(wts)[None, :], 1) + 1.1754943508222875e-38
                magq_w += tl.sum(tl.abs(ds) * ka_w[None, :], 1)
            if PROTECTION >= 2:
                bits = bits | _second_p_and_ds(p, s, mrow[:, None], scale, unit, rinv[:, None], dp, ds, delta[:, None],
                                                vis, 1)
    if INJECT:
        at = (offs_m[:, None] == f_row) & ((offs_d >= f_dim) & (offs_d < f_dim + f_span) & d_ok)[None, :]
        acc = _hit(acc, at & (bh == f_bh) & (f_site == SITE_DQ), f_xor, f_use_value, f_value)
    if PROTECTION >= 1:
        empty = rinv == 0.0
        ok_rs = tl.where(empty, rs == 0.0, tl.abs(rs - 1.0) <= (mb + 8) * U32)
        bits = bits | tl.where(ok_rs | ~row_ok, 0, ROWSUM_INVARIANT)
        ntiles = (mb + BLOCK_N - 1) // BLOCK_N
        c = (2 * (ntiles + 8) + 4) * U32  # dS and its three sums in fp32, tile by tile
        expect = pdp - delta * rs
        tol = c * (ta + tb + tl.abs(delta) * rs) + mb * UNDERFLOW
        # (a row with no visible key too: its dS is 0, so is the sum; a fault on one of its
        # masked entries reaches dQ)
        bits = bits | tl.where(_within(tl.abs(dsum - expect), tol) | ~row_ok, 0, DS_CHECK)
        # (dq = scale dQ: its harm threshold tau max(1, |dq|) is tau max(1 / |scale|, |dQ|) here)
        bits = bits | _group_check(acc, E, refq, magq, mb, 1, DQ_CHECKSUM, PROTECTION >= 2, TAU_H,
                                   TAU_H / tl.abs(scale), 1.0, xq, wq)[0]
        if PROTECTION >= 2:
            bits = bits | _weighted_check(acc, wts, refq_w, magq_w, mb, HEAD_DIM, DQ_CHECKSUM)
    tl.store(DQ + rows, acc * scale, mask=rmask)
    blk_bits = tl.reduce(tl.where(row_ok, bits, 0), 0, _bit_or)
    tl.store(Flags + bh * NFLAG + pid_m, blk_bits)


@triton.jit
def _second_p_and_ds(p, s, m_b, scale, unit, rinv, dp, ds, delta, vis, AXIS: tl.constexpr):
    """The second computations (the redundant softmax and dS): P made again by _products'
    operations from the same S (scale log2 e times ``unit``, a 1.0 the compiler cannot see, and
    m plus unit - 1: distinct computations; m a sum, so a multiply-add can fuse only S's
    product, as for P), bit for bit where S is not NaN (a tolerance, as the polynomial exp of
    stops before needed, passed changes of P that harm the gradients where dO is large and
    cancels); and dS made again likewise; the check bits per row (AXIS 1) or per key (AXIS 0 of
    a transposed tile)."""
    x2b = s * ((scale * LOG2E) * unit) - (m_b + (unit - 1.0))
    p2 = tl.where(vis, tl.math.exp2(x2b) * rinv, 0.0)
    bad_p = (p.to(tl.int32, bitcast=True) != p2.to(tl.int32, bitcast=True)) & (s == s)
    # dS made again by _products' operations, P (dP - D) with D plus unit - 1, bit for bit (a
    # tolerance of 2 u (|P dP| + |P D|), P dP - P D, passed faults of 50x the harm threshold where
    # dP - D cancels and the row's other keys carry large dS: review); every entry, masked ones
    # too (dS is 0 there, and the products read it whatever vis says); NaN pairs left out
    ds2 = tl.where(vis, p * (dp - (delta + (unit - 1.0))), 0.0)
    bad_s = (ds.to(tl.int32, bitcast=True) != ds2.to(tl.int32, bitcast=True)) & ((ds == ds) | (ds2 == ds2))
    out = tl.where(tl.max(bad_p.to(tl.int32), AXIS) != 0, SOFTMAX_DMR, 0)
    return out | tl.where(tl.max(bad_s.to(tl.int32), AXIS) != 0, DS_CHECK, 0)


@triton.jit
def _group_check(acc, E, ref, mag, K, AXIS: tl.constexpr, bit: tl.constexpr, HARM: tl.constexpr, tau, floor,
                 row_max, xmax, wmax):
    """acc's sums per group of head dims (acc E) against their references, within each
    side's rounding (2 kappa u sqrt(K + 2) + 2 u of the sums of magnitudes, K the terms of
    the product): the bit per row of acc. HARM (full): a row that passes where its checks
    cannot see every harmful fault gets BLIND (settle_backward makes the backward again and
    compares): a group's rounding above PV_BLIND H or its difference above H / 4, H =
    max(floor, tau max_d |acc_d| row_max), ``row_max`` 1.0 or 0.0 (the floor alone: a GQA
    group's heads add up in dK and dV, and may cancel); the rounding is the bound or, where
    smaller, its statistical estimate f (sqrt(mag xmax_r wmax_g) + sum_{d in g} |acc_rd|), xmax
    the row's largest |term factor| and wmax the group's largest sum of |other factor| over the
    K terms (csrc/attention_bwd_cpu.cpp group_check). Also returns the smallest H that would
    leave every passing row seen, max over them of max_g (rounding / PV_BLIND, 4 diff) (HARM; else
    0): with GQA (floor +inf here, no row blind in the kernel) the launcher compares it with the
    call's own threshold once dk, dv are summed over the group's heads."""
    f = (2.0 * KAPPA * tl.sqrt((K + 2).to(tl.float32)) + 2.0) * U32
    diff = tl.abs(_dot(acc, E) - ref)
    under = 18.0 * (K + 2) * UNDERFLOW
    bound = f * mag + under
    bad = tl.max((~_within(diff, bound)).to(tl.int32), AXIS) != 0
    bits = tl.where(bad, bit, 0)
    need = tl.full([], 0.0, tl.float32)
    if HARM:
        H = tl.maximum(floor, tau * tl.max(tl.abs(acc), 1) * row_max)
        estimate = f * (tl.sqrt(mag * xmax[:, None] * wmax[None, :]) + _dot(tl.abs(acc), E)) * 1.015625 + under
        rounding = tl.minimum(bound, estimate)
        blind = ~(rounding <= PV_BLIND * H[:, None]) | ~(diff <= 0.25 * H[:, None])
        bits = bits | tl.where((tl.max(blind.to(tl.int32), AXIS) != 0) & ~bad, BLIND, 0)
        need_r = tl.max(tl.maximum(rounding * (1.0 / PV_BLIND), 4.0 * diff), AXIS)
        need = tl.max(tl.where(bad, 0.0, need_r), 0)
    return bits, need


@triton.jit
def _weighted_check(acc, wts, ref, mag, K, HEAD_DIM: tl.constexpr, bit: tl.constexpr):
    """The weighted checksum of each row of acc (sum_d w_d acc_rd) against its reference,
    within _group_check's bound over every dim: the bit per row."""
    f = (2.0 * KAPPA * tl.sqrt((K + 2).to(tl.float32)) + 2.0) * U32
    bad = ~_within(tl.abs(tl.sum(acc * wts[None, :], 1) - ref), f * mag + (HEAD_DIM + 2.0) * (K + 2) * UNDERFLOW)
    return tl.where(bad, bit, 0)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, MROW, RINV, DELTA, DKH, DVH, Flags, NEED, KStart, KEnd, H, GROUP, N, M, NQ, NFLAG, scale,
              unit,  #
              f_site, f_bh, f_row, f_col, f_dim, f_span, f_xor, f_use_value, f_value,  #
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, PROTECTION: tl.constexpr, INJECT: tl.constexpr, KEY_RANGE: tl.constexpr,
              TAU_H: tl.constexpr):
    # (a float below 2^-126 reaches the interpreter as fp64: the kernel works in fp32)
    scale = tl.cast(scale, tl.float32)
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    bk = b * (H // GROUP) + h // GROUP
    # this program's 64 keys in the batch's coordinates (its report block); with key ranges
    # those of the sample's range among them (the rest: zero gradients, no check)
    k_lo, k_hi = _key_range(KStart, KEnd, b, M, KEY_RANGE)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    key_ok, d_ok = (cols >= k_lo) & (cols < k_hi), offs_d < HEAD_DIM
    kmask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + (bk * M + cols[:, None]) * HEAD_DIM + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + (bk * M + cols[:, None]) * HEAD_DIM + offs_d[None, :], mask=kmask, other=0.0)
    shift = k_hi - N
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    bits = tl.zeros([BLOCK_N], tl.int32)
    refk = tl.zeros([BLOCK_N, 16], tl.float32)
    magk = tl.zeros([BLOCK_N, 16], tl.float32)
    refv = tl.zeros([BLOCK_N, 16], tl.float32)
    magv = tl.zeros([BLOCK_N, 16], tl.float32)
    E = _groups(offs_d, HEAD_DIM)
    wts = _weights(offs_d, HEAD_DIM)
    refk_w = tl.zeros([BLOCK_N], tl.float32)
    magk_w = tl.zeros([BLOCK_N], tl.float32)
    refv_w = tl.zeros([BLOCK_N], tl.float32)
    magv_w = tl.zeros([BLOCK_N], tl.float32)
    xk = tl.zeros([BLOCK_N], tl.float32)  # (the blind rule's largest terms: _group_check)
    xv = tl.zeros([BLOCK_N], tl.float32)
    wk = tl.zeros([16], tl.float32)
    wv = tl.zeros([16], tl.float32)
    col_f = KAPPA * U32 * tl.sqrt(tl.full([], HEAD_DIM + BLOCK_M + 2, tl.float32))
    ascale = tl.abs(scale)
    kmax = tl.max(tl.abs(k), 1)
    knorm = tl.max(tl.sqrt(tl.sum(k * k, 1)), 0)  # (P's range: _p_cap)
    hit_keys = ((cols >= f_col) & (cols < f_col + f_span) & key_ok)[:, None] & (bh == f_bh) & (f_dim % 2 == 1)
    lo = 0
    if CAUSAL:  # the first query row that sees key pid_n * BLOCK_N: i >= j - shift
        lo = tl.maximum(0, pid_n * BLOCK_N - shift) // BLOCK_M * BLOCK_M
    rows_end = N
    if KEY_RANGE:  # none of the sample's keys here: no row to visit
        rows_end = tl.where((k_lo < pid_n * BLOCK_N + BLOCK_N) & (k_hi > pid_n * BLOCK_N), N, 0)
    for start_m in range(lo, rows_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rmask = row_ok[:, None] & d_ok[None, :]
        rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + rows, mask=rmask, other=0.0)
        do = tl.load(DO + rows, mask=rmask, other=0.0)
        mrow = tl.load(MROW + bh * N + offs_m, mask=row_ok, other=0.0)
        rinv = tl.load(RINV + bh * N + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
        vis = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            vis = vis & (cols[:, None] <= offs_m[None, :] + shift)
        hit = hit_keys & (offs_m[None, :] == f_row)
        st, pt, dpt, dst = _products(k, q, v, do, mrow[None, :], rinv[None, :], delta[None, :], vis, hit,
                                         scale, f_site, f_xor, f_use_value, f_value, INJECT, True)
        dv = tl.dot(pt, do, dv, input_precision="ieee")
        dk = tl.dot(dst, q, dk, input_precision="ieee")
        if PROTECTION >= 1:
            # S and dP: column checksums (rows of the transposed tiles) over this query tile
            cbit_s, colb_s = _checksum_bits(k, q, tl.sum(st, 1), col_f, BLOCK_M, HEAD_DIM, COL_CHECKSUM)
            cbit_p, colb_p = _checksum_bits(v, do, tl.sum(dpt, 1), col_f, BLOCK_M, HEAD_DIM, DP_CHECKSUM)
            bits = bits | cbit_s | cbit_p
            # the entries a fault within those bounds could still move harmfully, verified
            reach = ascale * tl.maximum(kmax[:, None], tl.max(tl.abs(q), 1)[None, :])
            need_s, need_p = _entries_to_verify(pt, dpt, delta[None, :], tl.max(tl.abs(do), 1)[None, :], reach,
                                                colb_s[:, None], colb_p[:, None], vis, ascale)
            bits = bits | _verify_entries(st, k, q, need_s, unit, BLOCK_N, SCORE_RECOMPUTE, True)
            bits = bits | _verify_entries(dpt, v, do, need_p, unit, BLOCK_N, DP_CHECKSUM)
            pcap = _p_cap(tl.sqrt(tl.sum(q * q, 1)), knorm, ascale, HEAD_DIM)
            bad_p = tl.max(((pt < 0.0) | (pt > pcap[None, :]) | (pt != pt)).to(tl.int32), 1) != 0
            bits = bits | tl.where(bad_p, PROBS_RANGE, 0)
            # a row's keys are spread over programs (no row sum here): P and dS computed twice
            bits = bits | _second_p_and_ds(pt, st, mrow[None, :], scale, unit, rinv[None, :], dpt, dst,
                                            delta[None, :], vis, 1)
            refk += _dot(dst, _dot(q, E))
            qa = _dot(tl.abs(q), E)
            magk += _dot(tl.abs(dst), qa)
            refv += _dot(pt, _dot(do, E))
            ga = _dot(tl.abs(do), E)
            magv += _dot(pt, ga)
            xk = tl.maximum(xk, tl.max(tl.abs(dst), 1))
            xv = tl.maximum(xv, tl.max(pt, 1))
            wk = tl.maximum(wk, tl.max(qa, 0))
            wv = tl.maximum(wv, tl.max(ga, 0))
            if PROTECTION >= 2:
                refk_w += tl.sum(dst * tl.sum(q * wts[None, :], 1)[None, :], 1)
                qa_w = tl.sum(tl.abs(q) * tl.abs(wts)[None, :], 1) + 1.1754943508222875e-38  # (as _bwd_dq)
                magk_w += tl.sum(tl.abs(dst) * qa_w[None, :], 1)
                refv_w += tl.sum(pt * tl.sum(do * wts[None, :], 1)[None, :], 1)
                ga_w = tl.sum(tl.abs(do) * tl.abs(wts)[None, :], 1) + 1.1754943508222875e-38
                magv_w += tl.sum(pt * ga_w[None, :], 1)
    if INJECT:
        at = ((cols == f_col) & key_ok)[:, None] & ((offs_d >= f_dim) & (offs_d < f_dim + f_span) & d_ok)[None, :] & (
            bh == f_bh)
        dk = _hit(dk, at & (f_site == SITE_DK), f_xor, f_use_value, f_value)
        dv = _hit(dv, at & (f_site == SITE_DV), f_xor, f_use_value, f_value)
    if PROTECTION >= 1:
        # (dk = scale sum over the group's query heads, dv their sum: the heads add up, and may
        # cancel, so with GQA no row's own gradient sets its threshold, and the kernel cannot see
        # the call's: it leaves no row blind (floor +inf) and stores the threshold its key rows
        # need, for dk (in dk's units) and dv, which the launcher compares with tau max(1, max |g|)
        # of the summed dk, dv. The floor alone, as before, had every key block of loss-scaled
        # gradients blind, the whole backward made again at full: dO x1024, GQA 2:1, N 256)
        gqa = GROUP > 1
        inf = float("inf")
        bk, need_k = _group_check(dk, E, refk, magk, N, 1, DK_CHECKSUM, PROTECTION >= 2, TAU_H,
                                  tl.where(gqa, inf, TAU_H / tl.abs(scale)), (GROUP == 1).to(tl.float32), xk, wk)
        bv, need_v = _group_check(dv, E, refv, magv, N, 1, DV_CHECKSUM, PROTECTION >= 2, TAU_H,
                                  tl.where(gqa, inf, TAU_H), (GROUP == 1).to(tl.float32), xv, wv)
        bits = bits | bk | bv
        tl.store(NEED + (bh * NFLAG + NQ + pid_n) * 2, need_k * tl.abs(scale))
        tl.store(NEED + (bh * NFLAG + NQ + pid_n) * 2 + 1, need_v)
        if PROTECTION >= 2:
            bits = bits | _weighted_check(dk, wts, refk_w, magk_w, N, HEAD_DIM, DK_CHECKSUM)
            bits = bits | _weighted_check(dv, wts, refv_w, magv_w, N, HEAD_DIM, DV_CHECKSUM)
    out = (bh * M + cols[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DKH + out, dk, mask=kmask)
    tl.store(DVH + out, dv, mask=kmask)
    blk_bits = tl.reduce(tl.where(key_ok, bits, 0), 0, _bit_or)
    tl.store(Flags + bh * NFLAG + NQ + pid_n, blk_bits)
