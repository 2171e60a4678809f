"""Multi-stage recipes (mergekit-multi): several recipes in one file, later ones merging earlier ones.

    name: math-code                 # a stage: written to the intermediate folder under its name
    merge_method: ties
    base_model: ./base
    models: [{model: ./math, parameters: {weight: 0.5}}, {model: ./code, parameters: {weight: 0.5}}]
    ---
    merge_method: slerp             # the final stage (no name): written to OUT
    base_model: ./base
    models: [{model: ./base}, {model: math-code}]   # an earlier stage, by its name
    parameters: {t: 0.5}

As in mergekit's `mergekit-multi` (`mergekit/scripts/multimerge.py`): YAML documents separated by
`---`, each a recipe plus a `name:`; a model reference equal to a stage's name means that stage's
output; at most one unnamed document, the final model. mergeline also takes a file whose every
stage is named: the last document is then the final model. Stages run in dependency order;
a reference to a later stage that forms a cycle is refused by name. Intermediate models are kept
in `--intermediate-dir`, by default `.OUT.stages/<name>` beside OUT; one whose recipe and inputs
are unchanged since it was written is reused (`stage_key`), one an earlier run wrote is replaced,
any other existing folder is refused without --overwrite. Every stage's output lists its stages
in `mergeline_stages.json` (name, recipe, folder, key); the final model's lists them all.

Pure: no Prefect. The pipeline runs each stage as its own cached task with `run_stage`.

    python -m mergeline.merge.multistage RECIPE.yaml OUT       # the stages, in order, and where each goes
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict

from mergeline.merge.recipe import MergeRecipe, RecipeError, is_multistage, load_recipe, read_documents

STAGES_FILE = "mergeline_stages.json"
# Keys whose string values are model references (mergekit patches every model reference).
_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


class Stage(BaseModel):
    """One recipe of a multi-stage file, its references to earlier stages resolved to folders."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str | None  # None: the final, unnamed document
    recipe: MergeRecipe
    out: Path
    needs: list[str]  # names of the stages it merges
    final: bool


def default_intermediate_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.parent / f".{out.name}.stages"


def _patch(value: Any, names: dict[str, Path], used: set[str], key: str | None = None) -> Any:
    """`value` with every model reference that names a stage replaced by that stage's folder."""
    if isinstance(value, list):
        return [_patch(v, names, used, key) for v in value]
    if isinstance(value, dict):
        return {k: _patch(v, names, used, k) for k, v in value.items()}
    if isinstance(value, str) and key in _MODEL_KEYS:
        model, plus, adapter = value.partition("+")  # BASE+ADAPTER: either side may be a stage
        parts = [model, adapter] if plus else [model]
        out = []
        for p in parts:
            if p in names:
                used.add(p)
                out.append(str(names[p]))
            else:
                out.append(p)
        return "+".join(out)
    return value


def load_stages(path: str | Path, out_dir: str | Path, intermediate_dir: str | Path | None = None) -> list[Stage]:
    """The stages of a multi-stage recipe in the order they must run; the final one writes to
    `out_dir`, the others to `intermediate_dir/<name>`."""
    path = Path(path)
    docs = read_documents(path)
    if not docs:
        raise RecipeError(f"{path}: no recipe in the file")
    inter = Path(intermediate_dir) if intermediate_dir is not None else default_intermediate_dir(out_dir)
    named: dict[str | None, dict] = {}
    for i, doc in enumerate(docs):
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise RecipeError(f"{path}: document {i + 1}: name {name!r} must be a plain folder name")
        if name in named:
            raise RecipeError(f"{path}: document {i + 1}: " + (f"stage name {name!r} is used twice" if name else
                                                            "more than one unnamed (final) recipe"))
        named[name] = doc
    final = None if None in named else list(named)[-1]
    folders = {n: (Path(out_dir) if n == final else inter / n) for n in named if n is not None}
    stages: dict[str | None, Stage] = {}
    for name, doc in named.items():
        used: set[str] = set()
        patched = _patch(doc, folders, used)
        if name in used:
            raise RecipeError(f"{path}: stage {name!r} merges itself")
        where = f"{path} (stage {name})" if name else f"{path} (final recipe)"
        try:
            recipe = load_recipe(patched)
        except RecipeError as e:
            raise RecipeError(f"{where}: {str(e).removeprefix('recipe: ')}") from None
        recipe = recipe.model_copy(update={"source_dir": str(path.resolve().parent)})
        out = Path(out_dir) if name == final else inter / name
        stages[name] = Stage(name=name, recipe=recipe, out=out, needs=sorted(used), final=name == final)
    return _ordered(stages, path)


