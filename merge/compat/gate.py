"""The compatibility gate in the order a merge needs it: headers, then norms, then the verdict.

`CompatGate(base, models, policy)` refuses the same model given twice and opens every input
(unusable input raises one of `INPUT_ERRORS`, naming the file), then runs the header checks at
once: architecture (config.json), tensors (safetensors headers) and tokenizer. No tensor data
is read there. The norm statistics (Ilharco et al., 2023, arXiv:2212.04089; TIES, Yadav et
al., 2023, arXiv:2306.01708) come from a pass over the tensors: the gate's own
(`read_norms`, what `mergeline check` does) or the merge's (merge/executor.py feeds the tensors it
reads anyway to `accumulator()`), and `finish` judges them with the policy's thresholds.

    python -c "from mergeline.merge.compat.gate import CompatGate; g = CompatGate('BASE', {'a': 'FT'}); \
print(g.finish(g.read_norms()).status)"
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from mergeline.merge.checkpoint import Checkpoint, CheckpointError
from mergeline.merge.recipe import MergeRecipe, RecipeError, model_names
from mergeline.merge.resolve import ModelNotFound, resolve_model

from .architecture import check_architecture
from .norms import NormAccumulator, NormResult, norm_checks, norm_tensors, stream_norms
from .policy import KNOWN_CHECKS, CompatPolicy, PolicyError, load_policy
from .report import Check, CompatReport
from .tensors import check_tensors
from .tokenizer import check_tokenizers, read_tokenizer

NORM_CHECKS = [n for n in KNOWN_CHECKS if n.startswith("norms.")]
ALLOW_CRIMES = "--allow-crimes"  # mergekit's name for "merge anyway"


class CompatInputError(ValueError):
    """Input the gate cannot judge (e.g. the same model twice); the message names the file."""


class ChecksFailed(Exception):
    """A compatibility check failed: the merge is refused. `report` holds every check."""

    def __init__(self, report: CompatReport, stage: str):
        self.report, self.stage = report, stage
        failed = report.failed()
        first = failed[0]
        more = f" (and {len(failed) - 1} more: {', '.join(c.name for c in failed[1:])})" if len(failed) > 1 else ""
        super().__init__(f"check failed: {first.name}: {_one_line(first.message)}{more}; nothing written "
                         f"(pass {ALLOW_CRIMES} to merge anyway)")


# Everything that means "unusable input" (exit code 2), each with a message naming the file.
INPUT_ERRORS: tuple[type[Exception], ...] = (CheckpointError, CompatInputError, PolicyError, RecipeError, ModelNotFound)


class CompatGate:
    """The checks of one base and its models; `report` grows as the stages run."""

    def __init__(self, base: str | Path, models: Mapping[str, str | Path], policy: Any = None, *,
                 allow_pickle: bool = False, base_name: str | None = None, remapping: Any = None,
                 moves_layers: bool = False):
        self.policy: CompatPolicy = load_policy(policy)
        if not models:
            raise CompatInputError("no models to check against the base")
        base = Path(base)
        name = base_name or base.name or "base"
        if name in models:
            name = "base" if "base" not in models else f"{name} (base)"
        self.base_name, self.models = name, list(models)
        refuse_duplicates(base, {n: Path(p) for n, p in models.items()})

        # Open everything first: any unusable input stops here, before a single check runs.
        self.ckpts = {name: Checkpoint(base, allow_pickle=allow_pickle)}
        self.ckpts.update({n: Checkpoint(p, allow_pickle=allow_pickle) for n, p in models.items()})
        configs = {n: c.config for n, c in self.ckpts.items()}
        self.infos = {n: c.infos() for n, c in self.ckpts.items()}
        tokenizers = {n: read_tokenizer(c.folder) for n, c in self.ckpts.items()}
        self.adapted = set().union(*(c.adapter.names() for c in self.ckpts.values() if c.adapter is not None))

        pol = self.policy
        ignore = list(pol.architecture.ignore_fields)
        infos = self.infos
        if remapping is not None:  # a tokenizer merge rebuilds the token rows: sizes may differ
            from mergeline.merge.tokenizer_merge import VOCAB_TENSORS

            ignore.append("vocab_size")
            infos = {n: {t: i for t, i in inf.items() if t not in VOCAB_TENSORS} for n, inf in infos.items()}
        if moves_layers:  # a frankenmerge: models may differ in depth; compare what they all have
            from mergeline.merge.parameters import LAYER_COUNT_KEYS

            ignore += [*LAYER_COUNT_KEYS, "layer_types"]
            common = set.intersection(*(set(i) for i in infos.values()))
            infos = {n: {t: i for t, i in inf.items() if t in common} for n, inf in infos.items()}
        checks = [check_architecture(configs, name, ignore, pol.waived_fields())]
        checks += check_tensors(infos, name)
        tok_checks = check_tokenizers(tokenizers, name)
        if remapping is not None:
            tok_checks = [c for c in tok_checks if c.name not in ("tokenizer.vocab", "tokenizer.added_tokens")]
            tok_checks.append(Check("tokenizer.remap", "warn", remapping.text(), remapping.model_dump()))
        checks += tok_checks
        self._found = {c.name: c.status for c in checks}  # before the policy's severities and waivers
        _apply_policy(checks, pol)
        self.report = CompatReport(checks, base=str(base), models={n: str(Path(p)) for n, p in models.items()})

    # -- the norm pass ------------------------------------------------------------
    def norm_skip_reason(self) -> str | None:
        """Why the norms cannot (or need not) be computed, or None."""
        if not self.policy.norms.enabled:
            return "norms disabled by the policy"
        if self._found["tensors.shapes"] == "fail":
            return "tensor shapes differ, so deltas are undefined"
        if not self.shared:
            return "no tensor shared by all models"
        return None

    @property
    def shared(self) -> list[str]:
        """Tensor names every model has (the base's order): the tensors the norms may cover."""
        return [t for t in self.infos[self.base_name] if all(t in i for i in self.infos.values())]

    def norm_names(self) -> set[str]:
        """The tensors a norm pass must see (floating point and shared by every model)."""
        return set(norm_tensors(self.infos[self.base_name], self.shared))

    def accumulator(self) -> NormAccumulator:
        """An empty accumulator for a caller that reads the tensors itself: feed it each tensor of
        `norm_names()` once, models in `self.models` order, then hand its result to `finish`."""
        return NormAccumulator(self.models, self.policy.norms.chunk_elements, self.adapted)

    def close(self) -> None:
        """Drop the opened inputs (a caller that feeds `accumulator()` itself needs only the headers
        read so far; an opted-in pickle checkpoint is held in memory until then)."""
        self.ckpts = {}

    def read_norms(self, on_progress: Callable[[int, int], None] | None = None) -> NormResult | None:
        """The gate's own pass over the memory-mapped inputs (None when skipped)."""
        if self.norm_skip_reason() is not None:
            return None
        return stream_norms(self.ckpts[self.base_name], {n: self.ckpts[n] for n in self.models}, self.shared,
                            self.policy.norms.chunk_elements, on_progress=on_progress)

    def finish(self, res: NormResult | None) -> CompatReport:
        """Judge the norm statistics and return the whole report."""
        reason = self.norm_skip_reason()
        if reason is not None or res is None:
            checks = [Check(n, "skip", f"skipped: {reason or 'no norm pass'}") for n in NORM_CHECKS]
        else:
            compared = set(self.shared)
            self.report.norms = {**res.to_dict(),
                                 "not_compared": sorted(set().union(*self.infos.values()) - compared)}
            checks = norm_checks(res, self.policy.norms)
        _apply_policy(checks, self.policy)
        self.report.checks += checks
        return self.report


def recipe_gate(recipe: MergeRecipe, policy: Any = None, *, allow_pickle: bool = False,
                where: str = "recipe") -> CompatGate:
    """The gate of a recipe's models. Without a base_model (linear, slerp) the first model is
    the reference everything is compared with; deltas are then taken to it, which still exposes
    an unrelated model."""
    reference = recipe.reference_model
    names = model_names(recipe)
    refs = [m.model for m in recipe.inputs() if m.model != reference]
    if not refs:
        raise CompatInputError(f"{where}: 'models' lists only {reference!r}; nothing to check against it")
    base = resolve_model(reference, recipe.source_dir)
    folders = {names[r]: resolve_model(r, recipe.source_dir) for r in refs}
    try:
        refuse_duplicates(base, folders)
    except CompatInputError as e:
        raise CompatInputError(f"{where}: {e}") from None
    from mergeline.merge.slices import moves_layers
    from mergeline.merge.tokenizer_merge import describe_remapping

    return CompatGate(base, folders, policy, allow_pickle=allow_pickle, base_name=names[reference],
                      remapping=describe_remapping(recipe), moves_layers=moves_layers(recipe))


def refuse_duplicates(base: Path, models: dict[str, Path], base_name: str = "the base") -> None:
    """Two references to one folder (`ft1` and `ft1/`, or a symlink to it) are one model twice."""
    seen = {_identity(base): base_name}
    for name, path in models.items():
        key = _identity(path)
        if key in seen:
            raise CompatInputError(f"{path}: the same model is given twice ({name} and {seen[key]})")
        seen[key] = name


def _identity(path: Path) -> Path:
    # BASE+ADAPTER names two folders: resolve each side, so `b+a` and `b/+a` are one input.
    text = str(path)
    if "+" in text:
        from mergeline.merge.resolve import split_adapter

        model, adapter = split_adapter(text)
        return Path(f"{Path(model).resolve()}+{Path(adapter).resolve()}")
    return path.resolve()


def _apply_policy(checks: list[Check], pol: CompatPolicy) -> None:
    for c in checks:
        if c.status in ("warn", "fail") and c.name in pol.severity:
            c.status = pol.severity[c.name]
        if c.status in ("warn", "fail") and pol.is_waived(c.name):
            c.details = {**c.details, "waived_status": c.status}
            c.status, c.waived = "waived", True
            c.message = f"[waived by policy] {c.message}"


def waive_failures(report: CompatReport, by: str = ALLOW_CRIMES) -> list[Check]:
    """Turn every failed check into "waived" (still reported, never hidden); returns them."""
    failed = report.failed()
    for c in failed:
        c.details = {**c.details, "waived_status": "fail", "waived_by": by}
        c.status, c.waived = "waived", True
        c.message = f"[waived by {by}] {c.message}"
    return failed


def summary(report: CompatReport | dict) -> dict:
    """What lineage.json keeps of a report (or of its `to_dict()`, e.g. `MergeOutput.checks`):
    every check's verdict, the waived ones with who waived them, and the per-model norms
    (per-tensor figures stay out: they grow with the model)."""
    d = report.to_dict() if isinstance(report, CompatReport) else report
    checks = d.get("checks") or []
    waived = [{"name": c["name"], "status": c["details"].get("waived_status", "warn"),
               "by": c["details"].get("waived_by", "policy"), "message": c["message"]}
              for c in checks if c["status"] == "waived"]
    norms = d.get("norms") or {}
    return {"status": d.get("status"),
            "checks": [{"name": c["name"], "status": c["status"], "message": c["message"]} for c in checks],
            "waived": waived,
            "norms": {k: v for k, v in norms.items() if k in ("per_model", "cosine", "tensors", "numel")}}


def _one_line(text: str) -> str:
    return " ".join(text.split())
