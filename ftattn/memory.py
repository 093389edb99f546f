"""Peak memory of one call, for the demo comparison and the benchmarks."""
from __future__ import annotations

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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.name == "[memory]"]
    events.sort(key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak
