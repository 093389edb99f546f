"""Paired timing for the benchmarks' ratio targets (one module; a uniquely named one, as
`from conftest import` would pick whichever conftest.py was loaded last)."""
from __future__ import annotations

import time
from typing import Callable, Tuple


def paired(fn: Callable, other: Callable, rounds: int) -> Tuple[float, float, float]:
    """(median over rounds of time(fn) / time(other), median time of fn, of other), the two
    calls of a round back to back, their order alternating (A B, B A, ...): a shared
    machine's load drifts over seconds, and each ratio sees the load of one moment."""
    ratios, times = [], ([], [])
    for r in range(rounds):
        t = [0.0, 0.0]
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (fn, other)[i]()
            t[i] = time.perf_counter() - start
            times[i].append(t[i])
        ratios.append(t[0] / t[1])
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(ratios), med(times[0]), med(times[1])
