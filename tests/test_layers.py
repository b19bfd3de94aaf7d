"""Grouped and depthwise convolutions, clipped ReLUs and padded pools, through the whole
stack: exact conversion, every backend, the cross-check, gradients and fine-tuning."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from netgen import random_inputs, random_network
from test_conversion import RELATIVE_TOLERANCE, check_exact, relative_error
from test_crossbar import CLEAN
from test_emulator import _naive_chip, assert_same_spikes

import neurodeploy as nd
from neurodeploy import ops
from neurodeploy.backends.common import fold_average_pools
from neurodeploy.convert import snn_to_network
from neurodeploy.finetune import _cross_entropy, finetune, loss_and_gradients
from neurodeploy.ttfs import TimePool, apply_synapses

# Ideal hardware reproduces the reference up to float64 summation order.
IDEAL_TOLERANCE = 1e-12
SEEDS = list(range(10))


def _without_clips(net: nd.Network) -> nd.Network:
    layers = tuple(
        replace(layer, clip=None) if isinstance(layer, nd.ReLU) else layer for layer in net.layers
    )
    return replace(net, layers=layers)


def _bn(name: str, rng: np.random.Generator, channels: int, negative: bool = True):
    sign = rng.choice([-1.0, 1.0], channels) if negative else np.ones(channels)
    return nd.BatchNorm(
        name,
        gamma=rng.uniform(0.5, 2.0, channels) * sign,
        beta=rng.normal(0.3, 0.3, channels),
        mean=rng.normal(0, 0.3, channels),
        var=rng.uniform(0.5, 2.0, channels),
    )


def kitchen_sink(seed: int = 0) -> nd.Network:
    """Every new construct once: a padded max pool that becomes a min pool (negative
    batch norm after the ReLU), a depthwise conv with channel multiplier fed per-channel
    scales, a clipped ReLU that bites, a padded average pool counting its padding, a
    two-group conv, and a count_include_pad=False pool in front of the dense layers."""
    rng = np.random.default_rng(seed)
    he = lambda fan_in, shape: rng.normal(0, np.sqrt(2.0 / fan_in), shape)  # noqa: E731
    layers = (
        nd.Conv2d("c0", he(18, (4, 2, 3, 3)), rng.normal(0, 0.1, 4), padding=1),
        nd.ReLU("r0"),
        _bn("bn0", rng, 4),
        nd.MaxPool2d("p0", 3, 2, padding=1),
        nd.Conv2d("dw1", he(9, (8, 1, 3, 3)), rng.normal(0, 0.1, 8), padding=1, groups=4),
        _bn("bn1", rng, 8, negative=False),
        nd.ReLU("r1", clip=0.8),
        nd.AvgPool2d("p1", 3, 1, padding=1),
        _bn("bn1b", rng, 8),
        nd.Conv2d("g2", he(36, (6, 4, 3, 3)), rng.normal(0, 0.1, 6), padding=1, groups=2),
        nd.ReLU("r2"),
        nd.AvgPool2d("p2", 3, 2, padding=1, count_include_pad=False),
        nd.Flatten("f"),
        nd.Dense("fc", he(54, (12, 54)), rng.normal(0, 0.1, 12)),
        nd.ReLU("r3", clip=0.4),
        nd.Dense("out", he(12, (4, 12)), rng.normal(0, 0.1, 4)),
    )
    return nd.Network("sink", (2, 10, 10), (-1.0, 3.0), layers)


def mobilenet_like(seed: int = 0) -> nd.Network:
    """A MobileNet-style net at 16x16: a 3x3 stem, then depthwise 3x3 + pointwise 1x1
    blocks, every conv with batch norm and ReLU6, global average pooling, a classifier.
    Batch-norm gains are large enough that ReLU6 clips a visible share of values."""
    rng = np.random.default_rng(seed)
    layers: list = []

    def conv(name, c_in, c_out, k, stride, groups):
        fan_in = c_in // groups * k * k
        w = rng.normal(0, np.sqrt(2.0 / fan_in), (c_out, c_in // groups, k, k))
        layers.append(nd.Conv2d(name, w, np.zeros(c_out), stride, k // 2, groups=groups))
        layers.append(
            nd.BatchNorm(
                f"{name}_bn",
                gamma=rng.uniform(1.5, 4.0, c_out),
                beta=rng.normal(0.5, 0.5, c_out),
                mean=rng.normal(0, 0.2, c_out),
                var=rng.uniform(0.5, 1.5, c_out),
            )
        )
        layers.append(nd.ReLU(f"{name}_relu6", clip=6.0))

    conv("stem", 3, 8, 3, 2, 1)
    channels = 8
    for i, (c_out, stride) in enumerate(((16, 1), (24, 2), (24, 1))):
        conv(f"dw{i}", channels, channels, 3, stride, channels)
        conv(f"pw{i}", channels, c_out, 1, 1, 1)
        channels = c_out
    layers.append(nd.AvgPool2d("gap", 4, 4))
    layers.append(nd.Flatten("flat"))
    w = rng.normal(0, np.sqrt(1.0 / channels), (5, channels))
    layers.append(nd.Dense("classifier", w, rng.normal(0, 0.1, 5)))
    return nd.Network("mobilenet_like", (3, 16, 16), (-1.0, 1.0), tuple(layers))


@pytest.fixture(scope="module")
def sink():
    net = kitchen_sink()
    x = random_inputs(net, 24, 0)
    return net, x, nd.convert(net, calibration=x)


@pytest.fixture(scope="module")
def mobile():
    net = mobilenet_like()
    x = random_inputs(net, 32, 1)
    return net, x, nd.convert(net, calibration=x)


# -- conversion ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_modern_random_networks_convert_exactly(seed):
    net = random_network(seed, modern=True)
    x = random_inputs(net, 32, seed)
    check_exact(net, x, "b1")
    check_exact(_without_clips(net), x, "alpha1")  # alpha1: groups and padded pools


@settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(1000, 10**6),
    hidden_conv=st.integers(2, 4),
    neuron=st.sampled_from(["b1", "alpha1"]),
)
def test_property_modern_networks_convert_exactly(seed, hidden_conv, neuron):
    net = random_network(seed, hidden_conv=hidden_conv, hidden_dense=3, modern=True)
    if neuron == "alpha1":
        net = _without_clips(net)
    x = random_inputs(net, 16, seed)
    acts = net.activations(x)
    # A random draw can leave a layer dead (a batch norm shifts it below zero): nothing
    # to convert there, and check_exact insists every layer carries values.
    assume(
        all(
            np.mean(acts[layer.name] > 0) > 0.05
            for layer in net.layers
            if isinstance(layer, nd.ReLU)
        )
    )
    check_exact(net, x, neuron)


def test_seed_grid_covers_every_new_construct():
    kinds = set()
    for seed in range(16):
        net = random_network(seed, modern=True)
        x = random_inputs(net, 32, seed)
        acts = net.activations(x)
        previous = None
        for layer in net.layers:
            if isinstance(layer, nd.Conv2d) and layer.groups > 1:
                depthwise = layer.weight.shape[1] == 1
                kinds.add("depthwise" if depthwise else "grouped")
                if layer.out_channels > layer.in_channels and depthwise:
                    kinds.add("channel_multiplier")
                if isinstance(previous, nd.BatchNorm):
                    kinds.add("per_channel_scale_into_groups")
            if isinstance(layer, nd.ReLU) and layer.clip is not None:
                if np.mean(acts[layer.name] == layer.clip) > 0.05:
                    kinds.add("clip_bites")
            if isinstance(layer, nd.MaxPool2d) and layer.padding:
                kinds.add("padded_max")
            if isinstance(layer, nd.AvgPool2d) and layer.padding:
                kinds.add(f"padded_avg_{'include' if layer.count_include_pad else 'exclude'}")
            previous = layer
    assert {
        "depthwise",
        "grouped",
        "channel_multiplier",
        "per_channel_scale_into_groups",
        "clip_bites",
        "padded_max",
        "padded_avg_include",
        "padded_avg_exclude",
    } <= kinds


@pytest.mark.parametrize("neuron", ["b1", "alpha1"])
def test_kitchen_sink_converts_exactly(neuron):
    net = kitchen_sink()
    if neuron == "alpha1":
        net = _without_clips(net)
    x = random_inputs(net, 32, 0)
    snn = nd.convert(net, calibration=x, neuron=neuron)
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    pool = snn.stage("p0")
    assert isinstance(pool, TimePool) and pool.padding == 1 and np.any(pool.sign < 0)


def test_per_input_channel_scales_reach_their_own_group():
    """relu -> batch norm with a different scale per channel -> grouped conv: each
    output channel's weights take the scales of its own group's input channels."""
    rng = np.random.default_rng(4)
    scale = np.array([0.5, 2.0, -1.0, 3.0, 1.5, -0.25])
    layers = (
        nd.Conv2d("c0", rng.normal(0, 0.5, (6, 1, 3, 3)), np.full(6, 0.2), padding=1),
        nd.ReLU("r0"),
        nd.BatchNorm("bn", scale, rng.normal(0, 0.3, 6), np.zeros(6), np.full(6, 1.0 - 1e-5)),
        nd.Conv2d("g", rng.normal(0, 0.5, (4, 3, 3, 3)), np.zeros(4), padding=1, groups=2),
        nd.ReLU("r1"),
        nd.Flatten("f"),
        nd.Dense("out", rng.normal(0, 0.3, (2, 4 * 5 * 5)), np.zeros(2)),
    )
    net = nd.Network("groups_scale", (1, 5, 5), (0.0, 1.0), layers)
    x = rng.uniform(0, 1, (16, 1, 5, 5))
    snn = nd.convert(net, calibration=x)
    assert relative_error(nd.simulate(snn, x).output, net.forward(x)) <= RELATIVE_TOLERANCE
    folded = snn.stage("g").synapses[-1].weight
    original = layers[3].weight
    # group 0 (outputs 0, 1) reads channels 0-2, group 1 (outputs 2, 3) channels 3-5
    np.testing.assert_allclose(folded[:2], original[:2] * scale[None, :3, None, None])
    np.testing.assert_allclose(folded[2:], original[2:] * scale[None, 3:, None, None])


def test_clipped_layer_window_is_its_clip_and_the_clip_is_not_saturation(sink):
    net, x, snn = sink
    acts = net.activations(x)
    trace = nd.simulate(snn, x)
    for stage_name, relu_name in (("dw1", "r1"), ("fc", "r3")):
        stage = snn.stage(stage_name)
        clip = net.layers[[layer.name for layer in net.layers].index(relu_name)].clip
        # no zeta margin; window = t_max - t_min rounds in the last bits of t_max
        assert stage.clipped and stage.window == pytest.approx(
            clip, rel=1e-14, abs=1e-14 * stage.t_max
        )
        at_clip = acts[relu_name] == clip
        assert at_clip.mean() > 0.02  # the clip bites
        decoded = stage.decode(trace.spike_times[stage_name])
        np.testing.assert_allclose(decoded[at_clip], clip, rtol=0, atol=1e-12)
        assert np.abs(decoded - acts[relu_name]).max() <= RELATIVE_TOLERANCE * clip
        assert trace.saturated_per_layer[stage_name] == 0
    assert not snn.stage("c0").clipped


def test_unclipped_layers_still_count_saturation_beside_clipped_ones():
    net = kitchen_sink()
    x = random_inputs(net, 64, 0)
    snn = nd.convert(net, calibration=x[:2], zeta=0.0)  # too little data for the windows
    trace = nd.simulate(snn, x)
    assert trace.saturated_per_layer["c0"] > 0 or trace.saturated_per_layer["g2"] > 0
    assert trace.saturated_per_layer["dw1"] == 0 and trace.saturated_per_layer["fc"] == 0
    assert relative_error(trace.output, net.forward(x)) > RELATIVE_TOLERANCE


def test_stored_window_must_agree_with_the_clip():
    net = kitchen_sink()
    x = random_inputs(net, 8, 0)
    names = [layer.name for layer in net.layers]
    i = names.index("r1")
    agreeing = replace(
        net, layers=net.layers[:i] + (nd.ReLU("r1", window=0.8, clip=0.8),) + net.layers[i + 1 :]
    )
    assert nd.convert(agreeing, calibration=x).stage("dw1").window == pytest.approx(0.8, rel=1e-13)
    conflicting = replace(
        net, layers=net.layers[:i] + (nd.ReLU("r1", window=2.0, clip=0.8),) + net.layers[i + 1 :]
    )
    with pytest.raises(nd.ConversionError, match="'r1'.*window 2 conflicts with clip 0.8"):
        nd.convert(conflicting, calibration=x)


def test_alpha1_refuses_clipped_relus_naming_the_layer():
    net = kitchen_sink()
    with pytest.raises(nd.ConversionError, match="layer 'r1'.*b1 neuron only"):
        nd.convert(net, calibration=random_inputs(net, 4, 0), neuron="alpha1")


def test_snn_maps_back_to_a_network_with_clips_and_padded_pools(sink):
    net, x, snn = sink
    back = snn_to_network(snn)
    assert relative_error(back.forward(x), net.forward(x)) <= RELATIVE_TOLERANCE
    clips = [layer.clip for layer in back.layers if isinstance(layer, nd.ReLU)]
    assert clips == [None, pytest.approx(0.8, rel=1e-13), None, pytest.approx(0.4, rel=1e-13)]
    pools = [layer for layer in back.layers if isinstance(layer, nd.MaxPool2d)]
    assert [p.padding for p in pools] == [1]
    again = nd.convert(back, calibration=x)
    assert relative_error(nd.simulate(again, x).output, net.forward(x)) <= RELATIVE_TOLERANCE


def test_model_format_round_trip_converts_the_same(sink, tmp_path):
    net, x, snn = sink
    loaded = nd.load_model(nd.save_model(net, tmp_path / "sink"))
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))
    np.testing.assert_array_equal(
        nd.simulate(nd.convert(loaded, calibration=x), x).output, nd.simulate(snn, x).output
    )


def test_mobilenet_like_net_converts_exactly(mobile):
    net, x, snn = mobile
    acts = net.activations(x)
    clipped = [
        np.mean(acts[layer.name] == 6.0) for layer in net.layers if isinstance(layer, nd.ReLU)
    ]
    assert max(clipped) > 0.05  # ReLU6 does clip
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    assert all(stage.window == pytest.approx(6.0, rel=1e-13) for stage in snn.spiking_layers)


# -- ops ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "c_in, c_out, groups, kernel, stride, padding",
    [
        (4, 6, 2, 3, 1, 1),
        (6, 6, 6, 3, 2, 1),
        (3, 6, 3, 3, 1, 0),
        (4, 8, 4, 2, 2, 0),
        (8, 4, 4, 1, 1, 0),
    ],
)
@pytest.mark.parametrize("batch, size", [(3, 7), (8, 24)])  # batched product / loop
def test_grouped_conv_equals_one_conv_per_group(
    c_in, c_out, groups, kernel, stride, padding, batch, size
):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, c_in, size, size))
    w = rng.normal(size=(c_out, c_in // groups, kernel, kernel))
    ci, co = c_in // groups, c_out // groups
    expected = np.concatenate(
        [
            ops.conv2d(x[:, g * ci : (g + 1) * ci], w[g * co : (g + 1) * co], stride, padding)
            for g in range(groups)
        ],
        axis=1,
    )
    np.testing.assert_allclose(
        ops.conv2d(x, w, stride, padding, groups), expected, rtol=0, atol=1e-12
    )


def _numeric_vjp(f, x: np.ndarray, grad: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d <grad, f(x)> / dx by central differences, element by element."""
    out = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[index] += eps
        xm[index] -= eps
        out[index] = np.sum(grad * (f(xp) - f(xm))) / (2 * eps)
    return out


