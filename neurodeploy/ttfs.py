"""The converted spiking network: plain data, one record per stage.

Time is in the conversion's time unit: the input window is [0, 1] and layer
n owns [t_min^(n), t_max^(n)] with t_min^(n) = t_max^(n-1) and
t_max^(n) = t_min^(n) + B_n. A neuron's value is x = t_max - t for a spike at
t, and 0 when it does not spike (``inf`` spike time).

Stages, in order:

- :class:`SpikingLayer`: synapses (linear maps applied to the previous
  stage's values) into one layer of single-spike neurons;
- :class:`TimePool`: max pooling as the earliest spike of each window (or the
  latest, for channels whose folded batch-norm scale is negative); instant,
  it owns no window;
- :class:`OutputLayer`: non-spiking; its potential read at ``t_read`` is the
  logits.

A stage takes the spikes of the stage before it. A layer that joins a residual
branch also takes :class:`Shortcut` synapses from an earlier stage, whose
spikes are delayed so they arrive aligned with its own input window.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from .network import Layer, Shape

NEURON_MODELS = ("b1", "alpha1")
INPUT_WINDOW = (0.0, 1.0)


def alpha1_threshold(
    coupling_scale: np.ndarray,
    bias: np.ndarray,
    alpha: float,
    t_min_prev: float,
    t_min: float,
    t_max: float,
) -> np.ndarray:
    """alpha1 thresholds vartheta_i = g_i (B_n - b_i) + alpha (t_min - t_min_prev).

    With every input in by t_min, V(t_min) = alpha (t_min - t_min_prev) + g_i (W x)_i
    and V rises with slope g_i after it, so the neuron fires at t_max - (W x + b)_i
    (derivation: neurodeploy/convert.py, "alpha1"). Shapes: coupling_scale and bias
    (output_shape); time units.
    """
    return coupling_scale * (t_max - t_min - bias) + alpha * (t_min - t_min_prev)


def apply_synapses(synapses: tuple[Layer, ...], values: np.ndarray) -> np.ndarray:
    """Apply a stage's linear synaptic maps (no bias) to values (N, *input_shape)."""
    out = values
    for op in synapses:
        out = op.linear(out)
    return out


@dataclass(frozen=True, eq=False)
class Shortcut:
    """Synapses from an earlier stage's spikes into a layer that joins a residual branch.

    source: the stage (or ``"input"``) whose spikes feed it; its window ends at
    ``t_source`` (time units). synapses: linear maps (an identity shortcut is a
    unit-weight 1x1 map, a projection a folded 1x1 conv or dense) from that
    stage's values, input_shape -> the joining layer's output_shape.

    Alignment: the joining layer integrates inputs that arrive before its
    ``t_min`` (the read time ``t_read`` for the output layer) and reads a spike
    at t as the value t_min - t. The source encodes x as a spike at t_source - x,
    so every shortcut spike is delayed by ``t_min - t_source`` (the windows of
    the layers in between: whole windows, as Loihi's synaptic delays give) and
    arrives at t_min - x: the join adds exactly x.
    """

    source: str
    synapses: tuple[Layer, ...]
    input_shape: Shape
    t_source: float


class _SpikingStage:
    """What stages that emit spikes in a window [t_min, t_max] share."""

    output_shape: Shape
    t_max: float

    @property
    def size(self) -> int:
        """Neurons (or pool outputs) per sample."""
        return int(np.prod(self.output_shape))

    def decode(self, spike_times: np.ndarray) -> np.ndarray:
        """Values encoded by spike times: t_max - t, 0 where no spike (inf)."""
        return np.where(np.isfinite(spike_times), self.t_max - spike_times, 0.0)


