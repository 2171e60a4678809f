"""The pipeline flow: check -> merge (TIES + baselines) -> smoke -> evaluate -> gate -> register.

One Prefect flow run per pipeline run, one MLflow parent run with a child run per stage. The
compatibility gate runs first and stops the flow before any merge on a fail (Yadav et al. 2023
assume one shared base; a fine-tune of another base must never reach the merge). Merges and
evaluations are Prefect tasks keyed by content hashes (tasks/caching.py), submitted together so
they run side by side on the task runner (threads by default, Dask with `runner.kind: dask`).
Each merge is smoke-tested (evaluation/smoke.py, seconds) before its full evaluation: a primary
that fails stops the run (NO-GO at stage `smoke`), a baseline that fails is reported, not evaluated.

    mergeline run configs/pipeline_demo.yaml          # exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE, 2 bad input
    python -m mergeline.flows.pipeline configs/pipeline_demo.yaml
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from mergeline.flows import workdir as workdir_state
from mergeline.flows.errors import check_yaml_file
from mergeline.flows.pipeline_config import Pipeline, PipelineError, load_pipeline
from mergeline.flows.progress import Counter, say
from mergeline.flows.servers import check_servers, default_environment, resolve_tracking
from mergeline.flows.workdir import workdir_lock
from mergeline.merge.lineage import recipe_hash, set_run_id
from mergeline.tasks import tracking
from mergeline.tasks.check_tasks import check_compat
from mergeline.tasks.eval_tasks import combine, evaluate_model
from mergeline.tasks.merge_tasks import merge_key, merge_model
from mergeline.tasks.recipes import baseline_recipe, base_name, inputs, resolved_recipe
from mergeline.tasks.register_tasks import register_model
from mergeline.tasks.smoke_tasks import smoke_model


def candidates(pipe: Pipeline) -> tuple[str, dict[str, dict]]:
    """(primary name, {candidate name: resolved recipe}) for the main recipe and the baselines."""
    main = resolved_recipe(*_loaded(pipe, pipe.recipe))
    primary = pipe.primary or main["merge_method"]
    out = {primary: main}
    for b in pipe.baselines:
        if isinstance(b, str):
            out[b] = baseline_recipe(main, b)
        elif b.recipe is not None:
            out[b.name] = resolved_recipe(*_loaded(pipe, b.recipe))
        else:
            out[b.name] = baseline_recipe(main, b.method or b.name)
    return primary, out


def _loaded(pipe: Pipeline, value) -> tuple:
    if isinstance(value, dict):
        return value, pipe.source_dir
    return pipe.path(value), None


def _policy(pipe: Pipeline, value) -> dict | None:
    return pipe.load(value)[0]


@flow(name="mergeline-pipeline", log_prints=True)
def pipeline_flow(pipeline: str, refresh: bool = False) -> dict:
    """Run the pipeline file `pipeline`; returns a summary with the decision ("GO" / "NO-GO")."""
    default_environment()
    pipe = load_pipeline(pipeline)
    if workdir_state.active != pipe.workdir_path:  # a deployment's run: nobody took the lock yet
        with workdir_lock(pipe.workdir_path):
            return _flow_body(pipeline, pipe, refresh)
    return _flow_body(pipeline, pipe, refresh)


def _flow_body(pipeline: str, pipe: Pipeline, refresh: bool) -> dict:
    log = get_run_logger()
    work = pipe.workdir_path
    work.mkdir(parents=True, exist_ok=True)
    track = resolve_tracking(work, pipe.tracking.mlflow_tracking_uri, pipe.tracking.prefect_api_url)
    check_servers(track)
    results = work / "prefect-results"
    opts = dict(result_storage=results, refresh_cache=refresh)

    # -- MLflow parent run --------------------------------------------------------
    c = tracking.client(track.mlflow_uri)
    exp = tracking.ensure_experiment(c, pipe.tracking.experiment, track.artifact_location)
    flow_run = get_run_context().flow_run
    parent = tracking.start_run(c, exp, f"{pipe.name}", tags={
        "mergeline.pipeline": str(Path(pipeline).resolve()), "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": flow_run.name})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = work / "runs" / f"{stamp}-{parent[:8]}"
    run_dir.mkdir(parents=True)
    try:
        summary = _stages(pipe, c, track.mlflow_uri, parent, run_dir, opts, log)
    except BaseException:
        c.set_terminated(parent, "FAILED")
        raise
    summary.update(mlflow_run_id=parent, mlflow_uri=track.mlflow_uri, run_dir=str(run_dir),
                   workdir=str(work))
    tracking.set_tags(c, parent, {"mergeline.decision": summary["decision"]})
    tracking.log_metrics(c, parent, {"go": summary["decision"] == "GO"})
    tracking.log_json(c, parent, summary, "summary.json")
    c.set_terminated(parent, "FINISHED")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info(f"decision: {summary['decision']} (report: {summary.get('report')})")
    return summary


@dataclass
class _Run:
    """What every stage needs: the pipeline, the MLflow client and parent run, the run folder,
    the Prefect task options (result storage, refresh) and the flow's logger."""

    pipe: Pipeline
    c: Any
    mlflow_uri: str
    parent: str
    run_dir: Path
    opts: dict
    log: Any
    compat_policy: dict | None = None  # the merges run the same checks as the check stage


