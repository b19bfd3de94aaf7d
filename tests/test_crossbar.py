"""Crossbar backend: exact when ideal, and every non-ideality seeded, switchable, in the
expected direction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from netgen import random_inputs, random_network
from residual import conv_resnet, dense_resnet
from scipy.stats import norm
from test_emulator import assert_same_spikes, assert_same_traces

import neurodeploy as nd
from neurodeploy.backends.crossbar import DRIFT_T0_S, PCM_NU_MEAN, PCM_NU_STD
from neurodeploy.deploy import deploy
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR

# A crossbar with every non-ideality switched off; each test turns one on.
CLEAN = {
    "crossbar.prog_noise_scale": 0.0,
    "crossbar.read_noise_scale": 0.0,
    "crossbar.drift_scale": 0.0,
    "crossbar.t_inference_s": 0.0,
    "crossbar.drift_compensation": False,
    "crossbar.variability": 0.0,
    "crossbar.levels": None,
    "converter.dac_bits": None,
    "converter.adc_bits": None,
    "faults.stuck_on": 0.0,
    "faults.stuck_off": 0.0,
}


def pcm(**overrides) -> nd.HardwareProfile:
    return nd.load_profile("pcm").with_overrides({**CLEAN, **overrides})


@pytest.fixture(scope="module")
def cnn():
    net = nd.load_model(MODELS / "digits_cnn")
    x_tr, _ = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    snn = nd.convert(net, calibration=x_tr)
    return snn, x_te[:150], y_te[:150], nd.simulate(snn, x_te[:150])


def run(snn, profile, x, seed=0, **kwargs):
    return deploy(snn, profile, backend="crossbar", seed=seed).run(x, **kwargs)


def test_ideal_profile_reproduces_the_reference():
    net = random_network(6)  # conv, batch norm, max and average pooling, dense
    x = random_inputs(net, 24, 6)
    snn = nd.convert(net, calibration=x)
    ref = nd.simulate(snn, x)
    for profile in ("ideal", pcm()):
        trace = run(snn, profile, x)
        assert_same_spikes(trace, ref)
        np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=1e-9)


def _logit_error(snn, profile, x, ref, seeds=(0, 1, 2)):
    return np.mean([np.abs(run(snn, profile, x, seed=s).output - ref.output).mean() for s in seeds])


# (key, mild value, strong value, random?) for every non-ideality.
NON_IDEALITIES = [
    ({"crossbar.prog_noise_scale": 0.5}, {"crossbar.prog_noise_scale": 4.0}, True),
    ({"crossbar.read_noise_scale": 0.5}, {"crossbar.read_noise_scale": 4.0}, True),
    (
        {"crossbar.drift_scale": 1.0, "crossbar.t_inference_s": 60.0},
        {"crossbar.drift_scale": 1.0, "crossbar.t_inference_s": 3.0e7},
        True,
    ),
    ({"crossbar.variability": 0.02}, {"crossbar.variability": 0.3}, True),
    ({"faults.stuck_on": 0.002}, {"faults.stuck_on": 0.05}, True),
    ({"faults.stuck_off": 0.01}, {"faults.stuck_off": 0.3}, True),
    ({"crossbar.levels": 64}, {"crossbar.levels": 4}, False),
    ({"converter.dac_bits": 8}, {"converter.dac_bits": 2}, False),
    ({"converter.adc_bits": 8}, {"converter.adc_bits": 3}, False),
]


@pytest.mark.parametrize(
    "mild, strong, random", NON_IDEALITIES, ids=[next(iter(m)) for m, _, _ in NON_IDEALITIES]
)
def test_each_non_ideality_degrades_monotonically_and_is_seeded(cnn, mild, strong, random):
    snn, x, _, ref = cnn
    e_mild = _logit_error(snn, pcm(**mild), x, ref)
    e_strong = _logit_error(snn, pcm(**strong), x, ref)
    assert 1e-6 < e_mild < e_strong
    a = run(snn, pcm(**strong), x, seed=3)
    b = run(snn, pcm(**strong), x, seed=3)
    c = run(snn, pcm(**strong), x, seed=4)
    np.testing.assert_array_equal(a.output, b.output)  # same seed, same bits
    assert (not np.array_equal(a.output, c.output)) == random


def test_read_noise_is_drawn_per_read(cnn):
    snn, x, _, _ = cnn
    dep = deploy(snn, pcm(**{"crossbar.read_noise_scale": 1.0}), backend="crossbar", seed=0)
    first, again, other = dep.run(x), dep.run(x), dep.run(x, read_seed=1)
    np.testing.assert_array_equal(first.output, again.output)
    assert not np.array_equal(first.output, other.output)
    # Each sample's read is independent: duplicating a sample gives different outputs.
    pair = dep.run(np.stack([x[0], x[0]]))
    assert not np.array_equal(pair.output[0], pair.output[1])


def test_pcm_drift_follows_the_power_law(cnn):
    snn, _, _, _ = cnn
    over = {"crossbar.drift_scale": 1.0}
    times = (0.0, 3600.0, 86400.0 * 30)
    layers = [
        deploy(snn, pcm(**over, **{"crossbar.t_inference_s": t}), backend="crossbar", seed=7)
        .layers["fc1"]
        .tiles[0]
        for t in times
    ]
    g0 = np.concatenate([layers[0].g_pos, layers[0].g_neg])
    g1 = np.concatenate([layers[1].g_pos, layers[1].g_neg])
    g2 = np.concatenate([layers[2].g_pos, layers[2].g_neg])
    assert g0.mean() > g1.mean() > g2.mean()  # mean |G| shrinks with time
    on = g0 > 1e-3
    # G(t) = G(t0) ((t + t0) / t0)^-nu, the same nu per device at every time.
    nu1 = -np.log(g1[on] / g0[on]) / np.log((times[1] + DRIFT_T0_S) / DRIFT_T0_S)
    nu2 = -np.log(g2[on] / g0[on]) / np.log((times[2] + DRIFT_T0_S) / DRIFT_T0_S)
    np.testing.assert_allclose(nu1, nu2, rtol=1e-9)
    # nu ~ |N(mu(g), sigma(g))| with aihwkit's fits; compare the sample mean with E|N|.
    log_g = np.log(np.maximum(g0[on] / 25.0, 1e-7))
    mu = np.clip(PCM_NU_MEAN[0] * log_g + PCM_NU_MEAN[1], *PCM_NU_MEAN[2:])
    sigma = np.clip(PCM_NU_STD[0] * log_g + PCM_NU_STD[1], *PCM_NU_STD[2:])
    expected = sigma * np.sqrt(2 / np.pi) * np.exp(-(mu**2) / (2 * sigma**2)) + mu * (
        1 - 2 * norm.cdf(-mu / sigma)
    )
    assert on.sum() > 1000
    assert abs(nu1.mean() - expected.mean()) < 4 * sigma.max() / np.sqrt(on.sum())


def test_drift_compensation_recovers_accuracy(cnn):
    snn, x, y, _ = cnn
    year = {
        "crossbar.drift_scale": 1.0,
        "crossbar.t_inference_s": 3.15e7,
        "crossbar.prog_noise_scale": 1.0,
        "crossbar.read_noise_scale": 1.0,
    }
    off = np.mean([run(snn, pcm(**year), x, seed=s).accuracy(y) for s in range(3)])
    on = np.mean(
        [
            run(snn, pcm(**year, **{"crossbar.drift_compensation": True}), x, seed=s).accuracy(y)
            for s in range(3)
        ]
    )
    assert on > off + 0.03


def test_tiles_split_layers_and_add_partial_sums(cnn):
    snn, x, _, ref = cnn
    tiled = deploy(
        snn, pcm(**{"crossbar.tile_rows": 4, "crossbar.tile_cols": 5}), backend="crossbar"
    )
    np.testing.assert_allclose(tiled.run(x).output, ref.output, rtol=0, atol=1e-9)
    layers = {layer["name"]: layer for layer in tiled.summary()["layers"]}
    assert layers["conv1"]["rows"] == 9 and layers["conv1"]["cols"] == 8  # one kernel a column
    assert layers["conv1"]["tiles"] == 3 * 2 and layers["fc1"]["tiles"] == 32 * 13
    assert layers["conv1"]["reads_per_inference"] == 64  # one read per output position
    # With ADCs, each row tile's partial sum is digitised on its own.
    adc = {"converter.adc_bits": 5}
    whole = run(snn, pcm(**adc), x).output
    split = run(snn, pcm(**adc, **{"crossbar.tile_rows": 4}), x).output
    assert not np.array_equal(whole, split)


def test_latency_and_energy(cnn):
    snn, x, _, _ = cnn
    trace = run(snn, "pcm", x)
    np.testing.assert_allclose(trace.latency_s, snn.latency * 1e-6)
    assert np.all(trace.energy_j > 0)
    louder = run(snn, nd.load_profile("pcm").with_overrides({"crossbar.v_read_v": 0.4}), x)
    assert np.all(louder.energy_j > trace.energy_j)
    summary = deploy(snn, "pcm", backend="crossbar").summary()
    assert summary["tiles"] == 3 and summary["latency_s"] == pytest.approx(snn.latency * 1e-6)


def test_shipped_crossbar_profiles_run(cnn):
    snn, x, y, ref = cnn
    for name in ("pcm", "rram"):
        trace = run(snn, name, x)
        assert trace.output.shape == ref.output.shape and np.isfinite(trace.output).all()
    # One hour after programming, with drift compensation, PCM keeps most predictions.
    assert np.mean(run(snn, "pcm", x).predictions == ref.predictions) > 0.9


def test_wrong_profile_is_refused(cnn):
    snn, _, _, _ = cnn
    with pytest.raises(nd.DeployError, match="digital hardware.*crossbar"):
        deploy(snn, "loihi2", backend="crossbar")


# -- residual networks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnets():
    return {"dense": dense_resnet(0), "conv": conv_resnet(0)}


def test_ideal_crossbar_reproduces_the_reference_on_residual_nets(resnets):
    for snn, x in resnets.values():
        ref = nd.simulate(snn, x)
        for profile in ("ideal", pcm(), pcm(**{"crossbar.tile_rows": 5, "crossbar.tile_cols": 3})):
            trace = run(snn, profile, x)
            assert_same_spikes(trace, ref)
            np.testing.assert_allclose(trace.output, ref.output, rtol=0, atol=1e-9)


def test_shortcut_groups_are_their_own_programmed_tiles(resnets):
    """The same devices and effects, on streams of their own: a join's main array is
    programmed exactly as without its shortcut, and noise reaches the shortcut tiles."""
    snn, x = resnets["dense"]
    noisy = pcm(**{"crossbar.prog_noise_scale": 1.0, "crossbar.variability": 0.05})
    dep = deploy(snn, noisy, backend="crossbar", seed=2)
    join = dep.layers["fc3"]
    (group,) = join.shortcuts
    assert group.source == "fc1" and group.rows == 8 and group.cols == 8
    chain = replace(
        snn,
        stages=tuple(replace(s, shortcuts=()) if s.name == "fc3" else s for s in snn.stages),
    )
    plain = deploy(chain, noisy, backend="crossbar", seed=2).layers["fc3"]
    np.testing.assert_array_equal(join.tiles[0].g_pos, plain.tiles[0].g_pos)
    # identity weights 1 at g_max on the diagonal; noise moves every one of those devices
    ideal = deploy(snn, pcm(), backend="crossbar").layers["fc3"].shortcuts[0]
    np.testing.assert_allclose(np.diag(ideal.tiles[0].g_pos), noisy.crossbar.g_max_us)
    assert np.all(np.diag(group.tiles[0].g_pos) != noisy.crossbar.g_max_us)
    a = run(snn, noisy, x, seed=2).output
    np.testing.assert_array_equal(a, run(snn, noisy, x, seed=2).output)


def test_residual_quantisation_stays_within_the_crosscheck_bound(resnets):
    """Levels, DAC and ADC on the main and the shortcut arrays: every join within the
    bound its quantisation terms give, the shortcut groups' own terms included."""
    quantised = pcm(**{"crossbar.levels": 64, "converter.dac_bits": 6, "converter.adc_bits": 6})
    for kind, join in (("dense", "fc3"), ("conv", "conv3")):
        snn, x = resnets[kind]
        dep = deploy(snn, quantised, backend="crossbar")
        own, delta, dac = dep.quantization_terms()[f"{join}/shortcut0"]
        assert np.max(own) > 0 and np.max(delta) > 0 and dac > 0
        report = nd.crosscheck(snn, dep, x)
        assert report.divergence_layer is None, report.reasons


