"""Throughput of the campaign runner (ftattn/tools/runner.py): faults per second of the
same backward campaign in this process and on a local Ray of 2 workers started for it
(with and without Ray's start, which a user pays once per campaign), and the runner's
overhead per shard in-process (shard records, the fsynced JSONL file) against calling the
shards' function directly, paired (pairing.paired: 5 rounds of a smaller job, the two
back to back in alternating order; one unpaired pair of runs on this shared machine
moved by +-8 %, more than the runner costs). The in-process run uses torch's threads
(every core); the same run on one thread is recorded too, as what each Ray worker
(1 CPU, 1 thread) has.

Targets (issue 20): 2 workers >= 1.7x in-process on a 2-core machine; runner overhead
<= 5 %. Writes ``benchmarks/results/campaign_runner_cpu.json``.
"""
import json
import os
import time

import pytest
import torch

from ftattn.tools import campaign, runner
from pairing import paired

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
JOB = campaign.Job("cpp", "cpu", "float32", "full", 6000, campaign.Shape(), 256, 11, pass_="backward")
OVERHEAD_JOB = campaign.Job("cpp", "cpu", "float32", "full", 1500, campaign.Shape(), 256, 12, pass_="backward")
OVERHEAD_ROUNDS = 5


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def test_runner_throughput(benchmark, measure, tmp_path):
    ray = pytest.importorskip("ray")
    units = JOB.units
    shards = runner.shards_of(OVERHEAD_JOB.units, campaign.SHARD_UNITS)
    overhead, with_runner, direct = paired(
        lambda: campaign.run_jobs([OVERHEAD_JOB], out=str(tmp_path / "o.jsonl"), progress=False),
        lambda: [campaign.run_units(OVERHEAD_JOB, s, e) for s, e in shards], OVERHEAD_ROUNDS)
    res, inproc = _timed(lambda: campaign.run_jobs([JOB], out=str(tmp_path / "a.jsonl"), progress=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res1, inproc1 = _timed(lambda: campaign.run_jobs([JOB], progress=False))
    finally:
        torch.set_num_threads(threads)
    _, start = _timed(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False))
    try:  # (the runner uses the Ray this process started)
        res2, ray2 = _timed(lambda: campaign.run_jobs([JOB], workers=2, progress=False))
    finally:
        ray.shutdown()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert res[0].sites == res2[0].sites == res1[0].sites  # the same counts every way
    faults = JOB.faults
    record = {
        "job": JOB.name, "faults": faults, "units": units, "shard_units": campaign.SHARD_UNITS,
        "torch_threads_in_process": threads,
        "seconds": {"in_process": inproc, "in_process_1_thread": inproc1, "ray_start": start,
                    "ray_2_workers": ray2, "ray_2_workers_with_start": start + ray2},
        "faults_per_second": {"in_process": faults / inproc, "in_process_1_thread": faults / inproc1,
                              "ray_2_workers": faults / ray2},
        "ray_2_over_in_process": inproc / (start + ray2), "ray_2_over_in_process_without_start": inproc / ray2,
        "ray_2_over_in_process_1_thread": inproc1 / ray2,
        "in_process_threads_over_1_thread": inproc1 / inproc,
        "runner_overhead": overhead - 1.0,
        "runner_overhead_job": {"name": OVERHEAD_JOB.name, "faults": OVERHEAD_JOB.faults, "units": OVERHEAD_JOB.units,
                                "shards": len(shards), "rounds": OVERHEAD_ROUNDS,
                                "median_seconds": {"in_process": with_runner, "direct": direct}},
        "targets": {"ray_2_over_in_process": 1.7, "runner_overhead": 0.05},
    }
    benchmark.extra_info.update(record)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "campaign_runner_cpu.json"), "w") as fh:
        json.dump({"machine": dict(measure.environment("cpu"), load_average=measure.load_average()),
                   "cases": [record]}, fh, indent=1)
