"""Merges as Prefect tasks on a local Dask cluster (prefect-dask), concurrently, with content-hash
cache keys: a second run reuses both results; changing one fine-tune re-does only the merges."""
import json

import torch
from prefect import flow
from prefect_dask import DaskTaskRunner
from safetensors.torch import load_file, save_file

from mergeline.tasks.merge_tasks import merge_key, merge_model
from mergeline.tasks.recipes import baseline_recipe, resolved_recipe


def _recipes(m):
    ties = resolved_recipe({"merge_method": "ties", "base_model": str(m["base"]),
                            "parameters": {"density": 0.5},
                            "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                                       {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}]})
    return {"ties": ties, "linear": baseline_recipe(ties, "linear")}


def _run(recipes, out, store):
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 2,
                                            "processes": False, "dashboard_address": None})

    @flow(task_runner=runner)
    def merges():
        futs = {n: merge_model.with_options(result_storage=store).submit(
            name=n, recipe=r, models_dir=str(out), key=merge_key(r, 0)) for n, r in recipes.items()}
        return {n: (f.result(), f.state.name) for n, f in futs.items()}

    return merges()


def test_dask_merges_cache_and_lineage(tiny_models, prefect_server, tmp_path):
    import shutil

    m = {k: tmp_path / k for k in ("base", "ft_a", "ft_b")}
    for k, p in m.items():
        shutil.copytree(tiny_models[k], p)
    recipes = _recipes(m)
    out, store = tmp_path / "models", tmp_path / "results"
    first = _run(recipes, out, store)
    assert {n: s for n, (_, s) in first.items()} == {"ties": "Completed", "linear": "Completed"}
    lin = json.loads((out / f"ties-{merge_key(recipes['ties'], 0)[:12]}" / "lineage.json").read_text())
    assert lin["method"] == "ties" and len(lin["parents"]) == 2
    assert lin["base"]["source"] == str(m["base"].resolve())
    lin_result = first["linear"][0]
    assert lin_result.name == "linear" and lin_result.method == "linear" and not lin_result.reused
    assert lin_result.stats is not None  # merge statistics came back through the (typed) task result

    again = _run(recipes, out, store)
    assert {s for _, s in again.values()} == {"Cached"}

    # change one fine-tune: both merges read it, so both get new keys (and new folders)
    f = next(m["ft_b"].glob("*.safetensors"))
    sd = load_file(f)
    k = next(iter(sd))
    sd[k] = sd[k] + 1e-3
    save_file(sd, f, metadata={"format": "pt"})
    changed = _run(recipes, out, store)
    assert {s for _, s in changed.values()} == {"Completed"}
    assert changed["ties"][0].path != first["ties"][0].path
    assert torch.equal(load_file(next(m["ft_a"].glob("*.safetensors")))[k],
                       load_file(next(tiny_models["ft_a"].glob("*.safetensors")))[k])
