"""ONNX import and export: every supported pattern against onnxruntime, exact conversion where
the converter maps the network, clear one-line refusals, and exact round trips."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from netgen import random_inputs, random_network
from onnx import TensorProto, helper, numpy_helper

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.modelio import SHIPPED_MODELS_DIR
from neurodeploy.network import Add
from neurodeploy.onnxio import export_onnx

MODELS = SHIPPED_MODELS_DIR
RNG = np.random.default_rng(42)


def weights(*shape, scale=0.4):
    return (RNG.normal(0, scale, shape)).astype(np.float32)


class Graph:
    """A small builder of ONNX graphs, float32 as frameworks export them.

    ``add`` appends a node reading the current tensor (or ``inputs``) followed by
    initialisers made of ``consts``; the node's output becomes the current tensor.
    """

    def __init__(self, input_shape, batch="N"):
        self.input_shape = input_shape
        self.batch = batch
        self.nodes, self.inits = [], []
        self.current = "x"
        self.count = 0
        self.name = ""

    def const(self, value) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op, *consts, extra_inputs=(), inputs=None, **attrs):
        self.count += 1
        name = f"{op.lower()}{self.count}"
        names = [self.const(v) for v in consts]
        data = [self.current] if inputs is None else list(inputs)
        out = f"{name}_out"
        self.nodes.append(
            helper.make_node(op, [*data, *names, *extra_inputs], [out], name=name, **attrs)
        )
        self.current, self.name = out, name
        return self

    def model(self, out_dim, meta=None, opset=17, outputs=None):
        outs = outputs or [self.current]
        graph = helper.make_graph(
            self.nodes,
            "main_graph",  # as torch names its graphs
            [
                helper.make_tensor_value_info(
                    "x", TensorProto.FLOAT, [self.batch, *self.input_shape]
                )
            ],
            [
                helper.make_tensor_value_info(o, TensorProto.FLOAT, [self.batch, out_dim])
                for o in outs
            ],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        if meta:
            helper.set_model_props(model, meta)
        return model


def save(model, tmp_path, name="m.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def run_onnxruntime(path: Path, x: np.ndarray, input_name="x") -> np.ndarray:
    """onnxruntime's float32 output, fed in batches of the model's literal batch size."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dim = session.get_inputs()[0].shape[0]
    step = dim if isinstance(dim, int) else len(x)
    parts = [
        session.run(None, {input_name: x[i : i + step].astype(np.float32)})[0]
        for i in range(0, len(x), step)
    ]
    return np.concatenate(parts)


def check_against_onnxruntime(path: Path, input_shape, input_range=(0.0, 1.0), convert=True):
    """Import ``path``; its float64 forward equals onnxruntime's float32 run to 1e-5 of the
    largest logit, and (``convert``) the converted b1 SNN equals the forward to 1e-9."""
    net = nd.load_model(path, input_range=input_range)
    assert net.input_range == tuple(input_range)
    x = RNG.uniform(*input_range, (24, *input_shape))
    expected = run_onnxruntime(path, x)
    got = net.forward(x)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    if convert:
        snn = nd.convert(net, calibration=x)
        out = nd.simulate(snn, x).output
        assert np.abs(out - got).max() <= 1e-9 * np.abs(got).max()  # conversion still exact
    return net


def types(net):
    return [layer.type for layer in net.layers]


def dense_head(g: Graph, features: int, hidden=6, classes=3):
    return (
        g.add("Gemm", weights(hidden, features), weights(hidden), transB=1)
        .add("Relu")
        .add("Gemm", weights(classes, hidden), weights(classes), transB=1)
    )


def conv(g: Graph, c_in, c_out, k=3, pad=1, stride=1, groups=1, scale=0.4):
    return g.add(
        "Conv",
        weights(c_out, c_in // groups, k, k, scale=scale),
        weights(c_out),
        kernel_shape=[k, k],
        pads=[pad] * 4,
        strides=[stride] * 2,
        group=groups,
    )


def _refused(tmp_path, model, pattern, input_range=(0.0, 1.0)):
    path = save(model, tmp_path)
    with pytest.raises(nd.ModelError, match=pattern) as info:
        nd.load_model(path, input_range=input_range)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    return str(info.value)


# -- dense layers ----------------------------------------------------------------------------
def test_gemm_with_transposes_and_scales(tmp_path):
    g = Graph((5,)).add("Gemm", weights(5, 7), weights(7), alpha=0.5, beta=2.0).add("Relu")
    g.add("Gemm", weights(3, 7), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (5,))
    assert types(net) == ["dense", "relu", "dense"]


@pytest.mark.parametrize("c_shape", [(), (1,), (1, 7)])
def test_gemm_bias_broadcast(tmp_path, c_shape):
    g = Graph((5,)).add("Gemm", weights(7, 5), weights(*c_shape), transB=1).add("Relu")
    g.add("Gemm", weights(3, 7), transB=1)  # no C at all
    check_against_onnxruntime(save(g.model(3), tmp_path), (5,))


def test_gemm_trans_a_is_refused(tmp_path):
    g = Graph((5,)).add("Gemm", weights(5, 3), transA=1)
    _refused(tmp_path, g.model(3), r"node 'gemm1' \(Gemm\): transA=1 not supported")


@pytest.mark.parametrize("form", ["x@W+b", "b+x@W", "x@W^T", "no_bias"])
def test_matmul_forms(tmp_path, form):
    g = Graph((5,))
    if form == "x@W^T":  # the weight stored (out, in) and transposed in the graph
        g.add("Transpose", inputs=[g.const(weights(7, 5))], perm=[1, 0])
        g.add("MatMul", inputs=["x", g.current]).add("Add", weights(7))
    elif form == "b+x@W":  # what the legacy exporter writes for a Linear as MatMul
        g.add("MatMul", weights(5, 7))
        g.add("Add", inputs=[g.const(weights(7)), g.current])
    else:
        g.add("MatMul", weights(5, 7))
        if form == "x@W+b":
            g.add("Add", weights(7))
    g.add("Relu").add("MatMul", weights(7, 3)).add("Add", weights(3))
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (5,))
    assert types(net) == ["dense", "relu", "dense"]