@pytest.mark.parametrize(
    "groups, c_out, stride, padding", [(2, 4, 1, 1), (4, 4, 2, 1), (4, 8, 1, 0)]
)
def test_grouped_conv_gradients_equal_finite_differences(groups, c_out, stride, padding):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 5, 5))
    w = rng.normal(size=(c_out, 4 // groups, 3, 3))
    out = ops.conv2d(x, w, stride, padding, groups)
    grad = rng.normal(size=out.shape)
    dx = ops.conv2d_grad_input(grad, w, x.shape[1:], stride, padding, groups)
    dw = ops.conv2d_grad_weight(x, grad, 3, stride, padding, groups)
    assert dw.shape == w.shape
    numeric_dx = _numeric_vjp(lambda v: ops.conv2d(v, w, stride, padding, groups), x, grad)
    numeric_dw = _numeric_vjp(lambda v: ops.conv2d(x, v, stride, padding, groups), w, grad)
    np.testing.assert_allclose(dx, numeric_dx, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numeric_dw, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("include", [True, False])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (3, 1, 1), (2, 2, 1)])
def test_padded_pool_gradients_equal_finite_differences(include, kernel, stride, padding):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 2, 5, 5))  # distinct values: the max is unique
    avg = lambda v: ops.avgpool2d(v, kernel, stride, padding, include)  # noqa: E731
    grad = rng.normal(size=avg(x).shape)
    got = ops.avgpool2d_grad_input(grad, x.shape[1:], kernel, stride, padding, include)
    np.testing.assert_allclose(got, _numeric_vjp(avg, x, grad), rtol=1e-6, atol=1e-8)
    mx = lambda v: ops.maxpool2d(v, kernel, stride, padding)  # noqa: E731
    got = ops.maxpool2d_grad_input(x, grad, kernel, stride, padding)
    np.testing.assert_allclose(got, _numeric_vjp(mx, x, grad), rtol=1e-6, atol=1e-8)


