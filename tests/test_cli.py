"""The command line as a user meets it: figures, JSON, files, and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from netgen import random_inputs, random_network

import neurodeploy as nd
from neurodeploy.cli import COMMANDS, build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json_reports_the_figures(capsys):
    code, out, err = run(capsys, "simulate", "digits_mlp", "--samples", "60", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    for key in (
        "accuracy_relu",
        "accuracy_snn",
        "agreement",
        "spikes_per_neuron",
        "latency",
        "max_abs_error",
    ):
        assert key in report
    assert report["samples"] == 60
    assert report["agreement"] == 1.0
    assert report["accuracy_snn"] == report["accuracy_relu"]
    assert report["max_abs_error"] < 1e-9
    assert 0 < report["spikes_per_neuron"] < 1


def test_convert_prints_the_layer_table_and_writes_json(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "convert",
        "digits_cnn",
        "--neuron",
        "alpha1",
        "--calibration-size",
        "200",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    for word in ("accuracy", "agreement", "latency", "conv1", "pool1", "fc1", "out"):
        assert word in out
    saved = json.loads((tmp_path / "convert.json").read_text())
    assert saved["neuron"] == "alpha1" and saved["calibration_size"] == 200
    assert [row["name"] for row in saved["layers"]] == ["input", "conv1", "pool1", "fc1", "out"]


def test_user_data_file(capsys, tmp_path):
    net = random_network(3)
    model = nd.save_model(net, tmp_path / "rand")
    x = random_inputs(net, 20, 3)
    np.savez(tmp_path / "data.npz", x=x, y=net.predict(x))
    code, out, _ = run(
        capsys, "simulate", str(model), "--data", str(tmp_path / "data.npz"), "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["accuracy_relu"] == 1.0 and report["agreement"] == 1.0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["simulate", "no_such_model"], "no_such_model: model path does not exist"),
        (["simulate", "digits_mlp", "--samples", "0"], "--samples"),
        (["simulate", "digits_mlp", "--neuron", "lif"], "--neuron"),
        (["simulate", "digits_mlp", "--zeta", "nan"], "--zeta"),
        (["frobnicate"], "invalid choice"),
        (["simulate", "digits_mlp", "--data", "missing.npz"], "missing.npz: data file does not"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("neurodeploy: error: ")
    assert fragment in err


def test_broken_model_names_the_file_and_writes_nothing(capsys, tmp_path):
    model = nd.save_model(random_network(1), tmp_path / "m")
    doc = yaml.safe_load((model / "network.yaml").read_text())
    doc["layers"][1]["type"] = "softplus"
    (model / "network.yaml").write_text(yaml.safe_dump(doc))
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "simulate", str(model), "--out", str(out_dir))
    assert code == 2 and "network.yaml" in err and "softplus" in err
    assert not out_dir.exists()


def test_model_without_data_set_asks_for_data(capsys, tmp_path):
    model = nd.save_model(random_network(1), tmp_path / "m")
    code, _, err = run(capsys, "simulate", str(model))
    assert code == 2 and "--data" in err


def test_console_entry_point_has_no_traceback_for_user_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neurodeploy", "simulate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_deploy_reports_hardware_figures_and_mapping(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "run",
        "digits_cnn",
        "--profile",
        "loihi2",
        "--samples",
        "40",
        "--json",
        "--out",
        str(tmp_path),
    )
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["backend"] == "emulator" and report["samples"] == 40
    assert report["agreement"] >= 0.9
    assert report["latency_s"] == pytest.approx(3 * 32 * 1e-6)
    assert report["energy_j"] > 0
    assert [layer["name"] for layer in report["mapping"]["layers"]] == ["conv1", "fc1", "out"]
    assert json.loads((tmp_path / "run.json").read_text()) == report


def test_deploy_with_overrides_on_the_crossbar(capsys):
    code, out, _ = run(
        capsys,
        "run",
        "digits_mlp",
        "--profile",
        "pcm",
        "--samples",
        "30",
        "--set",
        "crossbar.levels=8",
        "--set",
        "converter.adc_bits=6",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["backend"] == "crossbar"
    assert report["mapping"]["layers"][0]["levels"] == 8


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--profile", "loihi2", "--backend", "crossbar"], "digital hardware"),
        (["--profile", "nope"], "nope: no such profile"),
        (["--profile", "pcm", "--set", "weights.bits=4"], "'weights.bits': does not apply"),
        (["--profile", "pcm", "--set", "crossbar.levels"], "expected KEY=VALUE"),
        (["--profile", "loihi2", "--seed", "-1"], "--seed"),
        (["--profile", "loihi2", "--tag", "floating_pt"], "--tag applies to the lava backend"),
        (["--profile", "loihi2", "--synapses", "lava"], "--synapses applies to the lava backend"),
        (
            ["--profile", "loihi2", "--backend", "lava", "--synapses", "lava"]
            + ["--tag", "floating_pt"],
            "synapses='lava': layer 'fc1' is not in Loihi formats",
        ),
        (["--profile", "pcm", "--backend", "lava"], "lava backend runs digital"),
    ],
)
def test_deploy_user_errors(capsys, argv, fragment):
    code, out, err = run(capsys, "run", "digits_mlp", "--samples", "5", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert fragment in err


def test_run_on_lava_prints_the_figures(capsys):
    code, out, err = run(
        capsys, "run", "digits_mlp", "--profile", "loihi2", "--backend", "lava", "--samples", "30"
    )
    assert code == 0
    for text in ("accuracy", "agreement", "spikes/neuron", "96 steps = 96 us", "energy"):
        assert text in out
    assert "lava" in out


def test_run_on_lavas_own_synapses_agrees_with_the_emulator(capsys):
    argv = ("run", "digits_cnn", "--profile", "loihi2", "--samples", "3", "--json")
    code, out, _ = run(capsys, *argv, "--backend", "lava", "--synapses", "lava")
    assert code == 0
    lava = json.loads(out)
    code, out, _ = run(capsys, *argv, "--backend", "emulator")
    emulator = json.loads(out)
    assert lava["mapping"]["synapses"] == "lava"
    for key in ("accuracy_hardware", "spikes_per_neuron_hardware", "overflow", "energy_j"):
        assert lava[key] == emulator[key]


def test_progress_bars_only_on_a_terminal_unless_forced(monkeypatch, capsys):
    from neurodeploy import progress

    assert not progress.wanted()  # pytest's stderr is no terminal
    assert progress.wanted(forced=True) and not progress.wanted(quiet=True, forced=True)
    with progress.bar("x", 10, "samples", progress.wanted()) as silent:
        progress.counter(silent)(5, 10)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.wanted() and not progress.wanted(quiet=True)
    with progress.bar("lava fixed_pt", 10, "samples", progress.wanted()) as shown:
        moved = progress.counter(shown)
        moved(5, 10)
        moved(10, 10)
    err = capsys.readouterr().err
    # tqdm's line: description, count, elapsed<remaining (the ETA) and the rate
    assert "lava fixed_pt" in err and "10/10" in err and "<" in err and "samples/s" in err


def test_forced_progress_shows_nested_sweep_bars(capsys, tmp_path):
    argv = ["sweep", "digits_mlp", "--profile", "loihi2", "--param", "weights.bits=4,8"]
    argv += ["--seeds", "2", "--samples", "20", "--workers", "1", "--progress"]
    code, out, err = run(capsys, *argv, "-o", str(tmp_path / "s"))
    assert code == 0, err
    assert "sweep points" in err and "2/2" in err
    assert "runs (2 seeds per point)" in err and "4/4" in err
    assert "sweep: 4 runs (2 points x 2 seeds)" in out


def test_every_option_has_help_with_its_default():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    for parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (parser.prog, action.option_strings)
            text = formatter._get_help_string(action)
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction))
            if not (flag or action.required or isinstance(action, argparse._HelpAction)):
                assert "default" in text, (parser.prog, action.option_strings, text)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "neurodeploy: error: COMMAND required; choose one of convert, simulate"),
        (["fileclass"], "neurodeploy: error: fileclass: ACTION required; choose one of train"),
        (["simulate", "digits_mlp", "--zeta", "x"], "neurodeploy: error: simulate: argument"),
    ],
)
def test_one_error_prefix(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith(message) and err.count("neurodeploy: error:") == 1


def test_short_out_option_everywhere():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, child in sub.choices.items():
        outs = [a for a in child._actions if "--out" in a.option_strings]
        if outs:
            assert "-o" in outs[0].option_strings, name
    args = parser.parse_args(["run", "digits_mlp", "--profile", "loihi2", "-o", "d"])
    assert args.out == "d"


def test_every_subcommand_has_a_handler():
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMANDS)


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"neurodeploy {nd.__version__}\n"


def test_shipped_file_classification_model_evaluates_by_name(capsys):
    code, out, err = run(capsys, "fileclass", "eval", "fileclass", "--samples", "50")
    assert code == 0 and err == ""
    assert out.startswith("reference: accuracy ") and "on 50 test files" in out
