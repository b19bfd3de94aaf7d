"""Loihi 2 number formats (neuron.number_format 'loihi2', the loihi2 profile's default):
the emulator and the Lava fixed_pt models hold weights, threshold, ramp and registers as
Lava's bit-accurate Loihi models do, wrap and saturate alike, and count every overflow."""

from __future__ import annotations

import numpy as np
import pytest
from test_emulator import _naive_chip

import neurodeploy as nd
from neurodeploy.backends.emulator import (
    LOIHI_BIAS_EXP_MAX,
    LOIHI_BIAS_MANT_BITS,
    LOIHI_WEIGHT_EXP_MAX,
    loihi_ramp,
    loihi_weight_shift,
    wrap_current,
    wrap_dendrite,
)


def _wide_fan_in(inputs: int = 160):
    """Dense(inputs -> 3) with equal positive weights, then Dense(3 -> 2), calibrated on
    small inputs: inputs that all spike in one step sum to 160 x 127 x 2 > 2^15 in the
    16-bit dendritic register, and their integral overflows the 24-bit membrane."""
    rng = np.random.default_rng(5)
    layers = (
        nd.Dense(
            "fc1",
            np.full((3, inputs), 1.0) + rng.uniform(0, 1e-3, (3, inputs)),
            np.array([0.0, -0.5, 0.2]),
        ),
        nd.ReLU("r1"),
        nd.Dense("out", rng.normal(0, 0.5, (2, 3)), np.zeros(2)),
    )
    net = nd.Network("wide", (inputs,), (0.0, 1.0), layers)
    calibration = rng.uniform(0, 0.05, (32, inputs))
    snn = nd.convert(net, calibration=calibration)
    # all inputs equal: every input neuron spikes in the same step
    x = np.repeat(np.linspace(0.2, 1.0, 6)[:, None], inputs, axis=1)
    return snn, np.concatenate([x, calibration[:4]])


def test_register_helpers_follow_lavas_bit_accurate_models():
    assert wrap_dendrite(np.array([32767.0, 32768.0, -32768.0, -32769.0])).tolist() == [
        32767,
        -32768,
        -32768,
        32767,
    ]
    top = 2.0**23  # PyLifModelBitAcc: u > 2^23 wraps down, u <= -2^23 wraps up
    assert wrap_current(np.array([top, top + 1, -top, -top + 1])).tolist() == [
        top,
        -top + 1,
        top,
        -top + 1,
    ]
    assert loihi_weight_shift(8) == 7 and loihi_weight_shift(4) == 11
    ramp, exp = loihi_ramp(100_000.4)
    assert 0 <= exp <= LOIHI_BIAS_EXP_MAX
    assert ramp % 2**exp == 0 and ramp / 2**exp < 2 ** (LOIHI_BIAS_MANT_BITS - 1)
    assert abs(ramp - 100_000.4) <= 2 ** (exp - 1) + 0.5
    assert loihi_ramp(5e7)[1] == -1  # beyond mant 4095 x 2^7: not representable


def test_digits_programs_hold_loihi_formats():
    net = nd.load_model(nd.modelio.SHIPPED_MODELS_DIR / "digits_cnn")
    x_tr, _ = nd.datasets.digits("train")
    snn = nd.convert(net, calibration=x_tr.reshape(len(x_tr), *net.input_shape))
    dep = nd.deploy(snn, "loihi2")
    for prog in dep.programs.values():
        assert prog.loihi
        assert 0 <= prog.weight_exp <= LOIHI_WEIGHT_EXP_MAX
        assert prog.shift == prog.weight_exp + loihi_weight_shift(8)
        mantissa = prog.synapses[-1].weight / 2.0**prog.shift
        assert np.array_equal(mantissa, np.rint(mantissa)) and np.abs(mantissa).max() <= 128
        if prog.vth is not None:  # unsigned 17-bit mantissa, fired on V > vth 2^6
            assert prog.vth.min() >= 0 and prog.vth.max() < 2**17
            np.testing.assert_array_equal(prog.threshold, prog.vth * 64 + 1 - prog.start)
            assert prog.ramp % 2**prog.ramp_exp == 0


def test_generic_format_with_narrow_registers_is_refused_under_loihi2():
    with pytest.raises(nd.ProfileError, match="number_format"):
        nd.load_profile("loihi2").with_overrides({"neuron.membrane_bits": 12})
    with pytest.raises(nd.ProfileError, match="8-bit mantissas"):
        nd.load_profile("loihi2").with_overrides({"weights.bits": 12})


