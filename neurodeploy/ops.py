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
    out_ch, c_per_group, k, _ = weight.shape
    if groups == 1:
        cols, ho, wo = im2col(x, k, stride, padding)
        out = cols @ weight.reshape(out_ch, -1).T  # im2col: one BLAS product
        return out.reshape(x.shape[0], ho, wo, out_ch).transpose(0, 3, 1, 2)
    if c_per_group == 1:
        return _depthwise_conv2d(x, weight, stride, padding)
    ho = conv_output_size(x.shape[2], k, stride, padding)
    wo = conv_output_size(x.shape[3], k, stride, padding)
    if x.shape[0] * ho * wo >= _GROUP_LOOP_MIN_ROWS:  # large products: one per group
        c_in, o_per = x.shape[1] // groups, out_ch // groups
        parts = [
            conv2d(x[:, g * c_in : (g + 1) * c_in], weight[g * o_per : (g + 1) * o_per],
                   stride, padding)
            for g in range(groups)
        ]
        return np.concatenate(parts, axis=1)
    # Small products: one im2col, whose columns are group-major, so each group is one
    # slice of a batched product (G, P, r) @ (G, r, O/G).
    cols, ho, wo = im2col(x, k, stride, padding)
    rows, r = cols.shape[0], c_per_group * k * k
    per_group = cols.reshape(rows, groups, r).transpose(1, 0, 2)
    w = weight.reshape(groups, out_ch // groups, r).transpose(0, 2, 1)
    out = np.matmul(per_group, w)  # (G, P, O/G)
    return out.transpose(1, 0, 2).reshape(x.shape[0], ho, wo, out_ch).transpose(0, 3, 1, 2)


# Patch rows (N Ho Wo) from which a grouped conv's per-group products are large enough
# that one BLAS product per group (cache-sized im2cols) beats one batched product: below
# it the batched product is ~3x faster (1 image, 64 groups), above it 1.1-1.5x slower
# (benchmarks/bench_ops.py).
_GROUP_LOOP_MIN_ROWS = 4096
# Output elements per block of the depthwise kernel: the block and its product buffer
# (2 x 128 KiB of float64) stay in a core's L2 cache through the k*k passes; measured
# here 1.5-2.6x faster than passes over the whole map (16-200 images, 32-256 channels).
_DEPTHWISE_BLOCK = 1 << 14


def _depthwise_conv2d(x: np.ndarray, weight: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Convolution in which every output channel reads one input channel (weight
    (O, 1, k, k), O a multiple of C): k*k shifted multiply-adds, block by block.

    Against a loop over the groups (benchmarks/bench_ops.py, 2 shared cores): an order of
    magnitude faster for one image of many channels, a few times for small batches,
    on par or faster for large batches (there the loop's per-group products are large).
    """
    out_ch, _, k, _ = weight.shape
    x = _pad_spatial(x, padding, 0.0)
    if out_ch != x.shape[1]:  # channel multiplier: output channel o reads input o // m
        x = np.repeat(x, out_ch // x.shape[1], axis=1)
    n, _, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.zeros((n, out_ch, ho, wo))
    taps = weight[:, 0]
    plane = ho * wo
    samples = max(1, _DEPTHWISE_BLOCK // (out_ch * plane))
    channels = out_ch if out_ch * plane <= _DEPTHWISE_BLOCK else max(1, _DEPTHWISE_BLOCK // plane)
    for lo in range(0, n, samples):
        for c0 in range(0, out_ch, channels):
            block = out[lo : lo + samples, c0 : c0 + channels]
            source = x[lo : lo + samples, c0 : c0 + channels]
            term = np.empty_like(block)
            for i in range(k):
                for j in range(k):
                    rows = slice(i, i + stride * (ho - 1) + 1, stride)
                    cols = slice(j, j + stride * (wo - 1) + 1, stride)
                    np.multiply(
                        source[:, :, rows, cols], taps[c0 : c0 + channels, i, j, None, None],
                        out=term,
                    )
                    block += term
    return out


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


def pool_counts(size: tuple[int, int], kernel: int, stride: int, padding: int) -> np.ndarray:
    """Input positions inside each k x k window (Ho, Wo) of an H x W map (size) padded by
    ``padding``: k*k in the interior, fewer at the borders."""
    ones = np.ones((1, 1, *size))
    return _windows(_pad_spatial(ones, padding, 0.0), kernel, stride).sum(axis=(4, 5))[0, 0]


def sumpool2d(x: np.ndarray, kernel: int, stride: int, padding: int = 0) -> np.ndarray:
    """Sum over k x k windows of x (N, C, H, W) with zero padding; exact on integers
    (below 2^53), unlike k^2 times the mean."""
    return _windows(_pad_spatial(x, padding, 0.0), kernel, stride).sum(axis=(4, 5))


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
    return total / pool_counts(x.shape[2:], kernel, stride, padding)


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
    x: np.ndarray, grad: np.ndarray, kernel: int, stride: int, padding: int, groups: int = 1
) -> np.ndarray:
    """d loss / d weight of conv2d: (O, C / groups, k, k); grad (N, O, Ho, Wo)."""
    cols, _, _ = im2col(x, kernel, stride, padding)
    out_ch = grad.shape[1]
    c_per_group = x.shape[1] // groups
    if groups == 1:
        out = _grad_cols(grad).T @ cols
    else:  # per group: (O/G, P) @ (P, r), batched over the groups
        rows, r = cols.shape[0], c_per_group * kernel * kernel
        g = _grad_cols(grad).reshape(rows, groups, out_ch // groups).transpose(1, 2, 0)
        out = np.matmul(g, cols.reshape(rows, groups, r).transpose(1, 0, 2))
    return out.reshape(out_ch, c_per_group, kernel, kernel)


def conv2d_grad_input(
    grad: np.ndarray,
    weight: np.ndarray,
    input_shape: tuple,
    stride: int,
    padding: int,
    groups: int = 1,
) -> np.ndarray:
    """d loss / d x of conv2d, (N, C, H, W): the column gradients summed back (col2im)."""
    n = grad.shape[0]
    o, c_per_group, k, _ = weight.shape
    c, h, w = input_shape
    ho, wo = grad.shape[2:]
    if groups == 1:
        cols = _grad_cols(grad) @ weight.reshape(o, -1)
    else:  # per group: (P, O/G) @ (O/G, r), batched over the groups
        g = _grad_cols(grad).reshape(-1, groups, o // groups).transpose(1, 0, 2)
        cols = np.matmul(g, weight.reshape(groups, o // groups, -1)).transpose(1, 0, 2)
    cols = cols.reshape(n, ho, wo, c, k, k)
    padded = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    for i in range(k):
        for j in range(k):
            padded[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += cols[
                :, :, :, :, i, j
            ].transpose(0, 3, 1, 2)
    return padded[:, :, padding : padding + h, padding : padding + w]


def avgpool2d_grad_input(
    grad: np.ndarray,
    input_shape: tuple,
    kernel: int,
    stride: int,
    padding: int = 0,
    count_include_pad: bool = True,
) -> np.ndarray:
    """d loss / d x of avgpool2d: each window's gradient spread evenly over it (over its
    in-bounds positions, with their own divisor, when count_include_pad is False)."""
    n, c, ho, wo = grad.shape
    _, h, w = input_shape
    out = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    if count_include_pad or not padding:
        share = grad / (kernel * kernel)
    else:
        share = grad / pool_counts((h, w), kernel, stride, padding)
    for i in range(kernel):
        for j in range(kernel):
            out[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += share
    return out[:, :, padding : padding + h, padding : padding + w]


def maxpool2d_grad_input(
    x: np.ndarray, grad: np.ndarray, kernel: int, stride: int, padding: int = 0
) -> np.ndarray:
    """d loss / d x of maxpool2d: each window's gradient to its (first) largest input;
    padded positions (-inf) never win."""
    padded = _pad_spatial(x, padding, -np.inf)
    windows = _windows(padded, kernel, stride)  # (N, C, Ho, Wo, k, k)
    n, c, ho, wo = windows.shape[:4]
    winner = windows.reshape(n, c, ho, wo, kernel * kernel).argmax(axis=-1)
    out = np.zeros(padded.shape)
    for i in range(kernel):
        for j in range(kernel):
            mask = winner == i * kernel + j
            out[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += grad * mask
    h, w = x.shape[2:]
    return out[:, :, padding : padding + h, padding : padding + w]
