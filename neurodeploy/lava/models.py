"""ProcessModels of the TTFS processes (see process.py).

Tag ``fixed_pt``: the integer arithmetic of the emulator backend
(neurodeploy/backends/emulator.py), step by step: int64 state, u and v
saturating at +-limit, integer weights, threshold and ramp taken from the
emulator's layer programs, so both produce identical spike steps. Tag
``floating_pt``: the same dynamics in float64 with float weights and no
saturation. Source, pooling and synapse models serve both tags: they only
route spikes and sum weights, exactly in either case (integer-valued
weights are summed exactly in float64 below 2^53). Spikes travel as bool
arrays, drives as float64, or as int32 under fixed_pt where the synapses' bound
allows (:func:`process_model` picks such narrower models per process: int32
drives, event-driven synapses, int32 membranes for Loihi's formats).

Time: the run is a pipeline of windows of K steps. A process's local step
is ``local = time_step - 1 - offset`` (``offset``: the steps Lava's Dense
processes upstream have delayed it, 0 without them), its window
``w = local // K`` and the step in that window ``m = local % K``. Batch c
(samples c B .. c B + B - 1) spikes in the input window c; hidden layer n
(1-based) integrates batch c during window c + n - 1 and fires it during
window c + n, the output layer of L hidden layers integrates it during
window c + L. A process's ``lag`` is the window, counted from a batch's
input window, in which it works on that batch (a neuron: the one it
integrates in), so in window w it handles batch w - lag (a neuron also
fires batch w - lag - 1 then). Messages sent in a step are received in the
same step, so a spike at step m of one window arrives as step m of the next
layer's integration window, as in the emulator.
"""

from __future__ import annotations

import traceback
from dataclasses import replace

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import IdentityTransformer, PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol
from scipy.sparse import csr_matrix

from neurodeploy.backends.emulator import (
    LOIHI_ACT_SHIFT,
    LOIHI_DENDRITE_BITS,
    LOIHI_REGISTER_BITS,
    LOIHI_VTH_SHIFT,
)
from neurodeploy.lava.process import (
    SpikeDelay,
    SpikePool,
    SpikeSource,
    Synapses,
    TTFSNeuron,
    TTFSReadout,
)
from neurodeploy.ttfs import apply_synapses


class _Windowed(PyLoihiProcessModel):
    """Window bookkeeping and failure handling shared by the models.

    A model whose step raises must not take the run down with it: its
    neighbours block on its ports, and Lava's runtime then waits forever for
    the step to end. ``run_spk`` therefore catches the error, writes its
    traceback to ``proc_params["error_path"]``, and from then on only sends
    silence; the host side raises that error once the run has ended and the
    runtime is stopped.
    """

    in_ports: tuple[str, ...] = ()
    out_ports: tuple[str, ...] = ()

    def run_spk(self):
        self._served = set()
        self._received = set()
        if not getattr(self, "_failed", False):
            try:
                self.step()
                return
            except Exception:  # reported by the host after the run
                self._failed = True
                with open(self.proc_params["error_path"], "w") as fh:
                    fh.write(f"{type(self).__name__} at time step {self.time_step}:\n")
                    fh.write(traceback.format_exc())
        for name in self.out_ports:
            if name not in self._served:
                self._send(name, self._silence(name))
        for name in self.in_ports:  # keep the senders' channels flowing
            if name not in self._received:
                getattr(self, name).recv()

    def _recv(self, name: str) -> np.ndarray:
        """The port's message. Lava's InPort.recv adds its channels' messages into a
        fresh zero array of the port's type; with one channel and no reshape the
        message itself (a fresh copy, in the sender's type) is that sum."""
        self._received.add(name)
        port = getattr(self, name)
        channels = port.csp_ports
        if len(channels) == 1 and isinstance(port._transformer, IdentityTransformer):
            return channels[0].recv()
        return port.recv()

    def _send(self, name: str, data: np.ndarray) -> None:
        getattr(self, name).send(data)
        self._served.add(name)

    def _silence(self, name: str) -> np.ndarray:
        """The port's all-zero message (one array per port: sending copies it)."""
        silence = self.__dict__.setdefault("_silences", {})
        if name not in silence:
            port = getattr(self, name)
            silence[name] = np.zeros(port.shape, port._d_type)
        return silence[name]

    def step(self):
        raise NotImplementedError

    def _clock(self) -> tuple[int, int]:
        """(window, step in the window) of this step; window -1 before the process's
        first window (Lava's Dense delays upstream)."""
        local = self.time_step - 1 - self.proc_params.get("offset", 0)
        if local < 0:
            return -1, 0
        return divmod(local, self.proc_params["steps"])

    def _batch(self, window: int, lag: int) -> int | None:
        """The batch that is ``lag`` windows into the pipeline in ``window``, None
        when there is none (the pipeline fills or drains)."""
        p = self.proc_params
        c = window - lag
        return c if 0 <= c and c * p["batch"] < p["samples"] else None

    def _rows(self, chunk: int) -> slice:
        batch, samples = self.proc_params["batch"], self.proc_params["samples"]
        return slice(chunk * batch, min(samples, (chunk + 1) * batch))


