"""Training and inference of the file-classification SNN (see snn.py for the dynamics).

Training (numpy, batched):

1. The hidden layer learns without labels by pair-based STDP with exponential
   traces: a hidden spike potentiates the synapses of the inputs that fired in the
   steps before it (time constant ``tau_plus``), an input spike depresses the
   synapses onto hidden neurons that fired before it (``tau_minus``). The synapses
   are devices: a weight is a conductance g in [0, 1] of g_max, and an update is
   applied as a whole number of programming pulses of (g_max - g_min) / pulses each
   (stochastic rounding, seeded), clipped at the conductance range. Adaptive
   thresholds (homeostasis) spread the winners of the lateral inhibition.
2. The output layer (a population of LIF neurons per class, reading the inputs
   and the hidden layer) learns from labels by comparing spike patterns: each
   class has a target spike train (its population firing every ``period`` steps,
   the others silent). The van Rossum distances D_c of a file's output trains to
   the C targets, as a softmax over -D_c / ``temperature``, give the loss
   -log p(label): it pulls the output towards its own class's pattern and pushes
   it from the nearest wrong one. Its gradient reaches the weights through the
   LIF dynamics by backpropagation through time with a surrogate spike derivative
   1 / (1 + ``surrogate_slope`` |v - vth|)^2 (Zenke & Ganguli 2018, SuperSpike;
   the reset is not differentiated); Adam (Kingma & Ba 2015) takes the steps.

Inference classifies by the nearest target pattern in van Rossum distance. On
memristive hardware the weights are conductance pairs programmed with the
profile's device model (levels, programming noise, drift at the inference time,
faults) by the crossbar backend's own programming code, read with read noise.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError
from ..fileio import write_directory
from ..optim import Adam
from .encoding import FILE_KEYS, Encoder, KeySpec
from .snn import LIF, filtered_distances, input_spikes, run, trace, van_rossum


@dataclass(frozen=True)
class Hyper:
    """Training and dynamics settings (chosen on a subset of the training split)."""

    hidden: int = 512
    steps: int = 32  # simulation steps per file (the encoding uses the first 20)
    encode_steps: int = 20
    hidden_du: float = 0.5
    hidden_dv: float = 0.2
    hidden_vth: float = 6.0  # initial threshold; homeostasis adapts it per neuron
    output_du: float = 0.3
    output_dv: float = 0.2
    output_vth: float = 1.0
    inhibition: float = 20.0
    tau_plus: float = 4.0
    tau_minus: float = 4.0
    eta_stdp: float = 0.05
    conductance_sum: float = 0.15  # mean conductance a neuron's synapses keep (fraction)
    pulses: int = 64  # programming pulses across the conductance range
    homeostasis: float = 3.0
    target_activity: float = 0.1  # fraction of files each hidden neuron should answer
    stdp_epochs: int = 3
    population: int = 8  # output neurons per class
    readout_epochs: int = 12
    eta_out: float = 0.003  # Adam step size, annealed linearly to 10 % over the epochs
    temperature: float = 2.0  # van Rossum distance per unit of the softmax's logits
    surrogate_slope: float = 2.0  # sharpness of the surrogate spike derivative, per unit of v
    period: int = 2
    start: int = 6
    tau_vr: float = 6.0
    batch: int = 128


@dataclass
class FileClassModel:
    """A trained file classifier; ``save``/``load`` a model directory."""

    hyper: Hyper
    classes: tuple[str, ...]
    keys: tuple[KeySpec, ...]
    g_in: np.ndarray  # (H, N_in) conductances as fractions of the range
    hidden_vth: np.ndarray  # (H,)
    w_out: np.ndarray  # (C * population, N_in + H)
    seed: int = 0
    history: list = field(default_factory=list)

    @property
    def encoder(self) -> Encoder:
        return Encoder(keys=self.keys, steps=self.hyper.encode_steps, seed=self.seed)

    @property
    def w_in(self) -> np.ndarray:
        return self.g_in

    @property
    def hidden_lif(self) -> LIF:
        h = self.hyper
        return LIF(h.hidden_du, h.hidden_dv, h.hidden_vth)

    @property
    def output_lif(self) -> LIF:
        h = self.hyper
        return LIF(h.output_du, h.output_dv, h.output_vth)

    def targets(self) -> np.ndarray:
        return target_patterns(len(self.classes), self.hyper)

    def spikes(self, records: list[dict]) -> np.ndarray:
        return input_spikes(self.encoder.encode(records), self.hyper.steps)

    def classify(
        self,
        spikes_in: np.ndarray,
        w_in=None,
        w_out=None,
        read_noise=None,
        batch: int = 1024,
        progress=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class indices (N,), output spikes (N, T, C)) of input spikes.
        progress(done, total) is called after every batch of files."""
        w_in = self.w_in if w_in is None else w_in
        w_out = self.w_out if w_out is None else w_out
        targets = self.targets()
        preds, outs = [], []
        for lo in range(0, len(spikes_in), batch):
            _, s_o = run(
                spikes_in[lo : lo + batch],
                w_in,
                self.hyper.inhibition,
                self.hidden_lif,
                self.hidden_vth,
                w_out,
                self.output_lif,
                read_noise=read_noise,
            )
            preds.append(van_rossum(s_o, targets, self.hyper.tau_vr).argmin(axis=1))
            outs.append(s_o)
            if progress is not None:
                progress(min(lo + batch, len(spikes_in)), len(spikes_in))
        return np.concatenate(preds), np.concatenate(outs)

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the model directory (fileclass.json, weights.npz); returns the path.

        Like :func:`neurodeploy.save_model`: refuses a directory holding files
        neurodeploy did not write unless ``force``, and never removes anything.
        """
        doc = {
            "kind": "fileclass",
            "classes": list(self.classes),
            "seed": self.seed,
            "hyper": asdict(self.hyper),
            "keys": [asdict(k) for k in self.keys],
            "history": self.history,
        }
        text = json.dumps(doc, indent=2) + "\n"
        arrays = {"g_in": self.g_in, "hidden_vth": self.hidden_vth, "w_out": self.w_out}
        writers = {
            "weights.npz": lambda file: np.savez_compressed(file, **arrays),
            "fileclass.json": lambda file: file.write_text(text),
        }
        return write_directory(path, writers, force=force)

    @classmethod
    def load(cls, path: str | Path) -> FileClassModel:
        path = Path(path)
        meta, weights = path / "fileclass.json", path / "weights.npz"
        if not meta.is_file() or not weights.is_file():
            raise ModelError(
                f"{path}: not a file-classification model (needs fileclass.json and weights.npz)"
            )
        try:
            doc = json.loads(meta.read_text())
            hyper = Hyper(**doc["hyper"])
            keys = tuple(KeySpec(**k) for k in doc["keys"])
            with np.load(weights) as npz:
                arrays = {k: npz[k] for k in ("g_in", "hidden_vth", "w_out")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: malformed file-classification model ({exc})") from None
        return cls(
            hyper=hyper,
            classes=tuple(doc["classes"]),
            keys=keys,
            seed=doc["seed"],
            history=doc.get("history", []),
            **arrays,
        )


def target_patterns(classes: int, hyper: Hyper) -> np.ndarray:
    """(C, T, C * population): class c's population fires every ``period`` steps from
    ``start``; every other output neuron is silent."""
    m = hyper.population
    out = np.zeros((classes, hyper.steps, classes * m))
    for c in range(classes):
        out[c, hyper.start :: hyper.period, c * m : (c + 1) * m] = 1.0
    return out


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over samples and steps of a (N, T, P) x b (N, T, Q) -> (P, Q), one product."""
    return a.reshape(-1, a.shape[2]).T @ b.reshape(-1, b.shape[2])


