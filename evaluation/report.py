"""The evaluation report: one JSON document (versioned schema) rendered as Markdown and HTML.

    build_report(suite: EvalSuite, table: ScoreTable, *, primary="ties",
                 merge_stats: dict[str, dict | Path | None] | None = None,   # default: <candidate>/merge_stats.json
                 compat: dict | None = None,                                  # CompatReport.to_dict()
                 policy: GatePolicy | dict | Path | None = None,              # adds report["decision"]
                 extra_inputs: dict | None = None) -> dict
    write_reports(report: dict, out_dir: Path, *, overwrite=False) -> {"json": Path, "md": Path, "html": Path}
                 (evaluation.render; rendering lives in evaluation.tables, .render, .html_report, .plots)

report.json, schema_version 1:
  schema_version, kind, created, lm_eval_version, primary,
  inputs:      models {name: role, path, content_hash}, suite (as loaded), extra
  task_types:  {task: generation | multiple_choice | loglikelihood | unknown}
  scores:      [{model, role, task, value}]   primary metric, mean over seeds
  candidates:  {name: {retention: [...], regression: [...], interference: {...},
                       sign_conflict: {...}, summary: {...}}}      (evaluation.metrics)
  baselines:   {primary, comparisons: [{baseline, difference, primary_beats, ...}], answer}
  compat:      {status, checks, norms} or null
  merge_stats: {candidate: {method, models, sign_conflict rate, per_model}} or {}
  decision:    Decision.to_dict() or null

    python -m evaluation.report report.json OUT_DIR     # re-render md + html from a report.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from evaluation import metrics
from evaluation.evaluate import ScoreTable
from evaluation.gate import REPORT_SCHEMA_VERSION, decide
from evaluation.render import render_markdown, write_reports  # noqa: F401  (callers import them from here)
from evaluation.suite import EvalSuite

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
                 extra_inputs: dict | None = None,
                 high: float = metrics.HIGH_MARK, low: float = metrics.LOW_MARK) -> dict:
    candidates = table.names("candidate")
    if primary not in candidates:
        raise ValueError(f"primary candidate {primary!r} was not evaluated (candidates: {candidates})")
    base = next(iter(table.names("base")), None)
    if base is None:
        raise ValueError("no model with role 'base' was evaluated")
    primary_frame = metrics.primary_scores(table.scores)
    stats_in = merge_stats or {}
    per_cand, stats_summary = {}, {}
    for name in candidates:
        stats = _load_stats(stats_in.get(name), table.models[name]["path"])
        per_cand[name] = metrics.candidate_axes(primary_frame, table.samples, suite, name, stats,
                                                table.task_types, base=base, high=high, low=low)
        if stats:
            stats_summary[name] = {"method": stats.get("method"), "models": stats.get("models"),
                                   "sign_conflict_rate": (stats.get("sign_conflict") or {}).get("rate"),
                                   "per_model": stats.get("per_model")}
    comparisons = metrics.compare_baselines({n: c["summary"] for n, c in per_cand.items()}, primary)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "mergeline.evaluation_report",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lm_eval_version": table.lm_eval_version,
        "primary": primary,
        "inputs": {"models": {n: {k: m[k] for k in ("role", "path", "content_hash")} for n, m in table.models.items()},
                   "suite": suite.model_dump(mode="json"), "extra": extra_inputs or {}},
        "task_types": table.task_types,
        "scores": [{"model": m, "role": table.models[m]["role"], "task": t, "value": metrics._f(v)}
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
    verdict = "beats" if avg["primary_beats"] else "does not beat"
    return (f"{primary} {verdict} averaging ({AVERAGING_BASELINE}) on mean retention: "
            f"{avg['primary_mean_retention']:.3f} vs {avg['baseline_mean_retention']:.3f} ({avg['difference']:+.3f})")


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
