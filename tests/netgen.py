"""Seeded random ReLU networks covering every layer type the converter folds."""

from __future__ import annotations

import numpy as np

import neurodeploy as nd


def _bn(name: str, rng: np.random.Generator, channels: int) -> nd.BatchNorm:
    # gamma of either sign: a negative scale in front of a max pool makes it a min pool.
    return nd.BatchNorm(
        name,
        gamma=rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
        beta=rng.normal(0, 0.3, channels),
        mean=rng.normal(0, 0.3, channels),
        var=rng.uniform(0.5, 2.0, channels),
        eps=1e-5,
    )


def random_network(
    seed: int, hidden_conv: int = 3, hidden_dense: int = 2, modern: bool = False
) -> nd.Network:
    """A conv net with ``hidden_conv`` conv blocks and ``hidden_dense`` dense blocks.

    Conv blocks draw stride 1 or 2 and padding 0 or 1; batch norm before or
    after the ReLU (or none); max or average pooling where the map is large
    enough. Weights are He-scaled so activations neither vanish nor explode.
    Input: (2, 10, 10) with raw range [-1, 3].

    modern: also draw grouped and depthwise convolutions (a per-channel batch norm
    after the previous ReLU then folds into each group's own input slice), clipped
    ReLUs (clip low enough to bite) and padded 3x3 pools, max or average with
    count_include_pad either way. Without it the random stream, hence every network,
    is the same as before these existed.
    """
    rng = np.random.default_rng(seed)
    layers: list = []
    shape = (2, 10, 10)
    for i in range(hidden_conv):
        c_in, h = shape[0], shape[1]
        c_out = int(rng.integers(3, 7))
        k = 3
        padding = int(rng.integers(0, 2))
        stride = int(rng.integers(1, 3)) if h >= 6 else 1
        if (h + 2 * padding - k) // stride + 1 < 2:
            padding, stride = 1, 1
        groups = 1
        if modern:
            groups, c_out = _draw_groups(rng, c_in, c_out)
        w = rng.normal(0, np.sqrt(2.0 / (c_in // groups * k * k)), (c_out, c_in // groups, k, k))
        layers.append(
            nd.Conv2d(f"conv{i}", w, rng.normal(0, 0.1, c_out), stride, padding, groups=groups)
        )
        bn_where = rng.choice(["before", "after", "none"])
        if bn_where == "before":
            layers.append(_bn(f"bn{i}", rng, c_out))
        clip = float(rng.uniform(0.4, 1.2)) if modern and rng.random() < 0.5 else None
        layers.append(nd.ReLU(f"relu{i}", clip=clip))
        if bn_where == "after":
            layers.append(_bn(f"bn{i}", rng, c_out))
        shape = _shape(layers, (2, 10, 10))
        if shape[1] >= 4:
            pool = rng.choice(["max", "avg", "none"])
            if modern and pool != "none" and rng.random() < 0.6:
                layers.append(_padded_pool(rng, f"pool{i}", str(pool)))
            elif pool == "max":
                layers.append(nd.MaxPool2d(f"pool{i}", 2, 2))
            elif pool == "avg":
                layers.append(nd.AvgPool2d(f"pool{i}", 2, int(rng.integers(1, 3))))
            shape = _shape(layers, (2, 10, 10))
        if bn_where == "after" and rng.random() < 0.5:
            layers.append(_bn(f"bnpost{i}", rng, shape[0]))
    layers.append(nd.Flatten("flat"))
    features = int(np.prod(shape))
    for i in range(hidden_dense):
        out = int(rng.integers(8, 20))
        w = rng.normal(0, np.sqrt(2.0 / features), (out, features))
        layers.append(nd.Dense(f"fc{i}", w, rng.normal(0, 0.1, out)))
        if rng.random() < 0.5:
            layers.append(_bn(f"fcbn{i}", rng, out))
        layers.append(nd.ReLU(f"fcrelu{i}"))
        features = out
    layers.append(
        nd.Dense(
            "out", rng.normal(0, np.sqrt(1.0 / features), (4, features)), rng.normal(0, 0.1, 4)
        )
    )
    return nd.Network(f"random{seed}", (2, 10, 10), (-1.0, 3.0), tuple(layers))


def _draw_groups(rng: np.random.Generator, c_in: int, c_out: int) -> tuple[int, int]:
    """(groups, out channels): dense, depthwise (multiplier 1 or 2) or two groups."""
    kind = rng.choice(["dense", "depthwise", "two"])
    if kind == "depthwise":
        return c_in, c_in * int(rng.integers(1, 3))
    if kind == "two" and c_in % 2 == 0:
        return 2, 2 * max(2, c_out // 2)
    return 1, c_out


def _padded_pool(rng: np.random.Generator, name: str, kind: str) -> nd.Layer:
    stride = int(rng.integers(1, 3))
    if kind == "max":
        return nd.MaxPool2d(name, 3, stride, padding=1)
    include = bool(rng.random() < 0.5)
    return nd.AvgPool2d(name, 3, stride, padding=1, count_include_pad=include)


def _shape(layers, shape):
    for layer in layers:
        shape = layer.output_shape(shape)
    return shape


def random_inputs(net: nd.Network, n: int, seed: int) -> np.ndarray:
    p, q = net.input_range
    return np.random.default_rng(seed).uniform(p, q, (n, *net.input_shape))
