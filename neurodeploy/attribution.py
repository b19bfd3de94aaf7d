"""Attribution: which stage, and which hardware effect, cost the accuracy.

Two measurements, both against the reference SNN on the same samples:

- **Stage at a time** (names the *cause layer*): for every stage with hardware effects
  (the input encoding, each hidden layer, the output layer) the network runs exactly
  (float64, the reference's arithmetic) except that one stage, which is computed as the
  deployment computes it (its :meth:`~neurodeploy.deploy.Deployment.stage_runner`): its
  weights, its rounding of the spike times it receives and emits, its thresholds, ramp,
  registers, devices, converters and read noise. The stage's inputs are the reference's
  values, re-encoded on the hardware's time frame. The accuracy loss, the prediction
  disagreement with the reference and the mean |logit error| of that run are what the
  stage's own effects cost; the stage whose run disagrees most is the cause layer, and
  among stages whose disagreement counts are within two Poisson standard deviations of
  the largest (not distinguishable on these samples) the one with the larger logit
  error. Pools compute exactly on every backend and are not listed.
  (A stage that rounds its inputs to a step grid counts that rounding as its own, so the
  input encoding's rounding also shows in the first layer's cost.)
- **One effect off at a time** (names the *cause effect*): the deployment is built again
  from its profile and seed with one effect switched off through
  :meth:`~neurodeploy.profile.HardwareProfile.with_overrides` (e.g. ``weights.bits``
  null, 16x finer time steps, ``crossbar.read_noise_scale`` 0, faults 0) and run on the
  whole network; every random effect draws from its own seeded stream, so the others
  stay the same draws. What the run recovers (accuracy, agreement, logit error) against
  the rebuilt deployment with every effect on (the *baseline*) is the effect's cost; the
  effect that recovers most agreement is the cause effect (near-ties as for layers). A
  deployment whose windows differ from the reference's (``retime``) adds the ablation
  "the reference's windows" (its cost: values clipped at too short a window).
- **Deployment state.** When the baseline does not reproduce the hardware run, the
  deployment was changed after it was built (weights, devices) or its backend differs
  from its model: the difference between the run and the baseline is one more cost, named
  by comparing the programmed state (devices moved to g_min or g_max are stuck-at faults;
  changed weight mantissas are changed weights).

A Lava deployment is modelled by the emulator with the same profile (its fixed_pt
processes are bit-exact with it, tests/test_lava.py); the baseline check shows any gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import ops
from .backends.common import input_window_step
from .memory import chunks
from .profile import MAX_STEPS_PER_WINDOW
from .simulate import encode_input
from .trace import Trace
from .ttfs import INPUT_WINDOW, OutputLayer, SpikingLayer, TimePool, TTFSNetwork, apply_synapses

# Names of the effects, as the reports print them.
WEIGHT_QUANTISATION = "weight quantisation"
TIME_STEPS = "spike-time steps / input rounding"
THRESHOLD_RAMP = "threshold/ramp rounding"
MEMBRANE_SATURATION = "membrane saturation/overflow"
WINDOW_SATURATION = "window saturation (too short a window)"
ADC = "ADC clipping/quantisation"
DAC = "DAC (input pulse quantisation)"
READ_NOISE = "read noise"
PROGRAMMING_NOISE = "programming noise"
DRIFT = "drift"
VARIABILITY = "device variability"
FAULTS = "stuck-at faults"
CHANGED_WEIGHTS = "programmed weights differ from the profile's"
CHANGED_DEVICES = "device conductances differ from the profile's"
BACKEND_GAP = "backend differs from its model"

# How much finer the time grid of the "spike-time steps" ablation is: 16 x the steps
# gives 4 more bits of spike-time resolution, making that rounding negligible next to
# the others (capped at the profile's limit).
FINER_STEPS = 16

# Mantissa bits of the "weight quantisation" ablation on digital cores: 16 bits round a
# weight to 2^-16 of the layer's largest, far below every other effect here.
FINE_WEIGHT_BITS = 16

METHOD = (
    "stage at a time: one stage computed as the hardware does, every other stage exact; "
    "effects: the deployment rebuilt from its profile and seed with one effect off"
)


@dataclass
class StageCost:
    """What one stage's own hardware effects cost (the stage-at-a-time run)."""

    name: str
    kind: str  # input | spiking | output
    accuracy: float | None  # accuracy of the run (None without labels)
    accuracy_loss: float | None  # reference accuracy - accuracy
    disagreement: float  # fraction of predictions that differ from the reference's
    logit_error_mean: float  # mean |logit - reference logit|


