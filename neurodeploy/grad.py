"""Gradients through the network's linear maps, one rule per layer type (a registry in
the manner of Nengo's builder): the backward half of ``apply_synapses``."""

from __future__ import annotations

import numpy as np

from . import ops
from .network import AvgPool2d, Conv2d, Dense, Flatten


def forward_cached(synapses: tuple, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """apply_synapses, keeping each op's input for the backward pass."""
    inputs = []
    for op in synapses:
        inputs.append(x)
        x = op.linear(x)
    return x, inputs


def _input_grad(op, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    if isinstance(op, Dense):
        return ops.dense_grad_input(grad, op.weight)
    if isinstance(op, Conv2d):
        return ops.conv2d_grad_input(
            grad, op.weight, x.shape[1:], op.stride, op.padding, op.groups
        )
    if isinstance(op, AvgPool2d):
        return ops.avgpool2d_grad_input(
            grad, x.shape[1:], op.kernel, op.stride, op.padding, op.count_include_pad
        )
    if isinstance(op, Flatten):
        return grad.reshape(x.shape)
    raise TypeError(f"no gradient rule for {type(op).__name__}")  # pragma: no cover


def _weight_grad(op, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    if isinstance(op, Dense):
        return ops.dense_grad_weight(x, grad)
    return ops.conv2d_grad_weight(x, grad, op.kernel, op.stride, op.padding, op.groups)


def backward(
    synapses: tuple, inputs: list[np.ndarray], grad: np.ndarray, need_input: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """(d loss / d affine weight, d loss / d synapse input) for a chain whose last op is
    the dense or conv layer; ``inputs`` from :func:`forward_cached`."""
    affine, affine_in = synapses[-1], inputs[-1]
    weight_grad = _weight_grad(affine, affine_in, grad)
    if not need_input:
        return weight_grad, None
    grad = _input_grad(affine, affine_in, grad)
    for op, x in zip(reversed(synapses[:-1]), reversed(inputs[:-1]), strict=True):
        grad = _input_grad(op, x, grad)
    return weight_grad, grad


def maxpool_backward(
    x: np.ndarray, grad: np.ndarray, kernel: int, stride: int, sign: np.ndarray, padding: int = 0
) -> np.ndarray:
    """Gradient of a signed max pool (min pool for channels with sign -1); padded
    positions never win."""
    s = sign[None, :, None, None]
    return ops.maxpool2d_grad_input(x * s, grad * s, kernel, stride, padding) * s
