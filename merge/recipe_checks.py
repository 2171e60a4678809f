"""Check a recipe against its merge method, before any model is read.

Every parameter is one the method takes, at the place it belongs (per model, per slice or
global), with values in range; required per-model parameters are set for every merged model;
normalized weights do not sum to zero; the method gets the number of models it takes (mergekit's
input contract: slerp a base and one other, model_stock a base and two or more, ...); the
recipe's forms fit together (`models:` or `slices:`, base model, tokenizer source, whole-model
trimming, chat template). Each error names the key.

Lenient where mergekit is: a parameter another method takes but this one does not (`weight` on
slerp) is ignored with a WARNING naming it, as mergekit ignores it; a key no method takes (a
typo) is refused.

`recipe` is always a `MergeRecipe`. merge/recipe.py runs these checks as it reads a recipe, so
this module is below it and does not import it; `RecipeError`, raised by both, lives here.

    python -m mergeline.merge.recipe configs/recipes/ties.yaml     # reads and checks a recipe
"""
from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, TypeAdapter, ValidationError

from mergeline.merge.chat_templates import problem as chat_template_problem
from mergeline.merge.methods.registry import KNOWN_KEYS, METHODS, get_method
from mergeline.merge.parameters import MISSING, candidate_values, is_table, resolve
from mergeline.merge.slices import check_slices, parameter_sources


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file and key at fault."""


def _param_fields(cls: type[BaseModel] | None) -> dict[str, Any]:
    """YAML key (alias if any) -> pydantic FieldInfo."""
    if cls is None:
        return {}
    return {(f.alias or name): f for name, f in cls.model_fields.items()}


log = logging.getLogger(__name__)

# No merge parameter means anything beyond this size: a weight of 1e308 overflows the weighted
# sum to inf, and the merged model is all NaN. Sizes are judged before any other check, so a
# 4000-digit integer is named here and never reaches float().
ABSURD = 1e6


def check_numbers(at: str, value: Any, where: str) -> None:
    """Every number inside a setting is finite and |x| <= ABSURD; RecipeError naming the key."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if k != "filter":  # a tensor-name substring, never a number
                check_numbers(f"{at}.{k}", v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_numbers(f"{at}[{i}]", v, where)
    elif isinstance(value, str):
        # YAML 1.1 reads `1e308` (no dot) as a string, which pydantic then takes as a float
        try:
            number = float(value)
        except ValueError:
            return
        check_numbers(at, number, where)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{where}: {at} = {value!r}: a recipe number must be finite")
        if abs(value) > ABSURD:
            shown = repr(value) if len(repr(value)) <= 30 else f"a {len(str(abs(value)))}-digit number"
            raise RecipeError(f"{where}: {at} = {shown}: out of range (|value| must be at most {ABSURD:g})")


def _check_setting_shape(key: str, setting: Any, where: str) -> None:
    """A setting is a scalar, a list of scalars, or {filter, value} entries (alone or in a list)."""
    scalar = (bool, int, float, str)
    if isinstance(setting, scalar) or is_table(setting):  # a table (TIES' sign_choices) is checked by its type
        return
    items = [setting] if isinstance(setting, Mapping) else setting
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}: parameter {key!r} must be a scalar, a list (gradient) or a list of {{filter, value}}")
    if all(isinstance(e, scalar) for e in items):
        return
    for i, cond in enumerate(items):
        if not isinstance(cond, Mapping):
            raise RecipeError(f"{where}: parameter {key!r}[{i}] mixes scalars and {{filter, value}} entries")
        extra = set(cond) - {"filter", "value"}
        if extra:
            raise RecipeError(f"{where}: parameter {key!r}[{i}]: unknown key {sorted(extra)[0]!r} (allowed: filter, value)")
        if "value" not in cond:
            raise RecipeError(f"{where}: parameter {key!r}[{i}]: missing 'value'")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise RecipeError(f"{where}: parameter {key!r}[{i}].filter must be a string (a substring of tensor names)")
        v = cond["value"]
        if not (isinstance(v, scalar) or (isinstance(v, list) and v and all(isinstance(e, scalar) for e in v))):
            raise RecipeError(f"{where}: parameter {key!r}[{i}].value must be a scalar or a gradient list")


def _allowed_text(field) -> str:
    bounds = [str(m) for m in field.metadata]
    ann = getattr(field.annotation, "__name__", str(field.annotation))
    return ann + (f" with {', '.join(bounds)}" if bounds else "")


def _check_values(key: str, setting: Any, field, where: str) -> None:
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)]) if field.metadata else TypeAdapter(field.annotation)
    for v in candidate_values(setting):
        try:
            adapter.validate_python(v)
        except ValidationError as e:
            msg = e.errors()[0]["msg"]
            raise RecipeError(f"{where}: parameter {key!r} = {v!r} is out of range ({msg}; allowed: {_allowed_text(field)})") from None


