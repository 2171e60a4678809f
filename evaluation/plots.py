"""The report's plots, drawn from a typed report (evaluation/schema.py) and, where a threshold is
drawn, its decision: `draw(key, report, decision=None)` gives PNG bytes (None when the report has
no data for it), `figure(key, report, decision=None)` the matplotlib Figure.

Uses `matplotlib.figure.Figure` directly (no pyplot): no global state, safe in worker threads,
no display needed. Every text is drawn literally (`parse_math=False`): a model folder or task
name with `$`, `^` or `\\` is a name, not math text, and must not stop the report (issue #11).
Long names wrap, task bars run horizontally so any number of tasks and names of any length stay
legible, and every estimate with an interval carries it as an error bar.

    retention_per_task(report)   horizontal bars: retention per task, primary vs baselines, with intervals
    regression_vs_base(report)   horizontal bars: merged - base on each general task, with intervals
    baseline_differences(report) horizontal bars: primary - baseline, mean retention and mean regression
    retention_and_dropped(report) per fine-tune: retention beside the fraction sign election dropped
    dropped_by_layer(report)     lines: fraction of kept deltas dropped by sign election, per model by layer
    delta_norms(report)          bars: relative delta norm per model, and their cosine similarities

The two sign-election plots cover only merges whose method elects signs
(`evaluation.metrics.SIGN_ELECTING_METHODS`; the others have no sign-conflict proxy).

    python -m mergeline.evaluation.plots report.json OUT_DIR     # write the PNGs
"""
from __future__ import annotations

import io
import math
import sys
import textwrap
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.text import Text

from mergeline.evaluation.schema import CompatSummary, Decision, EvaluationReport
from mergeline.evaluation.tables import Ival, candidate_order, elects_signs, ival, per_model

COLORS = ["#1f6fb4", "#e8862a", "#2e9e57", "#c4393b", "#8c62b8", "#8a5a4d", "#d36fb9", "#7b7b7b"]
ERRORBAR = {"ecolor": "#1d2330", "elinewidth": 1.0, "capsize": 3, "capthick": 1.0}
WRAP = 26  # characters per line of a tick or legend label


def _wrap(name, width: int = WRAP) -> str:
    """A long name broken over lines (also inside a word) so it cannot run into its neighbours."""
    return "\n".join(textwrap.wrap(str(name), width, break_long_words=True, break_on_hyphens=False)) or str(name)


def _lines(name, width: int = WRAP) -> int:
    return _wrap(name, width).count("\n") + 1


def _figure(width: float, height: float) -> Figure:
    # Constrained layout makes room for wrapped tick labels, titles and an outside legend; the
    # extra space between panels keeps their outermost x labels apart.
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(wspace=0.08)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _literal(fig: Figure) -> None:
    """Draw every text as written: no math-text parsing of `$...$` in names."""
    for ax in fig.findobj(Axes):
        # get_major_ticks() creates the ticks of the (fixed) name labels now, so they can be set;
        # a tick matplotlib adds later, when drawing, copies no parse_math but shows a number.
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                tick.label1.set_parse_math(False)
                tick.label2.set_parse_math(False)
    for t in fig.findobj(Text):
        t.set_parse_math(False)


def _confidence(report: EvaluationReport) -> str:
    return f"{report.confidence:.0%} interval"


def _has_bounds(v) -> bool:
    return isinstance(v, Ival) and v.estimate is not None and v.low is not None and v.high is not None


