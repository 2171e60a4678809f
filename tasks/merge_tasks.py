"""The merge stage: one merge (TIES, a baseline, or a stage of a multi-stage recipe), with lineage.

`merge_model` is the cached work: it writes `<models_dir>/<name>-<key12>`, where the key hashes the
recipe's canonical dump, the inputs' content hashes, the seed and the merge and tasks code, so a
changed input gives a new folder and a model version registered earlier keeps pointing at the
weights it was registered with. It returns a `MergeOutcome`: merge/result.py's MergeResult plus
the run's facts (seconds, reused, Prefect state). `merge_stage` is the stage: it opens the MLflow
child run `merge:<name>` around the merge and logs the recipe, statistics and the model's files.

A multi-stage recipe (merge/multistage.py) runs each earlier stage with `multistage_step`: its own
child run `stage:<name>`, its output kept under the workdir (`<workdir>/stages/<candidate>/<name>`),
cached by `stage_key` (its recipe and its inputs' content) so a rerun reuses every stage.

    from mergeline.tasks.merge_tasks import merge_stage, multistage_step
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeline.merge.lineage import LINEAGE_FILE, build_lineage, describe_input, load_lineage, write_lineage
from mergeline.merge.multistage import Stage, stage_key, stage_record
from mergeline.merge.recipe import MergeRecipe
from mergeline.merge.result import MergeResult, StatsSummary
from mergeline.merge.stats import STATS_JSON
from mergeline.tasks import tracking
from mergeline.tasks.caching import code_version, from_parameter, key_of
from mergeline.tasks.recipes import base_name, canonical, input_hashes, inputs, typed
from mergeline.tasks.tracking import RunLog


class MergeOutcome(MergeResult):
    """What the merge stage hands on: the merge (path, content hash, method, statistics in brief,
    waivers) and the facts of its run. The full statistics stay in the folder's merge_stats.json."""
    name: str
    seconds: float = 0.0
    reused: bool = False     # the folder was found finished (a run interrupted after this merge): not merged again
    state: str | None = None  # the cached work's Prefect state, set by the stage ("Cached": an earlier run's result)
    per_seed: dict[int, Path] | None = None  # eval seed -> that seed's merge, for a candidate merged once per seed


def merge_key(recipe: MergeRecipe | dict, seed: int) -> str:
    # the tasks code is in the key too: a result persisted by older code (another shape) is never read back
    return key_of("merge", canonical(recipe), input_hashes(recipe), seed, code_version("merge", "tasks"))


@task(name="merge", cache_key_fn=from_parameter("key"), persist_result=True,
      retries=1, retry_delay_seconds=5)  # a retry covers a transient OOM or full disk
def merge_model(name: str, recipe: MergeRecipe | dict, models_dir: str, key: str, seed: int = 0,
                device: str = "cpu", out_shard_size: str = "5GB", allow_pickle: bool = False,
                compat_policy=None, mlflow_run_id: str | None = None,
                refresh: bool = False) -> MergeOutcome:
    """Merge `recipe` into models_dir/<name>-<key12>: its MergeOutcome (path, content hash, stats, seconds).
    The merge runs the compatibility checks under `compat_policy` (the check stage's policy)."""
    from mergeline.merge.compat.gate import summary
    from mergeline.merge.executor import run_merge

    recipe = typed(recipe)
    out = Path(models_dir) / f"{name}-{key[:12]}"
    done = load_lineage(out) if (out / LINEAGE_FILE).is_file() else None
    if done is not None and done.get("cache_key") == key and not refresh:
        # Finished earlier (e.g. a run interrupted after this merge): reuse the folder.
        stats = json.loads((out / STATS_JSON).read_text()) if (out / STATS_JSON).is_file() else None
        return MergeOutcome(name=name, path=out, content_hash=done["content_hash"], method=done["method"],
                            stats=StatsSummary.from_stats(stats) if stats else None, reused=True)
    result = run_merge(recipe, out, device=device, out_shard_size=out_shard_size,
                       overwrite=out.exists(), seed=seed, allow_pickle=allow_pickle, progress=False,
                       policy=compat_policy, lineage=False)
    folders = inputs(recipe)
    base = base_name(recipe)
    extra = {"cache_key": key, **({"stages": recipe.stages} if recipe.stages else {})}
    lineage = build_lineage(
        name=name, model_dir=result.path, recipe=canonical(recipe), method=recipe.merge_method, seed=seed,
        base=describe_input(base, recipe.base_model, folders[base]) if base else None,
        parents=[describe_input(n, str(p), p) for n, p in folders.items() if n != base],
        mlflow_run_id=mlflow_run_id, extra=extra,
        checks=summary(result.checks) if result.checks is not None else None)
    write_lineage(result.path, lineage)
    merged = MergeResult.from_output(result, hash_it=False).model_copy(update={"content_hash": lineage["content_hash"]})
    return MergeOutcome(**merged.model_dump(), name=name, seconds=result.seconds)


