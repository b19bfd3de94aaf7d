"""Memristive crossbar backend: weights as differential conductance pairs.

Mapping. Each layer's dense/conv weights become a matrix W (rows = inputs,
columns = outputs); a convolution is unrolled the way crossbars run it: one
kernel per column, and every output position is one read of the array with
its input patch on the word lines (im2col). Average pooling and flattening in
front of a layer stay in the digital periphery. W maps onto pairs
G+ - G- in [g_min, g_max] with W = (G+ - G-) w_max / (g_max - g_min).
A matrix larger than a tile (``tile_rows`` x ``tile_cols``) is split; the
partial sums of the row tiles are digitised separately and added. A grouped
(depthwise) convolution is G independent matrices of (C/G k^2) rows and O/G
columns, not one block-diagonal C k^2 x O matrix: only the diagonal blocks are
programmed (2 devices per weight), small blocks share a tile along its
diagonal (the devices between them stay unprogrammed and carry no current,
modelled as absent), and every group's patch drives its own word lines.

Programming (once, at ``deploy``; each effect with its own seeded stream per
layer, and each switchable): quantisation to ``levels`` conductances,
device-to-device variability (a fixed relative gain per device), programming
noise, drift G(t) = G_prog (t / t0)^-nu with t = t_inference + t0, t0 = 20 s,
and a per-device nu, stuck-at-on (g_max) and stuck-at-off (g_min) faults.
With ``device_model: pcm`` the statistics are IBM aihwkit's PCMLikeNoiseModel
(see neurodeploy/profiles/pcm.yaml for the formulas); ``generic`` uses the
Gaussian figures of the profile. Global drift compensation rescales each
layer's output by the ratio of its mean |G+ - G-| just after programming to
the one at inference time (aihwkit's GlobalDriftCompensation readout).

Reads. In TTFS a spike at t_j drives its word line from t_j to the end of
the window, so one layer window is one read of the array per output position
(one analog multiply-accumulate over pulse durations). Read noise is drawn
per read: every read sees a fresh Gaussian fluctuation of every device. Its
effect on a column is drawn exactly rather than device by device: the sum of
independent Gaussians x_j dG_ij is Gaussian with variance sum_j x_j^2 sigma_ij^2,
which costs one extra product instead of rows x columns draws per read. The
per-read sigma is aihwkit's 1/f read noise at the inference time (aihwkit
draws it once per time point; a per-read draw is the stricter model and what
repeated inferences on one chip see). DAC: pulse durations take 2^dac_bits - 1
levels over the input window. ADC: each row tile's column sums are quantised
to 2^adc_bits - 1 symmetric levels over +-(adc_headroom x the largest |sum| of
that tile column on the network's calibration set, read noise-free at
deployment, as chips calibrate their converters); clipped sums are counted in
``trace.overflow``.

Residual joins. A layer's shortcut synapses (identity or projection, from an
earlier stage) are programmed on their own tiles: conductance pairs with their
own weight scale w_max / (g_max - g_min), the same devices, noise, drift,
faults, DAC and ADC as the main array. Their word lines carry the source's
pulses, delayed by whole windows (a delay line or buffer in the digital
periphery) so they fall in the join's input window and last the source's
value (up to the source's window, which sets the DAC range); their column sums
are digitised by their own ADCs (ranged on their own calibration sums) and
added digitally to the main array's before the neuron, like the partial sums
of a layer's row tiles. Why not extra rows in the main tiles: the shortcut's
weights (an identity's are 1) and pulse range differ from the main array's,
and one shared scale and DAC range would spend the main weights' conductance
levels and the shortcut's DAC levels on a range neither uses; mapping the
shortcut as its own matrix is also what analog ResNet deployments do (a 1x1
projection is a layer of its own), and every row tile already has its own ADCs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import ops
from ..deploy import Deployment, StageRunner, shortcut_term_key
from ..errors import DeployError
from ..memory import chunk_samples
from ..network import Conv2d, compute_dtype_of
from ..profile import Converter, Crossbar, Faults
from ..simulate import (
    ChunkStream,
    b1_fire,
    check_keep,
    encode_input,
    neuron_layers,
    run_stages_chunked,
    simulate,
    spike_values,
    stage_neurons,
    time_pool,
)
from ..simulate import working_bytes as simulate_working_bytes
from ..trace import Trace
from ..ttfs import INPUT_WINDOW, OutputLayer, SpikingLayer, apply_synapses
from .common import (
    child_rng,
    encode_on_grid,
    require_b1,
    step_sizes,
)

# aihwkit PCMLikeNoiseModel constants (aihwkit.inference.noise.pcm; Nandakumar
# et al., ICECS 2019): programming-noise polynomial in uS at g_max = 25 uS,
# drift fit time t0, drift-exponent fit, 1/f read-noise fit.
PCM_PROG_COEFF = (0.26348, 1.9650, -1.1731)
PCM_PROG_G_MAX_REFERENCE_US = 25.0
DRIFT_T0_S = 20.0
PCM_NU_MEAN = (-0.0155, 0.0244, 0.049, 0.1)  # mu = clip(a ln g + b, lo, hi)
PCM_NU_STD = (-0.0125, -0.0059, 0.008, 0.045)
PCM_G_REL_MIN = 1e-7
PCM_READ_Q = (0.0088, 0.65, 1e-3, 0.2)  # q_s = min(a / max(g^b, c), d)

# Stream purposes: every random effect draws from its own stream per layer.
_VARIABILITY, _PROGRAMMING, _DRIFT, _FAULTS, _READ = range(5)

# The device of the ``ideal`` profile: continuous conductances, nothing random.
_IDEAL_CROSSBAR = Crossbar(
    device_model="generic",
    prog_noise_scale=0.0,
    read_noise_scale=0.0,
    drift_scale=0.0,
    tile_rows=2**31 - 1,
    tile_cols=2**31 - 1,
)


@dataclass(frozen=True, eq=False)
class _Tile:
    """One band of rows of a layer's matrix (of every group's matrix, stacked on a
    leading group axis when the layer has groups > 1)."""

    rows: slice
    g_pos: np.ndarray  # (r, cols), or (G, r, cols): conductance at inference time (uS)
    g_neg: np.ndarray
    read_var: np.ndarray | None  # like g_pos: sigma+^2 + sigma-^2 per read (uS^2)
    adc_step: np.ndarray | None  # (cols,) or (G, cols): value of one ADC level (uS x t)
    adc_max_code: int


@dataclass(frozen=True, eq=False)
class _CrossbarLayer:
    name: str
    pre_ops: tuple  # digital average pooling / flattening before the array
    conv: Conv2d | None  # unrolled convolution geometry (None: dense)
    rows: int  # per group matrix
    cols: int  # per group matrix
    tiles: tuple[_Tile, ...]
    physical_tiles: int  # crossbar tiles the layer occupies
    weight_scale: float  # w_max / (g_max - g_min): weight per uS
    compensation: float  # global drift compensation factor (1 without)
    input_range: float  # longest input pulse (the input window, time units)
    row_conductance: np.ndarray  # (groups * rows,) sum of G+ + G- over columns (read energy)
    positions: int  # reads per sample (output positions)
    groups: int = 1  # convolution groups: independent matrices of rows x cols
    source: str | None = None  # a shortcut group: the stage whose (delayed) spikes it reads
    shortcuts: tuple[_CrossbarLayer, ...] = ()  # a join layer's shortcut groups

    @property
    def arrays(self) -> tuple[_CrossbarLayer, ...]:
        """The layer's arrays: the main one, then its shortcut groups."""
        return (self, *self.shortcuts)

    @property
    def word_lines(self) -> int:
        return self.groups * self.rows

    @property
    def bit_lines(self) -> int:
        return self.groups * self.cols


