"""Read a mergekit YAML recipe (the `models:` or `slices:` form) into a typed, validated MergeRecipe.

A recipe mergekit runs is read unchanged:

    merge_method: ties
    base_model: ./base
    models:
      - model: ./ft-a
        parameters: {weight: 0.5, density: [0.2, 0.5]}   # a gradient over the layers
      - model: org/ft-b@main                             # an HF repo id from the local cache
        parameters:
          weight: [{filter: mlp, value: 0.3}, {value: 0.5}]
    parameters: {normalize: true}
    dtype: bfloat16

Everything is checked when the recipe is read, before any tensor is touched (here and in
`merge/recipe_checks.py`): unknown keys, unknown methods, parameters the method does not take,
values out of range (each error names the key and what is allowed). `slices:` scope settings
by layer or stack layers into a frankenmerge (`merge/slices.py`); `tokenizer_source` and
`tokenizer:` build the output vocabulary (`merge/tokenizer_merge.py`); `modules:` runs for a
one-module (text-only) model and, module by module, for the multimodal architectures of
`merge/modules.py`; `BASE+ADAPTER` references merge a LoRA adapter into its base
(`merge/lora.py`). Several documents with `name:` are a multi-stage recipe
(`merge/multistage.py`). Forms mergekit has and mergeline does not run are refused, never misread.
Differences from mergekit are deliberate: mergekit ignores unknown keys and parameters.

    python -m mergeline.merge.recipe configs/recipes/ties.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeline.merge.config_files import Loader, explain, read_yaml_mapping, yaml_problem
from mergeline.merge.recipe_checks import RecipeError, check_recipe_semantics
from mergeline.merge.resolve import split_adapter

DTYPES = ("float32", "float16", "bfloat16", "float64")
NOT_SUPPORTED: dict[str, str] = {}


def _dtype_name(value: str | None, key: str) -> str | None:
    if value is None:
        return None
    name = value[len("torch."):] if value.startswith("torch.") else value
    if name not in DTYPES:
        raise ValueError(f"{key}: unknown dtype {value!r} (allowed: {', '.join(DTYPES)})")
    return name


class InputModel(BaseModel):
    """One entry of `models:`; `model` is the reference exactly as written."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] | None = None

    @field_validator("model")
    @classmethod
    def _one_adapter(cls, v: str) -> str:
        split_adapter(v)  # BASE+ADAPTER: a LoRA adapter merged into its base (merge/lora.py)
        return v


class InputSlice(InputModel):
    """One source of a `slices:` entry: a model and the layers it contributes (merge/slices.py)."""

    layer_range: tuple[int, int]


class OutputSlice(BaseModel):
    """One entry of `slices:`."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, Any] | None = None


class ModuleSpec(BaseModel):
    """One module of a multimodal `modules:` recipe (merge/modules.py): its models and settings."""

    model_config = ConfigDict(extra="forbid")
    models: list[InputModel]
    parameters: dict[str, Any] | None = None


# -- the recipe's `tokens:` entries (mergekit's TokenEmbeddingConfig) ---------------------
class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """Another token's row in one model: `token_id` or `token`, not both."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class TokenSpec(BaseModel):
    """One entry of `tokenizer.tokens`: where the token's row comes from, and whether to force it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """mergekit's `tokenizer:` block (merge/tokenizer_merge.py): the output vocabulary's source
    ('union', 'base' or a model), tokens to add and where their rows come from, padding."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


