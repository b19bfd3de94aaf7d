"""Sweeps: value parsing, trends and knees, resume after a kill, Dask, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import neurodeploy as nd
from neurodeploy.cli import main
from neurodeploy.modelio import SHIPPED_MODELS_DIR
from neurodeploy.sweep import (
    RESULTS_FILE,
    aggregate,
    make_spec,
    parse_param,
    parse_values,
    read_results,
    run_sweep,
)
from neurodeploy.sweep_report import knee, lines, write_report

MODELS = SHIPPED_MODELS_DIR


def metrics(records):
    """Records without their timing, in a fixed order."""
    return sorted(
        ({k: v for k, v in r.items() if k != "elapsed_s"} for r in records),
        key=lambda r: (r["point"], r["seed"]),
    )


def test_values_and_ranges_parse():
    assert parse_values("2,4,8", "k") == [2, 4, 8]
    assert parse_values("0:4:9", "k") == pytest.approx(list(np.linspace(0, 4, 9)))
    assert parse_values("8,null", "k") == [8, None]
    assert parse_param("crossbar.levels=2,4") == ("crossbar.levels", [2, 4])
    with pytest.raises(nd.UsageError, match="unknown profile key 'crossbar.levles'"):
        parse_param("crossbar.levles=2")
    with pytest.raises(nd.UsageError, match="LO:HI:N"):
        parse_values("0:1:x", "k")
    with pytest.raises(nd.UsageError, match="KEY=VALUES"):
        parse_param("crossbar.levels")


def test_invalid_point_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(nd.ProfileError, match="'crossbar.levels': must be >= 2"):
        make_spec(
            MODELS / "digits_mlp",
            "pcm",
            [("crossbar.levels", [8, 1])],
            1,
            10,
            None,
            None,
            None,
            0.5,
        )
    with pytest.raises(nd.ProfileError, match="'weights.bits': does not apply"):
        make_spec(
            MODELS / "digits_mlp", "pcm", [("weights.bits", [4])], 1, 10, None, None, None, 0.5
        )


def _sweep(tmp_path, profile, params, seeds=3, samples=200, **kwargs):
    spec = make_spec(MODELS / "digits_mlp", profile, params, seeds, samples, None, None, None, 0.5)
    return spec, run_sweep(spec, tmp_path, **kwargs)


def test_accuracy_does_not_rise_with_noise_and_a_knee_is_found(tmp_path):
    spec, records = _sweep(
        tmp_path, "pcm", [("crossbar.read_noise_scale", [0, 1, 2, 4, 8])], workers=2
    )
    assert len(records) == 15 and len(read_results(tmp_path)) == 15
    rows = aggregate(spec, records)
    means = [r["accuracy"][0] for r in rows]
    highs = [r["accuracy"][2] for r in rows]
    for i in range(len(rows) - 1):  # never up by more than the seed interval
        assert means[i + 1] <= highs[i] + 1e-12
    assert means[-1] < means[0] - 0.1  # and down for real at 8x the published noise
    reference = rows[0]["accuracy_reference"][0]
    (line,) = lines(spec, rows)
    found = knee(line, reference, tolerance=0.01)
    assert found["found"] and found["direction"] == "tolerates up to"
    assert found["value"] in (0, 1, 2, 4)


def test_resources_have_a_knee_from_below(tmp_path):
    spec, records = _sweep(
        tmp_path, "loihi2", [("timing.steps_per_window", [2, 4, 8, 16, 32])], seeds=1, workers=1
    )
    rows = aggregate(spec, records)
    (line,) = lines(spec, rows)
    found = knee(line, rows[0]["accuracy_reference"][0], tolerance=0.01)
    assert found["direction"] == "needs at least" and found["value"] in (4, 8, 16, 32)
    assert rows[0]["accuracy"][0] < rows[-1]["accuracy"][0]


def test_same_seed_same_results_and_resume_skips_done_work(tmp_path):
    params = [("crossbar.prog_noise_scale", [0.5, 2.0])]
    spec, first = _sweep(tmp_path / "a", "pcm", params, seeds=2, samples=60, workers=1)
    # a second start of the same sweep has nothing left to do
    assert metrics(run_sweep(spec, tmp_path / "a", workers=1)) == metrics(first)
    assert len(read_results(tmp_path / "a")) == 4
    # a line cut short by a kill is dropped and recomputed
    results = tmp_path / "a" / RESULTS_FILE
    lines_ = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines_[:2]) + lines_[2][:25])
    again = run_sweep(spec, tmp_path / "a", workers=1)
    assert metrics(again) == metrics(first)
    assert len(results.read_text().splitlines()) == 4


def test_a_changed_sweep_is_refused_in_an_existing_directory(tmp_path, capsys):
    argv = [
        "sweep",
        "digits_mlp",
        "--profile",
        "pcm",
        "--samples",
        "30",
        "--seeds",
        "1",
        "--workers",
        "1",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--param", "crossbar.levels=4,8"]) == 0
    capsys.readouterr()
    assert main([*argv, "--param", "crossbar.levels=4,16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a different sweep" in err and "params" in err


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    argv = [
        sys.executable,
        "-m",
        "neurodeploy",
        "sweep",
        "digits_cnn",
        "--profile",
        "pcm",
        "--param",
        "crossbar.read_noise_scale=0:2:8",
        "--seeds",
        "4",
        "--samples",
        "300",
        "--workers",
        "2",
        "--quiet",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*argv, "--out", str(killed)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    results = killed / RESULTS_FILE
    while time.monotonic() < deadline:
        if results.exists() and results.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_results(killed)
    assert 5 <= len(partial) < 32, "the kill should land in the middle of the sweep"
    resumed = subprocess.run([*argv, "--out", str(killed)], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    whole = subprocess.run(
        [*argv, "--out", str(tmp_path / "whole")], capture_output=True, timeout=300
    )
    assert whole.returncode == 0
    assert metrics(read_results(killed)) == metrics(read_results(tmp_path / "whole"))
    assert len(read_results(killed)) == 32


def test_dask_local_cluster_gives_the_same_results(tmp_path):
    params = [("crossbar.read_noise_scale", [0.0, 2.0])]
    spec, local = _sweep(tmp_path / "local", "pcm", params, seeds=2, samples=50, workers=1)
    _, dask = _sweep(
        tmp_path / "dask", "pcm", params, seeds=2, samples=50, executor="dask", workers=2
    )
    assert metrics(dask) == metrics(local)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Path:
    """A two-key pcm sweep (2 x 2 points, 2 seeds, 80 samples) and its report."""
    out = tmp_path_factory.mktemp("grid")
    params = [("crossbar.read_noise_scale", [0.0, 4.0]), ("crossbar.levels", [4, 32])]
    _sweep(out, "pcm", params, seeds=2, samples=80, workers=2)
    write_report(out, tolerance_points=2.0)
    return out


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="needs Debian's chromium")
def test_sweep_report_renders_in_headless_chromium(grid_sweep, tmp_path):
    """What a user sees: every figure decodes, and the page draws them (not blank)."""
    import base64
    import importlib.util
    import io
    import re

    from PIL import Image

    page = (grid_sweep / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 4
    for data in images:  # no broken image: each is a whole PNG with content
        figure = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        assert figure.shape[0] > 200 and figure.std() > 10
    spec = importlib.util.spec_from_file_location(
        "screenshot_report",
        Path(__file__).resolve().parent.parent / "tools" / "screenshot_report.py",
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    png = tool.screenshot(grid_sweep / "report.html", tmp_path / "sweep.png", height=3000)
    shot = np.asarray(Image.open(png).convert("RGB"))
    assert shot.shape[:2] == (3000, 1280)
    rows_drawn = (shot.std(axis=(1, 2)) > 5).mean()  # rows with more than background
    assert rows_drawn > 0.3, rows_drawn


def test_report_has_bands_heat_map_and_knees(grid_sweep):
    tmp_path = grid_sweep
    page = write_report(tmp_path, tolerance_points=2.0).read_text()
    assert page.count("src='data:image/png;base64,") == 4
    for png in (
        "accuracy_crossbar_read_noise_scale.png",
        "accuracy_crossbar_levels.png",
        "heatmap.png",
        "tradeoff.png",
    ):
        assert (tmp_path / png).stat().st_size > 5000
    assert "Noise resilience and knees" in page and "95 %" in page
    assert "Accuracy against energy and latency per inference" in page
    assert "Pareto front (energy, latency)" in page and "<td>energy" in page
    assert main(["report", str(tmp_path)]) == 0


def test_pareto_front_keeps_the_points_nothing_beats():
    from neurodeploy.sweep_report import pareto_front

    costs = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    accuracies = [0.80, 0.90, 0.85, 0.88, 0.70, 0.95]
    # 2.0/0.85 loses to 2.0/0.90, 3.0/0.88 to 2.0/0.90
    assert pareto_front(costs, accuracies) == [4, 0, 1, 5]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [0]  # a tie: one of them


def test_axis_labels_carry_the_keys_units():
    from neurodeploy.sweep_report import key_label, point_name

    assert key_label("crossbar.t_inference_s") == "crossbar.t_inference_s (s)"
    assert key_label("crossbar.g_max_us") == "crossbar.g_max_us (µS)"
    assert key_label("weights.bits") == "weights.bits (bits)"
    assert key_label("converter.adc_bits") == "converter.adc_bits (bits)"
    assert key_label("crossbar.levels") == "crossbar.levels (levels)"
    assert key_label("crossbar.read_noise_scale") == "crossbar.read_noise_scale (× published model)"
    assert key_label("faults.stuck_on") == "faults.stuck_on (fraction)"
    assert key_label("timing.steps_per_window") == "timing.steps_per_window (steps)"
    assert point_name({"weights.bits": 4, "timing.steps_per_window": 16}) == (
        "bits=4, steps_per_window=16"
    )


def test_report_of_a_directory_without_a_sweep_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no sweep.json here" in capsys.readouterr().err


def test_results_are_one_json_object_per_line(tmp_path):
    _sweep(tmp_path, "pcm", [("converter.adc_bits", [4, 8])], seeds=1, samples=40, workers=1)
    for line in (tmp_path / RESULTS_FILE).read_text().splitlines():
        record = json.loads(line)
        for key in (
            "point",
            "seed",
            "params",
            "accuracy",
            "agreement",
            "logit_error",
            "spikes_per_neuron",
            "latency_s",
            "energy_j",
        ):
            assert key in record


def _sweep_in_subprocess(out: Path, executor: str, workers: int, blas_threads: int, coretype=None):
    """Records of a small sweep run by the CLI in a fresh interpreter with its own BLAS
    settings (they are read when numpy is first imported)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(blas_threads)}
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    env["PYTHONPATH"] = os.pathsep.join([str(MODELS.parent), env.get("PYTHONPATH", "")])
    argv = [
        *(sys.executable, "-m", "neurodeploy", "sweep", "digits_mlp", "--profile", "pcm"),
        *("--param", "crossbar.read_noise_scale=0,2", "--seeds", "2", "--samples", "50"),
        *("--executor", executor, "--workers", str(workers), "--quiet", "--out", str(out)),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return metrics(read_results(out))


@pytest.mark.parametrize("coretype", [None, "Prescott"])
def test_same_seed_same_bits_on_every_executor_and_blas_thread_count(tmp_path, coretype):
    """A record depends on the seed and inputs only: not on the executor, the number of
    workers or of BLAS threads. Prescott: OpenBLAS's generic x86-64 kernels, whose last
    bits also differ between 1 and 2 threads."""
    runs = [("local", 1, 2), ("local", 1, 1)]
    if coretype is None:
        runs += [("local", 2, 2), ("dask", 2, 2)]
    results = [
        _sweep_in_subprocess(tmp_path / f"{e}{w}-{t}", e, w, t, coretype) for e, w, t in runs
    ]
    assert len(results[0]) == 4
    for run, records in zip(runs[1:], results[1:], strict=True):
        assert records == results[0], f"{run} differs from {runs[0]}"


def test_tasks_compute_with_one_blas_thread_and_restore_the_limit_after(tmp_path, monkeypatch):
    from threadpoolctl import threadpool_info

    import neurodeploy.sweep as sweep_module

    def threads():
        return {i["internal_api"]: i["num_threads"] for i in threadpool_info()}

    seen = []
    original = sweep_module._run_task

    def spy(*args):
        seen.append(threads())
        return original(*args)

    before = threads()
    monkeypatch.setattr(sweep_module, "_run_task", spy)
    _sweep(tmp_path, "pcm", [("crossbar.levels", [8, 16])], seeds=1, samples=20, workers=1)
    assert len(seen) == 2 and all(set(t.values()) == {1} for t in seen)
    after = threads()  # (a task may load another library, e.g. OpenMP, on first use)
    assert {api: after[api] for api in before} == before


def test_a_duplicate_record_is_never_counted(tmp_path):
    spec, records = _sweep(
        tmp_path, "pcm", [("crossbar.levels", [8, 16])], seeds=2, samples=30, workers=1
    )
    results = tmp_path / RESULTS_FILE
    lines_ = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines_ + lines_[:3]))  # as two unlocked sweeps once wrote
    assert metrics(read_results(tmp_path)) == metrics(records)
    rows = aggregate(spec, [*records, *records])
    assert [row["seeds"] for row in rows] == [2, 2]
    assert rows == aggregate(spec, records)


