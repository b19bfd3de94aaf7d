"""Exactness of the ReLU -> TTFS conversion on seeded random networks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import random_inputs, random_network, random_residual_network

import neurodeploy as nd
from neurodeploy.ttfs import SpikingLayer, TimePool

# Decoded SNN values must equal the ReLU network to floating-point precision.
RELATIVE_TOLERANCE = 1e-9


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|: the error relative to the logits' scale."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def relu_name_after(net: nd.Network, affine_name: str) -> str:
    names = [layer.name for layer in net.layers]
    for layer in net.layers[names.index(affine_name) :]:
        if isinstance(layer, nd.ReLU):
            return layer.name
    raise AssertionError(affine_name)


def check_exact(net: nd.Network, x: np.ndarray, neuron: str) -> nd.Trace:
    snn = nd.convert(net, calibration=x, neuron=neuron)
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    acts = net.activations(x)
    hidden = snn.spiking_layers
    assert len(hidden) >= 5
    for stage in snn.stages[:-1]:
        t = trace.spike_times[stage.name]
        assert t.shape == (len(x), *stage.output_shape)
        fired = np.isfinite(t)
        # At most one spike per neuron, inside the stage's own window.
        assert np.all((t[fired] >= stage.t_min) & (t[fired] <= stage.t_max))
        if isinstance(stage, SpikingLayer):
            # The network is not trivially silent: every hidden layer carries values.
            assert fired.mean() > 0.05 and np.any(t[fired] < stage.t_max)
            if neuron == "alpha1":
                assert fired.all()  # the exact-mapping neuron always spikes, zeros at t_max
            else:
                expected = acts[relu_name_after(net, stage.name)]
                got = stage.decode(t)
                assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * expected.max()
                assert not np.any(fired & (expected == 0))  # b1: zeros never spike
    return trace


SEEDS = list(range(12))


@pytest.mark.parametrize("neuron", ["b1", "alpha1"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_networks_convert_exactly(seed, neuron):
    net = random_network(seed)
    x = random_inputs(net, 32, seed)
    check_exact(net, x, neuron)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_residual_networks_convert_exactly(seed):
    net = random_residual_network(seed, blocks=2 + seed % 2)
    x = random_inputs(net, 32, seed)
    check_exact(net, x, "b1")


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(1000, 10**6),
    hidden_conv=st.integers(2, 4),
    hidden_dense=st.integers(3, 4),
    neuron=st.sampled_from(["b1", "alpha1"]),
)
def test_property_exact_on_any_seeded_network(seed, hidden_conv, hidden_dense, neuron):
    net = random_network(seed, hidden_conv=hidden_conv, hidden_dense=hidden_dense)
    check_exact(net, random_inputs(net, 16, seed), neuron)


@settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(seed=st.integers(1000, 10**6), blocks=st.integers(2, 4))
def test_property_exact_on_any_seeded_residual_network(seed, blocks):
    net = random_residual_network(seed, blocks=blocks)
    check_exact(net, random_inputs(net, 16, seed), "b1")


def test_negative_batchnorm_scale_before_maxpool_becomes_min_pool():
    rng = np.random.default_rng(3)
    layers = (
        nd.Conv2d("c", rng.normal(0, 0.5, (2, 1, 3, 3)), np.zeros(2), padding=1),
        nd.ReLU("r"),
        nd.BatchNorm("bn", np.array([-1.0, 2.0]), np.zeros(2), np.zeros(2), np.ones(2)),
        nd.MaxPool2d("p", 2, 2),
        nd.Flatten("f"),
        nd.Dense("out", rng.normal(0, 0.5, (3, 2 * 2 * 2)), np.zeros(3)),
    )
    net = nd.Network("neg", (1, 4, 4), (0.0, 1.0), layers)
    x = rng.uniform(0, 1, (20, 1, 4, 4))
    snn = nd.convert(net, calibration=x)
    pool = snn.stage("p")
    assert isinstance(pool, TimePool)
    np.testing.assert_array_equal(pool.sign, [-1.0, 1.0])
    assert relative_error(nd.simulate(snn, x).output, net.forward(x)) <= RELATIVE_TOLERANCE


def test_input_range_and_padding_give_border_neurons_their_own_bias():
    w = np.ones((1, 1, 3, 3))
    layers = (
        nd.Conv2d("c", w, np.zeros(1), padding=1),
        nd.ReLU("r"),
        nd.Flatten("f"),
        nd.Dense("out", np.ones((2, 16)), np.zeros(2)),
    )
    net = nd.Network("pad", (1, 4, 4), (2.0, 4.0), layers)
    snn = nd.convert(net, calibration=np.full((1, 1, 4, 4), 3.0))
    bias = snn.stage("c").bias[0]
    # x = 2 x' + 2: every in-bounds tap adds 2 -> corners 4 taps, edges 6, inside 9.
    assert bias[0, 0] == 8.0 and bias[0, 1] == 12.0 and bias[1, 1] == 18.0


def test_alpha1_weight_sums_are_rescaled_into_the_papers_bounds():
    net = random_network(5)
    snn = nd.convert(net, calibration=random_inputs(net, 16, 5), neuron="alpha1")
    for layer in snn.spiking_layers:
        w_sum = 1.0 - layer.alpha / layer.coupling_scale  # g = alpha / (1 - sum W)
        assert w_sum.max() <= 0.99 + 1e-12 and w_sum.min() >= -10 - 1e-9


def test_windows_follow_calibration_and_zeta():
    net = random_network(2)
    x = random_inputs(net, 32, 2)
    a = nd.convert(net, calibration=x, zeta=0.5)
    b = nd.convert(net, calibration=x, zeta=1.0)
    relu = net.activations(x)
    for la, lb in zip(a.spiking_layers, b.spiking_layers, strict=True):
        x_n = relu[relu_name_after(net, la.name)].max()
        assert la.x_max == pytest.approx(x_n)
        assert la.window == pytest.approx(1.5 * x_n) and lb.window == pytest.approx(2.0 * x_n)
        assert la.t_min_prev < la.t_min < la.t_max
    assert a.latency == pytest.approx(1 + sum(layer.window for layer in a.spiking_layers))
    assert b.latency > a.latency


def test_saturation_is_counted_not_silent():
    net = random_network(4)
    x = random_inputs(net, 32, 4)
    snn = nd.convert(net, calibration=x[:2], zeta=0.0)
    trace = nd.simulate(snn, x)
    assert trace.saturated > 0
    assert sum(trace.saturated_per_layer.values()) == trace.saturated


def test_inputs_outside_the_declared_range_are_counted():
    net = random_network(1)
    x = random_inputs(net, 4, 1)
    snn = nd.convert(net, calibration=x)
    x[0, 0, 0, 0] = 10.0
    assert nd.simulate(snn, x).saturated_per_layer["input"] == 1


def test_hidden_layer_without_relu_is_refused():
    layers = (
        nd.Dense("a", np.ones((3, 2)), np.zeros(3)),
        nd.Dense("b", np.ones((2, 3)), np.zeros(2)),
    )
    net = nd.Network("lin", (2,), (0.0, 1.0), layers)
    with pytest.raises(nd.ConversionError, match="'b'.*'a'"):
        nd.convert(net, calibration=np.zeros((1, 2)))


@pytest.mark.parametrize(
    "calibration, error",
    [
        (np.zeros((0, 2, 10, 10)), nd.ConversionError),
        (np.zeros((4, 3, 10, 10)), nd.DataError),
        (np.full((4, 2, 10, 10), np.nan), nd.DataError),
    ],
)
def test_bad_calibration_data_is_refused(calibration, error):
    with pytest.raises(error, match="calibration"):
        nd.convert(random_network(0), calibration=calibration)


def test_bad_arguments_are_refused():
    net = random_network(0)
    x = random_inputs(net, 2, 0)
    with pytest.raises(nd.UsageError, match="neuron"):
        nd.convert(net, calibration=x, neuron="lif")
    with pytest.raises(nd.UsageError, match="zeta"):
        nd.convert(net, calibration=x, zeta=-1)


def test_simulation_reads_no_relu_forward(monkeypatch):
    """The simulator derives spike times from the neuron dynamics, not net.forward."""
    net = random_network(3)
    x = random_inputs(net, 8, 3)
    snn = nd.convert(net, calibration=x)
    expected = net.forward(x)

    def forbidden(*args, **kwargs):
        raise AssertionError("simulate called the ReLU forward pass")

    monkeypatch.setattr(nd.Network, "forward", forbidden)
    monkeypatch.setattr(nd.Network, "activations", forbidden)
    assert relative_error(nd.simulate(snn, x).output, expected) <= RELATIVE_TOLERANCE


def test_seed_grid_covers_every_layer_kind_and_batchnorm_placement():
    kinds = set()
    for seed in SEEDS:
        net = random_network(seed)
        layers = net.layers
        for i, layer in enumerate(layers):
            kinds.add(layer.type)
            if isinstance(layer, nd.Conv2d):
                kinds.add(f"stride{layer.stride}")
                kinds.add(f"padding{layer.padding}")
            if isinstance(layer, nd.BatchNorm):
                before = isinstance(layers[i + 1], nd.ReLU)
                kinds.add("bn_before_relu" if before else "bn_after_relu")
                if not before and np.any(layer.gamma < 0):
                    kinds.add("bn_negative_scale")
    expected = {
        "dense",
        "conv2d",
        "batchnorm",
        "relu",
        "maxpool2d",
        "avgpool2d",
        "flatten",
        "stride1",
        "stride2",
        "padding0",
        "padding1",
        "bn_before_relu",
        "bn_after_relu",
        "bn_negative_scale",
    }
    assert expected <= kinds


def test_residual_seed_grid_covers_every_block_shape_and_placement():
    kinds = set()
    for seed in SEEDS:
        net = random_residual_network(seed, blocks=2 + seed % 2)
        names = [layer.name for layer in net.layers]
        for layer, srcs in zip(net.layers, net.sources, strict=True):
            if isinstance(layer, nd.Add):
                kinds.add("input_shortcut" if "input" in srcs else "add")
                prefix = layer.name.rsplit("_", 1)[0]
                projection = f"{prefix}_proj" in names
                kinds.add("projection" if projection else "identity")
                kinds.add("bottleneck" if f"{prefix}_conv2" in names else "basic")
                kinds.add("bn_on_sum" if f"{prefix}_sumbn" in names else "add_then_relu")
                if projection and names.index(f"{prefix}_proj") < names.index(f"{prefix}_conv0"):
                    kinds.add("shortcut_listed_first")
                if layer.name == "fc_add":
                    kinds.add("dense_identity")
            if isinstance(layer, nd.BatchNorm) and layer.name.endswith("_postbn"):
                kinds.add("bn_after_block_relu")
                if layer.name == "stem_postbn" and np.any(layer.gamma < 0):
                    kinds.add("negative_bn_before_maxpool")
    expected = {
        "add",
        "input_shortcut",
        "projection",
        "identity",
        "bottleneck",
        "basic",
        "bn_on_sum",
        "add_then_relu",
        "shortcut_listed_first",
        "dense_identity",
        "bn_after_block_relu",
        "negative_bn_before_maxpool",
    }
    assert expected <= kinds, expected - kinds
