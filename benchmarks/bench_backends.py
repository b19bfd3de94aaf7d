"""Backend speed against the reference simulator, side by side, on digits_cnn.

Times the reference simulator, the emulator (loihi2 profile) and the crossbar
backend (pcm profile: noise, drift, 8-bit converters) on all 1797 digits in
one process, best of several repetitions; prints each backend's time over the
reference's and its throughput. Target: each backend within 5x the reference.

    .venv/bin/python benchmarks/bench_backends.py [--repeats 5]
"""

from __future__ import annotations

import argparse

from timing import best_time

import neurodeploy as nd
from neurodeploy.deploy import deploy
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODEL = SHIPPED_MODELS_DIR / "digits_cnn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    net = nd.load_model(MODEL)
    x, _ = nd.datasets.digits("all")
    x_train, _ = nd.datasets.digits("train")
    snn = nd.convert(net, calibration=x_train)
    t_ref = best_time(lambda: nd.simulate(snn, x), args.repeats)
    rows = [("reference", t_ref)]
    for backend, profile in (("emulator", "loihi2"), ("crossbar", "pcm")):
        dep = deploy(snn, profile, backend=backend)
        rows.append((f"{backend} ({profile})", best_time(lambda d=dep: d.run(x), args.repeats)))
    print(f"digits_cnn, {len(x)} samples, best of {args.repeats}")
    print(f"{'backend':<20} {'time':>10} {'/ reference':>12} {'samples/s':>11}")
    for name, t in rows:
        print(f"{name:<20} {t * 1e3:>7.1f} ms {t / t_ref:>11.2f}x {len(x) / t:>11.0f}")


if __name__ == "__main__":
    main()
