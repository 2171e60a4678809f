"""The evaluation report: the evidence of one pipeline run, typed (evaluation/schema.py), as
report.json; rendered as report.md and report.html beside the gate's decision.json.

    build_report(suite: EvalSuite, table: ScoreTable, *, primary="ties",
                 merge_stats: dict[str, dict | Path | None] | None = None,   # default: <candidate>/merge_stats.json
                 compat: CompatReport | dict | None = None,
                 confidence: float = 0.95,                                     # every interval's level
                 extra_inputs: dict | None = None) -> EvaluationReport
    write_reports(report, decision | None, out_dir, *, overwrite=False, html=True, plots=None)
        -> {"json": report.json, "decision": decision.json, "md": report.md, "html": report.html}
                 (evaluation.render; rendering lives in evaluation.tables, .render, .html_report, .plots)

The report is evidence only: every number with its interval, built without a policy. The gate
judges it afterwards, `decide(report, policy) -> Decision` (evaluation/gate.py), at the policy's
confidence: build the report at that confidence (`confidence=policy.confidence`). The decision
is not written into the report: decision.json is its own file.

report.json, schema_version 3 (the fields: evaluation/schema.py `EvaluationReport`):
  schema_version, kind, created, lm_eval_version, primary, confidence,
  inputs:      models {name: role, path, content_hash, per_seed}, suite (as loaded), extra
  task_types:  {task: generation | multiple_choice | loglikelihood | unknown}
  scores:      [{model, role, task, value, interval, seed_spread}]   primary metric, mean over seeds
  candidates:  {name: {retention, regression, interference, sign_conflict, summary}} (evaluation.metrics);
               sign_conflict is {not_applicable: why} for a method that elects no signs and
               {missing: why} without merge statistics
  baselines:   {primary, comparisons: [{baseline, difference, difference_interval, ...}], answer}
  compat:      {status, checks, norms}, or {missing: why} without a compatibility report
  merge_stats: {candidate: {method, models, sign_conflict_rate, per_model}}

    python -m mergeline.evaluation.report report.json OUT_DIR     # re-render md + html from a report.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mergeline.evaluation import metrics
from mergeline.evaluation.evaluate import ScoreTable
from mergeline.evaluation.render import render_markdown, write_reports  # noqa: F401  (callers import them from here)
from mergeline.evaluation.schema import (
    Baselines, Candidate, CompatReport, CompatSummary, Comparison, EvaluationReport, Missing, NotApplicable,
    ReportError, StatsSummary, load_decision, load_report,
)
from mergeline.evaluation.stats import DEFAULT_CONFIDENCE, Interval
from mergeline.evaluation.suite import EvalSuite

AVERAGING_BASELINE = "linear"


def _load_stats(value, model_path: str | None) -> dict | None:
    if isinstance(value, dict):
        return value
    path = Path(value) if value is not None else (Path(model_path) / "merge_stats.json" if model_path else None)
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    return None


def build_report(suite: EvalSuite, table: ScoreTable, *, primary: str = "ties",
                 merge_stats: dict | None = None, compat: CompatReport | dict | None = None,
                 confidence: float | None = None, extra_inputs: dict | None = None,
                 gap: float = metrics.INTERFERENCE_GAP) -> EvaluationReport:
    candidates = table.names("candidate")
    if primary not in candidates:
        raise ValueError(f"primary candidate {primary!r} was not evaluated (candidates: {candidates})")
    base = next(iter(table.names("base")), None)
    if base is None:
        raise ValueError("no model with role 'base' was evaluated")
    confidence = confidence or DEFAULT_CONFIDENCE
    evidence = metrics.Evidence.from_frames(table.samples, table.scores, confidence)
    primary_frame = metrics.primary_scores(table.scores)
    stats_in = merge_stats or {}
    per_cand, stats_summary = {}, {}
    for name in candidates:
        stats = _load_stats(stats_in.get(name), table.models[name]["path"])
        axes = metrics.candidate_axes(primary_frame, table.samples, suite, name, stats,
                                      table.task_types, base=base, gap=gap, evidence=evidence)
        per_cand[name] = _candidate(name, axes)
        if stats:
            stats_summary[name] = StatsSummary.from_stats(stats)
    intervals = {b: metrics.baseline_intervals(evidence, suite, per_cand[primary].model_dump(), primary, b)
                 for b in candidates if b != primary}
    comparisons = [Comparison.model_validate(c) for c in metrics.compare_baselines(
        {n: c.summary.model_dump() for n, c in per_cand.items()}, primary, intervals)]
    return EvaluationReport.model_validate({
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lm_eval_version": table.lm_eval_version,
        "primary": primary,
        "confidence": confidence,
        "inputs": {"models": {n: {k: m[k] for k in ("role", "path", "content_hash", "per_seed") if k in m}
                              for n, m in table.models.items()},
                   "suite": suite, "extra": extra_inputs or {}},
        "task_types": table.task_types,
        "scores": [{"model": m, "role": table.models[m]["role"], "task": t, "value": metrics._f(v),
                    "interval": evidence.score(m, t), "seed_spread": evidence.spread(m, t)}
                   for m, t, v in primary_frame[["model", "task", "value"]].itertuples(index=False)],
        "candidates": per_cand,
        "baselines": Baselines(primary=primary, comparisons=comparisons, answer=_answer(comparisons, primary)),
        "compat": CompatSummary.of(compat) if compat else Missing(missing="no compatibility report was given"),
        "merge_stats": stats_summary,
    })


def _candidate(name: str, axes: dict) -> Candidate:
    """metrics.candidate_axes' dict as a typed Candidate: the sign-conflict proxy a typed absence
    when the merge has no statistics or its method elects no signs."""
    sc = axes["sign_conflict"]
    if not sc["available"]:
        sign = Missing(missing=f"no merge statistics for {name!r} (no merge_stats.json beside the merge)")
    elif sc["elects_signs"] is False:
        sign = NotApplicable(not_applicable=f"method {sc['method']!r} elects no signs")
    else:
        sign = {k: v for k, v in sc.items() if k != "available"}
    inter = {k: v for k, v in axes["interference"].items() if k != "per_finetune"}  # per_model has it
    return Candidate.model_validate({**axes, "interference": inter, "sign_conflict": sign})


def _answer(comparisons: list[Comparison], primary: str) -> str:
    avg = next((c for c in comparisons if c.baseline == AVERAGING_BASELINE), None)
    if avg is None:
        return f"no averaging baseline ({AVERAGING_BASELINE!r}) was evaluated"
    if avg.difference is None:
        return "undefined: a mean retention is missing"
    iv: Interval | None = avg.difference_interval
    if iv is not None and iv.low is not None and iv.high is not None:
        verdict = ("beats" if iv.low > 0 else "does worse than" if iv.high < 0
                   else "cannot be told apart from")
        tail = f" ({iv.text()}, {iv.confidence:.0%} paired interval of the difference)"
    else:
        verdict = "beats" if avg.primary_beats else "does not beat"
        tail = f" ({avg.difference:+.3f})"
    return (f"{primary} {verdict} averaging ({AVERAGING_BASELINE}) on mean retention: "
            f"{avg.primary_mean_retention:.3f} vs {avg.baseline_mean_retention:.3f}{tail}")


def load_outputs(report_json: str | Path):
    """report.json and, when it lies beside it, decision.json: (EvaluationReport, Decision | None)."""
    report_json = Path(report_json)
    decision_json = report_json.with_name("decision.json")
    return load_report(report_json), (load_decision(decision_json) if decision_json.is_file() else None)


if __name__ == "__main__":
    try:
        rep, dec = load_outputs(sys.argv[1])
    except ReportError as e:
        sys.exit(str(e))
    for k, v in write_reports(rep, dec, sys.argv[2], overwrite=True).items():
        print(k, v)
