"""Sweep reports: accuracy against each swept key with 95 % bands, heat maps for
two-key grids, accuracy against energy and latency per inference with the Pareto
front of the hardware points, the knee of every line and a noise-resilience summary.

Every axis names its unit (a swept key's from the profile key's documentation); legends
sit outside the data. The page is assembled from a few f-strings: a template engine
(jinja2) would move them into a second file without making them shorter.
"""

from __future__ import annotations

import base64
import html
import math
import re
from functools import cache
from pathlib import Path

import numpy as np

from .errors import UsageError
from .fileio import claim_output_dir, write_files_atomic
from .sweep import SweepSpec, aggregate, load_sweep, report_file_names

_BLUE, _GREY, _GREEN, _RED = "#0969da", "#59636e", "#1a7f37", "#cf222e"


@cache
def _key_docs() -> dict[str, str]:
    from .profile import describe_keys

    return {key: doc for key, _, doc in describe_keys()}


_UNIT_NAMES = {"s": "s", "us": "µS", "v": "V", "j": "J", "bits": "bits"}


def key_unit(key: str) -> str:
    """The unit of a dotted profile key, from its documentation: "s", "µS", "bits",
    "× published model" for noise multipliers, "fraction", ...; "" if dimensionless."""
    doc = _key_docs().get(key, "")
    found = re.search(r"\((s|uS|V|J|bits)\)", doc)
    if found:
        return _UNIT_NAMES[found.group(1).lower()]
    name = key.rsplit(".", 1)[-1]
    if "multiplier" in doc:
        return "× published model"
    if doc.startswith("fraction"):
        return "fraction"
    if "relative" in doc:
        return "relative to |G|"
    for word in ("bits", "levels", "steps"):
        if word in name:
            return word
    if name.endswith("_per_core") or name.endswith("_per_chip"):
        return "count"
    return ""


def key_label(key: str) -> str:
    """An axis label for a swept key: "weights.bits (bits)"."""
    unit = key_unit(key)
    return f"{key} ({unit})" if unit else key


def point_name(params: dict) -> str:
    """A short name of a hardware point: "bits=4, levels=8" (last part of each key)."""
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in params.items())


