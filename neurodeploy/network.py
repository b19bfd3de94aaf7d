"""The ReLU network IR: small typed layer records and a float64 forward pass.

A :class:`Network` is pure data (numpy arrays) plus ``forward``, the ReLU
ground truth every spiking simulation is checked against. Tensors are
channels-first: images (N, C, H, W), feature vectors (N, F).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from . import ops, threads
from .errors import DataError, ModelError, UsageError
from .memory import chunk_samples, chunks, reusable_empty

Shape = tuple[int, ...]

# Largest parameter magnitude accepted. Trained weights are O(1); a product of
# three parameters of 1e100 already overflows float64 (1.8e308), so anything
# larger cannot be a network this tool can compute with.
MAX_PARAMETER_MAGNITUDE = 1e100
# Largest tensor of one sample (elements) any layer may produce: 2^28 float64
# values are 2 GiB per sample, far beyond ImageNet-sized networks (VGG-16's
# largest activation is 3.2e6 values).
MAX_SAMPLE_ELEMENTS = 2**28


COMPUTE_DTYPES = ("float64", "float32")


def compute_dtype_of(dtype) -> np.dtype:
    """The numpy dtype of a ``dtype=`` argument: "float64" (default) or "float32"."""
    try:
        resolved = np.dtype(dtype) if dtype is not None else np.dtype(np.float64)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in COMPUTE_DTYPES:
        raise UsageError(f"dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return resolved


def _as_float_array(layer: str, param: str, value, shape: Shape | None = None) -> np.ndarray:
    raw = np.asarray(value)
    if raw.dtype.kind not in "fiu":
        raise ModelError(
            f"layer '{layer}': '{layer}.{param}' holds {raw.dtype} values; expected real numbers"
        )
    if shape is not None and raw.shape != tuple(shape):
        raise ModelError(
            f"layer '{layer}': '{layer}.{param}' has shape {raw.shape}, expected {tuple(shape)}"
        )
    # Checked in the stored dtype before the float64 copy (half the memory traffic for
    # float32 weights): min and max propagate NaN, so two reductions without temporaries
    # find NaN, infinities and too large values alike.
    checked = raw if raw.dtype.kind == "f" else raw.astype(np.float64)
    if checked.size:
        lo, hi = float(checked.min()), float(checked.max())
        if not (-MAX_PARAMETER_MAGNITUDE <= lo and hi <= MAX_PARAMETER_MAGNITUDE):
            if not np.all(np.isfinite(checked)):
                raise ModelError(
                    f"layer '{layer}': '{layer}.{param}' contains NaN or infinite values"
                )
            raise ModelError(
                f"layer '{layer}': '{layer}.{param}' has values of magnitude "
                f"{max(-lo, hi):.3g}, beyond {MAX_PARAMETER_MAGNITUDE:g} (float64 products "
                "of such values overflow)"
            )
    return raw.astype(np.float64, copy=False)


@dataclass(frozen=True, eq=False)
class Layer:
    """Base record. ``type`` is the name used in network.yaml.

    inputs: names of the layers (or ``"input"``, the network input) whose outputs
    this layer takes; empty (the default) means the layer listed just before it,
    so a chain needs no names. Only :class:`Add` takes more than one.
    """

    name: str
    inputs: tuple[str, ...] = field(default=(), kw_only=True)
    type: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()
    arity: ClassVar[int] = 1  # number of inputs (0: any number >= 2)

    def params(self) -> dict[str, np.ndarray]:
        """The arrays of this layer keyed by parameter name (no layer prefix)."""
        return {p: getattr(self, p) for p in self.param_names}

    def config(self) -> dict:
        """The layer's network.yaml entry (without arrays)."""
        cfg = {"name": self.name, "type": self.type}
        if self.inputs:
            cfg["inputs"] = list(self.inputs)
        return cfg

    def output_shape(self, input_shape: Shape) -> Shape:
        """Shape of one sample's output for one sample's input shape; raises ModelError."""
        return input_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _require_image(self, input_shape: Shape) -> None:
        if len(input_shape) != 3:
            raise ModelError(
                f"layer '{self.name}' ({self.type}) needs an image input (C, H, W), "
                f"got shape {input_shape}"
            )


