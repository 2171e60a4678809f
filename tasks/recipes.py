"""Recipes as the pipeline hands them to tasks: typed `MergeRecipe`s whose every model reference is
an absolute folder.

A task may run in another thread, process or machine (Dask), from another working folder, so the
pipeline resolves every model reference once (`merge.resolve.resolve_model`): `models`, `base_model`,
`slices[].sources`, `slices[].base_model`, `modules.*.models`, `tokenizer_source`, `tokenizer.source`
and `tokenizer.tokens[*].source`. Cache keys and lineage read `canonical(recipe)`, the typed recipe's
stable JSON dump, so a recipe given as a mapping (the tuner's trials) keys alike. Baselines reuse
the main recipe's models with a plain method.

    python -m mergeline.tasks.recipes RECIPE.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

from mergeline.merge.hashing import content_hash
from mergeline.merge.recipe import MergeRecipe, load_recipe, model_names
from mergeline.merge.resolve import resolve_model
from mergeline.merge.tokenizer_merge import ModelTokenEmbedding

# Methods that merge the models themselves, not deltas from a base: the base is left out.
NO_BASE_METHODS = {"linear", "model_stock_free", "passthrough"}
# tokenizer sources that name no model
_NOT_MODELS = {"base", "union"}


def typed(recipe: MergeRecipe | Mapping, validate: bool = True) -> MergeRecipe:
    """The recipe itself, or a mapping read as one (the tuner and older callers pass mappings)."""
    return recipe if isinstance(recipe, MergeRecipe) else load_recipe(dict(recipe), validate=validate)


def canonical(recipe: MergeRecipe | Mapping) -> dict:
    """What a cache key or a lineage record reads: the typed recipe's JSON dump, without the
    source folder and the multi-stage records (the inputs' content hashes cover those)."""
    data = typed(recipe, validate=False).model_dump(mode="json", exclude_none=True,
                                                    exclude={"source_dir", "stages"})
    if "modules" in data:  # `models` is then the modules' union, derived when the recipe is read
        data.pop("models", None)
    return data


def resolve(recipe: MergeRecipe, source_dir: str | Path | None = None,
            pending: set[str] | frozenset = frozenset()) -> MergeRecipe:
    """`recipe` with every model reference an absolute folder (relative ones looked up in the
    recipe's folder, else `source_dir`). `pending`: folders of earlier stages of a multi-stage
    recipe, not written yet: kept as they are."""
    src = recipe.source_dir or (str(source_dir) if source_dir else None)
    found: dict[str, str] = {}

    def at(ref: str | None) -> str | None:
        if ref is None or ref in pending:
            return ref
        if ref not in found:
            found[ref] = str(resolve_model(ref, src))
        return found[ref]

    update: dict[str, Any] = {"source_dir": None}
    if recipe.base_model:
        update["base_model"] = at(recipe.base_model)
    if recipe.models:
        update["models"] = [m.model_copy(update={"model": at(m.model)}) for m in recipe.models]
    if recipe.slices:
        update["slices"] = [sl.model_copy(update={
            "base_model": at(sl.base_model),
            "sources": [s.model_copy(update={"model": at(s.model)}) for s in sl.sources]})
            for sl in recipe.slices]
    def tokenizer_at(ref: str | None) -> str | None:
        return ref if ref in _NOT_MODELS else at(ref)

    if recipe.modules:  # a multimodal recipe: each module lists its own models (merge/modules.py)
        update["modules"] = {name: module.model_copy(update={
            "models": [m.model_copy(update={"model": at(m.model)}) for m in module.models]})
            for name, module in recipe.modules.items()}

    if recipe.tokenizer_source:
        update["tokenizer_source"] = tokenizer_at(recipe.tokenizer_source)
    if recipe.tokenizer is not None:
        tok = recipe.tokenizer
        tokens = None if tok.tokens is None else {
            name: spec.model_copy(update={"source": _token_source(spec.source, tokenizer_at)})
            for name, spec in tok.tokens.items()}
        update["tokenizer"] = tok.model_copy(update={"source": tokenizer_at(tok.source), "tokens": tokens})
    return recipe.model_copy(update=update)


def _token_source(source, at):
    if isinstance(source, str):
        return at(source)
    if isinstance(source, ModelTokenEmbedding):
        return source.model_copy(update={"model": at(source.model)})
    return source  # zero, or none


def resolved_recipe(value: str | Path | Mapping, source_dir: str | Path | None = None) -> dict:
    """A recipe file or mapping, resolved, as a mapping `load_recipe` accepts from any folder
    (for callers that edit recipes as mappings, e.g. the tuner)."""
    recipe = load_recipe(value if not isinstance(value, Mapping) else dict(value))
    return canonical(resolve(recipe, source_dir))


def baseline_recipe(main: Mapping, method: str) -> dict:
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


def baseline(main: MergeRecipe, method: str) -> MergeRecipe:
    """`baseline_recipe` of a typed recipe, checked as any recipe is."""
    return load_recipe(baseline_recipe(canonical(main), method))


def inputs(recipe: MergeRecipe | Mapping) -> dict[str, Path]:
    """Short name -> folder of every model the recipe reads (base included)."""
    names = model_names(typed(recipe, validate=False))
    return {names[ref]: Path(ref) for ref in names}


def input_hashes(recipe: MergeRecipe | Mapping) -> dict[str, str]:
    return {name: content_hash(path) for name, path in inputs(recipe).items()}


def base_name(recipe: MergeRecipe | Mapping) -> str | None:
    r = typed(recipe, validate=False)
    return model_names(r)[r.base_model] if r.base_model else None


if __name__ == "__main__":
    import yaml

    print(yaml.safe_dump(resolved_recipe(sys.argv[1]), sort_keys=False))
