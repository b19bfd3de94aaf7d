"""Running a trained file classifier: float synapses, memristive crossbars, or Lava.

- ``reference``: the numpy simulation with float weights;
- ``crossbar``: both layers' weights programmed as conductance pairs with a
  crossbar profile's device model (levels, variability, programming noise, drift
  at ``crossbar.t_inference_s``, faults, global drift compensation) by the
  crossbar backend's own programming code, and read with its read noise at every
  step (drawn per read, its effect on each neuron's drive drawn exactly);
- ``lava``: lava's own LIF and Dense processes with a RingBuffer source and sink
  on Lava's CPU simulator (floating point), one file after another through one
  compiled network, state reset between files. Lava's LIF has one threshold per
  layer, so each hidden neuron's threshold is folded into its incoming weights
  (the LIF is linear below threshold and resets to 0, so spikes do not change).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .model import FileClassModel
from .snn import van_rossum

BACKENDS = ("reference", "crossbar", "lava")


def hardware_weights(model: FileClassModel, profile, seed: int = 0):
    """(w_in, w_out, read_noise) of the model programmed onto a crossbar profile."""
    from ..backends.crossbar import DRIFT_T0_S, program_pairs, read_sigma  # noqa: F401

    if profile.hardware != "crossbar":
        raise UsageError(
            f"profile '{profile.name}' is {profile.hardware} hardware; memristive "
            "synapses need a crossbar profile"
        )
    cb, faults = profile.crossbar, profile.faults
    weights, variances = [], []
    for layer, w in enumerate((model.w_in, model.w_out)):
        _, programmed, now, scale = program_pairs(w.T, cb, faults, seed, layer)
        compensation = 1.0
        if cb.drift_compensation:
            current = np.abs(now[0] - now[1]).mean()
            if current > 0:
                compensation = float(np.abs(programmed[0] - programmed[1]).mean() / current)
        gain = scale * compensation
        weights.append(((now[0] - now[1]) * gain).T)
        var = None
        if cb.read_noise_scale > 0:
            var = (
                read_sigma(now[0], programmed[0], cb) ** 2
                + read_sigma(now[1], programmed[1], cb) ** 2
            ) * gain**2
        variances.append(var)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))

    def read_noise(layer: str, spikes: np.ndarray):
        var = variances[0 if layer == "in" else 1]
        if var is None:
            return 0.0
        sigma = np.sqrt(spikes @ var)  # spikes are 0/1: sum of the read devices' variances
        return sigma * rng.standard_normal(sigma.shape)

    return weights[0], weights[1], read_noise


def classify(
    model: FileClassModel,
    records: list[dict],
    backend: str = "reference",
    profile=None,
    seed: int = 0,
    progress=None,
) -> np.ndarray:
    """Predicted class indices (N,) of metadata records on a backend.
    progress(done, total): called as the files are classified (per batch of files;
    per file on Lava)."""
    if backend not in BACKENDS:
        raise UsageError(f"backend: unknown {backend!r}; choose one of {', '.join(BACKENDS)}")
    spikes = model.spikes(records)
    if backend == "reference":
        return model.classify(spikes, progress=progress)[0]
    if backend == "crossbar":
        if profile is None:
            raise UsageError("the crossbar backend needs a profile (pcm or rram)")
        w_in, w_out, noise = hardware_weights(model, profile, seed)
        return model.classify(spikes, w_in=w_in, w_out=w_out, read_noise=noise, progress=progress)[
            0
        ]
    return lava_classify(model, spikes, progress=progress)[0]


def lava_classify(
    model: FileClassModel, spikes: np.ndarray, progress=None
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, output spikes (N, T, C)) of input spikes (N, T, N_in) run on Lava;
    progress(done, total) is called after every file."""
    from ..backends.lava import import_lava_runtime

    import_lava_runtime()
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.dense.process import Dense
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source
    from lava.proc.lif.process import LIF

    hyper = model.hyper
    n, steps, n_in = spikes.shape
    h, c = model.hidden_vth.size, model.w_out.shape[0]
    scale = 1.0 / model.hidden_vth[:, None]  # thresholds folded into the weights
    inhibition = -hyper.inhibition * (np.ones((h, h)) - np.eye(h)) * scale
    source = Source(data=spikes.transpose(2, 0, 1).reshape(n_in, n * steps))
    dense_in = Dense(weights=model.w_in * scale)
    dense_inh = Dense(weights=inhibition)
    dense_out_in = Dense(weights=model.w_out[:, :n_in])  # the readout sees the inputs
    dense_out_h = Dense(weights=model.w_out[:, n_in:])  # and the hidden layer
    hidden = LIF(shape=(h,), du=hyper.hidden_du, dv=hyper.hidden_dv, vth=1.0)
    output = LIF(shape=(c,), du=hyper.output_du, dv=hyper.output_dv, vth=hyper.output_vth)
    sink = Sink(shape=(c,), buffer=n * steps)
    source.s_out.connect(dense_in.s_in)
    dense_in.a_out.connect(hidden.a_in)
    hidden.s_out.connect(dense_inh.s_in)
    dense_inh.a_out.connect(hidden.a_in)
    source.s_out.connect(dense_out_in.s_in)
    dense_out_in.a_out.connect(output.a_in)
    hidden.s_out.connect(dense_out_h.s_in)
    dense_out_h.a_out.connect(output.a_in)
    output.s_out.connect(sink.a_in)
    config = Loihi2SimCfg(select_tag="floating_pt")
    try:
        for done in range(n):
            source.run(condition=RunSteps(num_steps=steps), run_cfg=config)
            for proc in (hidden, output):  # a new file starts from rest
                proc.u.set(np.zeros(proc.u.shape))
                proc.v.set(np.zeros(proc.v.shape))
            for dense in (dense_in, dense_inh, dense_out_in, dense_out_h):
                dense.a_buff.set(np.zeros(dense.a_buff.shape))
            if progress is not None:
                progress(done + 1, n)
        recorded = sink.data.get()  # (C, n * steps), one bulk read at the end
    finally:
        source.stop()
    out = recorded.reshape(c, n, steps).transpose(1, 2, 0)
    return van_rossum(out, model.targets(), hyper.tau_vr).argmin(axis=1), out
