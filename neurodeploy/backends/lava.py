"""Lava backend: the TTFS network as Lava processes with Loihi 2 number formats, run on
Lava's CPU runtime (a simulation on this machine, not Intel's chip).

The layer programs (integer weights, thresholds, ramps, saturation bounds)
are the emulator's, so the ``fixed_pt`` models reproduce the emulator's spike
steps exactly; ``floating_pt`` runs the same graph in float64 with float
weights. One ``run(x)`` builds the process graph, compiles it once and
streams all samples through it as a pipeline of chunks, as the chip would: every
process has a batch dimension, a new chunk enters every window of K steps and
each layer works on a different chunk in each window (neurons hold two sets of
membranes), so C chunks through L hidden layers take (C + L) K steps, not
C (L + 1) K (:meth:`LavaDeployment.chunk_size` chooses how many samples a chunk
holds); the recording models hand their results over in one piece at the end.
Spikes travel as bool messages, drives as int32 where their bound allows. The Lava
runtime is stopped in every case, also when a model fails or the user presses
Ctrl-C, so no Lava process outlives a run.

Lava is imported through :func:`import_lava_runtime`, which keeps Lava from setting
the global multiprocessing start method (see there).

Residual joins: each shortcut group of a layer program is its own synapse
process, fed by the source stage's spikes through a delay process of the
group's ``delay_steps`` (whole windows), and adds into the join's input port.

``synapses="lava"``: every synapse group runs on Lava's own Dense or Sparse process
(bit-accurate models, one sample per step) instead, lowered by
neurodeploy/backends/lava_synapses.py. Each such hop delays by one step, so hidden
layer n integrates n steps late, a pool's window opens as late as its layer's, and a
shortcut from window w into a join integrating in window w' is held back by its
delay_steps plus w' - w steps.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..simulate import check_keep
from ..threads import one_blas_thread
from ..trace import Trace
from ..ttfs import OutputLayer, SpikingLayer, TimePool
from .emulator import LOIHI_ACT_SHIFT, EmulatorDeployment

LAVA_TAGS = ("fixed_pt", "floating_pt")
# batched: our Synapses process, a chunk of samples per step; lava: Lava's own Dense and
# Sparse with their bit-accurate models, one sample per step (neurodeploy/backends/
# lava_synapses.py)
SYNAPSE_KINDS = ("batched", "lava")


_LAVA_MULTIPROCESSING = "lava.magma.runtime.message_infrastructure.multiprocessing"
_import_lock = threading.Lock()


def import_lava_runtime() -> None:
    """Import Lava's runtime so that it neither sets nor depends on the process's
    multiprocessing start method; call it before any other Lava import.

    Lava's ``message_infrastructure/multiprocessing.py`` calls
    ``multiprocessing.set_start_method('fork')`` when imported (lava-nc 0.10, line 47).
    That raises ``RuntimeError: context has already been set`` once anything in the
    process used multiprocessing's default context (a process pool, a dask
    LocalCluster: a notebook that sweeps, then deploys to Lava), and otherwise fixes
    the start method of the whole process. What Lava needs is that the processes
    running its ProcessModels are forked (they inherit the compiled graph). So that one
    call is skipped during the import, and Lava's ``SystemProcess`` (the class of those
    processes) is given fork's own ``_Popen``: Lava forks whatever the start method is,
    and no global multiprocessing state is set.
    """
    with _import_lock:
        module = sys.modules.get(_LAVA_MULTIPROCESSING)
        if module is None:
            real = multiprocessing.set_start_method

            def skip_lavas_call(method, force=False):
                if method == "fork" and not force:  # the call in Lava's module body
                    return
                real(method, force=force)

            multiprocessing.set_start_method = skip_lavas_call
            try:
                module = importlib.import_module(_LAVA_MULTIPROCESSING)
            finally:
                multiprocessing.set_start_method = real
        fork = multiprocessing.get_context("fork").Process
        module.SystemProcess._Popen = staticmethod(fork._Popen)


class LavaRunError(RuntimeError):
    """A Lava ProcessModel failed during a run (a bug, not a user error); the message
    carries the model's traceback. The runtime has been stopped."""


