"""Attention benchmarks: ftattn (protection off / abft / full) against pure PyTorch,
the reference backend and torch's scaled_dot_product_attention.

The seed notebook timed matmul-softmax-matmul and its DMR / ABFT variants at H=32,
D=128, fp16, N = 512..8192 (B=2 and B=16384/N), but averaged in a cold first
iteration, timed its warm-up cell without synchronising, and its DMR variant
applied softmax to the softmax. Here: one warm-up call, then the median of several
timed rounds (as many as fit in 1.5 s, 3 to 30), each call synchronised on CUDA; every output is checked against an
fp32 attention before it is timed, so no provider is timed doing the wrong thing.

Providers (one setup factory each, ``make_<provider>(case) -> callable``):
  torch       pure PyTorch, no checks: softmax(q k^T * scale) v in the input dtype
  reference   ftattn backend="reference": the same checks as the kernels, done as
              separate PyTorch ops on the whole score matrix (the seed's checks, done right)
  sdpa        torch.nn.functional.scaled_dot_product_attention, default dispatch
  sdpa_flash  the same inside sdpa_kernel(SDPBackend.FLASH_ATTENTION)
  off / abft / full   ftattn.attention(backend="auto") at that protection level

Grids: on CUDA the seed's shapes plus N=16384, causal, bf16, D=64, GQA and a decode
case (N=1 query against M up to 32k keys); on CPU a small grid (fp32 and bf16, H=8,
D=64 / 128, N = 256..2048, GQA, decode N=1 vs M up to 32k, GQA and MHA) that runs in a few
minutes.
A grid whose device is missing is skipped, with the reason.

Figures, in every benchmark's ``extra_info``: median ms, TFLOP/s with
FLOPs = 4 * B * Hq * N * M * D (two matmuls of 2 * N * M * D each per head), halved
for causal; peak memory of one call; device name, torch / triton versions, threads,
the load average when the case ran; the shapes. ``python -m ftattn bench-report``
turns the JSON into tables and plots.

Targets (``TARGETS``), asserted in the ftattn benchmarks; the ratios with
SDPA and with off are timed interleaved, call by call, in that benchmark:
  CPU, N=2048: protection full within 1.3x of torch SDPA, full <= 15 % over off (issue
  23), and faster than the reference.
  CUDA, N=4096: off at least as fast as SDPA flash, abft <= 5 % and full <= 15 % over
  off, full >= 5x faster than the reference.

Run: ``pytest benchmarks/test_bench_attention.py --benchmark-only
--benchmark-json=benchmarks/results/attention_cpu.json`` then
``python -m ftattn bench-report benchmarks/results/attention_cpu.json --out benchmarks/results/``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

import ftattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pairing import paired  # noqa: E402

FLOP_FORMULA = "4 * B * Hq * N * M * D, halved for causal"
PROVIDERS = ("torch", "reference", "sdpa", "sdpa_flash", "off", "abft", "full")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# max |out - fp32 attention| allowed before a provider is timed (a sanity check of the
# setup, not an accuracy test: tests/ holds those)
SANITY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# rounds: as many as fit in TARGET_SECONDS per benchmark, within [MIN_ROUNDS, MAX_ROUNDS]
TARGET_SECONDS = 1.5
MIN_ROUNDS, MAX_ROUNDS = 3, 30


@dataclass(frozen=True)
class Case:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    batch: int
    heads: int  # query heads
    kv_heads: int
    seq: int  # N, queries
    kv_seq: int  # M, keys
    head_dim: int
    causal: bool
    series: str  # cases of one series differ only in the swept length (plotted as a line)
    sweep: str = "N"  # the axis of the series: "N" or "M" (decode)

    @property
    def name(self) -> str:
        gqa = f"-Hkv{self.kv_heads}" if self.kv_heads != self.heads else ""
        causal = "-causal" if self.causal else ""
        return (f"{self.device}-{DTYPE_NAMES[self.dtype]}-B{self.batch}-H{self.heads}{gqa}-N{self.seq}"
                f"-M{self.kv_seq}-D{self.head_dim}{causal}")

    @property
    def flops(self) -> float:
        flops = 4.0 * self.batch * self.heads * self.seq * self.kv_seq * self.head_dim
        return flops / 2 if self.causal else flops

    def record(self) -> dict:
        fields = asdict(self)
        fields["dtype"] = DTYPE_NAMES[self.dtype]
        fields["case"] = self.name
        return fields


def _cpu_grid():
    fp32, bf16 = torch.float32, torch.bfloat16
    cases = []
    for causal in (False, True):
        series = "fp32 B=1 H=8 D=64" + (" causal" if causal else "")
        cases += [Case("cpu", fp32, 1, 8, 8, n, n, 64, causal, series) for n in (256, 512, 1024, 2048)]
    cases += [Case("cpu", bf16, 1, 8, 8, n, n, 64, False, "bf16 B=1 H=8 D=64") for n in (512, 1024, 2048)]
    cases += [Case("cpu", fp32, 1, 8, 8, 2048, 2048, 128, False, "fp32 B=1 H=8 D=128")]
    cases += [Case("cpu", fp32, 1, 8, 2, 1024, 1024, 64, True, "fp32 B=1 H=8 Hkv=2 D=64 causal (GQA)")]
    cases += [Case("cpu", fp32, 4, 8, 2, 1, m, 128, False, "decode fp32 B=4 H=8 Hkv=2 D=128 N=1", "M")
              for m in (1024, 4096, 32768)]
    cases += [Case("cpu", fp32, 4, 8, 8, 1, 4096, 128, False, "decode fp32 B=4 H=8 D=128 N=1 (MHA)", "M")]
    return cases


def _cuda_grid():
    fp16, bf16 = torch.float16, torch.bfloat16
    sweep = (512, 1024, 2048, 4096, 8192, 16384)
    cases = []
    for causal in (False, True):
        tag = " causal" if causal else ""
        cases += [Case("cuda", fp16, 2, 32, 32, n, n, 128, causal, "fp16 B=2 H=32 D=128" + tag) for n in sweep]
        # the seed's constant-token shapes: B * N = 16384
        cases += [Case("cuda", fp16, 16384 // n, 32, 32, n, n, 128, causal, "fp16 B=16384/N H=32 D=128" + tag)
                  for n in sweep if n <= 8192]
    cases += [Case("cuda", bf16, 2, 32, 32, n, n, 128, False, "bf16 B=2 H=32 D=128") for n in sweep]
    cases += [Case("cuda", fp16, 2, 32, 32, n, n, 64, False, "fp16 B=2 H=32 D=64") for n in sweep]
    cases += [Case("cuda", fp16, 2, 32, 8, n, n, 128, True, "fp16 B=2 H=32 Hkv=8 D=128 causal (GQA)")
              for n in sweep]
    cases += [Case("cuda", fp16, 8, 32, 8, 1, m, 128, False, "decode fp16 B=8 H=32 Hkv=8 D=128 N=1", "M")
              for m in (1024, 4096, 8192, 16384, 32768)]
    return cases


CASES = _cpu_grid() + _cuda_grid()


# ---------------------------------------------------------------------------
# inputs


def _inputs(case: Case):
    """q, k, v uniform in [-1, 1) as in the seed notebook, on the case's device."""
    gen = torch.Generator().manual_seed(0)
    shapes = ((case.batch, case.heads, case.seq, case.head_dim),
              (case.batch, case.kv_heads, case.kv_seq, case.head_dim),
              (case.batch, case.kv_heads, case.kv_seq, case.head_dim))
    return [(torch.rand(*s, generator=gen) * 2 - 1).to(device=case.device, dtype=case.dtype) for s in shapes]