def test_sum_pools_and_folded_divisors_compute_the_average_pools_exactly(sink):
    _, _, snn = sink
    pools = 0
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            continue
        folded, factor = fold_average_pools(stage.synapses, stage.input_shape)
        pools += sum(op.type == "sumpool2d" for op in folded)
        *linear, affine = folded
        synapses = (*linear, replace(affine, weight=affine.weight * factor))
        v = np.abs(np.random.default_rng(5).normal(size=(4, *stage.input_shape)))
        np.testing.assert_allclose(
            apply_synapses(synapses, v), apply_synapses(stage.synapses, v), rtol=1e-12, atol=1e-12
        )
        integers = np.random.default_rng(6).integers(0, 64, (4, *stage.input_shape))
        sums = apply_synapses(tuple(linear), integers.astype(np.float64))
        np.testing.assert_array_equal(sums, np.rint(sums))  # integers stay integers
    assert pools == 2  # p1 (counting its padding) and p2 (count_include_pad=False)


# -- backends -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 8, 11])
def test_ideal_backends_reproduce_the_reference_on_modern_networks(seed):
    net = random_network(seed, modern=True)
    x = random_inputs(net, 24, seed)
    snn = nd.convert(net, calibration=x)
    ref = nd.simulate(snn, x)
    for backend in ("emulator", "crossbar"):
        trace = nd.deploy(snn, "ideal", backend=backend).run(x)
        assert_same_spikes(trace, ref, IDEAL_TOLERANCE)
        np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=IDEAL_TOLERANCE)