def pareto_front(costs: list[float], accuracies: list[float]) -> list[int]:
    """Indices of the points no other point beats: none has a cost <= and an accuracy
    >= with one of them strictly better. Sorted by cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracies[i]))
    front, best = [], -math.inf
    for i in order:
        if accuracies[i] > best:
            front.append(i)
            best = accuracies[i]
    return front


def _order(value):
    """Sort key of swept values: numbers ascending, null (float / unlimited) last."""
    return (1, 0.0) if value is None else (0, float(value))


def lines(spec: SweepSpec, rows: list[dict]) -> list[dict]:
    """Every 1-D line of the grid: one key varies, the others are fixed."""
    keys = [key for key, _ in spec.params]
    found = []
    for key in keys:
        others = [k for k in keys if k != key]
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            fixed = tuple((k, json_key(row["params"][k])) for k in others)
            groups.setdefault(fixed, []).append(row)
        for fixed, members in groups.items():
            members = sorted(members, key=lambda r: _order(r["params"][key]))
            found.append({"key": key, "fixed": dict(fixed), "rows": members})
    return found


def json_key(value):
    return "null" if value is None else value


def knee(line: dict, reference: float, tolerance: float) -> dict:
    """The knee of a line: the least demanding setting that keeps accuracy within
    ``tolerance`` (a fraction) of the reference.

    If accuracy rises with the value (a resource: bits, levels, steps), the knee is
    the smallest value from which on every point is within tolerance; if it falls
    (noise, drift time, faults), the largest value up to which every point is.
    """
    key, rows = line["key"], [r for r in line["rows"] if r["accuracy"] is not None]
    if not rows:
        return {"key": key, "fixed": line["fixed"], "direction": None, "value": None}
    means = np.array([r["accuracy"][0] for r in rows])
    ok = means >= reference - tolerance - 1e-12
    ranks = np.arange(len(rows))
    slope = float(np.polyfit(ranks, means, 1)[0]) if len(rows) > 1 else 0.0
    rising = slope > 0
    value, index = None, None
    if rising:
        for i in range(len(rows)):
            if ok[i:].all():
                value, index = rows[i]["params"][key], i
                break
    else:
        for i in range(len(rows) - 1, -1, -1):
            if ok[: i + 1].all():
                value, index = rows[i]["params"][key], i
                break
    return {
        "key": key,
        "fixed": line["fixed"],
        "direction": "needs at least" if rising else "tolerates up to",
        "value": value,
        "accuracy": None if index is None else rows[index]["accuracy"],
        "found": index is not None,
    }


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _line_figure(
    key: str,
    key_lines: list[dict],
    reference: float,
    tolerance: float,
    knees: list[dict],
    labelled: bool = False,
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = plt.cm.viridis(np.linspace(0, 0.85, max(1, len(key_lines))))
    all_values = [r["params"][key] for line in key_lines for r in line["rows"]]
    numeric = _numeric(all_values)
    positive = numeric and min(all_values) > 0
    log_x = positive and max(all_values) / min(all_values) > 100
    for ax, metric, label in (
        (axes[0], "accuracy", "accuracy"),
        (axes[1], "agreement", "agreement with reference"),
    ):
        for color, line, kn in zip(colors, key_lines, knees, strict=True):
            rows = [r for r in line["rows"] if r[metric] is not None]
            xs = [r["params"][key] for r in rows]
            xs_plot = xs if numeric else list(range(len(xs)))
            mean = np.array([r[metric][0] for r in rows]) * 100
            low = np.array([r[metric][1] for r in rows]) * 100
            high = np.array([r[metric][2] for r in rows]) * 100
            name = ", ".join(f"{k}={v}" for k, v in line["fixed"].items()) or "seed mean"
            if labelled:
                name = f"{line['label']}: {name}" if line["fixed"] else line["label"]
            ax.plot(xs_plot, mean, "o-", color=color, label=name, ms=4)
            ax.fill_between(xs_plot, low, high, color=color, alpha=0.2, lw=0)
            if metric == "accuracy" and kn.get("found") and numeric:
                ax.axvline(kn["value"], color=color, ls=":", lw=1.2)
            if not numeric:
                ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        if metric == "accuracy":
            ax.axhline(reference * 100, color=_GREY, ls="--", lw=1, label="reference SNN")
            ax.axhspan(
                (reference - tolerance) * 100,
                reference * 100,
                color=_GREEN,
                alpha=0.08,
                label=f"within {tolerance * 100:g} points",
            )
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(key_label(key))
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(
        f"accuracy against {key} (95 % interval over seeds; dotted: knee)", fontsize=10
    )
    axes[1].set_title("agreement with the reference SNN", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    return _png(fig)


def _heatmap_figure(spec: SweepSpec, rows: list[dict], reference: float, tolerance: float) -> bytes:
    import matplotlib.pyplot as plt

    (key_y, values_y), (key_x, values_x) = spec.params[0], spec.params[1]
    grid = np.full((len(values_y), len(values_x)), np.nan)
    for row in rows:
        if row["accuracy"] is None:
            continue
        i = values_y.index(row["params"][key_y])
        j = values_x.index(row["params"][key_x])
        grid[i, j] = row["accuracy"][0] * 100
    fig, ax = plt.subplots(figsize=(1.1 * len(values_x) + 3, 0.6 * len(values_y) + 2))
    image = ax.imshow(
        grid,
        cmap="RdYlGn",
        vmin=max(0, np.nanmin(grid) - 1),
        vmax=reference * 100,
        aspect="auto",
        origin="lower",
    )
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                within = grid[i, j] >= (reference - tolerance) * 100 - 1e-9
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    fontweight="bold" if within else "normal",
                )
    ax.set_xticks(range(len(values_x)), [str(v) for v in values_x])
    ax.set_yticks(range(len(values_y)), [str(v) for v in values_y])
    ax.set_xlabel(key_label(key_x))
    ax.set_ylabel(key_label(key_y))
    ax.set_title(
        f"mean accuracy (%) over seeds; bold: within {tolerance * 100:g} points of the reference",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return _png(fig)


_COSTS = (
    ("energy_j", 1e9, "energy per inference (nJ)"),
    ("latency_s", 1e6, "latency per inference (µs)"),
)


def _tradeoff_figure(groups: list[dict], labelled: bool) -> bytes:
    """Accuracy against energy and against latency per inference: one marker per hardware
    point (95 % bars over seeds), its name beside it, the Pareto front drawn as a step
    line with filled markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = [_BLUE, "#bc4c00", "#8250df", _GREEN]
    for ax, (metric, scale, xlabel) in zip(axes, _COSTS, strict=True):
        every_cost = []
        for g_index, group in enumerate(groups):
            color = colors[g_index % len(colors)]
            rows = [r for r in group["done"] if r["accuracy"] is not None and r[metric]]
            rows = [r for r in rows if np.isfinite(r[metric][0])]
            if not rows:
                continue
            cost = [r[metric][0] * scale for r in rows]
            acc = [r["accuracy"][0] * 100 for r in rows]
            low = [a - r["accuracy"][1] * 100 for a, r in zip(acc, rows, strict=True)]
            high = [r["accuracy"][2] * 100 - a for a, r in zip(acc, rows, strict=True)]
            every_cost += cost
            front = pareto_front(cost, acc)
            prefix = f"{group['label']}: " if labelled else ""
            ax.errorbar(
                cost, acc, yerr=[low, high], fmt="o", mfc="white", color=color, ms=5,
                capsize=2, lw=0.8, label=f"{prefix}hardware points (95 % over seeds)",
            )  # fmt: skip
            ax.step(
                [cost[i] for i in front], [acc[i] for i in front], where="post",
                color=color, lw=1.2, ls="--",
            )  # fmt: skip
            ax.plot(
                [cost[i] for i in front], [acc[i] for i in front], "o", color=color, ms=7,
                zorder=4, label=f"{prefix}Pareto front",
            )  # fmt: skip
            named = range(len(rows)) if len(rows) <= 12 else front
            for k, i in enumerate(sorted(named, key=lambda i: cost[i])):
                ax.annotate(
                    point_name(rows[i]["params"]), (cost[i], acc[i]),
                    xytext=(6, 4 if k % 2 == 0 else -11), textcoords="offset points",
                    fontsize=7, color=color,
                )  # fmt: skip
        reference = groups[0]["reference"]
        if not math.isnan(reference):
            ax.axhline(reference * 100, color=_GREY, ls=":", lw=1, label="reference SNN")
        if every_cost and min(every_cost) > 0 and max(every_cost) / min(every_cost) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy against energy per inference", fontsize=10)
    axes[1].set_title("accuracy against latency per inference", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    return _png(fig)


def _front_points(rows: list[dict], metric: str) -> set[int]:
    """The points (indices into the sweep) on the accuracy-against-``metric`` front."""
    done = [r for r in rows if r["seeds"] and r["accuracy"] is not None and r[metric]]
    done = [r for r in done if np.isfinite(r[metric][0])]
    front = pareto_front([r[metric][0] for r in done], [r["accuracy"][0] for r in done])
    return {done[i]["point"] for i in front}


def _front_marks(point: int, fronts: dict[str, set[int]]) -> str:
    names = {"energy_j": "energy", "latency_s": "latency"}
    return ", ".join(names[m] for m, members in fronts.items() if point in members) or ""


def _fmt_interval(interval) -> str:
    if interval is None or any(
        v is None or (isinstance(v, float) and math.isnan(v)) for v in interval
    ):
        return "–"
    mean, low, high = (100 * v for v in interval)
    return f"{mean:.2f} % [{low:.2f}, {high:.2f}]"


def _load(out_dir: Path, tolerance: float):
    spec, records = load_sweep(out_dir)
    rows = aggregate(spec, records)
    done = [r for r in rows if r["seeds"]]
    refs = [r["accuracy_reference"][0] for r in done if r["accuracy_reference"] is not None]
    reference = float(np.mean(refs)) if refs else math.nan
    label = Path(spec.model).stem if Path(spec.model).suffix else Path(spec.model).name
    found = lines(spec, done)
    for line in found:
        line["label"] = label
    knees = [knee(line, reference, tolerance) for line in found]
    return {
        "spec": spec,
        "records": records,
        "rows": rows,
        "done": done,
        "reference": reference,
        "lines": found,
        "knees": knees,
        "label": label,
    }


def write_report(
    out_dir: str | Path, tolerance_points: float = 1.0, compare=(), force: bool = False
) -> Path:
    """Write DIR/report.html and PNG figures for the sweep in ``out_dir``.

    compare: other sweep directories over the same keys (e.g. the same sweep of a
    fine-tuned model); their lines are drawn beside this sweep's. A report file there
    that neurodeploy did not write is refused unless ``force``
    (:func:`neurodeploy.fileio.claim_output_dir`).
    """
    out_dir = Path(out_dir)
    tolerance = tolerance_points / 100
    main = _load(out_dir, tolerance)
    claim_output_dir(out_dir, report_file_names(main["spec"]), force=force, what="report")
    others = [_load(Path(d), tolerance) for d in compare]
    keys = [key for key, _ in main["spec"].params]
    for other in others:
        other_keys = [key for key, _ in other["spec"].params]
        if other_keys != keys:
            raise UsageError(f"--compare: {other['label']} sweeps {other_keys}, not {keys}")
    spec, reference = main["spec"], main["reference"]
    figures, files = [], {}
    for key in keys:
        groups = [main, *others]
        key_lines = [line for g in groups for line in g["lines"] if line["key"] == key]
        key_knees = [k for g in groups for k in g["knees"] if k["key"] == key]
        if not key_lines or math.isnan(reference):
            continue
        png = _line_figure(key, key_lines, reference, tolerance, key_knees, labelled=bool(others))
        name = f"accuracy_{key.replace('.', '_')}.png"
        files[name] = png
        figures.append((f"Accuracy against {key}", png))
    if len(spec.params) == 2 and main["done"] and not math.isnan(reference):
        png = _heatmap_figure(spec, main["done"], reference, tolerance)
        files["heatmap.png"] = png
        figures.append(("Heat map", png))
    if main["done"]:
        png = _tradeoff_figure([main, *others], labelled=bool(others))
        files["tradeoff.png"] = png
        figures.append(("Accuracy against energy and latency per inference", png))
    files["report.html"] = _page(main, others, tolerance_points, figures)
    write_files_atomic(out_dir, files)  # all renamed into place only when all are written
    return out_dir / "report.html"


def resilience_sentences(knees: list[dict], tolerance_points: float) -> list[str]:
    out = []
    for kn in knees:
        fixed = ", ".join(f"{k}={v}" for k, v in kn["fixed"].items())
        at = f" (with {fixed})" if fixed else ""
        if kn.get("found"):
            acc = _fmt_interval(kn["accuracy"])
            out.append(
                f"{kn['key']}: {kn['direction']} {kn['value']}{at} within "
                f"{tolerance_points:g} points of the reference; accuracy there {acc}"
            )
        elif kn.get("direction"):
            out.append(
                f"{kn['key']}{at}: no swept value keeps accuracy within "
                f"{tolerance_points:g} points of the reference"
            )
    return out


def _points_table(group: dict, tolerance_points: float) -> str:
    spec, rows, reference = group["spec"], group["rows"], group["reference"]
    keys = [key for key, _ in spec.params]
    header = "".join(f"<th>{html.escape(k)}</th>" for k in keys) + (
        "<th>seeds</th><th>accuracy (95 % CI)</th><th>agreement (95 % CI)</th>"
        "<th>logit error</th><th>spikes/neuron</th><th>latency</th><th>energy</th>"
        "<th>Pareto front (energy, latency)</th>"
    )
    fronts = {metric: _front_points(rows, metric) for metric, _, _ in _COSTS}
    body = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(str(row['params'][k]))}</td>" for k in keys)
        if not row["seeds"]:
            body.append(f"<tr>{cells}<td>0</td><td colspan='7'>not run yet</td></tr>")
            continue
        within = row["accuracy"] is not None and row["accuracy"][0] >= (
            reference - tolerance_points / 100 - 1e-12
        )
        css = "" if within else " class='bad'"
        body.append(
            f"<tr{css}>{cells}<td>{row['seeds']}</td><td>{_fmt_interval(row['accuracy'])}</td>"
            f"<td>{_fmt_interval(row['agreement'])}</td><td>{row['logit_error'][0]:.3g}</td>"
            f"<td>{row['spikes_per_neuron'][0]:.3f}</td>"
            f"<td>{row['latency_s'][0] * 1e6:.4g} µs</td>"
            f"<td>{row['energy_j'][0] * 1e9:.4g} nJ</td>"
            f"<td>{_front_marks(row['point'], fronts)}</td></tr>"
        )
    title = f"{group['label']} (reference SNN accuracy {100 * reference:.2f} %)"
    return (
        f"<h2>All points: {html.escape(title)}</h2><table><tr>{header}</tr>{''.join(body)}</table>"
    )


