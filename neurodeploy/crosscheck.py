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
from .metrics import neurobench_metrics
from .simulate import simulate, stages_with_spike_times
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


def _histogram(diff: np.ndarray) -> dict:
    span = float(np.abs(diff).max()) if diff.size else 0.0
    span = span if span > 0 else 1e-12
    counts, edges = np.histogram(diff, bins=_HISTOGRAM_BINS, range=(-span, span))
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}


def _layer(
    name,
    kind,
    neurons,
    window,
    step,
    diff,
    bound,
    local_err,
    beyond,
    missing,
    extra,
    saturated,
    early,
    overflow,
    allowed,
) -> LayerCheck:
    abs_diff = np.abs(diff)
    mean = float(abs_diff.mean()) if abs_diff.size else 0.0
    worst = float(abs_diff.max()) if abs_diff.size else 0.0
    return LayerCheck(
        name=name,
        kind=kind,
        neurons=int(neurons),
        window=[float(w) for w in window],
        step_size=None if step is None else float(step),
        error_mean=mean,
        error_max=worst,
        error_mean_steps=None if not step else mean / step,
        error_max_steps=None if not step else worst / step,
        histogram=_histogram(diff),
        bound_mean=float(np.mean(bound)),
        bound_max=float(np.max(bound)),
        local_error_max=float(local_err.max(initial=0.0)),
        beyond_bound=float(beyond),
        missing_spikes=int(missing),
        extra_spikes=int(extra),
        saturated=int(saturated),
        early=int(early),
        overflow=int(overflow),
        within_bound=bool(beyond <= allowed),
    )


def _beyond(local_err: np.ndarray, bound, scale: np.ndarray) -> tuple[np.ndarray, float]:
    limit = bound + _FLOAT_SLACK * (1.0 + np.abs(scale))
    mask = local_err > limit
    return mask, float(mask.mean()) if mask.size else 0.0


