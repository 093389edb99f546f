"""Fault-injection campaign (``python -m ftattn campaign``): the figures of
FAULT_MODEL.md per site and protection level.

1. Clean runs on the data FAULT_MODEL.md names (uniform [-1, 1), normal, peaky
   |q.k| up to 1e4, causal rows with a single visible key, long key sequences,
   GQA, odd head dims): any flag is a false alarm.
2. Random single faults over every site, bit 0..31 and the replacement values
   NaN, +-Inf, +-1e30, 0, on uniform, normal, peaky and offset inputs in turn
   (a fresh input every 25 faults): each is classified harmful / benign (against the clean
   output, tau = 2^-10 for fp16/fp32, 2^-7 for bf16), detected or not, and, when
   detected, whether ``on_fault="correct"`` returns the clean output.

3. ``--targeted``: an adversary's campaign instead of dice. The data carry what real
   LLM activations carry (a few outlier channels 5..150x larger in q and k, with or
   without the sign pattern that cancels them in q.k; huge logits; subnormal keys and
   values), the faults hit the three most probable keys of a row (sites with a key) or
   random head dims, in the mid-mantissa bits 10..22 where a flip is small enough to
   hide in a loose checksum bound and large enough to matter. Clean runs on the same data.

Exit status is non-zero when, at a protection level, a site it claims to cover
has a harmful fault missed, when a clean run raised a flag, or when a detected
fault was not corrected. "abft" claims every site but ``probs`` (a corrupted
probability feeds the PV product and its checksum consistently); "off" claims none.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from ..attention import attention
from ..contract import WARP, Site, span_axis
from ..faults import ATTENTION_SITES, BACKWARD_SITES, TAU, Fault

SITES = list(ATTENTION_SITES)
BWD_SITES = list(BACKWARD_SITES)
VALUES = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COVERED = {"off": set(), "abft": set(SITES) - {"probs"}, "full": set(SITES)}
# the backward (--pass backward): abft leaves the two values its second computations
# (full) check, P and dS, claimed by full only
BWD_COVERED = {"off": set(), "abft": set(BWD_SITES) - {"bwd_probs", "ds"}, "full": set(BWD_SITES)}


def covered_sites(pass_: str, protection: str, pattern: str = "single") -> set:
    """The sites a protection level claims. A warp's score changes, each within the fp64
    verification's noise, can add up to harm on outlier-channel data; the bit-for-bit
    recomputation of S that catches them is full's (it costs one more QK^T product where
    it runs). A warp's +-2^k deltas on an accumulator row can cancel exactly in the PV
    checksum's sum; the weighted second checksum and the recomputation of a block near the
    bound that catch them are full's too. So abft claims neither scores nor acc against warps;
    in the backward, likewise dq, dk and dv (their 16-dim groups' sums; full's weighted
    checksum over every dim catches them)."""
    sites = (BWD_COVERED if pass_ == "backward" else COVERED)[protection]
    if protection == "abft" and pattern == "warp":
        sites = sites - ({"dq", "dk", "dv"} if pass_ == "backward" else {"scores", "acc"})
    return sites


@dataclasses.dataclass
class Shape:
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    seq: int = 97
    kv_seq: int = 131
    head_dim: int = 59
    causal: bool = True


@dataclasses.dataclass
class SiteStats:
    injected: int = 0
    harmful: int = 0
    detected: int = 0
    harmful_missed: int = 0
    benign_flagged: int = 0
    corrected: int = 0

    def add(self, harmful: bool, detected: bool, corrected: bool) -> None:
        self.injected += 1
        self.harmful += harmful
        self.detected += detected
        self.harmful_missed += harmful and not detected
        self.benign_flagged += detected and not harmful
        self.corrected += detected and corrected


@dataclasses.dataclass
class Result:
    backend: str
    device: str
    dtype: str
    protection: str
    shape: Shape
    clean_runs: int = 0
    mode: str = "random"  # or "targeted"; then " multibit" for that pattern
    false_alarms: int = 0
    false_alarm_cases: List[str] = dataclasses.field(default_factory=list)
    missed_cases: List[str] = dataclasses.field(default_factory=list)  # harmful, missed, at a covered site
    sites: Dict[str, SiteStats] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    pass_: str = "forward"  # or "backward": faults at the backward's sites, harm on dq, dk, dv

    def __post_init__(self):
        if not self.sites:
            self.sites = {s: SiteStats() for s in (BWD_SITES if self.pass_ == "backward" else SITES)}

    @property
    def covered(self) -> set:
        return covered_sites(self.pass_, self.protection, "warp" if self.mode.endswith("warp") else "single")

    def failures(self) -> List[str]:
        out = []
        if self.false_alarms:
            out.append(f"{self.false_alarms} false alarms over {self.clean_runs} clean runs")
        for site, st in self.sites.items():
            if site in self.covered and st.harmful_missed:
                out.append(f"{st.harmful_missed} harmful faults missed at site {site}")
            if st.corrected != st.detected:
                out.append(f"{st.detected - st.corrected} detected faults not corrected at site {site}")
        return out


def make_data(kind: str, shape: Shape, dtype, device, gen: torch.Generator):
    """q, k, v of one of the clean-run kinds of FAULT_MODEL.md."""
    B, Hq, Hkv, N, M, D = shape.batch, shape.heads, shape.kv_heads, shape.seq, shape.kv_seq, shape.head_dim

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32)

    if kind == "uniform":  # the seed benchmark's data
        q, k, v = (torch.rand(*s, generator=gen) * 2 - 1 for s in ((B, Hq, N, D), (B, Hkv, M, D), (B, Hkv, M, D)))
    elif kind == "normal":
        q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, M, D), rnd(B, Hkv, M, D)
    elif kind == "peaky":  # |q.k| up to about 1e4: a near one-hot softmax
        amp = math.sqrt(1e4 / (3 * math.sqrt(D)))
        q, k, v = rnd(B, Hq, N, D) * amp, rnd(B, Hkv, M, D) * amp, rnd(B, Hkv, M, D)
    elif kind == "constant":  # identical rows: rounding errors line up instead of cancelling
        q = torch.full((B, Hq, N, D), 0.37)
        k = torch.full((B, Hkv, M, D), -1.3)
        v = torch.full((B, Hkv, M, D), 2.1)
    elif kind == "offset":  # large common offset in v, small spread: |o| >> its variation
        q, k = rnd(B, Hq, N, D), rnd(B, Hkv, M, D)
        v = 100.0 + 0.01 * rnd(B, Hkv, M, D)
    elif kind in ("outlier", "outlier-cancel"):
        # LLM-like: 1..4 channels 5..150x larger in q and k; "cancel" puts opposite signs in
        # two channels of k (q . k stays moderate while sum |q||k| is huge)
        q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, M, D), rnd(B, Hkv, M, D)
        pick = torch.randint(0, 4, (3,), generator=gen).tolist()
        amp = (5.0, 20.0, 50.0, 150.0)[pick[0]]
        channels = torch.randperm(D, generator=gen)[: min(D, 1 + pick[1])].tolist()
        if kind == "outlier-cancel" and D >= 2:
            a, b = channels[0], channels[-1] if len(channels) > 1 else (channels[0] + 1) % D
            q[..., a] = q[..., b] = amp
            sign = torch.randn(B, Hkv, M, generator=gen).sign() * amp
            k[..., a], k[..., b] = sign, -sign
        else:
            for c in channels:
                q[..., c] *= amp
                k[..., c] *= amp
    elif kind == "huge-logits":  # |q.k| ~ 1e5 sqrt(D): a one-hot softmax far from 0
        q, k, v = rnd(B, Hq, N, D) * 300.0, rnd(B, Hkv, M, D) * 300.0, rnd(B, Hkv, M, D)
    elif kind == "subnormal":  # fp32 keys and values below 2^-126 (they round to 0 in 16-bit types)
        q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, M, D) * 1e-39, rnd(B, Hkv, M, D) * 1e-40
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))


CLEAN_KINDS = ["uniform", "normal", "peaky", "constant", "offset"]
FAULT_KINDS = ["uniform", "normal", "peaky", "offset"]
TARGETED_CLEAN_KINDS = ["outlier", "outlier-cancel", "huge-logits", "subnormal"]
TARGETED_FAULT_KINDS = ["outlier", "outlier-cancel", "normal", "huge-logits"]
TARGETED_BITS = range(10, 23)  # mid-mantissa


def clean_shapes(base: Shape, long_kv: int) -> List[Shape]:
    """The clean-run grid: the base shape, single-visible-key causal rows,
    a long key sequence, head dims from 16 to 256, GQA 4:1, decode (N = 1)."""
    return [
        base,
        dataclasses.replace(base, seq=base.kv_seq, causal=True),  # row 0 sees key 0 only
        dataclasses.replace(base, seq=17, kv_seq=long_kv, causal=False),
        dataclasses.replace(base, seq=33, kv_seq=long_kv, causal=True),
        dataclasses.replace(base, head_dim=16),
        dataclasses.replace(base, head_dim=256, seq=33, kv_seq=65),
        dataclasses.replace(base, heads=8, kv_heads=2, head_dim=80),
        dataclasses.replace(base, seq=1, kv_seq=long_kv, causal=True),
    ]


# --pattern: one bit (or a replacement value); 2..8 bits of one value; one bit (or a
# replacement value) on the WARP consecutive values of a row that one warp computes
PATTERNS = ("single", "multibit", "warp")


def _flip(rng: random.Random, pattern: str, bits) -> dict:
    """The corruption of one fault: one of ``bits``, or (multibit) 2..8 distinct ones."""
    if pattern == "multibit":
        return {"bits": rng.sample(list(bits), rng.randint(2, min(8, len(bits))))}
    return {"bit": rng.choice(list(bits))}


def _warp(kw: dict) -> dict:
    """A fault's coordinates as a warp's: span WARP from the warp-aligned start of the
    drawn key and head dim (the values one warp computes in a row of a tile: keys of a
    score / probability row, dims of an accumulator / output row)."""
    axis = span_axis(Site.parse(kw["site"]))  # (only the span's axis: the backward's key sites'
    # dim picks the Triton pass that is hit)
    return {**kw, **({axis: kw[axis] // WARP * WARP} if axis else {}), "span": WARP}


def _random_fault(rng: random.Random, shape: Shape, site: str, pattern: str = "single") -> Fault:
    N, M = shape.seq, shape.kv_seq
    row = rng.randrange(N)
    if site in BWD_SITES and shape.causal:  # a row that sees a key (the others' values are all 0)
        row = rng.randrange(max(0, N - M), N)
    last = row + (M - N) if shape.causal else M - 1  # last visible key of the row
    if last < 0:  # this row sees no key: only the output can be hit
        site = "output"
        last = 0
    col = rng.randint(0, min(last, M - 1))
    kw = dict(
        site=site,
        batch=rng.randrange(shape.batch),
        head=rng.randrange(shape.heads),
        row=row,
        col=col,
        dim=rng.randrange(shape.head_dim),
    )
    if pattern == "multibit":
        kw.update(_flip(rng, pattern, range(32)))
    elif rng.random() < 0.8:
        kw["bit"] = rng.randrange(32)
    else:
        kw["value"] = rng.choice(VALUES)
    return Fault(**(_warp(kw) if pattern == "warp" else kw))


def _top_keys(q, k, shape: Shape, batch: int, head: int, row: int, n: int = 3) -> List[int]:
    """The n most probable visible keys of one row (fp64 scores)."""
    group = shape.heads // shape.kv_heads
    s = k[batch, head // group].double() @ q[batch, head, row].double()
    last = row + (shape.kv_seq - shape.seq) if shape.causal else shape.kv_seq - 1
    s[last + 1:] = float("-inf")
    return s.topk(min(n, last + 1)).indices.tolist()


def _targeted_fault(rng: random.Random, shape: Shape, site: str, q, k, pattern: str = "single") -> Fault:
    """A mid-mantissa flip at one of the three most probable keys of a random row (for
    the sites without a key, that key's block; acc / output at a random head dim)."""
    N, M = shape.seq, shape.kv_seq
    rows = [r for r in range(N) if not shape.causal or r + (M - N) >= 0]
    row = rng.choice(rows)
    batch, head = rng.randrange(shape.batch), rng.randrange(shape.heads)
    col = rng.choice(_top_keys(q, k, shape, batch, head, row))
    dim = rng.randrange(shape.head_dim)
    kw = dict(site=site, batch=batch, head=head, row=row, col=col, dim=dim, **_flip(rng, pattern, TARGETED_BITS))
    return Fault(**(_warp(kw) if pattern == "warp" else kw))


def _harmful(raw, clean, tau: float) -> bool:
    """FAULT_MODEL.md's rule; for the backward's (dq, dk, dv), any of them."""
    if isinstance(raw, tuple):
        return any(_harmful_one(r, c, tau) for r, c in zip(raw, clean))
    return _harmful_one(raw, clean, tau)


def _harmful_one(raw: torch.Tensor, clean: torch.Tensor, tau: float) -> bool:
    raw64, clean64 = raw.double(), clean.double()
    if bool((~raw64.isfinite() & clean64.isfinite()).any()):
        return True
    bound = tau * max(1.0, float(clean64.abs().max()))
    return float((raw64 - clean64).abs().max()) > bound


@dataclasses.dataclass
class Job:
    """One campaign of one dtype, protection level and pass: its work units are the clean
    runs (``clean_shapes`` x the clean data kinds), then groups of ``faults_per_input``
    faults on one fresh input each. A unit's data and faults come from (seed, unit) only."""
    backend: str = "cpp"
    device: str = "cpu"
    dtype: str = "float32"
    protection: str = "full"
    faults: int = 1000
    shape: Shape = dataclasses.field(default_factory=Shape)
    long_kv: int = 1024
    seed: int = 0
    faults_per_input: int = 25
    targeted: bool = False
    pass_: str = "forward"
    pattern: str = "single"

    @property
    def mode(self) -> str:
        return ("targeted" if self.targeted else "random") + ("" if self.pattern == "single" else f" {self.pattern}")

    @property
    def name(self) -> str:
        return f"{self.pass_}/{self.dtype}/{self.protection}/{self.mode.replace(' ', '/')}"

    def clean_units(self) -> List[Tuple[Shape, str]]:
        kinds = TARGETED_CLEAN_KINDS if self.targeted else CLEAN_KINDS
        return [(sh, kind) for sh in clean_shapes(self.shape, self.long_kv) for kind in kinds]

    @property
    def units(self) -> int:
        return len(self.clean_units()) + (self.faults + self.faults_per_input - 1) // self.faults_per_input


def _unit_generator(seed: int, unit: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + unit) % 2**63)


