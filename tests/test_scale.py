"""Scale: fast model files, the lean small-net path, chunked and float32 execution."""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np
import pytest
from netgen import random_inputs, random_network

import neurodeploy as nd
from neurodeploy.modelio import WEIGHTS_FILE
from neurodeploy.simulate import working_bytes as sim_working_bytes


def _float32_network(seed: int) -> nd.Network:
    """random_network with every parameter rounded to float32 (a float32-trained net)."""
    net = random_network(seed)
    layers = []
    for layer in net.layers:
        params = {p: np.asarray(a, np.float32) for p, a in layer.params().items()}
        layers.append(dataclasses.replace(layer, **params) if params else layer)
    return nd.Network(net.name, net.input_shape, net.input_range, tuple(layers), net.classes)


def _stored(model_dir) -> dict[str, tuple[np.dtype, int]]:
    with zipfile.ZipFile(model_dir / WEIGHTS_FILE) as archive:
        out = {}
        for info in archive.infolist():
            with archive.open(info) as member:
                np.lib.format.read_magic(member)
                _, _, dtype = np.lib.format.read_array_header_1_0(member)
            out[info.filename.removesuffix(".npy")] = (dtype, info.compress_type)
    return out


def test_float32_weights_stay_float32_on_disk_and_round_trip_bit_for_bit(tmp_path):
    net = _float32_network(3)
    loaded = nd.load_model(nd.save_model(net, tmp_path / "m"))
    stored = _stored(tmp_path / "m")
    assert stored and all(d == np.float32 for d, _ in stored.values())
    assert all(c == zipfile.ZIP_STORED for _, c in stored.values())  # uncompressed
    for a, b in zip(net.layers, loaded.layers, strict=True):
        for p, arr in a.params().items():
            got = getattr(b, p)
            assert got.dtype == np.float64 and type(got) is np.ndarray  # no memmap kept
            assert got.flags.writeable and got.flags.owndata
            np.testing.assert_array_equal(got, arr)
    x = random_inputs(net, 4, 0)
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))


def test_float64_weights_stay_float64_and_round_trip_bit_for_bit(tmp_path):
    net = random_network(5)  # float64 values float32 cannot hold
    loaded = nd.load_model(nd.save_model(net, tmp_path / "m"))
    stored = _stored(tmp_path / "m")
    assert any(d == np.float64 for d, _ in stored.values())
    for a, b in zip(net.layers, loaded.layers, strict=True):
        for p, arr in a.params().items():
            assert np.array_equal(getattr(b, p), arr)
            assert getattr(b, p).dtype == np.float64


def test_compressed_model_files_of_earlier_versions_still_load(tmp_path):
    net = random_network(6)
    model = nd.save_model(net, tmp_path / "m")
    arrays = {f"{la.name}.{p}": a for la in net.layers for p, a in la.params().items()}
    np.savez_compressed(model / WEIGHTS_FILE, **arrays)
    assert all(c == zipfile.ZIP_DEFLATED for _, c in _stored(model).values())
    loaded = nd.load_model(model)
    x = random_inputs(net, 3, 1)
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))