@task(name="merge-stage", cache_policy=NO_CACHE)
def merge_stage(log: RunLog, name: str, recipe: MergeRecipe, models_dir: str, key: str, seed: int, settings: dict,
                compat_policy, opts: dict) -> MergeOutcome:
    """One merge in its own child run `merge:<name>`: its MergeOutcome with `state`, the cached
    work's Prefect state ("Cached" when an earlier run's result was reused). The flow computes
    `key` (merge_key), where the inputs' content hashes are already known."""
    with log.child(f"merge:{name}") as (c, run):
        state = merge_model.with_options(**opts)(
            name=name, recipe=recipe, models_dir=models_dir, key=key, seed=seed,
            compat_policy=compat_policy, mlflow_run_id=log.parent, refresh=opts.get("refresh_cache", False),
            return_state=True, **settings)
        m = state.result()
        _log_merge(c, run, recipe, m, cached=state.name == "Cached")
    return m.model_copy(update={"state": state.name})


def _log_merge(c, run: str, recipe: MergeRecipe, m: MergeOutcome, cached: bool) -> None:
    data = canonical(recipe)
    tracking.log_params(c, run, {"recipe": data, "content_hash": m.content_hash})
    tracking.log_text(c, run, yaml.safe_dump(data, sort_keys=False), "recipe.yaml")
    tracking.set_tags(c, run, {"mergeline.cached": cached, "mergeline.reused": m.reused})
    stats = m.stats or StatsSummary()
    # seconds merging in this run: none when an earlier run's merge was reused
    tracking.log_metrics(c, run, {"seconds": 0.0 if cached else m.seconds,
                                  "sign_conflict_rate": stats.sign_conflict_rate, "per_model": stats.per_model})
    for f in (STATS_JSON, "merge_stats_tensors.csv", "lineage.json", "README.md"):
        tracking.log_artifact(c, run, m.path / f, "merge")
    tracking.log_csv_table(c, run, m.path / "merge_stats_tensors.csv", "merge/merge_stats_tensors.json")


# ---------------------------------------------------------------- multi-stage recipes


@task(name="stage", cache_key_fn=from_parameter("key"), persist_result=True, retries=1, retry_delay_seconds=5)
def merge_step(stage: Stage, key: str, seed: int = 0, device: str = "cpu", out_shard_size: str = "5GB",
               allow_pickle: bool = False, compat_policy=None, refresh: bool = False) -> MergeOutcome:
    """One earlier stage of a multi-stage recipe into `stage.out` (merge.multistage.run_stage: an
    output written from the same recipe and inputs is kept, `reused`)."""
    from mergeline.merge.multistage import run_stage

    out = run_stage(stage, reuse=not refresh, key=stage_key(stage), seed=seed, device=device,
                    out_shard_size=out_shard_size, allow_pickle=allow_pickle, progress=False,
                    policy=compat_policy)
    if out is None:
        return MergeOutcome(**MergeResult.from_folder(stage.out).model_dump(), name=stage.name, reused=True)
    return MergeOutcome(**MergeResult.from_output(out).model_dump(), name=stage.name, seconds=out.seconds)


@task(name="multistage-step", cache_policy=NO_CACHE)
def multistage_step(log: RunLog, stage: Stage, seed: int, settings: dict, compat_policy,
                    opts: dict) -> tuple[MergeOutcome, dict]:
    """One earlier stage in its own child run `stage:<name>`; returns (its MergeOutcome with its
    Prefect state, `record`: what the final model's lineage lists for it). Its inputs (earlier
    stages) must be written: the key hashes their content."""
    skey = stage_key(stage)
    key = key_of("stage", skey, seed, code_version("merge", "tasks"))
    with log.child(f"stage:{stage.name}") as (c, run):
        state = merge_step.with_options(**opts)(stage, key=key, seed=seed, compat_policy=compat_policy,
                                                refresh=opts.get("refresh_cache", False), return_state=True,
                                                **settings)
        m = state.result()
        tracking.log_params(c, run, {"recipe": canonical(stage.recipe), "needs": stage.needs, "key": skey})
        tracking.log_metrics(c, run, {"seconds": 0.0 if state.name == "Cached" else m.seconds})
        tracking.set_tags(c, run, {"mergeline.stage": stage.name, "mergeline.cached": state.name == "Cached",
                                   "mergeline.reused": m.reused})
        for f in (STATS_JSON, "lineage.json", "mergeline_stages.json"):
            tracking.log_artifact(c, run, m.path / f, "stage")
    return m.model_copy(update={"state": state.name}), stage_record(stage, skey)
