"""LoRA adapters as fine-tunes (`BASE+ADAPTER`, merge/lora.py) against peft's own merge_and_unload.

Adapters are made by peft on tiny GPT-2 (Conv1D layers, fan_in_fan_out; an embedding adapter;
modules_to_save) and Llama (Linear layers, bf16 base, rsLoRA) with random B matrices, so every
update is non-zero.

    pytest tests/merge/test_lora.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mergeline.merge.checkpoint import Checkpoint, CheckpointError
from mergeline.merge.compat import check_models
from mergeline.merge.executor import run_merge
from mergeline.merge.hashing import content_hash

GPT2 = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)


def make_base(kind: str, folder: Path, dtype=torch.float32):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)) if kind == "gpt2" else LlamaForCausalLM(LlamaConfig(**LLAMA))
    model.to(dtype).save_pretrained(folder)
    return folder


def fresh(kind: str, folder: Path):
    cls = GPT2LMHeadModel if kind == "gpt2" else LlamaForCausalLM
    return cls.from_pretrained(folder)


def make_adapter(kind: str, base: Path, folder: Path, seed: int, **cfg) -> Path:
    torch.manual_seed(seed)
    defaults = ({"target_modules": ["c_attn", "c_proj", "wte"], "fan_in_fan_out": True, "modules_to_save": ["ln_f"]}
                if kind == "gpt2" else {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True})
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **{**defaults, **cfg})
    model = get_peft_model(fresh(kind, base), config)
    with torch.no_grad():  # random B, scaled to a fine-tune's few-percent update (peft's is ~100x the base)
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(3e-4)
            elif "modules_to_save" in name:  # the adapter's own copy of a module: trained too
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for kind, dtype in (("gpt2", torch.float32), ("llama", torch.bfloat16)):
        base = make_base(kind, root / f"{kind}_base", dtype)
        out[kind] = {"base": base, "a": make_adapter(kind, base, root / f"{kind}_lora_a", 1),
                     "b": make_adapter(kind, base, root / f"{kind}_lora_b", 2)}
    return out


def peft_merged(kind: str, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return PeftModel.from_pretrained(fresh(kind, base), adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_tensor_equals_peft_merge_and_unload(lora, kind):
    m = lora[kind]
    ours = Checkpoint(f"{m['base']}+{m['a']}")
    theirs = peft_merged(kind, m["base"], m["a"])
    base = Checkpoint(m["base"])
    changed = 0
    for name in base.names():
        got, want = ours.get(name), theirs[name]
        assert got.dtype == base.get(name).dtype, name
        torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0, msg=lambda s, n=name: f"{n}: {s}")
        changed += not torch.equal(got, base.get(name))
    assert changed >= 4  # the adapter did something: attention, MLP, embedding or saved modules


def test_a_merge_of_adapters_equals_the_merge_of_their_merged_models(lora, tmp_path):
    m = lora["gpt2"]
    folders = {}
    for name in ("a", "b"):  # what a user would do by hand: merge_and_unload, save, then merge
        folders[name] = tmp_path / f"merged_{name}"
        PeftModel.from_pretrained(fresh("gpt2", m["base"]), m[name]).merge_and_unload().save_pretrained(folders[name])
    recipe = lambda a, b: {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",  # noqa: E731
                           "parameters": {"density": 0.5, "normalize": True},
                           "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]}
    run_merge(recipe(f"{m['base']}+{m['a']}", f"{m['base']}+{m['b']}"), tmp_path / "ours", device="cpu", progress=False)
    run_merge(recipe(str(folders["a"]), str(folders["b"])), tmp_path / "by_hand", device="cpu", progress=False)
    ours, by_hand = Checkpoint(tmp_path / "ours"), Checkpoint(tmp_path / "by_hand")
    assert set(ours.names()) == set(Checkpoint(m["base"]).names())
    for name in ours.names():
        assert torch.equal(ours.get(name), by_hand.get(name)), name


def test_compatibility_check_sees_the_adapter_update(lora):
    m = lora["gpt2"]
    report = check_models(m["base"], {"lora_a": f"{m['base']}+{m['a']}", "lora_b": f"{m['base']}+{m['b']}"},
                          {"norms": {"chunk_elements": 7}})  # small jobs elsewhere; one per adapted tensor
    assert report.status in ("pass", "warn")
    delta = peft_merged("gpt2", m["base"], m["a"])
    base = Checkpoint(m["base"])
    want = sum(float((delta[n].double() - base.get(n).double()).pow(2).sum()) for n in base.names()) ** 0.5
    assert report.norms["per_model"]["lora_a"]["delta_norm"] == pytest.approx(want, rel=1e-5)


def test_content_hash_covers_base_and_adapter(lora, tmp_path):
    m = lora["gpt2"]
    with_a, with_b = content_hash(f"{m['base']}+{m['a']}"), content_hash(f"{m['base']}+{m['b']}")
    assert with_a != with_b and with_a != content_hash(m["base"])
    copy = shutil.copytree(m["a"], tmp_path / "copy_of_a")
    assert content_hash(f"{m['base']}+{copy}") == with_a  # bytes, not paths


@pytest.mark.parametrize("edit, words", [
    (lambda d: (d / "adapter_config.json").unlink(), ["adapter_config.json", "missing"]),
    (lambda d: _set(d, use_dora=True), ["adapter_config.json", "use_dora", "DoRA"]),
    (lambda d: _set(d, alpha_pattern={"c_attn": 4}), ["alpha_pattern"]),
    (lambda d: _set(d, peft_type="IA3"), ["IA3", "only LoRA"]),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk"), ["adapter_model.safetensors", "unreadable"]),
])
def test_bad_adapters_are_refused_naming_the_file(lora, tmp_path, edit, words):
    m = lora["gpt2"]
    adapter = shutil.copytree(m["a"], tmp_path / "bad")
    edit(adapter)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(f"{m['base']}+{adapter}")
    for w in words:
        assert w in str(e.value)


def test_an_adapter_for_another_model_is_refused(lora):
    with pytest.raises(CheckpointError, match="does not store|another model"):
        Checkpoint(f"{lora['llama']['base']}+{lora['gpt2']['a']}")


def test_an_adapter_for_a_wider_model_is_refused_before_any_compute(lora, tmp_path):
    wide = tmp_path / "wide_base"
    GPT2LMHeadModel(GPT2Config(**{**GPT2, "n_embd": 32})).save_pretrained(wide)
    adapter = make_adapter("gpt2", wide, tmp_path / "wide_lora", 4)  # same tensor names, other shapes
    with pytest.raises(CheckpointError, match=r"shape \[.*\].*the base has shape"):
        Checkpoint(f"{lora['gpt2']['base']}+{adapter}")


def test_a_tied_head_in_modules_to_save_is_refused(lora, tmp_path):
    m = lora["gpt2"]  # GPT-2 stores no lm_head (tied to wte): saving it would untie the model
    adapter = make_adapter("gpt2", m["base"], tmp_path / "head", 3, modules_to_save=["lm_head"])
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        Checkpoint(f"{m['base']}+{adapter}")


def _set(folder: Path, **values) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **values}))
