"""The plan of a frankenmerge: slices that drop, repeat, reorder or interleave layers
(merge/slices.py), planned as mergekit's planner plans them (`mergekit/plan.py`).

The executor hands a method one tensor per input. Here an input is a *slot*: slot j of an
output tensor is the j-th source of its slice (the slice's base last, for methods that take
one), read under that model's own layer index through a `merge.tensor_views.ViewReader`, so
output layer 7 may read layer 3 of one model and layer 20 of another while the streaming loop
runs unchanged. The output config's layer count is the sum of the slice lengths.

    python -c "from mergeline.merge.plan import build_plan; from mergeline.merge.recipe import load_recipe; \
print([j.name for j in build_plan(load_recipe('configs/recipes/frankenmerge/orcamini-platy-44layer.yaml')).jobs][:8])"
"""
from __future__ import annotations

from mergeline.merge.parameters import layer_index, num_layers, rename_layer, set_num_layers
from mergeline.merge.plan_types import TIED_HEADS, MergeError, Plan, Source, TensorJob, open_reader, source_name, tensor_job
from mergeline.merge.recipe import MergeRecipe, model_names
from mergeline.merge.slices import is_pre_weight, output_layers
from mergeline.merge.tensor_views import View, ViewReader
from mergeline.merge.tokenizer_merge import VOCAB_TENSORS, recipe_tokenizer


def build_stacked(recipe: MergeRecipe, method, allow_pickle: bool) -> Plan:
    """Slices that drop, repeat, reorder or interleave layers (merge/slices.py), as mergekit plans
    them: the embeddings from the first slice's models, each slice's layers renumbered in order,
    the final norm and head from the last slice's models."""
    slices = recipe.slices
    names = model_names(recipe)
    refs = list(dict.fromkeys([s.model for sl in slices for s in sl.sources]))
    readers = {ref: open_reader(ref, recipe, allow_pickle) for ref in refs}
    slots = []  # per slice, its sources in slot order (the base last, for methods that take one)
    for k, sl in enumerate(slices):
        srcs = list(sl.sources)
        if method.requires_base:
            base = sl.base_model or recipe.base_model
            b = next((s for s in srcs if s.model == base), None)
            if b is None:
                raise MergeError(f"slices[{k}]: the base model {base!r} is not among the slice's sources; a slice "
                                 f"that moves layers must list the base with its layer_range for {method.name!r}")
            srcs = [s for s in srcs if s is not b] + [b]
        slots.append(srcs)
    n_slots = len(slots[0])
    reference_ref = recipe.base_model if recipe.base_model in readers else slices[0].sources[0].model
    ref_reader = readers[reference_ref]

    per_layer: dict[str, dict[int, list[str]]] = {}  # model -> input layer -> its tensor names
    for ref, reader in readers.items():
        d = per_layer.setdefault(ref, {})
        for n in reader.infos:
            if (i := layer_index(n)) is not None:
                d.setdefault(i, []).append(n)
    n_in = {ref: num_layers(r.ckpt.config, r.infos) for ref, r in readers.items()}
    for k, srcs in enumerate(slots):
        for s in srcs:
            if s.layer_range[1] > n_in[s.model]:
                raise MergeError(f"slices[{k}]: layer_range {list(s.layer_range)} of {s.model!r}, which has "
                                 f"{n_in[s.model]} layers")

    views: list[dict[str, View]] = [{} for _ in range(n_slots)]
    jobs: list[TensorJob] = []
    rebuilt_rows = recipe_tokenizer(recipe) is not None  # token rows may differ in number (tokenizer_merge.py)

    def add(out_name: str, k: int, picks: list[tuple[str, str]], t: float) -> None:
        """picks: per slot, (model ref, its tensor name)."""
        found = []
        for (ref, src), v in zip(picks, views):
            if src is None:
                raise MergeError(f"model {ref!r} has no tensor {out_name!r} (slices[{k}])")
            v[out_name] = View(readers[ref], src, readers[ref].infos[src])
            found.append((ref, readers[ref], src))
        job = tensor_job(recipe, out_name, found, t, k, rebuilt_rows and out_name in VOCAB_TENSORS)
        job.sources = [out_name] * n_slots  # each slot's ViewReader knows where to read it
        job.refs, job.input_names = [ref for ref, _ in picks], [src for _, src in picks]
        jobs.append(job)

    outside = [n for n in ref_reader.infos if layer_index(n) is None]
    for head in TIED_HEADS:
        if head not in ref_reader.infos and any(head in r.infos for r in readers.values()):
            outside.append(head)
    pre = [n for n in outside if is_pre_weight(n)]
    post = [n for n in outside if not is_pre_weight(n)]
    for name in pre:
        add(name, 0, [(s.model, source_name(readers[s.model], name)) for s in slots[0]], 0.0)
    layers_from = []
    for out, k, j, t in output_layers(slices):
        first = slots[k][0]
        lead = per_layer[first.model].get(first.layer_range[0] + j, [])
        layers_from.append(first.layer_range[0] + j)
        for n0 in lead:
            picks = []
            for s in slots[k]:
                src = rename_layer(n0, s.layer_range[0] + j)
                picks.append((s.model, src if src in readers[s.model].infos else None))
            add(rename_layer(n0, out), k, picks, t)
        for s in slots[k][1:]:  # a tensor the lead model's layer lacks: not the same architecture
            mine = {rename_layer(n, 0) for n in per_layer[s.model].get(s.layer_range[0] + j, [])}
            extra = mine - {rename_layer(n, 0) for n in lead}
            if extra:
                raise MergeError(f"slices[{k}]: model {s.model!r} layer {s.layer_range[0] + j} has tensor "
                                 f"{sorted(extra)[0]!r} that {first.model!r} lacks: not the same architecture")
    for name in post:
        add(name, len(slices) - 1, [(s.model, source_name(readers[s.model], name)) for s in slots[-1]], 0.0)

    inputs = []
    for i in range(n_slots):
        used = list(dict.fromkeys(sl[i].model for sl in slots))
        ckpt = readers[reference_ref if reference_ref in used else used[0]].ckpt
        label = "|".join(names[r] for r in used)
        is_base = method.requires_base and i == n_slots - 1
        inputs.append(Source(used[0] if len(used) == 1 else label, label, ViewReader(ckpt, views[i]), None, is_base))
    base_index = n_slots - 1 if method.requires_base else None
    reference = next((s for s in inputs if s.reader.ckpt is ref_reader.ckpt), inputs[0])
    try:
        out_config = set_num_layers(ref_reader.ckpt.config, layers_from)
    except ValueError as e:
        raise MergeError(f"model {reference_ref!r}: {e}") from None
    return Plan(recipe, method, inputs, base_index, reference, jobs, out_config=out_config, models=readers,
                stacked=True)
