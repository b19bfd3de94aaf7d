"""Command-line interface: ``neurodeploy convert|simulate MODEL ...``.

User errors (any :class:`NeurodeployError`, bad arguments) print one line on
stderr and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from . import __version__, progress
from .convert import convert
from .crosscheck import bound_line, cause_lines, crosscheck
from .datasets import load_model_data
from .deploy import BACKENDS, Deployment, deploy
from .errors import NeurodeployError, UsageError
from .evaluate import compare_with_relu, hardware_summary, layer_table
from .fileio import (
    check_output_dir,
    check_output_file,
    claim_output_dir,
    output_lock,
    write_files_atomic,
    write_text_atomic,
)
from .metrics import metrics_table, neurobench_metrics
from .modelio import load_model, resolve_model_path
from .network import Network
from .profile import HardwareProfile, load_profile
from .simulate import simulate
from .threads import one_blas_thread
from .trace import Trace
from .ttfs import NEURON_MODELS, TTFSNetwork

# The prefix of every error line main() prints; messages carry none of their own.
ERROR_PREFIX = "neurodeploy: error: "


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, via main(), which adds ERROR_PREFIX
        command = self.prog.removeprefix("neurodeploy").strip()
        for action in self._actions:  # a missing subcommand: say which there are
            if isinstance(action, argparse._SubParsersAction) and message.endswith(
                f"required: {action.metavar}"
            ):
                message = f"{action.metavar} required; choose one of {', '.join(action.choices)}"
        hint = f" (see 'neurodeploy {command + ' ' if command else ''}--help')"
        raise UsageError(f"{command}: {message}{hint}" if command else f"{message}{hint}")


def _bars(args) -> bool:
    """Whether this command shows progress bars (see :func:`neurodeploy.progress.wanted`)."""
    return progress.wanted(quiet=args.quiet, forced=args.progress)


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _input_range(text: str) -> tuple[float, float]:
    try:
        p, q = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P,Q (two numbers), got {text!r}") from None
    if not (np.isfinite(p) and np.isfinite(q) and p < q):
        raise argparse.ArgumentTypeError(f"expected P < Q, both finite, got {text!r}")
    return (p, q)


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _percent(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _print_summary(summary: dict, rows: list[dict], data_desc: str, model_path: Path) -> None:
    print(f"model            {summary['model']}  ({model_path})")
    print(
        f"neuron           {summary['neuron']}, zeta {summary['zeta']}, "
        f"windows calibrated on {summary['calibration_size']} samples"
    )
    print(f"samples          {summary['samples']}  ({data_desc})")
    print(
        f"accuracy         ReLU {_percent(summary['accuracy_relu'])}   "
        f"SNN {_percent(summary['accuracy_snn'])}"
    )
    print(f"agreement        {_percent(summary['agreement'])}")
    print(
        f"logit error      max {summary['max_abs_error']:.3g}  "
        f"(relative {summary['relative_error']:.3g})"
    )
    print(f"spikes/neuron    {summary['spikes_per_neuron']:.3f}")
    print(f"latency          {summary['latency']:.4g} time units (input window = 1)")
    print(f"saturated        {summary['saturated']}   early {summary['early']}")
    print()
    print(
        f"{'stage':<10} {'kind':<12} {'neurons':>7} {'window [t_min, t_max]':>24} "
        f"{'X_n':>8} {'spikes/n':>8} {'sat':>5}"
    )
    for r in rows:
        if "t_read" in r:
            window = f"read at {r['t_read']:.4g}"
        else:
            window = f"[{r['t_min']:.4g}, {r['t_max']:.4g}]"
        x_max = f"{r['x_max']:.4g}" if "x_max" in r else ""
        spn = f"{r['spikes_per_neuron']:.3f}" if "spikes_per_neuron" in r else ""
        sat = str(r["saturated"]) if "saturated" in r else ""
        print(
            f"{r['name']:<10} {r['kind']:<12} {r['neurons']:>7} {window:>24} {x_max:>8} "
            f"{spn:>8} {sat:>5}"
        )
        for shortcut in r.get("shortcuts", ()):
            print(
                f"{'':<10}   + shortcut from '{shortcut['source']}', delay {shortcut['delay']:.4g}"
            )


def _cmd_reference(args, command: str) -> int:
    if args.out is not None:
        check_output_dir(args.out, [f"{command}.json"], force=args.force)
    model_path = resolve_model_path(args.model)
    net = load_model(model_path, input_range=args.input_range)
    x_cal, x, y, data_desc = load_model_data(
        net, args.data, args.calibration_size, getattr(args, "samples", None)
    )
    snn = convert(net, calibration=x_cal, zeta=args.zeta, neuron=args.neuron)
    trace = simulate(snn, x)
    summary = compare_with_relu(net, snn, trace, x, y)
    rows = layer_table(snn, trace)
    payload = {
        **summary,
        "command": command,
        "data": data_desc,
        "layers": rows,
        "metrics": neurobench_metrics(snn, trace),
    }
    if args.out is not None:
        claim_output_dir(args.out, [f"{command}.json"], force=args.force)
        _write_json_atomic(Path(args.out) / f"{command}.json", payload)
    if args.json:
        print(json.dumps(payload))
    else:
        _print_summary(summary, rows, data_desc, model_path)
        if args.out is not None:
            print(f"\nwrote {Path(args.out) / f'{command}.json'}")
    return 0


DEFAULT_BACKEND = {"ideal": "emulator", "digital": "emulator", "crossbar": "crossbar"}


@dataclass
class _HardwareRun:
    model_path: Path
    net: Network
    profile: HardwareProfile
    backend: str
    snn: TTFSNetwork
    x: np.ndarray
    y: np.ndarray | None
    data_desc: str
    dep: Deployment
    trace: Trace | None  # None: not run yet (the cross-check streams the run)


def _run_on_hardware(args, stream_later: bool = False) -> _HardwareRun:
    """Load, convert, deploy and run, as ``run`` and ``deploy`` both do. stream_later: a
    deployment that streams its chunks (``Deployment.streams_chunks``) is not run here
    (trace None): the cross-check runs it a chunk at a time, in bounded memory."""
    model_path = resolve_model_path(args.model)
    net = load_model(model_path, input_range=args.input_range)
    profile = load_profile(args.profile)
    if args.set:
        profile = profile.with_overrides(parse_overrides(args.set), origin="--set")
    backend = args.backend or DEFAULT_BACKEND[profile.hardware]
    if args.tag != "fixed_pt" and backend != "lava":
        raise UsageError("--tag applies to the lava backend only")
    if args.synapses != "batched" and backend != "lava":
        raise UsageError("--synapses applies to the lava backend only")
    x_cal, x, y, data_desc = load_model_data(net, args.data, args.calibration_size, args.samples)
    snn = convert(net, calibration=x_cal, zeta=args.zeta, neuron=args.neuron)
    options = {"tag": args.tag, "synapses": args.synapses} if backend == "lava" else {}
    dep = deploy(snn, profile, backend=backend, seed=args.seed, **options)
    if backend == "lava":
        chunk = dep.chunk_size(len(x))
        with progress.bar(
            f"lava {args.tag} (chunks of {chunk})", len(x), "samples", _bars(args)
        ) as samples_bar:
            trace = dep.run(x, progress=progress.counter(samples_bar))
    elif stream_later and dep.streams_chunks:
        trace = None
    else:
        trace = dep.run(x)
    return _HardwareRun(model_path, net, profile, backend, snn, x, y, data_desc, dep, trace)


def _cmd_run(args) -> int:
    if args.out is not None:
        check_output_dir(args.out, ["run.json"], force=args.force)
    hw = _run_on_hardware(args)
    net, profile, backend, y, data_desc, dep, trace = (
        hw.net,
        hw.profile,
        hw.backend,
        hw.y,
        hw.data_desc,
        hw.dep,
        hw.trace,
    )
    model_path = hw.model_path
    reference = simulate(hw.snn, hw.x, keep=())  # outputs and spike counts only
    report = hardware_summary(reference, trace, y)
    metrics = neurobench_metrics(hw.snn, trace, profile, backend, dep)
    payload = {
        "command": "run",
        "model": net.name,
        "profile": profile.name,
        "backend": backend,
        "data": data_desc,
        **report,
        "mapping": dep.summary(),
        "metrics": metrics,
    }
    if args.out is not None:
        claim_output_dir(args.out, ["run.json"], force=args.force)
        _write_json_atomic(Path(args.out) / "run.json", payload)
    if args.json:
        print(json.dumps(payload))
        return 0
    print(f"model            {net.name}  ({model_path})")
    print(
        f"hardware         {profile.name} ({profile.hardware}) on the {backend} backend, "
        f"seed {args.seed}"
    )
    print(f"samples          {report['samples']}  ({data_desc})")
    print(
        f"accuracy         reference SNN {_percent(report['accuracy_reference'])}   "
        f"hardware {_percent(report['accuracy_hardware'])}"
    )
    print(f"agreement        {_percent(report['agreement'])}")
    print(
        f"logit error      mean {report['mean_abs_logit_error']:.3g}  "
        f"max {report['max_abs_logit_error']:.3g}"
    )
    print(
        f"spikes/neuron    reference {report['spikes_per_neuron_reference']:.3f}   "
        f"hardware {report['spikes_per_neuron_hardware']:.3f}"
    )
    steps = payload["mapping"].get("steps_per_inference")
    in_steps = f"{steps} steps = " if steps else ""
    print(f"latency          {in_steps}{report['latency_s'] * 1e6:.4g} us per inference")
    print(f"energy           {report['energy_j'] * 1e9:.4g} nJ per inference")
    breakdown = payload["mapping"].get("energy_breakdown")
    if breakdown:
        parts = ", ".join(
            f"{name.replace('_', ' ')} {breakdown['counts'][name]:.4g} x "
            f"{breakdown['per_operation_j'][name] * 1e12:.4g} pJ = {joules * 1e9:.4g} nJ"
            for name, joules in breakdown["energy_j"].items()
        )
        print(f"                 {parts}")
        print(f"                 ({breakdown['figures_from'] or 'no source given'})")
    print(
        f"saturated        {report['saturated']}   early {report['early']}   "
        f"overflow {report['overflow']}"
    )
    print()
    for layer in payload["mapping"]["layers"]:
        print("  " + "  ".join(f"{k}={_short(v)}" for k, v in layer.items()))
    print()
    what = "pulses on nonzero conductance pairs" if metrics["op_kind"] == "MAC" else "spikes"
    print(
        f"NeuroBench metrics (mean per inference; effective {metrics['op_kind']}s: {what} "
        "on nonzero weights; sparsities 0..1; footprint at the hardware's precision):"
    )
    for line in metrics_table(metrics):
        print("  " + line)
    if args.out is not None:
        print(f"\nwrote {Path(args.out) / 'run.json'}")
    return 0


DEPLOY_LOCK_WAIT_S = 30.0  # how long a deploy waits for another command writing to --out


def _cmd_deploy(args) -> int:
    """The main job: convert, deploy, run, cross-check; exit 0 when ok, 1 when not."""
    names = ["crosscheck.json", "crosscheck.html"]
    out = check_output_dir(args.out, names, force=args.force)
    hw = _run_on_hardware(args, stream_later=True)
    report = crosscheck(
        hw.snn, hw.dep, hw.x, hw.y, hardware=hw.trace, attribution=not args.no_attribution
    )
    from .report_html import crosscheck_html

    files = {
        "crosscheck.json": json.dumps(report.to_dict(), indent=2) + "\n",
        "crosscheck.html": crosscheck_html(report),
    }
    # One deploy at a time writes here (a second waits for the first's few milliseconds
    # of writing, or is refused while a sweep holds the directory), and the two files are
    # renamed into place together: never a crosscheck.json beside another run's html.
    with output_lock(out, timeout_s=DEPLOY_LOCK_WAIT_S):
        claim_output_dir(out, names, force=args.force)
        json_path, html_path = write_files_atomic(out, files)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0 if report.ok else 1
    print(
        f"neurodeploy deploy: {report.model} on {report.profile} ({report.backend}), "
        f"{report.samples} samples of the {hw.data_desc}"
    )
    print(
        f"accuracy    reference {_percent(report.accuracy_reference)}   hardware "
        f"{_percent(report.accuracy_hardware)}   agreement {_percent(report.agreement)} "
        f"(required {_percent(report.required_agreement)})"
    )
    steps = hw.dep.summary().get("steps_per_inference")
    latency = "–" if report.latency_s is None else f"{report.latency_s * 1e6:.4g} us"
    energy = "–" if report.energy_j is None else f"{report.energy_j * 1e9:.4g} nJ"
    print(
        f"cost        latency {(str(steps) + ' steps = ') if steps else ''}{latency}, "
        f"energy {energy} per inference; logit error mean {report.logit_error_mean:.3g}"
    )
    print()
    print(
        f"{'layer':<8} {'kind':<8} {'neurons':>7} {'mean|err|':>10} {'max|err|':>9} "
        f"{'(steps)':>8} {'beyond':>8} {'expect':>7} {'missing':>8} {'extra':>6} {'sat':>5} "
        f"{'ovf':>5} {'own loss':>8}  status"
    )
    for layer in report.layers:
        steps_text = "" if layer.error_max_steps is None else f"{layer.error_max_steps:.2f}"
        status = "ok" if layer.within_bound else "DIVERGES"
        if layer.name == report.divergence_layer:
            status += "  <- divergence layer"
        if layer.name == report.cause_layer:
            status += f"  <- cause layer ({report.cause_effect or 'effect not found'})"
        own = "" if layer.own_accuracy_loss is None else f"{100 * layer.own_accuracy_loss:.2f}%"
        print(
            f"{layer.name:<8} {layer.kind:<8} {layer.neurons:>7} {layer.error_mean:>10.3g} "
            f"{layer.error_max:>9.3g} {steps_text:>8} {100 * layer.beyond_bound:>7.2f}% "
            f"{100 * layer.beyond_expected:>6.2f}% "
            f"{layer.missing_spikes:>8} {layer.extra_spikes:>6} {layer.saturated:>5} "
            f"{layer.overflow:>5} {own:>8}  {status}"
        )
    print()
    bound = (
        f"statistical ({report.bound_sigmas:g} sigma of the device model + quantisation)"
        if report.bound_sigmas
        else "quantisation"
    )
    print(f"bound             {bound}")
    statistical = bound_line(report)
    if statistical:
        print(f"  - {statistical}")
    print(f"divergence layer  {report.divergence_layer or 'none (every stage within its bound)'}")
    if report.attribution is not None:
        print(f"cause layer       {report.cause_layer or 'none'}")
        print(f"cause effect      {report.cause_effect or 'none'}")
        for line in cause_lines(report):
            print(f"  - {line}")
    print()
    if report.ok:
        print("RESULT: OK - the hardware computes what the reference SNN computes")
    else:
        if report.divergence_layer or not report.cause_layer:
            where = f" at {report.divergence_layer}" if report.divergence_layer else ""
            print(f"RESULT: NOT OK - the hardware diverges{where}")
        else:
            print(
                "RESULT: NOT OK - every stage within its bound, but the hardware's effects "
                f"cost too much: {report.cause_effect or 'effect not found'} in "
                f"{report.cause_layer}"
            )
        for reason in report.reasons:
            print(f"  - {reason}")
    print(f"report: {html_path}  ({json_path.name} beside it)")
    return 0 if report.ok else 1


def _cmd_sweep(args) -> int:
    from .sweep import aggregate, check_executor, make_spec, parse_param, run_sweep
    from .sweep_report import knee, lines, resilience_sentences, write_report

    check_executor(args.executor, args.scheduler)
    model_path = resolve_model_path(args.model)
    params = [parse_param(item) for item in args.param]
    spec = make_spec(
        model_path,
        args.profile,
        params,
        args.seeds,
        args.samples,
        args.backend,
        args.data,
        args.calibration_size,
        args.zeta,
        overrides=parse_overrides(args.set) if args.set else None,
        input_range=args.input_range,
    )
    out = check_output_dir(args.out, ["sweep.json", "results.jsonl"], force=args.force)
    points, seeds, show = len(spec.points()), spec.seeds, _bars(args)
    seeds_done: dict[int, int] = {}
    with (
        output_lock(out),  # (held from the first record to the report)
        progress.bar("sweep points", points, "points", show) as points_bar,
        progress.bar(
            f"runs ({seeds} seeds per point)", points * seeds, "runs", show, position=1
        ) as runs_bar,
    ):

        def point_finished(record: dict) -> None:  # a point is done when all its seeds are
            seeds_done[record["point"]] = seeds_done.get(record["point"], 0) + 1
            if seeds_done[record["point"]] == seeds:
                points_bar.update(1)

        records = run_sweep(
            spec,
            out,
            executor=args.executor,
            workers=args.workers,
            scheduler=args.scheduler,
            progress=progress.counter(runs_bar),
            force=args.force,
            on_record=point_finished,
        )
        report = write_report(out, tolerance_points=args.tolerance, force=args.force)
    if not args.quiet:
        rows = aggregate(spec, records)
        refs = [r["accuracy_reference"][0] for r in rows if r["accuracy_reference"]]
        reference = float(np.mean(refs)) if refs else float("nan")
        knees = [knee(line, reference, args.tolerance / 100) for line in lines(spec, rows)]
        print(
            f"sweep: {len(records)} runs ({len(spec.points())} points x {spec.seeds} seeds) "
            f"in {out}; reference accuracy {_percent(reference)}"
        )
        for sentence in resilience_sentences(knees, args.tolerance):
            print(f"  {sentence}")
        print(f"report: {report}")
    return 0


def _cmd_export(args) -> int:
    from .onnxio import export_onnx

    if Path(args.onnx).suffix.lower() != ".onnx":
        raise UsageError(f"--onnx: the file name must end in .onnx, got {args.onnx!r}")
    check_output_file(args.onnx, args.force, "--onnx", ours=_written_by_us)
    net = load_model(resolve_model_path(args.model), input_range=args.input_range)
    path = export_onnx(net, args.onnx, dtype="float64" if args.float64 else "float32")
    print(path)
    return 0


def _written_by_us(path: Path) -> bool:
    """True when ``path`` is an ONNX file neurodeploy exported (its producer_name says so)."""
    import onnx

    try:
        if path.stat().st_size > 2**31:  # protobuf's limit: not one of ours
            return False
        return onnx.load(str(path), load_external_data=False).producer_name == "neurodeploy"
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


MODEL_DIR_FILES = ("network.yaml", "weights.npz", "finetune.json")


def _cmd_finetune(args) -> int:
    from .datasets import load_training_data
    from .finetune import finetune
    from .modelio import save_model

    model_path = resolve_model_path(args.model)
    if args.out is None:
        raise UsageError("finetune: --out DIR is required (where the fine-tuned model goes)")
    if Path(args.out).resolve() == model_path.resolve():
        raise UsageError("finetune: --out must not be the model being fine-tuned")
    check_output_dir(args.out, MODEL_DIR_FILES, args.force, exclusive=True)
    net = load_model(model_path, input_range=args.input_range)
    profile = load_profile(args.profile)
    if args.set:
        profile = profile.with_overrides(parse_overrides(args.set), origin="--set")
    backend = DEFAULT_BACKEND[profile.hardware]
    x_cal, x, y, data_desc = load_model_data(net, args.data, args.calibration_size, args.samples)
    x_train, y_train = load_training_data(net, args.data)
    snn = convert(net, calibration=x_cal, zeta=args.zeta)

    show_bars = _bars(args)

    def on_hardware(s, when: str) -> tuple[float, float]:
        runs = []
        with progress.bar(
            f"hardware seeds ({when})", args.eval_seeds, "seeds", show_bars, leave=False
        ) as seeds_bar:
            for k in range(args.eval_seeds):
                runs.append(deploy(s, profile, backend=backend, seed=k).run(x, keep=()))
                seeds_bar.update(1)
        return (
            float(np.mean([r.accuracy(y) for r in runs])) if y is not None else float("nan"),
            float(np.mean([r.spikes_per_neuron for r in runs])),
        )

    before, spikes_before = on_hardware(snn, "before")

    with progress.bar("fine-tuning", args.epochs, "epochs", show_bars) as epochs_bar:

        def show(epoch, epochs, loss, accuracy):
            epochs_bar.set_postfix_str(
                f"loss {loss:.4f}, hardware-forward accuracy {_percent(accuracy)}",
                refresh=False,
            )
            epochs_bar.update(1)
            if not args.quiet:
                progress.write(
                    f"epoch {epoch}/{epochs}: loss {loss:.4f}, training accuracy on the "
                    f"hardware forward {_percent(accuracy)}",
                    show_bars,
                )

        result = finetune(
            snn,
            profile,
            x_train,
            y_train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            window_scale=args.window_scale,
            progress=show,
        )
    after, spikes_after = on_hardware(result.snn, "after")
    summary = {
        "model": net.name,
        "profile": profile.name,
        "backend": backend,
        "data": data_desc,
        "eval_seeds": args.eval_seeds,
        "accuracy_reference_before": (
            simulate(snn, x, keep=()).accuracy(y) if y is not None else None
        ),
        "accuracy_reference_after": (
            simulate(result.snn, x, keep=()).accuracy(y) if y is not None else None
        ),
        "accuracy_hardware_before": before,
        "accuracy_hardware_after": after,
        "spikes_per_neuron_before": spikes_before,
        "spikes_per_neuron_after": spikes_after,
        "latency_before": snn.latency,
        "latency_after": result.snn.latency,
        "history": result.history,
    }
    out = save_model(
        result.network,
        args.out,
        force=args.force,
        extra_files={"finetune.json": json.dumps(summary, indent=2) + "\n"},
    )
    print(
        f"{net.name} on {profile.name} ({backend}, mean of {args.eval_seeds} seeds, {data_desc}):"
    )
    print(f"  hardware accuracy  {_percent(before)} -> {_percent(after)}")
    print(
        f"  reference SNN      {_percent(summary['accuracy_reference_before'])} -> "
        f"{_percent(summary['accuracy_reference_after'])}"
    )
    print(f"  spikes/neuron      {spikes_before:.3f} -> {spikes_after:.3f}")
    print(f"  latency            {snn.latency:.4g} -> {result.snn.latency:.4g} time units")
    print(f"saved {out} (a model directory: deploy, crosscheck and sweep take it)")
    return 0


def _cmd_fileclass(args) -> int:
    from .fileclass.data import load_snapshot, one_hot, split

    if args.action == "train":
        if args.out is None:
            raise UsageError("fileclass train: --out DIR is required")
        names = ("fileclass.json", "weights.npz")
        check_output_dir(args.out, names, args.force, exclusive=True)
    records, labels, classes = load_snapshot(args.snapshot)
    train_idx, test_idx = split(labels)
    if getattr(args, "samples", None):
        test_idx = test_idx[: args.samples]
    test_records = [records[i] for i in test_idx]
    if args.action == "train":
        from .fileclass.model import Hyper, train

        if args.train_samples:
            train_idx = train_idx[: args.train_samples]
        hyper = Hyper(**({} if args.quick is False else {"stdp_epochs": 1, "readout_epochs": 3}))
        started = time.perf_counter()
        show_bars = _bars(args)
        epochs = hyper.stdp_epochs + hyper.readout_epochs
        with progress.bar("training", epochs, "epochs", show_bars) as epochs_bar:

            def epoch_done(message: str) -> None:  # "readout epoch 2/12: ..., loss 0.523"
                epochs_bar.set_postfix_str(message.partition(": ")[2], refresh=False)
                epochs_bar.update(1)
                if not args.quiet:
                    progress.write(message, show_bars)

            model = train(
                [records[i] for i in train_idx],
                labels[train_idx],
                classes,
                hyper,
                seed=args.seed,
                progress=epoch_done,
            )
        seconds = time.perf_counter() - started
        path = model.save(args.out, force=args.force)
        started = time.perf_counter()
        accuracy = float(np.mean(model.classify(model.spikes(test_records))[0] == labels[test_idx]))
        print(
            f"trained on {len(train_idx)} files in {seconds:.1f} s; test accuracy "
            f"{_percent(accuracy)} on {len(test_idx)} files "
            f"({time.perf_counter() - started:.1f} s); saved {path}"
        )
        return 0
    if args.action == "baselines":
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC, LinearSVC

        vec = DictVectorizer()
        x_train = vec.fit_transform(one_hot([records[i] for i in train_idx]))
        x_test = vec.transform(one_hot(test_records))
        for name, clf in (
            ("logistic regression", LogisticRegression(max_iter=2000)),
            ("linear SVM", LinearSVC()),
            ("RBF SVM", SVC(kernel="rbf")),
        ):
            started = time.perf_counter()
            clf.fit(x_train, labels[train_idx])
            accuracy = clf.score(x_test, labels[test_idx])
            print(f"{name:<20} {_percent(accuracy)}  ({time.perf_counter() - started:.1f} s)")
        return 0
    from .fileclass.inference import classify
    from .fileclass.model import FileClassModel

    model = FileClassModel.load(resolve_model_path(args.model))
    profile = None
    if args.profile is not None:
        profile = load_profile(args.profile)
        if args.set:
            profile = profile.with_overrides(parse_overrides(args.set), origin="--set")
    backend = args.backend or ("crossbar" if profile is not None else "reference")
    started = time.perf_counter()
    accuracies = []
    draws = args.seeds if backend == "crossbar" else 1
    show_bars = _bars(args)
    with (
        progress.bar(f"{backend} device draws", draws, "seeds", show_bars and draws > 1) as seeds,
        progress.bar(
            f"{backend} files", len(test_records), "files", show_bars, position=int(draws > 1)
        ) as files,
    ):
        for seed in range(draws):
            files.reset(total=len(test_records))
            predicted = classify(
                model,
                test_records,
                backend=backend,
                profile=profile,
                seed=args.seed + seed,
                progress=progress.counter(files),
            )
            accuracies.append(float(np.mean(predicted == labels[test_idx])))
            seeds.update(1)
    where = backend + (f" ({profile.name})" if profile is not None else "")
    spread = f" +- {np.std(accuracies) * 100:.2f}" if len(accuracies) > 1 else ""
    print(
        f"{where}: accuracy {_percent(float(np.mean(accuracies)))}{spread} on "
        f"{len(test_idx)} test files, {len(accuracies)} seed(s), "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def _cmd_report(args) -> int:
    from .sweep_report import write_report

    report = write_report(
        Path(args.dir), tolerance_points=args.tolerance, compare=args.compare, force=args.force
    )
    print(report)
    return 0


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Help with every option's default: appended as "(default: X)" unless the help
    text already states it (options whose default is None say what None means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is None
            or action.default is False
            or action.default == []
            or action.default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


_FORCE_HELP = (
    "write into an output directory (or file) holding files neurodeploy did not write, "
    "overwriting those named like its own; nothing else is ever touched or removed"
)
_PROFILE_HELP = "hardware profile: a shipped name (ideal, loihi2, pcm, rram) or a YAML file"
_SET_HELP = (
    "override a dotted profile key with a YAML value, e.g. crossbar.levels=8; units as in "
    "the profile (repeatable; default: none)"
)


def _progress_options(p, quiet_help: str = "no progress bars") -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument(
        "--progress",
        action="store_true",
        help="show progress bars on stderr also when it is not a terminal (default: only "
        "on a terminal; --quiet wins)",
    )


def hardware_options(p) -> None:
    """Options of the commands that run on hardware (run, deploy)."""

    p.add_argument(
        "--tag",
        choices=("fixed_pt", "floating_pt"),
        default="fixed_pt",
        help="lava backend: the ProcessModels to run (integer or float64 arithmetic)",
    )
    p.add_argument(
        "--synapses",
        choices=("batched", "lava"),
        default="batched",
        help="lava backend: our batched synapse process (default) or Lava's own Dense/Sparse "
        "with their bit-accurate models, one sample per step (fixed_pt, loihi2 formats; slow)",
    )
    _progress_options(p, "no progress bar (lava backend)")
    p.add_argument("--profile", required=True, help=_PROFILE_HELP)
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=None,
        help="default: emulator for ideal and digital profiles, crossbar for crossbar ones",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run the first N samples of the evaluation data (default: all)",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of every random draw of the hardware (device noise, faults)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)


def _out_option(p, default: str | None, what: str) -> None:
    p.add_argument(
        "-o",
        "--out",
        default=default,
        metavar="DIR",
        help=what if default is not None else f"{what} (default: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="neurodeploy",
        description=__doc__.splitlines()[0],
        formatter_class=_HelpFormatter,
        epilog="'neurodeploy COMMAND --help' lists a command's options with their defaults "
        "and units. Environment: NEURODEPLOY_MEMORY_BUDGET (bytes, K/M/G suffixes) bounds "
        "the memory of the float forward pass and the simulator.",
    )
    parser.add_argument("--version", action="version", version=f"neurodeploy {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def add(name: str, help_text: str, parent=sub):
        return parent.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpFormatter
        )

    def common(p, out_help: str | None = None, out_default: str | None = None):
        p.add_argument("model", help="model directory, .onnx file, or the name of a shipped model")
        p.add_argument(
            "--input-range",
            type=_input_range,
            default=None,
            metavar="P,Q",
            help="range of the raw input, in the input's own units (default: the range the "
            "model records; ONNX models that record none need it)",
        )
        p.add_argument("--neuron", choices=NEURON_MODELS, default="b1", help="TTFS neuron model")
        p.add_argument(
            "--zeta",
            type=_non_negative_float,
            default=0.5,
            help="window safety margin (dimensionless): B_n = (1 + zeta) X_n",
        )
        p.add_argument(
            "--calibration-size",
            type=_positive_int,
            default=None,
            metavar="N",
            help="calibrate the windows on the first N calibration samples (default: all)",
        )
        p.add_argument(
            "--data",
            default=None,
            metavar="FILE",
            help="FILE.npz with x, y and optionally x_calib (default: the model's data set)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        _out_option(p, out_default, out_help or "also write the results to DIR/<command>.json")
        p.add_argument("--force", action="store_true", help=_FORCE_HELP)

    conv = add("convert", "convert a ReLU model to TTFS and verify it exactly")
    common(conv)
    sim = add("simulate", "convert, then run the reference SNN simulator")
    common(sim)
    sim.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate the first N samples (default: all)",
    )

    main_job = add("deploy", "convert, deploy, run and cross-check against the reference SNN")
    common(
        main_job,
        out_help="write DIR/crosscheck.json and DIR/crosscheck.html",
        out_default="out",
    )
    hardware_options(main_job)
    main_job.add_argument(
        "--no-attribution",
        action="store_true",
        help="skip naming the cause layer and effect (one extra run per stage and per effect)",
    )

    dep = add("run", "convert, deploy onto a hardware profile and run")
    common(dep)
    hardware_options(dep)

    sweep = add("sweep", "sweep profile keys over a grid and Monte Carlo seeds")
    common(
        sweep,
        out_help="the sweep directory: sweep.json, results.jsonl (resumable), report.html",
        out_default="sweep_out",
    )
    sweep.add_argument("--profile", required=True, help=_PROFILE_HELP)
    sweep.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="a dotted profile key and its values, 2,4,8 or LO:HI:N, in the profile's units "
        "(repeatable; several make a grid; default: none)",
    )
    sweep.add_argument(
        "--seeds", type=_positive_int, default=3, help="Monte Carlo seeds per grid point"
    )
    sweep.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate the first N samples (default: all)",
    )
    sweep.add_argument(
        "--backend",
        choices=("emulator", "crossbar"),
        default=None,
        help="default: emulator for ideal and digital profiles, crossbar for crossbar ones",
    )
    sweep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed override of the profile for the whole sweep (repeatable; default: none)",
    )
    sweep.add_argument(
        "--executor",
        choices=("local", "dask"),
        default="local",
        help="local: a process pool; dask: a dask cluster",
    )
    sweep.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="dask scheduler address, e.g. tcp://127.0.0.1:8786 (default: a LocalCluster)",
    )
    sweep.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default: all cores)",
    )
    sweep.add_argument(
        "--tolerance",
        type=_non_negative_float,
        default=1.0,
        help="accuracy tolerance for the knee, in percentage points",
    )
    _progress_options(sweep, "no progress bars, no summary")

    tune = add("finetune", "fine-tune the converted SNN for a hardware profile")
    common(tune, out_help="the fine-tuned model directory to write (required)")
    tune.add_argument("--profile", required=True, help=_PROFILE_HELP)
    tune.add_argument(
        "--epochs", type=_positive_int, default=10, help="passes over the training split"
    )
    tune.add_argument(
        "--batch-size", type=_positive_int, default=64, help="training samples per step"
    )
    tune.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="Adam learning rate (per step)"
    )
    tune.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the shuffling and of the hardware noise drawn in training",
    )
    tune.add_argument(
        "--window-scale",
        type=_fraction,
        default=None,
        help="shorten every window by this factor, 0 < s <= 1, for latency (default: 1, "
        "windows kept)",
    )
    tune.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=_SET_HELP,
    )
    tune.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate on the first N test samples (default: all)",
    )
    tune.add_argument(
        "--eval-seeds",
        type=_positive_int,
        default=10,
        help="hardware seeds averaged before and after",
    )
    _progress_options(tune, "no progress bars, no per-epoch lines")

    fc = add("fileclass", "file classification SNN with memristive synapses")
    fc_sub = fc.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    fc_train = add("train", "train on the snapshot's training split", fc_sub)
    fc_eval = add("eval", "classify the snapshot's test split", fc_sub)
    fc_base = add("baselines", "logistic regression and SVMs, same split", fc_sub)
    for p in (fc_train, fc_eval, fc_base):
        p.add_argument(
            "--snapshot",
            default=None,
            metavar="FILE",
            help="snapshot file, JSON lines (default: the shipped files_snapshot.jsonl.gz)",
        )
        p.add_argument(
            "--samples",
            type=_positive_int,
            default=None,
            metavar="N",
            help="use the first N test files (default: all)",
        )
    _out_option(fc_train, None, "the model directory to write (required)")
    fc_train.add_argument("--force", action="store_true", help=_FORCE_HELP)
    fc_train.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the initial weights, the shuffling and the programming pulses",
    )
    fc_train.add_argument(
        "--train-samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on the first N training files (default: all)",
    )
    fc_train.add_argument(
        "--quick", action="store_true", help="1 STDP and 3 readout epochs (for trying things out)"
    )
    _progress_options(fc_train, "no progress bar, no per-epoch lines")
    fc_eval.add_argument(
        "model", help="a directory written by 'fileclass train', or the shipped 'fileclass'"
    )
    fc_eval.add_argument(
        "--backend",
        choices=("reference", "crossbar", "lava"),
        default=None,
        help="default: crossbar with --profile, else reference",
    )
    fc_eval.add_argument(
        "--profile",
        default=None,
        help="crossbar profile for the synapses: pcm, rram or a YAML file (default: none, "
        "float synapses)",
    )
    fc_eval.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    fc_eval.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="first seed of the device draws (seed, seed + 1, ...)",
    )
    fc_eval.add_argument(
        "--seeds",
        type=_positive_int,
        default=5,
        help="device draws averaged on the crossbar",
    )
    _progress_options(fc_eval)

    exp = add("export", "write a model as ONNX")
    exp.add_argument("model", help="model directory, .onnx file, or the name of a shipped model")
    exp.add_argument("-o", "--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    exp.add_argument(
        "--float64",
        action="store_true",
        help="keep float64 weights (exact for any model; few runtimes run it; default: float32)",
    )
    exp.add_argument(
        "--input-range",
        type=_input_range,
        default=None,
        metavar="P,Q",
        help="range of the raw input, in the input's own units (default: the range the "
        "model records)",
    )
    exp.add_argument("--force", action="store_true", help=_FORCE_HELP)

    rep = add("report", "write DIR/report.html for a sweep directory")
    rep.add_argument("dir", help="the sweep's --out directory")
    rep.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="another sweep of the same keys (e.g. of a fine-tuned model) to draw "
        "beside it (repeatable; default: none)",
    )
    rep.add_argument(
        "--tolerance",
        type=_non_negative_float,
        default=1.0,
        help="accuracy tolerance for the knee, in percentage points",
    )
    rep.add_argument("--force", action="store_true", help=_FORCE_HELP)

    prof = add("profile", "validate a hardware profile and print it resolved")
    prof.add_argument("profile", help="profile file, or the name of a shipped profile")
    prof.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    prof.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE strings to a dict; values are parsed as YAML scalars (8, 0.5, true, null)."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UsageError(f"--set {key}: cannot parse value {text!r}") from None
    return overrides


def _cmd_profile(args) -> int:
    profile = load_profile(args.profile)
    if args.set:
        profile = profile.with_overrides(parse_overrides(args.set), origin="--set")
    doc = profile.to_dict()
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"# {profile.source}")
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


# The function that carries out each subcommand of build_parser.
COMMANDS = {
    "convert": lambda args: _cmd_reference(args, "convert"),
    "simulate": lambda args: _cmd_reference(args, "simulate"),
    "deploy": _cmd_deploy,
    "run": _cmd_run,
    "sweep": _cmd_sweep,
    "finetune": _cmd_finetune,
    "fileclass": _cmd_fileclass,
    "export": _cmd_export,
    "report": _cmd_report,
    "profile": _cmd_profile,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # Every command computes with one BLAS thread, so what it prints and writes (reports,
        # records, models) is the same bits for any OPENBLAS_NUM_THREADS: a multi-threaded
        # BLAS adds in an order that depends on the thread count.
        with one_blas_thread():
            return COMMANDS[args.command](args)
    except NeurodeployError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurodeploy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
