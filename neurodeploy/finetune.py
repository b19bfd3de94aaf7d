"""Hardware-aware fine-tuning of a converted b1 TTFS network.

In the B1 parameterisation (Stanojevic et al., "High-performance deep spiking
neural networks with 0.3 spikes per neuron", Nat. Commun. 2024) a neuron's
spike time is t_i = t_max - clip(sum_j W_ij x_j + b_i, 0, B), with the input
values x_j = t_max_prev - t_j, so the exact spike-time gradients are
dt_i/dt_j = W_ij and dt_i/dW_ij = -x_j for a neuron that fires inside its
window, and zero for one that does not (silent, or saturated at the window's
start). Gradient descent on the SNN is therefore as well behaved as on the
ReLU network; here it runs in the value domain, through the project's own
layer ops and their gradients (neurodeploy.grad), on the weights and
thresholds (theta_i = B - b_i) of every layer. Residual shortcuts (delayed so
that a joining layer adds exactly its source's values) are linear synapses too:
their weights train (an identity shortcut only on its diagonal) and the
gradient flows back along them to their source layers.

The forward pass includes the target hardware: spike times on the step grid
and weights quantised as the emulator quantises them (digital profiles), or
conductances programmed and read by the crossbar backend with a fresh draw of
programming noise, variability, drift, faults and read noise per batch
(crossbar profiles). Gradients pass those effects straight through (the
straight-through estimator), so the network learns weights that tolerate them.

Windows follow the papers' rule: a layer's window grows when its values
leave it, B_n = max(B_n, (1 + zeta) max value). ``window_scale`` < 1 instead
shortens every window at the start and keeps it fixed: the network learns to
fit into the shorter latency. A clipped ReLU's window is its clip (ReLU6: 6)
and never grows; with ``window_scale`` it shrinks like the others, and the
result is a network clipped at the shorter window (saved as the ReLU's clip).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import ops
from .convert import retime, snn_to_network
from .errors import DataError, UsageError
from .grad import backward, forward_cached, maxpool_backward
from .network import Network
from .optim import Adam
from .profile import HardwareProfile, load_profile
from .ttfs import OutputLayer, SpikingLayer, TimePool, TTFSNetwork, apply_synapses


@dataclass
class FinetuneResult:
    """The fine-tuned SNN, the same as a ReLU network (save it with ``save_model``),
    and per epoch: mean training loss and accuracy on the hardware forward pass."""

    snn: TTFSNetwork
    network: Network
    history: list[dict] = field(default_factory=list)


class _Hardware:
    """The forward effects of one profile for one batch (see the module docstring)."""

    def __init__(self, snn: TTFSNetwork, profile: HardwareProfile, seed: int):
        self.snn = snn
        self.profile = profile
        self.steps = profile.timing.steps_per_window
        self.crossbar = None
        self.weights = {}
        self.shortcut_weights = {}
        if profile.hardware == "crossbar":
            from .backends.crossbar import CrossbarDeployment

            self.crossbar = CrossbarDeployment(snn, profile, seed=seed)
            self.read_rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
            self.stats = {"overflow": {}, "read_charge": 0.0}
        elif profile.hardware == "digital":
            from .backends.common import fold_average_pools
            from .backends.emulator import EmulatorDeployment

            # The emulator's own programs: weights as the chip holds them, in value units.
            programs = EmulatorDeployment(snn, profile, seed=seed).programs
            for stage in snn.stages:
                if isinstance(stage, (SpikingLayer, OutputLayer)):
                    prog = programs[stage.name]
                    _, pool_factor = fold_average_pools(stage.synapses, stage.input_shape)
                    hw = prog.synapses[-1].weight * prog.lsb / prog.dt_in / pool_factor
                    *linear, affine = stage.synapses
                    self.weights[stage.name] = (*linear, replace(affine, weight=hw))
                    for i, (shortcut, group) in enumerate(
                        zip(stage.shortcuts, prog.shortcuts, strict=True)
                    ):
                        # A source value x arrives as x / dt_src steps of the group's
                        # integer weight; one membrane unit is worth lsb.
                        hw = group.synapses[-1].weight * prog.lsb / group.dt_src
                        hw = hw / group.pool_factor
                        *linear, affine = shortcut.synapses
                        self.shortcut_weights[(stage.name, i)] = (
                            *linear,
                            replace(affine, weight=hw),
                        )

    def inputs(self, x01: np.ndarray) -> np.ndarray:
        if not self.steps:
            return x01
        return np.floor(x01 * self.steps + 0.5) / self.steps

    def potential(self, stage, values: np.ndarray) -> np.ndarray:
        """The membrane drive sum_j W_ij x_j the hardware computes (no bias)."""
        if self.crossbar is not None:
            return self.crossbar._read(
                self.crossbar.layers[stage.name],
                values,
                self.read_rng,
                {"overflow": {}, "read_charge": np.zeros(len(values))},
            )
        synapses = self.weights.get(stage.name, stage.synapses)
        return apply_synapses(synapses, values)

    def shortcut_potential(self, stage, index: int, values: np.ndarray) -> np.ndarray:
        """The drive the hardware's ``index``-th shortcut group of ``stage`` adds, for its
        source's values (N, *source shape)."""
        if self.crossbar is not None:
            group = self.crossbar.layers[stage.name].shortcuts[index]
            stats = {"overflow": {}, "read_charge": np.zeros(len(values))}
            return self.crossbar._read(group, values, self.read_rng, stats, group.name)
        synapses = self.shortcut_weights.get((stage.name, index), stage.shortcuts[index].synapses)
        return apply_synapses(synapses, values)

    def round(self, stage: SpikingLayer, y: np.ndarray) -> np.ndarray:
        if not self.steps:
            return y
        dt = stage.window / self.steps
        return dt * np.floor(y / dt + 0.5)


