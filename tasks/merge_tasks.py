"""Prefect task: one merge (TIES or a baseline) into a content-addressed folder, with lineage.

The output folder is `<models_dir>/<name>-<key12>`, where the key hashes the recipe, the inputs'
content hashes, the seed and the merge code: a changed input gives a new folder, so a model
version registered earlier keeps pointing at the weights it was registered with.

    from mergeline.tasks.merge_tasks import merge_model
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from mergeline.merge.lineage import LINEAGE_FILE, build_lineage, describe_input, load_lineage, write_lineage
from mergeline.tasks.caching import code_version, from_parameter, key_of
from mergeline.tasks.recipes import base_name, input_hashes, inputs


def merge_key(recipe: dict, seed: int) -> str:
    return key_of("merge", recipe, input_hashes(recipe), seed, code_version("merge"))


@task(name="merge", cache_key_fn=from_parameter("key"), persist_result=True,
      retries=1, retry_delay_seconds=5)  # a retry covers a transient OOM or full disk
def merge_model(name: str, recipe: dict, models_dir: str, key: str, seed: int = 0,
                device: str = "cpu", out_shard_size: str = "5GB", allow_pickle: bool = False,
                compat_policy: dict | None = None, mlflow_run_id: str | None = None,
                refresh: bool = False) -> dict:
    """Merge `recipe` into models_dir/<name>-<key12>; return path, content hash, stats, seconds.
    The merge runs the compatibility checks under `compat_policy` (the check stage's policy)."""
    from mergeline.merge.compat.gate import summary
    from mergeline.merge.executor import run_merge
    from mergeline.merge.recipe import load_recipe

    out = Path(models_dir) / f"{name}-{key[:12]}"
    done = load_lineage(out) if (out / LINEAGE_FILE).is_file() else None
    if done is not None and done.get("cache_key") == key and not refresh:
        # Finished earlier (e.g. a run interrupted after this merge): reuse the folder.
        stats = json.loads((out / "merge_stats.json").read_text()) if (out / "merge_stats.json").is_file() else {}
        return {"name": name, "path": str(out), "content_hash": done["content_hash"],
                "stats": stats, "seconds": 0.0, "reused": True}
    result = run_merge(load_recipe(recipe), out, device=device, out_shard_size=out_shard_size,
                       overwrite=out.exists(), seed=seed, allow_pickle=allow_pickle, progress=False,
                       policy=compat_policy, lineage=False)
    folders = inputs(recipe)
    base = base_name(recipe)
    lineage = build_lineage(
        name=name, model_dir=result.path, recipe=recipe, method=recipe["merge_method"], seed=seed,
        base=describe_input(base, recipe["base_model"], folders[base]) if base else None,
        parents=[describe_input(n, str(p), p) for n, p in folders.items() if n != base],
        mlflow_run_id=mlflow_run_id, extra={"cache_key": key},
        checks=summary(result.checks) if result.checks is not None else None)
    write_lineage(result.path, lineage)
    return {"name": name, "path": str(result.path), "content_hash": lineage["content_hash"],
            "stats": result.stats, "seconds": result.seconds, "reused": False}
