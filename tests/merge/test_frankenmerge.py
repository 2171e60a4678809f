"""Frankenmerges: `slices:` that stack, repeat, drop or interleave layer ranges (merge/slices.py).

Tiny Llamas saved by transformers; each merge must write exactly mergekit 0.1.5's tensors (names
renumbered, values within 1e-6), set num_hidden_layers, and load and run in transformers.

    pytest tests/merge/test_frankenmerge.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeline.merge.executor import run_merge
from mergeline.merge.plan import MergeError, build_plan
from mergeline.merge.recipe import RecipeError, load_recipe

LAYERS = 4


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    """base and two fine-tunes of a 4-layer Llama (untied head), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("franken")
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    out = {}
    for i, name in enumerate(["base", "ft_a", "ft_b"]):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.005 * i * torch.randn(p.shape, generator=g))  # fine-tune-sized: the checks refuse more
        model.save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def _recipes(m: dict[str, Path]) -> dict[str, dict]:
    b, a, f = (str(m[k]) for k in ("base", "ft_a", "ft_b"))
    src = lambda model, lo, hi, **kw: {"model": model, "layer_range": [lo, hi], **kw}  # noqa: E731
    return {
        # orcamini-platy style: overlapping ranges of two models stacked into a deeper model
        "stack": {"merge_method": "passthrough", "dtype": "float32",
                  "slices": [{"sources": [src(a, 0, 3)]}, {"sources": [src(f, 1, 4)]}]},
        # drop a layer, repeat another, reverse order
        "drop_repeat": {"merge_method": "passthrough", "dtype": "float32",
                        "slices": [{"sources": [src(a, 0, 1)]}, {"sources": [src(a, 2, 3)]},
                                   {"sources": [src(a, 2, 3)]}, {"sources": [src(b, 3, 4)]}]},
        # a merge method over shifted ranges: each slice's sources at different layers
        "linear_interleave": {"merge_method": "linear", "dtype": "float32",
                              "slices": [{"sources": [src(a, 0, 2, parameters={"weight": 0.7}),
                                                      src(f, 1, 3, parameters={"weight": [0.2, 0.9]})]},
                                         {"sources": [src(f, 2, 4, parameters={"weight": 0.5}),
                                                      src(b, 0, 2, parameters={"weight": 0.5})]}]},
        # a method with a base, the base listed in each slice (per-slice base_model too)
        "ties_shifted": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                         "parameters": {"density": 0.6, "weight": 0.5},
                         "slices": [{"sources": [src(b, 0, 2), src(a, 1, 3)]},
                                    {"sources": [src(b, 2, 4), src(f, 2, 4)], "parameters": {"density": 0.9}}]},
        # mergekit's `modules:` form, for a one-module model (mergekit's module `default`)
        "modules_stack": {"merge_method": "passthrough", "dtype": "float32", "modules": {"default": {
            "slices": [{"sources": [src(f, 2, 4)]}, {"sources": [src(a, 0, 3)]}]}}},
        "modules_ties": {"merge_method": "ties", "base_model": b, "dtype": "float32", "parameters": {"normalize": True},
                         "modules": {"default": {"parameters": {"density": [0.3, 0.8]}, "models": [
                             {"model": a, "parameters": {"weight": 0.6}},
                             {"model": f, "parameters": {"weight": 0.3, "density": 0.5}}]}}},
    }


def _read(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def mergekit_outputs(llamas, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    root = tmp_path_factory.mktemp("mergekit_franken")
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    for name, recipe in _recipes(llamas).items():
        mk_run(MergeConfiguration.model_validate(recipe), str(root / name), opts)
    return {name: root / name for name in _recipes(llamas)}


@pytest.mark.parametrize("name", list(_recipes({k: Path(k) for k in ("base", "ft_a", "ft_b")})))
def test_same_tensors_and_config_as_mergekit(name, llamas, mergekit_outputs, tmp_path):
    run_merge(_recipes(llamas)[name], tmp_path / "out", device="cpu", progress=False)
    theirs, ours = _read(mergekit_outputs[name]), _read(tmp_path / "out")
    assert set(theirs) == set(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    theirs_cfg = json.loads((mergekit_outputs[name] / "config.json").read_text())
    assert cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]


def test_stacked_layers_are_the_sources_renumbered_and_the_model_runs(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "stack"
    run_merge(_recipes(llamas)["stack"], out, device="cpu", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    merged, a, f = _read(out), _read(llamas["ft_a"]), _read(llamas["ft_b"])
    for new, (model, old) in enumerate([(a, 0), (a, 1), (a, 2), (f, 1), (f, 2), (f, 3)]):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{new}.{suffix}"], model[f"model.layers.{old}.{suffix}"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(merged["lm_head.weight"], f["lm_head.weight"])  # last slice's
    assert not any(k.startswith("model.layers.6.") for k in merged)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 3]])).logits
    assert logits.shape == (1, 4, 40) and torch.isfinite(logits).all()


