import math

import pytest

import _eval_synthetic as syn
from evaluation import metrics


@pytest.fixture
def frames():
    t = syn.table()
    return metrics.primary_scores(t.scores), t.samples, syn.suite(), t.task_types


def test_retention_is_merged_over_finetune_with_drop(frames):
    primary, _, suite, types = frames
    r = metrics.retention(primary, suite, "ties", task_types=types).set_index("task")
    assert r.loc["t_add", "retention"] == pytest.approx(0.95)
    assert r.loc["t_rev", "drop"] == pytest.approx(0.10)
    assert r.loc["t_facts", "finetune"] == "facts"
    assert r.loc["t_facts", "task_type"] == "multiple_choice"
    assert r.loc["t_add", "base_score"] == pytest.approx(0.05)


def test_retention_undefined_when_finetune_scores_zero(frames):
    primary, _, suite, _ = frames
    primary = primary.copy()
    primary.loc[(primary.model == "reverse") & (primary.task == "t_rev"), "value"] = 0.0
    r = metrics.retention(primary, suite, "ties").set_index("task")
    assert math.isnan(r.loc["t_rev", "retention"])


def test_missing_score_names_the_model_and_task(frames):
    primary, _, suite, _ = frames
    with pytest.raises(KeyError, match="nobody.*t_add"):
        metrics.retention(primary, suite, "nobody")


def test_regression_is_merged_minus_base(frames):
    primary, _, suite, _ = frames
    reg = metrics.regression(primary, suite, "linear")
    assert reg["delta"].tolist() == pytest.approx([-0.10])


def test_flips_join_on_task_and_doc_id(frames):
    _, samples, suite, _ = frames
    f = metrics.flips(samples, suite, "linear").set_index("task")
    # reverse: fine-tune right on all 20, linear right on the first 2 -> 18 flips
    assert f.loc["t_rev", "flips"] == 18 and f.loc["t_rev", "reference"] == "reverse"
    assert f.loc["t_rev", "flip_rate"] == pytest.approx(0.9)
    # general task: reference is the base (16 right); linear right on 14 -> 2 flips, 0 gains
    assert (f.loc["t_gen", "reference"], f.loc["t_gen", "flips"], f.loc["t_gen", "gains"]) == ("base", 2, 0)
    assert (f["items"] == syn.N_ITEMS).all()


def test_interference_flags_kept_one_lost_another(frames):
    primary, samples, suite, types = frames
    lin = metrics.candidate_axes(primary, samples, suite, "linear", None, types)
    i = lin["interference"]
    assert i["kept"] == ["facts"] and i["lost"] == ["addition", "reverse"] and i["flag"] is True
    assert i["spread"]["min"] == pytest.approx(0.1) and i["spread"]["max"] == pytest.approx(0.95)
    assert i["by_type"]["generation"]["mean_retention"] == pytest.approx(0.3)
    assert i["by_type"]["multiple_choice"]["mean_retention"] == pytest.approx(0.95)
    assert i["by_type"]["multiple_choice"]["mean_regression"] == pytest.approx(-0.1)
    ties = metrics.candidate_axes(primary, samples, suite, "ties", syn.STATS["ties"], types)
    assert ties["interference"]["flag"] is False
    assert ties["summary"]["mean_retention"] == pytest.approx(0.9)


def test_sign_conflict_proxy_from_merge_stats():
    sc = metrics.sign_conflict(syn.STATS["ties"])
    assert sc["available"] and sc["rate"] == pytest.approx(0.12)
    assert sc["per_model"]["facts"]["dropped_fraction_of_kept"] == pytest.approx(0.2)
    assert sc["per_model"]["facts"]["dropped_magnitude_share"] == pytest.approx(0.1)
    assert sc["max_dropped_fraction"] == pytest.approx(0.2)
    assert set(sc["per_layer"]) == {"embed", "0", "1", "2", "head"}
    assert metrics.sign_conflict(None)["available"] is False


def test_baseline_comparison_answers_ties_vs_averaging(frames):
    primary, samples, suite, types = frames
    summ = {c: metrics.candidate_axes(primary, samples, suite, c, None, types)["summary"] for c in ("ties", "linear")}
    [cmp] = metrics.compare_baselines(summ, "ties")
    assert cmp["baseline"] == "linear" and cmp["primary_beats"] is True
    assert cmp["difference"] == pytest.approx(0.9 - (0.5 + 0.1 + 0.95) / 3)
