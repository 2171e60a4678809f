"""What one tuning trial is: the search space a recipe opens, the recipe a trial's values make,
and the trial's MLflow child run.

The space is the recipe's own knobs, per model: `weight` always, `density` when the recipe sets a
density anywhere (TIES, DARE, ...: Yadav et al. 2023 trim each task vector to its top `density`
fraction). With layer groups (`mergeline tune --layer-groups K`) each of them is a mergekit
gradient of K values instead, interpolated over the layers. Values move on a grid (`STEP`): two
trials that land on the same point build the same recipe, so `merge_model` and `evaluate_model`
(keyed by content, tasks/caching.py) serve the second from the cache at no cost.

    python -m mergeline.tasks.tune_tasks RECIPE.yaml [K]  # print the search space of a recipe
"""
from __future__ import annotations

import copy
import sys

import yaml

from mergeline.tasks import tracking
from mergeline.tasks.recipes import inputs, resolved_recipe

STEP = 0.05
WEIGHT_RANGE = (0.1, 1.0)
DENSITY_RANGE = (0.1, 1.0)


def _tuned_models(recipe: dict) -> list[dict]:
    if recipe.get("slices") or not recipe.get("models"):
        raise ValueError("tune: only recipes with a `models:` list can be tuned (not `slices:`)")
    return [m for m in recipe["models"] if m["model"] != recipe.get("base_model")]


def _names(recipe: dict) -> dict[str, str]:
    """model folder -> short name (as the pipeline and the suite name them)."""
    return {str(path): name for name, path in inputs(recipe).items()}


def uses_density(recipe: dict) -> bool:
    return "density" in (recipe.get("parameters") or {}) or any(
        "density" in (m.get("parameters") or {}) for m in recipe.get("models") or [])


def space(recipe: dict, layer_groups: int = 1) -> dict[str, tuple[float, float]]:
    """Parameter name -> (low, high): "weight.addition", "density.addition", ... one per model;
    with `layer_groups` K > 1, "weight.addition@0" ... "@K-1": the K points of a mergekit
    gradient, interpolated over the layers (first layer to last), so each block of layers gets
    its own weight and density."""
    if layer_groups < 1:
        raise ValueError(f"layer groups must be >= 1, got {layer_groups}")
    names = _names(recipe)
    anchors = [""] if layer_groups == 1 else [f"@{j}" for j in range(layer_groups)]
    ranges = {"weight": WEIGHT_RANGE, **({"density": DENSITY_RANGE} if uses_density(recipe) else {})}
    return {f"{kind}.{names[m['model']]}{a}": bounds
            for m in _tuned_models(recipe) for kind, bounds in ranges.items() for a in anchors}


def _parse(key: str) -> tuple[str, str, int | None]:
    """"weight.addition@1" -> ("weight", "addition", 1); "weight.addition" -> (..., None)."""
    kind, rest = key.split(".", 1)
    name, _, anchor = rest.rpartition("@") if "@" in rest else (rest, "", "")
    return kind, name, int(anchor) if anchor else None


def recipe_point(recipe: dict, layer_groups: int = 1) -> dict[str, float] | None:
    """The recipe's own values as a point of its space (a model's parameter, else the recipe-wide
    one; with layer groups, the same value at every point of the gradient, which merges the
    same), or None when one is not a number on the grid inside its range (e.g. a gradient list):
    the search scores this point first, so its best is never worse on validation than the
    recipe it started from, and the report can say what tuning gained there."""
    names, shared, point = _names(recipe), recipe.get("parameters") or {}, {}
    own = {names[m["model"]]: m.get("parameters") or {} for m in _tuned_models(recipe)}
    for key, (lo, hi) in space(recipe, layer_groups).items():
        kind, name, _ = _parse(key)
        value = own[name].get(kind, shared.get(kind))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            return None
        if abs(round((value - lo) / STEP) * STEP + lo - value) > 1e-9:
            return None
        point[key] = float(value)
    return point


def apply(recipe: dict, values: dict[str, float]) -> dict:
    """The recipe with the trial's weights and densities, per model (a scalar, or a gradient list
    for layer-group keys "kind.name@j"); a recipe-wide density gives way to the per-model ones.
    Normalised through `resolved_recipe`, as the pipeline reads a recipe file, so the best
    trial's merge key is the one the pipeline computes for it."""
    out = copy.deepcopy(recipe)
    names = _names(recipe)
    settings: dict[tuple[str, str], dict[int | None, float]] = {}
    for key, v in values.items():
        kind, name, anchor = _parse(key)
        settings.setdefault((name, kind), {})[anchor] = round(float(v), 4)
    for m in _tuned_models(out):
        params = m.setdefault("parameters", {}) or {}
        m["parameters"] = params
        for kind in ("weight", "density"):
            got = settings.get((names[m["model"]], kind))
            if got is None:
                continue
            points = [got[None]] if None in got else [got[j] for j in sorted(got)]
            # a flat gradient is written as its one value: the same merge, without the float
            # rounding of interpolating between equal values
            params[kind] = points[0] if len(set(points)) == 1 else points
    if any(k.startswith("density.") for k in values) and out.get("parameters"):
        out["parameters"].pop("density", None)
        if not out["parameters"]:
            out.pop("parameters")
    return resolved_recipe(out)


def log_trial(c, parent: str, number: int, values: dict, recipe: dict, result: dict | None,
              cached: bool, error: str | None = None) -> str:
    """One MLflow child run per trial: its values and recipe, the objective and its parts."""
    with tracking.child_run(c, parent, f"trial:{number}") as run:
        tracking.log_params(c, run, {**values, "recipe": recipe})
        tracking.log_text(c, run, yaml.safe_dump(recipe, sort_keys=False), "recipe.yaml")
        tags = {"mergeline.trial": number, "mergeline.cached": cached}
        if error:
            tags["mergeline.error"] = error[:5000]
        tracking.set_tags(c, run, tags)
        if result is not None:
            tracking.log_metrics(c, run, {k: v for k, v in result.items() if k != "penalty"})
    return run


if __name__ == "__main__":
    for k, (lo, hi) in space(resolved_recipe(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1).items():
        print(f"{k}: [{lo}, {hi}] step {STEP}")
