"""The report as a document: sections of paragraphs, tables and plots, built once from a report
dict and rendered by both report.md (`evaluation.render`) and report.html (`evaluation.html_report`),
so the two always say the same thing (issue #13: one table model for Markdown and HTML).

A table cell is a plain value (None, bool, int, float, str) or one of:
    Ival(estimate, low, high)   a number with its interval, shown "0.925 [0.801, 0.974]"
    Status("inconclusive")      a verdict or check status, drawn as a coloured badge in HTML
    Code("/long/path")          a path or hash: monospace, wrapped anywhere

Renderers escape every cell; nothing here is markup. Reports of schema v1 (no intervals, checks
with `passed` instead of `status`) render with plain numbers.

    python -m mergeline.evaluation.tables report.json      # print the document as plain text
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Methods that elect a sign per coordinate: only their merges have "dropped by sign election" to
# show (tests/evaluation/test_render.py checks it against consensus=True in merge/methods/registry.py).
from mergeline.evaluation.metrics import SIGN_ELECTING_METHODS


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


def ival(value, interval: dict | None = None, signed: bool = False):
    """A cell for `value` with its interval dict ({estimate, low, high, ...}) when there is one."""
    if isinstance(interval, dict) and interval.get("estimate") is not None:
        return Ival(interval["estimate"], interval.get("low"), interval.get("high"), signed)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Ival(float(value), signed=signed)
    return value


def check_status(check: dict) -> Status:
    """v2 checks carry `status`; v1 checks a `passed` bool."""
    if check.get("status"):
        return Status(check["status"])
    return Status("pass" if check.get("passed") else "fail")


def items_needed_text(value) -> str | None:
    """'≈ 240 items per task' or 't_add: 240, t_rev: 90' for an inconclusive rule."""
    if value is None:
        return None
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v if v is not None else '–'}" for k, v in value.items())
    return f"≈ {value} items per task"


def elects_signs(report: dict, candidate: str) -> bool:
    sc = report["candidates"][candidate].get("sign_conflict") or {}
    if "elects_signs" in sc:  # v2
        return bool(sc.get("available") and sc["elects_signs"])
    return bool(sc.get("available")) and sc.get("method") in SIGN_ELECTING_METHODS


def candidate_order(report: dict) -> list[str]:
    """Primary first, then the baselines in report order."""
    p = report["primary"]
    return [p] + [n for n in report["candidates"] if n != p]


def per_model(report: dict, candidate: str) -> list[dict]:
    """Each fine-tune's retention (with interval) beside the fraction of its kept deltas that sign
    election dropped: interference.per_model in v2, assembled from per_finetune and the sign
    conflict proxy in v1."""
    c = report["candidates"][candidate]
    inter = c.get("interference") or {}
    if inter.get("per_model") is not None:
        return inter["per_model"]
    dropped = (c.get("sign_conflict") or {}).get("per_model") or {}
    return [{"finetune": ft, "retention": r, "retention_interval": None,
             "dropped_fraction_of_kept": (dropped.get(ft) or {}).get("dropped_fraction_of_kept")}
            for ft, r in (inter.get("per_finetune") or {}).items()]


def score_matrix(report: dict) -> tuple[list[str], list[str], dict]:
    """Models, tasks, and {(model, task): cell} of the primary metric with its interval."""
    models = list(report["inputs"]["models"])
    tasks = list(dict.fromkeys(s["task"] for s in report["scores"]))
    values = {(s["model"], s["task"]): ival(s["value"], s.get("interval")) for s in report["scores"]}
    return models, tasks, values


# ---------------------------------------------------------------- sections

def document(report: dict) -> tuple[list[str], list[Section]]:
    """The report's header lines and its sections, in reading order."""
    meta = [f"primary candidate: {report['primary']}", f"created {report.get('created', '–')}",
            f"lm-eval {report.get('lm_eval_version', '–')}", f"schema v{report.get('schema_version', '–')}"]
    if report.get("confidence") is not None:
        meta.append(f"intervals at {report['confidence']:.0%} confidence")
    suite = (report.get("inputs") or {}).get("suite") or {}
    if suite.get("splits"):  # tuned on one part of the items, judged on another: say which
        from mergeline.evaluation.splits import describe
        from mergeline.evaluation.suite import EvalSuite

        meta.append("scored on " + describe(EvalSuite.model_validate(suite)))
    return meta, [decision_section(report), baseline_section(report), plots_section(),
                  scores_section(report), retention_section(report), regression_section(report),
                  interference_section(report), sign_conflict_section(report), compat_section(report),
                  inputs_section(report)]


def verdict(report: dict) -> Status | None:
    d = report.get("decision")
    if not d:
        return None
    return Status(d.get("verdict") or ("GO" if d.get("go") else "NO-GO"))


