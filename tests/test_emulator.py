"""The fixed-point emulator: exact on the ideal profile, integer semantics, quantisation trends."""

from __future__ import annotations

import numpy as np
import pytest
from netgen import random_inputs, random_network

import neurodeploy as nd
from neurodeploy.backends.emulator import EmulatorDeployment
from neurodeploy.deploy import deploy
from neurodeploy.modelio import SHIPPED_MODELS_DIR
from neurodeploy.simulate import time_pool
from neurodeploy.ttfs import OutputLayer, SpikingLayer, TimePool, apply_synapses

MODELS = SHIPPED_MODELS_DIR


def loihi(**overrides) -> nd.HardwareProfile:
    return nd.load_profile("loihi2").with_overrides(overrides)


@pytest.fixture(scope="module")
def digits_cnn():
    net = nd.load_model(MODELS / "digits_cnn")
    x_tr, _ = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr)
    return snn, x_te[:200], y_te[:200], nd.simulate(snn, x_te[:200])


def assert_same_spikes(a: nd.Trace, b: nd.Trace, tolerance: float = 1e-9):
    assert a.spike_times.keys() == b.spike_times.keys()
    for name in a.spike_times:
        ta, tb = a.spike_times[name], b.spike_times[name]
        np.testing.assert_array_equal(np.isfinite(ta), np.isfinite(tb), err_msg=name)
        fired = np.isfinite(ta)
        assert np.abs(ta[fired] - tb[fired]).max(initial=0) <= tolerance, name


@pytest.mark.parametrize("neuron", ["b1", "alpha1"])
def test_ideal_profile_reproduces_the_reference(neuron):
    net = random_network(11)
    x = random_inputs(net, 24, 11)
    snn = nd.convert(net, calibration=x, neuron=neuron)
    trace = deploy(snn, "ideal", backend="emulator").run(x)
    ref = nd.simulate(snn, x)
    assert_same_spikes(trace, ref)
    np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=1e-9)
    assert trace.backend == "emulator"
    np.testing.assert_allclose(trace.latency_s, snn.latency * 1e-6)


def _naive_chip(dep: EmulatorDeployment, x: np.ndarray):
    """Literal step-by-step integer execution of the emulator's program, one sample at a
    time with Python integers: the specification the vectorised emulator must meet."""
    snn, steps = dep.snn, dep.profile.timing.steps_per_window
    limit = dep.profile.neuron.membrane_bits
    limit = None if limit is None else 2 ** (limit - 1) - 1
    clip = (lambda v: max(-limit, min(limit, v))) if limit else (lambda v: v)
    logits = []
    for sample in x:
        x01 = np.clip((sample - snn.input_range[0]) / np.ptp(snn.input_range), 0, 1)
        d = np.floor(x01 * steps + 0.5)
        t = np.where(d > 0, (steps - d) / steps, np.inf)[None]
        for stage in snn.stages:
            if isinstance(stage, TimePool):
                t = time_pool(stage, t)
                continue
            prog = dep.programs[stage.name]
            end = stage.t_read if isinstance(stage, OutputLayer) else stage.t_min
            arrive_step = np.where(np.isfinite(t), steps - np.rint((end - t) / prog.dt_in), -1)
            n_in = int(np.prod(stage.input_shape))
            basis = np.eye(n_in).reshape(n_in, *stage.input_shape)
            matrix = apply_synapses(prog.synapses, basis).reshape(n_in, -1).astype(np.int64)
            arrive_step = arrive_step.reshape(-1)
            n_out = matrix.shape[1]
            current = [0] * n_out
            start = prog.bias.reshape(-1) if isinstance(stage, OutputLayer) else np.zeros(n_out)
            v = [int(b) for b in start]
            for k in range(steps):
                arriving = np.flatnonzero(arrive_step == k)
                for i in range(n_out):
                    current[i] = clip(current[i] + int(matrix[arriving, i].sum()))
                    v[i] = clip(v[i] + current[i])
            if isinstance(stage, OutputLayer):
                logits.append(np.array(v, dtype=np.float64) * prog.lsb)
                break
            theta = prog.threshold.reshape(-1)
            fire = np.full(n_out, np.inf)
            for i in range(n_out):
                for m in range(steps):
                    if v[i] >= theta[i]:
                        fire[i] = stage.t_min + m * prog.dt
                        break
                    v[i] = clip(v[i] + int(prog.ramp))
            t = fire.reshape(1, *stage.output_shape)
    return np.array(logits)


@pytest.mark.parametrize("membrane_bits", [24, 9])
def test_vectorised_emulator_equals_literal_integer_execution(membrane_bits):
    """9 bits forces saturating step-by-step integration; 24 bits the closed form."""
    layers = (
        nd.Dense("fc1", np.random.default_rng(0).normal(0, 0.5, (12, 6)), np.full(12, 0.1)),
        nd.ReLU("r1"),
        nd.Dense("fc2", np.random.default_rng(1).normal(0, 0.5, (8, 12)), np.zeros(8)),
        nd.ReLU("r2"),
        nd.Dense("out", np.random.default_rng(2).normal(0, 0.5, (3, 8)), np.zeros(3)),
    )
    net = nd.Network("tiny", (6,), (0.0, 1.0), layers)
    x = np.random.default_rng(3).uniform(0, 1, (12, 6))
    snn = nd.convert(net, calibration=x)
    dep = deploy(
        snn,
        loihi(
            **{
                "neuron.membrane_bits": membrane_bits,
                "timing.steps_per_window": 8,
                "weights.bits": 6,
            }
        ),
    )
    stepped = [p.stepped for p in dep.programs.values()]
    assert any(stepped) if membrane_bits == 9 else not any(stepped)
    np.testing.assert_array_equal(dep.run(x).output, _naive_chip(dep, x))


