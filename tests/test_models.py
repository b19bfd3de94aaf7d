"""The shipped models: accuracy targets, and a converted SNN identical to its ReLU net."""

from __future__ import annotations

import numpy as np
import pytest

import neurodeploy as nd
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR
# Test-split accuracy the ReLU networks must reach (issue: foundation).
TARGETS = {"digits_mlp": 0.96, "digits_cnn": 0.97}


def test_digits_split_is_fixed_stratified_and_disjoint():
    x_tr, y_tr = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    x_all, y_all = nd.datasets.digits("all")
    assert x_tr.shape == (1257, 1, 8, 8) and x_te.shape == (540, 1, 8, 8)
    assert len(x_all) == 1797 and x_all.min() == 0 and x_all.max() == 16
    # Stratified: 30 % of every class, to within one sample.
    assert np.abs(np.bincount(y_te) - 0.3 * np.bincount(y_all)).max() <= 1
    rows = {r.tobytes() for r in x_tr.reshape(len(x_tr), -1)}
    overlap = sum(r.tobytes() in rows for r in x_te.reshape(len(x_te), -1))
    assert overlap <= 2  # the data set itself holds a couple of duplicate images
    np.testing.assert_array_equal(nd.datasets.digits("test")[1], y_te)
    with pytest.raises(nd.UsageError, match="split"):
        nd.datasets.digits("validation")


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("neuron", ["b1", "alpha1"])
def test_shipped_model_converts_with_zero_accuracy_loss(name, neuron):
    net = nd.load_model(MODELS / name)
    assert net.dataset == "digits" and net.classes == tuple(str(i) for i in range(10))
    x_tr, _ = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    x_tr = x_tr.reshape(len(x_tr), *net.input_shape)
    x_te = x_te.reshape(len(x_te), *net.input_shape)
    relu_logits = net.forward(x_te)
    relu_accuracy = np.mean(relu_logits.argmax(axis=1) == y_te)
    assert relu_accuracy >= TARGETS[name]
    snn = nd.convert(net, calibration=x_tr, neuron=neuron)
    trace = nd.simulate(snn, x_te)
    assert trace.saturated == 0
    assert trace.accuracy(y_te) == relu_accuracy
    np.testing.assert_array_equal(trace.predictions, relu_logits.argmax(axis=1))
    assert np.abs(trace.output - relu_logits).max() <= 1e-9 * np.abs(relu_logits).max()
    if neuron == "b1":
        assert 0 < trace.spikes_per_neuron < 1  # zeros stay silent
    else:
        assert trace.spikes_per_neuron == 1.0  # the exact-mapping neuron always fires once
