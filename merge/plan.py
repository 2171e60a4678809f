"""The merge plan: every output tensor, where to read it in each input, and its parameters.

Built from the safetensors headers alone, before any tensor is read: each input model is
resolved and opened, every output tensor is checked for presence, shape and dtype in every
input (a fine-tune with its own head on a tied base gets its head merged), and per tensor the
compute and output dtypes and the gradient position t are fixed. `tensor_params` then resolves
one tensor's method parameters exactly as mergekit does (models, slices, filters, gradients).

Slices that move layers (frankenmerges, merge/slices.py) are planned over input *slots*: slot j
of an output tensor is the j-th source of its slice, read under that model's own layer index
through a `merge.tensor_views.ViewReader`, so the executor's loop runs them unchanged. A recipe
that sets a tokenizer gets its embedding and head rows rebuilt in the output vocabulary as they
are read (merge/tokenizer_merge.py).

    python -c "from mergeline.merge.plan import build_plan; from mergeline.merge.recipe import load_recipe; \
print(len(build_plan(load_recipe('RECIPE.yaml')).jobs))"
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import ValidationError

from mergeline.merge.checkpoint import DTYPES, TensorInfo
from mergeline.merge.frankenmerge import build_stacked
from mergeline.merge.modules import PREFIXES, module_layers, module_of, module_prefixes
from mergeline.merge.parameters import MISSING, layer_t, num_layers, resolve
from mergeline.merge.plan_types import (TIED_HEADS, MergeError, Plan, Source, TensorJob, open_reader, source_name,
                                        tensor_job)
from mergeline.merge.recipe import MergeRecipe, RecipeError, model_names
from mergeline.merge.recipe_checks import check_weight_sum, get_method_or_error
from mergeline.merge.slices import is_aligned, layer_count, locate, parameter_sources
from mergeline.merge.tensor_views import View, ViewReader, identity_views
from mergeline.merge.tokenizer_merge import VOCAB_TENSORS, RowRemapper, check_token_sources, recipe_tokenizer, tokenizer_for
from mergeline.merge.writer import OutTensor

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
log = logging.getLogger(__name__)



def build_plan(recipe: MergeRecipe, allow_pickle: bool = False) -> Plan:
    """Resolve models and check every tensor's presence, shape and dtype from headers alone."""
    method = get_method_or_error(recipe.merge_method)
    if recipe.slices and not is_aligned(recipe.slices, recipe.base_model):
        plan = build_stacked(recipe, method, allow_pickle)
    else:
        plan = _build_aligned(recipe, method, allow_pickle)
    _rebuild_vocabulary(plan)
    return plan


def _build_aligned(recipe: MergeRecipe, method, allow_pickle: bool) -> Plan:
    """`models:` recipes and slices that keep every layer in place: output tensor = input tensor."""
    names = model_names(recipe)
    inputs: list[Source] = []
    for m in recipe.inputs():
        reader = open_reader(m.model, recipe, allow_pickle)
        inputs.append(Source(m.model, names[m.model], reader, m.parameters, m.model == recipe.base_model))
    base_index = next((i for i, s in enumerate(inputs) if s.is_base), None) if method.requires_base else None
    reference = next((s for s in inputs if s.ref == recipe.reference_model), inputs[0])
    plan = Plan(recipe, method, inputs, base_index, reference, out_config=reference.reader.ckpt.config,
                models={s.ref: s.reader for s in inputs})

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
                         f"{n_layers}: slices that keep layers in place must cover them all")
    vocab = recipe_tokenizer(recipe) is not None
    prefixes, members, module_n = _modules(recipe, reference, out_names)
    prefixes_auto = None  # a multimodal model merged whole: gradients still run per module, as in mergekit
    if prefixes is None and (arch := (reference.reader.ckpt.config.get("architectures") or [None])[0]) in PREFIXES:
        prefixes_auto = PREFIXES[arch]
        module_n = module_layers(out_names, prefixes_auto)
    for name in out_names:
        module = None
        if prefixes is not None:
            module = module_of(name, prefixes)
            if module is None:
                raise MergeError(f"tensor {name!r} of {reference.ref!r} belongs to none of the modules "
                                 f"({', '.join(f'{m}: {p}*' for m, p in prefixes.items())})")
        found, placed = [], []
        for s in inputs:
            if module is not None and s.ref not in members[module]:  # not merged into this module
                placed.append(None)
                continue
            src = source_name(s.reader, name)
            if src is None:
                raise MergeError(f"model {s.ref!r} has no tensor {name!r} (found in {reference.ref!r})")
            found.append((s.ref, s.reader, src))
            placed.append(src)
        t, scope = layer_t(name, n_layers), None
        if recipe.slices:
            sl, t = locate(recipe.slices, name)
            scope = recipe.slices.index(sl)
        own_module = module if module is not None else (module_of(name, prefixes_auto) if prefixes_auto else None)
        if own_module is not None and not recipe.slices:
            t = layer_t(name, module_n[own_module])  # a gradient runs over the module's own layers (mergekit)
        job = tensor_job(recipe, name, found, t, scope, vocab and name in VOCAB_TENSORS)
        if module is not None:
            job.sources, job.module = placed, module
        plan.jobs.append(job)
    return plan


