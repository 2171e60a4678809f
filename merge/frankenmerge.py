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

import logging

from mergeline.merge.parameters import layer_index, num_layers, rename_layer, set_num_layers
from mergeline.merge.plan_types import TIED_HEADS, MergeError, Plan, Source, TensorJob, open_reader, source_name, tensor_job
from mergeline.merge.recipe import MergeRecipe, model_names
from mergeline.merge.slices import is_pre_weight, output_layers
from mergeline.merge.tensor_views import View, ViewReader
from mergeline.merge.tokenizer_merge import VOCAB_TENSORS, recipe_tokenizer

log = logging.getLogger(__name__)


def build_stacked(recipe: MergeRecipe, method, allow_pickle: bool) -> Plan:
    """Slices that drop, repeat, reorder or interleave layers (merge/slices.py), as mergekit plans
    them: the embeddings from the first slice's models, each slice's layers renumbered in order,
    the final norm and head from the last slice's models."""
    slices = recipe.slices
    names = model_names(recipe)
    refs = list(dict.fromkeys([s.model for sl in slices for s in sl.sources]))
    readers = {ref: open_reader(ref, recipe, allow_pickle) for ref in refs}
    slots = [_ordered(sl.sources, sl.base_model or recipe.base_model, method, k) for k, sl in enumerate(slices)]
    # Slices may list different numbers of models (mergekit merges each slice's own sources): the
    # plan has as many slots as the largest slice, and a job of a smaller slice leaves the rest
    # empty (None). The base, for methods that take one, is always the last slot.
    n_slots = max(len(s) for s in slots)
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
    used: list[list[str]] = [[] for _ in range(n_slots)]  # per slot, the models it reads, in order
    rebuilt_rows = recipe_tokenizer(recipe) is not None  # token rows may differ in number (tokenizer_merge.py)

    def place(items: list) -> list:
        """A slice's items (in slot order, base last) spread over the plan's slots: None where empty."""
        if len(items) == n_slots:
            return list(items)
        if method.requires_base:
            return list(items[:-1]) + [None] * (n_slots - len(items)) + [items[-1]]
        return list(items) + [None] * (n_slots - len(items))

    def add(out_name: str, k: int, picks: list[tuple[str, str | None]], t: float) -> None:
        """picks: per source of the slice (slot order), (model ref, its tensor name)."""
        found = []
        for ref, src in picks:
            if src is None:
                raise MergeError(f"model {ref!r} has no tensor {out_name!r} (slices[{k}])")
            found.append((ref, readers[ref], src))
        job = tensor_job(recipe, out_name, found, t, k, rebuilt_rows and out_name in VOCAB_TENSORS)
        placed = place(picks)
        for slot, (pick, v) in enumerate(zip(placed, views)):
            if pick is not None:
                ref, src = pick
                v[out_name] = View(readers[ref], src, readers[ref].infos[src])
                if ref not in used[slot]:
                    used[slot].append(ref)
        job.sources = [out_name if p is not None else None for p in placed]  # each slot's ViewReader knows where
        job.refs = [p[0] if p is not None else None for p in placed]
        job.input_names = [p[1] if p is not None else None for p in placed]
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
    last = _post_sources(slices, recipe, method)
    for name in post:
        add(name, len(slices) - 1, [(s.model, source_name(readers[s.model], name)) for s in last], 0.0)

    inputs = []
    for i in range(n_slots):
        ckpt = readers[reference_ref if reference_ref in used[i] else used[i][0]].ckpt
        label = "|".join(names[r] for r in used[i])
        is_base = method.requires_base and i == n_slots - 1
        inputs.append(Source(used[i][0] if len(used[i]) == 1 else label, label, ViewReader(ckpt, views[i]), None,
                             is_base))
    base_index = n_slots - 1 if method.requires_base else None
    reference = next((s for s in inputs if s.reader.ckpt is ref_reader.ckpt), inputs[0])
    try:
        out_config = set_num_layers(ref_reader.ckpt.config, layers_from)
    except ValueError as e:
        raise MergeError(f"model {reference_ref!r}: {e}") from None
    return Plan(recipe, method, inputs, base_index, reference, jobs, out_config=out_config, models=readers,
                stacked=True)


def _ordered(sources: list, base: str | None, method, k: int) -> list:
    """A slice's sources in slot order: as listed, the base moved last for methods that take one."""
    srcs = list(sources)
    if not method.requires_base:
        return srcs
    b = next((s for s in srcs if s.model == base), None)
    if b is None:
        raise MergeError(f"slices[{k}]: the base model {base!r} is not among the slice's sources; a slice "
                         f"that moves layers must list the base with its layer_range for {method.name!r}")
    return [s for s in srcs if s is not b] + [b]


def _post_sources(slices: list, recipe: MergeRecipe, method) -> list:
    """The models the final norm and head are merged from: the last slice's sources, as mergekit
    plans them. mergekit pairs the last slice's models with as many tensors as the FIRST slice
    has sources (`plan_module`), so a last slice with more models than the first merges only its
    first ones into these tensors; mergeline does the same (parity) and says so."""
    last, keep = list(slices[-1].sources), len(slices[0].sources)
    if len(last) > keep:
        log.warning("slices[%d] lists %d models but slices[0] lists %d: as in mergekit, the final norm and head "
                    "merge only the first %d of the last slice (%s)", len(slices) - 1, len(last), keep, keep,
                    ", ".join(s.model for s in last[:keep]))
        last = last[:keep]
    try:
        return _ordered(last, slices[-1].base_model or recipe.base_model, method, len(slices) - 1)
    except MergeError:
        raise MergeError(f"slices[{len(slices) - 1}] lists more models than slices[0]; mergekit then merges the "
                         f"final norm and head from the first {keep} of them only, which leaves out the base: "
                         "list the base first in the last slice, or give the slices the same number of models") from None
