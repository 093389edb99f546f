"""The pure-PyTorch reference backend: the same checks as the fused kernels, done
as separate ops on the whole N x M score matrix (matmul, softmax twice, checksums),
with tolerances that scale with the data rather than exact equality. It is the baseline the benchmarks beat, it
supports every fault site, and it returns the same flags as the kernels.

Memory is O(N * M) per head: this is what a user would write by hand.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import List, Optional, Tuple

import torch

from .contract import BIT_REPLACE, CHECKSUM_WEIGHT_MAX, checksum_weight, fault_fields, span_axis, xor_mask
from .faults import CHECK_MASK, TAU, Check, REPORT_BLOCK_M, Site, checksum_weights

U32 = 2.0**-24  # unit roundoff of fp32
KAPPA = 8.0  # as in csrc/attention_cpu.cpp
PV_GROUP = 64  # head dims per PV-checksum group, as in csrc/attention_cpu.cpp and kernels/attention.py
# absolute term per fp32 operation under gradual underflow, as csrc/attention_cpu.cpp
# (fl(x op y) = (x op y)(1 + d) + e, |e| <= 2^-150; two per multiply-add)
ETA = 2.0**-149
# score verification, as csrc/attention_cpu.cpp: a quarter of the smallest harm threshold
TAU_VERIFY = 2.0**-12
# A PV checksum that passes above PV_VERIFY of its bound (protection full) makes the call again
# and compares the block's output rows bit for bit, as csrc/attention/block.h's process_block:
# a warp of accumulator faults can nearly cancel in a group's sum (the random warp campaign
# passed 2 of ~1,250 harmful ones, at 0.17 and 0.82 of the bound; clean rows sit below 0.006
# of it). Its mark between _forward and attention_reference is internal, never returned.
PV_VERIFY = 1.0 / 8.0
PV_VERIFY_WEIGHTED = 1.0 / 32.0  # the weighted checksum's (csrc/attention/block.h)
PV_BLIND = 3.0  # (csrc/attention/block.h)
_PV_VERIFY_BIT = int(Check.BLIND)  # (as csrc/attention/block.h kPvVerify)


def ieee_fp32_matmul(fn):
    """``fn`` with torch's fp32 matmuls in IEEE fp32, whatever torch.set_float32_matmul_precision
    says ("high" / "medium" run them on TF32 or, on a CPU with AVX512-BF16, oneDNN's bf16
    path): the reference's bounds are those of fp32 accumulation, as the kernels' products
    (C++ sgemm, Triton's input_precision="ieee"), and every check failed on clean data
    otherwise. The backends' settings are put back as they were when the last overlapping
    call leaves (process-wide, as torch keeps them: another thread's fp32 matmul meanwhile
    runs in IEEE fp32 too)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _IEEE_LOCK:  # (the first call in sets, the last out puts back: threads overlap)
            if _IEEE_STATE["depth"] == 0:
                _IEEE_STATE["before"] = [b.fp32_precision for b in _MATMUL_BACKENDS]
                for b in _MATMUL_BACKENDS:
                    b.fp32_precision = "ieee"
            _IEEE_STATE["depth"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _IEEE_LOCK:
                _IEEE_STATE["depth"] -= 1
                if _IEEE_STATE["depth"] == 0:
                    for b, p in zip(_MATMUL_BACKENDS, _IEEE_STATE["before"]):
                        if b.fp32_precision != p:
                            b.fp32_precision = p

    return run


_MATMUL_BACKENDS = [b for b in (getattr(getattr(torch.backends, "cuda", None), "matmul", None),
                                getattr(getattr(torch.backends, "mkldnn", None), "matmul", None))
                    if b is not None and hasattr(b, "fp32_precision")]
_IEEE_LOCK = threading.Lock()
_IEEE_STATE = {"depth": 0, "before": []}


def pv_weight(d: int) -> float:
    """Weight of head dim d in the PV check's second, weighted checksum (protection full): the
    contract's checksum_weight (odd multiples of 2^-26 in (-1/4, 1/4), PV_WEIGHT_MAX: the
    bound's scale), as csrc/attention/common.h and kernels/attention.py."""
    return checksum_weight(d)


PV_WEIGHT_MAX = CHECKSUM_WEIGHT_MAX


def pv_weights(D: int, device=None) -> torch.Tensor:
    """pv_weight of head dims 0 .. D - 1, fp64 (faults.checksum_weights)."""
    return checksum_weights(D, device)


def _corrupt(t: torch.Tensor, index: tuple, bit: int, value: Optional[float], span: int = 1) -> None:
    """Flip bit `bit` of the fp32 values t[index] (the bits of the mask `value` for
    BIT_MASK, or replace them by `value` for BIT_REPLACE), in place; the last index runs
    over `span` consecutive values from the one named, clipped at the row's end."""
    index = (*index[:-1], slice(index[-1], index[-1] + span))
    if bit == BIT_REPLACE:
        t[index] = float(value)
        return
    hit = t[index]
    word = hit.reshape(-1).clone().view(torch.int32)
    word ^= torch.tensor([xor_mask(bit, value)], dtype=torch.int32, device=t.device)
    t[index] = word.view(torch.float32).reshape(hit.shape)


def _on_sample(fault, start: int, end: int) -> Optional[List[int]]:
    """A fault of sample ``fault[1]`` moved to its keys [start, end) (batch 0), or None when
    it hits none of them; a span over keys keeps the part within them, as the kernels do."""
    site, _, head, row, col, dim, bit, span = fault_fields(fault)
    if site in (Site.OUTPUT, Site.DQ):  # (no key)
        return [site, 0, head, row, 0 if site == Site.OUTPUT else col, dim, bit, span]
    if span_axis(site) == "col":
        first = max(col, start)
        if first >= min(end, col + span):
            return None
        return [site, 0, head, row, first - start, dim, bit, col + span - first]
    return [site, 0, head, row, col - start, dim, bit, span] if start <= col < end else None


def _rows_to_blocks(bad_rows: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, H, N] -> bool [B, H, ceil(N / 64)]: a block fails if any of its rows does."""
    nblk = (n + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    pad = nblk * REPORT_BLOCK_M - n
    padded = torch.nn.functional.pad(bad_rows, (0, pad), value=False)
    return padded.view(*bad_rows.shape[:2], nblk, REPORT_BLOCK_M).any(-1)


def _product_checks(prod: torch.Tensor, ad: torch.Tensor, bd: torch.Tensor):
    """Row and column checksums of an fp32 product prod = A B^T [.., N, M] (A [.., N, D],
    B [.., M, D], given in fp64): the rows whose row checksum fails [.., N] (sum_j prod_ij vs
    a_i . sum_j b_j, bound kappa u sqrt(D) |a_i| . sum_j |b_j|), the blocks of 64 rows
    whose column checksum fails [.., nblk] (sum_i prod_ij vs (sum_i a_i) . b_j) and the
    column bounds [.., nblk, M]. QK^T in the forward and the backward, dO V^T in the backward."""
    N, D, M = ad.shape[-2], ad.shape[-1], bd.shape[-2]
    sqrt_d = math.sqrt(D)
    ref = (ad @ bd.sum(-2, keepdim=True).transpose(-1, -2)).squeeze(-1)
    mag = (ad.abs() @ bd.abs().sum(-2, keepdim=True).transpose(-1, -2)).squeeze(-1)
    bad = ~((prod.double().sum(-1) - ref).abs() <= KAPPA * U32 * sqrt_d * mag + ETA * M * (D + 1))
    nblk = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    pad = nblk * REPORT_BLOCK_M - N
    lead = prod.shape[:-2]
    pb = torch.nn.functional.pad(prod.double(), (0, 0, 0, pad)).view(*lead, nblk, REPORT_BLOCK_M, M)
    ab = torch.nn.functional.pad(ad, (0, 0, 0, pad)).view(*lead, nblk, REPORT_BLOCK_M, D)
    ref_c = ab.sum(-2) @ bd.transpose(-1, -2)  # [.., nblk, M]
    mag_c = ab.abs().sum(-2) @ bd.abs().transpose(-1, -2)
    colb = KAPPA * U32 * sqrt_d * mag_c + ETA * REPORT_BLOCK_M * (D + 1)
    bad_c = ~((pb.sum(-2) - ref_c).abs() <= colb)
    return bad, bad_c.any(-1), colb


def _fp32_heads(q, k, v):
    """q, k, v in fp32, k and v repeated to q's heads (grouped-query attention)."""
    group = q.shape[1] // k.shape[1]
    return q.float(), k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)


def _scaled_scores(S: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """S scale, with -inf where causal masks key j of query i (j > i + M - N)."""
    s = S * scale
    if causal:
        N, M = S.shape[-2], S.shape[-1]
        i = torch.arange(N, device=S.device)[:, None]
        j = torch.arange(M, device=S.device)[None, :]
        s = s.masked_fill(j > i + (M - N), float("-inf"))
    return s


def _forward(q, k, v, causal: bool, scale: float, protection: int, fault: Optional[List[int]],
             fault_value: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One unfused pass: fp32 output [B, Hq, N, D] and int32 flags [B, Hq, nblk]."""
    B, Hq, N, D = q.shape
    M = k.shape[2]
    qf, kf, vf = _fp32_heads(q, k, v)
    site = row = head = batch = col = dim = bit = None
    span = 1
    if fault is not None:
        site, batch, head, row, col, dim, bit, span = fault_fields(fault)
        if causal and site != Site.OUTPUT:
            # as the kernels: a fault lands only on keys a tile of its 64-row block visits
            kv_end = min(M, min(N, (row // REPORT_BLOCK_M + 1) * REPORT_BLOCK_M) + M - N)
            if col >= kv_end:
                site = None
            elif site in (Site.SCORES, Site.PROBS):
                span = min(span, kv_end - col)
    nblk = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    flags = torch.zeros(B, Hq, nblk, dtype=torch.int32, device=q.device)
    abft, full = protection >= 1, protection >= 2

    def flag(bits: int, bad_blocks: torch.Tensor) -> None:
        flags.bitwise_or_(bad_blocks.to(torch.int32) * bits)

    # S = Q K^T (fp32)
    S = qf @ kf.transpose(-1, -2)
    if site == Site.SCORES:
        _corrupt(S, (batch, head, row, col), bit, fault_value, span)
    if abft:
        qd, kd = qf.double(), kf.double()
        sqrt_d = math.sqrt(D)
        bad, bad_c, colb = _product_checks(S, qd, kd)
        flag(int(Check.ROW_CHECKSUM), _rows_to_blocks(bad, N))
        flag(int(Check.COL_CHECKSUM), bad_c)

    # softmax over the whole row
    s = _scaled_scores(S, scale, causal)
    m_true = s.amax(-1) if M > 0 else s.new_full((B, Hq, N), float("-inf"))
    m = m_true.clone()
    if site == Site.ROWMAX:
        _corrupt(m, (batch, head, row), bit, fault_value)
    empty = m_true == float("-inf")  # rows with no visible key
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m_safe[..., None])
    if site == Site.PROBS:
        _corrupt(p, (batch, head, row, col), bit, fault_value, span)
    if abft:
        flag(int(Check.ROWMAX_INVARIANT), _rows_to_blocks(~((m == m_true) | (m != m)) | ~(empty | m.isfinite()), N))
        bad_range = ~((p >= 0) & (p <= 1)).all(-1)
        # max p == 1 at the max (every row here has one "tile": the whole row)
        bad_max = ~(empty | (p.amax(-1) == 1.0)) if M > 0 else torch.zeros_like(empty)
        flag(int(Check.PROBS_RANGE), _rows_to_blocks(bad_range, N))
        flag(int(Check.ROWMAX_INVARIANT), _rows_to_blocks(bad_max, N))
    if full:
        # redundant softmax: p made again by the same operation from s and m, bit for bit (as
        # csrc/attention/softmax.h: deterministic, equal unless a fault struck; the exp2
        # formulation's tolerance of stops before passed changes of p that harm the output
        # where a row's values are large and cancel), scores NaN left out (their p are NaN)
        p2 = torch.exp(s - m_safe[..., None])
        bad = ((p.view(torch.int32) != p2.view(torch.int32)) & ~torch.isnan(s)).any(-1)
        flag(int(Check.SOFTMAX_DMR), _rows_to_blocks(bad, N))

    if abft and M > 0:
        # score verification (csrc/attention_cpu.cpp, scores_mismatch): the keys whose score
        # a fault could move harmfully within the column check's bound (p_ij / l_i >= theta_j)
        # against q . k in fp64, within KAPPA sqrt(D) u (||q o k||_2 + |S|)
        colb_rows = colb.repeat_interleave(REPORT_BLOCK_M, dim=2)[:, :, :N]  # [B, H, N, M]
        vmax = vf.abs().amax(-1).double()[:, :, None, :]
        theta = TAU_VERIFY / ((vmax + 1.0) * torch.expm1(2.0 * colb_rows * abs(scale)))
        pd_ = p.double()
        verify = (pd_ >= theta * pd_.sum(-1, keepdim=True)) & ~empty[..., None]
        if bool(verify.any()):
            S64 = qd @ kd.transpose(-1, -2)
            n2 = (qd * qd) @ (kd * kd).transpose(-1, -2)
            noise = KAPPA * U32 * sqrt_d * (n2.sqrt() + S64.abs()) + ETA * (D + 1)
            bad_s = (verify & ~((S.double() - S64).abs() <= noise)).any(-1)
            # where the verified keys' noise could hide harm (sum_j p_j (e^{|scale| b_j} - 1)
            # (|v_j|_inf + 1) >= TAU_VERIFY l), S made again by the same product must agree
            # bit for bit, on every row of that head (the kernels: of that tile)
            hidden = torch.where(verify, pd_ * torch.expm1(noise * abs(scale)) * (vmax + 1.0), 0.0).sum(-1)
            dmr = (~(hidden < TAU_VERIFY * pd_.sum(-1))).any(-1) & full  # [B, H]; protection full only
            if bool(dmr.any()):
                again = qf @ kf.transpose(-1, -2)
                differs = (S.view(torch.int32) != again.view(torch.int32)).any(-1)
                bad_s |= differs & dmr[..., None]
            flag(int(Check.SCORE_RECOMPUTE), _rows_to_blocks(bad_s, N))

    l = p.sum(-1)
    if site == Site.ROWSUM:
        _corrupt(l, (batch, head, row), bit, fault_value)
    acc = p @ vf
    if site == Site.ACC:
        _corrupt(acc, (batch, head, row, dim), bit, fault_value, span)
    visible = (
        (torch.arange(N, device=q.device) + (M - N) + 1).clamp(0, M).to(torch.float64)
        if causal else torch.full((N,), float(M), dtype=torch.float64, device=q.device)
    )
    if abft:
        pd = p.double()
        l2 = pd.sum(-1)
        depth = M + 8
        bad_l = ~((l.double() - l2).abs() <= depth * U32 * l2)
        bad_l |= ~(empty | ((l2 >= 1.0 - depth * U32) & (l2 <= visible * (1.0 + depth * U32))))
        flag(int(Check.ROWSUM_INVARIANT), _rows_to_blocks(bad_l, N))
        # (full) a relative tolerance of (M + 8) u passes changes of l that move O by tau |O|
        # from M ~ 16K (review: 1.5 tau at M = 32768): where it exceeds a quarter of tau the
        # rows are BLIND, made again and compared (the C++ kernel's sums are per tile)
        rows_blind = ~empty & (depth * U32 > 0.25 * TAU[q.dtype]) if full else None
        # per group of PV_GROUP head dims (as the kernels): the bound grows with the dims
        # summed, and one group of 64 keeps it below the harm of one accumulator element
        vd = vf.double()
        accd = acc.double()
        wts = pv_weights(D, q.device)
        bad_pv = torch.zeros_like(empty)
        near_pv = torch.zeros_like(empty)
        # (full) the row's harm threshold in accumulator units, tau max(l, max_d |acc_d|): a row
        # whose difference exceeds a quarter of it, or whose bound exceeds PV_BLIND times it
        # (large values that cancel), is made again and compared (csrc/attention/block.h)
        harm = TAU[q.dtype] * torch.maximum(l.double(), accd.abs().amax(-1) if D else l.double())
        for d0 in range(0, D, PV_GROUP):
            vg = vd[..., d0:d0 + PV_GROUP]
            c = (pd @ vg.sum(-1, keepdim=True)).squeeze(-1)
            bv = (pd @ vg.abs().sum(-1, keepdim=True)).squeeze(-1)
            gd = vg.shape[-1]
            stat, floor = KAPPA * U32 * math.sqrt(M + 2) * bv, ETA * (gd + 2) * (M + 2)
            diff = (accd[..., d0:d0 + PV_GROUP].sum(-1) - c).abs()
            bad_pv |= ~(diff <= stat + floor)
            near_pv |= ~(diff <= PV_VERIFY * stat + floor)
            if full:
                near_pv |= (~(diff <= 0.25 * harm + floor) | ~(stat + floor <= PV_BLIND * harm)) & ~empty

        if full:  # the weighted checksum over every dim (|w| < 1/4: the groups' bounds together, / 4)
            cw = (pd @ (vd * wts).sum(-1, keepdim=True)).squeeze(-1)
            wdiff = (accd @ wts - cw).abs()
            bv = (pd @ vd.abs().sum(-1, keepdim=True)).squeeze(-1)
            stat, floor = KAPPA * U32 * math.sqrt(M + 2) * bv * PV_WEIGHT_MAX, ETA * (D + 2) * (M + 2)
            bad_pv |= ~(wdiff <= stat + floor)
            near_pv |= ~(wdiff <= PV_VERIFY_WEIGHTED * stat + floor)
        flag(int(Check.PV_CHECKSUM), _rows_to_blocks(bad_pv, N))
        if full:
            flag(_PV_VERIFY_BIT, _rows_to_blocks((near_pv | rows_blind) & ~bad_pv, N))

    out = torch.where(empty[..., None], torch.zeros_like(acc), acc / l[..., None])
    if site == Site.OUTPUT:
        _corrupt(out, (batch, head, row, dim), bit, fault_value, span)
    if abft:
        # element by element: what is stored, divided again (a sum over the dims let a
        # warp's fault cancel in it; IEEE division rounds alike, so any difference is a fault)
        again = torch.where(empty[..., None], torch.zeros_like(acc), acc / l[..., None])
        bad_o = ~(out == again).all(-1)
        flag(int(Check.OUTPUT_CHECK), _rows_to_blocks(bad_o, N))
    return out, flags


@ieee_fp32_matmul
def attention_reference(q, k, v, causal: bool, scale: float, protection: int, recompute: bool,
                        fault: Optional[List[int]] = None, fault_value: Optional[float] = None,
                        key_start: Optional[torch.Tensor] = None, key_end: Optional[torch.Tensor] = None):
    """Same contract as ``torch.ops.ftattn.attention_fwd``: returns (out in q.dtype, flags).
    With key ranges, by definition: each sample on its own keys, the fault moved to them."""
    if key_start is not None:
        outs, flag_list = [], []
        for b, (start, end) in enumerate(zip(key_start.tolist(), key_end.tolist())):
            f = None if fault is None or fault[1] != b else _on_sample(fault, start, end)
            o, fl = attention_reference(q[b:b + 1], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end], causal,
                                        scale, protection, recompute, f, fault_value)
            outs.append(o)
            flag_list.append(fl)
        return torch.cat(outs), torch.cat(flag_list)
    out, flags = _forward(q, k, v, causal, scale, protection, fault, fault_value)
    failed = (flags & CHECK_MASK) != 0
    verify = ((flags & _PV_VERIFY_BIT) != 0) & ~failed
    flags &= ~_PV_VERIFY_BIT
    second = []  # (the clean pass, made once for the verification and the recomputation)

    def again_pass():
        if not second:
            second.extend(_forward(q, k, v, causal, scale, protection, None, None))
        return second

    if bool(verify.any()):  # (the call again, compared bit for bit: it rounds alike)
        N = q.shape[2]
        out2, flags2 = again_pass()
        same = (out.view(torch.int32) == out2.view(torch.int32)).all(-1)
        differ = verify & _rows_to_blocks(~same, N)
        flags |= differ.to(torch.int32) * int(Check.PV_CHECKSUM)
        if recompute:
            again = (flags2 & CHECK_MASK) != 0
            flags |= (differ & ~again).to(torch.int32) * int(Check.CORRECTED)
            flags |= (differ & again).to(torch.int32) * int(Check.UNCORRECTED)
            rows = differ.repeat_interleave(REPORT_BLOCK_M, dim=2)[..., :N, None]
            out = torch.where(rows, out2, out)
    if bool(failed.any()):
        N = q.shape[2]
        group = q.shape[1] // k.shape[1]
        # non-finite input per block: the block's q rows, or any key/value it reads
        q_bad = _rows_to_blocks(~q.isfinite().all(-1), N)
        kv_bad = ~(k.isfinite().all(-1).all(-1) & v.isfinite().all(-1).all(-1))  # [B, Hkv]
        nonfinite = q_bad | kv_bad.repeat_interleave(group, dim=1)[..., None]
        flags |= (failed & nonfinite).to(torch.int32) * int(Check.NONFINITE_INPUT)
        redo = failed & ~nonfinite
        if recompute and bool(redo.any()):
            out2, flags2 = again_pass()
            again = (flags2 & CHECK_MASK) != 0
            flags |= (redo & ~again).to(torch.int32) * int(Check.CORRECTED)
            flags |= (redo & again).to(torch.int32) * int(Check.UNCORRECTED)
            rows = redo.repeat_interleave(REPORT_BLOCK_M, dim=2)[..., :N, None]
            out = torch.where(rows, out2, out)
    return out.to(q.dtype), flags


# ---------------------------------------------------------------------------
# the backward


BWD_GROUP = 16  # head dims per checksum group of dQ, dK and dV


def _group_checks(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, weighted: bool,
                  harm: Optional[Tuple[float, float, bool]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """acc = x @ w (fp32, [.., R, D]) against its checksum per group of BWD_GROUP columns:
    sum_{d in g} acc_rd vs x_r . (sum_{d in g} w_:d) in fp64, within kappa u sqrt(K + 2)
    |x_r| . (sum_{d in g} |w_:d|), the PV check's bound; ``weighted`` (full) adds the weighted
    checksum over every column (pv_weight, as the forward's and csrc/attention_bwd_cpu.cpp's),
    within the same bound over all columns. Returns (rows [.., R] whose check fails, rows that
    passed blind): ``harm`` = (tau, floor, row_max) (full) marks a row blind where a group's
    bound exceeds PV_BLIND H or its difference H / 4, H = max(floor, tau max_d |acc_rd|) (row_max)
    or the floor (csrc/attention_bwd_cpu.cpp group_check). The blind rule takes the bound, or
    where smaller its statistical estimate from the terms' squares, kappa u sqrt(K + 2) (||t||_2
    + sum_d |acc_rd|) with ||t||_2^2 <= max_k (|x_rk| sum_d |w_kd|) mag (as the C++ kernel): the
    bound grows as K and the harm as sqrt K (normal data with gradients of ~1e2 went blind from
    ~500 keys)."""
    K, D = w.shape[-2], w.shape[-1]
    xd, wd, ad = x.double(), w.double(), acc.double()
    xmax = xd.abs().amax(-1) if K else torch.zeros_like(ad[..., 0])
    bad = torch.zeros(acc.shape[:-1], dtype=torch.bool, device=acc.device)
    blind = torch.zeros_like(bad)
    if harm is not None:
        tau, floor, row_max = harm
        H = torch.full_like(ad[..., 0], floor)
        if row_max and D:
            H = torch.maximum(H, tau * ad.abs().amax(-1))
    for d0 in range(0, D, BWD_GROUP):
        wg = wd[..., d0:d0 + BWD_GROUP]
        ref = (xd @ wg.sum(-1, keepdim=True)).squeeze(-1)
        mag = (xd.abs() @ wg.abs().sum(-1, keepdim=True)).squeeze(-1)
        under = ETA * (wg.shape[-1] + 2) * (K + 2)
        bound = KAPPA * U32 * math.sqrt(K + 2) * mag + under
        diff = (ad[..., d0:d0 + BWD_GROUP].sum(-1) - ref).abs()
        bad |= ~(diff <= bound)
        if harm is not None:
            wmax = wg.abs().sum(-1).amax(-1, keepdim=True) if K else torch.zeros_like(xmax)
            estimate = KAPPA * U32 * math.sqrt(K + 2) * ((mag * xmax * wmax).sqrt()
                                                          + ad[..., d0:d0 + BWD_GROUP].abs().sum(-1)) + under
            rounding = torch.minimum(bound, estimate)
            blind |= ~(rounding <= PV_BLIND * H) | ~(diff <= 0.25 * H)
    if weighted:  # (weights / 4, as the C++ kernel: |w| < 1/16, sums within a group's reach)
        wts = pv_weights(D, acc.device) * 0.25
        ref = (xd @ (wd @ wts)[..., None]).squeeze(-1)
        mag = (xd.abs() @ wd.abs().sum(-1, keepdim=True)).squeeze(-1) / 16.0
        bound = KAPPA * U32 * math.sqrt(K + 2) * mag + ETA * (D + 2) * (K + 2)
        bad |= ~((ad @ wts - ref).abs() <= bound)
    return bad, blind & ~bad


def _verify(prod: torch.Tensor, ad: torch.Tensor, bd: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The entries of the fp32 product prod = A B^T where ``which`` holds, against fp64:
    within kappa sqrt(D) u (||a_i o b_j||_2 + |prod_ij|), as the forward's score
    verification (each entry as one fp64 dot: O(D) per entry verified). Rows [.., N] with
    a mismatch."""
    bad = torch.zeros(which.shape[:-1], dtype=torch.bool, device=which.device)
    idx = which.nonzero(as_tuple=True)
    if idx[0].numel() == 0:
        return bad
    lead, i, j = idx[:-2], idx[-2], idx[-1]
    terms = ad[(*lead, i)] * bd[(*lead, j)]  # [E, D]
    exact = terms.sum(-1)
    noise = KAPPA * U32 * math.sqrt(ad.shape[-1]) * (terms.square().sum(-1).sqrt() + exact.abs()) \
        + ETA * (ad.shape[-1] + 1)
    wrong = ~((prod[idx].double() - exact).abs() <= noise)
    bad[tuple(t[wrong] for t in (*lead, i))] = True
    return bad


def _again(prod: torch.Tensor, a: torch.Tensor, b: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The entries of the fp32 product prod = a b^T where ``which`` holds against the same
    product computed again (the same GEMM on the same operands: equal bit for bit when no
    fault struck). The backward's gradients carry a score's error times |k| and |q|, so
    with outlier channels a fault below the fp64 comparison's rounding bound can still
    harm them; the second computation leaves no such window. Rows [.., N] that differ."""
    if not bool(which.any()):
        return torch.zeros(which.shape[:-1], dtype=torch.bool, device=which.device)
    return (which & (prod != a @ b.transpose(-1, -2))).any(-1)


def _backward(q, k, v, out, dout, causal: bool, scale: float, protection: int, fault: Optional[List[int]],
              fault_value: Optional[float]):
    """One unfused backward pass in fp32: (dq, dk, dv) [fp32], the flags of the query
    blocks [B, Hq, ceil(N / 64)] and the check bits per key [B, Hq, M] (dK, dV).

    P is recomputed from S with the row log-sum-exp taken in fp64, D_i = dO_i . O_i from the
    forward's O, dS = P (dP - D), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO (per query
    head; a group's sum for GQA). Checks (abft): S and dP = dO V^T by row and column
    checksums, and the entries a fault could move harmfully within the column bound
    verified in fp64; P in [0, 1] and each row summing to 1; each row of dS summing to 0;
    dQ, dK, dV by checksums per group of head dims. Full adds a second computation of P
    (exp2) and of dS (P dP - P D)."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf, kf, vf = _fp32_heads(q, k, v)
    of, gf = out.float(), dout.float()
    site = batch = head = row = col = dim = bit = None
    span = 1
    if fault is not None:
        site, batch, head, row, col, dim, bit, span = fault_fields(fault)
    nq = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    flags = torch.zeros(B, Hq, nq, dtype=torch.int32, device=q.device)
    keybits = torch.zeros(B, Hq, M, dtype=torch.int32, device=q.device)
    abft, full = protection >= 1, protection >= 2

    def flag(bits: int, bad_rows: torch.Tensor) -> None:
        flags.bitwise_or_(_rows_to_blocks(bad_rows, N).to(torch.int32) * bits)

    S = qf @ kf.transpose(-1, -2)
    if site == Site.BWD_SCORES:
        _corrupt(S, (batch, head, row, col), bit, fault_value, span)
    s = _scaled_scores(S, scale, causal)
    m = s.amax(-1) if M > 0 else s.new_full((B, Hq, N), float("-inf"))
    empty = m == float("-inf")
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    # P from one exponential in fp64 over the row's sum l (the kernels take the forward's
    # max and normaliser; torch's fp32 exp was seen off by 7e-5 relative on a process's first
    # backward here, a false alarm of the row sums), rounded to fp32
    x = s - m_safe[..., None]  # (fp32, as the kernels' argument)
    e = torch.exp(x.double())
    l = torch.where(empty, torch.ones_like(m_safe, dtype=torch.float64), e.sum(-1))
    p = (e / l[..., None]).float()
    if site == Site.BWD_PROBS:
        _corrupt(p, (batch, head, row, col), bit, fault_value, span)
    dP = gf @ vf.transpose(-1, -2)
    if site == Site.DP:
        _corrupt(dP, (batch, head, row, col), bit, fault_value, span)
    Dr = (gf * of).sum(-1)
    dS = p * (dP - Dr[..., None])
    if site == Site.DS:
        _corrupt(dS, (batch, head, row, col), bit, fault_value, span)
    dq = dS @ kf
    if site == Site.DQ:
        _corrupt(dq, (batch, head, row, dim), bit, fault_value, span)
    dkh = dS.transpose(-1, -2) @ qf
    if site == Site.DK:
        _corrupt(dkh, (batch, head, col, dim), bit, fault_value, span)
    dvh = p.transpose(-1, -2) @ gf
    if site == Site.DV:
        _corrupt(dvh, (batch, head, col, dim), bit, fault_value, span)

    if abft:
        qd, kd, vd, gd = qf.double(), kf.double(), vf.double(), gf.double()
        pd = p.double()
        bad, bad_c, colb_s = _product_checks(S, qd, kd)
        flag(int(Check.ROW_CHECKSUM), bad)
        flags.bitwise_or_(bad_c.to(torch.int32) * int(Check.COL_CHECKSUM))
        # P: in [0, 1], rows summing to 1 (0 for a row with no visible key)
        flag(int(Check.PROBS_RANGE), ~((p >= 0) & (p <= 1)).all(-1))
        rs = pd.sum(-1)
        ok_rs = torch.where(empty, rs == 0, (rs - 1.0).abs() <= (M + 8) * U32)
        flag(int(Check.ROWSUM_INVARIANT), ~ok_rs)
        # dP = dO V^T
        bad, bad_c, colb_p = _product_checks(dP, gd, vd)
        flag(int(Check.DP_CHECKSUM), bad)
        flags.bitwise_or_(bad_c.to(torch.int32) * int(Check.DP_CHECKSUM))
        # rows of dS sum to sum_j P_ij dP_ij - D_i sum_j P_ij, known from the (checked) P and
        # dP: the invariant holds to dS's own rounding, whatever the forward's O carried
        dsd, dpd = dS.double(), dP.double() - Dr.double()[..., None]
        expect = (pd * dP.double()).sum(-1) - Dr.double() * rs
        tol = (2 * U32 * (1 + 2**-20) * (pd * dpd.abs()).sum(-1) + 2 * ETA * (M + 1)
               + (M + 4) * 2.0**-52 * ((pd * dP.double()).abs().sum(-1) + Dr.double().abs() * rs))  # (fp64's own)
        # (a row with no visible key too: its dS is 0 and so is the sum; a fault on one of its
        # entries reaches dQ and dK: review, at abft, where no elementwise check runs)
        flag(int(Check.DS_CHECK), ~((dsd.sum(-1) - expect).abs() <= tol))
        # entries of S and dP a fault could move harmfully within the column bounds: fp64
        colb_s = colb_s.repeat_interleave(REPORT_BLOCK_M, dim=2)[:, :, :N]  # [B, H, N, M]
        colb_p = colb_p.repeat_interleave(REPORT_BLOCK_M, dim=2)[:, :, :N]
        qmax = qd.abs().amax(-1)[..., None]  # [B, H, N, 1]
        kmax = kd.abs().amax(-1)[:, :, None, :]  # [B, H, 1, M]
        gmax = gd.abs().amax(-1)[..., None]
        reach = abs(scale) * torch.maximum(qmax, kmax)  # dS_ij -> dQ_i, dK_j
        # (a sample with no key: no entry to verify; amax over an empty dim raised)
        dpmax = dpd.abs().amax(-1, keepdim=True) if dpd.shape[-1] else dpd.new_zeros(dpd.shape[:-1] + (1,))
        g_s = 2 * gmax + 2 * reach * dpmax
        verify_s = (pd * torch.expm1(2.0 * colb_s * abs(scale)) * g_s >= TAU_VERIFY) & ~empty[..., None]
        flag(int(Check.SCORE_RECOMPUTE), _verify(S, qd, kd, verify_s) | _again(S, qf, kf, verify_s))
        verify_p = (pd * colb_p * reach >= TAU_VERIFY) & ~empty[..., None]
        flag(int(Check.DP_CHECKSUM), _verify(dP, gd, vd, verify_p) | _again(dP, gf, vf, verify_p))
        # dQ, dK, dV by checksums per group of head dims
        # (full: rows whose checksums cannot see every harmful fault are BLIND, made again and
        # compared by settle_backward; dq = scale dQ, dk = scale sum over the group of dK: the
        # floor tau / |scale|, and a GQA group's heads add up, and may cancel, in dK and dV)
        tau, ascale = TAU[q.dtype], abs(scale)
        floor_k = tau / ascale if ascale > 0 else math.inf
        bad, blind = _group_checks(dq, dS, kf, full, (tau, floor_k, True) if full else None)
        flag(int(Check.DQ_CHECKSUM), bad)
        flag(int(Check.BLIND), blind)
        floor_v = tau
        if group > 1:
            # (GQA: the threshold of the call's own dk and dv, the group's heads summed; the floor
            # alone had every key row of loss-scaled gradients blind, made again: dO x1024)
            def summed_max(t):
                a = t.reshape(t.shape[0], -1, group, *t.shape[2:]).sum(2).abs()
                return a.amax().item() if a.numel() else 0.0
            floor_k = tau * max(1.0, ascale * summed_max(dkh)) / ascale if ascale > 0 else math.inf
            floor_v = tau * max(1.0, summed_max(dvh))
        for g_acc, g_x, g_w, bit, floor in ((dkh, dS.transpose(-1, -2), qf, Check.DK_CHECKSUM, floor_k),
                                            (dvh, p.transpose(-1, -2), gf, Check.DV_CHECKSUM, floor_v)):
            bad, blind = _group_checks(g_acc, g_x, g_w, full, (tau, floor, group == 1) if full else None)
            keybits |= bad.to(torch.int32) * int(bit) | blind.to(torch.int32) * int(Check.BLIND)
    if full:
        # a second computation of P by the same operations (fp64 exponential over the same l),
        # bit for bit, scores NaN left out (as csrc/attention_bwd_cpu.cpp probs_dmr_body)
        p2 = (torch.exp(x.double()) / l[..., None]).float()
        flag(int(Check.SOFTMAX_DMR), ((p.view(torch.int32) != p2.view(torch.int32)) & ~torch.isnan(s)).any(-1))
        # and dS made again by the same operations, bit for bit (as csrc/attention_bwd_cpu.cpp
        # row_checks; a tolerance of 2 u (|P dP| + |P D|), P dP - P D, passed faults of 50x the
        # harm threshold where dP - D cancels and the row's other keys carry large dS: review);
        # NaN pairs left out
        again = p * (dP - Dr[..., None])
        differs = (dS.view(torch.int32) != again.view(torch.int32)) & ~(torch.isnan(dS) & torch.isnan(again))
        flag(int(Check.DS_CHECK), differs.any(-1))
    dq = dq * scale
    dk = (dkh * scale).view(B, Hkv, group, M, D).sum(2)
    dv = dvh.view(B, Hkv, group, M, D).sum(2)
    return dq, dk, dv, flags, keybits


@ieee_fp32_matmul
def attention_backward_reference(q, k, v, out, dout, causal: bool, scale: float, protection: int, recompute: bool,
                                 fault: Optional[List[int]] = None, fault_value: Optional[float] = None,
                                 key_start: Optional[torch.Tensor] = None, key_end: Optional[torch.Tensor] = None):
    """The checked backward of ``attention_reference``: (dq, dk, dv) in the inputs' dtypes and
    int32 flags [B, Hq, ceil(N / 64) + ceil(M / 64)] (the query blocks, then the key blocks
    of the dK / dV checks). A failed check recomputes the backward (deterministic: the
    gradients then equal the clean ones bit for bit)."""
    def run(fault, fault_value):
        return _backward_raw(q, k, v, out, dout, causal, scale, protection, fault, fault_value, key_start, key_end)

    # (the run again without the fault: unsettled, its BLIND bits and failures as made)
    dq, dk, dv, flags = run(fault, fault_value)
    return settle_backward(q, k, v, out, dout, (dq, dk, dv), flags, recompute, lambda: run(None, None), key_start,
                           key_end)


def _backward_raw(q, k, v, out, dout, causal, scale, protection, fault, fault_value, key_start, key_end):
    """attention_backward_reference before settle_backward: (dq, dk, dv fp32, flags)."""
    B, Hq, N, D = q.shape
    M = k.shape[2]
    if key_start is not None:  # each sample on its own keys, the fault's key moved to them
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        nq = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
        flags = torch.zeros(B, Hq, nq, dtype=torch.int32, device=q.device)
        keybits = torch.zeros(B, Hq, M, dtype=torch.int32, device=q.device)
        for b, (start, end) in enumerate(zip(key_start.tolist(), key_end.tolist())):
            f = None if fault is None or fault[1] != b else _on_sample(fault, start, end)
            sl = slice(b, b + 1)
            r = _backward(q[sl], k[sl, :, start:end], v[sl, :, start:end], out[sl], dout[sl], causal, scale,
                          protection, f, fault_value)
            dq[sl], dk[sl, :, start:end], dv[sl, :, start:end] = r[0], r[1], r[2]
            flags[sl] = r[3]
            keybits[sl, :, start:end] = r[4]
        result = (dq, dk, dv, flags, keybits)
    else:
        result = _backward(q, k, v, out, dout, causal, scale, protection, fault, fault_value)
    dq, dk, dv, qflags, keybits = result
    return dq, dk, dv, torch.cat([qflags, _key_blocks(keybits, M)], dim=2)


def settle_backward(q, k, v, out, dout, grads, flags, recompute: bool, rerun, key_start=None, key_end=None):
    """A checked backward's end, for every kernel: failed checks on non-finite inputs are
    reported as such (NONFINITE_INPUT, never recomputed); otherwise, with ``recompute``,
    the whole backward runs again without the fault (``rerun()`` -> (dq, dk, dv, flags):
    deterministic, so the gradients equal the clean ones bit for bit) and each failed block
    is marked CORRECTED, or UNCORRECTED where the second run fails it too. With key ranges
    only a sample's own keys count as its input (NaN in another sample's keys, or in padding
    it never reads, made a real fault of it pass as bad input, uncorrected: review). Returns
    (dq, dk, dv) in the inputs' dtypes and the flags."""
    dq, dk, dv = grads
    group = q.shape[1] // k.shape[1]
    failed = (flags & CHECK_MASK) != 0
    # blocks whose checksums could not see every harmful fault (full; the kernels' BLIND):
    # the backward made again, and their gradients compared bit for bit (deterministic)
    blind = ((flags & int(Check.BLIND)) != 0) & ~failed
    flags = flags & ~int(Check.BLIND)
    clean = None
    if bool(blind.any()):
        clean = rerun()
        # (dk, dv are summed over a GQA group's query heads: a key block that differs is flagged
        # on each of the group's heads that was blind there, the kernels' per-head sums being gone)
        per_head = lambda a, b: _blocks_differ(a, b, 2).repeat_interleave(group, dim=1)  # noqa: E731
        dk_differs, dv_differs = per_head(dk, clean[1]), per_head(dv, clean[2])
        bits = torch.cat([torch.where(_blocks_differ(dq, clean[0], 2), int(Check.DQ_CHECKSUM), 0),
                          torch.where(dk_differs, int(Check.DK_CHECKSUM), 0)
                          | torch.where(dv_differs, int(Check.DV_CHECKSUM), 0)], dim=2).to(flags.dtype)
        caught = blind & (bits != 0)
        flags |= torch.where(caught, bits, 0)
        if recompute and bool(caught.any()):
            again = (clean[3] & CHECK_MASK) != 0
            flags |= (caught & ~again).to(torch.int32) * int(Check.CORRECTED)
            flags |= (caught & again).to(torch.int32) * int(Check.UNCORRECTED)
            dq, dk, dv = clean[0], clean[1], clean[2]
        failed = (flags & CHECK_MASK) != 0
        failed &= ~caught
    if bool(failed.any()):
        kv = k.isfinite().all(-1) & v.isfinite().all(-1)  # [B, Hkv, M]
        if key_start is not None:
            j = torch.arange(k.shape[2], device=k.device)
            read = (j >= key_start.to(k.device)[:, None]) & (j < key_end.to(k.device)[:, None])  # [B, M]
            kv = kv | ~read[:, None, :]
        finite = (q.isfinite().all(-1).all(-1) & out.isfinite().all(-1).all(-1) & dout.isfinite().all(-1).all(-1)
                  & kv.all(-1).repeat_interleave(group, dim=1))
        nonfinite = ~finite[..., None] & failed
        flags |= nonfinite.to(torch.int32) * int(Check.NONFINITE_INPUT)
        redo = failed & ~nonfinite
        if recompute and bool(redo.any()):
            clean = clean if clean is not None else rerun()
            again = (clean[3] & CHECK_MASK) != 0
            flags |= (redo & ~again).to(torch.int32) * int(Check.CORRECTED)
            flags |= (redo & again).to(torch.int32) * int(Check.UNCORRECTED)
            dq, dk, dv = clean[0], clean[1], clean[2]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), flags


def _blocks_differ(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Per block of REPORT_BLOCK_M rows along ``dim`` of [B, H, rows, D] tensors: whether a and b
    differ in some bit, [B, H, ceil(rows / 64)]."""
    bits = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    rows = (a.view(bits) != b.view(bits)).any(-1)
    pad = -rows.shape[dim] % REPORT_BLOCK_M
    rows = torch.nn.functional.pad(rows, (0, pad), value=False)
    return rows.view(*rows.shape[:2], -1, REPORT_BLOCK_M).any(-1)


def _key_blocks(keybits: torch.Tensor, M: int) -> torch.Tensor:
    """int32 check bits per key [B, H, M] -> per block of 64 keys [B, H, ceil(M / 64)]."""
    nblk = (M + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    padded = torch.nn.functional.pad(keybits, (0, nblk * REPORT_BLOCK_M - M))
    out = torch.zeros(*keybits.shape[:2], nblk, dtype=torch.int32, device=keybits.device)
    for c in (Check.DK_CHECKSUM, Check.DV_CHECKSUM, Check.BLIND):
        out |= ((padded.view(*keybits.shape[:2], nblk, REPORT_BLOCK_M) & int(c)) != 0).any(-1).to(torch.int32) * int(c)
    return out
