"""Lava Process interfaces of a batched TTFS network (B1 neuron on a step grid).

Every process carries a batch dimension: ports and state are (B, N), one row
per sample, so one compiled network runs B samples at once. A run streams
any number of samples through the same graph as a pipeline, as the chip
would: a new batch enters every window of K steps, and in each window every
layer works on a different batch (a neuron integrates batch c + 1 while it
fires batch c, so it holds two sets of membranes). L hidden layers and C
batches take (C + L) K steps. ``lag`` (the window, counted from a batch's
input window, in which a process works on that batch) and ``offset`` (steps
of delay upstream, from Lava's Dense) place a process in that pipeline; see
models.py.

Why our own synapse process instead of lava's ``Dense``/``Conv``: those take
one sample per time step (s_in of shape (N,)), while this network streams a
batch per step; and lava's Dense delays its output by one step (its a_buff),
which the TTFS windows would have to absorb layer by layer. The synapses here
compute the same fixed-point product (integer weights, exact sums) for a
(B, N_in) spike matrix in the step the spikes arrive. (``synapses="lava"`` of the
backend runs Lava's own Dense/Sparse instead, one sample per step, and absorbs those
delays: neurodeploy/backends/lava_synapses.py.)

A layer that joins a residual branch takes a second synapse group per
shortcut (a :class:`Synapses` process fed by a :class:`SpikeDelay` on the
source's spikes); both groups' outputs connect to the neuron's one input
port, whose Lava InPort sums them, as Loihi's dendrites sum synapse groups.

Every process also takes ``error_path``: a model that fails writes its
traceback there and goes silent, so the run ends instead of hanging.

Results are large ((samples, neurons) per layer), and ``Var.get`` copies them
element by element; the recording models therefore hand their results over in
one piece at the end of the run, as .npy files in ``result_dir``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var

from neurodeploy.ttfs import apply_synapses


class SpikeSource(AbstractProcess):
    """Emits the encoded input spikes of batch after batch of samples, one batch per window.

    spike_steps: (samples, N) int, the step k in [0, K) of the input window at
    which each input spikes, K for no spike. Batch c spikes in window c: step k
    goes out at time step c K + k + 1.
    """

    def __init__(self, *, spike_steps: np.ndarray, batch: int, steps: int, samples: int, **kwargs):
        super().__init__(batch=batch, steps=steps, samples=samples, **kwargs)
        self.spike_steps = Var(shape=spike_steps.shape, init=spike_steps)
        self.s_out = OutPort(shape=(batch, spike_steps.shape[1]))


class SpikePool(AbstractProcess):
    """Max pooling of spike times: per k x k window, the first spike (sign +1) or
    the spike that completes the window (sign -1, all inputs spiked).

    geometry: (C, H, W) input, kernel, stride, padding (padded positions never
    spike; a sign -1 window completes when its in-bounds inputs have all spiked);
    sign: (C,) +1 or -1. lag: the pooled layer's firing window, counted from
    a batch's input window; the step of each output spike in that window is
    recorded per sample.
    """

    def __init__(
        self,
        *,
        batch: int,
        in_shape: tuple,
        out_shape: tuple,
        kernel: int,
        stride: int,
        padding: int,
        sign: np.ndarray,
        lag: int,
        steps: int,
        samples: int,
        result_path: str,
        total_steps: int,
        **kwargs,
    ):
        super().__init__(
            batch=batch,
            in_shape=tuple(in_shape),
            out_shape=tuple(out_shape),
            kernel=kernel,
            stride=stride,
            padding=padding,
            lag=lag,
            steps=steps,
            samples=samples,
            result_path=result_path,
            total_steps=total_steps,
            **kwargs,
        )
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        self.sign = Var(shape=sign.shape, init=sign)
        self.arrived = Var(shape=(batch, n_out), init=0)
        self.s_in = InPort(shape=(batch, n_in))
        self.s_out = OutPort(shape=(batch, n_out))


class SpikeDelay(AbstractProcess):
    """Holds spikes back by ``delay`` time steps: a residual shortcut's source spikes,
    delayed by whole windows (plus, on Lava's own synapses, the hops between) so they
    arrive in the join layer's input window.

    In the pipeline several batches are under way in the delay at once, so the buffer
    is ``frames``: the last ``delay`` steps' (B, N) spikes, a ring of delay x B x N
    booleans.
    """

    def __init__(self, *, batch: int, size: int, delay: int, **kwargs):
        super().__init__(batch=batch, size=size, delay=delay, **kwargs)
        self.frames = Var(shape=(delay * batch, size), init=0)
        self.s_in = InPort(shape=(batch, size))
        self.s_out = OutPort(shape=(batch, size))


class Synapses(AbstractProcess):
    """Weighted spikes: a_out = W s_in for a (B, N_in) spike matrix, in the same step.

    weight: the dense (out, in) or conv (O, C, k, k) weight, integer-valued in
    fixed point. ops: the linear ops the weight belongs to (flatten, sum pool,
    then the dense or conv op), as the emulator's layer program holds them.
    ``bound`` (proc param): the largest |a_out| any spikes can give (every input
    spiking, absolute weights; the ops before the weight have no negative
    coefficients), which decides whether the drive fits an int32 message.
    """

    def __init__(
        self,
        *,
        batch: int,
        in_shape: tuple,
        out_shape: tuple,
        weight: np.ndarray,
        ops: tuple,
        **kwargs,
    ):
        *linear, affine = ops
        every_input = np.ones((1, *in_shape))
        bound = apply_synapses((*linear, replace(affine, weight=np.abs(weight))), every_input)
        super().__init__(
            batch=batch,
            in_shape=tuple(in_shape),
            out_shape=tuple(out_shape),
            ops=ops,
            bound=float(np.abs(bound).max()),
            **kwargs,
        )
        self.weight = Var(shape=weight.shape, init=weight)
        self.s_in = InPort(shape=(batch, int(np.prod(in_shape))))
        self.a_out = OutPort(shape=(batch, int(np.prod(out_shape))))


class _Membranes(AbstractProcess):
    """What TTFSNeuron and TTFSReadout share: a batch of (u, v) pairs that integrate
    weighted spikes in window ``lag`` of each batch (after ``offset`` steps of upstream
    delay), saturating at ``limit``, and record per sample into ``result_path`` once
    the ``total_steps`` have run (never instantiated)."""

    def __init__(
        self,
        *,
        batch: int,
        size: int,
        limit: float,
        lag: int,
        steps: int,
        samples: int,
        result_path: str,
        total_steps: int,
        **kwargs,
    ):
        super().__init__(
            batch=batch,
            size=size,
            lag=lag,
            steps=steps,
            samples=samples,
            result_path=result_path,
            total_steps=total_steps,
            **kwargs,
        )
        self.limit = Var(shape=(1,), init=limit)
        self.u = Var(shape=(batch, size), init=0)
        self.v = Var(shape=(batch, size), init=0)
        self.a_in = InPort(shape=(batch, size))


class TTFSNeuron(_Membranes):
    """B1 neurons on the step grid, one layer, batched.

    During the K steps of the previous layer's window (window ``lag`` of a
    batch) the current u integrates the incoming weighted spikes and the
    membrane v integrates u. During its own window (the next K steps, while
    u and v integrate the next batch) v rises by ``ramp`` per step; a neuron
    fires in the first step with v >= threshold and never again; at the end
    of the window it is silent for good (forced no spike). u and v reset for
    every batch.
    ``limit``: saturation bound of u and v (0: none, floating point).
    Records per sample the spike step (K: none), whether the value exceeded
    the window (already above threshold by more than half a ramp step when
    the window opened) and whether u or v saturated.

    ``loihi=True`` (proc param): Loihi's formats (neurodeploy.backends.emulator):
    ``threshold`` is the unsigned mantissa vth and a neuron fires when v > vth 2^6;
    v starts each batch at ``start`` (a negative threshold's offset); the input a is
    a 16-bit dendritic sum that wraps, enters u as a 2^6, u wraps at 24 bits and v
    saturates at +-limit, as PyLifModelBitAcc does.
    """

    def __init__(
        self,
        *,
        batch: int,
        size: int,
        threshold: np.ndarray,
        ramp: float,
        start: np.ndarray | float = 0,
        **kwargs,
    ):
        # start is a proc param: the model reads it once per batch
        super().__init__(batch=batch, size=size, start=np.asarray(start), **kwargs)
        self.threshold = Var(shape=(size,), init=threshold)
        self.ramp = Var(shape=(1,), init=ramp)
        self.s_out = OutPort(shape=(batch, size))


class TTFSReadout(_Membranes):
    """The non-spiking output layer: u and v integrate like a TTFSNeuron's during the
    last hidden window, v starting from the (integer) bias; v at the end of that
    window is recorded per sample (the logits, in membrane units)."""

    def __init__(self, *, batch: int, size: int, bias: np.ndarray, **kwargs):
        super().__init__(batch=batch, size=size, **kwargs)
        self.bias = Var(shape=(size,), init=bias)
