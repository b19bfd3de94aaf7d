"""Data sets shipped with installed packages (no downloads).

``digits`` is scikit-learn's 8x8 handwritten digits (1797 samples, pixel
values 0..16), split once, stratified, 30 % test, ``random_state=0``: the
split every shipped model was trained and evaluated on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import UsageError

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
