"""Deployment runs with keep=: the trace holds only the kept stages' spike times, and
everything else (output, costs, counts) is a full run's, bit for bit, in any chunks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from residual import conv_resnet, dense_resnet

import neurodeploy as nd
from neurodeploy.crosscheck import crosscheck
from neurodeploy.deploy import deploy
from neurodeploy.metrics import neurobench_metrics
from neurodeploy.modelio import SHIPPED_MODELS_DIR
from neurodeploy.simulate import stages_with_spike_times

BACKENDS = {"emulator": "loihi2", "crossbar": "pcm"}


@pytest.fixture(scope="module")
def nets():
    net = nd.load_model(SHIPPED_MODELS_DIR / "digits_cnn")
    snn = nd.convert(net, calibration=nd.datasets.digits("train")[0])
    return {
        "digits_cnn": (snn, nd.datasets.digits("test")[0][:40]),
        "conv_resnet": conv_resnet(0),
        "dense_resnet": dense_resnet(0),
    }


@pytest.fixture(scope="module")
def runs(nets):
    """(net, backend) -> (deployment, x, full unchunked run, its energy breakdown)."""
    out = {}
    for name, (snn, x) in nets.items():
        for backend, profile in BACKENDS.items():
            dep = deploy(snn, profile, backend=backend, seed=3)
            full = dep.run(x, memory_budget=2**40)
            out[name, backend] = (dep, x, full, dep.summary().get("energy_breakdown"))
    return out


def assert_full_results(part: nd.Trace, full: nd.Trace, snn, keep) -> None:
    """part holds the spike times of keep only, and every other result of full."""
    assert set(part.spike_times) == set(keep)
    for name in keep:
        assert np.array_equal(part.spike_times[name], full.spike_times[name]), name
    assert np.array_equal(part.output, full.output)
    assert np.array_equal(part.energy_j, full.energy_j)
    assert np.array_equal(part.latency_s, full.latency_s)
    assert part.overflow == full.overflow
    assert part.saturated_per_layer == full.saturated_per_layer
    assert part.early_per_layer == full.early_per_layer
    n = full.num_samples
    assert set(part.spikes_per_layer) == set(stages_with_spike_times(snn))
    for name in stages_with_spike_times(snn):
        counted = np.isfinite(full.spike_times[name].reshape(n, -1)).sum(axis=1)
        assert np.array_equal(part.spikes_per_layer[name], counted), name
        assert part.layer_neurons(name) == full.layer_neurons(name)
    assert np.array_equal(part.spike_count, full.spike_count)
    assert part.spikes_per_neuron == full.spikes_per_neuron


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", ["digits_cnn", "conv_resnet", "dense_resnet"])
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_run_keeping_some_stages_gives_the_full_runs_results_bit_for_bit(
    runs, nets, name, backend, data
):
    """Any subset of the stages kept, in chunks of any size (1 sample to the whole batch):
    output, energy, latency, every stage's spike counts, saturation, overflow and early
    counts, and the energy breakdown, are the unchunked full run's; kept spike times too."""
    dep, x, full, breakdown = runs[name, backend]
    snn = nets[name][0]
    keep = tuple(data.draw(st.sets(st.sampled_from(stages_with_spike_times(snn))), "keep"))
    per = data.draw(st.integers(1, len(x) + 1), "samples per chunk")
    part = dep.run(x, memory_budget=per * dep.working_bytes(), keep=keep)
    assert_full_results(part, full, snn, keep)
    if backend == "emulator":
        assert dep.summary()["energy_breakdown"] == breakdown
        assert dep.energy_breakdown(part) == dep.energy_breakdown(full) == breakdown


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_keep_none_and_keep_everything_are_the_full_run(runs, nets, backend):
    dep, x, full, _ = runs["conv_resnet", backend]
    snn = nets["conv_resnet"][0]
    every = stages_with_spike_times(snn)
    for per in (1, 7):
        budget = per * dep.working_bytes()
        assert_full_results(dep.run(x, memory_budget=budget, keep=None), full, snn, every)
        assert_full_results(dep.run(x, memory_budget=budget, keep=every), full, snn, every)
    assert_full_results(dep.run(x, keep="pool"), full, snn, ("pool",))  # one name


