"""Tests of ``python -m ftattn bench-report`` on a synthetic pytest-benchmark JSON, and
one tiny real run of benchmarks/test_bench_attention.py on CPU (the suite runs here)."""
import json
import os
import subprocess
import sys

import pytest

from ftattn.tools import bench_report
from ftattn.__main__ import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(case, provider, median, *, n, m=None, series="s1", sweep="N", flops=None, device="cpu", targets=()):
    m = n if m is None else m
    flops = 4.0 * 1 * 8 * n * m * 64 if flops is None else flops
    return {
        "group": case, "name": f"test_attention[{case}-{provider}]", "fullname": f"x::test_attention[{case}-{provider}]",
        "params": None, "param": f"{case}-{provider}",
        "extra_info": {"case": case, "provider": provider, "device": device, "device_name": "Test CPU",
                       "series": series, "sweep": sweep, "seq": n, "kv_seq": m, "flops": flops,
                       "flop_formula": "4 * B * Hq * N * M * D, halved for causal", "peak_mib": 1.5,
                       "torch": "9.9", "triton": "8.8", "load_average": [0.5, 0.4, 0.3],
                       "targets": list(targets)},
        "options": {}, "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median, "median": median,
                                 "rounds": 5, "stddev": 0.0, "iterations": 1},
    }


def _synthetic(path):
    """Two lengths of one series (so there is a plot) and one non-attention benchmark."""
    times = {"torch": 0.030, "reference": 0.100, "sdpa": 0.010, "off": 0.010, "abft": 0.011, "full": 0.012}
    benches = []
    for n, factor in ((256, 1.0), (512, 4.0)):
        case = f"cpu-fp32-N{n}"
        targets = [{"target": "full / sdpa time <= 1.3", "measured": 1.2, "limit": 1.3, "holds": True,
                    "how": "interleaved"}] if n == 512 else []
        for provider, t in times.items():
            benches.append(_bench(case, provider, t * factor, n=n, targets=targets if provider == "full" else ()))
    benches.append({"name": "test_clone", "fullname": "b/test_bench_mx.py::test_clone", "extra_info": {},
                    "stats": {"median": 0.0025, "rounds": 10, "min": 0.002}})
    data = {"machine_info": {"load_average_start": [0.5, 0.4, 0.3], "load_average_end": [0.6, 0.4, 0.3]},
            "commit_info": {"id": "abcdef1234567890", "dirty": False}, "benchmarks": benches,
            "datetime": "2026-01-01T00:00:00", "version": "5.3.1"}
    path.write_text(json.dumps(data))
    return path


def test_report_figures(tmp_path):
    runs = bench_report.load([str(_synthetic(tmp_path / "r.json"))])
    text = bench_report.markdown(runs, "cpu")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| cpu-fp32-N256 | 30")}
    assert rows, text
    summary = next(iter(rows.values()))
    cells = [c.strip() for c in summary.strip("|").split("|")]
    # case, PyTorch, reference, SDPA, SDPA flash, off, abft, full, off/SDPA, full/SDPA, speed-up, TFLOP/s, peak
    assert cells[:6] == ["cpu-fp32-N256", "30", "100", "10", "–", "10"]
    assert cells[6] == "11 (+10 %)" and cells[7] == "12 (+20 %)"
    assert cells[8] == "1.00x" and cells[9] == "1.20x"  # 10 ms / 10 ms, 12 ms / 10 ms
    assert cells[10] == "8.33x"  # 100 ms / 12 ms
    assert float(cells[11]) == pytest.approx(4 * 8 * 256 * 256 * 64 / 0.012 / 1e12, rel=1e-2)
    # the 4x slower case: TFLOP/s from its own FLOPs and median, overheads unchanged
    case = bench_report._by_case(runs[0].rows)["cpu-fp32-N512"]
    assert case["full"].tflops == pytest.approx(4 * 8 * 512 * 512 * 64 / 0.048 / 1e12)
    assert bench_report.overhead(case, "abft") == pytest.approx(0.1)
    assert bench_report.speedup_over_reference(case, "off") == pytest.approx(10.0)
    # targets, environment and the other benchmark are carried into the report
    assert "| cpu-fp32-N512 | full / sdpa time <= 1.3 | 1.200 | yes | interleaved |" in text
    assert "torch 9.9, triton 8.8" in text and "[0.5, 0.4, 0.3] at the start" in text
    assert "| b/test_bench_mx.py::test_clone | 2.5 | 10 |" in text


