"""Parameter sweeps over hardware profiles, resumable, on local processes or Dask.

A sweep is a grid of overrides of dotted profile keys (``--param KEY=VALUES``,
several params make a grid) times N Monte Carlo seeds. Each (point, seed) is
one task: deploy the converted network with the overridden profile on the
emulator or crossbar backend with that seed, run the samples, and record
accuracy, agreement with the reference SNN, logit error, spikes per neuron,
latency and energy.

Files in the output directory:

- ``sweep.json``: the definition (model and its checksum, the resolved
  profile, params, seeds, samples, data). Starting a different sweep in the
  same directory is refused; starting the same one again resumes it.
- ``results.jsonl``: one JSON line per finished (point, seed), appended and
  flushed as each finishes. A line cut short by a kill is dropped on resume.
  Records are keyed by (point, seed): a duplicate line is never counted.
- ``.neurodeploy.lock``: held (``fcntl.flock``) while a sweep runs, so a second
  sweep into the same directory is refused instead of doubling the records.

Same seed, same bits: a record depends on the sweep definition and the seed
only, not on the executor, the number of workers, the order results come back,
or the machine's BLAS thread count. OpenBLAS splits a matrix product between
its threads in a way that changes the order of the additions, so 1 and 2
threads give different last bits (measured: 429 of the 540 x 128 elements of a
540x64 @ 64x128 float64 product on an AMD EPYC with the Haswell kernels). So
every task computes with one BLAS (and OpenMP) thread: :func:`run_task` holds
``threadpoolctl.threadpool_limits(1)`` (neurodeploy.threads.one_blas_thread,
shared by the tasks of one process) around its whole body, the network's
conversion and reference run included, on every path - in-process
(``--workers 1``), in a process pool and on any dask worker, including workers
that join after the tasks were submitted. The limit is lifted when the task
returns, so nothing global is left changed in the calling process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from .errors import UsageError
from .fileio import (
    check_output_dir,
    claim_output_dir,
    output_lock,
    owned_names,
    write_text_atomic,
)
from .profile import describe_keys, load_profile, profile_from_dict
from .threads import one_blas_thread

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
SWEEP_VERSION = 1
METRICS = ("accuracy", "agreement", "logit_error", "spikes_per_neuron", "latency_s", "energy_j")
EXECUTORS = ("local", "dask")
SCHEDULER_TIMEOUT_S = 10  # to connect to a --scheduler address
_FRACTIONS = ("accuracy", "agreement", "accuracy_reference")


def parse_values(text: str, key: str) -> list:
    """``a,b,c`` (YAML scalars: 8, 0.5, null) or ``lo:hi:n`` (n evenly spaced values)."""
    text = text.strip()
    if text.count(":") == 2 and "," not in text:
        lo, hi, n = text.split(":")
        try:
            lo_v, hi_v, count = float(lo), float(hi), int(n)
        except ValueError:
            raise UsageError(f"--param {key}: range must be LO:HI:N, got {text!r}") from None
        if count < 1:
            raise UsageError(f"--param {key}: a range needs N >= 1 values, got {count}")
        return [float(v) for v in np.linspace(lo_v, hi_v, count)]
    values = []
    for item in text.split(","):
        try:
            values.append(yaml.safe_load(item) if item.strip() else None)
        except yaml.YAMLError:
            raise UsageError(f"--param {key}: cannot parse value {item!r}") from None
    if not values or any(isinstance(v, (list, dict)) for v in values):
        raise UsageError(f"--param {key}: expected comma-separated values, got {text!r}")
    return values


def parse_param(item: str) -> tuple[str, list]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not text:
        raise UsageError(f"--param: expected KEY=VALUES, got {item!r}")
    if key not in {row[0] for row in describe_keys()}:
        raise UsageError(f"--param: unknown profile key '{key}'")
    return key, parse_values(text, key)


def file_sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SweepSpec:
    """Everything that defines a sweep's results (see the module docstring)."""

    model: str
    model_sha256: str
    profile: dict
    backend: str
    params: list  # [[key, [values, ...]], ...]
    seeds: int
    samples: int | None = None
    data: str | None = None
    data_sha256: str | None = None
    calibration_size: int | None = None
    zeta: float = 0.5
    input_range: list | None = None
    version: int = SWEEP_VERSION

    def points(self) -> list[dict]:
        keys = [key for key, _ in self.params]
        grids = [values for _, values in self.params]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grids)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict) -> SweepSpec:
        return cls(**doc)