def test_the_ideal_profile_keeps_like_the_reference(nets):
    snn, x = nets["conv_resnet"]
    dep = deploy(snn, "ideal")
    full = dep.run(x)
    part = dep.run(x, memory_budget=3 * dep.working_bytes(), keep=("conv3",))
    assert_full_results(part, full, snn, ("conv3",))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bad_keep_names_are_refused_naming_them(runs, nets, backend):
    dep, x, _, _ = runs["digits_cnn", backend]
    snn = nets["digits_cnn"][0]
    for bad, message in (("nope", "'nope' is no stage"), (snn.output.name, "output layer")):
        with pytest.raises(nd.UsageError, match=message):
            dep.run(x, keep=(bad,))
    with pytest.raises(nd.UsageError, match="'nope'"):
        deploy(snn, "ideal", backend=backend).run(x, keep="nope")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_what_needs_a_dropped_stage_refuses_the_trace_naming_it(runs, nets, backend):
    dep, x, full, _ = runs["conv_resnet", backend]
    snn = nets["conv_resnet"][0]
    part = dep.run(x, keep=("input", "conv1", "conv2", "pool", "conv4", "fc"))  # not conv3
    with pytest.raises(nd.UsageError, match=r"metrics: .*\['conv3'\].*keep=None"):
        neurobench_metrics(snn, part, dep.profile, backend, dep)
    with pytest.raises(nd.UsageError, match=r"crosscheck \(hardware trace\).*\['conv3'\]"):
        crosscheck(snn, dep, x, hardware=part)
    reference = nd.simulate(snn, x, keep=())
    with pytest.raises(nd.UsageError, match=r"crosscheck \(reference trace\).*'input'"):
        crosscheck(snn, dep, x, hardware=full, reference=reference)
    if backend == "emulator":  # a trace it did not return: counted again, refused
        other = deploy(snn, dep.profile, backend=backend, seed=3)
        with pytest.raises(nd.UsageError, match=r"emulator energy.*\['conv3'\]"):
            other.energy_breakdown(part)
        # counted from the spike times afterwards: what the run counted as it went
        assert other.energy_breakdown(full) == dep.energy_breakdown(full)
        assert np.array_equal(other.with_costs(full).energy_j, full.energy_j)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", ["digits_cnn", "conv_resnet"])
def test_a_chunked_run_keeping_nothing_never_holds_the_dropped_stages_of_the_whole_batch(
    nets, name, backend
):
    """Peak traced memory (tracemalloc sees numpy's buffers) of a chunked run keeping
    nothing stays within the encoding's own peak and one chunk's memory budget, plus a
    small share of what the dropped stages' spike times of the whole batch take; a run
    keeping them holds more than they."""
    import tracemalloc

    snn, x = nets[name]
    x = np.concatenate([x] * (2000 // len(x)))
    dep = deploy(snn, BACKENDS[backend], backend=backend)
    budget = 16 * dep.working_bytes()  # 16 samples per chunk, of 2000
    full = dep.run(x, memory_budget=budget)
    dropped = sum(t.nbytes for stage, t in full.spike_times.items() if stage != "input")
    del full

    def peak(run) -> int:
        tracemalloc.start()
        try:
            run()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    encoding = peak(lambda: dep.encode(x))  # the encoded input and its temporaries
    assert peak(lambda: dep.run(x, memory_budget=budget)) > dropped  # the measure sees them
    kept_nothing = peak(lambda: dep.run(x, memory_budget=budget, keep=()))
    assert kept_nothing < encoding + budget + dropped / 16