def _ordered(stages: dict[str | None, Stage], path: Path) -> list[Stage]:
    """Dependency order (file order where free); a cycle is refused naming a stage in it."""
    done: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(name, chain):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            raise RecipeError(f"{path}: stages {' -> '.join(map(str, chain + [name]))} merge each other (a cycle)")
        state[name] = "open"
        for dep in stages[name].needs:
            visit(dep, chain + [name])
        state[name] = "done"
        done.append(stages[name])

    for name in stages:
        visit(name, [])
    return done


def stage_key(stage: Stage) -> str:
    """A content key for caching a stage: its recipe and the content hash of every input model
    (merge/hashing.py), so a stage is redone when an earlier stage's output changes. Computed
    once the stages it needs have been written."""
    from mergeline.merge.hashing import content_hash
    from mergeline.merge.resolve import resolve_model

    h = hashlib.sha256(stage.recipe.to_yaml().encode())
    for m in stage.recipe.inputs():
        h.update(content_hash(resolve_model(m.model, stage.recipe.source_dir)).encode())
    return h.hexdigest()[:16]


def stage_record(stage: Stage, key: str) -> dict:
    """What a model's lineage lists for one stage: name, folder, key, what it merges, recipe."""
    return {"name": stage.name, "out": str(stage.out), "final": stage.final, "needs": stage.needs, "key": key,
            "recipe": yaml.safe_load(stage.recipe.to_yaml())}


def recorded_key(folder: Path, name: str | None) -> str | None:
    """The key a stage's output was written from (its own mergeline_stages.json), else None."""
    try:
        records = json.loads((folder / STAGES_FILE).read_text())
    except (OSError, ValueError):
        return None
    own = [r for r in records if isinstance(r, dict) and r.get("name") == name] if isinstance(records, list) else []
    return own[-1].get("key") if own else None


def run_stage(stage: Stage, run: Callable | None = None, reuse: bool = True, key: str | None = None,
              records: list[dict] | None = None, overwrite: bool = False, **merge_kwargs):
    """Merge one stage into `stage.out`, its record (and `records`, the earlier stages') written
    with it as mergeline_stages.json. An intermediate written from the same key is kept (returns
    None); one written by an earlier run of this recipe is replaced; any other existing folder
    only with `overwrite`, like a final output. Else returns run_merge's MergeOutput. The Prefect
    flow calls this per stage, cached by `stage_key(stage)`."""
    if run is None:
        from mergeline.merge.executor import run_merge as run
    key = key or stage_key(stage)
    found = recorded_key(stage.out, stage.name)
    if reuse and not stage.final and found == key:
        return None
    own = [*(records or []), stage_record(stage, key)]
    recipe = stage.recipe.model_copy(update={"stages": own})
    return run(recipe, stage.out, overwrite=overwrite or (not stage.final and found is not None), **merge_kwargs)


def run_stages(path: str | Path, out_dir: str | Path, intermediate_dir: str | Path | None = None,
               run: Callable | None = None, **merge_kwargs) -> list:
    """Run every stage in order; the final model's mergeline_stages.json lists them all.
    Returns the MergeOutput of each stage (None for a reused intermediate)."""
    stages = load_stages(path, out_dir, intermediate_dir)
    outputs, records = [], []
    for s in stages:
        key = stage_key(s)  # the stages it needs are written by now
        outputs.append(run_stage(s, run=run, key=key, records=records if s.final else None, **merge_kwargs))
        records.append(stage_record(s, key))
    return outputs


def merge_file(recipe: str | Path, out_dir: str | Path, intermediate_dir: str | Path | None = None, **merge_kwargs):
    """What `mergeline merge RECIPE OUT` runs: a multi-stage file stage by stage, any other recipe
    with run_merge; returns the final model's MergeOutput. Keyword arguments go to run_merge."""
    if isinstance(recipe, (str, Path)) and is_multistage(recipe):
        outputs = run_stages(recipe, out_dir, intermediate_dir, **merge_kwargs)
        return outputs[-1]
    from mergeline.merge.executor import run_merge

    return run_merge(recipe, out_dir, **merge_kwargs)


if __name__ == "__main__":
    for s in load_stages(sys.argv[1], sys.argv[2]):
        print(f"{s.name or '(final)'} -> {s.out}  needs {', '.join(s.needs) or '-'}")
