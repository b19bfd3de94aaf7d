"""Array kernels shared by the ReLU forward pass and every SNN simulator.

All functions are vectorised over the leading batch axis and work on
channels-first tensors: images are (N, C, H, W), feature vectors (N, F).
Keeping one implementation here is what lets the SNN simulators claim the
same cost as the ReLU pass: they call the very same products.

Row independence: every matrix product of :func:`conv2d` is one BLAS call per sample, of
a shape that depends on the layer alone (numpy's stacked matmul loops over the samples in
C), and :func:`dense` makes products of exactly 8 rows (:func:`rows_matmul`: 8 samples,
the last block padded; 1.4-1.7x a bare forward of digits_mlp instead of 2.7x with one
call per sample), so a sample's output is the same bits whichever samples share its batch or
chunk (tested on every machine the suite runs on: tests/test_crossbar.py,
tests/test_batch_independence.py). A product over the rows of several samples is not: OpenBLAS
picks its micro-kernels by a row's position in the call (measured on an AMD EPYC,
OpenBLAS 0.3.23, Haswell/Zen kernels: in one float32 540-row product the rows fall into
three classes of last bits by position modulo 12; in float64 the last row of an odd
row count, and a single row, differ), and a multi-threaded call splits its rows by the
row count. Everything else here is elementwise or a fixed sequence of elementwise
passes, the same for every sample.

Fusion: :func:`conv2d` takes a ``prepare`` (an elementwise map of its input, written into
the copy its GEMMs read) and a ``finish`` (elementwise work on each output block right
after its GEMM, while the block is in cache). The forward pass fuses a conv's bias and the
batch norms and ReLUs after it this way, the b1 simulation a layer's spike values, shortcuts
and firing: on 224x224 networks the separate passes over whole maps cost as much as a
third of the GEMMs (benchmarks/bench_limit.py).

Threads: a convolution's blocks (gather, product, finish) and a large dense layer's
column blocks run on the block workers (:mod:`neurodeploy.threads`: as many threads as
BLAS would use), each product on one BLAS thread, so each core finishes what its own
product left in its cache, and the forward's and simulation's bits do not depend on the
BLAS thread count either (tests/test_threads.py). Large outputs come from
:func:`neurodeploy.memory.reusable_empty`.
"""

from __future__ import annotations

import weakref

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from .memory import reusable_empty


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


def compute_dtype(x: np.ndarray) -> np.dtype:
    """The dtype a kernel computes in for input x: float32 for float32 inputs (the
    ``dtype="float32"`` option), float64 for everything else (the exact reference)."""
    return np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)


# Derived forms of parameter arrays (a conv weight as a GEMM matrix, float32 copies),
# keyed by the array's id and checked against a weak reference to it: computed once per
# array instead of once per call. Parameter arrays are never modified in place (layers
# are frozen records; fine-tuning builds new arrays), so a live entry stays valid.
_DERIVED: dict[tuple, tuple] = {}


def derived(array: np.ndarray, what: str, dtype: np.dtype, make) -> np.ndarray:
    """make() computed once per live ``array`` (and ``what``, ``dtype``), then reused."""
    key = (id(array), what, dtype.str)
    entry = _DERIVED.get(key)
    if entry is not None and entry[0]() is array:
        return entry[1]
    value = make()
    try:
        ref = weakref.ref(array, lambda _, key=key, cache=_DERIVED: cache.pop(key, None))
    except TypeError:  # not weak-referenceable: no caching
        return value
    _DERIVED[key] = (ref, value)
    return value


def param_as(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A parameter array in the compute dtype (the array itself when it already is)."""
    if array.dtype == dtype:
        return array
    return derived(array, "cast", np.dtype(dtype), lambda: array.astype(dtype))


def _gemm_matrix(weight: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Conv weight (O, C, k, k) as the (k*k*C, O) matrix of channels-last patches
    (rows in (kh, kw, c) order), C-contiguous."""
    def make():
        o = weight.shape[0]
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, o), dtype=dtype)

    return derived(weight, "gemm", np.dtype(dtype), make)