def _mask(case: Case, device) -> Optional[torch.Tensor]:
    """Bottom-right causal mask (True = visible), as ftattn's; None when not causal."""
    if not case.causal:
        return None
    return torch.ones(case.seq, case.kv_seq, dtype=torch.bool, device=device).tril(case.kv_seq - case.seq)


def _sdpa_kwargs(case: Case, k, v):
    """SDPA arguments for the case: is_causal when N == M (its top-left alignment then
    agrees with ftattn's bottom-right one and lets flash skip masked blocks), else an
    explicit mask; GQA through enable_gqa (no repeated k/v in memory)."""
    kwargs = {"enable_gqa": case.kv_heads != case.heads}
    if case.causal and case.seq == case.kv_seq:
        kwargs["is_causal"] = True
    elif case.causal:
        kwargs["attn_mask"] = _mask(case, k.device)
    return kwargs


# ---------------------------------------------------------------------------
# one setup factory per provider: case -> zero-argument callable returning the output


def make_torch(case: Case) -> Callable[[], torch.Tensor]:
    q, k, v = _inputs(case)
    group = case.heads // case.kv_heads
    scale = 1.0 / math.sqrt(case.head_dim)
    mask = _mask(case, q.device)
    hidden = None if mask is None else ~mask

    def run():
        kk, vv = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        s = (q @ kk.transpose(-1, -2)) * scale
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        return torch.softmax(s, dim=-1) @ vv

    return run


