"""ONNX import and export of ReLU networks (the ``Network`` IR).

Import takes what PyTorch writes — both ``torch.onnx.export`` exporters
(``dynamo=True`` and ``dynamo=False``), opsets 13 to 20 — and in general any
NCHW graph of these operators, in three steps:

1. **Constant folding.** Every node whose inputs are all constants
   (initialisers, Constant nodes, or shapes) is evaluated with numpy following
   its ONNX definition (``FOLDED_OPS``: Shape, Gather, Unsqueeze, Concat, Cast,
   Slice, arithmetic, ...). Shape and Size of an activation are constants: its
   per-sample dimensions are static, and the batch dimension stays symbolic (it
   is evaluated at two batch sizes; a value that follows the batch *is* the
   batch). So ``x.view(x.size(0), -1)``'s Shape -> Gather -> Unsqueeze ->
   Concat chain becomes the target ``[batch, -1]``.
2. **Mapping** (``SUPPORTED_OPS``) of what remains, a DAG of activations:
   Gemm (transB, alpha, beta, C broadcast), MatMul by a constant matrix with an
   optional Add of a bias, Conv (group: grouped and depthwise; symmetric pads;
   dilation 1), Relu, Clip(0, M) / Max(x, 0) / Min(relu, M) (a ReLU clipped at
   M: ReLU6, Hardtanh(0, M), clamp), BatchNormalization (inference), MaxPool
   (symmetric pads), AveragePool (pads, count_include_pad either way),
   GlobalAveragePool / GlobalMaxPool and ReduceMean / ReduceMax over (H, W)
   (square maps), Flatten, Reshape and Squeeze that flatten (C, H, W) to
   features whatever batch literal they carry (``[2, 128]``, ``[2, -1]``,
   ``[-1, 128]``, ``[0, -1]``) or change nothing, Identity, Dropout and Cast
   to float32/float64 (dropped), Pad with zeros on the spatial sides (taken
   into the padding of the Conv, or AveragePool with count_include_pad=1,
   reading it), Add / Sum of two or more activations (a
   residual join: an :class:`Add` layer naming its inputs), and Add / Sub /
   Mul / Div by a scalar or per-channel constant: an Add or Sub after a Gemm,
   MatMul or Conv is its bias (per output position too), anything else —
   input normalisation ``(x - mean) / std`` above all — becomes a BatchNorm
   layer with mean 0, var 0 and eps 1, whose scale gamma and shift beta are
   then exact (the converter folds it into the next layer, zero padding
   included). A Clip or Max whose lower bound is below 0 is exact only on a
   ReLU's output, and is taken there.
   The network's input range stays the raw input's.
3. **Refusal** of anything else with ONE :class:`ModelError` naming the file,
   the node and its operator: first a node combining two activations other
   than by Add/Sum (the MatMul of attention, a gating Mul, a Concat), then an
   operator outside ``SUPPORTED_OPS`` (Sigmoid, Softmax, LayerNormalization,
   Transpose of an activation, ...), then what an operator's attributes rule
   out (dilation, asymmetric pads, ceil_mode that changes the size, a Reshape
   that is not a flatten, a Clip whose lower bound is not 0, ...). Nodes whose
   outputs do not reach the graph output are dropped; a graph with more than
   one output is refused.

The input range [p, q] comes from the caller or from the model's metadata
(``neurodeploy.input_range`` = ``"p,q"``) and is required.

Export writes every IR network (chains and DAGs: Add, grouped Conv, clipped
ReLU as Clip with min/max inputs, padded pools with count_include_pad) so that
importing it back gives the same forward pass bit for bit: always with
``dtype="float64"``, and with float32 too when the weights are float32 values
(a framework's are); the exact batch-norm epsilons and clip values, which ONNX
would round to float32, travel in the metadata.
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
    INPUT,
    Add,
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
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Conv",
    "Relu",
    "Clip",
    "Max",
    "Min",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "ReduceMean",
    "ReduceMax",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Identity",
    "Dropout",
    "Cast",
    "Pad",
)
FOLDED_OPS = (
    "Constant",
    "Identity",
    "Cast",
    "CastLike",
    "Shape",
    "Size",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Reshape",
    "Flatten",
    "Transpose",
    "Expand",
    "ConstantOfShape",
    "Range",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "Not",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Abs",
    "Sqrt",
    "Reciprocal",
    "Pow",
    "Floor",
    "Ceil",
    "Min",
    "Max",
    "ReduceProd",
    "ReduceSum",
)
META_INPUT_RANGE = "neurodeploy.input_range"
META_CLASSES = "neurodeploy.classes"
META_DATASET = "neurodeploy.dataset"
# ONNX float attributes are float32: the exact batch-norm epsilons travel in metadata,
# and so do the exact clip values (a float32 export rounds its Clip inputs).
META_BN_EPS = "neurodeploy.batchnorm_eps"
META_RELU_CLIPS = "neurodeploy.relu_clips"
META_RELU_WINDOWS = "neurodeploy.relu_windows"  # TTFS windows stored by fine-tuning
# Shapes are evaluated at two batch sizes: a value that follows them is the batch.
_BATCHES = (3, 5)


class _Importer:
    """State of one import: constants, the activations mapped so far, the layers."""

    def __init__(self, model, path: Path):
        from onnx import helper, numpy_helper

        self.path = path
        self.graph = model.graph
        self.helper = helper
        self.to_array = numpy_helper.to_array
        # name -> (value at batch _BATCHES[0], value at batch _BATCHES[1]); the same
        # object twice for what does not depend on the batch.
        self.consts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for init in self.graph.initializer:
            value = self.to_array(init)
            self.consts[init.name] = (value, value)
        self.values: dict[str, str] = {}  # activation tensor -> the IR layer (or INPUT) giving it
        self.shapes: dict[str, tuple] = {}  # IR layer (or INPUT) -> one sample's output shape
        self.layers: list[Layer] = []
        self.index: dict[str, int] = {}
        self.uses: dict[str, int] = {}  # IR layer -> number of node inputs reading it
        self.synthetic_affine: set[str] = set()  # BatchNorm layers made of Add/Sub/Mul/Div
        self.names: set[str] = {INPUT}
        self.consumers: dict[str, int] = {}
        self.exact_eps: dict = {}
        self.relu_clips: dict = {}
        self.relu_windows: dict = {}
        self.float_dtype = np.float32  # the network input's element type
        # a Pad's output -> (its input, zero padding per spatial side, the Pad's name);
        # the Conv or AveragePool reading it takes the padding into its own
        self.zero_pads: dict[str, tuple[str, int, str]] = {}

    # -- errors, attributes, constants ---------------------------------------------------
    def fail(self, node, message: str):
        name = node.name or "(unnamed)"
        raise ModelError(f"{self.path}: node '{name}' ({node.op_type}): {message}")

    def attrs(self, node) -> dict:
        return {a.name: self.helper.get_attribute_value(a) for a in node.attribute}

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, node, name: str, dtype=np.float64) -> np.ndarray:
        """A constant input that must not depend on the batch size, as ``dtype``."""
        if name not in self.consts:
            self.fail(node, f"input '{name}' must be a constant (initialiser or Constant node)")
        a, b = self.consts[name]
        if a is not b and not (a.shape == b.shape and np.array_equal(a, b)):
            self.fail(node, f"input '{name}' depends on the batch size")
        return np.asarray(a, dtype=dtype) if dtype is not None else a

    def optional_const(self, node, index: int, dtype=np.float64):
        if len(node.input) > index and node.input[index]:
            return self.const(node, node.input[index], dtype)
        return None

    def layer_name(self, node, kind: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]+", "_", node.name).strip("_") or f"{kind}{len(self.layers)}"
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    # -- activations and layers ----------------------------------------------------------
    def source(self, tensor: str) -> str:
        return self.values[tensor]

    def shape(self, tensor: str) -> tuple:
        return self.shapes[self.values[tensor]]

    def producer(self, tensor: str):
        """The layer giving ``tensor`` if nothing else reads it (so it may be changed)."""
        src = self.values[tensor]
        if src == INPUT or self.uses[src] != 1:
            return None
        return self.layers[self.index[src]]

    def alias(self, out: str, tensor: str) -> None:
        """``out`` is the same activation as ``tensor`` (a dropped or merged node)."""
        src = self.values[tensor]
        self.values[out] = src
        if src != INPUT:
            self.uses[src] += self.consumers.get(out, 0) - 1

    def emit(self, node, out: str, cls, srcs: tuple[str, ...], kind: str, **params) -> Layer:
        """Append a layer reading the IR sources ``srcs``; its output is tensor ``out``."""
        name = self.layer_name(node, kind)
        previous = self.layers[-1].name if self.layers else INPUT
        chained = cls is not Add and len(srcs) == 1 and srcs[0] == previous
        try:
            layer = cls(name, inputs=() if chained else tuple(srcs), **params)
            in_shapes = [self.shapes[s] for s in srcs]
            if isinstance(layer, Add):
                shape = layer.merged_shape(in_shapes)
            else:
                shape = layer.output_shape(in_shapes[0])
        except ModelError as exc:
            self.fail(node, str(exc))
        self.index[name] = len(self.layers)
        self.layers.append(layer)
        self.shapes[name] = shape
        self.uses[name] = self.consumers.get(out, 0)
        self.values[out] = name
        return layer

    def update(self, node, out: str, tensor: str, layer: Layer, **changes) -> None:
        """Replace ``layer`` (which gives ``tensor``) by a copy with ``changes``; ``out``
        becomes its output."""
        try:
            new = replace(layer, **changes)
            new.output_shape(self.shapes[self.sources_of(layer)[0]])
        except ModelError as exc:
            self.fail(node, str(exc))
        self.layers[self.index[layer.name]] = new
        self.alias(out, tensor)

    def sources_of(self, layer: Layer) -> tuple[str, ...]:
        if layer.inputs:
            return tuple(layer.inputs)
        i = self.index[layer.name]
        return (self.layers[i - 1].name if i else INPUT,)


def _fold_constant(imp: _Importer, node, op: str, attrs: dict, args: list) -> np.ndarray:
    """Evaluate one ONNX node on numpy constants (None for an omitted input)."""

    def axes_arg(index: int):
        if "axes" in attrs:
            return [int(a) for a in attrs["axes"]]
        if len(args) > index and args[index] is not None:
            return [int(a) for a in np.asarray(args[index]).reshape(-1)]
        return None

    x = args[0] if args else None
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(imp.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "CastLike":
        return x.astype(args[1].dtype)
    if op == "Shape":
        dims = np.array(x.shape, dtype=np.int64)
        return dims[attrs.get("start", 0) : attrs.get("end", len(dims))]
    if op == "Size":
        return np.array(x.size, dtype=np.int64)
    if op == "Gather":
        return np.take(x, args[1].astype(np.int64), axis=attrs.get("axis", 0))
    if op == "Unsqueeze":
        axes = axes_arg(1)
        rank = x.ndim + len(axes)
        out = x
        for axis in sorted(a % rank for a in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Squeeze":
        axes = axes_arg(1)
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))
    if op == "Concat":
        return np.concatenate([a for a in args if a is not None], axis=attrs["axis"])
    if op == "Slice":
        if "starts" in attrs:  # opset < 10
            starts, ends = attrs["starts"], attrs["ends"]
            axes, steps = attrs.get("axes"), None
        else:
            starts, ends = (list(np.asarray(a).reshape(-1)) for a in args[1:3])
            axes = axes_arg(3) if len(args) > 3 and args[3] is not None else None
            steps = None
            if len(args) > 4 and args[4] is not None:
                steps = list(np.asarray(args[4]).reshape(-1))
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            index[int(axis) % x.ndim] = slice(int(start), int(end), int(step))
        return x[tuple(index)]
    if op == "Reshape":
        target = [int(v) for v in args[1].reshape(-1)]
        if not attrs.get("allowzero", 0):
            target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        return x.reshape(target)
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(x.ndim, 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Expand":
        shape = np.broadcast_shapes(x.shape, tuple(int(v) for v in args[1]))
        return np.broadcast_to(x, shape).copy()
    if op == "ConstantOfShape":
        value = attrs.get("value")
        fill = imp.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
        return np.full(tuple(int(v) for v in x), fill, dtype=np.asarray(fill).dtype)
    if op == "Range":
        return np.arange(x, args[1], args[2], dtype=x.dtype)
    if op == "Where":
        return np.where(x, args[1], args[2])
    if op == "Div" and np.issubdtype(x.dtype, np.integer):
        b = args[1]  # ONNX integer division truncates toward zero
        return (np.sign(x) * np.sign(b) * (np.abs(x) // np.abs(b))).astype(x.dtype)
    if op in ("ReduceProd", "ReduceSum"):
        axes = axes_arg(1)
        if axes is None and attrs.get("noop_with_empty_axes", 0):
            return x
        reduce = np.prod if op == "ReduceProd" else np.sum
        keep = bool(attrs.get("keepdims", 1))
        out = reduce(x, axis=None if axes is None else tuple(axes), keepdims=keep)
        return np.asarray(out, dtype=x.dtype)
    binary = {
        "Add": np.add,
        "Sub": np.subtract,
        "Mul": np.multiply,
        "Div": np.divide,
        "Pow": np.power,
        "Equal": np.equal,
        "Less": np.less,
        "Greater": np.greater,
    }
    if op in binary:
        out = binary[op](x, args[1])
        return np.asarray(out if op in ("Equal", "Less", "Greater") else out.astype(x.dtype))
    unary = {
        "Neg": np.negative,
        "Abs": np.abs,
        "Sqrt": np.sqrt,
        "Reciprocal": np.reciprocal,
        "Floor": np.floor,
        "Ceil": np.ceil,
        "Not": np.logical_not,
    }
    if op in unary:
        return np.asarray(unary[op](x))
    if op in ("Min", "Max"):
        fn = np.minimum if op == "Min" else np.maximum
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return np.asarray(out)
    imp.fail(node, "operator not supported on constants")  # pragma: no cover - FOLDED_OPS


def _constant_node_value(imp: _Importer, node, attrs: dict) -> np.ndarray:
    if "value" in attrs:
        return imp.to_array(attrs["value"])
    scalars = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in scalars.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    imp.fail(node, f"only numeric Constant values are supported, got {sorted(attrs)}")


def _fold_node(imp: _Importer, node, op: str, attrs: dict) -> None:
    """Evaluate a node whose inputs are constants (or shapes) at both batch sizes."""
    if op == "Constant":
        value = _constant_node_value(imp, node, attrs)
        imp.consts[node.output[0]] = (value, value)
        return
    if op in ("Shape", "Size") and not imp.is_const(node.input[0]):
        per_sample = _activation_shape(imp, node, node.input[0])
        pair = []
        for batch in _BATCHES:
            dims = np.array([batch, *per_sample], dtype=np.int64)
            if op == "Size":
                pair.append(np.array(np.prod(dims), dtype=np.int64))
            else:
                pair.append(dims[attrs.get("start", 0) : attrs.get("end", len(dims))])
        imp.consts[node.output[0]] = tuple(pair)
        return
    if op == "CastLike" and not imp.is_const(node.input[1]):  # only the activation's type
        value = imp.consts[node.input[0]]
        imp.consts[node.output[0]] = tuple(v.astype(imp.float_dtype) for v in value)
        return
    pairs = [imp.consts[n] if n else (None, None) for n in node.input]
    try:
        first = _fold_constant(imp, node, op, attrs, [p[0] for p in pairs])
        if all(a is b for a, b in pairs):
            second = first
        else:
            second = _fold_constant(imp, node, op, attrs, [p[1] for p in pairs])
            if first.shape == second.shape and np.array_equal(first, second):
                second = first
    except ModelError:
        raise
    except Exception as exc:  # numpy's own errors: a malformed constant subgraph
        imp.fail(node, f"cannot evaluate on its constant inputs ({exc})")
    imp.consts[node.output[0]] = (first, second)


def _activation_shape(imp: _Importer, node, tensor: str) -> tuple:
    """One sample's shape of an activation: mapped, or from ONNX shape inference."""
    if tensor in imp.values:
        return imp.shape(tensor)
    for info in (*imp.graph.value_info, *imp.graph.input, *imp.graph.output):
        if info.name == tensor:
            dims = info.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims[1:]):
                return tuple(int(d.dim_value) for d in dims[1:])
    imp.fail(node, f"the shape of '{tensor}' is unknown")


