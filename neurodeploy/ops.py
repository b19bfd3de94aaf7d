"""Array kernels shared by the ReLU forward pass and every SNN simulator.

All functions are vectorised over the leading batch axis and work on
channels-first tensors: images are (N, C, H, W), feature vectors (N, F).
Keeping one implementation here is what lets the SNN simulators claim the
same cost as the ReLU pass: they call the very same products.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution or pooling along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def _windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """View of (N, C, Ho, Wo, k, k) windows of x (N, C, H, W); no copy."""
    view = sliding_window_view(x, (kernel, kernel), axis=(2, 3))
    return view[:, :, ::stride, ::stride]


def im2col(x: np.ndarray, kernel: int, stride: int = 1, padding: int = 0):
    """Patches of x (N, C, H, W) as rows: returns (N*Ho*Wo, C*k*k), Ho, Wo.

    Row order is (n, ho, wo); column order (c, kh, kw) matches a conv weight
    (O, C, k, k) reshaped to (O, C*k*k): one kernel per crossbar column.
    """
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    patches = _windows(x, kernel, stride)  # (N, C, Ho, Wo, k, k)
    n, c, ho, wo = patches.shape[:4]
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kernel * kernel)
    return cols, ho, wo


def conv2d(
    x: np.ndarray, weight: np.ndarray, stride: int = 1, padding: int = 0, groups: int = 1
) -> np.ndarray:
    """Cross-correlation without bias, as in PyTorch/ONNX Conv.

    x: (N, C, H, W); weight: (O, C / groups, k, k). Returns (N, O, Ho, Wo). Zero
    padding. With groups > 1, input channels [g C/G, (g+1) C/G) feed output
    channels [g O/G, (g+1) O/G) only (depthwise: groups = C).
    """
    out_ch, _, k, _ = weight.shape
    if groups == 1:
        cols, ho, wo = im2col(x, k, stride, padding)
        out = cols @ weight.reshape(out_ch, -1).T  # im2col: one BLAS product
        return out.reshape(x.shape[0], ho, wo, out_ch).transpose(0, 3, 1, 2)
    c_in = x.shape[1] // groups
    o_per = out_ch // groups
    parts = [
        conv2d(
            x[:, g * c_in : (g + 1) * c_in], weight[g * o_per : (g + 1) * o_per], stride, padding
        )
        for g in range(groups)
    ]
    return np.concatenate(parts, axis=1)


def _pad_spatial(x: np.ndarray, padding: int, value: float) -> np.ndarray:
    if not padding:
        return x
    pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    return np.pad(x, pad, constant_values=value)


def maxpool2d(x: np.ndarray, kernel: int, stride: int, padding: int = 0) -> np.ndarray:
    """Max over k x k windows of x (N, C, H, W); padded positions never win (-inf)."""
    return _windows(_pad_spatial(x, padding, -np.inf), kernel, stride).max(axis=(4, 5))


def minpool2d(x: np.ndarray, kernel: int, stride: int, padding: int = 0) -> np.ndarray:
    """Min over k x k windows of x (N, C, H, W); padded positions never win (+inf)."""
    return _windows(_pad_spatial(x, padding, np.inf), kernel, stride).min(axis=(4, 5))


def avgpool2d(
    x: np.ndarray, kernel: int, stride: int, padding: int = 0, count_include_pad: bool = True
) -> np.ndarray:
    """Mean over k x k windows of x (N, C, H, W) with zero padding.

    count_include_pad: divide by k*k (PyTorch's default) or by the number of
    positions of each window that lie inside the input.
    """
    total = _windows(_pad_spatial(x, padding, 0.0), kernel, stride).sum(axis=(4, 5))
    if count_include_pad or not padding:
        return total / (kernel * kernel)
    ones = np.ones((1, 1, *x.shape[2:]))
    count = _windows(_pad_spatial(ones, padding, 0.0), kernel, stride).sum(axis=(4, 5))
    return total / count


def dense(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (N, F_in) @ weight.T, weight (F_out, F_in). Returns (N, F_out)."""
    return x @ weight.T


# -- vector-Jacobian products (gradients of the kernels above) ------------------------------
def dense_grad_input(grad: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """d loss / d x of dense(x, weight), grad (N, F_out) -> (N, F_in)."""
    return grad @ weight


def dense_grad_weight(x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """d loss / d weight of dense(x, weight): (F_out, F_in)."""
    return grad.T @ x


def _grad_cols(grad: np.ndarray) -> np.ndarray:
    n, o, ho, wo = grad.shape
    return grad.transpose(0, 2, 3, 1).reshape(n * ho * wo, o)


def conv2d_grad_weight(
    x: np.ndarray, grad: np.ndarray, kernel: int, stride: int, padding: int
) -> np.ndarray:
    """d loss / d weight of conv2d: (O, C, k, k); grad (N, O, Ho, Wo)."""
    cols, _, _ = im2col(x, kernel, stride, padding)
    out = _grad_cols(grad).T @ cols
    return out.reshape(grad.shape[1], x.shape[1], kernel, kernel)


def conv2d_grad_input(
    grad: np.ndarray, weight: np.ndarray, input_shape: tuple, stride: int, padding: int
) -> np.ndarray:
    """d loss / d x of conv2d, (N, C, H, W): the column gradients summed back (col2im)."""
    n = grad.shape[0]
    o, c, k, _ = weight.shape
    _, h, w = input_shape
    ho, wo = grad.shape[2:]
    cols = (_grad_cols(grad) @ weight.reshape(o, -1)).reshape(n, ho, wo, c, k, k)
    padded = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    for i in range(k):
        for j in range(k):
            padded[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += cols[
                :, :, :, :, i, j
            ].transpose(0, 3, 1, 2)
    return padded[:, :, padding : padding + h, padding : padding + w]


def avgpool2d_grad_input(
    grad: np.ndarray, input_shape: tuple, kernel: int, stride: int
) -> np.ndarray:
    """d loss / d x of avgpool2d: each window's gradient spread evenly over it."""
    n, c, ho, wo = grad.shape
    out = np.zeros((n, *input_shape))
    share = grad / (kernel * kernel)
    for i in range(kernel):
        for j in range(kernel):
            out[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += share
    return out


def maxpool2d_grad_input(x: np.ndarray, grad: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """d loss / d x of maxpool2d: each window's gradient to its (first) largest input."""
    windows = _windows(x, kernel, stride)  # (N, C, Ho, Wo, k, k)
    n, c, ho, wo = windows.shape[:4]
    winner = windows.reshape(n, c, ho, wo, kernel * kernel).argmax(axis=-1)
    out = np.zeros_like(x)
    for i in range(kernel):
        for j in range(kernel):
            mask = winner == i * kernel + j
            out[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += grad * mask
    return out
