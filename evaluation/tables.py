"""The report as a document: sections of paragraphs, tables and plots, built once from a report
and its decision (evaluation/schema.py) and rendered by both report.md (`evaluation.render`) and
report.html (`evaluation.html_report`), so the two always say the same thing (issue #13: one
table model for Markdown and HTML).

A table cell is a plain value (None, bool, int, float, str) or one of:
    Ival(estimate, low, high)   a number with its interval, shown "0.925 [0.801, 0.974]"
    Status("inconclusive")      a verdict or check status, drawn as a coloured badge in HTML
    Code("/long/path")          a path or hash: monospace, wrapped anywhere

Renderers escape every cell; nothing here is markup. Without a decision (no policy given) the
Decision section says so.

    python -m mergeline.evaluation.tables report.json      # print the document as plain text
                                                           # (with decision.json when it lies beside it)
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from mergeline.evaluation.schema import (
    CompatSummary, Decision, EvaluationReport, Interference, Interval, PerModel, SeedSpread, absent,
)


MODELS_PER_TABLE = 6
STATUS_WORDS = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE", "not_applicable": "N/A",
                "warn": "WARN", "go": "GO", "no-go": "NO-GO", "flagged": "FLAGGED", "suspected": "SUSPECTED"}


@dataclass(frozen=True)
class Ival:
    estimate: float | None
    low: float | None = None
    high: float | None = None
    signed: bool = False  # a difference: show "+0.012"

    def parts(self, digits: int = 3) -> tuple[str, str]:
        """('0.925', '[0.801, 0.974]'); the second is '' without bounds."""
        f = f"{{:{'+' if self.signed else ''}.{digits}f}}"
        if self.estimate is None:
            return "–", ""
        if self.low is None or self.high is None:
            return f.format(self.estimate), ""
        return f.format(self.estimate), f"[{f.format(self.low)}, {f.format(self.high)}]"

    def text(self, digits: int = 3) -> str:
        return " ".join(p for p in self.parts(digits) if p)


class Status(str):
    """'pass', 'fail', 'inconclusive', 'not_applicable', 'warn', 'GO', 'NO-GO', 'INCONCLUSIVE', and
    the interference pattern's 'flagged' / 'suspected'."""

    @property
    def key(self) -> str:
        return self.lower().replace(" ", "_")

    @property
    def word(self) -> str:
        return STATUS_WORDS.get(self.key, self.upper())


class Code(str):
    """A path or hash: shown monospace, wrapped anywhere."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list]


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph), Table, or Plots
    badge: Status | None = None                  # shown beside the title (the verdict)


@dataclass(frozen=True)
class Plots:
    """Where the plots go (evaluation.plots.PLOTS, drawn in HTML only)."""


def cell_text(x, digits: int = 3) -> str:
    """The plain text of a cell (renderers escape it)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, Ival):
        return x.text(digits)
    if isinstance(x, Status):
        return x.word
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def ival(value, interval: Interval | None = None, signed: bool = False):
    """A cell for `value` with its interval when there is one."""
    if interval is not None and interval.estimate is not None:
        return Ival(interval.estimate, interval.low, interval.high, signed)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Ival(float(value), signed=signed)
    return value


def items_needed_text(value: int | None) -> str | None:
    """'≈ 240 items per task' for an inconclusive rule."""
    return None if value is None else f"≈ {value} items per task"


def elects_signs(report: EvaluationReport, candidate: str) -> bool:
    return report.candidates[candidate].signs is not None


def candidate_order(report: EvaluationReport) -> list[str]:
    """Primary first, then the baselines in report order."""
    p = report.primary
    return [p] + [n for n in report.candidates if n != p]


def per_model(report: EvaluationReport, candidate: str) -> list[PerModel]:
    """Each fine-tune's retention (with interval) beside the fraction of its kept deltas that sign
    election dropped."""
    return report.candidates[candidate].interference.per_model


def score_matrix(report: EvaluationReport) -> tuple[list[str], list[str], dict]:
    """Models, tasks, and {(model, task): cell} of the primary metric with its interval."""
    models = list(report.inputs.models)
    tasks = list(dict.fromkeys(s.task for s in report.scores))
    values = {(s.model, s.task): ival(s.value, s.interval) for s in report.scores}
    return models, tasks, values


# ---------------------------------------------------------------- sections

def document(report: EvaluationReport, decision: Decision | None = None) -> tuple[list[str], list[Section]]:
    """The report's header lines and its sections, in reading order."""
    meta = [f"primary candidate: {report.primary}", f"created {report.created}",
            f"lm-eval {report.lm_eval_version or '–'}", f"schema v{report.schema_version}",
            f"intervals at {report.confidence:.0%} confidence"]
    if report.inputs.suite.splits:  # tuned on one part of the items, judged on another: say which
        from mergeline.evaluation.splits import describe

        meta.append("scored on " + describe(report.inputs.suite))
    return meta, [decision_section(decision), baseline_section(report), plots_section(),
                  scores_section(report), retention_section(report), regression_section(report),
                  interference_section(report), sign_conflict_section(report), compat_section(report),
                  inputs_section(report)]


