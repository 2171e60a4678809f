"""Recipes as the pipeline passes them: absolute model folders, and the baselines derived from them.

    pytest tests/tasks/test_recipes.py -q
"""
from __future__ import annotations

from mergeline.merge.recipe import load_recipe
from mergeline.tasks.recipes import baseline_recipe, resolved_recipe


def slices_recipe() -> dict:
    rng = lambda start, stop, **p: {"layer_range": [start, stop], **({"parameters": p} if p else {})}  # noqa: E731
    return {
        "merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
        "slices": [
            {"sources": [{"model": "base", **rng(0, 1)}, {"model": "ft_a", **rng(0, 1, weight=0.7)},
                         {"model": "ft_b", **rng(0, 1)}], "parameters": {"weight": 0.2}},
            {"sources": [{"model": "base", **rng(1, 2)}, {"model": "ft_a", **rng(1, 2, weight=0.1)},
                         {"model": "ft_b", **rng(1, 2, weight=0.1)}]},
        ],
    }


def test_slices_models_are_resolved_to_absolute_folders(tmp_path):
    for name in ("base", "ft_a", "ft_b"):
        (tmp_path / name).mkdir()
    data = resolved_recipe(slices_recipe(), source_dir=tmp_path)
    refs = {s["model"] for sl in data["slices"] for s in sl["sources"]} | {data["base_model"]}
    assert refs == {str((tmp_path / n).resolve()) for n in ("base", "ft_a", "ft_b")}
    load_recipe(data)  # still a valid recipe, from any folder


def test_baseline_of_a_slices_recipe_takes_the_first_slice_weights():
    out = baseline_recipe(slices_recipe(), "linear")
    assert out == {"merge_method": "linear", "models": [
        {"model": "ft_a", "parameters": {"weight": 0.7}},   # its own setting wins over the slice's
        {"model": "ft_b", "parameters": {"weight": 0.2}},   # the slice's setting
    ]}
    load_recipe(out)


def test_every_model_reference_is_resolved(tmp_path):
    """tokenizer.source, tokenizer.tokens[*].source (a model, or a model's token) and a slice's
    base_model are model references too: absolute folders after resolution, like the models."""
    from mergeline.tasks.recipes import resolve

    for name in ("base", "ft_a", "ft_b"):
        (tmp_path / name).mkdir()
    data = slices_recipe()
    data["slices"][0]["base_model"] = "base"
    data["tokenizer"] = {"source": "ft_a", "tokens": {
        "<x>": {"source": "ft_b"}, "<y>": {"source": {"kind": "model_token", "model": "ft_a", "token": "a"}},
        "<z>": {"source": {"kind": "zero"}}}}
    recipe = load_recipe(data)
    out = resolve(recipe, source_dir=tmp_path)
    at = {n: str((tmp_path / n).resolve()) for n in ("base", "ft_a", "ft_b")}
    assert out.tokenizer.source == at["ft_a"]
    assert out.tokenizer.tokens["<x>"].source == at["ft_b"]
    assert out.tokenizer.tokens["<y>"].source.model == at["ft_a"]
    assert out.tokenizer.tokens["<z>"].source.kind == "zero"
    assert out.slices[0].base_model == at["base"] and out.slices[1].base_model is None
    assert out.source_dir is None and recipe.tokenizer.source == "ft_a"  # the input is left as it was
    union = resolve(load_recipe({**slices_recipe(), "tokenizer": {"source": "union"}}), source_dir=tmp_path)
    assert union.tokenizer.source == "union"


def test_cache_keys_read_the_typed_recipe(tmp_path):
    """A recipe passed typed (the pipeline) or as a mapping (the tuner) gets the same merge key."""
    from mergeline.tasks.merge_tasks import merge_key
    from mergeline.tasks.recipes import canonical, resolve

    for name in ("base", "ft_a", "ft_b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    typed = resolve(load_recipe(slices_recipe()), source_dir=tmp_path)
    assert merge_key(typed, 0) == merge_key(canonical(typed), 0) != merge_key(typed, 1)


def test_modules_of_a_multimodal_recipe_are_resolved(tmp_path):
    """`modules.*.models` are model references too; the canonical mapping reads back as the recipe."""
    from mergeline.tasks.recipes import canonical, resolve

    for name in ("base", "ft_a", "ft_b"):
        (tmp_path / name).mkdir()
    models = [{"model": "ft_a", "parameters": {"weight": 0.5}}, {"model": "ft_b", "parameters": {"weight": 0.5}}]
    recipe = load_recipe({"merge_method": "linear", "modules": {"text_decoder": {"models": models},
                                                                 "vision_tower": {"models": models[:1]}}})
    out = resolve(recipe, source_dir=tmp_path)
    at = {n: str((tmp_path / n).resolve()) for n in ("ft_a", "ft_b")}
    assert [m.model for m in out.modules["text_decoder"].models] == [at["ft_a"], at["ft_b"]]
    assert [m.model for m in out.modules["vision_tower"].models] == [at["ft_a"]]
    assert {m.model for m in out.models} == set(at.values())
    assert load_recipe(canonical(out)) == out