def test_matmul_with_the_constant_on_the_left_is_refused(tmp_path):
    g = Graph((5,), batch=5)
    g.add("MatMul", inputs=[g.const(weights(5, 5)), "x"])
    _refused(tmp_path, g.model(5), r"node 'matmul1' \(MatMul\): the constant is the left")


@pytest.mark.parametrize("where", ["before_relu", "after_relu"])
def test_batch_normalization_1d(tmp_path, where):
    g = Graph((6,)).add("Gemm", weights(8, 6), weights(8), transB=1)
    if where == "before_relu":
        g.add("BatchNormalization", *_bn(8), epsilon=1e-3).add("Relu")
    else:
        g.add("Relu").add("BatchNormalization", *_bn(8), epsilon=1e-3)
    g.add("Dropout").add("Gemm", weights(3, 8), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (6,), (-1.0, 2.0))
    assert "batchnorm" in types(net) and "dropout" not in types(net)


def test_initialisers_listed_as_graph_inputs(tmp_path):
    # torch.onnx.export(..., keep_initializers_as_inputs=True), older exporters' default
    g = Graph((5,)).add("Gemm", weights(7, 5), weights(7), transB=1).add("Relu")
    model = dense_head(g, 7).model(3)
    for init in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims))
        )
    check_against_onnxruntime(save(model, tmp_path), (5,))


def test_training_mode_exports_are_refused(tmp_path):
    g = Graph((6,)).add("Gemm", weights(8, 6), weights(8), transB=1)
    g.add("BatchNormalization", *_bn(8), training_mode=1)
    _refused(tmp_path, dense_head(g, 8).model(3, opset=15), r"\(BatchNormalization\): training")
    g = Graph((6,)).add("Gemm", weights(8, 6), weights(8), transB=1).add("Relu")
    g.add("Dropout", np.float32(0.5), np.array(True))
    _refused(tmp_path, dense_head(g, 8).model(3), r"node 'dropout3' \(Dropout\): training_mode")


# -- convolutions ----------------------------------------------------------------------------
@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 1), (1, 0)])
def test_conv_with_stride_and_padding(tmp_path, stride, pad):
    g = conv(Graph((2, 8, 8)), 2, 4, pad=pad, stride=stride).add("Relu").add("Flatten")
    size = (8 + 2 * pad - 3) // stride + 1
    dense_head(g, 4 * size * size)
    check_against_onnxruntime(save(g.model(3), tmp_path), (2, 8, 8))


@pytest.mark.parametrize("groups, c_out, stride", [(2, 6, 1), (4, 4, 2), (4, 8, 1)])
def test_grouped_and_depthwise_conv(tmp_path, groups, c_out, stride):
    g = conv(Graph((4, 8, 8)), 4, c_out, stride=stride, groups=groups).add("Relu")
    conv(g, c_out, c_out, k=1, pad=0).add("Relu").add("Flatten")  # pointwise, as MobileNet
    size = (8 + 2 - 3) // stride + 1
    dense_head(g, c_out * size * size)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (4, 8, 8), convert=False)
    assert net.layers[0].groups == groups and net.layers[2].groups == 1


@pytest.mark.parametrize(
    "attrs, pattern",
    [
        ({"dilations": [2, 2]}, r"dilations \[2, 2\] not supported"),
        ({"pads": [1, 0, 1, 0]}, r"pads \[1, 0, 1, 0\] not supported"),
        ({"strides": [1, 2]}, r"stride \[1, 2\] not supported"),
        ({"group": 3}, "group=3 does not fit 2 input channels"),
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, ".*pads asymmetrically"),
    ],
)
def test_unsupported_conv_attributes_are_named(tmp_path, attrs, pattern):
    g = Graph((2, 8, 8)).add("Conv", weights(3, 2, 3, 3), weights(3), kernel_shape=[3, 3], **attrs)
    g.add("Flatten").add("Gemm", weights(3, 3 * 36), weights(3), transB=1)
    _refused(tmp_path, g.model(3), rf"node 'conv1' \(Conv\): {pattern}")


