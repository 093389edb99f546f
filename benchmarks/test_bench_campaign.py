"""Throughput of the campaign runner (ftattn/tools/runner.py): faults per second of the
same backward campaign in this process and on a local Ray of 2 workers started for it
(with and without Ray's start, which a user pays once per campaign), and the runner's
overhead per shard in-process (shard records, JSONL file) against calling the shards'
function directly. The in-process run uses torch's threads (every core); the same run
on one thread is recorded too, as what each Ray worker (1 CPU, 1 thread) has.

Targets (issue 20): 2 workers >= 1.7x in-process on a 2-core machine; runner overhead
<= 5 %. Writes ``benchmarks/results/campaign_runner_cpu.json``.
"""
import json
import os
import time

import pytest
import torch

from ftattn.tools import campaign, runner

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
JOB = campaign.Job("cpp", "cpu", "float32", "full", 6000, campaign.Shape(), 256, 11, pass_="backward")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def test_runner_throughput(benchmark, measure, tmp_path):
    ray = pytest.importorskip("ray")
    units = JOB.units
    _, direct = _timed(lambda: [campaign.run_units(JOB, s, e) for s, e in runner.shards_of(units, campaign.SHARD_UNITS)])
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
        "seconds": {"direct": direct, "in_process": inproc, "in_process_1_thread": inproc1, "ray_start": start,
                    "ray_2_workers": ray2, "ray_2_workers_with_start": start + ray2},
        "faults_per_second": {"in_process": faults / inproc, "in_process_1_thread": faults / inproc1,
                              "ray_2_workers": faults / ray2},
        "ray_2_over_in_process": inproc / (start + ray2), "ray_2_over_in_process_without_start": inproc / ray2,
        "ray_2_over_in_process_1_thread": inproc1 / ray2,
        "in_process_threads_over_1_thread": inproc1 / inproc,
        "runner_overhead": inproc / direct - 1.0,
        "targets": {"ray_2_over_in_process": 1.7, "runner_overhead": 0.05},
    }
    benchmark.extra_info.update(record)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "campaign_runner_cpu.json"), "w") as fh:
        json.dump({"machine": dict(measure.environment("cpu"), load_average=measure.load_average()),
                   "cases": [record]}, fh, indent=1)
