"""Cross-check a hardware run against the reference SNN, layer by layer.

For every stage (the encoded input, each spiking layer, each pool, the
output) the report gives

- the end-to-end spike-time error: hardware against reference on the same
  samples, in the layer's time units and in its steps (mean, max, histogram),
  with missing spikes (the reference fires, the hardware does not) and extra
  ones, and the hardware's saturations and overflows;
- a local check that tells where and why a run diverges: the stage is fed the
  hardware's own inputs (the previous stage's hardware spikes and, for a layer
  that joins a residual branch, its shortcut sources' hardware spikes) and
  computed exactly; its hardware output must lie within the bound that quantisation
  alone explains there (the deployment's spike steps, weight resolution,
  threshold/ramp/ADC rounding and input resolution, see
  :meth:`neurodeploy.deploy.Deployment.quantization_terms`; a shortcut's weight
  and input terms add its share). Errors inherited
  from earlier layers are thereby explained, and the first stage whose
  outputs leave their bound is the divergence layer.

On an analog (crossbar) deployment the bound is statistical: the device model's
prediction (:meth:`~neurodeploy.backends.crossbar.CrossbarDeployment.weight_statistics`:
programming noise, variability, drift with its nu spread after drift compensation,
and per-read 1/f read noise, at the profile's settings) gives every effective weight a
mean error mu_ij and a variance var_ij, and an output on the hardware's inputs x is then
bounded by |sum_j x_j mu_ij| + k sqrt(sum_j x_j^2 var_ij) plus the quantisation terms
above (k = ``sigmas``, 3 by default). "Beyond the bound" then means beyond what the
device physics explains; a Gaussian output error leaves 2 (1 - Phi(k)) beyond
(0.27 % at 3 sigma), reported as ``beyond_expected``. Stuck-at faults are not in
the model: they are what the bound flags.

Attribution (:mod:`neurodeploy.attribution`, on by default): which stage's own
hardware effects cost the accuracy (the *cause layer*) and which effect (the *cause
effect*), beside the divergence layer, which says where the hardware stops computing
what the profile's hardware should.

``report.ok``: every stage within its bound (at most the profile's
``crosscheck.max_beyond_bound`` fraction of its outputs beyond it) and
prediction agreement at least ``crosscheck.required_agreement``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from . import ops
from .attribution import attribute
from .backends.common import abs_weight_ops
from .deploy import Deployment, shortcut_term_key
from .fileio import write_text_atomic
from .memory import chunk_samples, chunks
from .metrics import SynapticEvents, neurobench_metrics
from .simulate import ChunkStream, simulate, stages_with_spike_times
from .simulate import working_bytes as simulate_working_bytes
from .trace import Trace, require_spike_times
from .ttfs import INPUT_WINDOW, OutputLayer, TimePool, TTFSNetwork, apply_synapses

SCHEMA_VERSION = 2
# Default width of the statistical bound, in standard deviations of the device model's
# predicted output error: 3 sigma leaves 0.27 % of a Gaussian outside.
DEFAULT_SIGMAS = 3.0
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "crosscheck.schema.json"
# Relative floating-point slack of the local check: float64 sums in another order.
_FLOAT_SLACK = 1e-9
_HISTOGRAM_BINS = 41
# Most spike times per stage the report's figures plot (an evenly spread subsample).
_PLOT_LIMIT = 4000


@dataclass
class LayerCheck:
    """One stage of the comparison. Errors are |reference value - hardware value| in
    time units (a spike-time difference within the stage's window); *_steps divide by
    the hardware's step size (None in continuous time)."""

    name: str
    kind: str  # input | spiking | pool | output
    neurons: int
    window: list[float]  # [t_min, t_max]; the output layer: [read time, read time]
    step_size: float | None
    error_mean: float
    error_max: float
    error_mean_steps: float | None
    error_max_steps: float | None
    histogram: dict  # {"edges": [...], "counts": [...]} of reference - hardware values
    bound_mean: float
    bound_max: float
    local_error_max: float
    beyond_bound: float  # fraction of outputs (samples x neurons) beyond the bound
    missing_spikes: int
    extra_spikes: int
    saturated: int
    early: int  # spikes before the window opened whose value fits it (not saturation)
    overflow: int
    within_bound: bool
    bound_kind: str = "quantisation"  # quantisation | statistical (device model + quantisation)
    beyond_expected: float = 0.0  # fraction the bound's statistics expect beyond it
    # What the stage's own hardware effects cost (attribution's stage-at-a-time run):
    own_accuracy_loss: float | None = None
    own_disagreement: float | None = None
    own_logit_error: float | None = None


@dataclass
class CrossCheckReport:
    """Result of :func:`crosscheck`; ``to_json`` follows schemas/crosscheck.schema.json."""

    model: str
    profile: str
    hardware: str
    backend: str
    samples: int
    accuracy_reference: float | None
    accuracy_hardware: float | None
    agreement: float
    required_agreement: float
    max_beyond_bound: float
    logit_error_mean: float
    logit_error_max: float
    divergence_layer: str | None
    latency_s: float | None
    energy_j: float | None
    ok: bool
    reasons: list[str]
    layers: list[LayerCheck]
    cause_layer: str | None = None
    cause_effect: str | None = None
    bound_sigmas: float | None = None  # k of the statistical bound (None: quantisation only)
    attribution: dict | None = None  # Attribution as a dict (None: not run)
    metrics: dict | None = None  # NeuroBench-style metrics of the hardware run
    # energy per inference by kind of operation (Deployment.energy_breakdown; None: not priced)
    energy_breakdown: dict | None = None
    schema_version: int = SCHEMA_VERSION
    plots: dict = field(default_factory=dict, repr=False)  # figure data, not serialised

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc.pop("plots")
        return {"schema_version": doc.pop("schema_version"), **doc}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (atomically); returns the path."""
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def to_html(self, path: str | os.PathLike) -> Path:
        """Write one self-contained HTML page with the figures inlined; returns the path."""
        from .report_html import crosscheck_html

        return write_text_atomic(Path(path), crosscheck_html(self))


def _values(t: np.ndarray, t_max: float) -> np.ndarray:
    return np.where(np.isfinite(t), t_max - t, 0.0)


def _sample_sums(a: np.ndarray) -> np.ndarray:
    """(n,) sums of a (n, ...) over each sample, each one contiguous row in the sample's
    C order (numpy's pairwise summation of that row): the same bits whichever samples
    share a's chunk."""
    rows = np.ascontiguousarray(a, dtype=np.float64).reshape(a.shape[0], math.prod(a.shape[1:]))
    return np.add.reduce(rows, axis=1)


def _mean_of_sums(per_sample: np.ndarray, count: int) -> float:
    """Mean of ``count`` values from their (N,) per-sample sums, summed exactly
    (math.fsum): independent of the order and the chunks they were computed in."""
    return math.fsum(per_sample) / count if count else 0.0


def _beyond(local_err: np.ndarray, bound, scale: np.ndarray) -> int:
    """How many outputs' local errors exceed their bound (with float slack)."""
    limit = bound + _FLOAT_SLACK * (1.0 + np.abs(scale))
    return int(np.count_nonzero(local_err > limit))


class _StageTally:
    """One stage's comparison statistics over the whole batch of N samples, accumulated a
    chunk of samples at a time, the same bits for any chunking: integer counts, maxima,
    and (N,) per-sample sums summed exactly at the end.

    Two passes over the chunks (one when the batch is one chunk): :meth:`add` takes each
    chunk's errors, bounds and counts; the histogram's range (the largest error) and the
    plots' evenly spread subsample (of the positions where either run fires) depend on
    the whole batch, so :meth:`add_distribution` takes each chunk's errors and spike
    times again once :meth:`add` has seen them all."""

    def __init__(self, samples: int, constant_bound: float | None = None):
        self.constant_bound = constant_bound  # one bound for every output (input, pools)
        self.abs_error_sums = np.zeros(samples)
        self.bound_sums = np.zeros(samples)
        self.tail_sums = np.zeros(samples)  # expected fractions beyond (statistical bound)
        self.outputs = 0  # samples x neurons seen
        self.error_max = 0.0
        self.bound_max = -np.inf
        self.local_error_max = 0.0
        self.beyond = 0
        self.missing = 0
        self.extra = 0
        self.firing_positions = 0  # (sample, neuron) pairs where either run fires
        self.histogram_counts = np.zeros(_HISTOGRAM_BINS, np.int64)
        self.plotted: list[tuple[np.ndarray, np.ndarray]] = []  # (reference, hardware) times
        self.positions_seen = 0

    def add(
        self, lo: int, hi: int, diff, local_err, bound, scale, tails=None, ref_t=None, hw_t=None
    ) -> None:
        """One chunk of samples lo..hi: diff reference - hardware values and local_err
        (hi - lo, *shape); bound: (hi - lo, *shape), or None with a constant bound; scale:
        the values the float slack of the bound scales with; tails: (hi - lo, *shape)
        Gaussian fractions beyond the bound (statistical bounds); ref_t, hw_t: spike times
        (hi - lo, *shape) of spiking stages, for the missing and extra spikes and the plots."""
        abs_error = np.abs(diff)
        self.outputs += abs_error.size
        self.abs_error_sums[lo:hi] = _sample_sums(abs_error)
        self.error_max = max(self.error_max, float(abs_error.max(initial=0.0)))
        self.local_error_max = max(self.local_error_max, float(local_err.max(initial=0.0)))
        if bound is None:
            self.beyond += _beyond(local_err, self.constant_bound, scale)
        else:
            self.bound_sums[lo:hi] = _sample_sums(bound)
            self.bound_max = max(self.bound_max, float(bound.max(initial=-np.inf)))
            self.beyond += _beyond(local_err, bound, scale)
        if tails is not None:
            self.tail_sums[lo:hi] = _sample_sums(tails)
        if ref_t is not None:
            ref_fired, hw_fired = np.isfinite(ref_t), np.isfinite(hw_t)
            self.missing += int(np.count_nonzero(ref_fired & ~hw_fired))
            self.extra += int(np.count_nonzero(~ref_fired & hw_fired))
            self.firing_positions += int(np.count_nonzero(ref_fired | hw_fired))

    def histogram_range(self) -> tuple[float, float]:
        """(-span, span): span the largest |error| of the batch (1e-12 when all are 0)."""
        span = self.error_max if self.error_max > 0 else 1e-12
        return -span, span

    def add_distribution(self, diff: np.ndarray, ref_t=None, hw_t=None) -> None:
        """The next chunk (in sample order) for the histogram and the plots, after
        :meth:`add` saw every chunk: diff (n, *shape); ref_t, hw_t (n, *shape) spike times."""
        counts, _ = np.histogram(diff, bins=_HISTOGRAM_BINS, range=self.histogram_range())
        self.histogram_counts += counts
        if ref_t is None:
            return
        ref, hw = ref_t.reshape(-1), hw_t.reshape(-1)
        firing = np.flatnonzero(np.isfinite(ref) | np.isfinite(hw))
        picks = _plot_picks(self.firing_positions)
        first = self.positions_seen
        mine = picks[np.searchsorted(picks, first) : np.searchsorted(picks, first + firing.size)]
        chosen = firing[mine - first]
        self.plotted.append((ref[chosen], hw[chosen]))
        self.positions_seen += firing.size

    def plot_data(self, window) -> dict:
        """Reference and hardware spike times at the plotted positions, and the window."""
        ref = np.concatenate([r for r, _ in self.plotted]) if self.plotted else np.empty(0)
        hw = np.concatenate([h for _, h in self.plotted]) if self.plotted else np.empty(0)
        return {"reference": ref, "hardware": hw, "window": list(window)}

    def layer(
        self, name, kind, neurons, window, step, saturated, early, overflow, allowed,
        statistical: bool,
    ) -> LayerCheck:
        """The stage's row of the report (every chunk added, both passes)."""
        mean = _mean_of_sums(self.abs_error_sums, self.outputs)
        worst = self.error_max
        if self.constant_bound is not None:
            bound_mean = bound_max = float(self.constant_bound)
        else:
            bound_mean = _mean_of_sums(self.bound_sums, self.outputs)
            bound_max = float(self.bound_max) if self.outputs else 0.0
        beyond = self.beyond / self.outputs if self.outputs else 0.0
        _, edges = np.histogram(np.empty(0), bins=_HISTOGRAM_BINS, range=self.histogram_range())
        check = LayerCheck(
            name=name,
            kind=kind,
            neurons=int(neurons),
            window=[float(w) for w in window],
            step_size=None if step is None else float(step),
            error_mean=mean,
            error_max=worst,
            error_mean_steps=None if not step else mean / step,
            error_max_steps=None if not step else worst / step,
            histogram={"edges": edges.tolist(), "counts": self.histogram_counts.tolist()},
            bound_mean=bound_mean,
            bound_max=bound_max,
            local_error_max=self.local_error_max,
            beyond_bound=float(beyond),
            missing_spikes=self.missing,
            extra_spikes=self.extra,
            saturated=int(saturated),
            early=int(early),
            overflow=int(overflow),
            within_bound=bool(beyond <= allowed),
        )
        if statistical:
            check.bound_kind = "statistical"
            check.beyond_expected = min(1.0, _mean_of_sums(self.tail_sums, self.outputs))
        return check


def _plot_picks(positions: int, limit: int = _PLOT_LIMIT) -> np.ndarray:
    """Indices (sorted) of the plotted ones among ``positions`` firing positions: all of
    them up to ``limit``, else a fixed, evenly spread subsample (keeps pages small)."""
    if positions <= limit:
        return np.arange(positions)
    return np.linspace(0, positions - 1, limit).astype(int)


class _Comparison:
    """The stage-by-stage comparison of a hardware run with the reference, fed chunk by
    chunk (in sample order; see :class:`_StageTally` for the two passes).

    Every call takes one chunk of samples lo..hi: the reference's and the hardware's
    logits (hi - lo, classes) and spike times {stage: (hi - lo, *shape)} of "input" and
    every stage with spike times."""

    def __init__(self, snn: TTFSNetwork, dep: Deployment, samples: int, sigmas: float):
        self.snn = snn
        self.hw_snn = dep.snn
        self.terms = dep.quantization_terms()
        statistics = dep.weight_statistics() if hasattr(dep, "weight_statistics") else {}
        if not any(np.any(var > 0) for _, var in statistics.values()):
            statistics = {}
        self.statistics = statistics
        self.sigmas = sigmas
        self.reference_output: np.ndarray | None = None  # (N, classes), filled by chunks
        self.samples = samples
        own_input, _, _ = self.terms["input"]
        self.tallies = {"input": _StageTally(samples, constant_bound=own_input)}
        for stage in snn.stages:
            constant = 0.0 if isinstance(stage, TimePool) else None  # pools are exact
            self.tallies[stage.name] = _StageTally(samples, constant_bound=constant)
        self.raster: dict | None = None  # sample 0's spike times of every stage

    def add(self, lo, hi, ref_out, ref_times, hw_out, hw_times) -> None:
        """First pass: errors, bounds and counts of every stage on one chunk."""
        if self.reference_output is None:
            self.reference_output = np.empty((self.samples, *ref_out.shape[1:]), ref_out.dtype)
        self.reference_output[lo:hi] = ref_out
        if lo == 0 and hi > 0:
            self.raster = {
                "reference": {k: np.array(v[0]).reshape(-1) for k, v in ref_times.items()},
                "hardware": {k: np.array(v[0]).reshape(-1) for k, v in hw_times.items()},
            }
        # The encoded input: hardware values against the reference encoding.
        ref_in = _values(ref_times["input"], INPUT_WINDOW[1])
        hw_in = _values(hw_times["input"], INPUT_WINDOW[1])
        diff = ref_in - hw_in
        self.tallies["input"].add(
            lo, hi, diff, np.abs(diff), None, ref_in,
            ref_t=ref_times["input"], hw_t=hw_times["input"],
        )
        previous_hw = hw_in
        hw_values = {"input": hw_in}  # every stage's hardware values: shortcut sources
        for stage in self.snn.stages:
            hw_stage = self.hw_snn.stage(stage.name)
            tally = self.tallies[stage.name]
            statistical = stage.name in self.statistics
            if isinstance(stage, OutputLayer):
                potential, bound, sigma = self._local(stage, previous_hw, hw_values)
                tails = _beyond_tails(potential, bound, sigma, None) if statistical else None
                n = hi - lo
                local = potential.reshape(n, -1)
                local_err = np.abs(hw_out - local)
                tail_rows = None if tails is None else tails.reshape(n, -1)
                tally.add(
                    lo, hi, ref_out - hw_out, local_err, bound.reshape(n, -1), local, tail_rows
                )
                break
            ref_t = ref_times[stage.name]
            hw_t = hw_times[stage.name]
            ref_v = _values(ref_t, stage.t_max)
            hw_v = _values(hw_t, hw_stage.t_max)
            tails = None
            if isinstance(stage, TimePool):
                s = stage.sign[None, :, None, None]
                pooled = ops.maxpool2d(previous_hw * s, stage.kernel, stage.stride, stage.padding)
                local = pooled * s
                bound = None  # the constant 0
            else:
                potential, bound, sigma = self._local(stage, previous_hw, hw_values)
                if statistical:
                    tails = _beyond_tails(potential, bound, sigma, stage.window)
                local = np.clip(potential, 0.0, stage.window)
            tally.add(
                lo, hi, ref_v - hw_v, np.abs(hw_v - local), bound, local, tails, ref_t, hw_t
            )
            previous_hw = hw_v
            hw_values[stage.name] = hw_v

    def add_distribution(self, lo, hi, ref_out, ref_times, hw_out, hw_times) -> None:
        """Second pass: the histograms and plotted spike times of every stage on one chunk."""
        del lo, hi  # the chunks come in sample order
        ref_in = _values(ref_times["input"], INPUT_WINDOW[1])
        hw_in = _values(hw_times["input"], INPUT_WINDOW[1])
        self.tallies["input"].add_distribution(
            ref_in - hw_in, ref_times["input"], hw_times["input"]
        )
        for stage in self.snn.stages:
            tally = self.tallies[stage.name]
            if isinstance(stage, OutputLayer):
                tally.add_distribution(ref_out - hw_out)
                break
            ref_t, hw_t = ref_times[stage.name], hw_times[stage.name]
            diff = _values(ref_t, stage.t_max) - _values(hw_t, self.hw_snn.stage(stage.name).t_max)
            tally.add_distribution(diff, ref_t, hw_t)

    def _local(self, stage, previous_hw, hw_values) -> tuple:
        own, delta, input_error = self.terms[stage.name]
        return _local(
            stage, self.terms, own, delta, input_error, previous_hw, hw_values,
            self.statistics, self.sigmas,
        )

    def layers(self, hardware: Trace, allowed: float) -> list[LayerCheck]:
        """Every stage's row of the report; hardware: the run's trace (spike times not
        needed: its step sizes and saturation, early and overflow counts)."""
        rows = [
            self.tallies["input"].layer(
                "input", "input", np.prod(self.snn.input_shape), INPUT_WINDOW,
                hardware.step_size.get("input"), hardware.saturated_per_layer.get("input", 0),
                hardware.early_per_layer.get("input", 0), 0, allowed, False,
            )
        ]
        for stage in self.snn.stages:
            tally = self.tallies[stage.name]
            statistical = stage.name in self.statistics and not isinstance(stage, TimePool)
            overflow = hardware.overflow.get(stage.name, 0)
            if isinstance(stage, OutputLayer):
                rows.append(
                    tally.layer(
                        stage.name, "output", np.prod(stage.output_shape),
                        [stage.t_read, stage.t_read], None, 0, 0, overflow, allowed, statistical,
                    )
                )
                break
            rows.append(
                tally.layer(
                    stage.name,
                    "pool" if isinstance(stage, TimePool) else "spiking",
                    np.prod(stage.output_shape),
                    [stage.t_min, stage.t_max],
                    hardware.step_size.get(stage.name),
                    hardware.saturated_per_layer.get(stage.name, 0),
                    hardware.early_per_layer.get(stage.name, 0),
                    overflow,
                    allowed,
                    statistical,
                )
            )
        return rows

    def plots(self, layers: list[LayerCheck]) -> dict:
        """Figure data: each spiking stage's plotted spike times, sample 0's raster."""
        windows = {layer.name: layer.window for layer in layers}
        plots: dict = {
            "layers": {
                name: tally.plot_data(windows[name])
                for name, tally in self.tallies.items()
                if name != self.snn.output.name and name in windows
            }
        }
        raster = self.raster or {"reference": {}, "hardware": {}}
        plots["raster"] = {**raster, "windows": windows}
        return plots


def working_bytes(snn: TTFSNetwork, dep: Deployment) -> int:
    """Estimated memory (bytes) one sample of a cross-check takes: the reference's and the
    hardware's spike times of every stage and the hardware's values of every stage
    (float64, 3x the sum of the stage sizes), the local check's arrays of one stage
    (potential, bound, variance, sigma, errors, tails: 8x the widest stage), and the two
    runs' own working sets."""
    sizes = [int(np.prod(snn.input_shape))] + [int(np.prod(s.output_shape)) for s in snn.stages]
    itemsize = np.dtype(np.float64).itemsize
    run_bytes = getattr(dep, "working_bytes", None)
    hardware_run = int(run_bytes()) if callable(run_bytes) else simulate_working_bytes(snn)
    return (3 * sum(sizes) + 8 * max(sizes)) * itemsize + simulate_working_bytes(snn) + hardware_run


def crosscheck(
    snn: TTFSNetwork,
    dep: Deployment,
    x,
    y=None,
    hardware: Trace | None = None,
    reference: Trace | None = None,
    attribution: bool = True,
    sigmas: float = DEFAULT_SIGMAS,
    memory_budget=None,
) -> CrossCheckReport:
    """Run the reference simulator and the deployment on x (N, *input_shape) and compare.

    y: labels (N,) for accuracies. hardware / reference: traces already computed on
    the same x, to avoid running again; they must hold every stage's spike times (runs
    with keep=None: else a UsageError names the missing stages). ``dep.snn`` may differ
    from ``snn`` (e.g. other windows): hardware values are decoded with the deployment's
    own windows.
    attribution: also name the cause layer and effect (one partial run per stage and
    one rebuilt deployment per effect; on the digits models well under a second).
    sigmas: width k of the statistical bound of analog deployments.
    memory_budget: bytes (or "8G") for one chunk of samples (:mod:`neurodeploy.memory`;
    default the process-wide budget, NEURODEPLOY_MEMORY_BUDGET, else a fraction of the
    available memory). The batch is compared in chunks of samples that fit it
    (:func:`working_bytes` per sample): each chunk's spike times of every stage, run and
    reference, exist only while it is compared, and a deployment that streams its chunks
    (``Deployment.streams_chunks``: the emulator, the crossbar) holds no whole-batch
    spike times at all (Lava's run hands over the whole batch; given traces are read a
    chunk at a time). The report is the same, number for number, for any chunk size.
    With more than one chunk the runs go twice: the histograms' range and the plots'
    subsample depend on the whole batch's errors and spikes.
    """
    for which, trace in (("reference", reference), ("hardware", hardware)):
        if trace is not None:
            require_spike_times(
                trace, stages_with_spike_times(snn), f"crosscheck ({which} trace)",
                "the cross-check compares every stage's spike times",
            )
    x = snn.source.check_input(x) if snn.source is not None else np.asarray(x, np.float64)
    given = reference if reference is not None else hardware
    n = given.num_samples if given is not None else x.shape[0]
    per_chunk = chunk_samples(working_bytes(snn, dep), memory_budget)
    profile = dep.profile
    allowed = profile.crosscheck.max_beyond_bound
    comparison = _Comparison(snn, dep, n, sigmas)
    events = SynapticEvents(dep.snn, n)

    def first_pass(lo, hi, ref_out, ref_times, hw_out, hw_times) -> None:
        comparison.add(lo, hi, ref_out, ref_times, hw_out, hw_times)
        events.add(lo, hi, hw_times)
        if n <= per_chunk:  # one chunk: the batch's ranges are known now
            comparison.add_distribution(lo, hi, ref_out, ref_times, hw_out, hw_times)

    if hardware is None and not dep.streams_chunks:
        hardware = dep.run(x)  # the whole batch at once (Lava)
    streamed = hardware is None
    run = _compare_chunks(snn, dep, x, n, per_chunk, reference, hardware, memory_budget, first_pass)
    if n > per_chunk:
        _compare_chunks(
            snn, dep, x, n, per_chunk, reference, None if streamed else hardware, memory_budget,
            comparison.add_distribution,
        )
    hardware = run
    reference_output = (
        comparison.reference_output if comparison.reference_output is not None
        else np.empty_like(hardware.output)
    )
    # the given reference trace, or one of the chunks' logits (for predictions, accuracy)
    ref_trace = reference if reference is not None else _outputs_only(reference_output)
    logit_err = np.abs(hardware.output - reference_output)
    layers = comparison.layers(hardware, allowed)
    agreement = float(np.mean(ref_trace.predictions == hardware.predictions)) if n else 1.0
    divergence = next((layer.name for layer in layers if not layer.within_bound), None)
    reasons = _reasons(layers, agreement, profile.crosscheck.required_agreement, allowed)
    found = None
    if attribution and n:
        found = attribute(
            snn, dep, x, y, ref_trace, hardware, per_chunk, memory_budget=memory_budget
        )
    if found is not None:
        costs = {cost.name: cost for cost in found.layers}
        for layer in layers:
            if layer.name in costs:
                layer.own_accuracy_loss = costs[layer.name].accuracy_loss
                layer.own_disagreement = costs[layer.name].disagreement
                layer.own_logit_error = costs[layer.name].logit_error_mean
    return CrossCheckReport(
        model=snn.name,
        profile=profile.name,
        hardware=profile.hardware,
        backend=hardware.backend,
        samples=n,
        accuracy_reference=None if y is None else ref_trace.accuracy(y),
        accuracy_hardware=None if y is None else hardware.accuracy(y),
        agreement=agreement,
        required_agreement=profile.crosscheck.required_agreement,
        max_beyond_bound=allowed,
        logit_error_mean=float(logit_err.mean()) if logit_err.size else 0.0,
        logit_error_max=float(logit_err.max()) if logit_err.size else 0.0,
        divergence_layer=divergence,
        cause_layer=None if found is None else found.cause_layer,
        cause_effect=None if found is None else found.cause_effect,
        bound_sigmas=float(sigmas) if comparison.statistics else None,
        attribution=None if found is None else asdict(found),
        metrics=neurobench_metrics(dep.snn, hardware, profile, dep.backend, dep, events),
        latency_s=None if hardware.latency_s is None else float(np.mean(hardware.latency_s)),
        energy_j=None if hardware.energy_j is None else float(np.mean(hardware.energy_j)),
        energy_breakdown=None if hardware.energy_j is None else dep.energy_breakdown(hardware),
        ok=divergence is None and agreement >= profile.crosscheck.required_agreement,
        reasons=reasons,
        layers=layers,
        plots=comparison.plots(layers),
    )


def _outputs_only(output: np.ndarray) -> Trace:
    """A trace holding the reference's logits (N, classes) alone (for the attribution)."""
    n = output.shape[0]
    return Trace(output=output, spike_times={}, neuron_layers=(), saturated_per_layer={},
                 latency=np.zeros(n))


def _compare_chunks(
    snn, dep, x, n, per_chunk, reference, hardware, memory_budget, consume
) -> Trace:
    """Call consume(lo, hi, ref_out, ref_times, hw_out, hw_times) for every chunk of at
    most per_chunk samples, in sample order: logits (hi - lo, classes) and spike times
    {stage: (hi - lo, *shape)} of every stage. reference / hardware: whole-batch traces
    (read a chunk at a time), or None: the reference simulated a chunk at a time, the
    hardware run (with keep=(): its chunks streamed, :class:`ChunkStream`). Returns the
    hardware trace (the given one, or the streamed run's: no spike times)."""

    def reference_chunk(lo: int, hi: int) -> tuple[np.ndarray, dict]:
        if reference is not None:
            return reference.output[lo:hi], _chunk_of(reference.spike_times, lo, hi)
        part = simulate(snn, x[lo:hi], memory_budget=memory_budget)
        return part.output, part.spike_times

    def with_reference(lo, hi, hw_out, hw_times) -> None:
        ref_out, ref_times = reference_chunk(lo, hi)
        consume(lo, hi, ref_out, ref_times, hw_out, hw_times)

    if hardware is None:
        return dep.run(x, keep=(), stream=ChunkStream(per_chunk, with_reference))
    for lo, hi in chunks(n, per_chunk):
        with_reference(lo, hi, hardware.output[lo:hi], _chunk_of(hardware.spike_times, lo, hi))
    return hardware


def _chunk_of(spike_times: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    """Views of samples lo..hi of whole-batch spike times."""
    return {name: t[lo:hi] for name, t in spike_times.items()}


def _local(
    stage, terms, own, delta, input_error, inputs, hw_values, statistics=None, sigmas=0.0
) -> tuple:
    """Exact potential (bias included) of a layer fed the hardware's own inputs, the bound
    that quantisation (and, with ``statistics``, the device model) explains on it, and the
    device model's standard deviation of each output (0 without statistics). With
    statistics the potential carries the device model's expected shift and the bound adds
    ``sigmas`` standard deviations. A join layer adds each shortcut's synapses on its
    source's hardware values, with that group's terms (keyed by
    :func:`~neurodeploy.deploy.shortcut_term_key`)."""
    statistics = statistics or {}
    groups = [(stage.synapses, inputs, (own, delta, input_error), statistics.get(stage.name))]
    for i, shortcut in enumerate(stage.shortcuts):
        key = shortcut_term_key(stage.name, i)
        groups.append(
            (
                shortcut.synapses,
                hw_values[shortcut.source],
                terms.get(key, (0.0, None, 0.0)),
                statistics.get(key),
            )
        )
    potential = stage.bias
    bound = np.zeros((inputs.shape[0], *stage.output_shape))
    variance = np.zeros_like(bound)
    for synapses, values, (g_own, g_delta, g_input), stat in groups:
        potential = potential + apply_synapses(synapses, values)
        bound = bound + _bound(synapses, stage.output_shape, g_own, g_delta, g_input, values)
        if stat is not None:
            # Devices independent: mean shifts and variances of the groups add.
            *pre_ops, affine = synapses
            x = apply_synapses(tuple(pre_ops), values) if pre_ops else values
            potential = potential + apply_synapses(abs_weight_ops((affine,), stat[0]), x)
            variance = variance + apply_synapses(abs_weight_ops((affine,), stat[1]), x * x)
    sigma = np.sqrt(np.maximum(variance, 0.0))
    return potential, bound + sigmas * sigma, sigma


def _bound(synapses, output_shape, own, delta, input_error, inputs: np.ndarray) -> np.ndarray:
    """Local quantisation bound of one synapse group for the given hardware inputs
    (N, *input), in the shape (N, *output_shape)."""
    bound = np.zeros((inputs.shape[0], *output_shape)) + own
    if delta is not None:
        bound = bound + apply_synapses(abs_weight_ops(synapses, delta), inputs)
    if input_error:
        # The error is on the inputs of the dense/conv map itself (a DAC drives the word
        # lines with the pooled, flattened values): an average pool in front does not
        # shrink it.
        *linear, affine = synapses
        weight = np.abs(affine.weight)
        nonzero = (apply_synapses(tuple(linear), inputs) > 0).astype(np.float64) * input_error
        bound = bound + apply_synapses(abs_weight_ops((affine,), weight), nonzero)
    return bound


def _beyond_tails(potential, bound, sigma, window: float | None) -> np.ndarray:
    """Per output (the shape of potential), the fraction a Gaussian error of the device
    model's sigma would put beyond the bound: the upper tail P(e > b + max(0, -p)) (none
    when p >= window) and the lower tail P(e < -(b + max(0, p - window))) (none when
    p <= 0); a clipped output can only leave its bound by crossing into the window.
    ``window`` None: not clipped."""
    safe = np.where(sigma > 0, sigma, 1.0)
    below = np.maximum(0.0, -potential) if window is not None else 0.0
    above = np.maximum(0.0, potential - window) if window is not None else 0.0
    upper = 1.0 - ndtr((bound + below) / safe)
    lower = 1.0 - ndtr((bound + above) / safe)
    if window is not None:
        upper = np.where(potential < window, upper, 0.0)
        lower = np.where(potential > 0, lower, 0.0)
    return np.where(sigma > 0, upper + lower, 0.0)


def bound_line(report: CrossCheckReport) -> str | None:
    """One sentence comparing each statistically bounded stage's fraction beyond its
    bound with what the device model expects (None without a statistical bound)."""
    analog = [layer for layer in report.layers if layer.bound_kind == "statistical"]
    if not analog or report.bound_sigmas is None:
        return None
    parts = ", ".join(
        f"{layer.name} {100 * layer.beyond_bound:.2f} % "
        f"(expected {100 * layer.beyond_expected:.2f} %)"
        for layer in analog
    )
    return (
        f"beyond the statistical bound ({report.bound_sigmas:g} sigma of the device model + "
        f"quantisation): {parts}; allowed {100 * report.max_beyond_bound:.2f} %"
    )


def cause_lines(report: CrossCheckReport) -> list[str]:
    """The cause layer and cause effect of a report as sentences (empty without
    attribution)."""
    found = report.attribution
    if not found:
        return []
    lines = []
    layer = next((c for c in found["layers"] if c["name"] == found["cause_layer"]), None)
    if layer is not None:
        loss = layer["accuracy_loss"]
        loss = "" if loss is None else f"{100 * loss:.2f} % accuracy, "
        lines.append(
            f"cause layer {layer['name']}: its own hardware effects alone (every other stage "
            f"exact) cost {loss}{100 * layer['disagreement']:.2f} % disagreement with the "
            f"reference, mean logit error {layer['logit_error_mean']:.3g}"
        )
    effect = next((e for e in found["effects"] if e["effect"] == found["cause_effect"]), None)
    if effect is not None:
        gain = effect["accuracy_recovered"]
        gain = "" if gain is None else f"{100 * gain:+.2f} % accuracy, "
        lines.append(
            f"cause effect {effect['effect']}: switching it off ({effect['ablation']}) "
            f"recovers {gain}{100 * effect['disagreement_recovered']:.2f} % agreement and "
            f"{effect['logit_error_recovered']:.3g} of the mean logit error"
        )
    return lines


def _reasons(layers: list[LayerCheck], agreement: float, required: float, allowed: float):
    reasons = []
    for layer in layers:
        if layer.within_bound and not layer.saturated and not layer.early and not layer.overflow:
            continue
        parts = []
        if not layer.within_bound:
            steps = (
                f" = {layer.local_error_max / layer.step_size:.1f} steps" if layer.step_size else ""
            )
            explains = (
                "the device model and quantisation explain"
                if layer.bound_kind == "statistical"
                else "quantisation explains"
            )
            parts.append(
                f"{100 * layer.beyond_bound:.1f} % of its outputs lie beyond the bound "
                f"{explains} (allowed {100 * allowed:.1f} %; worst local error "
                f"{layer.local_error_max:.3g}{steps}, bound {layer.bound_max:.3g})"
            )
        if layer.saturated:
            parts.append(
                f"{layer.saturated} values exceeded the window (too short a window: "
                "calibrate on more representative data or raise zeta)"
            )
        if layer.early:
            parts.append(
                f"{layer.early} neurons fired before their window opened (their membrane "
                "crossed threshold while inputs still arrived: the conversion's no-early-spike "
                "condition does not hold for these inputs)"
            )
        if layer.overflow:
            parts.append(
                f"{layer.overflow} saturations of the membrane, current or ADC "
                "(too few bits or too narrow a range)"
            )
        if not layer.within_bound and not (layer.saturated or layer.early or layer.overflow):
            parts.append(
                "the hardware computes this layer differently from the converted "
                "network: check its weights, devices and faults"
            )
        reasons.append(f"{layer.name}: " + "; ".join(parts))
    if agreement < required:
        reasons.append(
            f"agreement {100 * agreement:.2f} % is below the required {100 * required:.2f} %"
        )
    return reasons


def figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = [
    "CrossCheckReport",
    "LayerCheck",
    "bound_line",
    "cause_lines",
    "crosscheck",
    "figure_png",
    "working_bytes",
]