def decision_section(report: dict) -> Section:
    d = report.get("decision")
    if not d:
        return Section("Decision", ["no gate decision: no policy was given"])
    conf = d.get("confidence")
    line = (f"candidate {d.get('candidate')} under policy {d.get('policy')}"
            + (f", intervals at {conf:.0%} confidence" if isinstance(conf, (int, float)) else ""))
    rows = [[c.get("rule"), check_status(c), ival(None, c.get("interval")), c.get("threshold"),
             items_needed_text(c.get("items_needed")), c.get("message")] for c in d.get("checks", [])]
    headers = ["check", "status", "estimate [interval]", "threshold", "items to settle it", "detail"]
    blocks = [line, Table(headers, rows)]
    if not rows:
        blocks.append("the policy sets no rules")
    return Section("Decision", blocks, badge=verdict(report))


SUMMARY_KEYS = [("mean retention", "mean_retention", "mean_retention_interval", False),
                ("min retention", "min_retention", None, False),
                ("mean regression", "mean_regression", "mean_regression_interval", True),
                ("worst regression", "worst_regression", None, True),
                ("interference flag", "interference_flag", None, False),
                ("flips", "total_flips", None, False),
                ("sign-conflict rate", "sign_conflict_rate", None, False),
                ("max dropped fraction", "max_dropped_fraction", None, False)]


def baseline_section(report: dict) -> Section:
    p, b = report["primary"], report.get("baselines") or {}
    comparisons = b.get("comparisons") or []
    blocks = [b.get("answer") or "no baseline comparison in this report"]
    if comparisons:
        blocks.append(Table(
            ["baseline", f"{p} mean retention", "baseline mean retention", "retention difference",
             "regression difference", f"{p} beats it"],
            [[c["baseline"], c.get("primary_mean_retention"), c.get("baseline_mean_retention"),
              ival(c.get("difference"), c.get("difference_interval"), signed=True),
              ival(c.get("regression_difference"), c.get("regression_difference_interval"), signed=True),
              c.get("primary_beats")] for c in comparisons]))
    rows = []
    for n in candidate_order(report):
        s = report["candidates"][n].get("summary") or {}
        rows.append([n] + [ival(s.get(k), s.get(ik), signed) if ik or signed else s.get(k)
                           for _, k, ik, signed in SUMMARY_KEYS])
    blocks.append(Table(["candidate"] + [h for h, *_ in SUMMARY_KEYS], rows))
    return Section(f"Does {p} beat averaging?", blocks)


def plots_section() -> Section:
    return Section("Plots", [Plots()])


def scores_section(report: dict) -> Section:
    models, tasks, values = score_matrix(report)
    types = report.get("task_types") or {}
    # At most MODELS_PER_TABLE model columns a table, so a score matrix of many models still fits a
    # 1400-pixel window: several tables one under the other instead of one that scrolls.
    size = math.ceil(len(models) / math.ceil(len(models) / MODELS_PER_TABLE)) if models else 1  # even split
    blocks = [Table(["task", "type", *chunk], [[t, types.get(t), *(values.get((m, t)) for m in chunk)]
                                               for t in tasks])
              for chunk in (models[i:i + size] for i in range(0, len(models), size))]
    spreads = [[s["model"], s["task"], _spread_text(s["seed_spread"])] for s in report["scores"]
               if s.get("seed_spread") is not None]
    if spreads:
        blocks += ["Spread across merge seeds (random methods):", Table(["model", "task", "seed spread"], spreads)]
    return Section("Scores (primary metric)", blocks)


def _spread_text(spread) -> str:
    """'0.700 to 0.750 (std 0.035, 2 seeds)' from {seeds, values, min, max, std}."""
    if isinstance(spread, dict) and {"min", "max"} <= set(spread):
        seeds = spread.get("seeds")
        n = len(seeds) if isinstance(seeds, list) else seeds
        return (f"{cell_text(spread['min'])} to {cell_text(spread['max'])} (std {cell_text(spread.get('std'))}"
                + (f", {n} seeds)" if n is not None else ")"))
    return cell_text(spread)


def _with_spread(headers: list[str], rows: list[list], spreads: list) -> Table:
    """The table, with a 'seed spread' column when some row has several seeds (DARE, DELLA)."""
    if any(sp is not None for sp in spreads):
        return Table(headers + ["seed spread"], [r + [None if sp is None else _spread_text(sp)]
                                                 for r, sp in zip(rows, spreads)])
    return Table(headers, rows)


def retention_section(report: dict) -> Section:
    rows, spreads = [], []
    for c in report["candidates"].values():
        for r in c.get("retention", []):
            merged_minus_ft = None if r.get("drop") is None else -r["drop"]
            rows.append([r["candidate"], r["finetune"], r["task"], r.get("task_type"), r.get("finetune_score"),
                         r.get("merged_score"), ival(r.get("retention"), r.get("retention_interval")),
                         ival(merged_minus_ft, r.get("difference_interval"), signed=True)])
            spreads.append(r.get("seed_spread"))
    headers = ["candidate", "fine-tune", "task", "type", "fine-tune score", "merged", "retention",
               "merged − fine-tune"]
    return Section("Retention (merged / fine-tune on its own task)", [_with_spread(headers, rows, spreads)])