def test_ideal_crossbar_and_clean_pcm_reproduce_the_reference(sink):
    _, x, snn = sink
    ref = nd.simulate(snn, x)
    clean = nd.load_profile("pcm").with_overrides(CLEAN)
    for profile in ("ideal", clean):
        trace = nd.deploy(snn, profile, backend="crossbar").run(x)
        assert_same_spikes(trace, ref, 1e-9)
        np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=1e-9)
        assert trace.saturated == 0


def test_crossbar_programs_only_the_diagonal_blocks(mobile):
    _, _, snn = mobile
    dep = nd.deploy(snn, "pcm", backend="crossbar")
    layers = {layer["name"]: layer for layer in dep.summary()["layers"]}
    tile = nd.load_profile("pcm").crossbar
    for stage in snn.spiking_layers:
        conv = stage.synapses[-1]
        layer = layers[stage.name]
        assert layer["devices"] == 2 * conv.weight.size  # no off-diagonal zeros
        assert layer["groups"] == conv.groups
        if conv.groups > 1:  # 9 x 1 blocks along the diagonal of one tile
            per_tile = min(tile.tile_rows // 9, tile.tile_cols // 1)
            assert layer["tiles"] == -(-conv.groups // per_tile)


def test_loihi2_and_pcm_run_and_the_cross_check_passes(sink):
    _, x, snn = sink
    ref = nd.simulate(snn, x)
    dep = nd.deploy(snn, "loihi2")
    trace = dep.run(x)
    assert np.mean(trace.predictions == ref.predictions) >= 0.9
    report = nd.crosscheck(snn, dep, x, hardware=trace, reference=ref)
    assert report.divergence_layer is None, report.reasons
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["dw1"].saturated == 0 and by_name["fc"].saturated == 0
    pcm = nd.deploy(snn, "pcm", backend="crossbar").run(x)
    assert np.isfinite(pcm.output).all() and np.mean(pcm.predictions == ref.predictions) >= 0.75


def test_clipped_layer_gives_exactly_its_clip_on_the_step_grid(sink):
    """On integer hardware a neuron above its clip fires at the window's first step:
    decoded, exactly the window B = M."""
    net, x, snn = sink
    trace = nd.deploy(snn, "loihi2").run(x)
    stage = snn.stage("dw1")
    at_clip = net.activations(x)["r1"] > stage.window * 1.05
    decoded = stage.decode(trace.spike_times["dw1"])
    np.testing.assert_array_equal(decoded[at_clip], stage.window)
    assert trace.saturated_per_layer["dw1"] == 0


def test_count_include_pad_false_before_a_conv_runs_exactly_on_fixed_point_backends():
    """The per-position divisor 1/c = (L/c)/L: integer multiplicities L/c in the sum pool,
    1/L in the conv's weights; integers stay integers on the chip."""
    rng = np.random.default_rng(0)
    layers = (
        nd.Conv2d("c0", rng.normal(0, 0.5, (3, 1, 3, 3)), np.full(3, 0.2), padding=1),
        nd.ReLU("r0"),
        nd.AvgPool2d("avg", 3, 1, padding=1, count_include_pad=False),
        nd.Conv2d("c1", rng.normal(0, 0.5, (2, 3, 3, 3)), np.zeros(2)),
        nd.ReLU("r1"),
        nd.Flatten("f"),
        nd.Dense("out", rng.normal(0, 0.5, (2, 18)), np.zeros(2)),
    )
    net = nd.Network("avg_exclude", (1, 5, 5), (0.0, 1.0), layers)
    x = rng.uniform(0, 1, (8, 1, 5, 5))
    snn = nd.convert(net, calibration=x)
    ref = nd.simulate(snn, x)
    assert relative_error(ref.output, net.forward(x)) <= RELATIVE_TOLERANCE
    pool, _ = fold_average_pools(snn.stage("c1").synapses, snn.stage("c1").input_shape)
    np.testing.assert_array_equal(pool[0].multiplicity[[0, 0, 1], [0, 1, 1]], [9, 6, 4])
    dep = nd.deploy(snn, "loihi2")
    trace = dep.run(x)
    np.testing.assert_array_equal(trace.output, _naive_chip(dep, x))
    report = nd.crosscheck(snn, dep, x, hardware=trace, reference=ref)
    assert report.divergence_layer is None, report.reasons
    # the multiplicities are weights, not synapses: the same count as a pool counting
    # its padding
    including = replace(
        net, layers=(*layers[:2], replace(layers[2], count_include_pad=True), *layers[3:])
    )
    dep_including = nd.deploy(nd.convert(including, calibration=x), "loihi2")
    assert dep.programs["c1"].synapse_count == dep_including.programs["c1"].synapse_count
    for backend in ("emulator", "crossbar"):
        ideal = nd.deploy(snn, "ideal", backend=backend).run(x)
        np.testing.assert_allclose(ideal.output, ref.output, rtol=0, atol=IDEAL_TOLERANCE)
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=8).run(x)
    np.testing.assert_array_equal(lava.output, trace.output)


def test_mobilenet_like_net_deploys_on_emulator_crossbar_and_lava(mobile):
    _, x, snn = mobile
    ref = nd.simulate(snn, x)
    for backend in ("emulator", "crossbar"):
        trace = nd.deploy(snn, "ideal", backend=backend).run(x)
        assert_same_spikes(trace, ref, IDEAL_TOLERANCE)
    emulator = nd.deploy(snn, "loihi2").run(x[:6])
    assert np.mean(emulator.predictions == ref.predictions[:6]) >= 0.8
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=4).run(x[:6])
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)
    assert lava.saturated_per_layer == emulator.saturated_per_layer
    pcm = nd.deploy(snn, "pcm", backend="crossbar").run(x)
    assert np.isfinite(pcm.output).all()