def run_units(job: Job, start: int, stop: int) -> dict:
    """Units [start, stop) of a job (one shard): its counts as a JSON-serialisable dict."""
    dt = DTYPES[job.dtype]
    tau = TAU[dt]
    shape, protection, backend, device = job.shape, job.protection, job.backend, job.device
    backward = job.pass_ == "backward"
    sites = BWD_SITES if backward else SITES
    covered = covered_sites(job.pass_, protection, job.pattern)
    fault_kinds = TARGETED_FAULT_KINDS if job.targeted else FAULT_KINDS
    clean_units = job.clean_units()
    out = {"clean_runs": 0, "false_alarms": 0, "false_alarm_cases": [], "missed_cases": [],
           "sites": {s: [0] * 6 for s in sites}}

    def call(q, k, v, sh, **kw):
        if not backward:
            return attention(q, k, v, causal=sh.causal, protection=protection, backend=backend, return_report=True,
                             **kw)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o, rep = attention(*leaves, causal=sh.causal, protection=protection, backend=backend, return_report=True,
                           **kw)
        grad_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
        o.backward(grad_out)
        return tuple(t.grad for t in leaves), rep.backward

    with (contextlib.nullcontext() if backward else torch.inference_mode()):
        for unit in range(start, stop):
            gen = _unit_generator(job.seed, unit)
            if unit < len(clean_units):  # 1. a clean run: any flag is a false alarm
                sh, kind = clean_units[unit]
                q, k, v = make_data(kind, sh, dt, device, gen)
                _, rep = call(q, k, v, sh)
                out["clean_runs"] += 1
                if rep.detected or rep.uncorrected:
                    out["false_alarms"] += 1
                    out["false_alarm_cases"].append(f"{kind} {dataclasses.asdict(sh)}: {rep}")
                continue
            # 2. a group of faults on one fresh input
            g = unit - len(clean_units)
            q, k, v = make_data(fault_kinds[g % len(fault_kinds)], shape, dt, device, gen)
            clean, rep = call(q, k, v, shape)
            out["clean_runs"] += 1
            if rep.detected:
                out["false_alarms"] += 1
                out["false_alarm_cases"].append(f"fault-run input {g}: {rep}")
            for i in range(g * job.faults_per_input, min(job.faults, (g + 1) * job.faults_per_input)):
                rng = random.Random(f"{job.seed}/{i}")
                site = sites[i % len(sites)]
                fault = _targeted_fault(rng, shape, site, q, k, job.pattern) if job.targeted \
                    else _random_fault(rng, shape, site, job.pattern)
                raw, rep = call(q, k, v, shape, fault=fault, on_fault="report")
                detected = rep.detected > 0
                corrected = False
                if detected:
                    fixed, rep2 = call(q, k, v, shape, fault=fault, on_fault="correct")
                    same = all(map(torch.equal, fixed, clean)) if backward else torch.equal(fixed, clean)
                    corrected = rep2.corrected == rep2.flagged_blocks and same
                harmful = _harmful(raw, clean, tau)
                st = SiteStats(*out["sites"][fault.site])
                st.add(harmful, detected, corrected)
                out["sites"][fault.site] = list(dataclasses.astuple(st))
                if harmful and not detected and fault.site in covered:
                    out["missed_cases"].append(f"trial {i}: {fault} on input {g}")
    return out