@dataclass(frozen=True, eq=False)
class Dense(Layer):
    """y = W x + b. weight (out_features, in_features), bias (out_features,)."""

    weight: np.ndarray = field(default=None, repr=False)
    bias: np.ndarray = field(default=None, repr=False)
    type: ClassVar[str] = "dense"
    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __post_init__(self):
        w = _as_float_array(self.name, "weight", self.weight)
        if w.ndim != 2:
            raise ModelError(
                f"layer '{self.name}': '{self.name}.weight' must be 2-D, got {w.shape}"
            )
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", _as_float_array(self.name, "bias", self.bias, w.shape[:1]))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def config(self) -> dict:
        return {**super().config(), "out_features": self.out_features}

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 1 or input_shape[0] != self.weight.shape[1]:
            raise ModelError(
                f"layer '{self.name}' (dense) expects {self.weight.shape[1]} input features, "
                f"got input shape {input_shape}"
            )
        return (self.out_features,)

    def linear(self, x: np.ndarray) -> np.ndarray:
        return ops.dense(x, ops.param_as(self.weight, ops.compute_dtype(x)))

    def forward(self, x: np.ndarray) -> np.ndarray:
        out = self.linear(x)
        out += ops.param_as(self.bias, out.dtype)  # out is a fresh product: add in place
        return out


@dataclass(frozen=True, eq=False)
class Conv2d(Layer):
    """2-D cross-correlation with zero padding. weight (O, C / groups, k, k), bias (O,) per
    channel or (O, Ho, Wo) per output position (what folding a shift through zero padding
    gives). groups: grouped convolution as in PyTorch (depthwise: groups = C = O)."""

    weight: np.ndarray = field(default=None, repr=False)
    bias: np.ndarray = field(default=None, repr=False)
    stride: int = 1
    padding: int = 0
    groups: int = 1
    type: ClassVar[str] = "conv2d"
    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __post_init__(self):
        w = _as_float_array(self.name, "weight", self.weight)
        if w.ndim != 4 or w.shape[2] != w.shape[3]:
            raise ModelError(
                f"layer '{self.name}': '{self.name}.weight' must be (out, in, k, k), got {w.shape}"
            )
        if self.stride < 1 or self.padding < 0:
            raise ModelError(f"layer '{self.name}': stride must be >= 1 and padding >= 0")
        if self.groups < 1 or w.shape[0] % self.groups:
            raise ModelError(
                f"layer '{self.name}': groups must be >= 1 and divide the {w.shape[0]} output "
                f"channels, got {self.groups}"
            )
        object.__setattr__(self, "weight", w)
        bias = _as_float_array(self.name, "bias", self.bias)
        if bias.ndim not in (1, 3) or bias.shape[0] != w.shape[0]:
            raise ModelError(
                f"layer '{self.name}': '{self.name}.bias' has shape {bias.shape}, expected "
                f"({w.shape[0]},) or ({w.shape[0]}, out_height, out_width)"
            )
        object.__setattr__(self, "bias", bias)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> int:
        return self.weight.shape[2]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def config(self) -> dict:
        cfg = {
            **super().config(),
            "out_channels": self.out_channels,
            "kernel": self.kernel,
            "stride": self.stride,
            "padding": self.padding,
        }
        if self.groups != 1:
            cfg["groups"] = self.groups
        return cfg

    def output_shape(self, input_shape: Shape) -> Shape:
        self._require_image(input_shape)
        c, h, w = input_shape
        if c != self.in_channels:
            raise ModelError(
                f"layer '{self.name}' (conv2d) expects {self.in_channels} input channels, got {c}"
            )
        ho = ops.conv_output_size(h, self.kernel, self.stride, self.padding)
        wo = ops.conv_output_size(w, self.kernel, self.stride, self.padding)
        if ho < 1 or wo < 1:
            raise ModelError(f"layer '{self.name}' (conv2d): kernel larger than its input {h}x{w}")
        if self.bias.ndim == 3 and self.bias.shape[1:] != (ho, wo):
            raise ModelError(
                f"layer '{self.name}': '{self.name}.bias' has shape {self.bias.shape}, expected "
                f"({self.out_channels},) or ({self.out_channels}, {ho}, {wo})"
            )
        return (self.out_channels, ho, wo)

    def linear(self, x: np.ndarray) -> np.ndarray:
        return ops.conv2d(x, self.weight, self.stride, self.padding, self.groups)

    def forward(self, x: np.ndarray) -> np.ndarray:
        out = self.linear(x)
        bias = ops.param_as(self.bias, out.dtype)
        out += bias if bias.ndim == 3 else bias[:, None, None]  # a fresh product: in place
        return out


