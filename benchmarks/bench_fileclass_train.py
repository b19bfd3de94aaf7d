"""File-classifier training: order-fixed spike products against BLAS with 1 and 2 threads.

Trains on the first N files of the training split (default 4000, the shipped
hyper-parameters: 3 STDP and 12 readout epochs) three ways in one process and
prints the wall time of each:

- order-fixed: the shipped code (neurodeploy.fileclass.snn.spike_matmul and
  spike_pairs: sparse row sums in a fixed order, the same bits everywhere);
- BLAS, all threads: the same products as dense BLAS matrix products (what the
  code did before; its bits depend on the BLAS kernels and thread count);
- BLAS, 1 thread: the same under ``threadpool_limits(1)`` (the bits still depend
  on the CPU's BLAS kernels).

    .venv/bin/python benchmarks/bench_fileclass_train.py [--files N] [--repeats R]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import neurodeploy.fileclass.model as model_module
import neurodeploy.fileclass.snn as snn_module
from neurodeploy.fileclass.data import load_snapshot, split


def _blas_matmul(spikes, weights):
    return spikes @ weights


def _blas_pairs(spikes, values):
    return spikes.T @ values


def _train(records, labels, classes) -> float:
    started = time.perf_counter()
    model_module.train(records, labels, classes, model_module.Hyper(), seed=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    records, labels, classes = load_snapshot()
    train_idx = split(labels)[0][: args.files]
    data = ([records[i] for i in train_idx], labels[train_idx], classes)
    threads = max(i["num_threads"] for i in threadpool_info())
    fixed = (snn_module.spike_matmul, snn_module.spike_pairs)
    ways = {
        "order-fixed": (fixed, nullcontext),
        f"BLAS, {threads} threads": ((_blas_matmul, _blas_pairs), nullcontext),
        "BLAS, 1 thread": ((_blas_matmul, _blas_pairs), lambda: threadpool_limits(1)),
    }
    times = {name: [] for name in ways}
    for _ in range(args.repeats):  # interleaved, so load changes hit every way alike
        for name, ((matmul, pairs), limit) in ways.items():
            for module in (snn_module, model_module):
                if hasattr(module, "spike_matmul"):
                    module.spike_matmul = matmul
                if hasattr(module, "spike_pairs"):
                    module.spike_pairs = pairs
            with limit():
                times[name].append(_train(*data))
    for module in (snn_module, model_module):
        module.spike_matmul, module.spike_pairs = fixed[0], fixed[1]
    print(f"training on {len(train_idx)} files, best of {args.repeats}:")
    for name, seconds in times.items():
        print(f"  {name:<18} {min(seconds):6.1f} s  (runs: {np.round(seconds, 1).tolist()})")


if __name__ == "__main__":
    main()
