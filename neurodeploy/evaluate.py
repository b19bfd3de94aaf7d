"""Compare a converted network's reference simulation with its ReLU ground truth."""

from __future__ import annotations

import numpy as np

from .network import Network
from .trace import Trace
from .ttfs import INPUT_WINDOW, SpikingLayer, TimePool, TTFSNetwork


def layer_table(snn: TTFSNetwork, trace: Trace | None = None) -> list[dict]:
    """One row per stage: kind, neurons, window, X_n, spikes per neuron, saturations;
    a layer that joins a residual branch also lists its shortcuts (source, delay)."""
    rows = [
        {
            "name": "input",
            "kind": "Input",
            "neurons": int(np.prod(snn.input_shape)),
            "t_min": INPUT_WINDOW[0],
            "t_max": INPUT_WINDOW[1],
        }
    ]
    for stage in snn.stages:
        row = {
            "name": stage.name,
            "kind": type(stage).__name__,
            "neurons": int(np.prod(stage.output_shape)),
        }
        if isinstance(stage, SpikingLayer):
            row.update(t_min=stage.t_min, t_max=stage.t_max, x_max=stage.x_max)
            if stage.clipped:  # window = the ReLU's clip
                row["clipped"] = True
        elif isinstance(stage, TimePool):
            row.update(t_min=stage.t_min, t_max=stage.t_max, kernel=stage.kernel)
            if stage.padding:
                row["padding"] = stage.padding
        else:
            row.update(t_read=stage.t_read)
        if getattr(stage, "shortcuts", ()):
            row["shortcuts"] = [
                {"source": sc.source, "delay": stage.delay(sc)} for sc in stage.shortcuts
            ]
        rows.append(row)
    if trace is not None:
        for row in rows:
            if trace.has_spikes_of(row["name"]):
                pairs = trace.num_samples * trace.layer_neurons(row["name"])
                spikes = int(trace.layer_spikes(row["name"]).sum())
                row["spikes_per_neuron"] = spikes / pairs if pairs else float("nan")
                row["saturated"] = int(trace.saturated_per_layer.get(row["name"], 0))
                row["early"] = int(trace.early_per_layer.get(row["name"], 0))
    return rows


def compare_with_relu(net: Network, snn: TTFSNetwork, trace: Trace, x, y=None) -> dict:
    """Figures of a reference run against ``net.forward`` on the same inputs x.

    Returns accuracy_relu and accuracy_snn (None without labels y), agreement
    of predictions, max_abs_error and relative_error (max |logit error| over
    max |logit|), spikes_per_neuron, latency (time units), saturated (values beyond
    their window) and early (spikes before the window opened with in-window values).
    """
    logits = net.forward(x)
    err = np.abs(trace.output - logits)
    scale = float(np.abs(logits).max()) if logits.size else 0.0
    relu_pred = np.argmax(logits, axis=1)
    summary = {
        "model": net.name,
        "neuron": snn.neuron,
        "zeta": snn.zeta,
        "calibration_size": snn.calibration_size,
        "samples": int(trace.num_samples),
        "accuracy_relu": None if y is None else float(np.mean(relu_pred == y)),
        "accuracy_snn": None if y is None else trace.accuracy(y),
        "agreement": float(np.mean(relu_pred == trace.predictions)),
        "max_abs_error": float(err.max()) if err.size else 0.0,
        "relative_error": float(err.max() / scale) if err.size and scale > 0 else 0.0,
        "spikes_per_neuron": trace.spikes_per_neuron,
        "latency": float(snn.latency),
        "saturated": trace.saturated,
        "early": trace.early,
    }
    return summary


def hardware_summary(reference: Trace, hardware: Trace, y=None) -> dict:
    """Figures of a hardware run against the reference SNN on the same samples."""
    err = np.abs(hardware.output - reference.output)
    mean = (lambda a: float(np.mean(a))) if hardware.num_samples else (lambda a: 0.0)
    return {
        "samples": hardware.num_samples,
        "accuracy_reference": None if y is None else reference.accuracy(y),
        "accuracy_hardware": None if y is None else hardware.accuracy(y),
        "agreement": float(np.mean(reference.predictions == hardware.predictions)),
        "mean_abs_logit_error": mean(err),
        "max_abs_logit_error": float(err.max()) if err.size else 0.0,
        "spikes_per_neuron_reference": reference.spikes_per_neuron,
        "spikes_per_neuron_hardware": hardware.spikes_per_neuron,
        "latency_s": mean(hardware.latency_s),
        "energy_j": mean(hardware.energy_j),
        "saturated": hardware.saturated,
        "early": hardware.early,
        "overflow": int(sum(hardware.overflow.values())),
    }
