"""The compiled fire kernels (neurodeploy.kernels) give the bits of the numpy passes they
replace, on random blocks with the edge cases the passes meet: silent sources (inf),
values on t_min and t_max exactly, saturation, NaN, float32 and float64, per-channel
shortcut scales other than 1 (where a fused multiply-add would round differently)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from neurodeploy import kernels


def _numpy_passes(block, fire_at, t_min, t_max, source=None, t_source=None, scale=None):
    """What simulate's finish did with numpy: shortcut values, fire, clamp, silence."""
    block = block.copy()
    if source is not None:
        term = np.maximum(np.subtract(t_source, source), 0.0)
        np.multiply(term, scale, out=term)
        block += term
    t = np.subtract(fire_at, block, out=block)
    below = int(np.count_nonzero(t < t_min))
    np.maximum(t, t_min, out=t)
    fires = np.less(t, t_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(t, fires, out=t)
    return t, below, fires.reshape(len(t), -1).sum(axis=1)


def _case(seed: int, dtype, samples: int, rows: int, channels: int, specials: bool):
    rng = np.random.default_rng(seed)
    t_min, t_max, t_source = 1.0, 2.0, 1.5
    block = rng.uniform(-1.0, 2.0, (samples, rows, channels))
    fire_at = t_min + rng.uniform(0.0, 2.0, (rows, channels))
    source = rng.uniform(0.0, 2.0, (samples, rows, channels))
    scale = rng.uniform(0.3, 3.0, channels)
    if specials:
        flat = block.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        # membranes that put the fire time exactly on t_min or t_max, or make it NaN
        rows_of = picks // channels % rows
        chans = picks % channels
        flat[picks[:4]] = fire_at[rows_of[:4], chans[:4]] - t_min
        flat[picks[4:8]] = fire_at[rows_of[4:8], chans[4:8]] - t_max
        flat[picks[8:9]] = np.nan
        source.reshape(-1)[rng.choice(source.size, size=source.size // 3)] = np.inf
        source.reshape(-1)[:1] = t_source  # a value of exactly zero
    cast = np.dtype(dtype).type
    return ([a.astype(dtype) for a in (block, fire_at, source, scale)],
            cast(t_min), cast(t_max), cast(t_source))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), samples=st.integers(1, 4), rows=st.integers(1, 40),
       channels=st.integers(1, 70), dtype=st.sampled_from(["float64", "float32"]),
       specials=st.booleans(), shortcut=st.sampled_from(["none", "term", "identity"]),
       per_channel=st.booleans())
def test_fire_kernels_give_the_numpy_passes_bits(seed, samples, rows, channels, dtype,
                                                  specials, shortcut, per_channel):
    """Each fire kernel on a block (samples 1.. of sources of 2 + samples rows, offset by
    one row of positions: as a block of a larger map) equals the numpy passes bit for bit,
    saturated count and per-sample spike counts included."""
    (block, fire_at, source, scale), t_min, t_max, t_source = _case(
        seed, dtype, samples, rows, channels, specials)
    if per_channel:  # one row of thresholds for every position
        fire_at = np.broadcast_to(fire_at[:1], fire_at.shape).copy()
    wide = np.full((samples + 2, (rows + 2) * channels), np.nan, dtype)  # the larger map
    wide[1 : samples + 1, channels : (rows + 1) * channels] = source.reshape(samples, -1)
    if shortcut == "identity":
        want, want_below, want_counts = _numpy_passes(
            block, fire_at, t_min, t_max, source, t_source, scale)
    elif shortcut == "term":
        want, want_below, want_counts = _numpy_passes(block + source, fire_at, t_min, t_max)
    else:
        want, want_below, want_counts = _numpy_passes(block, fire_at, t_min, t_max)
    got = block.copy()
    # thresholds per position (rows, O), or per channel (1, O) when they are the same
    fire = fire_at if not per_channel else np.ascontiguousarray(fire_at[:1])
    counts = np.full(samples, 7, np.int64)  # the kernels add to what is there
    kind = {"identity": kernels.IDENTITY, "term": kernels.TERM,
            "none": kernels.NO_SHORTCUT}[shortcut]
    below = kernels.b1_fire(got, fire, t_min, t_max, counts, kind, wide, 1, channels,
                            t_source, scale)
    assert got.dtype == want.dtype
    # bits, NaN too
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert below == want_below
    np.testing.assert_array_equal(counts, want_counts + 7)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.tuples(st.integers(1, 3), st.integers(1, 9),
                                                   st.integers(1, 9), st.integers(1, 20)),
       dtype=st.sampled_from(["float64", "float32"]), padded=st.booleans())