def test_conv_same_padding(tmp_path):
    g = Graph((2, 6, 6)).add(
        "Conv", weights(3, 2, 3, 3), weights(3), kernel_shape=[3, 3], auto_pad="SAME_UPPER"
    )
    dense_head(g.add("Relu").add("Flatten"), 3 * 36)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 6, 6))
    assert net.layers[0].padding == 1


@pytest.mark.parametrize("form", ["opset17", "opset10_attributes", "opset18_axes", "twice"])
def test_zero_pad_is_taken_into_the_next_conv(tmp_path, form):
    g = Graph((2, 6, 6))
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    if form == "opset10_attributes":
        g.add("Pad", pads=pads.tolist(), mode="constant", value=0.0)
    elif form == "opset18_axes":
        g.add("Pad", np.array([1, 1, 1, 1], np.int64), np.float32(0), np.array([2, 3], np.int64))
    else:
        g.add("Pad", pads)
        if form == "twice":
            g.add("Pad", pads, np.float32(0))
    conv(g, 2, 3, pad=1).add("Relu")
    if form == "opset10_attributes":  # nn.ZeroPad2d(1) before a pool
        g.add("Pad", pads=pads.tolist())
    else:
        g.add("Pad", pads)
    g.add("AveragePool", kernel_shape=[2, 2], strides=[2, 2], count_include_pad=1)
    size = (6 + 2 * (3 if form == "twice" else 2) - 3 + 1 + 2) // 2
    dense_head(g.add("Flatten"), 3 * size * size)
    opset = {"opset10_attributes": 10, "opset18_axes": 18}.get(form, 17)
    net = check_against_onnxruntime(
        save(g.model(3, opset=opset), tmp_path), (2, 6, 6), convert=False
    )
    assert types(net)[:3] == ["conv2d", "relu", "avgpool2d"]
    assert (net.layers[0].padding, net.layers[2].padding) == (3 if form == "twice" else 2, 1)


@pytest.mark.parametrize(
    "pads, extra, then, pattern",
    [
        ([0, 0, 1, 0, 0, 0, 0, 1], {}, "Conv", r"\(Pad\): pads \[0, 0, 1, 0, 0, 0, 0, 1\] not"),
        ([0, 0, 1, 1, 0, 0, 1, 1], {"mode": "reflect"}, "Conv", r"\(Pad\): mode 'reflect'"),
        (
            [0, 0, 1, 1, 0, 0, 1, 1],
            {},
            "Relu",
            r"node 'relu2' \(Relu\): reads the zero-padded "
            r"output of Pad 'pad1'",
        ),
        ([0, 0, 1, 1, 0, 0, 1, 1], {}, "MaxPool", r"\(MaxPool\): reads the zero-padded"),
    ],
)
def test_pads_that_no_layer_takes_are_refused(tmp_path, pads, extra, then, pattern):
    g = Graph((2, 6, 6)).add("Pad", np.array(pads, np.int64), **extra)
    if then == "Conv":
        conv(g, 2, 3, pad=0)
    elif then == "MaxPool":
        g.add("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    else:
        g.add(then)
    _refused(tmp_path, g.add("Flatten").model(3), pattern)


# -- pooling ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, attrs, size",
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 4),
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}, 4),
        ("MaxPool", {"kernel_shape": [2, 2]}, 7),  # ONNX's default stride is 1
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, 4),  # no effect
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 4),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}, 4),
        (
            "AveragePool",
            {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4, "count_include_pad": 1},
            4,
        ),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1] * 4}, 8),
    ],
)
def test_pooling(tmp_path, op, attrs, size):
    g = conv(Graph((2, 8, 8)), 2, 4).add("Relu").add(op, **attrs).add("Flatten")
    dense_head(g, 4 * size * size)
    padded = bool(attrs.get("pads"))
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 8, 8), convert=not padded)
    pool = net.layers[2]
    assert pool.padding == (1 if padded else 0)
    if op == "AveragePool":
        assert pool.count_include_pad == bool(attrs.get("count_include_pad", 0))


@pytest.mark.parametrize(
    "op, attrs, pattern",
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, "ceil_mode=1"),
        ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 0, 1, 0]}, r"pads \[1, 0, 1, 0\]"),
        ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2]}, "dilations"),
        ("AveragePool", {"kernel_shape": [2, 3]}, r"kernel \[2, 3\] not supported"),
    ],
)
def test_unsupported_pooling_is_named(tmp_path, op, attrs, pattern):
    g = conv(Graph((2, 7, 7)), 2, 4).add("Relu").add(op, **attrs)
    name = g.name
    _refused(tmp_path, g.add("Flatten").model(3), rf"node '{name}' \({op}\): .*{pattern}")