def _merge(job: Job, records: List[dict]) -> Result:
    res = Result(job.backend, job.device, job.dtype, job.protection, job.shape,
                 mode=job.mode, pass_=job.pass_)
    for rec in records:
        r = rec["result"]
        res.clean_runs += r["clean_runs"]
        res.false_alarms += r["false_alarms"]
        res.false_alarm_cases += r["false_alarm_cases"]
        res.missed_cases += r["missed_cases"]
        for site, counts in r["sites"].items():
            st = res.sites[site]
            for f, c in zip(dataclasses.fields(SiteStats), counts):
                setattr(st, f.name, getattr(st, f.name) + c)
        res.seconds += rec["seconds"]
    return res


SHARD_UNITS = 4  # units per shard: about 100 faults, a few seconds on the C++ backend


def run_jobs(jobs: List[Job], *, workers: Optional[int] = None, ray_address: Optional[str] = None,
             out: Optional[str] = None, resume: bool = False, progress: bool = True,
             config: Optional[dict] = None) -> List[Result]:
    """The campaigns of ``jobs``, in this process or on Ray (ftattn/tools/runner.py), with
    the shard file ``out`` (``resume``: only the shards it lacks). The same seeds give the
    same counts whichever way the shards run."""
    from . import runner

    config = config if config is not None else {"jobs": [dataclasses.asdict(j) for j in jobs]}
    bar = _progress(sum(j.units for j in jobs), "campaign", progress)
    live = {"harmful": 0, "missed": 0, "false alarms": 0}

    def on_record(rec):
        r = rec["result"]
        live["harmful"] += sum(c[1] for c in r["sites"].values())
        live["missed"] += len(r["missed_cases"])
        live["false alarms"] += r["false_alarms"]
        bar.update(rec["stop"] - rec["start"])
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(live, refresh=False)

    records = runner.run(run_units, [(j.name, j, j.units) for j in jobs], SHARD_UNITS, config, workers=workers,
                         ray_address=ray_address, out=out, resume=resume, on_record=on_record)
    bar.close()
    return [_merge(j, records[j.name]) for j in jobs]


