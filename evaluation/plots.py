"""The report's plots, drawn from a report dict, returned as PNG bytes (None when no data).

Uses `matplotlib.figure.Figure` directly (no pyplot): no global state, safe in worker threads,
no display needed.

    retention_per_task(report)   grouped bars: retention per task, primary vs baselines
    regression_vs_base(report)   grouped bars: merged - base on each general task
    dropped_by_layer(report)     lines: fraction of kept deltas dropped by sign election, per model by layer
    delta_norms(report)          bars: relative delta norm per model, and their cosine similarities

    python -m evaluation.plots report.json OUT_DIR     # write the PNGs
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

COLORS = ["#1f6fb4", "#e8862a", "#2e9e57", "#c4393b", "#8c62b8", "#8a5a4d", "#d36fb9", "#7b7b7b"]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _candidates(report: dict) -> list[str]:
    """Primary first, then the baselines in report order."""
    p = report["primary"]
    return [p] + [n for n in report["candidates"] if n != p]


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [0.0 if v is None else v for v in values]
        bars = ax.bar(xs, ys, width, label=name, color=COLORS[i % len(COLORS)])
        for b, v in zip(bars, values):
            label = "n/a" if v is None else f"{v:.2f}"
            y = b.get_height()
            ax.annotate(label, (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom" if y >= 0 else "top", fontsize=7, xytext=(0, 2 if y >= 0 else -2),
                        textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")


def _per_task(report: dict, section: str, field: str) -> tuple[list[str], dict[str, list]]:
    """The primary candidate's tasks in `section`, and each candidate's `field` per task."""
    tasks = [r["task"] for r in report["candidates"][report["primary"]][section]]
    series = {}
    for c in _candidates(report):
        by_task = {r["task"]: r[field] for r in report["candidates"][c][section]}
        series[c] = [by_task.get(t) for t in tasks]
    return tasks, series


def _task_bars(report: dict, section: str, field: str, height: float):
    """(figure, axes, series) with one group of bars per task, one bar per candidate; None when
    the report has no such tasks."""
    tasks, series = _per_task(report, section, field)
    if not tasks:
        return None
    fig = Figure(figsize=(max(6, 1.6 * len(tasks) + 2), height))
    ax = fig.subplots()
    _grouped_bars(ax, tasks, series)
    return fig, ax, series


def retention_per_task(report: dict) -> bytes | None:
    chart = _task_bars(report, "retention", "retention", 3.8)
    if chart is None:
        return None
    fig, ax, series = chart
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.text(-0.5, 1.0, " = fine-tune", va="bottom", ha="left", fontsize=8)
    top = max([v for s in series.values() for v in s if v is not None] + [1.0])
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("retention (merged / fine-tune)")
    ax.set_title("Retention per task: primary vs baselines")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def regression_vs_base(report: dict) -> bytes | None:
    chart = _task_bars(report, "regression", "delta", 3.4)
    if chart is None:
        return None
    fig, ax, series = chart
    ax.axhline(0.0, color="black", lw=0.8)
    vals = [abs(v) for s in series.values() for v in s if v is not None]
    lim = max(vals + [0.05]) * 1.3
    ax.set_ylim(-lim, lim)
    ax.set_ylabel("merged − base")
    ax.set_title("Regression vs base on general tasks (below 0 = worse than base)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _layer_order(key: str) -> tuple:
    if key.isdigit():
        return (1, int(key))
    return ({"embed": 0, "other": 2, "head": 3}.get(key, 2), key)


def dropped_by_layer(report: dict) -> bytes | None:
    cands = [c for c in _candidates(report) if report["candidates"][c]["sign_conflict"].get("per_layer")]
    if not cands:
        return None
    fig = Figure(figsize=(4.2 * len(cands) + 1.5, 3.4))
    axes = fig.subplots(1, len(cands), squeeze=False, sharey=True)[0]
    for ax, c in zip(axes, cands):
        per_layer = report["candidates"][c]["sign_conflict"]["per_layer"]
        layers = sorted(per_layer, key=_layer_order)
        models = list(dict.fromkeys(m for l in layers for m in per_layer[l]))
        for i, m in enumerate(models):
            ys = [per_layer[l].get(m) for l in layers]
            ax.plot(range(len(layers)), [float("nan") if y is None else y for y in ys], marker="o",
                    label=m, color=COLORS[i % len(COLORS)])
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"{c}: dropped by sign election", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of kept deltas dropped")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def delta_norms(report: dict) -> bytes | None:
    norms = (report.get("compat") or {}).get("norms") or {}
    per_model = norms.get("per_model") or {}
    if not per_model:
        return None
    cos = norms.get("cosine") or {}
    names = list(per_model)
    fig = Figure(figsize=(10 if cos else 5.5, 3.6))
    axes = fig.subplots(1, 2 if cos else 1, squeeze=False)[0]
    rel = [per_model[n].get("relative_delta") or 0.0 for n in names]
    bars = axes[0].bar(names, rel, color=[COLORS[i % len(COLORS)] for i in range(len(names))])
    for b, v in zip(bars, rel):
        axes[0].annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("‖θᵢ − θ₀‖ / ‖θ₀‖")
    axes[0].set_title("Relative delta norm per model")
    axes[0].tick_params(axis="x", labelrotation=20)
    if cos:
        import numpy as np
        mat = np.array([[cos.get(a, {}).get(b, 1.0 if a == b else np.nan) for b in names] for a in names], dtype=float)
        im = axes[1].imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        axes[1].set_xticks(range(len(names)), names, rotation=20)
        axes[1].set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(mat[i, j]):
                    # White on the saturated end of the colour map, black elsewhere, so it stays legible.
                    axes[1].text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                 color="white" if abs(mat[i, j]) > 0.6 else "black")
        axes[1].set_title("Cosine similarity of task vectors")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
    return _png(fig)


PLOTS = {
    "retention": ("Retention per task (primary vs baselines)", retention_per_task),
    "regression": ("Regression vs base", regression_vs_base),
    "dropped_by_layer": ("Dropped by sign election, per model by layer", dropped_by_layer),
    "delta_norms": ("Delta norms (compatibility report)", delta_norms),
}


def all_plots(report: dict) -> dict[str, bytes | None]:
    return {key: fn(report) for key, (_, fn) in PLOTS.items()}


if __name__ == "__main__":
    rep, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for key, png in all_plots(rep).items():
        if png:
            (out / f"{key}.png").write_bytes(png)
            print(out / f"{key}.png")
