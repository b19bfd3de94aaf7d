"""Reference simulator: float64, continuous time, vectorised over the batch.

Spike times follow from the neuron dynamics of each model:

- b1: during [t_min_prev, t_min] the membrane integrates
  dV/dt = sum_j W_ij H(t - t_j), so V(t_min) = sum_j W_ij (t_min - t_j) over
  the inputs that spiked; from t_min it rises with slope 1 and fires when it
  reaches theta_i, at t_i = t_min + theta_i - V(t_min) if that is before t_max.
  A neuron already above threshold at t_min fires at t_min (saturation).
- alpha1: dV/dt = alpha H(t - t_min_prev) + sum_j J_ij H(t - t_j) from
  t_min_prev, J_ij = g_i W_ij, a piecewise linear trajectory; a closed form once
  every input is in, a bound that rules out earlier crossings, and an exact
  sweep over the input times only where the bound does not (:func:`_alpha1_layer`).
  A neuron that has not fired by t_max is made to fire at t_max.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import ops, threads
from .errors import UsageError
from .memory import chunk_samples, chunks, reusable_empty
from .network import Conv2d, compute_dtype_of
from .trace import Trace
from .ttfs import INPUT_WINDOW, OutputLayer, SpikingLayer, TimePool, TTFSNetwork, apply_synapses

# Bound on the elements of the (kink times, *input_shape) ramps one alpha1 sweep chunk
# pushes through a layer's maps (32 MB of float64).
_ALPHA1_CHUNK_ELEMENTS = 4_000_000


def encode_input(snn: TTFSNetwork, x, dtype="float64") -> tuple[np.ndarray, int]:
    """Spike times (N, *input_shape) of raw inputs, and how many lay outside [p, q].

    x in [p, q] is rescaled to [0, 1] and encoded as t = 1 - x (input window
    [0, 1]); b1 sends no spike for 0, alpha1 sends it at t = 1. dtype: of the
    returned times, "float64" (the reference) or "float32".
    """
    net = snn.source
    dt = compute_dtype_of(dtype)
    x = net.check_input(x, dtype=dt) if net is not None else np.asarray(x, dtype=dt)
    p, q = snn.input_range
    outside = 0
    if x.size and (x.min() < p or x.max() > q):
        outside = int(np.count_nonzero((x < p) | (x > q)))
        x = np.clip(x, p, q)
    # Input window [0, 1]: t = 1 - (x - p) / (q - p) = (q - x) / (q - p), two passes.
    t = np.subtract(q, x)
    t *= 1.0 / (q - p)
    if snn.neuron == "b1":
        _silence_from(t, INPUT_WINDOW[1])
    return t, outside


def spike_values(t: np.ndarray, t_end: float, out: np.ndarray | None = None) -> np.ndarray:
    """Values t_end - t of spikes in a window ending at t_end; silent neurons (inf) give 0.
    out: where to write them (may be t itself)."""
    values = np.subtract(t_end, t, out=out)  # inf -> -inf; spikes before t_end give >= 0
    return np.maximum(values, 0.0, out=values)


def _b1_layer(
    layer: SpikingLayer, t_in: np.ndarray, shortcut_in: tuple = (), overwrite: bool = False
) -> tuple:
    """overwrite: t_in is read by nothing else; its values may take its memory.

    Returns (spike times, saturated, early) or, for a convolution layer, also the (N,)
    spike counts (:func:`_b1_conv_layer`)."""
    conv = layer.synapses[0] if len(layer.synapses) == 1 else None
    if isinstance(conv, Conv2d) and conv.groups == 1:
        return _b1_conv_layer(layer, conv, t_in, shortcut_in)
    values = spike_values(t_in, layer.t_min, out=t_in if overwrite else None)
    v = apply_synapses(layer.synapses, values)  # V(t_min)
    v = add_shortcuts(layer, v, shortcut_in)
    return b1_fire(layer, v)


# run_stages may pass overwrite=True when no one else reads the input spike times.
_b1_layer.may_overwrite_input = True


def _b1_conv_layer(
    layer: SpikingLayer, conv: Conv2d, t_in: np.ndarray, shortcut_in: tuple
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """A b1 layer whose synapses are one ungrouped convolution, its elementwise passes
    fused into the convolution's (``ops.conv2d``'s prepare and finish): the input's
    spike values are written straight into the copy the GEMMs read (the padded input or
    a pointwise conv's cache-sized block), and each output block, still in cache, gets
    its shortcuts, fires and is counted; the values never exist as a map. The same
    operations in the same order as :func:`spike_values`, :func:`add_shortcuts` and
    :func:`b1_fire` on whole maps: the same bits. Returns (spike times, saturated, 0,
    (N,) spike counts)."""
    from . import kernels  # numba: imported where a simulation runs

    n = t_in.shape[0]
    t_min, t_max = layer.t_min, layer.t_max
    # Shortcut terms in their order: an identity (a per-channel scale of the source's
    # values, ``_identity_synapse``) is computed block by block from the source's spike
    # times; any other is applied to whole maps first and added block by block.
    adders = []
    dtype = ops.compute_dtype(t_in)
    for shortcut, t_src in zip(layer.shortcuts, shortcut_in, strict=True):
        scale = _identity_scale(shortcut, t_src)
        if scale is not None:
            adders.append((ops.flat_channels_last(t_src), shortcut.t_source, scale))
        else:
            term = values_through(shortcut.synapses, t_src, shortcut.t_source)
            adders.append((ops.flat_channels_last(term), None, None))
    # t_min + theta per neuron: (1, O) per channel or (Ho Wo, O) per position
    fire_at = ops.neuron_rows(layer.threshold, f"b1 fire times {layer.t_min!r}", dtype,
                              lambda: fire_times(layer, dtype))
    # Per thread (the conv's blocks run on several): (N,) spike counts and saturated count.
    tallies: dict[int, list] = {}
    # The last shortcut joins the compiled fire pass (the same sums: the others are added
    # before it by numpy, in their order).
    added_first, last = adders[:-1], (adders[-1] if adders else None)
    if last is not None:
        last = (last[0].reshape(n, -1), *last[1:])  # (N, L) rows: a view
    t_min_as, t_max_as = dtype.type(t_min), dtype.type(t_max)
    channels = conv.weight.shape[0]
    none, zero, no_scale = np.zeros((1, 1), dtype), dtype.type(0), np.zeros(1, dtype)

    def finish(block: np.ndarray, samples: slice, rows: slice) -> None:
        for source, t_source, scale in added_first:
            if t_source is None:  # a whole-map term
                block += source[samples, rows]
                continue
            term = spike_values(source[samples, rows], t_source)
            np.multiply(term, scale, out=term)
            block += term
        fire = ops.rows_part(fire_at, rows)
        tally = tallies.get(threading.get_ident())
        if tally is None:
            tally = tallies[threading.get_ident()] = [np.zeros(n, np.int64), 0]
        counts = tally[0][samples]
        if last is None:
            below = kernels.b1_fire(block, fire, t_min_as, t_max_as, counts,
                                    kernels.NO_SHORTCUT, none, 0, 0, zero, no_scale)
        elif last[1] is None:
            below = kernels.b1_fire(block, fire, t_min_as, t_max_as, counts, kernels.TERM,
                                    last[0], samples.start, rows.start * channels, zero,
                                    no_scale)
        else:
            source, t_source, scale = last
            below = kernels.b1_fire(block, fire, t_min_as, t_max_as, counts,
                                    kernels.IDENTITY, source, samples.start,
                                    rows.start * channels, dtype.type(t_source), scale)
        tally[1] += below

    t_out = ops.conv2d(t_in, conv.weight, conv.stride, conv.padding,
                       prepare=_ValuesMap(t_min), finish=finish)
    counts = sum((tally[0] for tally in tallies.values()), np.zeros(n, np.int64))
    saturated = 0 if layer.clipped else sum(tally[1] for tally in tallies.values())
    return t_out, saturated, 0, counts


def _identity_scale(shortcut, t_src: np.ndarray) -> np.ndarray | None:
    """The (C,) per-channel scale of an identity shortcut (a unit-weight 1x1 depthwise map,
    maybe scaled by a folded batch norm) whose source lies channels-last; else None."""
    if len(shortcut.synapses) != 1 or not ops.channels_last(t_src):
        return None
    op = shortcut.synapses[0]
    if not (isinstance(op, Conv2d) and op.kernel == 1 and op.stride == 1 and not op.padding
            and op.groups == op.weight.shape[0] == t_src.shape[1]):
        return None
    return ops.param_as(op.weight, ops.compute_dtype(t_src))[:, 0, 0, 0]


def fire_times(layer: SpikingLayer, dtype) -> np.ndarray:
    """t_min + theta (output_shape) in ``dtype``: when a b1 neuron whose membrane is v at
    t_min fires (t_min + theta - v). Computed in float64 and rounded once, so a float32
    simulation subtracts in float32 (no mixed-precision passes)."""
    fire_at = layer.t_min + layer.threshold
    return fire_at if np.dtype(dtype) == fire_at.dtype else fire_at.astype(dtype)


def add_shortcuts(layer, v: np.ndarray, shortcut_in: tuple) -> np.ndarray:
    """Add the shortcut synapses' contributions to the membrane v at t_min (in place).

    shortcut_in: spike times of each shortcut's source, aligned with
    ``layer.shortcuts``. A source spike at t arrives at t + delay and adds its
    weight times (t_min - t - delay) = (t_source - t): the source's own value,
    computed as such (one rounding, as the crossbar backend does).
    """
    for shortcut, t_src in zip(layer.shortcuts, shortcut_in, strict=True):
        v += values_through(shortcut.synapses, t_src, shortcut.t_source)
    return v


def values_through(synapses: tuple, t: np.ndarray, t_end: float) -> np.ndarray:
    """apply_synapses(synapses, spike_values(t, t_end)); a single ungrouped convolution
    computes the values as it reads its input (``ops.conv2d``'s prepare: no pass and no
    array of their own)."""
    op = synapses[0] if len(synapses) == 1 else None
    if isinstance(op, Conv2d) and op.groups == 1 and t.ndim == 4:
        return ops.conv2d(t, op.weight, op.stride, op.padding, prepare=_ValuesMap(t_end))
    return apply_synapses(synapses, spike_values(t, t_end))


class _ValuesMap:
    """An ``ops.conv2d`` prepare writing the spike values (:func:`spike_values`) of a window
    ending at t_end, as one compiled pass (``neurodeploy.kernels``, the same bits) where
    source and destination share a dtype; ``gather`` writes them straight into im2col
    rows."""

    def __init__(self, t_end: float):
        from . import kernels  # numba: imported where a simulation runs

        self.t_end = t_end
        self._kernels = kernels

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> None:
        if src.dtype == dst.dtype:
            self._kernels.spike_values_into(src, dst.dtype.type(self.t_end), dst)
        else:
            spike_values(src, self.t_end, out=dst)

    def gather(self, src, cols, *where) -> None:
        """The spike values of src's windows into im2col rows (``kernels.gather_windows``;
        where: sample0, line0, lines, kernel, stride, padding, wo)."""
        self._kernels.gather_windows(src, cols, *where, cols.dtype.type(self.t_end), True)


def b1_fire(layer: SpikingLayer, v: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Spike times of b1 neurons whose membrane is v at t_min (v is overwritten), the
    saturated count and the early count.

    From t_min the membrane rises with slope 1: it reaches theta at
    t_min + theta - v; a neuron already above threshold fires at once (counted
    as saturated, except in a clipped layer, where that is the clip), one that
    would need longer than its window stays silent. A b1 neuron only ramps from
    t_min, so it never fires early: the early count is 0 by construction.
    """
    t_fire = np.subtract(fire_times(layer, v.dtype), v, out=v)
    saturated = 0
    if t_fire.min(initial=np.inf) < layer.t_min:
        if not layer.clipped:
            saturated = int(np.count_nonzero(t_fire < layer.t_min))
        np.maximum(t_fire, layer.t_min, out=t_fire)
    _silence_from(t_fire, layer.t_max)
    return t_fire, saturated, 0


