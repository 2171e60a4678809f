"""Multimodal `modules:` recipes (merge/modules.py): a text decoder, a vision tower and a projector
merged separately, each from its own models with its own settings, on a tiny Mistral 3 (Pixtral
tower + Mistral decoder, saved by transformers). The tensors must be mergekit 0.1.5's within 1e-6
(float32), and what mergekit would get wrong silently (a module left out) is refused by name.

    nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider tests/merge/test_modules_multimodal.py
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")

from mergeline.merge.executor import run_merge  # noqa: E402
from mergeline.merge.plan import MergeError  # noqa: E402
from mergeline.merge.recipe import RecipeError, load_recipe  # noqa: E402
from tests.merge._llama import mergekit_merge, read_all  # noqa: E402


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, str]:
    """base and two fine-tunes (base + 0.01 noise) of a tiny Mistral3ForConditionalGeneration."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig,
                              PixtralVisionConfig)

    root = tmp_path_factory.mktemp("mistral3")
    cfg = Mistral3Config(
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=4, head_dim=16),
        text_config=MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=3, head_dim=8),
        spatial_merge_size=2)
    torch.manual_seed(0)
    base = Mistral3ForConditionalGeneration(cfg)
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        model = Mistral3ForConditionalGeneration(copy.deepcopy(cfg))
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * i * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name, safe_serialization=True)
        out[name] = str(root / name)
    return out


def recipes(m: dict[str, str]) -> dict[str, dict]:
    b, a, bb = m["base"], m["a"], m["b"]
    return {
        # each module its own models: the tower kept from a, the projector's weights module-wide
        "linear": {"merge_method": "linear", "dtype": "float32", "modules": {
            "text_decoder": {"models": [{"model": a, "parameters": {"weight": 0.6}},
                                        {"model": bb, "parameters": {"weight": 0.4}}]},
            "vision_tower": {"models": [{"model": a, "parameters": {"weight": 1.0}}]},
            "multi_modal_projector": {"parameters": {"weight": 0.5}, "models": [{"model": a}, {"model": bb}]}}},
        # TIES with a base in every module, densities per model, per module and for the recipe
        "ties": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                 "parameters": {"normalize": True, "density": 0.6}, "modules": {
            "text_decoder": {"parameters": {"density": [0.3, 0.9]}, "models": [
                {"model": a, "parameters": {"weight": 0.5}}, {"model": bb, "parameters": {"weight": 0.5, "density": 0.7}}]},
            "vision_tower": {"models": [{"model": bb, "parameters": {"weight": 1.0}}]},
            "multi_modal_projector": {"models": [{"model": a, "parameters": {"weight": [0.2, 1.0]}}]}}},
        # the whole model in the `models:` form: a gradient still runs over each module's layers
        "models_form_gradient": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": a, "parameters": {"weight": [0.1, 0.9]}}, {"model": bb, "parameters": {"weight": 0.5}}]},
        # SLERP: a gradient over each module's own layers (3 decoder layers, 2 tower layers)
        "slerp": {"merge_method": "slerp", "base_model": b, "dtype": "float32", "modules": {
            "text_decoder": {"parameters": {"t": [0.0, 1.0]}, "models": [{"model": a}]},
            "vision_tower": {"parameters": {"t": [{"filter": "attention", "value": [1.0, 0.2]}, {"value": 0.4}]},
                             "models": [{"model": bb}]},
            "multi_modal_projector": {"parameters": {"t": 0.5}, "models": [{"model": a}]}}},
    }


@pytest.mark.parametrize("name", ["linear", "ties", "slerp", "models_form_gradient"])
def test_modules_match_mergekit(name, vlms, tmp_path):
    recipe = recipes(vlms)[name]
    mergekit_merge(recipe, tmp_path / "theirs")
    run_merge(recipe, tmp_path / "ours", device="cpu", progress=False, lineage=False)
    theirs, ours = read_all(tmp_path / "theirs"), read_all(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=lambda msg, k=k: f"{name} {k}: {msg}")
    # each module merged what it lists: in the linear recipe the tower is a's own, the decoder a mix
    if name == "linear":
        a = read_all(Path(vlms["a"]))
        tower = [k for k in a if k.startswith("vision_tower.")]
        assert tower and all(torch.equal(ours[k], a[k]) for k in tower)
        assert not torch.equal(ours["language_model.model.norm.weight"], a["language_model.model.norm.weight"])


def test_modules_recipe_round_trips_and_is_checked_per_module(vlms):
    r = load_recipe(recipes(vlms)["linear"])
    assert list(r.modules) == ["text_decoder", "vision_tower", "multi_modal_projector"]
    assert [m.model for m in r.inputs()] == [vlms["a"], vlms["b"]]
    assert "modules:" in r.to_yaml() and "\nmodels:" not in r.to_yaml()
    bad = recipes(vlms)["linear"]
    del bad["modules"]["vision_tower"]["models"][0]["parameters"]
    with pytest.raises(RecipeError, match=r"modules\.vision_tower: model .* has no 'weight'"):
        load_recipe(bad)
    bad = recipes(vlms)["slerp"]
    bad["modules"]["vision_tower"]["models"].append({"model": vlms["a"]})
    with pytest.raises(RecipeError, match=r"modules\.vision_tower.*slerp"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"trim_scope 'model'.*models:"):
        load_recipe({**recipes(vlms)["ties"], "trim_scope": "model"})
    bad = recipes(vlms)["linear"]
    bad["modules"]["vision_tower"] = {"slices": [{"sources": [{"model": vlms["a"], "layer_range": [0, 2]}]}]}
    with pytest.raises(RecipeError, match=r"modules\.vision_tower\.slices"):
        load_recipe(bad)


def test_a_module_left_out_or_unknown_is_refused(vlms, tmp_path):
    """mergekit writes no tensors for a module the recipe leaves out (a model without its vision
    tower); mergeline refuses, naming it. A module the architecture lacks is named too."""
    r = recipes(vlms)["linear"]
    del r["modules"]["vision_tower"]
    with pytest.raises(MergeError, match=r"'vision_tower' is not listed"):
        run_merge(r, tmp_path / "out", device="cpu", progress=False)
    r = recipes(vlms)["linear"]
    r["modules"]["audio_tower"] = r["modules"].pop("vision_tower")
    with pytest.raises(MergeError, match=r"modules\.audio_tower: Mistral3ForConditionalGeneration has no module"):
        run_merge(r, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
