"""Cross-check: exact on ideal hardware, ok on loihi2, and deliberate faults are found at the
layer where they are."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.crosscheck import SCHEMA_PATH
from neurodeploy.modelio import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR
CLEAN_CROSSBAR = {
    "crossbar.prog_noise_scale": 0.0,
    "crossbar.read_noise_scale": 0.0,
    "crossbar.drift_scale": 0.0,
    "crossbar.drift_compensation": False,
    "crosscheck.max_beyond_bound": 0.0,
}


@pytest.fixture(scope="module")
def cnn():
    net = nd.load_model(MODELS / "digits_cnn")
    x_tr, _ = nd.datasets.digits("train")
    x_te, y_te = nd.datasets.digits("test")
    return nd.convert(net, calibration=x_tr), x_te[:120], y_te[:120]


def validate(report: nd.CrossCheckReport, tmp_path: Path) -> dict:
    path = report.to_json(tmp_path / "report.json")
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    return doc


@pytest.mark.parametrize("backend", ["emulator", "crossbar"])
def test_ideal_hardware_is_ok_with_zero_error(cnn, backend, tmp_path):
    snn, x, y = cnn
    report = nd.crosscheck(snn, nd.deploy(snn, "ideal", backend=backend), x, y)
    assert report.ok and report.divergence_layer is None and report.reasons == []
    assert report.agreement == 1.0 and report.accuracy_hardware == report.accuracy_reference
    for layer in report.layers:
        assert layer.error_max <= 1e-12 and layer.beyond_bound == 0.0
        assert layer.missing_spikes == 0 and layer.extra_spikes == 0
    doc = validate(report, tmp_path)
    assert doc["schema_version"] == 1 and doc["ok"] is True
    assert [layer["name"] for layer in doc["layers"]] == ["input", "conv1", "pool1", "fc1", "out"]


def test_loihi2_is_ok_and_errors_stay_within_quantisation(cnn, tmp_path):
    snn, x, y = cnn
    report = nd.crosscheck(snn, nd.deploy(snn, "loihi2"), x, y)
    assert report.ok and report.agreement >= 0.99
    conv1 = report.layers[1]
    assert conv1.step_size > 0 and conv1.error_max_steps is not None
    assert 0 < conv1.error_max <= conv1.bound_max  # quantisation shows, within its bound
    assert report.latency_s == pytest.approx(96e-6) and report.energy_j > 0
    validate(report, tmp_path)


def test_lava_cross_check_is_ok(cnn):
    snn, x, y = cnn
    report = nd.crosscheck(snn, nd.deploy(snn, "loihi2", backend="lava"), x[:40], y[:40])
    assert report.ok and report.backend == "lava:fixed_pt"


def _flip_sign(program):
    *linear, affine = program.synapses
    return replace(program, synapses=(*linear, replace(affine, weight=-affine.weight)))


@pytest.mark.parametrize("layer", ["conv1", "fc1", "out"])
def test_wrong_weight_sign_is_found_in_its_layer(cnn, layer):
    snn, x, y = cnn
    dep = nd.deploy(snn, "loihi2")
    dep.programs[layer] = _flip_sign(dep.programs[layer])
    report = nd.crosscheck(snn, dep, x, y)
    assert not report.ok and report.divergence_layer == layer
    assert any(r.startswith(f"{layer}:") and "weights" in r for r in report.reasons)


def test_too_short_window_is_found_and_explained(cnn):
    snn, x, y = cnn
    short = nd.retime(snn, {"fc1": 0.25 * snn.stage("fc1").window})
    report = nd.crosscheck(snn, nd.deploy(short, "loihi2"), x, y)
    assert not report.ok and report.divergence_layer == "fc1"
    fc1 = next(layer for layer in report.layers if layer.name == "fc1")
    assert fc1.saturated > 0
    assert any(r.startswith("fc1:") and "window" in r for r in report.reasons)


def test_stuck_at_fault_cluster_is_found_in_its_layer(cnn):
    snn, x, y = cnn
    profile = nd.load_profile("pcm").with_overrides(CLEAN_CROSSBAR)
    clean = nd.crosscheck(snn, nd.deploy(snn, profile, backend="crossbar"), x, y)
    assert clean.divergence_layer is None  # converters and levels alone stay within bounds
    dep = nd.deploy(snn, profile, backend="crossbar")
    tile = dep.layers["fc1"].tiles[0]
    tile.g_pos[16:48, 4:12] = profile.crossbar.g_max_us  # a cluster of stuck-on devices
    report = nd.crosscheck(snn, dep, x, y)
    assert not report.ok and report.divergence_layer == "fc1"
    before = [layer for layer in report.layers if layer.name in ("input", "conv1", "pool1")]
    assert all(layer.within_bound for layer in before)


def test_html_report_is_self_contained_with_every_figure(cnn, tmp_path):
    snn, x, y = cnn
    dep = nd.deploy(snn, "loihi2")
    dep.programs["fc1"] = _flip_sign(dep.programs["fc1"])
    page = nd.crosscheck(snn, dep, x, y).to_html(tmp_path / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4
    assert "NOT OK" in page and "at layer <b>fc1</b>" in page
    assert not re.search(r"(src|href)=['\"]https?:", page)  # nothing loaded from outside


def _run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_deploy_command_gates_on_the_report(capsys, tmp_path):
    code, out, err = _run_cli(
        capsys,
        "deploy",
        "digits_cnn",
        "--profile",
        "loihi2",
        "--samples",
        "60",
        "--out",
        str(tmp_path / "ok"),
    )
    assert code == 0 and "RESULT: OK" in out and err == ""
    assert (tmp_path / "ok" / "crosscheck.json").is_file()
    assert (tmp_path / "ok" / "crosscheck.html").is_file()
    broken = tmp_path / "narrow.yaml"
    broken.write_text(
        "name: narrow\nextends: loihi2\nneuron:\n  membrane_bits: 10\n  number_format: generic\n"
    )
    code, out, _ = _run_cli(
        capsys,
        "deploy",
        "digits_cnn",
        "--profile",
        str(broken),
        "--samples",
        "60",
        "--out",
        str(tmp_path / "bad"),
    )
    assert code == 1 and "RESULT: NOT OK" in out and "divergence layer" in out
    doc = json.loads((tmp_path / "bad" / "crosscheck.json").read_text())
    assert doc["ok"] is False and doc["divergence_layer"] == "conv1"
    assert any("saturations of the membrane" in r for r in doc["reasons"])


def test_report_layers_carry_consistent_counts(cnn):
    snn, x, y = cnn
    report = nd.crosscheck(snn, nd.deploy(snn, "loihi2"), x, y)
    for layer in report.layers:
        assert sum(layer.histogram["counts"]) == len(x) * (
            layer.neurons if layer.kind != "output" else snn.num_classes
        )
        assert np.isclose(layer.histogram["edges"][0], -layer.histogram["edges"][-1])


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="needs Debian's chromium")
def test_report_renders_in_headless_chromium(cnn, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "screenshot_report",
        Path(__file__).resolve().parent.parent / "tools" / "screenshot_report.py",
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    snn, x, y = cnn
    page = nd.crosscheck(snn, nd.deploy(snn, "loihi2"), x, y).to_html(tmp_path / "r.html")
    png = tool.screenshot(page, tmp_path / "r.png", height=2400)
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (2400, 1280)
    assert (image.std(axis=(0, 1)) > 10).all()  # figures and tables drawn, not a blank page