def _hbars(ax, groups: list[str], series: dict[str, list], colors: list[str] | None = None, digits: int = 2) -> None:
    """Grouped horizontal bars, one group per entry of `groups` (first on top), one bar per series;
    Ival values get error bars and a value label beyond the bar's upper bound."""
    n = max(len(series), 1)
    h = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        ys = [g + (i - (n - 1) / 2) * h for g in range(len(groups))]
        est = [v.estimate if isinstance(v, Ival) and v.estimate is not None else 0.0 for v in values]
        lo = [v.estimate - v.low if _has_bounds(v) else math.nan for v in values]
        hi = [v.high - v.estimate if _has_bounds(v) else math.nan for v in values]
        color = (colors or COLORS)[i % len(colors or COLORS)]
        xerr = [lo, hi] if any(_has_bounds(v) for v in values) else None  # no empty error bars
        ax.barh(ys, est, h * 0.9, xerr=xerr, color=color, label=_wrap(name), error_kw=ERRORBAR)
        for y, v in zip(ys, values):
            if not isinstance(v, Ival) or v.estimate is None:
                ax.annotate("n/a", (0, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
                continue
            right = v.high if _has_bounds(v) else v.estimate
            left = v.low if _has_bounds(v) else v.estimate
            x, dx, ha = (max(right, v.estimate), 3, "left") if v.estimate >= 0 else (min(left, v.estimate), -3, "right")
            ax.annotate(f"{v.estimate:+.{digits}f}" if v.estimate < 0 else f"{v.estimate:.{digits}f}", (x, y),
                        xytext=(dx, 0), textcoords="offset points", ha=ha, va="center", fontsize=7)
    ax.set_yticks(range(len(groups)), [_wrap(g) for g in groups], fontsize=8)
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(6))  # few x labels: side-by-side panels keep apart
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _xlim(ax, series: dict[str, list], include: tuple[float, ...]) -> None:
    """Room for the bars, their intervals and their value labels."""
    xs = list(include)
    for values in series.values():
        for v in values:
            if isinstance(v, Ival) and v.estimate is not None:
                xs += [v.estimate] + ([v.low, v.high] if _has_bounds(v) else [])
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.14 or 0.1
    ax.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)


def _bar_height(groups: list[str], n_series: int) -> float:
    """Inches for a horizontal bar chart: enough per bar and per wrapped label line."""
    per_group = [max(0.22 * n_series + 0.12, 0.17 * _lines(g) + 0.1) for g in groups]
    return 1.3 + sum(per_group)


def _per_task(report: EvaluationReport, section: str, field: str, interval_key: str,
              signed: bool) -> tuple[list[str], dict]:
    """The primary candidate's tasks in `section`, and each candidate's value (Ival) per task."""
    tasks = [r.task for r in getattr(report.candidates[report.primary], section)]
    series = {}
    for c in candidate_order(report):
        rows = {r.task: r for r in getattr(report.candidates[c], section)}
        series[c] = [ival(getattr(rows[t], field), getattr(rows[t], interval_key), signed) if t in rows else None
                     for t in tasks]
    return tasks, series


def _task_chart(report: EvaluationReport, section: str, field: str, interval_key: str, signed: bool):
    tasks, series = _per_task(report, section, field, interval_key, signed)
    if not tasks:
        return None
    fig = _figure(9.5, _bar_height(tasks, len(series)))
    ax = fig.subplots()
    _hbars(ax, tasks, series, digits=3 if signed else 2)  # a small difference must not read -0.00
    fig.legend(loc="outside right upper", fontsize=8, title="candidate", title_fontsize=8)
    return fig, ax, series