def make_reference(case: Case) -> Callable[[], torch.Tensor]:
    q, k, v = _inputs(case)
    return lambda: ftattn.attention(q, k, v, causal=case.causal, protection="full", backend="reference")


def make_sdpa(case: Case) -> Callable[[], torch.Tensor]:
    q, k, v = _inputs(case)
    kwargs = _sdpa_kwargs(case, k, v)
    return lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)


def make_sdpa_flash(case: Case) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _inputs(case)
    kwargs = _sdpa_kwargs(case, k, v)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return run


def _make_ftattn(protection: str):
    def make(case: Case) -> Callable[[], torch.Tensor]:
        q, k, v = _inputs(case)
        return lambda: ftattn.attention(q, k, v, causal=case.causal, protection=protection)

    make.__name__ = f"make_{protection}"
    return make


FACTORIES: Dict[str, Callable[[Case], Callable[[], torch.Tensor]]] = {
    "torch": make_torch, "reference": make_reference, "sdpa": make_sdpa, "sdpa_flash": make_sdpa_flash,
    "off": _make_ftattn("off"), "abft": _make_ftattn("abft"), "full": _make_ftattn("full"),
}
DESCRIPTIONS = {
    "torch": "pure PyTorch softmax(q k^T * scale) v in the input dtype, no checks",
    "reference": "ftattn backend='reference', protection full: the checks as separate PyTorch ops",
    "sdpa": "torch.nn.functional.scaled_dot_product_attention, default backend choice",
    "sdpa_flash": "scaled_dot_product_attention inside sdpa_kernel(SDPBackend.FLASH_ATTENTION)",
    "off": "ftattn.attention, protection off", "abft": "ftattn.attention, protection abft",
    "full": "ftattn.attention, protection full",
}


# ---------------------------------------------------------------------------
# guards: device present, memory enough


