import math

import numpy as np
import pytest

import _eval_synthetic as syn
from mergeline.evaluation import metrics


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
    # facts 0.95 vs reverse 0.10: gap 0.85, intervals apart; addition 0.5 is 0.45 below facts (< gap 0.5)
    assert i["kept"] == ["facts"] and i["lost"] == ["reverse"] and i["flag"] is True
    assert i["pairs"] == [{"kept": "facts", "lost": "reverse", "gap": pytest.approx(0.85)}]
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


# ---- intervals from the per-item results

def test_every_number_has_its_interval_and_the_intervals_agree_with_the_points(frames):
    primary, samples, suite, types = frames
    ev = metrics.Evidence.from_frames(samples, syn.table().scores)
    ties = metrics.candidate_axes(primary, samples, suite, "ties", syn.STATS["ties"], types, evidence=ev)
    for r in ties["retention"]:
        assert r["retention_interval"]["estimate"] == pytest.approx(r["retention"])
        assert r["retention_interval"]["method"] == "paired score"          # 0/1 items
        assert r["difference_interval"]["estimate"] == pytest.approx(-r["drop"])
        assert r["difference_interval"]["method"] == "paired score"      # 0/1 items
        assert r["retention_interval"]["low"] <= r["retention"] <= r["retention_interval"]["high"]
        assert r["seed_spread"] is None                                   # one seed
    [reg] = ties["regression"]
    assert reg["delta_interval"]["estimate"] == pytest.approx(reg["delta"]) and reg["delta_interval"]["n"] == syn.N_ITEMS
    s = ties["summary"]
    assert s["mean_retention_interval"]["estimate"] == pytest.approx(s["mean_retention"])
    assert s["mean_retention_interval"]["n"] == 3 * syn.N_ITEMS          # pooled over the three tasks
    assert s["mean_regression_interval"]["estimate"] == pytest.approx(s["mean_regression"])
    # per model: retention beside the share its kept deltas lost in the sign election
    per = {m["finetune"]: m for m in ties["interference"]["per_model"]}
    assert per["facts"]["dropped_fraction_of_kept"] == pytest.approx(0.2)
    assert per["facts"]["retention_interval"]["estimate"] == pytest.approx(0.85)
    assert ties["sign_conflict"]["elects_signs"] is True


def test_baseline_difference_is_paired_over_the_pooled_items(frames):
    primary, samples, suite, types = frames
    ev = metrics.Evidence.from_frames(samples)
    axes = {c: metrics.candidate_axes(primary, samples, suite, c, None, types, evidence=ev) for c in ("ties", "linear")}
    iv = metrics.baseline_intervals(ev, suite, axes["ties"], "ties", "linear")
    [cmp] = metrics.compare_baselines({c: a["summary"] for c, a in axes.items()}, "ties", {"linear": iv})
    assert cmp["difference_interval"]["estimate"] == pytest.approx(cmp["difference"])
    assert cmp["difference_interval"]["low"] > 0                         # 0.90 vs 0.52 on 60 items: settled
    assert cmp["regression_difference_interval"]["estimate"] == pytest.approx(cmp["regression_difference"])


def test_weighted_difference_keeps_the_exact_interval_under_one_scale():
    from mergeline.evaluation import stats

    a, b = np.array(syn.first_right(93, 100)), np.array(syn.first_right(98, 100))
    one = metrics._weighted_difference([(a, b, 2.0)], 0.95)
    assert one == stats.paired_difference(a, b)                            # one task: the exact interval itself
    two = metrics._weighted_difference([(a, b, 1.0), (a[:50], b[:50], 1.0)], 0.95)
    assert two.estimate == pytest.approx(((a.mean() - b.mean()) + (a[:50].mean() - b[:50].mean())) / 2)
    assert two.method == "paired bootstrap"                                # unequal sizes: scaled items


def test_seed_spread_beside_the_item_interval():
    """A merge made once per seed (DARE): its scores differ across seeds; the spread is reported."""
    n = 40
    both = lambda k: {0: syn.first_right(k, n), 1: syn.first_right(k, n)}  # noqa: E731  a fixed model
    items = {"base": {"t": both(10)}, "ft": {"t": both(40)},
             "dare_ties": {"t": {0: syn.first_right(30, n), 1: syn.first_right(34, n)}}}
    t = syn.table_from_items(items)
    s = syn.suite({"retention": {"ft": ["t"]}, "seeds": [0, 1]})
    ev = metrics.Evidence.from_frames(t.samples, t.scores)
    spread = ev.spread("dare_ties", "t")
    assert spread["seeds"] == [0, 1] and spread["min"] == pytest.approx(0.75) and spread["max"] == pytest.approx(0.85)
    assert spread["std"] == pytest.approx(np.std([0.75, 0.85], ddof=1))
    axes = metrics.candidate_axes(metrics.primary_scores(t.scores), t.samples, s, "dare_ties", evidence=ev)
    [r] = axes["retention"]
    assert r["seed_spread"]["values"] == pytest.approx([0.75, 0.85])
    # items where the seeds disagree are half right: the interval comes from the bootstrap
    assert r["retention_interval"]["estimate"] == pytest.approx(0.8)
    assert ev.spread("ft", "t") is not None and ev.spread("ft", "t")["std"] == 0


def test_sign_election_applies_only_to_methods_that_elect_signs():
    assert metrics.elects_signs("dare_ties") and metrics.elects_signs("della")
    assert metrics.elects_signs("linear") is False and metrics.elects_signs(None) is None
    assert metrics.sign_conflict(syn.merge_stats("task_arithmetic", {"a": 0.1}))["elects_signs"] is False
