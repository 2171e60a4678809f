"""mergekit's example recipes in configs/recipes/ run unchanged: each is copied byte for byte
beside a `models/` folder of tiny models and merged through the `mergeline merge` CLI.

    python -m pytest tests/merge/test_example_recipes.py -q
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergeline.flows.cli import app

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def models_dir(recipe_models) -> Path:
    """models/base, ft_a, ft_b and ft_c (tests/conftest.py), plus two LoRA adapters."""
    root = recipe_models
    for name, seed in (("lora_a", 1), ("lora_b", 2)):  # PEFT LoRA adapters on the base (ties_lora.yaml)
        _lora(root / "models" / "base", root / "models" / name, seed)
    return root


def _lora(base: Path, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                      init_lora_weights=False))
    with torch.no_grad():  # random A and B move c_attn 2.6x its own norm: scale to a fine-tune's update,
        for name, p in model.named_parameters():  # or the merge's compatibility checks refuse it
            if "lora_B" in name:
                p.mul_(0.02)
    model.save_pretrained(out)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_example_recipe_runs_unchanged(recipe, models_dir, monkeypatch):
    shutil.copy(recipe, models_dir / recipe.name)
    monkeypatch.chdir(models_dir)
    out = models_dir / "out" / recipe.stem
    result = CliRunner().invoke(app, ["merge", recipe.name, str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")
    base = load_file(models_dir / "models" / "base" / "model.safetensors")
    assert merged.keys() == base.keys()
    # The merge did something: at least one tensor moved away from the base.
    assert any(not torch.equal(merged[k].float(), base[k].float()) for k in base)
    assert (out / "merge_stats.json").is_file() and (out / "config.json").is_file()
