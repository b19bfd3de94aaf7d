"""Core mapping on the digital profile (cores.neurons_per_core, cores.synaptic_memory_bits,
cores.cores_per_chip) and the energy and latency of a hand-counted tiny network."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import numpy as np
import pytest

import neurodeploy as nd
from neurodeploy.backends.common import SumPool2d
from neurodeploy.backends.emulator import _fanout, partition_into_cores
from neurodeploy.crosscheck import SCHEMA_PATH


def _tiny_232():
    """Dense(2 -> 3) ReLU, Dense(3 -> 2); weights exact in 8-bit mantissas, two of them 0
    (no synapse). fc1's fan-in is 2, 1, 2 synapses; out's 2, 2."""
    w1 = np.array([[0.5, 0.25], [0.25, 0.0], [-0.5, 0.25]])
    w2 = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])
    layers = (
        nd.Dense("fc1", w1, np.zeros(3)),
        nd.ReLU("r1"),
        nd.Dense("out", w2, np.zeros(2)),
    )
    net = nd.Network("tiny232", (2,), (0.0, 1.0), layers)
    return nd.convert(net, calibration=np.array([[1.0, 1.0]]))


def test_partition_fills_each_core_with_the_next_neurons_that_fit():
    # neurons per core binds: 5 neurons of 3 bits, 2 per core
    counts, bits = partition_into_cores(np.array([3, 3, 3, 3, 3]), 2, 7)
    assert counts.tolist() == [2, 2, 1] and bits.tolist() == [6, 6, 3]
    # memory binds: 5 + 1 + 1 = 7 bits fill a core, then 5 + 2
    counts, bits = partition_into_cores(np.array([5, 1, 1, 5, 2]), 10, 7)
    assert counts.tolist() == [3, 2] and bits.tolist() == [7, 7]
    # neurons with no synapses still take a neuron slot each
    counts, bits = partition_into_cores(np.zeros(5, dtype=np.int64), 4, 1)
    assert counts.tolist() == [4, 1] and bits.tolist() == [0, 0]
    counts, bits = partition_into_cores(np.zeros(0, dtype=np.int64), 4, 1)
    assert counts.size == 0 and bits.size == 0


def test_layers_are_split_into_cores_and_chips_by_neurons_and_synaptic_memory_in_bits():
    snn = _tiny_232()
    # fc1: 2, 1, 2 synapses x 8 bits = 16, 8, 16 bits; out: 16, 16 bits.
    # 24 bits per core: fc1 -> [16 + 8], [16] (2 cores); out -> [16], [16] (2 cores).
    profile = nd.load_profile("loihi2").with_overrides(
        {"cores.synaptic_memory_bits": 24, "cores.cores_per_chip": 3}
    )
    summary = nd.deploy(snn, profile).summary()
    fc1, out = summary["layers"]
    assert (fc1["synapses"], fc1["synaptic_memory_bits"], fc1["bits_per_synapse"]) == (5, 40, 8)
    assert (fc1["cores"], fc1["chips"], fc1["neurons_per_core_max"]) == (2, 1, 2)
    assert fc1["synaptic_memory_bits_per_core_max"] == 24
    assert fc1["synaptic_memory_utilisation"] == pytest.approx(40 / 48)
    assert fc1["neuron_utilisation"] == pytest.approx(3 / (2 * 8192))
    assert (out["synapses"], out["synaptic_memory_bits"], out["cores"]) == (4, 32, 2)
    assert (summary["cores"], summary["chips"]) == (4, 2)  # 4 cores, 3 per chip
    # neurons per core binds instead: 1 neuron per core -> 3 + 2 cores, 1 per chip
    profile = nd.load_profile("loihi2").with_overrides(
        {"cores.neurons_per_core": 1, "cores.cores_per_chip": 1}
    )
    summary = nd.deploy(snn, profile).summary()
    assert [(layer["cores"], layer["chips"]) for layer in summary["layers"]] == [(3, 3), (2, 2)]
    assert summary["chips"] == 5
    # the shipped profile: every layer on one core
    summary = nd.deploy(snn, "loihi2").summary()
    assert [layer["cores"] for layer in summary["layers"]] == [1, 1]


def test_a_neuron_whose_synapses_exceed_a_cores_memory_is_refused_with_its_layer():
    snn = _tiny_232()
    profile = nd.load_profile("loihi2").with_overrides({"cores.synaptic_memory_bits": 15})
    with pytest.raises(
        nd.DeployError,
        match=r"layer 'fc1': a neuron has 2 input synapses x 8 bits = 16 bits, more than one "
        r"core's synaptic memory \(cores.synaptic_memory_bits = 15\)",
    ):
        nd.deploy(snn, profile)
    # 4-bit weights halve every neuron's memory: 2 x 4 = 8 bits fit
    nd.deploy(snn, profile.with_overrides({"weights.bits": 4}))


def test_conv_neurons_at_the_border_take_less_memory():
    """A 3x3 'same' conv on 4x4x1: corner neurons have 4 synapses, edge 6, inner 9: 100
    synapses in all (4 x 4 + 8 x 6 + 4 x 9). With memory for 12 x 8 = 96 bits per core
    and 4 neurons per core, the neurons in order (rows 4 6 6 4 | 6 9 9 6 | 6 9 9 6 |
    4 6 6 4 synapses) pack greedily as
    [4 6] [6 4] [6] [9] [9] [6 6] [9] [9] [6 4] [6 6] [4]: 11 cores."""
    snn = _conv44()
    profile = nd.load_profile("loihi2").with_overrides(
        {"cores.synaptic_memory_bits": 96, "cores.neurons_per_core": 4}
    )
    dep = nd.deploy(snn, profile)
    c1 = dep.summary()["layers"][0]
    assert (c1["synapses"], c1["synaptic_memory_bits"]) == (100, 800)
    assert c1["cores"] == 11 and c1["synaptic_memory_bits_per_core_max"] == 96
    neurons, bits = dep.core_slices["c1"]
    assert neurons.tolist() == [2, 2, 1, 1, 1, 2, 1, 1, 2, 2, 1]
    assert (bits // 8).tolist() == [10, 10, 6, 9, 9, 12, 9, 9, 10, 12, 4]


def _conv44():
    """3x3 'same' conv on 4x4x1 (neuron (r, c) receives inputs r-1..r+1 x c-1..c+1 inside
    the image), then one readout synapse."""
    layers = (
        nd.Conv2d("c1", np.full((1, 1, 3, 3), 0.1), np.zeros(1), stride=1, padding=1),
        nd.ReLU("r1"),
        nd.Flatten("f"),
        nd.Dense("out", np.eye(1, 16, 5), np.zeros(1)),
    )
    net = nd.Network("conv44", (1, 4, 4), (0.0, 1.0), layers)
    return nd.convert(net, calibration=np.ones((1, 1, 4, 4)))


def test_input_axons_per_core_split_a_conv_layer_where_receptive_fields_stop_overlapping():
    """Row-major neurons (r, c), counting the distinct input pixels of a run. 12 axons: rows
    0-1 reach input rows 0-2 (12 pixels), the 9th neuron (2, 0) adds input row 3 -> two
    cores of 8 neurons and 12 axons each. 11 axons: (0,0)..(1,1) reach 4, 6, 8, 8, 10, 11
    pixels, (1,2) would make 12 -> 6 neurons; (1,2), (1,3): 9, (2,0) would add 4 -> 2
    neurons; (2,0), (2,1): 6, 9, (2,2) would make 12 -> 2 neurons; (2,2)..(3,3): 9, 9, 11,
    11, 11, 11 -> 6 neurons."""
    snn = _conv44()
    dep = nd.deploy(
        snn, nd.load_profile("loihi2").with_overrides({"cores.input_axons_per_core": 12})
    )
    assert dep.core_slices["c1"][0].tolist() == [8, 8]
    assert dep.core_axons["c1"].tolist() == [12, 12]
    assert dep.summary()["layers"][0]["input_axons_per_core_max"] == 12
    dep = nd.deploy(
        snn, nd.load_profile("loihi2").with_overrides({"cores.input_axons_per_core": 11})
    )
    assert dep.core_slices["c1"][0].tolist() == [6, 2, 2, 6]
    assert dep.core_axons["c1"].tolist() == [11, 9, 9, 11]
    assert nd.deploy(snn, "loihi2").summary()["layers"][0]["input_axons_per_core_max"] is None
    # an inner neuron alone receives from 9 pixels
    with pytest.raises(
        nd.DeployError,
        match=r"layer 'c1': a neuron receives spikes from 9 presynaptic neurons, more input "
        r"axons than one core has \(cores.input_axons_per_core = 8\)",
    ):
        nd.deploy(snn, nd.load_profile("loihi2").with_overrides({"cores.input_axons_per_core": 8}))


def test_hand_counted_energy_and_latency_of_a_2_3_2_network(tmp_path):
    """K = 4 steps per window; the inference is 2 windows (input, fc1) = 8 steps of 1 us:
    8 us. 5 neurons (fc1: 3, out: 2) update in each of the 8 steps: 40 updates, of which
    a neuron is active in its input window (all 4 steps) once a spike reaches it over a
    synapse, and in its own window (fc1 only) up to and including its spike step, all 4
    steps when it stays silent.

    Input x spikes at t = 1 - x (x = 0: silent). fc1 integrates a = W1 x and spikes at
    t = t_max - a in its window [t_min, t_max], on the step grid dt = (t_max - t_min) / 4
    rounded to the nearest step m = round((t - t_min) / dt); m = 4 is no spike.
    Fan-out (synapses leaving a neuron): input 0 -> 3, input 1 -> 2; fc1 n0 -> 1, n1 -> 2,
    n2 -> 1 (columns of W1 and W2 without zeros).

    x = (1, 1): both inputs spike; a = (0.75, 0.25, -0.25). With t_min = 1, t_max = 2.125
    (dt = 0.28125): n0 at (1.125 - 0.75) / dt = 1.33 -> m = 1, n1 at 3.11 -> m = 3, n2
    silent. Active: n0 4 + 2, n1 4 + 4, n2 4 + 4, out n0 4 (n0, n1 reach it), out n1 4
    (n1): 30; inactive 10. Synaptic ops 3 + 2 + 1 + 2 = 8; spikes 2 + 2 = 4.
    E = 8 x 23.6 + 30 x 81 + 10 x 52 + 4 x 1.7 = 188.8 + 2430 + 520 + 6.8 = 3145.6 pJ.

    x = (0.5, 0): input 0 spikes; a = (0.25, 0.125, -0.25): n0 at 3.11 -> m = 3, n1 at
    3.56 -> m = 4, silent (the reference spikes at t_max - 0.125; the step grid rounds
    it out of the window), n2 silent. Active: 3 x (4 + 4) for fc1 (input 0 reaches all
    three), out n0 4 (n0), out n1 0: 28; inactive 12. Synaptic ops 3 + 1 = 4; spikes 2.
    E = 4 x 23.6 + 28 x 81 + 12 x 52 + 2 x 1.7 = 94.4 + 2268 + 624 + 3.4 = 2989.8 pJ.

    x = (0, 0): nothing spikes; fc1's three neurons ramp their whole window: 12 active,
    28 inactive. E = 12 x 81 + 28 x 52 = 972 + 1456 = 2428 pJ."""
    snn = _tiny_232()
    fc1 = snn.stage("fc1")
    assert (fc1.t_min, fc1.t_max) == (1.0, 2.125)  # the windows the counts above use
    profile = nd.load_profile("loihi2").with_overrides({"timing.steps_per_window": 4})
    dep = nd.deploy(snn, profile)
    x = np.array([[1.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    trace = dep.run(x)
    np.testing.assert_array_equal(
        np.isfinite(trace.spike_times["fc1"]), [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
    )
    np.testing.assert_allclose(trace.energy_j, [3145.6e-12, 2989.8e-12, 2428.0e-12], rtol=1e-12)
    np.testing.assert_allclose(trace.latency_s, [8e-6] * 3, rtol=1e-12)
    summary = dep.summary()
    assert summary["steps_per_inference"] == 8
    assert summary["latency_s"] == pytest.approx(8e-6, rel=1e-12)
    breakdown = summary["energy_breakdown"]
    assert breakdown["counts"] == pytest.approx(
        {
            "synaptic_ops": (8 + 4 + 0) / 3,
            "active_neuron_updates": (30 + 28 + 12) / 3,
            "inactive_neuron_updates": (10 + 12 + 28) / 3,
            "spikes": (4 + 2 + 0) / 3,
        },
        rel=1e-12,
    )
    assert breakdown["energy_j"]["active_neuron_updates"] == pytest.approx(
        (30 + 28 + 12) / 3 * 81e-12, rel=1e-12
    )
    assert breakdown["per_operation_j"] == {
        "synaptic_ops": 23.6e-12,
        "active_neuron_updates": 81e-12,
        "inactive_neuron_updates": 52e-12,
        "spikes": 1.7e-12,
    }
    assert "Davies et al. 2018" in breakdown["figures_from"]
    assert "Loihi 1" in breakdown["figures_from"]
    # the cross-check report carries the same breakdown (JSON, valid) and shows it (HTML)
    report = nd.crosscheck(snn, dep, x, attribution=False, hardware=trace)
    assert report.energy_breakdown == breakdown
    doc = json.loads(report.to_json(tmp_path / "r.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["energy_breakdown"]["counts"]["spikes"] == pytest.approx(2.0, rel=1e-12)
    page = report.to_html(tmp_path / "r.html").read_text()
    section = page[page.index("<h2>Energy per inference</h2>") :]
    section = section[: section.index("</table>")]
    assert "Davies et al. 2018, IEEE Micro 38(1), Table 2 (Loihi 1" in section
    assert "<td>active neuron updates</td><td>23.3</td><td>81 pJ</td>" in section
    assert f"<td>{(3145.6 + 2989.8 + 2428.0) / 3 * 1e-3:.4g} nJ</td>" in section  # the total


def test_the_ideal_profile_has_no_energy_breakdown():
    snn = _tiny_232()
    dep = nd.deploy(snn, "ideal")
    trace = dep.run(np.array([[1.0, 1.0]]))
    assert dep.energy_breakdown(trace) is None
    report = nd.crosscheck(snn, dep, np.array([[1.0, 1.0]]), attribution=False)
    assert report.energy_breakdown is None


def test_the_run_command_reports_cores_chips_and_the_energy_breakdown(capsys):
    from neurodeploy.cli import main

    args = ["run", "digits_mlp", "--profile", "loihi2", "--samples", "20"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mapping = report["mapping"]
    for layer in mapping["layers"]:  # digits_mlp's layers each fit one core of loihi2
        assert (layer["cores"], layer["chips"]) == (1, 1)
        assert layer["synaptic_memory_bits"] == 8 * layer["synapses"]
    assert (mapping["cores"], mapping["chips"]) == (len(mapping["layers"]), 1)
    breakdown = mapping["energy_breakdown"]
    assert sum(breakdown["energy_j"].values()) == pytest.approx(report["energy_j"], rel=1e-12)
    assert main(args) == 0
    text = capsys.readouterr().out
    active = breakdown["counts"]["active_neuron_updates"]
    assert f"active neuron updates {active:.4g} x 81 pJ" in text
    assert "(Davies et al. 2018, IEEE Micro 38(1), Table 2 (Loihi 1" in text


@pytest.mark.parametrize(
    "chain",
    [
        lambda rng: (nd.Flatten("flat"), nd.Dense("fc", rng.normal(size=(5, 108)), np.zeros(5))),
        lambda rng: (
            SumPool2d("pool", 2, 2, 1),
            nd.Flatten("flat"),
            nd.Dense("fc", rng.normal(size=(4, 3 * 4 * 4)), np.zeros(4)),
        ),
        lambda rng: (nd.Conv2d("conv", rng.normal(size=(4, 3, 3, 3)), np.zeros(4), 2, 1),),
        lambda rng: (
            SumPool2d("pool", 3, 1, 1),
            nd.Conv2d("dw", rng.normal(size=(6, 1, 3, 3)), np.zeros(6), 1, 1, groups=3),
        ),
    ],
)
def test_fanout_is_the_column_sums_of_the_connectivity(chain):
    """_fanout (the transpose applied to ones) against the column sums of the dense
    connectivity matrix built from an identity basis, on 0/1 weights with zeros."""
    rng = np.random.default_rng(3)
    ops = list(chain(rng))
    affine = ops[-1]
    mask = (rng.uniform(size=affine.weight.shape) < 0.7).astype(np.float64)
    ops[-1] = dataclasses.replace(affine, weight=mask)
    shape = (3, 6, 6)
    n_in = int(np.prod(shape))
    basis = np.eye(n_in).reshape(n_in, *shape)
    matrix = nd.ttfs.apply_synapses(tuple(ops), basis).reshape(n_in, -1)  # (in, out)
    assert np.array_equal(_fanout(tuple(ops), shape), matrix.sum(axis=1))
