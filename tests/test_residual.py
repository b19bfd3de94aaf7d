"""Residual networks: exact b1 conversion of ResNet blocks, named refusals, the model
format, retiming, the cross-check, fine-tuning and sweeps on a residual network."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from netgen import _bn, _conv, random_inputs, random_residual_network, with_bn_statistics
from test_conversion import RELATIVE_TOLERANCE, check_exact, relative_error

import neurodeploy as nd
from neurodeploy.convert import _identity_synapse, retime, snn_to_network
from neurodeploy.finetune import _cross_entropy, finetune, loss_and_gradients
from neurodeploy.sweep import make_spec, run_sweep


def resnet8(seed: int, input_shape=(3, 16, 16), classes: int = 10) -> nd.Network:
    """A ResNet-8 (CIFAR layout): a 3x3 stem, three basic blocks of widths 16, 32, 64
    (the last two downsample by a stride-2 conv with a 1x1 conv + bn projection),
    global average pooling and a dense layer. Random weights, batch-norm statistics
    measured on random inputs."""
    rng = np.random.default_rng(seed)
    c = input_shape[0]
    layers = [_conv("stem", rng, c, 16, 3, 1, 1), _bn("stem_bn", rng, 16), nd.ReLU("stem_relu")]
    source, c = "stem_relu", 16
    for i, (width, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
        p = f"layer{i + 1}"
        layers += [
            _conv(f"{p}_conv1", rng, c, width, 3, stride, 1, inputs=(source,)),
            _bn(f"{p}_bn1", rng, width),
            nd.ReLU(f"{p}_relu1"),
            _conv(f"{p}_conv2", rng, width, width, 3, 1, 1),
            _bn(f"{p}_bn2", rng, width),
        ]
        skip = source
        if stride != 1 or width != c:
            layers += [
                _conv(f"{p}_down", rng, c, width, 1, stride, 0, inputs=(source,)),
                _bn(f"{p}_down_bn", rng, width),
            ]
            skip = f"{p}_down_bn"
        layers += [nd.Add(f"{p}_add", inputs=(f"{p}_bn2", skip)), nd.ReLU(f"{p}_relu2")]
        source, c = f"{p}_relu2", width
    h = input_shape[1] // 4
    layers += [
        nd.AvgPool2d("gap", h, h),
        nd.Flatten("flat"),
        nd.Dense("fc", rng.normal(0, np.sqrt(1 / c), (classes, c)), rng.normal(0, 0.1, classes)),
    ]
    x = rng.uniform(0, 1, (32, *input_shape))
    return nd.Network("resnet8", input_shape, (0.0, 1.0), with_bn_statistics(layers, x))


def test_resnet8_converts_and_simulates_exactly():
    net = resnet8(0)
    x = np.random.default_rng(1).uniform(0, 1, (8, *net.input_shape))
    trace = check_exact(net, x, "b1")
    snn = nd.convert(net, calibration=x)
    joins = [s for s in snn.spiking_layers if s.shortcuts]
    assert [s.name for s in joins] == ["layer1_conv2", "layer2_conv2", "layer3_conv2"]
    # layer1: identity shortcut from the stem, a unit 1x1 map; later: 1x1 projections.
    identity = joins[0].shortcuts[0]
    assert identity.source == "stem"
    unit = identity.synapses[-1]  # depthwise: one unit weight per channel
    assert unit.groups == 16 and unit.weight.shape == (16, 1, 1, 1)
    np.testing.assert_array_equal(unit.weight, 1.0)
    assert joins[1].shortcuts[0].synapses[-1].weight.shape == (32, 16, 1, 1)
    for join in joins:
        shortcut = join.shortcuts[0]
        source = snn.stage(shortcut.source)
        assert shortcut.t_source == source.t_max
        # The delay is the window of the branch's one layer in between: a whole window.
        branch = snn.stage(join.name.replace("conv2", "conv1"))
        assert join.delay(shortcut) == pytest.approx(branch.window, rel=1e-15)
    assert trace.saturated == 0


def test_identity_synapse_is_a_unit_one_by_one_map():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 3, 4, 4))
    conv = _identity_synapse("id", (3, 4, 4))
    assert isinstance(conv, nd.Conv2d) and conv.kernel == 1 and conv.groups == 3
    np.testing.assert_array_equal(conv.forward(image), image)
    vector = rng.uniform(0, 1, (2, 5))
    dense = _identity_synapse("id", (5,))
    assert isinstance(dense, nd.Dense)
    np.testing.assert_array_equal(dense.forward(vector), vector)


def test_shortcut_from_the_network_input_takes_its_rescaling():
    rng = np.random.default_rng(4)
    layers = (
        _conv("c0", rng, 2, 2, 3, 1, 1),
        nd.ReLU("r0"),
        _conv("c1", rng, 2, 2, 3, 1, 1),
        nd.Add("a", inputs=("c1", "input")),
        nd.ReLU("r1"),
        nd.Flatten("f"),
        nd.Dense("out", rng.normal(0, 0.3, (3, 32)), np.zeros(3)),
    )
    net = nd.Network("skipin", (2, 4, 4), (2.0, 4.0), layers)
    x = rng.uniform(2, 4, (16, 2, 4, 4))
    snn = nd.convert(net, calibration=x)
    shortcut = snn.stage("c1").shortcuts[0]
    assert shortcut.source == "input" and shortcut.t_source == 1.0
    # x = 2 x' + 2: the identity's weight is the scale, its shift is in the join's bias.
    assert shortcut.synapses[-1].groups == 2
    np.testing.assert_array_equal(shortcut.synapses[-1].weight.reshape(-1), [2.0, 2.0])
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    back = snn_to_network(snn)
    assert ("c1", "input") in {layer.inputs for layer in back.layers if isinstance(layer, nd.Add)}
    assert relative_error(back.forward(x), net.forward(x)) <= RELATIVE_TOLERANCE


def _refused(layers, pattern, input_shape=(2, 4, 4), neuron="b1"):
    net = nd.Network("bad", input_shape, (0.0, 1.0), layers)
    x = np.random.default_rng(0).uniform(0, 1, (4, *input_shape))
    with pytest.raises(nd.ConversionError, match=pattern):
        nd.convert(net, calibration=x, neuron=neuron)


def _c(name, c_in=2, c_out=2, inputs=()):
    w = np.random.default_rng(len(name)).normal(0, 0.5, (c_out, c_in, 3, 3))
    return nd.Conv2d(name, w, np.zeros(c_out), 1, 1, inputs=inputs)


def _head(name="out", features=32, inputs=()):
    return [
        nd.Flatten(f"{name}_flat", inputs=inputs),
        nd.Dense(name, np.ones((3, features)), np.zeros(3)),
    ]


def test_add_without_relu_is_refused_naming_it():
    layers = [_c("c0"), nd.ReLU("r0"), _c("c1"), nd.Add("a", inputs=("c1", "r0")), *_head()]
    _refused(layers, r"layer 'a' \(add\) is not followed by a ReLU")


def test_preactivation_add_feeding_two_layers_is_refused():
    # pre-activation ResNet: the sum feeds the next block's BN and its shortcut
    layers = [
        _c("c0"),
        nd.ReLU("r0"),
        _c("c1"),
        nd.Add("a", inputs=("c1", "r0")),
        nd.BatchNorm("bn", np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)),
        nd.ReLU("r1"),
        _c("c2"),
        nd.Add("a2", inputs=("c2", "a")),
        nd.ReLU("r2"),
        *_head(),
    ]
    _refused(layers, r"layer 'a': the pre-activation of 'a'.*feeds \['bn', 'a2'\]")


def test_max_pooled_operand_of_an_add_is_refused():
    layers = [
        _c("c0"),
        nd.ReLU("r0"),
        _c("c1"),
        nd.MaxPool2d("mp", 2),
        nd.MaxPool2d("mp0", 2, inputs=("r0",)),
        nd.Add("a", inputs=("mp", "mp0")),
        nd.ReLU("r1"),
        *_head(features=8),
    ]
    _refused(layers, r"layer 'a' \(add\): its input 'mp' passes \['mp'\] before the sum")


def test_parallel_spiking_branches_are_refused():
    # two branches that each spike (an inception-like split), then summed
    layers = [
        _c("c0"),
        nd.ReLU("r0"),
        _c("c1"),
        nd.ReLU("r1"),
        _c("c2", inputs=("r0",)),
        nd.ReLU("r2"),
        nd.Add("a", inputs=("r1", "r2")),
        nd.ReLU("r3"),
        *_head(),
    ]
    _refused(layers, r"layer 'c2': its latest input 'c0' is not the stage converted just before")


def test_projection_from_an_earlier_stage_joins_exactly():
    # the summed conv reads an earlier stage than the identity: it becomes the shortcut
    layers = [
        _c("c0"),
        nd.ReLU("r0"),
        _c("c1"),
        nd.ReLU("r1"),
        _c("c2", inputs=("r0",)),
        nd.Add("a", inputs=("c2", "r1")),
        nd.ReLU("r2"),
        *_head(),
    ]
    net = nd.Network("early", (2, 4, 4), (0.0, 1.0), layers)
    x = np.random.default_rng(0).uniform(0, 1, (16, 2, 4, 4))
    snn = nd.convert(net, calibration=x)
    join = snn.stages[-2]
    assert join.name == "a" and [sc.source for sc in join.shortcuts] == ["c0"]
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE


def test_max_pool_in_one_branch_only_is_refused():
    layers = [
        _c("c0"),
        nd.ReLU("r0"),
        _c("c1"),
        nd.ReLU("r1"),
        nd.MaxPool2d("mp1", 2),
        nd.MaxPool2d("mp", 2, inputs=("r0",)),
        nd.Add("a", inputs=("mp1", "mp")),
        nd.ReLU("r2"),
        *_head(features=8),
    ]
    _refused(layers, r"layer 'mp' \(maxpool2d\) pools 'c0', but 'mp1' runs after it")


def test_alpha1_refuses_residual_networks_with_one_named_error():
    net = random_residual_network(0)
    joins = [layer.name for layer in net.layers if isinstance(layer, nd.Add)]
    with pytest.raises(nd.ConversionError, match=rf"layer '{joins[0]}' \(add\).*neuron='b1'"):
        nd.convert(net, calibration=random_inputs(net, 4, 0), neuron="alpha1")


def test_model_round_trip_and_snn_round_trip(tmp_path):
    net = random_residual_network(7, blocks=3)
    x = random_inputs(net, 16, 7)
    path = nd.save_model(net, tmp_path / "res")
    loaded = nd.load_model(path)
    assert [layer.inputs for layer in loaded.layers] == [layer.inputs for layer in net.layers]
    np.testing.assert_array_equal(loaded.forward(x), net.forward(x))
    snn = nd.convert(loaded, calibration=x)
    back = snn_to_network(snn, name="back")
    assert any(isinstance(layer, nd.Add) for layer in back.layers)
    nd.save_model(back, tmp_path / "back")
    again = nd.convert(nd.load_model(tmp_path / "back"), calibration=x)
    assert [s.name for s in again.stages] == [s.name for s in snn.stages]
    for a, b in zip(again.spiking_layers, snn.spiking_layers, strict=True):
        assert a.window == pytest.approx(b.window, rel=1e-12)  # the stored windows
        assert [sc.source for sc in a.shortcuts] == [sc.source for sc in b.shortcuts]
    assert relative_error(nd.simulate(again, x).output, net.forward(x)) <= RELATIVE_TOLERANCE


def test_retime_moves_shortcut_sources_with_their_windows():
    net = random_residual_network(2, blocks=3)
    x = random_inputs(net, 16, 2)
    snn = nd.convert(net, calibration=x)
    longer = retime(snn, {s.name: 2 * s.window for s in snn.spiking_layers})
    for stage in longer.spiking_layers:
        for shortcut in stage.shortcuts:
            end = 1.0 if shortcut.source == "input" else longer.stage(shortcut.source).t_max
            assert shortcut.t_source == end
            assert stage.delay(shortcut) >= 0
    trace = nd.simulate(longer, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE


def test_crosscheck_on_ideal_is_ok_with_zero_error_and_finds_a_wrong_shortcut(tmp_path):
    net = random_residual_network(3, blocks=3)
    x = random_inputs(net, 32, 3)
    y = net.predict(x)
    snn = nd.convert(net, calibration=x)
    report = nd.crosscheck(snn, nd.deploy(snn, "ideal"), x, y)
    assert report.ok and report.logit_error_max == 0.0 and report.agreement == 1.0
    assert all(layer.error_max == 0.0 for layer in report.layers)
    assert [layer.name for layer in report.layers] == ["input", *(s.name for s in snn.stages)]
    page = report.to_html(tmp_path / "report.html").read_text()
    joins = [s for s in snn.spiking_layers if s.shortcuts]
    assert all(f"{s.name}" in page for s in joins)
    # The "hardware" gets one shortcut's weights negated: the cross-check must point
    # at that join, not at the layers before it.
    join = joins[len(joins) // 2]
    shortcut = join.shortcuts[0]
    wrong_sc = replace(
        shortcut,
        synapses=(
            *shortcut.synapses[:-1],
            replace(shortcut.synapses[-1], weight=-shortcut.synapses[-1].weight),
        ),
    )
    stages = tuple(
        replace(s, shortcuts=(wrong_sc, *s.shortcuts[1:])) if s is join else s for s in snn.stages
    )
    hw = nd.deploy(replace(snn, stages=stages), "ideal")
    bad = nd.crosscheck(snn, hw, x, y)
    assert not bad.ok and bad.divergence_layer == join.name


def _perturb_shortcut(snn, name, index, eps):
    stages = []
    for stage in snn.stages:
        if stage.name == name:
            sc = stage.shortcuts[0]
            w = sc.synapses[-1].weight.copy()
            w[index] += eps
            sc = replace(sc, synapses=(*sc.synapses[:-1], replace(sc.synapses[-1], weight=w)))
            stage = replace(stage, shortcuts=(sc, *stage.shortcuts[1:]))
        stages.append(stage)
    return replace(snn, stages=tuple(stages))


def _perturb_weight(snn, name, index, eps):
    stages = []
    for stage in snn.stages:
        if stage.name == name:
            w = stage.synapses[-1].weight.copy()
            w[index] += eps
            stage = replace(
                stage, synapses=(*stage.synapses[:-1], replace(stage.synapses[-1], weight=w))
            )
        stages.append(stage)
    return replace(snn, stages=tuple(stages))


def test_gradients_flow_through_shortcuts_and_equal_finite_differences():
    net = random_residual_network(11, blocks=3)
    x = random_inputs(net, 16, 11)
    y = np.random.default_rng(0).integers(0, 4, 16)
    snn = nd.convert(net, calibration=x)
    p, q = snn.input_range
    loss, grads, _, _ = loss_and_gradients(snn, np.clip((x - p) / (q - p), 0, 1), y)

    def simulated_loss(s):
        return _cross_entropy(nd.simulate(s, x).output, y)[0]

    assert loss == pytest.approx(simulated_loss(snn), rel=1e-12)
    rng = np.random.default_rng(1)
    checked = {"shortcut": 0, "before_join": 0}
    joins = [s for s in snn.spiking_layers if s.shortcuts]
    assert joins
    eps = 1e-6
    for join in joins:
        key = f"{join.name}.shortcut0.w"
        g = grads[key]
        weight = join.shortcuts[0].synapses[-1].weight
        candidates = np.argwhere(weight != 0)  # identity shortcuts train their diagonal
        for _ in range(3):
            index = tuple(candidates[rng.integers(len(candidates))])
            numeric = (
                simulated_loss(_perturb_shortcut(snn, join.name, index, eps))
                - simulated_loss(_perturb_shortcut(snn, join.name, index, -eps))
            ) / (2 * eps)
            assert g[index] == pytest.approx(numeric, rel=1e-4, abs=1e-8)
            checked["shortcut"] += 1
        # A layer whose only way to the loss is a shortcut's source: its gradient must
        # include the path through the shortcut (the first stage feeds every block).
    first = snn.spiking_layers[0]
    g = grads[f"{first.name}.w"]
    for _ in range(6):
        index = tuple(int(rng.integers(d)) for d in g.shape)
        numeric = (
            simulated_loss(_perturb_weight(snn, first.name, index, eps))
            - simulated_loss(_perturb_weight(snn, first.name, index, -eps))
        ) / (2 * eps)
        assert g[index] == pytest.approx(numeric, rel=1e-4, abs=1e-8)
        checked["before_join"] += 1
    assert checked["shortcut"] >= 6 and checked["before_join"] == 6


def digits_resnet(seed: int = 0) -> nd.Network:
    """A small residual CNN for the 8x8 digits: stem, an identity and a projection block."""
    rng = np.random.default_rng(seed)
    layers = [_conv("stem", rng, 1, 8, 3, 1, 1), _bn("stem_bn", rng, 8), nd.ReLU("stem_relu")]
    layers += [
        _conv("b0_conv0", rng, 8, 8, 3, 1, 1),
        _bn("b0_bn0", rng, 8),
        nd.ReLU("b0_relu0"),
        _conv("b0_conv1", rng, 8, 8, 3, 1, 1),
        _bn("b0_bn1", rng, 8),
        nd.Add("b0_add", inputs=("b0_bn1", "stem_relu")),
        nd.ReLU("b0_out"),
        _conv("b1_conv0", rng, 8, 12, 3, 2, 1),
        _bn("b1_bn0", rng, 12),
        nd.ReLU("b1_relu0"),
        _conv("b1_conv1", rng, 12, 12, 3, 1, 1),
        _bn("b1_bn1", rng, 12),
        _conv("b1_proj", rng, 8, 12, 1, 2, 0, inputs=("b0_out",)),
        _bn("b1_projbn", rng, 12),
        nd.Add("b1_add", inputs=("b1_bn1", "b1_projbn")),
        nd.ReLU("b1_out"),
        nd.AvgPool2d("gap", 4, 4),
        nd.Flatten("flat"),
        nd.Dense("fc", rng.normal(0, np.sqrt(1 / 12), (10, 12)), np.zeros(10)),
    ]
    x, _ = nd.datasets.digits("train")
    return nd.Network(
        "digits_resnet",
        (1, 8, 8),
        (0.0, 16.0),
        with_bn_statistics(layers, x[:256]),
        classes=tuple(str(i) for i in range(10)),
        dataset="digits",
    )


def test_residual_network_fine_tunes_on_digits_with_the_ideal_profile(tmp_path):
    net = digits_resnet()
    x_tr, y_tr = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr)
    before = nd.simulate(snn, x_te).accuracy(y_te)
    result = finetune(snn, "ideal", x_tr, y_tr, epochs=1, batch_size=32, learning_rate=3e-3)
    after = nd.simulate(result.snn, x_te).accuracy(y_te)
    # random weights at chance (0.10); one epoch measured 0.49
    assert after > before + 0.25, (before, after)
    # The result is an ordinary residual model: saved, loaded and converted, it computes
    # what the fine-tuned SNN does.
    path = nd.save_model(result.network, tmp_path / "tuned")
    again = nd.convert(nd.load_model(path), calibration=x_tr)
    assert (
        relative_error(nd.simulate(again, x_te).output, nd.simulate(result.snn, x_te).output) < 1e-9
    )
    # Identity shortcuts stay identities (one weight per channel).
    identity = result.snn.stage("b0_conv1").shortcuts[0].synapses[-1]
    assert identity.groups == identity.weight.shape[0] and identity.weight.shape[1:] == (1, 1, 1)


@pytest.mark.parametrize("profile, backend", [("loihi2", "emulator"), ("pcm", "crossbar")])
def test_fine_tuning_a_residual_network_on_hardware_learns(profile, backend):
    """The hardware forward of fine-tuning includes the shortcut groups as the backends
    program them (emulator weights, crossbar arrays): training from random weights
    lifts the accuracy the backend itself measures."""
    net = digits_resnet()
    x_tr, y_tr = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr[:200])
    dep = nd.deploy(snn, profile, backend=backend, seed=0)
    before = dep.run(x_te[:200]).accuracy(y_te[:200])
    result = finetune(snn, profile, x_tr, y_tr, epochs=2, seed=0, learning_rate=1e-2)
    assert result.snn.has_shortcuts
    dep = nd.deploy(result.snn, profile, backend=backend, seed=0)
    after = dep.run(x_te[:200]).accuracy(y_te[:200])
    assert after > before + 0.2, (before, after)  # measured: 0.075 -> 0.745 / 0.345


def test_sweep_runs_a_residual_model(tmp_path):
    path = nd.save_model(digits_resnet(), tmp_path / "model")
    spec = make_spec(
        path, "ideal", [("timing.time_unit_s", [1e-6, 2e-6])], 1, 40, None, None, 200, 0.5
    )
    records = sorted(run_sweep(spec, tmp_path / "sweep"), key=lambda r: r["point"])
    assert len(records) == 2
    assert all(r["agreement"] == 1.0 and r["logit_error"] == 0.0 for r in records)
    assert records[0]["latency_s"] * 2 == pytest.approx(records[1]["latency_s"])
    # The checksum covers the graph: another shortcut wiring is another model.
    net = nd.load_model(path)
    layers = [
        replace(layer, inputs=("b1_projbn", "b1_bn1")) if layer.name == "b1_add" else layer
        for layer in net.layers
    ]
    other = nd.save_model(replace(net, layers=tuple(layers)), tmp_path / "other")
    spec2 = make_spec(other, "ideal", [("timing.time_unit_s", [1e-6])], 1, 40, None, None, 200, 0.5)
    assert spec2.model_sha256 != spec.model_sha256


def test_pooled_projection_pooled_sum_and_flattened_identity_join_exactly():
    # ResNet-D style shortcut (average pool, then 1x1 conv + bn), a batch norm and a max
    # pool on the sum before its ReLU, and a dense block whose identity reads a flatten.
    rng = np.random.default_rng(5)
    layers = [
        _conv("c0", rng, 2, 4, 3, 1, 1),
        _bn("b0", rng, 4),
        nd.ReLU("r0"),
        _conv("c1", rng, 4, 6, 3, 2, 1),
        _bn("b1", rng, 6),
        nd.ReLU("r1"),
        _conv("c2", rng, 6, 6, 3, 1, 1),
        _bn("b2", rng, 6),
        nd.AvgPool2d("dpool", 2, 2, inputs=("r0",)),
        _conv("dconv", rng, 4, 6, 1),
        _bn("dbn", rng, 6),
        nd.Add("a", inputs=("b2", "dbn")),
        _bn("abn", rng, 6),
        nd.MaxPool2d("amp", 2),
        nd.ReLU("r2"),
        nd.Flatten("flat"),
        nd.Dense("fc1", rng.normal(0, 0.3, (24, 24)), np.zeros(24)),
        nd.ReLU("fr1"),
        nd.Dense("fc2", rng.normal(0, 0.3, (24, 24)), np.zeros(24)),
        nd.Add("fa", inputs=("fc2", "flat")),
        nd.ReLU("fr2"),
        nd.Dense("out", rng.normal(0, 0.3, (3, 24)), np.zeros(3)),
    ]
    x = rng.uniform(-1, 3, (32, 2, 8, 8))
    net = nd.Network("misc", (2, 8, 8), (-1.0, 3.0), with_bn_statistics(layers, x))
    snn = nd.convert(net, calibration=x)
    kinds = {
        s.name: [[op.type for op in sc.synapses] for sc in s.shortcuts]
        for s in snn.stages
        if getattr(s, "shortcuts", ())
    }
    assert kinds == {"c2": [["avgpool2d", "conv2d"]], "fc2": [["flatten", "dense"]]}
    assert snn.stage("fc2").shortcuts[0].source == "amp"  # a pool's window is its layer's
    assert snn.stage("fc2").shortcuts[0].t_source == snn.stage("c2").t_max
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
    again = nd.convert(snn_to_network(snn), calibration=x)
    assert relative_error(nd.simulate(again, x).output, net.forward(x)) <= RELATIVE_TOLERANCE


def test_cli_converts_a_residual_model_and_lists_its_shortcuts(tmp_path, capsys):
    from neurodeploy.cli import main

    path = nd.save_model(digits_resnet(), tmp_path / "model")
    assert main(["convert", str(path), "--calibration-size", "200"]) == 0
    out = capsys.readouterr().out
    assert "+ shortcut from 'stem', delay" in out and "+ shortcut from 'b0_conv1'" in out
    assert main(["deploy", str(path), "--profile", "ideal", "--samples", "60"]) == 0
    assert "RESULT: OK" in capsys.readouterr().out


def test_resnet18_imagenet_layout_converts_exactly_at_a_small_size():
    """The benchmark's ResNet-18 (7x7 stride-2 stem, max pool, four stages of basic
    blocks, widths 64-512) at 32x32 so that it runs in the suite; the benchmark runs
    the 224x224 one."""
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_resnet.py"
    spec = importlib.util.spec_from_file_location("bench_resnet", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.resnet18(size=32, classes=10)
    x = np.random.default_rng(2).uniform(0, 1, (2, *net.input_shape))
    snn = nd.convert(net, calibration=x)
    assert sum(1 for s in snn.spiking_layers if s.shortcuts) == 8
    trace = nd.simulate(snn, x)
    assert trace.saturated == 0
    assert relative_error(trace.output, net.forward(x)) <= RELATIVE_TOLERANCE
