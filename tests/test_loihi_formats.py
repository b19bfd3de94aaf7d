"""Loihi 2 number formats (neuron.number_format 'loihi2', the loihi2 profile's default):
the emulator and the Lava fixed_pt models hold weights, threshold, ramp and registers as
Lava's bit-accurate Loihi models do, wrap and saturate alike, and count every overflow."""

from __future__ import annotations

import numpy as np
import pytest
from residual import conv_resnet, dense_resnet
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
from neurodeploy.ttfs import apply_synapses


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


def _digits_cnn():
    net = nd.load_model(nd.modelio.SHIPPED_MODELS_DIR / "digits_cnn")
    x_tr, _ = nd.datasets.digits("train")
    x_te, _ = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr.reshape(len(x_tr), *net.input_shape))
    return snn, x_te[:4].reshape(4, *net.input_shape)


def _same_bits(lava, emulator) -> None:
    assert lava.spike_times.keys() == emulator.spike_times.keys()
    for stage in emulator.spike_times:
        np.testing.assert_array_equal(lava.spike_times[stage], emulator.spike_times[stage])
    np.testing.assert_array_equal(lava.output, emulator.output)
    assert lava.overflow == emulator.overflow
    assert lava.saturated_per_layer == emulator.saturated_per_layer


def test_lowering_composes_each_op_chain_into_one_exact_matrix():
    """Flatten, sum pools (multiplicities included) and conv (stride, padding, groups) or
    dense: the composed matrix gives the op chain's sums on integer inputs; a conv's
    matrix is the one Lava's own conv_to_sparse builds (in Lava's (W, H, C) order, a
    convolution: the kernel flipped; its NCHW branch indexes a kernel whose channel and
    kernel sizes differ out of bounds in lava-nc 0.10)."""
    from neurodeploy.backends.common import SumPool2d
    from neurodeploy.backends.lava import import_lava_runtime
    from neurodeploy.backends.lava_synapses import composed_matrix

    rng = np.random.default_rng(3)

    def ints(*shape):
        return rng.integers(-9, 10, shape).astype(np.float64)

    conv = nd.Conv2d("c", ints(6, 2, 3, 3), np.zeros(6), stride=2, padding=1, groups=2)
    chains = [
        ((4, 7, 7), (conv,)),
        ((2, 5, 5), (nd.Conv2d("c5", ints(3, 2, 5, 5), np.zeros(3), 1, 2),)),
        (
            (3, 6, 6),
            (
                SumPool2d("p", 3, 2, 1, rng.integers(1, 4, (3, 3)).astype(np.float64)),
                nd.Flatten("f"),
                nd.Dense("d", ints(5, 27), np.zeros(5)),
            ),
        ),
        ((3, 6, 6), (SumPool2d("p2", 2, 2), nd.Conv2d("c1", ints(4, 3, 3, 3), np.zeros(4)))),
    ]
    for shape, ops in chains:
        x = rng.integers(0, 5, (6, *shape)).astype(np.float64)
        matrix = composed_matrix(ops, shape)
        got = (matrix @ x.reshape(6, -1).T).T
        np.testing.assert_array_equal(got, apply_synapses(ops, x).reshape(6, -1))
    import_lava_runtime()
    from lava.proc.conv.utils import conv_to_sparse

    (c, h, w), (o, ho, wo) = (4, 7, 7), conv.output_shape((4, 7, 7))
    kernel = conv.weight.transpose(0, 3, 2, 1)[:, ::-1, ::-1, :]  # (O, kW, kH, C/G) flipped
    dst, src, weight = conv_to_sparse((w, h, c), (wo, ho, o), kernel, (2, 2), (1, 1), (1, 1), 2)
    lavas = np.zeros((o * ho * wo, c * h * w))
    np.add.at(lavas, (dst, src), weight)
    # Lava's (W, H, C) flat index -> ours (C, H, W)
    rows = np.arange(o * ho * wo).reshape(o, ho, wo).transpose(2, 1, 0).reshape(-1)
    cols = np.arange(c * h * w).reshape(c, h, w).transpose(2, 1, 0).reshape(-1)
    ours = np.zeros_like(lavas)
    ours[np.ix_(rows, cols)] = lavas
    np.testing.assert_array_equal(composed_matrix((conv,), (c, h, w)).toarray(), ours)