@dataclass
class EffectCost:
    """What one effect costs: the run with it switched off against the baseline."""

    effect: str
    ablation: str  # how it was switched off, e.g. "weights.bits=None"
    accuracy: float | None  # accuracy with the effect off
    accuracy_recovered: float | None  # accuracy with it off - accuracy with it on
    disagreement: float  # disagreement with the reference with the effect off
    disagreement_recovered: float  # disagreement with it on - with it off
    logit_error_mean: float
    logit_error_recovered: float


@dataclass
class Attribution:
    method: str
    layers: list[StageCost]
    effects: list[EffectCost]
    cause_layer: str | None
    cause_effect: str | None
    matches_profile: bool  # the rebuilt deployment reproduces the hardware run
    notes: list[str] = field(default_factory=list)


def _values(t: np.ndarray, t_end: float) -> np.ndarray:
    return np.where(np.isfinite(t), t_end - t, 0.0)


def _times(values: np.ndarray, t_end: float) -> np.ndarray:
    """Spike times encoding values (>= 0) in a window that ends at t_end; 0 is silence."""
    return np.where(values > 0, t_end - values, np.inf)


def exact_potential(stage, inputs: np.ndarray, values: dict) -> np.ndarray:
    """Potential (bias included) of a layer computed exactly from input values, shortcut
    sources' values from ``values``."""
    potential = apply_synapses(stage.synapses, inputs) + stage.bias
    for shortcut in stage.shortcuts:
        potential = potential + apply_synapses(shortcut.synapses, values[shortcut.source])
    return potential


def one_stage_on_hardware(
    snn: TTFSNetwork, hw_snn: TTFSNetwork, runner, x, reference_input: np.ndarray, name: str
) -> np.ndarray:
    """Logits (N, classes) of ``snn`` with stage ``name`` (or "input") computed by
    ``runner`` (a :class:`~neurodeploy.deploy.StageRunner` of a deployment of hw_snn),
    every other stage exact. Values cross between the two time frames as values."""
    n = reference_input.shape[0]
    if name == "input":
        values = {"input": _values(runner.encode(x), INPUT_WINDOW[1])}
    else:
        values = {"input": reference_input}
    previous = "input"
    for stage in snn.stages:
        inputs = values[previous]
        if isinstance(stage, TimePool):
            s = stage.sign[None, :, None, None]
            out = ops.maxpool2d(inputs * s, stage.kernel, stage.stride, stage.padding) * s
        elif stage.name == name:
            hw_stage = hw_snn.stage(stage.name)
            t_in = _times(inputs, input_window_step(hw_snn, hw_stage))
            shortcut_in = tuple(_times(values[sc.source], sc.t_source) for sc in hw_stage.shortcuts)
            if isinstance(stage, OutputLayer):
                return np.asarray(runner.output(hw_stage, t_in, shortcut_in)).reshape(n, -1)
            t_out = runner.spiking(hw_stage, t_in, shortcut_in)[0]
            out = _values(t_out, hw_stage.t_max)
        else:
            potential = exact_potential(stage, inputs, values)
            if isinstance(stage, OutputLayer):
                return potential.reshape(n, -1)
            out = np.clip(potential, 0.0, stage.window)
        values[stage.name] = out
        previous = stage.name
    raise AssertionError("the network has no output layer")


def _outcome(logits: np.ndarray, reference: Trace, y) -> tuple[float | None, float, float]:
    """(accuracy or None, disagreement with the reference, mean |logit error|)."""
    predictions = np.argmax(logits, axis=1)
    accuracy = None if y is None else float(np.mean(predictions == np.asarray(y)))
    disagreement = float(np.mean(predictions != reference.predictions))
    error = float(np.mean(np.abs(logits - reference.output))) if logits.size else 0.0
    return accuracy, disagreement, error


