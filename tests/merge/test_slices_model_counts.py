"""Slices that list different numbers of models (merge/frankenmerge.py): each slice merges its own
sources, as mergekit does, and the tensors must be mergekit 0.1.5's within 1e-6 (float32),
including mergekit's rule for the final norm and head (the last slice's models, as many as the
first slice lists).

    nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider tests/merge/test_slices_model_counts.py
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")

from mergeline.merge.executor import run_merge  # noqa: E402
from mergeline.merge.plan import MergeError  # noqa: E402
from tests.merge._llama import build_llamas, mergekit_merge, read_all  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return {k: str(v) for k, v in build_llamas(tmp_path_factory.mktemp("counts"), seed=99).items()}


def src(ref, lo, hi, **params):
    return {"model": ref, "layer_range": [lo, hi], **({"parameters": params} if params else {})}


def recipes(m: dict[str, str]) -> dict[str, dict]:
    b, a, bb, c = m["base"], m["ft_a"], m["ft_b"], m["ft_c"]
    return {
        # one model, then two: the head comes from the last slice's FIRST model only (mergekit)
        "linear_one_then_two": {"merge_method": "linear", "dtype": "float32", "slices": [
            {"sources": [src(a, 0, 1, weight=1.0)]},
            {"sources": [src(a, 1, 3, weight=0.6), src(bb, 1, 3, weight=0.4)]}]},
        # four models (base first), then two: a TIES merge that narrows
        "ties_four_then_two": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                               "parameters": {"density": 0.5, "normalize": True}, "slices": [
            {"sources": [src(b, 0, 2), src(a, 0, 2, weight=0.5), src(bb, 0, 2, weight=0.3), src(c, 0, 2, weight=0.2)]},
            {"sources": [src(b, 2, 3), src(c, 2, 3, weight=1.0)]}]},
        # a stack that widens and repeats a layer, the base listed last in the first slice
        "task_arithmetic_two_then_three": {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
                                           "slices": [
            {"sources": [src(a, 0, 2, weight=0.7), src(b, 0, 2)]},
            {"sources": [src(b, 1, 3), src(a, 1, 3, weight=0.5), src(bb, 1, 3, weight=[0.2, 0.9])]}]},
    }


@pytest.mark.parametrize("name", list(recipes({k: k for k in ("base", "ft_a", "ft_b", "ft_c")})))
def test_slices_of_different_sizes_match_mergekit(name, models, tmp_path, caplog):
    recipe = recipes(models)[name]
    mergekit_merge(recipe, tmp_path / "theirs")
    with caplog.at_level(logging.WARNING, logger="mergeline.merge.frankenmerge"):
        out = run_merge(recipe, tmp_path / "ours", device="cpu", progress=False, lineage=False)
    theirs, ours = read_all(tmp_path / "theirs"), read_all(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=lambda msg, k=k: f"{name} {k}: {msg}")
    layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in recipe["slices"])
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == layers
    # the layers of a one-model slice are that model's own; of a wider slice, a real merge
    narrow = len(recipe["slices"][0]["sources"]) < len(recipe["slices"][-1]["sources"])
    assert ("final norm and head merge only the first" in caplog.text) == narrow
    assert out.stats["models"]  # merge_stats.json names the slots it merged


def test_a_head_that_would_leave_out_the_base_is_refused(models, tmp_path):
    """mergekit merges the head from the first len(slices[0]) models of the last slice; when that
    leaves out the base, mergeline refuses with the reason instead of merging without a base."""
    b, a, bb = models["base"], models["ft_a"], models["ft_b"]
    recipe = {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32", "slices": [
        {"sources": [src(b, 0, 1), src(a, 0, 1, weight=1.0)]},
        {"sources": [src(a, 1, 3, weight=0.5), src(bb, 1, 3, weight=0.5), src(b, 1, 3)]}]}
    with pytest.raises(MergeError, match=r"slices\[1\].*leaves out the base"):
        run_merge(recipe, tmp_path / "ours", device="cpu", progress=False, lineage=False)
    assert not (tmp_path / "ours").exists()