def _value_inputs(node) -> list[str]:
    """The inputs whose values a node reads: Shape and Size read only their input's
    shape, CastLike only its second input's type (static both: constants)."""
    if node.op_type in ("Shape", "Size"):
        return []
    return [n for n in (node.input[:1] if node.op_type == "CastLike" else node.input) if n]


def _activations(graph, input_name: str) -> set[str]:
    """The tensors computed from the values of the network input."""
    data = {input_name}
    for node in graph.node:
        if any(n in data for n in _value_inputs(node)):
            data.update(out for out in node.output if out)
    return data


def _live_nodes(graph, data: set[str]) -> list:
    """The nodes whose outputs reach the graph output, in graph (topological) order.

    Shape, Size and CastLike read only an activation's shape or type, which are
    static: they do not make the node giving the activation live.
    """
    needed = {graph.output[0].name}
    nodes = list(graph.node)
    live = [False] * len(nodes)
    for i in reversed(range(len(nodes))):
        node = nodes[i]
        if not any(out in needed for out in node.output):
            continue
        live[i] = True
        values = _value_inputs(node)
        needed.update(n for n in node.input if n and (n in values or n not in data))
    return [node for node, keep in zip(nodes, live, strict=True) if keep]


def _check_structure(imp: _Importer, nodes: list, data: set[str]) -> None:
    """Refuse, before any mapping, the first node that joins two activations other than
    by a sum, then the first operator that no layer maps."""
    takes = [[n for n in _value_inputs(node) if n in data] for node in nodes]
    for node, ins in zip(nodes, takes, strict=True):
        if len(ins) > 1 and node.op_type not in ("Add", "Sum"):
            what = {
                "MatMul": "multiplies two activations (as attention does)",
                "Gemm": "multiplies two activations",
                "Mul": "multiplies two activations (gating)",
                "Concat": "concatenates activations",
            }.get(node.op_type, f"combines the activations {ins}")
            imp.fail(
                node,
                f"{what}: not supported; only Add and Sum join activations (residual "
                "connections), every other operator needs constant weights",
            )
    for node, ins in zip(nodes, takes, strict=True):
        if not ins:
            continue
        foreign = node.domain not in ("", "ai.onnx")
        if foreign or node.op_type not in SUPPORTED_OPS:
            domain = f" (domain '{node.domain}')" if foreign else ""
            folded = node.op_type in FOLDED_OPS and not foreign
            imp.fail(
                node,
                f"operator not supported{domain}"
                f"{' on activations (only on constants)' if folded else ''}; "
                f"supported: {', '.join(SUPPORTED_OPS)}",
            )


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
    for key, attr in (
        (META_BN_EPS, "exact_eps"),
        (META_RELU_CLIPS, "relu_clips"),
        (META_RELU_WINDOWS, "relu_windows"),
    ):
        try:
            setattr(imp, attr, json.loads(meta.get(key, "{}")))
        except json.JSONDecodeError:
            raise ModelError(f"{path}: metadata '{key}' must be a JSON object") from None
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in imp.consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelError(
            f"{path}: needs exactly one input and one output, got "
            f"{len(inputs)} inputs and {len(graph.output)} outputs "
            f"({', '.join(o.name for o in graph.output)})"
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

    input_name = inputs[0].name
    imp.float_dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
    data = _activations(graph, input_name)
    nodes = _live_nodes(graph, data)
    _check_structure(imp, nodes, data)
    output = graph.output[0].name
    for node in nodes:
        for name in _value_inputs(node):
            imp.consumers[name] = imp.consumers.get(name, 0) + 1
    imp.consumers[output] = imp.consumers.get(output, 0) + 1
    imp.values[input_name] = INPUT
    imp.shapes[INPUT] = tuple(shape)
    for node in nodes:
        op = node.op_type
        attrs = imp.attrs(node)
        if all(map(imp.is_const, _value_inputs(node))):
            if op not in FOLDED_OPS:
                imp.fail(node, "operator not supported on constants")
            _fold_node(imp, node, op, attrs)
            continue
        _map_node(imp, node, op, attrs)
    if output not in imp.values or imp.values[output] == INPUT:
        raise ModelError(f"{path}: the graph output '{output}' is not computed by any layer")
    if imp.values[output] != imp.layers[-1].name:  # pragma: no cover - live nodes only
        raise ModelError(f"{path}: the graph output '{output}' is not the last layer's")
    classes = None
    if META_CLASSES in meta:
        try:
            classes = tuple(json.loads(meta[META_CLASSES]))
        except json.JSONDecodeError:
            raise ModelError(f"{path}: metadata '{META_CLASSES}' must be a JSON list") from None
    try:
        return Network(
            name=_network_name(graph.name, path),
            input_shape=tuple(shape),
            input_range=tuple(input_range),
            layers=tuple(imp.layers),
            classes=classes,
            dataset=meta.get(META_DATASET),
        )
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None


def _network_name(graph_name: str, path: Path) -> str:
    """The graph's name, or the file's stem for the exporters' generic graph names."""
    if not graph_name or graph_name in ("main_graph", "torch_jit", "torch-jit-export"):
        graph_name = path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", graph_name) or path.stem


# -- mapping one node to layers --------------------------------------------------------------
def _map_node(imp: _Importer, node, op: str, attrs: dict) -> None:
    data = [n for n in node.input if n and not imp.is_const(n)]
    out = node.output[0]
    extra = [o for o in node.output[1:] if o and imp.consumers.get(o)]
    if extra:
        imp.fail(node, f"its extra outputs {extra} are used: only the first output maps")
    padded = [d for d in data if d in imp.zero_pads]
    absorbs = op in ("Conv", "Pad") or (op == "AveragePool" and attrs.get("count_include_pad", 0))
    if padded and not absorbs:
        imp.fail(
            node,
            f"reads the zero-padded output of Pad '{imp.zero_pads[padded[0]][2]}': only a "
            "Conv or an AveragePool with count_include_pad=1 takes a Pad into its padding",
        )
    handler = _HANDLERS[op]
    handler(imp, node, attrs, data, out)


def _unpad(imp: _Importer, tensor: str) -> tuple[str, int]:
    """The tensor a Pad node padded and by how much (itself and 0 for any other)."""
    if tensor in imp.zero_pads:
        source, padding, _ = imp.zero_pads[tensor]
        return source, padding
    return tensor, 0


def _map_pad(imp, node, attrs, data, out):
    x = _first_data_input(imp, node, data)
    source, before = _unpad(imp, x)
    _require_image(imp, node, source)
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        imp.fail(node, f"mode '{mode}' not supported: only zero padding")
    if "pads" in attrs:  # opset < 11
        pads, value, axes = [int(p) for p in attrs["pads"]], float(attrs.get("value", 0.0)), None
    else:
        pads = [int(p) for p in imp.const(node, node.input[1], np.int64).reshape(-1)]
        fill = imp.optional_const(node, 2)
        value = 0.0 if fill is None else float(fill.reshape(-1)[0])
        axes = imp.optional_const(node, 3, np.int64)
    if axes is not None:  # opset 18: pads for the listed axes only
        full = [0] * 8
        for i, axis in enumerate(int(a) % 4 for a in axes.reshape(-1)):
            full[axis], full[axis + 4] = pads[i], pads[i + len(axes.reshape(-1))]
        pads = full
    if value != 0.0:
        imp.fail(node, f"pads with the value {value}: only zero padding")
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or len(set(pads[2:4] + pads[6:])) != 1:
        imp.fail(node, f"pads {pads} not supported: only the same padding on every spatial side")
    if pads[2] < 0:
        imp.fail(node, f"pads {pads} crop: not supported")
    imp.zero_pads[out] = (source, before + pads[2], node.name)


def _first_data_input(imp: _Importer, node, data: list) -> str:
    if node.input[0] != data[0]:
        imp.fail(node, "the activation must be the first input; the others must be constants")
    return data[0]


def _require_vector(imp: _Importer, node, tensor: str) -> tuple:
    shape = imp.shape(tensor)
    if len(shape) != 1:
        imp.fail(
            node,
            f"needs a (batch, features) input, got one sample of shape {shape}: flatten first",
        )
    return shape


def _require_image(imp: _Importer, node, tensor: str) -> tuple:
    shape = imp.shape(tensor)
    if len(shape) != 3:
        imp.fail(node, f"needs a (batch, C, H, W) input, got one sample of shape {shape}")
    return shape


def _map_identity(imp, node, attrs, data, out):
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        if imp.const(node, node.input[2], None).reshape(-1).any():
            imp.fail(node, "training_mode=true not supported: export in inference mode")
    imp.alias(out, data[0])


def _map_cast(imp, node, attrs, data, out):
    from onnx import TensorProto

    if attrs.get("to") not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        imp.fail(node, "casts an activation to a type other than float32 or float64")
    imp.alias(out, data[0])  # the IR computes in float64 throughout


def _map_gemm(imp, node, attrs, data, out):
    x = _first_data_input(imp, node, data)
    _require_vector(imp, node, x)
    if attrs.get("transA", 0):
        imp.fail(node, "transA=1 not supported: it would put the batch on the feature axis")
    w = imp.const(node, node.input[1]) * float(attrs.get("alpha", 1.0))
    if w.ndim != 2:
        imp.fail(node, f"the weight must be a matrix, got shape {w.shape}")
    w = w if attrs.get("transB", 0) else w.T
    bias = np.zeros(w.shape[0])
    c = imp.optional_const(node, 2)
    if c is not None:
        c = c * float(attrs.get("beta", 1.0))
        if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            imp.fail(node, f"C of shape {c.shape} is not one bias per output ({w.shape[0]})")
        bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)).copy()
    imp.emit(node, out, Dense, (imp.source(x),), "dense", weight=w, bias=bias)


