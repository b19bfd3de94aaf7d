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
from ..network import AvgPool2d, Layer
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


def shortcut_term(stage: str, index: int) -> str:
    """Key of a join layer's ``index``-th shortcut group in ``quantization_terms``."""
    from ..deploy import shortcut_term_key

    return shortcut_term_key(stage, index)


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
    """Sum over k x k windows: an average pool times k^2, integer-preserving."""

    kernel: int = 2
    stride: int = 2
    type = "sumpool2d"

    def output_shape(self, input_shape):
        return AvgPool2d(self.name, self.kernel, self.stride).output_shape(input_shape)

    def linear(self, x: np.ndarray) -> np.ndarray:
        from .. import ops

        return ops.avgpool2d(x, self.kernel, self.stride) * (self.kernel * self.kernel)


def fold_average_pools(synapses: tuple[Layer, ...]) -> tuple[tuple[Layer, ...], float]:
    """Average pools become sum pools; returns (ops, factor the affine weights must take)."""
    factor = 1.0
    ops = []
    for op in synapses:
        if isinstance(op, AvgPool2d):
            ops.append(SumPool2d(op.name, op.kernel, op.stride))
            factor /= op.kernel * op.kernel
        else:
            ops.append(op)
    return tuple(ops), factor


def child_rng(seed: int, *path: int) -> np.random.Generator:
    """An independent generator for one purpose and layer: same (seed, path), same bits."""
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def abs_weight_ops(synapses: tuple, weight: np.ndarray) -> tuple:
    """The synapse ops with the affine weight replaced (used with |W| or |dW| weights)."""
    from dataclasses import replace

    *linear, affine = synapses
    return (*linear, replace(affine, weight=weight, bias=np.zeros(weight.shape[0])))