def _stages(pipe: Pipeline, c, mlflow_uri: str, parent: str, run_dir: Path, opts: dict, log) -> dict:
    from mergeline.evaluation.suite import check_ready, load_suite

    r = _Run(pipe, c, mlflow_uri, parent, run_dir, opts, log)
    primary, recipes = candidates(pipe)
    main = recipes[primary]
    compat_policy = _policy(pipe, pipe.compat_policy)
    r.compat_policy = compat_policy
    gate_policy = _policy(pipe, pipe.gate_policy)
    suite_src = pipe.path(pipe.eval_suite) if isinstance(pipe.eval_suite, str) else pipe.eval_suite
    suite = load_suite(suite_src, pipe.placeholders)
    check_ready(suite)
    tracking.log_params(c, parent, {"recipe": main, "recipe_hash": recipe_hash(main),
                                    "baselines": sorted(set(recipes) - {primary}),
                                    "gate_policy": gate_policy, "compat_policy": compat_policy or {},
                                    "seed": pipe.merge.seed})
    tracking.log_json(c, parent, recipes, "recipes.json")

    say("check: compatibility gate started")
    compat = _check(r, main, compat_policy)
    say(f"check: {compat['status']}")
    if compat["status"] == "fail":
        return _stopped_by_compat(compat, run_dir, c, parent, log)
    merged, table, states, fresh_runs, smoke = _merge_and_evaluate(r, recipes, suite, gate_policy)
    if table is None:
        return _stopped_by_smoke(r, primary, merged, smoke, states)
    say("report: metrics, plots and the gate's decision")
    report, decision, paths, problems = _report_and_gate(r, suite, table, primary, merged, compat, gate_policy,
                                                         fresh_runs, recipe_hash(main), _smoke_markdown(smoke))
    verdict = decision.verdict
    say(f"gate: {verdict}")
    registered = _register(r, merged[primary], verdict, recipe_hash(main))
    log.info("\n".join(decision.reasons) or "all gate rules passed")
    # What came from earlier runs: a merge folder found finished, or a task Prefect served from
    # its cache (state "Cached").
    reused_merges = sorted({n for n, m in merged.items() if m.get("reused")}  # per-seed merges by label
                           | {k.split(":", 1)[1] for k, s in states.items() if k.startswith("merge:") and s == "Cached"})
    reused_evals = sorted(k.split(":", 1)[1] for k, s in states.items() if k.startswith("evaluate:") and s == "Cached")
    return {"decision": verdict, "stage": "gate", "primary": primary,
            "reasons": decision.reasons, "report": str(paths.get("md") or next(iter(paths.values()))),
            "reports": {k: str(v) for k, v in paths.items()},
            "models": {n: m["path"] for n, m in merged.items()}, "registered": registered,
            "lm_eval_runs": fresh_runs, "states": states, "problems": problems,
            "smoke": _smoke_summary(smoke), "reused_merges": reused_merges,
            "reused": {"merges": reused_merges, "evaluations": reused_evals}}


