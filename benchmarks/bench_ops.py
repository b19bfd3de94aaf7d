"""Grouped and depthwise convolution: ops.conv2d against a loop over the groups.

The loop (one im2col and one product per group) was ops.conv2d's first grouped
implementation; depthwise layers (groups = channels, MobileNet) then cost one
Python iteration per channel. ops.conv2d now does depthwise convolutions as
k*k shifted multiply-adds in cache-sized blocks, and other groupings as one
batched product over the groups from a single im2col when the products are
small (the loop when they are large). Prints both times, best of several
repetitions, and checks they agree.

    .venv/bin/python benchmarks/bench_ops.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import best_time

from neurodeploy import ops

# (batch, channels, map size, groups, stride): depthwise layers of MobileNet-like nets at
# a few batch sizes, and a grouped (ResNeXt-like) layer.
CASES = (
    (1, 256, 16, 256, 1),
    (16, 256, 16, 256, 1),
    (16, 512, 8, 512, 1),
    (128, 64, 16, 64, 2),
    (16, 256, 16, 32, 1),
    (1, 256, 16, 64, 1),
)


def loop_over_groups(x, weight, stride, padding, groups):
    c, o = x.shape[1] // groups, weight.shape[0] // groups
    parts = [
        ops.conv2d(x[:, g * c : (g + 1) * c], weight[g * o : (g + 1) * o], stride, padding)
        for g in range(groups)
    ]
    return np.concatenate(parts, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"3x3 convolutions, padding 1, float64, best of {args.repeats}")
    print(f"{'N x C x H, groups, stride':<28} {'loop':>9} {'ops.conv2d':>11} {'speed-up':>9}")
    for n, c, h, groups, stride in CASES:
        x = rng.normal(size=(n, c, h, h))
        weight = rng.normal(size=(c, c // groups, 3, 3))
        case = (x, weight, stride, 1, groups)
        fast, slow = ops.conv2d(*case), loop_over_groups(*case)
        assert np.abs(fast - slow).max() <= 1e-12 * np.abs(slow).max()
        t_loop = best_time(lambda c=case: loop_over_groups(*c), args.repeats)
        t_fast = best_time(lambda c=case: ops.conv2d(*c), args.repeats)
        label = f"{n} x {c} x {h}, {groups}, {stride}"
        speed_up = t_loop / t_fast
        print(f"{label:<28} {t_loop * 1e3:>6.1f} ms {t_fast * 1e3:>8.1f} ms {speed_up:>8.1f}x")


if __name__ == "__main__":
    main()
