"""Lava backend: bit-exact with the emulator, float model close to the reference, and no
Lava process outlives a run, whatever happens in it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from residual import conv_resnet, dense_resnet

import neurodeploy as nd
from neurodeploy.backends.lava import LavaRunError
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR


def converted(name: str, samples: int):
    net = nd.load_model(MODELS / name)
    x_tr, _ = nd.datasets.digits("train")
    x_te, _ = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr.reshape(len(x_tr), *net.input_shape))
    return snn, x_te[:samples].reshape(samples, *net.input_shape)


def child_processes() -> list[str]:
    """Command lines of this process's children (multiprocessing's resource tracker is
    Python's own helper, started with the first shared memory, not Lava's)."""
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
            pids += fh.read().split()
    commands = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline") as fh:
                commands.append(fh.read().replace("\0", " "))
        except FileNotFoundError:
            pass
    return [c for c in commands if "resource_tracker" not in c]


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_fixed_point_lava_spikes_exactly_like_the_emulator(name):
    snn, x = converted(name, 50)
    emulator = nd.deploy(snn, "loihi2").run(x)
    # batch 16: four chunks through one compiled graph, the last one partial
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=16).run(x)
    assert lava.spike_times.keys() == emulator.spike_times.keys()
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)
    assert lava.saturated_per_layer == emulator.saturated_per_layer
    np.testing.assert_array_equal(lava.energy_j, emulator.energy_j)
    assert lava.backend == "lava:fixed_pt"


def test_saturating_membrane_matches_the_emulator():
    snn, x = converted("digits_mlp", 20)
    profile = nd.load_profile("loihi2").with_overrides(
        {"neuron.membrane_bits": 12, "neuron.number_format": "generic"}
    )
    emulator = nd.deploy(snn, profile).run(x)
    lava = nd.deploy(snn, profile, backend="lava").run(x)
    assert sum(emulator.overflow.values()) > 0
    assert lava.overflow == emulator.overflow
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_floating_point_lava_agrees_with_the_reference(name):
    snn, x = converted(name, 50)
    lava = nd.deploy(snn, "loihi2", backend="lava", tag="floating_pt").run(x)
    reference = nd.simulate(snn, x)
    assert np.mean(lava.predictions == reference.predictions) >= 0.98
    assert lava.backend == "lava:floating_pt"


def test_a_failing_model_raises_and_leaves_no_lava_process(monkeypatch):
    from neurodeploy.lava import models

    original = models.PyTTFSNeuronFixed.step

    def failing(self):
        if self.time_step == 5:
            raise RuntimeError("injected fault")
        return original(self)

    monkeypatch.setattr(models.PyTTFSNeuronFixed, "step", failing)
    snn, x = converted("digits_mlp", 10)
    with pytest.raises(LavaRunError, match="injected fault"):
        nd.deploy(snn, "loihi2", backend="lava").run(x)
    assert child_processes() == []


def _shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _orphaned(segments: set[str]) -> set[str]:
    """The shared-memory segments among ``segments`` that still exist and that no live
    process maps (other runs on the machine may own new segments of their own)."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                mapped.update(
                    line.rsplit("/dev/shm/", 1)[1].split()[0]
                    for line in maps
                    if "/dev/shm/" in line
                )
        except OSError:
            continue
    return {name for name in segments if os.path.exists(f"/dev/shm/{name}")} - mapped