def _quantised_update(g: np.ndarray, delta: np.ndarray, pulses: int, rng) -> np.ndarray:
    """Apply a weight change as whole programming pulses (stochastic rounding), bounded."""
    steps = delta * pulses
    whole = np.floor(steps)
    whole += rng.random(steps.shape) < (steps - whole)
    return np.clip(g + whole / pulses, 0.0, 1.0)


def train(
    records: list[dict],
    labels: np.ndarray,
    classes: tuple[str, ...],
    hyper: Hyper = Hyper(),
    seed: int = 0,
    keys: tuple[KeySpec, ...] = FILE_KEYS,
    progress=None,
) -> FileClassModel:
    """Train on metadata records and integer labels (see the module docstring)."""
    labels = np.asarray(labels)
    if len(records) != len(labels) or len(records) == 0:
        raise DataError(f"train: {len(records)} records for {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"train: labels must lie in [0, {len(classes)})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    encoder = Encoder(keys=keys, steps=hyper.encode_steps, seed=seed)
    steps_in = encoder.encode(records)
    n_in = steps_in.shape[1]
    target_sum = hyper.conductance_sum * n_in
    g_in = rng.uniform(0.0, 1.0, (hyper.hidden, n_in))
    g_in *= target_sum / g_in.sum(axis=1, keepdims=True)
    g_in = np.clip(np.rint(g_in * hyper.pulses), 0, hyper.pulses) / hyper.pulses  # programmed
    vth = np.full(hyper.hidden, hyper.hidden_vth)
    hidden = LIF(hyper.hidden_du, hyper.hidden_dv, hyper.hidden_vth)
    history = []
    started = time.perf_counter()
    for epoch in range(hyper.stdp_epochs):
        order = rng.permutation(len(records))
        for lo in range(0, len(records), hyper.batch):
            idx = order[lo : lo + hyper.batch]
            s_in = input_spikes(steps_in[idx], hyper.steps)
            s_h, _ = run(s_in, g_in, hyper.inhibition, hidden, vth)
            pre, post = trace(s_in, hyper.tau_plus), trace(s_h, hyper.tau_minus)
            n = len(idx)
            # A hidden spike at t follows the inputs delivered up to t - 1 (Dense delay).
            ltp = _pairs(s_h[:, 1:], pre[:, :-1]) / n
            ltd = _pairs(post[:, :-1], s_in[:, 1:]) / n
            change = hyper.eta_stdp * (ltp - ltd)
            # Keep every neuron's total conductance: competition on the pattern, not size.
            total = (g_in + change).sum(axis=1, keepdims=True)
            change += (target_sum - total) / n_in
            g_in = _quantised_update(g_in, change, hyper.pulses, rng)
            activity = (s_h.sum(axis=1) > 0).mean(axis=0)
            vth = np.maximum(vth + hyper.homeostasis * (activity - hyper.target_activity), 0.05)
        history.append(
            {"phase": "stdp", "epoch": epoch + 1, "seconds": time.perf_counter() - started}
        )
        if progress:
            progress(f"STDP epoch {epoch + 1}/{hyper.stdp_epochs}")
    model = FileClassModel(
        hyper=hyper,
        classes=tuple(classes),
        keys=tuple(keys),
        g_in=g_in,
        hidden_vth=vth,
        w_out=np.zeros((0, 0)),
        seed=seed,
    )
    # Readout: the hidden spikes no longer change; compute them once (as bits).
    hidden_spikes = np.zeros((len(records), hyper.steps, hyper.hidden), dtype=bool)
    for lo in range(0, len(records), 1024):
        s_in = input_spikes(steps_in[lo : lo + 1024], hyper.steps)
        hidden_spikes[lo : lo + 1024] = run(s_in, g_in, hyper.inhibition, hidden, vth)[0]
    targets = model.targets()
    filtered_targets = trace(targets, hyper.tau_vr)
    n_out = targets.shape[2]
    w_out = rng.normal(0.0, 0.05, (n_out, n_in + hyper.hidden))
    params = {"w_out": w_out}
    adam = Adam(params, hyper.eta_out)
    output = model.output_lif
    for epoch in range(hyper.readout_epochs):
        order = rng.permutation(len(records))
        correct, loss = 0, 0.0
        adam.lr = hyper.eta_out * (1.0 - 0.9 * epoch / hyper.readout_epochs)  # to 10 %
        for lo in range(0, len(records), hyper.batch):
            idx = order[lo : lo + hyper.batch]
            both = np.concatenate(
                [input_spikes(steps_in[idx], hyper.steps), hidden_spikes[idx].astype(np.float64)],
                axis=2,
            )
            s_o, v_o = output_dynamics(both, params["w_out"], output)
            batch_loss, d_spikes, distances = distance_loss(
                s_o, labels[idx], filtered_targets, hyper.tau_vr, hyper.temperature
            )
            correct += int((distances.argmin(axis=1) == labels[idx]).sum())
            loss += float(batch_loss.sum())
            grad = surrogate_gradient(both, s_o, v_o, d_spikes, output, hyper.surrogate_slope)
            adam.step(params, {"w_out": grad / len(idx)})
        history.append(
            {
                "phase": "readout",
                "epoch": epoch + 1,
                "train_accuracy": correct / len(records),
                "train_loss": loss / len(records),
                "seconds": time.perf_counter() - started,
            }
        )
        if progress:
            progress(
                f"readout epoch {epoch + 1}/{hyper.readout_epochs}: training accuracy "
                f"{100 * correct / len(records):.2f} %, loss {loss / len(records):.3f}"
            )
    return replace(model, w_out=params["w_out"], history=history)


def output_dynamics(
    s_pre: np.ndarray, w_out: np.ndarray, lif: LIF
) -> tuple[np.ndarray, np.ndarray]:
    """Output spikes and membranes before reset, both (N, T, O), for presynaptic
    spikes (N, T, N_in + H): the output half of snn.run."""
    n, steps, _ = s_pre.shape
    drive = (s_pre.reshape(n * steps, -1) @ w_out.T).reshape(n, steps, -1)
    u = np.zeros((n, w_out.shape[0]))
    v = np.zeros_like(u)
    out = np.zeros((n, steps, w_out.shape[0]))
    membranes = np.zeros_like(out)
    for t in range(steps):
        u *= 1.0 - lif.du
        if t > 0:
            u += drive[:, t - 1]
        v = v * (1.0 - lif.dv) + u
        membranes[:, t] = v
        spikes = v > lif.vth
        v[spikes] = 0.0
        out[:, t] = spikes
    return out, membranes


def output_spikes(s_pre: np.ndarray, w_out: np.ndarray, lif: LIF) -> np.ndarray:
    """Output spikes (N, T, O) for presynaptic spikes (N, T, N_in + H)."""
    return output_dynamics(s_pre, w_out, lif)[0]


def distance_loss(
    s_out: np.ndarray,
    labels: np.ndarray,
    filtered_targets: np.ndarray,
    tau: float,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax loss over van Rossum distances to the class targets.

    s_out (N, T, O) output spikes, labels (N,), filtered_targets (C, T, O) the targets
    filtered with ``tau``. Returns the loss -log p(label) (N,), its derivative with
    respect to every output spike (N, T, O) and the distances (N, C)."""
    filtered = trace(s_out, tau)
    distances = filtered_distances(filtered, filtered_targets)
    targets = filtered_targets.reshape(len(filtered_targets), -1)
    logits = -distances / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_p[rows, labels]
    # dL/dD_c = (onehot_c - p_c) / temperature and dD_c/dfiltered = 2 (filtered - target_c);
    # the p_c - onehot_c sum to zero, so the filtered output's own term drops out.
    excess = np.exp(log_p)
    excess[rows, labels] -= 1.0
    d_filtered = (2.0 / temperature) * (excess @ targets).reshape(filtered.shape)
    # filtered(t) = sum_{t' <= t} s(t') decay^(t - t'), so dL/ds(t) is the same filter
    # run backwards in time over dL/dfiltered.
    d_spikes = trace(d_filtered[:, ::-1], tau)[:, ::-1]
    return loss, d_spikes, distances


def surrogate_gradient(
    s_pre: np.ndarray,
    s_out: np.ndarray,
    v_out: np.ndarray,
    d_spikes: np.ndarray,
    lif: LIF,
    slope: float,
) -> np.ndarray:
    """Gradient (O, N_in + H), summed over the batch, of a loss with derivative
    d_spikes (N, T, O) with respect to the output spikes, back through the LIF of
    :func:`output_dynamics` (spikes s_out, membranes before reset v_out). The spike's
    derivative is the surrogate 1 / (1 + slope |v - vth|)^2; the reset is held fixed."""
    n, steps, o = s_out.shape
    surrogate = 1.0 / (1.0 + slope * np.abs(v_out - lif.vth)) ** 2
    d_v = np.zeros((n, o))
    d_u = np.zeros((n, o))
    d_drive = np.empty_like(s_out)
    for t in range(steps - 1, -1, -1):
        # v(t) feeds s(t) and v(t + 1) = (1 - dv) v(t) (1 - s(t)) + u(t + 1)
        d_v = d_spikes[:, t] * surrogate[:, t] + d_v * (1.0 - lif.dv) * (1.0 - s_out[:, t])
        d_u = d_v + d_u * (1.0 - lif.du)  # u(t) feeds v(t) and u(t + 1)
        d_drive[:, t] = d_u
    # the drive at step t is W s_pre(t - 1)
    return _pairs(d_drive[:, 1:], s_pre[:, :-1])


__all__ = ["FileClassModel", "Hyper", "train", "target_patterns"]