def test_overflowing_sum_wraps_bit_exactly_in_emulator_and_lava_and_is_counted():
    """The must-show case: a layer's dendritic sum and membrane overflow their registers;
    the emulator, a literal integer execution and Lava's fixed_pt run give the same bits
    and the same overflow counts."""
    snn, x = _wide_fan_in()
    dep = nd.deploy(snn, "loihi2")
    assert dep.programs["fc1"].stepped  # no shift can guarantee the sum fits
    emulator = dep.run(x)
    assert emulator.overflow["fc1"] > 0
    np.testing.assert_array_equal(emulator.output, _naive_chip(dep, x))
    lava = nd.deploy(snn, "loihi2", backend="lava", batch=4).run(x)
    assert lava.overflow == emulator.overflow
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)


def test_hand_counted_energy_and_latency_of_a_tiny_network():
    """Dense(2 -> 1) ReLU, Dense(1 -> 1) on K = 4 steps: two windows of 4 steps, two
    neurons updated in each of the 8 steps; both inputs spike (2 synaptic ops, one per
    input), the hidden neuron spikes once at step m (1 synaptic op to the readout)."""
    layers = (
        nd.Dense("fc1", np.array([[0.6, 0.4]]), np.array([0.0])),
        nd.ReLU("r1"),
        nd.Dense("out", np.array([[1.5]]), np.array([0.1])),
    )
    net = nd.Network("tiny2", (2,), (0.0, 1.0), layers)
    x = np.array([[0.9, 0.6]])
    snn = nd.convert(net, calibration=np.array([[1.0, 1.0], [0.5, 0.2]]))
    profile = nd.load_profile("loihi2").with_overrides({"timing.steps_per_window": 4})
    dep = nd.deploy(snn, profile)
    trace = dep.run(x)
    t = trace.spike_times["fc1"][0, 0]
    assert np.isfinite(t)
    m = round((t - snn.stage("fc1").t_min) / dep.programs["fc1"].dt)
    steps, neurons = 8, 2
    active = 4 + (m + 1) + 4  # fc1: its input window and up to its spike; out: its input window
    synops, spikes = 2 + 1, 2 + 1
    expected = (
        synops * 23.6e-12 + active * 81e-12 + (steps * neurons - active) * 52e-12 + spikes * 1.7e-12
    )
    np.testing.assert_allclose(trace.energy_j, [expected], rtol=1e-12)
    np.testing.assert_allclose(trace.latency_s, [steps * 1e-6], rtol=1e-12)
    breakdown = dep.summary()["energy_breakdown"]
    assert breakdown["counts"] == {
        "synaptic_ops": 3.0,
        "active_neuron_updates": float(active),
        "inactive_neuron_updates": float(steps * neurons - active),
        "spikes": 3.0,
    }


def test_a_neuron_beyond_a_cores_synapses_is_refused_with_its_layer():
    snn, _ = _wide_fan_in()
    profile = nd.load_profile("loihi2").with_overrides({"cores.synaptic_memory_bits": 1000})
    with pytest.raises(
        nd.DeployError, match="layer 'fc1': a neuron has 160 input synapses x 8 bits = 1280 bits"
    ):
        nd.deploy(snn, profile)
    summary = nd.deploy(snn, "loihi2").summary()
    assert all(layer["chips"] == 1 for layer in summary["layers"])


def test_lavas_own_bit_accurate_dense_gives_the_emulators_bits_also_when_overflowing():
    """Lava's Dense (PyDenseModelBitAcc) + our TTFS neuron, one sample per step: the same
    bits and overflow counts as the emulator on the overflowing wide layer."""
    snn, x = _wide_fan_in()
    emulator = nd.deploy(snn, "loihi2").run(x[:6])
    assert emulator.overflow["fc1"] > 0
    lava = nd.deploy(snn, "loihi2", backend="lava", lava_dense=True).run(x[:6])
    assert lava.overflow == emulator.overflow
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)


def test_digits_mlp_on_lavas_dense_spikes_exactly_like_the_emulator():
    net = nd.load_model(nd.modelio.SHIPPED_MODELS_DIR / "digits_mlp")
    x_tr, _ = nd.datasets.digits("train")
    x_te, _ = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr.reshape(len(x_tr), *net.input_shape))
    x = x_te[:12].reshape(12, *net.input_shape)
    emulator = nd.deploy(snn, "loihi2").run(x)
    lava = nd.deploy(snn, "loihi2", backend="lava", lava_dense=True).run(x)
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)


def test_lava_dense_refuses_what_lavas_dense_cannot_hold():
    net = nd.load_model(nd.modelio.SHIPPED_MODELS_DIR / "digits_cnn")
    x_tr, _ = nd.datasets.digits("train")
    snn = nd.convert(net, calibration=x_tr.reshape(len(x_tr), *net.input_shape))
    with pytest.raises(nd.UsageError, match="lava_dense: layer 'conv1'"):
        nd.deploy(snn, "loihi2", backend="lava", lava_dense=True)
