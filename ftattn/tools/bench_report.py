"""``python -m ftattn bench-report``: pytest-benchmark JSON files of the attention
benchmarks -> a markdown table and a PNG plot per device.

Reads what benchmarks/test_bench_attention.py records in each benchmark's
``extra_info`` (case, shapes, provider, FLOPs, peak memory, device, versions,
targets) and the timing statistics pytest-benchmark keeps beside it. Times are the
median of the timed rounds (the warm-up call is not among them). Derived figures:
TFLOP/s = FLOPs / median, overhead of abft and full = time / time(off) - 1,
speed-up over the reference = time(reference) / time. Benchmarks of other files in
the same JSON (no attention case) are listed with their median only.

Writes ``<out>/<prefix>_<device>.md`` and ``.png`` (``attention_cpu.md``, ...).
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Row", "load", "markdown", "plot", "main"]

PROVIDER_ORDER = ("torch", "reference", "sdpa", "sdpa_flash", "off", "abft", "full")
# one colour per provider in every panel (matplotlib's tab10)
PROVIDER_COLORS = {"torch": "tab:gray", "reference": "tab:brown", "sdpa": "tab:blue", "sdpa_flash": "tab:cyan",
                   "off": "tab:green", "abft": "tab:orange", "full": "tab:red"}
PROVIDER_LABELS = {
    "torch": "PyTorch (no checks)",
    "reference": "reference (checks as ops)",
    "sdpa": "torch SDPA",
    "sdpa_flash": "torch SDPA flash",
    "off": "ftattn off",
    "abft": "ftattn abft",
    "full": "ftattn full",
}


@dataclass
class Row:
    """One benchmark: one provider on one case."""

    device: str
    case: str
    provider: str
    series: str
    sweep: str  # "N" or "M": the axis of the case's series
    length: int  # the swept length (N, or M for decode)
    median_s: float
    min_s: float
    flops: float
    peak_mib: Optional[float]
    rounds: int
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def tflops(self) -> float:
        return self.flops / self.median_s / 1e12 if self.median_s > 0 else float("nan")


@dataclass
class Run:
    """One pytest-benchmark JSON file."""

    path: str
    machine: dict
    commit: dict
    datetime: str
    rows: List[Row]
    others: List[Tuple[str, float, int]]  # (name, median s, rounds) of non-attention benchmarks


def _load_file(path: str) -> Run:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        own = ""
        if isinstance(data, dict) and ("measured" in data or "formula" in data):
            own = (" It is one of the benchmarks' own result files (benchmarks/test_bench_mx.py writes "
                   "mx_*.json, benchmarks/test_bench_generate.py generate_cpu.json): read it as it is; its "
                   "figures are in ftattn/mx/README.md and ftattn/onnx/README.md.")
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list); bench-report reads "
                         f"the files of pytest --benchmark-json (make bench-cpu writes "
                         f"benchmarks/results/attention_cpu.json).{own}")
    rows, others = [], []
    for bench in data["benchmarks"]:
        info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
        median = stats.get("median")
        if median is None:
            continue
        if "provider" not in info or "case" not in info:
            others.append((bench.get("fullname") or bench.get("name", "?"), median, stats.get("rounds", 0)))
            continue
        sweep = info.get("sweep", "N")
        rows.append(Row(
            device=info.get("device", "?"), case=info["case"], provider=info["provider"],
            series=info.get("series", info["case"]), sweep=sweep,
            length=int(info["kv_seq"] if sweep == "M" else info["seq"]),
            median_s=float(median), min_s=float(stats.get("min", median)), flops=float(info["flops"]), peak_mib=info.get("peak_mib"),
            rounds=int(stats.get("rounds", 0)), extra=info,
        ))
    return Run(path, data.get("machine_info") or {}, data.get("commit_info") or {}, data.get("datetime", ""),
               rows, others)


def load(paths: Sequence[str]) -> List[Run]:
    return [_load_file(p) for p in paths]


def _by_case(rows: List[Row]) -> "OrderedDict[str, Dict[str, Row]]":
    """case -> provider -> row, cases in the order they ran; a later file's row wins."""
    cases: "OrderedDict[str, Dict[str, Row]]" = OrderedDict()
    for row in rows:
        cases.setdefault(row.case, {})[row.provider] = row
    return cases


def overhead(case: Dict[str, Row], provider: str) -> Optional[float]:
    """time(provider) / time(off) - 1, or None."""
    if provider in case and "off" in case:
        return case[provider].median_s / case["off"].median_s - 1.0
    return None


def speedup_over_reference(case: Dict[str, Row], provider: str) -> Optional[float]:
    if provider in case and "reference" in case:
        return case["reference"].median_s / case[provider].median_s
    return None