def _map_matmul(imp, node, attrs, data, out):
    if node.input[0] != data[0]:
        imp.fail(
            node,
            "the constant is the left operand (W @ x): only x @ W (batch first) maps to a "
            "dense layer",
        )
    _require_vector(imp, node, data[0])
    w = imp.const(node, node.input[1])
    while w.ndim > 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 2:
        imp.fail(node, f"the constant operand must be a matrix, got shape {w.shape}")
    imp.emit(
        node, out, Dense, (imp.source(data[0]),), "dense", weight=w.T, bias=np.zeros(w.shape[1])
    )


def _map_sum(imp, node, attrs, data, out):
    if len(data) != len([n for n in node.input if n]):
        imp.fail(node, "adds constants to a sum of activations: not supported")
    if len(data) == 1:
        imp.alias(out, data[0])
        return
    imp.emit(node, out, Add, tuple(imp.source(d) for d in data), "add")


def _map_elementwise(imp, node, attrs, data, out):
    """Add/Sub/Mul/Div: a residual join of two activations, or an affine constant."""
    op = node.op_type
    if len(data) == 2:  # _check_structure admits only Add here
        _map_sum(imp, node, attrs, data, out)
        return
    x = data[0]
    const_first = node.input[0] != x
    c = imp.const(node, node.input[0] if const_first else node.input[1])
    shape = imp.shape(x)
    if c.ndim > len(shape) + 1:
        imp.fail(node, f"the constant of shape {c.shape} would broadcast the activation up")
    full = c.reshape((1,) * (len(shape) + 1 - c.ndim) + c.shape)
    if full.shape[0] != 1 or any(
        k not in (1, s) for k, s in zip(full.shape[1:], shape, strict=True)
    ):
        imp.fail(
            node,
            f"the constant of shape {c.shape} does not broadcast over one sample of shape "
            f"{shape} without a batch of its own",
        )
    per_sample = full[0]
    if op == "Div" and const_first:
        imp.fail(node, "divides a constant by an activation: not an affine map")
    if op == "Div" and not np.all(per_sample != 0):
        imp.fail(node, "divides by zero")
    per_channel = all(k == 1 for k in per_sample.shape[1:])
    channels = shape[0]
    producer = imp.producer(x)
    if op in ("Add", "Sub") and not (op == "Sub" and const_first):
        if isinstance(producer, (Dense, Conv2d)):  # the bias of the layer before
            sign = 1.0 if op == "Add" else -1.0
            _add_bias(imp, node, out, x, producer, sign * per_sample, per_channel)
            return
    if not per_channel:
        imp.fail(
            node,
            f"the constant of shape {c.shape} varies over positions: only scalar and "
            "per-channel constants fold into an affine map",
        )
    vec = np.broadcast_to(per_sample.reshape(-1), (channels,)).astype(np.float64)
    one, zero = np.ones(channels), np.zeros(channels)
    scale, shift = {
        "Add": (one, vec),
        "Sub": (-one, vec) if const_first else (one, -vec),
        "Mul": (vec, zero),
        "Div": (1.0 / vec, zero),
    }[op]
    if producer is not None and producer.name in imp.synthetic_affine:
        # compose with the affine map before: scale * (g x + b) + shift
        imp.update(
            node, out, x, producer, gamma=scale * producer.gamma, beta=scale * producer.beta + shift
        )
        return
    # x * gamma + beta as a batch norm: mean 0, var 0, eps 1 give scale = gamma exactly
    layer = imp.emit(
        node,
        out,
        BatchNorm,
        (imp.source(x),),
        "affine",
        gamma=scale,
        beta=shift,
        mean=zero,
        var=zero,
        eps=1.0,
    )
    imp.synthetic_affine.add(layer.name)