@implements(proc=SpikeSource, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySpikeSourceModel(_Windowed):
    spike_steps: np.ndarray = LavaPyType(np.ndarray, np.int64)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool)
    out_ports = ("s_out",)

    def step(self):
        window, m = self._clock()
        chunk = self._batch(window, 0)
        if chunk is None:
            self._send("s_out", self._silence("s_out"))
            return
        if m == 0:  # this window's batch, padded with silent rows
            rows = self.spike_steps[self._rows(chunk)]
            self._steps = np.full(self.s_out.shape, self.proc_params["steps"], np.int64)
            self._steps[: len(rows)] = rows
        self._send("s_out", self._steps == m)


@implements(proc=SpikePool, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySpikePoolModel(_Windowed):
    sign: np.ndarray = LavaPyType(np.ndarray, float)
    arrived: np.ndarray = LavaPyType(np.ndarray, np.int64)
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, bool)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool)
    in_ports = ("s_in",)
    out_ports = ("s_out",)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        p = proc_params
        n_out = int(np.prod(p["out_shape"]))
        self.spike_step = np.full((p["samples"], n_out), p["steps"], dtype=np.int64)
        self.step_record = np.full((p["batch"], n_out), p["steps"], dtype=np.int64)
        # Arrivals that make a window's output spike: +1, the first spike of the window
        # passes; -1, the spike completing it does (every in-bounds input has spiked).
        in_bounds = np.ones((1, 1, *p["in_shape"][1:]))
        pad = p["padding"]
        in_bounds = np.pad(in_bounds, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        k, stride = p["kernel"], p["stride"]
        view = np.lib.stride_tricks.sliding_window_view(in_bounds, (k, k), axis=(2, 3))
        self.positions = view[0, 0, ::stride, ::stride].sum(axis=(2, 3)).reshape(-1)  # (Ho Wo,)
        self.needed = None  # set at the first step: the sign Var is not there before

    def step(self):
        p = self.proc_params
        spikes = self._recv("s_in")
        window, m = self._clock()
        chunk = self._batch(window, p["lag"])
        if chunk is None:
            self._send("s_out", self._silence("s_out"))
            self._save_if_done()
            return
        if self.needed is None:
            sign = self.sign.reshape(-1, 1)
            needed = np.where(sign > 0, 1, self.positions[None, :])
            self.needed = needed.reshape(-1).astype(np.int64)
        if m == 0:
            self.arrived[:] = 0
            self.step_record[:] = p["steps"]
        if spikes.any():
            spikes = spikes.reshape(-1, *p["in_shape"])
            k, stride, pad = p["kernel"], p["stride"], p["padding"]
            if pad:  # padded positions never spike
                spikes = np.pad(spikes, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            _, h_out, w_out = p["out_shape"]
            counts = np.zeros((len(spikes), *p["out_shape"]), np.int64)
            for i in range(k):  # the k x k offsets of every window, strided
                for j in range(k):
                    counts += spikes[:, :, i::stride, j::stride][:, :, :h_out, :w_out]
            before = self.arrived < self.needed
            self.arrived += counts.reshape(len(spikes), -1)
            out = before & (self.arrived >= self.needed)
            self.step_record[out] = m
        else:
            out = self._silence("s_out")
        if m == p["steps"] - 1:
            rows = self._rows(chunk)
            self.spike_step[rows] = self.step_record[: rows.stop - rows.start]
        self._send("s_out", out)
        self._save_if_done()

    def _save_if_done(self):
        if self.time_step == self.proc_params["total_steps"]:
            np.savez(self.proc_params["result_path"], spike_step=self.spike_step)


@implements(proc=SpikeDelay, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySpikeDelayModel(_Windowed):
    """Frame (t - 1) % D of the ring goes out at step t and takes in step t's spikes."""

    frames: np.ndarray = LavaPyType(np.ndarray, bool)
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, bool)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool)
    in_ports = ("s_in",)
    out_ports = ("s_out",)

    def step(self):
        arrived = self._recv("s_in")
        delay = self.proc_params["delay"]
        frames = self.frames.reshape(delay, *self.s_in.shape)
        frame = frames[(self.time_step - 1) % delay]
        self._send("s_out", frame)  # sending copies it: the frame can be refilled
        frame[:] = arrived


@implements(proc=Synapses, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySynapsesModel(_Windowed):
    weight: np.ndarray = LavaPyType(np.ndarray, float)
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, bool)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    in_ports = ("s_in",)
    out_ports = ("a_out",)

    def step(self):
        p = self.proc_params
        spikes = self._recv("s_in")
        active = np.flatnonzero(spikes.any(axis=1))
        if not active.size:  # most steps carry spikes of few samples
            self._send("a_out", self._silence("a_out"))
            return
        if not hasattr(self, "_ops"):
            *linear, affine = p["ops"]
            self._ops = (*linear, replace(affine, weight=self.weight))
        out = np.zeros(self.a_out.shape, self.a_out._d_type)
        x = spikes[active].reshape(len(active), *p["in_shape"]).astype(np.float64)
        out[active] = apply_synapses(self._ops, x).reshape(len(active), -1)
        self._send("a_out", out)


class PySynapsesInt32Model(PySynapsesModel):
    """fixed_pt synapses whose drive fits 31 bits (``bound`` < 2^31): int32 messages,
    half the bytes of float64 (Lava's own Dense sends its sums as int32 too). Chosen
    per process by :func:`process_model`, not by tag."""

    tags = ["fixed_pt_int32"]  # not the inherited tags: never picked by a tag search
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=32)

    def step(self):
        if not hasattr(self, "_matrix"):
            self._matrix = self._as_matrix()
        if self._matrix is None:
            return super().step()
        spikes = self._recv("s_in")
        rows, cols = np.nonzero(spikes)
        if not rows.size:
            self._send("a_out", self._silence("a_out"))
            return
        # event-driven: each spike adds its row of the map (integer sums: exact)
        events = csr_matrix((np.ones(rows.size), (rows, cols)), shape=spikes.shape)
        self._send("a_out", (events @ self._matrix).astype(np.int32))

    def _as_matrix(self) -> np.ndarray | None:
        """The ops as one (N_in, N_out) matrix (the map applied to every unit input),
        when it holds at most MATRIX_ENTRIES; None otherwise."""
        p = self.proc_params
        n_in, n_out = self.s_in.shape[1], self.a_out.shape[1]
        if n_in * n_out > MATRIX_ENTRIES:
            return None
        *linear, affine = p["ops"]
        ops = (*linear, replace(affine, weight=self.weight))
        units = np.eye(n_in).reshape(n_in, *p["in_shape"])
        return apply_synapses(ops, units).reshape(n_in, n_out)


