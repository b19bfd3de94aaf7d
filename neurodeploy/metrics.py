"""NeuroBench-style metrics of a converted network's run, per layer and in total.

The definitions are NeuroBench's (J. Yik et al., "NeuroBench: a framework for
benchmarking neuromorphic computing algorithms and systems", Nature Communications
16, 1545, 2025; arXiv:2304.04640; and the metric pages and code of the NeuroBench
harness, github.com/NeuroBench/neurobench, ``docs/metrics``):

- **Synaptic operations** (a workload metric, mean per inference): the neuron
  activations times their fan-out synapses. *Dense* counts every activation and
  every connection, zero or not (the operations of hardware that does not exploit
  sparsity). *Effective* counts only nonzero activations on nonzero weights: the
  harness binarises inputs and weights and runs the layer forward. An effective
  operation with a binary activation (a spike) is an accumulate (**AC**); one with a
  non-binary activation is a multiply-accumulate (**MAC**). Pooling is not counted.
- **Activation sparsity** (workload): the fraction of zero neuron outputs over all
  neurons of all neuron layers, all time steps and all samples (0: every neuron always
  active, 1: none ever).
- **Connection sparsity** (static): the fraction of zero weights among the weights of
  the connection layers (dense and convolution weight tensors; shared kernel weights
  counted once, as parameters).
- **Footprint** (static): the bytes needed to hold the model: every parameter and
  buffer at its storage precision; zero weights included.

How they apply here:

- Every layer of a TTFS network is fed spikes: the input is encoded as one spike per
  nonzero value, and each hidden layer spikes at most once per neuron and inference.
  A spike adds its weight to a synaptic current (digital cores: one AC per synapse it
  reaches). On a memristive crossbar (``backend="crossbar"``) a spike drives its word
  line for the rest of the window and the array multiplies that pulse duration by the
  conductances in the analog domain: the same events count as MACs there.
- A layer's events are counted the way the emulator's energy model counts them (the
  spikes of the stage before it times each spike's fan-out through the layer's
  connectivity, average pools folded into the synapses as sum pools); a layer that
  joins a residual branch adds its shortcut groups' events (their sources' spikes
  times the shortcut synapses' fan-out).
- For an exact conversion a neuron spikes exactly where its ReLU activation is
  nonzero, so the source ReLU network's effective MACs equal the reference SNN's
  effective ACs layer by layer: the conversion turns each multiply-accumulate into an
  accumulate.
- Activation sparsity per time step needs a step grid (``timing.steps_per_window``
  of a digital profile): each hidden neuron has K output steps per inference, its
  window. ``activation_sparsity_per_inference`` is the fraction of (neuron, sample)
  pairs without a spike, defined on every backend.
- Footprint at the hardware's precision: digital profiles store each weight with
  ``weights.bits`` bits and each threshold (hidden neurons) or bias (readout neurons)
  in a ``neuron.membrane_bits`` register; float (ideal, unset bits) is 8 bytes. A
  crossbar holds each weight as a pair of devices: with ``crossbar.levels`` levels a
  device stores log2(levels) bits; analog devices (``levels: null``) have no bit
  count, so the crossbar's weight footprint is given in devices and its bytes are
  None. Per-layer scalars (exponents, shifts, ramps) are not counted.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .backends.common import SumPool2d, fold_average_pools
from .network import Conv2d, Dense
from .trace import Trace, require_spike_times
from .ttfs import OutputLayer, SpikingLayer, TimePool, TTFSNetwork, apply_synapses

FLOAT_BYTES = 8  # float64, the reference simulator's and the float backends' precision
_CHUNK = 256  # samples per forward pass of the counting (bounds the memory)


def _indicator(synapses: tuple, keep_zeros: bool, input_shape) -> tuple:
    """The synapse ops with sum pools and a 0/1 affine weight: 1 where a connection
    exists (nonzero weight), or everywhere when ``keep_zeros`` (dense counting). A sum
    pool counts each input once per window (the multiplicities a count_include_pad=false
    pool carries are weights, not connections)."""
    ops, _ = fold_average_pools(synapses, input_shape)
    linear = tuple(op.connectivity() if isinstance(op, SumPool2d) else op for op in ops[:-1])
    affine = ops[-1]
    weight = np.ones_like(affine.weight) if keep_zeros else (affine.weight != 0).astype(float)
    return (*linear, replace(affine, weight=weight, bias=np.zeros(weight.shape[0])))


def _events(synapses: tuple, active: np.ndarray) -> np.ndarray:
    """Synaptic events per sample (N,): active inputs (N, *input_shape) of 0/1 through the
    0/1 connectivity, summed over the outputs."""
    n = active.shape[0]
    out = np.zeros(n)
    for lo in range(0, n, _CHUNK):
        chunk = apply_synapses(synapses, active[lo : lo + _CHUNK].astype(np.float64))
        out[lo : lo + _CHUNK] = chunk.reshape(chunk.shape[0], -1).sum(axis=1)
    return out


def _dense_ops(synapses: tuple, input_shape) -> float:
    """Dense synaptic operations per inference: every input active, every weight a
    connection."""
    return float(_events(_indicator(synapses, True, input_shape), np.ones((1, *input_shape)))[0])


def _affine(synapses: tuple):
    affine = synapses[-1]
    assert isinstance(affine, (Dense, Conv2d))
    return affine


def _precision(profile, backend: str | None) -> dict:
    """Storage bits of a weight, of a neuron parameter, and devices per weight."""
    if profile is None or profile.hardware == "ideal":
        return {"weight_bits": 8 * FLOAT_BYTES, "neuron_bits": 8 * FLOAT_BYTES, "devices": None}
    if profile.hardware == "crossbar" or backend == "crossbar":
        levels = profile.crossbar.levels
        bits = None if levels is None else 2 * math.ceil(math.log2(levels))  # a device pair
        return {"weight_bits": bits, "neuron_bits": 8 * FLOAT_BYTES, "devices": 2}
    w_bits = profile.weights.bits
    m_bits = profile.neuron.membrane_bits
    return {
        "weight_bits": 8 * FLOAT_BYTES if w_bits is None else w_bits,
        "neuron_bits": 8 * FLOAT_BYTES if m_bits is None else m_bits,
        "devices": None,
    }


def _hardware_weights(deployment, stage_name: str) -> list[np.ndarray] | None:
    """The weights a deployment programmed (emulator, Lava: the integer mantissas;
    main group first, then the shortcut groups), or None where it keeps none."""
    programs = getattr(deployment, "programs", None)
    if not programs or stage_name not in programs:
        return None
    program = programs[stage_name]
    return [program.synapses[-1].weight, *(sc.synapses[-1].weight for sc in program.shortcuts)]


def _stage_groups(stage, previous: str) -> list[tuple[str, tuple, tuple]]:
    """(source stage, synapse ops, source shape) of a layer's connection groups, in group
    index order: its main group (index 0) reads ``previous``, the stage before it, its
    shortcut groups (1, 2, ...) their sources."""
    return [(previous, stage.synapses, stage.input_shape)] + [
        (sc.source, sc.synapses, sc.input_shape) for sc in stage.shortcuts
    ]


def _connection_groups(snn: TTFSNetwork) -> list[tuple[str, int, str, tuple, tuple]]:
    """(stage, group index, source stage, synapse ops, source shape) of every connection
    group of snn's layers (pools skipped, :func:`_stage_groups`)."""
    groups = []
    previous = "input"
    for stage in snn.stages:
        if not isinstance(stage, TimePool):
            groups.extend(
                (stage.name, index, *group)
                for index, group in enumerate(_stage_groups(stage, previous))
            )
        previous = stage.name
    return groups