def decision_section(d: Decision | None) -> Section:
    if d is None:
        return Section("Decision", ["no gate decision: no policy was given"])
    line = (f"candidate {d.candidate} under policy {d.policy}"
            + (f", intervals at {d.confidence:.0%} confidence" if d.confidence is not None else
               ", on point estimates"))
    rows = [[c.rule, Status(c.status), ival(None, c.interval), c.threshold, items_needed_text(c.items_needed),
             c.message] for c in d.checks]
    headers = ["check", "status", "estimate [interval]", "threshold", "items to settle it", "detail"]
    blocks = [line, Table(headers, rows)]
    if not rows:
        blocks.append("the policy sets no rules")
    return Section("Decision", blocks, badge=Status(d.verdict))


SUMMARY_KEYS = [("mean retention", "mean_retention", "mean_retention_interval", False),
                ("min retention", "min_retention", None, False),
                ("mean regression", "mean_regression", "mean_regression_interval", True),
                ("worst regression", "worst_regression", None, True),
                ("interference flag", "interference_flag", None, False),
                ("flips", "total_flips", None, False),
                ("sign-conflict rate", "sign_conflict_rate", None, False),
                ("max dropped fraction", "max_dropped_fraction", None, False)]


def baseline_section(report: EvaluationReport) -> Section:
    p, comparisons = report.primary, report.baselines.comparisons
    blocks = [report.baselines.answer]
    if comparisons:
        blocks.append(Table(
            ["baseline", f"{p} mean retention", "baseline mean retention", "retention difference",
             "regression difference", f"{p} beats it"],
            [[c.baseline, c.primary_mean_retention, c.baseline_mean_retention,
              ival(c.difference, c.difference_interval, signed=True),
              ival(c.regression_difference, c.regression_difference_interval, signed=True),
              c.primary_beats] for c in comparisons]))
    rows = []
    for n in candidate_order(report):
        s = report.candidates[n].summary
        rows.append([n] + [ival(getattr(s, k), getattr(s, ik) if ik else None, signed) if ik or signed
                           else getattr(s, k) for _, k, ik, signed in SUMMARY_KEYS])
    blocks.append(Table(["candidate"] + [h for h, *_ in SUMMARY_KEYS], rows))
    return Section(f"Does {p} beat averaging?", blocks)


def plots_section() -> Section:
    return Section("Plots", [Plots()])


def scores_section(report: EvaluationReport) -> Section:
    models, tasks, values = score_matrix(report)
    types = report.task_types
    # At most MODELS_PER_TABLE model columns a table, so a score matrix of many models still fits a
    # 1400-pixel window: several tables one under the other instead of one that scrolls.
    size = math.ceil(len(models) / math.ceil(len(models) / MODELS_PER_TABLE)) if models else 1  # even split
    blocks = [Table(["task", "type", *chunk], [[t, types.get(t), *(values.get((m, t)) for m in chunk)]
                                               for t in tasks])
              for chunk in (models[i:i + size] for i in range(0, len(models), size))]
    spreads = [[s.model, s.task, _spread_text(s.seed_spread)] for s in report.scores if s.seed_spread is not None]
    if spreads:
        blocks += ["Spread across merge seeds (random methods):", Table(["model", "task", "seed spread"], spreads)]
    return Section("Scores (primary metric)", blocks)


def _spread_text(spread: SeedSpread) -> str:
    """'0.700 to 0.750 (std 0.035, 2 seeds)'."""
    return (f"{cell_text(spread.min)} to {cell_text(spread.max)} (std {cell_text(spread.std)}, "
            f"{len(spread.seeds)} seeds)")


def _with_spread(headers: list[str], rows: list[list], spreads: list) -> Table:
    """The table, with a 'seed spread' column when some row has several seeds (DARE, DELLA)."""
    if any(sp is not None for sp in spreads):
        return Table(headers + ["seed spread"], [r + [None if sp is None else _spread_text(sp)]
                                                 for r, sp in zip(rows, spreads)])
    return Table(headers, rows)


def retention_section(report: EvaluationReport) -> Section:
    rows, spreads = [], []
    for c in report.candidates.values():
        for r in c.retention:
            rows.append([r.candidate, r.finetune, r.task, r.task_type, r.finetune_score, r.merged_score,
                         ival(r.retention, r.retention_interval),
                         ival(-r.drop, r.difference_interval, signed=True)])
            spreads.append(r.seed_spread)
    headers = ["candidate", "fine-tune", "task", "type", "fine-tune score", "merged", "retention",
               "merged − fine-tune"]
    return Section("Retention (merged / fine-tune on its own task)", [_with_spread(headers, rows, spreads)])