class MergeRecipe(BaseModel):
    """A mergekit `MergeConfiguration` restricted to what mergeline runs."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    # mergeline extension: "model" trims by the top-k of each model's WHOLE task vector, as in the
    # TIES paper (Yadav et al. 2023, sec. 3), instead of per tensor as mergekit does.
    trim_scope: Literal["tensor", "model"] = "tensor"
    slices: list[OutputSlice] | None = None
    # several modules of a multimodal model (merge/modules.py); `models` then lists their union
    modules: dict[str, ModuleSpec] | None = None
    # Where relative model paths are also looked up (the recipe file's folder); not a YAML key.
    source_dir: str | None = None
    # A multi-stage recipe's final stage: every stage (merge/multistage.py), for the lineage;
    # written to mergeline_stages.json, not a YAML key.
    stages: list[dict[str, Any]] | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v, info):
        return _dtype_name(v, info.field_name)

    # -- derived views ----------------------------------------------------------
    def inputs(self) -> list[InputModel]:
        """The models merged, in order; the base is appended when `models:` omits it (mergekit).
        For `slices:`, every model a slice names, in order, without parameters: those are per slice."""
        if self.slices:
            refs = dict.fromkeys(s.model for sl in self.slices for s in sl.sources)
            models = [InputModel(model=ref) for ref in refs]
        else:
            models = list(self.models or [])
        if self.base_model and all(m.model != self.base_model for m in models):
            models.append(InputModel(model=self.base_model))
        return models

    @property
    def tokenizer_ref(self) -> str | None:
        """Model whose tokenizer is the output's (None: the base, or the first model; or, for
        'union', a vocabulary built from all of them: merge/tokenizer_merge.py)."""
        src = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        return None if src in (None, "base", "union") else src

    @property
    def reference_model(self) -> str:
        """The model that gives the output its config and tensor layout."""
        return self.base_model or self.inputs()[0].model

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude={"source_dir", "stages"})
        if self.trim_scope == "tensor":
            data.pop("trim_scope")
        if "modules" in data:  # the union in `models` is derived, not written
            data.pop("models", None)
        return yaml.safe_dump(data, sort_keys=False)


# -- reading -------------------------------------------------------------------
def _allowed_keys(parent: tuple) -> list[str]:
    """The keys valid where an unknown key was found, for the error message."""
    classes = {"models": InputModel, "tokenizer": TokenizerSpec, "slices": OutputSlice}
    cls = classes.get(parent[0], MergeRecipe) if parent else MergeRecipe
    if parent[:1] == ("slices",) and len(parent) >= 4:  # slices[i].sources[j]
        cls = InputSlice
    return [k for k in cls.model_fields if k not in ("source_dir", "modules", "stages")]


def load_recipe(path_or_dict: str | Path | Mapping[str, Any], validate: bool = True) -> MergeRecipe:
    """Read and check a recipe from a YAML file, a YAML string's parsed dict, or a dict."""
    if isinstance(path_or_dict, Mapping):
        data, where, source_dir = dict(path_or_dict), "recipe", None
    else:
        path = Path(path_or_dict)
        where = str(path)
        try:
            data = read_yaml_mapping(path, "recipe", RecipeError)
        except RecipeError:
            if is_multistage(path):
                raise RecipeError(f"{where}: a multi-stage recipe (several documents separated by '---'): run it "
                                  "with `mergeline merge`, or merge.multistage.run_stages") from None
            raise
        source_dir = str(path.resolve().parent)
    for key in ("source_dir", "stages"):
        if key in data:
            raise RecipeError(f"{where}: unknown key {key!r}")
    if "name" in data:
        raise RecipeError(f"{where}: 'name' belongs to a multi-stage recipe (several documents separated by "
                          "'---'): run it with `mergeline merge` (merge/multistage.py)")
    for key, why in NOT_SUPPORTED.items():
        if data.get(key) is not None:
            raise RecipeError(f"{where}: {why}")
    data = _single_module(data, where)
    try:
        recipe = MergeRecipe.model_validate({**data, "source_dir": source_dir})
    except ValidationError as e:
        raise RecipeError(f"{where}: {explain(e, _allowed_keys)}") from None
    if validate:
        if not recipe.modules:
            check_recipe_semantics(recipe, where)
        elif recipe.trim_scope == "model":
            raise RecipeError(f"{where}: trim_scope 'model' takes one density per model over the whole model; "
                              "write the recipe in the `models:` form (modules merge different models)")
        for name, module in (recipe.modules or {}).items():  # each module is a merge of its own
            shared = {**(recipe.parameters or {}), **(module.parameters or {})}
            check_recipe_semantics(recipe.model_copy(update={"models": module.models, "modules": None,
                                                             "parameters": shared or None}),
                                   f"{where}: modules.{name}")
    return recipe


def read_documents(path: str | Path) -> list[dict]:
    """Every YAML document of the file, each a mapping; RecipeError naming the file otherwise."""
    path = Path(path)
    try:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: a recipe file must be UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    except (RecursionError, ValueError) as e:  # nested too deeply; an integer too long to convert
        raise RecipeError(f"{path}: not valid YAML ({type(e).__name__})") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise RecipeError(f"{path}: document {i + 1} must be a YAML mapping, not {type(d).__name__}")
    return docs


def is_multistage(path: str | Path) -> bool:
    """True for a file of several recipes (or one with a `name:`): run it with `merge.multistage.run_stages`."""
    try:
        docs = read_documents(path)
    except RecipeError:
        return False
    return len(docs) > 1 or any("name" in d for d in docs)