def _skip_reason(case: Case, provider: str, bench_device: str) -> Optional[str]:
    if bench_device not in ("all", case.device):
        return f"--bench-device={bench_device}"
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (this case is in the GPU grid; GPU figures are measured on an H200)"
    # the unfused providers hold B * Hq * N * M scores: skip rather than run out of memory
    element = torch.finfo(case.dtype).bits // 8
    kv = case.batch * case.heads * case.kv_seq * case.head_dim  # k / v elements, repeated to Hq heads
    # torch: scores and probabilities in the input dtype, a bool mask, repeated k / v.
    # reference: fp32 scores, exp, a second softmax, fp64 checksum copies over query rows
    # padded to 64, fp32 / fp64 k and v: 42-57 bytes per score and ~37 per k / v element,
    # measured with the CPU grid's peak memory (N = 256..2048, decode N=1)
    padded = case.batch * case.heads * (-(-case.seq // 64) * 64) * case.kv_seq
    need = {"torch": 3 * element * case.batch * case.heads * case.seq * case.kv_seq + 2 * element * kv,
            "reference": 60 * padded + 40 * kv}.get(provider, 0)
    if need:
        if case.device == "cuda":
            have = torch.cuda.get_device_properties(0).total_memory
        else:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > 0.8 * have:
            return f"{provider} needs about {need / 2**30:.0f} GiB for the N x M scores; {have / 2**30:.0f} GiB here"
    return None


def _synchronised(fn: Callable[[], torch.Tensor], device: str) -> Callable[[], torch.Tensor]:
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _expected(case: Case) -> torch.Tensor:
    """fp32 attention on the same inputs. k / v heads repeated rather than enable_gqa,
    which sends fp32 to the math backend on CUDA (B * H * N * M scores: 128 GiB at the
    GPU grid's GQA N=16384)."""
    q, k, v = (t.float() for t in _inputs(case))
    group = case.heads // case.kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    kwargs = _sdpa_kwargs(case, k, v)
    kwargs.pop("enable_gqa")
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


# case name -> provider -> median seconds, for the targets (filled in case-major order)
_MEDIANS: Dict[str, Dict[str, float]] = {}


@dataclass(frozen=True)
class Target:
    """time(provider) / time(other) <= limit (< when strict) on every case of ``device``
    with N == ``seq``. Interleaved targets time the two calls in turn (A B B A ...) in
    the provider's benchmark, so that a shared machine's load hits both alike (a 2-core
    CI machine under other jobs moves a sequential median by 2x); the others compare
    the sequential medians of this session (margins of 5x and more)."""

    device: str
    seq: int
    provider: str
    other: str
    limit: float
    strict: bool = False
    interleave: bool = True

    @property
    def name(self) -> str:
        return f"{self.provider} / {self.other} time {'<' if self.strict else '<='} {self.limit:g}"


TARGETS = (
    Target("cpu", 2048, "full", "sdpa", 1.3),
    Target("cpu", 2048, "full", "reference", 1.0, strict=True, interleave=False),
    Target("cpu", 2048, "full", "off", 1.15),  # issue 23: the checks' cost at N = 2048
    Target("cuda", 4096, "off", "sdpa_flash", 1.0),
    Target("cuda", 4096, "abft", "off", 1.05),
    Target("cuda", 4096, "full", "off", 1.15),
    Target("cuda", 4096, "full", "reference", 0.2, interleave=False),
)
INTERLEAVED_ROUNDS = 15  # pairs of calls; about 5 s on the CPU grid's N=2048


def _interleaved_ratio(fn: Callable, other: Callable, rounds: int) -> float:
    """median over rounds of (time of fn / time of other), paired (benchmarks/pairing.py)."""
    return paired(fn, other, rounds)[0]


def _targets(case: Case, provider: str, fn: Callable) -> list:
    """The issue's targets this benchmark closes: [{target, measured, limit, holds, how}]."""
    results = []
    for target in TARGETS:
        if (target.device, target.seq, target.provider) != (case.device, case.seq, provider):
            continue
        if target.interleave:
            try:
                other = _synchronised(FACTORIES[target.other](case), case.device)
                other()
            except (RuntimeError, NotImplementedError) as exc:
                results.append({"target": target.name, "measured": None, "limit": target.limit, "holds": None,
                                "how": f"{target.other} does not run here: {str(exc).splitlines()[0][:200]}"})
                continue
            ratio = _interleaved_ratio(fn, other, INTERLEAVED_ROUNDS)
            how = f"median of {INTERLEAVED_ROUNDS} paired ratios, calls back to back"
        elif target.other in _MEDIANS.get(case.name, {}):
            ratio = _MEDIANS[case.name][provider] / _MEDIANS[case.name][target.other]
            how = "medians of the two benchmarks"
        else:
            continue  # the other provider did not run in this session (-k, skipped)
        holds = ratio < target.limit if target.strict else ratio <= target.limit
        results.append({"target": target.name, "measured": ratio, "limit": target.limit, "holds": holds, "how": how})
    return results


@pytest.mark.parametrize(
    "case, provider",
    [pytest.param(case, provider, id=f"{case.name}-{provider}") for case in CASES for provider in PROVIDERS],
)
def test_attention(benchmark, bench_device, measure, case: Case, provider: str):
    reason = _skip_reason(case, provider, bench_device)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.name
    with torch.inference_mode():
        try:
            fn = _synchronised(FACTORIES[provider](case), case.device)
            start = time.perf_counter()
            out = fn()  # warm-up: first-call costs (dispatch, autotune, allocator) stay out of the figures
            first = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError as exc:  # the estimate in _skip_reason was short
            torch.cuda.empty_cache()
            pytest.skip(f"{provider} ran out of GPU memory on {case.name}: {str(exc).splitlines()[0][:200]}")
        except (RuntimeError, NotImplementedError) as exc:
            if provider == "sdpa_flash":  # a flash kernel that does not take this case is a skip, not a failure
                pytest.skip(f"SDPA flash backend does not run this case: {str(exc).splitlines()[0][:200]}")
            raise
        error = (out.float() - _expected(case)).abs().max().item()
        assert error <= SANITY_TOLERANCE[case.dtype], f"{provider} output is off by {error:g} on {case.name}"
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_SECONDS / max(first, 1e-6))))
        load = measure.load_average()
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)  # warmed up above
        peak, peak_method = measure.peak_bytes(fn, case.device if case.device == "cpu" else "cuda")
        median = benchmark.stats.stats.median
        _MEDIANS.setdefault(case.name, {})[provider] = median
        targets = _targets(case, provider, fn)

    info = benchmark.extra_info
    info.update(case.record())
    info.update(measure.environment(case.device if case.device == "cpu" else "cuda:0"))
    info.update({
        "provider": provider, "provider_description": DESCRIPTIONS[provider],
        "median_ms": median * 1e3, "rounds": rounds, "flops": case.flops, "flop_formula": FLOP_FORMULA,
        "tflops": case.flops / median / 1e12, "peak_mib": peak / 2**20, "peak_memory_method": peak_method,
        "max_abs_error_vs_fp32": error, "load_average": load, "inputs": "uniform [-1, 1), seed 0",
    })
    info["targets"] = targets
    missed = [f"{t['target']}: measured {t['measured']:.3f} ({t['how']})" for t in targets if t["holds"] is False]
    assert not missed, f"{case.name}: " + "; ".join(missed)