def crosscheck(
    snn: TTFSNetwork,
    dep: Deployment,
    x,
    y=None,
    hardware: Trace | None = None,
    reference: Trace | None = None,
    attribution: bool = True,
    sigmas: float = DEFAULT_SIGMAS,
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
    """
    reference = simulate(snn, x) if reference is None else reference
    hardware = dep.run(x) if hardware is None else hardware
    for which, trace in (("reference", reference), ("hardware", hardware)):
        require_spike_times(
            trace, stages_with_spike_times(snn), f"crosscheck ({which} trace)",
            "the cross-check compares every stage's spike times",
        )
    terms = dep.quantization_terms()
    statistics = dep.weight_statistics() if hasattr(dep, "weight_statistics") else {}
    if not any(np.any(var > 0) for _, var in statistics.values()):
        statistics = {}
    profile = dep.profile
    allowed = profile.crosscheck.max_beyond_bound
    hw_snn = dep.snn
    n = reference.num_samples
    layers: list[LayerCheck] = []
    plots: dict = {"layers": {}}

    # The encoded input: hardware values against the reference encoding.
    ref_in = _values(reference.spike_times["input"], INPUT_WINDOW[1])
    hw_in = _values(hardware.spike_times["input"], INPUT_WINDOW[1])
    own, _, _ = terms["input"]
    diff = ref_in - hw_in
    mask, beyond = _beyond(np.abs(diff), own, ref_in)
    layers.append(
        _layer(
            "input",
            "input",
            np.prod(snn.input_shape),
            INPUT_WINDOW,
            hardware.step_size.get("input"),
            diff,
            np.full(1, own),
            np.abs(diff),
            beyond,
            np.sum(
                np.isfinite(reference.spike_times["input"])
                & ~np.isfinite(hardware.spike_times["input"])
            ),
            np.sum(
                ~np.isfinite(reference.spike_times["input"])
                & np.isfinite(hardware.spike_times["input"])
            ),
            hardware.saturated_per_layer.get("input", 0),
            hardware.early_per_layer.get("input", 0),
            0,
            allowed,
        )
    )
    plots["layers"]["input"] = _plot_data(
        reference.spike_times["input"], hardware.spike_times["input"], INPUT_WINDOW
    )
    previous_hw = hw_in
    hw_values = {"input": hw_in}  # every stage's hardware values: shortcut sources
    logit_err = np.abs(hardware.output - reference.output)
    for stage in snn.stages:
        hw_stage = hw_snn.stage(stage.name)
        if isinstance(stage, OutputLayer):
            own, delta, input_error = terms[stage.name]
            potential, bound, sigma = _local(
                stage, terms, own, delta, input_error, previous_hw, hw_values, statistics, sigmas
            )
            expected = _expected_beyond(potential, bound, sigma, None)
            local = potential.reshape(n, -1)
            bound = bound.reshape(n, -1)
            local_err = np.abs(hardware.output - local)
            _, beyond = _beyond(local_err, bound, local)
            diff = reference.output - hardware.output
            layers.append(
                _layer(
                    stage.name,
                    "output",
                    np.prod(stage.output_shape),
                    [stage.t_read, stage.t_read],
                    None,
                    diff,
                    bound,
                    local_err,
                    beyond,
                    0,
                    0,
                    0,
                    0,
                    hardware.overflow.get(stage.name, 0),
                    allowed,
                )
            )
            _mark_statistical(layers[-1], stage.name in statistics, expected)
            break
        ref_t = reference.spike_times[stage.name]
        hw_t = hardware.spike_times[stage.name]
        ref_v = _values(ref_t, stage.t_max)
        hw_v = _values(hw_t, hw_stage.t_max)
        if isinstance(stage, TimePool):
            s = stage.sign[None, :, None, None]
            local = ops.maxpool2d(previous_hw * s, stage.kernel, stage.stride, stage.padding) * s
            bound = np.zeros(1)
            expected = 0.0
            kind = "pool"
        else:
            own, delta, input_error = terms[stage.name]
            potential, bound, sigma = _local(
                stage, terms, own, delta, input_error, previous_hw, hw_values, statistics, sigmas
            )
            expected = _expected_beyond(potential, bound, sigma, stage.window)
            local = np.clip(potential, 0.0, stage.window)
            kind = "spiking"
        local_err = np.abs(hw_v - local)
        _, beyond = _beyond(local_err, bound, local)
        ref_fired, hw_fired = np.isfinite(ref_t), np.isfinite(hw_t)
        layers.append(
            _layer(
                stage.name,
                kind,
                np.prod(stage.output_shape),
                [stage.t_min, stage.t_max],
                hardware.step_size.get(stage.name),
                ref_v - hw_v,
                bound,
                local_err,
                beyond,
                np.sum(ref_fired & ~hw_fired),
                np.sum(~ref_fired & hw_fired),
                hardware.saturated_per_layer.get(stage.name, 0),
                hardware.early_per_layer.get(stage.name, 0),
                hardware.overflow.get(stage.name, 0),
                allowed,
            )
        )
        _mark_statistical(layers[-1], stage.name in statistics, expected)
        plots["layers"][stage.name] = _plot_data(ref_t, hw_t, [stage.t_min, stage.t_max])
        previous_hw = hw_v
        hw_values[stage.name] = hw_v

    agreement = float(np.mean(reference.predictions == hardware.predictions)) if n else 1.0
    divergence = next((layer.name for layer in layers if not layer.within_bound), None)
    reasons = _reasons(layers, agreement, profile.crosscheck.required_agreement, allowed)
    found = attribute(snn, dep, x, y, reference, hardware) if attribution and n else None
    if found is not None:
        costs = {cost.name: cost for cost in found.layers}
        for layer in layers:
            if layer.name in costs:
                layer.own_accuracy_loss = costs[layer.name].accuracy_loss
                layer.own_disagreement = costs[layer.name].disagreement
                layer.own_logit_error = costs[layer.name].logit_error_mean
    plots["raster"] = {
        "reference": {k: v[0].reshape(-1) for k, v in reference.spike_times.items()},
        "hardware": {k: v[0].reshape(-1) for k, v in hardware.spike_times.items()},
        "windows": {layer.name: layer.window for layer in layers},
    }
    return CrossCheckReport(
        model=snn.name,
        profile=profile.name,
        hardware=profile.hardware,
        backend=hardware.backend,
        samples=n,
        accuracy_reference=None if y is None else reference.accuracy(y),
        accuracy_hardware=None if y is None else hardware.accuracy(y),
        agreement=agreement,
        required_agreement=profile.crosscheck.required_agreement,
        max_beyond_bound=allowed,
        logit_error_mean=float(logit_err.mean()) if logit_err.size else 0.0,
        logit_error_max=float(logit_err.max()) if logit_err.size else 0.0,
        divergence_layer=divergence,
        cause_layer=None if found is None else found.cause_layer,
        cause_effect=None if found is None else found.cause_effect,
        bound_sigmas=float(sigmas) if statistics else None,
        attribution=None if found is None else asdict(found),
        metrics=neurobench_metrics(dep.snn, hardware, profile, dep.backend, dep),
        latency_s=None if hardware.latency_s is None else float(np.mean(hardware.latency_s)),
        energy_j=None if hardware.energy_j is None else float(np.mean(hardware.energy_j)),
        energy_breakdown=None if hardware.energy_j is None else dep.energy_breakdown(hardware),
        ok=divergence is None and agreement >= profile.crosscheck.required_agreement,
        reasons=reasons,
        layers=layers,
        plots=plots,
    )


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


def _expected_beyond(potential, bound, sigma, window: float | None) -> float:
    """Fraction of outputs a Gaussian error of the device model's sigma would put beyond
    the bound: per output the upper tail P(e > b + max(0, -p)) (none when p >= window) and
    the lower tail P(e < -(b + max(0, p - window))) (none when p <= 0); a clipped output
    can only leave its bound by crossing into the window. ``window`` None: not clipped."""
    safe = np.where(sigma > 0, sigma, 1.0)
    below = np.maximum(0.0, -potential) if window is not None else 0.0
    above = np.maximum(0.0, potential - window) if window is not None else 0.0
    upper = 1.0 - ndtr((bound + below) / safe)
    lower = 1.0 - ndtr((bound + above) / safe)
    if window is not None:
        upper = np.where(potential < window, upper, 0.0)
        lower = np.where(potential > 0, lower, 0.0)
    tails = np.where(sigma > 0, upper + lower, 0.0)
    return float(tails.mean()) if tails.size else 0.0


def _mark_statistical(layer: LayerCheck, statistical: bool, expected: float) -> None:
    if statistical:
        layer.bound_kind = "statistical"
        layer.beyond_expected = min(1.0, expected)


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


def _plot_data(ref_t: np.ndarray, hw_t: np.ndarray, window, limit: int = 4000) -> dict:
    ref = ref_t.reshape(-1)
    hw = hw_t.reshape(-1)
    either = np.flatnonzero(np.isfinite(ref) | np.isfinite(hw))
    if either.size > limit:  # a fixed, evenly spread subsample keeps pages small
        either = either[np.linspace(0, either.size - 1, limit).astype(int)]
    return {"reference": ref[either], "hardware": hw[either], "window": list(window)}


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
]