@dataclass(frozen=True, eq=False)
class BatchNorm(Layer):
    """Inference-mode batch norm over the channel (images) or feature axis."""

    gamma: np.ndarray = field(default=None, repr=False)
    beta: np.ndarray = field(default=None, repr=False)
    mean: np.ndarray = field(default=None, repr=False)
    var: np.ndarray = field(default=None, repr=False)
    eps: float = 1e-5
    type: ClassVar[str] = "batchnorm"
    param_names: ClassVar[tuple[str, ...]] = ("gamma", "beta", "mean", "var")

    def __post_init__(self):
        gamma = _as_float_array(self.name, "gamma", self.gamma)
        if gamma.ndim != 1:
            raise ModelError(f"layer '{self.name}': '{self.name}.gamma' must be 1-D")
        for p in ("beta", "mean", "var"):
            object.__setattr__(
                self, p, _as_float_array(self.name, p, getattr(self, p), gamma.shape)
            )
        object.__setattr__(self, "gamma", gamma)
        if np.any(self.var < 0) or not self.eps > 0:
            raise ModelError(f"layer '{self.name}': var must be >= 0 and eps > 0")

    @property
    def scale(self) -> np.ndarray:
        """Per-channel multiplier gamma / sqrt(var + eps)."""
        return self.gamma / np.sqrt(self.var + self.eps)

    @property
    def shift(self) -> np.ndarray:
        """Per-channel offset beta - mean * scale."""
        return self.beta - self.mean * self.scale

    def config(self) -> dict:
        return {**super().config(), "eps": float(self.eps)}

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) not in (1, 3) or input_shape[0] != self.gamma.shape[0]:
            raise ModelError(
                f"layer '{self.name}' (batchnorm) has {self.gamma.shape[0]} channels, "
                f"got input shape {input_shape}"
            )
        return input_shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        dtype = ops.compute_dtype(x)
        out = x * channel_broadcast(self.scale.astype(dtype, copy=False), x.ndim)
        out += channel_broadcast(self.shift.astype(dtype, copy=False), x.ndim)
        return out


