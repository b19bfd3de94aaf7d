"""Lowering of a layer program's synapses onto Lava's own connection processes.

``LavaDeployment(..., synapses="lava")`` runs every synapse group (a layer's own and
each shortcut group) on ``lava.proc.dense.process.Dense`` or
``lava.proc.sparse.process.Sparse`` with their bit-accurate models
(PyDenseModelBitAcc / PySparseModelBitAcc, tag ``fixed_pt``) instead of our batched
:class:`~neurodeploy.lava.process.Synapses`.

Lowering: a group's linear ops (flatten, sum pools with their integer
multiplicities, then one dense or conv op holding integer mantissas) are composed
into one matrix M (outputs x inputs) on the flattened (C, H, W) C-order vectors the
processes exchange, so no layout conversion is needed: Flatten is the identity, a
sum pool and a convolution (zero padding, stride, groups) are sparse matrices built
here, Dense is its weight. M has integer entries (sums of mantissas); it equals the
op chain on every input (tested against ``apply_synapses`` and Lava's own
``lava.proc.conv.utils.conv_to_sparse``). A group of a plain dense op (with or
without a flatten) runs on Lava's Dense, every other on Lava's Sparse.

Why not ``lava.proc.conv.process.Conv``: lava-nc 0.10's PyConvModelFixed
(lava/proc/conv/models.py) never applies its ``weight_exp`` and clamps its sum to 24
bits instead of Loihi's 16-bit dendritic register, so it cannot hold Loihi's weight
format; Sparse applies the mantissa clip, truncation and weight exponent exactly as
Dense does (lava/proc/sparse/models.py, AbstractPySparseModelBitAcc).

Formats: entry m enters as m 2^(8 - bits + 1) in mixed sign mode with
``num_weight_bits`` = bits and the group's ``weight_exp`` (0..7), as the emulator
holds it (neurodeploy/backends/emulator.py). An entry of M that sums several
mantissas (overlapping pool windows, a count_include_pad=False multiplicity) can
exceed the signed ``bits`` range; M is then split into parts M = M_1 + ... + M_P,
each within the range (greedily: part p takes what remains, clipped), each its own
Sparse process into the same neurons, whose input port sums them in the step they
arrive, as Loihi's dendrite sums several synapses between the same pair. The sum is
the same integer, so the 16-bit wrap and its overflow count are the emulator's.
Spikes are binary (``num_message_bits`` 0): a TTFS spike carries its value in its
time, so no graded spikes are needed.

A part whose largest per-step sum could leave the int32 of Lava's ``a_buff`` (it
would wrap before our 16-bit dendrite sees it, uncounted) is a DeployError naming
the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import DeployError
from ..network import Conv2d, Dense, Flatten
from .common import SumPool2d
from .emulator import LOIHI_MIXED_SIGN_SHIFT

# Lava's Dense and Sparse bit-accurate models hold their weights as 8-bit fields
# (clip_weights(num_bits=8), lava/utils/weightutils.py) and accumulate in int32
# (a_buff: np.int32, lava/proc/{dense,sparse}/models.py).
LAVA_WEIGHT_FIELD_BITS = 8
LAVA_ACCUMULATOR_BITS = 32


def op_matrix(op, input_shape: tuple) -> sp.csr_matrix:
    """One linear op as a sparse matrix (outputs x inputs) on C-order flattened vectors;
    input_shape: the op's (C, H, W) or (F,) input. DeployError for any other op."""
    n_in = int(np.prod(input_shape))
    if isinstance(op, Flatten):
        return sp.identity(n_in, format="csr")
    if isinstance(op, Dense):
        return sp.csr_matrix(op.weight)
    if isinstance(op, SumPool2d):
        c, h, w = input_shape
        _, ho, wo = op.output_shape(input_shape)
        rows, cols = _window_indices(ho, wo, op.kernel, op.stride, op.padding)
        values = np.ones((1, 1, 1, 1, 1))
        if op.multiplicity is not None:  # (Ho, Wo) per window
            values = op.multiplicity.reshape(1, ho, wo, 1, 1)
        # axes (C, Ho, Wo, k, k)
        channel = np.arange(c).reshape(c, 1, 1, 1, 1)
        out_index = (channel * ho + np.arange(ho).reshape(1, ho, 1, 1, 1)) * wo
        out_index = out_index + np.arange(wo).reshape(1, 1, wo, 1, 1)
        in_index = (channel * h + rows) * w + cols
        return _csr(out_index, in_index, values, rows, cols, h, w, (c * ho * wo, n_in))
    if isinstance(op, Conv2d):
        c, h, w = input_shape
        o, ho, wo = op.output_shape(input_shape)
        per_group_in, per_group_out = op.weight.shape[1], o // op.groups
        rows, cols = _window_indices(ho, wo, op.kernel, op.stride, op.padding)
        # axes (O, C/G, Ho, Wo, k, k)
        rows, cols = rows[:, None], cols[:, None]
        out_channel = np.arange(o).reshape(o, 1, 1, 1, 1, 1)
        in_channel = (out_channel // per_group_out) * per_group_in + np.arange(
            per_group_in
        ).reshape(1, per_group_in, 1, 1, 1, 1)
        shape = (o, per_group_in, ho, wo, op.kernel, op.kernel)
        out_index = (out_channel * ho + np.arange(ho).reshape(1, 1, ho, 1, 1, 1)) * wo
        out_index = np.broadcast_to(out_index + np.arange(wo).reshape(1, 1, 1, wo, 1, 1), shape)
        in_index = (in_channel * h + rows) * w + cols
        values = np.broadcast_to(op.weight[:, :, None, None, :, :], shape)
        return _csr(out_index, in_index, values, rows, cols, h, w, (o * ho * wo, n_in))
    raise DeployError(
        f"layer '{op.name}' ({type(op).__name__}): no lowering onto Lava's Dense/Sparse "
        "(flatten, sum pool, dense and conv only)"
    )