def _model_of(dep):
    """The deployment whose stage functions and rebuilds model ``dep``, and the overrides
    its rebuilds need (a Lava deployment: the emulator; floating_pt: float weights)."""
    if dep.backend == "lava":
        from .backends.emulator import EmulatorDeployment

        base = {}
        if getattr(dep, "tag", "fixed_pt") == "floating_pt":
            base = {"weights.bits": None, "neuron.membrane_bits": None}
        return EmulatorDeployment, base
    return type(dep), {}


def _rebuild(dep, snn: TTFSNetwork, overrides: dict):
    cls, base = _model_of(dep)
    merged = {**base, **overrides}
    widened = {"weights.bits", "neuron.membrane_bits", "timing.steps_per_window"} & set(merged)
    if widened and getattr(dep.profile.neuron, "number_format", "generic") != "generic":
        # Loihi's formats fix the register widths: an ablation that widens them (more
        # weight or membrane bits, or a finer step grid, whose thresholds and ramps need
        # more bits than Loihi's threshold and bias mantissas hold) switches to the
        # generic arithmetic of any width, in which the effect alone is switched off.
        merged["neuron.number_format"] = "generic"
    profile = dep.profile.with_overrides(merged, origin="attribution") if merged else dep.profile
    return cls(snn, profile, seed=dep.seed)


def _ablations(dep, hardware: Trace) -> list[tuple[str, dict]]:
    """(effect, overrides that switch it off) for every effect the profile has on."""
    p = dep.profile
    out = []
    steps = p.timing.steps_per_window
    finer_steps = None if steps is None else min(steps * FINER_STEPS, MAX_STEPS_PER_WINDOW)
    if p.hardware == "digital":
        bits, membrane = p.weights.bits, p.neuron.membrane_bits
        if bits is not None and bits < FINE_WEIGHT_BITS:
            # An integer membrane needs integer weights: finer mantissas, and a membrane
            # wider by as many bits, so its headroom over the sums stays the same.
            finer = {"weights.bits": FINE_WEIGHT_BITS}
            if membrane is not None:
                finer["neuron.membrane_bits"] = min(52, membrane + FINE_WEIGHT_BITS - bits)
            out.append((WEIGHT_QUANTISATION, finer))
        if finer_steps is not None and finer_steps > steps:
            out.append((TIME_STEPS, {"timing.steps_per_window": finer_steps}))
        if p.neuron.membrane_bits is not None:
            overflowed = sum(hardware.overflow.values()) > 0
            out.append(
                (
                    MEMBRANE_SATURATION if overflowed else THRESHOLD_RAMP,
                    {"neuron.membrane_bits": None},
                )
            )
    elif p.hardware == "crossbar":
        cb, conv, faults = p.crossbar, p.converter, p.faults
        if cb.levels is not None:
            out.append((WEIGHT_QUANTISATION, {"crossbar.levels": None}))
        if finer_steps is not None and finer_steps > steps:
            out.append((TIME_STEPS, {"timing.steps_per_window": finer_steps}))
        if conv.dac_bits is not None:
            out.append((DAC, {"converter.dac_bits": None}))
        if conv.adc_bits is not None:
            out.append((ADC, {"converter.adc_bits": None}))
        if cb.prog_noise_scale > 0:
            out.append((PROGRAMMING_NOISE, {"crossbar.prog_noise_scale": 0.0}))
        if cb.read_noise_scale > 0:
            out.append((READ_NOISE, {"crossbar.read_noise_scale": 0.0}))
        if cb.drift_scale > 0 and cb.t_inference_s > 0:
            out.append((DRIFT, {"crossbar.drift_scale": 0.0}))
        if cb.variability > 0:
            out.append((VARIABILITY, {"crossbar.variability": 0.0}))
        if faults.stuck_on > 0 or faults.stuck_off > 0:
            out.append((FAULTS, {"faults.stuck_on": 0.0, "faults.stuck_off": 0.0}))
    return out


