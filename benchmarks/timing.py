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


def quiesce(limit: float = 0.5) -> None:
    """Wait (at most ``limit`` s) until this process uses no CPU while it sleeps.

    After each multi-threaded call OpenBLAS's threads spin about 0.1 s of CPU (measured
    here: 0.103 s of CPU during any sleep of 0.2 s or more after a 2-thread product),
    taking a core from whatever runs next; a timed call that follows a BLAS product
    (the GEMM runners) would pay for the product before it."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        cpu = time.process_time()
        time.sleep(0.01)
        if time.process_time() - cpu < 0.001:
            return


def interleaved_medians(fns: dict, repeats: int, settle: bool = False) -> dict:
    """Median wall time (s) of each function, the calls interleaved round by round (after
    one warm-up round), so slow phases of a shared machine hit all of them alike. A
    function that returns a float reports its own time (e.g. a runner of GEMMs alone).

    settle: start each call once the process is idle (:func:`quiesce`: no BLAS thread
    still spinning from the call before), for calls of tens of milliseconds and more.
    Not for sub-millisecond calls: after an idle pause this VM runs the next millisecond
    slowly (measured: a 0.41 ms numpy forward of digits_mlp took 0.50 ms after 20 ms
    asleep and 0.81 ms after 200 ms), which would swamp what they measure."""
    import statistics

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                quiesce()
            start = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
