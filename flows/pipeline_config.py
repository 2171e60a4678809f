"""The pipeline file: one YAML that says what to merge, what to compare it with, how to judge it,
and where to record it.

    name: demo
    workdir: ../mergeline-runs/demo      # relative paths resolve against this file's folder
    recipe: recipe_ties.yaml             # a mergekit recipe: a path, or the mapping inline
    baselines: [linear, task_arithmetic] # same models, plain method (weights kept); or {name, recipe}
    eval_suite: eval_suite.yaml
    gate_policy: gate_policy.yaml
    compat_policy: compat_policy.yaml    # optional
    tracking: {experiment: mergeline, register_as: mergeline-demo}
    runner: {kind: threads, max_workers: 2}
    smoke: {text: held_out.txt, prompts: ["the cat"]}  # optional; thresholds: the gate policy's smoke:

`mergeline run PIPELINE` runs it (flows/pipeline.py). Unknown keys are refused by name.

`load_pipeline` reads the file and resolves it once, into a `ResolvedPipeline`: every candidate's
recipe typed, its models absolute folders (a multi-stage recipe file, merge/multistage.py, with its
earlier stages, each writing under `<workdir>/stages/<candidate>/<stage>`), the eval suite, the
gate policy and the compatibility policy typed. Validation and the flow share it: a bad key or a
missing folder fails here, in seconds, not halfway through a run.

    python -m mergeline.flows.pipeline_config configs/pipeline_demo.yaml
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergeline.evaluation.policy import GatePolicy
from mergeline.evaluation.suite import EvalSuite
from mergeline.flows.errors import InputError, read_text, yaml_error_line
from mergeline.merge import config_files
from mergeline.merge.compat.policy import CompatPolicy
from mergeline.merge.config_files import parse_yaml_mapping
from mergeline.merge.multistage import Stage
from mergeline.merge.recipe import MergeRecipe


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PipelineError(InputError):
    """A pipeline file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Baseline(_Strict):
    name: str
    # A full mergekit recipe (path or mapping); None: the main recipe's models with `method`.
    recipe: Union[str, dict[str, Any], None] = None
    method: Optional[str] = None


class MergeSettings(_Strict):
    device: str = "cpu"
    seed: int = 0
    out_shard_size: str = "5GB"
    allow_pickle: bool = False


class Tracking(_Strict):
    experiment: str = "mergeline"
    # Environment variables win over these (MLFLOW_TRACKING_URI, PREFECT_API_URL): one setting away.
    mlflow_tracking_uri: Optional[str] = None
    prefect_api_url: Optional[str] = None
    register_as: Optional[str] = Field(None, description="registered model name; None: do not register")


class Runner(_Strict):
    kind: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(2, ge=1)
    # dask: an existing scheduler ("tcp://host:8786") or None for a local threads cluster.
    dask_address: Optional[str] = None


class SmokeInputs(_Strict):
    """What the smoke stage (evaluation/smoke.py) feeds every merge; its thresholds are the gate
    policy's `smoke:` section. Without text the perplexity check is skipped, without prompts
    the EOS and repetition checks are (each recorded as skipped)."""

    text: Optional[str] = Field(None, description="file of held-out general text, one document per line")
    prompts: list[str] = Field(default_factory=list, description="prompts for greedy continuations")


class Pipeline(_Strict):
    name: str = "pipeline"
    workdir: str = "mergeline-runs/pipeline"
    recipe: Union[str, dict[str, Any]]
    primary: Optional[str] = Field(None, description="candidate name of the recipe (default: its merge_method)")
    baselines: list[Union[str, Baseline]] = Field(default_factory=list)
    eval_suite: Union[str, dict[str, Any]]
    gate_policy: Union[str, dict[str, Any]]
    compat_policy: Union[str, dict[str, Any], None] = None
    placeholders: dict[str, str] = Field(default_factory=dict, description="${NAME} values for the suite")
    merge: MergeSettings = Field(default_factory=MergeSettings)
    tracking: Tracking = Field(default_factory=Tracking)
    runner: Runner = Field(default_factory=Runner)
    smoke: SmokeInputs = Field(default_factory=SmokeInputs)
    # The file's folder; relative paths above resolve against it. Set by load_pipeline.
    source_dir: Optional[str] = Field(None, exclude=True)

    @field_validator("baselines")
    @classmethod
    def _unique(cls, v):
        names = [b if isinstance(b, str) else b.name for b in v]
        if len(set(names)) != len(names):
            raise ValueError(f"baseline names repeat: {names}")
        return v

    # -- resolved views -------------------------------------------------------
    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.source_dir is None else Path(self.source_dir) / p

    @property
    def workdir_path(self) -> Path:
        return self.path(self.workdir).resolve()

    def load(self, value):
        """A path or an inline mapping -> (mapping, file or None)."""
        if isinstance(value, dict) or value is None:
            return value, None
        p = self.path(value)
        if not p.is_file():
            raise PipelineError(f"{value}: file not found (resolved to {p})")
        text = _text(p, "config")
        try:
            return yaml.safe_load(text), p
        except yaml.YAMLError as e:
            raise PipelineError(yaml_error_line(e, str(p))) from None


