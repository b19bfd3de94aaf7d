"""Lava backend throughput against the emulator, side by side.

Runs all 1797 digits through digits_mlp on the Lava backend (fixed_pt,
loihi2 profile: one compile, batched processes) and on the emulator in one
process; prints samples/s, the ratio Lava time / emulator time, and checks
that both produced identical spike steps. Target: the whole set in < 60 s.

    .venv/bin/python benchmarks/bench_lava.py [--model digits_mlp] [--batch 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import neurodeploy as nd
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    net = nd.load_model(MODELS / args.model)
    x, _ = nd.datasets.digits("all")
    x_train, _ = nd.datasets.digits("train")
    x = x.reshape(len(x), *net.input_shape)
    snn = nd.convert(net, calibration=x_train.reshape(len(x_train), *net.input_shape))
    emulator = nd.deploy(snn, "loihi2")
    start = time.perf_counter()
    em = emulator.run(x)
    t_em = time.perf_counter() - start
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=args.batch)
    start = time.perf_counter()
    lv = lava.run(x)
    t_lava = time.perf_counter() - start
    same = all(np.array_equal(em.spike_times[k], lv.spike_times[k]) for k in em.spike_times)
    print(f"{args.model}, {len(x)} samples, loihi2 profile, batch {args.batch}")
    print(f"{'backend':<16} {'time':>9} {'samples/s':>10}")
    print(f"{'emulator':<16} {t_em:>8.3f}s {len(x) / t_em:>10.0f}")
    print(f"{'lava fixed_pt':<16} {t_lava:>8.3f}s {len(x) / t_lava:>10.0f}")
    print(f"lava / emulator time: {t_lava / t_em:.0f}x; identical spike steps: {same}")


if __name__ == "__main__":
    main()