def test_lava_runs_padded_min_pools_bit_exactly_like_the_emulator(sink):
    _, x, snn = sink
    # the kitchen sink's count_include_pad=False pool feeds a dense layer: it folds
    emulator = nd.deploy(snn, "loihi2").run(x[:6])
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=4).run(x[:6])
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)
    assert lava.saturated_per_layer == emulator.saturated_per_layer


# -- fine-tuning --------------------------------------------------------------------------
def test_finetune_gradients_equal_finite_differences_on_the_kitchen_sink(sink):
    _, x, snn = sink
    x, y = x[:12], np.random.default_rng(0).integers(0, 4, 12)
    p, q = snn.input_range
    loss, grads, _, _ = loss_and_gradients(snn, np.clip((x - p) / (q - p), 0, 1), y)

    def simulated_loss(s):
        return _cross_entropy(nd.simulate(s, x).output, y)[0]

    assert loss == pytest.approx(simulated_loss(snn), rel=1e-12)
    rng = np.random.default_rng(1)
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            continue
        g = grads[f"{stage.name}.w"]
        for _ in range(3):
            index = tuple(int(rng.integers(d)) for d in g.shape)
            eps = 1e-6
            numeric = []
            for sign in (1, -1):
                w = stage.synapses[-1].weight.copy()
                w[index] += sign * eps
                changed = replace(
                    stage, synapses=(*stage.synapses[:-1], replace(stage.synapses[-1], weight=w))
                )
                stages = tuple(changed if s is stage else s for s in snn.stages)
                numeric.append(simulated_loss(replace(snn, stages=stages)))
            assert g[index] == pytest.approx(
                (numeric[0] - numeric[1]) / (2 * eps), rel=1e-4, abs=1e-8
            )


