"""PyTorch exports as users bring them: every file of the torch zoo (tests/data/torch_zoo,
written by tools/export_torch_zoo.py with torch's two exporters) loads, its forward pass matches
torch's logits, and its conversion to a b1 SNN is exact; the unsupported ones are refused with
one error naming the node and its operator. No torch needed: the logits are fixtures."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

import neurodeploy as nd
from neurodeploy.cli import main

ZOO = Path(__file__).resolve().parent / "data" / "torch_zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())
FILES = MANIFEST["files"]
SUPPORTED = sorted(f for f, e in FILES.items() if e["expected"] == "supported")
REFUSED = sorted(f for f, e in FILES.items() if e["expected"] == "refused")
# torch computes in float32, the IR in float64: the difference is float32 rounding,
# accumulated over a few layers, a few units of 1e-7 of the largest logit in practice;
# 1e-5 of it (the bound) leaves an order of magnitude of margin.
TORCH_RELATIVE_TOLERANCE = 1e-5
SNN_RELATIVE_TOLERANCE = 1e-9  # the conversion is exact: float64 rounding only


@cache
def fixtures() -> dict[str, np.ndarray]:
    with np.load(ZOO / MANIFEST["fixtures"]) as data:
        return {key: data[key] for key in data.files}


@cache
def load(fname: str) -> nd.Network:
    return nd.load_model(ZOO / fname, input_range=tuple(FILES[fname]["input_range"]))


def inputs_and_logits(fname: str) -> tuple[np.ndarray, np.ndarray]:
    stem = FILES[fname]["fixture"]
    return fixtures()[f"{stem}.x"].astype(np.float64), fixtures()[f"{stem}.logits"]


def test_the_zoo_covers_both_exporters_of_at_least_20_architectures():
    by_arch: dict[str, set] = {}
    for entry in FILES.values():
        by_arch.setdefault(entry["architecture"], set()).add(entry["exporter"])
    supported = {FILES[f]["architecture"] for f in SUPPORTED}
    assert len(supported) >= 20
    assert all(exporters == {"dynamo", "legacy"} for exporters in by_arch.values())
    assert {FILES[f]["opset"] for f in SUPPORTED} >= {13, 17, 18, 20}


@pytest.mark.parametrize("fname", SUPPORTED)
def test_forward_matches_torch(fname):
    net = load(fname)
    x, logits = inputs_and_logits(fname)
    assert net.input_shape == tuple(FILES[fname]["input_shape"][1:])
    assert net.input_range == tuple(FILES[fname]["input_range"])
    got = net.forward(x)
    assert got.shape == logits.shape
    assert np.abs(got - logits).max() <= TORCH_RELATIVE_TOLERANCE * np.abs(logits).max()


@pytest.mark.parametrize("fname", SUPPORTED)
def test_conversion_is_exact(fname):
    net = load(fname)
    x, _ = inputs_and_logits(fname)
    expected = net.forward(x)
    snn = nd.convert(net, calibration=x)
    out = nd.simulate(snn, x).output
    assert np.abs(out - expected).max() <= SNN_RELATIVE_TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("fname", REFUSED)
def test_unsupported_exports_are_refused_naming_node_and_operator(fname):
    with pytest.raises(nd.ModelError) as info:
        load(fname)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{ZOO / fname}: node '")
    node_name, rest = message.split("node '", 1)[1].split("' (", 1)
    op = rest.split("): ", 1)[0]
    assert op in FILES[fname]["refused_ops"]
    graph = onnx.load(str(ZOO / fname), load_external_data=False).graph
    assert any(n.name == node_name and n.op_type == op for n in graph.node)


def test_cli_refuses_an_unsupported_export_in_one_line(capsys):
    fname = REFUSED[0]
    low, high = FILES[fname]["input_range"]
    assert main(["convert", str(ZOO / fname), "--input-range", f"{low},{high}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert any(f"({op}): " in err for op in FILES[fname]["refused_ops"])
