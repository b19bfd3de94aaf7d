"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import time


def best_time(fn, repeats: int) -> float:
    """Best wall time (s) of ``repeats`` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time (s) of each function, the calls interleaved round by round (after
    one warm-up round), so slow phases of a shared machine hit all of them alike. A
    function that returns a float reports its own time (e.g. a runner of GEMMs alone)."""
    import statistics

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