@pytest.mark.parametrize("profile", ["loihi2", "pcm"])
def test_finetune_runs_an_epoch_on_depthwise_and_clipped_layers(mobile, tmp_path, profile):
    net, x, snn = mobile
    y = net.predict(x)
    result = finetune(snn, profile, x, y, epochs=1, batch_size=16, learning_rate=1e-3)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
    for stage in result.snn.spiking_layers:
        # a clip's window does not grow
        assert stage.clipped and stage.window == pytest.approx(6.0, rel=1e-13)
    relus = [layer for layer in result.network.layers if isinstance(layer, nd.ReLU)]
    assert all(layer.clip == pytest.approx(6.0, rel=1e-13) for layer in relus)
    groups = [layer.groups for layer in result.network.layers if isinstance(layer, nd.Conv2d)]
    assert max(groups) > 1
    saved = nd.load_model(nd.save_model(result.network, tmp_path / "tuned"))
    again = nd.convert(saved, calibration=x)
    assert (
        relative_error(nd.simulate(again, x).output, nd.simulate(result.snn, x).output)
        <= RELATIVE_TOLERANCE
    )


def test_emulator_counts_only_the_synapses_a_depthwise_layer_has(mobile):
    _, _, snn = mobile
    dep = nd.deploy(snn, "loihi2")
    for stage in snn.spiking_layers:
        conv = stage.synapses[-1]
        if conv.groups == 1:
            continue
        prog = dep.programs[stage.name]
        channels, height = stage.input_shape[0], stage.input_shape[1]
        # every output channel reads its own channel's in-bounds 3x3 taps: no cross-channel
        taps = ops.pool_counts((height, height), conv.kernel, conv.stride, conv.padding)
        assert prog.synapse_count == channels * int(taps.sum())
        assert prog.fanout.sum() == prog.synapse_count
        assert prog.fanout.max() <= conv.kernel * conv.kernel  # one output channel each


