"""The file-metadata snapshot (tools/snapshot_files.py) and its fixed split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from ..errors import DataError

# Package data: the shipped snapshot (see neurodeploy/data/README.md).
DEFAULT_SNAPSHOT = Path(__file__).resolve().parents[1] / "data" / "files_snapshot.jsonl.gz"
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def load_snapshot(path: str | Path | None = None) -> tuple[list[dict], np.ndarray, tuple[str, ...]]:
    """(records without labels, integer labels, class names sorted) of a snapshot file."""
    path = Path(path) if path is not None else DEFAULT_SNAPSHOT
    if not path.is_file():
        raise DataError(f"{path}: snapshot file does not exist")
    records, names = [], []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}: line {number} is not JSON") from None
                if "label" not in record:
                    raise DataError(f"{path}: line {number} has no 'label'")
                names.append(str(record.pop("label")))
                records.append(record)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if not records:
        raise DataError(f"{path}: no records")
    classes = tuple(sorted(set(names)))
    index = {name: i for i, name in enumerate(classes)}
    return records, np.array([index[n] for n in names]), classes


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): stratified, 30 % test, seed 0 (as data/README.md reports)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(train), np.sort(test)


def one_hot(records: list[dict]) -> list[dict]:
    """The features the baselines see: every key=value (and key=element of a list) as a
    binary feature, numbers as categories too."""
    rows = []
    for record in records:
        row = {}
        for key, value in record.items():
            if isinstance(value, list):
                for item in value:
                    row[f"{key}={item}"] = 1.0
            else:
                row[f"{key}={value}"] = 1.0
        rows.append(row)
    return rows
