"""The cross-check in chunks: under any memory budget (one sample per chunk, a few, the
whole batch at once) its report is the same, number for number, figures included, and it
reads given whole-batch traces a chunk at a time to the same report."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neurodeploy as nd
from neurodeploy.crosscheck import working_bytes
from neurodeploy.errors import UsageError
from neurodeploy.simulate import ChunkStream
from neurodeploy.threads import one_blas_thread

SAMPLES = 23  # not a multiple of the chunk sizes tried: a short last chunk
CASES = [
    ("digits_cnn", "emulator", "loihi2"),
    ("digits_cnn", "crossbar", "pcm"),
    ("digits_mlp", "emulator", "loihi2"),
    ("digits_mlp", "crossbar", "pcm"),
]


@functools.cache
def _case(model: str, backend: str, profile: str):
    """(snn, deployment, x (SAMPLES, *input_shape), y (SAMPLES,)) of one case."""
    net = nd.load_model(model)
    x_train = nd.datasets.digits("train")[0].reshape(-1, *net.input_shape)
    x, y = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_train)
    dep = nd.deploy(snn, profile, backend=backend, seed=2)
    return snn, dep, x[:SAMPLES].reshape(-1, *net.input_shape), y[:SAMPLES]


def _budget(snn, dep, samples_per_chunk: int) -> int:
    """A memory budget whose chunks hold exactly samples_per_chunk samples."""
    return samples_per_chunk * working_bytes(snn, dep)


def _equal(a, b) -> bool:
    """Deep equality of reports' dicts and figure data (arrays bit for bit)."""
    if isinstance(a, dict):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a == b or (a != a and b != b)  # NaN accuracies without labels


@functools.cache
def _whole(case) -> nd.CrossCheckReport:
    """The report with the whole batch in one chunk."""
    snn, dep, x, y = _case(*case)
    with one_blas_thread():
        return nd.crosscheck(snn, dep, x, y, memory_budget=_budget(snn, dep, SAMPLES))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(CASES),
    samples_per_chunk=st.one_of(st.just(1), st.integers(2, 7), st.just(SAMPLES)),
)
def test_report_is_the_same_for_any_memory_budget(case, samples_per_chunk):
    snn, dep, x, y = _case(*case)
    whole = _whole(case)
    with one_blas_thread():
        chunked = nd.crosscheck(
            snn, dep, x, y, memory_budget=_budget(snn, dep, samples_per_chunk)
        )
    assert chunked.to_dict() == whole.to_dict()
    assert _equal(chunked.plots, whole.plots)
    assert whole.attribution is not None and whole.metrics["samples"] == SAMPLES
    assert sum(whole.layers[1].histogram["counts"]) == SAMPLES * whole.layers[1].neurons


@pytest.mark.parametrize("case", CASES[:2])
def test_given_traces_are_read_in_chunks_to_the_same_report(case):
    """Whole-batch traces handed in (the existing API) give the streamed run's report."""
    snn, dep, x, y = _case(*case)
    with one_blas_thread():
        reference = nd.simulate(snn, x)
        hardware = dep.run(x)
        given_traces = nd.crosscheck(
            snn, dep, x, y, hardware=hardware, reference=reference,
            memory_budget=_budget(snn, dep, 3),
        )
    assert given_traces.to_dict() == _whole(case).to_dict()
    assert _equal(given_traces.plots, _whole(case).plots)


def test_streamed_run_keeps_no_whole_batch_spike_times(monkeypatch):
    """The deployment's run is asked for no spike times and hands its chunks over, each
    within the budget's chunk size."""
    snn, dep, x, y = _case("digits_cnn", "emulator", "loihi2")
    seen = []
    run = type(dep).run

    def spy(self, x, *args, keep=None, stream=None, **kwargs):
        seen.append((keep, stream is not None))
        if stream is None:
            return run(self, x, *args, keep=keep, **kwargs)
        sizes = []

        def consume(lo, hi, logits, spike_times):
            sizes.append(hi - lo)
            assert all(t.shape[0] == hi - lo for t in spike_times.values())
            stream.consume(lo, hi, logits, spike_times)

        trace = run(self, x, *args, keep=keep, stream=ChunkStream(stream.samples, consume),
                    **kwargs)
        assert max(sizes) <= 4 and sum(sizes) == len(x)
        return trace

    monkeypatch.setattr(type(dep), "run", spy)
    report = nd.crosscheck(snn, dep, x, y, attribution=False, memory_budget=_budget(snn, dep, 4))
    # two passes over the chunks (the histograms' range needs the whole batch first)
    assert seen == [((), True), ((), True)]
    assert report.samples == SAMPLES


def test_memory_budget_errors_name_the_argument():
    snn, dep, x, y = _case("digits_mlp", "emulator", "loihi2")
    with pytest.raises(UsageError, match="memory_budget"):
        nd.crosscheck(snn, dep, x, y, memory_budget=0)
    with pytest.raises(UsageError, match="memory_budget"):
        nd.crosscheck(snn, dep, x, y, memory_budget="lots")