def get_method_or_error(name: str, where: str = "recipe"):
    if name not in METHODS:
        raise RecipeError(f"{where}: merge_method {name!r} is unknown (allowed: {', '.join(sorted(METHODS))})")
    return get_method(name)


def check_recipe_semantics(recipe, where: str = "recipe") -> None:
    """Everything about a recipe that can be checked without reading a model."""
    method = get_method_or_error(recipe.merge_method, where)
    _check_all_numbers(recipe, where)
    if recipe.models and recipe.slices:
        raise RecipeError(f"{where}: give either 'models' or 'slices', not both (as in mergekit)")
    if not recipe.models and not recipe.slices:
        raise RecipeError(f"{where}: 'models' (or 'slices') must list at least one model")
    if recipe.slices:
        try:
            check_slices(recipe.slices, recipe.base_model)
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    if recipe.tokenizer and recipe.tokenizer_source:
        raise RecipeError(f"{where}: give either 'tokenizer_source' or 'tokenizer', not both (as in mergekit)")
    refs = [m.model for m in recipe.models or []]
    dup = next((r for r in refs if refs.count(r) > 1), None)
    if dup:
        raise RecipeError(f"{where}: model {dup!r} is listed twice in 'models'")
    tok = recipe.tokenizer_ref
    if tok is not None and tok not in [m.model for m in recipe.inputs()] and tok != recipe.base_model:
        raise RecipeError(f"{where}: tokenizer_source {tok!r} is neither 'base' nor one of the recipe's models")
    _check_model_count(recipe, method, where)
    if recipe.chat_template is not None and (why := chat_template_problem(recipe.chat_template)):
        raise RecipeError(f"{where}: {why}")

    if recipe.trim_scope == "model":
        if method.name != "ties":
            raise RecipeError(f"{where}: trim_scope 'model' (whole-model trimming) applies to merge_method 'ties' only, "
                              f"not {method.name!r}")
        if recipe.slices:
            raise RecipeError(f"{where}: trim_scope 'model' takes one density per model; write the recipe in the "
                              "`models:` form (slices scope parameters by layer)")
        for i, m in enumerate(recipe.inputs()):
            d = (m.parameters or {}).get("density", (recipe.parameters or {}).get("density", 1.0))
            if not isinstance(d, (int, float)) or isinstance(d, bool):
                raise RecipeError(f"{where}: trim_scope 'model' needs one scalar density per model; "
                                  f"model {m.model!r} has {d!r}")
    model_fields = _param_fields(method.model_params)
    global_fields = _param_fields(method.global_params)
    allowed_global = {**model_fields, **global_fields}
    # Settings for the whole merge (or a whole slice) may hold per-model keys too, as in mergekit.
    scopes = [("parameters", recipe.parameters)] + [(f"slices[{i}].parameters", sl.parameters)
                                                    for i, sl in enumerate(recipe.slices or [])]
    for at, settings in scopes:
        for key, setting in (settings or {}).items():
            if key not in allowed_global and _ignored(key, at, method, where):
                continue
            if key not in allowed_global:
                raise RecipeError(f"{where}: {at}.{key}: {method.name!r} takes no parameter {key!r} "
                                  f"(allowed: {', '.join(sorted(allowed_global)) or 'none'})")
            _check_setting_shape(key, setting, where)
            _check_values(f"{at}.{key}", setting, allowed_global[key], where)
    inputs = recipe.inputs()
    merged = [m.model for m in inputs if not (method.requires_base and m.model == recipe.base_model)]
    if not merged:
        raise RecipeError(f"{where}: 'models' lists only the base model; nothing to merge into it")
    for at, settings in _per_model_settings(recipe):
        for key, setting in (settings or {}).items():
            if key not in model_fields and key not in global_fields and _ignored(key, at, method, where):
                continue
            if key in global_fields and key not in model_fields:
                raise RecipeError(f"{where}: {at}.{key}: {key!r} applies to the whole merge; "
                                  f"put it under the top-level 'parameters' (per-model keys: {', '.join(sorted(model_fields)) or 'none'})")
            if key not in model_fields:
                raise RecipeError(f"{where}: {at}.{key}: {method.name!r} takes no parameter {key!r} "
                                  f"(per-model keys: {', '.join(sorted(model_fields)) or 'none'})")
            _check_setting_shape(key, setting, where)
            _check_values(f"{at}.{key}", setting, model_fields[key], where)
    # Required per-model parameters (e.g. weight) must be given somewhere for every merged model
    # (in every slice), and normalized weights must not sum to zero.
    for scope in _merge_scopes(recipe, merged):
        for key, f in model_fields.items():
            if f.is_required():
                for ref, sources in scope.items():
                    if not any(key in (s or {}) for s in sources):
                        raise RecipeError(f"{where}: model {ref!r} has no {key!r} (set models[].parameters.{key} "
                                          f"or a global parameters.{key})")
        check_weight_sum(recipe, method, list(scope.values()), name="", t=0.0, where=where, only_if_scalar=True)