def test_spike_values_kernel_gives_the_numpy_bits(seed, shape, dtype, padded):
    """max(t_end - t, 0) from a channels-last view into a padded buffer's interior (or a
    block of its own): silent neurons (inf) give 0, NaN stays NaN, bits as numpy's."""
    from neurodeploy.simulate import spike_values

    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 2.0, shape)
    t.reshape(-1)[rng.choice(t.size, size=t.size // 3)] = np.inf
    t.reshape(-1)[:1] = np.nan
    t = np.ascontiguousarray(t.astype(dtype))
    t_end = np.dtype(dtype).type(1.25)
    want = spike_values(t.copy(), 1.25)
    if padded:
        buffer = np.full((shape[0], shape[1] + 2, shape[2] + 2, shape[3]), -7.0, dtype)
        dst = buffer[:, 1:-1, 1:-1]
    else:
        dst = np.empty_like(t)
    kernels.spike_values_into(t, t_end, dst)
    np.testing.assert_array_equal(dst.view(np.uint8), want.view(np.uint8))
    if padded:  # the border is left alone
        assert np.all(buffer[:, 0] == -7.0) and np.all(buffer[:, :, -1] == -7.0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3), c=st.integers(1, 12),
       size=st.integers(1, 9), kernel=st.integers(1, 3), stride=st.integers(1, 3),
       padding=st.integers(0, 1), dtype=st.sampled_from(["float64", "float32"]))
def test_min_pool_kernel_gives_minpool2d_bits(seed, n, c, size, kernel, stride, padding, dtype):
    """The compiled earliest-spike pool equals ops.minpool2d on channels-last spike times:
    silent (inf) inputs, ties, padded positions that never win, any stride."""
    from neurodeploy import ops

    if padding >= kernel or size + 2 * padding < kernel:
        return
    rng = np.random.default_rng(seed)
    t = rng.choice([0.0, 0.5, 1.0, 1.25, np.inf], size=(n, size, size, c)).astype(dtype)
    t = np.ascontiguousarray(t).transpose(0, 3, 1, 2)  # channels-last, as a conv returns
    want = ops.minpool2d(t, kernel, stride, padding)
    got = kernels.min_pool_channels_last(t, kernel, stride, padding)
    assert got.dtype == want.dtype and ops.channels_last(got)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), samples=st.integers(1, 3), rows=st.integers(1, 12),
       channels=st.integers(1, 40), dtype=st.sampled_from(["float64", "float32"]),
       kinds=st.lists(st.sampled_from([0, 1, 2, 3, 4]), min_size=1, max_size=7),
       per_position=st.booleans())
def test_elementwise_chain_gives_the_numpy_passes_bits(seed, samples, rows, channels, dtype,
                                                      kinds, per_position):
    """The forward's fused steps (bias or shift add, scale, ReLU, clip, an Add's other
    input) in any order equal numpy's passes bit for bit: NaN, signed zeros (numpy's
    maximum gives the bound on a tie: +0.0 for -0.0), per-channel and per-position rows."""
    rng = np.random.default_rng(seed)
    block = rng.normal(0.0, 1.0, (samples, rows, channels)).astype(dtype)
    flat = block.reshape(-1)
    specials = np.array([-0.0, 0.0, np.nan, 6.0, -6.0], dtype)
    flat[rng.choice(flat.size, size=min(flat.size, 8))] = rng.choice(specials, min(flat.size, 8))
    steps = []
    for kind in kinds:
        if kind in (kernels.ADD_ROWS, kernels.MULTIPLY_ROWS):
            operand = rng.normal(0.0, 1.0, (rows if per_position else 1, channels)).astype(dtype)
            operand.reshape(-1)[:1] = -0.0
            steps.append((kind, operand[None]))
        elif kind == kernels.ADD_OTHER:
            other = rng.normal(0.0, 1.0, block.shape).astype(dtype)
            other.reshape(-1)[:2] = np.array([0.0, -0.0])[: other.size]
            steps.append((kind, other))
        else:
            steps.append((kind, np.zeros((1, 1, 1), dtype)))
    scalars = np.array([0.0 if k == kernels.MAXIMUM else 0.7 for k in kinds], dtype)
    want = block.copy()
    for (kind, operand), bound in zip(steps, scalars, strict=True):
        if kind == kernels.ADD_ROWS:
            np.add(want, operand[0], out=want)
        elif kind == kernels.MULTIPLY_ROWS:
            np.multiply(want, operand[0], out=want)
        elif kind == kernels.MAXIMUM:
            np.maximum(want, float(bound), out=want)
        elif kind == kernels.MINIMUM:
            np.minimum(want, float(bound), out=want)
        else:
            want += operand
    got = block.copy()
    kernels.elementwise_chain(got, np.array(kinds, np.int64), tuple(op for _, op in steps),
                              scalars)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
