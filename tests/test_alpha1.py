"""alpha1 conversion exact by construction: no neuron fires before its window opens.

The converter bounds every alpha1 neuron's membrane over its input window by the
bound b + W+ r of its pre-activation over the calibrated range r of its inputs and
makes the window at least that bound (neurodeploy/convert.py, "alpha1" in the module
docstring). These tests draw deep random networks with weights scaled over six
decades and check exactness on calibration data and on held-out inputs inside the
calibrated range, with no early spike, and that early spikes and saturation are
counted apart when the condition is broken on purpose.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import cifar_vgg, random_inputs, random_network

import neurodeploy as nd
from neurodeploy import ops
from neurodeploy.ttfs import SpikingLayer, alpha1_threshold, apply_synapses

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


def in_calibrated_range(snn, calibrated: nd.Trace, trace: nd.Trace, zeta: float) -> np.ndarray:
    """(N,) samples of ``trace`` whose values at every stage stay within (1 + zeta) times
    the calibration's largest value of their channel (the range the converter guarantees;
    checked stage by stage, values up to the first stage outside it are exact)."""
    inside = np.ones(trace.num_samples, dtype=bool)
    for stage in snn.stages[:-1]:
        ref = stage.decode(calibrated.spike_times[stage.name])
        axes = (0, *range(2, ref.ndim))
        limit = (1.0 + zeta) * ref.max(axis=axes)
        values = stage.decode(trace.spike_times[stage.name])
        limit = limit.reshape((1, -1) + (1,) * (values.ndim - 2))
        inside &= np.all((values <= limit).reshape(len(values), -1), axis=1)
    return inside


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
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
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
    calibrated = assert_exact_in_window(alpha1, net, x)
    # The guarantee covers every input in the calibrated range, not only the calibration
    # samples: held-out inputs whose values stay within it are exact, none fires early.
    held_out = random_inputs(net, 24, seed + 7)
    inside = in_calibrated_range(alpha1, calibrated, nd.simulate(alpha1, held_out), zeta)
    if zeta > 0:
        assert inside.any()
    if inside.any():
        trace = assert_exact_in_window(alpha1, net, held_out[inside])
        assert trace.early == 0


@pytest.mark.parametrize("zeta", [0.0, 0.5])
def test_alpha1_windows_cover_the_bound_of_every_neuron_over_the_calibrated_range(zeta):
    net = scaled_network(7, 3, 3)
    x = random_inputs(net, 8, 7)
    snn = nd.convert(net, calibration=x, zeta=zeta, neuron="alpha1")
    trace = nd.simulate(snn, x)
    box = np.ones(net.input_shape)  # the input range [p, q], rescaled
    value_range = box
    for stage in snn.stages[:-1]:
        if isinstance(stage, SpikingLayer):
            *linear, affine = stage.synapses
            positive = (*linear, replace(affine, weight=np.maximum(affine.weight, 0.0)))
            # The early-spike condition: b_i + sum_j W+_ij r_j <= B_n for every neuron.
            bound = stage.bias + apply_synapses(positive, value_range[None])[0]
            assert bound.max() <= stage.window * (1 + 1e-12)
            assert stage.window >= stage.x_max
            box = np.maximum(stage.bias + apply_synapses(positive, box[None])[0], 0.0)
        else:
            sign = stage.sign[:, None, None]
            box = sign * ops.maxpool2d((box * sign)[None], stage.kernel, stage.stride,
                                       stage.padding)[0]
        # r: the box bound capped by (1 + zeta) x each channel's calibrated maximum.
        values = stage.decode(trace.spike_times[stage.name])
        channel_max = values.max(axis=(0, *range(2, values.ndim)))
        calibrated = (1.0 + zeta) * channel_max.reshape(-1, *(1,) * (box.ndim - 1))
        value_range = np.minimum(box, calibrated)


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
        # The membrane integrates from t0 (inputs that came earlier have integrated since).
        kinks = np.unique(np.concatenate([[t0], np.clip(t_s[np.isfinite(t_s)], t0, t1), [t1]]))
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
    snn = nd.convert(net, calibration=x, zeta=0.0, neuron="alpha1")
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


def test_a_membrane_that_crosses_while_inputs_arrive_counts_as_early():
    # Hand-set synapses that break the no-early-spike condition (sum W+ = 6 > B):
    # W = (3, -6, 3), g = 1/(1 - 0) = 1, alpha = 1, input window [0, 1], B = 1.
    # x = (1, 0.4, 0): V = 4t up to t = 0.6 (V = 2.4), then slope -2; theta = 2 is
    # crossed at t = 0.5 although V(1) = 1.6 < theta (u = 0.6 fits the window): early.
    # x = (1, 0, 1): V = 7t crosses at 2/7, u = 6 > B: saturated. x = (0.2, 0.2, 0.2):
    # u = 0, fires at t_max.
    weight = np.array([[3.0, -6.0, 3.0]])
    layers = (
        nd.Dense("h", weight, np.zeros(1)),
        nd.ReLU("r"),
        nd.Dense("out", np.ones((2, 1)), np.zeros(2)),
    )
    net = nd.Network("early", (3,), (0.0, 1.0), layers)
    x = np.array([[1.0, 0.4, 0.0], [1.0, 0.0, 1.0], [0.2, 0.2, 0.2]])
    snn = nd.convert(net, calibration=x, neuron="alpha1")
    stage = snn.stage("h")
    g = np.ones(1)
    hand = replace(
        stage,
        synapses=(nd.Dense("h", weight, np.zeros(1)),),
        bias=np.zeros(1),
        coupling_scale=g,
        t_max=stage.t_min + 1.0,
        threshold=alpha1_threshold(g, np.zeros(1), 1.0, stage.t_min_prev, stage.t_min,
                                   stage.t_min + 1.0),
    )
    assert hand.threshold[0] == 2.0
    snn = replace(snn, stages=(hand, replace(snn.output, t_read=hand.t_max)))
    trace = nd.simulate(snn, x)
    np.testing.assert_allclose(trace.spike_times["h"][:, 0], [0.5, 2.0 / 7.0, 2.0], atol=1e-12)
    assert trace.early_per_layer["h"] == 1 and trace.saturated_per_layer["h"] == 1
    expected, saturated, early = brute_force_alpha1(hand, trace.spike_times["input"])
    np.testing.assert_allclose(trace.spike_times["h"], expected, atol=1e-12)
    assert (saturated, early) == (1, 1)


def test_cifar_sized_vgg_converts_with_alpha1_in_little_memory_and_simulates_exactly():
    # 3x32x32, six 3x3 convs (64, 64, 128, 128, 256, 256) with BN, three max pools. The
    # old converter pushed an identity through each conv: a 65536 x 65536 float64 array
    # (32 GiB) for the first one. Now every map stays a convolution.
    net = cifar_vgg(0)
    rng = np.random.default_rng(1)
    calibration = rng.uniform(0.0, 1.0, (16, 3, 32, 32))
    x = rng.uniform(0.0, 1.0, (8, 3, 32, 32))
    tracemalloc.start()
    try:
        snn = nd.convert(net, calibration=np.concatenate([calibration, x]), neuron="alpha1")
        trace = nd.simulate(snn, x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**30
    assert peak < 2**30  # measured 0.15 GiB: the layers' own activations, not their squares
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    assert trace.saturated == 0 and trace.early == 0
    for stage in snn.spiking_layers:
        assert stage.coupling_scale.shape == stage.output_shape
        t = trace.spike_times[stage.name]
        assert np.all((t >= stage.t_min) & (t <= stage.t_max))
