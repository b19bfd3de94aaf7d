"""Exact conversion of a ReLU :class:`Network` into a :class:`TTFSNetwork`.

The mapping follows Stanojevic et al., "An exact mapping from ReLU networks to
spiking neural networks" (2023; alpha1 neuron) and "High-performance deep
spiking neural networks with 0.3 spikes per neuron" (Nature Communications
2024; B1 neuron). Steps:

1. Fold everything affine into the dense/conv layers: the input rescaling
   [p, q] -> [0, 1], batch norm before a ReLU (into the layer before it) and
   after a ReLU (into the next dense/conv layer, through pooling and
   flattening). A shift folded forward through a zero-padded convolution
   gives every output position its own bias (the border effects); max pooling
   in front of a negative batch-norm scale becomes a min pooling.
2. alpha1 only: rescale each layer so every neuron's input weight sum lies in
   [-10, 0.99] (the bounds of the exact-mapping paper's code), compensated in
   the next layer (ReLU and max pooling commute with positive scales).
3. Calibrate: the largest ReLU output X_n of every layer on the calibration
   set sets its window B_n = (1 + zeta) X_n. A clipped ReLU (ReLU6, Clip(0, M))
   gets B_n = M instead: a b1 neuron whose value exceeds its window fires when
   the window opens and encodes exactly B_n, so the clip is computed exactly
   and no value can exceed the window (no margin needed).
4. Thresholds of the chosen neuron model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import ops
from .errors import ConversionError, UsageError
from .network import (
    AFFINE_TYPES,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dense,
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
    Shape,
)
from .ttfs import (
    INPUT_WINDOW,
    NEURON_MODELS,
    OutputLayer,
    SpikingLayer,
    TimePool,
    TTFSNetwork,
    apply_synapses,
)

# Bounds on every neuron's input weight sum for the alpha1 neuron; the neuron
# needs sum_j W_ij < 1 (J = alpha W / (1 - sum W)). Values of the exact-mapping
# paper's code (IBM/exact-mapping-ReLUnetwork-SNN, set_params_ReLU).
ALPHA1_WEIGHT_SUM_MAX = 0.99
ALPHA1_WEIGHT_SUM_MIN = -10.0
# The alpha1 neuron's constant input current (alpha = 1 in the paper's code).
ALPHA1_ALPHA = 1.0
# Window used for a layer that never fires on the calibration set (X_n = 0):
# as if X_n were 1, so such a layer still has a window to fire in.
DEAD_LAYER_X_MAX = 1.0


@dataclass
class _Block:
    """One dense/conv layer after folding, with what feeds it from the previous block."""

    name: str
    pools: list[tuple[MaxPool2d, np.ndarray, Shape, Shape]]  # (pool, sign, in, out shape)
    linear: list[Layer]  # AvgPool2d / Flatten in front of the affine map
    affine: Dense | Conv2d  # folded weights, zero bias
    bias: np.ndarray  # (output_shape) per-neuron bias
    input_shape: Shape  # shape entering ``linear``
    output_shape: Shape
    relu: bool = False
    window: float | None = None  # a window stored on the ReLU (fine-tuned), else calibrated
    clip: float | None = None  # the ReLU's clip M (ReLU6: 6), None for a plain ReLU
    # source_layers: the dense/conv, what folded into it, and last its ReLU
    source_layers: list[str] = field(default_factory=list)

    @property
    def synapses(self) -> tuple[Layer, ...]:
        return (*self.linear, self.affine)


def _per_channel(values: np.ndarray, shape: Shape) -> np.ndarray:
    """Broadcast per-channel values (C,) over one sample of ``shape``."""
    return values.reshape((-1,) + (1,) * (len(shape) - 1))


def _zero_bias(layer: Dense | Conv2d, weight: np.ndarray) -> Dense | Conv2d:
    return replace(layer, weight=weight, bias=np.zeros(weight.shape[0]))


def _scale_input_weights(layer: Dense | Conv2d, factors: np.ndarray) -> np.ndarray:
    """The layer's weight with the weights from input channel (conv) or feature (dense) c
    multiplied by factors[c].

    A grouped conv's weight (O, C / G, k, k) holds, for output channel o of group
    g = o // (O / G), the input channels g C/G .. (g+1) C/G - 1 along axis 1: each
    output channel takes its own group's slice of the factors.
    """
    if isinstance(layer, Dense):
        return layer.weight * factors[None, :]
    out_ch, c_per_group = layer.weight.shape[:2]
    per_out = factors.reshape(layer.groups, c_per_group)
    per_out = np.repeat(per_out, out_ch // layer.groups, axis=0)  # (O, C / G)
    return layer.weight * per_out[:, :, None, None]


def _fold_input_transform(
    layer: Dense | Conv2d, in_shape: Shape, scale: np.ndarray, shift: np.ndarray
) -> tuple[Dense | Conv2d, np.ndarray]:
    """Fold y = W (scale * x + shift) + b into W' x + b_full (b_full per output neuron).

    scale, shift: per input channel (conv) or feature (dense). The shift goes
    through the layer's own linear map on a constant input, so zero padding
    gives the border neurons their own bias.
    """
    folded = _zero_bias(layer, _scale_input_weights(layer, scale))
    if shift.shape != tuple(in_shape):  # per channel; a map after a padded average pool
        shift = _per_channel(shift, in_shape)
    const = np.broadcast_to(shift, in_shape)[None]
    out_shape = layer.output_shape(in_shape)
    own_bias = (
        layer.bias if layer.bias.ndim == len(out_shape) else _per_channel(layer.bias, out_shape)
    )
    bias = layer.linear(const)[0] + own_bias
    return folded, bias


def _require_convertible(net: Network) -> None:
    """Refuse, naming the layer, what the converter does not map yet."""
    if not net.is_chain:
        branch = next(
            layer for layer, srcs in zip(net.layers, net.sources, strict=True)
            if len(srcs) > 1 or layer.inputs
        )
        raise ConversionError(
            f"layer '{branch.name}' ({branch.type}) takes {list(branch.inputs)}: branching and "
            "residual networks do not convert yet"
        )


def _fold(net: Network) -> list[_Block]:
    """Fold input rescaling and batch norms; split the network into affine blocks."""
    _require_convertible(net)
    p, q = net.input_range
    shape: Shape = net.input_shape
    # Pending per-channel transform on the current tensor: original = scale * v + shift.
    scale = np.full(shape[0], q - p)
    shift = np.full(shape[0], p)
    state = "relu"  # the input behaves like a ReLU output: it can be pooled and normalised
    pools: list = []
    linear: list[Layer] = []
    linear_in: Shape = shape
    blocks: list[_Block] = []
    for layer in net.layers:
        out_shape = layer.output_shape(shape)
        if isinstance(layer, AFFINE_TYPES):
            if state == "affine":
                raise ConversionError(
                    f"layer '{layer.name}': no ReLU between it and the previous layer "
                    f"'{blocks[-1].name}'; hidden dense/conv2d layers must be followed by a ReLU"
                )
            folded, bias = _fold_input_transform(layer, shape, scale, shift)
            blocks.append(
                _Block(
                    name=layer.name,
                    pools=pools,
                    linear=linear,
                    affine=folded,
                    bias=bias,
                    input_shape=linear_in if linear else shape,
                    output_shape=out_shape,
                    source_layers=[layer.name],
                )
            )
            pools, linear, state = [], [], "affine"
            scale = shift = None
        elif isinstance(layer, ReLU):
            if state != "affine":
                raise ConversionError(
                    f"layer '{layer.name}' (relu) does not follow a dense or conv2d layer"
                )
            blocks[-1].relu = True
            blocks[-1].window = layer.window
            blocks[-1].clip = layer.clip
            blocks[-1].source_layers.append(layer.name)
            state = "relu"
            scale, shift = np.ones(shape[0]), np.zeros(shape[0])
        elif isinstance(layer, BatchNorm):
            if state == "affine":
                if linear:
                    raise ConversionError(
                        f"layer '{layer.name}' (batchnorm): cannot fold into '{blocks[-1].name}' "
                        f"across {[lin.name for lin in linear]}"
                    )
                _fold_backward(blocks[-1], layer, pools)
            else:
                bn_scale, bn_shift = layer.scale, layer.shift
                if shift.ndim > 1:  # a per-position shift (after a padded average pool)
                    bn_scale = _per_channel(layer.scale, shift.shape)
                    bn_shift = _per_channel(layer.shift, shift.shape)
                scale, shift = layer.scale * scale, bn_scale * shift + bn_shift
        elif isinstance(layer, MaxPool2d):
            if linear:
                raise ConversionError(
                    f"layer '{layer.name}' (maxpool2d) follows {[lin.name for lin in linear]}: "
                    "max pooling must come before average pooling and flattening"
                )
            sign = np.ones(shape[0]) if state == "affine" else np.where(scale < 0, -1.0, 1.0)
            pools.append((layer, sign, shape, out_shape))
        elif isinstance(layer, (AvgPool2d, Flatten)):
            if isinstance(layer, AvgPool2d) and state == "affine":
                raise ConversionError(
                    f"layer '{layer.name}' (avgpool2d) lies between '{blocks[-1].name}' and its "
                    "ReLU: average pooling must follow the ReLU"
                )
            if isinstance(layer, Flatten) and len(shape) == 1:
                pass  # identity on feature vectors
            else:
                if not linear:
                    linear_in = shape
                linear.append(layer)
                if isinstance(layer, Flatten) and state != "affine":
                    hw = int(np.prod(shape[1:]))
                    scale = np.repeat(scale, hw)
                    shift = shift.reshape(-1) if shift.ndim > 1 else np.repeat(shift, hw)
                elif state != "affine" and layer.padding and layer.count_include_pad:
                    # The zero padding is not shifted: at the borders a window averages
                    # fewer shifted inputs, so the pending shift becomes one per position.
                    if shift.ndim == 1:
                        shift = np.broadcast_to(_per_channel(shift, shape), shape)
                    shift = layer.linear(shift[None])[0]
        else:  # pragma: no cover - Network validation admits no other type
            raise ConversionError(f"layer '{layer.name}': unsupported type {layer.type}")
        if state == "affine" and not isinstance(layer, AFFINE_TYPES):
            blocks[-1].source_layers.append(layer.name)
        shape = out_shape
    if pools or linear:
        names = [entry[0].name for entry in pools] + [lin.name for lin in linear]
        raise ConversionError(f"layers {names} follow the output layer '{blocks[-1].name}'")
    if blocks[-1].relu:  # pragma: no cover - Network validation forbids it
        raise ConversionError(f"the output layer '{blocks[-1].name}' must not have a ReLU")
    return blocks


def _fold_backward(block: _Block, bn: BatchNorm, pools: list) -> None:
    """Fold a batch norm that directly follows ``block`` (before its ReLU) into it.

    Pools already seen since the block's dense/conv commute with a positive
    scale and turn into min pools for a negative one.
    """
    s, t = bn.scale, bn.shift
    w = block.affine.weight
    w = w * (s[:, None] if w.ndim == 2 else s[:, None, None, None])
    block.affine = _zero_bias(block.affine, w)
    shape = block.output_shape
    block.bias = block.bias * _per_channel(s, shape) + _per_channel(t, shape)
    for i, (pool, sign, in_shape, out_shape) in enumerate(pools):
        pools[i] = (pool, sign * np.where(s < 0, -1.0, 1.0), in_shape, out_shape)


def _scale_block_inputs(block: _Block, per_channel: np.ndarray) -> None:
    """Multiply the block's synaptic weights by a factor per channel of its input."""
    factors = per_channel
    shape = block.input_shape
    for lin in block.linear:
        if isinstance(lin, Flatten):
            factors = np.repeat(factors, int(np.prod(shape[1:])))
        shape = lin.output_shape(shape)
    block.affine = _zero_bias(block.affine, _scale_input_weights(block.affine, factors))