def _silence_from(t: np.ndarray, t_end: float) -> None:
    """Set t to inf (no spike) where t >= t_end > 0, in place.

    Dividing by the 0/1 mask is branch-free: about 3x faster than a masked
    assignment (np.where, copyto) on mixed masks, and exact (t / 1 == t).
    """
    with np.errstate(divide="ignore"):
        np.divide(t, np.less(t, t_end), out=t)


def _alpha1_layer(
    layer: SpikingLayer, t_in: np.ndarray, shortcut_in: tuple = ()
) -> tuple[np.ndarray, int, int]:
    """Spike times (N, *output_shape) of an alpha1 layer, its saturated and early counts.

    The membrane from t0 = t_min_prev is piecewise linear,
    V_i(t) = alpha (t - t0) + g_i sum_j W_ij (t - t_j)_+ (inputs that arrived before t0,
    from a previous layer's early or saturated spikes, have integrated since), and a
    neuron fires at its first crossing of vartheta_i, no earlier than t0; one that has
    not fired by t_max fires at t_max (value 0). Everything runs through the layer's
    own linear maps (a convolution stays one): no dense or (batch, N_in, N_out) array.

    - Once every input is in (t >= t_min = t1): V(t1) = alpha (t1 - t0) + g_i (W x)_i
      with x = t1 - t, then V rises with slope g_i > 0: a closed form.
    - Before t1: max_{t < t1} V_i < alpha (t1 - t0) + g_i (W+ x)_i (module
      ``convert``, "alpha1"). A neuron whose bound stays at or below vartheta_i cannot
      cross before t1 (the converter guarantees it in the calibrated range).
    - Only the samples with a neuron above that bound are swept event by event: V at
      every distinct input time in [t0, t1] (the kinks), in chunks through the layer's
      maps, the crossing solved on its linear segment.

    saturated: fired before t1 with V(t1) > vartheta (its value exceeds the window);
    early: fired before t1 although V(t1) <= vartheta (value in the window).
    """
    if shortcut_in:  # pragma: no cover - convert refuses residual alpha1 networks
        raise NotImplementedError("alpha1 layers take no shortcuts")
    alpha, t0, t1 = layer.alpha, layer.t_min_prev, layer.t_min
    # (vartheta - V's ramp at t1) / g: the drive W x at which a neuron fires at t1, and the
    # bound W+ x may not exceed (B_n - b_i for a converted layer). (output_shape)
    margin = (layer.threshold - alpha * (t1 - t0)) / layer.coupling_scale
    drive, positive_drive = layer.drive_and_positive_drive(spike_values(t_in, t1))
    # After t1 V rises with slope g from V(t1) = alpha (t1 - t0) + g W x, so it reaches
    # vartheta at t1 + margin - W x.
    t_out = np.subtract(t1 + margin, drive)  # contiguous: drive may be a view
    np.minimum(t_out, layer.t_max, out=t_out)
    saturated = int(np.count_nonzero(t_out < t1))  # V(t1) > vartheta: beyond the window
    may_cross = positive_drive > margin
    if not np.count_nonzero(may_cross):
        return t_out, saturated, 0
    n = t_in.shape[0]
    for sample in np.flatnonzero(may_cross.reshape(n, -1).any(axis=1)):
        _alpha1_sweep(layer, t_in[sample], may_cross[sample], t_out[sample])
    # The sweeps only move spikes earlier, to before t1: the new ones there came early.
    early = int(np.count_nonzero(t_out < t1)) - saturated
    return t_out, saturated, early