class SynapticEvents:
    """Effective synaptic events per sample of every connection group of snn, counted a
    chunk of samples at a time (a streamed run's chunks, :meth:`add`): ``per_sample``
    maps (stage, group index) to (N,) events, exact integers in float64, the same for any
    chunking. :func:`neurobench_metrics` takes them in place of a trace's spike times."""

    def __init__(self, snn: TTFSNetwork, samples: int):
        groups = _connection_groups(snn)
        self._groups = [(stage, index, source, shape) for stage, index, source, _, shape in groups]
        # (stage, group index) -> the group's connectivity indicator (its synapses' map)
        self.connectivity = {
            (stage, index): _indicator(synapses, False, shape)
            for stage, index, _, synapses, shape in groups
        }
        self.per_sample = {key: np.zeros(samples) for key in self.connectivity}

    def add(self, lo: int, hi: int, spike_times: dict[str, np.ndarray]) -> None:
        """Count samples lo..hi from their spike times {stage: (hi - lo, *shape)} (every
        group's source)."""
        for stage, index, source, shape in self._groups:
            active = np.isfinite(spike_times[source]).reshape(hi - lo, *shape)
            connectivity = self.connectivity[stage, index]
            self.per_sample[stage, index][lo:hi] = _events(connectivity, active)


def neurobench_metrics(
    snn: TTFSNetwork,
    trace: Trace,
    profile=None,
    backend: str | None = None,
    deployment=None,
    events: SynapticEvents | None = None,
) -> dict:
    """NeuroBench's synaptic operations, activation and connection sparsity and footprint
    of one run (see the module docstring for the definitions and how they apply).

    snn: the converted network; trace: a run of it (reference or hardware) on N samples;
    profile: the HardwareProfile the run used (None: the float64 reference);
    backend: the backend that ran (``crossbar`` counts MACs, every other ACs);
    deployment: the Deployment, to count zero weights at the programmed precision.

    Returns {"layers": [...], "total": {...}, "op_kind": "AC" | "MAC", "samples": N}.
    Per layer: name, kind, neurons, weights (parameters), zero_weights,
    connection_sparsity, synapses (connections unrolled over output positions),
    dense_ops and effective_ops (mean per inference), effective_acs / effective_macs
    (the effective ops under their kind), activation_sparsity (per time step, None
    without a step grid), activation_sparsity_per_inference, footprint_bytes (None for
    analog devices), footprint_devices (crossbars). Layers joining a residual branch
    include their shortcut groups and list them under "shortcuts".

    events: the run's synaptic events counted chunk by chunk (:class:`SynapticEvents`);
    the trace then needs no spike times (its spike counts suffice: a run with keep=()).
    None: counted from the trace's spike times, which must hold every source stage.
    """
    n = trace.num_samples
    is_mac = backend == "crossbar" or (profile is not None and profile.hardware == "crossbar")
    steps = None
    if profile is not None and profile.hardware == "digital":
        steps = profile.timing.steps_per_window
    precision = _precision(profile, backend)
    if events is None:
        sources = ("input", *(s.name for s in snn.stages[:-1]))
        require_spike_times(
            trace, sources, "metrics", "effective operations count each spike's synapses"
        )
        events = SynapticEvents(snn, n)
        events.add(0, n, trace.spike_times)
    layers = []
    previous = "input"
    for stage in snn.stages:
        if isinstance(stage, TimePool):  # pooling is not counted (NeuroBench)
            previous = stage.name
            continue
        programmed = _hardware_weights(deployment, stage.name)
        groups = _stage_groups(stage, previous)
        row = {"name": stage.name, "kind": type(stage).__name__}
        row["neurons"] = int(np.prod(stage.output_shape))
        weights = zeros = synapses = 0
        dense = effective = 0.0
        shortcut_rows = []
        for index, (source, synapse_ops, input_shape) in enumerate(groups):
            affine = _affine(synapse_ops)
            held = affine.weight if programmed is None else programmed[index]
            group_weights = int(held.size)
            group_zeros = int(np.count_nonzero(held == 0))
            connectivity = events.connectivity[stage.name, index]
            group_synapses = float(_events(connectivity, np.ones((1, *input_shape)))[0])
            group_dense = _dense_ops(synapse_ops, input_shape)
            per_sample = events.per_sample[stage.name, index]
            group_effective = float(per_sample.mean()) if n else 0.0
            weights += group_weights
            zeros += group_zeros
            synapses += int(group_synapses)
            dense += group_dense
            effective += group_effective
            if index > 0:
                shortcut_rows.append(
                    {
                        "source": source,
                        "weights": group_weights,
                        "dense_ops": group_dense,
                        "effective_ops": group_effective,
                    }
                )
        row.update(
            weights=weights,
            zero_weights=zeros,
            connection_sparsity=zeros / weights if weights else 0.0,
            synapses=synapses,
            dense_ops=dense,
            effective_ops=effective,
            effective_acs=0.0 if is_mac else effective,
            effective_macs=effective if is_mac else 0.0,
        )
        if isinstance(stage, SpikingLayer):
            spikes = float(trace.layer_spikes(stage.name).sum()) if n else 0.0
            pairs = n * row["neurons"]
            row["spikes_per_inference"] = spikes / n if n else 0.0
            row["activation_sparsity_per_inference"] = 1.0 - spikes / pairs if pairs else 1.0
            row["activation_sparsity"] = (
                None if steps is None or not pairs else 1.0 - spikes / (pairs * steps)
            )
            neuron_params = int(np.asarray(stage.threshold).size)
        else:
            assert isinstance(stage, OutputLayer)  # read out as membranes: no activations
            row["spikes_per_inference"] = None
            row["activation_sparsity_per_inference"] = None
            row["activation_sparsity"] = None
            neuron_params = int(np.asarray(stage.bias).size)
        weight_bits = precision["weight_bits"]
        row["footprint_bytes"] = (
            None
            if weight_bits is None
            else (weights * weight_bits + neuron_params * precision["neuron_bits"]) / 8
        )
        row["footprint_devices"] = (
            None if precision["devices"] is None else weights * precision["devices"]
        )
        if shortcut_rows:
            row["shortcuts"] = shortcut_rows
        layers.append(row)
        previous = stage.name
    return {
        "samples": n,
        "op_kind": "MAC" if is_mac else "AC",
        "layers": layers,
        "total": _totals(layers, snn, trace, n, steps),
    }