@pytest.mark.parametrize(
    "form, opset",
    [
        ("GlobalAveragePool", 17),
        ("GlobalMaxPool", 17),
        ("ReduceMean_attr_keepdims0", 13),
        ("ReduceMean_attr_keepdims1", 17),
        ("ReduceMean_input_keepdims0", 18),
        ("ReduceMean_input_keepdims1", 20),
        ("ReduceMax_input_keepdims0", 18),
    ],
)
def test_global_pooling(tmp_path, form, opset):
    g = conv(Graph((2, 6, 6), batch=2), 2, 4).add("Relu")
    op, _, rest = form.partition("_")
    if op.startswith("Global"):
        g.add(op).add("Flatten")
    else:
        keepdims = int(rest[-1])
        if "attr" in rest:
            g.add(op, axes=[2, 3], keepdims=keepdims)
        else:
            g.add(op, np.array([-1, -2], np.int64), keepdims=keepdims)
        if keepdims:  # then a Reshape to the export's literal batch, as dynamo writes
            g.add("Reshape", np.array([2, 4], np.int64), allowzero=1)
    dense_head(g, 4)
    net = check_against_onnxruntime(save(g.model(3, opset=opset), tmp_path), (2, 6, 6))
    assert types(net)[2:4] == [
        "avgpool2d" if "Average" in op or "Mean" in op else "maxpool2d",
        "flatten",
    ]
    assert net.layers[2].kernel == 6


def test_global_pooling_refusals(tmp_path):
    g = conv(Graph((2, 4, 6)), 2, 4).add("Relu").add("ReduceMean", axes=[2, 3], keepdims=0)
    _refused(
        tmp_path,
        dense_head(g, 4).model(3),
        r"node 'reducemean3' \(ReduceMean\): needs a "
        "square feature map, got 4x6",
    )
    g = conv(Graph((2, 4, 4)), 2, 4).add("Relu").add("ReduceMean", axes=[1], keepdims=0)
    _refused(tmp_path, g.model(3), r"node 'reducemean3' \(ReduceMean\): reduces axes \[1\]")
    g = conv(Graph((2, 4, 6)), 2, 4).add("Relu").add("GlobalAveragePool")
    _refused(tmp_path, g.model(3), r"node 'globalaveragepool3' \(GlobalAveragePool\): .*4x6")


# -- flattening ------------------------------------------------------------------------------
def _shape_chain(g: Graph, slice_form=False):
    """``x.view(x.size(0), -1)`` as the legacy exporter writes it with a dynamic batch."""
    source = g.current
    g.add("Shape")
    if slice_form:
        g.add("Slice", np.array([0], np.int64), np.array([1], np.int64))
    else:
        g.add("Gather", np.array(0, np.int64), axis=0)
        g.add("Unsqueeze", np.array([0], np.int64))
    g.add("Concat", inputs=[g.current, g.const(np.array([-1], np.int64))], axis=0)
    return g.add("Reshape", inputs=[source, g.current])


@pytest.mark.parametrize(
    "form, batch",
    [
        ("Flatten", "N"),
        ("[2, 48]", 2),
        ("[2, -1]", 2),
        ("[-1, 48]", "N"),
        ("[0, -1]", "N"),
        ("shape_gather_unsqueeze_concat", "N"),
        ("shape_slice_concat", "N"),
        ("shape_gather_unsqueeze_concat", 2),
        ("cast_and_int_arithmetic", "N"),
        ("shape_start_end", "N"),
        ("numel_div_batch", "N"),
        ("noop_reshape_then_flatten", "N"),
    ],
)
def test_flatten_forms(tmp_path, form, batch):
    g = Graph((2, 4, 4), batch=batch).add("Identity")
    conv(g, 2, 3).add("Relu").add("Dropout")
    if form == "Flatten":
        g.add("Flatten")
    elif form.startswith("["):
        g.add("Reshape", np.array(json.loads(form), np.int64), allowzero=int(batch == 2))
    elif form.startswith("shape"):
        _shape_chain(g, slice_form="slice" in form)
    elif form == "cast_and_int_arithmetic":  # features computed as C * H * W from the shape
        source = g.current
        g.add("Shape").add("Cast", to=TensorProto.FLOAT)
        g.add("Slice", np.array([1], np.int64), np.array([4], np.int64))
        g.add("ReduceProd", keepdims=1).add("Cast", to=TensorProto.INT64)
        g.add("Concat", inputs=[g.const(np.array([-1], np.int64)), g.current], axis=0)
        g.add("Reshape", inputs=[source, g.current])
    elif form == "shape_start_end":  # Shape(start=0, end=1) (opset 15) gives [N]
        source = g.current
        g.add("Shape", start=0, end=1)
        g.add("Concat", inputs=[g.current, g.const(np.array([-1], np.int64))], axis=0)
        g.add("Reshape", inputs=[source, g.current])
    elif form == "numel_div_batch":  # x.view(x.size(0), x.numel() // x.size(0))
        source = g.current
        batch = g.add("Shape").add("Gather", np.array([0], np.int64), axis=0).current
        g.add("Size", inputs=[source]).add("Reshape", np.array([1], np.int64))
        g.add("Div", inputs=[g.current, batch])
        g.add("Concat", inputs=[batch, g.current], axis=0)
        g.add("Reshape", inputs=[source, g.current])
    else:
        g.add("Reshape", np.array([0, 3, 4, 4], np.int64)).add("Flatten")
    dense_head(g, 48)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 4, 4))
    assert types(net).count("flatten") == 1 and len(net.layers) == 6


