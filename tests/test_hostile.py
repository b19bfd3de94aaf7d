"""The hostile-input corpus: every case is one line on stderr naming the fault, exit 2,
no traceback, and nothing written.

Each case builds its bad input in a fresh directory, snapshots that directory,
runs the CLI in it and checks the snapshot is unchanged afterwards (so a
refusal never leaves a half-written output behind).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from neurodeploy.cli import main
from neurodeploy.modelio import SHIPPED_MODELS_DIR

TESTS = Path(__file__).resolve().parent
MODELS = SHIPPED_MODELS_DIR
BAD_PROFILES = sorted((TESTS / "profiles_bad").glob("*.yaml"))


# -- builders of hostile files ----------------------------------------------------------------
def _model(tmp: Path, name="m", yaml_edit=None, weights_edit=None, source="digits_mlp") -> str:
    """A copy of a shipped model with its network.yaml text and/or weights edited."""
    dst = tmp / name
    shutil.copytree(MODELS / source, dst)
    if yaml_edit is not None:
        text = (dst / "network.yaml").read_text()
        (dst / "network.yaml").write_text(yaml_edit(text))
    if weights_edit is not None:
        with np.load(dst / "weights.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        weights_edit(arrays)
        np.savez(dst / "weights.npz", **arrays)
    return str(dst)


def _set(key, value):
    def edit(arrays):
        arrays[key] = value(arrays[key]) if callable(value) else value

    return edit


def _forged_npy(shape, dtype="<f8", data=b"\0" * 64) -> bytes:
    """An .npy member whose header claims ``shape`` but which holds only ``data``."""
    return _npy_bytes_with_header(shape, dtype) + data


def _model_with_file(tmp: Path, filename: str, content: str | bytes | dict) -> dict:
    """A copy of digits_mlp with one of its files replaced (a dict: a zip of members)."""
    model = _model(tmp)
    if isinstance(content, dict):
        _zip(Path(model) / filename, content)
    else:
        _text(Path(model), filename, content)
    return {"m": model}


def _npy_bytes_with_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()  # magic string, then the header


def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def _data(tmp: Path, name="d.npz", **arrays) -> str:
    path = tmp / name
    np.savez(path, **arrays)
    return str(path)


def _digits_x(n=4, features=64):
    return np.linspace(0, 16, n * features).reshape(n, features)


def _replace_line(old, new):
    return lambda text: text.replace(old, new, 1)


def _edited(old: str, new: str, source: str = "digits_mlp"):
    """A setup: a copy of a shipped model with the first ``old`` in its network.yaml -> ``new``."""
    return lambda t: {"m": _model(t, source=source, yaml_edit=_replace_line(old, new))}


def _text(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def _sweep_dir(tmp: Path, results: str) -> str:
    """A sweep directory whose results.jsonl holds ``results``, made by a real tiny sweep."""
    out = tmp / "sw"
    code = main(
        [
            "sweep", "digits_mlp", "--profile", "loihi2", "--param", "weights.bits=4,8",
            "--seeds", "1", "--samples", "8", "--workers", "1", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    (out / "results.jsonl").write_text(results)
    return str(out)


# -- the corpus -------------------------------------------------------------------------------
# (id, setup(tmp) -> dict of placeholders, argv with {placeholders}, fragment of the message)
S = "simulate"
CASES = [
    # model directories
    ("model-missing", None, [S, "{tmp}/nothing"], "model path does not exist"),
    ("model-is-file", lambda t: {"m": _text(t, "f.txt", "x")}, [S, "{m}"], "expected a model"),
    (
        "model-no-yaml",
        lambda t: {"m": str((t / "e").mkdir() or t / "e")},
        [S, "{m}"],
        "network.yaml: missing",
    ),
    (
        "model-no-weights",
        lambda t: (Path(_model(t)) / "weights.npz").unlink() or {"m": str(t / "m")},
        [S, "{m}"],
        "weights.npz: missing",
    ),
    (
        "yaml-not-mapping",
        lambda t: {"m": _model(t, yaml_edit=lambda s: "- 1\n- 2\n")},
        [S, "{m}"],
        "mapping",
    ),
    (
        "yaml-malformed",
        lambda t: {"m": _model(t, yaml_edit=lambda s: s + "\n  - [unclosed\n")},
        [S, "{m}"],
        "malformed YAML",
    ),
    (
        "yaml-alias-bomb",
        lambda t: {"m": _model(t, yaml_edit=lambda s: ALIAS_BOMB)},
        [S, "{m}"],
        "aliases are not accepted",
    ),
    (
        "yaml-huge",
        lambda t: {"m": _model(t, yaml_edit=lambda s: s + "#" * (5 * 2**20))},
        [S, "{m}"],
        "bytes",
    ),
    (
        "yaml-not-utf8",
        lambda t: _model_with_file(t, "network.yaml", b"\xff\xfe\x00"),
        [S, "{m}"],
        "not UTF-8",
    ),
    (
        "yaml-duplicate-key",
        lambda t: {"m": _model(t, yaml_edit=lambda s: "name: a\nname: b\n" + s)},
        [S, "{m}"],
        "duplicate key",
    ),
    (
        "yaml-unknown-top-key",
        lambda t: {"m": _model(t, yaml_edit=lambda s: "colour: red\n" + s)},
        [S, "{m}"],
        "unknown top-level key",
    ),
    (
        "yaml-unknown-layer-type",
        _edited("type: relu", "type: gelu"),
        [S, "{m}"],
        "unknown layer type 'gelu'",
    ),
    (
        "yaml-unknown-layer-key",
        _edited("type: relu", "type: relu, slope: 2"),
        [S, "{m}"],
        "unknown key",
    ),
    (
        "yaml-input-range-reversed",
        _edited("range: [0.0, 16.0]", "range: [5, 1]"),
        [S, "{m}"],
        "p < q",
    ),
    (
        "yaml-input-shape-huge",
        _edited("shape: [64]", "shape: [100000, 100000]"),
        [S, "{m}"],
        "values per sample",
    ),
    (
        "yaml-input-shape-negative",
        _edited("shape: [64]", "shape: [-64]"),
        [S, "{m}"],
        "input.shape",
    ),
    (
        "yaml-layer-named-input",
        _edited("name: relu1", "name: input"),
        [S, "{m}"],
        "'input' names the network input",
    ),
    (
        "yaml-inputs-later-layer",
        _edited("type: relu", "type: relu, inputs: [out]"),
        [S, "{m}"],
        "a later layer",
    ),
    (
        "yaml-inputs-not-list",
        _edited("type: relu", "type: relu, inputs: 3"),
        [S, "{m}"],
        "inputs must be a non-empty list",
    ),
    (
        "yaml-window-zero",
        _edited("type: relu", "type: relu, window: 0"),
        [S, "{m}"],
        "window must be a positive number",
    ),
    (
        "yaml-clip-negative",
        _edited("type: relu", "type: relu, clip: -6"),
        [S, "{m}"],
        "clip must be a positive number",
    ),
    (
        "yaml-window-string",
        _edited("type: relu", "type: relu, window: wide"),
        [S, "{m}"],
        "window must be a number",
    ),
    (
        "yaml-out-features-wrong",
        _edited("out_features: 10", "out_features: 11"),
        [S, "{m}"],
        "'out.weight' has shape",
    ),
    (
        "yaml-out-features-bool",
        _edited("out_features: 10", "out_features: true"),
        [S, "{m}"],
        "must be an integer",
    ),
    (
        "yaml-classes-count",
        lambda t: {"m": _model(t, yaml_edit=lambda s: s.replace("classes: [", "classes: ['x', "))},
        [S, "{m}"],
        "class names for",
    ),
    (
        "conv-padding-huge",
        _edited("padding: 1", "padding: 40000", "digits_cnn"),
        [S, "{m}"],
        "more than",
    ),
    (
        "conv-stride-zero",
        _edited("stride: 1", "stride: 0", "digits_cnn"),
        [S, "{m}"],
        "stride must be >= 1",
    ),
    (
        "conv-groups-not-dividing",
        _edited("stride: 1", "stride: 1, groups: 3", "digits_cnn"),
        [S, "{m}"],
        "groups must be",
    ),
    (
        "pool-padding-too-large",
        _edited("type: maxpool2d", "type: maxpool2d, padding: 2", "digits_cnn"),
        [S, "{m}"],
        "padding must lie in",
    ),
    (
        "weights-complex",
        lambda t: {"m": _model(t, weights_edit=_set("fc1.weight", lambda w: w + 1j))},
        [S, "{m}"],
        "complex128 values",
    ),
    (
        "weights-string",
        lambda t: {"m": _model(t, weights_edit=_set("fc1.bias", lambda b: b.astype(str)))},
        [S, "{m}"],
        "expected real numbers",
    ),
    (
        "weights-bool",
        lambda t: {"m": _model(t, weights_edit=_set("fc1.bias", lambda b: b > 0))},
        [S, "{m}"],
        "bool values",
    ),
    (
        "weights-nan",
        lambda t: {"m": _model(t, weights_edit=_set("out.bias", lambda b: b * np.nan))},
        [S, "{m}"],
        "NaN or infinite",
    ),
    (
        "weights-1e308",
        lambda t: {"m": _model(t, weights_edit=_set("fc1.weight", lambda w: w * 0 + 1e308))},
        [S, "{m}"],
        "magnitude",
    ),
    (
        "weights-missing-array",
        lambda t: {"m": _model(t, weights_edit=lambda a: a.pop("out.bias"))},
        [S, "{m}"],
        "missing array 'out.bias'",
    ),
    (
        "weights-extra-array",
        lambda t: {"m": _model(t, weights_edit=_set("ghost.weight", np.ones(3)))},
        [S, "{m}"],
        "arrays for no layer",
    ),
    (
        "weights-wrong-shape",
        lambda t: {"m": _model(t, weights_edit=_set("fc1.bias", np.ones(3)))},
        [S, "{m}"],
        "'fc1.bias' has shape",
    ),
    (
        "weights-forged-header",
        lambda t: _model_with_file(
            t, "weights.npz", {"fc1.weight.npy": _forged_npy((60000, 60000))}
        ),
        [S, "{m}"],
        "claims",
    ),
    (
        "weights-truncated",
        lambda t: _model_with_file(
            t, "weights.npz", (MODELS / "digits_mlp/weights.npz").read_bytes()[:200]
        ),
        [S, "{m}"],
        "not a readable .npz",
    ),
    (
        "weights-pickled-object",
        lambda t: _model_with_file(
            t, "weights.npz", {"fc1.weight.npy": _npy_bytes_with_header((2,), "|O") + b"\x80\x04N."}
        ),
        [S, "{m}"],
        "Python objects",
    ),
    (
        "weights-not-zip",
        lambda t: _model_with_file(t, "weights.npz", "hello"),
        [S, "{m}"],
        "not a readable .npz",
    ),
    # --data files
    ("data-missing", None, [S, "digits_mlp", "--data", "{tmp}/none.npz"], "does not exist"),
    (
        "data-no-x",
        lambda t: {"d": _data(t, y=np.zeros(3))},
        [S, "digits_mlp", "--data", "{d}"],
        "missing array 'x'",
    ),
    (
        "data-empty-x",
        lambda t: {"d": _data(t, x=np.zeros((0, 64)))},
        [S, "digits_mlp", "--data", "{d}"],
        "no samples",
    ),
    (
        "data-scalar-x",
        lambda t: {"d": _data(t, x=np.float64(3))},
        [S, "digits_mlp", "--data", "{d}"],
        "no samples",
    ),
    (
        "data-string-x",
        lambda t: {"d": _data(t, x=np.full((3, 64), "a"))},
        [S, "digits_mlp", "--data", "{d}"],
        "expected real numbers",
    ),
    (
        "data-complex-x",
        lambda t: {"d": _data(t, x=_digits_x() + 1j)},
        [S, "digits_mlp", "--data", "{d}"],
        "complex128",
    ),
    (
        "data-nan-x",
        lambda t: {"d": _data(t, x=_digits_x() * np.nan)},
        [S, "digits_mlp", "--data", "{d}"],
        "NaN or infinite",
    ),
    (
        "data-wrong-shape",
        lambda t: {"d": _data(t, x=np.zeros((3, 65)))},
        [S, "digits_mlp", "--data", "{d}"],
        "expects (N, 64)",
    ),
    (
        "data-wrong-calib-shape",
        lambda t: {"d": _data(t, x=_digits_x(), x_calib=np.zeros((3, 5)))},
        [S, "digits_mlp", "--data", "{d}"],
        "x_calib",
    ),
    (
        "data-truncated",
        lambda t: {
            "d": _text(t, "d.npz", Path(_data(t, "full.npz", x=_digits_x())).read_bytes()[:150])
        },
        [S, "digits_mlp", "--data", "{d}"],
        "not a readable .npz",
    ),
    (
        "data-forged-header",
        lambda t: {"d": _zip(t / "d.npz", {"x.npy": _forged_npy((200000, 200000))})},
        [S, "digits_mlp", "--data", "{d}"],
        "claims",
    ),
    (
        "data-labels-out-of-range",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array([0, 1, 2, 12]))},
        [S, "digits_mlp", "--data", "{d}"],
        "labels in [0, 12]",
    ),
    (
        "data-labels-negative",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array([0, -1, 2, 3]))},
        [S, "digits_mlp", "--data", "{d}"],
        "labels in [-1, 3]",
    ),
    (
        "data-labels-float",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array([0.5, 1, 2, 3]))},
        [S, "digits_mlp", "--data", "{d}"],
        "integer class indices",
    ),
    (
        "data-labels-string",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array(["a", "b", "c", "d"]))},
        [S, "digits_mlp", "--data", "{d}"],
        "integer class indices",
    ),
    (
        "data-labels-length",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array([0, 1]))},
        [S, "digits_mlp", "--data", "{d}"],
        "vector of 4 labels",
    ),
    (
        "data-labels-2d",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.zeros((4, 1), dtype=int))},
        [S, "digits_mlp", "--data", "{d}"],
        "vector of 4 labels",
    ),
    (
        "data-labels-out-of-range-run",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array([0, 1, 2, 10]))},
        ["run", "digits_mlp", "--profile", "loihi2", "--data", "{d}"],
        "labels in [0, 10]",
    ),
    (
        "data-labels-out-of-range-deploy",
        lambda t: {"d": _data(t, x=_digits_x(), y=np.array([0, 1, 2, 99]))},
        ["deploy", "digits_mlp", "--profile", "loihi2", "--data", "{d}", "--out", "{tmp}/o"],
        "labels in [0, 99]",
    ),
    # command-line arguments
    ("arg-no-command", None, [], "required"),
    ("arg-unknown-command", None, ["frobnicate"], "invalid choice"),
    ("arg-samples-zero", None, [S, "digits_mlp", "--samples", "0"], "--samples"),
    ("arg-samples-negative", None, [S, "digits_mlp", "--samples", "-3"], "--samples"),
    ("arg-samples-text", None, [S, "digits_mlp", "--samples", "many"], "--samples"),
    ("arg-calibration-zero", None, [S, "digits_mlp", "--calibration-size", "0"], "--calibration"),
    ("arg-zeta-negative", None, [S, "digits_mlp", "--zeta", "-1"], "--zeta"),
    ("arg-zeta-nan", None, [S, "digits_mlp", "--zeta", "nan"], "--zeta"),
    ("arg-zeta-inf", None, [S, "digits_mlp", "--zeta", "inf"], "--zeta"),
    ("arg-neuron", None, [S, "digits_mlp", "--neuron", "lif"], "--neuron"),
    ("arg-input-range-reversed", None, [S, "digits_mlp", "--input-range", "5,1"], "P < Q"),
    ("arg-input-range-text", None, [S, "digits_mlp", "--input-range", "a,b"], "P,Q"),
    ("arg-input-range-one", None, [S, "digits_mlp", "--input-range", "5"], "P,Q"),
    ("arg-profile-missing", None, ["run", "digits_mlp", "--profile", "nosuch"], "nosuch"),
    (
        "arg-profile-file-missing",
        None,
        ["run", "digits_mlp", "--profile", "{tmp}/p.yaml"],
        "p.yaml",
    ),
    ("arg-backend", None, ["run", "digits_mlp", "--profile", "pcm", "--backend", "gpu"], "gpu"),
    (
        "arg-backend-kind",
        None,
        ["run", "digits_mlp", "--profile", "pcm", "--backend", "emulator"],
        "crossbar hardware",
    ),
    (
        "arg-tag-without-lava",
        None,
        ["run", "digits_mlp", "--profile", "loihi2", "--tag", "floating_pt"],
        "--tag",
    ),
    ("arg-seed-negative", None, ["run", "digits_mlp", "--profile", "pcm", "--seed", "-1"], "seed"),
    (
        "arg-set-unknown-key",
        None,
        ["run", "digits_mlp", "--profile", "pcm", "--set", "x.y=1"],
        "x.y",
    ),
    (
        "arg-set-bad-value",
        None,
        ["run", "digits_mlp", "--profile", "pcm", "--set", "crossbar.levels=1"],
        "crossbar.levels",
    ),
    (
        "arg-set-huge-tile",
        None,
        ["run", "digits_mlp", "--profile", "pcm", "--set", "crossbar.tile_rows=1e11"],
        "crossbar.tile_rows",
    ),
    (
        "arg-set-huge-steps",
        None,
        ["run", "digits_mlp", "--profile", "loihi2", "--set", "timing.steps_per_window=1000000000"],
        "timing.steps_per_window",
    ),
    (
        "arg-set-no-equals",
        None,
        ["run", "digits_mlp", "--profile", "pcm", "--set", "crossbar.levels"],
        "KEY=VALUE",
    ),
    (
        "export-not-onnx-suffix",
        None,
        ["export", "digits_mlp", "--onnx", "{tmp}/m.txt"],
        "must end in .onnx",
    ),
    (
        "sweep-param-unknown",
        None,
        ["sweep", "digits_mlp", "--profile", "pcm", "--param", "nope.key=1,2", "--out", "{tmp}/s"],
        "nope.key",
    ),
    (
        "sweep-param-bad-range",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.read_noise_scale=0:1:x",
            "--out",
            "{tmp}/s",
        ],
        "LO:HI:N",
    ),  # fmt: skip
    (
        "sweep-param-out-of-range",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.levels=1,2",
            "--out",
            "{tmp}/s",
        ],
        "crossbar.levels",
    ),  # fmt: skip
    (
        "sweep-seeds-zero",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.levels=2,4",
            "--seeds",
            "0",
            "--out",
            "{tmp}/s",
        ],
        "--seeds",
    ),  # fmt: skip
    (
        "sweep-executor",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.levels=2,4",
            "--executor",
            "slurm",
            "--out",
            "{tmp}/s",
        ],
        "--executor",
    ),  # fmt: skip
    (
        "sweep-scheduler-without-dask",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.levels=2,4",
            "--scheduler",
            "tcp://127.0.0.1:1",
            "--out",
            "{tmp}/s",
        ],
        "--scheduler",
    ),  # fmt: skip
    (
        "sweep-scheduler-not-answering",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.levels=2,4",
            "--executor",
            "dask",
            "--scheduler",
            "tcp://127.0.0.1:9",
            "--out",
            "{tmp}/s",
        ],
        "no dask scheduler answered",
    ),  # fmt: skip
    (
        "sweep-scheduler-garbage-address",
        None,
        [
            "sweep",
            "digits_mlp",
            "--profile",
            "pcm",
            "--param",
            "crossbar.levels=2,4",
            "--executor",
            "dask",
            "--scheduler",
            "::not an address::",
            "--out",
            "{tmp}/s",
        ],
        "--scheduler",
    ),  # fmt: skip
    ("report-not-a-sweep", lambda t: {"d": str(t)}, ["report", "{d}"], "not a sweep directory"),
    (
        "report-garbage-results",
        lambda t: {"d": _sweep_dir(t, '{"point": "zero", "seed": [1], "accuracy": "high"}\n')},
        ["report", "{d}"],
        "results.jsonl",
    ),
    (
        "report-garbage-values",
        lambda t: {
            "d": _sweep_dir(
                t,
                '{"point": 0, "seed": 0, "params": {}, "accuracy": "high", "agreement": 1, '
                '"logit_error": 0, "spikes_per_neuron": 0, "latency_s": 0, "energy_j": 0}\n',
            )
        },
        ["report", "{d}"],
        "results.jsonl",
    ),
    (
        "finetune-without-out",
        None,
        ["finetune", "digits_mlp", "--profile", "loihi2", "--epochs", "1"],
        "--out",
    ),
    (
        "finetune-out-is-model",
        lambda t: {"m": _model(t)},
        ["finetune", "{m}", "--profile", "loihi2", "--epochs", "1", "--out", "{m}"],
        "must not be the model",
    ),
    (
        "fileclass-missing-snapshot",
        None,
        ["fileclass", "baselines", "--snapshot", "{tmp}/none.jsonl.gz"],
        "none.jsonl.gz",
    ),
    # --out that cannot be a directory of ours
    (
        "out-is-a-file",
        lambda t: {"f": _text(t, "taken.txt", "a user's file")},
        ["deploy", "digits_mlp", "--profile", "loihi2", "--samples", "5", "--out", "{f}"],
        "taken.txt",
    ),
    (
        "out-under-a-file",
        lambda t: {"f": _text(t, "taken.txt", "a user's file")},
        [S, "digits_mlp", "--samples", "5", "--out", "{f}/sub"],
        "taken.txt",
    ),
    (
        "out-unwritable-even-for-root",
        None,
        [
            "run",
            "digits_mlp",
            "--profile",
            "loihi2",
            "--samples",
            "5",
            "--out",
            "/proc/neurodeploy",
        ],
        "/proc/neurodeploy",
    ),
    (
        "out-report-name-is-a-directory",
        lambda t: {"o": str((t / "o" / "crosscheck.html").mkdir(parents=True) or t / "o")},
        ["deploy", "digits_mlp", "--profile", "loihi2", "--samples", "5", "--out", "{o}"],
        "crosscheck.html",
    ),
    (
        "export-under-a-file",
        lambda t: {"f": _text(t, "taken.txt", "a user's file")},
        ["export", "digits_mlp", "--onnx", "{f}/m.onnx"],
        "taken.txt",
    ),
    # ONNX files
    (
        "onnx-not-onnx",
        lambda t: {"f": _text(t, "m.onnx", "not a protobuf")},
        [S, "{f}", "--input-range", "0,16"],
        "m.onnx",
    ),
    (
        "onnx-truncated",
        lambda t: {"f": _text(t, "m.onnx", b"\x08\x07\x12\x04\x0a\x02")},
        [S, "{f}", "--input-range", "0,16"],
        "m.onnx",
    ),
    ("onnx-missing", None, [S, "{tmp}/none.onnx", "--input-range", "0,16"], "none.onnx"),
    # profiles: the bad-profile corpus through the CLI
    *((f"profile-{path.stem}", None, ["profile", str(path)], path.name) for path in BAD_PROFILES),
    (
        "profile-alias-bomb",
        lambda t: {"p": _text(t, "p.yaml", ALIAS_BOMB)},
        ["profile", "{p}"],
        "aliases are not accepted",
    ),
    (
        "profile-huge-steps",
        lambda t: {
            "p": _text(
                t,
                "p.yaml",
                "name: slow\nextends: loihi2\ntiming:\n  steps_per_window: 1000000000\n",
            )
        },
        ["profile", "{p}"],
        "timing.steps_per_window",
    ),
    (
        "profile-huge-tile",
        lambda t: {
            "p": _text(t, "p.yaml", "name: big\nextends: pcm\ncrossbar:\n  tile_rows: 1.0e11\n")
        },
        ["profile", "{p}"],
        "crossbar.tile_rows",
    ),
    (
        "profile-huge-levels",
        lambda t: {
            "p": _text(t, "p.yaml", "name: lv\nextends: rram\ncrossbar:\n  levels: 100000000\n")
        },
        ["profile", "{p}"],
        "crossbar.levels",
    ),
    ("profile-directory", lambda t: {"p": str(t)}, ["profile", "{p}"], ""),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root with a digest of its content."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 120


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    _, setup, argv, fragment = case
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    names = {"tmp": str(work)}
    if setup is not None:
        names.update(setup(work))
    argv = [arg.format(**names) for arg in argv]
    capsys.readouterr()  # what building the case printed
    before = _snapshot(work)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("neurodeploy: error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], (fragment, lines[0])
    assert _snapshot(work) == before, "a refused command wrote or changed files"
