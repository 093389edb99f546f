"""The Python face of the fault contract (ftattn/contract.py: sites, check bits,
report blocks, the fault encoding) and of docs/fault_model.md: the `Fault` a caller
injects, the `Report` a call returns and the error `on_fault="raise"` raises.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import List, Optional, Tuple

import torch

from .contract import checksum_weight
from .contract import BIT_MASK, BIT_REPLACE, CHECK_MASK, CHECK_NAMES, OP_SITES, REPORT_BLOCK_M, WARP, Check, Site

def fault_blocks(flags: torch.Tensor, op: str = "attention") -> torch.Tensor:
    """Per block: a check failed on finite input. Non-finite input is not a fault: a block
    flagged NONFINITE_INPUT excuses its failed checks for attention (a row reads every key),
    never for a linear layer, whose rows are independent and whose check bit names a finite
    row (a non-finite row sets NONFINITE_INPUT instead)."""
    failed = (flags & CHECK_MASK) != 0
    return failed if op == "linear" else failed & ((flags & int(Check.NONFINITE_INPUT)) == 0)


# FAULT_MODEL.md's harm threshold per input dtype: a fault is harmful when it moves the
# output by more than tau max(1, max |clean output|) (per row for linear layers)
TAU = {torch.float32: 2.0**-10, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

__all__ = [
    "Site",
    "Check",
    "Fault",
    "Report",
    "FaultDetectedError",
    "REPORT_BLOCK_M",
    "CHECK_MASK",
    "ATTENTION_SITES",
    "BACKWARD_SITES",
    "LINEAR_SITES",
]

# the site names of each op, in the contract's order
ATTENTION_SITES = [s.name.lower() for s in OP_SITES["attention"]]
LINEAR_SITES = [s.name.lower() for s in OP_SITES["linear"]]
# attention's backward: a fault given to the forward call, injected during its backward
BACKWARD_SITES = [s.name.lower() for s in OP_SITES["attention_backward"]]


def check_names(bits: int) -> List[str]:
    return [name for flag, name in CHECK_NAMES.items() if bits & int(flag)]


class Protection(enum.IntEnum):
    OFF = 0
    ABFT = 1
    FULL = 2


class OnFault(enum.Enum):
    CORRECT = "correct"
    RAISE = "raise"
    REPORT = "report"


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault to inject: a bit flip of the fp32 value (``bit`` 0..31), a multi-bit
    upset of it (``bits``: several distinct bits 0..31, flipped together) or its
    replacement by ``value`` (NaN, +-Inf, 1e30, ...). Exactly one of the three.

    Attention (sites scores, probs, rowmax, rowsum, acc, output): ``batch``, ``head``
    (query head), ``row`` (query index), ``col`` (key index; names the KV block in which
    the fault strikes; ignored for ``output``), ``dim`` (head-dim index, for ``acc`` and
    ``output``).

    ``span`` (default 1): the same corruption hits ``span`` consecutive values of the
    row from the one named, along the site's axis (``contract.SPAN_AXIS``: keys for
    scores / probs and the backward's bwd_scores, bwd_probs, dp, ds; head dims for acc,
    output, dq, dk, dv; output features for gemm, input features for weight), clipped at
    the row's end: ``span=32`` is a warp's lanes computing one row of a tile
    ("The Anatomy of SDC" found corruption aligned to warps). rowmax and rowsum hold
    one value per row: their span is 1.

    Linear layers (``ftattn.linear``; ``batch`` and ``head`` stay 0): ``Fault("gemm",
    row=i, col=o, bit=b)`` hits the fp32 accumulator of y[i, o] (i indexes the flattened
    leading dims of x); ``Fault("weight", row=o, dim=j, bit=b)`` W[o, j] as the call reads it.
    """

    site: str
    batch: int = 0
    head: int = 0
    row: int = 0
    col: int = 0
    dim: int = 0
    bit: Optional[int] = None
    value: Optional[float] = None
    bits: Optional[Tuple[int, ...]] = None
    span: int = 1

    def __post_init__(self):
        object.__setattr__(self, "site", Site.parse(self.site).name.lower())
        for name in ("batch", "head", "row", "col", "dim", "span"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"Fault.{name} must be an int, got {val!r}")
            if val < 0:
                raise ValueError(f"Fault.{name}={val} is negative; coordinates start at 0")
        if self.span < 1:
            raise ValueError(f"Fault.span={self.span} must be >= 1: the number of consecutive values hit "
                             f"(1: one value; {WARP}: a warp)")
        if (self.bit is not None) + (self.value is not None) + (self.bits is not None) != 1:
            raise ValueError(
                f"Fault needs exactly one of bit= (0..31, a bit flip of the fp32 value), bits= (several "
                f"bits 0..31 flipped together) or value= (a replacement value); got bit={self.bit!r}, "
                f"bits={self.bits!r}, value={self.value!r}"
            )
        if self.bits is not None:
            bits = tuple(self.bits) if isinstance(self.bits, (tuple, list, set, frozenset, range)) else None
            if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 31 for b in bits) \
                    or len(set(bits)) != len(bits):
                raise ValueError(f"Fault.bits={self.bits!r} must be distinct bits of an fp32 value, each 0..31 "
                                 f"(e.g. bits=(3, 17, 30))")
            object.__setattr__(self, "bits", tuple(sorted(bits)))
        if self.bit is not None and (isinstance(self.bit, bool) or not isinstance(self.bit, int) or not 0 <= self.bit <= 31):
            raise ValueError(f"Fault.bit={self.bit!r} is not a bit of an fp32 value; use 0..31")
        if self.value is not None and not isinstance(self.value, (int, float)):
            raise TypeError(f"Fault.value must be a float, got {self.value!r}")

    def validate(self, batch: int, q_heads: int, n: int, m: int, head_dim: int) -> None:
        """Raise ValueError when the site is not attention's or a coordinate falls outside
        the call's shapes."""
        if self.site not in ATTENTION_SITES and self.site not in BACKWARD_SITES:
            raise ValueError(
                f"Fault site {self.site!r} is a linear layer's, not attention's; attention's sites are "
                f"{', '.join(ATTENTION_SITES)} and, in its backward, {', '.join(BACKWARD_SITES)} "
                f"(ftattn.linear takes {', '.join(LINEAR_SITES)})"
            )
        limits = {"batch": batch, "head": q_heads, "row": n, "col": m, "dim": head_dim}
        # which coordinates name the value: dq [row, dim]; dk / dv [col, dim]; the other
        # backward sites [row, col]; the forward's as documented above
        unused = {"output": ("col",), "dq": ("col",), "dk": ("row",), "dv": ("row",)}.get(self.site, ())
        for name, limit in limits.items():
            if name in unused:
                continue
            val = getattr(self, name)
            if val >= limit:
                raise ValueError(
                    f"Fault.{name}={val} is out of range for this call: {name} must be < {limit} "
                    f"(q is [B={batch}, Hq={q_heads}, N={n}, D={head_dim}], k/v have M={m} keys)"
                )

    def validate_linear(self, rows: int, out_features: int, in_features: int) -> None:
        """Raise ValueError when the site is not a linear layer's or a coordinate falls
        outside the call's shapes (x of ``rows`` rows flattened, weight [out, in])."""
        if self.site not in LINEAR_SITES:
            raise ValueError(
                f"Fault site {self.site!r} is attention's, not a linear layer's; ftattn.linear's sites are "
                f"{', '.join(LINEAR_SITES)}: Fault('gemm', row=i, col=o, bit=b) or Fault('weight', row=o, dim=j, bit=b)"
            )
        if self.batch or self.head:
            raise ValueError(f"Fault.batch={self.batch} and Fault.head={self.head} must be 0 for a linear layer")
        if self.site == "gemm":
            limits = {"row": (rows, "a row of x, its leading dims flattened"), "col": (out_features, "an output feature")}
        else:
            limits = {"row": (out_features, "an output feature"), "dim": (in_features, "an input feature")}
        for name, (limit, what) in limits.items():
            val = getattr(self, name)
            if val >= limit:
                raise ValueError(
                    f"Fault.{name}={val} is out of range for this call: {name} ({what}) must be < {limit} "
                    f"(x has {rows} rows, weight is [{out_features}, {in_features}])"
                )

    def encode(self) -> Tuple[List[int], Optional[float]]:
        """The op's encoding: ``[site, batch, head, row, col, dim, bit, span]`` (bit -1: replace
        by ``value``; -2: flip the bits of the mask in the value) and the fault value."""
        if self.bits is not None:
            bit, value = BIT_MASK, float(sum(1 << b for b in self.bits))
        else:
            bit = BIT_REPLACE if self.bit is None else self.bit
            value = None if self.value is None else float(self.value)
        return [int(Site.parse(self.site)), self.batch, self.head, self.row, self.col, self.dim, bit, self.span], value


