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
in `--intermediate-dir`, by default `.OUT.stages/<name>` beside OUT, and one whose recipe and
inputs are unchanged since it was written is reused (`stage_key`). The final model's
`mergeline_stages.json` lists every stage (name, recipe, folder, key).

Pure: no Prefect. The pipeline runs each stage as its own cached task with `run_stage`.

    python -m merge.multistage RECIPE.yaml OUT       # the stages, in order, and where each goes
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict

from merge.config_files import _Loader, _yaml_problem
from merge.recipe import MergeRecipe, RecipeError, load_recipe

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


def read_documents(path: str | Path) -> list[dict]:
    """Every YAML document of the file, each a mapping; RecipeError naming the file otherwise."""
    path = Path(path)
    try:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise RecipeError(f"{path}: document {i + 1} must be a YAML mapping, not {type(d).__name__}")
    return docs


def is_multistage(path: str | Path) -> bool:
    """True for a file of several recipes (or one with a `name:`): run it with `run_stages`."""
    try:
        docs = read_documents(path)
    except RecipeError:
        return False
    return len(docs) > 1 or any("name" in d for d in docs)


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
    (merge/hashing.py), so a stage is redone when an earlier stage's output changes."""
    from merge.hashing import content_hash
    from merge.resolve import resolve_model

    h = hashlib.sha256(stage.recipe.to_yaml().encode())
    for m in stage.recipe.inputs():
        h.update(content_hash(resolve_model(m.model, stage.recipe.source_dir)).encode())
    return h.hexdigest()[:16]


def run_stage(stage: Stage, run: Callable | None = None, reuse: bool = True, **merge_kwargs):
    """Merge one stage into `stage.out`; an intermediate already written from the same key is
    kept (its `mergeline_stage_key` file matches). Returns run_merge's MergeOutput, or None when
    reused. The Prefect flow calls this per stage, with `stage_key(stage)` as its cache key."""
    if run is None:
        from merge.executor import run_merge as run
    key = stage_key(stage)
    marker = stage.out / "mergeline_stage_key"
    if reuse and not stage.final and marker.is_file() and marker.read_text().strip() == key:
        return None
    overwrite = merge_kwargs.pop("overwrite", False) or not stage.final  # intermediates are ours to redo
    result = run(stage.recipe, stage.out, overwrite=overwrite, **merge_kwargs)
    if not stage.final:
        marker.write_text(key + "\n")
    return result


def stage_records(stages: list[Stage]) -> list[dict]:
    """What the final model's lineage lists: every stage's name, folder, key and recipe."""
    return [{"name": s.name, "out": str(s.out), "final": s.final, "needs": s.needs,
             "recipe": yaml.safe_load(s.recipe.to_yaml())} for s in stages]


def run_stages(path: str | Path, out_dir: str | Path, intermediate_dir: str | Path | None = None,
               run: Callable | None = None, **merge_kwargs) -> list:
    """Run every stage in order; the final model gets `mergeline_stages.json` (staged with it).
    Returns the MergeOutput of each stage that ran (None for a reused one)."""
    stages = load_stages(path, out_dir, intermediate_dir)
    records = stage_records(stages)
    outputs = []
    for s in stages:
        if s.final:  # the record travels in the recipe and is written with the side files
            s = s.model_copy(update={"recipe": s.recipe.model_copy(update={"stages": records})})
        outputs.append(run_stage(s, run=run, **merge_kwargs))
    return outputs


if __name__ == "__main__":
    for s in load_stages(sys.argv[1], sys.argv[2]):
        print(f"{s.name or '(final)'} -> {s.out}  needs {s.needs or '-'}")
    print(json.dumps([r["name"] for r in stage_records(load_stages(sys.argv[1], sys.argv[2]))]))
