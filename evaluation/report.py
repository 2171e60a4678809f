"""The evaluation report: one JSON document (versioned schema) rendered as Markdown and HTML.

    build_report(suite: EvalSuite, table: ScoreTable, *, primary="ties",
                 merge_stats: dict[str, dict | Path | None] | None = None,   # default: <candidate>/merge_stats.json
                 compat: dict | None = None,                                  # CompatReport.to_dict()
                 policy: GatePolicy | dict | Path | None = None,              # adds report["decision"]
                 confidence: float | None = None,                             # default: the policy's, else 0.95
                 extra_inputs: dict | None = None) -> dict
    write_reports(report: dict, out_dir: Path, *, overwrite=False) -> {"json": Path, "md": Path, "html": Path}

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

    python -m evaluation.report report.json OUT_DIR     # re-render md + html from a report.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from evaluation import metrics
from evaluation.evaluate import ScoreTable
from evaluation.gate import REPORT_SCHEMA_VERSION, decide
from evaluation.policy import GatePolicy, load_policy
from evaluation.stats import DEFAULT_CONFIDENCE, Interval
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


def write_reports(report: dict, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write report.json, report.md and report.html; each to a temp name, then renamed."""
    from evaluation.html_report import render_html  # matplotlib: only when writing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"report(s) already exist: {existing} (pass overwrite=True to replace)")
    texts = {"json": json.dumps(report, indent=2, default=str), "md": render_markdown(report),
             "html": render_html(report)}
    for kind, path in targets.items():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(texts[kind], encoding="utf-8")
        os.replace(tmp, path)
    return targets


# ---------------------------------------------------------------- markdown

def _table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        if x is None:
            return "–"
        if isinstance(x, bool):
            return "yes" if x else "no"
        if isinstance(x, float):
            return f"{x:.3f}"
        return str(x).replace("|", "\\|")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def sign_conflict_table(report: dict) -> tuple[list[str], list[list]]:
    """Headers and rows of the sign-conflict proxy, one row per candidate and merged model."""
    rows = []
    for n, c in report["candidates"].items():
        sc = c["sign_conflict"]
        if not sc["available"]:
            rows.append([n, None, "no merge stats", None, None, None])
        for m, v in sc["per_model"].items():
            rows.append([n, sc["rate"], m, v["kept_fraction"], v["dropped_fraction_of_kept"], v["dropped_magnitude_share"]])
    return (["candidate", "conflict rate", "model", "kept fraction", "dropped by election (of kept)",
             "dropped magnitude share"], rows)


def score_matrix(report: dict) -> tuple[list[str], list[str], dict]:
    models = list(report["inputs"]["models"])
    tasks = list(dict.fromkeys(s["task"] for s in report["scores"]))
    values = {(s["model"], s["task"]): s["value"] for s in report["scores"]}
    return models, tasks, values


def render_markdown(report: dict) -> str:
    p, out = report["primary"], []
    d = report.get("decision")
    out.append(f"# mergeline evaluation report\n\nprimary candidate: **{p}** · created {report['created']} · "
               f"lm-eval {report['lm_eval_version']} · schema v{report['schema_version']}\n")
    if d:
        out.append(f"## Decision: **{d['verdict']}** (policy `{d['policy']}`)\n")
        out.append(_table(["check", "result", "detail"],
                          [[c["rule"], "PASS" if c["passed"] else "FAIL", c["message"]] for c in d["checks"]]) + "\n")
    out.append(f"## Does {p} beat averaging?\n\n{report['baselines']['answer']}\n")
    out.append(_table(["candidate", "mean retention", "min retention", "mean regression", "worst regression",
                       "interference flag", "flips", "sign-conflict rate", "max dropped fraction"],
                      [[n, *(c["summary"][k] for k in ("mean_retention", "min_retention", "mean_regression",
                         "worst_regression", "interference_flag", "total_flips", "sign_conflict_rate",
                         "max_dropped_fraction"))] for n, c in report["candidates"].items()]) + "\n")
    models, tasks, values = score_matrix(report)
    out.append("## Scores (primary metric)\n")
    out.append(_table(["task", "type", *models],
                      [[t, report["task_types"].get(t), *(values.get((m, t)) for m in models)] for t in tasks]) + "\n")
    out.append("## Retention (merged / fine-tune on its own task)\n")
    out.append(_table(["candidate", "fine-tune", "task", "type", "fine-tune", "merged", "retention", "drop"],
                      [[r["candidate"], r["finetune"], r["task"], r["task_type"], r["finetune_score"],
                        r["merged_score"], r["retention"], r["drop"]]
                       for c in report["candidates"].values() for r in c["retention"]]) + "\n")
    out.append("## Regression (merged - base on general tasks)\n")
    out.append(_table(["candidate", "task", "base", "merged", "delta"],
                      [[r["candidate"], r["task"], r["base_score"], r["merged_score"], r["delta"]]
                       for c in report["candidates"].values() for r in c["regression"]]) + "\n")
    out.append("## Interference\n")
    for n, c in report["candidates"].items():
        i = c["interference"]
        s = i["spread"]
        out.append(f"**{n}**: retention min {_fmt(s['min'])} / max {_fmt(s['max'])} / std {_fmt(s['std'])}; "
                   f"kept {i['kept'] or '–'}, lost {i['lost'] or '–'}; flag: {'YES' if i['flag'] else 'no'}; "
                   f"by type: " + ", ".join(f"{k} {_fmt(v.get('mean_retention'))}" for k, v in i["by_type"].items()) + "\n")
        out.append(_table(["task", "reference", "items", "reference right", "flips", "gains", "flip rate"],
                          [[f["task"], f["reference"], f["items"], f["reference_correct"], f["flips"], f["gains"],
                            f["flip_rate"]] for f in i["flips"]]) + "\n")
    out.append("## Sign-conflict proxy (from merge_stats.json)\n")
    out.append(_table(*sign_conflict_table(report)) + "\n")
    comp = report.get("compat")
    out.append("## Compatibility\n")
    if comp:
        out.append(f"status: **{comp['status']}**\n")
        out.append(_table(["check", "status", "message"],
                          [[c["name"], c["status"] + (" (waived)" if c.get("waived") else ""), c["message"]]
                           for c in comp["checks"]]) + "\n")
    else:
        out.append("no compatibility report was given\n")
    out.append("## Inputs\n")
    out.append(_table(["model", "role", "content hash", "path"],
                      [[n, m["role"], m["content_hash"], m["path"]] for n, m in report["inputs"]["models"].items()]) + "\n")
    return "\n".join(out)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    rep = json.loads(Path(sys.argv[1]).read_text())
    for k, v in write_reports(rep, sys.argv[2], overwrite=True).items():
        print(k, v)
