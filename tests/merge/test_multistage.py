"""Multi-stage recipes (merge/multistage.py): mergekit-multi's YAML documents, run in order, later
stages merging earlier ones by name; the final model lists every stage.

    pytest tests/merge/test_multistage.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeline.merge.executor import run_merge
from mergeline.merge.multistage import is_multistage, load_stages, run_stages, stage_key
from mergeline.merge.recipe import RecipeError, load_recipe

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "multistage" / "ties-then-slerp.yaml"


@pytest.fixture()
def workdir(tiny_models, tmp_path) -> Path:
    for name in ("base", "ft_a", "ft_b"):
        shutil.copytree(tiny_models[name], tmp_path / "models" / name)
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    return tmp_path


def test_example_runs_in_order_and_equals_the_stages_run_by_hand(workdir):
    recipe = workdir / EXAMPLE.name
    assert is_multistage(recipe)
    out = workdir / "out" / "two-stage"
    stages = load_stages(recipe, out)
    assert [s.name for s in stages] == ["ties-mix", None]
    assert stages[0].out == workdir / "out" / ".two-stage.stages" / "ties-mix"
    assert stages[1].needs == ["ties-mix"] and str(stages[0].out) in stages[1].recipe.to_yaml()

    results = run_stages(recipe, out, device="cpu", progress=False)
    assert len(results) == 2 and all(r is not None for r in results)
    # the same two merges run one by one give the same tensors
    docs = recipe.read_text().split("---")
    (workdir / "one.yaml").write_text(docs[0].replace("name: ties-mix\n", ""))
    run_merge(workdir / "one.yaml", workdir / "by_hand" / "mix", device="cpu", progress=False)
    (workdir / "two.yaml").write_text(docs[1].replace("ties-mix", str(workdir / "by_hand" / "mix")))
    run_merge(workdir / "two.yaml", workdir / "by_hand" / "final", device="cpu", progress=False)
    ours, by_hand = load_file(out / "model.safetensors"), load_file(workdir / "by_hand" / "final" / "model.safetensors")
    assert ours.keys() == by_hand.keys() and all(torch.equal(ours[k], by_hand[k]) for k in ours)
    base = load_file(workdir / "models" / "base" / "model.safetensors")
    assert any(not torch.equal(ours[k], base[k]) for k in base)

    record = json.loads((out / "mergeline_stages.json").read_text())
    assert [r["name"] for r in record] == ["ties-mix", None]
    assert record[0]["recipe"]["merge_method"] == "ties" and record[1]["needs"] == ["ties-mix"]
    assert record[0]["key"] == stage_key(stages[0]) and record[0]["out"] == str(stages[0].out)
    own = json.loads((stages[0].out / "mergeline_stages.json").read_text())
    assert [r["name"] for r in own] == ["ties-mix"]  # an intermediate lists itself


def test_an_unchanged_intermediate_is_reused_and_a_changed_one_redone(workdir):
    recipe = workdir / EXAMPLE.name
    out = workdir / "out"
    run_stages(recipe, out, device="cpu", progress=False)
    again = run_stages(recipe, out, device="cpu", progress=False, overwrite=True)
    assert again[0] is None and again[1] is not None  # the intermediate was reused
    key = stage_key(load_stages(recipe, out)[0])
    recipe.write_text(recipe.read_text().replace("density: 0.5, weight: 0.5}\n  - model: models/ft_b",
                                                 "density: 0.7, weight: 0.5}\n  - model: models/ft_b"))
    assert stage_key(load_stages(recipe, out)[0]) != key
    third = run_stages(recipe, out, device="cpu", progress=False, overwrite=True)
    assert third[0] is not None  # written by an earlier run: replaced without asking


def test_an_existing_folder_that_no_stage_wrote_is_not_replaced(workdir):
    from mergeline.merge.writer import OutputError

    recipe = workdir / EXAMPLE.name
    mine = workdir / "out" / ".final.stages" / "ties-mix"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already exists"):
        run_stages(recipe, workdir / "out" / "final", device="cpu", progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and not (workdir / "out" / "final").exists()


@pytest.mark.parametrize("text, words", [
    ("name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n---\n"
     "name: b\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n", ["cycle", "a -> b -> a"]),
    ("name: a\nmerge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n---\n"
     "name: a\nmerge_method: linear\nmodels: [{model: y, parameters: {weight: 1}}]\n", ["'a'", "twice"]),
    ("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n---\n"
     "merge_method: linear\nmodels: [{model: y, parameters: {weight: 1}}]\n", ["more than one unnamed"]),
    ("name: a\nmerge_method: linear\nmodels: [{model: x, parameters: {wieght: 1}}]\n", ["stage a", "wieght"]),
])
def test_bad_multistage_files_are_refused_by_name(tmp_path, text, words):
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_stages(path, tmp_path / "out")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_multistage_file_given_as_one_recipe_is_refused_with_the_way_to_run_it(tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(EXAMPLE.read_text())
    with pytest.raises(RecipeError, match="multi-stage"):
        load_recipe(path)


def test_merge_file_runs_a_single_recipe_or_every_stage(workdir):
    from mergeline.merge.multistage import merge_file

    out = merge_file(workdir / EXAMPLE.name, workdir / "final", device="cpu", progress=False)
    assert out.path == workdir / "final" and (workdir / ".final.stages" / "ties-mix" / "model.safetensors").is_file()
    single = workdir / "single.yaml"
    single.write_text(EXAMPLE.read_text().split("---")[0].replace("name: ties-mix\n", ""))
    out = merge_file(single, workdir / "single_out", device="cpu", progress=False)
    assert out.method == "ties" and not (workdir / ".single_out.stages").exists()
