"""NeuroBench-style metrics: synaptic operations, sparsities, footprint (neurodeploy/metrics.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from residual import conv_resnet, dense_resnet

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.metrics import metrics_table, neurobench_metrics


def _small_net(seed: int = 0) -> tuple[nd.Network, np.ndarray]:
    """conv (padding 1, stride 2, some zero weights) -> dense -> out, and inputs."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (4, 2, 3, 3))
    w[0, 0, 1, :] = 0.0  # zero connections are not effective operations
    layers = (
        nd.Conv2d("conv", w, rng.normal(0, 0.1, 4), stride=2, padding=1),
        nd.ReLU("r1"),
        nd.Flatten("flat"),
        nd.Dense("fc", rng.normal(0, 0.3, (5, 36)), rng.normal(0, 0.1, 5)),
        nd.ReLU("r2"),
        nd.Dense("out", rng.normal(0, 0.3, (3, 5)), np.zeros(3)),
    )
    net = nd.Network("small", (2, 6, 6), (0.0, 1.0), layers)
    x = rng.uniform(0.0, 1.0, (30, 2, 6, 6))
    x[x < 0.3] = 0.0  # silent inputs
    return net, x


def _grouped_snn(seed: int = 0):
    """The converted small net with its conv's synapses made a grouped conv (groups 2,
    3 zero weights): only the counting is tested here, not the conversion."""
    net, x = _small_net(seed)
    snn = nd.convert(net, calibration=x)
    stage = snn.stages[0]
    conv = stage.synapses[-1]
    grouped = replace(conv, weight=conv.weight[:, :1].copy(), groups=2)
    grouped.weight[0, 0, 1, :] = 0.0
    return replace(snn, stages=(replace(stage, synapses=(grouped,)), *snn.stages[1:])), x


def _conv_events_brute_force(w, stride, padding, groups, active) -> np.ndarray:
    """Effective synaptic operations (N,) of a conv, one synapse at a time."""
    n, c_in, h, width = active.shape
    c_out, c_per_group, k, _ = w.shape
    out_per_group = c_out // groups
    h_out = (h + 2 * padding - k) // stride + 1
    w_out = (width + 2 * padding - k) // stride + 1
    count = np.zeros(n)
    for o in range(c_out):
        group = o // out_per_group
        for c in range(c_per_group):
            channel = group * c_per_group + c
            for i in range(h_out):
                for j in range(w_out):
                    for a in range(k):
                        for b in range(k):
                            row, col = i * stride + a - padding, j * stride + b - padding
                            if 0 <= row < h and 0 <= col < width and w[o, c, a, b] != 0:
                                count += active[:, channel, row, col]
    return count


def test_grouped_conv_counts_match_a_synapse_by_synapse_count():
    snn, x = _grouped_snn()
    trace = nd.simulate(snn, x)
    metrics = neurobench_metrics(snn, trace)
    conv, fc, out = metrics["layers"]
    fired_in = np.isfinite(trace.spike_times["input"])
    weight = snn.stages[0].synapses[-1].weight
    expected = _conv_events_brute_force(weight, 2, 1, 2, fired_in)
    assert conv["effective_ops"] == pytest.approx(expected.mean(), rel=1e-12)
    dense_expected = _conv_events_brute_force(np.ones_like(weight), 2, 1, 2, np.ones((1, 2, 6, 6)))
    assert conv["dense_ops"] == dense_expected[0]
    assert conv["weights"] == 36 and conv["zero_weights"] == 3  # 4 x 1 x 3 x 3
    assert conv["connection_sparsity"] == pytest.approx(3 / 36)
    # dense layers: spikes of the layer before times nonzero fan-out
    fired_conv = np.isfinite(trace.spike_times["conv"]).reshape(len(x), -1)
    w_fc = snn.stages[1].synapses[-1].weight
    assert fc["effective_ops"] == pytest.approx(
        (fired_conv @ (w_fc != 0).T.astype(float)).sum(1).mean()
    )
    assert fc["dense_ops"] == w_fc.size
    # the reference runs in float64 and feeds spikes: accumulates, 8 bytes a parameter
    assert metrics["op_kind"] == "AC" and conv["effective_macs"] == 0
    assert conv["footprint_bytes"] == (36 + 36) * 8  # weights + a threshold per neuron
    assert out["footprint_bytes"] == (15 + 3) * 8  # weights + one bias per output
    assert conv["activation_sparsity"] is None  # continuous time: no time steps
    spikes = np.isfinite(trace.spike_times["conv"]).mean()
    assert conv["activation_sparsity_per_inference"] == pytest.approx(1 - spikes)
    total = metrics["total"]
    assert total["effective_acs"] == pytest.approx(
        conv["effective_ops"] + fc["effective_ops"] + out["effective_ops"]
    )
    assert total["footprint_bytes"] == sum(r["footprint_bytes"] for r in metrics["layers"])