def _rescale_for_alpha1(blocks: list[_Block]) -> None:
    """Scale each hidden block so every neuron's weight sum lies in the alpha1 bounds.

    A positive factor per output channel (conv) or neuron (dense) keeps the
    network's function: it commutes with ReLU and max pooling and is undone in
    the next block's input weights.
    """
    for block, nxt in zip(blocks[:-1], blocks[1:], strict=False):
        sums = apply_synapses(block.synapses, np.ones((1, *block.input_shape)))[0]
        per_channel = sums.reshape(sums.shape[0], -1)
        high = np.maximum(per_channel.max(axis=1), 0.0)
        low = np.maximum(-per_channel.min(axis=1), 0.0)
        with np.errstate(divide="ignore"):
            factor = np.minimum.reduce(
                [np.ones_like(high), ALPHA1_WEIGHT_SUM_MAX / high, -ALPHA1_WEIGHT_SUM_MIN / low]
            )
        w = block.affine.weight
        w = w * (factor[:, None] if w.ndim == 2 else factor[:, None, None, None])
        block.affine = _zero_bias(block.affine, w)
        block.bias = block.bias * _per_channel(factor, block.output_shape)
        _scale_block_inputs(nxt, 1.0 / factor)


def _pool_values(values: np.ndarray, pool: MaxPool2d, sign: np.ndarray) -> np.ndarray:
    """Max pooling of non-negative values, min pooling for channels with sign -1."""
    s = sign[None, :, None, None]
    return ops.maxpool2d(values * s, pool.kernel, pool.stride, pool.padding) * s


