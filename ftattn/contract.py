"""The fault contract of ftattn's ops, as plain ints: where a fault can be injected
(sites), which check saw it (flag bits), the rows of q per flag, and how a fault is
encoded for an op. No torch here: the Python API (faults.py, its face), the Triton
kernels (ftattn.kernels), the reference backend and the tests import it, and
csrc/fault_contract.h is its C++ copy, checked against this module by
tests/test_contract.py. A new site or check is added here, there, and where a kernel
does something with it.

The flags an op returns: int32 ``[B, Hq, ceil(N / REPORT_BLOCK_M)]``; the bits in
CHECK_MASK name the checks that failed on the first pass over that block of query
rows; CORRECTED: the block was recomputed and passed every check; UNCORRECTED: it was
recomputed and failed again (a persistent error, not a transient fault);
NONFINITE_INPUT: the checks failed because q, k or v hold NaN/Inf (bad input, never a
fault, never corrected).
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence, Tuple

__all__ = ["REPORT_BLOCK_M", "Site", "Check", "CHECK_MASK", "CHECK_NAMES", "FAULT_FIELDS", "BIT_REPLACE", "BIT_MASK",
           "WARP", "SPAN_AXIS", "span_axis", "fault_fields", "xor_mask", "flip_args",
           "OP_SITES", "check_fault_encoding", "check_backward_fault_encoding", "check_linear_fault_encoding"]

# Rows of q per flag. Kernels tile queries by 64 (CPU sub-blocks) or 64/128 (Triton),
# so a flagged tile maps to whole report blocks and no two programs share one.
REPORT_BLOCK_M = 64


class Site(enum.IntEnum):
    """Where a fault hits (docs/fault_model.md, "Injection sites")."""

    SCORES = 0  # S[row, col] = q_row . k_col, after the QK^T product of the KV block holding col
    PROBS = 1  # P~[row, col] = exp(scaled S - running max), before PV and the row sum
    ROWMAX = 2  # running max m[row], after its update in the KV block holding col
    ROWSUM = 3  # running normaliser l[row], after its update in the KV block holding col
    ACC = 4  # accumulator acc[row, dim], after the PV update of the KV block holding col
    OUTPUT = 5  # O[row, dim] = acc / l, after the final normalisation, before the store
    # linear layers, y = x W^T + b (row: a row of x flattened, col: an output feature)
    GEMM = 6  # the fp32 accumulator of y[row, col], after the product, before bias and the down-cast
    WEIGHT = 7  # W[row, dim] (row: an output feature) as this call reads it, before the product
    # attention's backward (given to the forward call, injected during that call's backward)
    BWD_SCORES = 8  # the recomputed S[row, col]
    BWD_PROBS = 9  # the recomputed P[row, col]
    DP = 10  # dP[row, col] = dO_row . v_col
    DS = 11  # dS[row, col] = P (dP - D_row)
    DQ = 12  # the dQ accumulator [row, dim]
    DK = 13  # the dK accumulator [col, dim] of key col, query head `head`'s contribution
    DV = 14  # the dV accumulator [col, dim] of key col, query head `head`'s contribution

    @classmethod
    def parse(cls, value) -> "Site":
        if isinstance(value, Site):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        raise ValueError(
            f"unknown fault site {value!r}; supported sites: "
            f"{', '.join(s.name.lower() for s in cls)} (see docs/fault_model.md)"
        )


class Check(enum.IntFlag):
    """Bits of the flags tensor."""

    ROW_CHECKSUM = 1 << 0  # sum_j S_ij vs q_i . sum_j k_j
    COL_CHECKSUM = 1 << 1  # sum_i S_ij vs (sum_i q_i) . k_j
    PV_CHECKSUM = 1 << 2  # sum_d acc_id vs c_i carried through the rescaling
    SOFTMAX_DMR = 1 << 3  # redundant softmax (p made again) differs
    ROWMAX_INVARIANT = 1 << 4  # m finite, m == max(m_old, rowmax), max p == 1 or alpha == 1
    ROWSUM_INVARIANT = 1 << 5  # l vs an independent accumulation, 1 <= l <= #keys
    OUTPUT_CHECK = 1 << 6  # O_id vs acc_id / l divided again
    PROBS_RANGE = 1 << 7  # 0 <= p <= 1
    SCORE_RECOMPUTE = 1 << 8  # a high-probability key's score vs q . k recomputed in fp64
    GEMM_ROW_CHECKSUM = 1 << 9  # linear: sum of y_i over a block of outputs vs x_i . (W^T e_block), cached
    # attention's backward (the recomputed S and P keep the forward's bits)
    DP_CHECKSUM = 1 << 10  # dP = dO V^T: row / column checksums, likely keys' dP recomputed in fp64
    DS_CHECK = 1 << 11  # C++: every dS entry made again; Triton, reference: row sums, full: dS another way
    DQ_CHECKSUM = 1 << 12  # sum_d dQ_id vs scale dS_i . (K 1)
    DK_CHECKSUM = 1 << 13  # sum_d dK_jd vs scale dS_:j . (Q 1), per query head
    DV_CHECKSUM = 1 << 14  # sum_d dV_jd vs P_:j . (dO 1), per query head
    NONFINITE_INPUT = 1 << 24
    CORRECTED = 1 << 25
    UNCORRECTED = 1 << 26
    # a block of rows where some row's check could not see every harmful fault (its bound
    # too near the harm threshold, or above it: values or channels that are large and
    # cancel); the block is made again and compared bit for bit, and the bit cleared before
    # the flags reach the caller. Linear: ftattn/linear.py _settle; attention (full): the PV
    # checksum (csrc/attention/block.h, kernels/attention.py _attn_replay, the reference) and
    # the backward's dQ / dK / dV checksums (csrc/attention_bwd_cpu.cpp group_check,
    # reference.settle_backward for the reference and Triton)
    BLIND = 1 << 27


# what each check bit means, for reports and errors; its keys are the bits that name
# failed checks
CHECK_NAMES = {
    Check.ROW_CHECKSUM: "row checksum of QK^T",
    Check.COL_CHECKSUM: "column checksum of QK^T",
    Check.PV_CHECKSUM: "checksum of PV",
    Check.SOFTMAX_DMR: "redundant softmax",
    Check.ROWMAX_INVARIANT: "running-max invariant",
    Check.ROWSUM_INVARIANT: "normaliser invariant",
    Check.OUTPUT_CHECK: "final normalisation check",
    Check.PROBS_RANGE: "probability range",
    Check.SCORE_RECOMPUTE: "recomputed score of a likely key",
    Check.GEMM_ROW_CHECKSUM: "row checksum of the linear layer's product",
    Check.DP_CHECKSUM: "checksum of dO V^T",
    Check.DS_CHECK: "dS row sums",
    Check.DQ_CHECKSUM: "checksum of dQ",
    Check.DK_CHECKSUM: "checksum of dK",
    Check.DV_CHECKSUM: "checksum of dV",
}
CHECK_MASK = sum(int(c) for c in CHECK_NAMES)  # 0x7FFF

# The sites of each op: a fault names one of its op's sites, nothing else.
OP_SITES = {
    "attention": (Site.SCORES, Site.PROBS, Site.ROWMAX, Site.ROWSUM, Site.ACC, Site.OUTPUT),
    "linear": (Site.GEMM, Site.WEIGHT),
    "attention_backward": (Site.BWD_SCORES, Site.BWD_PROBS, Site.DP, Site.DS, Site.DQ, Site.DK, Site.DV),
}

# An op's `fault` argument: these eight ints, in this order (seven, without span, mean
# span 1); bit BIT_REPLACE (-1) replaces the value by the op's `fault_value` instead of
# flipping bit 0..31; bit BIT_MASK (-2) flips every bit set in the 32-bit mask
# `fault_value` (an integer 1..2^32-1: a multi-bit upset of one value). span >= 1: the
# same corruption hits `span` consecutive values of the fault's row along its site's
# SPAN_AXIS, from the named one on, clipped at the row's end (a warp's worth of lanes
# computing one row of a tile: "warp" faults, span WARP). The per-row scalars (rowmax,
# rowsum) have one value per row: their span is 1 whatever is asked.
FAULT_FIELDS = ("site", "batch", "head", "row", "col", "dim", "bit", "span")
BIT_REPLACE = -1
BIT_MASK = -2
WARP = 32

# the coordinate a fault's span runs along: the keys of a row of scores / probabilities
# (and of the backward's dP, dS), the head dims of an accumulator or output row, the
# output features of a row of y (gemm), the input features of a row of W (weight)
SPAN_AXIS = {
    Site.SCORES: "col", Site.PROBS: "col", Site.ROWMAX: None, Site.ROWSUM: None, Site.ACC: "dim",
    Site.OUTPUT: "dim", Site.GEMM: "col", Site.WEIGHT: "dim", Site.BWD_SCORES: "col", Site.BWD_PROBS: "col",
    Site.DP: "col", Site.DS: "col", Site.DQ: "dim", Site.DK: "dim", Site.DV: "dim",
}


# The weights of the second, weighted checksums (attention's PV and dQ / dK / dV checks, the
# linear layer's row check): w_i = (2 h - (2^24 - 1)) / 2^26 for the top 24 bits h of a hash
# of i, odd multiples of 2^-26 in (-1/4, 1/4) (CHECKSUM_WEIGHT_MAX), mean 0; a product w x of
# an fp32 x is exact in fp64. A warp flips one bit of 32 consecutive values; where they share
# an exponent its deltas are +-2^k with signs from the data and can sum to 0 in a plain
# checksum. In the weighted one they cancel only where sum_i +-w_i does: with weights of 8
# bits, as before 2026-12-07, exactly 0 for 1 in ~500 sign patterns (the linear layer's
# cancelling-warp test met one in 169 places); with 24 bits, within the bound for ~1 in 10^5. The same hash in
# csrc/fault_contract.h (checksum_weight) and kernels/attention.py (_pv_weight).
CHECKSUM_WEIGHT_MAX = 0.25


def checksum_weight(i: int) -> float:
    """The weighted checksums' weight of index ``i`` (a head dim, an output feature's place in
    its checksum block)."""
    h = ((i + 1) * 0x9E3779B9) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return (2 * (h >> 8) - 0xFFFFFF) * 2.0**-26


def span_axis(site: int) -> Optional[str]:
    """"col" or "dim": the coordinate along which a fault at ``site`` spans; None for the
    one-value-per-row sites (their span is 1)."""
    return SPAN_AXIS[Site(site)]


def xor_mask(bit: int, fault_value: Optional[float]) -> int:
    """The XOR mask of a fault's ``bit`` field, as a signed 32-bit int (what int32
    tensors and the Triton kernels take): 1 << bit, BIT_MASK's mask, 0 for BIT_REPLACE."""
    mask = 0 if bit == BIT_REPLACE else int(fault_value) if bit == BIT_MASK else 1 << bit
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def flip_args(bit: int, fault_value: Optional[float]) -> Tuple[int, int, float]:
    """A fault's corruption as the Triton kernels take it: (XOR mask as a signed 32-bit
    int, 1 to replace the value instead, the replacement value or 0.0)."""
    replace = bit == BIT_REPLACE
    return xor_mask(bit, fault_value), int(replace), float(fault_value) if replace else 0.0