def channels_last(x: np.ndarray) -> bool:
    """True when the image batch x (N, C, H, W) lies channels-last in memory (a
    transposed view of an (N, H, W, C) buffer: what :func:`conv2d` returns)."""
    return x.ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous


def _padded_channels_last(
    x: np.ndarray, padding: int, dtype, fill: float = 0.0, out: np.ndarray | None = None,
    prepare=None,
) -> np.ndarray:
    """x (N, C, H, W) as a C-contiguous (N, H + 2p, W + 2p, C) buffer of ``dtype``,
    border filled with ``fill``: one copy (a plain copy when x is channels-last).
    out: a buffer of that shape and dtype to fill instead of a new one.
    prepare(src, dst): an elementwise map written from src (an (N, H, W, C) view of x)
    into dst (the buffer's interior) in place of the copy (see :func:`conv2d`)."""
    n, c, h, w = x.shape
    nhwc = x.transpose(0, 2, 3, 1)
    if not padding and out is None and prepare is None:
        return np.ascontiguousarray(nhwc, dtype=dtype)
    if out is None:
        out = np.empty((n, h + 2 * padding, w + 2 * padding, c), dtype)
    if padding:
        out[:, :padding] = fill
        out[:, h + padding :] = fill
        out[:, padding : h + padding, :padding] = fill
        out[:, padding : h + padding, w + padding :] = fill
    interior = out[:, padding : h + padding, padding : w + padding] if padding else out
    if prepare is None:
        np.copyto(interior, nhwc)
    else:
        prepare(nhwc, interior)
    return out


