"""``Trace``: what one run of a network on a batch of samples produced.

Every backend (reference simulator, emulator, Lava, crossbar) returns this
type, so cross-checks and reports never care which backend made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from .errors import UsageError


@dataclass(frozen=True, eq=False)
class Trace:
    """Result of running N samples.

    output: (N, classes) decoded logits. predictions: (N,) argmax of output.
    spike_times: stage name -> (N, *stage shape) spike times in time units,
    ``inf`` where a neuron does not spike; "input" holds the encoded input. A run
    may keep only some stages (``simulate(..., keep=...)``, ``Deployment.run(...,
    keep=...)``): the counts of every stage stay in spikes_per_layer.
    neuron_layers: names of the stages whose neurons spike (the input and
    the hidden layers; pools only route spikes, the output layer does not spike).
    spike_count: (N,) spikes per sample over the neuron layers.
    spikes_per_neuron: mean spikes per neuron of the neuron layers.
    saturated: neurons (summed over samples) whose value exceeded their window
    (they fire when it opens, or before: the decoded value is then clipped or
    wrong); inputs outside [p, q] count under "input". A clipped ReLU's layer
    (its window is the clip) never counts: its neurons above the window give
    the clip, which is the layer's function.
    saturated_per_layer: the same per stage.
    early: neurons (summed over samples) that fired before their window opened
    although their value fits in the window: an alpha1 membrane that crossed its
    threshold while inputs were still arriving (its value is then wrong). Not
    saturation. b1 neurons cannot (they ramp from t_min): their layers count 0.
    early_per_layer: the same per stage; every backend fills every neuron layer.
    latency: (N,) time (time units) at which each sample's output was read.
    backend: name of what produced the trace.
    latency_s, energy_j: (N,) seconds to the output and joules per sample, from
    the hardware profile (None for the reference simulator).
    step_size: stage name -> time units per time step, for discrete-time
    backends (empty in continuous time).
    overflow: stage name -> count of hardware saturations that are not window
    saturations (membrane or current clipping, ADC clipping).
    spikes_per_layer: stage name -> (N,) spikes per sample of the stage, for every stage
    with spike times, kept or not (filled by the reference simulator, the emulator and
    the crossbar, and by any run with keep; empty: counted from spike_times).
    neurons_per_layer: stage name -> neurons per sample, alike.
    """

    output: np.ndarray
    spike_times: dict[str, np.ndarray]
    neuron_layers: tuple[str, ...]
    saturated_per_layer: dict[str, int]
    latency: np.ndarray
    backend: str = "reference"
    latency_s: np.ndarray | None = None
    energy_j: np.ndarray | None = None
    step_size: dict[str, float] = field(default_factory=dict)
    overflow: dict[str, int] = field(default_factory=dict)
    early_per_layer: dict[str, int] = field(default_factory=dict)
    spikes_per_layer: dict[str, np.ndarray] = field(default_factory=dict)
    neurons_per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        return np.argmax(self.output, axis=1)

    @property
    def num_samples(self) -> int:
        return int(self.output.shape[0])

    def layer_spikes(self, name: str) -> np.ndarray:
        """(N,) spikes per sample of one stage (from spikes_per_layer when it has it)."""
        if name in self.spikes_per_layer:
            return self.spikes_per_layer[name]
        return np.count_nonzero(
            np.isfinite(self.spike_times[name].reshape(self.num_samples, -1)), axis=1
        )

    def layer_neurons(self, name: str) -> int:
        """Neurons per sample of one stage."""
        if name in self.neurons_per_layer:
            return int(self.neurons_per_layer[name])
        return int(np.prod(self.spike_times[name].shape[1:]))

    def has_spikes_of(self, name: str) -> bool:
        """True when the trace has spike counts of stage ``name`` (kept or not)."""
        return name in self.spikes_per_layer or name in self.spike_times

    @cached_property
    def spike_count(self) -> np.ndarray:
        counts = np.zeros(self.num_samples, dtype=np.int64)
        for name in self.neuron_layers:
            counts += self.layer_spikes(name)
        return counts

    @property
    def neuron_count(self) -> int:
        """Neurons per sample in the neuron layers."""
        return sum(self.layer_neurons(name) for name in self.neuron_layers)

    @property
    def spikes_per_neuron(self) -> float:
        if not self.num_samples:
            return 0.0
        return float(self.spike_count.mean() / self.neuron_count)

    @property
    def saturated(self) -> int:
        return int(sum(self.saturated_per_layer.values()))

    @property
    def early(self) -> int:
        return int(sum(self.early_per_layer.values()))

    def trimmed(self, keep) -> Trace:
        """This trace holding the spike times of the stages in ``keep`` only (a set of
        names; None: this trace itself); the spike counts and neuron counts of every stage
        it held stay in spikes_per_layer and neurons_per_layer."""
        if keep is None:
            return self
        counts = {**self.spikes_per_layer}
        neurons = {**self.neurons_per_layer}
        for name in self.spike_times:
            counts[name] = self.layer_spikes(name)
            neurons[name] = self.layer_neurons(name)
        kept = {name: t for name, t in self.spike_times.items() if name in keep}
        return replace(self, spike_times=kept, spikes_per_layer=counts, neurons_per_layer=neurons)

    def accuracy(self, labels) -> float:
        """Fraction of samples whose prediction equals ``labels`` (N,)."""
        labels = np.asarray(labels)
        return float(np.mean(self.predictions == labels)) if labels.size else float("nan")


def require_spike_times(trace: Trace, names, who: str, why: str) -> None:
    """Raise UsageError naming the stages of ``names`` whose spike times ``trace`` does
    not hold (a run with keep=...). who: what refuses ("metrics"); why: what it needs
    the spike times for."""
    missing = [name for name in names if name not in trace.spike_times]
    if missing:
        raise UsageError(
            f"{who}: the trace holds no spike times of {missing} (a run with keep=...); "
            f"{why}: run with keep=None"
        )
