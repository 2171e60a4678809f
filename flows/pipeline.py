"""The pipeline flow: check -> merge (TIES + baselines) -> smoke -> evaluate -> report + gate -> register.

One Prefect flow run per pipeline run, one MLflow parent run; every stage is a Prefect task in
tasks/ that opens its own MLflow child run around its work (so a stage run's start and end in the
MLflow UI are the stage's) and calls the cached work inside it, keyed by content (tasks/caching.py).
This file only wires the stages. The compatibility gate runs first and stops the flow before any
merge on a fail (Yadav et al. 2023 assume one shared base; a fine-tune of another base must never
reach the merge). Merges and evaluations are submitted together so they run side by side on the
task runner (threads by default, Dask with `runner.kind: dask`); each merge is smoke-tested
(evaluation/smoke.py, seconds) before its full evaluation: a primary that fails stops the run
(NO-GO at stage `smoke`), a baseline that fails is reported, not evaluated. A multi-stage recipe
(merge/multistage.py) runs its earlier stages first, each checked, merged and cached on its own.

    mergeline run configs/pipeline_demo.yaml          # exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE, 2 bad input
    python -m mergeline.flows.pipeline configs/pipeline_demo.yaml
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.futures import as_completed

from mergeline.flows import workdir as workdir_state
from mergeline.flows.pipeline_config import (Candidate, Pipeline, ResolvedPipeline,
                                             check_retention_names, load_pipeline, read_pipeline, resolve)
from mergeline.flows.progress import Counter, say
from mergeline.flows.servers import check_servers, default_environment, resolve_tracking
from mergeline.flows.workdir import workdir_lock
from mergeline.merge.compat.report import CompatReport
from mergeline.merge.lineage import recipe_hash
from mergeline.merge.multistage import stage_key, stage_record
from mergeline.tasks import tracking
from mergeline.tasks.check_tasks import check_stage
from mergeline.tasks.eval_tasks import combine, evaluate_stage
from mergeline.tasks.merge_tasks import merge_key, merge_stage, multistage_step
from mergeline.tasks.recipes import canonical, inputs
from mergeline.tasks.register_tasks import register_stage
from mergeline.tasks.report_tasks import (report_stage, smoke_markdown, smoke_summary, stopped_by_compat,
                                          stopped_by_smoke)
from mergeline.tasks.smoke_tasks import smoke_stage
from mergeline.tasks.tracking import RunLog

# run_pipeline's resolved pipeline, handed to its own flow run (a deployment's run loads the file).
_HANDED: dict[str, ResolvedPipeline] = {}


@flow(name="mergeline-pipeline", log_prints=True)
def pipeline_flow(pipeline: str, refresh: bool = False) -> dict:
    """Run the pipeline file `pipeline`; returns a summary with the decision ("GO" / "NO-GO")."""
    default_environment()
    pipe = _HANDED.get(pipeline) or load_pipeline(pipeline)
    if workdir_state.active != pipe.workdir_path:  # a deployment's run: nobody took the lock yet
        with workdir_lock(pipe.workdir_path):
            return _recorded(pipeline, pipe, refresh)
    return _recorded(pipeline, pipe, refresh)


def _recorded(pipeline: str, pipe: ResolvedPipeline, refresh: bool) -> dict:
    """The stages inside the MLflow parent run, which ends with the decision (FAILED if a stage raises)."""
    work = pipe.workdir_path
    work.mkdir(parents=True, exist_ok=True)
    track = resolve_tracking(work, pipe.tracking.mlflow_tracking_uri, pipe.tracking.prefect_api_url)
    check_servers(track)
    c = tracking.client(track.mlflow_uri)
    exp = tracking.ensure_experiment(c, pipe.tracking.experiment, track.artifact_location)
    flow_run = get_run_context().flow_run
    parent = tracking.start_run(c, exp, pipe.name, tags={
        "mergeline.pipeline": str(Path(pipeline).resolve()), "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": flow_run.name})
    run_dir = work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{parent[:8]}"
    run_dir.mkdir(parents=True)
    log = RunLog(track.mlflow_uri, parent, str(run_dir))
    opts = dict(result_storage=work / "prefect-results", refresh_cache=refresh)
    try:
        summary = stages(pipe, log, opts)
    except BaseException:
        c.set_terminated(parent, "FAILED")
        raise
    summary.update(mlflow_run_id=parent, mlflow_uri=track.mlflow_uri, run_dir=str(run_dir), workdir=str(work))
    tracking.set_tags(c, parent, {"mergeline.decision": summary["decision"]})
    tracking.log_metrics(c, parent, {"go": summary["decision"] == "GO"})
    tracking.log_json(c, parent, summary, "summary.json")
    c.set_terminated(parent, "FINISHED")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    get_run_logger().info(f"decision: {summary['decision']} (report: {summary.get('report')})")
    return summary


def stages(pipe: ResolvedPipeline, log: RunLog, opts: dict) -> dict:
    """The pipeline, top to bottom; returns the run's summary."""
    primary = pipe.primary_name
    main_hash = _log_inputs(pipe, log)
    recipes, states = {}, {}
    for cand in pipe.candidates.values():  # a multi-stage recipe's earlier stages, each checked first
        recipes[cand.name], failed = _earlier_stages(pipe, log, opts, cand, states)
        if failed is not None:
            return _nogo_at_check(log, failed)
    say("check: compatibility gate started")
    compat = check_stage(log, recipes[primary], pipe.compat, opts)
    say(f"check: {compat.status}")
    if compat.status == "fail":
        return _nogo_at_check(log, compat)
    merged, smoke, tables = _merge_smoke_evaluate(pipe, log, opts, recipes, states)
    if tables is None:
        return _nogo_at_smoke(log, primary, merged, smoke, states)
    say("report: metrics, plots and the gate's decision")
    fresh_runs = sum(t.runs for n, t in tables.items() if states[f"evaluate:{n}"] != "Cached")
    report, decision, paths, problems = report_stage(
        log, pipe.suite, combine(list(tables.values())), primary, merged, compat, pipe.gate, fresh_runs,
        {"pipeline": pipe.name, "recipe_hash": main_hash, "mlflow_run_id": log.parent}, smoke_markdown(smoke))
    for problem in problems:
        get_run_logger().warning(problem)
    say(f"gate: {decision.verdict}")
    registered = register_stage(log, pipe.tracking.register_as, merged[primary], decision.verdict, main_hash)
    get_run_logger().info("\n".join(decision.reasons) or "all gate rules passed")
    reused = _reused(merged, states)
    return {"decision": decision.verdict, "stage": "gate", "primary": primary,
            "reasons": decision.reasons, "report": str(paths.get("md") or next(iter(paths.values()))),
            "reports": {k: str(v) for k, v in paths.items()},
            "models": {n: str(m.path) for n, m in merged.items()}, "registered": registered,
            "lm_eval_runs": fresh_runs, "states": states, "problems": problems,
            "smoke": smoke_summary(smoke), "reused_merges": reused["merges"], "reused": reused}


