"""Block workers (neurodeploy.threads): convolution and large dense blocks computed on
several threads, each product on one BLAS thread. What a user relies on: the same bits
for any BLAS thread count and any number of workers, every block run once, errors
raised in the caller, and BLAS's thread settings left as they were."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from netgen import cifar_vgg, random_inputs, random_network, random_residual_network
from threadpoolctl import threadpool_info, threadpool_limits

import neurodeploy as nd
from neurodeploy import ops, threads


def _blas_threads() -> dict:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info()
            if lib["internal_api"] == "openblas"}


def _wide_network() -> nd.Network:
    """A conv net with maps above one block and a dense layer above the column-block size:
    conv blocks of output lines, gathered and padded windows, column-blocked products."""
    rng = np.random.default_rng(4)
    layers = [
        nd.Conv2d("c1", rng.normal(0, 0.5, (32, 3, 3, 3)), rng.normal(0, 0.1, 32), 1, 1),
        nd.ReLU("r1"),
        nd.Conv2d("c2", rng.normal(0, 0.08, (24, 32, 3, 3)), rng.normal(0, 0.1, 24), 1, 1),
        nd.ReLU("r2"),
        nd.MaxPool2d("p2", 2, 2),
        nd.Flatten("f"),
        nd.Dense("d1", rng.normal(0, 0.02, (600, 24 * 24 * 24)), rng.normal(0, 0.1, 600)),
        nd.ReLU("r3"),
        nd.Dense("out", rng.normal(0, 0.05, (10, 600)), np.zeros(10)),
    ]
    return nd.Network("wide", (3, 48, 48), (0.0, 1.0), tuple(layers))


CASES = {
    "wide": lambda: (_wide_network(), 5),
    "vgg": lambda: (cifar_vgg(0, widths=(8, 16, 16)), 6),
    "residual": lambda: (random_residual_network(3), 6),
    "every_kind": lambda: (random_network(11), 6),
}


def _runs(name: str, dtype: str):
    net, n = CASES[name]()
    x = random_inputs(net, n, 3) if name != "wide" else np.random.default_rng(3).uniform(
        0.0, 1.0, (n, *net.input_shape))
    snn = nd.convert(net, calibration=x)

    def run():
        return net.forward(x, dtype=dtype), nd.simulate(snn, x, dtype=dtype)

    return run


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_simulate_give_the_same_bits_for_any_thread_count(name, dtype, monkeypatch):
    """One and two BLAS threads, and the blocks on one worker or on several: the same
    logits and spike times, bit for bit."""
    run = _runs(name, dtype)
    results = []
    with threadpool_limits(1):
        results.append(run())
    with threadpool_limits(2):
        results.append(run())
        serial = threads.run_blocks
        monkeypatch.setattr(threads, "run_blocks",
                            lambda count, block, width: serial(count, block, 1))
        results.append(run())
        monkeypatch.setattr(threads, "run_blocks",
                            lambda count, block, width: serial(count, block, 3))
        results.append(run())
    (logits, trace), *others = results
    for other_logits, other_trace in others:
        assert other_logits.tobytes() == logits.tobytes()
        assert other_trace.output.tobytes() == trace.output.tobytes()
        for stage, times in trace.spike_times.items():
            assert other_trace.spike_times[stage].tobytes() == times.tobytes(), stage
        assert other_trace.saturated_per_layer == trace.saturated_per_layer
        for stage, counts in trace.spikes_per_layer.items():
            np.testing.assert_array_equal(other_trace.spikes_per_layer[stage], counts)


def test_the_wide_network_takes_every_blocked_path():
    """The case above really runs several blocks per sample and column-blocked products
    (so the thread-count test covers them)."""
    net = _wide_network()
    assert 48 * 48 > ops._MIN_BLOCK_ROWS
    dense = net.layers[6]
    assert ops.dense_in_blocks(dense.weight)
    assert dense.weight.shape[0] > ops._DENSE_COLUMNS


def test_every_block_runs_once_on_several_threads():
    seen, names = [], set()
    lock = threading.Lock()

    def block(index):
        with lock:
            seen.append(index)
            names.add(threading.current_thread().name)
        np.ones((200, 200)) @ np.ones((200, 200))  # releases the GIL

    threads.run_blocks(64, block, 2)
    assert sorted(seen) == list(range(64))
    assert len(names) == 2
    threads.run_blocks(0, block, 2)  # nothing to do
    threads.run_blocks(1, block, 4)  # one block: the caller alone
    assert len(seen) == 65


def test_an_error_in_a_block_is_raised_in_the_caller_and_the_workers_carry_on():
    def block(index):
        if index == 5:
            raise ValueError("block 5")

    with pytest.raises(ValueError, match="block 5"):
        threads.run_blocks(40, block, 2)
    done = []
    threads.run_blocks(10, done.append, 2)  # the helpers are free again
    assert sorted(done) == list(range(10))


def test_a_failing_convolution_leaves_blas_as_it_was():
    before = _blas_threads()

    def finish(block, samples, rows):
        raise RuntimeError("finish failed")

    x = np.random.default_rng(0).uniform(size=(3, 16, 40, 40))
    with pytest.raises(RuntimeError, match="finish failed"):
        ops.conv2d(x, np.ones((4, 16, 3, 3)), 1, 1, finish=finish)
    assert _blas_threads() == before


def test_blas_computes_in_one_thread_while_workers_hold_and_is_restored_after():
    before = _blas_threads()
    with threadpool_limits(2):
        with threads.block_workers() as width:
            assert width == 2
            assert set(_blas_threads().values()) == {1}
            with threads.block_workers() as inner:  # nested: the same width
                assert inner == 2
            assert set(_blas_threads().values()) == {1}
        assert set(_blas_threads().values()) == {2}
        with threads.one_blas_thread(), threads.block_workers() as width:
            assert width == 1  # a caller that asked for one thread gets no workers
    assert _blas_threads() == before


def test_holders_in_several_threads_restore_the_original_limits():
    """block_workers and one_blas_thread entered and left in any order by several threads
    (a sweep task beside a simulation): the last one out restores what was there, whichever
    thread it is (threadpoolctl 3.8 ignores a change from a thread that does not control
    OpenBLAS: this failed about once in 100 rounds when the limit went through it)."""
    before = _blas_threads()
    barrier = threading.Barrier(2)
    errors = []

    def hold(kind):
        try:
            for _ in range(300):
                with (threads.block_workers() if kind else threads.one_blas_thread()):
                    barrier.wait(timeout=10)
                    assert set(_blas_threads().values()) == {1}
                    barrier.wait(timeout=10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=hold, args=(kind,)) for kind in (True, False)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    assert _blas_threads() == before


def test_scratch_buffers_are_kept_per_thread_and_grow():
    a = threads.scratch("test", 100, np.float64)
    b = threads.scratch("test", 50, np.float32)
    assert a.size == 100 and b.size == 50 and b.dtype == np.float32
    assert np.shares_memory(a, b)  # the same buffer, reused
    c = threads.scratch("test", 1000, np.float64)
    assert c.size == 1000
    other = []
    t = threading.Thread(target=lambda: other.append(threads.scratch("test", 100, np.float64)))
    t.start()
    t.join()
    assert not np.shares_memory(other[0], threads.scratch("test", 100, np.float64))