@pytest.mark.parametrize("net_name", ["sink", "mobile"])
def test_crossbar_quantisation_alone_stays_within_the_cross_check_bounds(net_name, sink, mobile):
    """Conductance levels, DAC and ADC (per group column) only: every layer of a grouped,
    clipped, padded network stays within the bound quantisation explains."""
    _, x, snn = sink if net_name == "sink" else mobile
    profile = nd.load_profile("pcm").with_overrides(
        {
            "crossbar.prog_noise_scale": 0.0,
            "crossbar.read_noise_scale": 0.0,
            "crossbar.drift_scale": 0.0,
            "crossbar.drift_compensation": False,
            "faults.stuck_on": 0.0,
            "faults.stuck_off": 0.0,
            "crossbar.variability": 0.0,
            "crosscheck.max_beyond_bound": 0.0,
        }
    )
    report = nd.crosscheck(snn, nd.deploy(snn, profile, backend="crossbar"), x)
    assert report.divergence_layer is None, report.reasons
    assert all(layer.saturated == 0 for layer in report.layers if layer.kind == "spiking")


@pytest.mark.parametrize("membrane_bits", [24, 12])
def test_grouped_padded_programs_equal_literal_integer_execution(sink, membrane_bits):
    """The integer programs of grouped convs, padded sum pools and the per-feature
    divisors of a count_include_pad=False pool, run literally with Python integers (12
    bits forces saturating step-by-step integration somewhere)."""
    _, x, snn = sink
    profile = nd.load_profile("loihi2").with_overrides(
        {
            "timing.steps_per_window": 8,
            "neuron.membrane_bits": membrane_bits,
            "neuron.number_format": "loihi2" if membrane_bits == 24 else "generic",
        }
    )
    dep = nd.deploy(snn, profile)
    if membrane_bits == 12:
        assert any(p.stepped for p in dep.programs.values())
    np.testing.assert_array_equal(dep.run(x[:2]).output, _naive_chip(dep, x[:2]))