def run(
    backend: str = "cpp",
    device: str = "cpu",
    dtype: str = "float32",
    protection: str = "full",
    faults: int = 1000,
    shape: Optional[Shape] = None,
    long_kv: int = 1024,
    seed: int = 0,
    faults_per_input: int = 25,
    progress: bool = True,
    targeted: bool = False,
    pass_: str = "forward",
    *,
    pattern: str = "single",
    workers: Optional[int] = None,
    ray_address: Optional[str] = None,
    out: Optional[str] = None,
    resume: bool = False,
) -> Result:
    """The campaign of one dtype and protection level; ``targeted``: the adversary's data,
    keys and bits (module docstring, 3.) instead of random ones; ``pass_="backward"``:
    faults at the backward's sites, each call a forward and its backward (dO standard
    normal), harm and correction judged on (dq, dk, dv), the flags of ``report.backward``.
    ``pattern``: "single" (one bit, or a replacement value) or "multibit" (2..8 distinct
    bits of one value flipped together; "The Anatomy of SDC" finds single-bit flips under
    40 % of real upsets) or "warp" (the same corruption on the 32 consecutive values of a
    row one warp computes; ``Fault.span``). ``workers`` / ``ray_address`` / ``out`` / ``resume``: see ``run_jobs``."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is not supported; use one of {', '.join(PATTERNS)}")
    job = Job(backend, device, dtype, protection, faults, shape or Shape(), long_kv, seed, faults_per_input,
              targeted, pass_, pattern)
    return run_jobs([job], workers=workers, ray_address=ray_address, out=out, resume=resume, progress=progress)[0]


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr)


HEADER = ("site", "injected", "harmful", "detected", "harmful&missed", "benign&flagged", "corrected")


def format_table(res: Result) -> str:
    sh = res.shape
    lines = [
        f"{res.mode} campaign{' of the backward' if res.pass_ == 'backward' else ''}: backend={res.backend} device={res.device} dtype={res.dtype} protection={res.protection} "
        f"B={sh.batch} Hq={sh.heads} Hkv={sh.kv_heads} N={sh.seq} M={sh.kv_seq} D={sh.head_dim} "
        f"causal={sh.causal} ({res.seconds:.1f} s)",
    ]
    widths = [8, 9, 8, 9, 15, 15, 10]
    lines.append(" ".join(h.rjust(w) for h, w in zip(HEADER, widths)))
    tot = SiteStats()
    for site, st in res.sites.items():
        row = [site] + [getattr(st, f.name) for f in dataclasses.fields(SiteStats)]
        mark = "" if site in res.covered else "  (not covered at this level)"
        lines.append(" ".join(str(x).rjust(w) for x, w in zip(row, widths)) + mark)
        for f in dataclasses.fields(SiteStats):
            setattr(tot, f.name, getattr(tot, f.name) + getattr(st, f.name))
    row = ["total"] + [getattr(tot, f.name) for f in dataclasses.fields(SiteStats)]
    lines.append(" ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    lines.append(f"false alarms: {res.false_alarms} over {res.clean_runs} clean runs")
    return "\n".join(lines)


def to_json(results: List[Result]) -> dict:
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": _device_name(results[0].device) if results else None},
        "tau": {"float32": TAU[torch.float32], "float16": TAU[torch.float16], "bfloat16": TAU[torch.bfloat16]},
        "results": [
            {
                "mode": r.mode, "pass": r.pass_, "backend": r.backend, "device": r.device, "dtype": r.dtype, "protection": r.protection,
                "shape": dataclasses.asdict(r.shape), "clean_runs": r.clean_runs, "false_alarms": r.false_alarms,
                "false_alarm_cases": r.false_alarm_cases, "missed_cases": r.missed_cases, "seconds": r.seconds,
                "sites": {s: dataclasses.asdict(st) for s, st in r.sites.items()}, "failures": r.failures(),
            }
            for r in results
        ],
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# the comparison `make demo` prints after the campaign


def compare(device: str, dtype: str, shape: Shape, repeats: int = 11) -> str:
    """Median time and peak memory of ftattn (off / full) vs the reference backend
    and torch's scaled_dot_product_attention on one input."""
    from .memory import peak_memory

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_data("normal", shape, dt, device, gen)
    group = shape.heads // shape.kv_heads
    N, M = shape.seq, shape.kv_seq
    mask = None
    if shape.causal:  # bottom-right alignment for SDPA, as ftattn's
        mask = torch.ones(N, M, dtype=torch.bool, device=device).tril(diagonal=M - N)
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    auto = "triton" if device.startswith("cuda") else "cpp"
    cases = {
        f"ftattn {auto}, protection off": lambda: attention(q, k, v, causal=shape.causal, protection="off"),
        f"ftattn {auto}, protection abft": lambda: attention(q, k, v, causal=shape.causal, protection="abft"),
        f"ftattn {auto}, protection full": lambda: attention(q, k, v, causal=shape.causal, protection="full"),
        "reference (PyTorch ops + checks)": lambda: attention(q, k, v, causal=shape.causal, backend="reference"),
        # is_causal (top-left) equals bottom-right when N == M and keeps SDPA on its fused path
        "torch SDPA (no checks)": (
            (lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True))
            if shape.causal and N == M
            else (lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask))
        ),
    }
    lines = [f"{'':36} {'median ms':>10} {'peak MiB':>10}   (B={shape.batch} H={shape.heads} "
             f"N={N} M={M} D={shape.head_dim} {dtype}, causal={shape.causal}, {device})"]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        # round-robin, so a neighbour's load on a shared machine falls on every provider alike
        for _ in range(repeats):
            for name, fn in cases.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
        for name, fn in cases.items():
            ts = sorted(times[name])
            peak = peak_memory(fn, device)
            lines.append(f"{name:36} {1e3 * ts[len(ts) // 2]:10.2f} {peak / 2**20:10.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "reference"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="all", help="float32, bfloat16, float16, or 'all' (default)")
    p.add_argument("--protection", default="full", help="off, abft, full, or 'all' (default: full)")
    p.add_argument("--faults", type=int, default=None,
                   help="faults per dtype and protection (default 700; 2000 with --demo)")
    p.add_argument("--batch", type=int, default=1, help="B, batch size (default 1)")
    p.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads, dividing --heads (default 2)")
    p.add_argument("--seq", type=int, default=97, help="N, query length")
    p.add_argument("--kv-seq", type=int, default=131, help="M, key length")
    p.add_argument("--head-dim", type=int, default=59, help="D, 1..256 (default 59)")
    p.add_argument("--no-causal", action="store_true", help="non-causal attention (default causal)")
    p.add_argument("--long-kv", type=int, default=1024, help="M of the long clean runs (>= 1024 on CPU, 8192 on GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the faults (default 0)")
    p.add_argument("--json", default=None, help="write the figures as JSON to this path")
    p.add_argument("--demo", action="store_true",
                   help="the `make demo` run: all dtypes, protection abft and full, then a timing comparison")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pass", dest="pass_", default="forward", choices=["forward", "backward", "both"],
                   help="the forward's sites (default), the backward's (bwd_scores .. dv: each trial a forward and "
                        "its backward, harm on dq, dk, dv), or both")
    from .runner import add_arguments as add_runner_arguments

    add_runner_arguments(p)
    p.add_argument("--pattern", default="single", choices=PATTERNS,
                   help="single: one bit flip (or a replacement value) per fault (default); multibit: 2 to 8 "
                        "random bits of one value flipped together; warp: one bit flip (or replacement) on the 32 "
                        "consecutive values of a row one warp computes (keys of scores / probs, head dims of "
                        "acc / output, output features of a GEMM)")
    p.add_argument("--targeted", action="store_true",
                   help="an adversary's campaign: outlier-channel, huge-logit and subnormal data, faults on the "
                        "most probable keys, mid-mantissa bits 10..22")


