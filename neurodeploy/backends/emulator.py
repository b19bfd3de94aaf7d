"""Discrete-time fixed-point emulator of a Loihi-style digital core (b1 neuron).

The arithmetic is the integer arithmetic a chip does, vectorised over the
batch (integers are held exactly in float64, < 2^53, so BLAS does the sums):

- weights: ``weights.bits`` signed mantissas w with one power-of-two exponent e
  per layer (W ~ w 2^e), scaled into the membrane by a left shift s:
  w_q = w 2^s; average pools become sum pools with 1/k^2 folded into W (a
  count_include_pad=False pool: integer multiplicities per window and 1/L, see
  backends.common.fold_average_pools);
- inputs: a spike at step k of the previous window is an input of d = K - k
  steps; during that window the synaptic current I grows by w_q at the spike
  and the membrane V adds I every step, so at the window's end V = sum w_q d;
- then V rises by the integer ramp R per step and the neuron fires at the
  first step m with V + m R >= Theta (never again); no spike if m >= K;
- R = round(dt_n / LSB) and Theta = round((theta - dt_n / 2) / LSB) with
  LSB = 2^(e - s) dt_(n-1), the value of one membrane unit: the half step
  makes spike steps round to nearest instead of always late;
- V and I are signed ``neuron.membrane_bits`` saturating registers. s is the
  largest shift for which no sum can overflow; when even s = 0 cannot
  guarantee that, the layer is integrated step by step with saturation.

The output layer does not fire: its membrane, started at the integer bias, is
read at the end of the last hidden window and scaled by LSB into logits.

Residual joins: a layer's shortcut synapses are a second synapse group of the
same neurons (one per shortcut). The source's spikes lie on its own window's
grid (dt_src per step) and are delayed by whole windows (the windows in
between, ``delay_steps`` = their number x K steps, as Loihi's synaptic delays
give), so a source spike at step k arrives at step k of the join's input
window: a duration of d = K - k steps, worth the value d dt_src. The join's
membrane has one LSB (2^(e - s) dt_in), so the group's weights carry the step
ratio: W' = W_sc dt_src / dt_in, quantised to ``weights.bits`` mantissas with
the group's own exponent e_sc (Loihi shares one weight exponent and width per
synapse group: ``weight_exp`` / ``num_weight_bits`` of Lava's Loihi ``Dense``
process, lava.proc.dense.process), and entering the membrane as
w' 2^(e_sc - e + s) units per step of duration. That shift cannot be negative
(a membrane unit is the finest value the core adds), so e_sc >= e - s. The
current I sums both groups' spikes in the step they arrive; V, the overflow
bound and the step-by-step saturation include them.

Loihi number formats (``neuron.number_format: loihi2``, the loihi2 profile), as
lava-nc 0.10's bit-accurate models hold them (PyDenseModelBitAcc, PyLifModelBitAcc):
a mantissa m enters Lava's Dense as m 2^(8 - bits + 1) (mixed sign), the dendritic
sum a is shifted by weight_exp in 0..7 and then by 6 into the current, so
s = weight_exp + 15 - bits; a is a 16-bit register and u a 24-bit one, both wrap
(u as Lava wraps it: once, into (-2^23, 2^23]); v saturates at +-(2^23 - 1) (Lava's
clip). The neuron fires when V > vth 2^6 with vth an unsigned 17-bit mantissa (V >=
vth 2^6 + 1; a negative threshold becomes an initial membrane and vth = 0), and the
ramp is a bias mantissa (13 bits, signed) times 2^(0..7). Every wrap or saturation
is counted in ``overflow``; a format that cannot hold the layer is a DeployError.

With the ``ideal`` profile the emulator runs the reference simulator.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np

from ..deploy import Deployment, StageRunner, shortcut_term_key
from ..errors import DeployError
from ..memory import chunk_samples, chunks
from ..network import Conv2d, Dense, Flatten
from ..simulate import (
    ChunkStream,
    check_keep,
    encode_input,
    neuron_layers,
    run_stages_chunked,
    simulate,
    stage_neurons,
    stages_with_spike_times,
    time_pool,
)
from ..simulate import working_bytes as simulate_working_bytes
from ..trace import Trace, require_spike_times
from ..ttfs import INPUT_WINDOW, OutputLayer, SpikingLayer, TimePool, apply_synapses
from .common import (
    SumPool2d,
    durations,
    encode_on_grid,
    fold_average_pools,
    require_b1,
    step_sizes,
)

# Largest left shift tried when fitting weights into the membrane; 2^16
# membrane units per ramp step is far beyond any step-time resolution needed.
_MAX_RAMP_UNITS = 2**16

# Loihi number formats, as Lava's bit-accurate models hold them (lava-nc 0.10:
# lava/proc/dense/models.py AbstractPyDenseModelBitAcc, lava/proc/dense/process.py
# Dense, lava/proc/lif/models.py AbstractPyLifModelFixed / PyLifModelBitAcc).
LOIHI_ACT_SHIFT = 6  # dendritic input left-shifted by 6 into the current (act_shift)
LOIHI_VTH_SHIFT = 6  # threshold mantissa left-shifted by 6 (vth_shift)
LOIHI_VTH_BITS = 17  # unsigned threshold mantissa (vth: precision=17)
LOIHI_BIAS_MANT_BITS = 13  # signed bias mantissa (bias_mant: precision=13)
LOIHI_BIAS_EXP_MAX = 7  # unsigned 3-bit bias exponent (bias_exp: precision=3)
LOIHI_DENDRITE_BITS = 16  # dendritic sum a_out / a_in (precision=16)
LOIHI_REGISTER_BITS = 24  # current u and membrane v (precision=24)
LOIHI_WEIGHT_EXP_MAX = 7  # weight_exp is kept in 0..7. Lava's Dense does not bound it; it
# is non-negative because a negative weight_exp right-shifts (truncates) every step's sum in
# Lava's Dense, which is not exact, and at most 7, the largest value of a 3-bit exponent field
# like the bias exponent's (an assumption: Intel has not published Loihi 2's field width).
LOIHI_MIXED_SIGN_SHIFT = 1  # mixed-sign Dense weights are scaled by 2 (Dense: isMixed())


def loihi_weight_shift(bits: int) -> int:
    """Membrane shift s of weight exponent 0: an 8-bit mantissa m enters Lava's Dense as
    m 2^(8 - bits + 1) (num_weight_bits = bits, mixed sign), its dendritic sum is shifted
    by weight_exp and then by act_shift into the current: w_q = m 2^s with
    s = weight_exp + loihi_weight_shift(bits)."""
    return LOIHI_ACT_SHIFT + LOIHI_MIXED_SIGN_SHIFT + (8 - bits)


def wrap_dendrite(a: np.ndarray) -> np.ndarray:
    """A dendritic sum wrapped into the signed 16-bit register (two's complement)."""
    half = 2.0 ** (LOIHI_DENDRITE_BITS - 1)
    return np.mod(a + half, 2 * half) - half


def wrap_current(u: np.ndarray) -> np.ndarray:
    """The 24-bit current wrapped as PyLifModelBitAcc wraps it (one wrap, range
    (-2^23, 2^23]: Lava's comparison ``> 2^23`` keeps +2^23)."""
    top = 2.0 ** (LOIHI_REGISTER_BITS - 1)
    u = np.where(u > top, u - 2 * top, u)
    return np.where(u <= -top, u + 2 * top, u)


def loihi_ramp(desired: float) -> tuple[float, int]:
    """The ramp as a Loihi bias: (mant 2^exp, exp) nearest ``desired`` register units, with
    a 13-bit signed mantissa and exp in 0..7; exp is -1 when it cannot be represented."""
    top = 2 ** (LOIHI_BIAS_MANT_BITS - 1) - 1
    exp = max(0, int(np.ceil(np.log2(max(desired, 1.0) / top))))
    mant = max(1.0, float(np.rint(desired / 2.0**exp)))
    if mant > top:  # rounding up crossed the top
        exp += 1
        mant = float(np.rint(desired / 2.0**exp))
    if exp > LOIHI_BIAS_EXP_MAX:
        return 0.0, -1
    return mant * 2.0**exp, exp


@dataclass(frozen=True, eq=False)
class LayerProgram:
    """One layer as the chip holds it (see the module docstring)."""

    name: str
    synapses: tuple  # linear ops; the affine one holds w_q = w 2^s (exact integers)
    indicator: tuple  # the same ops with 1 where a synapse exists: counts synaptic events
    steps: int
    dt_in: float  # time units per step of the input window
    dt: float  # time units per step of the own window (0 for the output layer)
    lsb: float  # value (time units) of one membrane unit: 2^(e - s) dt_in
    exponent: int | None  # e (None: float weights)
    shift: int  # s
    threshold: np.ndarray | None  # Theta (output shape); None for the output layer
    ramp: float  # R
    bias: np.ndarray | None  # output layer: initial membrane (output shape)
    limit: float | None  # membrane limit 2^(bits-1) - 1 (None: float membrane)
    stepped: bool  # integrate step by step (saturation possible)
    synapse_count: int
    neurons: int
    fanout: np.ndarray  # (inputs,) synapses leaving each input neuron
    shortcuts: tuple[ShortcutProgram, ...] = ()  # aligned with the stage's shortcuts
    loihi: bool = False  # Loihi number formats (neuron.number_format 'loihi2')
    start: np.ndarray | float = 0.0  # initial membrane (output shape): a negative threshold
    weight_exp: int | None = None  # Loihi Dense weight_exp of the layer's synapses
    vth: np.ndarray | None = None  # Loihi threshold mantissa: fires when V > vth 2^6
    ramp_exp: int = 0  # Loihi bias exponent of the ramp (rounding 2^(ramp_exp - 1))


@dataclass(frozen=True, eq=False)
class ShortcutProgram:
    """One shortcut synapse group of a join layer (see the module docstring)."""

    source: str  # the stage (or "input") whose spikes feed it
    synapses: tuple  # linear ops; the affine one holds the membrane units per step
    indicator: tuple
    dt_src: float  # time units per step of the source's window
    step_ratio: float  # dt_src / dt_in, folded into the weights
    pool_factor: float  # 1/k^2 of average pools folded into the weights
    delay_steps: int  # whole windows x K
    exponent: int | None  # e_sc (None: float weights)
    synapse_count: int
    fanout: np.ndarray  # (source neurons,)
    weight_exp: int | None = None  # Loihi Dense weight_exp of the group


def _fanout(indicator: tuple, input_shape) -> np.ndarray:
    """Synapses leaving each input neuron: the column sums of the layer's connectivity,
    i.e. its transpose applied to a vector of ones, op by op in reverse (one pass; the
    sums are integers, exact in float64). Returns (prod(input_shape),)."""
    from .. import ops as kernels

    shapes = [tuple(input_shape)]
    for op in indicator[:-1]:
        shapes.append(tuple(op.output_shape(shapes[-1])))
    affine = indicator[-1]
    grad = np.ones((1, *affine.output_shape(shapes[-1])))
    for op, shape in zip(reversed(indicator), reversed(shapes), strict=True):
        if isinstance(op, Dense):
            grad = kernels.dense_grad_input(grad, op.weight)
        elif isinstance(op, Conv2d):
            grad = kernels.conv2d_grad_input(grad, op.weight, shape, op.stride, op.padding,
                                             op.groups)
        elif isinstance(op, SumPool2d) and op.multiplicity is None:
            # a sum pool is k^2 times an average pool counting its padding; g k^2 / k^2 = g
            window = op.kernel * op.kernel
            grad = kernels.avgpool2d_grad_input(grad * window, shape, op.kernel, op.stride,
                                                op.padding, count_include_pad=True)
        elif isinstance(op, Flatten):
            grad = grad.reshape(1, *shape)
        else:  # pragma: no cover - the indicator holds only the ops above
            raise TypeError(f"no transpose for {type(op).__name__}")
    return grad.reshape(-1)


def _weight_exponent(w: np.ndarray, bits: int) -> int:
    """Smallest e with max|w| / 2^e <= 2^(bits-1) - 1 (the shared per-layer exponent)."""
    largest = float(np.abs(w).max())
    if largest == 0:
        return 0
    top = 2 ** (bits - 1) - 1
    return int(np.ceil(np.log2(largest / top))) if bits > 1 else int(np.ceil(np.log2(largest)))


def _with_weight(op, weight: np.ndarray):
    return replace(op, weight=weight, bias=np.zeros(weight.shape[0]))


def _group(synapses: tuple, input_shape) -> tuple:
    """(ops with sum pools, affine op, pool factor, indicator ops, synapse count, fanout)."""
    ops, pool_factor = fold_average_pools(synapses, input_shape)
    affine = ops[-1]
    assert isinstance(affine, (Dense, Conv2d))
    # Synapses exist where weights are nonzero; sum pools count each input once per
    # window (their multiplicities for count_include_pad=false are weights, not synapses).
    linear = tuple(op.connectivity() if isinstance(op, SumPool2d) else op for op in ops[:-1])
    indicator = (*linear, _with_weight(affine, (affine.weight != 0).astype(np.float64)))
    count = int(apply_synapses(indicator, np.ones((1, *input_shape))).sum())
    return ops, affine, pool_factor, indicator, count, _fanout(indicator, input_shape)


def program_layer(
    stage,
    steps: int,
    bits: int | None,
    membrane_bits: int | None,
    sources: dict | None = None,
    loihi: bool = False,
) -> LayerProgram:
    """The chip program of one layer. sources: for a join layer, shortcut source name ->
    (dt_src, delay_steps) (see :meth:`EmulatorDeployment._shortcut_sources`); loihi: hold
    it in Loihi's number formats (see the module docstring)."""
    if stage.shortcuts and sources is None:
        raise DeployError(
            f"layer '{stage.name}' joins residual shortcuts: program_layer needs their "
            "sources' step sizes and delays (EmulatorDeployment._shortcut_sources)"
        )
    ops, affine, pool_factor, indicator, synapse_count, fanout = _group(
        stage.synapses, stage.input_shape
    )
    weight = affine.weight * pool_factor
    dt_in = (
        (stage.t_min - stage.t_min_prev)
        if isinstance(stage, SpikingLayer)
        else (stage.t_read - stage.t_min_prev)
    ) / steps
    is_output = isinstance(stage, OutputLayer)
    dt = 0.0 if is_output else stage.window / steps
    ones = np.ones((1, *stage.input_shape))
    threshold_phys = None if is_output else stage.threshold - dt / 2
    common = {
        "name": stage.name,
        "indicator": indicator,
        "steps": steps,
        "dt_in": dt_in,
        "dt": dt,
        "synapse_count": synapse_count,
        "neurons": int(np.prod(stage.output_shape)),
        "fanout": fanout,
    }
    # Shortcut groups: (ops, affine, W' = W_sc x pool factor x dt_src / dt_in, record).
    groups = []
    for shortcut in stage.shortcuts:
        dt_src, delay_steps = sources[shortcut.source]
        sc_ops, sc_affine, sc_pool, sc_indicator, sc_count, sc_fanout = _group(
            shortcut.synapses, shortcut.input_shape
        )
        ratio = dt_src / dt_in
        record = {
            "source": shortcut.source,
            "indicator": sc_indicator,
            "dt_src": dt_src,
            "step_ratio": ratio,
            "pool_factor": sc_pool,
            "delay_steps": delay_steps,
            "synapse_count": sc_count,
            "fanout": sc_fanout,
        }
        groups.append((sc_ops, sc_affine, sc_affine.weight * sc_pool * ratio, shortcut, record))

    if bits is None:  # float weights on the step grid: one membrane unit = one input step
        lsb = dt_in
        return LayerProgram(
            synapses=(*ops[:-1], _with_weight(affine, weight)),
            lsb=lsb,
            exponent=None,
            shift=0,
            threshold=None if is_output else threshold_phys / lsb,
            ramp=dt / lsb,
            bias=stage.bias / lsb if is_output else None,
            limit=None,
            stepped=False,
            shortcuts=tuple(
                ShortcutProgram(synapses=(*o[:-1], _with_weight(a, w)), exponent=None, **rec)
                for o, a, w, _, rec in groups
            ),
            **common,
        )

    exponent = _weight_exponent(weight, bits)
    if loihi and not is_output and membrane_bits is not None:
        # The threshold must fit the 24-bit register even at weight_exp 0 (Loihi has no
        # finer membrane unit than a mantissa step 2^min_shift): else coarser mantissas.
        half_register = 2.0 ** (membrane_bits - 2)
        need = float(np.abs(threshold_phys).max()) / (dt_in * half_register)
        if need > 0:
            exponent = max(exponent, int(np.ceil(np.log2(need))) + loihi_weight_shift(bits))
    top = 2 ** (bits - 1)
    mantissa = np.clip(np.rint(weight / 2.0**exponent), -top, top - 1)
    abs_ops = (*ops[:-1], _with_weight(affine, np.abs(mantissa)))
    worst = apply_synapses(abs_ops, ones * steps)[0]  # largest |sum w d| per neuron, units of w
    limit = None if membrane_bits is None else float(2 ** (membrane_bits - 1) - 1)
    ramp_per_unit = dt / (2.0**exponent * dt_in)  # r: ramp in mantissa-step units (shift 0)
    group_exponents = [_weight_exponent(w, bits) for _, _, w, _, _ in groups]
    # Loihi: s = weight_exp + min_shift with weight_exp in 0..LOIHI_WEIGHT_EXP_MAX
    min_shift = loihi_weight_shift(bits) if loihi else 0
    max_shift = min_shift + LOIHI_WEIGHT_EXP_MAX if loihi else 40

    def shortcut_units(shift: int):
        """Per group: (exponent e_sc, membrane units per step of duration)."""
        out = []
        for (_, _, w, _, _), e_group in zip(groups, group_exponents, strict=True):
            # no finer than one membrane unit (Loihi: than weight_exp 0 of the group)
            e_sc = max(e_group, exponent - shift + min_shift)
            m = np.clip(np.rint(w / 2.0**e_sc), -top, top - 1)
            out.append((e_sc, m * 2.0 ** (e_sc - exponent + shift)))
        return out

    def group_weight_exps(shift: int) -> list[int]:
        return [e_sc - exponent + shift - min_shift for e_sc, _ in shortcut_units(shift)]

    def scaled(shift: int):
        """(lsb, threshold, start, bias, ramp, ramp exponent, vth) at shift s."""
        lsb = 2.0 ** (exponent - shift) * dt_in
        bias = np.rint(stage.bias / lsb) if is_output else None
        if is_output:
            return lsb, None, 0.0, bias, 0.0, 0, None
        theta = np.rint(threshold_phys / lsb)
        desired = ramp_per_unit * 2.0**shift
        if not loihi:
            return lsb, theta, 0.0, bias, float(max(1.0, np.rint(desired))), 0, None
        # Loihi fires when V > vth 2^6 (vth unsigned): a negative threshold becomes an
        # initial membrane -theta and vth 0; V >= theta + 1 is V > theta for integers.
        vth = np.rint(np.maximum(theta, 0.0) / 2.0**LOIHI_VTH_SHIFT)
        start = np.maximum(-theta, 0.0)
        ramp, ramp_exp = loihi_ramp(desired)
        return lsb, vth * 2.0**LOIHI_VTH_SHIFT + 1 - start, start, bias, ramp, ramp_exp, vth

    def fits(shift: int) -> bool:
        if loihi and any(we > LOIHI_WEIGHT_EXP_MAX for we in group_weight_exps(shift)):
            return False
        lsb, theta, start, bias, ramp, ramp_exp, _ = scaled(shift)
        if ramp_exp < 0:
            return False
        if limit is None:
            return True
        extra = float(np.abs(bias).max()) if is_output else float(np.max(start))
        total = worst * 2.0**shift
        for (o, a, _, shortcut, _), (_, units) in zip(groups, shortcut_units(shift), strict=True):
            sc_abs = (*o[:-1], _with_weight(a, np.abs(units)))
            total = total + apply_synapses(sc_abs, np.ones((1, *shortcut.input_shape)) * steps)[0]
        bound = float(total.max()) + extra
        if not is_output:
            bound = max(bound, float(np.abs(theta + start).max()) + ramp)
        return bound <= limit

    if is_output:
        target = 12  # 2^12 membrane units per mantissa step: logits to 12 more bits
    else:
        target = max(0, int(np.ceil(np.log2(_MAX_RAMP_UNITS / max(ramp_per_unit, 1e-300)))))
    shift = next(
        (s for s in range(min(max(target, min_shift), max_shift), min_shift - 1, -1) if fits(s)),
        None,
    )
    stepped = shift is None
    shift = min_shift if stepped else shift
    lsb, theta, start, bias, ramp, ramp_exp, vth = scaled(shift)
    if loihi:
        _check_loihi_formats(
            stage.name, stage.shortcuts, group_weight_exps(shift), ramp_exp, vth, start, limit
        )
    elif limit is not None and theta is not None:
        theta = np.clip(theta, -limit, limit)
    shortcuts = tuple(
        ShortcutProgram(
            synapses=(*o[:-1], _with_weight(a, units)),
            exponent=e_sc,
            weight_exp=we if loihi else None,
            **rec,
        )
        for (o, a, _, _, rec), (e_sc, units), we in zip(
            groups, shortcut_units(shift), group_weight_exps(shift), strict=True
        )
    )
    return LayerProgram(
        synapses=(*ops[:-1], _with_weight(affine, mantissa * 2.0**shift)),
        lsb=lsb,
        exponent=exponent,
        shift=shift,
        threshold=theta,
        ramp=ramp,
        bias=bias,
        limit=limit,
        stepped=stepped,
        shortcuts=shortcuts,
        loihi=loihi,
        start=start,
        weight_exp=shift - min_shift if loihi else None,
        vth=vth,
        ramp_exp=ramp_exp,
        **common,
    )


def _check_loihi_formats(name, shortcuts, group_exps, ramp_exp, vth, start, limit) -> None:
    """DeployError for a layer program outside Loihi's formats (see the module docstring)."""
    for shortcut, we in zip(shortcuts, group_exps, strict=True):
        if we > LOIHI_WEIGHT_EXP_MAX:
            raise DeployError(
                f"layer '{name}': its shortcut group from '{shortcut.source}' needs weight "
                f"exponent {we} relative to the layer's membrane, beyond Loihi's 0.."
                f"{LOIHI_WEIGHT_EXP_MAX} (its weights are too large beside the layer's own)"
            )
    if ramp_exp < 0:
        raise DeployError(
            f"layer '{name}': its ramp does not fit a Loihi bias (13-bit mantissa, exponent "
            f"0..{LOIHI_BIAS_EXP_MAX}): one step of its window is more than 2^19 membrane "
            "units, its largest weight too small beside its window"
        )
    if vth is not None and float(np.max(vth)) >= 2**LOIHI_VTH_BITS:
        raise DeployError(
            f"layer '{name}': threshold mantissa {int(np.max(vth))} exceeds Loihi's unsigned "
            f"{LOIHI_VTH_BITS} bits"
        )
    if limit is not None and float(np.max(start)) > limit:
        raise DeployError(
            f"layer '{name}': a negative threshold needs an initial membrane of "
            f"{int(np.max(start))} units, beyond the 24-bit register"
        )


def _integrate(
    program: LayerProgram,
    d: np.ndarray,
    shortcut_d: tuple = (),
    start: np.ndarray | float = 0.0,
):
    """Membrane at the end of the input window, and how many neurons saturated on the way.

    d: input durations in steps (N, *input); shortcut_d: the shortcut groups' durations
    (N, *source), aligned with ``program.shortcuts``: their delayed spikes arrive in the
    same window, at step K - d, and add to the same current."""
    groups = [(program.synapses, d)] + [
        (sc.synapses, d_sc) for sc, d_sc in zip(program.shortcuts, shortcut_d, strict=True)
    ]
    if not program.stepped:
        v = start
        for synapses, durations_ in groups:
            v = apply_synapses(synapses, durations_) + v
        return v, 0
    limit = program.limit
    n = d.shape[0]
    current = 0.0
    v = (
        np.broadcast_to(np.asarray(start, dtype=np.float64), (n, *np.shape(start))).copy()
        if np.ndim(start)
        else None
    )
    clipped = None
    for k in range(program.steps):
        drive = 0.0
        for synapses, durations_ in groups:
            arriving = (durations_ == program.steps - k).astype(np.float64)
            drive = drive + apply_synapses(synapses, arriving)
        if v is None:
            v = np.zeros_like(drive) + start
        if clipped is None:
            clipped = np.zeros(drive.shape, dtype=bool)
        if program.loihi:
            # Lava's Dense sends the dendritic sum a (16 bits: wraps); the neuron adds
            # a 2^6 to the current (24 bits: wraps as PyLifModelBitAcc does)
            a = drive / 2.0**LOIHI_ACT_SHIFT
            wrapped = wrap_dendrite(a)
            over = wrapped != a
            current = current + wrapped * 2.0**LOIHI_ACT_SHIFT
            wrapped = wrap_current(current)
            over |= wrapped != current
            current = wrapped
        else:
            current = current + drive
            over = np.abs(current) > limit
            current = np.clip(current, -limit, limit)
        v = v + current
        over |= np.abs(v) > limit
        v = np.clip(v, -limit, limit)
        clipped |= over
    return v, int(np.count_nonzero(clipped))


def _shortcuts(stage) -> tuple:
    return getattr(stage, "shortcuts", ())


def _shortcut_durations(stage, program: LayerProgram, shortcut_in: tuple) -> tuple:
    """Durations (steps) of the delayed shortcut spikes: K - k for a source spike at step k
    of its window, 0 for silence."""
    return tuple(
        durations(t_src, shortcut.t_source, sc.dt_src)
        for shortcut, sc, t_src in zip(stage.shortcuts, program.shortcuts, shortcut_in, strict=True)
    )


def synapse_bits(profile) -> int:
    """Bits of synaptic memory one synapse takes: its weight mantissa (``weights.bits``,
    sign included), 32 for float weights; no per-synapse index or delay bits are counted
    (a dense weight list; Loihi's own synapse encodings are not published in bits)."""
    return 32 if profile.weights.bits is None else int(profile.weights.bits)


def presynaptic_neurons(groups: list, neurons: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct presynaptic neurons of each of a layer's neurons, as (indptr, ids):
    neuron j's are ids[indptr[j]:indptr[j + 1]], sorted. groups: (source name, indicator
    ops, input shape) per synapse group; groups of one source share its ids (one axon per
    source neuron), other sources are numbered after it."""
    offsets: dict[str, int] = {}  # source -> id of its first neuron
    next_id = 0
    rows, cols = [], []
    for name, indicator, input_shape in groups:
        n_in = int(np.prod(input_shape))
        if name not in offsets:
            offsets[name], next_id = next_id, next_id + n_in
        offset = offsets[name]
        for lo in range(0, n_in, 256):  # identity basis in blocks bounds the memory
            hi = min(n_in, lo + 256)
            basis = np.zeros((hi - lo, n_in))
            basis[np.arange(hi - lo), np.arange(lo, hi)] = 1.0
            out = apply_synapses(indicator, basis.reshape(hi - lo, *input_shape))
            src, dst = np.nonzero(out.reshape(hi - lo, -1))
            rows.append(dst)
            cols.append(src + lo + offset)
    dst = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    src = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    pairs = np.unique(np.stack([dst, src]), axis=1)  # sorted by neuron, then source
    indptr = np.searchsorted(pairs[0], np.arange(neurons + 1))
    return indptr, pairs[1]


def partition_into_cores(
    memory_bits: np.ndarray,
    neurons_per_core: int,
    memory_per_core: int,
    presynaptic: tuple[np.ndarray, np.ndarray] | None = None,
    axons_per_core: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy partition of a layer's neurons, in order, into cores.

    memory_bits: (neurons,) synaptic memory each neuron's input synapses take (bits), each
    at most memory_per_core. Each core takes the longest run of the next neurons that holds
    at most neurons_per_core neurons and memory_per_core bits and, with axons_per_core,
    receives from at most that many distinct presynaptic neurons (presynaptic: (indptr,
    ids) of :func:`presynaptic_neurons`; each neuron's own at most axons_per_core). Returns
    (neurons, bits) per core, two int64 arrays of one entry per core (empty for a layer of
    no neurons)."""
    total = np.concatenate(([0], np.cumsum(memory_bits, dtype=np.int64)))
    n = len(memory_bits)
    counts, used = [], []
    start = 0
    while start < n:
        # last end with total[end] - total[start] <= memory_per_core (total is nondecreasing)
        end = int(np.searchsorted(total, total[start] + memory_per_core, side="right")) - 1
        end = min(end, start + neurons_per_core, n)
        if axons_per_core is not None:
            indptr, ids = presynaptic
            # distinct inputs grow with the run: bisect for the longest run that fits
            lo, hi = start + 1, end  # the run [start, lo) fits: one neuron's inputs do
            while lo < hi:
                mid = (lo + hi + 1) // 2
                inputs = len(np.unique(ids[indptr[start] : indptr[mid]]))
                lo, hi = (mid, hi) if inputs <= axons_per_core else (lo, mid - 1)
            end = lo
        counts.append(end - start)
        used.append(int(total[end] - total[start]))
        start = end
    return np.array(counts, dtype=np.int64), np.array(used, dtype=np.int64)


class EmulatorDeployment(Deployment):
    """Vectorised fixed-point emulation of the digital core; see the module docstring."""

    backend = "emulator"
    streams_chunks = True
    hardware_kinds = ("ideal", "digital")

    def __init__(self, snn, profile, seed: int = 0):
        super().__init__(snn, profile, seed)
        self.programs: dict[str, LayerProgram] = {}
        # layer -> (neurons, synaptic memory bits) of each of its cores, in neuron order
        self.core_slices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # layer -> input axons of each of its cores (with cores.input_axons_per_core only)
        self.core_axons: dict[str, np.ndarray] = {}
        self._last_energy: float | None = None
        self._last_breakdown: dict | None = None
        # trace this deployment returned -> its energy breakdown (a run with keep= has not
        # the spike times to count it again)
        self._breakdowns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if profile.hardware == "ideal":
            return
        require_b1(snn, self.backend)
        self._build_programs(profile.weights.bits, profile.neuron.membrane_bits)

    def _build_programs(self, bits: int | None, membrane_bits: int | None) -> None:
        steps = self.profile.timing.steps_per_window
        self.step_size = step_sizes(self.snn, steps)
        loihi = bits is not None and self.profile.neuron.number_format == "loihi2"
        previous = "input"
        for stage in self.snn.stages:
            if isinstance(stage, (SpikingLayer, OutputLayer)):
                self.programs[stage.name] = program_layer(
                    stage, steps, bits, membrane_bits, self._shortcut_sources(stage), loihi
                )
                self._map_to_cores(stage, self.programs[stage.name], previous)
            previous = stage.name

    def _map_to_cores(self, stage, prog: LayerProgram, source: str) -> None:
        """Partition the layer into cores (see :func:`partition_into_cores`): a neuron and
        all its input synapses (shortcut groups included) live on one core, each synapse
        taking ``weights.bits`` of the core's synaptic memory (32 for float weights); with
        ``cores.input_axons_per_core`` a core also receives from at most that many distinct
        presynaptic neurons. ``source``: the stage feeding the layer's own synapses. A
        neuron that alone exceeds a core cannot be mapped."""
        fan_in = apply_synapses(prog.indicator, np.ones((1, *stage.input_shape)))[0]
        for shortcut, sc in zip(stage.shortcuts, prog.shortcuts, strict=True):
            fan_in = fan_in + apply_synapses(sc.indicator, np.ones((1, *shortcut.input_shape)))[0]
        cores = self.profile.cores
        bits = synapse_bits(self.profile)
        memory = np.rint(fan_in.reshape(-1)).astype(np.int64) * bits
        largest = int(memory.max(initial=0))
        if largest > cores.synaptic_memory_bits:
            raise DeployError(
                f"layer '{stage.name}': a neuron has {largest // bits} input synapses x "
                f"{bits} bits = {largest} bits, more than one core's synaptic memory "
                f"(cores.synaptic_memory_bits = {cores.synaptic_memory_bits}); the network "
                "cannot be mapped"
            )
        axons = None
        if cores.input_axons_per_core is not None:
            groups = [(source, prog.indicator, stage.input_shape)]
            groups += [
                (sc.source, sc.indicator, shortcut.input_shape)
                for shortcut, sc in zip(stage.shortcuts, prog.shortcuts, strict=True)
            ]
            axons = presynaptic_neurons(groups, len(memory))
            widest = int(np.diff(axons[0]).max(initial=0))
            if widest > cores.input_axons_per_core:
                raise DeployError(
                    f"layer '{stage.name}': a neuron receives spikes from {widest} presynaptic "
                    f"neurons, more input axons than one core has (cores.input_axons_per_core"
                    f" = {cores.input_axons_per_core}); the network cannot be mapped"
                )
        per_core, used = partition_into_cores(
            memory,
            cores.neurons_per_core,
            cores.synaptic_memory_bits,
            axons,
            cores.input_axons_per_core,
        )
        self.core_slices[stage.name] = (per_core, used)
        if axons is not None:
            indptr, ids = axons
            bounds = np.concatenate(([0], np.cumsum(per_core)))
            self.core_axons[stage.name] = np.array(
                [len(np.unique(ids[indptr[a] : indptr[b]])) for a, b in pairwise(bounds)],
                dtype=np.int64,
            )

    def _shortcut_sources(self, stage) -> dict[str, tuple[float, int]]:
        """Shortcut source name -> (dt_src, delay in steps) for a join layer.

        Window w = 0 is the input's, w = n hidden layer n's (a pool's is the layer it
        pools). The join integrates during window w_in (its t_min_prev .. t_min), so a
        source in window w is delayed by (w_in - w) K steps; that must be the join's
        delay in time units, the windows in between."""
        steps = self.profile.timing.steps_per_window
        window_of, window_end = {"input": 0}, [INPUT_WINDOW[1]]
        for s in self.snn.stages:
            if s is stage:
                break
            if isinstance(s, SpikingLayer):
                window_end.append(s.t_max)
            if isinstance(s, (SpikingLayer, TimePool)):
                window_of[s.name] = len(window_end) - 1
        joined = len(window_end) - 1  # the window the join's inputs arrive in
        sources = {}
        for shortcut in stage.shortcuts:
            w = window_of.get(shortcut.source)
            scale = max(1.0, abs(window_end[-1]))
            if (
                w is None
                or abs(window_end[w] - shortcut.t_source) > 1e-9 * scale
                or abs(window_end[joined] - window_end[w] - stage.delay(shortcut)) > 1e-9 * scale
            ):
                raise DeployError(
                    f"layer '{stage.name}': its shortcut from '{shortcut.source}' (window end "
                    f"{shortcut.t_source}, delay {stage.delay(shortcut)}) is not aligned with "
                    "whole windows of an earlier stage; the chip delays spikes by whole windows"
                )
            sources[shortcut.source] = (self.step_size[shortcut.source], (joined - w) * steps)
        return sources

    # -- running ---------------------------------------------------------------------------
    def _spiking(self, overflow: dict, events: dict | None = None):
        """The hidden layers' stage function (as run_stages takes it); clipped counts
        into overflow; with events ({"synops": (n,), "active": (n,)}, pointed at a chunk's
        samples), each layer adds its synaptic events and active updates
        (:meth:`_layer_events`)."""

        def layer(stage: SpikingLayer, t_in: np.ndarray, shortcut_in: tuple = ()):
            prog = self.programs[stage.name]
            d = durations(t_in, stage.t_min, prog.dt_in)
            shortcut_d = _shortcut_durations(stage, prog, shortcut_in)
            if prog.stepped and np.any(prog.start):
                # the initial membrane of a negative threshold takes part in saturation
                start = np.reshape(prog.start, stage.output_shape)
                v, clipped = _integrate(prog, d, shortcut_d, start=start)
                v = v - start
            else:
                v, clipped = _integrate(prog, d, shortcut_d)
            overflow[stage.name] = overflow.get(stage.name, 0) + clipped  # summed over chunks
            # First step m >= 0 with V + m R >= Theta: m = ceil((Theta - V) / R). The
            # float division of these exact integers rounds to the right side of every
            # integer (|Theta - V| < 2^53), so the ceiling is exact.
            m = np.subtract(prog.threshold, v, out=v)
            m /= prog.ramp
            saturated = 0
            # V - Theta > R / 2: value beyond the window (a clipped layer's clip: not counted)
            if not stage.clipped and m.min(initial=0.0) < -0.5:
                saturated = int(np.count_nonzero(m < -0.5))
            np.ceil(m, out=m)
            np.maximum(m, 0.0, out=m)
            fires = m < prog.steps
            m *= prog.dt
            m += stage.t_min
            with np.errstate(divide="ignore"):
                np.divide(m, fires, out=m)  # t / 0 = inf: no spike within the window
            if events is not None:
                self._count_events(events, stage, t_in, shortcut_in, m)
            # b1 ramps from t_min (step 0 at the earliest): no spike can be early.
            return m, saturated, 0

        return layer

    def _output(self, overflow: dict, events: dict | None = None):
        """The output layer's stage function; overflow and events as :meth:`_spiking`'s."""

        def layer(stage: OutputLayer, t_in: np.ndarray, shortcut_in: tuple = ()):
            prog = self.programs[stage.name]
            d = durations(t_in, stage.t_read, prog.dt_in)
            shortcut_d = _shortcut_durations(stage, prog, shortcut_in)
            v, clipped = _integrate(prog, d, shortcut_d, start=prog.bias)
            overflow[stage.name] = overflow.get(stage.name, 0) + clipped  # summed over chunks
            if events is not None:
                self._count_events(events, stage, t_in, shortcut_in, None)
            return (v * prog.lsb).reshape(len(v), -1)

        return layer

    def _count_events(self, events: dict, stage, t_in, shortcut_in: tuple, t_out) -> None:
        """Add one layer's synaptic events and active updates of a chunk to events (its
        {"synops", "active"} (n,) arrays); exact integer sums, so the totals do not depend
        on the chunks or the order of the layers."""
        synops, active = self._layer_events(stage, t_in, shortcut_in, t_out)
        events["synops"] += synops
        events["active"] += active

    def run(self, x, memory_budget=None, keep=None, stream: ChunkStream | None = None) -> Trace:
        """Run raw inputs x (N, *input_shape). memory_budget: bytes (or "8G") for one
        chunk's working set (:mod:`neurodeploy.memory`; default the process-wide budget or
        NEURODEPLOY_MEMORY_BUDGET): large batches run in chunks, and the trace, its
        counts and costs are the same bits for any chunk size (the fixed-point sums are
        exact integers). keep: names of the stages whose spike times the trace holds
        (as :func:`~neurodeploy.simulate.simulate`'s: "input", hidden layers, pools;
        None, the default: every stage; ``()``: none); output, energy_j, latency_s, the
        spike counts of every stage (``Trace.spikes_per_layer``), saturation, overflow
        and early counts are those of a full run, bit for bit: each chunk's synaptic
        events and active neuron updates are counted as its layers run, and the stages
        not kept take no memory beyond one chunk's. stream: hand every chunk (every stage's
        spike times) to a consumer as it is computed
        (:class:`~neurodeploy.simulate.ChunkStream`)."""
        kept = check_keep(self.snn, keep)
        if self.profile.hardware == "ideal":
            trace = simulate(self.snn, x, memory_budget=memory_budget, keep=kept, stream=stream)
            latency_s = trace.latency * self.profile.timing.time_unit_s
            energy = trace.spike_count * self.profile.energy.spike_j
            return replace(
                trace, backend=self.backend, latency_s=latency_s, energy_j=energy.astype(np.float64)
            )
        snn = self.snn
        t_input, outside = self.encode(x)
        n = t_input.shape[0]
        overflow: dict[str, int] = {}
        synops, active = np.zeros(n), np.zeros(n)  # per sample, counted as the layers run
        events: dict[str, np.ndarray] = {}

        def on_chunk(lo: int, hi: int) -> None:
            events["synops"], events["active"] = synops[lo:hi], active[lo:hi]

        per = chunk_samples(self.working_bytes(), memory_budget)
        output, spike_times, saturated, early, counts = run_stages_chunked(
            snn, t_input, self._spiking(overflow, events), time_pool,
            self._output(overflow, events), per, kept, on_chunk, stream,
        )
        trace = Trace(
            output=output,
            spike_times=spike_times,
            neuron_layers=neuron_layers(snn),
            saturated_per_layer={"input": outside, **saturated},
            latency=np.full(n, snn.latency),
            backend=self.backend,
            step_size=dict(self.step_size),
            overflow=overflow,
            early_per_layer=early,
            spikes_per_layer=counts,
            neurons_per_layer=stage_neurons(snn, counts),
        )
        return self.with_costs(trace, events=(synops, active))

    def working_bytes(self) -> int:
        """Estimated working memory (bytes) of one sample's run besides its trace: the
        reference simulation's (:func:`~neurodeploy.simulate.working_bytes`), plus, when a
        layer integrates step by step, six arrays of the widest stage (arrivals, drive,
        current, membrane, overflow flags and their update)."""
        base = simulate_working_bytes(self.snn)
        if any(prog.stepped for prog in self.programs.values()):
            widest = max(int(np.prod(s.output_shape)) for s in self.snn.stages)
            base += 6 * 8 * widest
        return base

    def stage_runner(self) -> StageRunner | None:
        """The fixed-point stage functions (None on the ideal profile: the reference runs).
        A Lava deployment holds the same programs: Lava's fixed_pt models are bit-exact
        with them (tests/test_lava.py)."""
        if self.profile.hardware == "ideal":
            return None
        overflow: dict[str, int] = {}
        return StageRunner(
            lambda x: self.encode(x)[0], self._spiking(overflow), self._output(overflow)
        )

    def encode(self, x) -> tuple[np.ndarray, int]:
        """Input spike times on the step grid, and the count of inputs outside [p, q]."""
        t_raw, outside = encode_input(self.snn, x)
        x01 = np.where(np.isfinite(t_raw), 1.0 - t_raw, 0.0)
        return encode_on_grid(x01, self.profile.timing.steps_per_window), outside

    def with_costs(
        self, trace: Trace, per_chunk: int | None = None, events: tuple | None = None
    ) -> Trace:
        """The trace with latency_s and energy_j per sample from the profile. events:
        the (N,) synaptic events and active neuron updates per sample, when the run
        counted them; else they are counted from the trace's spike times per_chunk
        samples at a time (default: the memory budget's chunk)."""
        n = trace.num_samples
        windows = 1 + len(self.snn.spiking_layers)  # input window + one per hidden layer
        steps = self.profile.timing.steps_per_window
        latency_s = np.full(n, windows * steps * self.profile.timing.step_time_s)
        energy, breakdown = self._energy(trace, per_chunk, events)
        self._last_breakdown = breakdown
        self._last_energy = float(energy.mean()) if n else None
        costed = replace(trace, latency_s=latency_s, energy_j=energy)
        self._breakdowns[costed] = breakdown
        return costed

    def energy_breakdown(self, trace: Trace) -> dict | None:
        """See :meth:`Deployment.energy_breakdown`. A trace this deployment returned gives
        the breakdown its run counted (also with keep=...); any other is counted from its
        spike times, which must then hold every stage (UsageError naming the missing)."""
        if self.profile.hardware == "ideal":
            return None
        known = self._breakdowns.get(trace)
        return known if known is not None else self._energy(trace)[1]

    def _energy(
        self, trace: Trace, per_chunk: int | None = None, events: tuple | None = None
    ) -> tuple[np.ndarray, dict]:
        """Energy per sample (J): synaptic events x synop_j + active neuron updates x
        neuron_active_update_j + inactive ones x neuron_update_j + spikes x spike_j; and
        the breakdown of the mean (see :meth:`Deployment.energy_breakdown`). events:
        ((N,) synaptic events, (N,) active updates) as the run counted them; None: counted
        from the trace's spike times per_chunk samples at a time (default: the memory
        budget's)."""
        e = self.profile.energy
        n = trace.num_samples
        if events is None:
            synops, active = self._trace_events(trace, per_chunk)
        else:
            synops, active = events
        inactive = self._neuron_updates_per_sample() - active
        parts = {
            "synaptic_ops": synops * e.synop_j,
            "active_neuron_updates": active * e.neuron_active_update_j,
            "inactive_neuron_updates": inactive * e.neuron_update_j,
            "spikes": trace.spike_count * e.spike_j,
        }
        breakdown = {
            "energy_j": {k: float(v.mean()) if n else 0.0 for k, v in parts.items()},
            "counts": {
                "synaptic_ops": float(synops.mean()) if n else 0.0,
                "active_neuron_updates": float(active.mean()) if n else 0.0,
                "inactive_neuron_updates": float(inactive.mean()) if n else 0.0,
                "spikes": float(trace.spike_count.mean()) if n else 0.0,
            },
            "per_operation_j": {
                "synaptic_ops": e.synop_j,
                "active_neuron_updates": e.neuron_active_update_j,
                "inactive_neuron_updates": e.neuron_update_j,
                "spikes": e.spike_j,
            },
            "figures_from": e.figures_from,
        }
        return sum(parts.values()), breakdown

    def _trace_events(self, trace: Trace, per_chunk: int | None = None) -> tuple:
        """(N,) synaptic events and (N,) active neuron updates per sample, counted from the
        trace's spike times (every stage's: UsageError naming a missing one) per_chunk
        samples at a time (default: the memory budget's chunk)."""
        require_spike_times(
            trace, stages_with_spike_times(self.snn), f"{self.backend} energy",
            "synaptic events and active updates count every stage's spikes",
        )
        n = trace.num_samples
        per_chunk = per_chunk or chunk_samples(self.working_bytes())
        synops, active = np.zeros(n), np.zeros(n)
        for lo, hi in chunks(n, per_chunk):
            times = {name: t[lo:hi] for name, t in trace.spike_times.items()}
            events = {"synops": synops[lo:hi], "active": active[lo:hi]}
            previous = "input"
            for stage in self.snn.stages:
                prog = self.programs.get(stage.name)
                if prog is not None:
                    shortcut_in = tuple(times[sc.source] for sc in prog.shortcuts)
                    t_out = times[stage.name] if isinstance(stage, SpikingLayer) else None
                    self._count_events(events, stage, times[previous], shortcut_in, t_out)
                previous = stage.name
        return synops, active

    def _layer_events(self, stage, t_in: np.ndarray, shortcut_in: tuple, t_out) -> tuple:
        """(n,) synaptic events and (n,) active neuron updates of one layer of n samples.

        t_in: the spike times of the stage before (n, *input_shape); shortcut_in: those of
        the layer's shortcut sources; t_out: the layer's own (n, *output_shape), None for
        the output layer. Every spike reaches the synapses of its neuron (fanout), a
        shortcut source's delayed spikes its group's. A neuron is active during its input
        window when any presynaptic spike reaches it (counted for the whole window: an
        upper bound, its first input may arrive late) and during its own window up to and
        including the step it fires (all K steps when it stays silent). Exact integer
        sums (float64)."""
        prog = self.programs[stage.name]
        steps = self.profile.timing.steps_per_window
        n = t_in.shape[0]
        fired = np.isfinite(t_in)
        synops = fired.reshape(n, -1) @ prog.fanout
        reached = apply_synapses(prog.indicator, fired.astype(np.float64)).reshape(n, -1) > 0
        for sc, t_src in zip(prog.shortcuts, shortcut_in, strict=True):
            src = np.isfinite(t_src)  # the delayed source spikes reach these synapses
            synops += src.reshape(n, -1) @ sc.fanout
            reached |= apply_synapses(sc.indicator, src.astype(np.float64)).reshape(n, -1) > 0
        active = steps * reached.sum(axis=1)
        if t_out is not None:
            t = t_out.reshape(n, -1)
            m = np.where(np.isfinite(t), np.rint((t - stage.t_min) / prog.dt) + 1, steps)
            active = active + m.sum(axis=1)
        return synops, active

    def _neuron_updates_per_sample(self) -> float:
        """Every neuron of the chip updates in every time step of the inference: the input
        window and one window per hidden layer (Loihi updates all neurons of a core each
        step; Davies et al. 2018, Table 2, prices active and inactive updates apart)."""
        windows = 1 + len(self.snn.spiking_layers)
        steps = self.profile.timing.steps_per_window
        return float(sum(p.neurons for p in self.programs.values()) * windows * steps)

    # -- error bounds ----------------------------------------------------------------------
    def quantization_terms(self) -> dict[str, tuple]:
        """Spike steps, weight mantissas, threshold and ramp rounding; nothing on the
        ideal profile (see :meth:`Deployment.quantization_terms`)."""
        if self.profile.hardware == "ideal":
            names = ["input", *(s.name for s in self.snn.stages if not isinstance(s, TimePool))]
            for stage in self.snn.stages:
                names += [shortcut_term_key(stage.name, i) for i in range(len(_shortcuts(stage)))]
            return {name: (0.0, None, 0.0) for name in names}
        steps = self.profile.timing.steps_per_window
        terms = {"input": (0.5 / steps, None, 0.0)}
        for stage in self.snn.stages:
            prog = self.programs.get(stage.name)
            if prog is None:
                continue
            # Rounding a weight to its mantissa errs by at most half a mantissa step,
            # 2^(e-1) (the profile's bits and the layer's largest weight set e); sum
            # pools carry the average pools' 1/k^2 into the weight.
            _, pool_factor = fold_average_pools(stage.synapses, stage.input_shape)
            weight_shape = stage.synapses[-1].weight.shape
            delta = None
            if prog.exponent is not None:
                delta = np.full(weight_shape, 0.5 * 2.0**prog.exponent / pool_factor)
            if isinstance(stage, OutputLayer):
                own = 0.5 * prog.lsb if prog.exponent is not None else 0.0  # bias rounding
            elif prog.exponent is None:  # float weights: only the step grid rounds
                own = 0.5 * prog.dt
            else:
                # rounding to the nearest step; threshold (half a membrane unit) and ramp
                # (half a unit per step, over at most K steps) rounding
                # (Loihi: the threshold is a multiple of 2^6 units, compared strictly, and the
                # ramp a bias mantissa 2^ramp_exp, rounding by half its last place)
                theta_err = 2.0 ** (LOIHI_VTH_SHIFT - 1) + 1 if prog.loihi else 0.5
                ramp_err = 0.5 * 2.0**prog.ramp_exp
                own = prog.dt * (0.5 + (theta_err + ramp_err * steps) / prog.ramp)
            terms[stage.name] = (own, delta, 0.0)
            # A shortcut group's mantissas err by 2^(e_sc - 1) in W' = W_sc x pool factor x
            # dt_src / dt_in; its delayed spikes keep their source's steps (no rounding).
            for i, (shortcut, sc) in enumerate(zip(stage.shortcuts, prog.shortcuts, strict=True)):
                sc_delta = None
                if sc.exponent is not None:
                    scale = sc.pool_factor * sc.step_ratio
                    sc_delta = np.full(
                        shortcut.synapses[-1].weight.shape, 0.5 * 2.0**sc.exponent / scale
                    )
                terms[shortcut_term_key(stage.name, i)] = (0.0, sc_delta, 0.0)
        return terms

    # -- mapping ---------------------------------------------------------------------------
    def summary(self) -> dict:
        p = self.profile
        if p.hardware == "ideal":
            return {
                "backend": self.backend,
                "profile": p.name,
                "hardware": p.hardware,
                "latency_s": self.snn.latency * p.timing.time_unit_s,
                "layers": [],
            }
        cores = p.cores
        bits = synapse_bits(p)
        layers = []
        for prog in self.programs.values():
            synapses = prog.synapse_count + sum(sc.synapse_count for sc in prog.shortcuts)
            per_core, memory = self.core_slices[prog.name]
            n_cores = len(per_core)
            layers.append(
                {
                    "name": prog.name,
                    "neurons": prog.neurons,
                    "synapses": synapses,  # the shortcut groups' included
                    "synaptic_memory_bits": int(memory.sum()),  # synapses x bits_per_synapse
                    "bits_per_synapse": bits,
                    "cores": n_cores,
                    "chips": -(-n_cores // cores.cores_per_chip),
                    "neurons_per_core_max": int(per_core.max(initial=0)),
                    "synaptic_memory_bits_per_core_max": int(memory.max(initial=0)),
                    "input_axons_per_core_max": (
                        int(self.core_axons[prog.name].max(initial=0))
                        if prog.name in self.core_axons
                        else None  # counted with cores.input_axons_per_core only
                    ),
                    "neuron_utilisation": prog.neurons / max(1, n_cores * cores.neurons_per_core),
                    "synaptic_memory_utilisation": float(memory.sum())
                    / max(1, n_cores * cores.synaptic_memory_bits),
                    "weight_bits": p.weights.bits,
                    "weight_exponent": prog.exponent,
                    "membrane_shift": prog.shift,
                    "ramp_per_step": prog.ramp,
                    "window_steps": prog.steps,
                    "step_size": prog.dt,
                    "stepped_integration": prog.stepped,
                }
            )
            if prog.shortcuts:  # a join layer: its shortcut synapse groups
                layers[-1]["shortcuts"] = [
                    {
                        "source": sc.source,
                        "synapses": sc.synapse_count,
                        "weight_exponent": sc.exponent,
                        "delay_steps": sc.delay_steps,
                        "step_ratio": sc.step_ratio,
                    }
                    for sc in prog.shortcuts
                ]
        total_cores = sum(layer["cores"] for layer in layers)
        windows = 1 + len(self.snn.spiking_layers)
        return {
            "backend": self.backend,
            "profile": p.name,
            "hardware": p.hardware,
            "layers": layers,
            "cores": total_cores,
            "chips": -(-total_cores // cores.cores_per_chip),
            "steps_per_inference": windows * p.timing.steps_per_window,
            "latency_s": windows * p.timing.steps_per_window * p.timing.step_time_s,
            "neuron_updates_per_inference": self._neuron_updates_per_sample(),
            "energy_j_per_inference": self._last_energy,
            "energy_breakdown": self._last_breakdown,
        }
