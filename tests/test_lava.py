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

MODELS = Path(__file__).resolve().parent.parent / "models"


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
    profile = nd.load_profile("loihi2").with_overrides({"neuron.membrane_bits": 12})
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


def test_ctrl_c_stops_the_runtime_and_leaves_no_process(tmp_path):
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
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(3)  # inside the Lava run
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and out.strip() == "interrupted", err[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        if not left.stdout.split():
            break
        time.sleep(0.2)
    assert left.stdout.split() == []


def test_lava_needs_a_digital_profile():
    snn, _ = converted("digits_mlp", 1)
    with pytest.raises(nd.DeployError, match="lava backend runs digital"):
        nd.deploy(snn, "pcm", backend="lava")
    with pytest.raises(nd.UsageError, match="tag"):
        nd.deploy(snn, "loihi2", backend="lava", tag="int4")


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


def test_saturating_residual_joins_match_the_emulator():
    snn, x = dense_resnet(0)
    profile = nd.load_profile("loihi2").with_overrides(
        {"neuron.membrane_bits": 8, "timing.steps_per_window": 8, "weights.bits": 6}
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
