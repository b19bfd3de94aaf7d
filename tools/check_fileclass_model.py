"""Retrain the shipped file classifier from its recorded seed and hyper-parameters and check
that the result is the shipped model bit for bit.

Trains on the shipped snapshot's training split (as ``neurodeploy fileclass train``
does) with the seed and ``hyper`` recorded in the model's fileclass.json, saves the
result into a temporary directory and compares both files byte for byte with the
shipped ones (and the three weight arrays with ``np.array_equal``, to say which one
differs). About 60-90 s on 2 cores, so not part of the test suite (the suite checks
the same property on a reduced training, tests/test_training_determinism.py).

Run from the repository root, under any BLAS settings::

    .venv/bin/python tools/check_fileclass_model.py [--model DIR]
    OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=Prescott \
        .venv/bin/python tools/check_fileclass_model.py

Exit status 0 if the retrained model is identical, 1 if not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neurodeploy.fileclass.data import load_snapshot, split
from neurodeploy.fileclass.model import FileClassModel, train
from neurodeploy.modelio import SHIPPED_MODELS_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_MODELS_DIR / "fileclass")
    args = parser.parse_args(argv)
    shipped = FileClassModel.load(args.model)
    records, labels, classes = load_snapshot()
    train_idx, _ = split(labels)
    started = time.perf_counter()
    model = train(
        [records[i] for i in train_idx],
        labels[train_idx],
        classes,
        shipped.hyper,
        seed=shipped.seed,
        keys=shipped.keys,
    )
    seconds = time.perf_counter() - started
    same = True
    for name in ("g_in", "hidden_vth", "w_out"):
        equal = np.array_equal(getattr(model, name), getattr(shipped, name))
        differing = int(np.sum(getattr(model, name) != getattr(shipped, name)))
        print(f"{name}: {'identical' if equal else f'{differing} elements differ'}")
        same &= equal
    with tempfile.TemporaryDirectory() as tmp:
        out = model.save(Path(tmp) / "retrained")
        for file in ("weights.npz", "fileclass.json"):
            equal = (out / file).read_bytes() == (args.model / file).read_bytes()
            print(f"{file}: {'identical bytes' if equal else 'differs'}")
            same &= equal
    verdict = "reproduces" if same else "does NOT reproduce"
    print(f"retraining ({seconds:.0f} s) {verdict} {args.model} bit for bit")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
