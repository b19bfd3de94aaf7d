"""Data sets shipped with installed packages (no downloads).

``digits`` is scikit-learn's 8x8 handwritten digits (1797 samples, pixel
values 0..16), split once, stratified, 30 % test, ``random_state=0``: the
split every shipped model was trained and evaluated on.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError
from .npzio import read_npz

DIGITS_RANGE = (0.0, 16.0)
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0
SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float64)[:, None, :, :]  # (1797, 1, 8, 8)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return {"train": (x_tr, y_tr), "test": (x_te, y_te), "all": (x, y)}


def digits(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y) of a digits split: x (N, 1, 8, 8) float64 in [0, 16], y (N,) int.

    split: "train" (1257 samples), "test" (540) or "all" (1797, original order).
    Reshape x to (N, 64) for a fully connected model.
    """
    if split not in SPLITS:
        raise UsageError(f"digits: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    x, y = _digits_split()[split]
    return x.copy(), y.copy()


DATASETS = {"digits": digits}


def load_model_data(
    net, data_file: str | None, calibration_size: int | None = None, samples: int | None = None
):
    """(x_calib, x_eval, y_eval, description) for a model.

    From ``--data FILE.npz`` (arrays x, optional y and x_calib; x_calib defaults
    to x) or from the data set the model names (``dataset:`` in network.yaml):
    calibration on its train split, evaluation on its test split. The first
    ``calibration_size`` calibration and ``samples`` evaluation samples are kept
    (all when None).
    """
    x_cal, x, y, description = _model_data(net, data_file)
    x_cal = x_cal[:calibration_size]
    x = x[:samples]
    return x_cal, x, None if y is None else y[:samples], description


def _model_data(net, data_file: str | None):
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise DataError(f"{path}: data file does not exist")
        arrays = read_npz(path, DataError)
        if "x" not in arrays:
            raise DataError(f"{path}: missing array 'x'")
        x = _shaped(net, arrays["x"], f"{path}: x")
        x_cal = _shaped(net, arrays.get("x_calib", arrays["x"]), f"{path}: x_calib")
        y = arrays.get("y")
        if y is not None:
            y = check_labels(y, len(x), net.num_classes, f"{path}: y")
        return x_cal, x, y, str(path)
    if net.dataset not in DATASETS:
        raise DataError(
            f"model '{net.name}' names no known data set (dataset: {net.dataset!r}); "
            "pass --data FILE.npz with arrays x, y and optionally x_calib"
        )
    load = DATASETS[net.dataset]
    x_tr, _ = load("train")
    x_te, y_te = load("test")
    return (
        _shaped(net, x_tr, "train split"),
        _shaped(net, x_te, "test split"),
        y_te,
        f"{net.dataset} test split",
    )


def check_labels(y, count: int, num_classes: int, what: str) -> np.ndarray:
    """y as int64 class indices (count,) in [0, num_classes); DataError naming ``what``."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"{what} must be a vector of {count} labels, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{what} must hold integer class indices, got {y.dtype} values")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{what} holds labels in [{y.min()}, {y.max()}]; the network has {num_classes} "
            f"classes (0 to {num_classes - 1})"
        )
    return y.astype(np.int64)


def _shaped(net, x: np.ndarray, what: str) -> np.ndarray:
    """x reshaped to (N, *net.input_shape) when only its layout differs (e.g. 8x8 vs 64)."""
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{what} holds no samples (shape {x.shape})")
    if x.ndim > 1 and x[0].size == int(np.prod(net.input_shape)):
        x = x.reshape(len(x), *net.input_shape)
    return net.check_input(x, what=what)


def load_training_data(net, data_file: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) to train on: the model's data set's train split, or arrays ``x_train`` and
    ``y_train`` of a ``--data`` file."""
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise DataError(f"{path}: data file does not exist")
        arrays = read_npz(path, DataError)
        if "x_train" not in arrays or "y_train" not in arrays:
            raise DataError(f"{path}: training needs arrays 'x_train' and 'y_train'")
        x = _shaped(net, arrays["x_train"], f"{path}: x_train")
        return x, check_labels(arrays["y_train"], len(x), net.num_classes, f"{path}: y_train")
    if net.dataset not in DATASETS:
        raise DataError(
            f"model '{net.name}' names no known data set; pass --data FILE.npz with x_train, "
            "y_train, x and y"
        )
    x, y = DATASETS[net.dataset]("train")
    return _shaped(net, x, "train split"), y