def _with_params(snn: TTFSNetwork, params: dict, windows: dict) -> TTFSNetwork:
    """The SNN with the trained weights, biases and windows (thresholds follow)."""
    stages = []
    for stage in snn.stages:
        if isinstance(stage, (SpikingLayer, OutputLayer)):
            *linear, affine = stage.synapses
            synapses = (*linear, replace(affine, weight=params[f"{stage.name}.w"]))
            shortcuts = tuple(
                replace(
                    sc,
                    synapses=(
                        *sc.synapses[:-1],
                        replace(sc.synapses[-1], weight=params[f"{stage.name}.shortcut{i}.w"]),
                    ),
                )
                for i, sc in enumerate(stage.shortcuts)
            )
            stage = replace(
                stage, synapses=synapses, bias=params[f"{stage.name}.b"], shortcuts=shortcuts
            )
        stages.append(stage)
    return retime(replace(snn, stages=tuple(stages)), windows)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(log_p[np.arange(n), labels].mean())
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


def loss_and_gradients(
    snn: TTFSNetwork, x01: np.ndarray, labels: np.ndarray, hardware: _Hardware | None = None
):
    """Cross-entropy of the output potentials and its exact gradients.

    x01: inputs already rescaled to [0, 1] (N, *input_shape). Returns (loss,
    gradients keyed "<layer>.w" / "<layer>.b" and "<layer>.shortcut<i>.w", logits,
    the largest value of each layer before clipping). Without ``hardware`` this is
    the ideal b1 SNN. A layer that joins a residual branch adds each shortcut's
    synapses on its source's values (the delay makes that exact, see
    neurodeploy.convert), so the gradient flows back along every shortcut too:
    the b1 SNN's gradient is the ReLU network's.
    """
    values = {"input": hardware.inputs(x01) if hardware else x01}
    # Stages whose values depend on trained parameters (not only on the input).
    trained = set()
    tape = []
    peaks = {}
    logits = None
    previous = "input"
    for stage in snn.stages:
        x = values[previous]
        if isinstance(stage, TimePool):
            s = stage.sign[None, :, None, None]
            tape.append((stage, previous, x))
            values[stage.name] = (
                ops.maxpool2d(x * s, stage.kernel, stage.stride, stage.padding) * s
            )
            if previous in trained:
                trained.add(stage.name)
            previous = stage.name
            continue
        drive, inputs = forward_cached(stage.synapses, x)
        if hardware is not None:
            drive = hardware.potential(stage, x)
        cached = []
        for i, shortcut in enumerate(stage.shortcuts):
            sc_drive, sc_inputs = forward_cached(shortcut.synapses, values[shortcut.source])
            if hardware is not None:
                sc_drive = hardware.shortcut_potential(stage, i, values[shortcut.source])
            drive = drive + sc_drive
            cached.append(sc_inputs)
        pre = drive + stage.bias
        trained.add(stage.name)
        if isinstance(stage, OutputLayer):
            logits = pre.reshape(len(pre), -1)
            tape.append((stage, previous, inputs, cached, None))
            break
        if not stage.clipped:  # a clipped layer's window is its clip: it does not grow
            peaks[stage.name] = float(pre.max())
        # b1: spikes inside the window carry the value; silent and saturated neurons
        # (before or after the window) have zero spike-time gradients (a clipped ReLU's
        # own gradient above its clip).
        fires = (pre > 0) & (pre < stage.window)
        y = np.clip(pre, 0.0, stage.window)
        values[stage.name] = hardware.round(stage, y) if hardware else y
        tape.append((stage, previous, inputs, cached, fires))
        previous = stage.name
    loss, grad = _cross_entropy(logits, labels)
    grads = {}
    # d loss / d values of each stage, summed over its consumers (main and shortcuts).
    value_grads = {snn.output.name: grad.reshape(len(grad), *snn.output.output_shape)}
    for entry in reversed(tape):
        stage = entry[0]
        grad = value_grads.pop(stage.name, None)
        if grad is None:  # pragma: no cover - every stage feeds the output
            continue
        if isinstance(stage, TimePool):
            _, source, x = entry
            if source in trained:
                _accumulate(
                    value_grads,
                    source,
                    maxpool_backward(
                        x, grad, stage.kernel, stage.stride, stage.sign, stage.padding
                    ),
                )
            continue
        _, source, inputs, cached, fires = entry
        if fires is not None:
            grad = grad * fires
        grads[f"{stage.name}.b"] = grad.sum(axis=0)
        grads[f"{stage.name}.w"], grad_in = backward(
            stage.synapses, inputs, grad, need_input=source in trained
        )
        if grad_in is not None:
            _accumulate(value_grads, source, grad_in)
        for index, (shortcut, sc_inputs) in enumerate(zip(stage.shortcuts, cached, strict=True)):
            key = f"{stage.name}.shortcut{index}.w"
            grads[key], grad_in = backward(
                shortcut.synapses, sc_inputs, grad, need_input=shortcut.source in trained
            )
            mask = _shortcut_mask(shortcut)
            if mask is not None:
                grads[key] = grads[key] * mask
            if grad_in is not None:
                _accumulate(value_grads, shortcut.source, grad_in)
    return loss, grads, logits, peaks


