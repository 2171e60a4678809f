"""mergekit's `slices:` form (merge/slices.py): what is accepted, how settings are scoped, and
the clear refusal of slices mergekit cannot plan either. Parity with mergekit:
test_parity_mergekit.py; slices that move layers (frankenmerges): test_frankenmerge.py.

    pytest tests/merge/test_slices.py -q
"""
from __future__ import annotations

import pytest
import yaml

from mergeline.merge.recipe import RecipeError, load_recipe, model_names
from mergeline.merge.slices import locate, parameter_sources


def src(model, start, stop, **params):
    return {"model": model, "layer_range": [start, stop], **({"parameters": params} if params else {})}


def slerp_slices(**over):
    """The canonical mergekit SLERP recipe (mergekit's README and the merge tutorials)."""
    r = {
        "slices": [{"sources": [src("base", 0, 32), src("ft", 0, 32)]}],
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    }
    r.update(over)
    return r


def ties_two_slices():
    return {
        "merge_method": "ties", "base_model": "base", "dtype": "float32",
        "parameters": {"normalize": True, "density": 0.9},
        "slices": [
            {"sources": [src("base", 0, 4), src("a", 0, 4, weight=0.5, density=0.3), src("b", 0, 4, weight=0.5)]},
            {"sources": [src("base", 4, 6), src("a", 4, 6, weight=[0.2, 0.8]), src("b", 4, 6, weight=0.5)],
             "parameters": {"density": 0.6}},
        ],
    }


def test_canonical_slerp_recipe_reads_and_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(slerp_slices()))
    r = load_recipe(path)
    assert [m.model for m in r.inputs()] == ["base", "ft"]
    assert model_names(r) == {"base": "base", "ft": "ft"}
    again = load_recipe(yaml.safe_load(r.to_yaml()))  # the recipe recorded with a merge reads back the same
    assert again.slices == r.slices and again.parameters == r.parameters


def test_settings_are_scoped_by_slice_and_t_runs_over_the_slice():
    r = load_recipe(ties_two_slices())
    sl, t = locate(r.slices, "model.layers.5.mlp.up_proj.weight")
    assert sl is r.slices[1] and t == 1.0  # last of layers 4..5
    sl, t = locate(r.slices, "model.layers.2.self_attn.q_proj.weight")
    assert sl is r.slices[0] and t == pytest.approx(2 / 3)  # layers 0..3
    # embeddings take the first slice's settings, the final norm and head the last's, at t = 0
    assert locate(r.slices, "model.embed_tokens.weight") == (r.slices[0], 0.0)
    assert locate(r.slices, "lm_head.weight") == (r.slices[-1], 0.0)
    assert locate(r.slices, "model.norm.weight") == (r.slices[-1], 0.0)
    assert locate(r.slices, "gpt_neox.embed_in.weight") == (r.slices[0], 0.0)
    assert locate(r.slices, "embed_out.weight") == (r.slices[-1], 0.0)  # GPT-NeoX's head
    # precedence: the model's own settings in the slice, then the slice's, then the recipe's
    assert parameter_sources(r.slices[1], "b", r.parameters) == [{"weight": 0.5}, {"density": 0.6}, r.parameters]
    assert parameter_sources(r.slices[0], None, r.parameters) == [None, None, r.parameters]


@pytest.mark.parametrize("change, words", [
    (lambda r: r["slices"][1]["sources"][1].update(layer_range=[0, 3]),
     ["slices[1]", "same number of layers"]),
    (lambda r: r["slices"][0]["sources"][0].update(layer_range=[4, 0]), ["slices[0].sources[0]", "start < end"]),
    (lambda r: r["slices"][0]["sources"][2].update(model="a"), ["slices[0]", "lists a model twice"]),
    (lambda r: r["slices"][0].update(residual_weight=0.5), ["slices[0]", "residual_weight"]),
    (lambda r: r.update(models=[{"model": "a"}]), ["either 'models' or 'slices'"]),
    (lambda r: r["slices"][0]["sources"][1].update(colour=1), ["slices.0.sources.1.colour", "layer_range"]),
    (lambda r: r["slices"][1].update(colour=1), ["slices.1.colour", "sources"]),
    (lambda r: r["slices"][1]["parameters"].update(gama=1), ["slices[1].parameters.gama", "takes no parameter"]),
    (lambda r: r["slices"][0]["sources"][1]["parameters"].update(normalize=True),
     ["slices[0].sources[1].parameters.normalize", "whole merge"]),
    (lambda r: r["slices"][0]["sources"][2].pop("parameters"), ["model 'b' has no 'weight'"]),
    (lambda r: r.update(trim_scope="model"), ["trim_scope 'model'", "models:"]),
])
def test_bad_slices_name_the_slice_and_the_reason(change, words):
    r = ties_two_slices()
    change(r)
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_normalized_weights_summing_to_zero_in_one_slice_are_refused():
    r = ties_two_slices()
    r["slices"][1]["sources"][1]["parameters"]["weight"] = -0.5
    with pytest.raises(RecipeError, match="sum to zero"):
        load_recipe(r)