def _ms(row: Optional[Row]) -> str:
    return "–" if row is None else f"{row.median_s * 1e3:.3g}"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:+.0f} %"


def _x(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _environment(runs: List[Run], rows: List[Row]) -> List[str]:
    lines = []
    first = rows[0].extra
    lines.append(f"- device: {first.get('device_name', '?')} ({first.get('device', '?')}"
                 + (f", {first['capability']}" if "capability" in first else "")
                 + f"), torch {first.get('torch', '?')}, triton {first.get('triton', '?')}, "
                 f"python {first.get('python', '?')}, {first.get('cpu_threads', '?')} CPU threads"
                 f" ({first.get('cpu_capability', '?')})")
    for run in runs:
        if not any(r in rows for r in run.rows):
            continue
        commit = run.commit.get("id", "")[:12]
        dirty = " (uncommitted changes)" if run.commit.get("dirty") else ""
        load = (f"load average (1, 5, 15 min) {run.machine.get('load_average_start', '?')} at the start, "
                f"{run.machine.get('load_average_end', '?')} at the end")
        lines.append(f"- run {run.datetime or '?'} from `{os.path.basename(run.path)}`, commit {commit or '?'}{dirty}; "
                     f"{load}")
    lines.append(f"- FLOPs = {first.get('flop_formula', '4 * B * Hq * N * M * D, halved for causal')}; "
                 f"times are medians of the timed rounds after one warm-up call; inputs "
                 f"{first.get('inputs', '?')}")
    lines.append(f"- peak memory: {first.get('peak_memory_method', '?')}")
    return lines


def markdown(runs: List[Run], device: str) -> str:
    rows = [r for run in runs for r in run.rows if r.device == device]
    if not rows:
        raise ValueError(f"no attention benchmarks on device {device!r} in these files")
    cases = _by_case(rows)
    out = [f"# Attention benchmarks: {device}", ""]
    out += _environment(runs, rows)
    out += [""]

    # targets, as the benchmarks checked them
    targets = [(row.case, t) for row in rows for t in row.extra.get("targets", [])]
    if targets:
        out += ["## Targets", "", "| case | target | measured | holds | how |", "|---|---|---|---|---|"]
        for case, t in targets:
            measured = "–" if t.get("measured") is None else f"{t['measured']:.3f}"
            holds = {True: "yes", False: "**no**"}.get(t.get("holds"), "not measured")
            out.append(f"| {case} | {t['target']} | {measured} | {holds} | {t.get('how', '')} |")
        out.append("")

    out += ["## Summary", "",
            "Median ms per provider; abft and full with their overhead over off; off / SDPA and full / SDPA as "
            "time ratios (< 1: ftattn is faster; full / SDPA = off / SDPA x full / off, the kernel's base speed "
            "times the cost of the checks); speed-up of full over the reference.", "",
            "| case | PyTorch | reference | SDPA | SDPA flash | off | abft | full | off / SDPA | full / SDPA "
            "| full speed-up over reference | full TFLOP/s | full peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in cases.items():
        full, sdpa = case.get("full"), case.get("sdpa")
        abft_cell = _ms(case.get("abft")) + (f" ({_pct(overhead(case, 'abft'))})" if overhead(case, "abft") is not None else "")
        full_cell = _ms(full) + (f" ({_pct(overhead(case, 'full'))})" if overhead(case, "full") is not None else "")
        ratio = full.median_s / sdpa.median_s if full and sdpa else None
        off_ratio = case["off"].median_s / sdpa.median_s if "off" in case and sdpa else None
        out.append(
            f"| {name} | {_ms(case.get('torch'))} | {_ms(case.get('reference'))} | {_ms(sdpa)} "
            f"| {_ms(case.get('sdpa_flash'))} | {_ms(case.get('off'))} | {abft_cell} | {full_cell} "
            f"| {_x(off_ratio)} | {_x(ratio)} | {_x(speedup_over_reference(case, 'full'))} "
            f"| {_num(full.tflops if full else None)} | {_num(full.peak_mib if full else None, '{:.3g}')} |")
    out.append("")

    out += ["## All figures", "",
            "| case | provider | median ms | min ms | TFLOP/s | peak MiB | time vs off | speed-up over reference "
            "| rounds | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in cases.items():
        for provider in sorted(case, key=lambda p: PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99):
            row = case[provider]
            vs_off = overhead(case, provider) if provider != "off" else None
            load = row.extra.get("load_average") or ["?"]
            out.append(f"| {name} | {PROVIDER_LABELS.get(provider, provider)} | {_ms(row)} | {row.min_s * 1e3:.3g} "
                       f"| {_num(row.tflops, '{:.4g}')} | {_num(row.peak_mib, '{:.3g}')} | {_pct(vs_off)} | {_x(speedup_over_reference(case, provider))} "
                       f"| {row.rounds} | {load[0]} |")
    out.append("")

    others = [o for run in runs for o in run.others]
    if others:
        out += ["## Other benchmarks in these files", "", "| benchmark | median ms | rounds |", "|---|---|---|"]
        out += [f"| {name} | {median * 1e3:.3g} | {rounds} |" for name, median, rounds in others]
        out.append("")
    return "\n".join(out)


def series_points(rows: List[Row]) -> "OrderedDict[str, Dict[str, List[Tuple[int, Row]]]]":
    """series -> provider -> [(length, row)] sorted by length; only series of >= 2 lengths."""
    series: "OrderedDict[str, Dict[str, List[Tuple[int, Row]]]]" = OrderedDict()
    for name, case in _by_case(rows).items():
        for provider, row in case.items():
            series.setdefault(row.series, {}).setdefault(provider, []).append((row.length, row))
    for providers in series.values():
        for points in providers.values():
            points.sort(key=lambda p: p[0])
    return OrderedDict((s, p) for s, p in series.items() if len({n for pts in p.values() for n, _ in pts}) >= 2)


def plot(runs: List[Run], device: str, path: str) -> bool:
    """TFLOP/s and overhead against N (M for decode) per provider, one row per series.
    False when no series has two lengths (nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for run in runs for r in run.rows if r.device == device]
    series = series_points(rows)
    if not series:
        return False
    cases = _by_case(rows)
    fig, axes = plt.subplots(len(series), 2, figsize=(12, 3.6 * len(series)), squeeze=False)
    for (name, providers), (ax_rate, ax_over) in zip(series.items(), axes):
        sweep = next(iter(providers.values()))[0][1].sweep
        for provider in [p for p in PROVIDER_ORDER if p in providers] + [p for p in providers if p not in PROVIDER_ORDER]:
            points = providers[provider]
            ax_rate.plot([n for n, _ in points], [r.tflops for _, r in points], marker="o",
                         color=PROVIDER_COLORS.get(provider), label=PROVIDER_LABELS.get(provider, provider))
            if provider in ("abft", "full"):
                over = [(n, overhead(cases[r.case], provider)) for n, r in points]
                over = [(n, 100 * o) for n, o in over if o is not None]
                if over:
                    ax_over.plot([n for n, _ in over], [o for _, o in over], marker="o",
                                 color=PROVIDER_COLORS[provider], label=f"{PROVIDER_LABELS[provider]} over off")
        lengths = sorted({n for points in providers.values() for n, _ in points})
        for ax in (ax_rate, ax_over):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel(sweep)
            ax.grid(True, alpha=0.3)
        ax_rate.set_ylabel("TFLOP/s")
        ax_rate.set_yscale("log")
        ax_rate.set_title(f"{name}: throughput", fontsize=10)
        ax_rate.legend(fontsize=7)
        ax_over.axhline(0, color="black", linewidth=0.8)
        ax_over.set_ylabel("overhead over protection off (%)")
        ax_over.set_title(f"{name}: cost of the checks", fontsize=10)
        if ax_over.lines[1:]:
            ax_over.legend(fontsize=7)
    first = rows[0].extra
    fig.suptitle(f"ftattn attention on {first.get('device_name', device)} ({device}), torch {first.get('torch', '?')}"
                 f", FLOPs = 4 B Hq N M D (halved for causal)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# command line


def add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files (pytest --benchmark-json=...)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md and .png (default: %(default)s)")
    parser.add_argument("--prefix", default="attention", help="file name prefix: <prefix>_<device>.md (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="write the markdown only")


def main(args) -> int:
    try:
        runs = load(args.files)
    except (OSError, ValueError) as exc:
        print(f"ftattn bench-report: {exc}", file=sys.stderr)
        return 2
    devices = list(OrderedDict.fromkeys(r.device for run in runs for r in run.rows))
    if not devices:
        print("ftattn bench-report: no attention benchmarks (extra_info with 'case' and 'provider') in "
              + ", ".join(args.files), file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for device in devices:
        stem = os.path.join(args.out, f"{args.prefix}_{device}")
        text = markdown(runs, device)
        with open(stem + ".md", "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        print(f"wrote {stem}.md")
        if not args.no_plot:
            if plot(runs, device, stem + ".png"):
                print(f"wrote {stem}.png")
            else:
                print(f"no plot for {device}: no series with two lengths")
    return 0
