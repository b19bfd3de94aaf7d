"""Lava backend throughput against the emulator, side by side (issue 14).

All 1797 digits through digits_mlp and digits_cnn on the Lava backend (fixed_pt,
loihi2 profile: one compile, batched processes) and on the emulator, in one
process: one warm-up run of each, then ``--repeats`` (>= 3) rounds that
interleave Lava and the emulator; prints the median times, samples/s, the
ratio, whether every run gave identical spike steps, output, overflow and
early/saturated counts, and the 3 s target beside
the Lava figure.

    .venv/bin/python benchmarks/bench_lava.py [--models digits_mlp digits_cnn] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import neurodeploy as nd
from neurodeploy.modelio import SHIPPED_MODELS_DIR

TARGET_S = 3.0  # issue 14: the whole digits set through Lava (digits_cnn) in <= 3 s


def _timed(dep, x):
    start = time.perf_counter()
    trace = dep.run(x)
    return time.perf_counter() - start, trace


def bench(model: str, repeats: int, batch: int | None) -> None:
    net = nd.load_model(SHIPPED_MODELS_DIR / model)
    x, _ = nd.datasets.digits("all")
    x_train, _ = nd.datasets.digits("train")
    x = x.reshape(len(x), *net.input_shape)
    snn = nd.convert(net, calibration=x_train.reshape(len(x_train), *net.input_shape))
    emulator = nd.deploy(snn, "loihi2")
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=batch)
    _timed(emulator, x)  # warm-up
    _timed(lava, x)
    t_em, t_lava, same = [], [], True
    for _ in range(repeats):  # interleaved: load on the machine hits both alike
        t, em = _timed(emulator, x)
        t_em.append(t)
        t, lv = _timed(lava, x)
        t_lava.append(t)
        same &= all(np.array_equal(em.spike_times[k], lv.spike_times[k]) for k in em.spike_times)
        same &= bool(np.array_equal(em.output, lv.output))
        same &= em.overflow == lv.overflow and em.saturated_per_layer == lv.saturated_per_layer
        same &= em.early_per_layer == lv.early_per_layer
    m_em, m_lava = statistics.median(t_em), statistics.median(t_lava)
    chunk = f"batch {lava.chunk_size(len(x))}" + (" (chunk_size)" if batch is None else "")
    print(f"{model}, {len(x)} samples, loihi2 profile, {chunk}, median of {repeats}")
    print(f"{'backend':<16} {'median':>9} {'samples/s':>10}   target")
    print(f"{'emulator':<16} {m_em:>8.3f}s {len(x) / m_em:>10.0f}")
    print(f"{'lava fixed_pt':<16} {m_lava:>8.3f}s {len(x) / m_lava:>10.0f}   <= {TARGET_S:.0f} s")
    print(
        f"lava / emulator time: {m_lava / m_em:.0f}x; identical spike steps, output, overflow "
        f"counts and early/saturated counts: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_mlp", "digits_cnn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: chunk_size's")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    for model in args.models:
        bench(model, args.repeats, args.batch)


if __name__ == "__main__":
    main()