def fault_fields(fault: Sequence[int]) -> Tuple[int, ...]:
    """The eight ints of a fault (seven: span 1), or a ValueError naming the fields;
    the span of the one-value-per-row sites is made 1."""
    fault = tuple(int(x) for x in fault)
    if len(fault) == len(FAULT_FIELDS) - 1:
        fault += (1,)
    if len(fault) != len(FAULT_FIELDS):
        raise ValueError(f"ftattn: fault must be [{', '.join(FAULT_FIELDS)}] (span may be left out: 1), "
                         f"got {list(fault)}")
    if fault[-1] < 1:
        raise ValueError(f"ftattn: fault span={fault[-1]} must be >= 1 (the number of consecutive values hit; "
                         f"1 for one value, {WARP} for a warp)")
    if fault[0] in (Site.ROWMAX, Site.ROWSUM):
        fault = fault[:-1] + (1,)
    return fault


def check_fault_encoding(fault: Sequence[int], fault_value: Optional[float], batch: int, q_heads: int, n: int,
                         m: int, head_dim: int) -> Tuple[int, ...]:
    """The eight ints of an op's ``fault`` argument, validated against the call's shapes
    (ValueError naming the field, its range and the fix); the C++ kernel checks the same
    before it writes anything."""
    fault = fault_fields(fault)
    site, b, h, row, col, dim, bit, _ = fault
    _check_site("attention", site)
    limits = (("batch", b, batch), ("head", h, q_heads), ("row", row, n), ("dim", dim, head_dim),
              ("col", col, m if site != Site.OUTPUT else None))
    for name, val, limit in limits:
        if val < 0 or (limit is not None and val >= limit):
            raise ValueError(
                f"ftattn: fault {name}={val} is out of range: it must be {f'0..{limit - 1}' if limit is not None else '>= 0'} for q "
                f"[B={batch}, Hq={q_heads}, N={n}, D={head_dim}] and k/v with M={m} keys")
    _check_bit(bit, fault_value)
    return fault