def _calibrate(blocks: list[_Block], x01: np.ndarray) -> list[float]:
    """Largest ReLU output of every hidden block on the rescaled calibration inputs."""
    x_max = []
    v = x01
    for block in blocks[:-1]:
        for pool, sign, _, _ in block.pools:
            v = _pool_values(v, pool, sign)
        v = np.maximum(apply_synapses(block.synapses, v) + block.bias, 0.0)
        if block.clip is not None:
            np.minimum(v, block.clip, out=v)
        x_max.append(float(v.max()))
    return x_max


def _coupling_matrix(block: _Block) -> np.ndarray:
    """Dense effective weight matrix (N_out, N_in) of a block's synapses."""
    n_in = int(np.prod(block.input_shape))
    eye = np.eye(n_in).reshape(n_in, *block.input_shape)
    return apply_synapses(block.synapses, eye).reshape(n_in, -1).T


def convert(
    net: Network,
    calibration,
    zeta: float = 0.5,
    neuron: str = "b1",
) -> TTFSNetwork:
    """Convert a ReLU network exactly into a TTFS network.

    calibration: (N, *net.input_shape) raw inputs, representative of the data
    the network will see; windows are B_n = (1 + zeta) * X_n with X_n the
    largest ReLU output of layer n on it. Inputs whose activations exceed a
    window later saturate (counted by the simulators, never silent).
    neuron: "b1" (constant slope, default) or "alpha1" (exact-mapping paper).
    """
    if neuron not in NEURON_MODELS:
        raise UsageError(
            f"neuron: unknown model {neuron!r}; choose one of {', '.join(NEURON_MODELS)}"
        )
    if (
        isinstance(zeta, bool)
        or not isinstance(zeta, (int, float))
        or not np.isfinite(zeta)
        or zeta < 0
    ):
        raise UsageError(f"zeta must be a finite number >= 0, got {zeta!r}")
    x_cal = net.check_input(calibration, what="calibration data")
    if x_cal.shape[0] == 0:
        raise ConversionError("calibration set is empty: windows need at least one sample")
    blocks = _fold(net)
    if neuron == "alpha1":
        clipped = [block.source_layers[-1] for block in blocks if block.clip is not None]
        if clipped:
            # An alpha1 neuron may fire while its inputs still arrive, before its window
            # opens, and then encodes more than B_n: it has no saturation that could
            # compute the clip (and min(u, M) is not one alpha1 neuron).
            raise ConversionError(
                f"layer '{clipped[0]}': clipped ReLUs convert exactly with the b1 neuron only "
                "(neuron='b1'); the alpha1 neuron cannot saturate at the clip"
            )
        _rescale_for_alpha1(blocks)
    p, q = net.input_range
    x_max = _calibrate(blocks, np.clip((x_cal - p) / (q - p), 0.0, 1.0))

    stages = []
    t_min_prev, t_min = INPUT_WINDOW
    for i, block in enumerate(blocks):
        for pool, sign, in_shape, out_shape in block.pools:
            stages.append(
                TimePool(
                    pool.name,
                    pool.kernel,
                    pool.stride,
                    sign,
                    in_shape,
                    out_shape,
                    t_min=t_min_prev,
                    t_max=t_min,
                    padding=pool.padding,
                )
            )
        if not block.relu:
            stages.append(
                OutputLayer(
                    block.name,
                    block.synapses,
                    block.bias,
                    block.input_shape,
                    block.output_shape,
                    t_min_prev=t_min_prev,
                    t_read=t_min,
                )
            )
            break
        x_n = x_max[i]
        stored = block.window if neuron == "b1" else None  # alpha1 rescales its values
        window = stored or (1.0 + zeta) * (x_n if x_n > 0 else DEAD_LAYER_X_MAX)
        if block.clip is not None:
            window = _clipped_window(block)
        t_max = t_min + window
        extra = {}
        if neuron == "b1":
            threshold = window - block.bias
        else:
            coupling_w = _coupling_matrix(block)
            w_sum = coupling_w.sum(axis=1)
            alpha = ALPHA1_ALPHA
            j_sum = alpha * w_sum / (1.0 - w_sum)
            coupling = alpha * coupling_w / (1.0 - w_sum)[:, None]
            bias = block.bias.reshape(-1)
            threshold = (
                (alpha + j_sum) * (t_max - bias) - alpha * t_min_prev - j_sum * t_min
            ).reshape(block.output_shape)
            extra = {"alpha": alpha, "coupling": coupling}
        stages.append(
            SpikingLayer(
                name=block.name,
                synapses=block.synapses,
                bias=block.bias,
                input_shape=block.input_shape,
                output_shape=block.output_shape,
                t_min_prev=t_min_prev,
                t_min=t_min,
                t_max=t_max,
                x_max=x_n,
                threshold=threshold,
                clipped=block.clip is not None,
                **extra,
            )
        )
        t_min_prev, t_min = t_min, t_max
    return TTFSNetwork(
        name=net.name,
        neuron=neuron,
        zeta=float(zeta),
        input_shape=net.input_shape,
        input_range=net.input_range,
        stages=tuple(stages),
        classes=net.classes,
        calibration=x_cal,
        source=net,
    )


