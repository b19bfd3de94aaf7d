"""Residual TTFS networks built by hand for the backend tests (no converter needed).

A converted chain network gets :class:`~neurodeploy.ttfs.Shortcut` synapses
into later layers; every window is then calibrated again on the residual
values (B_n = (1 + zeta) X_n) and every threshold follows (b1: theta = B_n - b),
so the result is a valid b1 network that computes the residual ReLU network.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import neurodeploy as nd
from neurodeploy import ops
from neurodeploy.ttfs import INPUT_WINDOW, OutputLayer, Shortcut, TimePool, apply_synapses


def _values(snn: nd.TTFSNetwork, x01: np.ndarray, shortcuts: dict, extra_bias: dict) -> dict:
    """ReLU values of every stage (and "input") of the residual network, no windows."""
    values = {"input": x01}
    v = x01
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            s = stage.sign[None, :, None, None]
            v = ops.maxpool2d(v * s, stage.kernel, stage.stride) * s
        else:
            v = apply_synapses(stage.synapses, v) + stage.bias + extra_bias.get(stage.name, 0.0)
            for source, synapses in shortcuts.get(stage.name, ()):
                v = v + apply_synapses(synapses, values[source])
            if not isinstance(stage, OutputLayer):
                v = np.maximum(v, 0.0)
        values[stage.name] = v
    return values


def forward(snn: nd.TTFSNetwork, x) -> np.ndarray:
    """Logits (N, classes) of the ReLU network a residual b1 ``snn`` computes, on raw x."""
    p, q = snn.input_range
    x01 = np.clip((np.asarray(x, dtype=np.float64) - p) / (q - p), 0.0, 1.0)
    shortcuts = {
        s.name: [(sc.source, sc.synapses) for sc in s.shortcuts]
        for s in snn.stages
        if getattr(s, "shortcuts", ())
    }
    out = _values(snn, x01, shortcuts, {})[snn.output.name]
    return out.reshape(len(x01), -1)


def with_shortcuts(
    snn: nd.TTFSNetwork, shortcuts: dict, extra_bias: dict | None = None
) -> nd.TTFSNetwork:
    """``snn`` with shortcut synapses added and its windows calibrated again.

    shortcuts: join layer name -> [(source stage name or "input", synapses)];
    synapses map the source's values onto the join's output shape. extra_bias:
    layer name -> bias added to the layer (a projection shortcut's folded bias).
    """
    extra_bias = extra_bias or {}
    p, q = snn.input_range
    x01 = np.clip((snn.calibration - p) / (q - p), 0.0, 1.0)
    values = _values(snn, x01, shortcuts, extra_bias)
    shapes = {"input": snn.input_shape, **{s.name: s.output_shape for s in snn.stages}}
    ends = {"input": INPUT_WINDOW[1]}
    stages = []
    t_min_prev, t_min = INPUT_WINDOW
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            stages.append(replace(stage, t_min=t_min_prev, t_max=t_min))
            ends[stage.name] = t_min
            continue
        bias = stage.bias + extra_bias.get(stage.name, 0.0)
        links = tuple(
            Shortcut(source, tuple(synapses), shapes[source], ends[source])
            for source, synapses in shortcuts.get(stage.name, ())
        )
        if isinstance(stage, OutputLayer):
            stages.append(
                replace(stage, bias=bias, t_min_prev=t_min_prev, t_read=t_min, shortcuts=links)
            )
            break
        x_max = float(values[stage.name].max())
        window = (1.0 + snn.zeta) * (x_max if x_max > 0 else 1.0)
        stages.append(
            replace(
                stage,
                bias=bias,
                t_min_prev=t_min_prev,
                t_min=t_min,
                t_max=t_min + window,
                x_max=x_max,
                threshold=window - bias,
                shortcuts=links,
            )
        )
        ends[stage.name] = t_min + window
        t_min_prev, t_min = t_min, t_min + window
    return replace(snn, stages=tuple(stages))


def _identity_conv(name: str, channels: int) -> nd.Conv2d:
    eye = np.eye(channels).reshape(channels, channels, 1, 1)
    return nd.Conv2d(name, eye, np.zeros(channels), 1, 0)


def dense_resnet(seed: int = 0, samples: int = 40):
    """A dense residual net: input -> fc1 -> fc2 (+ projection of the input) -> fc3
    (+ identity of fc1) -> out (+ projection of fc2). Returns (snn, raw calibration
    inputs)."""
    rng = np.random.default_rng(seed)
    width = 8

    def dense(name, n_out, n_in, scale=1.0):
        w = rng.normal(0, scale * np.sqrt(2.0 / n_in), (n_out, n_in))
        return nd.Dense(name, w, rng.normal(0, 0.1, n_out))

    layers = (
        dense("fc1", width, 6),
        nd.ReLU("r1"),
        dense("fc2", width, width),
        nd.ReLU("r2"),
        dense("fc3", width, width),
        nd.ReLU("r3"),
        dense("out", 3, width),
    )
    net = nd.Network(f"dense_resnet{seed}", (6,), (-1.0, 2.0), layers)
    x = rng.uniform(-1.0, 2.0, (samples, 6))
    chain = nd.convert(net, calibration=x)
    shortcuts = {
        "fc2": [("input", (nd.Dense("proj_in", rng.normal(0, 0.6, (width, 6)), np.zeros(width)),))],
        "fc3": [("fc1", (nd.Dense("id_fc1", np.eye(width), np.zeros(width)),))],
        "out": [("fc2", (nd.Dense("proj_fc2", rng.normal(0, 0.4, (3, width)), np.zeros(3)),))],
    }
    extra_bias = {"fc2": rng.normal(0, 0.1, width)}
    return with_shortcuts(chain, shortcuts, extra_bias), x


def conv_resnet(seed: int = 0, samples: int = 40):
    """A small residual CNN: conv1 -> conv2 -> conv3 (+ identity of conv1) -> max pool
    -> conv4 (+ average-pooled 1x1 projection of conv2, + 1x1 projection of the pool
    right before it: no delay) -> fc -> out (+ flattened projection of the pool).
    Returns (snn, raw calibration inputs)."""
    rng = np.random.default_rng(seed)

    def conv(name, c_out, c_in):
        w = rng.normal(0, np.sqrt(2.0 / (c_in * 9)), (c_out, c_in, 3, 3))
        return nd.Conv2d(name, w, rng.normal(0, 0.1, c_out), 1, 1)

    layers = (
        conv("conv1", 4, 2),
        nd.ReLU("r1"),
        conv("conv2", 4, 4),
        nd.ReLU("r2"),
        conv("conv3", 4, 4),
        nd.ReLU("r3"),
        nd.MaxPool2d("pool", 2, 2),
        conv("conv4", 6, 4),
        nd.ReLU("r4"),
        nd.Flatten("flat"),
        nd.Dense("fc", rng.normal(0, np.sqrt(2.0 / 96), (10, 96)), rng.normal(0, 0.1, 10)),
        nd.ReLU("r5"),
        nd.Dense("out", rng.normal(0, np.sqrt(1.0 / 10), (3, 10)), rng.normal(0, 0.1, 3)),
    )
    net = nd.Network(f"conv_resnet{seed}", (2, 8, 8), (0.0, 1.0), layers)
    x = rng.uniform(0.0, 1.0, (samples, 2, 8, 8))
    chain = nd.convert(net, calibration=x)
    projection = nd.Conv2d("proj2", rng.normal(0, 0.5, (6, 4, 1, 1)), np.zeros(6), 1, 0)
    shortcuts = {
        "conv3": [("conv1", (_identity_conv("id1", 4),))],
        "conv4": [
            ("conv2", (nd.AvgPool2d("proj2_pool", 2, 2), projection)),
            ("pool", (nd.Conv2d("proj_pool", rng.normal(0, 0.3, (6, 4, 1, 1)), np.zeros(6)),)),
        ],
        "out": [
            (
                "pool",
                (
                    nd.Flatten("proj_flat"),
                    nd.Dense("proj_out", rng.normal(0, 0.2, (3, 64)), np.zeros(3)),
                ),
            )
        ],
    }
    extra_bias = {"conv4": rng.normal(0, 0.1, 6)[:, None, None] * np.ones((6, 4, 4))}
    return with_shortcuts(chain, shortcuts, extra_bias), x