def _windows_differ(snn: TTFSNetwork, hw_snn: TTFSNetwork) -> bool:
    for stage in snn.stages:
        if isinstance(stage, SpikingLayer):
            other = hw_snn.stage(stage.name)
            if abs(other.window - stage.window) > 1e-12 * max(1.0, abs(stage.window)):
                return True
    return False


def _state_difference(dep, baseline) -> tuple[str, str]:
    """(effect, detail) naming how ``dep``'s programmed state differs from ``baseline``'s."""
    programs = getattr(dep, "programs", None)
    if programs and getattr(baseline, "programs", None):
        changed = []
        for name, prog in programs.items():
            other = baseline.programs.get(name)
            groups = [(name, prog, other)] + [
                (f"{name} shortcut from {sc.source}", sc, sc0)
                for sc, sc0 in zip(prog.shortcuts, other.shortcuts, strict=True)
            ]
            for label, group, group0 in groups:
                w, w0 = group.synapses[-1].weight, group0.synapses[-1].weight
                count = int(np.count_nonzero(w != w0)) if w.shape == w0.shape else w.size
                if count:
                    changed.append(f"{label}: {count} of {w.size} weights")
            if prog.threshold is not None and np.any(prog.threshold != other.threshold):
                changed.append(f"{name}: thresholds")
        if changed:
            return CHANGED_WEIGHTS, "; ".join(changed)
    layers = getattr(dep, "layers", None)
    if isinstance(layers, dict) and isinstance(getattr(baseline, "layers", None), dict):
        cb = dep.device
        moved, railed, where = 0, 0, []
        for name, layer in layers.items():
            for group, other in zip(layer.arrays, baseline.layers[name].arrays, strict=True):
                for tile, tile0 in zip(group.tiles, other.tiles, strict=True):
                    for g, g0 in ((tile.g_pos, tile0.g_pos), (tile.g_neg, tile0.g_neg)):
                        diff = g != g0
                        count = int(np.count_nonzero(diff))
                        if count:
                            rail = (g == cb.g_max_us) | (g == cb.g_min_us)
                            moved += count
                            railed += int(np.count_nonzero(diff & rail))
                            where.append(group.name)
        if moved:
            detail = (
                f"{moved} devices in {', '.join(dict.fromkeys(where))} differ from the "
                f"profile's ({railed} of them at g_min or g_max)"
            )
            return (FAULTS if railed * 2 >= moved else CHANGED_DEVICES), detail
    return BACKEND_GAP, f"the {dep.backend} run differs from the rebuilt model's"


def _best(items, key, samples: int):
    """The item with the most disagreement (key's first part, a fraction of ``samples``)
    and, among those whose disagreement count lies within two Poisson standard deviations
    of the largest (indistinguishable on this many samples), the largest logit error (key's
    second part). None when nothing costs anything."""
    scored = [item for item in items if key(item) > (0.0, 0.0)]
    if not scored:
        return None
    top = max(key(item)[0] for item in scored)
    tolerance = 2.0 * np.sqrt(max(top, 0.0) * samples) / max(samples, 1)
    close = [item for item in scored if key(item)[0] >= top - tolerance]
    return max(close, key=lambda item: key(item)[1])


