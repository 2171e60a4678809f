"""mergekit's `slices:` recipe form: settings scoped by layer range, and frankenmerges.

    slices:
      - sources:
          - model: ./base
            layer_range: [0, 16]
          - model: ./ft-a
            layer_range: [0, 16]
            parameters: {density: 0.3, weight: 0.5}
        parameters: {t: [0, 1]}       # slice-wide settings; gradients run over the slice
      - sources:
          - model: ./base
            layer_range: [16, 32]
          - model: ./ft-a
            layer_range: [16, 32]

Two shapes, both planned exactly as mergekit's planner does (`mergekit/plan.py`):

- **aligned** slices list the same models in every slice, with the same `layer_range` for every
  source of a slice, tiling the layers [0, N) in order. Output layer i is input layer i of every
  model and slices only scope the parameters (the usual SLERP and TIES recipes).
- **stacked** slices (passthrough "frankenmerges", mergekit's orcamini-platy 44-layer example)
  drop, repeat, reorder or interleave layer ranges, from one model or several. Output layers are
  numbered in slice order: slice k's j-th layer reads layer `layer_range[0] + j` of each of its
  sources and is written under its new index; the config's layer count becomes the sum of the
  slice lengths. Every source of a slice spans the same number of layers, as mergekit requires;
  slices may list different numbers of models (each slice merges its own sources, as in
  mergekit), with the slice's base among them when the method takes one.

Per tensor the parameter sources are the model's own settings in the slice, then the slice's
`parameters`, then the recipe's; a gradient's t runs from 0 to 1 over the slice's layers; the
embeddings take the first slice's models and settings, the final norm and lm_head the last's,
all at t = 0. The typed slice entries are `merge.recipe.OutputSlice` and `InputSlice`.

    python -m mergeline.merge.recipe configs/recipes/frankenmerge/orcamini-platy-44layer.yaml
"""
from __future__ import annotations

from mergeline.merge.parameters import layer_index

# Non-layer tensors planned before the layers (mergekit's pre_weights: input embeddings); the
# others (final norm, lm_head, GPT-NeoX's embed_out) come after.
_PRE_WEIGHT_MARKS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings")


def is_pre_weight(name: str) -> bool:
    """A non-layer tensor planned before the layers (from the first slice's models)."""
    return any(mark in name for mark in _PRE_WEIGHT_MARKS)


def check_slices(slices: list, base_model: str | None) -> None:
    """What mergekit requires of any slices; ValueError naming the slice."""
    if not slices:
        raise ValueError("'slices' must list at least one slice")
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not sl.sources:
            raise ValueError(f"{where}: 'sources' must list at least one model")
        if sl.residual_weight is not None:
            raise ValueError(f"{where}: 'residual_weight' is not supported")
        for j, s in enumerate(sl.sources):
            start, stop = s.layer_range
            if start < 0 or stop <= start:
                raise ValueError(f"{where}.sources[{j}]: layer_range [{start}, {stop}] must be 0 <= start < end")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) > 1:
            raise ValueError(f"{where}: sources span different numbers of layers {sorted(lengths)}: every source "
                             "of a slice must contain the same number of layers (as in mergekit)")
        refs = [s.model for s in sl.sources]
        if len(set(refs)) != len(refs):
            raise ValueError(f"{where}: lists a model twice ({refs})")


def is_aligned(slices: list, base_model: str | None) -> bool:
    """True if every slice lists the same models with one shared layer_range, tiling [0, N) in
    order, under the recipe's base: output layer i is input layer i of every model."""
    models = sorted(s.model for s in slices[0].sources)
    end = 0
    for sl in slices:
        if sorted(s.model for s in sl.sources) != models:
            return False
        if sl.base_model is not None and sl.base_model != base_model:
            return False
        ranges = {tuple(s.layer_range) for s in sl.sources}
        if len(ranges) != 1:
            return False
        start, stop = next(iter(ranges))
        if start != end:
            return False
        end = stop
    return True


def moves_layers(recipe) -> bool:
    """True for a frankenmerge: output layers are not input layer i of every model, so models may
    differ in depth and per-layer comparisons between them (the compatibility gate's norms) do
    not apply."""
    return bool(recipe.slices) and not is_aligned(recipe.slices, recipe.base_model)


def layer_count(slices: list) -> int:
    """The layers of the output: the sum of the slice lengths (mergekit's num_hidden_layers)."""
    return sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)


def output_layers(slices: list):
    """(output layer index, slice index, offset in the slice, t) for every output layer, in order."""
    out = 0
    for k, sl in enumerate(slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for j in range(n):
            yield out, k, j, (j / (n - 1) if n > 1 else 1.0)
            out += 1


def locate(slices: list, name: str) -> tuple:
    """Aligned slices: the slice whose settings apply to tensor `name`, and its t within it."""
    idx = layer_index(name)
    if idx is None:  # embeddings before the layers: the first slice; final norm, lm_head: the last
        return (slices[0] if is_pre_weight(name) else slices[-1]), 0.0
    for sl in slices:
        start, stop = sl.sources[0].layer_range
        if start <= idx < stop:
            return sl, ((idx - start) / (stop - start - 1) if stop - start > 1 else 1.0)
    raise ValueError(f"tensor {name!r}: layer {idx} is outside every slice")


def parameter_sources(sl, ref: str | None, recipe_parameters: dict | None) -> list[dict | None]:
    """Highest precedence first: the model's settings in this slice, the slice's, the recipe's."""
    own = next((s.parameters for s in sl.sources if s.model == ref), None) if ref is not None else None
    return [own, sl.parameters, recipe_parameters]