MATRIX_ENTRIES = 2**22  # 32 MiB of float64: a larger map stays a conv or dense op


class _NeuronBase(_Windowed):
    """Shared B1 stepping; subclasses fix the number type and saturation. The Vars u
    and v hold the batch being integrated (``lag``), the model's own arrays the batch
    firing in the same window (``lag + 1``)."""

    def __init__(self, proc_params):
        super().__init__(proc_params)
        p = proc_params
        shape = (p["samples"], p["size"])
        self.spike_step = np.full(shape, p["steps"], dtype=np.int64)
        self.early = np.zeros(shape, dtype=bool)
        self.clipped = np.zeros(shape, dtype=bool)
        # the firing batch: which neurons have not fired yet, and per neuron the count of
        # steps after which it still had not (its spike step: K for none)
        self.silent = np.ones((p["batch"], p["size"]), dtype=bool)
        self.step_record = np.zeros((p["batch"], p["size"]), dtype=np.int32)
        self.fire = np.zeros((p["batch"], p["size"]), dtype=bool)
        self.chunk_clipped = np.zeros((p["batch"], p["size"]), dtype=bool)
        self.v_fire = None  # the firing batch's membranes

    def _saturate(self, x, flag: bool):
        limit = self.limit[0].item()
        if limit and (x.max(initial=0) > limit or x.min(initial=0) < -limit):
            if flag:
                self.chunk_clipped |= np.abs(x) > limit
            np.clip(x, -limit, limit, out=x)
        return x

    def _integrate(self, a):
        if self.proc_params.get("loihi", False):
            # PyLifModelBitAcc's arithmetic: a (16-bit dendritic sum, wraps) enters the
            # current as a << 6; u wraps at 24 bits (range (-2^23, 2^23]); v saturates.
            # Range checks by max/min first: wraps are rare, full passes costly
            a = self._as_state(a)
            half = 2 ** (LOIHI_DENDRITE_BITS - 1)
            if a.max(initial=0) >= half or a.min(initial=0) < -half:
                a = a.astype(np.int64)  # an int32 a + half could overflow
                wrapped = np.mod(a + half, 2 * half) - half
                self.chunk_clipped |= wrapped != a
                a = wrapped
            u = self.u
            u += np.left_shift(a, LOIHI_ACT_SHIFT, out=a)
            top = 2 ** (LOIHI_REGISTER_BITS - 1)
            if u.max(initial=0) > top or u.min(initial=0) <= -top:
                u_wrapped = np.where(u > top, u - 2 * top, u)
                u_wrapped = np.where(u_wrapped <= -top, u + 2 * top, u_wrapped)
                self.chunk_clipped |= u_wrapped != u
                u[:] = u_wrapped
        else:
            self.u += self._as_state(a)
            self._saturate(self.u, True)
        self.v += self.u
        self._saturate(self.v, True)

    def _reset(self, start):
        """A new batch enters integration."""
        self.u[:] = 0
        self.v[:] = start
        self.chunk_clipped[:] = False

    def _save_if_done(self, **arrays):
        if self.time_step == self.proc_params["total_steps"]:
            np.savez(self.proc_params["result_path"], **arrays)


