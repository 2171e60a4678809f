"""Reading mergekit recipes: every accepted form, and every error names the key at fault.

    pytest tests/merge/test_recipe.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mergeline.merge.parameters import MISSING, evaluate_setting, layer_index, layer_t, num_layers, resolve
from mergeline.merge.recipe import RecipeError, load_recipe, model_names
from mergeline.merge.resolve import ModelNotFound, resolve_model, split_ref


def ties(**over):
    r = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "org/a", "parameters": {"weight": 0.5, "density": 0.2}},
            {"model": "./b", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"density": 0.5, "normalize": True},
        "dtype": "bfloat16",
    }
    r.update(over)
    return r


def error(recipe) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    return str(e.value)


# -- accepted forms -------------------------------------------------------------------
def test_mergekit_models_form_reads_unchanged(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        "  - model: a\n    parameters:\n      weight: [0.1, 0.9]\n      density: [{filter: mlp, value: 0.3}, {value: 0.7}]\n"
        "  - model: b@main\n    parameters: {weight: -0.3}\n"  # negative weights stay allowed (task negation)
        "parameters: {normalize: true, lambda: 1.5}\ndtype: torch.bfloat16\nout_dtype: float16\n"
        "tokenizer_source: base\nchat_template: chatml\n"
    )
    r = load_recipe(path)
    assert r.merge_method == "ties" and r.dtype == "bfloat16" and r.out_dtype == "float16"
    assert [m.model for m in r.models] == ["a", "b@main"]
    assert r.source_dir == str(tmp_path.resolve())
    # the base is appended to the inputs when `models` omits it, as mergekit's planner does
    assert [m.model for m in r.inputs()] == ["a", "b@main", "base"]
    assert model_names(r) == {"a": "a", "b@main": "b@main", "base": "base"}


def test_tokenizer_block_with_model_source():
    r = load_recipe(ties(tokenizer={"source": "org/a"}))
    assert r.tokenizer_ref == "org/a"
    assert load_recipe(ties(tokenizer_source="base")).tokenizer_ref is None


def test_model_names_are_unique():
    r = load_recipe(ties(models=[{"model": "x/ft", "parameters": {"weight": 1}}, {"model": "y/ft", "parameters": {"weight": 1}}]))
    assert sorted(model_names(r).values()) == ["base", "ft", "ft-2"]


# -- parameter resolution (mergekit's evaluate_setting / resolve_parameter) ---------
def test_gradient_interpolates_over_layer_index_and_non_layers_take_first_value():
    n = 5
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert num_layers({"num_hidden_layers": 5}) == 5 and num_layers({"n_layer": 2}) == 2
    assert num_layers({}, ["model.layers.0.x", "model.layers.6.x"]) == 7
    g = [0.0, 1.0, 0.5]
    # layer 1 of 5: t = 0.25 -> scaled 0.5 between entries 0 and 1
    assert evaluate_setting("model.layers.1.x", g, layer_t("model.layers.1.x", n)) == pytest.approx(0.5)
    assert evaluate_setting("model.layers.3.x", g, layer_t("model.layers.3.x", n)) == pytest.approx(0.75)
    assert evaluate_setting("model.layers.4.x", g, layer_t("model.layers.4.x", n)) == pytest.approx(0.5)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert evaluate_setting(name, g, layer_t(name, n)) == 0.0
    assert layer_t("model.layers.0.x", 1) == 1.0  # one layer: mergekit uses t = 1
    assert evaluate_setting("x", [True, False], 0.9) is True  # booleans pick, never interpolate


def test_filters_first_match_wins_and_fall_through_to_lower_precedence():
    f = [{"filter": "mlp", "value": 0.3}, {"filter": "layers", "value": [0.0, 1.0]}]
    assert evaluate_setting("model.layers.2.mlp.up_proj.weight", f, 1.0) == 0.3
    assert evaluate_setting("model.layers.2.self_attn.q_proj.weight", f, 1.0) == 1.0
    assert evaluate_setting("model.norm.weight", f, 0.0) is None
    # per-model beats global; a per-model filter that misses falls through to the global value
    own, glob = {"weight": [{"filter": "mlp", "value": 0.9}]}, {"weight": 0.1}
    assert resolve("weight", [own, glob], "model.layers.0.mlp.x", 0) == 0.9
    assert resolve("weight", [own, glob], "model.layers.0.self_attn.x", 0) == 0.1
    assert resolve("density", [own, glob], "x", 0) is MISSING
    assert evaluate_setting("x", [{"value": 2}], 0) == 2  # no filter: matches everything


# -- errors name the key --------------------------------------------------------------
def test_unknown_top_level_key_is_named():
    msg = error(ties(merge_methd="ties"))
    assert "merge_methd" in msg and "allowed" in msg


def test_unknown_model_key_is_named():
    r = ties()
    r["models"][0]["wieght"] = 1
    assert "models.0.wieght" in error(r)


def test_unknown_method_lists_allowed_names():
    msg = error(ties(merge_method="tise"))
    assert "tise" in msg and "ties" in msg and "linear" in msg and "task_arithmetic" in msg


def test_parameter_the_method_does_not_take():
    r = ties()
    r["models"][1]["parameters"]["tt"] = 0.5  # no method takes it; `t` (slerp's) only warns
    msg = error(r)
    assert "models[1].parameters.tt" in msg and "weight" in msg and "density" in msg


def test_global_parameter_under_a_model_is_refused():
    r = ties()
    r["models"][0]["parameters"]["normalize"] = False
    assert "normalize" in error(r) and "top-level" in error(r)


@pytest.mark.parametrize("density", [0, 1.5, -0.1, [0.5, 1.2], [{"filter": "mlp", "value": 0.0}]])
def test_density_out_of_range(density):
    r = ties()
    r["models"][0]["parameters"]["density"] = density
    msg = error(r)
    assert "models[0].parameters.density" in msg and "out of range" in msg


def test_weights_summing_to_zero_refused_where_the_method_normalizes():
    r = ties(models=[{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": -0.5}}])
    assert "weight" in error(r) and "sum to zero" in error(r)
    r["parameters"]["normalize"] = False  # no division: allowed (task negation)
    load_recipe(r)


def test_missing_weight_is_named():
    r = ties()
    del r["models"][1]["parameters"]["weight"]
    msg = error(r)
    assert "'./b'" in msg and "weight" in msg


def test_bad_dtype_lists_allowed():
    msg = error(ties(dtype="bf17"))
    assert "dtype" in msg and "bfloat16" in msg


@pytest.mark.parametrize("over, words", [
    ({"slices": [{"sources": []}], "models": None}, ["slices[0]", "at least one model"]),
    ({"modules": {"text": {}}}, ["either 'modules' or 'models'/'slices'"]),
    ({"modules": {"text": {}}, "models": None}, ["modules.text must list its 'models'"]),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"force": "maybe"}}}}, ["tokenizer", "force"]),
    ({"tokenizer_source": "org/zzz"}, ["tokenizer_source", "org/zzz"]),
])
def test_unsupported_forms_are_refused_clearly(over, words):
    msg = error(ties(**over))
    for w in words:
        assert w in msg


def test_lora_reference_reads_and_a_malformed_one_is_refused():
    r = ties()
    r["models"][0]["model"] = "org/a+org/lora"  # mergekit's BASE+ADAPTER (merge/lora.py)
    assert load_recipe(r).inputs()[0].model == "org/a+org/lora"
    assert model_names(load_recipe(r))["org/a+org/lora"] == "lora"
    for bad in ("org/a+", "+org/lora", "a+b+c"):
        r["models"][0]["model"] = bad
        assert "MODEL+ADAPTER" in error(r)


def test_base_required_and_slerp_takes_t():
    assert "base_model" in error(ties(base_model=None))
    r = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
         "parameters": {"t": [0, 0.5, 1]}}
    load_recipe(r)
    r["parameters"]["weight"] = 1  # slerp has no weight: ignored with a warning, as mergekit
    load_recipe(r)
    r["parameters"]["wieght"] = 1  # a typo no method takes
    assert "wieght" in error(r)


def test_filter_entry_with_unknown_key():
    r = ties()
    r["models"][0]["parameters"]["weight"] = [{"filtr": "mlp", "value": 1}]
    assert "filtr" in error(r)


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [\n")
    assert str(bad) in error(bad)
    assert "not found" in error(tmp_path / "missing.yaml")


# -- model references -------------------------------------------------------------------
def test_resolve_local_folder_relative_to_recipe(tmp_path):
    (tmp_path / "m").mkdir()
    assert resolve_model("m", base_dir=tmp_path) == (tmp_path / "m").resolve()
    assert split_ref("org/name@v1") == ("org/name", "v1")


def test_uncached_repo_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as e:
        resolve_model("nobody-here/nothing@abc")
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "hf download nobody-here/nothing --revision abc" in msg
    with pytest.raises(ModelNotFound):
        resolve_model("./no/such/folder/here")


def test_example_recipes_load():
    recipes = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        r = load_recipe(path)
        assert r.inputs(), path