def _add_bias(imp, node, out, x, layer, per_sample, per_channel):
    out_shape = imp.shape(x)
    if per_channel:
        vec = np.broadcast_to(per_sample.reshape(-1), out_shape[:1])
        bias = layer.bias + (vec if layer.bias.ndim == 1 else vec[:, None, None])
    else:  # one bias per output position (a conv's map)
        own = layer.bias if layer.bias.ndim == 3 else layer.bias[:, None, None]
        bias = own + np.broadcast_to(per_sample, out_shape)
    imp.update(node, out, x, layer, bias=bias)


def _clip_bound(imp, node, index: int, attr: str, attrs: dict):
    if attr in attrs:  # opset < 11
        return float(attrs[attr])
    value = imp.optional_const(node, index)
    if value is None:
        return None
    if value.size != 1:
        imp.fail(node, f"the {attr} bound must be a scalar, got shape {value.shape}")
    return float(value.reshape(-1)[0])


def _map_clip(imp, node, attrs, data, out):
    x = data[0]
    op = node.op_type
    if op in ("Relu", "Clip"):
        _first_data_input(imp, node, data)
    if op == "Relu":
        low, high = 0.0, None
    elif op == "Clip":
        low, high = _clip_bound(imp, node, 1, "min", attrs), _clip_bound(imp, node, 2, "max", attrs)
    else:  # Max(x, c) or Min(x, c), one constant
        if len(node.input) != 2:
            imp.fail(node, "needs exactly one activation and one constant")
        c = imp.const(node, node.input[1] if node.input[0] == x else node.input[0])
        if c.size != 1:
            imp.fail(node, f"the constant must be a scalar, got shape {c.shape}")
        value = float(c.reshape(-1)[0])
        low, high = (value, None) if op == "Max" else (None, value)
    exact = imp.relu_clips.get(node.name)
    if high is not None and isinstance(exact, float) and np.float32(exact) == np.float32(high):
        high = exact  # the exported Clip input is this value rounded to float32
    producer = imp.producer(x)
    after_relu = isinstance(producer, ReLU)  # its output is >= 0 already
    if low is None or low < 0:
        if not after_relu:
            imp.fail(
                node,
                f"lower bound {low if low is not None else '-inf'} is not 0: only a ReLU "
                "clipped at M (Clip(0, M), ReLU6, Hardtanh(0, M)) is supported",
            )
    elif low > 0:
        imp.fail(node, f"lower bound {low} is not 0: only Clip(0, M) maps to a clipped ReLU")
    if high is not None and not high > 0:
        imp.fail(node, f"upper bound {high} must be > 0")
    if after_relu:  # clip(relu(v), lo <= 0, M) = relu clipped at M
        clips = [c for c in (producer.clip, high) if c is not None]
        imp.update(node, out, x, producer, clip=min(clips) if clips else None)
        return
    window = imp.relu_windows.get(node.name)
    imp.emit(node, out, ReLU, (imp.source(x),), "relu", window=window, clip=high)


