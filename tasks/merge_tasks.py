"""The merge stage: one merge (TIES, a baseline, or a stage of a multi-stage recipe), with lineage.

`merge_model` is the cached work: it writes `<models_dir>/<name>-<key12>`, where the key hashes the
recipe's canonical dump, the inputs' content hashes, the seed and the merge code, so a changed input
gives a new folder and a model version registered earlier keeps pointing at the weights it was
registered with. `merge_stage` is the stage: it opens the MLflow child run `merge:<name>` around
the merge and logs the recipe, statistics and the model's files.

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
from mergeline.tasks import tracking
from mergeline.tasks.caching import code_version, from_parameter, key_of
from mergeline.tasks.recipes import base_name, canonical, input_hashes, inputs, typed
from mergeline.tasks.tracking import RunLog


def merge_key(recipe: MergeRecipe | dict, seed: int) -> str:
    return key_of("merge", canonical(recipe), input_hashes(recipe), seed, code_version("merge"))


@task(name="merge", cache_key_fn=from_parameter("key"), persist_result=True,
      retries=1, retry_delay_seconds=5)  # a retry covers a transient OOM or full disk
def merge_model(name: str, recipe: MergeRecipe | dict, models_dir: str, key: str, seed: int = 0,
                device: str = "cpu", out_shard_size: str = "5GB", allow_pickle: bool = False,
                compat_policy=None, mlflow_run_id: str | None = None,
                refresh: bool = False) -> dict:
    """Merge `recipe` into models_dir/<name>-<key12>; return path, content hash, stats, seconds.
    The merge runs the compatibility checks under `compat_policy` (the check stage's policy)."""
    from mergeline.merge.compat.gate import summary
    from mergeline.merge.executor import run_merge

    recipe = typed(recipe)
    out = Path(models_dir) / f"{name}-{key[:12]}"
    done = load_lineage(out) if (out / LINEAGE_FILE).is_file() else None
    if done is not None and done.get("cache_key") == key and not refresh:
        # Finished earlier (e.g. a run interrupted after this merge): reuse the folder.
        stats = json.loads((out / "merge_stats.json").read_text()) if (out / "merge_stats.json").is_file() else {}
        return {"name": name, "path": str(out), "content_hash": done["content_hash"],
                "stats": stats, "seconds": 0.0, "reused": True}
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
    return {"name": name, "path": str(result.path), "content_hash": lineage["content_hash"],
            "stats": result.stats, "seconds": result.seconds, "reused": False}


@task(name="merge-stage", cache_policy=NO_CACHE)
def merge_stage(log: RunLog, name: str, recipe: MergeRecipe, models_dir: str, seed: int, settings: dict,
                compat_policy, opts: dict) -> dict:
    """One merge in its own child run `merge:<name>`: the merge's result plus `state`, the cached
    work's Prefect state ("Cached" when an earlier run's result was reused)."""
    with log.child(f"merge:{name}") as (c, run):
        state = merge_model.with_options(**opts)(
            name=name, recipe=recipe, models_dir=models_dir, key=merge_key(recipe, seed), seed=seed,
            compat_policy=compat_policy, mlflow_run_id=log.parent, refresh=opts.get("refresh_cache", False),
            return_state=True, **settings)
        m = state.result()
        _log_merge(c, run, recipe, m, cached=state.name == "Cached")
    return {**m, "state": state.name}


def _log_merge(c, run: str, recipe: MergeRecipe, m: dict, cached: bool) -> None:
    data = canonical(recipe)
    tracking.log_params(c, run, {"recipe": data, "content_hash": m["content_hash"]})
    tracking.log_text(c, run, yaml.safe_dump(data, sort_keys=False), "recipe.yaml")
    tracking.set_tags(c, run, {"mergeline.cached": cached, "mergeline.reused": bool(m.get("reused"))})
    stats = m["stats"] or {}
    # seconds merging in this run: none when an earlier run's merge was reused
    tracking.log_metrics(c, run, {"seconds": 0.0 if cached else m["seconds"],
                                  "sign_conflict_rate": (stats.get("sign_conflict") or {}).get("rate"),
                                  "per_model": stats.get("per_model") or {}})
    for f in ("merge_stats.json", "merge_stats_tensors.csv", "lineage.json", "README.md"):
        tracking.log_artifact(c, run, Path(m["path"]) / f, "merge")
    tracking.log_csv_table(c, run, Path(m["path"]) / "merge_stats_tensors.csv", "merge/merge_stats_tensors.json")


# ---------------------------------------------------------------- multi-stage recipes


@task(name="stage", cache_key_fn=from_parameter("key"), persist_result=True, retries=1, retry_delay_seconds=5)
def merge_step(stage: Stage, key: str, seed: int = 0, device: str = "cpu", out_shard_size: str = "5GB",
               allow_pickle: bool = False, compat_policy=None, refresh: bool = False) -> dict:
    """One earlier stage of a multi-stage recipe into `stage.out` (merge.multistage.run_stage: an
    output written from the same recipe and inputs is kept)."""
    from mergeline.merge.hashing import content_hash
    from mergeline.merge.multistage import run_stage

    out = run_stage(stage, reuse=not refresh, key=stage_key(stage), seed=seed, device=device,
                    out_shard_size=out_shard_size, allow_pickle=allow_pickle, progress=False,
                    policy=compat_policy)
    return {"name": stage.name, "path": str(stage.out), "content_hash": content_hash(stage.out),
            "stats": out.stats if out is not None else {}, "seconds": out.seconds if out is not None else 0.0,
            "reused": out is None}


@task(name="multistage-step", cache_policy=NO_CACHE)
def multistage_step(log: RunLog, stage: Stage, seed: int, settings: dict, compat_policy, opts: dict) -> dict:
    """One earlier stage in its own child run `stage:<name>`; returns its result, its Prefect
    state and `record`, what the final model's lineage lists for it. Its inputs (earlier stages)
    must be written: the key hashes their content."""
    skey = stage_key(stage)
    key = key_of("stage", skey, seed, code_version("merge"))
    with log.child(f"stage:{stage.name}") as (c, run):
        state = merge_step.with_options(**opts)(stage, key=key, seed=seed, compat_policy=compat_policy,
                                                refresh=opts.get("refresh_cache", False), return_state=True,
                                                **settings)
        m = state.result()
        tracking.log_params(c, run, {"recipe": canonical(stage.recipe), "needs": stage.needs, "key": skey})
        tracking.log_metrics(c, run, {"seconds": 0.0 if state.name == "Cached" else m["seconds"]})
        tracking.set_tags(c, run, {"mergeline.stage": stage.name, "mergeline.cached": state.name == "Cached",
                                   "mergeline.reused": m["reused"]})
        for f in ("merge_stats.json", "lineage.json", "mergeline_stages.json"):
            tracking.log_artifact(c, run, Path(m["path"]) / f, "stage")
    return {**m, "state": state.name, "record": stage_record(stage, skey)}
