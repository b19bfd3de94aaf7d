"""The fixed-point emulator: exact on the ideal profile, integer semantics, quantisation trends."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from netgen import random_inputs, random_network
from residual import conv_resnet, dense_resnet
from residual import forward as residual_forward

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
    time with Python integers: the specification the vectorised emulator must meet.

    Spikes carry their global step (window w, step k: w K + k); a shortcut group's
    spikes are held back by its delay_steps and integrate in the step they then reach.

    Loihi formats (PyLifModelBitAcc): the drive is a 16-bit dendritic sum a that wraps,
    the current adds a << 6 and wraps at 24 bits, the membrane saturates, starts at the
    program's start and fires when it exceeds vth << 6."""
    snn, steps = dep.snn, dep.profile.timing.steps_per_window
    limit = dep.profile.neuron.membrane_bits
    limit = None if limit is None else 2 ** (limit - 1) - 1
    clip = (lambda v: max(-limit, min(limit, v))) if limit else (lambda v: v)

    def wrap(value: int, bits: int, top_included: bool) -> int:
        """Two's complement wrap; Lava's current keeps +2^(bits-1) (its ``>`` test)."""
        half = 2 ** (bits - 1)
        if top_included:
            return (
                value - 2 * half if value > half else value + 2 * half if value <= -half else value
            )
        return (value + half) % (2 * half) - half

    def add_drive(current: int, drive: int, loihi: bool) -> int:
        if not loihi:
            return clip(current + drive)
        assert drive % 64 == 0
        a = wrap(drive // 64, 16, False)
        return wrap(current + a * 64, 24, True)

    def matrix(synapses, input_shape):
        n_in = int(np.prod(input_shape))
        basis = np.eye(n_in).reshape(n_in, *input_shape)
        return apply_synapses(synapses, basis).reshape(n_in, -1).astype(np.int64)

    logits = []
    for sample in x:
        x01 = np.clip((sample - snn.input_range[0]) / np.ptp(snn.input_range), 0, 1)
        d = np.floor(x01 * steps + 0.5)
        # global spike steps per stage (-1: no spike); the input window is window 0
        spikes = {"input": np.where(d > 0, steps - d, -1).reshape(-1)}
        times = {"input": np.where(d > 0, (steps - d) / steps, np.inf)[None]}
        window = 0  # the window the current stage's inputs arrive in
        previous = "input"
        for stage in snn.stages:
            if isinstance(stage, TimePool):
                t = time_pool(stage, times[previous])
                k = np.rint((t - stage.t_min) / dep.step_size[stage.name])
                times[stage.name] = t
                spikes[stage.name] = np.where(np.isfinite(t), window * steps + k, -1).reshape(-1)
                previous = stage.name
                continue
            prog = dep.programs[stage.name]
            groups = [(matrix(prog.synapses, stage.input_shape), spikes[previous])]
            for shortcut, sc in zip(stage.shortcuts, prog.shortcuts, strict=True):
                arrival = np.where(spikes[sc.source] >= 0, spikes[sc.source] + sc.delay_steps, -1)
                groups.append((matrix(sc.synapses, shortcut.input_shape), arrival))
            n_out = groups[0][0].shape[1]
            current = [0] * n_out
            if isinstance(stage, OutputLayer):
                start = prog.bias.reshape(-1)
            else:
                start = np.broadcast_to(prog.start, stage.output_shape).reshape(-1)
            v = [int(b) for b in start]
            for k in range(window * steps, (window + 1) * steps):
                for i in range(n_out):
                    drive = sum(int(w[arrive == k, i].sum()) for w, arrive in groups)
                    current[i] = add_drive(current[i], drive, prog.loihi)
                    v[i] = clip(v[i] + current[i])
            if isinstance(stage, OutputLayer):
                logits.append(np.array(v, dtype=np.float64) * prog.lsb)
                break
            window += 1
            if prog.loihi:
                theta = [int(vth) * 64 + 1 for vth in prog.vth.reshape(-1)]
            else:
                theta = prog.threshold.reshape(-1)
            fire = np.full(n_out, -1)
            for i in range(n_out):
                for m in range(steps):
                    if v[i] >= theta[i]:
                        fire[i] = window * steps + m
                        break
                    v[i] = clip(v[i] + int(prog.ramp))
            spikes[stage.name] = fire
            t = np.where(fire >= 0, stage.t_min + (fire - window * steps) * prog.dt, np.inf)
            times[stage.name] = t.reshape(1, *stage.output_shape)
            previous = stage.name
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
                "neuron.number_format": "generic",
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
    trace = deploy(
        snn,
        loihi(
            **{
                "timing.steps_per_window": 128,
                "weights.bits": 12,
                "neuron.number_format": "generic",
            }
        ),
    ).run(x_te)
    assert np.mean(trace.predictions == nd.simulate(snn, x_te).predictions) >= 0.99


def test_narrow_membrane_overflows_and_is_counted(digits_cnn):
    snn, x, _, ref = digits_cnn
    wide = deploy(snn, "loihi2").run(x)
    narrow = deploy(
        snn, loihi(**{"neuron.membrane_bits": 12, "neuron.number_format": "generic"})
    ).run(x)
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


# -- residual networks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnets():
    return {"dense": dense_resnet(0), "conv": conv_resnet(0)}


def test_residual_helper_nets_compute_the_residual_relu_network(resnets):
    for snn, x in resnets.values():
        assert snn.has_shortcuts
        ref = nd.simulate(snn, x)
        expected = residual_forward(snn, x)
        np.testing.assert_allclose(
            ref.output, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max()
        )


def test_ideal_profile_reproduces_the_reference_on_residual_nets(resnets):
    for snn, x in resnets.values():
        trace = deploy(snn, "ideal").run(x)
        ref = nd.simulate(snn, x)
        assert_same_spikes(trace, ref)
        np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("membrane_bits", [24, 8])
def test_residual_joins_equal_literal_integer_execution(resnets, kind, membrane_bits):
    """Shortcut groups with their delays, in the closed form (24 bits) and in saturating
    step-by-step integration (8 bits, overflowing)."""
    snn, x = resnets[kind]
    profile = loihi(
        **{
            "neuron.membrane_bits": membrane_bits,
            "neuron.number_format": "generic",
            "timing.steps_per_window": 8,
            "weights.bits": 6,
        }
    )
    dep = deploy(snn, profile)
    joins = [p for p in dep.programs.values() if p.shortcuts]
    assert len(joins) == 3
    stepped = [p.stepped for p in joins]
    assert all(stepped) if membrane_bits == 8 else not any(stepped)
    trace = dep.run(x[:4])
    np.testing.assert_array_equal(trace.output, _naive_chip(dep, x[:4]))
    if membrane_bits == 10:
        assert sum(trace.overflow.values()) > 0


def test_shortcut_groups_are_quantised_with_their_own_exponent(resnets):
    snn, _ = resnets["dense"]
    dep = deploy(snn, loihi(**{"weights.bits": 4}))
    prog = dep.programs["fc3"]
    (sc,) = prog.shortcuts
    assert sc.source == "fc1" and sc.delay_steps == 32  # fc1 -> fc3: fc2's window between
    np.testing.assert_allclose(sc.step_ratio, dep.step_size["fc1"] / prog.dt_in)
    # identity weights times the step ratio, on the group's 4-bit mantissa grid in membrane units
    units = sc.synapses[-1].weight
    exact = np.eye(8) * sc.step_ratio * 2.0 ** (prog.shift - prog.exponent)
    unit = 2.0 ** (sc.exponent - prog.exponent + prog.shift)
    np.testing.assert_array_equal(units % unit, 0)
    assert 4 <= np.abs(units / unit).max() <= 7  # the exponent fits the group's own weights
    assert np.abs(units - exact).max() <= unit / 2
    # conv4's projection of conv2 has smaller weights than conv4's own: a finer exponent
    snn, _ = resnets["conv"]
    prog = deploy(snn, loihi(**{"weights.bits": 4})).programs["conv4"]
    assert [sc.source for sc in prog.shortcuts] == ["conv2", "pool"]
    assert prog.shortcuts[0].exponent < prog.exponent


def test_residual_energy_and_summary_count_the_shortcut_synapses(resnets):
    snn, x = resnets["conv"]
    dep = deploy(snn, "loihi2")
    trace = dep.run(x)
    summary = {layer["name"]: layer for layer in dep.summary()["layers"]}
    conv3 = summary["conv3"]
    (link,) = conv3["shortcuts"]
    assert link["source"] == "conv1" and link["synapses"] == 4 * 8 * 8  # identity 1x1
    assert link["delay_steps"] == 32
    assert conv3["synapses"] == dep.programs["conv3"].synapse_count + link["synapses"]
    # conv4 joins conv2 (one window back) and the pool right before it (no delay)
    assert [(sc["source"], sc["delay_steps"]) for sc in summary["conv4"]["shortcuts"]] == [
        ("conv2", 32),
        ("pool", 0),
    ]
    # the same run without the shortcut synapses' events costs exactly those events less
    e = dep.profile.energy
    n = trace.num_samples
    shortcut_events = sum(
        np.isfinite(trace.spike_times[sc.source]).reshape(n, -1) @ sc.fanout
        for prog in dep.programs.values()
        for sc in prog.shortcuts
    )
    assert np.all(shortcut_events > 0)
    chain_programs = {name: replace(prog, shortcuts=()) for name, prog in dep.programs.items()}
    dep_chain = deploy(snn, "loihi2")
    dep_chain.programs = chain_programs
    np.testing.assert_allclose(
        trace.energy_j - dep_chain._energy(trace)[0], shortcut_events * e.synop_j, rtol=1e-12
    )


def test_residual_net_on_loihi2_passes_the_crosscheck(resnets):
    """Only quantisation differs: every join within its bound (the shortcut groups'
    mantissas included); a wrong shortcut group is caught at its join."""
    for snn, x in resnets.values():
        report = nd.crosscheck(snn, deploy(snn, "loihi2"), x)
        assert report.divergence_layer is None, report.reasons
    assert report.ok, report.reasons  # the conv net's margins also keep every prediction
    dep = deploy(snn, "loihi2")
    prog = dep.programs["conv3"]
    (sc,) = prog.shortcuts
    doubled = replace(sc.synapses[-1], weight=2 * sc.synapses[-1].weight)
    dep.programs["conv3"] = replace(
        prog, shortcuts=(replace(sc, synapses=(*sc.synapses[:-1], doubled)),)
    )
    assert nd.crosscheck(snn, dep, x).divergence_layer == "conv3"


def test_misaligned_shortcut_is_refused(resnets):
    snn, _ = resnets["dense"]
    fc3 = snn.stage("fc3")
    bad = replace(
        fc3, shortcuts=(replace(fc3.shortcuts[0], t_source=fc3.shortcuts[0].t_source + 0.3),)
    )
    broken = replace(snn, stages=tuple(bad if s is fc3 else s for s in snn.stages))
    with pytest.raises(nd.DeployError, match="fc3.*fc1.*whole windows"):
        deploy(broken, "loihi2")
