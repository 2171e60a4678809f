"""Validation-guided sign election for TIES: the greedy search over layer groups.

TIES-Merging (Yadav et al. 2023, arXiv:2306.01708) elects each coordinate's sign by the summed
magnitude of the trimmed task vectors; its section 7 and appendix show that a sign vector
estimated from validation data merges better. Here the sign is chosen per layer group
(merge/methods/ties.py `SignChoice`: `embeddings`, `layers.A-B` blocks, `head`) among the
magnitude-elected signs and each fine-tune's own signs:

    choices = every group "elected"                         (the untuned TIES merge)
    for each group, in model order (embeddings, layers.0-.., head):
        for each fine-tune M: try choices with group -> M   (merge + objective on validation items)
        keep the best; a tie keeps the current choice (the election)

So a search costs at most 1 + groups * fine-tunes merges and evaluations; a candidate whose merge
equals one seen before (a group where the fine-tunes changed nothing) is served by the score
cache, keyed by the merged model's content. The result is a plain recipe: `sign_source:
validation` with the recorded `sign_choices`, which `mergeline merge` reproduces bit for bit.

Entry: a TIES recipe with `parameters: {sign_source: validation}` in a pipeline, then
`mergeline tune PIPELINE` (flows/tune.py runs this search instead of the weight/density search).

    python -m mergeline.flows.sign_search RECIPE.yaml [BLOCK]   # print the groups a search tries
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Callable

from mergeline.merge.methods.ties import ELECTED
from mergeline.merge.parameters import num_layers
from mergeline.tasks.recipes import base_name, inputs, resolved_recipe

SOURCE_KEY, CHOICES_KEY = "sign_source", "sign_choices"
MAX_LAYER_GROUPS = 4  # default block size: the layers in at most this many blocks


def wants_signs(recipe: dict) -> bool:
    """Does the recipe ask for validation-guided signs without recorded choices?"""
    params = recipe.get("parameters") or {}
    return params.get(SOURCE_KEY) == "validation" and CHOICES_KEY not in params


def check_recipe(recipe: dict) -> None:
    """The search needs a TIES recipe with a `models:` list (ValueError naming what is wrong)."""
    if recipe.get("merge_method") != "ties":
        raise ValueError(f"sign_source: validation is a TIES option; the recipe's merge_method is "
                         f"{recipe.get('merge_method')!r}")
    if recipe.get("slices") or not recipe.get("models"):
        raise ValueError("sign_source: validation needs a recipe with a `models:` list (not `slices:`)")


def layer_count(recipe: dict) -> int:
    folders = inputs(recipe)
    config = json.loads((Path(folders[base_name(recipe)]) / "config.json").read_text())
    return num_layers(config)


def groups(n_layers: int, block: int | None = None) -> list[str]:
    """["embeddings", "layers.0-1", ..., "head"]: the layers in blocks of `block` layers
    (default: at most MAX_LAYER_GROUPS blocks)."""
    block = block or max(1, -(-n_layers // MAX_LAYER_GROUPS))
    spans = [(lo, min(lo + block, n_layers) - 1) for lo in range(0, n_layers, block)]
    return ["embeddings", *(f"layers.{a}" if a == b else f"layers.{a}-{b}" for a, b in spans), "head"]


def finetunes(recipe: dict) -> list[str]:
    base = base_name(recipe)
    return [n for n in inputs(recipe) if n != base]


def untuned(recipe: dict) -> dict:
    """The recipe with the plain magnitude election (no sign keys): the baseline."""
    out = copy.deepcopy(recipe)
    params = out.get("parameters") or {}
    for key in (SOURCE_KEY, CHOICES_KEY):
        params.pop(key, None)
    if not params:
        out.pop("parameters", None)
    return resolved_recipe(out)


def with_choices(recipe: dict, choices: dict[str, str]) -> dict:
    """The recipe with `sign_source: validation` and these recorded choices."""
    out = copy.deepcopy(recipe)
    out.setdefault("parameters", {})
    out["parameters"] = {**(out["parameters"] or {}), SOURCE_KEY: "validation", CHOICES_KEY: dict(choices)}
    return resolved_recipe(out)


def greedy(group_names: list[str], models: list[str],
           score: Callable[[list[dict[str, str]]], list[float | None]],
           report: Callable[[dict[str, str], float | None, dict[str, str], float], None] = lambda *a: None
           ) -> tuple[dict[str, str], float]:
    """The greedy search. `score(tables)` gives each sign table's validation objective (None: failed),
    a batch at a time; `report(table, value, best_table, best_value)` is called per candidate.
    Returns (best table, its objective)."""
    best = {g: ELECTED for g in group_names}
    [value] = score([best])
    if value is None:
        raise RuntimeError("sign search: the merge with the elected signs failed")
    report(best, value, best, value)
    for g in group_names:
        tables = [{**best, g: m} for m in models]
        for table, v in zip(tables, score(tables)):
            if v is not None and v > value:
                best, value = table, v
            report(table, v, best, value)
    return best, value


if __name__ == "__main__":
    r = resolved_recipe(sys.argv[1])
    print(groups(layer_count(r), int(sys.argv[2]) if len(sys.argv) > 2 else None), finetunes(r))