def test_bias_computed_from_shapes_and_types_as_unoptimised_dynamo_writes(tmp_path):
    # zeros of the activation's type, expanded to the weight's output count
    g = Graph((2, 4, 4))
    w = g.const(weights(3, 2, 3, 3))
    g.add("Shape", inputs=[w], start=0, end=1)
    count = g.add("Expand", np.array([1], np.int64)).current
    zero = g.add("CastLike", inputs=[g.const(np.float32(0)), "x"]).current
    bias = g.add("Expand", inputs=[zero, count]).current
    g.add("Conv", inputs=["x", w, bias], kernel_shape=[3, 3], pads=[1] * 4)
    dense_head(g.add("Relu").add("Flatten"), 48)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 4, 4))
    np.testing.assert_array_equal(net.layers[0].bias, np.zeros(3))


def test_casts_to_float_are_dropped_and_others_refused(tmp_path):
    g = Graph((4,)).add("Cast", to=TensorProto.FLOAT)  # x.float() under the legacy exporter
    g.add("Gemm", weights(3, 4), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (4,))
    assert types(net) == ["dense"] and net.name == "m"  # the file's name, not the graph's
    g = Graph((4,)).add("Cast", to=TensorProto.FLOAT16).add("Cast", to=TensorProto.FLOAT)
    g.add("Gemm", weights(3, 4), weights(3), transB=1)
    _refused(tmp_path, g.model(3), r"node 'cast1' \(Cast\): casts an activation to a type")


def test_squeeze_after_global_pooling_is_a_flatten(tmp_path):
    g = conv(Graph((2, 4, 4)), 2, 3).add("Relu").add("GlobalAveragePool")
    g.add("Squeeze", np.array([2, 3], np.int64))
    net = check_against_onnxruntime(save(dense_head(g, 3).model(3), tmp_path), (2, 4, 4))
    assert types(net)[:4] == ["conv2d", "relu", "avgpool2d", "flatten"]


@pytest.mark.parametrize(
    "target, pattern",
    [
        ([-1, 24], r"reshapes to \[-1, 24\], which does not keep one sample"),
        ([2, 3, 16], r"reshapes one sample \(3, 4, 4\) to \(3, 16\)"),
        ([-1], r"reshapes to \[-1\], which does not keep one sample"),
        ([0, 0, -1], r"reshapes one sample \(3, 4, 4\) to \(3, 16\)"),
        ("doubled_batch", "the target shape depends on the batch size other than as the batch"),
    ],
)
def test_reshapes_that_are_not_flattens_are_refused(tmp_path, target, pattern):
    g = conv(Graph((2, 4, 4)), 2, 3).add("Relu")
    if target == "doubled_batch":
        source = g.current
        g.add("Shape").add("Gather", np.array([0], np.int64), axis=0)
        g.add("Mul", np.array([2], np.int64))
        g.add("Concat", inputs=[g.current, g.const(np.array([-1], np.int64))], axis=0)
        g.add("Reshape", inputs=[source, g.current])
    else:
        g.add("Reshape", np.array(target, np.int64))
    _refused(tmp_path, g.model(3), rf"node '{g.name}' \(Reshape\): {pattern}")


def test_unflattening_the_input_is_refused_with_a_hint(tmp_path):
    g = Graph((64,)).add("Reshape", np.array([-1, 1, 8, 8], np.int64))
    conv(g, 1, 2).add("Relu").add("Flatten")
    pattern = r"to \(1, 8, 8\).*export the model with an input of shape \(N, 1, 8, 8\)"
    _refused(tmp_path, dense_head(g, 128).model(3), rf"node 'reshape1' \(Reshape\): .*{pattern}")