def _alpha1_sweep(
    layer: SpikingLayer, t_in: np.ndarray, candidates: np.ndarray, t_out: np.ndarray
) -> None:
    """First threshold crossings before t_min of one sample's candidate neurons, exactly.

    t_in: (*input_shape) spike times; candidates: (*output_shape) neurons that may
    cross before t_min; t_out (*output_shape) holds the closed-form times after t_min
    and is overwritten where a neuron crosses earlier. V is linear between
    consecutive distinct input times, so it is evaluated there (through the layer's
    maps on the ramps (tau - t_j)_+, a chunk of times at a time) and the crossing
    solved on the first segment that reaches vartheta.
    """
    alpha, t0, t1 = layer.alpha, layer.t_min_prev, layer.t_min
    g, theta = layer.coupling_scale, layer.threshold
    times = t_in[np.isfinite(t_in)]
    kinks = np.unique(np.concatenate([[t0, t1], np.clip(times, t0, t1)]))
    chunk = max(1, _ALPHA1_CHUNK_ELEMENTS // max(1, t_in.size))
    pending = candidates.copy()
    v_prev = tau_prev = None
    for lo in range(0, kinks.size, chunk):
        tau = kinks[lo : lo + chunk]
        ramps = np.maximum(tau.reshape(-1, *(1,) * t_in.ndim) - t_in[None], 0.0)
        v = apply_synapses(layer.synapses, ramps) * g + alpha * (tau - t0).reshape(
            -1, *(1,) * g.ndim
        )
        for k in range(tau.size):
            reached = pending & (v[k] >= theta)
            if reached.any():
                if v_prev is None:  # above threshold when integration starts
                    t_out[reached] = t0
                else:
                    slope = (v[k] - v_prev) / (tau[k] - tau_prev)
                    t_cross = tau_prev + (theta - v_prev) / np.where(reached, slope, 1.0)
                    t_out[reached] = t_cross[reached]
                pending &= ~reached
                if not pending.any():
                    return
            v_prev, tau_prev = v[k], tau[k]


def time_pool(pool: TimePool, t_in: np.ndarray) -> np.ndarray:
    """Earliest spike per window (latest for sign -1 channels); inf stays silent and
    padded positions never win."""
    if np.all(pool.sign > 0):  # the usual case (max pools after ReLUs): no sign passes
        if ops.channels_last(t_in):  # a conv's output: one compiled pass, the same bits
            from . import kernels

            return kernels.min_pool_channels_last(t_in, pool.kernel, pool.stride, pool.padding)
        return ops.minpool2d(t_in, pool.kernel, pool.stride, pool.padding)
    s = pool.sign.astype(t_in.dtype, copy=False)[None, :, None, None]
    return ops.minpool2d(t_in * s, pool.kernel, pool.stride, pool.padding) * s


def output_potential(layer: OutputLayer, t_in: np.ndarray, shortcut_in: tuple = ()) -> np.ndarray:
    potential = apply_synapses(layer.synapses, spike_values(t_in, layer.t_read))
    potential = add_shortcuts(layer, potential, shortcut_in)
    return (potential + layer.bias).reshape(t_in.shape[0], -1)


def run_stages(
    snn: TTFSNetwork,
    t_input: np.ndarray,
    spiking_layer,
    time_pool,
    output_layer,
    early: dict[str, int] | None = None,
    keep=None,
    spike_counts: dict[str, np.ndarray] | None = None,
):
    """Run every stage in order; the backends supply how each kind of stage computes.

    spiking_layer(stage, t_in, shortcut_in) -> (t_out, saturated neurons),
    (t_out, saturated, early neurons) or (t_out, saturated, early, (N,) spike counts of
    t_out, when the layer counted them itself); time_pool(stage, t_in) -> t_out;
    output_layer(stage, t_in, shortcut_in) -> logits (N, classes). t_in: spike
    times of the stage before; shortcut_in: a tuple with the spike times of each
    of ``stage.shortcuts``' sources (empty for a chain). Spike times are in time
    units with inf for silence. Returns (logits, spike_times, saturated).

    early: filled with the early count of "input" (0: the encoding spikes in its
    window) and of every spiking layer. A two-value callback is a b1 neuron's,
    which ramps from t_min and cannot fire early: its layers count 0.

    keep: names of the stages (and "input") whose spike times the returned dict holds;
    None (the default): every stage. The others are dropped as soon as no later stage
    reads them (a shortcut's source lives until its join). spike_counts: filled with the
    (N,) spike counts of "input" and of every stage with spike times, kept or not.
    """
    stages = snn.stages
    last_read = {"input": 0}  # stage index after which no stage reads a name's spikes
    for i, stage in enumerate(stages):
        for sc in getattr(stage, "shortcuts", ()):
            last_read[sc.source] = i
    spike_times = {}
    saturated = {}
    early = {} if early is None else early
    early["input"] = 0
    output = None

    def record(name: str, times: np.ndarray, index: int, counts=None) -> None:
        if spike_counts is not None:
            spike_counts[name] = counts if counts is not None else count_spikes(times)
        if keep is None or name in keep or last_read.get(name, -1) > index:
            spike_times[name] = times

    record("input", t_input, 0)
    t = t_input
    counts = None
    previous = "input"
    may_overwrite = getattr(spiking_layer, "may_overwrite_input", False)
    for i, stage in enumerate(stages):
        if isinstance(stage, TimePool):
            t = time_pool(stage, t)
        else:
            shortcut_in = tuple(spike_times[sc.source] for sc in stage.shortcuts)
            if keep is not None:  # sources read for the last time here: drop them now
                for sc in stage.shortcuts:
                    if last_read[sc.source] == i and sc.source not in keep:
                        spike_times.pop(sc.source, None)
            if isinstance(stage, SpikingLayer):
                # The times of the stage before, read by nothing else (not the caller's
                # input, not kept, no later shortcut's source), may be overwritten.
                free = keep is not None and previous != "input" and previous not in spike_times
                if free and may_overwrite:
                    t, saturated[stage.name], *extra = spiking_layer(
                        stage, t, shortcut_in, overwrite=True
                    )
                else:
                    t, saturated[stage.name], *extra = spiking_layer(stage, t, shortcut_in)
                early[stage.name] = int(extra[0]) if extra else 0
                counts = extra[1] if len(extra) > 1 else None
            else:
                output = output_layer(stage, t, shortcut_in)
                break
            del shortcut_in
        record(stage.name, t, i, counts)
        counts = None
        previous = stage.name
    return output, spike_times, saturated


def count_spikes(times: np.ndarray) -> np.ndarray:
    """(N,) spikes (finite times) per sample of times (N, ...), in any memory layout."""
    finite = np.isfinite(times)
    if ops.channels_last(finite):  # count in memory order: no copy for the reshape
        finite = finite.transpose(0, 2, 3, 1)
    return np.count_nonzero(finite.reshape(finite.shape[0], -1), axis=1)


def stages_with_spike_times(snn: TTFSNetwork) -> tuple[str, ...]:
    """Names of the stages a trace can hold spike times of: "input", every hidden layer
    and pool (the output layer is read out as membranes: ``Trace.output``)."""
    return ("input", *(s.name for s in snn.stages if not isinstance(s, OutputLayer)))


def check_keep(snn: TTFSNetwork, keep) -> frozenset | None:
    """``keep`` as a set of stage names (None: every stage); raises UsageError naming an
    unknown one."""
    if keep is None:
        return None
    names = (keep,) if isinstance(keep, str) else tuple(keep)
    valid = stages_with_spike_times(snn)
    for name in names:
        if name not in valid:
            what = (
                "is the output layer (its values are Trace.output, always kept)"
                if name == snn.output.name
                else "is no stage of the network"
            )
            raise UsageError(
                f"keep: '{name}' {what}; stages with spike times: {', '.join(valid)}"
            )
    return frozenset(names)


def neuron_layers(snn: TTFSNetwork) -> tuple[str, ...]:
    """Names of the stages whose neurons spike: the input and the hidden layers."""
    return ("input", *(s.name for s in snn.spiking_layers))


def working_bytes(snn: TTFSNetwork, dtype="float64") -> int:
    """Estimated working memory (bytes) of one sample's b1 simulation besides the spike
    times the trace keeps: a layer's values, padded channels-last copy and membrane
    (3x the widest stage), once more for the shortcuts of a residual network."""
    sizes = [math.prod(snn.input_shape)] + [math.prod(s.output_shape) for s in snn.stages]
    branches = 1 if any(getattr(s, "shortcuts", ()) for s in snn.stages) else 0
    return (3 + branches) * max(sizes) * compute_dtype_of(dtype).itemsize


@dataclass(frozen=True)
class ChunkStream:
    """Hands a run's chunks to a consumer as they are computed (a cross-check compares
    each chunk, then lets it go).

    samples: samples per chunk (>= 1; in place of the memory budget's choice).
    consume(lo, hi, logits, spike_times): called after each chunk of samples lo..hi, in
    sample order, with its logits (hi - lo, classes) and the spike times
    {name: (hi - lo, *shape)} of "input" and of every stage with spike times, whatever the
    run keeps; the arrays are the run's own, valid for the call (copy what must outlive it).
    """

    samples: int
    consume: Callable[[int, int, np.ndarray, dict], None]


def simulate(
    snn: TTFSNetwork, x, dtype="float64", memory_budget=None, keep=None,
    stream: ChunkStream | None = None,
) -> Trace:
    """Run the reference SNN on raw inputs x (N, *input_shape); return a :class:`Trace`.

    dtype: "float64" (the exact reference) or "float32" (b1 only: faster for large
    networks; its error against float64 is in the README's performance section).
    memory_budget: bytes (or "8G") for the working set of one chunk of samples besides
    the returned spike times; large batches run in chunks that fit it
    (:mod:`neurodeploy.memory`). The trace does not depend on the chunk size.
    keep: names of the stages whose spike times the trace holds (of
    :func:`stages_with_spike_times`: "input", hidden layers, pools); None (the default):
    every stage; ``()``: none. The trace's spike counts per stage
    (``Trace.spikes_per_layer``, hence ``spike_count`` and ``spikes_per_neuron``) are
    always complete; the stages not kept take no memory beyond one chunk's working set.
    stream: hand every chunk (of stream.samples samples, every stage's spike times) to
    stream.consume as it is computed (:class:`ChunkStream`).
    """
    dt = compute_dtype_of(dtype)
    if snn.neuron != "b1" and dt != np.float64:
        raise UsageError(f"dtype={dt.name}: only b1 networks simulate in float32")
    kept = check_keep(snn, keep)
    t, outside = encode_input(snn, x, dt)
    layer_step = _b1_layer if snn.neuron == "b1" else _alpha1_layer
    n = t.shape[0]
    per = chunk_samples(working_bytes(snn, dt), memory_budget)
    with threads.block_workers():  # held once for the run, not per layer
        output, spike_times, saturated, early, counts = run_stages_chunked(
            snn, t, layer_step, time_pool, output_potential, per, kept, stream=stream
        )
    return Trace(
        output=output,
        spike_times=spike_times,
        neuron_layers=neuron_layers(snn),
        saturated_per_layer={"input": outside, **saturated},
        latency=np.full(n, snn.latency),
        backend="reference",
        early_per_layer=early,
        spikes_per_layer=counts,
        neurons_per_layer=stage_neurons(snn, counts),
    )


def stage_neurons(snn: TTFSNetwork, names) -> dict[str, int]:
    """Neurons per sample of each of ``names`` (stages of snn, or "input")."""
    sizes = {"input": math.prod(snn.input_shape)}
    sizes.update((s.name, math.prod(s.output_shape)) for s in snn.stages)
    return {name: sizes[name] for name in names}


def run_stages_chunked(
    snn: TTFSNetwork,
    t_input: np.ndarray,
    spiking_layer,
    time_pool,
    output_layer,
    per_chunk: int,
    keep=None,
    on_chunk=None,
    stream: ChunkStream | None = None,
):
    """:func:`run_stages` over chunks of at most per_chunk samples, assembled (the chunk
    loop of :func:`simulate` and of every backend's run).

    t_input: (N, *input_shape) encoded input spike times; the stage functions as
    :func:`run_stages` takes them. keep: a set of stage names (:func:`check_keep`) whose
    spike times are returned, None: every stage; the others live one chunk at a time (a
    shortcut's source until its join). on_chunk(lo, hi) is called before each chunk (a
    backend points its per-sample statistics at the chunk's samples). The stage
    functions see the chunks in order, so a random stream a stage draws from in sample
    order gives every sample the same draws whatever the chunk size. stream: chunks of
    stream.samples samples (per_chunk ignored), each run keeping every stage's spike times
    and handed to stream.consume before the kept stages are assembled.

    Returns (logits (N, classes), spike_times {name: (N, *shape)}, saturated {stage:
    count}, early {name: count}, spike_counts {name: (N,) int64}): the counts summed over
    the chunks, spike_counts of "input" and of every stage with spike times, kept or
    not. A kept "input" is t_input itself; one chunk returns its arrays as they are."""
    n = t_input.shape[0]
    if stream is not None:
        per_chunk = stream.samples
    chunk_keep = None if stream is not None else keep  # a consumer sees every stage
    if n <= per_chunk:
        if on_chunk is not None:
            on_chunk(0, n)
        early: dict[str, int] = {}
        counts: dict[str, np.ndarray] = {}
        output, spike_times, saturated = run_stages(
            snn, t_input, spiking_layer, time_pool, output_layer, early, chunk_keep, counts
        )
        if stream is not None:
            stream.consume(0, n, output, spike_times)
        if keep is not None:
            spike_times = {name: v for name, v in spike_times.items() if name in keep}
        return output, spike_times, saturated, early, counts
    output, spike_times, saturated, early, counts = None, None, {}, {}, {}
    for lo, hi in chunks(n, per_chunk):
        if on_chunk is not None:
            on_chunk(lo, hi)
        part_early: dict[str, int] = {}
        part_counts: dict[str, np.ndarray] = {}
        part_out, part_times, part_sat = run_stages(
            snn, t_input[lo:hi], spiking_layer, time_pool, output_layer, part_early,
            chunk_keep, part_counts,
        )
        if stream is not None:
            stream.consume(lo, hi, part_out, part_times)
        if output is None:
            output = np.empty((n, *part_out.shape[1:]), part_out.dtype)
            spike_times = {
                name: t_input if name == "input" else like_batch(v, n)
                for name, v in part_times.items()
                if keep is None or name in keep
            }
            counts = {name: np.empty(n, np.int64) for name in part_counts}
        output[lo:hi] = part_out
        for name, v in spike_times.items():
            if name != "input":
                v[lo:hi] = part_times[name]
        for name, c in part_counts.items():
            counts[name][lo:hi] = c
        for name, count in part_sat.items():
            saturated[name] = saturated.get(name, 0) + count
        for name, count in part_early.items():
            early[name] = early.get(name, 0) + count
        del part_times
    return output, spike_times, saturated, early, counts


def like_batch(part: np.ndarray, n: int) -> np.ndarray:
    """An empty (n, *sample shape) array for the chunks of ``part``, in its memory layout
    (channels-last stays channels-last)."""
    if ops.channels_last(part):
        c, h, w = part.shape[1:]
        return reusable_empty((n, h, w, c), part.dtype).transpose(0, 3, 1, 2)
    return reusable_empty((n, *part.shape[1:]), part.dtype)