# Relative difference below which a stored window equals the clip (float round trips).
_WINDOW_CLIP_RTOL = 1e-12


def _clipped_window(block: _Block) -> float:
    """B_n = M of a clipped ReLU's block; a stored window must agree.

    The window of a b1 layer is the value at which it saturates, so it cannot be both
    M (for the clip to be exact) and another stored value: a conflicting window is
    refused rather than silently giving a different clip.
    """
    clip = float(block.clip)
    if block.window is not None and abs(block.window - clip) > _WINDOW_CLIP_RTOL * clip:
        relu = block.source_layers[-1]
        raise ConversionError(
            f"layer '{relu}': stored window {block.window:g} conflicts with clip {clip:g}; "
            "a clipped ReLU's window is its clip (remove the window or set it to the clip)"
        )
    return clip


def retime(snn: TTFSNetwork, windows: dict[str, float]) -> TTFSNetwork:
    """A copy of ``snn`` with new window lengths B_n (time units) for the named layers.

    Every later window shifts with them and every threshold follows, so the copy
    computes the same values as long as they fit their windows (a shorter window
    clips, and saturation counts the clipped values). Used to shorten latency
    and to test what a too-short window does. A clipped layer's window is its
    clip: a new window there clips at the new value (by design, not counted as
    saturation).
    """
    names = {s.name for s in snn.spiking_layers}
    unknown = set(windows) - names
    if unknown:
        raise UsageError(
            f"retime: no spiking layer named {sorted(unknown)}; layers: {sorted(names)}"
        )
    for name, window in windows.items():
        if not (isinstance(window, (int, float)) and np.isfinite(window) and window > 0):
            raise UsageError(
                f"retime: window of '{name}' must be a positive number, got {window!r}"
            )
    stages = []
    t_min_prev, t_min = INPUT_WINDOW
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            stages.append(replace(stage, t_min=t_min_prev, t_max=t_min))
        elif isinstance(stage, OutputLayer):
            stages.append(replace(stage, t_min_prev=t_min_prev, t_read=t_min))
        else:
            window = float(windows.get(stage.name, stage.window))
            t_max = t_min + window
            if stage.coupling is None:
                threshold = window - stage.bias
            else:
                j_sum = stage.coupling.sum(axis=1)
                alpha = stage.alpha
                threshold = (
                    (alpha + j_sum) * (t_max - stage.bias.reshape(-1))
                    - alpha * t_min_prev
                    - j_sum * t_min
                ).reshape(stage.output_shape)
            stages.append(
                replace(stage, t_min_prev=t_min_prev, t_min=t_min, t_max=t_max, threshold=threshold)
            )
            t_min_prev, t_min = t_min, t_max
    return replace(snn, stages=tuple(stages))


