"""Pieces every discrete-time or hardware backend shares.

Time grid: every window (the input's [0, 1] and each layer's [t_min, t_max])
has K = ``timing.steps_per_window`` steps of dt = window / K. A spike at step
k of a window encodes the value (K - k) dt; a value x becomes the step
k = K - round(x / dt) (round half up), K meaning no spike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import DeployError
from ..network import AvgPool2d, Layer, Shape
from ..ttfs import (
    INPUT_WINDOW,
    OutputLayer,
    SpikingLayer,
    TimePool,
    TTFSNetwork,
)


def require_b1(snn: TTFSNetwork, backend: str) -> None:
    if snn.neuron != "b1":
        raise DeployError(
            f"the {backend} backend runs the b1 neuron; convert with neuron='b1' "
            f"(got '{snn.neuron}')"
        )


def step_sizes(snn: TTFSNetwork, steps: int) -> dict[str, float]:
    """Time units per step of every stage's window (and of the input window)."""
    sizes = {"input": (INPUT_WINDOW[1] - INPUT_WINDOW[0]) / steps}
    for stage in snn.stages:
        if isinstance(stage, (SpikingLayer, TimePool)):
            sizes[stage.name] = (stage.t_max - stage.t_min) / steps
    return sizes


def input_window_step(snn: TTFSNetwork, stage) -> float:
    """End of the window a stage's inputs arrive in (its t_min / t_read)."""
    return stage.t_read if isinstance(stage, OutputLayer) else stage.t_min


def round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


def encode_on_grid(x01: np.ndarray, steps: int) -> np.ndarray:
    """Input spike times on the grid: t = k / K with k = K - round(x K); inf for k = K."""
    d = round_half_up(x01 * steps)  # value in steps, 0..K
    t = (steps - d) / steps
    t[d <= 0] = np.inf
    return t


def durations(t_in: np.ndarray, t_end: float, dt: float) -> np.ndarray:
    """Steps between each input spike and the end of its window (0 for silence): exact ints."""
    d = np.subtract(t_end, t_in)  # silent inputs (inf) give -inf, then 0
    d *= 1.0 / dt
    np.rint(d, out=d)
    return np.maximum(d, 0.0, out=d)


@dataclass(frozen=True, eq=False)
class SumPool2d(Layer):
    """Sum over k x k windows (zero padding), integer-preserving: an average pool that
    counts its padding, times k^2.

    multiplicity: (Ho, Wo) integers, one per window, that its sum is multiplied by (a
    count_include_pad=False pool: L / count, see :func:`fold_average_pools`); None: 1.
    """

    kernel: int = 2
    stride: int = 2
    padding: int = 0
    multiplicity: np.ndarray | None = field(default=None, repr=False)
    type = "sumpool2d"

    def output_shape(self, input_shape):
        return AvgPool2d(self.name, self.kernel, self.stride, self.padding).output_shape(
            input_shape
        )

    def linear(self, x: np.ndarray) -> np.ndarray:
        from .. import ops

        total = ops.sumpool2d(x, self.kernel, self.stride, self.padding)
        if self.multiplicity is not None:
            total *= self.multiplicity
        return total

    def connectivity(self) -> SumPool2d:
        """The same pool with every window counted once (which inputs reach which
        outputs, for synapse counts)."""
        return replace(self, multiplicity=None)


def fold_average_pools(
    synapses: tuple[Layer, ...], input_shape: Shape | None = None
) -> tuple[tuple[Layer, ...], float]:
    """Average pools become sum pools; returns (ops, factor the affine weights must take).

    A pool dividing by k^2 becomes a sum pool and 1/k^2 goes into the factor. A padded
    pool with count_include_pad=False divides each window by its own count c of
    in-bounds inputs (k^2 inside, fewer at the border): with L the least common
    multiple of the counts, 1/c = (L / c) / L, so it becomes a sum pool whose windows
    carry the integer multiplicities L / c, and 1/L goes into the factor. Integers
    stay integers, so every fixed-point layer computes these pools exactly, whatever
    follows them. input_shape (the synapses' input) is needed for such pools.
    """
    from .. import ops as kernels

    factor = 1.0
    ops = []
    shape = input_shape
    for op in synapses:
        if isinstance(op, AvgPool2d) and op.padding and not op.count_include_pad:
            if shape is None:  # pragma: no cover - every caller passes the shape
                raise DeployError(f"layer '{op.name}': the pool's input shape is needed")
            counts = kernels.pool_counts(shape[1:], op.kernel, op.stride, op.padding)
            counts = counts.astype(np.int64)
            common = int(np.lcm.reduce(counts.reshape(-1)))
            multiplicity = (common // counts).astype(np.float64)
            ops.append(SumPool2d(op.name, op.kernel, op.stride, op.padding, multiplicity))
            factor /= common
        elif isinstance(op, AvgPool2d):
            ops.append(SumPool2d(op.name, op.kernel, op.stride, op.padding))
            factor /= op.kernel * op.kernel
        else:
            ops.append(op)
        if shape is not None:
            shape = op.output_shape(shape)
    return tuple(ops), factor


def child_rng(seed: int, *path: int) -> np.random.Generator:
    """An independent generator for one purpose and layer: same (seed, path), same bits."""
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def abs_weight_ops(synapses: tuple, weight: np.ndarray) -> tuple:
    """The synapse ops with the affine weight replaced (used with |W| or |dW| weights)."""
    from dataclasses import replace

    *linear, affine = synapses
    return (*linear, replace(affine, weight=weight, bias=np.zeros(weight.shape[0])))