def _modules(recipe: MergeRecipe, reference: Source, names: list[str]):
    """Multimodal `modules:` (merge/modules.py): module -> weight prefix, module -> the models it
    merges (the base in every one, as mergekit adds it), module -> its layer count."""
    if not recipe.modules:
        return None, None, None
    try:
        prefixes = module_prefixes(reference.reader.ckpt.config, list(recipe.modules), reference.ref)
    except ValueError as e:
        raise MergeError(str(e)) from None
    members = {m: {x.model for x in spec.models} | ({recipe.base_model} if recipe.base_model else set())
               for m, spec in recipe.modules.items()}
    return prefixes, members, module_layers(names, prefixes)


def _rebuild_vocabulary(plan: Plan) -> None:
    """A recipe with a tokenizer: build the output tokenizer and have every input's embedding and
    head rows rebuilt in its vocabulary as they are read (merge/tokenizer_merge.py)."""
    spec = recipe_tokenizer(plan.recipe)
    if spec is None:
        return
    r = plan.recipe
    refs = [ref for ref in _referenced(r) if ref in plan.models]
    try:
        info = tokenizer_for(r, {ref: plan.models[ref].ckpt.folder for ref in refs},
                             {ref: plan.models[ref].ckpt.config for ref in refs})
    except Exception as e:  # transformers raises many kinds for a folder it cannot read
        if spec[0] == "union" or spec[1] or spec[2]:
            raise MergeError(f"tokenizer {spec[0]!r}: transformers cannot load a model's tokenizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        # `base` or a model, nothing added: copy that tokenizer's files and merge the rows by id
        # (mergeline's behaviour before tokenizer merges), which needs equal vocabularies.
        log.warning("tokenizer %r: transformers cannot load the tokenizers (%s); its files are copied and "
                    "the embedding rows merged by id", spec[0], type(e).__name__)
        _same_vocab_rows(plan)
        return
    try:
        check_token_sources(info, spec[1], refs)
    except ValueError as e:
        raise MergeError(f"tokenizer: {e}") from e
    plan.tokenizer = info
    plan.out_config = {**plan.out_config, "vocab_size": info.vocab_size}
    for job in plan.jobs:
        if job.name not in VOCAB_TENSORS:
            continue
        job.input_names = job.input_names or list(job.sources)  # parameter filters see the real names
        refs = job.refs or [s.ref for s in plan.inputs]
        base = r.slices[job.slice_index].base_model if job.slice_index is not None else None
        present = [i for i, src in enumerate(job.sources) if src is not None]  # a frankenmerge may leave slots empty
        remap = RowRemapper(info, [(plan.inputs[i].reader, job.sources[i], refs[i]) for i in present],
                            base or r.base_model, spec[1])
        shape = (info.vocab_size, *job.out.shape[1:])
        dtypes = [DTYPES[plan.inputs[i].reader.infos[job.sources[i]].dtype] for i in present]
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        key = f"vocab:{job.name}"
        for k, i in enumerate(present):
            s = plan.inputs[i]
            if not isinstance(s.reader, ViewReader):
                s.reader = ViewReader(s.reader.ckpt, identity_views(s.reader))
            under = s.reader.views[job.sources[i]]  # where the rows really lie (for position and close)
            view = View(under.reader, under.name, TensorInfo(_DTYPE_NAMES[promoted], shape, under.info.file),
                        load=lambda k=k, remap=remap: remap.load(k))
            s.reader.views[key] = view
            s.reader.infos[key] = view.info
            job.sources[i] = key
        job.out = OutTensor(job.name, job.out.dtype, shape)


def _same_vocab_rows(plan: Plan) -> None:
    """Without a rebuilt vocabulary, every input's token rows must line up: equal shapes."""
    for job in plan.jobs:
        if job.name in VOCAB_TENSORS:
            shapes = {tuple(s.reader.infos[src].shape) for s, src in zip(plan.inputs, job.sources) if src is not None}
            if len(shapes) > 1:
                raise MergeError(f"tensor {job.name!r}: shapes {sorted(map(list, shapes))} differ and the tokenizers "
                                 "cannot be loaded to merge the rows token by token")


def _referenced(recipe: MergeRecipe) -> list[str]:
    from mergeline.merge.tokenizer_merge import referenced_models

    return referenced_models(recipe)


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

    module = r.modules[job.module] if job.module is not None else None

    def sources(s: Source | None, ref: str | None = None) -> list:  # highest precedence first, as mergekit
        if scope is not None:
            return parameter_sources(scope, ref if s else None, r.parameters)
        if module is not None:  # the model's settings in its module, the module's, the recipe's
            own = next((m.parameters for m in module.models if m.model == ref), None) if s else None
            return ([own] if s else []) + [module.parameters, r.parameters]
        return [s.parameters, r.parameters] if s else [r.parameters]

    global_keys = [f.alias or n for n, f in m.global_params.model_fields.items()]
    gvals = {k: v for k in global_keys if (v := resolve(k, sources(None), job.name, job.t)) is not MISSING}
    model_keys = [f.alias or n for n, f in m.model_params.model_fields.items()]
    per_model, merged_sources = [], []
    for i, s in enumerate(plan.inputs):
        if i == plan.base_index or job.sources[i] is None:  # None: a frankenmerge slot this slice leaves empty
            continue
        src = job.input_names[i] if job.input_names else job.sources[i]
        ref = job.refs[i] if job.refs else s.ref
        vals = {k: v for k in model_keys if (v := resolve(k, sources(s, ref), src, job.t)) is not MISSING}
        per_model.append(_build(m.model_params, vals, f"model {ref!r}, tensor {job.name!r}"))
        merged_sources.append(sources(s, ref))
    check_weight_sum(r, m, merged_sources, job.name, job.t)
    gparams = _build(m.global_params, gvals, f"tensor {job.name!r}")
    if hasattr(gparams, "for_tensor"):  # parameters read per tensor group (TIES' sign_choices)
        try:
            gparams = gparams.for_tensor(job.name, plan.merged_names(job))
        except ValueError as e:
            raise RecipeError(str(e)) from None
    return per_model, gparams


def model_thresholds(plan: Plan, dev: torch.device) -> list[float] | None:
    """The paper's whole-model trimming (`trim_scope: model`): a streaming pass builds a histogram
    of each model's |delta| over ALL tensors and returns the k-th largest magnitude per model
    (k = density * model size), which the method then applies to every tensor. fp32 deltas take
    a second pass that refines the k-th value's bin to the exact value."""
    if plan.recipe.trim_scope != "model":
        return None
    from mergeline.merge.methods.select import MagnitudeHistogram

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