def _verdict(decision: dict) -> str:
    """GO / NO-GO / INCONCLUSIVE, from a decision with or without the `verdict` key."""
    return decision.get("verdict") or ("GO" if decision.get("go") else "NO-GO")


def _check(r: _Run, recipe: dict, policy: dict | None) -> dict:
    """1. The compatibility gate, before any merge."""
    with tracking.child_run(r.c, r.parent, "check") as run:
        compat = check_compat.with_options(**r.opts)(recipe, policy)
        tracking.log_json(r.c, run, compat, "compat_report.json")
        tracking.log_metrics(r.c, run, {"delta_norms": (compat.get("norms") or {}).get("per_model", {}),
                                        "compat_fail": compat["status"] == "fail"})
        tracking.set_tags(r.c, run, {"status": compat["status"]})
    (r.run_dir / "compat_report.json").write_text(json.dumps(compat, indent=2))
    return compat


def _merge_and_evaluate(r: _Run, recipes: dict[str, dict], suite, gate_policy: dict):
    """2 + 3. Every merge and every evaluation as a task, submitted together: the base's and the
    fine-tunes' evaluations run while the merges do, each merge's evaluation as soon as it lands
    and passes its smoke test. A primary failing its smoke test: table None, nothing evaluated."""
    pipe, primary = r.pipe, next(iter(recipes))
    folders = inputs(recipes[primary])
    base = base_name(recipes[primary])
    finetunes = {n: p for n, p in folders.items() if n != base}
    unknown = sorted(set(suite.retention) - set(finetunes))
    if unknown:
        raise PipelineError(f"eval suite: retention names {unknown} are not models of the recipe "
                            f"(models: {sorted(finetunes)}); name the fine-tune folders alike")
    suite_dict = suite.model_dump(mode="json")
    score_cache = str(pipe.workdir_path / "score-cache")

    def evaluate(name, path, role):
        path = {k: str(v) for k, v in path.items()} if isinstance(path, dict) else str(path)
        return evaluate_model.with_options(**r.opts).submit(
            name=name, path=path, role=role, suite=suite_dict, cache_dir=score_cache)

    from prefect.futures import as_completed

    evals = {"base": evaluate("base", folders[base], "base")}
    evals.update({n: evaluate(n, finetunes[n], "finetune") for n in suite.retention})
    plan = {name: merge_seeds(name, recipe, suite.seeds, pipe.merge.seed) for name, recipe in recipes.items()}
    merges = {name: {label: merge_model.with_options(**r.opts).submit(
        name=label, recipe=recipes[name], models_dir=str(pipe.workdir_path / "models"),
        key=merge_key(recipes[name], seed), seed=seed, device=pipe.merge.device,
        out_shard_size=pipe.merge.out_shard_size, allow_pickle=pipe.merge.allow_pickle,
        compat_policy=r.compat_policy, mlflow_run_id=r.parent,
        refresh=r.opts["refresh_cache"]) for label, seed in plan[name].items()}
        for name in recipes}
    n_merges = sum(map(len, merges.values()))
    say(f"merge + evaluate: {n_merges} merges and {len(evals) + len(merges)} lm-eval evaluations "
        f"submitted ({pipe.runner.kind}, {pipe.runner.max_workers} workers)")
    merge_count, eval_count = Counter("merges", n_merges), Counter("evaluations", len(evals) + len(merges))
    where = {id(f): (name, label) for name, fs in merges.items() for label, f in fs.items()}
    landed = {name: {} for name in merges}  # candidate -> merge label -> merge result
    merged, smoke = {}, {}
    states = {}  # which stages ran and which came from the cache (Prefect state "Cached")
    for fut in as_completed([f for fs in merges.values() for f in fs.values()]):
        name, label = where[id(fut)]
        m = landed[name][label] = fut.result()
        merge_count.tick(label, " reused" if m.get("reused") or fut.state.name == "Cached" else "")
        _log_merge(r, label, recipes[name], m)
        refs = {n: str(p) for n, p in {**folders, **inputs(recipes[name])}.items()}
        smoke[label] = _smoke(r, label, m["path"], refs, gate_policy, suite.device, states)
        if len(landed[name]) < len(merges[name]):
            continue  # the candidate's other seeds are still merging
        merged[name] = m = {**landed[name][next(iter(merges[name]))]}  # the first seed's
        if len(merges[name]) > 1:  # merge seed k is evaluated with eval seed k
            m["per_seed"] = {plan[name][label]: landed[name][label]["path"] for label in merges[name]}
        if any(smoke[label] is not None and not smoke[label].passed for label in merges[name]):
            eval_count.tick(name, " skipped (failed its smoke test)")
            if name == primary:
                states.update({f"merge:{n}": f.state.name for fs in merges.values() for n, f in fs.items()})
                return {n: merged[n] for n in recipes if n in merged}, None, states, 0, smoke
            continue  # a baseline that fails its smoke test is reported, not evaluated
        evals[name] = evaluate(name, m.get("per_seed") or m["path"], "candidate")
    merged = {n: merged[n] for n in recipes}  # the recipe's order, primary first
    name_of = {id(f): n for n, f in evals.items()}
    tables = {}
    for fut in as_completed(list(evals.values())):
        name = name_of[id(fut)]
        tables[name] = fut.result()
        eval_count.tick(name, " cached" if fut.state.name == "Cached" else "")
    tables = {n: tables[n] for n in evals}
    states.update({f"merge:{n}": f.state.name for fs in merges.values() for n, f in fs.items()})
    states.update({f"evaluate:{n}": f.state.name for n, f in evals.items()})
    fresh_runs = sum(tables[n].runs for n, f in evals.items() if f.state.name != "Cached")
    return merged, combine(list(tables.values())), states, fresh_runs, smoke