def _page(main: dict, others: list[dict], tolerance_points, figures) -> str:
    spec = main["spec"]
    sentences = "".join(
        f"<li>{html.escape((g['label'] + ': ') if others else '')}{html.escape(s)}</li>"
        for g in (main, *others)
        for s in resilience_sentences(g["knees"], tolerance_points)
    )
    imgs = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
        for title, png in figures
    )
    tables = "".join(_points_table(g, tolerance_points) for g in (main, *others))
    total = len(spec.points()) * spec.seeds
    n_records = len(main["records"])
    reference = main["reference"]
    compared = ", ".join(g["label"] for g in others)
    title = f"{main['label']} on {spec.profile['name']} ({spec.backend})" + (
        f", compared with {compared}" if others else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>neurodeploy sweep: {html.escape(main["label"])}</title>
<style>body{{font-family:system-ui,Helvetica,Arial,sans-serif;margin:24px;max-width:1200px;
color:#1f2328}} table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #d0d7de;
padding:4px 8px;text-align:right}} th{{background:#f6f8fa}} tr.bad td{{background:#ffebe9}}
h2{{font-size:17px;margin-top:26px}} img{{max-width:100%}} .muted{{color:#59636e}}</style>
</head><body>
<h1>Sweep: {html.escape(title)}</h1>
<p class="muted">{n_records} of {total} runs done ({len(spec.points())} points x {spec.seeds}
seeds, {spec.samples or "all"} samples). Reference SNN accuracy {100 * reference:.2f} %;
tolerance {tolerance_points:g} points; intervals are 95 % Student-t intervals of the mean over
seeds.</p>
<h2>Noise resilience and knees</h2><ul>{sentences}</ul>
{imgs}
{tables}
</body></html>
"""
