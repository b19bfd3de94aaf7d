"""Fine-tuning: exact spike-time gradients, recovery of hardware losses, shorter windows,
and a result that is an ordinary model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from netgen import random_inputs, random_network

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.finetune import _cross_entropy, finetune, loss_and_gradients
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR


@pytest.fixture(scope="module")
def cnn():
    net = nd.load_model(MODELS / "digits_cnn")
    x_tr, y_tr = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    return nd.convert(net, calibration=x_tr), x_tr, y_tr, x_te, y_te


def _perturbed(snn, name, key, index, eps):
    stages = []
    for stage in snn.stages:
        if stage.name == name:
            if key == "w":
                weight = stage.synapses[-1].weight.copy()
                weight[index] += eps
                stage = replace(
                    stage,
                    synapses=(*stage.synapses[:-1], replace(stage.synapses[-1], weight=weight)),
                )
            else:
                bias = stage.bias.copy()
                bias[index] += eps
                changes = {"bias": bias}
                if isinstance(stage, nd.SpikingLayer):  # theta = B - b follows the bias
                    changes["threshold"] = stage.threshold - (bias - stage.bias)
                stage = replace(stage, **changes)
        stages.append(stage)
    return replace(snn, stages=tuple(stages))


def test_gradients_equal_finite_differences_of_the_simulator():
    net = random_network(3)  # conv with padding and stride, batch norms, pools, dense
    x = random_inputs(net, 16, 3)
    y = np.random.default_rng(0).integers(0, 4, 16)
    snn = nd.convert(net, calibration=x)
    p, q = snn.input_range
    loss, grads, _, _ = loss_and_gradients(snn, np.clip((x - p) / (q - p), 0, 1), y)

    def simulated_loss(s):
        return _cross_entropy(nd.simulate(s, x).output, y)[0]

    assert loss == pytest.approx(simulated_loss(snn), rel=1e-12)
    rng = np.random.default_rng(1)
    checked = 0
    for stage in snn.stages:
        if not isinstance(stage, (nd.SpikingLayer, nd.OutputLayer)):
            continue
        for key in ("w", "b"):
            g = grads[f"{stage.name}.{key}"]
            for _ in range(4):
                index = tuple(int(rng.integers(d)) for d in g.shape)
                eps = 1e-6
                numeric = (
                    simulated_loss(_perturbed(snn, stage.name, key, index, eps))
                    - simulated_loss(_perturbed(snn, stage.name, key, index, -eps))
                ) / (2 * eps)
                assert g[index] == pytest.approx(numeric, rel=1e-4, abs=1e-8)
                checked += 1
    assert checked >= 40


def _hardware_accuracy(snn, profile, backend, x, y, seeds):
    return np.mean(
        [nd.deploy(snn, profile, backend=backend, seed=s).run(x).accuracy(y) for s in range(seeds)]
    )


def test_finetuning_recovers_pcm_noise_losses(cnn):
    snn, x_tr, y_tr, x_te, y_te = cnn
    profile = nd.load_profile("pcm").with_overrides({"crossbar.read_noise_scale": 3.0})
    reference = nd.simulate(snn, x_te).accuracy(y_te)
    before = _hardware_accuracy(snn, profile, "crossbar", x_te, y_te, 10)
    assert reference - before >= 0.05  # the converted network loses at least 5 points
    result = finetune(snn, profile, x_tr, y_tr, epochs=15, learning_rate=1e-3, seed=0)
    after = _hardware_accuracy(result.snn, profile, "crossbar", x_te, y_te, 10)
    assert after - before >= 0.5 * (reference - before)  # at least half of the loss back
    assert len(result.history) == 15 and result.history[-1]["loss"] < result.history[0]["loss"]


def test_finetuning_recovers_3_bit_weights(cnn):
    snn, x_tr, y_tr, x_te, y_te = cnn
    profile = nd.load_profile("loihi2").with_overrides({"weights.bits": 3})
    reference = nd.simulate(snn, x_te).accuracy(y_te)
    before = _hardware_accuracy(snn, profile, "emulator", x_te, y_te, 1)
    assert reference - before >= 0.05
    result = finetune(snn, profile, x_tr, y_tr, epochs=5, seed=0)
    after = _hardware_accuracy(result.snn, profile, "emulator", x_te, y_te, 1)
    assert after - before >= 0.5 * (reference - before)


def test_windows_shrink_at_least_twice_within_one_point(cnn):
    snn, x_tr, y_tr, x_te, y_te = cnn
    reference = nd.simulate(snn, x_te).accuracy(y_te)
    result = finetune(snn, "ideal", x_tr, y_tr, epochs=8, seed=0, window_scale=0.4)
    for old, new in zip(snn.spiking_layers, result.snn.spiking_layers, strict=True):
        assert old.window / new.window >= 2.0
    assert snn.latency / result.snn.latency >= 2.0
    assert nd.simulate(result.snn, x_te).accuracy(y_te) >= reference - 0.01


def test_result_is_an_ordinary_model(cnn, tmp_path):
    snn, x_tr, y_tr, x_te, _ = cnn
    result = finetune(snn, "loihi2", x_tr[:300], y_tr[:300], epochs=1, seed=0)
    path = nd.save_model(result.network, tmp_path / "tuned")
    again = nd.convert(nd.load_model(path), calibration=x_tr[:10])
    for a, b in zip(again.spiking_layers, result.snn.spiking_layers, strict=True):
        assert a.window == pytest.approx(b.window, rel=1e-12)  # windows travel with the model
    out_a, out_b = nd.simulate(again, x_te).output, nd.simulate(result.snn, x_te).output
    assert np.abs(out_a - out_b).max() <= 1e-9 * np.abs(out_b).max()
    # the same seed gives the same weights
    twice = finetune(snn, "loihi2", x_tr[:300], y_tr[:300], epochs=1, seed=0)
    for a, b in zip(result.network.layers, twice.network.layers, strict=True):
        for key, value in a.params().items():
            np.testing.assert_array_equal(value, b.params()[key])


def test_finetune_cli_saves_a_model_that_deploy_and_sweep_take(tmp_path, capsys):
    out = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                "digits_mlp",
                "--profile",
                "loihi2",
                "--set",
                "weights.bits=3",
                "--epochs",
                "2",
                "--eval-seeds",
                "1",
                "--samples",
                "100",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "hardware accuracy" in text and (out / "finetune.json").is_file()
    assert main(
        [
            "deploy",
            str(out),
            "--profile",
            "loihi2",
            "--samples",
            "40",
            "--out",
            str(tmp_path / "report"),
        ]
    ) in (0, 1)
    assert (tmp_path / "report" / "crosscheck.html").is_file()
    assert (
        main(
            [
                "sweep",
                str(out),
                "--profile",
                "loihi2",
                "--param",
                "weights.bits=3,8",
                "--seeds",
                "1",
                "--samples",
                "40",
                "--workers",
                "1",
                "--quiet",
                "--out",
                str(tmp_path / "sweep"),
            ]
        )
        == 0
    )


def test_bad_arguments_are_refused(cnn):
    snn, x_tr, y_tr, _, _ = cnn
    with pytest.raises(nd.UsageError, match="window_scale"):
        finetune(snn, "ideal", x_tr, y_tr, window_scale=1.5)
    with pytest.raises(nd.DataError, match="labels"):
        finetune(snn, "ideal", x_tr, y_tr + 10)
    net = random_network(0)
    alpha = nd.convert(net, calibration=random_inputs(net, 4, 0), neuron="alpha1")
    with pytest.raises(nd.UsageError, match="b1"):
        finetune(alpha, "ideal", random_inputs(net, 4, 0), np.zeros(4, dtype=int))
