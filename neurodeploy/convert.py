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
2. alpha1 only: rescale each channel so its pre-activation bound over the
   calibrated input range is at most 1 and every neuron's input weight sum lies in
   [-10, 0.99] (the bounds of the exact-mapping paper's code), compensated in
   the next layer (ReLU and max pooling commute with positive scales); see
   "alpha1: no early spike, by construction" below.
3. Calibrate: the largest ReLU output X_n of every layer on the calibration
   set sets its window B_n = (1 + zeta) X_n (alpha1: at least the bound of
   step 2, so no input in range fires early). A clipped ReLU (ReLU6, Clip(0, M))
   gets B_n = M instead: a b1 neuron whose value exceeds its window fires when
   the window opens and encodes exactly B_n, so the clip is computed exactly
   and no value can exceed the window (no margin needed).
4. Thresholds of the chosen neuron model.

alpha1: no early spike, by construction
--------------------------------------
An alpha1 neuron of layer n integrates, from t0 = t_min_prev,

    V_i(t) = alpha (t - t0) + sum_j J_ij (t - t_j)_+,   J_ij = g_i W_ij,
    g_i = alpha / (1 - w_i),  w_i = sum_j W_ij < 1,

its inputs arriving at t_j = t1 - x_j in [t0, t1] (t1 = t_min, x_j in
[0, B_{n-1}] the previous layer's values). At t1 all have arrived:
V_i(t1) = alpha (t1 - t0) + g_i sum_j W_ij x_j, and from t1 on V rises with
slope S_i = alpha + g_i w_i = g_i; with the threshold

    theta_i = S_i (B_n - b_i) + alpha (t1 - t0)

it fires at t1 + (theta_i - V_i(t1)) / S_i = t_max - (W x + b)_i: the ReLU
value, *provided V_i stays below theta_i on [t0, t1)*. The paper's
construction does not ensure this: inputs of positive weight that arrive
early can lift V over theta_i before the negative ones arrive. Bound: for
t <= t1 every term J_ij (t - t_j)_+ <= J+_ij x_j (J+ = max(J, 0)), so

    max_{t in [t0, t1)} V_i(t) < alpha (t1 - t0) + g_i sum_j W+_ij x_j,

and V_i < theta_i on [t0, t1) for every input as soon as

    b_i + sum_j W+_ij x_j <= B_n          (alpha, t0 and g_i cancel).

The bound is attained (positive inputs at t0, negative ones at t1, whose
values are then 0: a real input with u_i = b_i + sum_j W+_ij x_j), so on a box
of inputs "no early spike" is the same as "no value beyond the window".

Which inputs. It must hold for every input in the calibrated range, not only
the calibration samples. :func:`_rescale_for_alpha1` gives every stage a
per-neuron range r_j >= x_j:

    r = min(R, (1 + zeta) X_c),   R_i = max(0, b_i + sum_j W+_ij R_j),

R the box bound over the whole input range [p, q] (R = 1 for the rescaled
input; computed with the layer's own linear maps; pools pass the max, for
sign -1 the min, of their windows' bounds) and X_c the calibrated maximum of
the neuron's channel. The box bound alone compounds over depth (measured on a
CIFAR-sized VGG: typical values 1e-4 of the window by the fourth conv, 3e-7
relative error in float64); capping it per layer by the calibrated channel
range keeps each window within one layer's looseness of its values. Each
channel is then scaled to bound at most 1 (and its weight sums into
[-10, 0.99], the paper's bounds, which keep g_i > 0), and :func:`convert`
makes the window

    B_n = max((1 + zeta) X_n, (1 + 1e-9) max(X_n, max_i (b_i + sum_j W+_ij r_j))).

Guarantee: for every input in [p, q] whose values at each stage stay within
(1 + zeta) times their channel's calibrated maximum (every calibration sample,
at any zeta), no alpha1 neuron fires before its window opens and none
saturates: the network is exact by construction. Outside that range the
simulators count early spikes (``Trace.early``) apart from saturation. alpha
and the integration start cancel from the condition; the window is what it
fixes. On a validated network (parameters below 1e100) an admissible choice
always exists; a bound that is not finite in float64 is refused with the layer
named.

Residual networks (the network is a DAG; b1 only)
-------------------------------------------------
The folding unit stays "an affine pre-activation ending in a ReLU (a spiking
layer) or the output". An ``Add`` sums the pre-activations of its operands,
so a joining layer's pre-activation is

    u_i = sum_k sum_j W^(k)_ij x^(k)_j + b_i,     b_i = sum_k b^(k)_i,

one term per operand k. An operand is either (a) a dense/conv chain (batch
norm folded backward, average pooling / flattening in front) applied to the
values x^(k) of an earlier spiking stage: a projection shortcut; or (b) such
a stage's values themselves: an identity shortcut, written as a unit-weight
1x1 map (:func:`_identity_synapse`) so that pending batch norms and the input
rescaling fold into it exactly as into any dense/conv layer (a pending
scale s and shift t give weights diag(s) and bias t). A batch norm on the sum
(before its ReLU) folds into every operand and into b. Max pooling does not
distribute over a sum: an operand may not be max pooled before the Add (the
sum may, before its ReLU: max pooling commutes with the ReLU).

Timing. Stages run as a chain: each stage's *main* input is the stage just
before it. The main operand is the one whose source stage comes latest; its
synapses are the joining layer's ``synapses`` and its window rule is the
chain's, t_min = t_max of the main source. Every other operand becomes a
:class:`~neurodeploy.ttfs.Shortcut` from its source stage S, whose window
ends at t_S (<= t_min). S encodes x as a spike at t_S - x. Delaying that
spike by d = t_min - t_S (the windows of the stages in between: whole
windows) makes it arrive at t_min - x. The b1 membrane integrates
dV/dt = sum_j W_ij H(t - t_j) until t_min, so an input arriving at t_min - x
contributes W_ij x to V(t_min) whenever it arrives (also before t_min_prev,
when the source's window is longer than the join's input window): V(t_min) =
sum over all operands of W x, exactly the sum the ReLU network forms, and
with theta = B - b the neuron fires at t_max - clip(u, 0, B) as in a chain.
Nothing is approximated, so b1 stays exact to float rounding. alpha1 is
refused (see :func:`convert`). The windows are calibrated on the DAG's
forward pass (the join's ReLU output includes its shortcuts).

Shapes that do not fit are refused with the layer named: a pre-activation
that feeds more than one layer (an Add must be followed by its ReLU, possibly
after batch norm and max pooling), a layer whose main input is not the stage
converted just before it (parallel branches that each spike), a max pool of
a value that is not the latest stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import ops
from .errors import ConversionError, UsageError
from .network import (
    AFFINE_TYPES,
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
    Shape,
)
from .ttfs import (
    INPUT_WINDOW,
    NEURON_MODELS,
    OutputLayer,
    Shortcut,
    SpikingLayer,
    TimePool,
    TTFSNetwork,
    alpha1_threshold,
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
# Relative margin on a calibrated window over the largest value it must hold: float64
# sums in another order than the calibration's can exceed that value by rounding (a few
# 1e-16 relative, more after cancellation); 1e-9 is the exactness tolerance itself, so
# the longer window changes no decoded value beyond it (values are read exactly anyway).
WINDOW_ROUNDING_MARGIN = 1e-9


@dataclass
class _Operand:
    """One summand of a block's pre-activation: synapses from one stage's values.

    source: the stage (or ``"input"``) whose non-negative values feed it. linear:
    AvgPool2d / Flatten maps in front of ``affine`` (folded weights, zero bias).
    input_shape: the source's output shape. identity: an identity shortcut
    (:func:`_identity_synapse`, possibly scaled by a folded batch norm).
    """

    source: str
    linear: list[Layer]
    affine: Dense | Conv2d
    input_shape: Shape
    identity: bool = False

    @property
    def synapses(self) -> tuple[Layer, ...]:
        return (*self.linear, self.affine)


@dataclass
class _Block:
    """One dense/conv layer (or residual join) after folding: a sum of operands plus a bias.

    operands: once emitted, operands[0] is the main one (its source is the stage
    converted just before this block) and the rest become shortcuts. pools: max
    pools between the affine map and its ReLU (they commute with it), emitted as
    stages right after it. after: Flattens between the affine map and its ReLU,
    which the next layer applies. shape: the current shape (after pools/after).
    """

    name: str
    operands: list[_Operand]
    bias: np.ndarray  # (output_shape) per-neuron bias
    output_shape: Shape
    shape: Shape
    pools: list[tuple[MaxPool2d, np.ndarray, Shape, Shape]] = field(default_factory=list)
    after: list[Layer] = field(default_factory=list)
    relu: bool = False
    window: float | None = None  # a window stored on the ReLU (fine-tuned), else calibrated
    clip: float | None = None  # the ReLU's clip M (ReLU6: 6), None for a plain ReLU
    join: str | None = None  # the Add layer of a residual join
    source_layers: list[str] = field(default_factory=list)

    @property
    def main(self) -> _Operand:
        return self.operands[0]

    @property
    def synapses(self) -> tuple[Layer, ...]:
        return self.main.synapses

    @property
    def input_shape(self) -> Shape:
        return self.main.input_shape


@dataclass
class _Pool:
    """A max (or min, sign -1) pool of the stage ``source``'s values: a TimePool stage."""

    pool: MaxPool2d
    sign: np.ndarray
    source: str
    input_shape: Shape
    output_shape: Shape

    @property
    def name(self) -> str:
        return self.pool.name


@dataclass(frozen=True)
class _Spikes:
    """A tensor computed from a converted stage's values v (non-negative), not yet folded:
    original = scale * linear(v) + shift per channel (conv) or feature of ``shape``.

    source: the stage (or ``"input"``); linear: pending AvgPool2d / Flatten maps;
    linear_in: the source's shape.
    """

    source: str
    linear: tuple[Layer, ...]
    linear_in: Shape
    shape: Shape
    scale: np.ndarray
    shift: np.ndarray


def _per_channel(values: np.ndarray, shape: Shape) -> np.ndarray:
    """Broadcast per-channel values (C,) over one sample of ``shape``."""
    return values.reshape((-1,) + (1,) * (len(shape) - 1))


def _zero_bias(layer: Dense | Conv2d, weight: np.ndarray) -> Dense | Conv2d:
    return replace(layer, weight=weight, bias=np.zeros(weight.shape[0]))


def _identity_synapse(name: str, shape: Shape) -> Dense | Conv2d:
    """The unit-weight map of an identity shortcut on values of ``shape`` (zero bias).

    Images: a depthwise (groups = C) 1x1 Conv2d of unit weights, C synapses per
    position (one per channel) rather than the C^2 of a full identity matrix;
    vectors: a Dense with the identity matrix.
    """
    channels = shape[0]
    if len(shape) == 1:
        return Dense(name, np.eye(channels), np.zeros(channels))
    return Conv2d(name, np.ones((channels, 1, 1, 1)), np.zeros(channels), groups=channels)


def _is_identity_synapse(synapses: tuple[Layer, ...]) -> bool:
    """True when the synapses are exactly :func:`_identity_synapse`'s map."""
    if len(synapses) != 1 or not isinstance(synapses[0], AFFINE_TYPES):
        return False
    op = synapses[0]
    if isinstance(op, Conv2d) and (op.kernel != 1 or op.stride != 1 or op.padding):
        return False
    n = op.weight.shape[0]
    if isinstance(op, Conv2d) and op.groups == n and op.weight.shape[1] == 1:  # depthwise unit
        return bool(np.all(op.weight == 1.0))
    return op.weight.shape[:2] == (n, n) and np.array_equal(op.weight.reshape(n, n), np.eye(n))


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


def _fold(net: Network) -> list[_Block | _Pool]:
    """Fold input rescaling and batch norms; split the network into stages.

    Returns the plan: blocks (spiking layers, the output last) and pools in the
    order they run, each block's main operand first (see the module docstring).
    """
    p, q = net.input_range
    consumers: dict[str, list[str]] = {}
    for layer, srcs in zip(net.layers, net.sources, strict=True):
        for src in srcs:
            consumers.setdefault(src, []).append(layer.name)
    channels = net.input_shape[0]
    # The input behaves like a ReLU output: it can be pooled, normalised and shortcut.
    values: dict[str, _Spikes | _Block] = {
        INPUT: _Spikes(
            INPUT,
            (),
            net.input_shape,
            net.input_shape,
            np.full(channels, q - p),
            np.full(channels, p),
        )
    }
    plan: list[_Block | _Pool] = []
    for layer, srcs, out_shape in zip(net.layers, net.sources, net.shapes[1:], strict=True):
        for src in srcs:
            if isinstance(values[src], _Block) and len(consumers[src]) > 1:
                block = values[src]
                raise ConversionError(
                    f"layer '{src}': the pre-activation of '{block.join or block.name}' (before "
                    f"its ReLU) feeds {consumers[src]}; only values after a ReLU may branch "
                    "(an add must be followed by its ReLU)"
                )
        if isinstance(layer, Add):
            values[layer.name] = _join(layer, srcs, [values[s] for s in srcs], out_shape)
        else:
            values[layer.name] = _fold_layer(layer, values[srcs[0]], out_shape, plan)
    final = values[net.layers[-1].name]
    if isinstance(final, _Spikes):  # pragma: no cover - Network validation forbids it
        raise ConversionError(f"network '{net.name}': the last layer is no dense/conv2d output")
    if final.pools or final.after:
        names = [entry[0].name for entry in final.pools] + [lin.name for lin in final.after]
        raise ConversionError(f"layers {names} follow the output layer '{final.name}'")
    _emit(final, plan)
    return plan


def _fold_layer(layer: Layer, value, out_shape: Shape, plan: list) -> _Spikes | _Block:
    """The value after ``layer`` applied to ``value`` (a stage's values or a block)."""
    if isinstance(value, _Spikes):
        return _fold_after_relu(layer, value, out_shape, plan)
    block: _Block = value
    if isinstance(layer, AFFINE_TYPES):
        if block.join:
            raise ConversionError(
                f"layer '{block.join}' (add) is not followed by a ReLU before '{layer.name}': "
                "a residual sum must pass its ReLU (after optional batch norm) before the "
                "next dense/conv2d layer"
            )
        raise ConversionError(
            f"layer '{layer.name}': no ReLU between it and the previous layer "
            f"'{block.name}'; hidden dense/conv2d layers must be followed by a ReLU"
        )
    if isinstance(layer, ReLU):
        block.relu = True
        block.window = layer.window
        block.clip = layer.clip
        block.source_layers.append(layer.name)
        return _emit(block, plan)
    if isinstance(layer, BatchNorm):
        if block.after:
            raise ConversionError(
                f"layer '{layer.name}' (batchnorm): cannot fold into '{block.name}' "
                f"across {[lin.name for lin in block.after]}"
            )
        _fold_backward(block, layer)
    elif isinstance(layer, MaxPool2d):
        if block.after:
            raise ConversionError(
                f"layer '{layer.name}' (maxpool2d) follows {[lin.name for lin in block.after]}: "
                "max pooling must come before average pooling and flattening"
            )
        block.pools.append((layer, np.ones(block.shape[0]), block.shape, out_shape))
    elif isinstance(layer, AvgPool2d):
        raise ConversionError(
            f"layer '{layer.name}' (avgpool2d) lies between '{block.join or block.name}' and its "
            "ReLU: average pooling must follow the ReLU"
        )
    elif isinstance(layer, Flatten):
        if len(block.shape) != 1:  # identity on feature vectors
            block.after.append(layer)
    else:  # pragma: no cover - Network validation admits no other type
        raise ConversionError(f"layer '{layer.name}': unsupported type {layer.type}")
    block.shape = out_shape
    block.source_layers.append(layer.name)
    return block


def _fold_after_relu(layer: Layer, value: _Spikes, out_shape: Shape, plan: list):
    """``layer`` applied to a stage's values (after a ReLU, or the input)."""
    if isinstance(layer, AFFINE_TYPES):
        folded, bias = _fold_input_transform(layer, value.shape, value.scale, value.shift)
        operand = _Operand(value.source, list(value.linear), folded, value.linear_in)
        return _Block(layer.name, [operand], bias, out_shape, out_shape, source_layers=[layer.name])
    if isinstance(layer, ReLU):
        raise ConversionError(
            f"layer '{layer.name}' (relu) does not follow a dense or conv2d layer"
        )
    if isinstance(layer, BatchNorm):
        bn_scale, bn_shift = layer.scale, layer.shift
        if value.shift.ndim > 1:  # a per-position shift (after a padded average pool)
            bn_scale = _per_channel(layer.scale, value.shift.shape)
            bn_shift = _per_channel(layer.shift, value.shift.shape)
        return replace(
            value, scale=layer.scale * value.scale, shift=bn_scale * value.shift + bn_shift
        )
    if isinstance(layer, MaxPool2d):
        if value.linear:
            raise ConversionError(
                f"layer '{layer.name}' (maxpool2d) follows {[lin.name for lin in value.linear]}: "
                "max pooling must come before average pooling and flattening"
            )
        latest = plan[-1].name if plan else INPUT
        if value.source != latest:
            raise ConversionError(
                f"layer '{layer.name}' (maxpool2d) pools '{value.source}', but '{latest}' "
                "runs after it: a max pool must directly follow the layer it pools (a "
                "ReLU output that branches may not be max pooled in one branch only)"
            )
        sign = np.where(value.scale < 0, -1.0, 1.0)
        plan.append(_Pool(layer, sign, value.source, value.shape, out_shape))
        return _Spikes(layer.name, (), out_shape, out_shape, value.scale, value.shift)
    if isinstance(layer, (AvgPool2d, Flatten)):
        if isinstance(layer, Flatten) and len(value.shape) == 1:
            return value  # identity on feature vectors
        scale, shift = value.scale, value.shift
        if isinstance(layer, Flatten):
            hw = int(np.prod(value.shape[1:]))
            scale = np.repeat(scale, hw)
            shift = shift.reshape(-1) if shift.ndim > 1 else np.repeat(shift, hw)
        elif layer.padding and layer.count_include_pad:
            # The zero padding is not shifted: at the borders a window averages fewer
            # shifted inputs, so the pending shift becomes one per position.
            if shift.ndim == 1:
                shift = np.broadcast_to(_per_channel(shift, value.shape), value.shape)
            shift = layer.linear(shift[None])[0]
        return replace(
            value, linear=(*value.linear, layer), shape=out_shape, scale=scale, shift=shift
        )
    raise ConversionError(
        f"layer '{layer.name}': unsupported type {layer.type}"
    )  # pragma: no cover


def _join(add: Add, srcs: tuple[str, ...], values: list, out_shape: Shape) -> _Block:
    """The pre-activation of a residual Add: the operands of all its inputs, biases summed."""
    operands: list[_Operand] = []
    bias = np.zeros(out_shape)
    for src, value in zip(srcs, values, strict=True):
        if isinstance(value, _Block):
            if value.pools or value.after:
                pending = [entry[0].name for entry in value.pools] + [a.name for a in value.after]
                raise ConversionError(
                    f"layer '{add.name}' (add): its input '{src}' passes {pending} before the "
                    "sum; max pooling and flattening of a pre-activation do not distribute "
                    "over a sum (pool or flatten after the add's ReLU)"
                )
            operands.extend(value.operands)
            bias = bias + value.bias
        else:
            identity = _identity_synapse(f"{add.name}_{src}_identity", value.shape)
            folded, shift = _fold_input_transform(identity, value.shape, value.scale, value.shift)
            operands.append(
                _Operand(value.source, list(value.linear), folded, value.linear_in, identity=True)
            )
            bias = bias + shift
    return _Block(
        add.name, operands, bias, out_shape, out_shape, join=add.name, source_layers=[add.name]
    )


def _emit(block: _Block, plan: list) -> _Spikes:
    """Append a block (its ReLU or the output reached) and its pending pools to the plan.

    Orders the operands main first and names the stage after the main operand's
    dense/conv layer (after the add for an identity main operand). Returns the
    values of the last appended stage, for the layers that follow.
    """
    order = {item.name: i for i, item in enumerate(plan)}
    order[INPUT] = -1
    main = max(range(len(block.operands)), key=lambda i: (order[block.operands[i].source], -i))
    block.operands.insert(0, block.operands.pop(main))
    latest = plan[-1].name if plan else INPUT
    if block.main.source != latest:
        raise ConversionError(
            f"layer '{block.join or block.name}': its latest input '{block.main.source}' is "
            f"not the stage converted just before it ('{latest}'); stages run as a chain "
            "with residual shortcuts (ResNet basic and bottleneck blocks), not as parallel "
            "spiking branches"
        )
    if not block.main.identity:
        block.name = block.main.affine.name
    plan.append(block)
    shape = block.output_shape
    for pool, sign, in_shape, out_shape in block.pools:
        plan.append(_Pool(pool, sign, plan[-1].name, in_shape, out_shape))
        shape = out_shape
    block.pools = []
    n = block.shape[0]
    return _Spikes(plan[-1].name, tuple(block.after), shape, block.shape, np.ones(n), np.zeros(n))


def _fold_backward(block: _Block, bn: BatchNorm) -> None:
    """Fold a batch norm that directly follows ``block`` (before its ReLU) into it.

    Every operand's weights and the bias take the scale (a join's batch norm
    scales all its summands); pools already seen since the block's dense/conv
    commute with a positive scale and turn into min pools for a negative one.
    """
    s, t = bn.scale, bn.shift
    for operand in block.operands:
        w = operand.affine.weight
        w = w * (s[:, None] if w.ndim == 2 else s[:, None, None, None])
        operand.affine = _zero_bias(operand.affine, w)
    shape = block.output_shape
    block.bias = block.bias * _per_channel(s, shape) + _per_channel(t, shape)
    for i, (pool, sign, in_shape, out_shape) in enumerate(block.pools):
        block.pools[i] = (pool, sign * np.where(s < 0, -1.0, 1.0), in_shape, out_shape)


def _scale_block_inputs(block: _Block, per_channel: np.ndarray) -> None:
    """Multiply the block's (main) synaptic weights by a factor per channel of its input."""
    factors = per_channel
    shape = block.input_shape
    for lin in block.main.linear:
        if isinstance(lin, Flatten):
            factors = np.repeat(factors, int(np.prod(shape[1:])))
        shape = lin.output_shape(shape)
    block.main.affine = _zero_bias(
        block.main.affine, _scale_input_weights(block.main.affine, factors)
    )


def _positive_synapses(synapses: tuple[Layer, ...]) -> tuple[Layer, ...]:
    """The synapses with the affine map's negative weights set to 0 (average pooling and
    flattening in front have non-negative coefficients already): W^+ in the layer's own
    structure, so a convolution stays a convolution."""
    *linear, affine = synapses
    return (*linear, _zero_bias(affine, np.maximum(affine.weight, 0.0)))


def _rescale_for_alpha1(
    plan: list[_Block | _Pool], input_shape: Shape, channel_max: dict, zeta: float
) -> dict[str, float]:
    """Scale each hidden block so no alpha1 neuron can fire before its window opens.

    Walks the chain in order, keeping for every stage its box bound R (per
    neuron, the largest value over all network inputs in [p, q]; R = 1 for the
    rescaled input) and the per-channel factor its values carry. A block's
    inputs get the range r = min(R, (1 + zeta) X_c) (channel_max: X_c per stage,
    from :func:`_calibrate` before scaling), and its pre-activation bound is

        U_i = max(0, b_i + sum_j W+_ij r_j),   W+ = max(W, 0),

    computed with the block's own linear maps. Each output channel (conv) or
    neuron (dense) then gets one positive factor c, applied to its weights and
    bias and undone in the next block's input weights (ReLU and max pooling
    commute with positive scales, so the network's function is unchanged):

        c = min(1 / U_max, 0.99 / w_max, 10 / (-w_min)),

    U_max the channel's largest bound and w the weight sums sum_j W_ij over its
    positions (the exact-mapping paper's bounds [-10, 0.99] on them; the alpha1
    neuron needs w < 1). The layer's window is then chosen at least max_i U_i
    (see :func:`convert`): the condition that rules out early spikes (module
    docstring, "alpha1").

    Returns max_i U_i of every hidden block after scaling (time units).
    Raises :class:`ConversionError` naming the layer when the bound or the
    factors are not finite (weights or biases beyond float64).
    """
    blocks = [item for item in plan if isinstance(item, _Block)]
    following = dict(zip((b.name for b in blocks[:-1]), blocks[1:], strict=True))
    reach: dict[str, np.ndarray] = {INPUT: np.ones(input_shape)}  # box-propagated bound
    scale: dict[str, np.ndarray] = {}  # the per-channel factor each stage's values carry
    largest: dict[str, float] = {}

    def value_range(stage: str) -> np.ndarray:
        """r: the box reach, capped by (1 + zeta) x the calibrated channel maximum."""
        if stage == INPUT:
            return reach[INPUT]
        shape = reach[stage].shape
        calibrated = (1.0 + zeta) * channel_max[stage] * scale[stage]
        return np.minimum(reach[stage], _per_channel(calibrated, shape))

    for item in plan:
        if isinstance(item, _Pool):
            reach[item.name] = _pool_values(reach[item.source][None], item.pool, item.sign)[0]
            scale[item.name] = scale[item.source]
            continue
        block = item
        if not block.relu:
            break
        shape = block.output_shape
        with np.errstate(over="ignore", invalid="ignore"):
            r_in = value_range(block.main.source)
            box = block.bias + apply_synapses(
                _positive_synapses(block.synapses), reach[block.main.source][None]
            )[0]
            np.maximum(box, 0.0, out=box)
            bound = block.bias + apply_synapses(_positive_synapses(block.synapses), r_in[None])[0]
            np.maximum(bound, 0.0, out=bound)
            sums = apply_synapses(block.synapses, np.ones((1, *block.input_shape)))[0]
        per_channel_bound = bound.reshape(shape[0], -1).max(axis=1)
        per_channel_sums = sums.reshape(shape[0], -1)
        if not (np.all(np.isfinite(per_channel_bound)) and np.all(np.isfinite(sums))):
            raise ConversionError(
                f"layer '{block.name}': alpha1 needs a finite bound on its pre-activation over "
                "the input range [p, q], and it overflows float64 (weights or biases far too "
                "large); no scaling can rule out early spikes"
            )
        high = np.maximum(per_channel_sums.max(axis=1), 0.0)
        low = np.maximum(-per_channel_sums.min(axis=1), 0.0)
        with np.errstate(divide="ignore"):
            factor = np.minimum.reduce(
                [
                    1.0 / per_channel_bound,
                    ALPHA1_WEIGHT_SUM_MAX / high,
                    -ALPHA1_WEIGHT_SUM_MIN / low,
                ]
            )
        factor[~np.isfinite(factor)] = 1.0  # a silent channel with no weights: keep it
        if np.any(factor <= 0.0):
            raise ConversionError(
                f"layer '{block.name}': alpha1 rescaling underflows (a channel's bound or "
                "weight sum is beyond float64), so no positive scale meets the bounds"
            )
        w = block.main.affine.weight
        w = w * (factor[:, None] if w.ndim == 2 else factor[:, None, None, None])
        block.main.affine = _zero_bias(block.main.affine, w)
        block.bias = block.bias * _per_channel(factor, shape)
        scale[block.name] = factor
        reach[block.name] = box * _per_channel(factor, shape)
        largest[block.name] = float((bound * _per_channel(factor, shape)).max())
        _scale_block_inputs(following[block.name], 1.0 / factor)
    return largest


def _pool_values(values: np.ndarray, pool: MaxPool2d, sign: np.ndarray) -> np.ndarray:
    """Max pooling of non-negative values, min pooling for channels with sign -1."""
    s = sign[None, :, None, None]
    return ops.maxpool2d(values * s, pool.kernel, pool.stride, pool.padding) * s


def _block_drive(block: _Block, values: dict[str, np.ndarray]) -> np.ndarray:
    """The block's pre-activation: every operand's synapses on its source's values, + bias."""
    u = block.bias + apply_synapses(block.main.synapses, values[block.main.source])
    for operand in block.operands[1:]:
        u += apply_synapses(operand.synapses, values[operand.source])
    return u


def _calibrate(
    plan: list[_Block | _Pool], x01: np.ndarray, channels: dict | None = None
) -> dict[str, float]:
    """Largest ReLU output of every hidden block on the rescaled calibration inputs (the
    DAG's forward pass, stage by stage; values are dropped after their last use).

    channels: if given, filled with every stage's (blocks and pools) largest value per
    channel (conv) or neuron (dense), shape (C,)."""
    last_use = {}
    for i, item in enumerate(plan):
        sources = [item.source] if isinstance(item, _Pool) else [o.source for o in item.operands]
        for src in sources:
            last_use[src] = i
    values = {INPUT: x01}
    x_max = {}
    for i, item in enumerate(plan):
        if isinstance(item, _Pool):
            v = _pool_values(values[item.source], item.pool, item.sign)
        elif item.relu:
            with np.errstate(over="ignore", invalid="ignore"):
                v = np.maximum(_block_drive(item, values), 0.0)
                if item.clip is not None:
                    np.minimum(v, item.clip, out=v)
            x_max[item.name] = float(v.max())
            if not np.isfinite(x_max[item.name]):
                raise ConversionError(
                    f"layer '{item.name}': its activations overflow float64 on the calibration "
                    "data (weights or inputs far too large)"
                )
        else:
            break
        if channels is not None:
            channels[item.name] = v.max(axis=(0, *range(2, v.ndim)))
        values[item.name] = v
        for src in [name for name, last in last_use.items() if last == i]:
            values.pop(src, None)
    return x_max


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
    Residual networks convert with b1 only (see the module docstring).
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
    plan = _fold(net)
    blocks = [item for item in plan if isinstance(item, _Block)]
    if neuron == "alpha1":
        joins = [block for block in blocks if len(block.operands) > 1]
        if joins:
            # The alpha1 neuron fires when its ramp, driven from t_min_prev by every input,
            # crosses its threshold; the exact map needs all inputs to arrive inside the
            # layer's input window [t_min_prev, t_min], and a shortcut source's window has
            # another length (its zeros spike at its t_max), so its delayed spikes fall
            # outside it. b1 integrates any arrival time linearly (module docstring).
            raise ConversionError(
                f"layer '{joins[0].join}' (add): residual networks convert with neuron='b1' "
                "only; the alpha1 neuron needs every input inside its layer's input window, "
                "which a shortcut from an earlier window cannot meet"
            )
        clipped = [block.source_layers[-1] for block in blocks if block.clip is not None]
        if clipped:
            # An alpha1 neuron may fire while its inputs still arrive, before its window
            # opens, and then encodes more than B_n: it has no saturation that could
            # compute the clip (and min(u, M) is not one alpha1 neuron).
            raise ConversionError(
                f"layer '{clipped[0]}': clipped ReLUs convert exactly with the b1 neuron only "
                "(neuron='b1'); the alpha1 neuron cannot saturate at the clip"
            )
    p, q = net.input_range
    x01 = np.clip((x_cal - p) / (q - p), 0.0, 1.0)
    if neuron == "alpha1":
        channel_max: dict[str, np.ndarray] = {}
        _calibrate(plan, x01, channel_max)
        reach = _rescale_for_alpha1(plan, net.input_shape, channel_max, float(zeta))
    x_max = _calibrate(plan, x01)

    stages = []
    windows = {INPUT: INPUT_WINDOW}  # stage name -> (t_min, t_max)
    for item in plan:
        if isinstance(item, _Pool):
            t_min, t_max = windows[item.source]
            windows[item.name] = (t_min, t_max)
            stages.append(
                TimePool(
                    item.name,
                    item.pool.kernel,
                    item.pool.stride,
                    item.sign,
                    item.input_shape,
                    item.output_shape,
                    t_min=t_min,
                    t_max=t_max,
                    padding=item.pool.padding,
                )
            )
            continue
        block = item
        t_min_prev, t_min = windows[block.main.source]  # t_min = the main source's t_max
        shortcuts = tuple(
            Shortcut(op.source, op.synapses, op.input_shape, t_source=windows[op.source][1])
            for op in block.operands[1:]
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
                    shortcuts=shortcuts,
                )
            )
            break
        x_n = x_max[block.name]
        stored = block.window if neuron == "b1" else None  # alpha1 rescales its values
        largest = x_n if x_n > 0 else DEAD_LAYER_X_MAX
        if neuron == "alpha1" and reach[block.name] > 0:
            # No early spike in the calibrated range: B_n >= max_i U_i (module docstring).
            largest = max(x_n, reach[block.name])
        # The margin keeps the largest value inside the window when the simulator's
        # operation order rounds it up (zeta = 0 puts it on the window's edge).
        window = stored or max((1.0 + zeta) * x_n, (1.0 + WINDOW_ROUNDING_MARGIN) * largest)
        if block.clip is not None:
            window = _clipped_window(block)
        t_max = t_min + window
        extra = {}
        if neuron == "b1":
            threshold = window - block.bias
        else:
            # Weight sums through the layer's own maps (zero padding: fewer taps at borders).
            w_sum = apply_synapses(block.synapses, np.ones((1, *block.input_shape)))[0]
            alpha = ALPHA1_ALPHA
            coupling_scale = alpha / (1.0 - w_sum)  # J_ij = g_i W_ij, g_i > 0 (w_sum < 1)
            bias = np.broadcast_to(block.bias, block.output_shape)
            threshold = alpha1_threshold(coupling_scale, bias, alpha, t_min_prev, t_min, t_max)
            extra = {"alpha": alpha, "coupling_scale": coupling_scale}
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
                shortcuts=shortcuts,
                clipped=block.clip is not None,
                **extra,
            )
        )
        windows[block.name] = (t_min, t_max)
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
    clips, and saturation counts the clipped values). Shortcuts take their
    sources' new window ends (their delays follow). Used to shorten latency and
    to test what a too-short window does. A clipped layer's window is its clip:
    a new window there clips at the new value (by design, not counted as
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
    spans = {INPUT: INPUT_WINDOW}  # stage name -> (t_min, t_max)
    previous = INPUT
    for stage in snn.stages:
        t_min_prev, t_min = spans[previous]
        if isinstance(stage, TimePool):
            stages.append(replace(stage, t_min=t_min_prev, t_max=t_min))
            spans[stage.name] = spans[previous]
            previous = stage.name
            continue
        shortcuts = tuple(replace(sc, t_source=spans[sc.source][1]) for sc in stage.shortcuts)
        if isinstance(stage, OutputLayer):
            stages.append(replace(stage, t_min_prev=t_min_prev, t_read=t_min, shortcuts=shortcuts))
            continue
        window = float(windows.get(stage.name, stage.window))
        t_max = t_min + window
        if stage.coupling_scale is None:
            threshold = window - stage.bias
        else:
            bias = np.broadcast_to(stage.bias, stage.output_shape)
            threshold = alpha1_threshold(
                stage.coupling_scale, bias, stage.alpha, t_min_prev, t_min, t_max
            )
        stages.append(
            replace(
                stage,
                t_min_prev=t_min_prev,
                t_min=t_min,
                t_max=t_max,
                threshold=threshold,
                shortcuts=shortcuts,
            )
        )
        spans[stage.name] = (t_min, t_max)
        previous = stage.name
    return replace(snn, stages=tuple(stages))


def snn_to_network(snn: TTFSNetwork, name: str | None = None) -> Network:
    """The ReLU network a b1 TTFS network computes, as an ordinary :class:`Network`.

    Batch norms and the input rescaling stay folded into the dense/conv layers
    (a shift through zero padding gives per-position conv biases); each ReLU
    records its layer's window, so converting the result gives this SNN again
    (up to float rounding). Min pools (max pools after a negative batch-norm
    scale) are written as max pools between two batch norms of scale -1. A layer
    with shortcuts becomes an Add of its own dense/conv (which carries the bias)
    and each shortcut's synapses (an exact identity shortcut: the source itself)
    before its ReLU.
    """
    if snn.neuron != "b1":
        raise ConversionError("snn_to_network: only b1 networks map back to ReLU networks")
    p, q = snn.input_range
    layers: list[Layer] = []
    value_of = {INPUT: INPUT}  # stage -> the layer whose output holds its values
    raw_domain = {INPUT}  # stages whose values are the rescaled input x' = (x - p) / (q - p)
    previous = INPUT

    def take(src: str) -> tuple[str, ...]:
        """inputs= for a layer reading ``src``: empty when it is the layer just before."""
        last = layers[-1].name if layers else INPUT
        return () if src == last else (src,)

    for stage in snn.stages:
        src = value_of[previous]
        if isinstance(stage, TimePool):
            flip = stage.sign < 0
            if flip.any():
                layers.append(
                    replace(_sign_norm(f"{stage.name}_sign_in", stage.sign), inputs=take(src))
                )
            layers.append(
                MaxPool2d(
                    stage.name,
                    stage.kernel,
                    stage.stride,
                    stage.padding,
                    inputs=take(layers[-1].name if flip.any() else src),
                )
            )
            if flip.any():
                layers.append(_sign_norm(f"{stage.name}_sign_out", stage.sign))
            value_of[stage.name] = layers[-1].name
            if previous in raw_domain:
                raw_domain.add(stage.name)
            previous = stage.name
            continue
        operands = [
            (previous, stage.synapses),
            *((sc.source, sc.synapses) for sc in stage.shortcuts),
        ]
        bias = stage.bias
        summands = []
        for index, (source, synapses) in enumerate(operands):
            *linear, affine = synapses
            weight = affine.weight
            if source in raw_domain:  # undo the folded rescaling x' = (x - p) / (q - p)
                shift = np.full((1, *_synapse_input_shape(stage, index)), p / (q - p))
                bias = bias - apply_synapses(synapses, shift)[0]
                weight = weight / (q - p)
            identity = index > 0 and _is_identity_synapse((*linear, replace(affine, weight=weight)))
            if identity:
                summands.append(value_of[source])
                continue
            prefix = "" if index == 0 else f"{stage.name}_shortcut{index}_"
            ops_in = value_of[source]
            for lin in linear:
                layers.append(replace(lin, name=prefix + lin.name, inputs=take(ops_in)))
                ops_in = layers[-1].name
            layers.append(
                replace(
                    affine,
                    name=prefix + affine.name if index else stage.name,
                    weight=weight,
                    bias=np.zeros(weight.shape[0]),
                    inputs=take(ops_in),
                )
            )
            summands.append(layers[-1].name)
        main_index = next(i for i, layer in enumerate(layers) if layer.name == summands[0])
        main = layers[main_index]
        layers[main_index] = replace(
            main, bias=bias.reshape(-1) if isinstance(main, Dense) else bias
        )
        if len(summands) > 1:
            layers.append(Add(f"{stage.name}_add", inputs=tuple(summands)))
        if isinstance(stage, OutputLayer):
            if len(summands) > 1:
                raise ConversionError(
                    f"snn_to_network: the output layer '{stage.name}' takes shortcuts; a "
                    "network's logits come from its last dense layer"
                )
            break
        clip = stage.window if stage.clipped else None
        layers.append(
            ReLU(
                f"{stage.name}_relu",
                window=stage.window,
                clip=clip,
                inputs=take(layers[-1].name),
            )
        )
        value_of[stage.name] = layers[-1].name
        previous = stage.name
    source = snn.source
    return Network(
        name=name or snn.name,
        input_shape=snn.input_shape,
        input_range=snn.input_range,
        layers=tuple(layers),
        classes=snn.classes,
        dataset=None if source is None else source.dataset,
    )


def _synapse_input_shape(stage, index: int) -> Shape:
    """Input shape of a stage's main synapses (index 0) or of its shortcut index - 1."""
    return stage.input_shape if index == 0 else stage.shortcuts[index - 1].input_shape


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