def merge_seeds(name: str, recipe: dict, eval_seeds: list[int], seed: int) -> dict[str, int]:
    """{merge label: merge seed}. A random method (DARE, DELLA drop at random) under a suite of
    several seeds is merged once per eval seed, labelled `<name>-seed<k>`, so the spread across
    seeds covers the merge's own randomness; any other candidate once, with the pipeline's seed."""
    from mergeline.merge.methods.registry import get_method

    if get_method(recipe["merge_method"]).randomized and len(eval_seeds) > 1:
        return {f"{name}-seed{k}": k for k in eval_seeds}
    return {name: seed}


def _smoke(r: _Run, name: str, path: str, references: dict[str, str], gate_policy: dict,
           device: str, states: dict):
    """2b. The smoke test of one merge (seconds; tasks/smoke_tasks.py) against its inputs, in a
    child run `smoke:<name>`. None when the gate policy skips it (`smoke: null`, `enabled: false`)."""
    from mergeline.evaluation.policy import load_policy

    rule = load_policy(gate_policy or {}).smoke
    if rule is None or not rule.enabled:
        return None
    text = r.pipe.path(r.pipe.smoke.text).read_text() if r.pipe.smoke.text else None
    state = smoke_model.with_options(**r.opts)(
        name=name, path=path, references=references, text=text, prompts=r.pipe.smoke.prompts,
        rule=rule.model_dump(), device=device, return_state=True)
    result = state.result()
    states[f"smoke:{name}"] = state.name
    with tracking.child_run(r.c, r.parent, f"smoke:{name}") as run:
        tracking.log_metrics(r.c, run, result.metrics())
        tracking.set_tags(r.c, run, {"status": "pass" if result.passed else "fail"})
        tracking.log_json(r.c, run, result.model_dump(mode="json"), "smoke.json")
    (r.run_dir / f"smoke-{name}.json").write_text(result.model_dump_json(indent=2))
    say(f"smoke: {name} {'passed' if result.passed else 'FAILED'} ({result.seconds:.1f} s)")
    if not result.passed:
        r.log.warning(f"{name}: smoke test failed:\n" + "\n".join(result.reasons()))
    return result


def _smoke_summary(smoke: dict) -> dict:
    return {n: None if s is None else {"passed": s.passed, "seconds": s.seconds, "reasons": s.reasons()}
            for n, s in smoke.items()}


