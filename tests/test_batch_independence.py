"""A sample's result is the same bits whatever batch and chunk it is computed in.

``Network.forward`` and ``simulate`` make one BLAS product per sample (neurodeploy.ops),
so neither the samples that share a batch nor the memory budget's chunk size can change
a sample's last bits: checked here on random batch compositions (repeats, any order) and
chunk sizes against each sample computed alone, in float64 and float32, with one and
two BLAS threads (the limit is set for the call), on digits_cnn, a residual CNN, a small
VGG and a network of every conv kind (grouped, depthwise, pointwise, padded pools).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netgen import cifar_vgg, random_inputs, random_network, random_residual_network
from residual import conv_resnet
from threadpoolctl import threadpool_limits

import neurodeploy as nd
from neurodeploy.simulate import working_bytes as sim_working_bytes

POOL = 12  # distinct samples a batch is drawn from


@functools.cache
def _case(name: str):
    """(network or None, b1 SNN, POOL raw samples) of one test network."""
    if name == "digits_cnn":
        net = nd.load_model("digits_cnn")
        x = nd.datasets.digits("test")[0][:POOL].reshape(-1, *net.input_shape)
        return net, nd.convert(net, calibration=x), x
    if name == "conv_resnet":  # shortcuts into a conv, a dense and the output layer
        snn, x = conv_resnet(0, samples=POOL)
        return None, snn, x
    if name == "residual":  # a ReLU network with Add joins (forward only needs no SNN)
        net = random_residual_network(3)
        x = random_inputs(net, POOL, 1)
        return net, None, x
    if name == "residual_snn":  # Add joins converted: identity shortcuts (depthwise)
        net = random_residual_network(3)
        x = random_inputs(net, POOL, 1)
        return net, nd.convert(net, calibration=x), x
    if name == "vgg":
        net = cifar_vgg(0, widths=(8, 16, 16))
        x = np.random.default_rng(2).uniform(0.0, 1.0, (POOL, *net.input_shape))
        return net, nd.convert(net, calibration=x), x
    net = random_network(11)  # every conv kind
    x = random_inputs(net, POOL, 2)
    return net, nd.convert(net, calibration=x), x


@functools.cache
def _alone(name: str, dtype: str, threads: int):
    """Each pool sample computed on its own: logits and the trace of each."""
    net, snn, x = _case(name)
    with threadpool_limits(threads):
        logits = [net.forward(x[i : i + 1], dtype=dtype) for i in range(POOL)] if net else None
        traces = [nd.simulate(snn, x[i : i + 1], dtype=dtype) for i in range(POOL)] if snn else None
    return logits, traces


CASES = ("digits_cnn", "conv_resnet", "residual", "vgg", "every_kind")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", CASES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, POOL - 1), min_size=1, max_size=23),
    per=st.integers(1, 9),
    dtype=st.sampled_from(["float64", "float32"]),
)
def test_a_sample_gives_the_same_bits_in_any_batch_and_chunk(name, threads, picks, per, dtype):
    net, snn, x = _case(name)
    logits, traces = _alone(name, dtype, threads)
    batch = x[picks]
    with threadpool_limits(threads):
        if net is not None:
            got = net.forward(batch, dtype=dtype, memory_budget=per * net.working_bytes(dtype))
            for row, i in zip(got, picks, strict=True):
                assert row.tobytes() == logits[i][0].tobytes()
        if snn is None:
            return
        trace = nd.simulate(snn, batch, dtype=dtype,
                            memory_budget=per * sim_working_bytes(snn, dtype))
    for j, i in enumerate(picks):
        assert trace.output[j].tobytes() == traces[i].output[0].tobytes()
        for stage, times in trace.spike_times.items():
            assert times[j].tobytes() == traces[i].spike_times[stage][0].tobytes(), stage
    for stage, count in trace.saturated_per_layer.items():
        assert count == sum(traces[i].saturated_per_layer[stage] for i in picks)


def test_the_grouped_conv_path_does_not_depend_on_the_batch_size():
    """Grouped convs choose between two product orders by the rows of one sample: a batch
    large enough to cross the old per-batch threshold keeps each sample's bits."""
    rng = np.random.default_rng(5)
    layer = nd.Conv2d("g", rng.normal(size=(8, 2, 3, 3)), np.zeros(8), 1, 1, groups=4)
    x = rng.uniform(size=(80, 8, 8, 8))  # 80 x 64 rows: above 4096 together, not alone
    whole = layer.linear(x)
    for i in (0, 41, 79):
        assert np.array_equal(layer.linear(x[i : i + 1])[0], whole[i])