_MODULE_KEYS = ("models", "slices", "parameters")


def _single_module(data: dict, where: str) -> dict:
    """mergekit's `modules:` form for a model of one module (mergekit names it `default`: every
    text-only architecture), rewritten as the `models:` or `slices:` form it means. The module's
    `parameters` rank between the slice's and the recipe's, as in mergekit's ConfigReader; a key set
    in both is refused (its fall-through between the two is not kept). Several modules (a vision
    tower, a projector) need mergekit's architecture tables and are refused."""
    modules = data.get("modules")
    if modules is None:
        return data
    if not isinstance(modules, dict) or not modules:
        raise RecipeError(f"{where}: modules must map module names to their 'models' (or, for 'default', 'slices')")
    if set(modules) != {"default"}:
        return _several_modules(data, modules, where)
    module = modules["default"]
    if not isinstance(module, dict):
        raise RecipeError(f"{where}: modules.default must be a mapping with 'models' or 'slices'")
    extra = sorted(set(module) - set(_MODULE_KEYS))
    if extra:
        raise RecipeError(f"{where}: modules.default.{extra[0]}: unknown key (allowed: {', '.join(_MODULE_KEYS)})")
    if data.get("models") or data.get("slices"):
        raise RecipeError(f"{where}: give either 'modules' or 'models'/'slices', not both (as in mergekit)")
    if bool(module.get("models")) == bool(module.get("slices")):
        raise RecipeError(f"{where}: modules.default must give either 'models' or 'slices' (as in mergekit)")
    out = {k: v for k, v in data.items() if k != "modules"}
    out.update({k: module[k] for k in ("models", "slices") if module.get(k)})
    own, shared = module.get("parameters") or {}, data.get("parameters") or {}
    if not isinstance(own, dict) or not isinstance(shared, dict):
        raise RecipeError(f"{where}: 'parameters' must be a mapping")
    both = sorted(set(own) & set(shared))
    if both:
        raise RecipeError(f"{where}: parameter {both[0]!r} is set both in modules.default.parameters and in "
                          "parameters: set it in one of them")
    if own:
        out["parameters"] = {**shared, **own}
    return out


def _several_modules(data: dict, modules: dict, where: str) -> dict:
    """A multimodal `modules:` recipe (merge/modules.py): kept as `modules`, with `models` set to
    the union of the modules' models (without settings: those are per module), the plan's
    inputs. Each module is checked as a recipe of its own (load_recipe)."""
    if data.get("models") or data.get("slices"):
        raise RecipeError(f"{where}: give either 'modules' or 'models'/'slices', not both (as in mergekit)")
    union: dict[str, dict] = {}
    for name, module in modules.items():
        if not isinstance(module, dict):
            raise RecipeError(f"{where}: modules.{name} must be a mapping with 'models'")
        if module.get("slices"):
            raise RecipeError(f"{where}: modules.{name}.slices: slices inside one of several modules are not "
                              "supported; give the module a 'models' list")
        extra = sorted(set(module) - {"models", "parameters"})
        if extra:
            raise RecipeError(f"{where}: modules.{name}.{extra[0]}: unknown key (allowed: models, parameters)")
        if not module.get("models") or not isinstance(module["models"], list):
            raise RecipeError(f"{where}: modules.{name} must list its 'models'")
        for m in module["models"]:
            if isinstance(m, dict) and isinstance(m.get("model"), str) and m["model"] not in union:
                union[m["model"]] = {"model": m["model"]}  # settings stay per module (merge/plan.py)
    return {**data, "models": list(union.values())}


def model_names(recipe: MergeRecipe) -> dict[str, str]:
    """Model reference -> short display name (folder or repo basename, made unique)."""
    refs = [m.model for m in recipe.inputs()]
    if recipe.base_model and recipe.base_model not in refs:
        refs.append(recipe.base_model)
    names: dict[str, str] = {}
    taken: set[str] = set()
    for ref in refs:
        path, _, rev = ref.partition("@")
        short = Path(path.rstrip("/")).name or path
        if rev:
            short = f"{short}@{rev}"
        candidate, n = short, 2
        while candidate in taken:
            candidate, n = f"{short}-{n}", n + 1
        names[ref] = candidate
        taken.add(candidate)
    return names


if __name__ == "__main__":
    r = load_recipe(sys.argv[1])
    print(r.to_yaml())
    print(model_names(r))
