"""The merge plan: every output tensor, where to read it in each input, and its parameters.

Built from the safetensors headers alone, before any tensor is read: each input model is
resolved and opened, every output tensor is checked for presence, shape and dtype in every
input (a fine-tune with its own head on a tied base gets its head merged), and per tensor the
compute and output dtypes and the gradient position t are fixed. `tensor_params` then resolves
one tensor's method parameters exactly as mergekit does (models, slices, filters, gradients).

    python -c "from merge.plan import build_plan; from merge.recipe import load_recipe; \
print(len(build_plan(load_recipe('RECIPE.yaml')).jobs))"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from merge.checkpoint import DTYPES, Checkpoint, CheckpointError
from merge.parameters import MISSING, layer_t, num_layers, resolve
from merge.reader import TensorReader
from merge.recipe import MergeRecipe, RecipeError, model_names
from merge.recipe_checks import check_weight_sum, get_method_or_error
from merge.resolve import resolve_model
from merge.slices import layer_count, locate, parameter_sources
from merge.writer import OutTensor

# A model that ties its output head to the input embedding stores only the embedding.
TIED_HEADS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
                                 "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight")}


class MergeError(ValueError):
    """A merge that cannot run; the message names the model and tensor at fault."""


@dataclass
class Source:
    """One input model of the merge."""

    ref: str
    name: str  # display name (stats, reports)
    reader: TensorReader
    parameters: dict | None
    is_base: bool


@dataclass
class TensorJob:
    name: str
    sources: list[str]  # per input (same order as plan.inputs): the name to read there
    compute_dtype: torch.dtype
    out: OutTensor
    t: float
    floating: bool
    slice_index: int | None = None  # `slices:` recipes: the slice whose settings apply


@dataclass
class Plan:
    recipe: MergeRecipe
    method: Any
    inputs: list[Source]
    base_index: int | None  # index in inputs of the base handed to the method (requires_base)
    reference: Source
    jobs: list[TensorJob] = field(default_factory=list)

    @property
    def merged(self) -> list[Source]:
        return [s for i, s in enumerate(self.inputs) if i != self.base_index]


def torch_dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def _source_name(reader: TensorReader, name: str) -> str | None:
    if name in reader.infos:
        return name
    for alt in TIED_HEADS.get(name, ()):
        if alt in reader.infos:
            return alt
    return None


def build_plan(recipe: MergeRecipe, allow_pickle: bool = False) -> Plan:
    """Resolve models and check every tensor's presence, shape and dtype from headers alone."""
    method = get_method_or_error(recipe.merge_method)
    names = model_names(recipe)
    inputs: list[Source] = []
    for m in recipe.inputs():
        try:
            folder = resolve_model(m.model, recipe.source_dir)
            reader = TensorReader(Checkpoint(folder, allow_pickle=allow_pickle))
        except (CheckpointError, ValueError) as e:
            raise MergeError(str(e)) from e
        inputs.append(Source(m.model, names[m.model], reader, m.parameters, m.model == recipe.base_model))
    base_index = next((i for i, s in enumerate(inputs) if s.is_base), None) if method.requires_base else None
    reference = next((s for s in inputs if s.ref == recipe.reference_model), inputs[0])
    plan = Plan(recipe, method, inputs, base_index, reference)

    ref_infos = reference.reader.infos
    out_names = list(ref_infos)
    for head in TIED_HEADS:  # the reference ties its head but a fine-tune has its own: merge it
        if head not in ref_infos and any(head in s.reader.infos for s in inputs):
            out_names.append(head)
    known = set(out_names) | {alt for alts in TIED_HEADS.values() for alt in alts}
    for s in inputs:
        extra = [n for n in s.reader.infos if n not in known]
        if extra:
            raise MergeError(f"model {s.ref!r} has tensor {extra[0]!r} (and {len(extra) - 1} more) that the "
                             f"reference model {reference.ref!r} lacks: not the same architecture")
    order = {n: reference.reader.position(n) for n in ref_infos}
    out_names.sort(key=lambda n: order.get(n, ("~", 0)))  # read the reference sequentially
    n_layers = num_layers(reference.reader.ckpt.config, out_names)
    if recipe.slices and layer_count(recipe.slices) != n_layers:
        raise MergeError(f"the slices cover layers [0, {layer_count(recipe.slices)}) but {reference.ref!r} has "
                         f"{n_layers}: slices must keep every layer (dropping or stacking layers is not supported)")
    out_dtype = torch_dtype(recipe.out_dtype)
    compute = torch_dtype(recipe.dtype)
    for name in out_names:
        srcs, dtypes, shape = [], [], None
        for s in inputs:
            src = _source_name(s.reader, name)
            if src is None:
                raise MergeError(f"model {s.ref!r} has no tensor {name!r} (found in {reference.ref!r})")
            info = s.reader.infos[src]
            if shape is None:
                shape = info.shape
            elif info.shape != shape:
                raise MergeError(f"tensor {name!r}: shape {list(info.shape)} in {s.ref!r} but {list(shape)} in "
                                 f"{inputs[0].ref!r}")
            srcs.append(src)
            dtypes.append(DTYPES[info.dtype])
        floating = all(d.is_floating_point for d in dtypes)
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        cdt = (compute or promoted) if floating else promoted
        odt = (out_dtype or cdt) if floating else promoted
        t, scope = layer_t(name, n_layers), None
        if recipe.slices:
            sl, t = locate(recipe.slices, name)
            scope = recipe.slices.index(sl)
        plan.jobs.append(TensorJob(name, srcs, cdt, OutTensor(name, odt, tuple(shape)), t, floating, scope))
    return plan