@pytest.mark.parametrize("channels", [3, 64])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padding", [0, 1])
def test_large_samples_go_in_row_blocks_and_the_input_is_left_alone(padding, layout, channels):
    """Maps above one block (40 x 40) go in blocks of output lines, their windows gathered
    (64 channels) or copied from a padded copy (3 channels), from either memory layout:
    the result equals the plain im2col product, each sample alone gives its bits, and the
    input (which a channels-last view could alias) is not written to."""
    from neurodeploy import ops

    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 40, 40, channels)).transpose(0, 3, 1, 2)  # channels-last view
    if layout == "channels_first":
        x = np.ascontiguousarray(x)
    before = x.copy()
    w = rng.standard_normal((5, channels, 3, 3))
    got = ops.conv2d(x, w, 1, padding)
    cols, ho, wo = ops.im2col(x, 3, 1, padding)
    assert ho * wo > ops._MIN_BLOCK_ROWS  # more than one block per sample
    exact = (cols @ w.reshape(5, -1).T).reshape(3, ho, wo, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-12 * np.abs(exact).max())
    np.testing.assert_array_equal(x, before)
    for i in range(3):
        np.testing.assert_array_equal(ops.conv2d(x[i : i + 1], w, 1, padding)[0], got[i])


def _channels_last(t: np.ndarray) -> np.ndarray:
    """An (N, C, H, W) map as a view of an (N, H, W, C) buffer (what conv2d returns)."""
    if t.ndim != 4:
        return t
    return np.ascontiguousarray(t.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _whole_map_b1(layer, t_in, shortcut_in):
    """A b1 layer by the whole-map passes (what simulate's fused conv layers fuse)."""
    from neurodeploy.simulate import add_shortcuts, b1_fire, count_spikes, spike_values
    from neurodeploy.ttfs import apply_synapses

    v = apply_synapses(layer.synapses, spike_values(t_in, layer.t_min))
    times, saturated, _ = b1_fire(layer, add_shortcuts(layer, v, shortcut_in))
    return times, saturated, count_spikes(times)


@pytest.mark.parametrize("name", ["digits_cnn", "conv_resnet", "residual_snn", "every_kind",
                                  "vgg"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gain", [1.0, 3.0])
def test_fused_conv_layers_equal_the_whole_map_passes_bit_for_bit(name, dtype, gain, monkeypatch):
    """simulate's conv layers (spike values written as the conv reads its input, shortcuts,
    firing, saturation and silence on each output block in cache) give the bits, counts and
    saturated counts of the same passes over whole maps, layer by layer: every conv kind,
    identity and projection shortcuts, cache blocks of one and of many samples. gain 3
    scales each layer's input times' values up so that layers saturate."""
    from neurodeploy import ops
    from neurodeploy.network import Conv2d
    from neurodeploy.simulate import _b1_conv_layer, encode_input
    from neurodeploy.ttfs import SpikingLayer

    monkeypatch.setattr(ops, "FINISH_ELEMENTS", 256)  # many blocks even on small maps
    _, snn, x = _case(name)
    trace = nd.simulate(snn, x, dtype=dtype)
    times = {"input": encode_input(snn, x, dtype)[0], **trace.spike_times}
    previous = "input"
    fused = 0
    saturated_somewhere = False
    for stage in snn.stages:
        conv = stage.synapses[0] if isinstance(stage, SpikingLayer) else None
        if isinstance(conv, Conv2d) and conv.groups == 1 and len(stage.synapses) == 1:
            t_in = times[previous]
            if gain != 1.0:  # values t_min - t scaled by gain: earlier spikes
                t_in = (stage.t_min - (stage.t_min - t_in) * gain).astype(t_in.dtype)
            # sources channels-last, as simulate's own conv outputs: identity shortcuts
            # then take the per-block path
            shortcut_in = tuple(_channels_last(times[sc.source]) for sc in stage.shortcuts)
            want, want_sat, want_counts = _whole_map_b1(stage, t_in.copy(), shortcut_in)
            got, got_sat, early, got_counts = _b1_conv_layer(stage, conv, t_in, shortcut_in)
            assert got.dtype == want.dtype and np.array_equal(got, want), stage.name
            assert (got_sat, early) == (want_sat, 0), stage.name
            np.testing.assert_array_equal(got_counts, want_counts)
            fused += 1
            saturated_somewhere |= got_sat > 0
        if hasattr(stage, "output_shape"):
            previous = stage.name
    assert fused
    if gain != 1.0 and name != "every_kind":
        assert saturated_somewhere  # the saturation branch ran


@pytest.mark.parametrize(
    "kind,seed", [("chain", 0), ("chain", 2), ("chain", 6), ("chain", 9), ("residual", 0),
                  ("residual", 1), ("residual", 3)]
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_forward_equals_the_layer_by_layer_forward_bit_for_bit(kind, seed, dtype,
                                                                     monkeypatch):
    """Network.forward applies a conv's bias and the batch norms and (clipped) ReLUs that
    follow it to each output block in cache; the values are the bits of the layers' own
    forwards one after the other (what ``activations`` runs), on chains with batch norm
    before or after the ReLU, grouped and depthwise convs, position-dependent biases
    and residual networks."""
    from neurodeploy import ops
    from neurodeploy.network import INPUT

    monkeypatch.setattr(ops, "FINISH_ELEMENTS", 128)  # many blocks even on small maps
    net = random_network(seed, modern=True) if kind == "chain" else random_residual_network(seed)
    x = random_inputs(net, 9, seed).astype(dtype)
    tails = net._elementwise_tails()
    assert any(tails.values())  # something is fused
    fused = net.forward(x, dtype=dtype)
    by_layer = net._run(net.check_input(x, dtype=dtype), keep=True)
    last = by_layer[net.layers[-1].name]
    assert fused.dtype == last.dtype and np.array_equal(fused, last)
    assert INPUT in by_layer


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(1, 300), k=st.integers(1, 200),
       o=st.integers(1, 200), dtype=st.sampled_from(["float64", "float32"]),
       threads=st.sampled_from([1, 2]))
def test_rows_matmul_gives_a_row_its_bits_wherever_it_sits(seed, m, k, o, dtype, threads):
    """Each row of a rows_matmul product equals, bit for bit, the same row multiplied
    alone and sitting anywhere in another product (what makes the crossbar's chunked runs
    the unchunked bits). Fails with products of 8 + 8j rows on some OpenBLAS kernels."""
    from neurodeploy.ops import rows_matmul

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, k)).astype(dtype)
    b = rng.normal(size=(k, o)).astype(dtype)
    with threadpool_limits(threads):
        whole = rows_matmul(a, b)
        rows = rng.choice(m, size=min(m, 4), replace=False)
        elsewhere = rows_matmul(np.concatenate([a[::-1], a[rows]]), b)[m:]
        alone = [rows_matmul(a[i : i + 1], b)[0] for i in rows]
    np.testing.assert_allclose(whole, a.astype(np.float64) @ b.astype(np.float64),
                               rtol=1e-4 if dtype == "float32" else 1e-12, atol=1e-4)
    for j, i in enumerate(rows):
        assert np.array_equal(whole[i], alone[j]) and np.array_equal(whole[i], elsewhere[j])
