"""ONNX import and export of ReLU networks (the ``Network`` IR).

Import reads a chain of supported operators (NCHW layout, as ONNX defines it):
Gemm, MatMul followed by Add, Conv (equal strides, symmetric padding,
dilation 1, group 1, square kernels), Relu, MaxPool, AveragePool,
GlobalAveragePool (square maps), BatchNormalization, Flatten, Reshape used as a
flatten, Identity and Dropout (dropped), Constant nodes and initialisers.
Anything else — another operator, a residual Add of two activations, a
branching graph, dynamic shapes — is refused before conversion, naming the
node and its operator. The input range [p, q] comes from the caller or from
the model's metadata (``neurodeploy.input_range`` = ``"p,q"``) and is required.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import ModelError
from .network import (
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
)

SUPPORTED_OPS = (
    "Gemm",
    "MatMul",
    "Add",
    "Conv",
    "Relu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Identity",
    "Dropout",
    "Constant",
)
META_INPUT_RANGE = "neurodeploy.input_range"
META_CLASSES = "neurodeploy.classes"
META_DATASET = "neurodeploy.dataset"
# ONNX float attributes are float32: the exact batch-norm epsilons travel in metadata.
META_BN_EPS = "neurodeploy.batchnorm_eps"
META_RELU_WINDOWS = "neurodeploy.relu_windows"  # TTFS windows stored by fine-tuning


class _Importer:
    def __init__(self, model, path: Path):
        from onnx import numpy_helper

        self.path = path
        self.graph = model.graph
        self.to_array = numpy_helper.to_array
        self.constants = {init.name: self.to_array(init) for init in self.graph.initializer}
        self.layers: list[Layer] = []
        self.names: set[str] = set()
        self.exact_eps: dict = {}
        self.relu_windows: dict = {}

    def fail(self, node, message: str):
        name = node.name or "(unnamed)"
        raise ModelError(f"{self.path}: node '{name}' ({node.op_type}): {message}")

    def attrs(self, node) -> dict:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(self, node, name: str) -> np.ndarray:
        if name not in self.constants:
            self.fail(node, f"input '{name}' must be a constant (initialiser or Constant node)")
        return np.asarray(self.constants[name], dtype=np.float64)

    def layer_name(self, node, kind: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]+", "_", node.name).strip("_") or f"{kind}{len(self.layers)}"
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name


def _square(node, imp: _Importer, values, what: str) -> int:
    values = list(values)
    if len(values) != 2 or values[0] != values[1]:
        imp.fail(node, f"{what} {values} not supported: only square {what}s")
    return int(values[0])


def _pool_geometry(node, imp: _Importer, attrs: dict) -> tuple[int, int]:
    kernel = _square(node, imp, attrs.get("kernel_shape", []), "kernel")
    stride = _square(node, imp, attrs.get("strides", [kernel, kernel]), "stride")
    if any(attrs.get("pads", [0, 0, 0, 0])):
        imp.fail(node, f"pads {list(attrs['pads'])} not supported: pooling without padding only")
    if attrs.get("ceil_mode", 0):
        imp.fail(node, "ceil_mode=1 not supported")
    if any(d != 1 for d in attrs.get("dilations", [1, 1])):
        imp.fail(node, "dilations other than 1 not supported")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        imp.fail(node, f"auto_pad {attrs['auto_pad']!r} not supported")
    return kernel, stride


def load_onnx(path: str | os.PathLike, input_range=None) -> Network:
    """Read an ONNX model into a :class:`Network`; see the module docstring."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model path does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises its own assorted errors for bad files
        raise ModelError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0]})") from None
    imp = _Importer(model, path)
    meta = {p.key: p.value for p in model.metadata_props}
    for key, attr in ((META_BN_EPS, "exact_eps"), (META_RELU_WINDOWS, "relu_windows")):
        try:
            setattr(imp, attr, json.loads(meta.get(key, "{}")))
        except json.JSONDecodeError:
            raise ModelError(f"{path}: metadata '{key}' must be a JSON object") from None
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in imp.constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelError(
            f"{path}: needs exactly one input and one output, got "
            f"{len(inputs)} and {len(graph.output)}"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for i, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise ModelError(
                f"{path}: input '{inputs[0].name}' dimension {i} is dynamic "
                f"({dim.dim_param or '?'}); export it with a fixed shape"
            )
        shape.append(int(dim.dim_value))
    if not shape:
        raise ModelError(f"{path}: input '{inputs[0].name}' has no shape")
    if input_range is None:
        if META_INPUT_RANGE not in meta:
            raise ModelError(
                f"{path}: the input range is required: pass input_range=(p, q) / --input-range "
                f"p,q, or set metadata_props '{META_INPUT_RANGE}' to 'p,q'"
            )
        try:
            input_range = tuple(float(v) for v in meta[META_INPUT_RANGE].split(","))
        except ValueError:
            raise ModelError(
                f"{path}: metadata '{META_INPUT_RANGE}' must be 'p,q', got "
                f"{meta[META_INPUT_RANGE]!r}"
            ) from None
    if len(tuple(input_range)) != 2:
        raise ModelError(f"{path}: the input range must be two numbers p, q")

    current = inputs[0].name
    for node in graph.node:
        op = node.op_type
        attrs = imp.attrs(node)
        if op == "Constant":
            if "value" not in attrs:
                imp.fail(node, "only Constant nodes with a 'value' tensor are supported")
            imp.constants[node.output[0]] = imp.to_array(attrs["value"])
            continue
        if op not in SUPPORTED_OPS:
            imp.fail(node, f"operator not supported; supported: {', '.join(SUPPORTED_OPS)}")
        data_inputs = [n for n in node.input if n and n not in imp.constants]
        if data_inputs != [current]:
            if op == "Add" and len(data_inputs) == 2:
                imp.fail(
                    node,
                    "adds two activations (a residual connection); only chains of layers convert",
                )
            imp.fail(
                node,
                f"reads {data_inputs}, not the previous layer's output '{current}': "
                "only a chain of layers converts",
            )
        _import_node(imp, node, op, attrs)
        current = node.output[0]
    if current != graph.output[0].name:
        raise ModelError(
            f"{path}: the graph output '{graph.output[0].name}' is not the end of "
            f"the layer chain ('{current}')"
        )
    classes = None
    if META_CLASSES in meta:
        try:
            classes = tuple(json.loads(meta[META_CLASSES]))
        except json.JSONDecodeError:
            raise ModelError(f"{path}: metadata '{META_CLASSES}' must be a JSON list") from None
    try:
        return Network(
            name=re.sub(r"[^A-Za-z0-9_.-]+", "_", graph.name or path.stem) or path.stem,
            input_shape=tuple(shape),
            input_range=tuple(input_range),
            layers=tuple(imp.layers),
            classes=classes,
            dataset=meta.get(META_DATASET),
        )
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None


def _import_node(imp: _Importer, node, op: str, attrs: dict) -> None:
    layers = imp.layers
    if op in ("Identity", "Dropout"):
        return
    if op == "Relu":
        window = imp.relu_windows.get(node.name)
        layers.append(ReLU(imp.layer_name(node, "relu"), window=window))
    elif op == "Gemm":
        if attrs.get("transA", 0):
            imp.fail(node, "transA=1 not supported")
        w = imp.const(node, node.input[1]) * attrs.get("alpha", 1.0)
        w = w if attrs.get("transB", 0) else w.T
        bias = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = np.broadcast_to(
                imp.const(node, node.input[2]) * attrs.get("beta", 1.0), (w.shape[0],)
            ).copy()
        layers.append(Dense(imp.layer_name(node, "dense"), w, bias))
    elif op == "MatMul":
        w = imp.const(node, node.input[1])
        if w.ndim != 2:
            imp.fail(node, f"the constant operand must be a matrix, got shape {w.shape}")
        layers.append(Dense(imp.layer_name(node, "dense"), w.T, np.zeros(w.shape[1])))
    elif op == "Add":
        last = layers[-1] if layers else None
        const = imp.const(node, next(n for n in node.input if n in imp.constants))
        if not isinstance(last, (Dense, Conv2d)):
            imp.fail(node, "adds a constant that is not the bias of a Gemm, MatMul or Conv")
        out = last.bias.shape[0]
        if isinstance(last, Conv2d):
            shape = _tensor_shape(imp, node.input[0])
            positions = None if shape is None or None in shape[2:] else tuple(shape[1:])
            if const.size == out:
                const = const.reshape(-1)
            elif positions is not None and const.size == int(np.prod(positions)):
                const = const.reshape(positions)  # one bias per output position
            else:
                const = None
        else:
            const = const.reshape(-1) if const.size in (1, out) else None
        if const is None:
            imp.fail(node, "the added constant does not broadcast as one bias per output")
        if const.ndim == 1:  # one bias per output (channel)
            const = np.broadcast_to(const, (out,))
            bias = last.bias + (const if last.bias.ndim == 1 else const[:, None, None])
        else:  # one bias per output position
            bias = (last.bias if last.bias.ndim == 3 else last.bias[:, None, None]) + const
        layers[-1] = replace(last, bias=bias)
    elif op == "Conv":
        w = imp.const(node, node.input[1])
        if attrs.get("group", 1) != 1:
            imp.fail(node, f"group={attrs['group']} not supported: only group 1")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            imp.fail(node, f"dilations {list(attrs['dilations'])} not supported: only 1")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            imp.fail(node, f"auto_pad {attrs['auto_pad']!r} not supported: give explicit pads")
        if w.ndim != 4 or w.shape[2] != w.shape[3]:
            imp.fail(node, f"weight shape {w.shape} not supported: only square 2-D kernels")
        stride = _square(node, imp, attrs.get("strides", [1, 1]), "stride")
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(set(pads)) != 1:
            imp.fail(node, f"pads {pads} not supported: only the same padding on every side")
        bias = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = imp.const(node, node.input[2])
        layers.append(
            Conv2d(imp.layer_name(node, "conv"), w, bias, stride=stride, padding=int(pads[0]))
        )
    elif op in ("MaxPool", "AveragePool"):
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            imp.fail(node, "the Indices output is not supported")
        kernel, stride = _pool_geometry(node, imp, attrs)
        cls = MaxPool2d if op == "MaxPool" else AvgPool2d
        layers.append(cls(imp.layer_name(node, "pool"), kernel, stride))
    elif op == "GlobalAveragePool":
        shape = _tensor_shape(imp, node.input[0])
        if shape is None or len(shape) != 4 or shape[2] != shape[3]:
            imp.fail(node, f"needs a square feature map, got shape {shape}")
        layers.append(AvgPool2d(imp.layer_name(node, "gap"), shape[2], shape[2]))
    elif op == "BatchNormalization":
        if attrs.get("training_mode", 0):
            imp.fail(node, "training_mode=1 not supported: export in inference mode")
        gamma, beta, mean, var = (imp.const(node, n) for n in node.input[1:5])
        eps = float(attrs.get("epsilon", 1e-5))
        exact = imp.exact_eps.get(node.name)
        if isinstance(exact, float) and np.float32(exact) == np.float32(eps):
            eps = exact  # the attribute is this value rounded to float32
        layers.append(BatchNorm(imp.layer_name(node, "bn"), gamma, beta, mean, var, eps=eps))
    elif op == "Flatten":
        if attrs.get("axis", 1) != 1:
            imp.fail(node, f"axis={attrs['axis']} not supported: only axis 1 (keep the batch)")
        layers.append(Flatten(imp.layer_name(node, "flatten")))
    elif op == "Reshape":
        target = [int(v) for v in imp.const(node, node.input[1]).reshape(-1)]
        shape = _tensor_shape(imp, node.input[0])
        features = None if shape is None else int(np.prod(shape[1:]))
        flat = len(target) == 2 and target[1] in (-1, features) and target[0] in (-1, 0, 1)
        if not flat:
            imp.fail(
                node, f"reshapes to {target}: only a flatten to (batch, features) is supported"
            )
        layers.append(Flatten(imp.layer_name(node, "flatten")))


def _tensor_shape(imp: _Importer, name: str):
    for info in (*imp.graph.value_info, *imp.graph.input, *imp.graph.output):
        if info.name == name:
            dims = info.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return None


def export_onnx(net: Network, path: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write ``net`` as an ONNX model (opset 17), atomically.

    dtype "float32" (default) is what ONNX runtimes execute (onnxruntime has no
    float64 Conv); it loses nothing for weights that are float32 values, as a
    framework's are and the shipped models' are. "float64" keeps any weight bit
    exactly. The input range, classes, data set and exact batch-norm epsilons
    travel in the model's metadata.
    """
    if dtype == "float32":
        lossy = [
            layer.name
            for layer in net.layers
            if any(not np.array_equal(a, a.astype(np.float32)) for a in layer.params().values())
        ]
        if lossy:
            import warnings

            warnings.warn(
                f"export: weights of {lossy} are not float32 values and will be "
                "rounded; use dtype='float64' to keep them exactly",
                stacklevel=2,
            )
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if dtype not in ("float64", "float32"):
        raise ModelError(f"export: dtype must be float64 or float32, got {dtype!r}")
    np_type = np.float64 if dtype == "float64" else np.float32
    elem = TensorProto.DOUBLE if dtype == "float64" else TensorProto.FLOAT
    nodes, inits = [], []
    current = "input"

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np_type), name))
        return name

    for layer in net.layers:
        out = f"{layer.name}_out"
        if isinstance(layer, Dense):
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [
                        current,
                        init(f"{layer.name}.weight", layer.weight),
                        init(f"{layer.name}.bias", layer.bias),
                    ],
                    [out],
                    name=layer.name,
                    transB=1,
                )
            )
        elif isinstance(layer, Conv2d):
            p = layer.padding
            per_position = layer.bias.ndim == 3
            conv_inputs = [current, init(f"{layer.name}.weight", layer.weight)]
            if not per_position:
                conv_inputs.append(init(f"{layer.name}.bias", layer.bias))
            conv_out = f"{layer.name}_conv" if per_position else out
            nodes.append(
                helper.make_node(
                    "Conv",
                    conv_inputs,
                    [conv_out],
                    name=layer.name,
                    kernel_shape=[layer.kernel] * 2,
                    strides=[layer.stride] * 2,
                    pads=[p] * 4,
                )
            )
            if per_position:  # a bias per output position: Conv, then Add
                bias = init(f"{layer.name}.bias", layer.bias[None])
                nodes.append(
                    helper.make_node("Add", [conv_out, bias], [out], name=f"{layer.name}_bias")
                )
        elif isinstance(layer, BatchNorm):
            names = [
                init(f"{layer.name}.{k}", getattr(layer, k))
                for k in ("gamma", "beta", "mean", "var")
            ]
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [current, *names],
                    [out],
                    name=layer.name,
                    epsilon=float(layer.eps),
                )
            )
        elif isinstance(layer, ReLU):
            nodes.append(helper.make_node("Relu", [current], [out], name=layer.name))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            op = "MaxPool" if isinstance(layer, MaxPool2d) else "AveragePool"
            nodes.append(
                helper.make_node(
                    op,
                    [current],
                    [out],
                    name=layer.name,
                    kernel_shape=[layer.kernel] * 2,
                    strides=[layer.stride] * 2,
                )
            )
        elif isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [current], [out], name=layer.name, axis=1))
        else:  # pragma: no cover - the IR has no other layer type
            raise ModelError(f"export: layer '{layer.name}' of type {layer.type} has no ONNX form")
        current = out
    graph = helper.make_graph(
        nodes,
        net.name,
        [helper.make_tensor_value_info("input", elem, ["N", *net.input_shape])],
        [helper.make_tensor_value_info(current, elem, ["N", net.num_classes])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="neurodeploy"
    )
    model.ir_version = 8
    meta = {META_INPUT_RANGE: ",".join(repr(v) for v in net.input_range)}
    eps = {layer.name: float(layer.eps) for layer in net.layers if isinstance(layer, BatchNorm)}
    if eps:
        meta[META_BN_EPS] = json.dumps(eps)
    windows = {
        layer.name: layer.window
        for layer in net.layers
        if isinstance(layer, ReLU) and layer.window is not None
    }
    if windows:
        meta[META_RELU_WINDOWS] = json.dumps(windows)
    if net.classes is not None:
        meta[META_CLASSES] = json.dumps(list(net.classes))
    if net.dataset is not None:
        meta[META_DATASET] = net.dataset
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    from .fileio import write_bytes_atomic

    return write_bytes_atomic(path, model.SerializeToString())