def _accumulate(value_grads: dict, name: str, grad: np.ndarray) -> None:
    value_grads[name] = grad if name not in value_grads else value_grads[name] + grad


def _shortcut_mask(shortcut) -> np.ndarray | None:
    """For an identity-like shortcut (a diagonal 1x1 conv or square dense, possibly after
    a flatten: the identity, scaled by folded batch norms), the mask of its diagonal, so
    training keeps it an identity with one weight per channel; None for a projection
    (all weights train)."""
    weight = shortcut.synapses[-1].weight
    n = weight.shape[0]
    if weight.shape[:2] != (n, n) or weight.size != n * n:
        return None
    diagonal = np.eye(n, dtype=bool)
    if np.any(weight.reshape(n, n)[~diagonal]):
        return None
    return diagonal.astype(np.float64).reshape(weight.shape)


def finetune(
    snn: TTFSNetwork,
    profile: HardwareProfile | str,
    x_train,
    y_train,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    window_scale: float | None = None,
    progress=None,
) -> FinetuneResult:
    """Fine-tune a b1 SNN for ``profile`` on raw inputs x_train (N, *input_shape) and
    integer labels y_train (N,). See the module docstring.

    window_scale: shorten every window by this factor (0 < s <= 1) and keep the
    windows fixed; None lets windows grow when values leave them.
    progress(epoch, epochs, loss, accuracy) is called after every epoch.
    """
    if snn.neuron != "b1":
        raise UsageError(f"finetune: the b1 neuron has exact gradients; got '{snn.neuron}'")
    if not isinstance(profile, HardwareProfile):
        profile = load_profile(profile)
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"finetune: {name} must be an integer >= {low}, got {value!r}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise UsageError(f"finetune: learning_rate must be > 0, got {learning_rate!r}")
    if window_scale is not None and not (0 < window_scale <= 1):
        raise UsageError(f"finetune: window_scale must be in (0, 1], got {window_scale!r}")
    source = snn.source
    x = source.check_input(x_train, what="x_train") if source is not None else np.asarray(x_train)
    y = np.asarray(y_train)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y_train must be {len(x)} integer labels, got shape {y.shape}")
    if y.min(initial=0) < 0 or y.max(initial=0) >= snn.num_classes:
        raise DataError(f"y_train labels must lie in [0, {snn.num_classes})")
    p, q = snn.input_range
    x01 = np.clip((x - p) / (q - p), 0.0, 1.0)

    windows = {s.name: s.window for s in snn.spiking_layers}
    if window_scale is not None:
        windows = {name: w * window_scale for name, w in windows.items()}
    params = {}
    for stage in snn.stages:
        if isinstance(stage, (SpikingLayer, OutputLayer)):
            params[f"{stage.name}.w"] = stage.synapses[-1].weight.copy()
            params[f"{stage.name}.b"] = stage.bias.copy()
            for i, shortcut in enumerate(stage.shortcuts):
                params[f"{stage.name}.shortcut{i}.w"] = shortcut.synapses[-1].weight.copy()
    optimiser = Adam(params, learning_rate)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    history = []
    current = _with_params(snn, params, windows)
    for epoch in range(epochs):
        order = rng.permutation(len(x01))
        losses, correct = [], 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            hardware = _Hardware(current, profile, seed=int(rng.integers(2**31)))
            loss, grads, logits, peaks = loss_and_gradients(current, x01[batch], y[batch], hardware)
            optimiser.step(params, grads)
            if window_scale is None:  # windows grow to hold the values (the papers' rule)
                for name, peak in peaks.items():
                    windows[name] = max(windows[name], (1.0 + snn.zeta) * peak)
            current = _with_params(snn, params, windows)
            losses.append(loss * len(batch))
            correct += int((logits.argmax(axis=1) == y[batch]).sum())
        record = {
            "epoch": epoch + 1,
            "loss": float(np.sum(losses) / len(x01)),
            "accuracy": correct / len(x01),
        }
        history.append(record)
        if progress is not None:
            progress(epoch + 1, epochs, record["loss"], record["accuracy"])
    name = f"{snn.name}_finetuned_{profile.name}"
    return FinetuneResult(snn=current, network=snn_to_network(current, name=name), history=history)
