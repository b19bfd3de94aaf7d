"""Load and save models: ``<model dir>/network.yaml`` + ``weights.npz``.

Shipped models live in the package (``neurodeploy/models/<name>/``, installed as
package data); :func:`resolve_model_path` turns a shipped name into its directory.

network.yaml::

    name: digits_cnn
    input: {shape: [1, 8, 8], range: [0.0, 16.0]}   # channels-first; raw input range [p, q]
    classes: ["0", "1", ...]                         # optional
    dataset: digits                                  # optional: data set the CLI evaluates on
    layers:
      - {name: conv1, type: conv2d, out_channels: 8, kernel: 3, stride: 1, padding: 1}
      - ...

weights.npz holds ``<layer>.<param>`` arrays: dense/conv2d ``weight`` and
``bias``, batchnorm ``gamma``, ``beta``, ``mean``, ``var``. It is written
uncompressed (zip "stored" members: VGG-16's 138 M parameters save and load in
seconds, where deflate took a minute), each array as float32 when float32 holds
every value exactly (weights trained in float32 stay float32 on disk, half the
bytes), else float64; the IR computes in float64 either way. Compressed archives
written by earlier versions load as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from .errors import ModelError
from .fileio import write_directory
from .network import LAYER_TYPES, Dense, Flatten, Layer, Network, ReLU
from .npzio import read_npz
from .yamlio import read_yaml

NETWORK_FILE = "network.yaml"
WEIGHTS_FILE = "weights.npz"
# Package data: models shipped with neurodeploy, loadable by name ("digits_cnn").
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "models"

# Allowed hyper-parameter keys per layer type, with defaults (None: required).
_LAYER_KEYS: dict[str, dict[str, object]] = {
    "dense": {"out_features": None},
    "conv2d": {"out_channels": None, "kernel": None, "stride": 1, "padding": 0, "groups": 1},
    "batchnorm": {"eps": 1e-5},
    "relu": {"window": "optional", "clip": "optional"},
    "maxpool2d": {"kernel": None, "stride": None, "padding": 0},
    "avgpool2d": {"kernel": None, "stride": None, "padding": 0, "count_include_pad": True},
    "flatten": {},
    "add": {},
}
_INT_KEYS = {"out_features", "out_channels", "kernel", "stride", "padding", "groups"}
_TOP_KEYS = {"name", "input", "classes", "dataset", "layers"}


def shipped_model_names() -> list[str]:
    """Names of the models shipped in the package, sorted."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if p.is_dir())


def resolve_model_path(model: str | os.PathLike) -> Path:
    """``model`` as a path if it exists, else the directory of the shipped model of
    that name (a bare name such as ``digits_cnn``, no folder part).

    Raises :class:`ModelError` naming ``model`` and listing the shipped names.
    """
    path = Path(model)
    if path.exists():
        return path
    if len(path.parts) == 1 and path.name not in (".", ".."):
        shipped = SHIPPED_MODELS_DIR / path.name
        if shipped.is_dir():
            return shipped
    names = ", ".join(shipped_model_names()) or "none"
    raise ModelError(
        f"{model}: model path does not exist and is not a shipped model (shipped: {names})"
    )