@dataclasses.dataclass
class Report:
    """What the checks saw in one call.

    flags: int32 tensor [B, Hq, ceil(N / block_m)] of `Check` bits per block of
    ``block_m`` query rows (see the module docstring); for ``ftattn.linear`` (``op``
    "linear") [1, 1, ceil(rows / block_m)], per block of rows of x (leading dims flattened).
    """

    flags: torch.Tensor
    block_m: int = REPORT_BLOCK_M
    n: int = 0
    op: str = "attention"
    # attention's backward: its flags hold ceil(n / block_m) blocks of query rows, then
    # ceil(keys / block_m) blocks of keys (the dK / dV checks, per query head)
    keys: int = 0
    # an attention call's report, once that call's backward has run: the backward's own
    # Report (op "attention backward"); None before (and for calls without a backward)
    backward: Optional["Report"] = None
    # called with the backward's Report when it is set (counters of the integrations)
    on_backward: List = dataclasses.field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        # a call on meta tensors (shapes only) ran no kernel: its flags stay meta, and
        # every count below refuses them (_data) instead of answering "no fault"
        self.flags = self.flags.detach()
        if not self.flags.is_meta:
            self.flags = self.flags.to("cpu")

    def _data(self) -> torch.Tensor:
        if self.flags.is_meta:
            raise ValueError(
                "this Report comes from a call on meta tensors: no kernel ran, so no check did; "
                "run the call on cpu or cuda tensors to count faults"
            )
        return self.flags

    def _fault_bits(self) -> torch.Tensor:
        """Check bits of the blocks whose inputs were finite (non-finite input is not a fault;
        a linear layer's rows are independent and its check bit names a finite row, so a
        non-finite row of its block excuses nothing)."""
        flags = self._data()
        return torch.where(fault_blocks(flags, self.op), flags & CHECK_MASK, 0)

    @property
    def detected(self) -> int:
        """Number of failed checks (one per check kind per flagged block), non-finite input excluded."""
        bits = self._fault_bits()
        return int(sum(((bits >> i) & 1).sum().item() for i in range(CHECK_MASK.bit_length())))

    @property
    def flagged_blocks(self) -> int:
        """Number of query blocks with at least one failed check, non-finite input excluded."""
        return int((self._fault_bits() != 0).sum().item())

    @property
    def corrected(self) -> int:
        """Number of flagged blocks that were recomputed and passed every check."""
        return int(((self._data() & int(Check.CORRECTED)) != 0).sum().item())

    @property
    def uncorrected(self) -> int:
        return int(((self._data() & int(Check.UNCORRECTED)) != 0).sum().item())

    @property
    def nonfinite_input(self) -> bool:
        return bool(((self._data() & int(Check.NONFINITE_INPUT)) != 0).any().item())

    def failures(self) -> List[dict]:
        """One dict per flagged block: batch, head, rows (range), checks (names)."""
        out = []
        idx = torch.nonzero((self._data() & CHECK_MASK) != 0, as_tuple=False).tolist()
        q_blocks = -(-self.n // self.block_m) if self.keys else None
        for b, h, blk in idx:
            bits = int(self.flags[b, h, blk])
            kind, n = "rows", self.n
            if q_blocks is not None and blk >= q_blocks:
                kind, n, blk = "keys", self.keys, blk - q_blocks
            lo = blk * self.block_m
            hi = min(lo + self.block_m, n) if n else lo + self.block_m
            out.append(
                {
                    "batch": b,
                    "head": h,
                    kind: range(lo, hi),
                    "checks": check_names(bits),
                    "corrected": bool(bits & int(Check.CORRECTED)),
                    "nonfinite_input": bool(bits & int(Check.NONFINITE_INPUT)),
                }
            )
        return out

    def __repr__(self) -> str:
        if self.flags.is_meta:
            return f"Report(meta: no kernel ran, blocks={tuple(self.flags.shape)})"
        return (
            f"Report(detected={self.detected}, corrected={self.corrected}, "
            f"uncorrected={self.uncorrected}, nonfinite_input={self.nonfinite_input}, "
            f"blocks={tuple(self.flags.shape)})"
        )


class FaultDetectedError(RuntimeError):
    """Raised by ``on_fault="raise"`` when a check fails; ``.report`` holds the flags."""

    def __init__(self, report: Report):
        self.report = report
        lines = []
        for f in report.failures():
            if f["nonfinite_input"] and report.op != "linear":  # (a linear check bit names a finite row)
                continue
            where = "" if report.op == "linear" else f"batch {f['batch']}, head {f['head']}, "
            kind = "rows" if "rows" in f else "keys"
            lines.append(f"{where}{kind} {f[kind].start}..{f[kind].stop - 1}: {', '.join(f['checks'])} failed")
        shown = "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")
        super().__init__(
            f"ftattn: fault detected in {report.op} ({report.detected} failed checks): {shown}. "
            f"Pass on_fault='correct' to recompute the affected blocks, or 'report' to get the raw output."
        )



@functools.lru_cache(maxsize=None)
def _checksum_weights_cpu(n: int) -> torch.Tensor:
    return torch.tensor([checksum_weight(i) for i in range(n)], dtype=torch.float64)


def checksum_weights(n: int, device=None) -> torch.Tensor:
    """The contract's checksum_weight of 0 .. n - 1, fp64 (made once per length): attention's
    weighted PV and dQ / dK / dV checksums over head dims, the linear layer's over a block's
    output features."""
    return _checksum_weights_cpu(n).to(device if device is not None else "cpu")