@pytest.mark.parametrize(
    "signum, code, word",
    [
        (signal.SIGINT, 130, "interrupted"),  # Ctrl-C: the whole process group
        (signal.SIGTERM, -signal.SIGTERM, ""),  # `kill PID`: the parent only
        (signal.SIGHUP, -signal.SIGHUP, ""),  # closed terminal: the whole group
    ],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_a_terminating_signal_stops_the_runtime_and_leaves_nothing(tmp_path, signum, code, word):
    script = tmp_path / "long_run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        import numpy as np
        import neurodeploy as nd
        x_tr, _ = nd.datasets.digits("train")
        x, _ = nd.datasets.digits("all")
        snn = nd.convert(nd.load_model({str(MODELS / "digits_cnn")!r}), calibration=x_tr)
        print("running", flush=True)
        try:
            nd.deploy(snn, "loihi2", backend="lava", batch=32).run(np.concatenate([x] * 4))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        print("finished", flush=True)
    """)
    )
    shm_before = _shm_segments()
    private_tmp = tmp_path / "tmp"  # the run's temporary files go here, and only its own
    private_tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(private_tmp)},
    )
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(3)  # inside the Lava run
        if signum == signal.SIGTERM:
            os.kill(proc.pid, signum)
        else:
            os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and out.strip() == word, err[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        if not left.stdout.split():
            break
        time.sleep(0.2)
    assert left.stdout.split() == []
    assert _orphaned(_shm_segments() - shm_before) == set()
    assert list(private_tmp.iterdir()) == []


def test_lava_needs_a_digital_profile():
    snn, _ = converted("digits_mlp", 1)
    with pytest.raises(nd.DeployError, match="lava backend runs digital"):
        nd.deploy(snn, "pcm", backend="lava")
    with pytest.raises(nd.UsageError, match="tag"):
        nd.deploy(snn, "loihi2", backend="lava", tag="int4")


def _run_script(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess:
    """Run ``source`` in a fresh interpreter (Lava not yet imported, multiprocessing as new)."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    package_root = Path(nd.__file__).resolve().parent.parent  # where neurodeploy is imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), sys.path[0]])}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )


def test_a_dask_sweep_then_a_lava_run_in_one_process(tmp_path):
    """Lava's import calls multiprocessing.set_start_method('fork'), which raised once dask
    (or any process pool) had used multiprocessing: the backend now imports it without."""
    done = _run_script(
        tmp_path,
        "sweep_then_lava.py",
        f"""
        import multiprocessing
        import numpy as np
        import neurodeploy as nd
        from neurodeploy.sweep import make_spec, run_sweep

        def main():  # (dask's worker processes are spawned: they import this file)
            model = {str(MODELS / "digits_mlp")!r}
            spec = make_spec(model, "pcm", [("crossbar.levels", [8])], 1, 20, None, None, 50, 0.5)
            run_sweep(spec, {str(tmp_path / "sweep")!r}, executor="dask", workers=1)
            method = multiprocessing.get_start_method(allow_none=True)
            x_tr, _ = nd.datasets.digits("train")
            x_te, _ = nd.datasets.digits("test")
            snn = nd.convert(nd.load_model(model), calibration=x_tr[:50].reshape(50, -1))
            x = x_te[:10].reshape(10, -1)
            lava = nd.deploy(snn, "loihi2", backend="lava").run(x)
            emulator = nd.deploy(snn, "loihi2", backend="emulator").run(x)
            np.testing.assert_array_equal(lava.output, emulator.output)
            assert multiprocessing.get_start_method(allow_none=True) == method  # untouched
            print("ok")

        if __name__ == "__main__":
            main()
        """,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_importing_lava_through_the_backend_sets_no_start_method(tmp_path):
    done = _run_script(
        tmp_path,
        "import_lava.py",
        """
        import multiprocessing
        from neurodeploy.backends.lava import import_lava_runtime

        import_lava_runtime()
        import lava.magma.core.process.process  # the rest of Lava, as the backend uses it
        print(multiprocessing.get_start_method(allow_none=True))
        """,
    )
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr[-3000:]


@pytest.mark.parametrize("make", [dense_resnet, conv_resnet], ids=["dense", "conv"])
def test_fixed_point_lava_runs_residual_nets_exactly_like_the_emulator(make):
    """Shortcut groups through delay processes; batch 5: a partial last chunk."""
    snn, x = make(0)
    x = x[:12]
    emulator = nd.deploy(snn, "loihi2").run(x)
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=5).run(x)
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)
    np.testing.assert_array_equal(lava.energy_j, emulator.energy_j)


def test_lava_keep_trims_the_trace_and_keeps_every_count_and_cost():
    """keep=: the trace holds the kept stages only; output, energy, spike counts of every
    stage and the energy breakdown are the emulator's full run's. A bad name is refused
    before Lava starts."""
    from neurodeploy.simulate import stages_with_spike_times

    snn, x = conv_resnet(0)
    x = x[:12]
    emulator_dep = nd.deploy(snn, "loihi2")
    emulator = emulator_dep.run(x)
    dep = nd.deploy(snn, "loihi2", backend="lava", batch=5)
    lava = dep.run(x, keep=("conv1",))
    assert set(lava.spike_times) == {"conv1"}
    np.testing.assert_array_equal(lava.spike_times["conv1"], emulator.spike_times["conv1"])
    np.testing.assert_array_equal(lava.output, emulator.output)
    np.testing.assert_array_equal(lava.energy_j, emulator.energy_j)
    for name in stages_with_spike_times(snn):
        np.testing.assert_array_equal(lava.layer_spikes(name), emulator.layer_spikes(name))
    np.testing.assert_array_equal(lava.spike_count, emulator.spike_count)
    assert lava.saturated_per_layer == emulator.saturated_per_layer
    assert lava.overflow == emulator.overflow
    assert dep.energy_breakdown(lava) == emulator_dep.energy_breakdown(emulator)
    with pytest.raises(nd.UsageError, match="'nope' is no stage"):
        dep.run(x, keep=("nope",))
    assert child_processes() == []


