"""The tuning benchmark's conflicting set (benchmarks/conflicting_set.py) is measured, not
assumed: a set whose fine-tunes did not learn, or whose merge does not interfere, is refused,
and nothing is left where the set would go."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import conflicting_set  # noqa: E402

from mergeline.zoo.merges import ZooBuildError  # noqa: E402


def figures(rates: dict[str, float], retention: float) -> dict:
    return {"sign_conflict_by_layer": rates, "methods": {"ties": {"mean_retention": retention}}}


def test_interfering_figures_pass():
    conflicting_set.check_conflicting(figures({"0": 0.29, "1": 0.31}, 0.48))


def test_a_layer_without_conflicts_is_named():
    with pytest.raises(ZooBuildError, match=r"layers \{'1': 0.01\}"):
        conflicting_set.check_conflicting(figures({"0": 0.29, "1": 0.01}, 0.48))


def test_a_merge_that_keeps_the_skills_is_not_conflicting():
    with pytest.raises(ZooBuildError, match="keeps mean retention 0.9"):
        conflicting_set.check_conflicting(figures({"0": 0.29}, 0.9))


def test_the_cache_key_follows_the_training(zoo):
    spec = dict(conflicting_set.FINETUNE)
    assert conflicting_set.input_hash(zoo, spec) != conflicting_set.input_hash(zoo, {**spec, "steps": 20})


@pytest.mark.slow
def test_fine_tunes_that_did_not_learn_are_refused_and_nothing_is_left(zoo, tmp_path):
    target = tmp_path / "set"
    with pytest.raises(ZooBuildError, match=r"fine-tune 'addition' scores .* on its task 'zoo_addition'"):
        conflicting_set.build_set(zoo, {**conflicting_set.FINETUNE, "steps": 10}, out_dir=target)
    assert list(tmp_path.iterdir()) == []