def _log_inputs(pipe: ResolvedPipeline, log: RunLog) -> str:
    """What the run is judged on, on the parent run: the recipe, the policies, the seed. Returns
    the recipe's hash."""
    c, main = log.client(), canonical(pipe.main.recipe)
    main_hash = recipe_hash(main)
    tracking.log_params(c, log.parent, {
        "recipe": main, "recipe_hash": main_hash, "baselines": sorted(set(pipe.candidates) - {pipe.primary_name}),
        "gate_policy": pipe.gate.model_dump(mode="json", exclude_none=True),
        "compat_policy": pipe.compat.model_dump(mode="json", exclude_none=True), "seed": pipe.merge.seed})
    tracking.log_json(c, log.parent, {n: canonical(cand.recipe) for n, cand in pipe.candidates.items()}, "recipes.json")
    stages = {n: [{"name": s.name, "needs": s.needs, "out": str(s.out)} for s in cand.stages]
              for n, cand in pipe.candidates.items() if cand.stages}
    if stages:
        tracking.log_json(c, log.parent, stages, "stages.json")
    return main_hash


def _earlier_stages(pipe: ResolvedPipeline, log: RunLog, opts: dict, cand: Candidate, states: dict):
    """A multi-stage candidate's earlier stages, in order, each checked and merged in its own
    child runs (`check:<stage>`, `stage:<stage>`). Returns (the final recipe with every stage's
    record, for its lineage; None) or (None, the failed compatibility report)."""
    if not cand.stages:
        return cand.recipe, None
    records = []
    for st in cand.stages:
        say(f"stage {cand.name}/{st.name}: check and merge")
        compat = check_stage(log, st.recipe, pipe.compat, opts, run_name=f"check:{st.name}")
        if compat.status == "fail":
            return None, compat
        done, record = multistage_step(log, st, pipe.merge.seed, _settings(pipe), pipe.compat, opts)
        states[f"stage:{st.name}"] = "Cached" if done.reused else done.state
        records.append({**record, "content_hash": done.content_hash})
    records.append(stage_record(cand.final, stage_key(cand.final)))
    return cand.recipe.model_copy(update={"stages": records}), None