def _square(imp, node, values, what: str) -> int:
    values = [int(v) for v in values]
    if len(values) != 2 or values[0] != values[1]:
        imp.fail(node, f"{what} {values} not supported: only square {what}s on 2-D maps")
    return values[0]


def _padding(imp, node, attrs: dict, kernel: int, stride: int, size: int) -> int:
    """Symmetric padding from pads or auto_pad; refuses what is not symmetric."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        if total % 2:
            imp.fail(node, f"auto_pad {auto} pads asymmetrically here: give symmetric pads")
        return total // 2
    if auto not in ("NOTSET", "VALID"):
        imp.fail(node, f"auto_pad {auto!r} not supported")
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])] if auto == "NOTSET" else [0] * 4
    if len(pads) != 4 or len(set(pads)) != 1:
        imp.fail(node, f"pads {pads} not supported: only the same padding on every side")
    return pads[0]


def _no_dilation(imp, node, attrs: dict) -> None:
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    if any(d != 1 for d in dilations):
        imp.fail(node, f"dilations {dilations} not supported: only 1")


def _map_conv(imp, node, attrs, data, out):
    x, extra = _unpad(imp, _first_data_input(imp, node, data))
    c, h, _ = _require_image(imp, node, x)
    w = imp.const(node, node.input[1])
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        imp.fail(node, f"weight shape {w.shape} not supported: only square 2-D kernels")
    _no_dilation(imp, node, attrs)
    kernel = w.shape[2]
    if "kernel_shape" in attrs:
        _square(imp, node, attrs["kernel_shape"], "kernel")
    stride = _square(imp, node, attrs.get("strides", [1, 1]), "stride")
    padding = extra + _padding(imp, node, attrs, kernel, stride, h + 2 * extra)
    groups = int(attrs.get("group", 1))
    if groups < 1 or c % groups or w.shape[1] * groups != c:
        imp.fail(node, f"group={groups} does not fit {c} input channels and weight {w.shape}")
    bias = imp.optional_const(node, 2)
    bias = np.zeros(w.shape[0]) if bias is None else bias
    imp.emit(
        node,
        out,
        Conv2d,
        (imp.source(x),),
        "conv",
        weight=w,
        bias=bias,
        stride=stride,
        padding=padding,
        groups=groups,
    )


def _map_pool(imp, node, attrs, data, out):
    x, extra = _unpad(imp, _first_data_input(imp, node, data))
    _, h, _ = _require_image(imp, node, x)
    h += 2 * extra  # a Pad's zeros are inputs like any other (count_include_pad=1)
    kernel = _square(imp, node, attrs.get("kernel_shape", []), "kernel")
    stride = _square(imp, node, attrs.get("strides", [1, 1]), "stride")  # ONNX default: 1
    _no_dilation(imp, node, attrs)
    padding = _padding(imp, node, attrs, kernel, stride, h)
    if attrs.get("ceil_mode", 0):
        floor_size = (h + 2 * padding - kernel) // stride + 1
        ceil_size = -(-(h + 2 * padding - kernel) // stride) + 1
        if (ceil_size - 1) * stride >= h + padding:  # the last window starts in the padding
            ceil_size -= 1
        if ceil_size != floor_size:
            imp.fail(
                node,
                f"ceil_mode=1 gives {ceil_size} outputs per axis where floor gives "
                f"{floor_size}: not supported (export with ceil_mode=False)",
            )
    if node.op_type == "MaxPool":
        imp.emit(
            node,
            out,
            MaxPool2d,
            (imp.source(x),),
            "pool",
            kernel=kernel,
            stride=stride,
            padding=padding,
        )
    else:
        imp.emit(
            node,
            out,
            AvgPool2d,
            (imp.source(x),),
            "pool",
            kernel=kernel,
            stride=stride,
            padding=padding + extra,
            count_include_pad=bool(attrs.get("count_include_pad", 0)),
        )


def _global_pool(imp, node, x: str, out: str, cls, keepdims: bool) -> None:
    _, h, w = _require_image(imp, node, x)
    if h != w:
        imp.fail(node, f"needs a square feature map, got {h}x{w}")
    if keepdims:
        imp.emit(node, out, cls, (imp.source(x),), "gap", kernel=h, stride=h)
        return
    pooled = f"{out}::pooled"
    imp.consumers[pooled] = 1
    imp.emit(node, pooled, cls, (imp.source(x),), "gap", kernel=h, stride=h)
    imp.emit(node, out, Flatten, (imp.source(pooled),), "flatten")


def _map_global_pool(imp, node, attrs, data, out):
    cls = AvgPool2d if node.op_type == "GlobalAveragePool" else MaxPool2d
    _global_pool(imp, node, _first_data_input(imp, node, data), out, cls, keepdims=True)


def _map_reduce(imp, node, attrs, data, out):
    x = _first_data_input(imp, node, data)
    shape = imp.shape(x)
    if "axes" in attrs:  # opset < 18
        axes = [int(a) for a in attrs["axes"]]
    else:
        value = imp.optional_const(node, 1, dtype=np.int64)
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            imp.alias(out, x)
            return
        axes = list(range(len(shape) + 1))
    rank = len(shape) + 1
    if sorted(a % rank for a in axes) != [2, 3] or rank != 4:
        imp.fail(
            node,
            f"reduces axes {axes} of a rank-{rank} tensor: only the spatial axes (2, 3) of "
            "(batch, C, H, W), a global pooling, are supported",
        )
    cls = AvgPool2d if node.op_type == "ReduceMean" else MaxPool2d
    _global_pool(imp, node, x, out, cls, keepdims=bool(attrs.get("keepdims", 1)))


def _map_batchnorm(imp, node, attrs, data, out):
    x = _first_data_input(imp, node, data)
    if attrs.get("training_mode", 0):
        imp.fail(node, "training_mode=1 not supported: export in inference mode")
    if len(imp.shape(x)) not in (1, 3):
        imp.fail(node, f"needs (batch, F) or (batch, C, H, W), got one sample {imp.shape(x)}")
    gamma, beta, mean, var = (imp.const(node, n) for n in node.input[1:5])
    eps = float(attrs.get("epsilon", 1e-5))
    exact = imp.exact_eps.get(node.name)
    if isinstance(exact, float) and np.float32(exact) == np.float32(eps):
        eps = exact  # the attribute is this value rounded to float32
    imp.emit(
        node,
        out,
        BatchNorm,
        (imp.source(x),),
        "bn",
        gamma=gamma,
        beta=beta,
        mean=mean,
        var=var,
        eps=eps,
    )


def _flatten_to(imp, node, x: str, out: str, per_sample: tuple) -> None:
    """A node giving one sample of shape ``per_sample``: flatten, no-op, or refusal."""
    shape = imp.shape(x)
    if tuple(per_sample) == tuple(shape):
        imp.alias(out, x)
    elif tuple(per_sample) == (int(np.prod(shape)),):
        imp.emit(node, out, Flatten, (imp.source(x),), "flatten")
    else:
        hint = ""
        if imp.source(x) == INPUT:
            hint = (
                f"; for samples stored flat, reshape the data and export the model with an "
                f"input of shape (N, {', '.join(map(str, per_sample))})"
            )
        imp.fail(
            node,
            f"reshapes one sample {shape} to {tuple(per_sample)}: only a flatten (C, H, W) -> "
            f"(C*H*W) keeping the batch, or a no-op, is supported{hint}",
        )


def _map_flatten(imp, node, attrs, data, out):
    x = data[0]
    rank = len(imp.shape(x)) + 1
    axis = int(attrs.get("axis", 1))
    if axis % rank != 1:
        imp.fail(node, f"axis={axis} not supported: only axis 1 (keep the batch)")
    _flatten_to(imp, node, x, out, (int(np.prod(imp.shape(x))),))


def _map_reshape(imp, node, attrs, data, out):
    x = _first_data_input(imp, node, data)
    shape = imp.shape(x)
    features = int(np.prod(shape))
    first, second = imp.consts[node.input[1]]
    target = []
    for a, b in zip(first.reshape(-1), second.reshape(-1), strict=True):
        if a == b:
            target.append(int(a))
        elif (int(a), int(b)) == _BATCHES:
            target.append("batch")
        else:
            imp.fail(node, "the target shape depends on the batch size other than as the batch")
    allowzero = bool(attrs.get("allowzero", 0))
    shown = [t if t != "batch" else "N" for t in target]
    lead = target[0] if target else None
    if lead is None or (lead == 0 and allowzero) or (isinstance(lead, int) and lead < -1):
        imp.fail(node, f"reshapes to {shown}: the first dimension must stay the batch")
    rest = [
        shape[i] if v == 0 and not allowzero and i < len(shape) else v
        for i, v in enumerate(target[1:])
    ]
    if "batch" in rest or any(v < -1 or v == 0 for v in rest) or rest.count(-1) > 1:
        imp.fail(node, f"reshapes to {shown}: not a flatten keeping the batch")
    if -1 in rest:
        if lead == -1:
            imp.fail(node, f"reshapes to {shown}: two inferred dimensions")
        known = int(np.prod([v for v in rest if v != -1]))
        if features % known:
            imp.fail(node, f"reshapes one sample of {features} values to {shown}")
        rest = [features // known if v == -1 else v for v in rest]
    if int(np.prod(rest)) != features:  # a literal batch would change: not this sample's
        imp.fail(
            node,
            f"reshapes to {shown}, which does not keep one sample of {shape} ({features} "
            "values) per batch entry",
        )
    _flatten_to(imp, node, x, out, tuple(rest))


def _map_squeeze(imp, node, attrs, data, out):
    x = _first_data_input(imp, node, data)
    shape = imp.shape(x)
    full = (None, *shape)
    if "axes" in attrs:
        axes = [int(a) for a in attrs["axes"]]
    else:
        value = imp.optional_const(node, 1, dtype=np.int64)
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    if axes is None:
        axes = [i for i, d in enumerate(full) if d == 1]
    axes = sorted({a % len(full) for a in axes})
    if 0 in axes or any(full[a] != 1 for a in axes):
        imp.fail(node, f"squeezes axes {axes} of (batch, {shape}): only unit per-sample axes")
    _flatten_to(imp, node, x, out, tuple(d for i, d in enumerate(full) if i and i not in axes))


_HANDLERS = {
    "Identity": _map_identity,
    "Dropout": _map_identity,
    "Cast": _map_cast,
    "Pad": _map_pad,
    "Gemm": _map_gemm,
    "MatMul": _map_matmul,
    "Sum": _map_sum,
    "Add": _map_elementwise,
    "Sub": _map_elementwise,
    "Mul": _map_elementwise,
    "Div": _map_elementwise,
    "Relu": _map_clip,
    "Clip": _map_clip,
    "Max": _map_clip,
    "Min": _map_clip,
    "Conv": _map_conv,
    "MaxPool": _map_pool,
    "AveragePool": _map_pool,
    "GlobalAveragePool": _map_global_pool,
    "GlobalMaxPool": _map_global_pool,
    "ReduceMean": _map_reduce,
    "ReduceMax": _map_reduce,
    "BatchNormalization": _map_batchnorm,
    "Flatten": _map_flatten,
    "Reshape": _map_reshape,
    "Squeeze": _map_squeeze,
}
assert set(_HANDLERS) == set(SUPPORTED_OPS)


# -- export ------------------------------------------------------------------------------
def export_onnx(net: Network, path: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write ``net`` as an ONNX model (opset 17), atomically.

    dtype "float32" (default) is what ONNX runtimes execute (onnxruntime has no
    float64 Conv); it loses nothing for weights that are float32 values, as a
    framework's are and the shipped models' are. "float64" keeps any weight bit
    exactly. Every layer reads the tensors its sources (``net.sources``) give, so
    residual DAGs export as they are. The input range, classes, data set, exact
    batch-norm epsilons, exact clip values and TTFS windows travel in the model's
    metadata.
    """
    if dtype not in ("float64", "float32"):
        raise ModelError(f"export: dtype must be float64 or float32, got {dtype!r}")
    if dtype == "float32":
        lossy = [
            layer.name
            for layer in net.layers
            if any(not np.array_equal(a, a.astype(np.float32)) for a in layer.params().values())
            or (
                isinstance(layer, ReLU)
                and layer.clip is not None
                and float(np.float32(layer.clip)) != layer.clip
            )
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

    np_type = np.float64 if dtype == "float64" else np.float32
    elem = TensorProto.DOUBLE if dtype == "float64" else TensorProto.FLOAT
    nodes, inits = [], []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np_type), name))
        return name

    def tensor(src: str) -> str:
        return "input" if src == INPUT else f"{src}_out"

    for layer, srcs in zip(net.layers, net.sources, strict=True):
        out = tensor(layer.name)
        x = tensor(srcs[0])
        if isinstance(layer, Dense):
            w = init(f"{layer.name}.weight", layer.weight)
            b = init(f"{layer.name}.bias", layer.bias)
            nodes.append(helper.make_node("Gemm", [x, w, b], [out], name=layer.name, transB=1))
        elif isinstance(layer, Conv2d):
            p = layer.padding
            per_position = layer.bias.ndim == 3
            conv_inputs = [x, init(f"{layer.name}.weight", layer.weight)]
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
                    group=layer.groups,
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
                    [x, *names],
                    [out],
                    name=layer.name,
                    epsilon=float(layer.eps),
                )
            )
        elif isinstance(layer, ReLU) and layer.clip is not None:
            low = init(f"{layer.name}.min", np.zeros(()))
            high = init(f"{layer.name}.max", np.asarray(layer.clip))
            nodes.append(helper.make_node("Clip", [x, low, high], [out], name=layer.name))
        elif isinstance(layer, ReLU):
            nodes.append(helper.make_node("Relu", [x], [out], name=layer.name))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            geometry = {
                "kernel_shape": [layer.kernel] * 2,
                "strides": [layer.stride] * 2,
                "pads": [layer.padding] * 4,
            }
            if isinstance(layer, MaxPool2d):
                nodes.append(helper.make_node("MaxPool", [x], [out], name=layer.name, **geometry))
            else:
                nodes.append(
                    helper.make_node(
                        "AveragePool",
                        [x],
                        [out],
                        name=layer.name,
                        count_include_pad=int(layer.count_include_pad),
                        **geometry,
                    )
                )
        elif isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [x], [out], name=layer.name, axis=1))
        elif isinstance(layer, Add):
            op = "Add" if len(srcs) == 2 else "Sum"
            nodes.append(helper.make_node(op, [tensor(s) for s in srcs], [out], name=layer.name))
        else:  # pragma: no cover - the IR has no other layer type
            raise ModelError(f"export: layer '{layer.name}' of type {layer.type} has no ONNX form")
    graph = helper.make_graph(
        nodes,
        net.name,
        [helper.make_tensor_value_info("input", elem, ["N", *net.input_shape])],
        [helper.make_tensor_value_info(tensor(net.layers[-1].name), elem, ["N", net.num_classes])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="neurodeploy"
    )
    model.ir_version = 8
    meta = {META_INPUT_RANGE: ",".join(repr(v) for v in net.input_range)}
    relus = [layer for layer in net.layers if isinstance(layer, ReLU)]
    for key, values in (
        (META_BN_EPS, {la.name: float(la.eps) for la in net.layers if isinstance(la, BatchNorm)}),
        (META_RELU_CLIPS, {la.name: la.clip for la in relus if la.clip is not None}),
        (META_RELU_WINDOWS, {la.name: la.window for la in relus if la.window is not None}),
    ):
        if values:
            meta[key] = json.dumps(values)
    if net.classes is not None:
        meta[META_CLASSES] = json.dumps(list(net.classes))
    if net.dataset is not None:
        meta[META_DATASET] = net.dataset
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    from .fileio import write_bytes_atomic

    return write_bytes_atomic(path, model.SerializeToString())
