"""Reference simulator: float64, continuous time, vectorised over the batch.

Spike times follow from the neuron dynamics of each model:

- b1: during [t_min_prev, t_min] the membrane integrates
  dV/dt = sum_j W_ij H(t - t_j), so V(t_min) = sum_j W_ij (t_min - t_j) over
  the inputs that spiked; from t_min it rises with slope 1 and fires when it
  reaches theta_i, at t_i = t_min + theta_i - V(t_min) if that is before t_max.
  A neuron already above threshold at t_min fires at t_min (saturation).
- alpha1: dV/dt = alpha H(t - t_min_prev) + sum_j J_ij H(t - t_j) from
  t_min_prev, a piecewise linear trajectory; the simulation sorts the input
  spikes and finds the first segment in which V crosses vartheta_i (event by
  event). A neuron that has not fired by t_max is made to fire at t_max.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .errors import UsageError
from .memory import chunk_samples, chunks
from .network import compute_dtype_of
from .trace import Trace
from .ttfs import INPUT_WINDOW, OutputLayer, SpikingLayer, TimePool, TTFSNetwork, apply_synapses

# Bound on the (batch, inputs, neurons) work arrays of the alpha1 simulation.
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


def spike_values(t: np.ndarray, t_end: float) -> np.ndarray:
    """Values t_end - t of spikes in a window ending at t_end; silent neurons (inf) give 0."""
    values = np.subtract(t_end, t)  # inf -> -inf; spikes before t_end give >= 0
    return np.maximum(values, 0.0, out=values)


def _b1_layer(
    layer: SpikingLayer, t_in: np.ndarray, shortcut_in: tuple = ()
) -> tuple[np.ndarray, int]:
    v = apply_synapses(layer.synapses, spike_values(t_in, layer.t_min))  # V(t_min)
    v = add_shortcuts(layer, v, shortcut_in)
    return b1_fire(layer, v)


def add_shortcuts(layer, v: np.ndarray, shortcut_in: tuple) -> np.ndarray:
    """Add the shortcut synapses' contributions to the membrane v at t_min (in place).

    shortcut_in: spike times of each shortcut's source, aligned with
    ``layer.shortcuts``. A source spike at t arrives at t + delay and adds its
    weight times (t_min - t - delay) = (t_source - t): the source's own value.
    """
    for shortcut, t_src in zip(layer.shortcuts, shortcut_in, strict=True):
        delayed = t_src + layer.delay(shortcut)
        v += apply_synapses(shortcut.synapses, spike_values(delayed, layer.t_min))
    return v


def b1_fire(layer: SpikingLayer, v: np.ndarray) -> tuple[np.ndarray, int]:
    """Spike times of b1 neurons whose membrane is v at t_min (v is overwritten).

    From t_min the membrane rises with slope 1: it reaches theta at
    t_min + theta - v; a neuron already above threshold fires at once (counted
    as saturated, except in a clipped layer, where that is the clip), one that
    would need longer than its window stays silent.
    """
    t_fire = np.subtract(layer.t_min + layer.threshold, v, out=v)
    early = 0
    if t_fire.min(initial=np.inf) < layer.t_min:
        if not layer.clipped:
            early = int(np.count_nonzero(t_fire < layer.t_min))
        np.maximum(t_fire, layer.t_min, out=t_fire)
    _silence_from(t_fire, layer.t_max)
    return t_fire, early


def _silence_from(t: np.ndarray, t_end: float) -> None:
    """Set t to inf (no spike) where t >= t_end > 0, in place.

    Dividing by the 0/1 mask is branch-free: about 3x faster than a masked
    assignment (np.where, copyto) on mixed masks, and exact (t / 1 == t).
    """
    with np.errstate(divide="ignore"):
        np.divide(t, np.less(t, t_end), out=t)


def _alpha1_layer(
    layer: SpikingLayer, t_in: np.ndarray, shortcut_in: tuple = ()
) -> tuple[np.ndarray, int]:
    if shortcut_in:  # pragma: no cover - convert refuses residual alpha1 networks
        raise NotImplementedError("alpha1 layers take no shortcuts")
    n = t_in.shape[0]
    t_flat = t_in.reshape(n, -1)
    coupling = layer.coupling  # (N_out, N_in)
    n_out, n_in = coupling.shape
    alpha, t0 = layer.alpha, layer.t_min_prev
    theta = layer.threshold.reshape(-1)
    t_out = np.empty((n, n_out))
    chunk = max(1, _ALPHA1_CHUNK_ELEMENTS // (n_in * n_out))
    for lo in range(0, n, chunk):
        t = t_flat[lo : lo + chunk]
        order = np.argsort(t, axis=1, kind="stable")
        t_sorted = np.take_along_axis(t, order, axis=1)  # (b, N_in)
        j_sorted = coupling.T[order]  # (b, N_in, N_out): weight of the k-th arriving spike
        slope = alpha + np.cumsum(j_sorted, axis=1)  # after the k-th spike
        offset = np.cumsum(j_sorted * t_sorted[:, :, None], axis=1)
        # V(t) = slope_k t - alpha t0 - offset_k on [t_k, t_{k+1}); crossing of theta:
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = (theta + alpha * t0 + offset) / slope
        seg_end = np.concatenate([t_sorted[:, 1:], np.full((t.shape[0], 1), np.inf)], axis=1)
        valid = (slope > 0) & (crossing >= t_sorted[:, :, None]) & (crossing < seg_end[:, :, None])
        # Before the first input spike only alpha drives V: V = alpha (t - t0).
        before_first = t0 + theta / alpha
        first_ok = before_first < t_sorted[:, :1]
        k = np.argmax(valid, axis=1)  # first valid segment per neuron
        found = np.take_along_axis(valid, k[:, None, :], axis=1)[:, 0, :]
        t_cross = np.take_along_axis(crossing, k[:, None, :], axis=1)[:, 0, :]
        t_cross = np.where(found, t_cross, np.inf)
        t_cross = np.where(first_ok, np.maximum(before_first, t0), t_cross)
        t_out[lo : lo + chunk] = np.minimum(t_cross, layer.t_max)
    early = int(np.count_nonzero(t_out < layer.t_min))
    return t_out.reshape(n, *layer.output_shape), early


def time_pool(pool: TimePool, t_in: np.ndarray) -> np.ndarray:
    """Earliest spike per window (latest for sign -1 channels); inf stays silent and
    padded positions never win."""
    if np.all(pool.sign > 0):  # the usual case (max pools after ReLUs): no sign passes
        return ops.minpool2d(t_in, pool.kernel, pool.stride, pool.padding)
    s = pool.sign.astype(t_in.dtype, copy=False)[None, :, None, None]
    return ops.minpool2d(t_in * s, pool.kernel, pool.stride, pool.padding) * s


def output_potential(layer: OutputLayer, t_in: np.ndarray, shortcut_in: tuple = ()) -> np.ndarray:
    potential = apply_synapses(layer.synapses, spike_values(t_in, layer.t_read))
    potential = add_shortcuts(layer, potential, shortcut_in)
    return (potential + layer.bias).reshape(t_in.shape[0], -1)


def run_stages(snn: TTFSNetwork, t_input: np.ndarray, spiking_layer, time_pool, output_layer):
    """Run every stage in order; the backends supply how each kind of stage computes.

    spiking_layer(stage, t_in, shortcut_in) -> (t_out, saturated neurons);
    time_pool(stage, t_in) -> t_out; output_layer(stage, t_in, shortcut_in) ->
    logits (N, classes). t_in: spike times of the stage before; shortcut_in: a
    tuple with the spike times of each of ``stage.shortcuts``' sources (empty
    for a chain). Spike times are in time units with inf for silence. Returns
    (logits, spike_times, saturated).
    """
    spike_times = {"input": t_input}
    saturated = {}
    t = t_input
    output = None
    for stage in snn.stages:
        if isinstance(stage, TimePool):
            t = time_pool(stage, t)
        else:
            shortcut_in = tuple(spike_times[sc.source] for sc in stage.shortcuts)
            if isinstance(stage, SpikingLayer):
                t, saturated[stage.name] = spiking_layer(stage, t, shortcut_in)
            else:
                output = output_layer(stage, t, shortcut_in)
                break
        spike_times[stage.name] = t
    return output, spike_times, saturated


def neuron_layers(snn: TTFSNetwork) -> tuple[str, ...]:
    """Names of the stages whose neurons spike: the input and the hidden layers."""
    return ("input", *(s.name for s in snn.spiking_layers))


def working_bytes(snn: TTFSNetwork, dtype="float64") -> int:
    """Estimated working memory (bytes) of one sample's b1 simulation besides the spike
    times the trace keeps: a layer's values, padded channels-last copy and membrane
    (3x the widest stage), once more for the shortcuts of a residual network."""
    sizes = [int(np.prod(snn.input_shape))] + [int(np.prod(s.output_shape)) for s in snn.stages]
    branches = 1 if any(getattr(s, "shortcuts", ()) for s in snn.stages) else 0
    return (3 + branches) * max(sizes) * compute_dtype_of(dtype).itemsize


def simulate(snn: TTFSNetwork, x, dtype="float64", memory_budget=None) -> Trace:
    """Run the reference SNN on raw inputs x (N, *input_shape); return a :class:`Trace`.

    dtype: "float64" (the exact reference) or "float32" (b1 only: faster for large
    networks; its error against float64 is in the README's performance section).
    memory_budget: bytes (or "8G") for the working set of one chunk of samples besides
    the returned spike times; large batches run in chunks that fit it
    (:mod:`neurodeploy.memory`). The trace does not depend on the chunk size.
    """
    dt = compute_dtype_of(dtype)
    if snn.neuron != "b1" and dt != np.float64:
        raise UsageError(f"dtype={dt.name}: only b1 networks simulate in float32")
    t, outside = encode_input(snn, x, dt)
    layer_step = _b1_layer if snn.neuron == "b1" else _alpha1_layer
    n = t.shape[0]
    per = chunk_samples(working_bytes(snn, dt), memory_budget)
    if n <= per:
        output, spike_times, saturated = run_stages(
            snn, t, layer_step, time_pool, output_potential
        )
    else:
        output, spike_times, saturated = None, None, {}
        for lo, hi in chunks(n, per):
            part_out, part_times, part_sat = run_stages(
                snn, t[lo:hi], layer_step, time_pool, output_potential
            )
            if output is None:
                output = np.empty((n, *part_out.shape[1:]), part_out.dtype)
                spike_times = {name: _like(v, n) for name, v in part_times.items()}
            output[lo:hi] = part_out
            for name, v in part_times.items():
                spike_times[name][lo:hi] = v
            for name, count in part_sat.items():
                saturated[name] = saturated.get(name, 0) + count
    return Trace(
        output=output,
        spike_times=spike_times,
        neuron_layers=neuron_layers(snn),
        saturated_per_layer={"input": outside, **saturated},
        latency=np.full(n, snn.latency),
        backend="reference",
    )


def _like(part: np.ndarray, n: int) -> np.ndarray:
    """An empty (n, *sample shape) array for the chunks of ``part``, in its memory layout
    (channels-last stays channels-last)."""
    if ops.channels_last(part):
        c, h, w = part.shape[1:]
        return np.empty((n, h, w, c), part.dtype).transpose(0, 3, 1, 2)
    return np.empty((n, *part.shape[1:]), part.dtype)
