"""Hardware profiles: the shipped files, a corpus of malformed ones, overrides, extends, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import neurodeploy as nd
from neurodeploy import ProfileError, load_profile
from neurodeploy.cli import main
from neurodeploy.profile import PROFILE_DIR, describe_keys

TESTS = Path(__file__).resolve().parent
BAD_DIR = TESTS / "profiles_bad"
BAD_FILES = sorted(BAD_DIR.glob("*.yaml"))
SHIPPED = {"ideal": "ideal", "loihi2": "digital", "pcm": "crossbar", "rram": "crossbar"}
PROFILES = {name: load_profile(name) for name in SHIPPED}
ERROR_PREFIX = "neurodeploy: error: "

# The dotted keys the project promises to the backends, per profile.
DIGITAL_KEYS = (
    "timing.steps_per_window",
    "timing.step_time_s",
    "weights.bits",
    "neuron.membrane_bits",
)
CROSSBAR_KEYS = (
    "crossbar.levels",
    "crossbar.g_max_us",
    "crossbar.tile_rows",
    "crossbar.tile_cols",
    "crossbar.prog_noise_scale",
    "crossbar.read_noise_scale",
    "crossbar.drift_scale",
    "crossbar.t_inference_s",
    "crossbar.drift_compensation",
    "crossbar.variability",
    "faults.stuck_on",
    "faults.stuck_off",
    "converter.dac_bits",
    "converter.adc_bits",
)
PROMISED = {"loihi2": DIGITAL_KEYS, "pcm": CROSSBAR_KEYS, "rram": CROSSBAR_KEYS}


def expected_substring(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    expected = first.removeprefix("# expect: ").strip()
    assert expected, f"{path.name}: empty expectation"
    return expected


def load_error(path) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    return str(info.value)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith(ERROR_PREFIX)
    return err.removeprefix(ERROR_PREFIX).rstrip("\n")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def yaml_leaves(doc: dict, prefix: str = ""):
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from yaml_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ---------------------------------------------------------------- the bad corpus


def test_the_bad_corpus_is_large_and_every_case_states_its_expectation():
    assert len(BAD_FILES) >= 18
    for path in BAD_FILES:
        expected_substring(path)
    # the cycle partner lives in a subfolder so that it is not collected as a case
    assert (BAD_DIR / "cycle" / "extends_cycle_partner.yaml").is_file()


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_profile_is_refused_with_the_expected_one_line_message(path):
    message = load_error(path)
    assert expected_substring(path) in message
    assert len(message.splitlines()) == 1, message


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_profile_error_names_the_file(path):
    assert path.name in load_error(path)


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_profile_through_the_cli_is_one_error_line(capsys, path):
    message = assert_one_error_line(*run(capsys, "profile", path))
    assert expected_substring(path) in message


def test_bad_profile_in_a_subprocess_shows_no_traceback():
    path = BAD_DIR / "typo_crossbar_levles.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "neurodeploy", "profile", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr
    message = assert_one_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert message.startswith(f"{path}: 'crossbar.levles': unknown key")


# ---------------------------------------------------------------- more bad input


def test_profile_that_is_not_utf8_is_a_profile_error(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: my-pcm\nhardware: crossbar\ncrossbar:\n  g_max_us: 25.0  # \xb5S\n")
    assert path.name in load_error(path)
    assert_one_error_line(*run(capsys, "profile", path))


def test_huge_integer_for_a_float_key_is_a_profile_error(tmp_path):
    path = write(
        tmp_path / "huge.yaml",
        f"name: my-pcm\nhardware: crossbar\ncrossbar:\n  t_inference_s: {10**400}\n",
    )
    message = load_error(path)
    assert "'crossbar.t_inference_s'" in message and path.name in message


def test_control_character_in_yaml_gives_a_one_line_message(tmp_path):
    path = tmp_path / "ctrl.yaml"
    path.write_bytes(b"name: my-pcm\nhardware: crossbar\ncrossbar:\n  levels: 8\x07\n")
    message = load_error(path)
    assert "malformed YAML" in message
    assert len(message.splitlines()) == 1, message


def test_missing_profile_file_and_unknown_profile_name_are_profile_errors(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    assert load_error(missing) == f"{missing}: profile file does not exist"
    message = load_error("pcm_v2")
    assert message.startswith("pcm_v2: no such profile")
    for name in SHIPPED:
        assert name in message


# ---------------------------------------------------------------- the shipped profiles


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_loads_with_its_hardware_kind(name):
    profile = load_profile(name)
    assert isinstance(profile, nd.HardwareProfile)
    assert profile.name == name
    assert profile.hardware == SHIPPED[name]
    assert Path(profile.source) == PROFILE_DIR / f"{name}.yaml"
    assert load_profile(PROFILE_DIR / f"{name}.yaml") == profile
    assert profile.discrete == (name == "loihi2")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_value_in_the_shipped_yaml_is_what_get_returns(name):
    doc = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    assert doc.pop("name") == name
    profile = PROFILES[name]
    leaves = dict(yaml_leaves(doc))
    assert len(leaves) >= 3
    for key, value in leaves.items():
        got = profile.get(key)
        assert got == value and type(got) is type(value), key


@pytest.mark.parametrize(
    ("name", "key"), [(name, key) for name, keys in PROMISED.items() for key in keys]
)
def test_promised_key_exists_and_resolves(name, key):
    profile = PROFILES[name]
    kinds = {row[0]: row[1].split(",") for row in describe_keys()}
    assert profile.hardware in kinds[key]
    doc = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    assert key in dict(yaml_leaves(doc)), f"{name}.yaml does not set {key}"
    assert profile.get(key) == dict(yaml_leaves(doc))[key]
    assert key in dict(yaml_leaves(profile.to_dict()))


def test_shipped_values_the_backends_rely_on():
    loihi2, pcm, rram, ideal = (PROFILES[n] for n in ("loihi2", "pcm", "rram", "ideal"))
    assert loihi2.get("weights.bits") == 8 and loihi2.weights.bits == 8
    assert loihi2.get("neuron.membrane_bits") == 24
    assert loihi2.get("timing.steps_per_window") == 32
    assert loihi2.get("timing.step_time_s") == pytest.approx(1e-6)
    assert pcm.get("crossbar.g_max_us") == 25.0 and pcm.crossbar.g_min_us == 0.0
    assert pcm.get("crossbar.levels") is None  # analog
    assert pcm.get("crossbar.device_model") == "pcm"
    assert pcm.get("crossbar.drift_compensation") is True
    assert pcm.get("crossbar.t_inference_s") == 3600.0
    assert (pcm.get("converter.dac_bits"), pcm.get("converter.adc_bits")) == (8, 8)
    assert (pcm.get("crossbar.tile_rows"), pcm.get("crossbar.tile_cols")) == (256, 256)
    assert rram.get("crossbar.levels") == 16 and rram.get("crossbar.g_max_us") == 40.0
    assert rram.get("crossbar.device_model") == "generic"
    assert rram.get("crossbar.drift_compensation") is False
    assert rram.get("crossbar.variability") == 0.05
    assert (rram.get("faults.stuck_on"), rram.get("faults.stuck_off")) == (0.009, 0.002)
    assert rram.get("crossbar.generic.prog_sigma_us") == 0.5
    assert ideal.get("timing.steps_per_window") is None and not ideal.discrete
    assert ideal.get("crosscheck.required_agreement") == 1.0


def test_get_refuses_unknown_dotted_keys():
    pcm = PROFILES["pcm"]
    for key in ("crossbar.levles", "crossbar.levels.bits", "xbar.levels", ""):
        with pytest.raises(ProfileError) as info:
            pcm.get(key)
        assert f"unknown key '{key}'" in str(info.value)
        assert "pcm.yaml" in str(info.value)


def test_sections_of_other_hardware_are_left_out_of_the_resolved_document():
    assert set(PROFILES["loihi2"].to_dict()) == {
        "name", "hardware", "description", "timing", "weights", "neuron", "cores", "energy",
        "crosscheck",
    }  # fmt: skip
    for name in ("pcm", "rram"):
        doc = PROFILES[name].to_dict()
        assert {"crossbar", "converter", "faults"} <= set(doc) and "cores" not in doc
        assert doc["weights"] == {} and "synop_j" not in doc["energy"]
    assert "generic" not in PROFILES["pcm"].to_dict()["crossbar"]
    assert "generic" in PROFILES["rram"].to_dict()["crossbar"]
    assert not {"crossbar", "converter", "faults", "cores"} & set(PROFILES["ideal"].to_dict())


NUMERIC_LINE = re.compile(
    r"^\s*(?P<key>[A-Za-z_]\w*):[ \t]+(?P<value>[^#\s]+)\s*(?P<comment>#.*)?$"
)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_numeric_value_in_a_shipped_file_carries_a_comment(name):
    lines = (PROFILE_DIR / f"{name}.yaml").read_text().splitlines()
    numeric = 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("#"):
            continue
        match = NUMERIC_LINE.match(line)
        if match is None:
            continue
        value = yaml.safe_load(match["value"])
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            numeric += 1
            comment = match["comment"]
            assert comment and comment.lstrip("# ").strip(), (
                f"{name}.yaml line {number}: {match['key']} has no comment"
            )
    assert numeric >= 2


# ---------------------------------------------------------------- frozen, with_overrides


def test_profiles_are_frozen():
    pcm = PROFILES["pcm"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pcm.crossbar.levels = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        pcm.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        pcm.crossbar.generic.prog_sigma_us = 1.0
    assert pcm.crossbar.levels is None and pcm.name == "pcm"


def test_with_overrides_returns_a_new_profile_and_leaves_the_original():
    pcm = PROFILES["pcm"]
    before = pcm.to_dict()
    new = pcm.with_overrides({"crossbar.levels": 8, "converter.adc_bits": 6})
    assert new is not pcm and new != pcm
    assert new.get("crossbar.levels") == 8 and new.get("converter.adc_bits") == 6
    assert pcm.get("crossbar.levels") is None and pcm.get("converter.adc_bits") == 8
    assert pcm.to_dict() == before
    changed = {k for k, v in yaml_leaves(new.to_dict()) if dict(yaml_leaves(before))[k] != v}
    assert changed == {"crossbar.levels", "converter.adc_bits"}
    assert new.name == "pcm" and new.hardware == "crossbar"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_with_no_overrides_round_trips(name):
    profile = PROFILES[name]
    again = profile.with_overrides({})
    assert again == profile
    assert again.to_dict() == profile.to_dict()


@pytest.mark.parametrize(
    ("name", "overrides", "key", "expected"),
    [
        ("pcm", {"crossbar.levels": 1}, "crossbar.levels", "must be >= 2, got 1"),
        ("pcm", {"crossbar.levels": 2.5}, "crossbar.levels", "expected an integer"),
        ("pcm", {"crossbar.read_noise_scale": -1}, "crossbar.read_noise_scale", ">= 0"),
        ("pcm", {"crossbar.g_max_us": 0}, "crossbar.g_max_us", "must be > 0"),
        ("pcm", {"crossbar.g_min_us": 30.0}, "crossbar.g_min_us", "must be below"),
        ("pcm", {"crossbar.tile_rows": None}, "crossbar.tile_rows", "must not be null"),
        ("pcm", {"crossbar.device_model": "rram"}, "crossbar.device_model", "not one of"),
        ("pcm", {"crossbar.drift_compensation": "yes"}, "crossbar.drift_compensation", "true"),
        ("rram", {"faults.stuck_on": 0.6, "faults.stuck_off": 0.6}, "faults.stuck_off", "1"),
        ("pcm", {"crossbar.g_min_us": 2.0, "crossbar.g_max_us": 2.0}, "crossbar.g_min_us", "below"),
        ("pcm", {"converter.adc_headroom": 0}, "converter.adc_headroom", "must be > 0"),
        ("pcm", {"weights.bits": 8}, "weights.bits", "does not apply to crossbar"),
        ("pcm", {"energy.synop_j": 1e-12}, "energy.synop_j", "does not apply to crossbar"),
        ("loihi2", {"weights.bits": 33}, "weights.bits", "must be <= 32, got 33"),
        ("loihi2", {"timing.steps_per_window": None}, "timing.steps_per_window", "needs"),
        ("loihi2", {"timing.step_time_s": None}, "timing.step_time_s", "required"),
        ("ideal", {"timing.steps_per_window": 8}, "timing.steps_per_window", "does not apply"),
        ("ideal", {"timing.step_time_s": 1e-6}, "timing.step_time_s", "does not apply"),
        ("ideal", {"crosscheck.required_agreement": 1.5}, "crosscheck.required_agreement", "<= 1"),
        ("rram", {"crossbar.levles": 8}, "crossbar.levles", "unknown key"),
        ("rram", {"crossbar": {"levels": 8}}, "crossbar", "unknown key"),
        ("rram", {"hardware": "digital"}, "hardware", "unknown key"),
    ],
)
def test_with_overrides_validates_and_names_the_key(name, overrides, key, expected):
    with pytest.raises(ProfileError) as info:
        PROFILES[name].with_overrides(overrides, origin="cmdline")
    message = str(info.value)
    assert message.startswith("cmdline: ")
    assert f"'{key}'" in message and expected in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("loihi2", "crossbar.levels", 8),
        ("loihi2", "converter.adc_bits", 6),
        ("pcm", "cores.neurons_per_core", 1024),
        ("ideal", "faults.stuck_on", 0.01),
    ],
)
def test_override_of_a_section_of_other_hardware_is_refused(name, key, value):
    with pytest.raises(ProfileError, match="does not apply to"):
        PROFILES[name].with_overrides({key: value})


# An override's error names the override and the key it set.


@pytest.mark.parametrize(
    ("name", "key", "value", "named"),
    [
        ("loihi2", "crossbar.levels", 8, "crossbar.levels"),
        ("pcm", "cores.neurons_per_core", 1024, "cores.neurons_per_core"),
        ("pcm", "crossbar.generic.prog_sigma_us", 1.0, "crossbar.generic.prog_sigma_us"),
        ("rram", "crossbar.g_max_us", 0.5, "crossbar.g_max_us"),
        ("rram", "faults.stuck_on", 0.999, "faults.stuck_on"),
    ],
)
def test_override_error_names_the_override(name, key, value, named):
    with pytest.raises(ProfileError) as info:
        PROFILES[name].with_overrides({key: value}, origin="--set")
    assert str(info.value).startswith(f"--set: '{named}")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("pcm", {"crossbar.levels": 2}),
        ("pcm", {"crossbar.prog_noise_scale": 0, "crossbar.drift_scale": 0}),
        ("pcm", {"faults.stuck_on": 0.5, "faults.stuck_off": 0.5}),
        ("pcm", {"converter.adc_headroom": 0.5, "converter.dac_bits": None}),
        ("rram", {"crossbar.g_min_us": 39.5}),
        ("pcm", {"crossbar.device_model": "generic", "crossbar.generic.drift_nu_std": 0.001}),
        ("pcm", {"timing.steps_per_window": 16, "timing.step_time_s": 1e-6}),
        (
            "loihi2",
            {"weights.bits": 1, "neuron.membrane_bits": 52, "neuron.number_format": "generic"},
        ),
        (
            "loihi2",
            {"weights.bits": 32, "neuron.membrane_bits": 2, "neuron.number_format": "generic"},
        ),
        (
            "loihi2",
            {
                "weights.bits": None,
                "neuron.membrane_bits": None,
                "neuron.number_format": "generic",
                "timing.steps_per_window": 1,
            },
        ),
        ("ideal", {"timing.time_unit_s": None, "crosscheck.required_agreement": 0}),
    ],
)
def test_boundary_overrides_are_accepted(name, overrides):
    new = PROFILES[name].with_overrides(overrides)
    for key, value in overrides.items():
        assert new.get(key) == value


def test_float_weights_need_a_float_membrane():
    with pytest.raises(ProfileError, match="'weights.bits': an integer membrane needs integer"):
        PROFILES["loihi2"].with_overrides({"weights.bits": None}, origin="--set")


def test_integral_float_for_an_int_key_becomes_an_int():
    new = PROFILES["pcm"].with_overrides({"crossbar.levels": 16.0})
    assert new.get("crossbar.levels") == 16 and type(new.get("crossbar.levels")) is int


# ---------------------------------------------------------------- hypothesis


class Spec(NamedTuple):
    profile: str
    key: str
    valid: st.SearchStrategy
    low: float | None  # smallest valid value (None: no lower bound)
    high: float | None  # largest valid value (None: no upper bound)


def _floats(lo, hi, exclude_min=False):
    return st.floats(
        min_value=lo, max_value=hi, exclude_min=exclude_min, allow_nan=False, allow_infinity=False
    )


SPECS = [
    Spec("pcm", "crossbar.levels", st.integers(2, 2**16), 2, 2**16),
    Spec("pcm", "crossbar.tile_rows", st.integers(1, 4096), 1, 2**16),
    Spec("rram", "crossbar.tile_cols", st.integers(1, 4096), 1, 2**16),
    Spec("pcm", "crossbar.prog_noise_scale", _floats(0, 1e6), 0, None),
    Spec("rram", "crossbar.read_noise_scale", _floats(0, 1e6), 0, None),
    Spec("rram", "crossbar.drift_scale", _floats(0, 1e6), 0, None),
    Spec("pcm", "crossbar.t_inference_s", _floats(0, 1e12), 0, None),
    Spec("rram", "crossbar.variability", _floats(0, 10), 0, None),
    Spec("pcm", "crossbar.g_max_us", _floats(0, 1e6, exclude_min=True), 0, None),
    Spec("rram", "crossbar.g_min_us", _floats(0, 39.99), 0, None),
    Spec("rram", "crossbar.generic.prog_sigma_us", _floats(0, 100), 0, None),
    Spec("pcm", "converter.dac_bits", st.integers(1, 32), 1, 32),
    Spec("rram", "converter.adc_bits", st.integers(1, 32), 1, 32),
    Spec("pcm", "converter.adc_headroom", _floats(0, 100, exclude_min=True), 0, None),
    Spec("rram", "faults.stuck_on", _floats(0, 0.99), 0, 1),
    Spec("pcm", "faults.stuck_off", _floats(0, 1), 0, 1),
    Spec("loihi2", "timing.steps_per_window", st.integers(1, 2**16), 1, 2**16),
    Spec("loihi2", "timing.step_time_s", _floats(0, 1, exclude_min=True), 0, None),
    # loihi2's number_format holds at most 8-bit weights and 24-bit registers (the wider
    # ranges of the keys are accepted with neuron.number_format: generic)
    Spec("loihi2", "weights.bits", st.integers(1, 8), 1, 32),
    Spec("loihi2", "neuron.membrane_bits", st.just(24), 2, 52),
    Spec("loihi2", "cores.neurons_per_core", st.integers(1, 10**9), 1, None),
    Spec("loihi2", "cores.synaptic_memory_bits", st.integers(1, 10**9), 1, None),
    Spec("loihi2", "cores.input_axons_per_core", st.integers(1, 10**9), 1, None),
    Spec("loihi2", "energy.synop_j", _floats(0, 1), 0, None),
    Spec("ideal", "timing.time_unit_s", _floats(0, 1, exclude_min=True), 0, None),
    Spec("ideal", "crosscheck.required_agreement", _floats(0, 1), 0, 1),
]
INT_KEYS = {s.key for s in SPECS if isinstance(PROFILES[s.profile].get(s.key), int)} | {
    "crossbar.levels",
    "cores.input_axons_per_core",
}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_in_range_override_is_accepted_and_get_returns_it(data):
    spec = data.draw(st.sampled_from(SPECS), label="spec")
    value = data.draw(spec.valid, label="value")
    original = PROFILES[spec.profile]
    new = original.with_overrides({spec.key: value})
    got = new.get(spec.key)
    assert got == value
    assert type(got) is (int if spec.key in INT_KEYS else float)
    rest_new = {k: v for k, v in yaml_leaves(new.to_dict()) if k != spec.key}
    rest_old = {k: v for k, v in yaml_leaves(original.to_dict()) if k != spec.key}
    assert rest_new == rest_old
    assert original == PROFILES[spec.profile].with_overrides({})


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_out_of_range_override_is_refused_naming_the_key(data):
    spec = data.draw(
        st.sampled_from([s for s in SPECS if s.low is not None or s.high is not None]),
        label="spec",
    )
    below = st.floats(max_value=spec.low, exclude_max=True, allow_nan=False, allow_infinity=False)
    if spec.key in INT_KEYS:
        below = st.integers(-(10**9), int(spec.low) - 1) | below
    choices = [below]
    if spec.high is not None:
        above = st.floats(min_value=spec.high, exclude_min=True, allow_infinity=False)
        if spec.key in INT_KEYS:
            above = st.integers(int(spec.high) + 1, 10**9) | above
        choices.append(above)
    value = data.draw(st.one_of(choices), label="value")
    with pytest.raises(ProfileError) as info:
        PROFILES[spec.profile].with_overrides({spec.key: value}, origin="--set")
    message = str(info.value)
    assert message.startswith(f"--set: '{spec.key}': ")
    assert len(message.splitlines()) == 1


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    junk=st.one_of(
        st.text(max_size=20),
        st.booleans(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.just(float("nan")),
        st.just(float("inf")),
        st.just(float("-inf")),
    ),
)
def test_override_of_the_wrong_type_is_refused_naming_the_key(data, junk):
    spec = data.draw(st.sampled_from(SPECS), label="spec")
    with pytest.raises(ProfileError) as info:
        PROFILES[spec.profile].with_overrides({spec.key: junk}, origin="--set")
    message = str(info.value)
    assert message.startswith(f"--set: '{spec.key}': ")
    assert len(message.splitlines()) == 1, message


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_resolved_profile_written_as_yaml_loads_back_equal(data, tmp_path_factory):
    name = data.draw(st.sampled_from(sorted(SHIPPED)), label="profile")
    specs = [s for s in SPECS if s.profile == name]
    chosen = data.draw(st.lists(st.sampled_from(specs), unique=True, max_size=3), label="keys")
    overrides = {s.key: data.draw(s.valid, label=s.key) for s in chosen}
    profile = PROFILES[name].with_overrides(overrides)
    path = tmp_path_factory.mktemp("roundtrip") / "resolved.yaml"
    path.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
    again = load_profile(path)
    assert again == profile
    assert again.to_dict() == profile.to_dict()


# ---------------------------------------------------------------- extends


def test_extends_by_name_overrides_two_keys_and_inherits_the_rest(tmp_path):
    path = write(
        tmp_path / "pcm_short.yaml",
        "name: pcm-short\n"
        "extends: pcm\n"
        "crossbar:\n"
        "  levels: 8               # eight levels\n"
        "  t_inference_s: 60.0     # one minute\n",
    )
    child = load_profile(path)
    pcm = PROFILES["pcm"]
    assert child.name == "pcm-short" and child.hardware == "crossbar"
    assert child.get("crossbar.levels") == 8 and child.get("crossbar.t_inference_s") == 60.0
    assert child.source == str(path)
    old, new = dict(yaml_leaves(pcm.to_dict())), dict(yaml_leaves(child.to_dict()))
    assert set(old) == set(new)
    differing = {k for k in old if old[k] != new[k]}
    assert differing == {"name", "description", "crossbar.levels", "crossbar.t_inference_s"}
    expected = pcm.with_overrides({"crossbar.levels": 8, "crossbar.t_inference_s": 60.0})
    assert dataclasses.replace(child, name="pcm", description=pcm.description) == expected


def test_extends_by_relative_path_is_relative_to_the_child_file(tmp_path, monkeypatch):
    write(
        tmp_path / "base" / "lab_rram.yaml",
        "name: lab-rram\nhardware: crossbar\ncrossbar:\n  device_model: generic\n"
        "  g_min_us: 2.0\n  g_max_us: 20.0\n  levels: 4\n  generic:\n    prog_sigma_us: 0.3\n",
    )
    write(
        tmp_path / "variants" / "lab_rram_8.yaml",
        "name: lab-rram-8\nextends: ../base/lab_rram.yaml\ncrossbar:\n  levels: 8\n",
    )
    grandchild = write(
        tmp_path / "variants" / "deep" / "lab_rram_8_faulty.yaml",
        "name: faulty\nextends: ../lab_rram_8.yaml\nfaults:\n  stuck_off: 0.01\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    profile = load_profile(grandchild)
    assert profile.name == "faulty"
    assert profile.get("crossbar.levels") == 8
    assert (profile.get("crossbar.g_min_us"), profile.get("crossbar.g_max_us")) == (2.0, 20.0)
    assert profile.get("crossbar.generic.prog_sigma_us") == 0.3
    assert profile.get("faults.stuck_off") == 0.01
    # a shipped profile by a relative path is the same as by name
    relative = os.path.relpath(PROFILE_DIR / "pcm.yaml", tmp_path)
    assert relative.startswith("..")
    shipped = write(tmp_path / "by_path.yaml", f"name: x\nextends: {relative}\n")
    assert load_profile(shipped) == dataclasses.replace(PROFILES["pcm"], name="x", description="")


def test_error_in_the_child_names_the_child_file_and_key(tmp_path):
    path = write(tmp_path / "child.yaml", "name: c\nextends: rram\ncrossbar:\n  levels: 1\n")
    message = load_error(path)
    assert message == f"{path}: 'crossbar.levels': must be >= 2, got 1"
    assert "rram.yaml" not in message


def test_error_in_an_inherited_value_names_the_parent_file(tmp_path):
    parent = write(
        tmp_path / "parent.yaml",
        "name: p\nhardware: crossbar\ncrossbar:\n  variability: -0.1\n",
    )
    child = write(
        tmp_path / "child.yaml", "name: c\nextends: parent.yaml\ncrossbar:\n  levels: 4\n"
    )
    assert load_error(child) == f"{parent}: 'crossbar.variability': must be >= 0, got -0.1"


def test_child_without_a_name_is_blamed_not_its_parent(tmp_path):
    path = write(tmp_path / "nameless.yaml", "extends: pcm\ncrossbar:\n  levels: 8\n")
    message = load_error(path)
    assert message.startswith(f"{path}: 'name'")


def test_child_may_switch_hardware_only_when_the_parent_fits(tmp_path):
    path = write(
        tmp_path / "child.yaml",
        "name: c\nextends: pcm\nhardware: digital\ntiming:\n  steps_per_window: 8\n",
    )
    message = load_error(path)
    assert "'crossbar." in message and "does not apply to digital hardware" in message


# ---------------------------------------------------------------- CLI


def test_cli_prints_the_resolved_profile_with_overrides(capsys, tmp_path):
    code, out, err = run(capsys, "profile", "pcm", "--set", "crossbar.levels=8")
    assert (code, err) == (0, "")
    assert out.startswith(f"# {PROFILE_DIR / 'pcm.yaml'}\n")
    assert re.search(r"^  levels: 8$", out, re.MULTILINE)
    assert re.search(r"^  g_max_us: 25\.0$", out, re.MULTILINE)
    # the printed document is itself a valid profile, equal to the overridden one
    printed = write(tmp_path / "printed.yaml", out)
    assert load_profile(printed) == PROFILES["pcm"].with_overrides({"crossbar.levels": 8})


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_cli_json_parses_and_matches_the_profile(capsys, name):
    code, out, err = run(capsys, "profile", name, "--json")
    assert (code, err) == (0, "")
    assert len(out.splitlines()) == 1
    doc = json.loads(out)
    assert doc == PROFILES[name].to_dict()
    assert doc["hardware"] == SHIPPED[name]


def test_cli_json_with_several_overrides(capsys):
    code, out, _ = run(
        capsys, "profile", "rram", "--json", "--set", "faults.stuck_on=0",
        "--set", "crossbar.drift_compensation=true", "--set", "converter.dac_bits=null",
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    assert doc["faults"]["stuck_on"] == 0
    assert doc["crossbar"]["drift_compensation"] is True
    assert doc["converter"]["dac_bits"] is None
    assert doc["crossbar"]["levels"] == 16


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pcm", "--set", "crossbar.levels=1"], "--set: 'crossbar.levels': must be >= 2"),
        (["pcm", "--set", "weights.bits=8"], "--set: 'weights.bits': does not apply"),
        (["pcm", "--set", "crossbar.levles=8"], "--set: unknown key 'crossbar.levles'"),
        (["pcm", "--set", "crossbar.levels=eight"], "expected a number, got 'eight'"),
        (["pcm", "--set", "crossbar.levels"], "expected KEY=VALUE"),
        (["pcm", "--set", "crossbar.levels=[8"], "cannot parse value"),
        (["pcm_v2"], "pcm_v2: no such profile"),
        (["missing.yaml"], "missing.yaml: profile file does not exist"),
        (["pcm", "--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_user_errors_are_one_line(capsys, argv, expected):
    message = assert_one_error_line(*run(capsys, "profile", *argv))
    assert expected in message