@dataclass(frozen=True, eq=False)
class ReLU(Layer):
    """max(x, 0), or min(max(x, 0), clip) for a clipped ReLU (ReLU6: clip = 6).

    window: the TTFS window length B (time units) this layer's spikes get when
    converted; None (the default) lets the calibration set decide. Fine-tuning
    stores the windows it trained with here. clip: upper clip value M > 0 of a
    clipped ReLU (ReLU6, Hardtanh(0, M), Clip(0, M)); None for a plain ReLU.
    """

    window: float | None = None
    clip: float | None = None
    type: ClassVar[str] = "relu"

    def __post_init__(self):
        for key in ("window", "clip"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not np.isfinite(value) or value <= 0:
                raise ModelError(f"layer '{self.name}': {key} must be a positive number")
            object.__setattr__(self, key, float(value))

    def config(self) -> dict:
        cfg = super().config()
        if self.window is not None:
            cfg["window"] = self.window
        if self.clip is not None:
            cfg["clip"] = self.clip
        return cfg

    def forward(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """max(x, 0) (clipped at ``clip``); out: where to write it (may be x itself)."""
        out = np.maximum(x, 0.0, out=out)
        return out if self.clip is None else np.minimum(out, self.clip, out=out)


@dataclass(frozen=True, eq=False)
class _Pool2d(Layer):
    """k x k pooling with stride (default k) and symmetric padding (< k / 2 + 1, as in
    PyTorch: every window holds at least one input position)."""

    kernel: int = 2
    stride: int | None = None
    padding: int = 0

    def __post_init__(self):
        if self.stride is None:
            object.__setattr__(self, "stride", self.kernel)
        if self.kernel < 1 or self.stride < 1:
            raise ModelError(f"layer '{self.name}': kernel and stride must be >= 1")
        if self.padding < 0 or 2 * self.padding > self.kernel:
            raise ModelError(
                f"layer '{self.name}': padding must lie in [0, kernel / 2], got {self.padding} "
                f"for kernel {self.kernel}"
            )

    def config(self) -> dict:
        cfg = {**super().config(), "kernel": self.kernel, "stride": self.stride}
        if self.padding:
            cfg["padding"] = self.padding
        return cfg

    def output_shape(self, input_shape: Shape) -> Shape:
        self._require_image(input_shape)
        c, h, w = input_shape
        ho = ops.conv_output_size(h, self.kernel, self.stride, self.padding)
        wo = ops.conv_output_size(w, self.kernel, self.stride, self.padding)
        if ho < 1 or wo < 1:
            raise ModelError(f"layer '{self.name}' ({self.type}): kernel larger than input {h}x{w}")
        return (c, ho, wo)


@dataclass(frozen=True, eq=False)
class MaxPool2d(_Pool2d):
    type: ClassVar[str] = "maxpool2d"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.maxpool2d(x, self.kernel, self.stride, self.padding)


@dataclass(frozen=True, eq=False)
class AvgPool2d(_Pool2d):
    """Average pooling. count_include_pad: padded zeros count in each window's mean
    (PyTorch's default) or not."""

    count_include_pad: bool = True
    type: ClassVar[str] = "avgpool2d"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.count_include_pad, (bool, np.bool_)):
            raise ModelError(f"layer '{self.name}': count_include_pad must be true or false")
        object.__setattr__(self, "count_include_pad", bool(self.count_include_pad))

    def config(self) -> dict:
        cfg = super().config()
        if self.padding and not self.count_include_pad:
            cfg["count_include_pad"] = False
        return cfg

    def linear(self, x: np.ndarray) -> np.ndarray:
        return ops.avgpool2d(x, self.kernel, self.stride, self.padding, self.count_include_pad)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.linear(x)


@dataclass(frozen=True, eq=False)
class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C, H, W order."""

    type: ClassVar[str] = "flatten"

    def output_shape(self, input_shape: Shape) -> Shape:
        return (int(np.prod(input_shape)),)

    def linear(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.linear(x)


@dataclass(frozen=True, eq=False)
class Add(Layer):
    """Elementwise sum of two or more layers' outputs of one shape (a residual join).

    inputs: the names of the summed layers (required, at least two).
    """

    type: ClassVar[str] = "add"
    arity: ClassVar[int] = 0

    def __post_init__(self):
        if len(self.inputs) < 2:
            raise ModelError(f"layer '{self.name}' (add) needs at least two inputs")

    def merged_shape(self, input_shapes: list[Shape]) -> Shape:
        """The common shape of the summed inputs; raises ModelError naming them otherwise."""
        if any(shape != input_shapes[0] for shape in input_shapes):
            pairs = ", ".join(
                f"'{n}' {sh}" for n, sh in zip(self.inputs, input_shapes, strict=True)
            )
            raise ModelError(f"layer '{self.name}' (add) sums inputs of different shapes: {pairs}")
        return input_shapes[0]

    def forward_many(self, values: list[np.ndarray]) -> np.ndarray:
        out = values[0] + values[1]
        for v in values[2:]:
            out += v
        return out


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.type: cls for cls in (Dense, Conv2d, BatchNorm, ReLU, MaxPool2d, AvgPool2d, Flatten, Add)
}
INPUT = "input"  # the name by which layers refer to the network input
AFFINE_TYPES = (Dense, Conv2d)


def channel_broadcast(values: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape per-channel values (C,) to broadcast over a batch of rank ``ndim``."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass(frozen=True, eq=False)
class Network:
    """A trained ReLU network: a chain of layers, or a small DAG (residual blocks).

    input_shape: one sample's shape, channels-first. input_range: (p, q), the
    range of the raw input. layers: in an order in which every layer comes after
    the layers it takes (``Layer.inputs``; by default the one before it). The
    last layer's output is the network's; the last affine layer gives the logits
    (no ReLU after it). shapes: the input's shape, then every layer's output
    shape, in ``layers`` order. sources: per layer, the resolved names of its
    inputs (``"input"`` for the network input).
    """

    name: str
    input_shape: Shape
    input_range: tuple[float, float]
    layers: tuple[Layer, ...]
    classes: tuple[str, ...] | None = None
    dataset: str | None = None
    shapes: tuple[Shape, ...] = field(init=False, repr=False)
    sources: tuple[tuple[str, ...], ...] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        p, q = (float(v) for v in self.input_range)
        if not (np.isfinite(p) and np.isfinite(q) and p < q):
            raise ModelError(f"network '{self.name}': input range [p, q] needs p < q, got {p}, {q}")
        object.__setattr__(self, "input_range", (p, q))
        if not self.layers:
            raise ModelError(f"network '{self.name}' has no layers")
        names = [layer.name for layer in self.layers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ModelError(f"network '{self.name}': duplicate layer names {sorted(dup)}")
        if INPUT in names:
            raise ModelError(f"network '{self.name}': '{INPUT}' names the network input")
        if not self.input_shape or min(self.input_shape) < 1:
            raise ModelError(f"network '{self.name}': input shape {self.input_shape} is empty")
        if int(np.prod(self.input_shape, dtype=np.float64)) > MAX_SAMPLE_ELEMENTS:
            raise ModelError(
                f"network '{self.name}': input shape {self.input_shape} holds more than "
                f"{MAX_SAMPLE_ELEMENTS} values per sample"
            )
        shapes = [self.input_shape]
        shape_of = {INPUT: self.input_shape}
        sources, consumed = [], set()
        for i, layer in enumerate(self.layers):
            srcs = tuple(layer.inputs) or ((names[i - 1] if i else INPUT),)
            for src in srcs:
                if src not in shape_of:
                    later = "a later layer" if src in names else "no layer"
                    raise ModelError(
                        f"network '{self.name}': layer '{layer.name}' takes '{src}', which is "
                        f"{later}; list every layer after its inputs"
                    )
            if layer.arity and len(srcs) != layer.arity:
                raise ModelError(
                    f"layer '{layer.name}' ({layer.type}) takes {layer.arity} input, "
                    f"got {list(srcs)}"
                )
            consumed.update(srcs)
            if isinstance(layer, Add):
                shape = layer.merged_shape([shape_of[s] for s in srcs])
            else:
                shape = layer.output_shape(shape_of[srcs[0]])
            if int(np.prod(shape, dtype=np.float64)) > MAX_SAMPLE_ELEMENTS:
                raise ModelError(
                    f"layer '{layer.name}' ({layer.type}) outputs {shape} per sample, more than "
                    f"{MAX_SAMPLE_ELEMENTS} values (check its padding, kernel and stride)"
                )
            shapes.append(shape)
            shape_of[layer.name] = shape
            sources.append(srcs)
        dangling = [n for n in names[:-1] if n not in consumed]
        if dangling:
            raise ModelError(
                f"network '{self.name}': the outputs of {dangling} go nowhere (only the last "
                "layer gives the network's output)"
            )
        object.__setattr__(self, "shapes", tuple(shapes))
        object.__setattr__(self, "sources", tuple(sources))
        affine = [i for i, layer in enumerate(self.layers) if isinstance(layer, AFFINE_TYPES)]
        if not affine:
            raise ModelError(f"network '{self.name}' has no dense or conv2d layer")
        tail = self.layers[affine[-1] + 1 :]
        bad = [layer.name for layer in tail if not isinstance(layer, (BatchNorm, Flatten))]
        if bad:
            raise ModelError(
                f"network '{self.name}': the last affine layer '{self.layers[affine[-1]].name}' "
                f"gives the logits, but is followed by {bad}"
            )
        if len(shapes[-1]) != 1:
            raise ModelError(f"network '{self.name}': output must be a vector, got {shapes[-1]}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            if len(self.classes) != shapes[-1][0]:
                raise ModelError(
                    f"network '{self.name}': {len(self.classes)} class names for "
                    f"{shapes[-1][0]} outputs"
                )

    @property
    def output_shape(self) -> Shape:
        return self.shapes[-1]

    @property
    def is_chain(self) -> bool:
        """True when every layer takes the one before it (no branch, no join)."""
        prev = [INPUT, *(layer.name for layer in self.layers[:-1])]
        return all(srcs == (p,) for srcs, p in zip(self.sources, prev, strict=True))

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    def check_input(self, x, what: str = "x", dtype="float64") -> np.ndarray:
        """Return x as ``dtype`` (float64, or float32) of shape (N, *input_shape); raise
        DataError otherwise."""
        raw = np.asarray(x)
        if raw.dtype.kind not in "fiub":
            raise DataError(f"{what} holds {raw.dtype} values; expected real numbers")
        arr = raw.astype(compute_dtype_of(dtype), copy=False)
        if arr.ndim != len(self.input_shape) + 1 or arr.shape[1:] != self.input_shape:
            raise DataError(
                f"{what} has shape {arr.shape}, network '{self.name}' expects "
                f"(N, {', '.join(map(str, self.input_shape))})"
            )
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{what} contains NaN or infinite values")
        return arr

    def working_bytes(self, dtype="float64") -> int:
        """Estimated working memory (bytes) of one sample's forward pass: a layer's input,
        its padded channels-last copy and its output (3x the widest activation), plus the
        widest activation again for every branch a residual network keeps alive."""
        widest = max(int(np.prod(shape)) for shape in self.shapes)
        branches = 0 if self.is_chain else 1
        return (3 + branches) * widest * compute_dtype_of(dtype).itemsize

    def forward(self, x, dtype="float64", memory_budget=None) -> np.ndarray:
        """ReLU forward pass. x: (N, *input_shape). Returns logits (N, classes).

        dtype: "float64" (the exact reference) or "float32" (twice the BLAS speed for
        large networks; error against float64 in the README's performance section).
        memory_budget: bytes (or "8G") for one chunk of samples; large batches run in
        chunks that fit it (:mod:`neurodeploy.memory`; default a fraction of the
        available memory). The result does not depend on the chunk size.
        """
        arr = self.check_input(x, dtype=dtype)
        n = arr.shape[0]
        per = chunk_samples(self.working_bytes(dtype), memory_budget)
        last = self.layers[-1].name
        # The block workers held once for the pass, not per layer, where a layer uses them
        # (a small dense net does not; holding costs ~10 us, 2-5 % of digits_mlp's forward)
        blocked = any(isinstance(layer, Conv2d)
                      or (isinstance(layer, Dense) and ops.dense_in_blocks(layer.weight))
                      for layer in self.layers)
        with threads.block_workers() if blocked else contextlib.nullcontext():
            if n <= per:
                return self._run(arr, keep=False)[last]
            out = None
            for lo, hi in chunks(n, per):
                part = self._run(arr[lo:hi], keep=False)[last]
                if out is None:
                    out = reusable_empty((n, *part.shape[1:]), part.dtype)
                out[lo:hi] = part
            return out

    def activations(self, x) -> dict[str, np.ndarray]:
        """Every layer's output keyed by layer name (the float64 forward pass, kept)."""
        acts = self._run(self.check_input(x), keep=True)
        del acts[INPUT]
        return acts

    def _run(self, x: np.ndarray, keep: bool) -> dict[str, np.ndarray]:
        values = {INPUT: x}
        last_use = {}
        for i, srcs in enumerate(self.sources):
            for src in srcs:
                last_use[src] = i
        # Outputs in memory of their own (no view of another value, not the caller's x):
        # a ReLU that is their last reader may overwrite them instead of allocating.
        owned = set()
        tails = {} if keep else self._elementwise_tails()
        fused_into = {}  # index of a layer applied by an earlier conv's forward -> that conv
        for i, (layer, srcs) in enumerate(zip(self.layers, self.sources, strict=True)):
            if i in fused_into:  # computed with its conv: the conv's output is its value
                out = values[self.layers[i - 1].name]
            elif i in tails:
                tail = [self.layers[j] for j in tails[i]]
                out = _conv_forward_fused(layer, values[srcs[0]], tail, values)
                fused_into.update((j, i) for j in tails[i])
            elif isinstance(layer, Add):
                out = layer.forward_many([values[s] for s in srcs])
            elif (
                not keep
                and isinstance(layer, ReLU)
                and srcs[0] in owned
                and last_use[srcs[0]] == i
            ):
                out = layer.forward(values[srcs[0]], out=values[srcs[0]])
            else:
                out = layer.forward(values[srcs[0]])
            if not isinstance(layer, Flatten):  # Flatten returns a view of its input
                owned.add(layer.name)
            values[layer.name] = out
            if not keep:  # free what no later layer reads: memory grows with the widest cut
                for src in set(srcs):  # an Add may take one layer twice
                    if last_use[src] == i:
                        del values[src]
        return values

    def _elementwise_tails(self) -> dict[int, list[int]]:
        """Index of every ungrouped Conv2d -> the indices of the BatchNorm, ReLU and
        two-input Add layers that follow it as a chain, each the only reader of the layer
        before (maybe none; an Add's other input computed before the conv): its forward
        applies them, and its bias, to each output block while the block is in cache
        (:func:`_conv_forward_fused`), instead of one pass each over the map."""
        readers: dict[str, list[int]] = {}
        for j, srcs in enumerate(self.sources):
            for src in set(srcs):
                readers.setdefault(src, []).append(j)
        made_at = {layer.name: j for j, layer in enumerate(self.layers)}
        tails = {}
        for i, layer in enumerate(self.layers):
            if not (isinstance(layer, Conv2d) and layer.groups == 1):
                continue
            tail, j = [], i
            while j + 1 < len(self.layers):
                name, nxt, srcs = self.layers[j].name, self.layers[j + 1], self.sources[j + 1]
                if readers.get(name) != [j + 1]:
                    break
                if isinstance(nxt, Add):
                    others = [s for s in srcs if s != name]
                    if len(srcs) != 2 or len(others) != 1 or made_at.get(others[0], -1) >= i:
                        break
                elif not isinstance(nxt, (BatchNorm, ReLU)) or srcs != (name,):
                    break
                j += 1
                tail.append(j)
            tails[i] = tail
        return tails

    def predict(self, x) -> np.ndarray:
        """Predicted class indices (N,)."""
        return np.argmax(self.forward(x), axis=1)


def _conv_forward_fused(conv: Conv2d, x: np.ndarray, tail: list, values: dict) -> np.ndarray:
    """conv.forward(x) followed by the BatchNorm, ReLU and Add layers of ``tail``, each
    applied to every output block as the convolution produces it (``ops.conv2d``'s
    finish): the same elementwise operations in the same order as the layers' own
    forwards (bias add; x * scale + shift; max(x, 0), min(., clip); + the Add's other
    input, taken from ``values``), so the same bits, without a pass of their own over
    the map. x: (N, C, H, W); returns the last layer's output."""
    from . import kernels  # numba: imported where a fused forward runs

    dtype = ops.compute_dtype(x)
    # (kind, operand): (1, O) or (Ho Wo, O) rows (ops.neuron_rows), a scalar, or an Add's
    # other input as (N, Ho Wo, O)
    steps = [(kernels.ADD_ROWS, ops.neuron_rows(conv.bias, "bias", dtype,
                                                lambda: ops.param_as(conv.bias, dtype)))]
    chain = conv.name  # the layer whose value the blocks hold
    for layer in tail:
        if isinstance(layer, BatchNorm):
            scale = ops.neuron_rows(layer.gamma, "scale", dtype, lambda bn=layer: bn.scale)
            shift = ops.neuron_rows(layer.gamma, "shift", dtype, lambda bn=layer: bn.shift)
            steps += [(kernels.MULTIPLY_ROWS, scale), (kernels.ADD_ROWS, shift)]
        elif isinstance(layer, Add):  # a + b == b + a in IEEE arithmetic: either order
            other = values[next(s for s in layer.inputs if s != chain)]
            steps.append((kernels.ADD_OTHER, ops.flat_channels_last(other)))
        else:
            steps.append((kernels.MAXIMUM, 0.0))
            if layer.clip is not None:
                steps.append((kernels.MINIMUM, layer.clip))
        chain = layer.name
    kinds = np.array([kind for kind, _ in steps], np.int64)
    scalars = np.array([op if np.ndim(op) == 0 else 0.0 for _, op in steps], dtype)
    none = np.zeros((1, 1, 1), dtype)

    def finish(block: np.ndarray, samples: slice, rows: slice) -> None:
        operands = tuple(  # C-contiguous 3-D arrays, one numba type (copies: rare)
            np.ascontiguousarray(op[samples, rows]) if kind == kernels.ADD_OTHER
            else ops.rows_part(op, rows)[None] if np.ndim(op) else none
            for kind, op in steps
        )
        kernels.elementwise_chain(block, kinds, operands, scalars)

    return ops.conv2d(x, conv.weight, conv.stride, conv.padding, finish=finish)