def test_conv_network_equals_literal_integer_execution(digits_cnn):
    snn, x, _, _ = digits_cnn
    dep = deploy(snn, loihi(**{"timing.steps_per_window": 8}))
    np.testing.assert_array_equal(dep.run(x[:3]).output, _naive_chip(dep, x[:3]))


def test_spike_times_lie_on_each_layers_step_grid(digits_cnn):
    snn, x, _, _ = digits_cnn
    trace = deploy(snn, "loihi2").run(x)
    for stage in snn.stages:
        if isinstance(stage, (SpikingLayer, TimePool)):
            t = trace.spike_times[stage.name]
            steps = (t[np.isfinite(t)] - stage.t_min) / trace.step_size[stage.name]
            np.testing.assert_allclose(steps, np.rint(steps), atol=1e-9)
            assert steps.min() >= 0 and steps.max() < 32


def test_quantisation_error_shrinks_with_steps_and_bits(digits_cnn):
    snn, x, _, ref = digits_cnn

    def error(**over):
        out = deploy(snn, loihi(**over)).run(x).output
        return np.abs(out - ref.output).mean()

    by_steps = [error(**{"timing.steps_per_window": k}) for k in (4, 16, 64)]
    by_bits = [error(**{"weights.bits": b, "timing.steps_per_window": 256}) for b in (3, 5, 8)]
    assert by_steps[0] > by_steps[1] > by_steps[2]
    assert by_bits[0] > by_bits[1] > by_bits[2]


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_enough_steps_and_bits_agree_with_the_reference(name):
    net = nd.load_model(MODELS / name)
    x_tr, _ = nd.datasets.digits("train")
    x_te, _ = nd.datasets.digits("test")
    x_tr = x_tr.reshape(len(x_tr), *net.input_shape)
    x_te = x_te.reshape(len(x_te), *net.input_shape)
    snn = nd.convert(net, calibration=x_tr)
    trace = deploy(snn, loihi(**{"timing.steps_per_window": 128, "weights.bits": 12})).run(x_te)
    assert np.mean(trace.predictions == nd.simulate(snn, x_te).predictions) >= 0.99


def test_narrow_membrane_overflows_and_is_counted(digits_cnn):
    snn, x, _, ref = digits_cnn
    wide = deploy(snn, "loihi2").run(x)
    narrow = deploy(snn, loihi(**{"neuron.membrane_bits": 12})).run(x)
    assert sum(wide.overflow.values()) == 0
    assert sum(narrow.overflow.values()) > 0
    assert np.mean(narrow.predictions == ref.predictions) < np.mean(
        wide.predictions == ref.predictions
    )


def test_runs_are_deterministic(digits_cnn):
    snn, x, _, _ = digits_cnn
    a = deploy(snn, "loihi2", seed=0).run(x)
    b = deploy(snn, "loihi2", seed=5).run(x)
    np.testing.assert_array_equal(a.output, b.output)  # no randomness in a digital core


def test_latency_energy_and_mapping(digits_cnn):
    snn, x, _, _ = digits_cnn
    dep = deploy(snn, "loihi2")
    trace = dep.run(x)
    windows = 1 + len(snn.spiking_layers)
    np.testing.assert_allclose(trace.latency_s, windows * 32 * 1e-6)
    assert np.all(trace.energy_j > 0)
    # More spikes cost more energy: the sample with most spikes costs the most.
    busiest, quietest = np.argmax(trace.spike_count), np.argmin(trace.spike_count)
    assert trace.energy_j[busiest] > trace.energy_j[quietest]
    summary = dep.summary()
    assert [layer["name"] for layer in summary["layers"]] == ["conv1", "fc1", "out"]
    conv = summary["layers"][0]
    assert conv["neurons"] == 512 and conv["weight_bits"] == 8 and conv["window_steps"] == 32
    # 3x3 taps over an 8x8 map with zero padding: 22 in-bound taps per axis, 8 kernels.
    assert conv["synapses"] == 8 * (3 * 8 - 2) ** 2
    assert summary["cores"] >= 3 and summary["chips"] == 1
    assert summary["energy_j_per_inference"] == pytest.approx(trace.energy_j.mean())


def test_wrong_profile_or_neuron_is_refused(digits_cnn):
    snn, _, _, _ = digits_cnn
    with pytest.raises(nd.DeployError, match="crossbar hardware.*emulator"):
        deploy(snn, "pcm", backend="emulator")
    net = random_network(0)
    alpha = nd.convert(net, calibration=random_inputs(net, 4, 0), neuron="alpha1")
    with pytest.raises(nd.DeployError, match="b1"):
        deploy(alpha, "loihi2")
    with pytest.raises(nd.UsageError, match="backend"):
        deploy(snn, "loihi2", backend="fpga")