def _check_arguments(args, device: str) -> None:
    """One clear line (SystemExit) for what the campaign cannot run, before any work."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here (torch {torch.__version__}, CUDA build: "
                         f"{torch.version.cuda or 'no'}); use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise SystemExit(f"--device {device!r} is not supported; use cpu or cuda")
    for name in ("batch", "heads", "kv_heads", "seq", "kv_seq", "long_kv"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 1 <= args.head_dim <= 256:
        raise SystemExit(f"--head-dim {args.head_dim}: the kernels support head dims 1..256")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads} (grouped-query "
                         f"attention); e.g. --heads {args.kv_heads * max(1, args.heads // args.kv_heads)}")
    from .runner import check_arguments as check_runner_arguments

    check_runner_arguments(args)
    if args.faults is not None and args.faults < 0:
        raise SystemExit(f"--faults {args.faults}: must be 0 or more")


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_arguments(args, device)
    backend = args.backend
    if backend == "auto":
        backend = "triton" if device.startswith("cuda") else "cpp"
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    protections = ["off", "abft", "full"] if args.protection == "all" else [args.protection]
    if args.demo and args.protection == "full":
        protections = ["abft", "full"]
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtype {name!r} is not supported; use {', '.join(DTYPES)} or all")
    for name in protections:
        if name not in COVERED:
            raise SystemExit(f"--protection {name!r} is not supported; use off, abft, full or all")
    faults = args.faults if args.faults is not None else (2000 if args.demo else 700)
    shape = Shape(args.batch, args.heads, args.kv_heads, args.seq, args.kv_seq, args.head_dim, not args.no_causal)
    long_kv = args.long_kv if device == "cpu" or args.long_kv != 1024 else 8192
    failed = []
    passes = ["forward", "backward"] if args.pass_ == "both" else [args.pass_]
    jobs = [Job(backend, device, name, prot, faults, shape, long_kv, args.seed, targeted=args.targeted, pass_=pass_,
                pattern=args.pattern)
            for pass_ in passes for prot in protections for name in dtypes]
    from .runner import RunnerError

    try:
        results = run_jobs(jobs, workers=args.workers, ray_address=args.ray_address, out=args.resume or args.out,
                           resume=args.resume is not None, progress=not args.no_progress)
    except RunnerError as exc:
        raise SystemExit(str(exc)) from None
    for job, res in zip(jobs, results):
        print(format_table(res))
        print()
        failed += [f"{job.pass_}/{job.dtype}/{job.protection}: {f}" for f in res.failures()]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(results), fh, indent=2)
        print(f"wrote {args.json}")
    if args.demo:
        big = Shape(1, 8, 8, 1024, 1024, 64, causal=True)
        if device.startswith("cuda"):
            big = Shape(4, 32, 32, 4096, 4096, 128, causal=True)
        print(compare(device, "float32" if device == "cpu" else "float16", big))
        print()
    if failed:
        print("CAMPAIGN FAILED:\n  " + "\n  ".join(failed))
        return 1
    print("campaign passed: no harmful fault missed at a covered site, no false alarm, every detected fault corrected")
    return 0