@dataclass(frozen=True, eq=False)
class SpikingLayer(_SpikingStage):
    """One layer of TTFS neurons.

    synapses: linear maps (AvgPool2d, Flatten, then one Dense or Conv2d whose
    own bias is zero) from the previous stage's values, input_shape ->
    output_shape. bias: (output_shape) the folded ReLU bias b_i of every neuron
    (zero padding makes it position dependent). Window [t_min, t_max] in time
    units; inputs arrive in [t_min_prev, t_min]. x_max: largest ReLU output on
    the calibration set (X_n); B_n = t_max - t_min = (1 + zeta) X_n.

    threshold: (output_shape) firing threshold. b1: theta_i = B_n - b_i
    (after integrating inputs during the previous window, the membrane rises
    with slope 1 from t_min). alpha1: vartheta_i of the exact-mapping paper.
    alpha1 also has ``alpha`` (the constant input current) and
    ``coupling_scale`` (output_shape), g_i = alpha / (1 - sum_j W_ij): the
    effective synapses are J_ij = g_i W_ij, a per-neuron scale on the layer's
    own weights (a convolution stays a convolution; no dense matrix).
    shortcuts: residual inputs from earlier stages (b1 only), added to the
    membrane at t_min.

    clipped: the layer's ReLU is clipped (ReLU6, Clip(0, M)) and its window is
    the clip, B_n = M. A b1 neuron above threshold when its window opens fires
    at t_min, encoding exactly B_n: that is the clip, computed exactly, not a
    value lost to too short a window, so simulators count no saturation here.
    """

    name: str
    synapses: tuple[Layer, ...]
    bias: np.ndarray = field(repr=False)
    input_shape: Shape
    output_shape: Shape
    t_min_prev: float
    t_min: float
    t_max: float
    x_max: float
    threshold: np.ndarray = field(repr=False)
    alpha: float = 1.0
    coupling_scale: np.ndarray | None = field(default=None, repr=False)
    shortcuts: tuple[Shortcut, ...] = ()
    clipped: bool = False

    @property
    def window(self) -> float:
        return self.t_max - self.t_min

    @cached_property
    def _paired_synapses(self) -> tuple[Layer, ...]:
        """W and W+ stacked along the output channels, group by group (a grouped conv's
        output channels stay in their groups), so one pass computes both."""
        *linear, affine = self.synapses
        w = affine.weight
        groups = getattr(affine, "groups", 1)
        per_group = w.reshape(groups, -1, *w.shape[1:])
        paired = np.concatenate([per_group, np.maximum(per_group, 0.0)], axis=1)
        paired = paired.reshape(2 * w.shape[0], *w.shape[1:])
        return (*linear, replace(affine, weight=paired, bias=np.zeros(paired.shape[0])))

    def drive_and_positive_drive(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W x, W+ x) for values (N, *input_shape), each (N, *output_shape), from one
        pass of the layer's own map with both weight sets (one im2col for a conv)."""
        *_, affine = self.synapses
        groups = getattr(affine, "groups", 1)
        both = apply_synapses(self._paired_synapses, values)
        if groups == 1:  # views of the two halves along the channels: no copies
            half = both.shape[1] // 2
            return both[:, :half], both[:, half:]
        n = both.shape[0]
        both = both.reshape(n, groups, 2, -1, *both.shape[2:])
        shape = (n, *self.output_shape)
        return both[:, :, 0].reshape(shape), both[:, :, 1].reshape(shape)

    def delay(self, shortcut: Shortcut) -> float:
        """Delay (time units) of a shortcut's spikes: t_min - its source's window end."""
        return self.t_min - shortcut.t_source


@dataclass(frozen=True, eq=False)
class TimePool(_SpikingStage):
    """Max pooling of spike times over k x k windows with symmetric padding.

    sign: (channels,) +1 passes each window's earliest spike (max value); -1
    passes the latest (min value; no spike if any input is silent), for
    channels whose following batch norm had a negative scale. The output stays
    in the window [t_min, t_max] of the layer it pools. padding: positions
    outside the map never win (a max pool pads with -inf), so a window passes
    the earliest (latest) spike of its in-bounds inputs: exact on ReLU values.
    """

    name: str
    kernel: int
    stride: int
    sign: np.ndarray = field(repr=False)
    input_shape: Shape
    output_shape: Shape
    t_min: float
    t_max: float
    padding: int = 0


@dataclass(frozen=True, eq=False)
class OutputLayer:
    """Non-spiking readout: potential = bias + sum_j W_ij (t_read - t_j) at t_read.

    Inputs arrive in [t_min_prev, t_read]; the bias enters as a constant
    current bias / (t_read - t_min_prev) over that window. shortcuts: residual
    inputs from earlier stages, delayed by t_read - t_source.
    """

    name: str
    synapses: tuple[Layer, ...]
    bias: np.ndarray = field(repr=False)
    input_shape: Shape
    output_shape: Shape
    t_min_prev: float
    t_read: float
    shortcuts: tuple[Shortcut, ...] = ()

    @property
    def t_min(self) -> float:
        """The read time: shortcut alignment treats it as the layer's t_min."""
        return self.t_read

    def delay(self, shortcut: Shortcut) -> float:
        """Delay (time units) of a shortcut's spikes: t_read - its source's window end."""
        return self.t_read - shortcut.t_source


Stage = SpikingLayer | TimePool | OutputLayer


@dataclass(frozen=True, eq=False)
class TTFSNetwork:
    """A converted time-to-first-spike network.

    neuron: "b1" or "alpha1". zeta: window safety margin. input_range: raw
    input [p, q], rescaled to [0, 1] and encoded as t = 1 - x in the input
    window [0, 1] (b1: zeros do not spike; alpha1: they spike at t = 1).
    calibration: the raw inputs (N, *input_shape) the windows were calibrated
    on; backends reuse them to calibrate hardware ranges (e.g. ADCs).
    """

    name: str
    neuron: str
    zeta: float
    input_shape: Shape
    input_range: tuple[float, float]
    stages: tuple[Stage, ...]
    classes: tuple[str, ...] | None = None
    calibration: np.ndarray | None = field(default=None, repr=False)
    source: object = field(default=None, repr=False)

    @property
    def calibration_size(self) -> int:
        return 0 if self.calibration is None else int(self.calibration.shape[0])

    @property
    def output(self) -> OutputLayer:
        return self.stages[-1]

    @property
    def latency(self) -> float:
        """Time (time units) at which the output is read: t_min of the output layer."""
        return self.output.t_read

    @property
    def spiking_layers(self) -> tuple[SpikingLayer, ...]:
        return tuple(s for s in self.stages if isinstance(s, SpikingLayer))

    @property
    def has_shortcuts(self) -> bool:
        """True for a residual network (some layer takes shortcut synapses)."""
        return any(getattr(s, "shortcuts", ()) for s in self.stages)

    @property
    def num_classes(self) -> int:
        return self.output.output_shape[0]

    @property
    def neuron_count(self) -> int:
        """Spiking neurons: the input encoding plus every hidden layer (pools route, the
        output layer does not spike)."""
        return int(np.prod(self.input_shape)) + sum(s.size for s in self.spiking_layers)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)