class _NeuronModel(_NeuronBase):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool)
    in_ports = ("a_in",)
    out_ports = ("s_out",)

    def step(self):
        p = self.proc_params
        a = self._recv("a_in")
        window, m = self._clock()
        loihi = p.get("loihi", False)
        integrating = self._batch(window, p["lag"])
        firing = self._batch(window, p["lag"] + 1)
        if m == 0 and window >= 0:  # the batch integrated last window starts firing
            if firing is not None:
                self.v_fire = self.v.copy()
                rows = self._rows(firing)
                self.clipped[rows] = self.chunk_clipped[: rows.stop - rows.start]
                self.silent[:] = True
                self.step_record[:] = 0
            if integrating is not None:
                self._reset(p["start"] if loihi else 0)
        if integrating is not None:
            self._integrate(a)
        out = self._silence("s_out")
        if firing is not None:
            out = self._fire(m, firing)
        self._send("s_out", out)
        self._save_if_done(spike_step=self.spike_step, early=self.early, clipped=self.clipped)

    def _fire(self, m: int, chunk: int) -> np.ndarray:
        p = self.proc_params
        if not hasattr(self, "_threshold"):  # the Vars are set by the first step
            # Loihi fires when v > vth << 6, i.e. v >= (vth << 6) + 1
            if p.get("loihi", False):
                threshold = np.left_shift(self.threshold, LOIHI_VTH_SHIFT) + 1
                self._threshold = threshold.astype(self.v.dtype)  # <= 2^23 + 1: exact
            else:
                self._threshold = self.threshold.copy()
        v = self.v_fire
        rows = self._rows(chunk)
        n = rows.stop - rows.start
        if m == 0:  # value beyond the window: over threshold by more than half a step
            self.early[rows] = (2 * (v - self._threshold) > self.ramp[0].item())[:n]
        fire = np.greater_equal(v, self._threshold, out=self.fire)
        fire &= self.silent
        self.silent ^= fire
        self.step_record += self.silent  # a neuron firing at step m counts m steps
        v += self.ramp[0].item()
        self._saturate(v, False)
        if m == p["steps"] - 1:  # end of the window: silent neurons stay silent
            self.spike_step[rows] = self.step_record[:n]
        return fire