# -- input normalisation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps",
    [
        [("Sub", 4.88), ("Div", 6.02)],
        [("Sub", [[[4.9]], [[5.1]]]), ("Div", [[[[6.0]], [[5.8]]]])],  # (C,1,1) and (1,C,1,1)
        [("Mul", 0.0625), ("Add", -0.5)],
        [("rSub", 8.0), ("Mul", [[[0.1]], [[-0.2]]])],  # 8 - x, then a per-channel scale
        [("Div", 16.0), ("Sub", 0.5), ("Mul", 2.0), ("Add", [[[0.1]], [[0.2]]])],
    ],
)
def test_input_normalisation_folds_into_one_affine_layer(tmp_path, steps):
    g = Graph((2, 6, 6))
    for op, value in steps:
        value = np.asarray(value, np.float32)
        if op == "rSub":
            g.add("Sub", inputs=[g.const(value), g.current])
        else:
            g.add(op, value)
    conv(g, 2, 4, scale=0.2).add("Relu").add("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    dense_head(g.add("Flatten"), 36)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 6, 6), (0.0, 16.0))
    assert types(net)[:2] == ["batchnorm", "conv2d"]  # the whole chain is one affine map


def test_input_normalisation_of_a_flattened_input(tmp_path):
    g = Graph((1, 8, 8)).add("Flatten").add("Sub", weights(64)).add("Div", np.float32(4.0))
    g.add("Gemm", weights(10, 64, scale=0.1), weights(10), transB=1).add("Relu")
    g.add("Gemm", weights(3, 10), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (1, 8, 8), (0.0, 16.0))
    assert types(net)[:3] == ["flatten", "batchnorm", "dense"]


def test_constants_after_a_layer_become_its_bias_or_an_affine_layer(tmp_path):
    g = conv(Graph((2, 5, 5)), 2, 3).add("Add", weights(1, 3, 1, 1))  # a per-channel bias
    g.add("Sub", weights(1, 1, 5, 5))  # a bias per position
    g.add("Relu").add("Mul", np.float32(1.5)).add("Flatten")  # a scale after the ReLU
    dense_head(g, 75).add("Mul", np.float32(0.5))  # a temperature on the logits
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 5, 5))
    assert types(net) == [
        "conv2d",
        "relu",
        "batchnorm",
        "flatten",
        "dense",
        "relu",
        "dense",
        "batchnorm",
    ]
    assert net.layers[0].bias.shape == (3, 5, 5)


@pytest.mark.parametrize(
    "build, pattern",
    [
        (
            lambda g: g.add("Sub", weights(1, 1, 6, 6)),
            r"\(Sub\): the constant of shape "
            r"\(1, 1, 6, 6\) varies over positions",
        ),
        (lambda g: g.add("Div", inputs=[g.const(np.float32(2)), "x"]), "divides a constant"),
        (lambda g: g.add("Div", np.float32(0)), "divides by zero"),
        (lambda g: g.add("Add", weights(2, 2, 1, 1)), "without a batch of its own"),
    ],
)
def test_input_constants_that_are_not_affine_are_refused(tmp_path, build, pattern):
    g = build(Graph((2, 6, 6)))
    conv(g, 2, 4).add("Relu").add("Flatten")
    _refused(tmp_path, dense_head(g, 4 * 36).model(3), pattern)


# -- clipped ReLUs ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "form, opset",
    [
        ("Clip(0, 6)", 17),
        ("Clip attributes", 10),
        ("Max(x, 0) Clip(0, 6)", 18),  # torch.clamp under dynamo
        ("Clip(0, -) Clip(-, 6)", 17),  # torch.clamp under the legacy exporter
        ("Relu Min(6)", 17),
        ("Relu Clip(-1, 6)", 17),
    ],
)
def test_clipped_relu_forms(tmp_path, form, opset):
    g = conv(Graph((2, 6, 6)), 2, 4, scale=1.0)
    six, zero = np.float32(6.0), np.float32(0.0)
    if form == "Clip(0, 6)":
        g.add("Clip", zero, six)
    elif form == "Clip attributes":
        g.add("Clip", min=0.0, max=6.0)
    elif form == "Max(x, 0) Clip(0, 6)":
        g.add("Max", zero).add("Clip", zero, six)
    elif form == "Clip(0, -) Clip(-, 6)":
        g.add("Clip", zero).add("Clip", extra_inputs=["", g.const(six)])
    elif form == "Relu Min(6)":
        g.add("Relu").add("Min", six)
    else:
        g.add("Relu").add("Clip", np.float32(-1.0), six)
    dense_head(g.add("Flatten"), 4 * 36)
    path = save(g.model(3, opset=opset), tmp_path)
    net = check_against_onnxruntime(path, (2, 6, 6), (0.0, 4.0), convert=False)
    assert types(net).count("relu") == 2 and net.layers[1].clip == 6.0
    acts = net.activations(RNG.uniform(0, 4, (24, 2, 6, 6)))
    assert acts[net.layers[1].name].max() == 6.0  # the clip is active on these inputs


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda g: g.add("Clip", np.float32(-1), np.float32(1)), r"\(Clip\): lower bound -1.0"),
        (lambda g: g.add("Clip", np.float32(1), np.float32(6)), r"\(Clip\): lower bound 1.0"),
        (lambda g: g.add("Min", np.float32(6)), r"\(Min\): lower bound -inf"),
        (lambda g: g.add("Max", np.float32(1)), r"\(Max\): lower bound 1.0"),
        (lambda g: g.add("Clip", np.float32(0), np.float32(0)), r"upper bound 0.0 must be > 0"),
    ],
)
def test_clips_that_are_not_clipped_relus_are_refused(tmp_path, build, pattern):
    g = build(conv(Graph((2, 6, 6)), 2, 4))
    _refused(tmp_path, dense_head(g.add("Flatten"), 4 * 36).model(3), pattern)