def test_sums_of_mantissas_beyond_the_bits_split_into_parts_that_add_up():
    from scipy import sparse

    from neurodeploy.backends.lava_synapses import split_parts

    matrix = sparse.csr_matrix(np.array([[300.0, -5.0, 0.0], [-400.0, 127.0, -128.0]]))
    parts = split_parts(matrix, 8)
    assert len(parts) == 4  # -400 = 3 x -128 - 16
    assert all(p.data.min() >= -128 and p.data.max() <= 127 for p in parts)
    np.testing.assert_array_equal(sum(p.toarray() for p in parts), matrix.toarray())
    assert parts[-1].nnz == 1  # later parts hold only what is left
    assert len(split_parts(sparse.csr_matrix(np.array([[127.0, -128.0]])), 8)) == 1


def test_an_op_without_a_lowering_or_a_sum_beyond_lavas_int32_is_refused_naming_it():
    from neurodeploy.backends.lava_synapses import lower_group, op_matrix

    with pytest.raises(nd.DeployError, match="layer 'r9' \\(ReLU\\): no lowering"):
        op_matrix(nd.ReLU("r9"), (4,))
    # 67 584 inputs of mantissa 127 (254 in Lava's mixed sign) at weight_exp 7 can sum to
    # 67 584 x 254 x 2^7 > 2^31 in one step; 65 536 of them cannot
    for n, fits in ((67_584, False), (65_536, True)):
        wide = (nd.Dense("d", np.full((1, n), 127.0), np.zeros(1)),)
        if fits:
            assert len(lower_group("big", wide, (n,), 0, 7, 8).parts) == 1
        else:
            with pytest.raises(nd.DeployError, match="layer 'big': .* int32 accumulator"):
                lower_group("big", wide, (n,), 0, 7, 8)


def test_digits_cnn_on_lavas_own_sparse_and_dense_spikes_like_the_emulator():
    """conv1 on Lava's Sparse, the pool on our SpikePool, fc1 (flatten + dense) and the
    readout on Lava's Dense: the emulator's spike steps, logits and overflow counts."""
    snn, x = _digits_cnn()
    dep = nd.deploy(snn, "loihi2", backend="lava", synapses="lava")
    kinds = {name: [g.dense for g in groups] for name, groups in dep.lowered.items()}
    assert kinds == {"conv1": [False], "fc1": [True], "out": [True]}
    _same_bits(dep.run(x), nd.deploy(snn, "loihi2").run(x))


@pytest.mark.parametrize("make", [conv_resnet, dense_resnet], ids=["conv", "dense"])
def test_residual_nets_on_lavas_own_synapses_spike_like_the_emulator(make):
    """Identity, pooled-projection, zero-delay and flattened shortcut groups (conv) and
    shortcuts from the input (dense), each on its own Lava Sparse/Dense, delayed by
    their windows plus the hops those windows took."""
    snn, x = make(0)
    x = x[:3]
    dep = nd.deploy(snn, "loihi2", backend="lava", synapses="lava")
    sources = {name: [g.source for g in groups] for name, groups in dep.lowered.items()}
    assert sources[snn.stages[-1].name] != [None]  # the readout joins a shortcut
    _same_bits(dep.run(x), nd.deploy(snn, "loihi2").run(x))


