"""Resolve a recipe's parameter settings to one plain value per tensor, exactly as mergekit does.

A setting (mergekit's `ParameterSetting`) is one of
- a scalar: `weight: 0.5`;
- a gradient: `t: [0, 0.5, 1]`, interpolated linearly over the decoder layer index. A layer
  tensor at index i of n layers gets t = i / (n - 1) (t = 1 when n == 1); every tensor outside
  the decoder layers (embeddings, final norm, lm_head) gets t = 0, i.e. the FIRST value, because
  mergekit plans them with t = 0 (`mergekit/plan.py`, `plan_module`);
- a list of `{filter, value}`: the first entry whose `filter` is a substring of the tensor name
  (or is missing / "*") wins; its value may itself be a scalar or a gradient;
- a table (a mapping with neither `filter` nor `value`, e.g. TIES' `sign_choices`): one value,
  the whole table, for every tensor (the method reads it per tensor).
Sources are searched from the highest precedence (the model's own `parameters`) to the lowest
(the global `parameters`); a source whose filters all miss falls through to the next one, and
then to the method's default (mergekit's `resolve_parameter`).

    python -c "from mergeline.merge.parameters import evaluate_setting as e; print(e('model.layers.3.mlp', [0, 1], 0.5))"
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

# Decoder-layer index in the common Hugging Face layouts: model.layers.N (Llama, Mistral, Qwen),
# transformer.h.N (GPT-2), gpt_neox.layers.N, model.decoder.layers.N, blocks.N.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# config.json keys that hold the number of decoder layers, in the order mergekit's
# architecture files use them.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

MISSING = object()


def layer_index(name: str) -> int | None:
    """Decoder layer index of a tensor name, or None for embeddings, final norm, lm_head..."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_key(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> '3'; embeddings -> 'embed'; lm_head -> 'head'; else
    'other'. The merge statistics' layer and TIES' sign groups both read tensors this way."""
    idx = layer_index(name)
    if idx is not None:
        return str(idx)
    low = name.lower()
    if "lm_head" in low or "embed_out" in low:
        return "head"
    if "embed" in low or low.endswith(("wte.weight", "wpe.weight")):
        return "embed"
    return "other"


def rename_layer(name: str, index: int) -> str:
    """`name` with its decoder-layer index replaced by `index` (a frankenmerge's output layer)."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"tensor {name!r} has no layer index")
    return name[:m.start(1)] + str(index) + name[m.end(1):]


def set_num_layers(config: Mapping[str, Any], layers_from: list[int]) -> dict:
    """A copy of config.json for a frankenmerge whose output layer i is input layer
    `layers_from[i]`: its layer-count key (the first of LAYER_COUNT_KEYS it has; in `text_config`
    for multimodal configs) set as mergekit sets it, and a per-layer `layer_types` list (sliding or
    full attention) reordered with the layers."""
    cfg = dict(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            cfg[key] = len(layers_from)
            kinds = cfg.get("layer_types")
            if isinstance(kinds, list) and kinds:
                cfg["layer_types"] = [kinds[i] for i in layers_from]
            return cfg
    if isinstance(cfg.get("text_config"), Mapping):
        cfg["text_config"] = set_num_layers(cfg["text_config"], layers_from)
        return cfg
    raise ValueError(f"config.json has none of {', '.join(LAYER_COUNT_KEYS)}: cannot set the layer count")


def num_layers(config: Mapping[str, Any], names: Iterable[str] = ()) -> int:
    """Number of decoder layers: from config.json, else one more than the largest index seen."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, Mapping):
        return num_layers(text_config, names)
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_t(name: str, n_layers: int) -> float:
    """Position of a tensor along the gradient axis, in [0, 1] (mergekit's `t`)."""
    idx = layer_index(name)
    if idx is None:
        return 0.0  # embeddings, norm, lm_head: mergekit plans them with t = 0
    if n_layers > 1:
        return idx / (n_layers - 1)
    return 1.0


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def evaluate_setting(name: str, setting: Any, t: float = 0.0) -> Any:
    """One setting -> a plain value for tensor `name` at gradient position `t` (None: no match).

    Mirrors `mergekit.config.evaluate_setting`: numeric gradients interpolate between the two
    neighbouring entries; a gradient of booleans or strings picks entry int(t * (len - 1)).
    """
    if is_table(setting):
        return dict(setting)
    if isinstance(setting, Mapping):  # a single {filter, value}
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(e) for e in setting):
            if not all(_is_number(e) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (name and flt in name):
                return evaluate_setting(name, cond["value"], t)
        return None
    raise ValueError(f"unexpected parameter setting {setting!r}")


def is_table(setting: Any) -> bool:
    """A mapping that is not a `{filter, value}` entry: a value in its own right."""
    return isinstance(setting, Mapping) and not {"filter", "value"} & set(setting)


def resolve(key: str, sources: Iterable[Mapping[str, Any] | None], name: str, t: float) -> Any:
    """First non-None value of `key` over `sources` (highest precedence first), else MISSING."""
    for scope in sources:
        if scope is not None and key in scope:
            value = evaluate_setting(name, scope[key], t)
            if value is not None:
                return value
    return MISSING


def candidate_values(setting: Any) -> list[Any]:
    """Every value a setting can produce (gradient endpoints, each filter's value), for validation.

    Checking the endpoints is enough for interval constraints: interpolation stays between them.
    """
    if is_table(setting):
        return [dict(setting)]
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return [setting]
    if isinstance(setting, list):
        if all(_is_scalar(e) for e in setting):
            return list(setting)
        out: list[Any] = []
        for cond in setting:
            out.extend(candidate_values(cond.get("value") if isinstance(cond, Mapping) else cond))
        return out
    return [setting]