def _totals(layers: list[dict], snn: TTFSNetwork, trace: Trace, n: int, steps) -> dict:
    weights = sum(r["weights"] for r in layers)
    zeros = sum(r["zero_weights"] for r in layers)
    spiking = [s.name for s in snn.spiking_layers]
    neurons = sum(trace.layer_neurons(name) for name in spiking)
    spikes = float(sum(trace.layer_spikes(name).sum() for name in spiking)) if n else 0.0
    pairs = n * neurons
    footprints = [r["footprint_bytes"] for r in layers]
    devices = [r["footprint_devices"] for r in layers]
    return {
        "weights": weights,
        "zero_weights": zeros,
        "connection_sparsity": zeros / weights if weights else 0.0,
        "synapses": sum(r["synapses"] for r in layers),
        "dense_ops": sum(r["dense_ops"] for r in layers),
        "effective_ops": sum(r["effective_ops"] for r in layers),
        "effective_acs": sum(r["effective_acs"] for r in layers),
        "effective_macs": sum(r["effective_macs"] for r in layers),
        "activation_sparsity_per_inference": 1.0 - spikes / pairs if pairs else 1.0,
        "activation_sparsity": (
            None if steps is None or not pairs else 1.0 - spikes / (pairs * steps)
        ),
        "footprint_bytes": None if None in footprints else sum(footprints),
        "footprint_devices": None if None in devices else sum(devices),
    }


