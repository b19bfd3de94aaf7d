"""Pieces every discrete-time or hardware backend shares.

Time grid: every window (the input's [0, 1] and each layer's [t_min, t_max])
has K = ``timing.steps_per_window`` steps of dt = window / K. A spike at step
k of a window encodes the value (K - k) dt; a value x becomes the step
k = K - round(x / dt) (round half up), K meaning no spike.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class SumPool2d(Layer):
    """Sum over k x k windows (zero padding): an average pool that counts the padding,
    times k^2; integer-preserving."""

    kernel: int = 2
    stride: int = 2
    padding: int = 0
    type = "sumpool2d"

    def output_shape(self, input_shape):
        return AvgPool2d(self.name, self.kernel, self.stride, self.padding).output_shape(
            input_shape
        )

    def linear(self, x: np.ndarray) -> np.ndarray:
        from .. import ops

        total = ops.avgpool2d(x, self.kernel, self.stride, self.padding)
        return total * (self.kernel * self.kernel)


def fold_average_pools(
    synapses: tuple[Layer, ...], input_shape: Shape | None = None
) -> tuple[tuple[Layer, ...], float | np.ndarray]:
    """Average pools become sum pools; returns (ops, factor the affine weights must take).

    The factor is 1/k^2 per pool, a scalar, when every window's divisor is k^2. A
    padded pool with count_include_pad=False divides each window by its own count of
    in-bounds inputs; that per-position divisor folds exactly into the weights of a
    dense layer fed by flattening (factor (1, F_in), one per input feature), but not
    into the shared weights of a convolution or through another pool: refused there,
    naming the pool (integer synapses have one weight per kernel tap). input_shape
    (the synapses' input) is needed for such pools.
    """
    factor: float | np.ndarray = 1.0
    ops = []
    shape = input_shape
    for i, op in enumerate(synapses):
        if isinstance(op, AvgPool2d):
            ops.append(SumPool2d(op.name, op.kernel, op.stride, op.padding))
            factor = factor / (op.kernel * op.kernel)
            if op.padding and not op.count_include_pad:
                factor = factor * _per_position_factor(op, synapses[i + 1 :], shape)
        else:
            ops.append(op)
        if shape is not None:
            shape = op.output_shape(shape)
    return tuple(ops), factor


def _per_position_factor(pool: AvgPool2d, rest: tuple[Layer, ...], shape) -> np.ndarray | float:
    """k^2 / count per input feature of the dense layer after a count_include_pad=False
    pool, (1, F_in); see :func:`fold_average_pools`."""
    from .. import ops
    from ..network import Dense, Flatten

    if shape is None:  # pragma: no cover - every caller passes the shape
        raise DeployError(f"layer '{pool.name}': the pool's input shape is needed")
    counts = ops.pool_counts(shape[1:], pool.kernel, pool.stride, pool.padding)
    if np.all(counts == counts.flat[0]):
        return pool.kernel * pool.kernel / float(counts.flat[0])
    if not (all(isinstance(op, Flatten) for op in rest[:-1]) and isinstance(rest[-1], Dense)):
        after = rest[0]
        raise DeployError(
            f"layer '{pool.name}' (avgpool2d, padding {pool.padding}, count_include_pad "
            f"false): its divisor differs per position and cannot fold into the shared "
            f"weights of '{after.name}' ({after.type}) on fixed-point hardware; use "
            "count_include_pad=true or a dense layer after the pool"
        )
    per_feature = np.tile((pool.kernel * pool.kernel / counts).reshape(-1), shape[0])
    return per_feature[None, :]


def child_rng(seed: int, *path: int) -> np.random.Generator:
    """An independent generator for one purpose and layer: same (seed, path), same bits."""
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def abs_weight_ops(synapses: tuple, weight: np.ndarray) -> tuple:
    """The synapse ops with the affine weight replaced (used with |W| or |dW| weights)."""
    from dataclasses import replace

    *linear, affine = synapses
    return (*linear, replace(affine, weight=weight, bias=np.zeros(weight.shape[0])))
