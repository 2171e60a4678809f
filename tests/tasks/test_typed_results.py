"""The merge and check stages hand on typed results (issue #13): a MergeOutcome and a CompatReport,
on real tiny models; a folder found finished comes back as the same typed result, marked reused."""
import pytest
from pydantic import ValidationError

from mergeline.merge.compat.report import CompatReport
from mergeline.tasks.check_tasks import check_compat
from mergeline.tasks.merge_tasks import MergeOutcome, merge_key, merge_model
from mergeline.tasks.recipes import resolved_recipe


def _recipe(m):
    return resolved_recipe({"merge_method": "ties", "base_model": str(m["base"]), "parameters": {"density": 0.5},
                            "models": [{"model": str(m[k]), "parameters": {"weight": 0.5}} for k in ("ft_a", "ft_b")]})


def test_merge_returns_a_merge_outcome_and_reuses_a_finished_folder(tiny_models, tmp_path):
    recipe = _recipe(tiny_models)
    first = merge_model.fn(name="ties", recipe=recipe, models_dir=str(tmp_path), key=merge_key(recipe, 0))
    assert isinstance(first, MergeOutcome) and first.name == "ties" and first.method == "ties"
    assert not first.reused and first.seconds > 0 and first.path.is_dir()
    assert first.stats is not None and 0 <= first.stats.sign_conflict_rate <= 1

    again = merge_model.fn(name="ties", recipe=recipe, models_dir=str(tmp_path), key=merge_key(recipe, 0))
    assert again.reused and again.seconds == 0.0
    assert (again.path, again.content_hash, again.stats) == (first.path, first.content_hash, first.stats)

    with pytest.raises(ValidationError, match="stats_dict"):  # unknown keys are refused, named
        MergeOutcome.model_validate({**first.model_dump(), "stats_dict": {}})


def test_check_returns_the_compat_report(tiny_models):
    report = check_compat.fn(_recipe(tiny_models))
    assert isinstance(report, CompatReport) and report.status in ("pass", "warn")
    assert not report.failed()
