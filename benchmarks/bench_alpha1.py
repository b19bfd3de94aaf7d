"""alpha1 reference simulation against the float ReLU forward pass, side by side.

Target (issue 15): alpha1 ``simulate`` <= 5x ``net.forward`` on digits_cnn (all 1797
digits) and on a CIFAR-sized VGG (3x32x32, six 3x3 convs with BN, three max pools:
tests/netgen.py ``cifar_vgg``; random He-scaled weights, BN statistics measured on
random images). Checks first that the alpha1 SNN is exact (logits to 1e-9 relative,
no early or saturated spike), then times forward, alpha1 simulate and b1 simulate in
interleaved rounds (forward, alpha1, b1, forward, ...) and prints the medians.

    .venv/bin/python benchmarks/bench_alpha1.py [--repeats 7] [--images 32]
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

import numpy as np
from timing import interleaved_medians

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netgen import cifar_vgg  # noqa: E402

import neurodeploy as nd  # noqa: E402
from neurodeploy.modelio import SHIPPED_MODELS_DIR  # noqa: E402

RELATIVE_TOLERANCE = 1e-9
TARGET_RATIO = 5.0


def _case(name: str, net: nd.Network, calibration: np.ndarray, x: np.ndarray, repeats: int):
    tracemalloc.start()
    alpha1 = nd.convert(net, calibration=calibration, neuron="alpha1")
    _, convert_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    b1 = nd.convert(net, calibration=calibration)
    trace = nd.simulate(alpha1, x)
    ref = net.forward(x)
    error = float(np.abs(trace.output - ref).max() / np.abs(ref).max())
    exact = error <= RELATIVE_TOLERANCE and trace.saturated == 0 and trace.early == 0
    medians = interleaved_medians(
        {
            "forward": lambda: net.forward(x),
            "alpha1": lambda: nd.simulate(alpha1, x),
            "b1": lambda: nd.simulate(b1, x),
        },
        repeats,
    )
    ratio = medians["alpha1"] / medians["forward"]
    print(
        f"{name:<11} {len(x):>6} {medians['forward'] * 1e3:>10.1f} ms "
        f"{medians['alpha1'] * 1e3:>10.1f} ms {ratio:>6.2f}x "
        f"{medians['b1'] * 1e3:>8.1f} ms {medians['b1'] / medians['forward']:>5.2f}x "
        f"{error:>9.1e} {trace.early:>5} {trace.saturated:>5} {convert_peak / 2**20:>8.0f} MiB"
    )
    return exact, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=32, help="VGG images per run")
    args = parser.parse_args()
    print(
        f"{'model':<11} {'inputs':>6} {'ReLU forward':>13} {'alpha1 sim':>13} {'ratio':>7} "
        f"{'b1 sim':>11} {'ratio':>6} {'rel err':>9} {'early':>5} {'sat':>5} "
        f"{'convert':>12}"
    )
    results = []
    net = nd.load_model(SHIPPED_MODELS_DIR / "digits_cnn")
    x_train, _ = nd.datasets.digits("train")
    x_all, _ = nd.datasets.digits("all")
    results.append(_case("digits_cnn", net, x_train, x_all, args.repeats))
    vgg = cifar_vgg(0)
    rng = np.random.default_rng(1)
    calibration = rng.uniform(0.0, 1.0, (64, *vgg.input_shape))
    images = rng.uniform(0.0, 1.0, (args.images, *vgg.input_shape))
    # Calibrated on the timed images too: the guarantee covers the calibrated range.
    results.append(
        _case("cifar_vgg", vgg, np.concatenate([calibration, images]), images, args.repeats)
    )
    print(
        f"(float64, medians of {args.repeats} interleaved rounds; 'convert': alpha1 "
        "conversion's peak traced memory)"
    )
    if not all(exact for exact, _ in results):
        raise SystemExit("NOT EXACT")
    if any(ratio > TARGET_RATIO for _, ratio in results):
        raise SystemExit(f"alpha1 simulate above {TARGET_RATIO:g}x the forward pass")


if __name__ == "__main__":
    main()