def test_residual_summary_and_energy_count_the_shortcut_arrays(resnets):
    snn, x = resnets["conv"]
    converters = {"converter.dac_bits": 8, "converter.adc_bits": 8}
    profile = pcm(**converters)
    dep = deploy(snn, profile, backend="crossbar")
    trace = dep.run(x)
    layers = {layer["name"]: layer for layer in dep.summary()["layers"]}
    conv3 = layers["conv3"]
    (link,) = conv3["shortcuts"]
    assert link["source"] == "conv1" and (link["rows"], link["cols"]) == (4, 4)  # 1x1 identity
    assert link["reads_per_inference"] == 64 and link["adc_conversions_per_inference"] == 64 * 4
    assert conv3["devices"] == 2 * (36 * 4 + 4 * 4)
    assert conv3["adc_conversions_per_inference"] == 64 * 4 + link["adc_conversions_per_inference"]
    # Energy = a V_read^2 (device reads) + conversions + spikes: two read voltages give the
    # fixed part, which counts the shortcut arrays' ADC and DAC conversions.
    louder = run(snn, pcm(**converters, **{"crossbar.v_read_v": 0.4}), x)
    v1, v2 = profile.crossbar.v_read_v**2, 0.4**2
    fixed = (trace.energy_j * v2 - louder.energy_j * v1) / (v2 - v1)
    e = profile.energy
    adc = sum(layer["adc_conversions_per_inference"] for layer in layers.values())
    arrays = [g for layer in dep.layers.values() for g in layer.arrays]
    dac = sum(g.positions * g.rows for g in arrays)
    assert dac > sum(layer.positions * layer.rows for layer in dep.layers.values())
    expected = adc * e.adc_conversion_j + dac * e.dac_conversion_j + trace.spike_count * e.spike_j
    np.testing.assert_allclose(fixed, expected, rtol=1e-9)


