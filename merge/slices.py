"""mergekit's `slices:` recipe form, for slices that keep every layer in place.

The form most published SLERP and TIES recipes use (mergekit's README, the merge tutorials):

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

mergeline runs slices that list the same models in every slice, with the same `layer_range`
for every source of a slice, tiling the layers [0, N) in order. Output layer i is then input
layer i of every model, and slices only scope the parameters, as in mergekit's planner
(`mergekit/plan.py`): per tensor the sources are the model's own settings in the slice, then
the slice's `parameters`, then the recipe's; a gradient's t runs from 0 to 1 over the slice's
layers; the embeddings take the first slice's settings, the final norm and lm_head the last's,
all at t = 0. Slices that drop, repeat or reorder layers (passthrough "frankenmerges") change
the architecture and are refused. The typed slice entries are `merge.recipe.OutputSlice` and
`InputSlice`; this file holds what they mean.

    python -m merge.recipe configs/recipes/slerp_slices.yaml
"""
from __future__ import annotations

from merge.parameters import layer_index

# Non-layer tensors planned before the layers (mergekit's pre_weights: input embeddings); the
# others (final norm, lm_head, GPT-NeoX's embed_out) come after.
_PRE_WEIGHT_MARKS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings")


def check_aligned(slices: list, base_model: str | None) -> list[str]:
    """The model references in order, if the slices keep every layer in place; else ValueError."""
    if not slices:
        raise ValueError("'slices' must list at least one slice")
    models = [s.model for s in slices[0].sources]
    end = 0
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not sl.sources:
            raise ValueError(f"{where}: 'sources' must list at least one model")
        if sl.residual_weight is not None:
            raise ValueError(f"{where}: 'residual_weight' is not supported")
        if sl.base_model is not None and sl.base_model != base_model:
            raise ValueError(f"{where}: a per-slice 'base_model' ({sl.base_model!r}) is not supported; "
                             "set the recipe's 'base_model'")
        refs = [s.model for s in sl.sources]
        if sorted(refs) != sorted(models) or len(set(refs)) != len(refs):
            raise ValueError(f"{where}: lists models {refs}, but slices[0] lists {models}: every slice must "
                             "list the same models, once each")
        ranges = {tuple(s.layer_range) for s in sl.sources}
        if len(ranges) > 1:
            raise ValueError(f"{where}: sources take different layer ranges {sorted(ranges)}: only slices that "
                             "keep every layer in place are supported (not passthrough-style layer stacking)")
        start, stop = next(iter(ranges))
        if start != end or stop <= start:
            raise ValueError(f"{where}: layer_range [{start}, {stop}] should start at layer {end} and end after "
                             "it: slices must tile the layers in order, each layer once")
        end = stop
    return models


def layer_count(slices: list) -> int:
    """The layers the slices cover (all of the model's, once `build_plan` has checked)."""
    return slices[-1].sources[0].layer_range[1]


def locate(slices: list, name: str) -> tuple:
    """The slice whose settings apply to tensor `name`, and the tensor's t within it."""
    idx = layer_index(name)
    if idx is None:  # embeddings before the layers: the first slice; final norm, lm_head: the last
        first = any(mark in name for mark in _PRE_WEIGHT_MARKS)
        return (slices[0] if first else slices[-1]), 0.0
    for sl in slices:
        start, stop = sl.sources[0].layer_range
        if start <= idx < stop:
            return sl, ((idx - start) / (stop - start - 1) if stop - start > 1 else 1.0)
    raise ValueError(f"tensor {name!r}: layer {idx} is outside every slice")


def parameter_sources(sl, ref: str | None, recipe_parameters: dict | None) -> list[dict | None]:
    """Highest precedence first: the model's settings in this slice, the slice's, the recipe's."""
    own = next((s.parameters for s in sl.sources if s.model == ref), None) if ref is not None else None
    return [own, sl.parameters, recipe_parameters]
