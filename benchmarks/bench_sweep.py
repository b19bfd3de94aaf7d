"""Sweep throughput: 10 read-noise levels x 10 seeds x 1797 digits, digits_cnn, crossbar.

Runs the same sweep twice in one process, with one local worker and with all
cores, into fresh temporary directories; prints wall time and points/s of
each and the speed-up. Target: the whole sweep in under 60 s on 2 cores.

    .venv/bin/python benchmarks/bench_sweep.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from neurodeploy.modelio import SHIPPED_MODELS_DIR
from neurodeploy.sweep import make_spec, run_sweep

MODEL = SHIPPED_MODELS_DIR / "digits_cnn"


def main() -> None:
    levels = [float(v) for v in np.linspace(0.0, 4.0, 10)]
    seeds = 10
    cores = os.cpu_count() or 1
    print(
        f"digits_cnn, crossbar (pcm), read_noise_scale x {len(levels)} levels x {seeds} seeds, "
        "1797 digits each"
    )
    print(f"{'executor':<22} {'wall time':>10} {'runs/s':>8}")
    times = {}
    for workers in (1, cores):
        spec = make_spec(
            MODEL,
            "pcm",
            [("crossbar.read_noise_scale", levels)],
            seeds,
            None,
            None,
            str(_all_digits()),
            None,
            0.5,
        )
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            records = run_sweep(spec, Path(out), workers=workers)
            times[workers] = time.perf_counter() - start
        assert len(records) == len(levels) * seeds
        print(
            f"{f'local, {workers} process(es)':<22} {times[workers]:>9.1f}s "
            f"{len(records) / times[workers]:>8.1f}"
        )
    print(f"speed-up with {cores} processes: {times[1] / times[cores]:.2f}x")


def _all_digits() -> Path:
    """All 1797 digits as a --data file (calibration on the training split)."""
    import neurodeploy as nd

    x, y = nd.datasets.digits("all")
    x_train, _ = nd.datasets.digits("train")
    path = Path(tempfile.gettempdir()) / "neurodeploy_bench_digits_all.npz"
    np.savez(path, x=x, y=y, x_calib=x_train)
    return path


if __name__ == "__main__":
    main()
