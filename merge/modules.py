"""mergekit's `modules:` form for a multimodal model: each module (a text decoder, a vision tower,
a projector) merged from its own models with its own parameters.

    merge_method: linear
    modules:
      text_decoder:
        models:
          - {model: ./vlm-a, parameters: {weight: 0.6}}
          - {model: ./vlm-b, parameters: {weight: 0.4}}
      vision_tower:
        models: [{model: ./vlm-a, parameters: {weight: 1.0}}]   # keep vlm-a's tower
      multi_modal_projector:
        parameters: {weight: 0.5}
        models: [{model: ./vlm-a}, {model: ./vlm-b}]

A module owns the tensors under its weight prefix, the prefixes of mergekit's architecture
tables (`mergekit/_data/architectures/*.json`) for the architectures listed in `PREFIXES`. As in
mergekit, a model's parameters rank above the module's, which rank above the recipe's; the base
model takes part in every module; a gradient runs over the module's own layers. Where mergekit
would silently write a model without a module the recipe leaves out (its tensors are never
planned), mergeline refuses, naming the module. Each module is one `models:` list (slices
inside one of several modules are refused).

    python -m mergeline.merge.recipe RECIPE.yaml
"""
from __future__ import annotations

from mergeline.merge.parameters import layer_index

# architecture (config.json "architectures") -> module -> weight prefix, from mergekit 0.1.5's
# tables (mistral3.json, gemma3vl.json, llama4.json); LLaVA's legacy checkpoint layout has the
# same three prefixes as Mistral 3.
_VLM = {"text_decoder": "language_model.", "vision_tower": "vision_tower.",
        "multi_modal_projector": "multi_modal_projector."}
PREFIXES: dict[str, dict[str, str]] = {
    "Mistral3ForConditionalGeneration": _VLM,
    "LlavaForConditionalGeneration": _VLM,
    "Gemma3ForConditionalGeneration": {**_VLM, "vision_tower": "vision_tower.vision_model."},
    "Llama4ForConditionalGeneration": {"text_decoder": "language_model.", "vision_model": "vision_model.",
                                       "multi_modal_projector": "multi_modal_projector."},
}


def module_prefixes(config: dict, modules: list[str], model: str) -> dict[str, str]:
    """Module -> weight prefix for the reference model's architecture; ValueError naming what
    does not fit (an unknown architecture, a module it does not have, one the recipe omits)."""
    arch = (config.get("architectures") or ["?"])[0]
    table = PREFIXES.get(arch)
    if table is None:
        raise ValueError(f"modules {sorted(modules)}: architecture {arch!r} of {model!r} has no module table "
                         f"(known: {', '.join(sorted(PREFIXES))}); merge it whole with 'models:' or 'slices:'")
    unknown = [m for m in modules if m not in table]
    if unknown:
        raise ValueError(f"modules.{unknown[0]}: {arch} has no module {unknown[0]!r} (its modules: "
                         f"{', '.join(table)})")
    missing = [m for m in table if m not in modules]
    if missing:
        raise ValueError(f"modules: {missing[0]!r} is not listed: mergekit would write the model without its "
                         f"{missing[0]} tensors; list every module of {arch} ({', '.join(table)})")
    return {m: table[m] for m in modules}


def module_of(name: str, prefixes: dict[str, str]) -> str | None:
    """The module owning tensor `name` (the longest matching prefix), or None."""
    hits = [m for m, p in prefixes.items() if name.startswith(p)]
    return max(hits, key=lambda m: len(prefixes[m])) if hits else None


def module_layers(names, prefixes: dict[str, str]) -> dict[str, int]:
    """Per module, its number of layers (one more than the largest layer index under it)."""
    out = dict.fromkeys(prefixes, 0)
    for n in names:
        m, i = module_of(n, prefixes), layer_index(n)
        if m is not None and i is not None:
            out[m] = max(out[m], i + 1)
    return out
