"""The compatibility gate: can these models be merged at all? Checked before any compute.

TIES and its relatives (Yadav et al., 2023, arXiv:2306.01708) average task vectors
coordinate by coordinate, which only means something when every model descends from the same
base, with the same architecture and the same token ids. Each check here says what is wrong,
with the values: config fields, tensor names/shapes/dtypes (headers only), tokenizer identity,
and base-delta norms with cosine similarities (streamed). Thresholds and waivers come from
`configs/compat_policy.yaml`.

    mergeline check configs/recipes/ties.yaml            # or: --json, --policy my_policy.yaml
    python -c "from merge.compat import check_models; print(check_models('BASE', {'a': 'FT'}).status)"

Unusable input (missing folder or config, no safetensors, a truncated file, an index naming a
missing shard, an unreadable tokenizer, the same model twice) raises an error from
`INPUT_ERRORS` whose one-line message names the file; nothing is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from merge.checkpoint import Checkpoint, CheckpointError
from merge.recipe import RecipeError, load_recipe, model_names
from merge.resolve import ModelNotFound, resolve_model

from .architecture import check_architecture
from .norms import norm_checks, stream_norms
from .policy import KNOWN_CHECKS, CompatPolicy, PolicyError, load_policy
from .report import Check, CompatReport
from .tensors import check_tensors
from .tokenizer import check_tokenizers, read_tokenizer

__all__ = ["check_models", "check_recipe", "CompatReport", "Check", "CompatPolicy", "load_policy",
           "CompatInputError", "INPUT_ERRORS"]


class CompatInputError(ValueError):
    """Input the gate cannot judge (e.g. the same model twice); the message names the file."""


# Everything that means "unusable input" (exit code 2), each with a message naming the file.
INPUT_ERRORS: tuple[type[Exception], ...] = (CheckpointError, CompatInputError, PolicyError, RecipeError, ModelNotFound)


def check_models(base: str | Path, models: Mapping[str, str | Path], policy: Any = None, *,
                 allow_pickle: bool = False, base_name: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> CompatReport:
    """Check that every model in `models` (short name -> folder) can be merged onto `base`.
    `on_progress(done, total)`: the norm pass's progress, in elements of the base."""
    pol = load_policy(policy)
    if not models:
        raise CompatInputError("no models to check against the base")
    base = Path(base)
    base_name = base_name or base.name or "base"
    if base_name in models:
        base_name = "base" if "base" not in models else f"{base_name} (base)"
    _refuse_duplicates(base, {n: Path(p) for n, p in models.items()})

    # Open everything first: any unusable input stops here, before a single check runs.
    ckpts = {base_name: Checkpoint(base, allow_pickle=allow_pickle)}
    ckpts.update({n: Checkpoint(p, allow_pickle=allow_pickle) for n, p in models.items()})
    configs = {n: c.config for n, c in ckpts.items()}
    infos = {n: c.infos() for n, c in ckpts.items()}
    tokenizers = {n: read_tokenizer(c.folder) for n, c in ckpts.items()}

    checks = [check_architecture(configs, base_name, pol.architecture.ignore_fields, pol.waived_fields())]
    checks += check_tensors(infos, base_name)
    checks += check_tokenizers(tokenizers, base_name)
    report = CompatReport(checks, base=str(base), models={n: str(Path(p)) for n, p in models.items()})
    report.checks += _norms(report, ckpts, infos, base_name, pol, on_progress)
    _apply_policy(report, pol)
    return report


def _norms(report: CompatReport, ckpts: dict[str, Checkpoint], infos, base_name: str,
           pol: CompatPolicy, on_progress=None) -> list[Check]:
    names = [n for n in KNOWN_CHECKS if n.startswith("norms.")]
    if not pol.norms.enabled:
        return [Check(n, "skip", "skipped: norms disabled by the policy") for n in names]
    if report.check("tensors.shapes").status == "fail":
        return [Check(n, "skip", "skipped: tensor shapes differ, so deltas are undefined") for n in names]
    shared = [t for t in infos[base_name] if all(t in i for i in infos.values())]
    if not shared:
        return [Check(n, "skip", "skipped: no tensor shared by all models") for n in names]
    models = {n: c for n, c in ckpts.items() if n != base_name}
    res = stream_norms(ckpts[base_name], models, shared, pol.norms.chunk_elements, on_progress=on_progress)
    report.norms = {**res.to_dict(), "not_compared": sorted(set().union(*infos.values()) - set(shared))}
    return norm_checks(res, pol.norms)


def _apply_policy(report: CompatReport, pol: CompatPolicy) -> None:
    for c in report.checks:
        if c.status in ("warn", "fail") and c.name in pol.severity:
            c.status = pol.severity[c.name]
        if c.status in ("warn", "fail") and pol.is_waived(c.name):
            c.details = {**c.details, "waived_status": c.status}
            c.status, c.waived = "waived", True
            c.message = f"[waived by policy] {c.message}"


def _refuse_duplicates(base: Path, models: dict[str, Path]) -> None:
    seen = {base.resolve(): "the base"}
    for name, path in models.items():
        key = path.resolve()
        if key in seen:
            raise CompatInputError(f"{path}: the same model is given twice ({name} and {seen[key]})")
        seen[key] = name


def check_recipe(recipe_or_path: Any, policy: Any = None, *, allow_pickle: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> CompatReport:
    """Resolve a mergekit recipe's base and models, then `check_models` them."""
    if hasattr(recipe_or_path, "merge_method"):
        recipe = recipe_or_path
        where = "recipe"
    else:
        recipe = load_recipe(recipe_or_path)
        where = str(recipe_or_path) if isinstance(recipe_or_path, (str, Path)) else "recipe"
    # Without a base_model (linear, slerp) the first model is the reference everything is
    # compared with; deltas are then taken to it, which still exposes an unrelated model.
    reference = recipe.reference_model
    names = model_names(recipe)
    refs = [m.model for m in recipe.inputs() if m.model != reference]
    if not refs:
        raise CompatInputError(f"{where}: 'models' lists only {reference!r}; nothing to check against it")
    base = resolve_model(reference, recipe.source_dir)
    folders = {names[r]: resolve_model(r, recipe.source_dir) for r in refs}
    try:
        _refuse_duplicates(base, folders)
    except CompatInputError as e:
        raise CompatInputError(f"{where}: {e}") from None
    return check_models(base, folders, policy, allow_pickle=allow_pickle, base_name=names[reference],
                        on_progress=on_progress)