def _wide_conv(channels: int = 32):
    """Conv(32 -> 3, 3x3, padding 1) with equal positive weights on 3x3 maps, then a
    dense readout: a centre neuron's 288 inputs spiking in one step sum beyond the
    16-bit dendritic register, and their integral beyond the 24-bit membrane."""
    rng = np.random.default_rng(7)
    weight = np.full((3, channels, 3, 3), 1.0) + rng.uniform(0, 1e-3, (3, channels, 3, 3))
    layers = (
        nd.Conv2d("conv", weight, np.array([0.0, -0.5, 0.2]), 1, 1),
        nd.ReLU("r1"),
        nd.Flatten("flat"),
        nd.Dense("out", rng.normal(0, 0.5, (2, 27)), np.zeros(2)),
    )
    net = nd.Network("wide_conv", (channels, 3, 3), (0.0, 1.0), layers)
    calibration = rng.uniform(0, 0.05, (32, channels, 3, 3))
    snn = nd.convert(net, calibration=calibration)
    x = np.repeat(np.linspace(0.2, 1.0, 4)[:, None], channels * 9, axis=1)
    return snn, np.concatenate([x.reshape(4, channels, 3, 3), calibration[:2]])


def test_an_overflowing_conv_on_lavas_sparse_wraps_and_counts_like_the_emulator():
    snn, x = _wide_conv()
    dep = nd.deploy(snn, "loihi2")
    prog = dep.programs["conv"]
    assert prog.stepped
    one_step = apply_synapses(prog.synapses, np.ones((1, *snn.input_shape))) / 2**6
    assert one_step.max() >= 2**15  # Lava's dendritic sum a of one step wraps
    emulator = dep.run(x)
    assert emulator.overflow["conv"] > 0
    np.testing.assert_array_equal(emulator.output, _naive_chip(dep, x))
    _same_bits(nd.deploy(snn, "loihi2", backend="lava", synapses="lava").run(x), emulator)


def test_overlapping_pool_windows_run_as_several_sparse_parts_with_the_same_bits():
    """A 3x3 stride-1 average pool before a dense layer: each input reaches an output
    through up to 9 windows, so a matrix entry sums up to 9 mantissas and needs parts."""
    rng = np.random.default_rng(11)
    layers = (
        nd.Conv2d("conv", rng.normal(0, 0.5, (2, 1, 3, 3)), rng.normal(0, 0.1, 2), 1, 1),
        nd.ReLU("r1"),
        nd.AvgPool2d("avg", 3, 1, 1, count_include_pad=False),
        nd.Flatten("flat"),
        nd.Dense("fc", rng.normal(0, 0.3, (6, 50)), rng.normal(0, 0.1, 6)),
        nd.ReLU("r2"),
        nd.Dense("out", rng.normal(0, 0.5, (2, 6)), np.zeros(2)),
    )
    net = nd.Network("overlap", (1, 5, 5), (0.0, 1.0), layers)
    x = rng.uniform(0, 1, (24, 1, 5, 5))
    snn = nd.convert(net, calibration=x)
    dep = nd.deploy(snn, "loihi2", backend="lava", synapses="lava")
    (fc,) = dep.lowered["fc"]
    assert len(fc.parts) > 1 and not fc.dense
    _same_bits(dep.run(x[:3]), nd.deploy(snn, "loihi2").run(x[:3]))


def test_lava_synapses_refuse_what_is_not_in_loihis_formats():
    snn, _ = _digits_cnn()
    with pytest.raises(nd.UsageError, match="synapses='lava': layer 'conv1'"):
        nd.deploy(snn, "loihi2", backend="lava", synapses="lava", tag="floating_pt")
    generic = nd.load_profile("loihi2").with_overrides({"neuron.number_format": "generic"})
    with pytest.raises(nd.UsageError, match="synapses='lava': layer 'conv1'"):
        nd.deploy(snn, generic, backend="lava", lava_dense=True)
    with pytest.raises(nd.UsageError, match="synapses: unknown 'dense'"):
        nd.deploy(snn, "loihi2", backend="lava", synapses="dense")
    assert nd.deploy(snn, "loihi2", backend="lava", lava_dense=True).synapses == "lava"
