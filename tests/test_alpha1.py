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


def dense_map(stage: SpikingLayer) -> np.ndarray:
    """The stage's synapses as a dense (N_out, N_in) matrix (small test nets only)."""
    n_in = int(np.prod(stage.input_shape))
    eye = np.eye(n_in).reshape(n_in, *stage.input_shape)
    return apply_synapses(stage.synapses, eye).reshape(n_in, -1).T


def brute_force_alpha1(stage: SpikingLayer, t_in: np.ndarray):
    """alpha1 spike times, saturated and early counts by evaluating the membrane
    V(t) = alpha (t - t0) + sum_j g_i W_ij (t - t_j)_+ at every kink (input time) and
    solving each linear segment, written independently of the simulator (dense maps)."""
    w = dense_map(stage)
    g = stage.alpha / (1.0 - w.sum(axis=1))  # J = g_i W_ij
    coupling = g[:, None] * w
    theta = stage.threshold.reshape(-1)
    t0, t1 = stage.t_min_prev, stage.t_min
    n = t_in.shape[0]
    out = np.full((n, w.shape[0]), stage.t_max)
    saturated = early = 0
    for s in range(n):
        t_s = t_in[s].reshape(-1)
        kinks = np.unique(np.concatenate([[t0], t_s[np.isfinite(t_s)], [t1]]))
        kinks = np.concatenate([kinks, [stage.t_max]])
        ramp = np.maximum(kinks[:, None] - t_s[None, :], 0.0)  # (K, N_in)
        v = stage.alpha * (kinks[:, None] - t0) + ramp @ coupling.T  # (K, N_out)
        for i in range(w.shape[0]):
            above = np.nonzero(v[:, i] >= theta[i])[0]
            if above.size:
                k = above[0]
                if k == 0:
                    out[s, i] = kinks[0]
                else:  # linear on [kinks[k-1], kinks[k]]
                    a, b = v[k - 1, i], v[k, i]
                    out[s, i] = kinks[k - 1] + (theta[i] - a) / (b - a) * (kinks[k] - kinks[k - 1])
            v_end = v[np.searchsorted(kinks, t1), i]
            if out[s, i] < t1:
                if v_end > theta[i]:
                    saturated += 1
                else:
                    early += 1
    return out.reshape(n, *stage.output_shape), saturated, early


def test_alpha1_simulator_matches_an_independent_membrane_integration():
    net = scaled_network(11, 2, 2)
    x = np.concatenate([random_inputs(net, 6, 11), box_corners(net, 6, 11)])
    snn = nd.convert(net, calibration=x[:6], zeta=0.0, neuron="alpha1")
    trace = nd.simulate(snn, x)
    for stage in snn.spiking_layers:
        index = snn.stages.index(stage)
        before = "input" if index == 0 else snn.stages[index - 1].name
        expected, saturated, early = brute_force_alpha1(stage, trace.spike_times[before])
        np.testing.assert_allclose(trace.spike_times[stage.name], expected, rtol=0, atol=1e-9)
        assert (saturated, early) == (0, 0)
        assert trace.early_per_layer[stage.name] == 0


def test_early_spikes_are_counted_apart_from_saturation():
    # The last hidden window cut to a tenth of its bound: the no-early-spike condition
    # fails there, and the simulator must say which spikes came early (value in the
    # window) and which saturated (value beyond it), as an independent integration does.
    # (Earlier layers stay exact, so every input of the cut layer arrives in its window.)
    net = scaled_network(11, 1, 2)
    x = np.concatenate([random_inputs(net, 8, 11), box_corners(net, 8, 11)])
    snn = nd.convert(net, calibration=x, zeta=0.0, neuron="alpha1")
    last = snn.spiking_layers[-1]
    snn = nd.retime(snn, {last.name: 0.1 * last.window})
    trace = nd.simulate(snn, x)
    total_early = 0
    for stage in snn.spiking_layers:
        index = snn.stages.index(stage)
        before = "input" if index == 0 else snn.stages[index - 1].name
        expected, saturated, early = brute_force_alpha1(stage, trace.spike_times[before])
        np.testing.assert_allclose(trace.spike_times[stage.name], expected, rtol=0, atol=1e-9)
        assert trace.saturated_per_layer[stage.name] == saturated
        assert trace.early_per_layer[stage.name] == early
        total_early += early
    assert trace.saturated > 0
    assert trace.early == total_early


def test_b1_counts_no_early_spikes_on_every_backend_trace():
    net = scaled_network(5, 2, 2)
    x = random_inputs(net, 8, 5)
    snn = nd.convert(net, calibration=x[:2], zeta=0.0)
    trace = nd.simulate(snn, x)
    assert trace.saturated > 0  # too small a calibration set: values beyond the window
    assert set(trace.early_per_layer) == {"input", *(s.name for s in snn.spiking_layers)}
    assert trace.early == 0
