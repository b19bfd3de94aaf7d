"""The file-classification SNN: LIF neurons with lava's dynamics, an STDP-trained hidden
layer with lateral inhibition and a supervised spike-pattern readout.

Dynamics (lava's LIF and Dense, floating point, so that the Lava backend runs the
same network): a Dense connection delivers W s(t - 1) at step t; a LIF neuron
integrates u <- u (1 - du) + a, v <- v (1 - dv) + u, fires when v > vth and resets
v to 0. The hidden layer receives the inputs and its own spikes through an
inhibitory all-to-all connection (winner-take-most); the output layer one neuron
population per class, reading both the input spikes and the hidden spikes. A file
is classified by the class whose target spike pattern is nearest to the output
spikes in van Rossum distance.

Same bits on every machine: every product of this network has a spike train
(0/1) on one side, so :func:`spike_matmul` and :func:`spike_pairs` compute it as
sums of the rows the spikes select, added one after another in a fixed order
(scipy's compiled sparse loops; one thread, no BLAS kernel whose blocking or
SIMD width depends on the CPU). The results do not depend on the BLAS thread
count, the CPU's OpenBLAS kernels or how files are batched. (OpenBLAS does
not: retrained with its Haswell kernels, the model shipped before, trained
with its generic "Prescott" kernels, differed from the first readout epoch's
loss on, in the last bit, and ended at 95.24 % test accuracy instead of
95.17 %; with the generic kernels and 2 threads, from the third epoch, at
95.54 %.) The distances add squared differences in numpy's fixed pairwise
order. Exponentials and logarithms come from the C library (:func:`libm_exp`,
:func:`libm_log`), not from numpy's SIMD loops, whose AVX512F versions give
other last bits than libm for about a quarter of all arguments (measured on
10^6 arguments), so they would tie the bits to the CPU's instruction set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse


@dataclass(frozen=True)
class LIF:
    """Current and voltage decays per step, threshold (lava LIF's du, dv, vth)."""

    du: float
    dv: float
    vth: float


def input_spikes(steps_in: np.ndarray, steps: int) -> np.ndarray:
    """(N, steps, N_in) 0/1 spike trains from spike steps (N, N_in), -1 = silent."""
    n, n_in = steps_in.shape
    out = np.zeros((n, steps, n_in), dtype=np.float64)
    rows, cols = np.nonzero(steps_in >= 0)
    out[rows, steps_in[rows, cols], cols] = 1.0
    return out


def libm_exp(x: np.ndarray) -> np.ndarray:
    """exp of every element by the C library's ``exp`` (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    return np.fromiter(map(math.exp, x.ravel().tolist()), np.float64, x.size).reshape(x.shape)


def libm_log(x: np.ndarray) -> np.ndarray:
    """log of every element (> 0) by the C library's ``log`` (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    return np.fromiter(map(math.log, x.ravel().tolist()), np.float64, x.size).reshape(x.shape)


def _spike_rows(spikes: np.ndarray) -> scipy.sparse.csr_matrix:
    """The 0/1 matrix ``spikes`` (R, K) as CSR, its entries in increasing k per row."""
    rows, cols = np.nonzero(spikes)
    indptr = np.zeros(len(spikes) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(spikes)), out=indptr[1:])
    return scipy.sparse.csr_matrix((np.ones(len(cols)), cols, indptr), shape=spikes.shape)


def spike_matmul(spikes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """spikes (R, K) of 0/1 times weights (K, M) -> (R, M), order-fixed.

    Element (r, m) is the sum of weights[k, m] over the k where spikes[r, k] is 1,
    added in increasing k: the same bits on every machine and for any batching
    (see the module docstring)."""
    return np.asarray(_spike_rows(spikes) @ weights)


def spike_pairs(spikes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """spikes.T @ values for spikes (R, K) of 0/1 and values (R, M) -> (K, M), order-fixed:
    element (k, m) adds values[r, m] over the r where spikes[r, k] is 1, in increasing r."""
    return np.asarray(_spike_rows(spikes).T @ values)


def run(
    spikes_in: np.ndarray,
    w_in: np.ndarray,
    inhibition: float,
    hidden: LIF,
    hidden_vth: np.ndarray,
    w_out: np.ndarray | None = None,
    output: LIF | None = None,
    read_noise=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Simulate N files at once. spikes_in (N, T, N_in); w_in (H, N_in); hidden_vth (H,)
    per-neuron thresholds; w_out (O, N_in + H) reads the inputs and the hidden layer.
    read_noise(layer, spikes (N, n_in)) -> extra drive (N, n_out) or None. Returns
    hidden (N, T, H) and output (N, T, O) spikes."""
    n, steps, _ = spikes_in.shape
    h = w_in.shape[0]
    drive_in = spike_matmul(spikes_in.reshape(n * steps, -1), w_in.T)  # W s(t), every t
    drive_in = drive_in.reshape(n, steps, h)
    u = np.zeros((n, h))
    v = np.zeros((n, h))
    s_h = np.zeros((n, steps, h))
    have_out = w_out is not None
    if have_out:
        o = w_out.shape[0]
        u_o, v_o = np.zeros((n, o)), np.zeros((n, o))
        s_o = np.zeros((n, steps, o))
    for t in range(steps):
        a = np.zeros((n, h))
        if t > 0:  # Dense delivers the previous step's spikes
            a += drive_in[:, t - 1]
            if read_noise is not None:
                a += read_noise("in", spikes_in[:, t - 1])
            fired = s_h[:, t - 1]
            a -= inhibition * (fired.sum(axis=1, keepdims=True) - fired)
        u *= 1.0 - hidden.du
        u += a
        v *= 1.0 - hidden.dv
        v += u
        spikes = v > hidden_vth
        v[spikes] = 0.0
        s_h[:, t] = spikes
        if have_out:
            a_o = np.zeros((n, o))
            if t > 0:
                both = np.concatenate([spikes_in[:, t - 1], s_h[:, t - 1]], axis=1)
                a_o += spike_matmul(both, w_out.T)
                if read_noise is not None:
                    a_o += read_noise("out", both)
            u_o *= 1.0 - output.du
            u_o += a_o
            v_o *= 1.0 - output.dv
            v_o += u_o
            out_spikes = v_o > output.vth
            v_o[out_spikes] = 0.0
            s_o[:, t] = out_spikes
    return s_h, (s_o if have_out else None)


def trace(spikes: np.ndarray, tau: float) -> np.ndarray:
    """Exponentially filtered spike trains (N, T, n): x(t) = x(t - 1) e^(-1/tau) + s(t)."""
    decay = math.exp(-1.0 / tau)
    out = np.empty_like(spikes)
    acc = np.zeros(spikes.shape[::2])
    for t in range(spikes.shape[1]):
        acc = acc * decay + spikes[:, t]
        out[:, t] = acc
    return out


def van_rossum(a: np.ndarray, b: np.ndarray, tau: float) -> np.ndarray:
    """Van Rossum distance (squared, summed over neurons and steps) between spike trains
    a (N, T, O) and b (C, T, O): returns (N, C)."""
    return filtered_distances(trace(a, tau), trace(b, tau))


def filtered_distances(fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Squared distances (N, C) between filtered trains fa (N, T, O) and fb (C, T, O),
    sums of squared differences (numpy's pairwise sums: a fixed order, no BLAS)."""
    fa = fa.reshape(len(fa), -1)
    fb = fb.reshape(len(fb), -1)
    out = np.empty((len(fa), len(fb)))
    for c, target in enumerate(fb):
        out[:, c] = ((fa - target) ** 2).sum(axis=1)
    return out