def check_backward_fault_encoding(fault: Sequence[int], fault_value: Optional[float], batch: int, q_heads: int,
                                  n: int, m: int, head_dim: int) -> Tuple[int, ...]:
    """The eight ints of a fault for attention's backward: bwd_scores, bwd_probs, dp and
    ds hit [row, col], dq [row, dim], dk and dv [col, dim] (key col, query head ``head``'s
    contribution)."""
    fault = fault_fields(fault)
    site, b, h, row, col, dim, bit, _ = fault
    _check_site("attention_backward", site)
    limits = [("batch", b, batch), ("head", h, q_heads)]
    limits += {Site.DQ: [("row", row, n), ("dim", dim, head_dim)], Site.DK: [("col", col, m), ("dim", dim, head_dim)],
               Site.DV: [("col", col, m), ("dim", dim, head_dim)]}.get(site, [("row", row, n), ("col", col, m)])
    for name, val, limit in limits:
        if not 0 <= val < limit:
            raise ValueError(
                f"ftattn: fault {name}={val} is out of range: it must be 0..{limit - 1} for q "
                f"[B={batch}, Hq={q_heads}, N={n}, D={head_dim}] and k/v with M={m} keys")
    _check_bit(bit, fault_value)
    return fault


def check_linear_fault_encoding(fault: Sequence[int], fault_value: Optional[float], rows: int, out_features: int,
                                in_features: int) -> Tuple[int, ...]:
    """The eight ints of a linear op's ``fault``: site gemm hits y[row, col] (row < rows
    of x flattened, col < out_features), site weight W[row, dim] (row < out_features,
    dim < in_features); batch and head are 0."""
    fault = fault_fields(fault)
    site, b, h, row, col, dim, bit, _ = fault
    _check_site("linear", site)
    if site == Site.GEMM:
        limits = (("batch", b, 1), ("head", h, 1), ("row", row, rows), ("col", col, out_features))
    else:
        limits = (("batch", b, 1), ("head", h, 1), ("row", row, out_features), ("dim", dim, in_features))
    for name, val, limit in limits:
        if not 0 <= val < limit:
            raise ValueError(
                f"ftattn: fault {name}={val} is out of range: it must be {f'0..{limit - 1}' if limit else 'absent'} "
                f"for a linear layer with x of {rows} rows, weight [{out_features}, {in_features}] "
                f"(site {Site(site).name.lower()}: " + ("row = a row of x, col = an output feature)"
                                                        if site == Site.GEMM else
                                                        "row = an output feature, dim = an input feature)"))
    _check_bit(bit, fault_value)
    return fault


def _check_site(op: str, site: int) -> None:
    if site not in {int(s) for s in OP_SITES[op]}:
        names = ", ".join(f"{s.name.lower()} ({int(s)})" for s in OP_SITES[op])
        raise ValueError(f"ftattn: fault site {site} is not a site of {op}; its sites are {names} "
                         f"(ftattn.faults.Site)")


def _check_bit(bit: int, fault_value: Optional[float]) -> None:
    if not BIT_MASK <= bit <= 31:
        raise ValueError(f"ftattn: fault bit {bit} must be 0..31, {BIT_REPLACE} (replace by fault_value) or "
                         f"{BIT_MASK} (flip the bits of the mask fault_value)")
    if bit == BIT_REPLACE and fault_value is None:
        raise ValueError(f"ftattn: a fault with bit {BIT_REPLACE} needs fault_value (the replacement value)")
    if bit == BIT_MASK and not (fault_value is not None and float(fault_value).is_integer()
                                and 1 <= fault_value < 2**32):
        raise ValueError(f"ftattn: a fault with bit {BIT_MASK} needs fault_value = its 32-bit mask, an integer "
                         f"1..2^32-1, got {fault_value!r}")
