"""Model format: round trip, sklearn import, and clear errors that leave nothing behind."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from netgen import random_inputs, random_network

import neurodeploy as nd
from neurodeploy.modelio import (
    NETWORK_FILE,
    SHIPPED_MODELS_DIR,
    WEIGHTS_FILE,
    resolve_model_path,
    shipped_model_names,
)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return nd.save_model(random_network(7), tmp_path / "m")


def test_round_trip_gives_identical_network(model_dir):
    net = random_network(7)
    loaded = nd.load_model(model_dir)
    x = random_inputs(net, 5, 0)
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))
    assert [layer.config() for layer in loaded.layers] == [layer.config() for layer in net.layers]
    assert loaded.input_range == net.input_range and loaded.input_shape == net.input_shape
    assert nd.load_model(model_dir / NETWORK_FILE).name == net.name


def test_save_overwrites_atomically_and_leaves_no_temporaries(model_dir):
    nd.save_model(random_network(8), model_dir)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["m"]
    assert nd.load_model(model_dir).name == "random8"


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError):
        nd.save_model(random_network(1), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def _edit_yaml(model_dir: Path, edit) -> None:
    doc = yaml.safe_load((model_dir / NETWORK_FILE).read_text())
    edit(doc)
    (model_dir / NETWORK_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))


def _edit_weights(model_dir: Path, edit) -> None:
    with np.load(model_dir / WEIGHTS_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    edit(arrays)
    np.savez(model_dir / WEIGHTS_FILE, **arrays)


def _set_type(doc):
    doc["layers"][0]["type"] = "lstm"


def _add_key(doc):
    doc["layers"][0]["dilation"] = 2


def _drop_key(doc):
    del doc["layers"][0]["kernel"]


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("malformed_yaml", r"network\.yaml: malformed YAML at line"),
        ("unknown_type", r"layers\[0\] \(conv0\): unknown layer type 'lstm'"),
        ("unknown_key", r"unknown key\(s\) \['dilation'\]"),
        ("missing_key", r"missing key 'kernel'"),
        ("missing_weight", r"weights\.npz: missing array 'conv0\.bias'"),
        ("misshaped_weight", r"'conv0\.weight' has shape \(3, 2, 5, 5\)"),
        ("misshaped_bias", r"'out\.bias' has shape \(7,\), expected \(4,\)"),
        ("nan_weight", r"'fc0\.weight' contains NaN or infinite"),
        ("inf_bn", r"'bn\w*\.\w+' contains NaN or infinite|'fcbn\w*\.\w+' contains NaN"),
        ("extra_array", r"arrays for no layer of the network: \['ghost\.weight'\]"),
        ("bad_range", r"input\.range must be \[p, q\]"),
        ("empty_range", r"p < q"),
        ("missing_weights_file", r"weights\.npz: missing"),
        ("not_npz", r"not a readable \.npz"),
    ],
)
def test_bad_model_files_give_clear_errors(model_dir, case, pattern):
    if case == "malformed_yaml":
        (model_dir / NETWORK_FILE).write_text("name: x\nlayers: [\n  - {name: a,\n")
    elif case == "unknown_type":
        _edit_yaml(model_dir, _set_type)
    elif case == "unknown_key":
        _edit_yaml(model_dir, _add_key)
    elif case == "missing_key":
        _edit_yaml(model_dir, _drop_key)
    elif case == "missing_weight":
        _edit_weights(model_dir, lambda a: a.pop("conv0.bias"))
    elif case == "misshaped_weight":
        _edit_weights(model_dir, lambda a: a.update({"conv0.weight": np.zeros((3, 2, 5, 5))}))
    elif case == "misshaped_bias":
        _edit_weights(model_dir, lambda a: a.update({"out.bias": np.zeros(7)}))
    elif case == "nan_weight":
        _edit_weights(model_dir, lambda a: a["fc0.weight"].__setitem__((0, 0), np.nan))
    elif case == "inf_bn":

        def poison(arrays):
            key = next(k for k in arrays if k.endswith(".gamma"))
            arrays[key][0] = np.inf

        _edit_weights(model_dir, poison)
    elif case == "extra_array":
        _edit_weights(model_dir, lambda a: a.update({"ghost.weight": np.zeros(2)}))
    elif case == "bad_range":
        _edit_yaml(model_dir, lambda d: d["input"].update(range=[0.0]))
    elif case == "empty_range":
        _edit_yaml(model_dir, lambda d: d["input"].update(range=[1.0, 1.0]))
    elif case == "missing_weights_file":
        (model_dir / WEIGHTS_FILE).unlink()
    elif case == "not_npz":
        (model_dir / WEIGHTS_FILE).write_text("not a zip")
    with pytest.raises(nd.ModelError, match=pattern):
        nd.load_model(model_dir)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(nd.ModelError, match="nowhere: model path does not exist"):
        nd.load_model(tmp_path / "nowhere")


def test_shipped_models_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_model_names() == ["digits_cnn", "digits_mlp", "fileclass"]
    assert resolve_model_path("digits_cnn") == SHIPPED_MODELS_DIR / "digits_cnn"
    net = nd.load_model("digits_cnn")
    assert net.name == "digits_cnn" and net.input_shape == (1, 8, 8)
    x = nd.datasets.digits("test")[0][:5]
    shipped = nd.load_model(SHIPPED_MODELS_DIR / "digits_cnn")
    np.testing.assert_array_equal(net.forward(x), shipped.forward(x))


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nd.save_model(random_network(3), tmp_path / "digits_cnn")
    assert nd.load_model("digits_cnn").name == "random3"


def test_unknown_name_lists_the_shipped_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(nd.ModelError) as info:
        nd.load_model("digits_rnn")
    assert str(info.value) == (
        "digits_rnn: model path does not exist and is not a shipped model "
        "(shipped: digits_cnn, digits_mlp, fileclass)"
    )
    # A path with a folder part is never taken for a shipped name.
    with pytest.raises(nd.ModelError, match="^models/digits_cnn: model path does not exist"):
        nd.load_model("models/digits_cnn")


def test_file_classification_model_is_named_as_such():
    with pytest.raises(nd.ModelError, match="fileclass: a file-classification model"):
        nd.load_model("fileclass")


def test_layer_shapes_are_checked_against_the_input(model_dir):
    _edit_yaml(model_dir, lambda d: d["input"].update(shape=[3, 10, 10]))
    with pytest.raises(nd.ModelError, match="conv0.*expects 2 input channels, got 3"):
        nd.load_model(model_dir)


def test_forward_refuses_wrong_input_shape():
    with pytest.raises(nd.DataError, match=r"expects \(N, 2, 10, 10\)"):
        random_network(0).forward(np.zeros((3, 100)))


def _fit_mlp(x, y, hidden):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", max_iter=60, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def test_from_sklearn_matches_the_classifier_and_converts_exactly():
    x, y = nd.datasets.digits("train")
    flat = x.reshape(len(x), -1)
    clf = _fit_mlp(flat, y, (32, 16))
    net = nd.from_sklearn(clf, input_range=(0, 16))
    x_te, _ = nd.datasets.digits("test")
    flat_te = x_te.reshape(len(x_te), -1)
    np.testing.assert_array_equal(net.predict(flat_te), clf.predict(flat_te))
    snn = nd.convert(net, calibration=flat)
    out = nd.simulate(snn, flat_te).output
    ref = net.forward(flat_te)
    assert np.abs(out - ref).max() <= 1e-9 * np.abs(ref).max()
    image_net = nd.from_sklearn(clf, input_range=(0, 16), input_shape=(1, 8, 8))
    np.testing.assert_array_equal(image_net.predict(x_te), clf.predict(flat_te))


def test_from_sklearn_binary_classifier_keeps_its_decision():
    x, y = nd.datasets.digits("train")
    flat, binary = x.reshape(len(x), -1), (y >= 5).astype(int)
    clf = _fit_mlp(flat, binary, (16,))
    net = nd.from_sklearn(clf, input_range=(0, 16))
    assert net.num_classes == 2
    np.testing.assert_array_equal(net.predict(flat), clf.predict(flat))


def test_from_sklearn_refuses_other_activations():
    x, y = nd.datasets.digits("train")
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(4,), activation="tanh", max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x.reshape(len(x), -1)[:50], y[:50])
    with pytest.raises(nd.ModelError, match="relu"):
        nd.from_sklearn(clf, input_range=(0, 16))