def _model_files(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_file() and p.name == NETWORK_FILE:
        p = p.parent
    if not p.exists():
        raise ModelError(f"{p}: model path does not exist")
    if not p.is_dir():
        raise ModelError(
            f"{p}: expected a model directory holding {NETWORK_FILE} and {WEIGHTS_FILE}"
        )
    if not (p / NETWORK_FILE).exists() and (p / "fileclass.json").is_file():
        raise ModelError(
            f"{p}: a file-classification model (fileclass.json), not a network; "
            "load it with neurodeploy.fileclass.model.FileClassModel.load"
        )
    return p / NETWORK_FILE, p / WEIGHTS_FILE


def _read_yaml(file: Path) -> dict:
    if not file.is_file():
        raise ModelError(f"{file}: missing")
    doc = read_yaml(file, ModelError)
    if not isinstance(doc, dict):
        raise ModelError(f"{file}: expected a mapping at top level")
    return doc


def _read_weights(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise ModelError(f"{file}: missing")
    # Stored members are mapped: the layers' float64 copies read them straight from the
    # page cache (no intermediate copy); the layers keep no reference to the maps.
    return read_npz(file, ModelError, mmap=True)


def _int_key(file: Path, where: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{file}: {where}.{key} must be an integer, got {value!r}")
    return value


def _build_layer(file: Path, index: int, spec, weights: dict[str, np.ndarray]) -> Layer:
    if not isinstance(spec, dict):
        raise ModelError(f"{file}: layers[{index}] must be a mapping")
    name = spec.get("name")
    if not isinstance(name, str) or not name or "." in name:
        raise ModelError(f"{file}: layers[{index}].name must be a non-empty string without '.'")
    where = f"layers[{index}] ({name})"
    ltype = spec.get("type")
    if ltype not in _LAYER_KEYS:
        raise ModelError(
            f"{file}: {where}: unknown layer type {ltype!r}; supported: {', '.join(_LAYER_KEYS)}"
        )
    allowed = _LAYER_KEYS[ltype]
    unknown = set(spec) - {"name", "type", "inputs"} - set(allowed)
    if unknown:
        raise ModelError(f"{file}: {where}: unknown key(s) {sorted(unknown)} for type {ltype}")
    hp = {}
    if "inputs" in spec or ltype == "add":
        inputs = spec.get("inputs")
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, str) and i for i in inputs)
        ):
            raise ModelError(f"{file}: {where}.inputs must be a non-empty list of layer names")
        hp["inputs"] = tuple(inputs)
    for key, default in allowed.items():
        if key in spec:
            value = spec[key]
            if key in _INT_KEYS and value is not None:
                value = _int_key(file, where, key, value)
            elif key in ("eps", "window", "clip") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ModelError(f"{file}: {where}.{key} must be a number")
            elif key == "count_include_pad" and not isinstance(value, bool):
                raise ModelError(f"{file}: {where}.{key} must be true or false")
            hp[key] = value
        elif default == "optional":
            hp[key] = None
        elif default is None and key != "stride":
            raise ModelError(f"{file}: {where}: missing key '{key}'")
        else:
            hp[key] = default
    cls = LAYER_TYPES[ltype]
    arrays = {}
    for param in cls.param_names:
        key = f"{name}.{param}"
        if key not in weights:
            raise ModelError(f"{file.parent / WEIGHTS_FILE}: missing array '{key}'")
        value = weights[key]
        if isinstance(value, np.memmap) and value.dtype.kind == "f":  # one pass from the file
            value = np.array(value, dtype=np.float64)
        arrays[param] = value
    if ltype == "dense":
        out = hp.pop("out_features")
        if np.ndim(arrays["weight"]) != 2 or np.shape(arrays["weight"])[0] != out:
            raise ModelError(
                f"{file.parent / WEIGHTS_FILE}: '{name}.weight' has shape "
                f"{np.shape(arrays['weight'])}, expected ({out}, in_features)"
            )
    elif ltype == "conv2d":
        out, k = hp.pop("out_channels"), hp.pop("kernel")
        shape = np.shape(arrays["weight"])
        if len(shape) != 4 or shape[0] != out or shape[2:] != (k, k):
            raise ModelError(
                f"{file.parent / WEIGHTS_FILE}: '{name}.weight' has shape {shape}, "
                f"expected ({out}, in_channels / groups, {k}, {k})"
            )
    try:
        return cls(name=name, **hp, **arrays)
    except ModelError as exc:
        raise ModelError(f"{file}: {where}: {exc}") from None


def load_model(path: str | os.PathLike, input_range=None) -> Network:
    """Read a model directory (or its network.yaml), an ``.onnx`` file, or a shipped
    model by name (``"digits_cnn"``; see :func:`resolve_model_path`) into a
    :class:`Network`.

    input_range: (p, q) of the raw input; required for ONNX files without the
    ``neurodeploy.input_range`` metadata, and overrides the model's own range.
    Raises :class:`ModelError` naming the file, key, node or layer at fault.
    """
    path = resolve_model_path(path)
    if path.suffix.lower() == ".onnx":
        from .onnxio import load_onnx

        return load_onnx(path, input_range=input_range)
    net = _load_directory(path)
    if input_range is not None:
        net = Network(
            net.name, net.input_shape, tuple(input_range), net.layers, net.classes, net.dataset
        )
    return net


def _load_directory(path: str | os.PathLike) -> Network:
    net_file, weights_file = _model_files(path)
    doc = _read_yaml(net_file)
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ModelError(f"{net_file}: unknown top-level key(s) {sorted(unknown)}")
    inp = doc.get("input")
    if not isinstance(inp, dict) or set(inp) != {"shape", "range"}:
        raise ModelError(f"{net_file}: 'input' must be a mapping with exactly 'shape' and 'range'")
    shape, rng = inp["shape"], inp["range"]
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ModelError(f"{net_file}: input.shape must be a list of positive integers")
    if (
        not isinstance(rng, list)
        or len(rng) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)
    ):
        raise ModelError(f"{net_file}: input.range must be [p, q], two numbers")
    layers_spec = doc.get("layers")
    if not isinstance(layers_spec, list) or not layers_spec:
        raise ModelError(f"{net_file}: 'layers' must be a non-empty list")
    classes = doc.get("classes")
    if classes is not None and not isinstance(classes, list):
        raise ModelError(f"{net_file}: 'classes' must be a list")
    weights = _read_weights(weights_file)
    layers = [_build_layer(net_file, i, spec, weights) for i, spec in enumerate(layers_spec)]
    used = {f"{layer.name}.{p}" for layer in layers for p in layer.param_names}
    extra = sorted(set(weights) - used)
    if extra:
        raise ModelError(f"{weights_file}: arrays for no layer of the network: {extra}")
    name = doc.get("name", net_file.parent.name)
    try:
        return Network(
            name=str(name),
            input_shape=tuple(shape),
            input_range=tuple(rng),
            layers=tuple(layers),
            classes=None if classes is None else tuple(classes),
            dataset=doc.get("dataset"),
        )
    except ModelError as exc:
        raise ModelError(f"{net_file}: {exc}") from None


