"""The cross-check report as one self-contained HTML page (figures inlined as PNG)."""

from __future__ import annotations

import html

import numpy as np

from .crosscheck import CrossCheckReport, bound_line, cause_lines, figure_png

_OK, _BAD, _CAUSE = "#1a7f37", "#cf222e", "#8250df"

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#1f2328;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.banner{padding:14px 18px;border-radius:8px;color:#fff;font-size:18px;margin:12px 0}
.banner small{display:block;font-size:14px;opacity:.95;margin-top:6px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #d0d7de;padding:3px 6px;text-align:right}
th{background:#f6f8fa} td:first-child,th:first-child{text-align:left}
tr.bad td{background:#ffebe9} tr.div td{background:#ffcecb;font-weight:600}
tr.cause td{background:#fbefff;font-weight:600}
tr.cause td:first-child{border-left:5px solid #8250df}
.causebox{display:inline-block;background:#fff;color:#1f2328;border-radius:6px;padding:8px 12px;
margin-top:8px;font-size:15px;border-left:6px solid #8250df}
.muted{color:#59636e;font-size:13px} img{max-width:100%}
ul{margin:4px 0 0 18px;padding:0} li{margin:2px 0}
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _overview_figure(report: CrossCheckReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.name for layer in report.layers]
    beyond = [100 * layer.beyond_bound for layer in report.layers]
    colors = [_OK if layer.within_bound else _BAD for layer in report.layers]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    bars = ax.bar(names, beyond, color=colors)
    ax.axhline(
        100 * report.max_beyond_bound,
        color="#59636e",
        ls="--",
        lw=1,
        label=f"allowed ({100 * report.max_beyond_bound:.0f} %)",
    )
    kind = "statistical" if report.bound_sigmas else "quantisation"
    ax.set_ylabel(f"% of outputs beyond\nthe {kind} bound")
    ax.plot(
        names if report.bound_sigmas else [],
        [100 * layer.beyond_expected for layer in report.layers] if report.bound_sigmas else [],
        "_",
        color="#1f2328",
        markersize=18,
        mew=2,
        label="expected beyond (device statistics)",
    )
    for bar, layer in zip(bars, report.layers, strict=True):
        if layer.name == report.cause_layer:
            bar.set_edgecolor(_CAUSE)
            bar.set_linewidth(3)
            ax.annotate(
                f"cause: {report.cause_effect or '?'}",
                (bar.get_x() + bar.get_width() / 2, 0),
                xytext=(0, -28),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color=_CAUSE,
                fontweight="bold",
                annotation_clip=False,
            )
    ax.set_ylim(0, max(5.0, 1.15 * max(beyond + [0.0])))
    for bar, layer in zip(bars, report.layers, strict=True):
        label = "OK" if layer.within_bound else "DIVERGES"
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            label,
            ha="center",
            va="bottom",
            fontsize=9,
            color=_OK if layer.within_bound else _BAD,
            fontweight="bold",
        )
    twin = ax.twinx()
    timed = [layer for layer in report.layers if layer.kind != "output"]  # logits have no steps
    unit = "steps" if any(layer.step_size for layer in timed) else "time units"
    errors = [layer.error_mean_steps if unit == "steps" else layer.error_mean for layer in timed]
    twin.plot(
        [layer.name for layer in timed],
        errors,
        "o-",
        color="#0969da",
        label=f"mean |spike-time error| ({unit})",
    )
    twin.set_ylabel(f"mean |spike-time error|\n({unit})", color="#0969da")
    twin.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(
        handles,
        [h.get_label() for h in handles],
        loc="upper left",
        bbox_to_anchor=(1.12, 1.0),
        fontsize=8,
        frameon=False,
    )
    explains = (
        "the device model and quantisation explain"
        if report.bound_sigmas
        else ("quantisation explains")
    )
    ax.set_title(f"Layer by layer: outputs the hardware computes beyond what {explains}")
    return figure_png(fig)


def _attribution_figure(report: CrossCheckReport) -> str:
    """Per stage (stage at a time) and per effect (one off at a time): accuracy loss or
    recovery in percentage points, and mean |logit error| on a second axis."""
    import matplotlib.pyplot as plt

    found = report.attribution
    labelled = report.accuracy_reference is not None
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 3.8), gridspec_kw={"wspace": 1.05, "width_ratios": [1.0, 0.9]}
    )
    stages = found["layers"]
    names = [c["name"] for c in stages]
    key, what = ("accuracy_loss", "accuracy loss") if labelled else ("disagreement", "disagreement")
    losses = [100 * (c[key] or 0.0) for c in stages]
    colors = [_CAUSE if c["name"] == report.cause_layer else "#8c959f" for c in stages]
    positions = np.arange(len(names))
    left.bar(positions - 0.2, losses, width=0.4, color=colors, label=f"{what} (percentage points)")
    left.set_xticks(positions, names)
    left.set_ylabel(f"{what}\n(percentage points)")
    left.axhline(0, color="#59636e", lw=0.8)
    twin = left.twinx()
    twin.bar(
        positions + 0.2,
        [c["logit_error_mean"] for c in stages],
        width=0.4,
        color="#0969da",
        alpha=0.55,
        label="mean |logit error| (logit units)",
    )
    twin.set_ylabel("mean |logit error|\n(logit units)", color="#0969da")
    left.set_title("Per stage: that stage alone on the hardware", fontsize=10)
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(
        handles,
        [h.get_label() for h in handles],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        fontsize=8,
        ncol=1,
        frameon=False,
    )
    effects = found["effects"]
    if effects:
        labels = [e["effect"] for e in effects]
        rkey = "accuracy_recovered" if labelled else "disagreement_recovered"
        recovered = [100 * (e[rkey] or 0.0) for e in effects]
        ypos = np.arange(len(labels))
        colors = [_CAUSE if e["effect"] == report.cause_effect else "#8c959f" for e in effects]
        right.barh(ypos, recovered, color=colors)
        right.set_yticks(ypos, labels, fontsize=8)
        right.invert_yaxis()
        right.axvline(0, color="#59636e", lw=0.8)
        rwhat = "accuracy" if labelled else "agreement"
        right.set_xlabel(f"{rwhat} recovered with the effect off (percentage points)", fontsize=9)
        for y, e in zip(ypos, effects, strict=True):
            right.annotate(
                f"logit error {-e['logit_error_recovered']:+.2g}",
                (1.02, y),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=7,
                color="#0969da",
                annotation_clip=False,
            )
    else:
        right.text(0.5, 0.5, "no effect to switch off", ha="center", va="center")
        right.set_xticks([])
        right.set_yticks([])
    right.set_title("Per effect: switched off one at a time (whole network)", fontsize=10)
    return figure_png(fig)


def _histogram_figure(report: CrossCheckReport) -> str:
    import matplotlib.pyplot as plt

    layers = report.layers
    fig, axes = plt.subplots(1, len(layers), figsize=(3.0 * len(layers), 2.6), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        edges = np.array(layer.histogram["edges"])
        counts = np.array(layer.histogram["counts"])
        if layer.error_max == 0:
            ax.text(
                0.5,
                0.5,
                "no error",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color=_OK,
                fontsize=11,
            )
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.bar(
                edges[:-1],
                counts,
                width=np.diff(edges),
                align="edge",
                color=_OK if layer.within_bound else _BAD,
            )
            if counts.max(initial=0) > 50:
                ax.set_yscale("log")
        unit = "logit" if layer.kind == "output" else "time units"
        ax.set_title(f"{layer.name}", fontsize=10)
        ax.set_xlabel(f"reference − hardware ({unit})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("neuron outputs")
    fig.tight_layout()
    return figure_png(fig)


def _scatter_figure(report: CrossCheckReport) -> str:
    import matplotlib.pyplot as plt

    data = report.plots.get("layers", {})
    names = [layer.name for layer in report.layers if layer.name in data]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        d = data[name]
        t_min, t_max = d["window"]
        ref, hw = d["reference"], d["hardware"]
        both = np.isfinite(ref) & np.isfinite(hw)
        ax.plot([t_min, t_max], [t_min, t_max], color="#8c959f", lw=1)
        ax.scatter(ref[both], hw[both], s=3, alpha=0.4, color="#0969da", label="both fire")
        edge = t_max + 0.04 * (t_max - t_min)
        missing = np.isfinite(ref) & ~np.isfinite(hw)
        extra = ~np.isfinite(ref) & np.isfinite(hw)
        ax.scatter(
            ref[missing],
            np.full(missing.sum(), edge),
            s=6,
            color=_BAD,
            marker="v",
            label="missing on hardware",
        )
        ax.scatter(
            np.full(extra.sum(), edge),
            hw[extra],
            s=6,
            color="#9a6700",
            marker="<",
            label="extra on hardware",
        )
        ax.set_xlim(t_min, edge + 0.02 * (t_max - t_min))
        ax.set_ylim(t_min, edge + 0.02 * (t_max - t_min))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("reference spike time (time units)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("hardware spike time (time units)")
    # The legend goes under the panels, outside the data (spikes fill the corners).
    fig.legend(
        *axes[0][0].get_legend_handles_labels(),
        fontsize=7,
        loc="lower center",
        ncol=3,
        bbox_to_anchor=(0.5, -0.02),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return figure_png(fig)


def _raster_figure(report: CrossCheckReport) -> str:
    import matplotlib.pyplot as plt

    raster = report.plots["raster"]
    fig, ax = plt.subplots(figsize=(10, 4))
    offset = 0
    ticks, labels = [], []
    for name, window in raster["windows"].items():
        if name not in raster["reference"]:
            continue
        ref, hw = raster["reference"][name], raster["hardware"][name]
        idx = np.arange(ref.size) + offset
        ax.fill_between(window, offset - 2, offset + ref.size + 2, color="#eaeef2", zorder=0, lw=0)
        ax.scatter(
            ref[np.isfinite(ref)],
            idx[np.isfinite(ref)],
            s=10,
            facecolors="none",
            edgecolors="#0969da",
            linewidths=0.6,
            label="reference" if offset == 0 else None,
        )
        ax.scatter(
            hw[np.isfinite(hw)],
            idx[np.isfinite(hw)],
            s=3,
            color=_BAD,
            label="hardware" if offset == 0 else None,
        )
        ticks.append(offset + ref.size / 2)
        labels.append(name)
        offset += ref.size + 8
        ax.axhline(offset - 4, color="#d0d7de", lw=0.6)
    ax.set_yticks(ticks, labels)
    ax.set_ylabel("layer (one row per neuron)")
    ax.set_xlabel("time (time units)")
    ax.set_title(
        "Spike raster of the first sample: reference (rings) and hardware (dots); "
        "grey: each layer's window",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def _metrics_table(report: CrossCheckReport) -> str:
    """NeuroBench-style metrics per layer and in total (ops are per inference)."""
    metrics = report.metrics
    if not metrics:
        return ""
    kind = metrics["op_kind"]
    cols = (
        "layer", "neurons", "synapses", f"effective {kind}s", "dense ops",
        "activation sparsity (per step)", "activation sparsity (per inference)",
        "connection sparsity", "footprint",
    )  # fmt: skip

    def footprint(m) -> str:
        if m.get("footprint_bytes") is not None:
            return f"{m['footprint_bytes']:.0f} B"
        if m.get("footprint_devices") is not None:
            return f"{m['footprint_devices']:.0f} devices"
        return "–"

    def row(name, m) -> str:
        cells = (
            name,
            str(m.get("neurons", "")),
            f"{m['synapses']:,}",
            f"{m['effective_ops']:,.0f}",
            f"{m['dense_ops']:,.0f}",
            _pct(m.get("activation_sparsity")),
            _pct(m.get("activation_sparsity_per_inference")),
            _pct(m.get("connection_sparsity")),
            footprint(m),
        )
        return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"

    header = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    rows = [row(m["name"], m) for m in metrics["layers"]]
    rows.append(row("total", {"neurons": "", **metrics["total"]}))
    return (
        "<h2>NeuroBench-style metrics</h2><p class='muted'>Per inference, mean over "
        f"{metrics['samples']} samples; definitions of NeuroBench (Yik et al., Nature "
        "Communications 2025): effective operations are the synaptic operations the "
        "hardware performs (ACs: one per spike and synapse; MACs: one per crossbar "
        "weight read), dense operations those of the same network run densely.</p>"
        f"<table>{header}{''.join(rows)}</table>"
    )


_ENERGY_PARTS = (
    ("synaptic_ops", "synaptic operations"),
    ("active_neuron_updates", "active neuron updates"),
    ("inactive_neuron_updates", "inactive neuron updates"),
    ("spikes", "spikes routed"),
)


def _energy_table(report: CrossCheckReport) -> str:
    """The energy per inference by kind of operation, with the figures' source."""
    breakdown = report.energy_breakdown
    if not breakdown:
        return ""
    header = (
        "<tr><th>operation</th><th>count per inference</th><th>energy per operation</th>"
        "<th>energy per inference</th><th>share</th></tr>"
    )
    total = sum(breakdown["energy_j"].values())
    rows = []
    for key, label in _ENERGY_PARTS:
        energy = breakdown["energy_j"][key]
        rows.append(
            f"<tr><td>{label}</td><td>{breakdown['counts'][key]:,.1f}</td>"
            f"<td>{breakdown['per_operation_j'][key] * 1e12:.4g} pJ</td>"
            f"<td>{energy * 1e9:.4g} nJ</td><td>{_pct(energy / total if total else None)}</td></tr>"
        )
    rows.append(f"<tr><td>total</td><td></td><td></td><td>{total * 1e9:.4g} nJ</td><td></td></tr>")
    source = breakdown.get("figures_from") or "no source given in the profile"
    return (
        "<h2>Energy per inference</h2><p class='muted'>Mean over "
        f"{report.samples} samples. Energies per operation: {html.escape(source)}.</p>"
        f"<table>{header}{''.join(rows)}</table>"
    )


def crosscheck_html(report: CrossCheckReport) -> str:
    """The whole page as a string."""
    ok = report.ok
    if ok:
        headline = "The hardware computes what the reference SNN computes."
    elif report.divergence_layer:
        headline = (
            "The hardware diverges from the reference SNN at layer "
            f"<b>{html.escape(report.divergence_layer)}</b>."
        )
    elif report.cause_layer:
        headline = (
            "Every stage stays within its bound, but the hardware's effects cost too much: "
            f"the cause is <b>{html.escape(report.cause_effect or 'not found')}</b> in "
            f"<b>{html.escape(report.cause_layer)}</b>."
        )
    else:
        headline = "The hardware diverges from the reference SNN."
    cause = ""
    if report.attribution is not None:
        cause = (
            "<div class='causebox'>Cause layer <b>"
            + html.escape(report.cause_layer or "none")
            + "</b> · cause effect <b>"
            + html.escape(report.cause_effect or "none")
            + "</b><br><span class='muted'>"
            + "<br>".join(html.escape(line) for line in cause_lines(report))
            + "</span></div>"
        )
    statistical = bound_line(report)
    if statistical:
        cause += f"<small>{html.escape(statistical[0].upper() + statistical[1:])}</small>"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report.reasons)
    reasons_block = f"<ul>{reasons}</ul>" if reasons else ""
    summary_rows = [
        ("Model", report.model),
        ("Profile", f"{report.profile} ({report.hardware})"),
        ("Backend", report.backend),
        ("Samples", report.samples),
        (
            "Accuracy reference / hardware",
            f"{_pct(report.accuracy_reference)} / {_pct(report.accuracy_hardware)}",
        ),
        (
            "Prediction agreement",
            f"{_pct(report.agreement)} (required {_pct(report.required_agreement)})",
        ),
        (
            "Logit error mean / max",
            f"{_fmt(report.logit_error_mean)} / {_fmt(report.logit_error_max)}",
        ),
        ("Divergence layer", report.divergence_layer or "none"),
        ("Cause layer", report.cause_layer or "none"),
        ("Cause effect", report.cause_effect or "none"),
        (
            "Bound",
            f"statistical: {report.bound_sigmas:g} sigma of the device model + quantisation"
            if report.bound_sigmas
            else "quantisation",
        ),
        (
            "Latency per inference",
            "–" if report.latency_s is None else f"{report.latency_s * 1e6:.4g} µs",
        ),
        (
            "Energy per inference",
            "–" if report.energy_j is None else f"{report.energy_j * 1e9:.4g} nJ",
        ),
    ]
    summary = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary_rows
    )
    header = (
        "<tr><th>layer</th><th>kind</th><th>neurons</th><th>window</th><th>step</th>"
        "<th>mean |err|</th><th>max |err|</th><th>max |err| (steps)</th>"
        "<th>bound max</th><th>beyond bound</th><th>expected beyond</th><th>missing</th>"
        "<th>extra</th><th>saturated</th><th>overflow</th><th>own accuracy loss</th>"
        "<th>own logit error</th><th>status</th></tr>"
    )
    rows = []
    for layer in report.layers:
        css = (
            "div"
            if layer.name == report.divergence_layer
            else ("" if layer.within_bound else "bad")
        )
        if layer.name == report.cause_layer:
            css = (css + " cause").strip()
        status = "within bound" if layer.within_bound else "DIVERGES"
        if layer.name == report.cause_layer:
            status += f" · CAUSE ({html.escape(report.cause_effect or 'effect not found')})"
        window = f"[{layer.window[0]:.3g}, {layer.window[1]:.3g}]"
        rows.append(
            f"<tr class='{css}'><td>{html.escape(layer.name)}</td><td>{layer.kind}</td>"
            f"<td>{layer.neurons}</td><td>{window}</td><td>{_fmt(layer.step_size)}</td>"
            f"<td>{_fmt(layer.error_mean)}</td><td>{_fmt(layer.error_max)}</td>"
            f"<td>{_fmt(layer.error_max_steps)}</td><td>{_fmt(layer.bound_max)}</td>"
            f"<td>{_pct(layer.beyond_bound)}</td><td>{_pct(layer.beyond_expected)}</td>"
            f"<td>{layer.missing_spikes}</td>"
            f"<td>{layer.extra_spikes}</td><td>{layer.saturated}</td><td>{layer.overflow}</td>"
            f"<td>{_pct(layer.own_accuracy_loss)}</td><td>{_fmt(layer.own_logit_error)}</td>"
            f"<td>{status}</td></tr>"
        )
    figures = []
    if report.attribution is not None:
        figures.append(
            (
                "What costs the accuracy: attribution",
                _attribution_figure(report),
                "Left: the network run exactly except one stage, computed as the hardware "
                "computes it; the bars give what that stage's own effects cost. Right: the "
                "deployment rebuilt from its profile and seed with one effect switched off; "
                "the bars give what that recovers. Purple: the cause layer and cause effect.",
            )
        )
    figures += [
        (
            "Where the hardware diverges",
            _overview_figure(report),
            "Each layer is fed the hardware's own inputs and computed exactly; the bars show the "
            "share of its outputs the hardware gets wrong by more than quantisation (steps, weight "
            "resolution, converters) explains"
            + (
                f" plus {report.bound_sigmas:g} standard deviations of the device model's "
                "predicted spread (programming and read noise, drift, variability); the black "
                "marks give the share that spread itself leaves beyond"
                if report.bound_sigmas
                else ""
            )
            + ". The first red layer is where the hardware diverges.",
        ),
        (
            "Spike-time error per layer (reference − hardware)",
            _histogram_figure(report),
            "End-to-end error against the reference on the same samples, in each layer's time "
            "units; the output layer in logits.",
        ),
        (
            "Reference against hardware spike times",
            _scatter_figure(report),
            "Points on the diagonal agree; markers at the top edge are spikes the hardware lost, "
            "at the right edge spikes it added.",
        ),
        ("Spike raster", _raster_figure(report), ""),
    ]
    figure_html = "".join(
        f"<h2>{html.escape(title)}</h2><p class='muted'>{html.escape(text)}</p>"
        f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
        for title, png, text in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>neurodeploy cross-check: {html.escape(report.model)} on {html.escape(report.profile)}</title>
<style>{_STYLE}</style></head><body>
<h1>Cross-check: {html.escape(report.model)} on {html.escape(report.profile)}
({html.escape(report.backend)})</h1>
<div class="muted">neurodeploy cross-check report, schema version {report.schema_version}</div>
<div class="banner" style="background:{_OK if ok else _BAD}">{"OK" if ok else "NOT OK"}:
{headline}{"" if ok else "<small>" + reasons_block + "</small>"}{cause}</div>
<table>{summary}</table>
<h2>Layers</h2><table>{header}{"".join(rows)}</table>
{_energy_table(report)}
{_metrics_table(report)}
{figure_html}
</body></html>
"""
