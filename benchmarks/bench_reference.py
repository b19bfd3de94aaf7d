"""Reference simulator speed against the ReLU forward pass, side by side.

Times ``simulate`` (b1 and alpha1) and ``net.forward`` on the same 1797
digits in one process, best of several repetitions, and prints the ratios.
Target: b1 simulation <= 2x the ReLU forward time (the same matrix products;
the ReLU pass is the physical limit).

    .venv/bin/python benchmarks/bench_reference.py [--repeats 7]
"""

from __future__ import annotations

import argparse

from timing import best_time

import neurodeploy as nd
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    x_all, _ = nd.datasets.digits("all")
    x_train, _ = nd.datasets.digits("train")
    print(
        f"{'model':<12} {'ReLU forward':>13} {'b1 simulate':>12} {'b1 ratio':>9} "
        f"{'alpha1 simulate':>16} {'alpha1 ratio':>13}"
    )
    for name in ("digits_mlp", "digits_cnn"):
        net = nd.load_model(MODELS / name)
        x = x_all.reshape(len(x_all), *net.input_shape)
        calib = x_train.reshape(len(x_train), *net.input_shape)
        b1 = nd.convert(net, calibration=calib, neuron="b1")
        alpha1 = nd.convert(net, calibration=calib, neuron="alpha1")
        t_relu = best_time(lambda net=net, x=x: net.forward(x), args.repeats)
        t_b1 = best_time(lambda s=b1, x=x: nd.simulate(s, x), args.repeats)
        t_a1 = best_time(lambda s=alpha1, x=x: nd.simulate(s, x), max(1, args.repeats // 3))
        print(
            f"{name:<12} {t_relu * 1e3:>10.2f} ms {t_b1 * 1e3:>9.2f} ms {t_b1 / t_relu:>8.2f}x "
            f"{t_a1 * 1e3:>13.1f} ms {t_a1 / t_relu:>12.1f}x"
        )
    print(f"({len(x_all)} samples, float64, best of {args.repeats})")


if __name__ == "__main__":
    main()