def test_two_sweeps_into_one_directory_do_not_both_run(tmp_path):
    argv = [
        *(sys.executable, "-m", "neurodeploy", "sweep", "digits_cnn", "--profile", "pcm"),
        *("--param", "crossbar.read_noise_scale=0:2:6", "--seeds", "2", "--samples", "200"),
        *("--workers", "1", "--quiet", "--out", str(tmp_path)),
    ]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not read_results(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        still_running = first.poll() is None
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert still_running, "the first sweep should still run when the second starts"
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert str(tmp_path) in second.stderr and "another neurodeploy command" in second.stderr
    records = read_results(tmp_path)
    assert len(records) == 12 and len((tmp_path / RESULTS_FILE).read_text().splitlines()) == 12


def test_kill_9_of_a_local_sweep_leaves_no_worker(tmp_path):
    """Pool workers die with the sweep, even when it is killed with SIGKILL."""
    import psutil

    out = tmp_path / "sweep"
    argv = [
        sys.executable, "-m", "neurodeploy", "sweep", "digits_cnn", "--profile", "pcm",
        "--param", "crossbar.read_noise_scale=0:2:6", "--seeds", "4", "--workers", "2",
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        workers = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = psutil.Process(proc.pid).children()
            time.sleep(0.2)
        assert len(workers) == 2, "the pool did not start"
        time.sleep(1.0)  # tasks under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert alive == [], [p.pid for p in alive]


def test_sweep_tasks_stream_through_the_chunked_backends(monkeypatch):
    """A sweep task's run goes through the backend's chunked run: one sample per chunk
    (NEURODEPLOY_MEMORY_BUDGET=1) gives every record's metrics bit for bit. The crossbar
    point has no ADC, so its deployment needs no calibration run."""
    from neurodeploy import sweep as sweep_module

    for profile, backend, params in (
        ("loihi2", "emulator", [("timing.steps_per_window", [8, 32])]),
        ("pcm", "crossbar", [("converter.adc_bits", [None])]),
    ):
        spec = make_spec(MODELS / "digits_mlp", profile, params, 2, 23, backend, None, None, 0.5)
        spec_json = spec.to_json()
        tasks = [(p, s) for p in range(len(spec.points())) for s in range(2)]
        whole = metrics(sweep_module.run_task(spec_json, p, s) for p, s in tasks)
        with monkeypatch.context() as env:
            env.setenv("NEURODEPLOY_MEMORY_BUDGET", "1")
            chunked = metrics(sweep_module.run_task(spec_json, p, s) for p, s in tasks)
        assert chunked == whole