def regression_section(report: dict) -> Section:
    regs = [r for c in report["candidates"].values() for r in c.get("regression", [])]
    rows = [[r["candidate"], r["task"], r.get("base_score"), r.get("merged_score"),
             ival(r.get("delta"), r.get("delta_interval"), signed=True)] for r in regs]
    return Section("Regression (merged − base on general tasks)",
                   [_with_spread(["candidate", "task", "base", "merged", "merged − base"], rows,
                                 [r.get("seed_spread") for r in regs])])


def _pattern(i: dict):
    """The interference pattern: FLAGGED (a skill kept, another lost, intervals apart), SUSPECTED
    (the gap is there but the intervals overlap) or 'no'."""
    if i.get("flag"):
        return Status("flagged")
    if i.get("suspected"):
        return Status("suspected")
    return "no" if "flag" in i else None


def interference_section(report: dict) -> Section:
    rows, models = [], []
    for n in candidate_order(report):
        i = report["candidates"][n].get("interference") or {}
        s = i.get("spread") or {}
        by_type = ", ".join(f"{k} {cell_text(v.get('mean_retention'))}"
                            for k, v in (i.get("by_type") or {}).items())
        rows.append([n, s.get("min"), s.get("max"), s.get("std"), ", ".join(i.get("kept") or []) or None,
                     ", ".join(i.get("lost") or []) or None, _pattern(i),
                     i.get("explanation") or i.get("flag_explanation"), by_type or None, i.get("total_flips")])
        models += [[n, m.get("finetune"), ival(m.get("retention"), m.get("retention_interval")),
                    m.get("dropped_fraction_of_kept") if elects_signs(report, n) else "no sign election"]
                   for m in per_model(report, n)]
    blocks = [Table(["candidate", "min", "max", "std", "kept", "lost", "pattern", "why", "retention by type",
                     "flips"], rows)]
    if models:
        blocks += ["Each fine-tune's retention beside the fraction of its kept deltas that sign election dropped:",
                   Table(["candidate", "fine-tune", "retention", "dropped by election (of kept)"], models)]
    flips = [[n, f["task"], f["reference"], f["items"], f["reference_correct"], f["flips"], f["gains"], f["flip_rate"]]
             for n in candidate_order(report)
             for f in (report["candidates"][n].get("interference") or {}).get("flips", [])]
    blocks += ["Per-item flips: items the reference got right and the merge got wrong (gains: the reverse):",
               Table(["candidate", "task", "reference", "items", "reference right", "flips", "gains", "flip rate"],
                     flips)]
    return Section("Interference", blocks)


def sign_conflict_table(report: dict) -> Table:
    """One row per candidate and merged model; candidates that elect no sign say so."""
    rows = []
    for n in candidate_order(report):
        sc = report["candidates"][n].get("sign_conflict") or {}
        if not sc.get("available"):
            rows.append([n, None, None, "no merge stats", None, None, None])
        elif not elects_signs(report, n):
            rows.append([n, sc.get("method"), None, f"{sc.get('method')} elects no sign", None, None, None])
        else:
            for m, v in (sc.get("per_model") or {}).items():
                rows.append([n, sc.get("method"), sc.get("rate"), m, v.get("kept_fraction"),
                             v.get("dropped_fraction_of_kept"), v.get("dropped_magnitude_share")])
    return Table(["candidate", "method", "conflict rate", "model", "kept fraction", "dropped by election (of kept)",
                  "dropped magnitude share"], rows)


def sign_conflict_section(report: dict) -> Section:
    return Section("Sign-conflict proxy (from merge_stats.json)", [sign_conflict_table(report)])


def compat_section(report: dict) -> Section:
    comp = report.get("compat")
    if not comp:
        return Section("Compatibility", ["no compatibility report was given"])
    rows = [[c.get("name"), Status(c.get("status") or "–"),
             (c.get("message") or "") + (" (waived)" if c.get("waived") else "")] for c in comp.get("checks", [])]
    return Section("Compatibility", [Table(["check", "status", "message"], rows)],
                   badge=Status(comp.get("status") or "–"))


def inputs_section(report: dict) -> Section:
    models = (report.get("inputs") or {}).get("models") or {}
    rows = [[n, m.get("role"), Code(m.get("content_hash") or "–"), Code(m.get("path") or "–")]
            for n, m in models.items()]
    return Section("Inputs", [Table(["model", "role", "content hash", "path"], rows)])


if __name__ == "__main__":
    meta, sections = document(json.loads(Path(sys.argv[1]).read_text()))
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
