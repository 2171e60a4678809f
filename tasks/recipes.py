"""Recipes as the pipeline passes them between tasks: plain dicts with absolute model paths.

A task may run in another thread, process or machine (Dask), from another working folder, so
the flow resolves every model reference once (`merge.resolve.resolve_model`) and hands tasks a
self-contained mapping. Baselines reuse the main recipe's models with a plain method.

    python -m mergeline.tasks.recipes RECIPE.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mergeline.merge.hashing import content_hash
from mergeline.merge.recipe import load_recipe, model_names
from mergeline.merge.resolve import resolve_model

# Methods that merge the models themselves, not deltas from a base: the base is left out.
NO_BASE_METHODS = {"linear", "model_stock_free", "passthrough"}


def resolved_recipe(value: str | Path | dict, source_dir: str | Path | None = None) -> dict:
    """Load a recipe (file or mapping), resolve every model reference to an absolute folder,
    and return it as a mapping that `merge.recipe.load_recipe` accepts from any folder."""
    recipe = load_recipe(value) if not isinstance(value, dict) else load_recipe(dict(value))
    src = recipe.source_dir or (str(source_dir) if source_dir else None)
    data = recipe.model_dump(exclude_none=True, exclude={"source_dir"})
    refs = {m.model for m in recipe.inputs()} | ({recipe.base_model} if recipe.base_model else set())
    folders = {ref: str(resolve_model(ref, src)) for ref in refs}
    if data.get("base_model"):
        data["base_model"] = folders[data["base_model"]]
    for m in data.get("models") or []:
        m["model"] = folders[m["model"]]
    for sl in data.get("slices") or []:
        for m in sl["sources"]:
            m["model"] = folders[m["model"]]
    if data.get("tokenizer_source") and data["tokenizer_source"] in folders:
        data["tokenizer_source"] = folders[data["tokenizer_source"]]
    return data


def baseline_recipe(main: dict, method: str) -> dict:
    """The main recipe's models and weights, merged with `method` (e.g. linear, task_arithmetic).
    Method-specific settings (density, lambda, ...) are dropped: a baseline is the plain method.
    A `slices:` recipe gives each model the weight it has in the first slice."""
    models = main.get("models")
    if models is None and main.get("slices"):
        first = main["slices"][0]
        models = [{"model": s["model"], "parameters": {**(first.get("parameters") or {}), **(s.get("parameters") or {})}}
                  for s in first["sources"]]
    models = [m for m in models or [] if m["model"] != main.get("base_model")]
    out: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": m["model"],
                    "parameters": {"weight": (m.get("parameters") or {}).get("weight", 1.0)}}
                   for m in models],
    }
    if method not in NO_BASE_METHODS and main.get("base_model"):
        out["base_model"] = main["base_model"]
    for key in ("dtype", "out_dtype", "tokenizer_source"):
        if main.get(key):
            out[key] = main[key]
    return out


def inputs(recipe: dict) -> dict[str, Path]:
    """Short name -> folder of every model the recipe reads (base included)."""
    r = load_recipe(recipe, validate=False)
    names = model_names(r)
    return {names[ref]: Path(ref) for ref in names}


def input_hashes(recipe: dict) -> dict[str, str]:
    return {name: content_hash(path) for name, path in inputs(recipe).items()}


def base_name(recipe: dict) -> str | None:
    r = load_recipe(recipe, validate=False)
    return model_names(r)[r.base_model] if r.base_model else None


if __name__ == "__main__":
    import yaml

    print(yaml.safe_dump(resolved_recipe(sys.argv[1]), sort_keys=False))
