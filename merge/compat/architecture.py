"""Architecture check: config.json compared field by field across the base and the models.

Model families spell the same quantity differently (GPT-2's `n_embd` is Llama's
`hidden_size`), so fields are first mapped to canonical names. A difference in a field that
changes tensor shapes or what the network computes fails; any other difference warns;
write-time metadata (transformers version, dtype, ...) is ignored. Every difference is
listed with each model's value.

    python -c "from mergeline.merge.compat.architecture import canonical_config as c; import json,sys; print(c(json.load(open(sys.argv[1]))))" MODEL/config.json
"""
from __future__ import annotations

from typing import Any

from mergeline.merge.parameters import LAYER_COUNT_KEYS

from .report import Check

# canonical name -> spellings seen in config.json across families (first present wins)
ALIASES: dict[str, tuple[str, ...]] = {
    "architectures": ("architectures",),
    "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_hidden_layers": LAYER_COUNT_KEYS,  # the spellings the merge's gradients read too
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"),
    "rope_theta": ("rope_theta",),
    "rope_scaling": ("rope_scaling",),
    "rope_parameters": ("rope_parameters",),  # transformers 5 folds theta and scaling in here
    "tie_word_embeddings": ("tie_word_embeddings",),
    "hidden_act": ("hidden_act", "activation_function"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"),
    "attention_bias": ("attention_bias",),
    "sliding_window": ("sliding_window",),
    "num_local_experts": ("num_local_experts", "num_experts"),
    "num_experts_per_tok": ("num_experts_per_tok",),
}
# Canonical fields whose difference makes a merge meaningless (shapes, positions, maths).
CRITICAL = frozenset(ALIASES)


def canonical_config(config: dict) -> dict[str, Any]:
    """Canonical field -> value for the aliased fields, plus every other key as it is."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    for canon, spellings in ALIASES.items():
        for key in spellings:
            if key in config:
                out[canon] = config[key]
                used.add(key)
                break
    for key, value in config.items():
        if key not in used:
            out.setdefault(key, value)
    return out


def check_architecture(configs: dict[str, dict], base: str, ignore: list[str],
                       waived_fields: set[str] = frozenset()) -> Check:
    """`configs` maps model name -> config.json dict, the base under `base`."""
    canon = {name: canonical_config(cfg) for name, cfg in configs.items()}
    keys = sorted(set().union(*(c.keys() for c in canon.values())) - set(ignore))
    critical, other, waived = {}, {}, {}
    for key in keys:
        values = {name: c.get(key, "<absent>") for name, c in canon.items()}
        if all(v == values[base] for v in values.values()):
            continue
        target = waived if key in waived_fields else critical if key in CRITICAL else other
        target[key] = values
    details = {"differing_critical": critical, "differing_other": other, "waived_fields": waived,
               "compared": sorted(configs)}
    if critical:
        return Check("architecture", "fail", f"config differs in {_describe(critical, base)}", details)
    if other:
        return Check("architecture", "warn", f"config differs in non-structural fields {_describe(other, base)}", details)
    if waived:  # the only differences are waived ones: say so, never hide them
        details["waived_status"] = "fail" if set(waived) & CRITICAL else "warn"
        return Check("architecture", "waived", f"config differs only in waived fields {_describe(waived, base)}",
                     details, waived=True)
    return Check("architecture", "pass", "config.json matches on every structural field", details)


def _describe(diffs: dict[str, dict], base: str, limit: int = 4) -> str:
    parts = []
    for key, values in list(diffs.items())[:limit]:
        rest = ", ".join(f"{n}={v!r}" for n, v in values.items() if n != base and v != values[base])
        parts.append(f"{key} (base={values[base]!r}, {rest})")
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(parts) + more