# -- residual DAGs ---------------------------------------------------------------------------
def test_residual_identity_and_projection_blocks(tmp_path):
    g = conv(Graph((2, 8, 8)), 2, 4).add("Relu")
    stem = g.current
    conv(g, 4, 4).add("Relu")
    conv(g, 4, 4).add("Add", inputs=[g.current, stem]).add("Relu")  # identity shortcut
    block = g.current
    conv(g, 4, 6, stride=2).add("Relu")
    main_path = conv(g, 6, 6).current
    g.current = block
    shortcut = conv(g, 4, 6, k=1, pad=0, stride=2).current  # 1x1 projection
    g.add("Add", inputs=[main_path, shortcut]).add("Relu")
    g.add("GlobalAveragePool").add("Flatten").add("Gemm", weights(3, 6), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 8, 8), convert=False)
    adds = [layer for layer in net.layers if layer.type == "add"]
    assert [a.inputs for a in adds] == [("conv5", "relu2"), ("conv10", "conv11")]
    assert not net.is_chain


def test_sum_of_three_activations(tmp_path):
    g = Graph((4,)).add("Gemm", weights(5, 4), weights(5), transB=1).add("Relu")
    a = g.current
    b = g.add("Gemm", weights(5, 5), weights(5), transB=1).current
    c = g.add("Gemm", weights(5, 5), weights(5), transB=1, inputs=[a]).current
    g.add("Sum", inputs=[a, b, c]).add("Relu").add("Gemm", weights(3, 5), weights(3), transB=1)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (4,), convert=False)
    assert net.layers[4].inputs == ("relu2", "gemm3", "gemm4")


def test_dead_nodes_are_dropped_and_two_outputs_refused(tmp_path):
    g = conv(Graph((2, 4, 4)), 2, 3).add("Relu")
    relu = g.current
    g.add("Sigmoid").add("Shape")  # used by nobody: dropped, unsupported or not
    g.current = relu
    dense_head(g.add("Flatten"), 48)
    check_against_onnxruntime(save(g.model(3), tmp_path), (2, 4, 4))
    _refused(
        tmp_path,
        g.model(3, outputs=[g.current, relu]),
        "needs exactly one input and one "
        r"output, got 1 inputs and 2 outputs \(gemm\d+_out, relu2_out\)",
    )


# -- what stays unsupported ------------------------------------------------------------------
def _unsupported(kind: str) -> Graph:
    g = Graph((4,)).add("Gemm", weights(4, 4), weights(4), transB=1).add("Relu")
    if kind == "Sigmoid":
        g.add("Sigmoid")
    elif kind == "Softmax":
        g.add("Softmax", axis=1)
    elif kind == "LayerNormalization":
        g.add("LayerNormalization", weights(4), weights(4), axis=-1)
    elif kind == "MatMul":  # attention-like: a product of two activations
        g.add("MatMul", inputs=[g.current, g.add("Transpose", perm=[1, 0]).current])
    elif kind == "Mul":
        g.add("Mul", inputs=[g.current, "x"])
    elif kind == "Concat":
        g.add("Concat", inputs=[g.current, "x"], axis=1)
    elif kind == "Transpose":
        g.add("Transpose", perm=[1, 0])
    return g.add("Gemm", weights(3, 8 if kind == "Concat" else 4), weights(3), transB=1)


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("Sigmoid", r"node 'sigmoid3' \(Sigmoid\): operator not supported; supported: Gemm, "),
        ("Softmax", r"node 'softmax3' \(Softmax\): operator not supported"),
        ("LayerNormalization", r"node 'layernormalization3' \(LayerNormalization\): operator"),
        ("MatMul", r"node 'matmul4' \(MatMul\): multiplies two activations \(as attention"),
        ("Mul", r"node 'mul3' \(Mul\): multiplies two activations"),
        ("Concat", r"node 'concat3' \(Concat\): concatenates activations"),
        ("Transpose", r"node 'transpose3' \(Transpose\): operator not supported on activations"),
    ],
)
def test_unsupported_operators_are_named(tmp_path, kind, pattern):
    _refused(tmp_path, _unsupported(kind).model(3), pattern)


