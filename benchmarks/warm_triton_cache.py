"""Compile the autotuned CUDA attention kernel for the GPU grid's cases in parallel, one
process per autotune key, before the (serial) benchmark runs.

Triton's autotuner compiles its configs one after the other on a key's first call: up
to 12 sm_90 compiles, 9-55 s each for the checked kernels (several minutes a key), and
the N = 4096 row of the GPU grid has 15 keys. Compiled kernels land in Triton's on-disk cache, so the benchmark
process that follows only loads them and times the configs (its own autotuning, on an
idle GPU: the timings taken here, with 16 processes sharing the GPU, are thrown away).

    python benchmarks/warm_triton_cache.py --seq 4096 [--workers 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
import multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
PROTECTIONS = ("off", "abft", "full")


def _bench_module():
    # the repository root shadows transformers' `kernels` (ftattn/_checkout.py)
    from ftattn._checkout import unshadow_kernels

    unshadow_kernels()
    sys.path.insert(0, HERE)
    import test_bench_attention

    return test_bench_attention


def _warm(index: int, protection: str) -> str:
    bench = _bench_module()
    import torch

    case = bench.CASES[index]
    start = time.perf_counter()
    fn = bench.FACTORIES[protection](case)
    fn()
    torch.cuda.synchronize()
    return f"{case.name} {protection}: {time.perf_counter() - start:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, action="append", required=True,
                        help="N of the GPU grid's cases to warm (repeatable); decode cases match on M")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    bench = _bench_module()
    from ftattn._launch.attention import _next_pow2

    jobs, keys = [], set()
    for i, case in enumerate(bench.CASES):
        if case.device != "cuda" or (case.kv_seq if case.sweep == "M" else case.seq) not in args.seq:
            continue
        for protection in PROTECTIONS:  # the autotune key (kernels/attention.py), dtype added by triton
            key = (case.dtype, _next_pow2(case.seq), _next_pow2(case.kv_seq), case.head_dim, case.causal, protection)
            if key not in keys:
                keys.add(key)
                jobs.append((i, protection))
    print(f"warming {len(jobs)} autotune keys on {args.workers} processes", flush=True)
    failed = 0
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_warm, i, p): (i, p) for i, p in jobs}
        for fut in as_completed(futures):
            try:
                print(fut.result(), flush=True)
            except Exception as exc:  # reported, and the benchmark then shows it in full
                failed += 1
                i, p = futures[fut]
                print(f"{bench.CASES[i].name} {p}: FAILED {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
