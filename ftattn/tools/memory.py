"""Peak memory of one call, for the demo comparison and the benchmarks."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it.

    CUDA: the caching allocator's counters. CPU: the profiler's allocation events
    replayed in order (torch's CPU allocator only; scratch the C++ kernel takes
    with std::vector, O(BLOCK_M * (BLOCK_N + D)) per thread, is not counted).
    """
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation and free of torch's CPU allocator, in time order
    raw = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in records:
        cur += nbytes
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints a line to file descriptor 2 at every profiler start and stop."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreter): nothing to hide
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