def _check_model_count(recipe, method, where: str) -> None:
    """The method's input contract (mergekit's), from the recipe alone: one line naming the
    method and the count, before any model is resolved or tensor read."""
    groups = [(where, [m.model for m in recipe.inputs()], recipe.base_model)]  # the base appended when not listed
    if recipe.slices:  # each slice is a merge of its own (mergekit validates every slice)
        groups = []
        for i, sl in enumerate(recipe.slices):
            base = sl.base_model or recipe.base_model
            refs = [s.model for s in sl.sources]
            groups.append((f"{where}: slices[{i}]", refs + ([base] if base and base not in refs else []), base))
    for at, refs, base in groups:
        _check_group(method, at, refs, base)


def _check_group(method, where: str, refs: list[str], base: str | None) -> None:
    why = method.inputs.problem(len(refs), base is not None and base in refs)
    if why is None:
        return
    if why == "needs 'base_model'":
        raise RecipeError(f"{where}: merge_method {method.name!r} needs 'base_model' (the model the task vectors "
                          "are taken from)")
    counted = " (the base included)" if base and method.inputs.base != "ignored" else ""
    raise RecipeError(f"{where}: merge_method {method.name!r} {why}{counted}: {', '.join(refs)}")


def _ignored(key: str, at: str, method, where: str) -> bool:
    """A key another method takes: warn and ignore it (True); a key no method takes: False."""
    if key not in KNOWN_KEYS:
        return False
    log.warning("%s: %s.%s: merge_method %r takes no parameter %r; ignored (another method uses it)",
                where, at, key, method.name, key)
    return True


def _check_all_numbers(recipe, where: str) -> None:
    """Every parameter block and slice residual weight holds sane numbers."""
    check_numbers("parameters", recipe.parameters, where)
    for at, settings in _per_model_settings(recipe):
        check_numbers(at, settings, where)
    for i, sl in enumerate(recipe.slices or []):
        check_numbers(f"slices[{i}].parameters", sl.parameters, where)
        check_numbers(f"slices[{i}].residual_weight", sl.residual_weight, where)


def _per_model_settings(recipe) -> list[tuple[str, dict | None]]:
    """(location in the YAML, settings) of every per-model `parameters` block."""
    if recipe.slices:
        return [(f"slices[{i}].sources[{j}].parameters", src.parameters)
                for i, sl in enumerate(recipe.slices) for j, src in enumerate(sl.sources)]
    return [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models or [])]


def _merge_scopes(recipe, merged: list[str]) -> list[dict[str, list]]:
    """Per scope (the whole merge, or each slice): merged model -> its parameter sources,
    highest precedence first."""
    if recipe.slices:
        return [{ref: parameter_sources(sl, ref, recipe.parameters) for ref in merged
                 if ref in {s.model for s in sl.sources}} for sl in recipe.slices]
    own = {m.model: m.parameters for m in recipe.inputs()}
    return [{ref: [own[ref], recipe.parameters] for ref in merged}]


def _resolved_normalize(recipe, method) -> bool:
    """Whether the method divides by the sum of the weights (`normalize`; multislerp's
    `normalize_weights`)."""
    fields = _param_fields(method.global_params)
    key = next((k for k in ("normalize", "normalize_weights") if k in fields), None)
    if key is None:
        return False
    value = (recipe.parameters or {}).get(key, MISSING)
    if value is MISSING or not isinstance(value, (bool, int)):
        return bool(fields[key].default)
    return bool(value)


def check_weight_sum(recipe, method, sources: list[list], name: str, t: float,
                     where: str = "recipe", only_if_scalar: bool = False) -> None:
    """A method that divides by the sum of weights must not see weights summing to zero.
    `sources`: per merged model, its parameter sources (highest precedence first)."""
    if "weight" not in _param_fields(method.model_params) or not _resolved_normalize(recipe, method):
        return
    weights = []
    for scopes in sources:
        if only_if_scalar and any(isinstance(s.get("weight"), (list, dict)) for s in scopes if s and "weight" in s):
            return  # gradients and filters are checked per tensor during the merge
        w = resolve("weight", scopes, name, t)
        if w is MISSING or not isinstance(w, (int, float)):
            return
        weights.append(float(w))
    if weights and abs(sum(weights)) < 1e-8:
        at = f" for tensor {name!r}" if name else ""
        key = "normalize_weights" if "normalize_weights" in _param_fields(method.global_params) else "normalize"
        raise RecipeError(f"{where}: the models' 'weight' values sum to zero{at} while {key} is true "
                          f"(the merge divides by that sum); change a weight or set parameters.{key}: false")