def metrics_table(metrics: dict) -> list[str]:
    """The metrics as aligned text lines (the human ``run`` output)."""
    kind = metrics["op_kind"]
    lines = [
        f"{'layer':<10} {'weights':>9} {'conn.sp':>7} {'synapses':>10} {'dense ops':>11} "
        f"{'eff. ' + kind + 's':>11} {'act.sp':>7} {'act.sp/inf':>10} {'footprint':>11}"
    ]

    def fmt_sparsity(value) -> str:
        return "" if value is None else f"{value:.3f}"

    def fmt_bytes(row) -> str:
        if row["footprint_bytes"] is not None:
            return f"{row['footprint_bytes']:.0f} B"
        return f"{row['footprint_devices']} dev" if row["footprint_devices"] else ""

    for row in [*metrics["layers"], {"name": "total", **metrics["total"]}]:
        lines.append(
            f"{row['name']:<10} {row['weights']:>9} {row['connection_sparsity']:>7.3f} "
            f"{row['synapses']:>10} {row['dense_ops']:>11.0f} {row['effective_ops']:>11.1f} "
            f"{fmt_sparsity(row['activation_sparsity']):>7} "
            f"{fmt_sparsity(row['activation_sparsity_per_inference']):>10} {fmt_bytes(row):>11}"
        )
    return lines


__all__ = ["SynapticEvents", "metrics_table", "neurobench_metrics"]