def retention_per_task(report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    chart = _task_chart(report, "retention", "retention", "retention_interval", signed=False)
    if chart is None:
        return None
    fig, ax, series = chart
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.annotate("= fine-tune", (1.0, 1.0), xycoords=("data", "axes fraction"), xytext=(2, 2),
                textcoords="offset points", fontsize=8, va="bottom")
    _xlim(ax, series, (0.0, 1.0))
    ax.set_xlabel(f"retention (merged / fine-tune); bars: {_confidence(report)}")
    ax.set_title("Retention per task: primary vs baselines", fontsize=11)
    return fig


def regression_vs_base(report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    chart = _task_chart(report, "regression", "delta", "delta_interval", signed=True)
    if chart is None:
        return None
    fig, ax, series = chart
    ax.axvline(0.0, color="black", lw=0.8)
    _xlim(ax, series, (-0.05, 0.05))
    ax.set_xlabel(f"merged − base (below 0: worse than base); bars: {_confidence(report)}")
    ax.set_title("Regression vs base on general tasks", fontsize=11)
    return fig


def _baseline_threshold(decision: Decision | None, baseline: str) -> float | None:
    check = decision.check(f"baseline[{baseline}]") if decision is not None else None
    return None if check is None else check.threshold


def baseline_differences(report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    comps = report.baselines.comparisons
    if not comps:
        return None
    p = report.primary
    names = [c.baseline for c in comps]
    fig = _figure(11, _bar_height(names, 1) + 0.5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (field, key, label) in zip(axes, [("difference", "difference_interval", "mean retention"),
                                              ("regression_difference", "regression_difference_interval",
                                               "mean regression")]):
        series = {p: [ival(getattr(c, field), getattr(c, key), signed=True) for c in comps]}
        _hbars(ax, names, series, digits=3)
        ax.axvline(0.0, color="black", lw=0.8)
        _xlim(ax, series, (-0.05, 0.05))
        ax.set_xlabel(f"{label}: primary − baseline", fontsize=9)
        ax.set_title(f"{label} difference", fontsize=10)
    for i, name in enumerate(names):
        t = _baseline_threshold(decision, name)
        if t is not None:
            axes[0].plot([t, t], [i - 0.45, i + 0.45], color="#c4393b", lw=1.5, ls=":")
    axes[1].tick_params(labelleft=False)
    fig.suptitle(f"{_wrap(p, 60)} against each baseline (above 0: {_wrap(p, 60)} better); bars: "
                 f"{_confidence(report)}", fontsize=10)
    return fig


def retention_and_dropped(report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    cands = [c for c in candidate_order(report) if elects_signs(report, c) and per_model(report, c)]
    if not cands:
        return None
    heights = [_bar_height([m.finetune for m in per_model(report, c)], 1) + 0.3 for c in cands]
    fig = _figure(10, sum(heights))
    for sub, c in zip(fig.subfigures(len(cands), 1, height_ratios=heights, squeeze=False)[:, 0], cands):
        rows = per_model(report, c)
        names = [m.finetune for m in rows]
        ret = {c: [ival(m.retention, m.retention_interval) for m in rows]}
        drop = {c: [ival(m.dropped_fraction_of_kept) for m in rows]}
        ax_r, ax_d = sub.subplots(1, 2, sharey=True)
        _hbars(ax_r, names, ret, colors=["#1f6fb4"])
        _hbars(ax_d, names, drop, colors=["#8c62b8"])
        ax_r.axvline(1.0, color="black", lw=0.8, ls="--")
        _xlim(ax_r, ret, (0.0, 1.0))
        _xlim(ax_d, drop, (0.0,))
        ax_d.tick_params(labelleft=False)
        ax_r.set_title(f"retention ({_confidence(report)})", fontsize=9)
        ax_d.set_title("kept deltas dropped by sign election", fontsize=9)
        ax_r.set_xlabel("mean retention on its tasks", fontsize=8)
        ax_d.set_xlabel("fraction of kept", fontsize=8)
        sub.suptitle(f"{_wrap(c, 60)}: each fine-tune's retention beside what sign election dropped", fontsize=10)
    return fig


def _layer_order(key: str) -> tuple:
    if key.isdigit():
        return (1, int(key), "")
    return ({"embed": 0, "other": 2, "head": 3}.get(key, 2), 0, key)


def dropped_by_layer(report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    cands = [c for c in candidate_order(report) if elects_signs(report, c) and report.candidates[c].signs.per_layer]
    if not cands:
        return None
    fig = _figure(10, 3.2 * len(cands) + 0.4)
    axes = fig.subplots(len(cands), 1, squeeze=False)[:, 0]
    handles = {}
    for ax, c in zip(axes, cands):
        per_layer = report.candidates[c].signs.per_layer
        top = max([v for vs in per_layer.values() for v in vs.values() if v is not None] + [0.05]) * 1.1
        layers = sorted(per_layer, key=_layer_order)
        models = list(dict.fromkeys(m for layer in layers for m in per_layer[layer]))
        for i, m in enumerate(models):
            ys = [per_layer[layer].get(m) for layer in layers]
            (line,) = ax.plot(range(len(layers)), [math.nan if y is None else y for y in ys], marker="o", ms=3,
                              color=COLORS[i % len(COLORS)], label=_wrap(m))
            handles.setdefault(_wrap(m), line)
        step = max(1, math.ceil(len(layers) / 40))  # at most 40 labels along the axis
        ax.set_xticks(range(0, len(layers), step), [_wrap(layers[k], 10) for k in range(0, len(layers), step)],
                      fontsize=7, rotation=90 if len(layers) > 16 else 0)
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of kept\ndeltas dropped", fontsize=8)
        ax.set_ylim(-0.04 * top, top)  # a line at 0 stays visible above the axis
        ax.set_title(f"{_wrap(c, 60)}: dropped by sign election, per model by layer", fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, title="model",
               title_fontsize=8)
    return fig


def delta_norms(report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    if not isinstance(report.compat, CompatSummary) or not report.compat.norms.per_model:
        return None
    per_model_norms, cos = report.compat.norms.per_model, report.compat.norms.cosine
    names = list(per_model_norms)
    side = max(3.5, 0.5 * len(names) + 2.2)
    fig = _figure(5.5 + (side + 1 if cos else 0), max(_bar_height(names, 1), side if cos else 0))
    axes = fig.subplots(1, 2 if cos else 1, squeeze=False, width_ratios=[5.5, side + 1] if cos else None)[0]
    rel = {"relative delta": [ival(per_model_norms[n].get("relative_delta")) for n in names]}
    _hbars(axes[0], names, rel, colors=["#1f6fb4"], digits=3)
    _xlim(axes[0], rel, (0.0,))
    axes[0].set_xlabel("‖θᵢ − θ₀‖ / ‖θ₀‖")
    axes[0].set_title("Relative delta norm per model", fontsize=10)
    if cos:
        import numpy as np
        mat = np.array([[cos.get(a, {}).get(b, 1.0 if a == b else np.nan) for b in names] for a in names], dtype=float)
        im = axes[1].imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        axes[1].set_xticks(range(len(names)), [_wrap(n, 16) for n in names], rotation=90, fontsize=7)
        axes[1].set_yticks(range(len(names)), [_wrap(n, 16) for n in names], fontsize=7)
        if len(names) <= 10:
            for i in range(len(names)):
                for j in range(len(names)):
                    if not np.isnan(mat[i, j]):
                        # White on the saturated end of the colour map, black elsewhere, so it stays legible.
                        axes[1].text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                     color="white" if abs(mat[i, j]) > 0.6 else "black")
        axes[1].set_title("Cosine similarity of task vectors", fontsize=10)
        fig.colorbar(im, ax=axes[1], fraction=0.046)
    return fig


PLOTS = {
    "retention": ("Retention per task (primary vs baselines)", retention_per_task),
    "regression": ("Regression vs base", regression_vs_base),
    "baseline": ("Primary against each baseline", baseline_differences),
    "retention_and_dropped": ("Retention beside the fraction dropped by sign election, per fine-tune",
                              retention_and_dropped),
    "dropped_by_layer": ("Dropped by sign election, per model by layer", dropped_by_layer),
    "delta_norms": ("Delta norms (compatibility report)", delta_norms),
}


def figure(key: str, report: EvaluationReport, decision: Decision | None = None) -> Figure | None:
    """The plot `key` of PLOTS as a Figure, every text literal; None when the report has no data."""
    fig = PLOTS[key][1](report, decision)
    if fig is not None:
        _literal(fig)
    return fig


def draw(key: str, report: EvaluationReport, decision: Decision | None = None) -> bytes | None:
    """The plot `key` as PNG bytes (None when the report has no data for it)."""
    fig = figure(key, report, decision)
    return None if fig is None else _png(fig)


def all_plots(report: EvaluationReport, decision: Decision | None = None) -> dict[str, bytes | None]:
    return {key: draw(key, report, decision) for key in PLOTS}


if __name__ == "__main__":
    from mergeline.evaluation.report import load_outputs

    (rep, dec), out = load_outputs(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for key, png in all_plots(rep, dec).items():
        if png:
            (out / f"{key}.png").write_bytes(png)
            print(out / f"{key}.png")
