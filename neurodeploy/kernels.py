"""Compiled single-pass kernels for the elementwise work numpy runs as many passes.

A b1 conv layer's work around its GEMMs (``simulate._b1_conv_layer``) is, in numpy,
two passes to write the input's spike values and five to eight on each output block
(shortcut values, scale, add, subtract from the fire times, clamp, compare, count,
silence), each ~0.3 ns per neuron even on a block in cache: on ResNet-50 at 224x224
they cost a quarter of the GEMMs' time. Here each is one loop, compiled by numba (the
values also go straight into a 3x3 conv's im2col rows, and a time pool takes one pass
with no padded copy), with the same operations in the same order on the same dtype, so
the same bits: IEEE
operations without fast-math (no contraction into fused multiply-adds, no
reassociation), and scalars cast to the arrays' dtype by the caller, as numpy casts a
Python float meeting a float32 array. tests/test_kernels.py checks the bits against
the numpy passes, NaN and the window edges included.

Import this module where a kernel runs (it imports numba, ~0.3 s); the kernels
compile on first use (cached on disk beside this file when it is writable), release
the GIL and run on the calling thread only.
"""

from __future__ import annotations

import numba
import numpy as np

from . import ops
from .memory import reusable_empty

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _spike_value(t_end, t, zero):
    """max(t_end - t, 0) as numpy's spike_values rounds it: np.maximum(value, 0) turns a
    silent neuron's -inf into 0 and keeps NaN and -0.0."""
    value = t_end - t
    return zero if value < zero else value


@_jit
def _spike_values_4d(src, t_end, dst):
    n, h, w, c = src.shape
    zero = dst.dtype.type(0.0)
    for a in range(n):
        for y in range(h):
            for x in range(w):
                for ch in range(c):
                    dst[a, y, x, ch] = _spike_value(t_end, src[a, y, x, ch], zero)


def spike_values_into(src: np.ndarray, t_end, dst: np.ndarray) -> None:
    """dst = max(t_end - src, 0) (``simulate.spike_values``) for arrays of one shape (up
    to 4 axes) and dtype, any strides; t_end of that dtype."""
    lead = (None,) * (4 - src.ndim)
    _spike_values_4d(src[lead], t_end, dst[lead])


@_jit
def _fire(t, t_min, t_max, inf):
    """(spike time, below t_min, fires) of a b1 neuron whose fire time is t: raised to
    t_min when below it (np.maximum: NaN kept), silent (inf) unless below t_max; t + inf
    is inf for any time and NaN for NaN, what numpy's silence pass (t / False) gives."""
    below = t < t_min
    t = t_min if below else t
    fires = t < t_max
    return (t if fires else t + inf), below, fires


@_jit
def _operand_row(operand, position):
    """Row of a per-neuron operand (R, O) that meets block row ``position``: it holds one
    row per position of the block (R = r) or one for all (R = 1: per channel, a few
    hundred bytes that stay in L1 instead of a tile as large as the block in L2)."""
    return operand[position if operand.shape[0] > 1 else 0]


# What joins the membranes in :func:`b1_fire`: nothing, a whole shortcut term, or an
# identity shortcut's values times a per-channel scale.
NO_SHORTCUT = 0
TERM = 1
IDENTITY = 2


@_jit
def b1_fire(block, fire_at, t_min, t_max, counts, kind, source, source_row, offset, t_source,
            scale):
    """Spike times, in place, of b1 neurons whose membranes at t_min are ``block``
    (b, r, O: b samples' r positions of O channels, channels-last), plus a shortcut of
    ``kind`` first: TERM adds source (N, L), a whole shortcut term, channels-last, of
    which sample s of the block meets row source_row + s from element ``offset``;
    IDENTITY adds max(t_source - source, 0) * scale, the values of an identity shortcut
    from its source layer's spike times, scale (O,) per channel (rounded as numpy's
    passes round: the value, its product, the sum); NO_SHORTCUT ignores source, t_source
    and scale. fire_at (r, O) or (1, O): t_min + theta per neuron (:func:`_operand_row`);
    t_min, t_max, t_source scalars of the block's dtype. counts (b,) += each sample's
    spikes. Returns the number of neurons whose fire time was below t_min (saturated)."""
    b, r, o = block.shape
    inf = block.dtype.type(np.inf)
    zero = block.dtype.type(0.0)
    saturated = 0
    for s in range(b):
        src = source[source_row + s, offset : offset + r * o] if kind != NO_SHORTCUT else \
            source[0, :0]
        fired = 0
        for p in range(r):
            row = block[s, p]
            fire = _operand_row(fire_at, p)
            base = p * o
            for j in range(o):
                v = row[j]
                if kind == TERM:
                    v = v + src[base + j]
                elif kind == IDENTITY:
                    v = v + _spike_value(t_source, src[base + j], zero) * scale[j]
                t, below, fires = _fire(fire[j] - v, t_min, t_max, inf)
                row[j] = t
                saturated += below
                fired += fires
        counts[s] += fired
    return saturated


# Steps of :func:`elementwise_chain`, each a numpy pass of the ReLU forward it stands for.
ADD_ROWS = 0  # np.add(block, operand): a bias or batch-norm shift
MULTIPLY_ROWS = 1  # np.multiply(block, operand): a batch-norm scale
MAXIMUM = 2  # np.maximum(block, scalar): a ReLU
MINIMUM = 3  # np.minimum(block, scalar): a clipped ReLU's clip
ADD_OTHER = 4  # block += other: a two-input Add's other input


