"""Same seed, same bits in training: ``fileclass train`` and ``finetune`` write the same
files whatever the BLAS thread count (and, for the file classifier, the CPU's BLAS
kernels), and the file classifier's products are order-fixed."""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurodeploy.fileclass.snn import spike_matmul, spike_pairs
from neurodeploy.modelio import SHIPPED_MODELS_DIR

PACKAGE_ROOT = SHIPPED_MODELS_DIR.parent.parent


# numpy's own SIMD loops for AVX512 (its float64 exp and log among them); disabling them
# makes numpy compute as on a CPU without AVX512.
AVX512 = ("AVX512F", "AVX512CD", "AVX512_SKX", "AVX512_CLX", "AVX512_CNL", "AVX512_ICL")


def _have_avx512() -> bool:
    return bool(np.core._multiarray_umath.__cpu_features__.get("AVX512F"))


def _cli_in_subprocess(
    argv: list[str],
    blas_threads: int,
    coretype: str | None,
    no_avx512: bool = False,
    exit_codes: tuple[int, ...] = (0,),
) -> None:
    """Run ``neurodeploy ARGV`` in a fresh interpreter with its own BLAS settings (OpenBLAS
    reads them when numpy is first imported) and, with ``no_avx512``, numpy's AVX512 loops
    disabled."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(blas_threads)}
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("NPY_DISABLE_CPU_FEATURES", None)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    if no_avx512:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(AVX512)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "neurodeploy", *argv], env=env, capture_output=True, timeout=300
    )
    assert done.returncode in exit_codes, done.stderr.decode()[-2000:]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _assert_same_files(runs: dict[str, Path]) -> None:
    (first_name, first), *others = runs.items()
    expected = _files(first)
    assert expected, f"{first} is empty"
    for name, directory in others:
        got = _files(directory)
        assert got.keys() == expected.keys(), f"{name}: other files than {first_name}"
        for file, data in expected.items():
            assert got[file] == data, f"{name}: {file} differs from {first_name}'s"


def test_fileclass_training_is_the_same_bits_for_any_blas_threads_kernels_and_cpu(tmp_path):
    """(BLAS threads, OpenBLAS core type, numpy without AVX512): Prescott is OpenBLAS's
    generic x86-64 kernel set, whose last bits differ from the Haswell kernels' (the code
    with BLAS products gave other weights on these 500 files); numpy's AVX512 exp differs
    from libm's."""
    settings = [(2, None, False), (1, None, False), (2, "Prescott", False)]
    settings.append((1, "Prescott", _have_avx512()))
    argv = ["fileclass", "train", "--quick", "--train-samples", "500", "--samples", "100"]
    runs = {}
    for threads, coretype, no_avx512 in settings:
        out = tmp_path / f"fc-{threads}-{coretype}-{no_avx512}"
        _cli_in_subprocess([*argv, "--quiet", "--out", str(out)], threads, coretype, no_avx512)
        name = f"{threads} threads, {coretype or 'default'} kernels"
        runs[name + (", numpy without AVX512" if no_avx512 else "")] = out
    _assert_same_files(runs)  # weights.npz and fileclass.json, byte for byte


def test_finetune_is_the_same_bits_for_any_blas_thread_count(tmp_path):
    """One BLAS thread inside the command: the same files for OPENBLAS_NUM_THREADS 1 and 2
    (with each kernel set; different kernels may differ, see neurodeploy.finetune)."""
    # digits_cnn on pcm in batches of 256: without the limit, the Prescott kernels' weights
    # differ between 1 and 2 threads (measured).
    argv = [
        *("finetune", "digits_cnn", "--profile", "pcm", "--batch-size", "256"),
        *("--epochs", "1", "--eval-seeds", "1", "--samples", "100", "--quiet"),
    ]
    for coretype in (None, "Prescott"):
        runs = {}
        for threads in (2, 1):
            out = tmp_path / f"ft-{threads}-{coretype}"
            _cli_in_subprocess([*argv, "--out", str(out)], threads, coretype)
            runs[f"{threads} threads, {coretype or 'default'} kernels"] = out
        _assert_same_files(runs)  # weights.npz, network.yaml, finetune.json