def test_a_truncated_uncompressed_weights_file_is_refused(tmp_path):
    model = nd.save_model(_float32_network(2), tmp_path / "m")
    data = (model / WEIGHTS_FILE).read_bytes()
    (model / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(nd.ModelError, match="weights.npz"):
        nd.load_model(model)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model", ["digits_mlp", "digits_cnn"])
def test_chunked_forward_and_simulate_equal_one_pass(model, dtype):
    """The same bits: every product is one BLAS call per sample (neurodeploy.ops), so the
    chunk size cannot change a sample's arithmetic (tests/test_batch_independence.py
    checks any batch composition)."""
    net = nd.load_model(model)
    x = nd.datasets.digits("test")[0][:37].reshape(-1, *net.input_shape)
    snn = nd.convert(net, calibration=x)
    whole = net.forward(x, dtype=dtype)
    trace = nd.simulate(snn, x, dtype=dtype)
    for per in (1, 5, 16):
        budget = per * net.working_bytes(dtype)
        np.testing.assert_array_equal(net.forward(x, dtype=dtype, memory_budget=budget), whole)
        chunked = nd.simulate(snn, x, dtype=dtype,
                              memory_budget=per * sim_working_bytes(snn, dtype))
        np.testing.assert_array_equal(chunked.output, trace.output)
        assert chunked.saturated_per_layer == trace.saturated_per_layer
        assert chunked.early_per_layer == trace.early_per_layer
        assert chunked.spike_times.keys() == trace.spike_times.keys()
        for name, times in trace.spike_times.items():
            np.testing.assert_array_equal(chunked.spike_times[name], times)


def test_memory_budget_parses_and_refuses_bad_values(monkeypatch):
    from neurodeploy import memory

    assert memory.parse_bytes("8G") == 8 * 2**30 and memory.parse_bytes("512m") == 2**29
    monkeypatch.setenv(memory.ENV_VARIABLE, "3M")
    assert memory.memory_budget() == 3 * 2**20
    memory.set_memory_budget("1K")
    try:
        assert memory.memory_budget() == 1024 and memory.chunk_samples(100) == 10
    finally:
        memory.set_memory_budget(None)
    assert memory.memory_budget(2048) == 2048
    for bad in ("lots", "0", -3):
        with pytest.raises(nd.UsageError):
            memory.memory_budget(bad)
    with pytest.raises(nd.UsageError, match="dtype"):
        nd.load_model("digits_mlp").forward(np.zeros((1, 64)), dtype="float16")


@pytest.mark.parametrize("model", ["digits_mlp", "digits_cnn"])
def test_float32_forward_and_simulate_track_float64(model):
    net = nd.load_model(model)
    x = nd.datasets.digits("test")[0][:50].reshape(-1, *net.input_shape)
    snn = nd.convert(net, calibration=x)
    ref = net.forward(x)
    f32 = net.forward(x, dtype="float32")
    assert f32.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(f32 - ref).max() / scale < 1e-5  # float32: 2^-24 per rounding
    trace = nd.simulate(snn, x, dtype="float32")
    assert trace.spike_times[snn.spiking_layers[0].name].dtype == np.float32
    assert np.abs(trace.output - ref).max() / scale < 1e-4
    assert np.array_equal(trace.predictions, net.predict(x))


def test_forward_never_writes_into_the_callers_array_or_a_kept_activation():
    rng = np.random.default_rng(0)
    layers = (
        nd.ReLU("r0"),  # reads the caller's array: must not overwrite it
        nd.Flatten("flat"),
        nd.Dense("fc1", rng.normal(size=(6, 12)), rng.normal(size=6)),
        nd.ReLU("r1"),  # may overwrite fc1's output (its last reader)
        nd.Dense("out", rng.normal(size=(3, 6)), rng.normal(size=3)),
    )
    net = nd.Network("inplace", (3, 2, 2), (-1.0, 1.0), layers)
    x = rng.uniform(-1, 1, (5, 3, 2, 2))
    before = x.copy()
    logits = net.forward(x)
    np.testing.assert_array_equal(x, before)
    acts = net.activations(x)
    assert (acts["fc1"] < 0).any()  # kept activations are not the ReLU's overwritten ones
    np.testing.assert_array_equal(acts["r1"], np.maximum(acts["fc1"], 0))
    np.testing.assert_allclose(logits, acts["out"], rtol=1e-15)


def test_float32_runs_every_conv_and_pool_kind_in_float32():
    rng = np.random.default_rng(4)

    def conv(name, c_in, c_out, k, groups=1, stride=1, padding=1):
        w = rng.normal(0, 0.4, (c_out, c_in // groups, k, k))
        return nd.Conv2d(name, w, rng.normal(0, 0.1, c_out), stride, padding, groups)

    layers = (
        conv("c1", 3, 8, 3),
        nd.ReLU("r1"),
        conv("dw", 8, 8, 3, groups=8),  # depthwise
        nd.ReLU("r2"),
        conv("g", 8, 8, 3, groups=2, stride=2),  # grouped
        nd.ReLU("r3"),
        nd.MaxPool2d("mp", 3, 1, padding=1),
        nd.AvgPool2d("ap", 2, 2, padding=1, count_include_pad=False),
        conv("pw", 8, 4, 1, padding=0),  # pointwise
        nd.ReLU("r4"),
        nd.Flatten("flat"),
        nd.Dense("out", rng.normal(0, 0.3, (5, 4 * 3 * 3)), rng.normal(0, 0.1, 5)),
    )
    net = nd.Network("kinds", (3, 9, 9), (0.0, 1.0), layers)
    x = rng.uniform(0, 1, (7, 3, 9, 9))
    seen = []
    for layer in net.layers:  # every layer keeps float32
        x32 = x.astype(np.float32) if not seen else seen[-1]
        seen.append(layer.forward(x32))
        assert seen[-1].dtype == np.float32, layer.name
    ref = net.forward(x)
    np.testing.assert_allclose(seen[-1], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(net.forward(x, dtype="float32"), seen[-1])


def test_chunked_alpha1_simulation_equals_one_pass():
    net = nd.load_model("digits_mlp")
    x = nd.datasets.digits("test")[0][:20].reshape(-1, *net.input_shape)
    snn = nd.convert(net, calibration=x, neuron="alpha1")
    whole = nd.simulate(snn, x)
    chunked = nd.simulate(snn, x, memory_budget=7 * sim_working_bytes(snn))
    np.testing.assert_array_equal(chunked.output, whole.output)
    for name, times in whole.spike_times.items():
        np.testing.assert_array_equal(chunked.spike_times[name], times)
    assert chunked.early_per_layer == whole.early_per_layer
    assert chunked.saturated_per_layer == whole.saturated_per_layer
    with pytest.raises(nd.UsageError, match="float32"):
        nd.simulate(snn, x, dtype="float32")


@pytest.mark.parametrize("per", [None, 7])
def test_simulate_keeps_only_the_chosen_stages_and_every_spike_count(per):
    from neurodeploy.evaluate import layer_table
    from neurodeploy.metrics import neurobench_metrics
    from neurodeploy.simulate import stages_with_spike_times

    net = nd.load_model("digits_cnn")
    x = nd.datasets.digits("test")[0][:40].reshape(-1, *net.input_shape)
    snn = nd.convert(net, calibration=x)
    budget = None if per is None else per * sim_working_bytes(snn)
    full = nd.simulate(snn, x, memory_budget=budget)
    hidden = snn.spiking_layers[0].name
    for keep in ((), ("input", hidden), hidden):
        part = nd.simulate(snn, x, memory_budget=budget, keep=keep)
        names = {keep} if isinstance(keep, str) else set(keep)
        assert set(part.spike_times) == names
        for name in names:
            np.testing.assert_array_equal(part.spike_times[name], full.spike_times[name])
        np.testing.assert_array_equal(part.output, full.output)
        assert part.saturated_per_layer == full.saturated_per_layer
        assert part.early_per_layer == full.early_per_layer
        assert set(part.spikes_per_layer) == set(stages_with_spike_times(snn))
        for name in stages_with_spike_times(snn):
            counts = np.isfinite(full.spike_times[name].reshape(len(x), -1)).sum(axis=1)
            np.testing.assert_array_equal(part.spikes_per_layer[name], counts)
        np.testing.assert_array_equal(part.spike_count, full.spike_count)
        assert part.spikes_per_neuron == full.spikes_per_neuron
        assert layer_table(snn, part) == layer_table(snn, full)
        with pytest.raises(nd.UsageError, match="keep"):
            neurobench_metrics(snn, part)
    for bad, message in (("nope", "no stage"), (snn.output.name, "output layer")):
        with pytest.raises(nd.UsageError, match=message):
            nd.simulate(snn, x, keep=(bad,))


def test_simulate_with_keep_holds_shortcut_sources_until_their_join():
    from residual import conv_resnet

    snn, x = conv_resnet(0, samples=30)
    full = nd.simulate(snn, x)
    for budget in (None, 4 * sim_working_bytes(snn)):
        part = nd.simulate(snn, x, memory_budget=budget, keep=())
        assert part.spike_times == {}
        np.testing.assert_array_equal(part.output, full.output)
        np.testing.assert_array_equal(part.spike_count, full.spike_count)


def test_chunked_simulate_with_keep_never_holds_the_dropped_stages_of_the_whole_batch():
    """Peak traced memory of a chunked run keeping nothing stays below what the dropped
    stages' spike times of the whole batch would take (tracemalloc sees numpy's buffers)."""
    import tracemalloc

    net = nd.load_model("digits_cnn")
    x = np.tile(nd.datasets.digits("all")[0], (2, 1)).reshape(-1, *net.input_shape)
    snn = nd.convert(net, calibration=x[:100])
    budget = 16 * sim_working_bytes(snn)
    full = nd.simulate(snn, x, memory_budget=budget)
    dropped = sum(t.nbytes for name, t in full.spike_times.items() if name != "input")
    del full

    def peak(keep) -> int:
        tracemalloc.start()
        try:
            nd.simulate(snn, x, memory_budget=budget, keep=keep)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(None) > dropped  # the measure sees the kept spike times
    assert peak(()) < x.nbytes + dropped / 4  # the encoded times, then one chunk at a time


def test_pooled_arrays_are_reused_only_once_every_view_is_gone(monkeypatch):
    """memory.reusable_empty hands a dropped array's block to the next array of its size,
    never while a view of it lives (a transposed or sliced result the caller kept), and
    keeps at most its cap; tracemalloc sees a block while it is in use."""
    import gc
    import tracemalloc

    from neurodeploy import memory

    memory.release_pool()
    shape = (2, 300, 700)
    first = memory.reusable_empty(shape, np.float64)
    first[:] = 1.0
    kept = first.transpose(0, 2, 1)[:, ::2]  # a strided view, its base collapsed by numpy
    del first
    gc.collect()
    second = memory.reusable_empty(shape, np.float64)
    second[:] = 2.0
    assert not np.shares_memory(second, kept) and np.all(kept == 1.0)
    del kept
    gc.collect()
    third = memory.reusable_empty(shape, np.float64)
    assert third.flags.writeable and third.flags.c_contiguous and third.shape == shape
    assert not np.shares_memory(third, second)
    del second, third
    gc.collect()
    assert memory.release_pool() == 2 * 2 * 300 * 700 * 8  # both blocks came back
    monkeypatch.setattr(memory, "POOL_FRACTION", 0.0)  # a pool of no bytes keeps none
    tracemalloc.start()
    try:
        small = memory.reusable_empty(shape, np.float32)
        assert tracemalloc.get_traced_memory()[0] >= small.nbytes
        del small
        gc.collect()
        assert tracemalloc.get_traced_memory()[0] < 2 * 300 * 700 * 4
    finally:
        tracemalloc.stop()
    assert memory.release_pool() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_writes_into_the_parents_pooled_arrays():
    """A sweep's worker processes are forked: a pooled array's pages must be the parent's
    own (an anonymous mmap is shared with the children unless it is private)."""
    from neurodeploy import memory

    array = memory.reusable_empty((1000, 500), np.float64)
    array[:] = 1.0
    pid = os.fork()
    if pid == 0:  # the child writes into its copy and leaves at once
        array[:] = 2.0
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.all(array == 1.0)