@pytest.mark.parametrize("name", ["pcm", "rram"])
def test_device_moments_match_the_programmed_devices(name):
    """The cross-check's statistical bound rests on device_moments: the mean and second
    moment of a device's inference-time conductance must be those program_pairs draws
    (programming noise, variability, clipping at 0 uS, drift with its nu spread). Each
    column of W holds 4000 devices with one target; the draws' mean and variance per
    column must match the prediction to within their sampling error."""
    from neurodeploy.backends.crossbar import device_moments, program_pairs

    profile = nd.load_profile(name)
    cb = profile.crossbar
    targets = np.linspace(-1.0, 1.0, 21)
    w = np.tile(targets, (4000, 1))  # (rows, cols): one target per column
    no_faults = nd.profile.Faults()
    target, _, now, _ = program_pairs(w, cb, no_faults, seed=3, layer=0)
    for g_t, g_now in zip(target, now, strict=True):
        first, second = device_moments(g_t[0], cb)  # one row: the column targets
        mean, var = first, second - first**2
        sample_mean = g_now.mean(axis=0)
        sample_var = g_now.var(axis=0)
        rows = g_now.shape[0]
        sd_mean = np.sqrt(np.maximum(var, 1e-30) / rows)
        assert np.all(np.abs(sample_mean - mean) <= 4 * sd_mean + 1e-12), name
        # the variance of a sample variance is ~ 2 var^2 / n for near-Gaussian draws;
        # the clipped and drifted ones have heavier tails (measured up to 4): allow 6
        assert np.all(np.abs(sample_var - var) <= 6 * var * np.sqrt(2 / rows) + 1e-12), name