def _smoke_markdown(smoke: dict) -> str:
    """A section for report.md: every merge's smoke test, a failed one's checks named."""
    rows = [f"| {n} | {'pass' if s.passed else 'FAIL (not evaluated)'} | {s.seconds:.1f} | "
            + ("; ".join(s.reasons()) or "-").replace("|", "\\|").replace("\n", " ") + " |"
            for n, s in smoke.items() if s is not None]
    if not rows:
        return ""
    return ("\n## Smoke test\n\nEach merge, before its full evaluation (evaluation/smoke.py).\n\n"
            "| merge | smoke | seconds | failed checks |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _stopped_by_smoke(r: _Run, primary: str, merged: dict, smoke: dict, states: dict) -> dict:
    """The primary merge failed its smoke test: NO-GO at stage `smoke`, no full evaluation,
    nothing registered."""
    result = smoke[primary]
    reasons = [f"{primary}: {reason}" for reason in result.reasons()]
    rows = "\n".join(f"| {c.name} | {c.status} | {c.message} |" for c in result.checks)
    md = (f"# NO-GO: {primary} failed the smoke test\n\nThe full evaluation was not run and nothing was "
          f"registered.\n\n" + "\n".join(f"- {x}" for x in reasons) +
          f"\n\n| check | status | evidence |\n|---|---|---|\n{rows}\n\n"
          + "".join(f"- `{c.prompt}` -> `{c.text}`\n" for c in result.continuations))
    (r.run_dir / "report.md").write_text(md)
    decision = {"go": False, "verdict": "NO-GO", "stage": "smoke", "reasons": reasons}
    (r.run_dir / "decision.json").write_text(json.dumps(decision, indent=2))
    tracking.log_artifact(r.c, r.parent, r.run_dir / "report.md", "report")
    tracking.log_json(r.c, r.parent, decision, "decision.json")
    _prefect_artifacts(md, [], None)
    r.log.warning(f"{primary} failed the smoke test; not evaluated, not registered:\n" + "\n".join(reasons))
    return {"decision": "NO-GO", "stage": "smoke", "primary": primary, "reasons": reasons,
            "report": str(r.run_dir / "report.md"), "models": {n: m["path"] for n, m in merged.items()},
            "registered": None, "states": states, "smoke": _smoke_summary(smoke), "lm_eval_runs": 0}


def _log_merge(r: _Run, name: str, recipe: dict, m: dict) -> None:
    with tracking.child_run(r.c, r.parent, f"merge:{name}") as run:
        tracking.log_params(r.c, run, {"recipe": recipe, "content_hash": m["content_hash"]})
        tracking.log_text(r.c, run, yaml.safe_dump(recipe, sort_keys=False), "recipe.yaml")
        stats = m["stats"] or {}
        tracking.log_metrics(r.c, run, {"seconds": m["seconds"],
                                        "sign_conflict_rate": (stats.get("sign_conflict") or {}).get("rate"),
                                        "per_model": stats.get("per_model") or {}})
        for f in ("merge_stats.json", "merge_stats_tensors.csv", "lineage.json", "README.md"):
            tracking.log_artifact(r.c, run, Path(m["path"]) / f, "merge")
        tracking.log_csv_table(r.c, run, Path(m["path"]) / "merge_stats_tensors.csv", "merge/merge_stats_tensors.json")


def _report_and_gate(r: _Run, suite, table, primary: str, merged: dict, compat: dict,
                     gate_policy: dict, fresh_runs: int, main_hash: str, appendix: str = ""):
    """4. Metrics, report (json/md/html + plots), then the gate's decision on it (decision.json),
    logged and published; `appendix` (markdown: the smoke tests) is added to report.md.
    Returns (EvaluationReport, Decision, paths, problems)."""
    from mergeline.evaluation.gate import decide
    from mergeline.evaluation.plots import all_plots
    from mergeline.evaluation.policy import load_policy
    from mergeline.evaluation.report import build_report, render_markdown, write_reports

    c, parent = r.c, r.parent
    policy = load_policy(gate_policy)
    report = build_report(suite, table, primary=primary,
                          merge_stats={n: m["stats"] for n, m in merged.items()}, compat=compat,
                          confidence=policy.confidence,
                          extra_inputs={"pipeline": r.pipe.name, "recipe_hash": main_hash,
                                        "mlflow_run_id": parent})
    decision = decide(report, policy)
    problems: list[str] = []
    names = set(merged) | set(table.scores["model"]) | set((compat.get("norms") or {}).get("per_model") or {})
    try:
        paths = write_reports(report, decision, r.run_dir / "report")
    except Exception as e:  # noqa: BLE001 - the decision must not die with a drawing
        problems.append(_report_problem("the HTML report", e, names))
        paths = _plain_reports(report, decision, r.run_dir / "report")
    if appendix and paths.get("md"):
        with open(paths["md"], "a", encoding="utf-8") as f:
            f.write(appendix)
    plots_dir = r.run_dir / "report" / "plots"
    plots_dir.mkdir(exist_ok=True)
    try:
        for pname, png in all_plots(report, decision).items():
            if png:
                (plots_dir / f"{pname}.png").write_bytes(png)
    except Exception as e:  # noqa: BLE001
        problems.append(_report_problem("the plots", e, names))
    for p in problems:
        r.log.warning(p)
    summaries = {n: cand.summary.model_dump() for n, cand in report.candidates.items()}
    with tracking.child_run(c, parent, "evaluate") as run:
        tracking.log_metrics(c, run, {"scores": {f"{s.model}.{s.task}": s.value for s in report.scores},
                                      "lm_eval_runs": fresh_runs})
        tracking.log_metrics(c, run, summaries)
    with tracking.child_run(c, parent, "gate") as run:
        tracking.log_metrics(c, run, {"go": decision.go})
        tracking.set_tags(c, run, {"decision": decision.verdict})
        tracking.log_json(c, run, decision.model_dump(mode="json"), "decision.json")
        for p in paths.values():
            tracking.log_artifact(c, run, Path(p), "report")
        tracking.log_artifact(c, run, plots_dir, "report/plots")
    tracking.log_metrics(c, parent, summaries)
    if problems:
        tracking.set_tags(c, parent, {"mergeline.report_problems": "; ".join(problems)[:5000]})
    _prefect_artifacts(render_markdown(report, decision) + appendix,
                       [s.model_dump(mode="json") for s in report.scores], r.pipe.name)
    return report, decision, paths, problems


def _report_problem(what: str, e: Exception, names: set[str]) -> str:
    """One line naming what failed and the model names that may have caused it: matplotlib reads
    a label with two '$' as math text, and fails on what is not valid TeX there."""
    odd = sorted(n for n in names if n.count("$") >= 2)
    culprit = (f"; model name(s) matplotlib reads as math text: {odd} (rename the folders)" if odd
               else "")
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= 160 else msg[:160] + "..."
    return f"{what} could not be drawn ({type(e).__name__}: {msg}){culprit}; the decision stands, see report.md"


def _plain_reports(report, decision, out_dir: Path) -> dict[str, Path]:
    """report.json, decision.json and report.md without the HTML (its plots failed)."""
    from mergeline.evaluation.report import write_reports

    return write_reports(report, decision, out_dir, overwrite=True, html=False)


def _register(r: _Run, m: dict, verdict: str, main_hash: str) -> dict | None:
    """5. The primary merge into the registry: `candidate` always, `champion` only on GO."""
    set_run_id(m["path"], r.parent)  # a reused merge records the run that registered it
    registered = None
    if r.pipe.tracking.register_as:
        with tracking.child_run(r.c, r.parent, "register") as run:
            registered = register_model(r.mlflow_uri, r.pipe.tracking.register_as, m["path"], r.parent,
                                        m["content_hash"], verdict, {"mergeline.recipe_hash": main_hash})
            tracking.log_params(r.c, run, registered)
    tracking.log_artifact(r.c, r.parent, Path(m["path"]) / "lineage.json")
    return registered


def _stopped_by_compat(compat: dict, run_dir: Path, c, parent: str, log) -> dict:
    reasons = [f"{ch['name']}: {ch['message']}" for ch in compat["checks"]
               if ch["status"] == "fail" and not ch.get("waived")]
    md = "# NO-GO: stopped by the compatibility gate\n\nNo merge was computed.\n\n" + "\n".join(
        f"- {r}" for r in reasons) + "\n"
    (run_dir / "report.md").write_text(md)
    decision = {"go": False, "verdict": "NO-GO", "stage": "check", "reasons": reasons}
    (run_dir / "decision.json").write_text(json.dumps(decision, indent=2))
    tracking.log_artifact(c, parent, run_dir / "report.md", "report")
    tracking.log_json(c, parent, decision, "decision.json")
    _prefect_artifacts(md, [], None)
    log.warning("compatibility gate failed; no merge computed:\n" + "\n".join(reasons))
    return {"decision": "NO-GO", "stage": "check", "reasons": reasons, "report": str(run_dir / "report.md"),
            "models": {}, "registered": None}


def _prefect_artifacts(markdown: str, scores: list[dict], name: str | None) -> None:
    key = "mergeline-report"
    create_markdown_artifact(markdown=markdown, key=key, description="mergeline report")
    if scores:
        create_table_artifact(table=scores, key="mergeline-scores", description="primary score per model and task")


# ---------------------------------------------------------------- entry point


def task_runner(pipe: Pipeline):
    if pipe.runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if pipe.runner.dask_address:
            return DaskTaskRunner(address=pipe.runner.dask_address)
        # Threads, not processes: worker processes would each start their own temporary Prefect
        # server when no PREFECT_API_URL is set.
        return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": pipe.runner.max_workers,
                                              "processes": False, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=pipe.runner.max_workers)