@_jit
def elementwise_chain(block, kinds, operands, scalars):
    """The steps ``kinds`` (:data:`ADD_ROWS` ...) applied in order, in place, to ``block``
    (b, r, O: b samples' r positions of O channels). operands[i]: step i's (1, R, O)
    rows, R = 1 or r (:func:`_operand_row`), or an Add's (b, r, O) other input (a 3-D
    array either way; scalar steps ignore theirs); scalars[i]: its scalar (the block's
    dtype). Position by position, each step a pass over the position's channels
    (vectorised, in L1), with numpy's rounding and NaN rules: the bits of the numpy passes
    one after the other."""
    b, r, o = block.shape
    for s in range(b):
        for p in range(r):
            row = block[s, p]
            for i in range(kinds.shape[0]):
                kind = kinds[i]
                if kind == ADD_ROWS:
                    operand = _operand_row(operands[i][0], p)
                    for j in range(o):
                        row[j] = row[j] + operand[j]
                elif kind == MULTIPLY_ROWS:
                    operand = _operand_row(operands[i][0], p)
                    for j in range(o):
                        row[j] = row[j] * operand[j]
                elif kind == MAXIMUM:  # np.maximum: NaN stays, a tie gives the bound
                    bound = scalars[i]  # (+0.0 for -0.0, as numpy's loops give)
                    for j in range(o):
                        v = row[j]
                        row[j] = v if v > bound or v != v else bound
                elif kind == MINIMUM:
                    bound = scalars[i]
                    for j in range(o):
                        v = row[j]
                        row[j] = v if v < bound or v != v else bound
                else:
                    add = operands[i][s, p]
                    for j in range(o):
                        row[j] = row[j] + add[j]


@_jit
def gather_windows(src, cols, sample0, line0, lines, k, stride, padding, wo, t_end, values):
    """im2col rows of src (N, H, W, C), channels-last, written into cols (rows, k * k * C),
    row-major over (sample, output line, output column) from sample ``sample0``, output
    line ``line0``: each row a window's (ki, kj, channel) entries, 0 outside the image.
    values: write the spike values max(t_end - t, 0) of src's spike times (zero padding is
    a silent input) instead of src's entries. What a padded copy and its window copy write,
    in one pass over the source and no buffer of its own. lines: output lines per sample
    in the block (all of a sample's when the block holds whole samples)."""
    rows = cols.shape[0]
    _, h, w, c = src.shape
    zero = cols.dtype.type(0.0)
    row = 0
    for q in range(rows // wo):
        s = sample0 + q // lines
        oh = line0 + q % lines
        for ow in range(wo):
            out = cols[row]
            col = 0
            for ki in range(k):
                y = oh * stride - padding + ki
                for kj in range(k):
                    x = ow * stride - padding + kj
                    # one tap's channels as slices: the loop vectorises (2.3x faster
                    # than indexing out[col + ch], measured on ResNet-50's 3x3 layers)
                    tap = out[col : col + c]
                    if 0 <= y < h and 0 <= x < w:
                        pixel = src[s, y, x]
                        if values:
                            for ch in range(c):
                                tap[ch] = _spike_value(t_end, pixel[ch], zero)
                        else:
                            tap[:] = pixel
                    else:
                        tap[:] = zero
                    col += c
            row += 1


@_jit
def _min_pool_nhwc(src, kernel, stride, padding, out, sample, line0, line1):
    _, h, w, c = src.shape
    wo = out.shape[2]
    for oh in range(line0, line1):
        for ow in range(wo):
            earliest = out[sample, oh, ow]
            earliest[:] = np.inf
            for ki in range(kernel):
                y = oh * stride - padding + ki
                if not 0 <= y < h:
                    continue
                for kj in range(kernel):
                    x = ow * stride - padding + kj
                    if not 0 <= x < w:
                        continue
                    pixel = src[sample, y, x]
                    for ch in range(c):
                        t = pixel[ch]
                        # np.minimum: the earlier time, the first on ties, NaN wins
                        if t < earliest[ch] or t != t:
                            earliest[ch] = t


# Output elements per block of a time pool on the block workers (neurodeploy.threads).
_POOL_BLOCK_ELEMENTS = 1 << 16


def min_pool_channels_last(t: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    """Earliest spike time per k x k window of t (N, C, H, W), lying channels-last;
    padded positions never win (what ``ops.minpool2d`` computes, in one pass with no
    padded copy), in blocks of output lines on the block workers. Returns (N, C, Ho, Wo),
    channels-last."""
    from . import threads

    n, c, h, w = t.shape
    ho = ops.conv_output_size(h, kernel, stride, padding)
    wo = ops.conv_output_size(w, kernel, stride, padding)
    out = reusable_empty((n, ho, wo, c), t.dtype)
    src = t.transpose(0, 2, 3, 1)
    lines = max(1, _POOL_BLOCK_ELEMENTS // max(1, wo * c))
    parts = -(-ho // lines)

    def block(index: int) -> None:
        sample, part = divmod(index, parts)
        _min_pool_nhwc(src, kernel, stride, padding, out, sample, part * lines,
                       min(ho, (part + 1) * lines))

    with threads.block_workers() as width:
        threads.run_blocks(n * parts, block, width)
    return out.transpose(0, 3, 1, 2)