def _weight_matrices(affine) -> np.ndarray:
    """(G, rows, cols): one matrix per group, rows = inputs, columns = outputs."""
    if isinstance(affine, Conv2d):
        g = affine.groups
        out_ch = affine.weight.shape[0]
        # (O, C/G, k, k) -> (G, O/G, C/G k k) -> (G, C/G k k, O/G): one kernel per column
        return affine.weight.reshape(g, out_ch // g, -1).transpose(0, 2, 1)
    return affine.weight.T[None]  # (1, in, out)


def _tiles_needed(groups: int, rows: int, cols: int, cb: Crossbar) -> int:
    """Tiles holding G matrices of rows x cols: split when larger than a tile, else
    packed side by side along the tile's diagonal (each its own word and bit lines)."""
    row_tiles, col_tiles = -(-rows // cb.tile_rows), -(-cols // cb.tile_cols)
    if groups == 1 or row_tiles > 1 or col_tiles > 1:
        return groups * row_tiles * col_tiles
    per_tile = min(cb.tile_rows // rows, cb.tile_cols // cols)
    return -(-groups // per_tile)


def _group_product(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """x (P, G, r) times matrix (r, c) (one group) or (G, r, c) per group: (P, G c); each
    read's sums the same bits whatever P is (:func:`~neurodeploy.ops.rows_matmul`)."""
    if matrix.ndim == 2:  # one 2-D BLAS product, bit for bit what an ungrouped layer gave
        return ops.rows_matmul(x[:, 0, :], matrix)
    out = ops.rows_matmul(x.transpose(1, 0, 2), matrix)  # (G, P, c)
    return out.transpose(1, 0, 2).reshape(x.shape[0], -1)


def _adc_steps(adc_step: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """A tile's ADC steps flattened (cols,) in dtype with 1 for the columns whose
    calibration sums were all 0 (an unused column: its step is 0), and those columns'
    indices (None if there are none): they read 0."""
    flat = adc_step.reshape(-1)
    dead = np.flatnonzero(flat <= 0)
    return np.where(flat > 0, flat, 1.0).astype(dtype, copy=False), (dead if dead.size else None)


def _as_weight_shape(matrices: np.ndarray, affine) -> np.ndarray:
    """(G, rows, cols) array matrices (:func:`_weight_matrices`) back in the shape of the
    layer's weight."""
    if isinstance(affine, Conv2d):
        return matrices.transpose(0, 2, 1).reshape(affine.weight.shape)
    return matrices[0].T


def _quantise_levels(g: np.ndarray, cb: Crossbar) -> np.ndarray:
    if cb.levels is None:
        return g
    span = cb.g_max_us - cb.g_min_us
    steps = cb.levels - 1
    return cb.g_min_us + np.rint((g - cb.g_min_us) / span * steps) * (span / steps)


def _programming_sigma(g_target: np.ndarray, cb: Crossbar) -> np.ndarray:
    if cb.device_model == "generic":
        return np.full_like(g_target, cb.generic.prog_sigma_us)
    rel = g_target / cb.g_max_us
    c0, c1, c2 = PCM_PROG_COEFF
    return (c0 + c1 * rel + c2 * rel**2) * (cb.g_max_us / PCM_PROG_G_MAX_REFERENCE_US)


def _drift_nu_statistics(g_target: np.ndarray, cb: Crossbar) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each device's drift exponent nu (before drift_scale)."""
    if cb.device_model == "generic":
        return (
            np.full_like(g_target, cb.generic.drift_nu_mean),
            np.full_like(g_target, cb.generic.drift_nu_std),
        )
    log_g = np.log(np.maximum(np.abs(g_target / cb.g_max_us), PCM_G_REL_MIN))
    a, b, lo, hi = PCM_NU_MEAN
    mean = np.clip(a * log_g + b, lo, hi)
    a, b, lo, hi = PCM_NU_STD
    return mean, np.clip(a * log_g + b, lo, hi)


def _drift_exponents(g_target: np.ndarray, cb: Crossbar, rng) -> np.ndarray:
    mean, std = _drift_nu_statistics(g_target, cb)
    return np.abs(mean + std * rng.standard_normal(g_target.shape)) * cb.drift_scale


def read_sigma(g_now: np.ndarray, g_prog: np.ndarray, cb: Crossbar) -> np.ndarray:
    if cb.device_model == "generic":
        return cb.generic.read_sigma_rel * np.abs(g_now) * cb.read_noise_scale
    a, b, c, d = PCM_READ_Q
    q_s = np.minimum(a / np.maximum((np.abs(g_prog) / cb.g_max_us) ** b, c), d)
    t = cb.t_inference_s + DRIFT_T0_S
    return (
        np.abs(g_now)
        * q_s
        * np.sqrt(np.log((t + cb.t_read_s) / (2 * cb.t_read_s)))
        * cb.read_noise_scale
    )


def target_pairs(w: np.ndarray, cb: Crossbar) -> tuple[list[np.ndarray], float]:
    """The target conductances [G+, G-] (uS) W maps onto, on the level grid, and w_max:
    the positive part of W / w_max on G+, the negative part on G-, from g_min."""
    span = cb.g_max_us - cb.g_min_us
    w_max = float(np.abs(w).max()) or 1.0
    target = [
        _quantise_levels(cb.g_min_us + span * np.maximum(sign * w, 0.0) / w_max, cb)
        for sign in (1.0, -1.0)
    ]
    return target, w_max


def program_pairs(w: np.ndarray, cb: Crossbar, faults: Faults, seed: int, layer: int | tuple):
    """Target, programmed and inference-time conductance pairs for W (rows, cols).

    layer: the layer's index, or (index, 1 + i) for its i-th shortcut group: each array
    draws its own streams."""
    path = layer if isinstance(layer, tuple) else (layer,)
    target, w_max = target_pairs(w, cb)
    rng = {p: child_rng(seed, p, *path) for p in (_VARIABILITY, _PROGRAMMING, _DRIFT, _FAULTS)}
    programmed, now = [], []
    fault_u = rng[_FAULTS].random((2, *w.shape))
    for i, g_t in enumerate(target):
        g = g_t
        if cb.variability > 0:
            g = g * (1.0 + cb.variability * rng[_VARIABILITY].standard_normal(g.shape))
        if cb.prog_noise_scale > 0:
            noise = rng[_PROGRAMMING].standard_normal(g.shape)
            g = g + cb.prog_noise_scale * _programming_sigma(g_t, cb) * noise
        g = np.maximum(g, 0.0)
        nu = _drift_exponents(g_t, cb, rng[_DRIFT]) if cb.drift_scale > 0 else None
        t = cb.t_inference_s + DRIFT_T0_S
        g_now = g * (t / DRIFT_T0_S) ** (-nu) if nu is not None and t > DRIFT_T0_S else g
        on = fault_u[i] < faults.stuck_on
        off = (fault_u[i] >= faults.stuck_on) & (fault_u[i] < faults.stuck_on + faults.stuck_off)
        g = np.where(on, cb.g_max_us, np.where(off, cb.g_min_us, g))
        g_now = np.where(on, cb.g_max_us, np.where(off, cb.g_min_us, g_now))
        programmed.append(g)
        now.append(g_now)
    return target, programmed, now, w_max / (cb.g_max_us - cb.g_min_us)


# Gauss-Hermite (probabilists') nodes for the drift factor's moments over nu: 24 nodes
# integrate exp(-nu L) against the normal density to far below the noise it describes.
_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_HERMITE_WEIGHTS = _HERMITE_WEIGHTS / np.sqrt(2.0 * np.pi)


def _normal_pdf_cdf(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import ndtr

    return np.exp(-0.5 * a * a) / np.sqrt(2.0 * np.pi), ndtr(a)


def device_moments(g_target: np.ndarray, cb: Crossbar) -> tuple[np.ndarray, np.ndarray]:
    """Mean and second moment (uS, uS^2) of a device's conductance at inference time, as
    :func:`program_pairs` draws it from its target: G = max(g_t (1 + v e1) + s_p sigma_p(g_t)
    e2, 0) (t / t0)^-nu with nu = |N(mu(g_t), sd(g_t))| x drift_scale. The programmed part is
    a rectified Gaussian (closed form); the drift factor's moments are integrated over nu
    (Gauss-Hermite). Stuck-at faults are left out: they are what the bound must flag."""
    var = np.zeros_like(g_target)
    if cb.variability > 0:
        var = var + (cb.variability * g_target) ** 2
    if cb.prog_noise_scale > 0:
        var = var + (cb.prog_noise_scale * _programming_sigma(g_target, cb)) ** 2
    sd = np.sqrt(var)
    safe = np.where(sd > 0, sd, 1.0)
    pdf, cdf = _normal_pdf_cdf(g_target / safe)
    first = np.where(sd > 0, g_target * cdf + sd * pdf, np.maximum(g_target, 0.0))
    second = np.where(
        sd > 0, (g_target**2 + var) * cdf + g_target * sd * pdf, np.maximum(g_target, 0.0) ** 2
    )
    t = cb.t_inference_s + DRIFT_T0_S
    if cb.drift_scale > 0 and t > DRIFT_T0_S:
        log_t = np.log(t / DRIFT_T0_S)
        mean, std = _drift_nu_statistics(g_target, cb)
        f1 = np.zeros_like(g_target)
        f2 = np.zeros_like(g_target)
        for z, w in zip(_HERMITE_NODES, _HERMITE_WEIGHTS, strict=True):
            factor = np.exp(-np.abs(mean + std * z) * cb.drift_scale * log_t)
            f1 += w * factor
            f2 += w * factor * factor
        first, second = first * f1, second * f2
    return first, second


class CrossbarDeployment(Deployment):
    """A TTFS network on memristive crossbars; see the module docstring."""

    backend = "crossbar"
    streams_chunks = True
    hardware_kinds = ("ideal", "crossbar")

    def __init__(self, snn, profile, seed: int = 0):
        super().__init__(snn, profile, seed)
        require_b1(snn, self.backend)
        ideal = profile.hardware == "ideal"
        self.device = _IDEAL_CROSSBAR if ideal else profile.crossbar
        self.converter = Converter() if ideal else profile.converter
        self.faults = Faults() if ideal else profile.faults
        self.steps = profile.timing.steps_per_window
        self.step_size = step_sizes(snn, self.steps) if self.steps else {}
        self.layers: dict[str, _CrossbarLayer] = {}
        calibration_inputs = self._calibration_inputs() if self.converter.adc_bits else {}
        index = 0
        for stage in snn.stages:
            if isinstance(stage, (SpikingLayer, OutputLayer)):
                window = (
                    stage.t_read if isinstance(stage, OutputLayer) else stage.t_min
                ) - stage.t_min_prev
                layer = self._map_layer(
                    stage.name,
                    stage.synapses,
                    stage.output_shape,
                    window,
                    index,
                    calibration_inputs.get(stage.name),
                )
                shortcuts = tuple(
                    self._map_layer(
                        shortcut_term_key(stage.name, i),
                        shortcut.synapses,
                        stage.output_shape,
                        self._source_window(shortcut),
                        (index, 1 + i),
                        calibration_inputs.get(shortcut_term_key(stage.name, i)),
                        source=shortcut.source,
                    )
                    for i, shortcut in enumerate(stage.shortcuts)
                )
                self.layers[stage.name] = replace(layer, shortcuts=shortcuts)
                index += 1
        self._last_energy: float | None = None

    def _calibration_inputs(self) -> dict[str, np.ndarray]:
        """Input values of every layer on the calibration set (reference SNN), for the ADCs."""
        if self.snn.calibration is None:
            raise DeployError(
                "the network carries no calibration data to range the ADCs; "
                "convert it with convert(net, calibration=...)"
            )
        trace = simulate(self.snn, self.snn.calibration)
        inputs, previous = {}, "input"
        for stage in self.snn.stages:
            if isinstance(stage, (SpikingLayer, OutputLayer)):
                end = stage.t_read if isinstance(stage, OutputLayer) else stage.t_min
                inputs[stage.name] = spike_values(trace.spike_times[previous], end)
                for i, shortcut in enumerate(stage.shortcuts):  # the source's values
                    inputs[shortcut_term_key(stage.name, i)] = spike_values(
                        trace.spike_times[shortcut.source], shortcut.t_source
                    )
            previous = stage.name
        return inputs

    @staticmethod
    def _patches(pre_ops, conv: Conv2d | None, values: np.ndarray):
        """Word-line inputs of one layer: (reads, rows), and the output map size for convs."""
        x = apply_synapses(pre_ops, values) if pre_ops else values
        if conv is not None:
            return ops.im2col(x, conv.kernel, conv.stride, conv.padding)
        return x.reshape(x.shape[0], -1), None, None

    def _source_window(self, shortcut) -> float:
        """Length (time units) of a shortcut source's window: its longest pulse."""
        if shortcut.source == "input":
            return INPUT_WINDOW[1] - INPUT_WINDOW[0]
        source = self.snn.stage(shortcut.source)
        return source.t_max - source.t_min

    def _map_layer(
        self,
        name: str,
        synapses: tuple,
        output_shape: tuple,
        window: float,
        index: int | tuple,
        calibration_values,
        source: str | None = None,
    ) -> _CrossbarLayer:
        """One array: synapses (pre ops, dense/conv) onto tiles; window: the longest input
        pulse (time units); index: the random streams' path (see :func:`program_pairs`)."""
        cb, conv_cfg = self.device, self.converter
        *pre_ops, affine = synapses
        w = _weight_matrices(affine)
        groups, rows, cols = w.shape
        target, programmed, now, weight_scale = program_pairs(w, cb, self.faults, self.seed, index)
        compensation = 1.0
        if cb.drift_compensation:
            reference = np.abs(programmed[0] - programmed[1]).mean()
            current = np.abs(now[0] - now[1]).mean()
            compensation = float(reference / current) if current > 0 else 1.0
        read_var = None
        if cb.read_noise_scale > 0:
            read_var = (
                read_sigma(now[0], programmed[0], cb) ** 2
                + read_sigma(now[1], programmed[1], cb) ** 2
            )
        conv = affine if isinstance(affine, Conv2d) else None
        patches = None
        if calibration_values is not None:
            patches = self._patches(tuple(pre_ops), conv, calibration_values)[0]
            patches = patches.reshape(len(patches), groups, rows)

        def per_group(a: np.ndarray) -> np.ndarray:  # ungrouped layers keep 2-D arrays
            return a[0] if groups == 1 else a

        tiles = []
        diff_target = target[0] - target[1]
        for lo in range(0, rows, cb.tile_rows):
            sl = slice(lo, min(rows, lo + cb.tile_rows))
            adc_step, max_code = None, 0
            if conv_cfg.adc_bits is not None:
                sums = _group_product(patches[:, :, sl], per_group(diff_target[:, sl]))
                largest = np.abs(sums).max(axis=0).reshape(groups, cols)
                max_code = 2 ** (conv_cfg.adc_bits - 1) - 1
                adc_step = per_group(conv_cfg.adc_headroom * largest / max(max_code, 1))
            tiles.append(
                _Tile(
                    sl,
                    per_group(now[0][:, sl]),
                    per_group(now[1][:, sl]),
                    None if read_var is None else per_group(read_var[:, sl]),
                    adc_step,
                    max_code,
                )
            )
        positions = int(np.prod(output_shape[1:])) if conv is not None else 1
        return _CrossbarLayer(
            name=name,
            pre_ops=tuple(pre_ops),
            conv=conv,
            rows=rows,
            cols=cols,
            tiles=tuple(tiles),
            physical_tiles=_tiles_needed(groups, rows, cols, cb),
            weight_scale=weight_scale,
            compensation=compensation,
            input_range=window,
            row_conductance=(now[0] + now[1]).sum(axis=2).reshape(-1),
            positions=positions,
            groups=groups,
            source=source,
        )

    # -- running ---------------------------------------------------------------------------
    def _read(
        self,
        layer: _CrossbarLayer,
        values: np.ndarray,
        rngs,
        stats: dict,
        key: str | None = None,
        scratch: bool = False,
    ):
        """Analog multiply-accumulate of one array, values (N, *input) -> (N, *output);
        rngs: one read-noise stream per row tile (or one generator all tiles draw from in
        turn); scratch: values is the caller's temporary, the DAC may round it in place;
        its ADC clips count in ``stats["overflow"][key]`` (default: the array's name; a
        shortcut group's count under its join layer's).

        No bias: a spiking layer's bias is in its threshold; the output layer adds it."""
        key = layer.name if key is None else key
        n = values.shape[0]
        patches, ho, wo = self._patches(layer.pre_ops, layer.conv, values)
        dac_bits = self.converter.dac_bits
        if dac_bits is not None:
            # In place on the caller's scratch values or their pooled / unrolled copy (a
            # read-only window view of them, as a 1x1 convolution's, is copied once).
            # Pulse durations are >= 0 (spike_values clamps at 0; pooling and zero padding
            # keep the sign), so the clip to [0, levels] is its upper half alone.
            levels = 2**dac_bits - 1
            unit = layer.input_range / levels
            own = patches.flags.writeable and (scratch or not np.may_share_memory(patches, values))
            patches = np.divide(patches, unit, out=patches if own else None)
            np.rint(patches, out=patches)
            np.minimum(patches, levels, out=patches)
            patches *= unit
        dt = patches.dtype
        grouped = patches.reshape(len(patches), layer.groups, layer.rows)
        out = None
        clipped = 0
        if isinstance(rngs, np.random.Generator):
            rngs = [rngs] * len(layer.tiles)
        for tile, rng in zip(layer.tiles, rngs, strict=True):
            xr = grouped[:, :, tile.rows]
            # Per-tile constants derived once per deployment (cached on the arrays), not
            # once per call: the differential conductances and the ADC steps.
            # (float32 runs: their float32 copies; the read noise is the float64 draws).
            diff = ops.derived(tile.g_pos, "crossbar-diff", dt,
                                lambda t=tile: (t.g_pos - t.g_neg).astype(dt, copy=False))
            part = _group_product(xr, diff)
            if tile.read_var is not None:
                sigma = _group_product(np.multiply(xr, xr), ops.param_as(tile.read_var, dt))
                np.sqrt(sigma, out=sigma)
                sigma *= rng.standard_normal(part.shape)
                part += sigma
            if tile.adc_step is not None:
                step, dead = ops.derived(tile.adc_step, "crossbar-step", dt,
                                         lambda a=tile.adc_step: _adc_steps(a, dt))
                code = np.divide(part, step, out=part)
                np.rint(code, out=code)
                top = tile.adc_max_code
                # Two reductions find the (usual) case of no clipped sum without a pass
                # that allocates |code| and its comparison.
                if code.max(initial=0.0) > top or code.min(initial=0.0) < -top:
                    clipped += int(np.count_nonzero(np.abs(code) > top))
                    np.clip(code, -top, top, out=code)
                code *= step
                part = code
                if dead is not None:
                    part[:, dead] = 0.0
            if out is None:  # the first row tile's sums are the total so far
                out = part
            else:
                out += part
        stats["overflow"][key] = stats["overflow"].get(key, 0) + clipped
        if stats["read_charge"] is not None:
            # charge per sample = sum_k G_k * (sum over its rows of the pulse durations x_k),
            # in numpy's own order-fixed sums: a BLAS matrix-vector product's summation
            # order depends on the kernel OpenBLAS picks for the CPU model (last bits of
            # the energy differed between two Xeon models on the same inputs).
            conductance = ops.param_as(layer.row_conductance, dt)
            per_row = patches.reshape(n, -1, patches.shape[-1]).sum(axis=1)  # (N, K)
            stats["read_charge"] += (per_row * conductance).sum(axis=1)
        out *= layer.weight_scale * layer.compensation
        if layer.conv is not None:
            out = out.reshape(n, ho, wo, layer.bit_lines).transpose(0, 3, 1, 2)
        return out

    def encode(self, x, dtype="float64") -> tuple[np.ndarray, int]:
        """Input spike times (on the step grid with one) in dtype, and the count of inputs
        outside [p, q]."""
        t_input, outside = encode_input(self.snn, x, dtype)
        if self.steps:
            x01 = np.where(np.isfinite(t_input), 1.0 - t_input, 0.0)
            t_input = encode_on_grid(x01, self.steps)
        return t_input, outside

    def _stage_functions(self, read_seed: int, stats: dict):
        """(spiking, output) stage functions as :func:`~neurodeploy.simulate.run_stages`
        takes them; ADC clips and read charge into stats ({"overflow": {}, "read_charge":
        (N,)} or read_charge None).

        Read noise: every row tile of every array draws from its own stream, created once
        here and drawn in sample order (a read's (positions, columns) block after the
        previous sample's), so a sample's draws do not depend on how a batch is chunked:
        layer i's main array tile 0 from (seed, read_seed, i), its tile t >= 1 from
        (seed, read_seed, i, 0, t); its j-th shortcut group from (seed, read_seed, i, 1 + j)
        and (..., 1 + j, t)."""

        def streams(path: tuple, tile_path: tuple, array: _CrossbarLayer) -> list:
            """One generator per row tile: tile 0 on path, tile t >= 1 on (*tile_path, t)."""
            rest = [child_rng(self.seed, _READ, read_seed, *tile_path, t)
                    for t in range(1, len(array.tiles))]
            return [child_rng(self.seed, _READ, read_seed, *path), *rest]

        rngs = {}
        for i, (name, layer) in enumerate(self.layers.items()):
            rngs[name] = [streams((i,), (i, 0), layer)] + [
                streams((i, 1 + j), (i, 1 + j), group) for j, group in enumerate(layer.shortcuts)
            ]

        def potential(stage, t_in, shortcut_in):
            """All arrays of a layer read, their digitised sums added: (N, *output)."""
            layer = self.layers[stage.name]
            main, *groups = rngs[stage.name]
            end = stage.t_read if isinstance(stage, OutputLayer) else stage.t_min
            v = self._read(layer, spike_values(t_in, end), main, stats, stage.name, True)
            for group, shortcut, t_src, group_rngs in zip(
                layer.shortcuts, stage.shortcuts, shortcut_in, groups, strict=True
            ):
                values = spike_values(t_src, shortcut.t_source)  # delayed: the source's values
                v += self._read(group, values, group_rngs, stats, stage.name, True)
            return v

        def spiking(stage: SpikingLayer, t_in, shortcut_in=()):
            v = potential(stage, t_in, shortcut_in)
            if not self.steps:
                return b1_fire(stage, v)
            dt = self.step_size[stage.name]
            m = np.ceil((stage.threshold - dt / 2 - v) / dt)  # nearest step of t_min + theta - v
            saturated = 0 if stage.clipped else int(np.count_nonzero(stage.threshold - v < 0))
            np.maximum(m, 0.0, out=m)
            t = stage.t_min + m * dt
            t[m >= self.steps] = np.inf
            return t, saturated, 0  # b1 ramps from t_min: no spike can be early

        def output(stage: OutputLayer, t_in, shortcut_in=()):
            v = potential(stage, t_in, shortcut_in)
            return (v + ops.param_as(stage.bias, v.dtype)).reshape(v.shape[0], -1)

        return spiking, output

    def stage_runner(self) -> StageRunner:
        stats = {"overflow": {}, "read_charge": None}
        spiking, output = self._stage_functions(0, stats)
        return StageRunner(lambda x: self.encode(x)[0], spiking, output)

    def run(
        self, x, read_seed: int = 0, memory_budget=None, dtype="float64", keep=None,
        stream: ChunkStream | None = None,
    ) -> Trace:
        """Run raw inputs x (N, *input_shape). read_seed selects the read-noise draws
        (same deployment seed and read_seed, same bits). memory_budget: bytes (or "8G")
        for one chunk's working set (:mod:`neurodeploy.memory`; default the process-wide
        budget or NEURODEPLOY_MEMORY_BUDGET); the trace is the same bits for any chunk
        size (at a fixed BLAS thread count). dtype: "float64" (default) or "float32" for
        the analog forward (spike times, word-line inputs, conductances and column sums;
        the same read-noise draws, rounded to float32; programming stays float64); its
        error against float64 is in the README's performance section. keep: names of
        the stages whose spike times the trace holds (as
        :func:`~neurodeploy.simulate.simulate`'s; None, the default: every stage; ``()``:
        none); output, energy_j (read charge counted as the arrays are read, spikes from
        the per-stage counts), latency_s, spike counts of every stage, saturation and
        ADC clipping counts are a full run's bit for bit, and the stages not kept take no
        memory beyond one chunk's. stream: hand every chunk (every stage's spike times) to a
        consumer as it is computed (:class:`~neurodeploy.simulate.ChunkStream`)."""
        snn = self.snn
        kept = check_keep(snn, keep)
        dt = compute_dtype_of(dtype)
        t_input, outside = self.encode(x, dt)
        n = t_input.shape[0]
        read_charge = np.zeros(n)
        stats = {"overflow": {}, "read_charge": read_charge}
        spiking, output = self._stage_functions(read_seed, stats)

        def on_chunk(lo: int, hi: int) -> None:
            stats["read_charge"] = read_charge[lo:hi]

        per = chunk_samples(self.working_bytes(dt), memory_budget)
        logits, spike_times, saturated, early, counts = run_stages_chunked(
            snn, t_input, spiking, time_pool, output, per, kept, on_chunk, stream
        )
        trace = Trace(
            output=logits,
            spike_times=spike_times,
            neuron_layers=neuron_layers(snn),
            saturated_per_layer={"input": outside, **saturated},
            early_per_layer=early,
            latency=np.full(n, snn.latency),
            backend=self.backend,
            step_size=dict(self.step_size),
            overflow=stats["overflow"],
            spikes_per_layer=counts,
            neurons_per_layer=stage_neurons(snn, counts),
        )
        energy = self._energy(trace, read_charge)
        self._last_energy = float(energy.mean()) if n else None
        return replace(trace, latency_s=np.full(n, self._latency_s()), energy_j=energy)

    def working_bytes(self, dtype="float64") -> int:
        """Estimated working memory (bytes) of one sample's run besides its trace: the
        reference simulation's (:func:`~neurodeploy.simulate.working_bytes`) plus, for the
        largest array, its word-line inputs three times (DAC copy, squares, a row tile's
        slice) and its column sums four times (sums, read-noise sigma, draws, total)."""
        arrays = [a for layer in self.layers.values() for a in layer.arrays]
        per_read = max((3 * a.word_lines + 4 * a.bit_lines) * a.positions for a in arrays)
        itemsize = compute_dtype_of(dtype).itemsize
        return simulate_working_bytes(self.snn, dtype) + itemsize * per_read

    def _seconds_per_time_unit(self) -> float:
        timing = self.profile.timing
        if self.steps:
            # A time unit lasts 1 / dt steps; use the input window's grid (dt = 1 / K).
            return timing.step_time_s * self.steps
        return timing.time_unit_s

    def _latency_s(self) -> float:
        timing = self.profile.timing
        if self.steps:
            return (1 + len(self.snn.spiking_layers)) * self.steps * timing.step_time_s
        return self.snn.latency * timing.time_unit_s

    def _energy(self, trace: Trace, read_charge: np.ndarray) -> np.ndarray:
        """Device reads V^2 G t + ADC and DAC conversions + routed spikes, per sample (J)."""
        e = self.profile.energy
        cb = self.device
        read_j = cb.v_read_v**2 * 1e-6 * read_charge * self._seconds_per_time_unit()
        arrays = [array for layer in self.layers.values() for array in layer.arrays]
        conversions = sum(a.positions * a.bit_lines * len(a.tiles) for a in arrays)
        dac = sum(a.positions * a.word_lines for a in arrays)
        fixed = 0.0
        if self.converter.adc_bits is not None:
            fixed += conversions * e.adc_conversion_j
        if self.converter.dac_bits is not None:
            fixed += dac * e.dac_conversion_j
        return read_j + fixed + trace.spike_count * e.spike_j

    def quantization_terms(self) -> dict[str, tuple]:
        """Conductance levels, DAC and ADC resolution and (with a step grid) spike-step
        rounding. Noise, drift, variability and faults are not quantisation: their
        effects show as errors beyond these terms. A join layer's shortcut groups have
        their own terms (their levels, ADCs and DAC range)."""
        terms = {"input": (0.5 / self.steps if self.steps else 0.0, None, 0.0)}
        for stage in self.snn.stages:
            layer = self.layers.get(stage.name)
            if layer is None:
                continue
            own, delta, dac = self._group_terms(layer, stage.synapses[-1], stage.output_shape)
            if self.steps and isinstance(stage, SpikingLayer):
                own = own + 0.5 * self.step_size[stage.name]
            terms[stage.name] = (own, delta, dac)
            for i, (group, shortcut) in enumerate(
                zip(layer.shortcuts, stage.shortcuts, strict=True)
            ):
                terms[shortcut_term_key(stage.name, i)] = self._group_terms(
                    group, shortcut.synapses[-1], stage.output_shape
                )
        return terms

    def weight_statistics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What the device model predicts for every array's effective weights: stage (or
        shortcut term) -> (mean error, variance), both in the shape of the stage's
        dense/conv weight, in weight units and weight units^2.

        Effective weight W_hw = c s (G+ - G-), s = w_max / (g_max - g_min), c the
        array's drift compensation; mean error E[W_hw] - s (g_t+ - g_t-) against the
        target pair (conductance levels are the quantisation term, not this), variance
        c^2 s^2 (Var G+ + Var G-) from programming noise, variability and drift
        (:func:`device_moments`) plus the per-read variance of the 1/f read noise of
        the programmed devices (tiles' read_var). The variance of an output is then
        sum_j x_j^2 Var(W_ij) over its inputs x_j (devices independent)."""
        cb = self.device
        out = {}
        for stage in self.snn.stages:
            layer = self.layers.get(stage.name)
            if layer is None:
                continue
            groups = [(stage.name, layer, stage.synapses[-1])]
            for i, (group, shortcut) in enumerate(
                zip(layer.shortcuts, stage.shortcuts, strict=True)
            ):
                groups.append((shortcut_term_key(stage.name, i), group, shortcut.synapses[-1]))
            for key, group, affine in groups:
                target, _ = target_pairs(_weight_matrices(affine), cb)  # (G, rows, cols)
                moments = [device_moments(g_t, cb) for g_t in target]
                gain = group.weight_scale * group.compensation
                mean_error = gain * (moments[0][0] - moments[1][0]) - group.weight_scale * (
                    target[0] - target[1]
                )
                variance = gain**2 * sum(second - first**2 for first, second in moments)
                for tile in group.tiles:
                    if tile.read_var is not None:  # (r, cols) or (G, r, cols)
                        variance[:, tile.rows] += gain**2 * tile.read_var
                out[key] = (
                    _as_weight_shape(mean_error, affine),
                    _as_weight_shape(np.maximum(variance, 0.0), affine),
                )
        return out

    def _group_terms(self, layer: _CrossbarLayer, affine, output_shape) -> tuple:
        """(ADC rounding per output channel, half a conductance level in weight units,
        half a DAC level) of one array."""
        delta = None
        if self.device.levels is not None:  # half a conductance level, in weight units
            span = self.device.g_max_us - self.device.g_min_us
            level = span / (self.device.levels - 1)
            delta = np.full(affine.weight.shape, 0.5 * level * layer.weight_scale)
        own = np.zeros(layer.bit_lines)
        for tile in layer.tiles:
            if tile.adc_step is not None:
                step = tile.adc_step.reshape(-1)
                own = own + 0.5 * step * layer.weight_scale * layer.compensation
        own = own.reshape((-1,) + (1,) * (len(output_shape) - 1))
        dac = 0.0
        if self.converter.dac_bits is not None:
            dac = 0.5 * layer.input_range / (2**self.converter.dac_bits - 1)
        return own, delta, dac

    def summary(self) -> dict:
        cb = self.device
        adc = self.converter.adc_bits is not None

        def array(group: _CrossbarLayer) -> dict:
            return {
                "rows": group.rows,
                "cols": group.cols,
                "groups": group.groups,
                "devices": 2 * group.groups * group.rows * group.cols,  # programmed pairs
                "tiles": group.physical_tiles,
                "reads_per_inference": group.positions,
                "adc_conversions_per_inference": (
                    group.positions * group.bit_lines * len(group.tiles) if adc else 0
                ),
                "weight_per_us": group.weight_scale,
                "drift_compensation": group.compensation,
            }

        layers = []
        for layer in self.layers.values():
            main = array(layer)
            shortcuts = [{"source": g.source, **array(g)} for g in layer.shortcuts]
            groups = [main, *shortcuts]
            tiles = sum(g["tiles"] for g in groups)
            layers.append(
                {
                    "name": layer.name,
                    **main,
                    # the layer's totals: main array and shortcut groups
                    "devices": sum(g["devices"] for g in groups),
                    "tiles": tiles,
                    "utilisation": sum(g["devices"] // 2 for g in groups)
                    / (tiles * cb.tile_rows * cb.tile_cols),
                    "adc_conversions_per_inference": sum(
                        g["adc_conversions_per_inference"] for g in groups
                    ),
                    "levels": cb.levels,
                }
            )
            if shortcuts:  # a join layer: its shortcut arrays (included in the totals)
                layers[-1]["shortcuts"] = shortcuts
        return {
            "backend": self.backend,
            "profile": self.profile.name,
            "hardware": self.profile.hardware,
            "layers": layers,
            "tiles": sum(layer["tiles"] for layer in layers),
            "latency_s": self._latency_s(),
            "energy_j_per_inference": self._last_energy,
        }