# -- per-tensor parameters -------------------------------------------------------------
def _build(cls, values: dict, what: str):
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        raise RecipeError(f"{what}: parameter {key!r}: {err['msg']}") from None


def tensor_params(plan: Plan, job: TensorJob) -> tuple[list, Any]:
    """(per merged model parameter objects, global parameter object) for one tensor."""
    r, m = plan.recipe, plan.method
    scope = r.slices[job.slice_index] if job.slice_index is not None else None

    def sources(s: Source | None) -> list:  # highest precedence first, as mergekit searches them
        if scope is not None:
            return parameter_sources(scope, s.ref if s else None, r.parameters)
        return [s.parameters, r.parameters] if s else [r.parameters]

    global_keys = [f.alias or n for n, f in m.global_params.model_fields.items()]
    gvals = {k: v for k in global_keys if (v := resolve(k, sources(None), job.name, job.t)) is not MISSING}
    model_keys = [f.alias or n for n, f in m.model_params.model_fields.items()]
    per_model, merged_sources = [], []
    for i, s in enumerate(plan.inputs):
        if i == plan.base_index:
            continue
        src = job.sources[i]
        vals = {k: v for k in model_keys if (v := resolve(k, sources(s), src, job.t)) is not MISSING}
        per_model.append(_build(m.model_params, vals, f"model {s.ref!r}, tensor {job.name!r}"))
        merged_sources.append(sources(s))
    check_weight_sum(r, m, merged_sources, job.name, job.t)
    return per_model, _build(m.global_params, gvals, f"tensor {job.name!r}")


def model_thresholds(plan: Plan, dev: torch.device) -> list[float] | None:
    """The paper's whole-model trimming (`trim_scope: model`): a streaming pass builds a histogram
    of each model's |delta| over ALL tensors and returns the k-th largest magnitude per model
    (k = density * model size), which the method then applies to every tensor. fp32 deltas take
    a second pass that refines the k-th value's bin to the exact value."""
    if plan.recipe.trim_scope != "model":
        return None
    from merge.methods.select import MagnitudeHistogram

    base_i = plan.base_index
    hists = [MagnitudeHistogram() for _ in plan.merged]
    densities = []
    for s in plan.merged:
        d = resolve("density", [s.parameters, plan.recipe.parameters], "", 0.0)
        densities.append(1.0 if d is MISSING else float(d))

    def stream(into: list) -> None:
        for job in plan.jobs:
            if not job.floating:
                continue
            ts = [s.reader.read(src).to(dev, job.compute_dtype) for s, src in zip(plan.inputs, job.sources)]
            # add_pair computes the delta in fp32 chunks on one worker per core: much faster than
            # a bf16 subtraction on this thread.
            others = [t for i, t in enumerate(ts) if i != base_i]
            for h, t in zip(into, others):
                if h is not None:
                    h.add_pair(ts[base_i], t)
            del ts, others

    stream(hists)
    second = [h if h.needs_second_pass else None for h in hists]
    if any(second):
        for h, d in zip(second, densities):
            if h is not None:
                h.begin_second_pass(d)
        stream(second)
    return [h.threshold(d) for h, d in zip(hists, densities)]