def test_finetune_computes_with_one_blas_thread_and_restores_the_limit(monkeypatch):
    from threadpoolctl import threadpool_info

    import neurodeploy as nd

    # (nd.finetune is the function; the module is neurodeploy.finetune)
    finetune_module = importlib.import_module("neurodeploy.finetune")

    def threads():
        return {i["internal_api"]: i["num_threads"] for i in threadpool_info()}

    net = nd.load_model("digits_mlp")
    x, y = nd.datasets.digits("train")
    x = x.reshape(len(x), -1)
    snn = nd.convert(net, calibration=x)
    seen = []
    original = finetune_module.loss_and_gradients

    def spy(*args, **kwargs):
        seen.append(threads())
        return original(*args, **kwargs)

    before = threads()
    monkeypatch.setattr(finetune_module, "loss_and_gradients", spy)
    finetune_module.finetune(snn, "loihi2", x[:128], y[:128], epochs=1, batch_size=64)
    assert len(seen) == 2 and all(set(t.values()) == {1} for t in seen)
    after = threads()
    assert {api: after[api] for api in before} == before


def _sequential_sums(spikes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """spikes @ weights with every sum added one term after another in increasing k."""
    out = np.zeros((len(spikes), weights.shape[1]))
    for r, row in enumerate(spikes):
        for m in range(weights.shape[1]):
            terms = [weights[k, m] for k in np.flatnonzero(row)]
            out[r, m] = functools.reduce(lambda a, b: a + b, terms, 0.0)
    return out


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
def test_spike_products_add_in_a_fixed_order_whatever_the_batching(density):
    rng = np.random.default_rng(3)
    spikes = (rng.random((40, 30)) < density).astype(np.float64)
    weights = rng.normal(size=(30, 7)) * 10.0 ** rng.integers(-8, 8, size=(30, 7))
    product = spike_matmul(spikes, weights)
    np.testing.assert_array_equal(product, _sequential_sums(spikes, weights))
    # any batching of the rows gives the same bits
    np.testing.assert_array_equal(
        np.concatenate([spike_matmul(spikes[lo : lo + 7], weights) for lo in range(0, 40, 7)]),
        product,
    )
    values = rng.normal(size=(40, 5)) * 10.0 ** rng.integers(-8, 8, size=(40, 5))
    np.testing.assert_array_equal(spike_pairs(spikes, values), _sequential_sums(spikes.T, values))
    np.testing.assert_allclose(product, spikes @ weights, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "digits_cnn", "--profile", "pcm", "--samples", "200"],
        ["deploy", "digits_cnn", "--profile", "loihi2", "--set", "weights.bits=3"],
        ["run", "digits_mlp", "--profile", "rram", "--samples", "200", "--json"],
    ],
    ids=["deploy-pcm", "deploy-loihi2-3bit", "run-rram"],
)
def test_reports_are_the_same_bits_for_any_blas_thread_count(argv, tmp_path):
    """Every CLI command computes with one BLAS thread: its report files (cross-check
    JSON and HTML, run.json) do not depend on OPENBLAS_NUM_THREADS. With the Haswell
    kernels (what this machine's environment selects) 1 and 2 threads give other last
    bits in these reports' float summaries when BLAS runs multi-threaded. Compared per
    kernel set: different kernels may sum in other orders (threads.py), so the default
    kernels (on a CPU that selects other than Haswell's) need not agree with Haswell's."""
    for coretype in (None, "Haswell"):
        runs = {}
        for threads in (2, 1):
            out = tmp_path / f"{coretype}-threads{threads}"
            # deploy exits 1 when the report is not ok (the 3-bit case), still writing it
            argv_out = [*argv, "-q", "-o", str(out)]
            _cli_in_subprocess(argv_out, threads, coretype, exit_codes=(0, 1))
            runs[f"{coretype} kernels, {threads} threads"] = out
        _assert_same_files(runs)