def test_slot_inputs_name_the_models_they_read(llamas):
    plan = build_plan(load_recipe(_recipes(llamas)["stack"]))
    assert [s.name for s in plan.inputs] == ["ft_a|ft_b"]
    job = next(j for j in plan.jobs if j.name == "model.layers.4.mlp.up_proj.weight")
    assert job.input_names == ["model.layers.2.mlp.up_proj.weight"] and job.refs == [str(llamas["ft_b"])]


def test_bad_frankenmerges_are_refused_by_name(llamas):
    b, a = str(llamas["base"]), str(llamas["ft_a"])
    with pytest.raises(RecipeError, match=r"slices\[1\].*same number of layers"):
        load_recipe({"merge_method": "linear", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 1}}]},
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 1}},
                         {"model": b, "layer_range": [0, 3], "parameters": {"weight": 1}}]}]})
    with pytest.raises(MergeError, match=r"slices\[0\].*has 4 layers"):
        build_plan(load_recipe({"merge_method": "passthrough",
                                "slices": [{"sources": [{"model": a, "layer_range": [2, 6]}]}]}))
    with pytest.raises(RecipeError, match=r"'density' is set both in modules.default.parameters and in parameters"):
        load_recipe({"merge_method": "ties", "base_model": b, "parameters": {"density": 0.5},
                     "modules": {"default": {"parameters": {"density": 0.4}, "models": [
                         {"model": a, "parameters": {"weight": 1}}]}}})
    with pytest.raises(RecipeError, match=r"modules\.text_decoder must list its 'models'"):
        load_recipe({"merge_method": "linear", "modules": {"text_decoder": {}, "vision_tower": {}}})
    with pytest.raises(RecipeError, match=r"passthrough.*exactly 1 model"):
        load_recipe({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}]})


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes" / "frankenmerge").glob("*.yaml"))


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_frankenmerge_examples_run_on_the_tiny_models_and_load(recipe, tiny_models, tmp_path, monkeypatch):
    """configs/recipes/frankenmerge/ (mergekit's orcamini-platy-44layer.yml and others), copied
    beside models/ as test_example_recipes.py does, merged, loaded and run by transformers."""
    import shutil

    from transformers import AutoModelForCausalLM

    for name in ("base", "ft_a", "ft_b"):
        shutil.copytree(tiny_models[name], tmp_path / "models" / name)
    shutil.copy(recipe, tmp_path / recipe.name)
    monkeypatch.chdir(tmp_path)
    r = load_recipe(recipe.name)
    run_merge(r, tmp_path / "out", device="cpu", progress=False)
    n = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in r.slices)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == n
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.transformer.h) == n
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()


def test_moves_layers_tells_frankenmerges_from_layer_scoped_slices(llamas):
    from mergeline.merge.slices import moves_layers

    assert moves_layers(load_recipe(_recipes(llamas)["stack"]))
    assert moves_layers(load_recipe(_recipes(llamas)["ties_shifted"]))
    b, a = str(llamas["base"]), str(llamas["ft_a"])
    aligned = {"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [2, 4]}]}]}
    assert not moves_layers(load_recipe(aligned))
    assert not build_plan(load_recipe(aligned)).stacked


def test_output_config_layer_count_and_per_layer_kinds():
    from mergeline.merge.parameters import rename_layer, set_num_layers

    cfg = {"num_hidden_layers": 4, "layer_types": ["sliding", "full", "sliding", "full"], "hidden_size": 8}
    out = set_num_layers(cfg, [0, 1, 1, 3, 2])
    assert out["num_hidden_layers"] == 5 and out["layer_types"] == ["sliding", "full", "full", "full", "sliding"]
    assert cfg["num_hidden_layers"] == 4  # the reference's config is not changed
    assert set_num_layers({"n_layer": 2}, [0, 1, 1])["n_layer"] == 3
    nested = set_num_layers({"text_config": {"num_hidden_layers": 2}, "vision_config": {"depth": 9}}, [1, 0, 1])
    assert nested["text_config"]["num_hidden_layers"] == 3 and nested["vision_config"] == {"depth": 9}
    with pytest.raises(ValueError, match="num_hidden_layers"):
        set_num_layers({"hidden_size": 8}, [0])
    assert rename_layer("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert rename_layer("transformer.h.0.attn.c_attn.weight", 41) == "transformer.h.41.attn.c_attn.weight"