def _padded_channels_last_on(x: np.ndarray, padding: int, dtype, prepare, width: int):
    """:func:`_padded_channels_last` of x (prepared), made in blocks of samples (about
    _BLOCK_BYTES each) on ``width`` block workers (neurodeploy.threads)."""
    from . import threads

    n, c, h, w = x.shape
    out = reusable_empty((n, h + 2 * padding, w + 2 * padding, c), dtype)
    per = max(1, _BLOCK_BYTES // max(1, out[0].nbytes))

    def block(index: int) -> None:
        lo = index * per
        _padded_channels_last(x[lo : lo + per], padding, dtype, out=out[lo : lo + per],
                              prepare=prepare)

    threads.run_blocks(-(-n // per), block, width)
    return out


# Bytes of a block's im2col rows and output rows together: a block is gathered,
# multiplied and finished on one core while it is in that core's 2 MiB L2 cache, so the
# im2col never goes to memory (and never exists whole: VGG-16's first layers' would be
# 231 MB per image). At least _MIN_BLOCK_ROWS rows, so that every GEMM is large enough
# to run at BLAS speed. Measured on ResNet-50 at 224x224, batch 2, float64, interleaved
# (2026-12-05): 1-3 MiB and 128-256 rows within 2 % of each other; 4 MiB of im2col rows
# alone (the output not counted) 5-7 % slower.
_BLOCK_BYTES = 2 << 20
_MIN_BLOCK_ROWS = 256


# Input channels from which a gathering prepare (see :func:`conv2d`) writes the im2col
# rows itself: with fewer (a 3-channel image) its inner loop is too short and numpy's
# padded copy + window copy is faster (measured on ResNet-50's layer shapes, one image,
# 2026-12-02: the 7x7 stem on 224x224 2.2 vs 1.2 ms; 3x3 layers of 64-512 channels
# 1.0-2.4x faster than numpy's copies).
_GATHER_MIN_CHANNELS = 16


# Output elements per call of a convolution's ``finish`` (see :func:`conv2d`): 1 MiB of
# float64, about a block's output (_BLOCK_BYTES), so most blocks are finished in one
# call (each call costs ~10 us of Python around its compiled passes).
FINISH_ELEMENTS = 1 << 17


def neuron_rows(key: np.ndarray, what: str, dtype, values) -> np.ndarray:
    """A per-neuron operand of a conv's output (values() broadcastable to (O, Ho, Wo)),
    computed once per live ``key`` (see :func:`derived`): a C-contiguous (1, O) row when
    it is the same at every position (per channel), else the (Ho Wo, O) channels-last
    rows. :func:`rows_part` takes the part that meets a block's rows."""
    dtype = np.dtype(dtype)

    def make():
        v = np.asarray(values(), dtype=dtype)
        v = v.reshape(v.shape[0], 1, 1) if v.ndim == 1 else v
        per_channel = v.reshape(v.shape[0], -1)
        rows = per_channel[:, :1].T if np.all(per_channel == per_channel[:, :1]) else (
            v.transpose(1, 2, 0).reshape(-1, v.shape[0]))
        return np.array(rows, order="C")  # a writeable copy (a model's arrays may be read-only)

    return derived(key, f"{what} neuron rows", dtype, make)


def rows_part(operand: np.ndarray, rows: slice) -> np.ndarray:
    """The rows of a :func:`neuron_rows` operand that meet output positions ``rows``."""
    return operand if operand.shape[0] == 1 else operand[rows]


def flat_channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) as an (N, H W, C) array, the layout of a finish block: a view when x
    lies channels-last (see :func:`channels_last`), else a copy."""
    n, c = x.shape[:2]
    return x.transpose(0, 2, 3, 1).reshape(n, -1, c)


def _finish_blocks(finish, block: np.ndarray, first: int, row0: int) -> None:
    """finish(...) over (b, r, O) ``block`` (samples first.., rows row0..) in sub-blocks
    of about FINISH_ELEMENTS: whole samples when a sample is small, else row ranges."""
    b, r, o = block.shape
    sample = r * o
    if b * sample <= FINISH_ELEMENTS:
        finish(block, slice(first, first + b), slice(row0, row0 + r))
    elif sample <= FINISH_ELEMENTS:
        per = FINISH_ELEMENTS // sample
        for s in range(0, b, per):
            finish(block[s : s + per], slice(first + s, first + min(b, s + per)),
                   slice(row0, row0 + r))
    else:
        step = max(1, FINISH_ELEMENTS // o)
        for s in range(b):
            for q in range(0, r, step):
                finish(block[s : s + 1, q : q + step], slice(first + s, first + s + 1),
                       slice(row0 + q, row0 + min(r, q + step)))


def _conv2d_gemm(
    x: np.ndarray, weight: np.ndarray, stride: int, padding: int, prepare=None, finish=None
) -> np.ndarray:
    """Ungrouped convolution as blocked channels-last im2col + GEMM; returns a
    channels-last (N, O, Ho, Wo) view (see :func:`channels_last`). prepare, finish: as
    :func:`conv2d` takes them.

    The output is computed in blocks of whole samples (small maps) or of output lines of
    one sample (large maps, the same lines in every sample), each block's im2col written
    into a cache-sized buffer and at once multiplied and finished: on the threads
    :func:`neurodeploy.threads.block_workers` allows, every product on one BLAS thread, so
    a block is computed in one core's cache and its bits depend neither on the batch nor
    on the thread count."""
    from . import threads

    dtype = compute_dtype(x)
    n, c, h, w = x.shape
    out_ch, _, k, _ = weight.shape
    ho = conv_output_size(h, k, stride, padding)
    wo = conv_output_size(w, k, stride, padding)
    matrix = _gemm_matrix(weight, dtype)
    out = reusable_empty((n, ho, wo, out_ch), dtype)
    flat_out = out.reshape(n, ho * wo, out_ch)
    columns = k * k * c
    block_rows = max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // ((columns + out_ch) * dtype.itemsize))
    sample_rows = ho * wo
    source_ok = channels_last(x) and x.dtype == dtype  # x's own memory can be read as is
    # Where each block's rows come from:
    # - "rows": a pointwise conv's input is its own im2col (x itself, or its prepared copy);
    # - "staged": a pointwise conv's input prepared block by block into the buffer;
    # - "gather": the windows gathered from a channels-last source straight into the
    #   buffer (kernels.gather_windows; a prepare's gather writes its map of them);
    # - "windows": the windows copied from a padded channels-last copy of x (few channels,
    #   where the gather's inner loop is too short: a 3-channel image).
    with threads.block_workers() as width:

        def copy(pad: int) -> np.ndarray:
            """x (prepared) as a channels-last copy padded by pad, on the workers."""
            return _padded_channels_last_on(x, pad, dtype, prepare, width)

        if k == 1 and stride == 1 and padding == 0:
            mode = "staged" if prepare is not None and source_ok else "rows"
            if mode == "staged" or (prepare is None and source_ok):
                source = x.transpose(0, 2, 3, 1).reshape(n, h * w, c)  # a view
            else:
                source = copy(0).reshape(n, h * w, c)
        elif c >= _GATHER_MIN_CHANNELS:
            mode = "gather"
            gather = getattr(prepare, "gather", None) if source_ok else None
            if gather is None:
                from . import kernels  # numba: imported where a convolution gathers

                if source_ok and prepare is None:
                    source = x.transpose(0, 2, 3, 1)  # (N, H, W, C), C-contiguous: a view
                else:  # x (prepared) as a channels-last copy, then gathered as it is
                    source = copy(0)
                zero = dtype.type(0)

                def gather(src, cols, *where):
                    kernels.gather_windows(src, cols, *where, zero, False)
            else:
                source = x.transpose(0, 2, 3, 1)
        else:
            mode = "windows"
            padded = copy(padding)
            sn, sh, sw, sc = padded.strides
            source = as_strided(
                padded, (n, ho, wo, k, k, c), (sn, sh * stride, sw * stride, sh, sw, sc),
                writeable=False,
            )
        lines = ho if sample_rows <= block_rows else max(1, block_rows // wo)
        per = max(1, block_rows // sample_rows) if lines == ho else 1  # samples per block
        if lines == ho and width > 1:  # blocks enough for every thread (a product per
            per = min(per, -(-n // (2 * width)))  # sample: any grouping, the same bits)

        def run(index: int) -> None:
            """Block ``index``: samples s0 .. s0 + b, output lines r0 .. r1 (all when the
            block holds whole samples)."""
            if lines == ho:
                s0, r0, r1 = index * per, 0, ho
                b = min(per, n - s0)
            else:
                s0, part = divmod(index, -(-ho // lines))
                r0, r1, b = part * lines, min(ho, (part + 1) * lines), 1
            rows = slice(r0 * wo, r1 * wo)
            into = flat_out[s0 : s0 + b, rows]
            if mode == "rows":
                cols = source[s0 : s0 + b, rows]
            else:
                cols = threads.scratch("im2col", into.shape[0] * into.shape[1] * columns,
                                       dtype).reshape(b, into.shape[1], columns)
                if mode == "staged":
                    prepare(source[s0 : s0 + b, rows], cols)
                elif mode == "gather":
                    gather(source, cols.reshape(-1, columns), s0, r0, r1 - r0, k, stride,
                           padding, wo)
                else:
                    np.copyto(cols.reshape(b, r1 - r0, wo, k, k, c),
                              source[s0 : s0 + b, r0:r1])
            np.matmul(cols, matrix, out=into)
            if finish is not None:
                _finish_blocks(finish, into, s0, r0 * wo)

        blocks = -(-n // per) if lines == ho else n * -(-ho // lines)
        threads.run_blocks(blocks, run, width)
    return out.transpose(0, 3, 1, 2)


def conv2d(
    x: np.ndarray, weight: np.ndarray, stride: int = 1, padding: int = 0, groups: int = 1,
    prepare=None, finish=None,
) -> np.ndarray:
    """Cross-correlation without bias, as in PyTorch/ONNX Conv.

    x: (N, C, H, W); weight: (O, C / groups, k, k). Returns (N, O, Ho, Wo). Zero
    padding. With groups > 1, input channels [g C/G, (g+1) C/G) feed output
    channels [g O/G, (g+1) O/G) only (depthwise: groups = C). Computes in
    :func:`compute_dtype` of x; ungrouped convolutions return channels-last views.

    Ungrouped convolutions only, elementwise maps fused into the kernel's own passes
    (what a simulator does to a layer's input and output, without passes of their own
    over whole maps):
    prepare(src, dst): writes f(src) into dst, an elementwise map of the input (src an
    (n, H, W, C) view of x, dst the same shape): the convolution reads f(x), not x. A
    prepare with a method gather(src, cols, sample0, line0, lines, k, stride, padding, wo)
    may be asked instead to write f of the windows straight into im2col rows cols (rows,
    k k C) from src, the (N, H, W, C) view of a channels-last x, 0 outside the image
    (``kernels.gather_windows`` has the layout), when x has at least
    _GATHER_MIN_CHANNELS channels.
    finish(block, samples, rows): called on every block of the output as soon as its
    product is in (still in cache), in order; block is an (n, r, O) channels-last view of
    the output (samples ``samples``, flattened output positions ``rows``), which it may
    overwrite elementwise. The blocks depend on the layer alone, not on the batch.
    """
    out_ch, c_per_group, k, _ = weight.shape
    if groups == 1:
        return _conv2d_gemm(x, weight, stride, padding, prepare, finish)
    if prepare is not None or finish is not None:
        raise ValueError("conv2d: prepare and finish need an ungrouped convolution")
    if c_per_group == 1:
        return _depthwise_conv2d(x, weight, stride, padding)
    ho = conv_output_size(x.shape[2], k, stride, padding)
    wo = conv_output_size(x.shape[3], k, stride, padding)
    if ho * wo >= _GROUP_LOOP_MIN_ROWS:  # large products: one per group (and sample)
        c_in, o_per = x.shape[1] // groups, out_ch // groups
        parts = [
            conv2d(x[:, g * c_in : (g + 1) * c_in], weight[g * o_per : (g + 1) * o_per],
                   stride, padding)
            for g in range(groups)
        ]
        return np.concatenate(parts, axis=1)
    # Small products: one im2col, whose columns are group-major, so each group of each
    # sample is one slice of a batched product (N, G, Ho Wo, r) @ (G, r, O/G).
    cols, ho, wo = im2col(x, k, stride, padding)
    n, r = x.shape[0], c_per_group * k * k
    per_group = cols.reshape(n, ho * wo, groups, r).transpose(0, 2, 1, 3)
    w = param_as(weight, compute_dtype(x)).reshape(groups, out_ch // groups, r)
    out = np.matmul(per_group, w.transpose(0, 2, 1))  # (N, G, Ho Wo, O/G)
    return out.transpose(0, 2, 1, 3).reshape(n, ho, wo, out_ch).transpose(0, 3, 1, 2)


# Patch rows of one sample (Ho Wo) from which a grouped conv's per-group products are
# large enough that one BLAS product per group (cache-sized im2cols) beats one batched
# product: below it the batched product is ~3x faster (1 image, 64 groups), above it
# 1.1-1.5x slower (benchmarks/bench_ops.py). Per sample, not per batch: the two paths
# sum in different orders, so the choice must not depend on the batch.
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
    dtype = compute_dtype(x)
    if k == 1 and not padding and out_ch == x.shape[1]:
        # a per-channel scale (a residual net's identity shortcut): one pass in x's own
        # memory layout (channels-last after a GEMM conv), no per-channel strided blocks
        scale = param_as(weight, dtype)[:, 0, 0, 0]
        return np.multiply(x[:, :, ::stride, ::stride], scale[:, None, None], dtype=dtype)
    x = _pad_spatial(x, padding, 0.0)
    if out_ch != x.shape[1]:  # channel multiplier: output channel o reads input o // m
        x = np.repeat(x, out_ch // x.shape[1], axis=1)
    n, _, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.zeros((n, out_ch, ho, wo), dtype)
    taps = param_as(weight, dtype)[:, 0]
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


def _pool(x: np.ndarray, kernel: int, stride: int, padding: int, fill: float, reduce):
    """Reduce (np.maximum, np.minimum, np.add) over the k x k windows of x (N, C, H, W),
    padded with ``fill``: k*k passes of one vectorised ufunc over strided taps (no
    multi-axis reduction over tiny window axes). Keeps the memory layout of x: a
    channels-last input (what :func:`conv2d` returns) gives a channels-last output."""
    n, c, h, w = x.shape
    ho = conv_output_size(h, kernel, stride, padding)
    wo = conv_output_size(w, kernel, stride, padding)
    dtype = x.dtype if x.dtype.kind in "fiu" else np.dtype(np.int64)
    last = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    if padding or channels_last(x):
        src = _padded_channels_last(x, padding, dtype, fill)
        out = np.empty((n, ho, wo, c), dtype)

        def tap(i, j):
            return src[:, i : i + last[0] : stride, j : j + last[1] : stride]

        result = out.transpose(0, 3, 1, 2)
    else:
        src = x
        out = result = np.empty((n, c, ho, wo), dtype)

        def tap(i, j):
            return src[:, :, i : i + last[0] : stride, j : j + last[1] : stride]

    np.copyto(out, tap(0, 0))
    for i in range(kernel):
        for j in range(kernel):
            if i or j:
                reduce(out, tap(i, j), out=out)
    return result


def maxpool2d(x: np.ndarray, kernel: int, stride: int, padding: int = 0) -> np.ndarray:
    """Max over k x k windows of x (N, C, H, W); padded positions never win (-inf)."""
    return _pool(x, kernel, stride, padding, -np.inf, np.maximum)


def minpool2d(x: np.ndarray, kernel: int, stride: int, padding: int = 0) -> np.ndarray:
    """Min over k x k windows of x (N, C, H, W); padded positions never win (+inf)."""
    return _pool(x, kernel, stride, padding, np.inf, np.minimum)


def pool_counts(size: tuple[int, int], kernel: int, stride: int, padding: int) -> np.ndarray:
    """Input positions inside each k x k window (Ho, Wo) of an H x W map (size) padded by
    ``padding``: k*k in the interior, fewer at the borders."""
    ones = np.ones((1, 1, *size))
    return _windows(_pad_spatial(ones, padding, 0.0), kernel, stride).sum(axis=(4, 5))[0, 0]


def sumpool2d(x: np.ndarray, kernel: int, stride: int, padding: int = 0) -> np.ndarray:
    """Sum over k x k windows of x (N, C, H, W) with zero padding; exact on integers
    (below 2^53), unlike k^2 times the mean."""
    return _pool(x, kernel, stride, padding, 0.0, np.add)


def avgpool2d(
    x: np.ndarray, kernel: int, stride: int, padding: int = 0, count_include_pad: bool = True
) -> np.ndarray:
    """Mean over k x k windows of x (N, C, H, W) with zero padding.

    count_include_pad: divide by k*k (PyTorch's default) or by the number of
    positions of each window that lie inside the input.
    """
    total = _pool(x if x.dtype.kind == "f" else x.astype(np.float64), kernel, stride, padding,
                  0.0, np.add)
    if count_include_pad or not padding:
        total /= kernel * kernel
        return total
    total /= pool_counts(x.shape[2:], kernel, stride, padding).astype(total.dtype)
    return total


# Rows per BLAS call of a row-invariant product. OpenBLAS computes a product's rows in
# micro-tiles of a few rows (4 in its Haswell dgemm and dgemv kernels, 16 in its SkylakeX
# dgemm) and the rows left over in other kernels, with another order of additions
# (measured: 57228 of the 540 x 128 elements of a 540x64 @ 64x128 product differ when it
# runs one row at a time). Products of exactly 8 rows give every row the same bits at
# any of the 8 positions (600 random shapes, float32 and float64, 1 and 2 threads, on a
# Xeon whose products of 8 + 8j rows do not: there 571 of 1195 rows of products of up
# to 700 rows differed from the same row in an 8-row product).
ROW_BLOCK = 8


def rows_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a (..., M, K) @ b (..., K, O), each output row the same bits whatever M is and
    wherever the row sits (at a fixed BLAS thread count): the rows go to BLAS in
    products of exactly ROW_BLOCK rows (a batched matmul: one BLAS call per block), the
    last M mod ROW_BLOCK rows padded with zero rows to a block of their own. So a batch
    run in chunks of any size gives the bits of one unchunked run. out: where to write
    the (..., M, O) result (a view with rows of unit stride will do)."""
    m, k = a.shape[-2:]
    o = b.shape[-1]
    full, rest = m - m % ROW_BLOCK, m % ROW_BLOCK
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if out is None:
        out = np.empty((*lead, m, o), np.result_type(a.dtype, b.dtype))
    per_block = b[..., None, :, :]  # every block meets the same b
    if full:  # views split the row axis into blocks (no copy of a, none of out)
        blocks = a[..., :full, :].reshape(*a.shape[:-2], full // ROW_BLOCK, ROW_BLOCK, k)
        into = out[..., :full, :].view()
        into.shape = (*lead, full // ROW_BLOCK, ROW_BLOCK, o)  # raises rather than copy
        np.matmul(blocks, per_block, out=into)
    if rest:
        tail = np.zeros((*a.shape[:-2], 1, ROW_BLOCK, k), a.dtype)
        tail[..., 0, :rest, :] = a[..., full:, :]
        out[..., full:, :] = np.matmul(tail, per_block)[..., 0, :rest, :]
    return out


# Output columns per product of a large dense layer (:func:`dense`), computed on the block
# workers (neurodeploy.threads), each on one BLAS thread: so the product's bits depend on
# the layer alone, not on the thread count, and no multi-threaded BLAS call is left
# spinning (OpenBLAS's threads spin about 0.1 s of CPU after each such call, taking a
# core from the next block workers). Products smaller than _DENSE_BLOCKED_MIN weights
# (K O) run as one: OpenBLAS runs a product of 8 rows below 65536 * 4 multiply-adds
# (SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD in its interface/gemm.c) in one thread.
_DENSE_COLUMNS = 256
_DENSE_BLOCKED_MIN = 65536 * 4 // ROW_BLOCK


def dense_in_blocks(weight: np.ndarray) -> bool:
    """Whether :func:`dense` multiplies by ``weight`` (F_out, F_in) in column blocks on
    the block workers."""
    return weight.size >= _DENSE_BLOCKED_MIN


def dense(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (N, F_in) @ weight.T, weight (F_out, F_in). Returns (N, F_out), in products of
    exactly ROW_BLOCK samples (:func:`rows_matmul`; see the module docstring), and of
    _DENSE_COLUMNS outputs for large layers."""
    from . import threads

    x = np.ascontiguousarray(x)
    matrix = weight.T
    o = weight.shape[0]
    if not dense_in_blocks(weight):
        return rows_matmul(x, matrix)
    out = reusable_empty((x.shape[0], o), np.result_type(x.dtype, weight.dtype))

    def run(index: int) -> None:
        cols = slice(index * _DENSE_COLUMNS, (index + 1) * _DENSE_COLUMNS)
        rows_matmul(x, matrix[:, cols], out=out[:, cols])

    with threads.block_workers() as width:
        threads.run_blocks(-(-o // _DENSE_COLUMNS), run, width)
    return out


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