def regression_section(report: EvaluationReport) -> Section:
    regs = [r for c in report.candidates.values() for r in c.regression]
    rows = [[r.candidate, r.task, r.base_score, r.merged_score, ival(r.delta, r.delta_interval, signed=True)]
            for r in regs]
    return Section("Regression (merged − base on general tasks)",
                   [_with_spread(["candidate", "task", "base", "merged", "merged − base"], rows,
                                 [r.seed_spread for r in regs])])


def _pattern(i: Interference):
    """The interference pattern: FLAGGED (a skill kept, another lost, intervals apart), SUSPECTED
    (the gap is there but the intervals overlap) or 'no'."""
    if i.flag:
        return Status("flagged")
    return Status("suspected") if i.suspected else "no"


def interference_section(report: EvaluationReport) -> Section:
    rows, models = [], []
    for n in candidate_order(report):
        i = report.candidates[n].interference
        by_type = ", ".join(f"{k} {cell_text(v.mean_retention)}" for k, v in i.by_type.items())
        rows.append([n, i.spread.min, i.spread.max, i.spread.std, ", ".join(i.kept) or None,
                     ", ".join(i.lost) or None, _pattern(i), i.explanation, by_type or None, i.total_flips])
        models += [[n, m.finetune, ival(m.retention, m.retention_interval),
                    m.dropped_fraction_of_kept if elects_signs(report, n) else "no sign election"]
                   for m in per_model(report, n)]
    blocks = [Table(["candidate", "min", "max", "std", "kept", "lost", "pattern", "why", "retention by type",
                     "flips"], rows)]
    if models:
        blocks += ["Each fine-tune's retention beside the fraction of its kept deltas that sign election dropped:",
                   Table(["candidate", "fine-tune", "retention", "dropped by election (of kept)"], models)]
    flips = [[n, f.task, f.reference, f.items, f.reference_correct, f.flips, f.gains, f.flip_rate]
             for n in candidate_order(report) for f in report.candidates[n].interference.flips]
    blocks += ["Per-item flips: items the reference got right and the merge got wrong (gains: the reverse):",
               Table(["candidate", "task", "reference", "items", "reference right", "flips", "gains", "flip rate"],
                     flips)]
    return Section("Interference", blocks)


def sign_conflict_table(report: EvaluationReport) -> Table:
    """One row per candidate and merged model; a candidate without the proxy says why."""
    rows = []
    for n in candidate_order(report):
        sc = report.candidates[n].sign_conflict
        method = report.merge_stats[n].method if n in report.merge_stats else None
        if absent(sc) is not None:
            rows.append([n, method, None, absent(sc), None, None, None])
        elif sc.elects_signs is False:  # an older report without the typed absence
            rows.append([n, sc.method, None, f"{sc.method} elects no sign", None, None, None])
        else:
            for m, v in sc.per_model.items():
                rows.append([n, sc.method, sc.rate, m, v.kept_fraction, v.dropped_fraction_of_kept,
                             v.dropped_magnitude_share])
    return Table(["candidate", "method", "conflict rate", "model", "kept fraction", "dropped by election (of kept)",
                  "dropped magnitude share"], rows)


def sign_conflict_section(report: EvaluationReport) -> Section:
    return Section("Sign-conflict proxy (from merge_stats.json)", [sign_conflict_table(report)])


def compat_section(report: EvaluationReport) -> Section:
    comp = report.compat
    if not isinstance(comp, CompatSummary):
        return Section("Compatibility", [absent(comp)])
    rows = [[c.name, Status(c.status), c.message + (" (waived)" if c.waived else "")] for c in comp.checks]
    return Section("Compatibility", [Table(["check", "status", "message"], rows)], badge=Status(comp.status))


def inputs_section(report: EvaluationReport) -> Section:
    rows = [[n, m.role, Code(m.content_hash or "–"), Code(m.path or "–")] for n, m in report.inputs.models.items()]
    return Section("Inputs", [Table(["model", "role", "content hash", "path"], rows)])


if __name__ == "__main__":
    from mergeline.evaluation.report import load_outputs

    meta, sections = document(*load_outputs(sys.argv[1]))
    print(" · ".join(meta))
    for sec in sections:
        print(f"\n== {sec.title}")
        for b in sec.blocks:
            if isinstance(b, Table):
                print(" | ".join(b.headers))
                for r in b.rows:
                    print(" | ".join(cell_text(x) for x in r))
            elif isinstance(b, str):
                print(b)