def make_spec(
    model_path: Path,
    profile_name: str,
    params: list[tuple[str, list]],
    seeds: int,
    samples: int | None,
    backend: str | None,
    data: str | None,
    calibration_size: int | None,
    zeta: float,
    overrides: dict | None = None,
    input_range=None,
):
    """Build and validate a sweep definition (every point's profile is checked first)."""
    from .modelio import NETWORK_FILE, WEIGHTS_FILE

    profile = load_profile(profile_name)
    if overrides:
        profile = profile.with_overrides(overrides, origin="--set")
    if profile.hardware == "ideal":
        backend = backend or "emulator"
    default_backend = {"digital": "emulator", "crossbar": "crossbar"}.get(profile.hardware)
    backend = backend or default_backend
    if backend not in ("emulator", "crossbar"):
        raise UsageError(f"--backend: sweeps run the emulator or crossbar backend, got {backend!r}")
    if not params:
        raise UsageError("sweep: give at least one --param KEY=VALUES")
    keys = [key for key, _ in params]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--param: a key is given twice: {keys}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"--seeds must be a positive integer, got {seeds!r}")
    data_sha = file_sha256(Path(data)) if data is not None and Path(data).is_file() else None
    spec = SweepSpec(
        model=str(Path(model_path).resolve()),
        model_sha256=_model_sha256(Path(model_path), NETWORK_FILE, WEIGHTS_FILE),
        profile=profile.to_dict(),
        backend=backend,
        params=[[key, list(values)] for key, values in params],
        seeds=seeds,
        samples=samples,
        data=None if data is None else str(Path(data).resolve()),
        data_sha256=data_sha,
        calibration_size=calibration_size,
        zeta=float(zeta),
        input_range=None if input_range is None else [float(v) for v in input_range],
    )
    for point in spec.points():
        profile.with_overrides(point, origin="--param")
    return spec


def _model_sha256(path: Path, network_file: str, weights_file: str) -> str:
    if path.is_file():  # an ONNX model
        return file_sha256(path)
    return file_sha256(path / network_file, path / weights_file)


