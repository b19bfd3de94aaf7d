"""alpha1 conversion exact by construction: no neuron fires before its window opens.

The converter bounds every alpha1 neuron's membrane over its input window by the
interval bound of its pre-activation over the whole input range [p, q] and makes
the window at least that bound (neurodeploy/convert.py, "alpha1" in the module
docstring). These tests draw deep random networks with weights scaled over six
decades and check exactness on calibration data and on adversarial inputs the
calibration never saw (corners of the input box), with no early spike.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import random_inputs, random_network

import neurodeploy as nd
from neurodeploy import ops
from neurodeploy.ttfs import SpikingLayer, apply_synapses

# Decoded SNN values must equal the ReLU network to floating-point precision.
RELATIVE_TOLERANCE = 1e-9


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|: the error relative to the logits' scale."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def scaled_network(seed: int, hidden_conv: int, hidden_dense: int) -> nd.Network:
    """A random deep net (netgen, grouped convs and padded pools, no clips: alpha1 refuses
    them) whose dense/conv layers are each scaled by 10^u, u uniform in [-3, 3]."""
    net = random_network(seed, hidden_conv=hidden_conv, hidden_dense=hidden_dense, modern=True)
    rng = np.random.default_rng(seed + 1)
    layers = []
    for layer in net.layers:
        if isinstance(layer, nd.ReLU):
            layer = replace(layer, clip=None)
        elif isinstance(layer, (nd.Dense, nd.Conv2d)):
            scale = 10.0 ** rng.uniform(-3.0, 3.0)
            layer = replace(layer, weight=layer.weight * scale, bias=layer.bias * scale)
        layers.append(layer)
    return replace(net, layers=tuple(layers))


def box_corners(net: nd.Network, n: int, seed: int) -> np.ndarray:
    """Inputs at the corners of [p, q]^d: every pixel p or q (never seen in calibration)."""
    p, q = net.input_range
    rng = np.random.default_rng(seed)
    return np.where(rng.random((n, *net.input_shape)) < 0.5, p, q)


def assert_exact_in_window(snn, net: nd.Network, x: np.ndarray) -> nd.Trace:
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    for stage in snn.spiking_layers:
        t = trace.spike_times[stage.name]
        fired = np.isfinite(t)
        # No spike before the window opens (early or saturated), none after it closes.
        assert np.all((t[fired] >= stage.t_min) & (t[fired] <= stage.t_max)), stage.name
    return trace


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 10**6),
    hidden_conv=st.integers(1, 4),
    hidden_dense=st.integers(1, 5),
    zeta=st.sampled_from([0.0, 0.5]),
)
def test_property_alpha1_and_b1_exact_on_deep_scaled_networks(
    seed, hidden_conv, hidden_dense, zeta
):
    net = scaled_network(seed, hidden_conv, hidden_dense)
    x = random_inputs(net, 12, seed)
    b1 = nd.convert(net, calibration=x, zeta=zeta, neuron="b1")
    assert_exact_in_window(b1, net, x)
    alpha1 = nd.convert(net, calibration=x, zeta=zeta, neuron="alpha1")
    assert_exact_in_window(alpha1, net, x)
    # alpha1's guarantee covers the whole input range, not only the calibration set.
    assert_exact_in_window(alpha1, net, box_corners(net, 12, seed))


def test_alpha1_windows_cover_the_interval_bound_of_every_neuron():
    net = scaled_network(7, 3, 3)
    snn = nd.convert(net, calibration=random_inputs(net, 8, 7), zeta=0.0, neuron="alpha1")
    reach = np.ones(net.input_shape)
    for stage in snn.stages[:-1]:
        if not isinstance(stage, SpikingLayer):
            sign = stage.sign[:, None, None]
            pooled = ops.maxpool2d((reach * sign)[None], stage.kernel, stage.stride, stage.padding)
            reach = sign * pooled[0]
            continue
        *linear, affine = stage.synapses
        positive = (*linear, replace(affine, weight=np.maximum(affine.weight, 0.0)))
        bound = np.maximum(stage.bias + apply_synapses(positive, reach[None])[0], 0.0)
        # The early-spike condition: b_i + sum_j W+_ij R_j <= B_n for every neuron.
        assert bound.max() <= stage.window * (1 + 1e-12)
        assert stage.window >= stage.x_max
        reach = bound