def test_saturating_residual_joins_match_the_emulator():
    snn, x = dense_resnet(0)
    profile = nd.load_profile("loihi2").with_overrides(
        {
            "neuron.membrane_bits": 8,
            "neuron.number_format": "generic",
            "timing.steps_per_window": 8,
            "weights.bits": 6,
        }
    )
    emulator = nd.deploy(snn, profile).run(x[:8])
    lava = nd.deploy(snn, profile, backend="lava").run(x[:8])
    assert emulator.overflow["fc3"] > 0  # a join saturates
    assert lava.overflow == emulator.overflow
    np.testing.assert_array_equal(lava.output, emulator.output)


def test_floating_point_lava_on_a_residual_net_stays_within_the_step_grid_bound():
    """floating_pt differs from the reference only by the step grid: the cross-check
    finds every stage, the joins included, within that bound."""
    snn, x = conv_resnet(0)
    dep = nd.deploy(snn, "loihi2", backend="lava", tag="floating_pt")
    report = nd.crosscheck(snn, dep, x[:10])
    assert report.divergence_layer is None, report.reasons
    assert report.agreement == 1.0


def test_chunk_size_keeps_a_progress_bar_moving():
    """Without a batch, a chunk (the batch entering the pipeline each window) holds at
    most CHUNK_WORK of one window's work (synapses x 32 steps x samples) and MAX_CHUNK
    samples, spread evenly (all 1797 digits through digits_cnn: two chunks of 899),
    never more samples than the run has; a batch given is honoured; the progress
    callback is called once per chunk."""
    from neurodeploy.backends.lava import CHUNK_WORK, MAX_CHUNK, MIN_CHUNK

    snn, x = converted("digits_cnn", 40)
    auto = nd.deploy(snn, "loihi2", backend="lava")
    assert auto.chunk_size(1797) == 899 and auto.chunk_size(40) == 40
    assert nd.deploy(snn, "loihi2", backend="lava", batch=300).chunk_size(540) == 300
    synapses = sum(p.synapse_count for p in auto.programs.values())
    for samples in (1797, 5000, 10**5):
        chunk = auto.chunk_size(samples)
        chunks = -(-samples // chunk)
        assert MIN_CHUNK <= chunk <= MAX_CHUNK and synapses * 32 * chunk <= CHUNK_WORK
        assert chunks * chunk - samples < chunks  # even: no small last chunk
    calls = []
    nd.deploy(snn, "loihi2", backend="lava", batch=16).run(x, progress=lambda *a: calls.append(a))
    assert calls == [(16, 40), (32, 40), (40, 40)]


def test_synapse_messages_are_int32_only_where_the_bound_allows():
    """A drive goes out as int32 only when every spike pattern gives |a| < 2^31 (all
    inputs spiking, absolute weights); floating_pt keeps float64."""
    from neurodeploy.backends.lava import import_lava_runtime

    import_lava_runtime()
    from neurodeploy.lava.models import PySynapsesInt32Model, PySynapsesModel, process_model
    from neurodeploy.lava.process import Synapses

    def synapses(weight):
        layer = nd.Dense("fc", weight, np.zeros(len(weight)))
        return Synapses(
            batch=2, in_shape=(3,), out_shape=(2,), weight=weight, ops=(layer,), error_path="-"
        )

    narrow = synapses(np.array([[2.0**29, -(2.0**29), 2.0**29], [1.0, 2.0, 3.0]]))
    wide = synapses(np.array([[2.0**29, -(2.0**30), 2.0**29], [1.0, 2.0, 3.0]]))
    assert narrow.proc_params["bound"] == 3 * 2**29 and wide.proc_params["bound"] == 2**31
    assert process_model(narrow, "fixed_pt") is PySynapsesInt32Model
    assert process_model(wide, "fixed_pt") is PySynapsesModel
    assert process_model(narrow, "floating_pt") is PySynapsesModel