# Relative agreement the pin asks of float values: rounding alone (a BLAS kernel chosen by
# CPU model) moved them by at most 4e-16 relative; one changed read-noise draw moves them
# by many orders more (the control below: another read seed).
PIN_RTOL = 1e-12


def _pin_mismatches(now: dict, pinned) -> list[str]:
    """Keys whose values differ: counts exactly, floats beyond PIN_RTOL of their scale."""
    bad = []
    for key in pinned.files:
        want, got = pinned[key], now[key]
        if want.dtype.kind == "f":
            scale = max(float(np.abs(want).max(initial=0.0)), 1e-300)
            if got.shape != want.shape or np.abs(got - want).max(initial=0.0) > PIN_RTOL * scale:
                bad.append(key)
        elif not np.array_equal(got, want):
            bad.append(key)
    return bad


def test_pinned_read_noise_draws():
    """Same seeds, same draws: the pcm traces of digits_mlp (540 test digits, two seed
    pairs) and digits_cnn match the ones tools/crossbar_pin.py recorded (outputs, energies,
    every stage's per-sample spike counts exactly and spike-time sums, ADC clip counts):
    no noise draw is dropped, added or reordered. Float values to PIN_RTOL, so that the
    pin holds on any CPU; the control run on other read seeds must miss it everywhere."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "crossbar_pin.py"
    spec = importlib.util.spec_from_file_location("crossbar_pin", tool)
    pin_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin_tool)
    pinned = np.load(pin_tool.OUT)
    now = pin_tool.traces()
    assert sorted(now) == sorted(pinned.files)
    assert _pin_mismatches(now, pinned) == []
    other = pin_tool.traces(read_seed_offset=1)
    for case in ("digits_mlp_s0_r0", "digits_mlp_s7_r3", "digits_cnn_s1_r2"):
        for what in ("output", "energy_j"):
            assert f"{case}/{what}" in _pin_mismatches(other, pinned), (case, what)


def test_chunked_runs_are_the_unchunked_bits(cnn, resnets):
    """A run streams its batch in chunks from the memory budget; a budget of one byte (one
    sample per chunk) and a budget of 16 samples give the unchunked trace bit for bit:
    every tile's read noise comes from its own stream, drawn in sample order. Row tiles
    of 16 and 3 rows make several streams per array; a grouped convolution, residual
    shortcut groups, ADC clipping and the step grid are all among the cases."""
    from netgen import random_network

    from neurodeploy import memory
    from neurodeploy.threads import one_blas_thread

    snn, x, _, _ = cnn
    grouped = random_network(3, modern=True)  # grouped convolutions (2 and 4 groups)
    x_grouped = random_inputs(grouped, 21, 3)
    cases = [
        (snn, x[:37], nd.load_profile("pcm").with_overrides({"crossbar.tile_rows": 16})),
        (snn, x[:37], nd.load_profile("rram")),
        # no ADC: the sums' last bits reach the spike times
        (snn, x[:37], nd.load_profile("pcm").with_overrides({"converter.adc_bits": None})),
        (nd.convert(grouped, calibration=x_grouped), x_grouped, nd.load_profile("pcm")),
        (*resnets["conv"], pcm(**{"crossbar.tile_rows": 3, "crossbar.read_noise_scale": 1.0,
                                  "converter.adc_bits": 4, "converter.adc_headroom": 0.5})),
        (*resnets["dense"], nd.load_profile("pcm").with_overrides(
            {"crossbar.tile_rows": 5, "timing.steps_per_window": 16, "timing.step_time_s": 1e-8})),
        (*resnets["dense"], pcm(**{"crossbar.tile_rows": 5, "crossbar.read_noise_scale": 1.0})),
    ]
    seen = {"tiles": 0, "groups": 0, "shortcuts": 0, "clipped": 0}
    with one_blas_thread():
        for net, xs, profile in cases:
            dep = deploy(net, profile, backend="crossbar", seed=4)
            whole = dep.run(xs, read_seed=2, memory_budget=2**40)
            arrays = [a for layer in dep.layers.values() for a in layer.arrays]
            seen["tiles"] += any(len(a.tiles) > 1 and a.tiles[0].read_var is not None
                                 for a in arrays)
            seen["groups"] += any(a.groups > 1 for a in arrays)
            seen["shortcuts"] += any(a.source is not None for a in arrays)
            seen["clipped"] += sum(whole.overflow.values()) > 0
            per = dep.working_bytes()
            for budget in (1, 16 * per):
                assert_same_traces(dep.run(xs, read_seed=2, memory_budget=budget), whole)
            memory.set_memory_budget(1)  # the process-wide budget reaches run too
            try:
                assert_same_traces(dep.run(xs, read_seed=2), whole)
            finally:
                memory.set_memory_budget(None)
    assert all(seen.values()), seen


def test_float32_runs_draw_the_same_noise_within_float32_rounding(cnn):
    """dtype="float32": the same read-noise draws, rounded; without converters the
    outputs stay within float32 rounding of float64 (measured 4e-7 of max |logit|) while
    another read seed moves them far more; with converters a value on a DAC or ADC
    rounding tie can take the next level, and the predictions agree. Chunks do not
    change a float32 run either."""
    from neurodeploy.threads import one_blas_thread

    snn, x, _, _ = cnn
    bare = nd.load_profile("pcm").with_overrides(
        {"converter.adc_bits": None, "converter.dac_bits": None}
    )
    dep = deploy(snn, bare, backend="crossbar", seed=3)
    a, b = dep.run(x, read_seed=1), dep.run(x, read_seed=1, dtype="float32")
    assert b.output.dtype == np.float32 and b.spike_times["conv1"].dtype == np.float32
    rounding = np.abs(b.output - a.output).max()
    assert rounding <= 2e-6 * np.abs(a.output).max()
    assert np.abs(dep.run(x, read_seed=2).output - a.output).max() > 100 * rounding
    dep = deploy(snn, "pcm", backend="crossbar", seed=3)
    a, b = dep.run(x), dep.run(x, dtype="float32")
    assert np.mean(a.predictions == b.predictions) >= 0.98
    with one_blas_thread():
        whole = dep.run(x[:29], dtype="float32", memory_budget=2**40)
        assert_same_traces(dep.run(x[:29], dtype="float32", memory_budget=1), whole)