def storage_array(values: np.ndarray) -> np.ndarray:
    """``values`` in the narrowest float dtype that holds them exactly: float32 when
    every value survives float64 -> float32 -> float64 unchanged (weights trained in
    float32), else the array itself (float64). Loading casts back to float64 exactly."""
    if values.dtype != np.float64 or not values.size:
        return values
    narrow = values.astype(np.float32)
    if np.array_equal(narrow, values):  # compares in float64: exact round trip
        return narrow
    return values


def network_document(net: Network) -> dict:
    """The network.yaml content of ``net``."""
    doc = {
        "name": net.name,
        "input": {"shape": list(net.input_shape), "range": list(net.input_range)},
    }
    if net.classes is not None:
        doc["classes"] = list(net.classes)
    if net.dataset is not None:
        doc["dataset"] = net.dataset
    doc["layers"] = [layer.config() for layer in net.layers]
    return doc


def save_model(
    net: Network,
    path: str | os.PathLike,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``net`` as a model directory at ``path``; returns the path.

    The files are written to a temporary directory beside ``path`` and moved into
    place only when complete (see :func:`neurodeploy.fileio.write_directory`): a new
    directory whole, into an existing one file by file. ``path`` may be absent, an
    empty directory, or a model directory neurodeploy wrote; anything else (a file, a
    directory holding other files) is refused with a :class:`UsageError`, unless
    ``force``, which writes the model beside the other files. Nothing is ever removed.
    extra_files: more files to write with the model, name -> text (e.g. finetune.json).
    """
    arrays = {
        f"{layer.name}.{p}": storage_array(arr)
        for layer in net.layers
        for p, arr in layer.params().items()
    }
    text = yaml.safe_dump(network_document(net), sort_keys=False, default_flow_style=None)
    writers = {
        WEIGHTS_FILE: lambda file: np.savez(file, **arrays),  # uncompressed: see the module doc
        NETWORK_FILE: lambda file: file.write_text(text),
    }
    for name, content in (extra_files or {}).items():
        writers[name] = lambda file, content=content: file.write_text(content)
    return write_directory(path, writers, force=force)


def from_sklearn(clf, input_range, input_shape=None, name: str = "sklearn_mlp") -> Network:
    """Build a :class:`Network` from a fitted ``sklearn.neural_network.MLPClassifier``.

    clf must use ``activation="relu"``. input_range: (p, q) of the raw input
    (scikit-learn does not record it). input_shape: one sample's shape; the
    default is (n_features,). A binary classifier's single logistic output z
    becomes two logits (0, z), so argmax gives the classifier's decision.
    """
    if not hasattr(clf, "coefs_"):
        raise ModelError("from_sklearn: the classifier is not fitted (no coefs_)")
    if getattr(clf, "activation", None) != "relu":
        raise ModelError(
            f"from_sklearn: only activation='relu' converts exactly, got {clf.activation!r}"
        )
    if getattr(clf, "out_activation_", "softmax") not in ("softmax", "logistic"):
        raise ModelError(f"from_sklearn: unsupported output activation {clf.out_activation_!r}")
    coefs, intercepts = list(clf.coefs_), list(clf.intercepts_)
    classes = [str(c) for c in clf.classes_]
    if coefs[-1].shape[1] == 1 and len(classes) == 2:
        coefs[-1] = np.concatenate([np.zeros_like(coefs[-1]), coefs[-1]], axis=1)
        intercepts[-1] = np.concatenate([[0.0], intercepts[-1]])
    layers: list[Layer] = []
    for i, (w, b) in enumerate(zip(coefs, intercepts, strict=True)):
        last = i == len(coefs) - 1
        lname = "out" if last else f"fc{i + 1}"
        layers.append(Dense(name=lname, weight=np.asarray(w).T, bias=b))
        if not last:
            layers.append(ReLU(name=f"relu{i + 1}"))
    n_in = coefs[0].shape[0]
    shape = (n_in,) if input_shape is None else tuple(input_shape)
    if input_shape is not None:
        layers.insert(0, Flatten(name="flat"))
    return Network(
        name=name,
        input_shape=shape,
        input_range=tuple(input_range),
        layers=tuple(layers),
        classes=tuple(classes),
    )