@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(seed=st.integers(1000, 10**6), hidden_conv=st.integers(2, 4))
def test_property_ideal_backends_match_the_reference(seed, hidden_conv):
    net = random_network(seed, hidden_conv=hidden_conv, hidden_dense=2, modern=True)
    x = random_inputs(net, 12, seed)
    snn = nd.convert(net, calibration=x)
    ref = nd.simulate(snn, x)
    for backend in ("emulator", "crossbar"):
        trace = nd.deploy(snn, "ideal", backend=backend).run(x)
        assert_same_spikes(trace, ref, IDEAL_TOLERANCE)
        np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=IDEAL_TOLERANCE)
        assert trace.saturated_per_layer == ref.saturated_per_layer


@pytest.mark.parametrize("neuron", ["b1", "alpha1"])
def test_shift_through_a_padded_average_pool_becomes_one_per_position(neuron):
    """relu -> batch norm (a shift) -> average pool counting zero padding: at the border
    a window averages fewer shifted inputs, so the folded bias differs per position."""
    rng = np.random.default_rng(6)
    layers = (
        nd.Conv2d("c0", rng.normal(0, 0.5, (3, 1, 3, 3)), np.full(3, 0.1), padding=1),
        nd.ReLU("r0"),
        nd.BatchNorm(
            "bn",
            np.array([1.5, -0.5, 1.0]),
            np.array([1.0, 0.5, -0.7]),
            np.zeros(3),
            np.full(3, 1.0 - 1e-5),
        ),
        nd.AvgPool2d("avg", 3, 1, padding=1),
        nd.Conv2d("c1", rng.normal(0, 0.5, (4, 3, 3, 3)), np.zeros(4), padding=1),
        nd.ReLU("r1"),
        nd.Flatten("f"),
        nd.Dense("out", rng.normal(0, 0.3, (2, 4 * 6 * 6)), np.zeros(2)),
    )
    net = nd.Network("shift_pool", (1, 6, 6), (0.0, 1.0), layers)
    x = rng.uniform(0, 1, (16, 1, 6, 6))
    snn = nd.convert(net, calibration=x, neuron=neuron)
    assert relative_error(nd.simulate(snn, x).output, net.forward(x)) <= RELATIVE_TOLERANCE
    bias = snn.stage("c1").bias
    assert bias.shape == (4, 6, 6) and not np.allclose(bias[:, 0, 0], bias[:, 2, 2])


@pytest.mark.parametrize("include", [True, False])
def test_padded_pool_on_the_raw_input_folds_the_input_range(include):
    """The input rescaling x = (q - p) x' + p is a shift too: through a padded average
    pool on the input it becomes per position (count_include_pad) or stays constant."""
    rng = np.random.default_rng(8)
    layers = (
        nd.AvgPool2d("avg", 3, 1, padding=1, count_include_pad=include),
        nd.Conv2d("c", rng.normal(0, 0.5, (3, 2, 3, 3)), np.full(3, 0.1), padding=1, groups=1),
        nd.ReLU("r", clip=1.5),
        nd.MaxPool2d("mp", 3, 2, padding=1),
        nd.Flatten("f"),
        nd.Dense("out", rng.normal(0, 0.3, (2, 3 * 3 * 3)), np.zeros(2)),
    )
    net = nd.Network("input_pool", (2, 5, 5), (-2.0, 3.0), layers)
    x = rng.uniform(-2, 3, (16, 2, 5, 5))
    snn = nd.convert(net, calibration=x)
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    back = snn_to_network(snn)
    assert relative_error(back.forward(x), net.forward(x)) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("seed", [9, 12])  # count_include_pad=False pools before a conv
def test_loihi2_cross_check_passes_on_modern_random_networks(seed):
    net = random_network(seed, modern=True)
    x = random_inputs(net, 24, seed)
    snn = nd.convert(net, calibration=x)
    dep = nd.deploy(snn, "loihi2")
    report = nd.crosscheck(snn, dep, x)
    assert report.divergence_layer is None, report.reasons
    np.testing.assert_array_equal(dep.run(x[:2]).output, _naive_chip(dep, x[:2]))