def _window_indices(ho, wo, kernel, stride, padding):
    """Input row and column (1, Ho, Wo, k, k) of every window position (may lie in the
    zero padding: outside [0, H) x [0, W))."""
    ky = np.arange(kernel)
    rows = np.arange(ho)[:, None, None, None] * stride + ky[None, None, :, None] - padding
    cols = np.arange(wo)[None, :, None, None] * stride + ky[None, None, None, :] - padding
    shape = (1, ho, wo, kernel, kernel)
    return np.broadcast_to(rows[None], shape), np.broadcast_to(cols[None], shape)


def _csr(out_index, in_index, values, rows, cols, h, w, shape) -> sp.csr_matrix:
    full = np.broadcast_shapes(out_index.shape, in_index.shape, values.shape)
    inside = np.broadcast_to((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w), full)
    pick = inside & (np.broadcast_to(values, full) != 0)
    matrix = sp.coo_matrix(
        (
            np.broadcast_to(values, full)[pick],
            (np.broadcast_to(out_index, full)[pick], np.broadcast_to(in_index, full)[pick]),
        ),
        shape=shape,
    )
    return matrix.tocsr()  # duplicates (none arise here) would be summed


def composed_matrix(ops: tuple, input_shape: tuple) -> sp.csr_matrix:
    """The whole op chain as one sparse matrix (outputs x inputs): M x = ops(x) for the
    C-order flattened x of shape input_shape."""
    matrix = None
    shape = tuple(input_shape)
    for op in ops:
        step = op_matrix(op, shape)
        matrix = step if matrix is None else (step @ matrix).tocsr()
        shape = op.output_shape(shape)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def split_parts(matrix: sp.csr_matrix, bits: int) -> list[sp.csr_matrix]:
    """Integer matrix -> parts, each with entries in the signed ``bits`` range
    [-2^(bits-1), 2^(bits-1) - 1], that sum to it: part p takes what the earlier parts
    left, clipped to the range (a matrix within the range is its own one part)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    remaining = matrix.tocsr(copy=True)
    parts = []
    while True:
        part = remaining.copy()
        part.data = np.clip(part.data, low, high)
        part.eliminate_zeros()
        parts.append(part)
        remaining = (remaining - part).tocsr()
        remaining.eliminate_zeros()
        if remaining.nnz == 0:
            return parts


@dataclass(frozen=True)
class LoweredGroup:
    """One synapse group on Lava's processes: ``parts`` (Lava weights: mantissa x
    2^(8 - bits + 1), outputs x inputs, int32), one process each; ``dense``: run on
    Lava's Dense (else Sparse); ``source``: None for the layer's own group, else the
    shortcut's source stage; ``delay_steps``: the emulator's delay of a shortcut group
    (whole windows x K; 0 for the layer's own group)."""

    layer: str
    source: str | None
    parts: tuple
    weight_exp: int
    bits: int
    dense: bool
    delay_steps: int = 0


def lower_group(
    layer: str,
    ops: tuple,
    input_shape: tuple,
    scale: int,
    weight_exp: int,
    bits: int,
    source: str | None = None,
    delay_steps: int = 0,
) -> LoweredGroup:
    """Lower one group whose affine op holds w = m 2^scale (m integer mantissas)."""
    *linear, affine = ops
    mantissa_ops = (*linear, _with_weight(affine, affine.weight / 2.0**scale))
    matrix = composed_matrix(mantissa_ops, input_shape)
    if not np.array_equal(matrix.data, np.rint(matrix.data)):  # pragma: no cover - programs
        raise DeployError(f"layer '{layer}': its synapses are not integer mantissas")
    to_lava = 2 ** (LAVA_WEIGHT_FIELD_BITS - bits + LOIHI_MIXED_SIGN_SHIFT)
    parts = []
    for part in split_parts(matrix, bits):
        lava = part.astype(np.int64) * to_lava
        worst = float(np.abs(lava).sum(axis=1).max()) * 2.0**weight_exp if lava.nnz else 0.0
        if worst >= 2 ** (LAVA_ACCUMULATOR_BITS - 1):
            raise DeployError(
                f"layer '{layer}': a neuron's synapses from '{source or 'its input'}' can sum "
                f"to {worst:.0f} in one step, beyond the int32 accumulator of Lava's "
                "Dense/Sparse (it would wrap before the 16-bit dendrite counts it)"
            )
        parts.append(lava.astype(np.int32))
    dense = all(isinstance(op, (Flatten, Dense)) for op in ops) and len(parts) == 1
    return LoweredGroup(layer, source, tuple(parts), weight_exp, bits, dense, delay_steps)


def _with_weight(op, weight):
    from dataclasses import replace

    return replace(op, weight=weight, bias=np.zeros(weight.shape[0]))


def lower_layer(stage, program) -> tuple[LoweredGroup, ...]:
    """The layer's own group, then one per shortcut group (aligned with
    ``program.shortcuts``). program: a Loihi-format LayerProgram
    (neurodeploy.backends.emulator), whose weights are m 2^s with
    s = weight_exp + min_shift."""
    min_shift = program.shift - program.weight_exp  # loihi_weight_shift(bits) = 15 - bits
    bits = 15 - min_shift
    groups = [
        lower_group(
            stage.name, program.synapses, stage.input_shape, program.shift, program.weight_exp, bits
        )
    ]
    for shortcut, sc in zip(stage.shortcuts, program.shortcuts, strict=True):
        groups.append(
            lower_group(
                stage.name,
                sc.synapses,
                shortcut.input_shape,
                sc.weight_exp + min_shift,
                sc.weight_exp,
                bits,
                shortcut.source,
                sc.delay_steps,
            )
        )
    return tuple(groups)


def build_group(group: LoweredGroup, port, delay: int, error_path):
    """Lava processes of one lowered group fed by ``port`` ((1, N) spikes of its source)
    after ``delay`` steps (a SpikeDelay when > 0); returns the connection processes,
    whose (outputs,) a_out ports drive the layer's neurons. Call after
    ``import_lava_runtime``."""
    from lava.proc.dense.process import Dense as LavaDense
    from lava.proc.sparse.process import Sparse as LavaSparse
    from lava.utils.weightutils import SignMode

    from ..lava.process import SpikeDelay

    n_in = group.parts[0].shape[1]
    if delay:
        held = SpikeDelay(batch=1, size=n_in, delay=delay, error_path=error_path())
        port.connect(held.s_in)
        port = held.s_out
    processes = []
    for part in group.parts:
        kind, weights = (LavaDense, part.toarray()) if group.dense else (LavaSparse, part)
        process = kind(
            weights=weights,
            weight_exp=group.weight_exp,
            num_weight_bits=group.bits,
            sign_mode=SignMode.MIXED,
        )
        port.reshape((n_in,)).connect(process.s_in)
        processes.append(process)
    return processes