class Candidate(BaseModel):
    """One merge the pipeline makes: the main recipe or a baseline, resolved."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    recipe: MergeRecipe  # every model an absolute folder; a multi-stage file's final recipe
    stages: list[Stage] = Field(default_factory=list)  # a multi-stage file's earlier stages, in run order
    final: Optional[Stage] = None  # and its final one (for the lineage's stage records)

    def leaves(self) -> dict[str, Path]:
        """Short name -> folder of every model the candidate reads that no earlier stage writes
        (the base and the fine-tunes the suite judges it against)."""
        from mergeline.tasks.recipes import inputs

        made = {str(s.out) for s in self.stages}
        out: dict[str, Path] = {}
        for r in [s.recipe for s in self.stages] + [self.recipe]:
            out.update({n: p for n, p in inputs(r).items() if str(p) not in made and p not in out.values()})
        return out

    def base(self) -> str | None:
        """The short name of the base the candidate's merges share (the final's, else a stage's)."""
        from mergeline.tasks.recipes import base_name

        leaves = self.leaves()
        for r in [self.recipe] + [s.recipe for s in self.stages]:
            name = base_name(r)
            if name is not None and name in leaves:
                return name
        return None


class ResolvedPipeline(Pipeline):
    """The pipeline file with everything it names loaded and typed (`load_pipeline`). Whether the
    suite's retention names are models of the recipe is left to the run, after the compatibility
    check: a recipe of a fine-tune from another base stops there, at NO-GO, whatever the suite says."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    primary_name: str = Field(exclude=True)
    candidates: dict[str, Candidate] = Field(exclude=True)  # the primary first
    suite: EvalSuite = Field(exclude=True)
    gate: GatePolicy = Field(exclude=True)
    compat: CompatPolicy = Field(exclude=True)

    @property
    def main(self) -> Candidate:
        return self.candidates[self.primary_name]


def _text(path: Path, kind: str) -> str:
    try:
        return read_text(path, kind)
    except InputError as e:
        raise PipelineError(str(e)) from None


def fill(text: str, values: dict[str, str] | None = None) -> str:
    """Replace `${NAME}` with values[NAME], else the environment variable NAME; others stay."""
    values = values or {}

    def one(m: re.Match) -> str:
        return str(values.get(m.group(1), os.environ.get(m.group(1), m.group(0))))

    return _PLACEHOLDER.sub(one, text)


def load_pipeline(path: str | Path, values: dict[str, str] | None = None) -> ResolvedPipeline:
    """Read, fill `${NAME}` placeholders (from `values`, then the environment), validate, and
    resolve everything the file names (`resolve`)."""
    return resolve(read_pipeline(path, values))


def read_pipeline(path: str | Path, values: dict[str, str] | None = None) -> Pipeline:
    """The file alone: read, placeholders filled, keys checked, its own files found."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: pipeline file not found")
    text = fill(_text(path, "pipeline"), values)
    if missing := sorted(set(_PLACEHOLDER.findall(text))):
        raise PipelineError(f"{path}: placeholder(s) {missing} not set; set them as environment "
                            f"variables (`mergeline demo` writes a filled-in copy for the zoo)")
    data = parse_yaml_mapping(text, str(path), "pipeline", PipelineError)
    if "source_dir" in data:
        raise PipelineError(f"{path}: unknown key 'source_dir'")
    try:
        pipe = Pipeline.model_validate(data)
    except ValidationError as e:
        raise PipelineError(f"{path}: {explain(e)}") from None
    pipe.source_dir = str(path.resolve().parent)
    for key in ("recipe", "eval_suite", "gate_policy", "compat_policy"):
        value = getattr(pipe, key)
        if isinstance(value, str) and not pipe.path(value).is_file():
            raise PipelineError(f"{path}: key '{key}': file {value} not found (resolved to {pipe.path(value)})")
    if pipe.smoke.text is not None and not pipe.path(pipe.smoke.text).is_file():
        raise PipelineError(f"{path}: key 'smoke.text': file {pipe.smoke.text} not found "
                            f"(resolved to {pipe.path(pipe.smoke.text)})")
    return pipe


