"""ProcessModels of the TTFS processes (see process.py).

Tag ``fixed_pt``: the integer arithmetic of the emulator backend
(neurodeploy/backends/emulator.py), step by step: int64 state, u and v
saturating at +-limit, integer weights, threshold and ramp taken from the
emulator's layer programs, so both produce identical spike steps. Tag
``floating_pt``: the same dynamics in float64 with float weights and no
saturation. Source, pooling and synapse models serve both tags: they only
route spikes and sum weights, exactly in either case (integer-valued
weights are summed exactly in float64 below 2^53).

Time: chunk-local step ``local = (time_step - 1) % chunk_steps``; the input
window is local steps [0, K), hidden layer n (1-based) integrates during
[(n - 1) K, n K) and fires during [n K, (n + 1) K). Messages sent in a step
are received in the same step, so a spike at step m of one window arrives as
step m of the next layer's integration window, as in the emulator.
"""

from __future__ import annotations

import traceback
from dataclasses import replace

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

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


class _Chunked(PyLoihiProcessModel):
    """Chunk bookkeeping and failure handling shared by the models.

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
                port = getattr(self, name)
                port.send(np.zeros(port.shape))
        for name in self.in_ports:  # keep the senders' channels flowing
            if name not in self._received:
                getattr(self, name).recv()

    def _recv(self, name: str) -> np.ndarray:
        self._received.add(name)
        return getattr(self, name).recv()

    def _send(self, name: str, data: np.ndarray) -> None:
        getattr(self, name).send(data)
        self._served.add(name)

    def step(self):
        raise NotImplementedError

    def _clock(self) -> tuple[int, int]:
        """(chunk index, chunk-local step)."""
        return divmod(self.time_step - 1, self.proc_params["chunk_steps"])

    def _rows(self, chunk: int, samples: int) -> slice:
        batch = self.proc_params["batch"]
        return slice(chunk * batch, min(samples, (chunk + 1) * batch))


@implements(proc=SpikeSource, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySpikeSourceModel(_Chunked):
    spike_steps: np.ndarray = LavaPyType(np.ndarray, np.int64)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    out_ports = ("s_out",)

    def step(self):
        chunk, local = self._clock()
        out = np.zeros(self.s_out.shape)
        if local < self.proc_params["steps"]:
            rows = self.spike_steps[self._rows(chunk, len(self.spike_steps))]
            out[: len(rows)] = rows == local
        self._send("s_out", out)


@implements(proc=SpikePool, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySpikePoolModel(_Chunked):
    sign: np.ndarray = LavaPyType(np.ndarray, float)
    arrived: np.ndarray = LavaPyType(np.ndarray, np.int64)
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
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
        _, local = self._clock()
        if self.needed is None:
            sign = self.sign.reshape(-1, 1)
            needed = np.where(sign > 0, 1, self.positions[None, :])
            self.needed = needed.reshape(-1).astype(np.int64)
        if local == 0:
            self.arrived[:] = 0
            self.step_record[:] = p["steps"]
        spikes = self._recv("s_in").reshape(-1, *p["in_shape"])
        k, stride, pad = p["kernel"], p["stride"], p["padding"]
        if pad:  # padded positions never spike
            spikes = np.pad(spikes, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        windows = np.lib.stride_tricks.sliding_window_view(spikes, (k, k), axis=(2, 3))
        counts = windows[:, :, ::stride, ::stride].sum(axis=(4, 5)).reshape(len(spikes), -1)
        before = self.arrived.copy()
        self.arrived += counts.astype(np.int64)
        out = (before < self.needed) & (self.arrived >= self.needed)
        chunk, local = self._clock()
        m = local - p["first_step"]
        if 0 <= m < p["steps"]:
            self.step_record[out] = m
            if m == p["steps"] - 1:
                rows = self._rows(chunk, p["samples"])
                self.spike_step[rows] = self.step_record[: rows.stop - rows.start]
        self._send("s_out", out.astype(float))
        if self.time_step == p["total_steps"]:
            np.savez(p["result_path"], spike_step=self.spike_step)


@implements(proc=SpikeDelay, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySpikeDelayModel(_Chunked):
    due: np.ndarray = LavaPyType(np.ndarray, np.int64)
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    in_ports = ("s_in",)
    out_ports = ("s_out",)

    def step(self):
        _, local = self._clock()
        if local == 0:
            self.due[:] = -1
        arrived = self._recv("s_in") > 0
        if np.any(arrived & (self.due >= local)):
            raise RuntimeError("a neuron spiked again while its delayed spike was pending")
        self.due[arrived] = local + self.proc_params["delay"]
        self._send("s_out", (self.due == local).astype(float))


@implements(proc=Synapses, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt", "floating_pt")
class PySynapsesModel(_Chunked):
    weight: np.ndarray = LavaPyType(np.ndarray, float)
    s_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    a_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    in_ports = ("s_in",)
    out_ports = ("a_out",)

    def step(self):
        p = self.proc_params
        spikes = self._recv("s_in")
        out = np.zeros(self.a_out.shape)
        active = np.flatnonzero(spikes.any(axis=1))
        if active.size:  # most steps carry spikes of few samples
            *linear, affine = p["ops"]
            ops = (*linear, replace(affine, weight=self.weight))
            x = spikes[active].reshape(len(active), *p["in_shape"])
            out[active] = apply_synapses(ops, x).reshape(len(active), -1)
        self._send("a_out", out)


class _NeuronBase(_Chunked):
    """Shared B1 stepping; subclasses fix the number type and saturation."""

    def __init__(self, proc_params):
        super().__init__(proc_params)
        p = proc_params
        shape = (p["samples"], p["size"])
        self.spike_step = np.full(shape, p["steps"], dtype=np.int64)
        self.early = np.zeros(shape, dtype=bool)
        self.clipped = np.zeros(shape, dtype=bool)
        self.fired = np.zeros((p["batch"], p["size"]), dtype=bool)
        self.step_record = np.full((p["batch"], p["size"]), p["steps"], dtype=np.int64)
        self.chunk_early = np.zeros((p["batch"], p["size"]), dtype=bool)
        self.chunk_clipped = np.zeros((p["batch"], p["size"]), dtype=bool)

    def _saturate(self, x, flag: bool):
        limit = self.limit[0]
        if limit:
            if flag:
                self.chunk_clipped |= np.abs(x) > limit
            np.clip(x, -limit, limit, out=x)
        return x

    def _integrate(self, a):
        if self.proc_params.get("loihi", False):
            # PyLifModelBitAcc's arithmetic: a (16-bit dendritic sum, wraps) enters the
            # current as a << 6; u wraps at 24 bits (range (-2^23, 2^23]); v saturates
            a = self._as_state(a)
            half = 2 ** (LOIHI_DENDRITE_BITS - 1)
            wrapped = np.mod(a + half, 2 * half) - half
            self.chunk_clipped |= wrapped != a
            u = self.u + np.left_shift(wrapped, LOIHI_ACT_SHIFT)
            top = 2 ** (LOIHI_REGISTER_BITS - 1)
            u_wrapped = np.where(u > top, u - 2 * top, u)
            u_wrapped = np.where(u_wrapped <= -top, u + 2 * top, u_wrapped)
            self.chunk_clipped |= u_wrapped != u
            self.u[:] = u_wrapped
        else:
            self.u += self._as_state(a)
            self._saturate(self.u, True)
        self.v += self.u
        self._saturate(self.v, True)

    def _reset(self, start):
        self.u[:] = 0
        self.v[:] = start
        self.fired[:] = False
        self.step_record[:] = self.proc_params["steps"]
        self.chunk_early[:] = False
        self.chunk_clipped[:] = False

    def _store(self, chunk):
        rows = self._rows(chunk, self.proc_params["samples"])
        n = rows.stop - rows.start
        self.spike_step[rows] = self.step_record[:n]
        self.early[rows] = self.chunk_early[:n]
        self.clipped[rows] = self.chunk_clipped[:n]

    def _save_if_done(self, **arrays):
        if self.time_step == self.proc_params["total_steps"]:
            np.savez(self.proc_params["result_path"], **arrays)


class _NeuronModel(_NeuronBase):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    in_ports = ("a_in",)
    out_ports = ("s_out",)

    def step(self):
        p = self.proc_params
        a = self._recv("a_in")
        chunk, local = self._clock()
        loihi = p.get("loihi", False)
        if local == 0:
            self._reset(p["start"] if loihi else 0)
        j = local - p["first_step"]
        out = np.zeros(self.s_out.shape)
        if 0 <= j < p["steps"]:
            self._integrate(a)
        m = j - p["steps"]
        if 0 <= m < p["steps"]:
            # Loihi fires when v > vth << 6, i.e. v >= (vth << 6) + 1
            if loihi:
                threshold = np.left_shift(self.threshold, LOIHI_VTH_SHIFT) + 1
            else:
                threshold = self.threshold
            if m == 0:  # value beyond the window: over threshold by more than half a step
                self.chunk_early[:] = 2 * (self.v - threshold) > self.ramp[0]
            fire = ~self.fired & (self.v >= threshold)
            self.step_record[fire] = m
            self.fired |= fire
            out = fire.astype(float)
            self.v += self.ramp[0]
            self._saturate(self.v, False)
            if m == p["steps"] - 1:  # end of the window: silent neurons stay silent
                self._store(chunk)
        self._send("s_out", out)
        self._save_if_done(spike_step=self.spike_step, early=self.early, clipped=self.clipped)


class _FixedState:
    """fixed_pt: int64 membrane state (the emulator's integers); drives arrive exact."""

    limit: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)
    u: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)
    v: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=52)

    @staticmethod
    def _as_state(a):
        return np.rint(a).astype(np.int64)


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
        chunk, local = self._clock()
        if local == 0:
            self._reset(self.bias)
        j = local - p["first_step"]
        if 0 <= j < p["steps"]:
            self._integrate(a)
            if j == p["steps"] - 1:  # the readout step
                rows = self._rows(chunk, p["samples"])
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
