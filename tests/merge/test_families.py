"""The family matrix: the engine works from tensor names and headers, so every decoder family a
practitioner merges must check, merge, load and run without a per-family table.

For each family a tiny random base (transformers config, a few thousand parameters) and two
fine-tunes (base + small noise on every tensor) are built in float32. Then:
- `check` passes the set;
- TIES, task arithmetic and SLERP merges load in `AutoModelForCausalLM` with no missing or
  unexpected keys and give finite logits, with the base's tensor names exactly (a tied model gets
  no `lm_head`, an untied one keeps its own);
- a gradient weight [0, 1] reaches every layer's tensors, MoE experts included (layer 0 is the
  base, layer 1 the fine-tune);
- TIES gives mergekit's tensors within 1e-6, where mergekit reads the family's checkpoints.

    pytest tests/merge/test_families.py -q
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tests.merge._llama import read_all

LAYERS = 2
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def family_configs(vocab: int) -> dict:
    import transformers as t

    c = dict(COMMON, vocab_size=vocab)
    return {
        "llama": t.LlamaConfig(**c, tie_word_embeddings=False),
        "qwen2": t.Qwen2Config(**c, tie_word_embeddings=True),
        "qwen3": t.Qwen3Config(**c, head_dim=8, tie_word_embeddings=True),
        "mistral": t.MistralConfig(**c),
        "gemma2": t.Gemma2Config(**c, head_dim=8),
        "gemma3_text": t.Gemma3TextConfig(**c, head_dim=8),
        "phi3": t.Phi3Config(**c, pad_token_id=0),
        "gpt_neox": t.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64),
        "granite": t.GraniteConfig(**c),
        "mixtral": t.MixtralConfig(**c, num_local_experts=2, num_experts_per_tok=1),
        "qwen3_moe": t.Qwen3MoeConfig(**c, head_dim=8, num_experts=2, num_experts_per_tok=1,
                                      moe_intermediate_size=32, decoder_sparse_step=1),
    }


FAMILIES = list(family_configs(8))
MOE = {"mixtral", "qwen3_moe"}
# mergekit 0.1.5's gpt-neox.json requires the `attention.bias` / `attention.masked_bias` buffers
# that transformers 5 no longer saves, so mergekit refuses these checkpoints.
# For MoE families mergekit (under transformers 5) writes the experts in transformers 5's fused
# layout (`mlp.experts.gate_up_proj`) instead of the input's per-expert tensors, so its tensor
# names differ from its inputs'; mergeline keeps the input's names (which load, as tested).
NO_MERGEKIT = {"gpt_neox": "mergekit 0.1.5 requires attention.masked_bias, which transformers 5 does not save",
               "mixtral": "mergekit renames the experts to the fused layout",
               "qwen3_moe": "mergekit renames the experts to the fused layout"}


@pytest.fixture(scope="module")
def tokenizer():
    from tests.conftest import _tiny_tokenizer

    return _tiny_tokenizer()


def build_family(name: str, root: Path, tokenizer) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    config = family_configs(len(tokenizer))[name]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).float()
    out = {}
    for i, tag in enumerate(["base", "ft_a", "ft_b"]):
        model = AutoModelForCausalLM.from_config(config).float()
        model.load_state_dict(base.state_dict())
        if i:
            g = torch.Generator().manual_seed(100 * i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        folder = root / tag
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        out[tag] = folder
    return out


def recipes(m: dict[str, Path]) -> dict[str, dict]:
    b, a, c = (str(m[k]) for k in ("base", "ft_a", "ft_b"))
    return {
        "ties": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                 "parameters": {"density": 0.5, "normalize": True},
                 "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": c, "parameters": {"weight": 0.4}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
                            "models": [{"model": a, "parameters": {"weight": 0.5}},
                                       {"model": c, "parameters": {"weight": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": b, "dtype": "float32",
                  "models": [{"model": b}, {"model": a}], "parameters": {"t": 0.4}},
        # Layer 0 takes none of the fine-tune, layer 1 all of it.
        "gradient": {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
                     "models": [{"model": a, "parameters": {"weight": [0.0, 1.0]}}]},
    }


def _layer(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def mergekit_run():
    pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")
    from tests.merge._llama import mergekit_merge

    return mergekit_merge


@pytest.mark.parametrize("family", FAMILIES)
def test_family_checks_merges_loads_and_matches_mergekit(family, tmp_path, tokenizer, mergekit_run):
    from transformers import AutoModelForCausalLM

    from mergeline.merge.compat import check_models
    from mergeline.merge.executor import run_merge

    m = build_family(family, tmp_path / "in", tokenizer)
    report = check_models(m["base"], {"ft_a": m["ft_a"], "ft_b": m["ft_b"]})
    assert report.status != "fail", [c for c in report.checks if c.status == "fail"]

    base = read_all(m["base"])
    tied = family_configs(8)[family].tie_word_embeddings
    assert ("lm_head.weight" in base) != tied or family == "gpt_neox"
    ids = torch.tensor([tokenizer.encode("1 + 2 = 3 yes")])
    for name, recipe in recipes(m).items():
        out = tmp_path / name
        run_merge(recipe, out, device="cpu", progress=False)
        merged = read_all(out)
        assert set(merged) == set(base), f"{family}/{name}: tensor names differ from the base's"
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (family, name, info)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), f"{family}/{name}: non-finite logits"

    # The gradient reached every layer's tensors, experts included.
    merged, ft = read_all(tmp_path / "gradient"), read_all(m["ft_a"])
    layered = [k for k in base if _layer(k) is not None]
    assert {_layer(k) for k in layered} == set(range(LAYERS))
    if family in MOE:
        assert any("experts" in k for k in layered), f"{family}: no expert tensors found"
    for k in layered:
        want = base[k] if _layer(k) == 0 else ft[k]
        torch.testing.assert_close(merged[k], want, rtol=0, atol=1e-6, msg=lambda s, k=k: f"{family} {k}: {s}")

    # TIES parity with mergekit.
    if family in NO_MERGEKIT:
        return
    mergekit_run(recipes(m)["ties"], tmp_path / "mergekit_ties")
    theirs, ours = read_all(tmp_path / "mergekit_ties"), read_all(tmp_path / "ties")
    assert set(theirs) == set(ours), f"{family}: mergekit writes {sorted(set(theirs) ^ set(ours))}"
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=lambda s, k=k: f"{family} {k}: {s}")
