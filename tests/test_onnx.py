"""ONNX import and export: every supported operator against onnxruntime, exact conversion,
clear refusals, and a lossless round trip of the shipped models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.modelio import SHIPPED_MODELS_DIR
from neurodeploy.onnxio import export_onnx

MODELS = SHIPPED_MODELS_DIR
RNG = np.random.default_rng(42)


def weights(*shape, scale=0.4):
    return (RNG.normal(0, scale, shape)).astype(np.float32)


class Graph:
    """A small builder of ONNX chains, float32 as frameworks export them."""

    def __init__(self, input_shape, batch="N"):
        self.input_shape = input_shape
        self.batch = batch
        self.nodes, self.inits = [], []
        self.current = "x"
        self.count = 0

    def add(self, op, *consts, extra_inputs=(), **attrs):
        self.count += 1
        name = f"{op.lower()}{self.count}"
        names = []
        for i, value in enumerate(consts):
            init = f"{name}_c{i}"
            self.inits.append(numpy_helper.from_array(np.asarray(value), init))
            names.append(init)
        out = f"{name}_out"
        self.nodes.append(
            helper.make_node(op, [self.current, *names, *extra_inputs], [out], name=name, **attrs)
        )
        self.current = out
        return self

    def model(self, out_dim, meta=None):
        graph = helper.make_graph(
            self.nodes,
            "test",
            [
                helper.make_tensor_value_info(
                    "x", TensorProto.FLOAT, [self.batch, *self.input_shape]
                )
            ],
            [helper.make_tensor_value_info(self.current, TensorProto.FLOAT, [self.batch, out_dim])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        if meta:
            helper.set_model_props(model, meta)
        return model


def save(model, tmp_path, name="m.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def check_against_onnxruntime(path: Path, input_shape, input_range=(0.0, 1.0)):
    net = nd.load_model(path, input_range=input_range)
    x = RNG.uniform(*input_range, (24, *input_shape))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.astype(np.float32)})[0]
    got = net.forward(x)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    snn = nd.convert(net, calibration=x)
    out = nd.simulate(snn, x).output
    assert np.abs(out - got).max() <= 1e-9 * np.abs(got).max()  # conversion still exact
    return net


def dense_head(g: Graph, features: int, hidden=6, classes=3):
    return (
        g.add("Gemm", weights(hidden, features), weights(hidden), transB=1)
        .add("Relu")
        .add("Gemm", weights(classes, hidden), weights(classes), transB=1)
    )


def test_gemm_with_transposes_and_scales(tmp_path):
    g = Graph((5,)).add("Gemm", weights(5, 7), weights(7), alpha=0.5, beta=2.0).add("Relu")
    g.add("Gemm", weights(3, 7), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (5,))
    assert [layer.type for layer in net.layers] == ["dense", "relu", "dense"]


def test_matmul_followed_by_add(tmp_path):
    g = Graph((5,)).add("MatMul", weights(5, 7)).add("Add", weights(7)).add("Relu")
    g.add("MatMul", weights(7, 3)).add("Add", weights(3))
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (5,))
    assert [layer.type for layer in net.layers] == ["dense", "relu", "dense"]


@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 1), (1, 0)])
def test_conv_with_stride_and_padding(tmp_path, stride, pad):
    g = (
        Graph((2, 8, 8))
        .add(
            "Conv",
            weights(4, 2, 3, 3),
            weights(4),
            kernel_shape=[3, 3],
            strides=[stride] * 2,
            pads=[pad] * 4,
        )
        .add("Relu")
        .add("Flatten")
    )
    size = (8 + 2 * pad - 3) // stride + 1
    dense_head(g, 4 * size * size)
    check_against_onnxruntime(save(g.model(3), tmp_path), (2, 8, 8))


@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool", "GlobalAveragePool"])
def test_pooling(tmp_path, pool):
    g = (
        Graph((2, 8, 8))
        .add("Conv", weights(4, 2, 3, 3), weights(4), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        .add("Relu")
    )
    if pool == "GlobalAveragePool":
        g.add(pool)
        features = 4
    else:
        g.add(pool, kernel_shape=[2, 2], strides=[2, 2])
        features = 4 * 4 * 4
    dense_head(g.add("Flatten"), features)
    check_against_onnxruntime(save(g.model(3), tmp_path), (2, 8, 8))


def _bn(channels):
    return (
        np.abs(weights(channels)) + 0.5,
        weights(channels),
        weights(channels, scale=0.1),
        np.abs(weights(channels)) + 0.5,
    )


@pytest.mark.parametrize("where", ["before_relu", "after_relu"])
def test_batch_normalization(tmp_path, where):
    g = Graph((2, 6, 6)).add(
        "Conv", weights(3, 2, 3, 3), weights(3), kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    if where == "before_relu":
        g.add("BatchNormalization", *_bn(3), epsilon=1e-3).add("Relu")
    else:
        g.add("Relu").add("BatchNormalization", *_bn(3), epsilon=1e-3)
    dense_head(g.add("Flatten"), 3 * 36)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 6, 6), (-1.0, 2.0))
    assert any(layer.type == "batchnorm" for layer in net.layers)


def test_reshape_as_flatten_identity_dropout_and_constant_nodes(tmp_path):
    g = Graph((2, 4, 4)).add("Identity")
    g.add("Conv", weights(3, 2, 3, 3), weights(3), kernel_shape=[3, 3], pads=[1] * 4)
    g.add("Relu").add("Dropout")
    shape = helper.make_node(
        "Constant",
        [],
        ["shape"],
        name="shape",
        value=numpy_helper.from_array(np.array([-1, 48], np.int64)),
    )
    g.nodes.append(shape)
    g.add("Reshape", extra_inputs=["shape"])
    dense_head(g, 48)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 4, 4))
    assert [layer.type for layer in net.layers].count("flatten") == 1


def test_vgg_style_network(tmp_path):
    g = Graph((3, 12, 12))
    for c_in, c_out in ((3, 8), (8, 8)):
        g.add(
            "Conv", weights(c_out, c_in, 3, 3), weights(c_out), kernel_shape=[3, 3], pads=[1] * 4
        ).add("BatchNormalization", *_bn(c_out)).add("Relu")
    g.add("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    g.add("Conv", weights(12, 8, 3, 3), weights(12), kernel_shape=[3, 3], pads=[1] * 4)
    g.add("Relu").add("AveragePool", kernel_shape=[2, 2], strides=[2, 2]).add("Flatten")
    g.add("Gemm", weights(16, 12 * 9, scale=0.1), weights(16), transB=1).add("Relu")
    g.add("Dropout").add("Gemm", weights(5, 16), weights(5), transB=1)
    check_against_onnxruntime(save(g.model(5), tmp_path), (3, 12, 12))


def _refused(tmp_path, model, pattern, input_range=(0.0, 1.0)):
    path = save(model, tmp_path)
    with pytest.raises(nd.ModelError, match=pattern) as info:
        nd.load_model(path, input_range=input_range)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unsupported_operator_is_named(tmp_path):
    g = Graph((4,)).add("Gemm", weights(3, 4), weights(3), transB=1).add("Sigmoid")
    _refused(
        tmp_path,
        g.model(3),
        r"node 'sigmoid2' \(Sigmoid\): operator not supported; "
        r"supported: Gemm, MatMul",
    )


def test_residual_add_is_refused(tmp_path):
    g = Graph((4,)).add("Gemm", weights(4, 4), weights(4), transB=1).add("Relu")
    g.nodes.append(helper.make_node("Add", ["relu2_out", "x"], ["res"], name="residual"))
    g.current = "res"
    _refused(tmp_path, g.model(4), r"node 'residual' \(Add\): adds two activations")


@pytest.mark.parametrize(
    "attrs, pattern",
    [
        ({"group": 2}, "group=2 not supported"),
        ({"dilations": [2, 2]}, r"dilations \[2, 2\] not supported"),
        ({"pads": [1, 0, 1, 0]}, r"pads \[1, 0, 1, 0\] not supported"),
    ],
)
def test_unsupported_conv_attributes_are_named(tmp_path, attrs, pattern):
    w = weights(4, 1 if attrs.get("group") else 2, 3, 3)
    g = Graph((2, 8, 8)).add("Conv", w, weights(4), kernel_shape=[3, 3], **attrs)
    g.add("Flatten")
    dims = {"group": 6, "dilations": 4, "pads": 8}
    key = next(iter(attrs))
    size = dims[key] if key != "pads" else 8
    g.add("Gemm", weights(3, 4 * size * (6 if key == "pads" else size)), weights(3), transB=1)
    _refused(tmp_path, g.model(3), rf"node 'conv1' \(Conv\): {pattern}")


def test_dynamic_shapes_and_missing_range_are_refused(tmp_path):
    g = Graph((3, "H", "W")).add("GlobalAveragePool").add("Flatten")
    g.add("Gemm", weights(2, 3), weights(2), transB=1)
    _refused(tmp_path, g.model(2), "dimension 2 is dynamic")
    g = Graph((4,)).add("Gemm", weights(3, 4), weights(3), transB=1)
    _refused(tmp_path, g.model(3), "input range is required", input_range=None)
    g = Graph((4,)).add("Gemm", weights(3, 4), weights(3), transB=1)
    path = save(g.model(3, meta={"neurodeploy.input_range": "-1,1"}), tmp_path, "meta.onnx")
    assert nd.load_model(path).input_range == (-1.0, 1.0)


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(nd.ModelError, match="not a valid ONNX model"):
        nd.load_model(path, input_range=(0, 1))


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp"])
def test_shipped_models_round_trip_exactly(tmp_path, name):
    net = nd.load_model(MODELS / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped weights are float32 values: no rounding
        path = export_onnx(net, tmp_path / f"{name}.onnx")
    back = nd.load_model(path)
    x, _ = nd.datasets.digits("test")
    x = x.reshape(len(x), *net.input_shape)
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert back.classes == net.classes and back.input_range == net.input_range
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x.astype(np.float32)})[0]
    assert np.abs(expected - net.forward(x)).max() <= 1e-5 * np.abs(expected).max()


def test_float32_export_warns_when_it_rounds(tmp_path):
    layers = (nd.Dense("a", np.full((2, 2), 0.1), np.zeros(2)),)
    net = nd.Network("n", (2,), (0.0, 1.0), layers)
    with pytest.warns(UserWarning, match="float64"):
        export_onnx(net, tmp_path / "n.onnx")
    exact = nd.load_model(export_onnx(net, tmp_path / "n64.onnx", dtype="float64"))
    np.testing.assert_array_equal(exact.layers[0].weight, net.layers[0].weight)


def test_cli_takes_onnx_models_and_exports(tmp_path, capsys):
    out = tmp_path / "cnn.onnx"
    assert main(["export", "digits_cnn", "--onnx", str(out)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(out), "--samples", "30", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["agreement"] == 1.0 and report["max_abs_error"] < 1e-9
    g = Graph((64,)).add("Gemm", weights(10, 64, scale=0.05), weights(10), transB=1)
    plain = save(g.model(10), tmp_path, "plain.onnx")
    data = tmp_path / "d.npz"
    x, y = nd.datasets.digits("test")
    np.savez(data, x=x.reshape(len(x), -1)[:20], y=y[:20])
    assert main(["simulate", str(plain), "--data", str(data)]) == 2
    assert "input range is required" in capsys.readouterr().err
    assert (
        main(["simulate", str(plain), "--data", str(data), "--input-range", "0,16", "--json"]) == 0
    )
