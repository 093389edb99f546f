"""The pure-PyTorch reference backend: the same checks as the fused kernels, done
as separate ops on the whole N x M score matrix (matmul, softmax twice, checksums),
with tolerances that scale with the data rather than exact equality. It is the baseline the benchmarks beat, it
supports every fault site, and it returns the same flags as the kernels.

Memory is O(N * M) per head: this is what a user would write by hand.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .faults import CHECK_MASK, Check, REPORT_BLOCK_M, Site

U32 = 2.0**-24  # unit roundoff of fp32
KAPPA = 8.0  # as in csrc/attention_cpu.cpp
PV_GROUP = 64  # head dims per PV-checksum group, as in csrc/attention_cpu.cpp and kernels/attention.py
LOG2E = 1.4426950408889634  # 1 / ln(2)
# absolute term per fp32 operation under gradual underflow, as csrc/attention_cpu.cpp
# (fl(x op y) = (x op y)(1 + d) + e, |e| <= 2^-150; two per multiply-add)
ETA = 2.0**-149
# score verification, as csrc/attention_cpu.cpp: a quarter of the smallest harm threshold
TAU_VERIFY = 2.0**-12


def _corrupt(t: torch.Tensor, index: tuple, bit: int, value: Optional[float]) -> None:
    """Flip bit `bit` of the fp32 value t[index] (or replace it by `value`), in place."""
    if bit < 0:
        t[index] = float(value)
        return
    word = t[index].reshape(1).clone().view(torch.int32)
    word ^= torch.tensor([(1 << bit) if bit < 31 else -(1 << 31)], dtype=torch.int32, device=t.device)
    t[index] = word.view(torch.float32)[0]


def _rows_to_blocks(bad_rows: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, H, N] -> bool [B, H, ceil(N / 64)]: a block fails if any of its rows does."""
    nblk = (n + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    pad = nblk * REPORT_BLOCK_M - n
    padded = torch.nn.functional.pad(bad_rows, (0, pad), value=False)
    return padded.view(*bad_rows.shape[:2], nblk, REPORT_BLOCK_M).any(-1)


def _forward(q, k, v, causal: bool, scale: float, protection: int, fault: Optional[List[int]],
             fault_value: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One unfused pass: fp32 output [B, Hq, N, D] and int32 flags [B, Hq, nblk]."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    site = row = head = batch = col = dim = bit = None
    if fault is not None:
        site, batch, head, row, col, dim, bit = fault
    nblk = (N + REPORT_BLOCK_M - 1) // REPORT_BLOCK_M
    flags = torch.zeros(B, Hq, nblk, dtype=torch.int32, device=q.device)
    abft, full = protection >= 1, protection >= 2

    def flag(bits: int, bad_blocks: torch.Tensor) -> None:
        flags.bitwise_or_(bad_blocks.to(torch.int32) * bits)

    # S = Q K^T (fp32)
    S = qf @ kf.transpose(-1, -2)
    if site == Site.SCORES:
        _corrupt(S, (batch, head, row, col), bit, fault_value)
    if abft:
        qd, kd = qf.double(), kf.double()
        sqrt_d = math.sqrt(D)
        # row checksum: sum_j S_ij vs q_i . sum_j k_j, bound kappa u sqrt(D) |q_i| . sum_j |k_j|
        ref = (qd @ kd.sum(2, keepdim=True).transpose(-1, -2)).squeeze(-1)
        mag = (qd.abs() @ kd.abs().sum(2, keepdim=True).transpose(-1, -2)).squeeze(-1)
        bad = ~((S.double().sum(-1) - ref).abs() <= KAPPA * U32 * sqrt_d * mag + ETA * M * (D + 1))
        flag(int(Check.ROW_CHECKSUM), _rows_to_blocks(bad, N))
        # column checksum per block of 64 query rows: sum_i S_ij vs (sum_i q_i) . k_j
        pad = nblk * REPORT_BLOCK_M - N
        Sb = torch.nn.functional.pad(S.double(), (0, 0, 0, pad)).view(B, Hq, nblk, REPORT_BLOCK_M, M)
        qb = torch.nn.functional.pad(qd, (0, 0, 0, pad)).view(B, Hq, nblk, REPORT_BLOCK_M, D)
        ref_c = qb.sum(3) @ kd.transpose(-1, -2)  # [B, H, nblk, M]
        mag_c = qb.abs().sum(3) @ kd.abs().transpose(-1, -2)
        colb = KAPPA * U32 * sqrt_d * mag_c + ETA * REPORT_BLOCK_M * (D + 1)  # [B, H, nblk, M]
        bad_c = ~((Sb.sum(3) - ref_c).abs() <= colb)
        flag(int(Check.COL_CHECKSUM), bad_c.any(-1))

    # softmax over the whole row
    s = S * scale
    if causal:
        i = torch.arange(N, device=q.device)[:, None]
        j = torch.arange(M, device=q.device)[None, :]
        s = s.masked_fill(j > i + (M - N), float("-inf"))
    m_true = s.amax(-1) if M > 0 else s.new_full((B, Hq, N), float("-inf"))
    m = m_true.clone()
    if site == Site.ROWMAX:
        _corrupt(m, (batch, head, row), bit, fault_value)
    empty = m_true == float("-inf")  # rows with no visible key
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m_safe[..., None])
    if site == Site.PROBS:
        _corrupt(p, (batch, head, row, col), bit, fault_value)
    if abft:
        flag(int(Check.ROWMAX_INVARIANT), _rows_to_blocks(~((m == m_true) | (m != m)) | ~(empty | m.isfinite()), N))
        bad_range = ~((p >= 0) & (p <= 1)).all(-1)
        # max p == 1 at the max (every row here has one "tile": the whole row)
        bad_max = ~(empty | (p.amax(-1) == 1.0)) if M > 0 else torch.zeros_like(empty)
        flag(int(Check.PROBS_RANGE), _rows_to_blocks(bad_range, N))
        flag(int(Check.ROWMAX_INVARIANT), _rows_to_blocks(bad_max, N))
    if full:
        # redundant softmax: exp2 of the same x = s - m in fp32 vs the exp path, within both
        # error bounds, u (8 + 2|x|) max(p, p2) <= u (16 max(p, p2) + 2), since |x| e^x <= 1/e;
        # independent of |m|, as csrc/attention_cpu.cpp (2^(s log2 e - m log2 e) carried
        # u|m| more, which passed harmful changes of p at large logits)
        x = s - m_safe[..., None]
        p2 = torch.exp2(x * LOG2E)
        if causal:
            p2 = p2.masked_fill(s == float("-inf"), 0.0)
        tol = U32 * (16.0 * torch.maximum(p, p2) + 2.0) + 1e-30
        bad = ~((p - p2).abs() <= tol).all(-1)
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
            flag(int(Check.SCORE_RECOMPUTE), _rows_to_blocks(bad_s, N))

    l = p.sum(-1)
    if site == Site.ROWSUM:
        _corrupt(l, (batch, head, row), bit, fault_value)
    acc = p @ vf
    if site == Site.ACC:
        _corrupt(acc, (batch, head, row, dim), bit, fault_value)
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
        # per group of PV_GROUP head dims (as the kernels): the bound grows with the dims
        # summed, and one group of 64 keeps it below the harm of one accumulator element
        vd = vf.double()
        accd = acc.double()
        bad_pv = torch.zeros_like(empty)
        for d0 in range(0, D, PV_GROUP):
            vg = vd[..., d0:d0 + PV_GROUP]
            c = (pd @ vg.sum(-1, keepdim=True)).squeeze(-1)
            bv = (pd @ vg.abs().sum(-1, keepdim=True)).squeeze(-1)
            gd = vg.shape[-1]
            bound = KAPPA * U32 * math.sqrt(M + 2) * bv + ETA * (gd + 2) * (M + 2)
            bad_pv |= ~((accd[..., d0:d0 + PV_GROUP].sum(-1) - c).abs() <= bound)
        flag(int(Check.PV_CHECKSUM), _rows_to_blocks(bad_pv, N))

    out = torch.where(empty[..., None], torch.zeros_like(acc), acc / l[..., None])
    if site == Site.OUTPUT:
        _corrupt(out, (batch, head, row, dim), bit, fault_value)
    if abft:
        od = out.double()
        ref_o = torch.where(empty, torch.zeros_like(l2), acc.double().sum(-1) / l.double())
        bad_o = ~((od.sum(-1) - ref_o).abs() <= 4.0 * U32 * od.abs().sum(-1) + ETA * D) | ~od.abs().sum(-1).isfinite()
        bad_o |= empty & ~(od.abs().sum(-1) == 0)
        flag(int(Check.OUTPUT_CHECK), _rows_to_blocks(bad_o, N))
    return out, flags


def attention_reference(q, k, v, causal: bool, scale: float, protection: int, recompute: bool,
                        fault: Optional[List[int]] = None, fault_value: Optional[float] = None,
                        key_start: Optional[torch.Tensor] = None, key_end: Optional[torch.Tensor] = None):
    """Same contract as ``torch.ops.ftattn.attention_fwd``: returns (out in q.dtype, flags).
    With key ranges, by definition: each sample on its own keys, the fault moved to them."""
    if key_start is not None:
        outs, flag_list = [], []
        for b, (start, end) in enumerate(zip(key_start.tolist(), key_end.tolist())):
            f = None
            if fault is not None and fault[1] == b and (fault[0] == Site.OUTPUT or start <= fault[4] < end):
                f = [fault[0], 0, fault[2], fault[3], fault[4] - start if fault[0] != Site.OUTPUT else 0, fault[5],
                     fault[6]]
            o, fl = attention_reference(q[b:b + 1], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end], causal,
                                        scale, protection, recompute, f, fault_value)
            outs.append(o)
            flag_list.append(fl)
        return torch.cat(outs), torch.cat(flag_list)
    out, flags = _forward(q, k, v, causal, scale, protection, fault, fault_value)
    failed = (flags & CHECK_MASK) != 0
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
            out2, flags2 = _forward(q, k, v, causal, scale, protection, None, None)
            again = (flags2 & CHECK_MASK) != 0
            flags |= (redo & ~again).to(torch.int32) * int(Check.CORRECTED)
            flags |= (redo & again).to(torch.int32) * int(Check.UNCORRECTED)
            rows = redo.repeat_interleave(REPORT_BLOCK_M, dim=2)[..., :N, None]
            out = torch.where(rows, out2, out)
    return out.to(q.dtype), flags