def _nogo_at_check(log: RunLog, compat: CompatReport) -> dict:
    reasons = stopped_by_compat(log, compat)
    get_run_logger().warning("compatibility gate failed; no merge computed:\n" + "\n".join(reasons))
    return {"decision": "NO-GO", "stage": "check", "reasons": reasons, "report": str(Path(log.run_dir) / "report.md"),
            "models": {}, "registered": None}


def _nogo_at_smoke(log: RunLog, primary: str, merged: dict, smoke: dict, states: dict) -> dict:
    reasons = stopped_by_smoke(log, primary, smoke[primary])
    get_run_logger().warning(f"{primary} failed the smoke test; not evaluated, not registered:\n" + "\n".join(reasons))
    return {"decision": "NO-GO", "stage": "smoke", "primary": primary, "reasons": reasons,
            "report": str(Path(log.run_dir) / "report.md"), "models": {n: str(m.path) for n, m in merged.items()},
            "registered": None, "states": states, "smoke": smoke_summary(smoke), "lm_eval_runs": 0}


def _settings(pipe: Pipeline) -> dict:
    return {"device": pipe.merge.device, "out_shard_size": pipe.merge.out_shard_size,
            "allow_pickle": pipe.merge.allow_pickle}


def _merge_smoke_evaluate(pipe: ResolvedPipeline, log: RunLog, opts: dict, recipes: dict, states: dict):
    """Every merge and every evaluation as a stage task, submitted together: the base's and the
    fine-tunes' evaluations run while the merges do, each merge's evaluation as soon as it lands
    and passes its smoke test. Returns (merged, smoke results, {name: ScoreTable}); the tables are
    None when the primary fails its smoke test (nothing of it is evaluated)."""
    primary, suite = pipe.primary_name, pipe.suite
    folders = pipe.main.leaves()
    base = pipe.main.base()
    check_retention_names(suite, folders, base)
    score_cache = str(pipe.workdir_path / "score-cache")

    def evaluate(name, path, role):
        path = {k: str(v) for k, v in path.items()} if isinstance(path, dict) else str(path)
        return evaluate_stage.submit(log, name, path, role, suite, score_cache, opts)

    evals = {"base": evaluate("base", folders[base], "base")}
    evals.update({n: evaluate(n, folders[n], "finetune") for n in suite.retention})
    plan = {name: merge_seeds(name, recipe, suite.seeds, pipe.merge.seed) for name, recipe in recipes.items()}
    merges = {name: {label: merge_stage.submit(log, label, recipes[name], str(pipe.workdir_path / "models"),
                                               merge_key(recipes[name], seed), seed, _settings(pipe), pipe.compat, opts)
                     for label, seed in plan[name].items()} for name in recipes}
    n_merges = sum(map(len, merges.values()))
    say(f"merge + evaluate: {n_merges} merges and {len(evals) + len(merges)} lm-eval evaluations "
        f"submitted ({pipe.runner.kind}, {pipe.runner.max_workers} workers)")
    merge_count, eval_count = Counter("merges", n_merges), Counter("evaluations", len(evals) + len(merges))
    where = {id(f): (name, label) for name, fs in merges.items() for label, f in fs.items()}
    landed = {name: {} for name in merges}  # candidate -> merge label -> merge result
    merged, smoke = {}, {}
    for fut in as_completed([f for fs in merges.values() for f in fs.values()]):
        name, label = where[id(fut)]
        m = landed[name][label] = fut.result()
        states[f"merge:{label}"] = m.state
        merge_count.tick(label, " reused" if m.reused or m.state == "Cached" else "")
        refs = {n: str(p) for n, p in {**folders, **inputs(recipes[name])}.items()}
        smoke[label] = _smoke(pipe, log, opts, label, str(m.path), refs, states)
        if len(landed[name]) < len(merges[name]):
            continue  # the candidate's other seeds are still merging
        m = landed[name][next(iter(merges[name]))]  # the first seed's
        if len(merges[name]) > 1:  # merge seed k is evaluated with eval seed k
            m = m.model_copy(update={"per_seed": {plan[name][lb]: landed[name][lb].path for lb in merges[name]}})
        merged[name] = m
        if any(smoke[label] is not None and not smoke[label].passed for label in merges[name]):
            eval_count.tick(name, " skipped (failed its smoke test)")
            if name == primary:
                for label, other in ((lb, f) for fs in merges.values() for lb, f in fs.items()):
                    other.wait()  # the other merges end (and are recorded) before the run does
                    if f"merge:{label}" not in states and other.state.is_completed():
                        states[f"merge:{label}"] = other.result().state
                return {n: merged[n] for n in recipes if n in merged}, smoke, None
            continue  # a baseline that fails its smoke test is reported, not evaluated
        evals[name] = evaluate(name, m.per_seed or m.path, "candidate")
    merged = {n: merged[n] for n in recipes}  # the recipe's order, primary first
    name_of = {id(f): n for n, f in evals.items()}
    tables = {}
    for fut in as_completed(list(evals.values())):
        name = name_of[id(fut)]
        tables[name], states[f"evaluate:{name}"] = fut.result()
        eval_count.tick(name, " cached" if states[f"evaluate:{name}"] == "Cached" else "")
    return merged, smoke, {n: tables[n] for n in evals}