def resolve(pipe: Pipeline) -> ResolvedPipeline:
    """Load the recipes, suite and policies the file names and resolve every model; each error
    names the pipeline key or the file at fault."""
    from mergeline.evaluation.policy import load_policy as load_gate_policy
    from mergeline.evaluation.suite import check_ready, load_suite
    from mergeline.flows.errors import check_yaml_file
    from mergeline.merge.compat.policy import load_policy as load_compat_policy
    from mergeline.tasks.recipes import baseline

    if isinstance(pipe, ResolvedPipeline):
        return pipe
    for key in ("recipe", "eval_suite", "gate_policy", "compat_policy"):
        value = getattr(pipe, key)
        if isinstance(value, str):
            check_yaml_file(pipe.path(value), f"{key.replace('_', ' ')} (pipeline key '{key}')")
    for b in pipe.baselines:
        if not isinstance(b, str) and isinstance(b.recipe, str):
            check_yaml_file(pipe.path(b.recipe), f"baseline {b.name} recipe")
    main = _candidate(pipe, pipe.primary, pipe.recipe)
    primary = main.name
    candidates = {primary: main}
    for b in pipe.baselines:
        name = b if isinstance(b, str) else b.name
        if isinstance(b, str) or b.recipe is None:
            recipe = baseline(main.recipe, b if isinstance(b, str) else (b.method or b.name))
            candidates[name] = Candidate(name=name, recipe=recipe)
        else:
            candidates[name] = _candidate(pipe, name, b.recipe)
    suite = load_suite(pipe.path(pipe.eval_suite) if isinstance(pipe.eval_suite, str) else pipe.eval_suite,
                       pipe.placeholders)
    check_ready(suite)
    gate_src = pipe.path(pipe.gate_policy) if isinstance(pipe.gate_policy, str) else pipe.gate_policy
    compat_src = pipe.path(pipe.compat_policy) if isinstance(pipe.compat_policy, str) else pipe.compat_policy
    return ResolvedPipeline.model_construct(
        **dict(pipe), primary_name=primary, candidates=candidates, suite=suite,
        gate=load_gate_policy(gate_src or {}), compat=load_compat_policy(compat_src))


def _candidate(pipe: Pipeline, name: str | None, value: str | dict) -> Candidate:
    """A recipe (file, multi-stage file or mapping) with its models resolved; named `name`, or
    by its (final) merge method."""
    from mergeline.merge.multistage import is_multistage, load_stages
    from mergeline.merge.recipe import load_recipe
    from mergeline.tasks.recipes import resolve as resolve_recipe

    if isinstance(value, dict) or not is_multistage(pipe.path(value)):
        recipe = load_recipe(dict(value)) if isinstance(value, dict) else load_recipe(pipe.path(value))
        recipe = resolve_recipe(recipe, pipe.source_dir)
        return Candidate(name=name or recipe.merge_method, recipe=recipe)
    # The final model goes where the merge task puts it (content-addressed under models/); the
    # earlier stages under stages/<candidate>/, where a rerun finds them.
    path, work = pipe.path(value), pipe.workdir_path
    name = name or load_stages(path, work / "models")[-1].recipe.merge_method
    stages = load_stages(path, work / "models" / name, work / "stages" / name)
    pending = frozenset(str(s.out) for s in stages if not s.final)
    stages = [s.model_copy(update={"recipe": resolve_recipe(s.recipe, pending=pending)}) for s in stages]
    final = stages[-1]
    return Candidate(name=name, recipe=final.recipe, stages=stages[:-1], final=final)


def check_retention_names(suite: EvalSuite, folders: dict, base: str | None) -> None:
    """The suite's retention names must be the recipe's fine-tunes, named as their folders."""
    finetunes = sorted(n for n in folders if n != base)
    if unknown := sorted(set(suite.retention) - set(finetunes)):
        raise PipelineError(f"eval suite: retention names {unknown} are not models of the recipe "
                            f"(models: {finetunes}); name the fine-tune folders alike")


def explain(e: ValidationError) -> str:
    # Baseline entries are a union of a method name and a mapping: drop their member tags too.
    return config_files.explain(e, union_tags=(*config_files.UNION_TAGS, "Baseline"))


if __name__ == "__main__":
    print(load_pipeline(sys.argv[1]).model_dump_json(indent=2))
