"""The compatibility gate: can these models be merged at all? Checked before any compute.

TIES and its relatives (Yadav et al., 2023, arXiv:2306.01708) average task vectors
coordinate by coordinate, which only means something when every model descends from the same
base, with the same architecture and the same token ids. Each check here says what is wrong,
with the values: config fields, tensor names/shapes/dtypes (headers only), tokenizer identity,
and base-delta norms with cosine similarities (streamed). Thresholds and waivers come from
`configs/compat_policy.yaml`.

    mergeline check configs/recipes/ties.yaml            # or: --json, --policy my_policy.yaml
    python -c "from mergeline.merge.compat import check_models; print(check_models('BASE', {'a': 'FT'}).status)"

The same checks run inside `mergeline merge` (merge/executor.py): the header checks before any
tensor is read, the norms from the merge's own read of every tensor (`gate.CompatGate`).

Unusable input (missing folder or config, no safetensors, a truncated file, an index naming a
missing shard, an unreadable tokenizer, the same model twice) raises an error from
`INPUT_ERRORS` whose one-line message names the file; nothing is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from mergeline.merge.recipe import load_recipe

from .gate import INPUT_ERRORS, ChecksFailed, CompatGate, CompatInputError, recipe_gate
from .policy import CompatPolicy, load_policy
from .report import Check, CompatReport

__all__ = ["check_models", "check_recipe", "CompatReport", "Check", "CompatPolicy", "load_policy",
           "CompatInputError", "INPUT_ERRORS", "CompatGate", "ChecksFailed", "recipe_gate"]


def check_models(base: str | Path, models: Mapping[str, str | Path], policy: Any = None, *,
                 allow_pickle: bool = False, base_name: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> CompatReport:
    """Check that every model in `models` (short name -> folder) can be merged onto `base`.
    `on_progress(done, total)`: the norm pass's progress, in elements of the base."""
    gate = CompatGate(base, models, policy, allow_pickle=allow_pickle, base_name=base_name)
    return gate.finish(gate.read_norms(on_progress))


def check_recipe(recipe_or_path: Any, policy: Any = None, *, allow_pickle: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> CompatReport:
    """Resolve a mergekit recipe's base and models, then check them as `check_models` does."""
    if hasattr(recipe_or_path, "merge_method"):
        recipe, where = recipe_or_path, "recipe"
    else:
        recipe = load_recipe(recipe_or_path)
        where = str(recipe_or_path) if isinstance(recipe_or_path, (str, Path)) else "recipe"
    gate = recipe_gate(recipe, policy, allow_pickle=allow_pickle, where=where)
    return gate.finish(gate.read_norms(on_progress))