def merge_seeds(name: str, recipe, eval_seeds: list[int], seed: int) -> dict[str, int]:
    """{merge label: merge seed}. A random method (DARE, DELLA drop at random) under a suite of
    several seeds is merged once per eval seed, labelled `<name>-seed<k>`, so the spread across
    seeds covers the merge's own randomness; any other candidate once, with the pipeline's seed."""
    from mergeline.merge.methods.registry import get_method

    method = recipe["merge_method"] if isinstance(recipe, dict) else recipe.merge_method
    if get_method(method).randomized and len(eval_seeds) > 1:
        return {f"{name}-seed{k}": k for k in eval_seeds}
    return {name: seed}


def _smoke(pipe: ResolvedPipeline, log: RunLog, opts: dict, name: str, path: str, references: dict[str, str],
           states: dict):
    """The smoke test of one merge against its inputs (a stage task, child run `smoke:<name>`).
    None when the gate policy skips it (`smoke: null`, `enabled: false`)."""
    rule = pipe.gate.smoke
    if rule is None or not rule.enabled:
        return None
    text = pipe.path(pipe.smoke.text).read_text() if pipe.smoke.text else None
    result, states[f"smoke:{name}"] = smoke_stage(log, name, path, references, text, pipe.smoke.prompts, rule,
                                                  pipe.suite.device, opts)
    say(f"smoke: {name} {'passed' if result.passed else 'FAILED'} ({result.seconds:.1f} s)")
    if not result.passed:
        get_run_logger().warning(f"{name}: smoke test failed:\n" + "\n".join(result.reasons()))
    return result


def _reused(merged: dict, states: dict) -> dict:
    """What came from earlier runs: a merge folder found finished, or a stage Prefect served from
    its cache (state "Cached")."""
    merges = sorted({n for n, m in merged.items() if m.reused}  # per-seed merges by label
                    | {k.split(":", 1)[1] for k, s in states.items() if k.startswith("merge:") and s == "Cached"})
    evals = sorted(k.split(":", 1)[1] for k, s in states.items() if k.startswith("evaluate:") and s == "Cached")
    return {"merges": merges, "evaluations": evals}


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


def candidates(pipe: Pipeline) -> tuple[str, dict[str, dict]]:
    """(primary name, {candidate name: recipe mapping}), for callers that edit recipes as
    mappings (the tuner); the mapping is the typed recipe's canonical dump, so cache keys agree."""
    pipe = resolve(pipe)
    return pipe.primary_name, {n: canonical(c.recipe) for n, c in pipe.candidates.items()}


def run_pipeline(path: str | Path, refresh: bool = False) -> dict:
    """Take the workdir's lock, validate the file, check the servers (fast), then run the flow.
    Raises PipelineError, ServerUnreachable, WorkdirBusy, ... (flows.errors.input_errors())
    before any heavy work."""
    default_environment()
    pipe = read_pipeline(path)  # the file alone: the servers are checked before its models are read
    with workdir_lock(pipe.workdir_path) if workdir_state.active != pipe.workdir_path else _held():
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value() or None  # env or the active Prefect profile
        track = resolve_tracking(pipe.workdir_path, pipe.tracking.mlflow_tracking_uri,
                                 pipe.tracking.prefect_api_url or api)
        check_servers(track)
        pipe = resolve(pipe)  # everything the file names, once: the flow run takes this one
        say(f"pipeline {pipe.name}: workdir {pipe.workdir_path}")
        if not track.prefect_api_url:
            say("prefect: starting its temporary server (~20 s; set PREFECT_API_URL to use a running one)")
        flow_fn = pipeline_flow.with_options(task_runner=task_runner(pipe))
        key = str(Path(path).resolve())
        _HANDED[key] = pipe  # the flow run takes it instead of loading the file again
        try:
            if track.prefect_api_url and track.prefect_api_url != api:
                from prefect.settings import temporary_settings

                with temporary_settings({PREFECT_API_URL: track.prefect_api_url}):
                    summary = flow_fn(pipeline=key, refresh=refresh)
            else:
                summary = flow_fn(pipeline=key, refresh=refresh)
        finally:
            _HANDED.pop(key, None)
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
