"""ftattn.linear (abft, and off) against torch.nn.functional.linear, paired in one run.

Grid (issue 18): x [T, 4096] times W [4096, 4096] and [14336, 4096], T in {1, 16, 512,
2048}, float32 and bfloat16, with a bias. Each figure is the median over rounds of the
ratio of two calls made back to back, their order alternating (a shared machine's load
drifts over seconds). Targets: abft / F.linear <= 1.05 at T >= 16, <= 1.10 at T = 1.

Run: ``pytest benchmarks/test_bench_linear.py --benchmark-only`` (``-k "4096x4096"`` for
the smaller weight). Writes ``benchmarks/results/linear_cpu.json``: device, versions,
shapes, medians and ratios.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import ftattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pairing import paired  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUT_FEATURES = (4096, 14336)
ROWS = (1, 16, 512, 2048)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_records: list = []
_machine: dict = {}  # conftest's environment (CPU model, bf16 GEMM), at the last case


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out", OUT_FEATURES, ids=lambda o: f"{o}x4096")
def test_linear(benchmark, measure, out, rows, dtype):
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    w = (torch.randn(out, 4096, generator=g) / 64).to(dt)
    b = torch.randn(out, generator=g).to(dt)
    x = torch.randn(rows, 4096, generator=g).to(dt)
    abft = lambda: ftattn.linear(x, w, b)  # noqa: E731
    off = lambda: ftattn.linear(x, w, b, protection="off")  # noqa: E731
    torch_linear = lambda: F.linear(x, w, b)  # noqa: E731
    assert ftattn.linear(x, w, b, return_report=True)[1].detected == 0
    for f in (abft, off, torch_linear):
        f()
    flops = 2.0 * rows * 4096 * out
    rounds = max(5, min(41, int(2e10 / flops)))  # about the same time per case
    benchmark.pedantic(abft, rounds=rounds, iterations=1, warmup_rounds=1)
    ratio, t_abft, t_torch = paired(abft, torch_linear, rounds)
    ratio_off, t_off, _ = paired(off, torch_linear, rounds)
    limit = 1.10 if rows == 1 else 1.05
    record = {"shape": {"x": [rows, 4096], "weight": [out, 4096]}, "dtype": dtype, "rounds": rounds,
              "median_s": {"abft": t_abft, "off": t_off, "F.linear": t_torch},
              "abft_over_F.linear": ratio, "off_over_F.linear": ratio_off, "target": limit, "holds": ratio <= limit}
    benchmark.extra_info.update(record)
    _records.append(record)
    _machine.update(measure.environment("cpu"), load_average=measure.load_average())


def teardown_module(module):
    if not _records:
        return
    os.makedirs(RESULTS, exist_ok=True)
    env = dict(_machine, ftattn=ftattn.__version__)
    with open(os.path.join(RESULTS, "linear_cpu.json"), "w") as fh:
        json.dump({"machine": env, "cases": _records}, fh, indent=1)