class _FixedState:
    """fixed_pt: int64 membrane state (the emulator's integers); drives arrive exact:
    one group's message as sent (int32 or float64), several groups summed by Lava's
    InPort as int64 (float64 if a message is)."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int64, precision=52)
    limit: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)
    u: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)
    v: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)

    @staticmethod
    def _as_state(a):
        """Integer drives as they come (int32 or int64: the state adds them exactly)."""
        return a if a.dtype.kind == "i" else np.rint(a).astype(np.int64)


class _FloatState:
    """floating_pt: float64 membrane state, no saturation."""

    limit: np.ndarray = LavaPyType(np.ndarray, float)
    u: np.ndarray = LavaPyType(np.ndarray, float)
    v: np.ndarray = LavaPyType(np.ndarray, float)

    @staticmethod
    def _as_state(a):
        return a


@implements(proc=TTFSNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyTTFSNeuronFixed(_FixedState, _NeuronModel):
    threshold: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)
    ramp: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)


class PyTTFSNeuronLoihi(PyTTFSNeuronFixed):
    """fixed_pt neurons in Loihi's formats hold u and v as int32, half the bytes of
    int64 per pass: every value stays below 2^25 (u in (-2^23, 2^23] plus a wrapped
    16-bit a << 6, v within +-(2^23 - 1) plus u or a ramp of at most 2^12 2^7, the
    threshold at most 2^17 2^6 + 1). Chosen per process by :func:`process_model`."""

    tags = ["fixed_pt_loihi"]  # not the inherited tags: never picked by a tag search
    u: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    v: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)


@implements(proc=TTFSNeuron, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyTTFSNeuronFloat(_FloatState, _NeuronModel):
    threshold: np.ndarray = LavaPyType(np.ndarray, float)
    ramp: np.ndarray = LavaPyType(np.ndarray, float)


class _ReadoutModel(_NeuronBase):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_ports = ("a_in",)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self.potential = np.zeros((proc_params["samples"], proc_params["size"]))

    def step(self):
        p = self.proc_params
        a = self._recv("a_in")
        window, m = self._clock()
        chunk = self._batch(window, p["lag"])
        if chunk is not None:
            if m == 0:
                self._reset(self.bias)
            self._integrate(a)
            if m == p["steps"] - 1:  # the readout step
                rows = self._rows(chunk)
                n = rows.stop - rows.start
                self.potential[rows] = self.v[:n]
                self.clipped[rows] = self.chunk_clipped[:n]
        self._save_if_done(potential=self.potential, clipped=self.clipped)


@implements(proc=TTFSReadout, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyTTFSReadoutFixed(_FixedState, _ReadoutModel):
    bias: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)


@implements(proc=TTFSReadout, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyTTFSReadoutFloat(_FloatState, _ReadoutModel):
    bias: np.ndarray = LavaPyType(np.ndarray, float)


_MODELS = {
    "fixed_pt": (PyTTFSNeuronFixed, PyTTFSReadoutFixed),
    "floating_pt": (PyTTFSNeuronFloat, PyTTFSReadoutFloat),
}


def process_model(proc, tag: str) -> type:
    """The ProcessModel of one of process.py's processes under ``tag``: handed to the
    run config for every process, it spares Lava's compiler its model search (which
    imports every module beside a process on every compile) and picks the int32
    drive for synapses whose ``bound`` allows it and int32 membranes for Loihi's formats."""
    routing = (PySpikeSourceModel, PySpikePoolModel, PySpikeDelayModel, PySynapsesModel)
    for model in routing + _MODELS[tag]:
        if type(proc) is model.implements_process:
            if model is PySynapsesModel and tag == "fixed_pt":
                if proc.proc_params["bound"] < 2**31:
                    return PySynapsesInt32Model
            if model is PyTTFSNeuronFixed and proc.proc_params["loihi"]:
                return PyTTFSNeuronLoihi
            return model
    raise KeyError(f"no ProcessModel for {type(proc).__name__}")