def validate(pipe: Pipeline) -> None:
    """Load everything the file names (recipes, suite, policies) and resolve every model: a bad
    key or a missing folder fails here, in seconds, not halfway through a run."""
    from mergeline.evaluation.policy import load_policy as load_gate_policy
    from mergeline.evaluation.suite import check_ready, load_suite
    from mergeline.merge.compat.policy import load_policy as load_compat_policy

    for key in ("recipe", "eval_suite", "gate_policy", "compat_policy"):
        value = getattr(pipe, key)
        if isinstance(value, str):
            check_yaml_file(pipe.path(value), f"{key.replace('_', ' ')} (pipeline key '{key}')")
    for b in pipe.baselines:
        if not isinstance(b, str) and isinstance(b.recipe, str):
            check_yaml_file(pipe.path(b.recipe), f"baseline {b.name} recipe")
    candidates(pipe)
    load_gate_policy(_policy(pipe, pipe.gate_policy))
    load_compat_policy(_policy(pipe, pipe.compat_policy))
    suite_src = pipe.path(pipe.eval_suite) if isinstance(pipe.eval_suite, str) else pipe.eval_suite
    check_ready(load_suite(suite_src, pipe.placeholders))


def run_pipeline(path: str | Path, refresh: bool = False) -> dict:
    """Take the workdir's lock, validate the file, check the servers (fast), then run the flow.
    Raises PipelineError, ServerUnreachable, WorkdirBusy, ... (flows.errors.input_errors())
    before any heavy work."""
    default_environment()
    pipe = load_pipeline(path)
    with workdir_lock(pipe.workdir_path) if workdir_state.active != pipe.workdir_path else _held():
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value() or None  # env or the active Prefect profile
        track = resolve_tracking(pipe.workdir_path, pipe.tracking.mlflow_tracking_uri,
                                 pipe.tracking.prefect_api_url or api)
        check_servers(track)
        validate(pipe)
        say(f"pipeline {pipe.name}: workdir {pipe.workdir_path}")
        if not track.prefect_api_url:
            say("prefect: starting its temporary server (~20 s; set PREFECT_API_URL to use a running one)")
        flow_fn = pipeline_flow.with_options(task_runner=task_runner(pipe))
        if track.prefect_api_url and track.prefect_api_url != api:
            from prefect.settings import temporary_settings

            with temporary_settings({PREFECT_API_URL: track.prefect_api_url}):
                summary = flow_fn(pipeline=str(Path(path).resolve()), refresh=refresh)
        else:
            summary = flow_fn(pipeline=str(Path(path).resolve()), refresh=refresh)
    say(f"done: {summary['decision']}")
    return summary


@contextmanager
def _held():
    yield  # the caller (mergeline demo) holds the workdir's lock already


def input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean unusable input (exit 2): the one list in flows/errors.py."""
    from mergeline.flows.errors import input_errors as errors

    return errors()


if __name__ == "__main__":
    print(json.dumps(run_pipeline(sys.argv[1]), indent=2, default=str))
