"""The report and gate stage: metrics, report (json / md / html + plots) and the gate's decision,
in the MLflow child run `gate`; and the short NO-GO reports of a run stopped before the gate (by
the compatibility check or by the primary's smoke test).

The report is evidence only (evaluation/report.py); the gate's decision is taken on it afterwards
(`decide(report, policy)`) and written beside it as decision.json. The decision must not die with
a drawing: a report or plot that cannot be drawn (matplotlib reads a model name with two '$' as
math text) is named in `problems`, and report.json / decision.json / report.md are written without it.

    from mergeline.tasks.report_tasks import report_stage
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from mergeline.evaluation.policy import GatePolicy
from mergeline.merge.compat.report import CompatReport
from mergeline.merge.stats import STATS_JSON
from mergeline.tasks import tracking
from mergeline.tasks.merge_tasks import MergeOutcome
from mergeline.tasks.tracking import RunLog


@task(name="report-stage", cache_policy=NO_CACHE)
def report_stage(log: RunLog, suite, table, primary: str, merged: dict[str, MergeOutcome], compat: CompatReport,
                 gate_policy: GatePolicy, fresh_runs: int, extra_inputs: dict, appendix: str = ""):
    """The report (evidence only), then the gate's decision on it (evaluation.gate.decide), in the
    child run `gate`; `appendix` (markdown: the smoke tests) is added to report.md.
    Returns (EvaluationReport, Decision, {kind: path}, problems)."""
    from mergeline.evaluation.gate import decide
    from mergeline.evaluation.plots import all_plots
    from mergeline.evaluation.report import build_report, render_markdown, write_reports

    run_dir = Path(log.run_dir)
    with log.child("gate") as (c, run):
        report = build_report(suite, table, primary=primary,
                              merge_stats={n: m.path / STATS_JSON for n, m in merged.items()}, compat=compat,
                              confidence=gate_policy.confidence, extra_inputs=extra_inputs)
        decision = decide(report, gate_policy)
        problems: list[str] = []
        names = set(merged) | set(table.scores["model"]) | set(compat.norms.get("per_model") or {})
        try:  # drawn once: the PNG files and the HTML page share them
            pngs = all_plots(report, decision)
        except Exception as e:  # noqa: BLE001 - the decision must not die with a drawing
            pngs = None
            problems += [report_problem(what, e, names) for what in ("the HTML report", "the plots")]
        try:
            paths = write_reports(report, decision, run_dir / "report", html=pngs is not None, plots=pngs)
        except Exception as e:  # noqa: BLE001
            problems.append(report_problem("the HTML report", e, names))
            paths = write_reports(report, decision, run_dir / "report", overwrite=True, html=False)
        if appendix and paths.get("md"):
            with open(paths["md"], "a", encoding="utf-8") as f:
                f.write(appendix)
        plots_dir = run_dir / "report" / "plots"
        plots_dir.mkdir(exist_ok=True)
        for pname, png in (pngs or {}).items():
            if png:
                (plots_dir / f"{pname}.png").write_bytes(png)
        summaries = {n: cand.summary.model_dump() for n, cand in report.candidates.items()}
        tracking.log_metrics(c, run, {"scores": {f"{s.model}.{s.task}": s.value for s in report.scores},
                                      "lm_eval_runs": fresh_runs, "go": decision.go})
        tracking.log_metrics(c, run, summaries)
        tracking.set_tags(c, run, {"decision": decision.verdict})
        tracking.log_json(c, run, decision.model_dump(mode="json"), "decision.json")
        for p in paths.values():
            tracking.log_artifact(c, run, Path(p), "report")
        tracking.log_artifact(c, run, plots_dir, "report/plots")
    c = log.client()
    tracking.log_metrics(c, log.parent, summaries)
    if problems:
        tracking.set_tags(c, log.parent, {"mergeline.report_problems": "; ".join(problems)[:5000]})
    prefect_artifacts(render_markdown(report, decision) + appendix, [s.model_dump(mode="json") for s in report.scores])
    return report, decision, paths, problems


def report_problem(what: str, e: Exception, names: set[str]) -> str:
    """One line naming what failed and the model names that may have caused it: matplotlib reads
    a label with two '$' as math text, and fails on what is not valid TeX there."""
    odd = sorted(n for n in names if n.count("$") >= 2)
    culprit = (f"; model name(s) matplotlib reads as math text: {odd} (rename the folders)" if odd
               else "")
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= 160 else msg[:160] + "..."
    return f"{what} could not be drawn ({type(e).__name__}: {msg}){culprit}; the decision stands, see report.md"


def smoke_markdown(smoke: dict) -> str:
    """A section for report.md: every merge's smoke test, a failed one's checks named."""
    rows = [f"| {n} | {'pass' if s.passed else 'FAIL (not evaluated)'} | {s.seconds:.1f} | "
            + ("; ".join(s.reasons()) or "-").replace("|", "\\|").replace("\n", " ") + " |"
            for n, s in smoke.items() if s is not None]
    if not rows:
        return ""
    return ("\n## Smoke test\n\nEach merge, before its full evaluation (evaluation/smoke.py).\n\n"
            "| merge | smoke | seconds | failed checks |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def smoke_summary(smoke: dict) -> dict:
    return {n: None if s is None else {"passed": s.passed, "seconds": s.seconds, "reasons": s.reasons()}
            for n, s in smoke.items()}


def stopped_by_compat(log: RunLog, compat: CompatReport) -> list[str]:
    """The compatibility gate failed: report.md and decision.json (NO-GO at stage `check`) in the
    run folder and on the parent run; returns the reasons."""
    reasons = [f"{ch.name}: {ch.message}" for ch in compat.failed() if not ch.waived]
    md = "# NO-GO: stopped by the compatibility gate\n\nNo merge was computed.\n\n" + "\n".join(
        f"- {r}" for r in reasons) + "\n"
    _stopped(log, md, {"go": False, "verdict": "NO-GO", "stage": "check", "reasons": reasons})
    return reasons


def stopped_by_smoke(log: RunLog, primary: str, result) -> list[str]:
    """The primary merge failed its smoke test: NO-GO at stage `smoke`, no full evaluation, nothing
    registered; returns the reasons."""
    reasons = [f"{primary}: {reason}" for reason in result.reasons()]
    rows = "\n".join(f"| {c.name} | {c.status} | {c.message} |" for c in result.checks)
    md = (f"# NO-GO: {primary} failed the smoke test\n\nThe full evaluation was not run and nothing was "
          f"registered.\n\n" + "\n".join(f"- {x}" for x in reasons) +
          f"\n\n| check | status | evidence |\n|---|---|---|\n{rows}\n\n"
          + "".join(f"- `{c.prompt}` -> `{c.text}`\n" for c in result.continuations))
    _stopped(log, md, {"go": False, "verdict": "NO-GO", "stage": "smoke", "reasons": reasons})
    return reasons


def _stopped(log: RunLog, md: str, decision: dict) -> None:
    run_dir = Path(log.run_dir)
    (run_dir / "report.md").write_text(md)
    (run_dir / "decision.json").write_text(json.dumps(decision, indent=2))
    c = log.client()
    tracking.log_artifact(c, log.parent, run_dir / "report.md", "report")
    tracking.log_json(c, log.parent, decision, "decision.json")
    prefect_artifacts(md, [])


def prefect_artifacts(markdown: str, scores: list[dict]) -> None:
    """The report as the flow run's Prefect artifacts (markdown, and the score table)."""
    create_markdown_artifact(markdown=markdown, key="mergeline-report", description="mergeline report")
    if scores:
        create_table_artifact(table=scores, key="mergeline-scores", description="primary score per model and task")
