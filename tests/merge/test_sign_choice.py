"""TIES' sign choice per layer group (merge/methods/ties.py `SignChoice`): on a hand-made tensor,
`elected` gives the magnitude election and a model's name gives that model's own signs (of its
trimmed delta, the election where it kept nothing); groups are read from tensor names; a recipe
asking for validation signs without recorded choices is refused in one line."""
import pytest
import torch

from mergeline.merge.methods.registry import get_method
from mergeline.merge.methods.ties import group_of
from mergeline.merge.plan import RecipeError

TIES = get_method("ties")
BASE = torch.zeros(4)
# a keeps 3 of 4 entries (density 0.75): its -0.1 is trimmed, so it has no say at position 3
A = torch.tensor([1.0, -2.0, 0.5, -0.1])
B = torch.tensor([-3.0, 1.0, -0.25, 0.75])
# elected signs: sums [-2, -1, 0.25, 0.75] -> [-, -, +, +]; normalize divides by the agreeing weights
EXPECTED = {
    "elected": [-3.0, -2.0, 0.5, 0.75],
    "a": [1.0, -2.0, 0.5, 0.75],  # a's signs [+, -, +], the election where a kept nothing
    "b": [-3.0, 1.0, -0.25, 0.75],  # b's signs everywhere
}


def _merge(choice: str, name: str = "model.layers.0.mlp.weight") -> torch.Tensor:
    per_model = [TIES.model_params(weight=1.0, density=0.75), TIES.model_params(weight=1.0, density=1.0)]
    params = TIES.global_params(sign_source="validation", sign_choices={"layers.0-1": choice, "head": "b"})
    params = params.for_tensor(name, ["a", "b"])
    return TIES.fn(BASE, [A, B], per_model, params).tensor


@pytest.mark.parametrize("choice", sorted(EXPECTED))
def test_each_choice_gives_the_expected_tensor(choice):
    assert _merge(choice).tolist() == EXPECTED[choice]


def test_an_unlisted_group_keeps_the_election():
    assert _merge("a", "model.layers.2.mlp.weight").tolist() == EXPECTED["elected"]
    assert _merge("a", "model.embed_tokens.weight").tolist() == EXPECTED["elected"]
    assert _merge("elected", "lm_head.weight").tolist() == EXPECTED["b"]  # head: b


def test_choices_without_a_source_are_the_plain_election():
    per_model = [TIES.model_params(weight=1.0, density=0.75), TIES.model_params(weight=1.0, density=1.0)]
    plain = TIES.fn(BASE, [A, B], per_model, TIES.global_params()).tensor
    assert plain.tolist() == EXPECTED["elected"]


def test_groups_from_tensor_names():
    groups = ["embeddings", "layers.0-1", "layers.2", "head"]
    assert group_of("transformer.wte.weight", groups) == "embeddings"
    assert group_of("transformer.wpe.weight", groups) == "embeddings"
    assert group_of("model.embed_tokens.weight", groups) == "embeddings"
    assert group_of("transformer.h.1.attn.c_attn.weight", groups) == "layers.0-1"
    assert group_of("model.layers.2.self_attn.q_proj.weight", groups) == "layers.2"
    assert group_of("model.layers.3.self_attn.q_proj.weight", groups) is None
    assert group_of("transformer.ln_f.weight", groups) == "head"
    assert group_of("lm_head.weight", groups) == "head"


def test_bad_tables_are_refused_naming_the_group_or_model():
    with pytest.raises(ValueError, match="layers.0-x"):
        TIES.global_params(sign_choices={"layers.0-x": "elected"})
    with pytest.raises(ValueError, match="overlaps"):
        TIES.global_params(sign_choices={"layers.0-2": "elected", "layers.2-3": "a"})
    with pytest.raises(ValueError, match="'c' is neither 'elected' nor a merged model"):
        TIES.global_params(sign_choices={"head": "c"}).for_tensor("lm_head.weight", ["a", "b"])


def test_validation_signs_without_choices_are_refused_by_a_merge(tiny_models, tmp_path):
    from mergeline.merge.executor import run_merge

    recipe = {"merge_method": "ties", "base_model": str(tiny_models["base"]),
              "models": [{"model": str(tiny_models[n]), "parameters": {"weight": 0.5, "density": 0.5}}
                         for n in ("ft_a", "ft_b")],
              "parameters": {"sign_source": "validation"}}
    with pytest.raises(RecipeError, match=r"sign_source: validation needs the recorded sign_choices; run `mergeline tune"):
        run_merge(recipe, tmp_path / "out", device="cpu", checks=False)
    assert not (tmp_path / "out").exists()


def test_recorded_choices_reach_stats_and_lineage(tiny_models, tmp_path):
    import json

    from mergeline.merge.executor import run_merge

    choices = {"embeddings": "ft_b", "layers.0-1": "elected", "head": "ft_a"}
    models = [{"model": str(tiny_models[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("ft_a", "ft_b")]
    recipe = {"merge_method": "ties", "base_model": str(tiny_models["base"]), "models": models,
              "parameters": {"sign_source": "validation", "sign_choices": choices}}
    run_merge(recipe, tmp_path / "guided", device="cpu", checks=False)
    plain = {**recipe, "parameters": {}}
    run_merge(plain, tmp_path / "plain", device="cpu", checks=False)
    stats = json.loads((tmp_path / "guided" / "merge_stats.json").read_text())
    assert stats["sign_choices"] == choices
    lineage = json.loads((tmp_path / "guided" / "lineage.json").read_text())
    assert lineage["recipe"]["parameters"]["sign_choices"] == choices
    assert "sign_choices" not in json.loads((tmp_path / "plain" / "merge_stats.json").read_text())
    # the choices took effect: the embeddings and head differ from the plain election, the layers do not
    from safetensors.torch import load_file

    guided, plain_t = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("guided", "plain"))
    differ = {k for k in guided if not guided[k].equal(plain_t[k])}
    assert "transformer.wte.weight" in differ and not any(".h." in k for k in differ)


def test_a_recipe_with_a_bad_group_is_refused_when_loaded():
    from mergeline.merge.recipe import load_recipe

    recipe = {"merge_method": "ties", "base_model": "/x/base",
              "models": [{"model": "/x/a", "parameters": {"weight": 1}}],
              "parameters": {"sign_choices": {"layers.x": "a"}}}
    with pytest.raises(RecipeError, match=r"parameters.sign_choices.*group 'layers.x' is not embeddings, head"):
        load_recipe(recipe)
