"""The evaluation report: one JSON document (versioned schema) rendered as Markdown and HTML.

    build_report(suite: EvalSuite, table: ScoreTable, *, primary="ties",
                 merge_stats: dict[str, dict | Path | None] | None = None,   # default: <candidate>/merge_stats.json
                 compat: dict | None = None,                                  # CompatReport.to_dict()
                 policy: GatePolicy | dict | Path | None = None,              # adds report["decision"]
                 confidence: float | None = None,                             # default: the policy's, else 0.95
                 extra_inputs: dict | None = None) -> dict
    write_reports(report: dict, out_dir: Path, *, overwrite=False) -> {"json": Path, "md": Path, "html": Path}
                 (evaluation.render; rendering lives in evaluation.tables, .render, .html_report, .plots)

The report is evidence only: every number with its interval, built without the policy. The
policy, when given, sets the intervals' confidence and its decision is attached
(`decide(report, policy)` can equally be called afterwards).

report.json, schema_version 2. An interval is `evaluation.stats.Interval.model_dump()`:
{estimate, low, high, confidence, method, n}.
  schema_version, kind, created, lm_eval_version, primary,
  confidence:  the confidence level of every interval in the report
  inputs:      models {name: role, path, content_hash[, per_seed]}, suite (as loaded), extra
  task_types:  {task: generation | multiple_choice | loglikelihood | unknown}
  scores:      [{model, role, task, value, interval, seed_spread}]   primary metric, mean over seeds;
               seed_spread {seeds, values, min, max, std} across seeds, null with one seed
  candidates:  {name: {retention: [... retention_interval, difference_interval, seed_spread],
                       regression: [... delta_interval, seed_spread],
                       interference: {... flag, kept, lost, pairs, suspected, gap, explanation,
                                      per_model: [{finetune, retention, retention_interval,
                                                   dropped_fraction_of_kept}]},
                       sign_conflict: {... elects_signs},
                       summary: {... mean_retention_interval, mean_regression_interval}}}
               (evaluation.metrics)
  baselines:   {primary, comparisons: [{baseline, difference, difference_interval, regression_difference,
                                         regression_difference_interval, primary_beats, ...}], answer}
  compat:      {status, checks, norms} or null
  merge_stats: {candidate: {method, models, sign_conflict rate, per_model}} or {}
  decision:    Decision.to_dict() or null: {verdict GO|NO-GO|INCONCLUSIVE, go, exit_code, candidate,
               policy, confidence, checks: [{rule, status, message, interval, threshold, items_needed}],
               reasons, passed, inconclusive}

Changes from schema 1: intervals everywhere (scores, retention, regression, summary means,
baseline comparisons), seed spreads, top-level `confidence`; interference read from the pattern
(a retention gap between fine-tunes, intervals apart) instead of fixed marks, with `per_model`
(retention beside the share dropped by sign election); `sign_conflict.elects_signs`; the decision
has three verdicts and per-check status (pass/fail/inconclusive/not_applicable).

    python -m mergeline.evaluation.report report.json OUT_DIR     # re-render md + html from a report.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mergeline.evaluation import metrics
from mergeline.evaluation.evaluate import ScoreTable
from mergeline.evaluation.gate import REPORT_SCHEMA_VERSION, decide
from mergeline.evaluation.policy import GatePolicy, load_policy
from mergeline.evaluation.render import render_markdown, write_reports  # noqa: F401  (callers import them from here)
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
                 merge_stats: dict | None = None, compat: dict | None = None, policy=None,
                 confidence: float | None = None, extra_inputs: dict | None = None,
                 gap: float = metrics.INTERFERENCE_GAP) -> dict:
    candidates = table.names("candidate")
    if primary not in candidates:
        raise ValueError(f"primary candidate {primary!r} was not evaluated (candidates: {candidates})")
    base = next(iter(table.names("base")), None)
    if base is None:
        raise ValueError("no model with role 'base' was evaluated")
    if policy is not None and not isinstance(policy, GatePolicy):
        policy = load_policy(policy)
    if confidence is None:
        confidence = (policy.confidence if policy is not None else None) or DEFAULT_CONFIDENCE
    evidence = metrics.Evidence.from_frames(table.samples, table.scores, confidence)
    primary_frame = metrics.primary_scores(table.scores)
    stats_in = merge_stats or {}
    per_cand, stats_summary = {}, {}
    for name in candidates:
        stats = _load_stats(stats_in.get(name), table.models[name]["path"])
        per_cand[name] = metrics.candidate_axes(primary_frame, table.samples, suite, name, stats,
                                                table.task_types, base=base, gap=gap, evidence=evidence)
        if stats:
            stats_summary[name] = {"method": stats.get("method"), "models": stats.get("models"),
                                   "sign_conflict_rate": (stats.get("sign_conflict") or {}).get("rate"),
                                   "per_model": stats.get("per_model")}
    intervals = {b: metrics.baseline_intervals(evidence, suite, per_cand[primary], primary, b)
                 for b in candidates if b != primary}
    comparisons = metrics.compare_baselines({n: c["summary"] for n, c in per_cand.items()}, primary, intervals)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "mergeline.evaluation_report",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lm_eval_version": table.lm_eval_version,
        "primary": primary,
        "confidence": confidence,
        "inputs": {"models": {n: {k: m[k] for k in ("role", "path", "content_hash", "per_seed") if k in m}
                              for n, m in table.models.items()},
                   "suite": suite.model_dump(mode="json"), "extra": extra_inputs or {}},
        "task_types": table.task_types,
        "scores": [{"model": m, "role": table.models[m]["role"], "task": t, "value": metrics._f(v),
                    "interval": evidence.score(m, t), "seed_spread": evidence.spread(m, t)}
                   for m, t, v in primary_frame[["model", "task", "value"]].itertuples(index=False)],
        "candidates": per_cand,
        "baselines": {"primary": primary, "comparisons": comparisons, "answer": _answer(comparisons, primary)},
        "compat": _compat_summary(compat),
        "merge_stats": stats_summary,
        "decision": None,
    }
    if policy is not None:
        report["decision"] = decide(report, policy).to_dict()
    return report


def _answer(comparisons: list[dict], primary: str) -> str:
    avg = next((c for c in comparisons if c["baseline"] == AVERAGING_BASELINE), None)
    if avg is None:
        return f"no averaging baseline ({AVERAGING_BASELINE!r}) was evaluated"
    if avg["difference"] is None:
        return "undefined: a mean retention is missing"
    iv = avg.get("difference_interval") or {}
    if iv.get("low") is not None and iv.get("high") is not None:
        verdict = ("beats" if iv["low"] > 0 else "does worse than" if iv["high"] < 0
                   else "cannot be told apart from")
        shown = Interval(**iv).text()
        tail = f" ({shown}, {iv['confidence']:.0%} paired interval of the difference)"
    else:
        verdict = "beats" if avg["primary_beats"] else "does not beat"
        tail = f" ({avg['difference']:+.3f})"
    return (f"{primary} {verdict} averaging ({AVERAGING_BASELINE}) on mean retention: "
            f"{avg['primary_mean_retention']:.3f} vs {avg['baseline_mean_retention']:.3f}{tail}")


def _compat_summary(compat: dict | None) -> dict | None:
    if not compat:
        return None
    return {"status": compat.get("status"),
            "checks": [{k: c.get(k) for k in ("name", "status", "message", "waived")} for c in compat.get("checks", [])],
            # per-model norms and cosines only: the per-tensor table would swamp the report.
            "norms": {k: (compat.get("norms") or {}).get(k, {}) for k in ("per_model", "cosine")}}


if __name__ == "__main__":
    rep = json.loads(Path(sys.argv[1]).read_text())
    for k, v in write_reports(rep, sys.argv[2], overwrite=True).items():
        print(k, v)