def test_cli_refuses_in_one_line_with_exit_code_2(tmp_path, capsys):
    path = save(_unsupported("Softmax").model(3), tmp_path, "softmax.onnx")
    assert main(["convert", str(path), "--input-range", "0,16"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "node 'softmax3' (Softmax): operator not supported" in err


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


def _bn(channels):
    return (
        np.abs(weights(channels)) + 0.5,
        weights(channels),
        weights(channels, scale=0.1),
        np.abs(weights(channels)) + 0.5,
    )


@pytest.mark.parametrize("where", ["before_relu", "after_relu"])
def test_batch_normalization(tmp_path, where):
    g = conv(Graph((2, 6, 6)), 2, 3)
    if where == "before_relu":
        g.add("BatchNormalization", *_bn(3), epsilon=1e-3).add("Relu")
    else:
        g.add("Relu").add("BatchNormalization", *_bn(3), epsilon=1e-3)
    dense_head(g.add("Flatten"), 3 * 36)
    net = check_against_onnxruntime(save(g.model(3), tmp_path), (2, 6, 6), (-1.0, 2.0))
    assert any(layer.type == "batchnorm" for layer in net.layers)


def test_vgg_style_network(tmp_path):
    g = Graph((3, 12, 12))
    for c_in, c_out in ((3, 8), (8, 8)):
        conv(g, c_in, c_out).add("BatchNormalization", *_bn(c_out)).add("Relu")
    g.add("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    conv(g, 8, 12).add("Relu").add("AveragePool", kernel_shape=[2, 2], strides=[2, 2])
    g.add("Flatten").add("Gemm", weights(16, 12 * 9, scale=0.1), weights(16), transB=1)
    g.add("Relu").add("Dropout").add("Gemm", weights(5, 16), weights(5), transB=1)
    check_against_onnxruntime(save(g.model(5), tmp_path), (3, 12, 12))


# -- export and round trips ------------------------------------------------------------------
def _f32(*shape, scale=0.4):
    return weights(*shape, scale=scale).astype(np.float64)


def _positive_f32(n):
    return (np.abs(weights(n)) + np.float32(0.5)).astype(np.float64)


def every_feature_network(clip=6.0) -> nd.Network:
    """A DAG with every layer type and option the IR has (float32-exact weights)."""
    bn = dict(gamma=_positive_f32(4), beta=_f32(4), mean=_f32(4), var=_positive_f32(4))
    layers = (
        nd.BatchNorm(
            "norm",
            gamma=np.array([0.5, 2.0]),
            beta=np.array([-1.0, 0.25]),
            mean=np.zeros(2),
            var=np.zeros(2),
            eps=1.0,
        ),
        nd.Conv2d("stem", _f32(4, 2, 3, 3), _f32(4), stride=1, padding=1),
        nd.BatchNorm("stem_bn", **bn, eps=1e-5 / 3),  # not a float32 value: metadata keeps it
        nd.ReLU("stem_relu", clip=clip, window=1.75),
        nd.Conv2d("dw", _f32(4, 1, 3, 3), _f32(4), padding=1, groups=4),
        nd.ReLU("dw_relu"),
        nd.Conv2d("pw", _f32(4, 2, 1, 1), _f32(4), groups=2),
        Add("join", inputs=("pw", "stem_relu")),
        nd.ReLU("join_relu"),
        nd.MaxPool2d("maxpool", kernel=3, stride=2, padding=1),
        nd.AvgPool2d("avgpool", kernel=3, stride=1, padding=1, count_include_pad=False),
        nd.AvgPool2d("avgpool_incl", kernel=3, stride=1, padding=1),
        nd.Conv2d("per_position", _f32(3, 4, 3, 3), _f32(3, 4, 4), padding=1),
        nd.ReLU("pp_relu"),
        Add("sum3", inputs=("pp_relu", "pp_relu", "per_position")),
        nd.Flatten("flat"),
        nd.Dense("fc", _f32(6, 48, scale=0.2), _f32(6)),
        nd.BatchNorm(
            "fc_bn",
            gamma=_positive_f32(6),
            beta=_f32(6),
            mean=_f32(6),
            var=_positive_f32(6),
        ),
        nd.ReLU("fc_relu"),
        nd.Dense("out", _f32(3, 6), _f32(3)),
    )
    return nd.Network("every_feature", (2, 8, 8), (0.0, 16.0), layers, classes=("a", "b", "c"))


def test_every_ir_network_round_trips_exactly(tmp_path):
    net = every_feature_network()
    x = RNG.uniform(0, 16, (32, 2, 8, 8))
    expected = net.forward(x)
    for dtype in ("float64", "float32"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the weights are float32 values: nothing rounds
            path = export_onnx(net, tmp_path / f"n_{dtype}.onnx", dtype=dtype)
        back = nd.load_model(path)
        # bit for bit: float32 weights load exactly, eps and clip come back from metadata
        np.testing.assert_array_equal(back.forward(x), expected)
        assert [la.type for la in back.layers] == [la.type for la in net.layers]
        assert back.sources == net.sources and back.classes == net.classes
        relu = back.layers[3]
        assert (relu.clip, relu.window) == (6.0, 1.75)
        assert back.layers[2].eps == 1e-5 / 3
        assert (back.layers[4].groups, back.layers[10].count_include_pad) == (4, False)
    got = run_onnxruntime(path, x, input_name="input")  # the float32 file
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("seed", range(4))
def test_random_chains_round_trip_bit_for_bit_in_float64(tmp_path, seed):
    net = random_network(seed)  # float64 weights: only a float64 export keeps them
    back = nd.load_model(export_onnx(net, tmp_path / "r.onnx", dtype="float64"))
    x = random_inputs(net, 16, seed)
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert back.sources == net.sources


def test_float32_export_keeps_exact_clip_values_in_metadata(tmp_path):
    net = every_feature_network(clip=0.1)  # 0.1 is no float32 value
    with pytest.warns(UserWarning, match="stem_relu"):
        path = export_onnx(net, tmp_path / "n.onnx")
    assert nd.load_model(path).layers[3].clip == 0.1


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
    expected = run_onnxruntime(path, x, input_name="input")
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