def attribute(
    snn: TTFSNetwork,
    dep,
    x,
    y,
    reference: Trace,
    hardware: Trace,
    samples_per_chunk: int | None = None,
    memory_budget=None,
) -> Attribution | None:
    """Stage-at-a-time costs and effect ablations (see the module docstring); None when
    the deployment has no hardware effects (the ideal profile).

    x: (N, *input_shape) raw inputs; reference, hardware: runs on x, of which the
    outputs (N, classes) and the hardware's overflow counts are read (traces without
    spike times do: runs with keep=()); the reference's input spike times when it holds
    them, else x is encoded again. samples_per_chunk: the stage-at-a-time runs go through
    chunks of that many samples (None: the whole batch at once), the rebuilt deployments
    run with keep=() and ``memory_budget``; the costs are the same bits for any chunk."""
    if dep.profile.hardware == "ideal":
        return None
    model = dep if dep.backend != "lava" else _rebuild(dep, dep.snn, {})
    if model.stage_runner() is None:
        return None
    notes = []
    if model is not dep:
        notes.append(f"the {dep.backend} deployment is modelled by the {model.backend}")
    acc_ref, _, _ = _outcome(reference.output, reference, y)
    n = reference.num_samples
    per_chunk = n if samples_per_chunk is None else max(1, int(samples_per_chunk))
    x = np.asarray(x)

    def reference_input(lo: int, hi: int) -> np.ndarray:
        """Values (hi - lo, *input_shape) of the reference's input spikes."""
        times = reference.spike_times.get("input")
        times = encode_input(snn, x[lo:hi])[0] if times is None else times[lo:hi]
        return _values(times, INPUT_WINDOW[1])

    layers = []
    names = ["input"] + [s.name for s in snn.stages if not isinstance(s, TimePool)]
    for name in names:
        runner = model.stage_runner()  # one per stage: its noise streams run in sample order
        logits = np.empty_like(reference.output)
        for lo, hi in chunks(n, per_chunk):
            logits[lo:hi] = one_stage_on_hardware(
                snn, dep.snn, runner, x[lo:hi], reference_input(lo, hi), name
            )
        acc, disagreement, error = _outcome(logits, reference, y)
        kind = (
            "input"
            if name == "input"
            else ("output" if isinstance(snn.stage(name), OutputLayer) else "spiking")
        )
        layers.append(
            StageCost(name, kind, acc, None if acc is None else acc_ref - acc, disagreement, error)
        )

    hw_outcome = _outcome(hardware.output, reference, y)
    baseline_dep = _rebuild(dep, dep.snn, {})
    baseline_trace = baseline_dep.run(x, keep=(), memory_budget=memory_budget)
    base_outcome = _outcome(baseline_trace.output, reference, y)
    scale = 1.0 + float(np.abs(hardware.output).max(initial=0.0))
    matches = baseline_trace.output.shape == hardware.output.shape and bool(
        np.all(np.abs(baseline_trace.output - hardware.output) <= 1e-9 * scale)
    )

    def cost(effect, ablation, on, off) -> EffectCost:
        return EffectCost(
            effect=effect,
            ablation=ablation,
            accuracy=off[0],
            accuracy_recovered=None if off[0] is None else off[0] - on[0],
            disagreement=off[1],
            disagreement_recovered=on[1] - off[1],
            logit_error_mean=off[2],
            logit_error_recovered=on[2] - off[2],
        )

    effects = []
    if not matches:
        effect, detail = _state_difference(dep, baseline_dep)
        notes.append(f"the deployment does not reproduce its profile: {detail}")
        effects.append(
            cost(effect, "deployment rebuilt from its profile", hw_outcome, base_outcome)
        )
    for effect, overrides in _ablations(dep, hardware):
        trace = _rebuild(dep, dep.snn, overrides).run(x, keep=(), memory_budget=memory_budget)
        label = ", ".join(f"{k}={v}" for k, v in overrides.items())
        effects.append(cost(effect, label, base_outcome, _outcome(trace.output, reference, y)))
    if _windows_differ(snn, dep.snn):
        trace = _rebuild(dep, snn, {}).run(x, keep=(), memory_budget=memory_budget)
        effects.append(
            cost(
                WINDOW_SATURATION,
                "the reference's windows",
                base_outcome,
                _outcome(trace.output, reference, y),
            )
        )
    cause_layer = _best(layers, lambda s: (s.disagreement, s.logit_error_mean), n)
    cause_effect = _best(effects, lambda e: (e.disagreement_recovered, e.logit_error_recovered), n)
    return Attribution(
        method=METHOD,
        layers=layers,
        effects=effects,
        cause_layer=None if cause_layer is None else cause_layer.name,
        cause_effect=None if cause_effect is None else cause_effect.effect,
        matches_profile=matches,
        notes=notes,
    )


__all__ = ["Attribution", "EffectCost", "StageCost", "attribute", "one_stage_on_hardware"]
