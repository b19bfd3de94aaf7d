"""File classification: the snapshot, the correlative encoding, device-bounded STDP, and the
same network on numpy, crossbars and Lava."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.fileclass.data import load_snapshot, split
from neurodeploy.fileclass.encoding import SILENT, Encoder, KeySpec, similarity, spike_overlap
from neurodeploy.fileclass.inference import classify, lava_classify
from neurodeploy.fileclass.model import (
    FileClassModel,
    Hyper,
    _quantised_update,
    distance_loss,
    output_dynamics,
    surrogate_gradient,
    train,
)
from neurodeploy.fileclass.snn import LIF, trace, van_rossum

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def snapshot():
    records, labels, classes = load_snapshot()
    train_idx, test_idx = split(labels)
    return records, labels, classes, train_idx, test_idx


def test_snapshot_is_real_big_and_not_solved_by_one_key(snapshot):
    records, labels, classes, train_idx, test_idx = snapshot
    assert len(records) >= 20_000 and len(classes) >= 5
    assert np.bincount(labels).min() > 1000
    spec = importlib.util.spec_from_file_location("snap", ROOT / "tools" / "snapshot_files.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = [dict(r, label=classes[label]) for r, label in zip(records, labels, strict=True)]
    train_rows = [rows[i] for i in train_idx]
    test_rows = [rows[i] for i in test_idx]
    best = max(tool.single_key_rule_accuracy(train_rows, test_rows, key) for key in records[0])
    assert best < 0.90


def _record(draw):
    return {
        "extension": draw(st.sampled_from(["py", "so", "txt", "", "png"])),
        "size_bucket": draw(st.integers(0, 24)),
        "depth": draw(st.integers(1, 9)),
        "parents": draw(
            st.lists(
                st.sampled_from(["lib", "usr", "share", "bin", "python3"]), max_size=3, unique=True
            )
        ),
        "name_tokens": draw(
            st.lists(
                st.sampled_from(["lib", "test", "init", "a", "b"]),
                min_size=1,
                max_size=4,
                unique=True,
            )
        ),
        "mode": draw(st.sampled_from(["644", "755"])),
        "executable": draw(st.booleans()),
        "owner": "root",
        "links": draw(st.integers(1, 3)),
        "age_bucket": draw(st.integers(0, 12)),
    }


@st.composite
def pairs(draw):
    a = _record(draw)
    # b shares a random subset of a's pairs: every level of similarity occurs
    b = {key: (a[key] if draw(st.booleans()) else value) for key, value in _record(draw).items()}
    return a, b


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(pairs(), min_size=25, max_size=25))
def test_input_correlation_grows_with_file_similarity(pair_list):
    encoder = Encoder()
    sims, overlaps = [], []
    for a, b in pair_list:
        ea, eb = encoder.encode([a, b])
        sims.append(similarity(a, b))
        overlaps.append(spike_overlap(ea, eb, encoder))
    sims, overlaps = np.array(sims), np.array(overlaps)
    # Pair by pair the overlap is the similarity, up to chance coincidences of spike
    # times (different values pick the same step 1 time in 20) ...
    assert np.all(np.abs(overlaps - sims) < 0.12)
    # ... so more similar files have more correlated inputs.
    for i in range(len(sims)):
        for j in range(len(sims)):
            if sims[i] > sims[j] + 0.15:
                assert overlaps[i] > overlaps[j]


def test_equal_pairs_share_spikes_and_nearby_values_share_a_fraction():
    key = KeySpec("size", "ordinal", 2000, width=4.0)
    encoder = Encoder(keys=(key,), steps=1000)
    base = encoder.encode([{"size": 10.0}])[0]
    for d in (0.0, 1.0, 2.0, 3.0, 5.0):
        other = encoder.encode([{"size": 10.0 + d}])[0]
        expected = max(0.0, 1.0 - d / 4.0)
        assert abs(np.mean(base == other) - expected) < 0.04  # plus 1/1000 chance matches
    sets = Encoder(keys=(KeySpec("tags", "set", 40, subset=8),))
    only_a, a_and_b = sets.encode([{"tags": ["a"]}, {"tags": ["a", "b"]}])
    fired_a = only_a != SILENT
    assert fired_a.sum() == 8 and (a_and_b[fired_a] <= only_a[fired_a]).all()


def test_stdp_updates_are_whole_bounded_pulses():
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 1, (50, 60))
    g = np.round(g * 64) / 64
    new = _quantised_update(g, rng.normal(0, 0.2, g.shape), 64, np.random.default_rng(1))
    assert new.min() >= 0 and new.max() <= 1
    np.testing.assert_allclose(new * 64, np.round(new * 64), atol=1e-9)
    change = np.random.default_rng(2).normal(0, 0.2, g.shape)
    once = _quantised_update(g, change, 64, np.random.default_rng(1))
    twice = _quantised_update(g, change, 64, np.random.default_rng(1))
    np.testing.assert_array_equal(once, twice)  # same seed, same pulses
    same = _quantised_update(g, np.full(g.shape, 0.5 / 64), 64, np.random.default_rng(3))
    assert 0.4 < np.mean(same != g) < 0.6  # half a pulse rounds up half of the time


def test_distance_loss_derivative_matches_finite_differences():
    rng = np.random.default_rng(4)
    spikes = (rng.random((3, 10, 6)) < 0.3).astype(float)
    targets = (rng.random((4, 10, 6)) < 0.3).astype(float)
    labels = np.array([0, 3, 1])
    tau, temperature = 3.0, 1.5
    loss, d_spikes, distances = distance_loss(spikes, labels, trace(targets, tau), tau, temperature)
    np.testing.assert_allclose(distances, van_rossum(spikes, targets, tau), rtol=1e-12)
    # The filtered trains are linear in the spikes, so the loss is smooth in them.
    eps = 1e-6
    for index in [(0, 0, 0), (0, 9, 5), (1, 4, 2), (2, 7, 3), (1, 0, 5)]:
        bumped = spikes.copy()
        bumped[index] += eps
        up = distance_loss(bumped, labels, trace(targets, tau), tau, temperature)[0]
        bumped[index] -= 2 * eps
        down = distance_loss(bumped, labels, trace(targets, tau), tau, temperature)[0]
        numeric = (up - down).sum() / (2 * eps)
        assert d_spikes[index] == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_surrogate_gradient_is_exact_below_threshold():
    # No spikes and a flat surrogate (slope 0): the spike derivative stands for the
    # membrane itself, so the gradient is the exact one of sum(d * v) through the LIF.
    rng = np.random.default_rng(5)
    lif = LIF(du=0.3, dv=0.2, vth=1e9)
    pre = (rng.random((2, 12, 7)) < 0.4).astype(float)
    w = rng.normal(0, 1, (3, 7))
    d = rng.normal(0, 1, (2, 12, 3))
    s_out, v_out = output_dynamics(pre, w, lif)
    assert not s_out.any()
    grad = surrogate_gradient(pre, s_out, v_out, d, lif, slope=0.0)
    eps = 1e-6
    for index in [(0, 0), (1, 3), (2, 6), (0, 5)]:
        bumped = w.copy()
        bumped[index] += eps
        up = (d * output_dynamics(pre, bumped, lif)[1]).sum()
        bumped[index] -= 2 * eps
        down = (d * output_dynamics(pre, bumped, lif)[1]).sum()
        assert grad[index] == pytest.approx((up - down) / (2 * eps), rel=1e-6)


@pytest.fixture(scope="module")
def small_model(snapshot):
    records, labels, classes, train_idx, _ = snapshot
    idx = train_idx[:1500]
    return train(
        [records[i] for i in idx],
        labels[idx],
        classes,
        Hyper(hidden=128, stdp_epochs=1, readout_epochs=4),
        seed=0,
    )


def test_training_learns_and_models_round_trip(snapshot, small_model, tmp_path):
    records, labels, _, _, test_idx = snapshot
    test = [records[i] for i in test_idx[:600]]
    predicted = classify(small_model, test)
    assert np.mean(predicted == labels[test_idx[:600]]) > 0.6  # seven classes: chance 1/7
    readout = [h for h in small_model.history if h["phase"] == "readout"]
    assert readout[-1]["train_loss"] < 0.7 * readout[0]["train_loss"]
    assert (small_model.g_in * small_model.hyper.pulses) == pytest.approx(
        np.round(small_model.g_in * small_model.hyper.pulses), abs=1e-6
    )
    loaded = FileClassModel.load(small_model.save(tmp_path / "m"))
    np.testing.assert_array_equal(classify(loaded, test), predicted)


def test_lava_runs_the_same_network(snapshot, small_model):
    records, _, _, _, test_idx = snapshot
    spikes = small_model.spikes([records[i] for i in test_idx[:8]])
    reference = small_model.classify(spikes)
    lava = lava_classify(small_model, spikes)
    np.testing.assert_array_equal(lava[1], reference[1])  # identical output spike trains
    np.testing.assert_array_equal(lava[0], reference[0])


def test_memristive_synapses(snapshot, small_model):
    records, labels, _, _, test_idx = snapshot
    test = [records[i] for i in test_idx[:500]]
    clean = nd.load_profile("pcm").with_overrides(
        {
            "crossbar.prog_noise_scale": 0.0,
            "crossbar.read_noise_scale": 0.0,
            "crossbar.drift_scale": 0.0,
            "crossbar.drift_compensation": False,
        }
    )
    # noise-free analog devices hold the float weights
    np.testing.assert_array_equal(
        classify(small_model, test, "crossbar", clean), classify(small_model, test)
    )
    day = nd.load_profile("pcm").with_overrides({"crossbar.t_inference_s": 86400.0})
    a = classify(small_model, test, "crossbar", day, seed=0)
    b = classify(small_model, test, "crossbar", day, seed=0)
    c = classify(small_model, test, "crossbar", day, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(nd.UsageError, match="crossbar profile"):
        classify(small_model, test, "crossbar", nd.load_profile("loihi2"))


def test_fileclass_cli(tmp_path, capsys):
    out = tmp_path / "fc"
    assert (
        main(
            [
                "fileclass",
                "train",
                "--quick",
                "--train-samples",
                "600",
                "--samples",
                "200",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "test accuracy" in capsys.readouterr().out
    assert (
        main(
            ["fileclass", "eval", str(out), "--profile", "rram", "--seeds", "1", "--samples", "100"]
        )
        == 0
    )
    assert "crossbar (rram): accuracy" in capsys.readouterr().out
    assert main(["fileclass", "eval", str(tmp_path / "nothing")]) == 2
    assert "nothing: model path does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["fileclass", "eval", str(tmp_path / "empty")]) == 2
    assert "not a file-classification model" in capsys.readouterr().err