def _differences(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def report_file_names(spec: SweepSpec) -> list[str]:
    """The files ``write_report`` writes for ``spec``: report.html and its figures."""
    names = ["report.html", *(f"accuracy_{key.replace('.', '_')}.png" for key, _ in spec.params)]
    names.append("tradeoff.png")  # accuracy against energy and latency
    return [*names, "heatmap.png"] if len(spec.params) == 2 else names


def open_sweep(out_dir: Path, spec: SweepSpec, force: bool = False) -> None:
    """Create the sweep directory, or check that it holds this very sweep.

    The directory is claimed first (:func:`neurodeploy.fileio.claim_output_dir`): a
    sweep.json, results.jsonl or report file there that neurodeploy did not write is
    refused unless ``force``, which starts this sweep afresh over them; other files are
    left alone.
    """
    owned = owned_names(out_dir) if out_dir.is_dir() else frozenset()
    claim_output_dir(out_dir, [SWEEP_FILE, RESULTS_FILE, *report_file_names(spec)], force=force)
    foreign = [n for n in (SWEEP_FILE, RESULTS_FILE) if (out_dir / n).exists() and n not in owned]
    if foreign:  # only with force: overwrite the foreign files, never read them as ours
        write_text_atomic(out_dir / RESULTS_FILE, "")
    path = out_dir / SWEEP_FILE
    if path.exists() and not foreign:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{path}: not a sweep definition (invalid JSON)") from None
        diff = _differences(old, json.loads(spec.to_json()))
        if diff:
            raise UsageError(
                f"{out_dir} holds a different sweep ({'; '.join(diff)[:300]}); "
                "choose another --out or remove it"
            )
        return
    write_text_atomic(path, json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")


def record_key(record: dict) -> tuple:
    """What identifies a record: its (point, seed). A sweep has one record per key."""
    return (record.get("point"), record.get("seed"))


def unique_records(records: list[dict]) -> list[dict]:
    """``records`` with only the first record of every (point, seed): a duplicate (e.g.
    from two sweeps run into one directory by a version without the lock) is never
    counted twice."""
    seen, unique = set(), []
    for record in records:
        key = record_key(record) if isinstance(record, dict) else id(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def read_results(out_dir: Path, repair: bool = False) -> list[dict]:
    """The finished records, one per (point, seed) (see :func:`unique_records`); with
    ``repair`` a last line cut short by a kill is removed.

    A complete line that is not a valid record is an error naming the file and line
    (it was not written by a sweep, and dropping it silently would lose runs).
    """
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_end = [], 0
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        if not line.endswith(b"\n"):
            break  # the last line of a killed run: not yet a record
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{path}: line {number} is not JSON") from None
        _check_record(path, number, record)
        records.append(record)
        good_end += len(line)
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return unique_records(records)


def _check_record(path: Path, number: int, record) -> None:
    """Raise UsageError unless ``record`` has the keys and value types run_task writes."""
    where = f"{path}: line {number}"
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object")
    for key in ("point", "seed"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{where}: '{key}' must be a non-negative integer, got {value!r}")
    if not isinstance(record.get("params"), dict):
        raise UsageError(f"{where}: 'params' must be a mapping")
    for key in (*METRICS, "accuracy_reference"):
        value = record.get(key)
        if value is None and key in ("accuracy", "accuracy_reference"):
            continue  # runs without labels
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise UsageError(f"{where}: '{key}' must be a finite number, got {value!r}")


def load_sweep(out_dir: Path) -> tuple[SweepSpec, list[dict]]:
    path = out_dir / SWEEP_FILE
    if not path.is_file():
        raise UsageError(f"{out_dir}: no {SWEEP_FILE} here (not a sweep directory)")
    try:
        spec = SweepSpec.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UsageError(f"{path}: not a sweep definition ({exc})") from None
    records = read_results(out_dir)
    points = len(spec.points())
    for record in records:
        if record["point"] >= points or record["seed"] >= spec.seeds:
            raise UsageError(
                f"{out_dir / RESULTS_FILE}: a record of point {record['point']}, seed "
                f"{record['seed']} lies outside this sweep ({points} points x {spec.seeds} seeds)"
            )
    return spec, records


# -- tasks ------------------------------------------------------------------------------------
@dataclass
class _Context:
    snn: object
    profile: object
    x: np.ndarray
    y: np.ndarray | None
    reference: object
    points: list


@lru_cache(maxsize=2)
def _context(spec_json: str) -> _Context:
    """Per worker process: the converted network and its reference run, built once."""
    from .convert import convert
    from .datasets import load_model_data
    from .modelio import load_model
    from .simulate import simulate

    spec = SweepSpec.from_dict(json.loads(spec_json))
    net = load_model(spec.model, input_range=spec.input_range)
    x_cal, x, y, _ = load_model_data(net, spec.data, spec.calibration_size, spec.samples)
    snn = convert(net, calibration=x_cal, zeta=spec.zeta)
    profile = profile_from_dict(spec.profile, source=f"{spec.model} sweep profile")
    # the records read outputs and counts only: no spike times are kept (keep=())
    return _Context(snn, profile, x, y, simulate(snn, x, keep=()), spec.points())


def run_task(spec_json: str, point: int, seed: int) -> dict:
    """One (point, seed) of the sweep, with one BLAS thread; returns its record.

    The thread limit makes the record the same bits on every executor (see the module
    docstring).
    """
    with one_blas_thread():
        return _run_task(spec_json, point, seed)


def _run_task(spec_json: str, point: int, seed: int) -> dict:
    import time

    from .deploy import deploy

    start = time.perf_counter()
    ctx = _context(spec_json)
    spec = json.loads(spec_json)
    params = ctx.points[point]
    profile = ctx.profile.with_overrides(params, origin="--param")
    trace = deploy(ctx.snn, profile, backend=spec["backend"], seed=seed).run(ctx.x, keep=())
    ref = ctx.reference
    return {
        "point": point,
        "seed": seed,
        "params": params,
        "accuracy": None if ctx.y is None else trace.accuracy(ctx.y),
        "accuracy_reference": None if ctx.y is None else ref.accuracy(ctx.y),
        "agreement": float(np.mean(trace.predictions == ref.predictions)),
        "logit_error": float(np.mean(np.abs(trace.output - ref.output))),
        "spikes_per_neuron": trace.spikes_per_neuron,
        "latency_s": float(np.mean(trace.latency_s)),
        "energy_j": float(np.mean(trace.energy_j)),
        "saturated": trace.saturated,
        "overflow": int(sum(trace.overflow.values())),
        "elapsed_s": time.perf_counter() - start,
    }


# prctl(2) option: the signal the kernel sends a process when its parent dies.
_PR_SET_PDEATHSIG = 1
_WATCHDOG_PERIOD_S = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the sweep that started it dies, even by
    kill -9 (no handler of the parent can run then).

    On Linux the kernel sends the worker SIGKILL (prctl PR_SET_PDEATHSIG); elsewhere a
    daemon thread polls the parent once a second. A parent already gone before the
    request took effect ends the worker at once.
    """
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    else:  # pragma: no cover - not Linux

        def watch() -> None:
            while os.getppid() == parent_pid:
                threading.Event().wait(_WATCHDOG_PERIOD_S)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="neurodeploy-watchdog").start()
    if os.getppid() != parent_pid:
        os._exit(1)


def check_executor(executor: str, scheduler: str | None) -> None:
    """Refuse an unknown executor, a scheduler address without dask, or a scheduler that
    does not answer within SCHEDULER_TIMEOUT_S: before anything is written."""
    if executor not in EXECUTORS:
        raise UsageError(f"--executor: unknown {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if scheduler is not None and executor != "dask":
        raise UsageError("--scheduler applies to --executor dask only")
    if scheduler is not None:
        _connect(scheduler).close()


def _connect(scheduler: str):
    """A dask Client of the scheduler at ``scheduler``; UsageError if none answers."""
    from dask.distributed import Client

    try:
        return Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise UsageError(
            f"--scheduler {scheduler}: no dask scheduler answered within "
            f"{SCHEDULER_TIMEOUT_S} s ({' '.join(str(exc).split())[:200]})"
        ) from None


def run_sweep(
    spec: SweepSpec,
    out_dir: Path,
    executor: str = "local",
    workers: int | None = None,
    scheduler: str | None = None,
    progress=None,
    force: bool = False,
    on_record=None,
) -> list[dict]:
    """Run every (point, seed) not yet in ``results.jsonl``; returns all records.

    progress(done, total): called with the runs done (resumed ones included) at the
    start and after every run. on_record(record): called with every record, those
    already in the directory first, then each new one as it is written (its "point"
    and "seed" say which run it was). force: write into a directory whose sweep files
    neurodeploy did not write (see :func:`open_sweep`).
    """
    check_executor(executor, scheduler)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, [SWEEP_FILE, RESULTS_FILE], force=force)
    with output_lock(out_dir):  # one sweep at a time in a directory
        return _run_locked(spec, out_dir, executor, workers, scheduler, progress, force, on_record)


def _run_locked(
    spec, out_dir, executor, workers, scheduler, progress, force, on_record=None
) -> list[dict]:
    open_sweep(out_dir, spec, force=force)
    records = read_results(out_dir, repair=True)
    if on_record is not None:
        for record in unique_records(records):
            on_record(record)
    done = {record_key(r) for r in records}
    todo = [
        (p, s) for p in range(len(spec.points())) for s in range(spec.seeds) if (p, s) not in done
    ]
    total = len(spec.points()) * spec.seeds
    if progress is not None:
        progress(len(done), total)
    if not todo:
        return records
    spec_json = spec.to_json()
    with open(out_dir / RESULTS_FILE, "a") as results:
        for record in _execute(spec_json, todo, executor, workers, scheduler):
            if record_key(record) in done:  # (cannot happen: each task is submitted once)
                continue
            done.add(record_key(record))
            results.write(json.dumps(record) + "\n")
            results.flush()
            os.fsync(results.fileno())
            records.append(record)
            if on_record is not None:
                on_record(record)
            if progress is not None:
                progress(len(done), total)
    return records


def _execute(spec_json: str, todo: list, executor: str, workers: int | None, scheduler: str | None):
    workers = workers or os.cpu_count() or 1
    if executor == "local":
        if workers == 1:
            for point, seed in todo:
                yield run_task(spec_json, point, seed)
            return
        with ProcessPoolExecutor(
            max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futures = [pool.submit(run_task, spec_json, p, s) for p, s in todo]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()
        return
    from dask.distributed import Client, LocalCluster
    from dask.distributed import as_completed as dask_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    client = _connect(scheduler) if scheduler is not None else Client(cluster)
    try:
        futures = [client.submit(run_task, spec_json, p, s, pure=False) for p, s in todo]
        for future in dask_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# -- aggregation ------------------------------------------------------------------------------
def interval95(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): Student-t 95 % interval of the mean over seeds."""
    from scipy.stats import t as student_t

    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if arr.size == 1:
        return (mean, mean, mean)
    half = float(student_t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size))
    return (mean, mean - half, mean + half)


def aggregate(spec: SweepSpec, records: list[dict]) -> list[dict]:
    """Per point: its params, the seeds done and (mean, low, high) of every metric."""
    by_point: dict[int, list[dict]] = {}
    for record in unique_records(records):
        by_point.setdefault(record["point"], []).append(record)
    rows = []
    for index, params in enumerate(spec.points()):
        recs = sorted(by_point.get(index, []), key=lambda r: r["seed"])
        row = {"point": index, "params": params, "seeds": len(recs)}
        for metric in (*METRICS, "accuracy_reference"):
            row[metric] = interval95([r[metric] for r in recs]) if recs else None
            if row[metric] is not None and metric in _FRACTIONS:  # bounded quantities
                row[metric] = tuple(float(np.clip(v, 0.0, 1.0)) for v in row[metric])
        rows.append(row)
    return rows