def test_missing_providers_show_dashes(tmp_path):
    path = tmp_path / "r.json"
    data = {"benchmarks": [_bench("c1", "full", 0.01, n=128)], "machine_info": {}, "commit_info": {}}
    path.write_text(json.dumps(data))
    text = bench_report.markdown(bench_report.load([str(path)]), "cpu")
    line = next(l for l in text.splitlines() if l.startswith("| c1 | –"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # no overhead without off, no ratio without SDPA, no speed-up without the reference
    assert cells[1:11] == ["–", "–", "–", "–", "–", "–", "10", "–", "–", "–"]


def test_cli_writes_markdown_and_png(tmp_path, capsys):
    src = _synthetic(tmp_path / "r.json")
    out = tmp_path / "out"
    assert cli(["bench-report", str(src), "--out", str(out)]) == 0
    md = (out / "attention_cpu.md").read_text()
    assert md.startswith("# Attention benchmarks: cpu")
    png = (out / "attention_cpu.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    assert "wrote" in capsys.readouterr().out


def test_series_need_two_lengths(tmp_path):
    runs = bench_report.load([str(_synthetic(tmp_path / "r.json"))])
    series = bench_report.series_points(runs[0].rows)
    assert list(series) == ["s1"] and [n for n, _ in series["s1"]["full"]] == [256, 512]
    single = [r for r in runs[0].rows if r.length == 256]
    assert not bench_report.series_points(single)
    assert bench_report.plot(runs, "cpu", str(tmp_path / "none.png")) is True


def test_bad_input(tmp_path, capsys):
    not_bench = tmp_path / "mx_cpu.json"
    not_bench.write_text(json.dumps({"env": {}, "measured": {}}))
    assert cli(["bench-report", str(not_bench), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a pytest-benchmark JSON" in err and "attention_cpu.json" in err and "ftattn/mx/README.md" in err
    no_attention = tmp_path / "other.json"
    no_attention.write_text(json.dumps({"benchmarks": [{"name": "t", "extra_info": {}, "stats": {"median": 1.0}}]}))
    assert cli(["bench-report", str(no_attention), "--out", str(tmp_path)]) == 2
    assert "no attention benchmarks" in capsys.readouterr().err
    assert cli(["bench-report", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="no attention benchmarks on device 'cuda'"):
        bench_report.markdown(bench_report.load([str(_synthetic(tmp_path / "r.json"))]), "cuda")


def test_real_cpu_run(tmp_path, child_env):
    """Three providers of the smallest CPU case through pytest-benchmark, then the report."""
    case = "cpu-fp32-B1-H8-N256-M256-D64"
    ids = [f"benchmarks/test_bench_attention.py::test_attention[{case}-{p}]" for p in ("sdpa", "off", "full")]
    ids.append("benchmarks/test_bench_attention.py::test_attention[cuda-fp16-B2-H32-N512-M512-D128-off]")
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *ids, "--benchmark-only", f"--benchmark-json={out}", "-q",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not __import__("torch").cuda.is_available():
        assert "1 skipped" in proc.stdout and "no CUDA device" in proc.stdout
    data = json.loads(out.read_text())
    benches = {b["extra_info"]["provider"]: b for b in data["benchmarks"] if b["extra_info"].get("device") == "cpu"}
    assert set(benches) == {"sdpa", "off", "full"}
    for provider, bench in benches.items():
        info, stats = bench["extra_info"], bench["stats"]
        assert info["flops"] == 4 * 1 * 8 * 256 * 256 * 64
        assert info["median_ms"] == pytest.approx(stats["median"] * 1e3)
        assert info["tflops"] == pytest.approx(info["flops"] / stats["median"] / 1e12)
        assert stats["rounds"] == info["rounds"] >= 3
        assert info["torch"] and info["device_name"] and len(info["load_average"]) == 3
        assert info["max_abs_error_vs_fp32"] < 1e-4
        # the output alone is 1 * 8 * 256 * 64 fp32 values: 0.5 MiB
        assert info["peak_mib"] >= 0.5
    assert len(data["machine_info"]["load_average_start"]) == 3
    assert cli(["bench-report", str(out), "--out", str(tmp_path), "--no-plot"]) == 0
    assert f"| {case} |" in (tmp_path / "attention_cpu.md").read_text()