def test_effective_ops_equal_the_relu_networks_nonzero_products():
    """An exact conversion spikes where the ReLU is nonzero: the SNN's ACs are the ReLU
    network's effective MACs (NeuroBench counts those the same way)."""
    net, x = _small_net(1)
    snn = nd.convert(net, calibration=x)
    metrics = neurobench_metrics(snn, nd.simulate(snn, x))
    conv = net.layers[0]
    hidden = np.maximum(conv.linear(x) + conv.bias[:, None, None], 0).reshape(len(x), -1)
    w_fc = net.layers[3].weight
    relu_macs = ((hidden != 0) @ (w_fc != 0).T.astype(float)).sum(1).mean()
    assert metrics["layers"][1]["effective_ops"] == pytest.approx(relu_macs)


@pytest.mark.parametrize("build", [dense_resnet, conv_resnet])
def test_synaptic_events_are_the_emulators_with_the_shortcut_groups(build):
    snn, x = build(0)
    dep = nd.deploy(snn, "loihi2")
    trace = dep.run(x)
    metrics = neurobench_metrics(snn, trace, dep.profile, "emulator", dep)
    # The emulator's energy count: its synaptic events, summed over the fan-outs it
    # programmed (shortcut groups included), per inference.
    synops = dep.summary()["energy_breakdown"]["counts"]["synaptic_ops"]
    assert metrics["total"]["effective_acs"] == pytest.approx(synops, rel=1e-9)
    joins = [row for row in metrics["layers"] if "shortcuts" in row]
    assert joins and all(sc["effective_ops"] > 0 for row in joins for sc in row["shortcuts"])
    for row in metrics["layers"]:  # the mapping's synapse count includes the shortcut groups
        mapped = {layer["name"]: layer for layer in dep.summary()["layers"]}[row["name"]]
        assert row["synapses"] == mapped["synapses"]


def test_hardware_precision_sets_footprint_sparsity_and_op_kind():
    snn, x = _grouped_snn(2)
    loihi = nd.deploy(snn, "loihi2")
    m = neurobench_metrics(snn, loihi.run(x), loihi.profile, "emulator", loihi)
    conv = m["layers"][0]
    assert conv["footprint_bytes"] == (36 * 8 + 36 * 24) / 8  # 8-bit weights, 24-bit thresholds
    steps = loihi.profile.timing.steps_per_window
    assert conv["activation_sparsity"] == pytest.approx(
        1 - (1 - conv["activation_sparsity_per_inference"]) / steps
    )
    three_bit = nd.deploy(snn, loihi.profile.with_overrides({"weights.bits": 3}))
    coarse = neurobench_metrics(snn, three_bit.run(x), three_bit.profile, "emulator", three_bit)
    assert coarse["total"]["zero_weights"] > m["total"]["zero_weights"]  # rounded to zero
    net, x = _small_net(2)
    snn = nd.convert(net, calibration=x)
    pcm = nd.deploy(snn, "pcm", backend="crossbar")
    analog = neurobench_metrics(snn, pcm.run(x), pcm.profile, "crossbar", pcm)
    assert analog["op_kind"] == "MAC" and analog["total"]["effective_acs"] == 0
    assert analog["total"]["footprint_bytes"] is None  # analog devices: no bit count
    assert analog["total"]["footprint_devices"] == 2 * analog["total"]["weights"]
    lines = metrics_table(analog)
    assert "eff. MACs" in lines[0] and lines[-1].startswith("total")


def test_run_reports_the_metrics(capsys):
    code = main(["run", "digits_cnn", "--profile", "loihi2", "--samples", "40", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    metrics = json.loads(out)["metrics"]
    assert [row["name"] for row in metrics["layers"]] == ["conv1", "fc1", "out"]
    assert metrics["total"]["effective_acs"] > 0 and 0 < metrics["total"]["activation_sparsity"] < 1
    code = main(["run", "digits_cnn", "--profile", "pcm", "--samples", "40"])
    out = capsys.readouterr().out
    assert code == 0 and "NeuroBench metrics" in out and "eff. MACs" in out