# Signals that end a run: Ctrl-C, `kill` and a closed terminal. Each stops the Lava
# runtime (and its processes) and removes our temporary files before the process
# acts on it as it would have.
TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Terminated(Exception):
    """A terminating signal arrived during a run; raised after the runtime stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _catch_signals(flags: list) -> dict:
    """Make every terminating signal append its number to ``flags``; returns the previous
    handlers (empty off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in TERMINATING_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # ignored by choice (nohup): it must not stop the run either
        previous[signum] = signal.signal(signum, lambda number, frame: flags.append(number))
    return previous


def _redeliver(signum: int) -> None:
    """Act on a signal caught during a run, now that everything is cleaned up: Ctrl-C
    raises KeyboardInterrupt, other signals go to whatever handler was there before
    (by default they end the process as they would have)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    os.kill(os.getpid(), signum)
    raise _Terminated(signum)  # a handler that returned: do not carry on as if complete


# Chunk sizes when no batch is given (measured on this project's 2-core machines,
# lava-nc 0.10, loihi2 fixed_pt, the pipelined graph): every step costs each Lava
# process a fixed ~0.6 ms of messaging, so few steps - large batches - win until the
# silent windows' messages (the pipeline filling and draining) cost more. All 1797
# digits through digits_cnn (12 704 synapses, K = 32), CPU seconds of a run, median of
# 3, machine loaded: chunks of 256 3.6 s, 512 3.1 s, 899 2.6 s, 1797 3.4 s.
# CHUNK_WORK (synapses x K x samples of one window of the pipeline) gives digits_cnn
# and digits_mlp two chunks of 899; a chunk then takes about a second.
CHUNK_WORK = 5 * 10**8
CHANNEL_SLOTS = 2  # messages per Lava channel (see _run_graph)
MIN_CHUNK = 8  # below this the per-step messaging dominates
MAX_CHUNK = 1024


def _connect_drive(group, neuron, size: int) -> None:
    if group.a_out.shape == (size,):  # Lava's Dense: one sample
        group.a_out.reshape((1, size)).connect(neuron.a_in)
    else:
        group.a_out.connect(neuron.a_in)


def _dendritic(program, weight: np.ndarray) -> np.ndarray:
    """Weights in the units the synapses send: Loihi's dendritic sum a (the neuron shifts
    it by 6 into the current); the membrane units otherwise."""
    return weight / 2.0**LOIHI_ACT_SHIFT if program.loihi else weight


class LavaDeployment(EmulatorDeployment):
    """Run on Lava processes; mapping, costs and summary as the emulator's."""

    backend = "lava"
    streams_chunks = False  # Lava hands over the whole batch's spikes at the end
    hardware_kinds = ("digital",)

    def __init__(
        self,
        snn,
        profile,
        seed: int = 0,
        tag: str = "fixed_pt",
        batch: int | None = None,
        synapses: str = "batched",
        lava_dense: bool = False,
    ):
        """synapses: "batched" (our Synapses process, whole chunks of samples per step)
        or "lava": every synapse group on Lava's own Dense / Sparse process with its
        bit-accurate model (PyDenseModelBitAcc / PySparseModelBitAcc), each layer's
        flatten, sum pools and dense or conv op lowered to one integer mantissa matrix
        (neurodeploy/backends/lava_synapses.py); one sample per step (batch 1), and each
        hop's one-step delay absorbed by the windows after it. Loihi formats (tag
        fixed_pt, neuron.number_format loihi2) only. lava_dense=True: the same as
        synapses="lava" (its former name).
        batch: samples per chunk (None: chosen by :meth:`chunk_size`)."""
        if tag not in LAVA_TAGS:
            raise UsageError(f"tag: unknown {tag!r}; choose one of {', '.join(LAVA_TAGS)}")
        if synapses not in SYNAPSE_KINDS:
            raise UsageError(
                f"synapses: unknown {synapses!r}; choose one of {', '.join(SYNAPSE_KINDS)}"
            )
        if lava_dense:
            synapses = "lava"
        bad_batch = isinstance(batch, bool) or not isinstance(batch, int) or batch < 1
        if batch is not None and bad_batch:
            raise UsageError(f"batch must be a positive integer or None, got {batch!r}")
        super().__init__(snn, profile, seed)
        self.tag = tag
        self.synapses = synapses
        self.lava_dense = synapses == "lava"  # one sample per step, a delay per hop
        self.batch = 1 if self.lava_dense else batch
        self.lowered = {}  # layer -> its synapse groups on Lava's processes
        if self.lava_dense:
            from .lava_synapses import lower_layer

            for stage in snn.stages:
                if isinstance(stage, TimePool):
                    continue  # our SpikePool
                prog = self.programs.get(stage.name)
                if tag != "fixed_pt" or prog is None or not prog.loihi:
                    raise UsageError(
                        f"synapses='lava': layer '{stage.name}' is not in Loihi formats (needs "
                        "tag fixed_pt and neuron.number_format loihi2)"
                    )
                self.lowered[stage.name] = lower_layer(stage, prog)
        if tag == "floating_pt":  # float weights and membrane on the same step grid
            self.programs = {}
            self._build_programs(None, None)

    def summary(self) -> dict:
        """The emulator's summary, and which synapse processes ran ("batched" or "lava")."""
        return {**super().summary(), "synapses": self.synapses}

    def chunk_size(self, samples: int) -> int:
        """Samples per chunk (the batch that enters the pipeline each window) of a run of
        ``samples``: the ``batch`` given, else as many as keep one window's work
        (synapses x steps per window x samples) within CHUNK_WORK, between MIN_CHUNK and
        MAX_CHUNK samples, and then spread evenly over the chunks that takes (no small
        last chunk); never more than ``samples``."""
        if self.batch is not None:
            return max(1, min(self.batch, samples))
        synapses = sum(
            p.synapse_count + sum(sc.synapse_count for sc in p.shortcuts)
            for p in self.programs.values()
        )
        steps = self.profile.timing.steps_per_window
        fitting = CHUNK_WORK // max(1, synapses * steps)
        largest = max(1, min(samples, MAX_CHUNK, max(MIN_CHUNK, fitting)))
        return -(-samples // -(-samples // largest))  # ceil(samples / chunks)

    def run(self, x, progress=None, keep=None) -> Trace:
        """Run raw inputs x (N, *input_shape) on Lava. progress(done, total) is called
        after every chunk of :meth:`chunk_size` samples. keep: names of the stages whose
        spike times the returned trace holds (as :func:`~neurodeploy.simulate.simulate`'s;
        None, the default: every stage; ``()``: none); output, costs, spike counts of
        every stage (``Trace.spikes_per_layer``), saturation, overflow and early counts
        are a full run's. It trims the returned trace only: Lava's recording processes
        hand over every stage's spike steps of the whole batch, and the costs are
        counted from every stage's spike times before the trace is trimmed, so the peak
        memory of the run is a full run's."""
        kept = check_keep(self.snn, keep)  # before Lava starts
        t_input, outside = self.encode(x)
        n = t_input.shape[0]
        steps = self.profile.timing.steps_per_window
        input_steps = np.where(np.isfinite(t_input), np.rint(t_input * steps), steps)
        try:
            with tempfile.TemporaryDirectory(prefix="neurodeploy-lava-") as tmp:
                results = self._run_graph(
                    input_steps.reshape(n, -1).astype(np.int64), Path(tmp), progress
                )
        except _Terminated as stop:  # runtime stopped, temporary files gone
            _redeliver(stop.signum)
        full = self.with_costs(self._trace(t_input, outside, results))
        if kept is None:
            return full
        trace = full.trimmed(kept)
        self._breakdowns[trace] = self._breakdowns[full]  # counted on the full trace
        return trace

    # -- the process graph ----------------------------------------------------------------
    def _run_graph(self, input_steps: np.ndarray, tmp: Path, progress) -> dict:
        import_lava_runtime()
        from lava.magma.core.run_conditions import RunSteps
        from lava.magma.core.run_configs import Loihi2SimCfg

        from ..lava.process import (
            SpikePool,
            SpikeSource,
            Synapses,
            TTFSNeuron,
            TTFSReadout,
        )

        snn, steps = self.snn, self.profile.timing.steps_per_window
        samples = input_steps.shape[0]
        batch = self.chunk_size(samples)
        # a pipeline: batch c spikes in window c, hidden layer n fires it in window c + n,
        # the output layer reads it at the end of window c + L; Lava's Dense delays by
        # one step, so with it every synapse layer adds a step
        hidden = len(snn.spiking_layers)
        hops = len(self.programs) if self.lava_dense else 0
        chunks = -(-samples // batch)
        total = (chunks + hidden) * steps + hops
        errors = tmp / "errors"
        errors.mkdir()
        count = iter(range(10**6))

        def error_path() -> str:  # where a failing model leaves its traceback
            return str(errors / f"{next(count)}.txt")

        common = {"batch": batch, "samples": samples, "total_steps": total, "steps": steps}
        source = SpikeSource(
            spike_steps=input_steps,
            batch=batch,
            steps=steps,
            samples=samples,
            error_path=error_path(),
        )
        port, layer, offset = source.s_out, 0, 0  # offset: hops before the last layer's spikes
        recorders = {}
        outputs = {"input": source.s_out}  # every stage's spikes: shortcut sources
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
                    lag=layer,  # the pooled layer's firing window
                    offset=offset,
                    result_path=path,
                    error_path=error_path(),
                    **common,
                )
                port.connect(pool.s_in)
                port = outputs[stage.name] = pool.s_out
                recorders[stage.name] = path
                continue
            prog = self.programs[stage.name]
            *_, affine = prog.synapses
            if self.lava_dense:
                delay = layer + 1  # steps the Dense / Sparse hops so far have delayed
                groups = self._lava_groups(stage, port, outputs, delay, error_path)
            else:
                delay = 0
                synapses = Synapses(
                    batch=batch,
                    in_shape=stage.input_shape,
                    out_shape=stage.output_shape,
                    weight=_dendritic(prog, affine.weight),
                    ops=prog.synapses,
                    error_path=error_path(),
                )
                port.connect(synapses.s_in)
                groups = [synapses] + [
                    self._shortcut_group(stage, shortcut, sc, outputs, batch, error_path)
                    for shortcut, sc in zip(stage.shortcuts, prog.shortcuts, strict=True)
                ]
            limit = prog.limit or 0
            size = int(np.prod(stage.output_shape))
            if isinstance(stage, SpikingLayer):
                neuron = TTFSNeuron(
                    size=size,
                    threshold=(prog.vth if prog.loihi else prog.threshold).reshape(-1),
                    ramp=prog.ramp,
                    start=np.broadcast_to(prog.start, stage.output_shape).reshape(-1),
                    loihi=prog.loihi,
                    limit=limit,
                    lag=layer,
                    offset=delay,
                    result_path=path,
                    error_path=error_path(),
                    **common,
                )
                layer += 1
                for group in groups:  # the InPort sums its inputs
                    _connect_drive(group, neuron, size)
                port, offset = neuron.s_out, delay
                outputs[stage.name] = port
            else:
                assert isinstance(stage, OutputLayer)
                readout = TTFSReadout(
                    size=size,
                    bias=prog.bias.reshape(-1),
                    loihi=prog.loihi,
                    limit=limit,
                    lag=layer,
                    offset=delay,
                    result_path=path,
                    error_path=error_path(),
                    **common,
                )
                for group in groups:
                    _connect_drive(group, readout, size)
            recorders[stage.name] = path
        from lava.magma.compiler.compiler_graphs import find_processes

        from ..lava import process as ours
        from ..lava.models import process_model

        config = Loihi2SimCfg(  # our processes skip Lava's model search
            select_tag=self.tag,
            exception_proc_model_map={
                proc: process_model(proc, self.tag)
                for proc in find_processes(source)
                if type(proc).__module__ == ours.__name__
            },
        )
        # Every channel (data and management) holds CHANNEL_SLOTS messages instead of
        # Lava's 64: in lockstep a channel never holds more than one, and the sender
        # cycles through the slots, so few slots stay in cache.
        compile_config = {"pypy_channel_size": CHANNEL_SLOTS}
        # Ctrl-C (and a closed terminal) goes to the whole process group, Lava's
        # processes included; one of them dying would hang the runtime's stop. While
        # the runtime lives, a terminating signal only sets a flag (Lava forks its
        # processes, which inherit the handler); the run stops after the current
        # chunk, the runtime is stopped, and the signal is acted on by the caller.
        # Batch c is complete after (c + 1 + L) K + hops steps: a run of that many
        # steps for the first chunk, then one window per chunk.
        # Lava forks its processes at the first run: under one BLAS thread, which they
        # inherit; their products are small, and more threads would only contend with
        # the other processes for the cores (the sums are exact integers in any order).
        caught: list[int] = []
        previous = _catch_signals(caught)
        try:
            with one_blas_thread():
                try:
                    for chunk in range(chunks):
                        window = (1 + hidden) * steps + hops if chunk == 0 else steps
                        source.run(RunSteps(num_steps=window), config, compile_config)
                        if progress is not None:
                            progress(min(samples, (chunk + 1) * batch), samples)
                        if caught or any(errors.iterdir()):
                            break
                finally:
                    source.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if caught:
            raise _Terminated(caught[0])
        failures = sorted(errors.iterdir())
        if failures:
            raise LavaRunError(failures[0].read_text())
        return {name: dict(np.load(path)) for name, path in recorders.items()}

    def _lava_groups(self, stage, port, outputs, delay, error_path) -> list:
        """Lava's Dense / Sparse processes of a layer's lowered synapse groups. ``delay``:
        the hops up to and including this layer's, so its input window starts ``delay``
        steps late; a shortcut source in window w (w hops late) is held back by the
        group's delay_steps (whole windows between) plus the w' - w hops those windows
        added (w' = delay - 1, the main path's spikes into this layer)."""
        from .lava_synapses import build_group

        steps = self.profile.timing.steps_per_window
        processes = []
        for group in self.lowered[stage.name]:
            if group.source is None:
                processes += build_group(group, port, 0, error_path)
            else:
                hold = group.delay_steps + group.delay_steps // steps
                source = outputs[group.source]
                processes += build_group(group, source, hold, error_path)
        return processes

    def _shortcut_group(self, stage, shortcut, program, outputs, batch, error_path):
        """The synapse process of one shortcut group, fed by its source's spikes delayed by
        the group's whole windows."""
        from ..lava.process import SpikeDelay, Synapses

        layer_program = self.programs[stage.name]
        port = outputs[shortcut.source]
        if program.delay_steps:
            delay = SpikeDelay(
                batch=batch,
                size=int(np.prod(shortcut.input_shape)),
                delay=program.delay_steps,
                error_path=error_path(),
            )
            port.connect(delay.s_in)
            port = delay.s_out
        synapses = Synapses(
            batch=batch,
            in_shape=shortcut.input_shape,
            out_shape=stage.output_shape,
            weight=_dendritic(layer_program, program.synapses[-1].weight),
            ops=program.synapses,
            error_path=error_path(),
        )
        port.connect(synapses.s_in)
        return synapses

    def _trace(self, t_input: np.ndarray, outside: int, results: dict) -> Trace:
        snn, steps = self.snn, self.profile.timing.steps_per_window
        n = t_input.shape[0]
        spike_times = {"input": t_input}
        saturated = {"input": outside}
        early = {"input": 0}  # b1 ramps from t_min: no spike can be early
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
                early[stage.name] = 0
                overflow[stage.name] = int(res["clipped"].sum())
        return Trace(
            output=output,
            spike_times=spike_times,
            neuron_layers=("input", *(s.name for s in snn.spiking_layers)),
            saturated_per_layer=saturated,
            early_per_layer=early,
            latency=np.full(n, snn.latency),
            backend=f"{self.backend}:{self.tag}",
            step_size=dict(self.step_size),
            overflow=overflow,
        )