def snn_to_network(snn: TTFSNetwork, name: str | None = None) -> Network:
    """The ReLU network a b1 TTFS network computes, as an ordinary :class:`Network`.

    Batch norms and the input rescaling stay folded into the dense/conv layers
    (a shift through zero padding gives per-position conv biases); each ReLU
    records its layer's window, so converting the result gives this SNN again
    (up to float rounding). Min pools (max pools after a negative batch-norm
    scale) are written as max pools between two batch norms of scale -1.
    """
    if snn.neuron != "b1":
        raise ConversionError("snn_to_network: only b1 networks map back to ReLU networks")
    p, q = snn.input_range
    layers: list[Layer] = []
    first = True
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            flip = stage.sign < 0
            if flip.any():
                layers.append(_sign_norm(f"{stage.name}_sign_in", stage.sign))
            layers.append(MaxPool2d(stage.name, stage.kernel, stage.stride, stage.padding))
            if flip.any():
                layers.append(_sign_norm(f"{stage.name}_sign_out", stage.sign))
            continue
        *linear, affine = stage.synapses
        weight, bias = affine.weight, stage.bias
        if first:  # undo the folded rescaling x' = (x - p) / (q - p)
            shift = np.full((1, *stage.input_shape), p / (q - p))
            bias = bias - apply_synapses(stage.synapses, shift)[0]
            weight = weight / (q - p)
            first = False
        if isinstance(affine, Dense):
            bias = bias.reshape(-1)
        layers.extend(linear)
        layers.append(replace(affine, weight=weight, bias=bias))
        if isinstance(stage, SpikingLayer):
            clip = stage.window if stage.clipped else None
            layers.append(ReLU(f"{stage.name}_relu", window=stage.window, clip=clip))
    source = snn.source
    return Network(
        name=name or snn.name,
        input_shape=snn.input_shape,
        input_range=snn.input_range,
        layers=tuple(layers),
        classes=snn.classes,
        dataset=None if source is None else source.dataset,
    )


def _sign_norm(name: str, sign: np.ndarray) -> BatchNorm:
    """A batch norm that multiplies each channel by its sign (+1 or -1) exactly."""
    eps = 1e-5
    return BatchNorm(
        name,
        gamma=sign.astype(np.float64),
        beta=np.zeros(sign.size),
        mean=np.zeros(sign.size),
        var=np.full(sign.size, 1.0 - eps),
        eps=eps,
    )
