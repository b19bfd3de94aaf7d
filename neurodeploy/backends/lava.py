"""Lava backend: the TTFS network as Lava processes on Lava's Loihi 2 simulator.

The layer programs (integer weights, thresholds, ramps, saturation bounds)
are the emulator's, so the ``fixed_pt`` models reproduce the emulator's spike
steps exactly; ``floating_pt`` runs the same graph in float64 with float
weights. One ``run(x)`` builds the process graph, compiles it once and
streams all samples through it in chunks of ``batch`` samples (every process
has a batch dimension); the recording models hand their results over in one
piece at the end. The Lava runtime is stopped in every case, also when a
model fails or the user presses Ctrl-C, so no Lava process outlives a run.
"""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..trace import Trace
from ..ttfs import OutputLayer, SpikingLayer, TimePool
from .emulator import EmulatorDeployment

LAVA_TAGS = ("fixed_pt", "floating_pt")


class LavaRunError(RuntimeError):
    """A Lava ProcessModel failed during a run (a bug, not a user error); the message
    carries the model's traceback. The runtime has been stopped."""


def _catch_sigint(flags: list):
    """Make SIGINT append to ``flags``; returns the previous handler (None off the main
    thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: flags.append(signum))


class LavaDeployment(EmulatorDeployment):
    """Run on Lava processes; mapping, costs and summary as the emulator's."""

    backend = "lava"
    hardware_kinds = ("digital",)

    def __init__(self, snn, profile, seed: int = 0, tag: str = "fixed_pt", batch: int = 1024):
        if tag not in LAVA_TAGS:
            raise UsageError(f"tag: unknown {tag!r}; choose one of {', '.join(LAVA_TAGS)}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UsageError(f"batch must be a positive integer, got {batch!r}")
        super().__init__(snn, profile, seed)
        self.tag = tag
        self.batch = batch
        if tag == "floating_pt":  # float weights and membrane on the same step grid
            self.programs = {}
            self._build_programs(None, None)

    def run(self, x, progress=None) -> Trace:
        """Run raw inputs x (N, *input_shape) on Lava. progress(done, total) is called
        after every chunk of samples."""
        t_input, outside = self.encode(x)
        n = t_input.shape[0]
        steps = self.profile.timing.steps_per_window
        input_steps = np.where(np.isfinite(t_input), np.rint(t_input * steps), steps)
        with tempfile.TemporaryDirectory(prefix="neurodeploy-lava-") as tmp:
            results = self._run_graph(
                input_steps.reshape(n, -1).astype(np.int64), Path(tmp), progress
            )
        return self.with_costs(self._trace(t_input, outside, results))

    # -- the process graph ----------------------------------------------------------------
    def _run_graph(self, input_steps: np.ndarray, tmp: Path, progress) -> dict:
        from lava.magma.core.run_conditions import RunSteps
        from lava.magma.core.run_configs import Loihi2SimCfg

        from ..lava.process import SpikePool, SpikeSource, Synapses, TTFSNeuron, TTFSReadout

        snn, steps = self.snn, self.profile.timing.steps_per_window
        samples = input_steps.shape[0]
        batch = min(self.batch, samples)
        chunk_steps = steps * (1 + len(snn.spiking_layers))
        chunks = -(-samples // batch)
        total = chunks * chunk_steps
        errors = tmp / "errors"
        errors.mkdir()
        count = iter(range(10**6))

        def error_path() -> str:  # where a failing model leaves its traceback
            return str(errors / f"{next(count)}.txt")

        common = {
            "batch": batch,
            "chunk_steps": chunk_steps,
            "samples": samples,
            "total_steps": total,
            "steps": steps,
        }
        source = SpikeSource(
            spike_steps=input_steps,
            batch=batch,
            steps=steps,
            chunk_steps=chunk_steps,
            error_path=error_path(),
        )
        port, window_start, layer = source.s_out, 0, 0
        recorders = {}
        for stage in snn.stages:
            path = str(tmp / f"{stage.name}.npz")
            if isinstance(stage, TimePool):
                pool = SpikePool(
                    in_shape=stage.input_shape,
                    out_shape=stage.output_shape,
                    kernel=stage.kernel,
                    stride=stage.stride,
                    padding=stage.padding,
                    sign=stage.sign.astype(float),
                    first_step=window_start,
                    result_path=path,
                    error_path=error_path(),
                    **common,
                )
                port.connect(pool.s_in)
                port = pool.s_out
                recorders[stage.name] = path
                continue
            prog = self.programs[stage.name]
            *_, affine = prog.synapses
            synapses = Synapses(
                batch=batch,
                in_shape=stage.input_shape,
                out_shape=stage.output_shape,
                weight=affine.weight,
                ops=prog.synapses,
                chunk_steps=chunk_steps,
                error_path=error_path(),
            )
            port.connect(synapses.s_in)
            limit = prog.limit or 0
            size = int(np.prod(stage.output_shape))
            if isinstance(stage, SpikingLayer):
                layer += 1
                neuron = TTFSNeuron(
                    size=size,
                    threshold=prog.threshold.reshape(-1),
                    ramp=prog.ramp,
                    limit=limit,
                    first_step=(layer - 1) * steps,
                    result_path=path,
                    error_path=error_path(),
                    **common,
                )
                synapses.a_out.connect(neuron.a_in)
                port, window_start = neuron.s_out, layer * steps
            else:
                assert isinstance(stage, OutputLayer)
                readout = TTFSReadout(
                    size=size,
                    bias=prog.bias.reshape(-1),
                    limit=limit,
                    first_step=layer * steps,
                    result_path=path,
                    error_path=error_path(),
                    **common,
                )
                synapses.a_out.connect(readout.a_in)
            recorders[stage.name] = path
        config = Loihi2SimCfg(select_tag=self.tag)
        # Ctrl-C goes to the whole process group, Lava's processes included; one of
        # them dying would hang the runtime's stop. While the runtime lives, SIGINT
        # only sets a flag (Lava forks its processes, which inherit the handler); the
        # run stops after the current chunk and KeyboardInterrupt is raised here.
        interrupted: list[int] = []
        previous = _catch_sigint(interrupted)
        try:
            for chunk in range(chunks):
                source.run(condition=RunSteps(num_steps=chunk_steps), run_cfg=config)
                if progress is not None:
                    progress(min(samples, (chunk + 1) * batch), samples)
                if interrupted or any(errors.iterdir()):
                    break
        finally:
            source.stop()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        failures = sorted(errors.iterdir())
        if failures:
            raise LavaRunError(failures[0].read_text())
        return {name: dict(np.load(path)) for name, path in recorders.items()}

    def _trace(self, t_input: np.ndarray, outside: int, results: dict) -> Trace:
        snn, steps = self.snn, self.profile.timing.steps_per_window
        n = t_input.shape[0]
        spike_times = {"input": t_input}
        saturated = {"input": outside}
        overflow = {}
        output = None
        for stage in snn.stages:
            res = results[stage.name]
            if isinstance(stage, OutputLayer):
                output = res["potential"] * self.programs[stage.name].lsb
                overflow[stage.name] = int(res["clipped"].sum())
                break
            m = res["spike_step"].astype(np.float64)
            t = stage.t_min + m * self.step_size[stage.name]
            t[m >= steps] = np.inf
            spike_times[stage.name] = t.reshape(n, *stage.output_shape)
            if isinstance(stage, SpikingLayer):
                # a clipped layer's neurons above the window give the clip, by design
                saturated[stage.name] = 0 if stage.clipped else int(res["early"].sum())
                overflow[stage.name] = int(res["clipped"].sum())
        return Trace(
            output=output,
            spike_times=spike_times,
            neuron_layers=("input", *(s.name for s in snn.spiking_layers)),
            saturated_per_layer=saturated,
            latency=np.full(n, snn.latency),
            backend=f"{self.backend}:{self.tag}",
            step_size=dict(self.step_size),
            overflow=overflow,
        )
