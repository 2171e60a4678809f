"""evaluation.stats against the figures in shared/notes/statistics.md and library references."""
import numpy as np
import pytest

from mergeline.evaluation import stats


def test_wilson_matches_the_reference_figures():
    i = stats.proportion(37, 40)
    assert i.method == "wilson" and i.n == 40
    assert (round(i.low, 2), round(i.high, 2)) == (0.80, 0.97)
    j = stats.proportion(93, 100)
    assert (round(j.low, 2), round(j.high, 2)) == (0.86, 0.97)


def test_binary_paired_difference_agrees_with_mcnemar():
    # 100 items, 5 discordant and all one way: 0.93 vs 0.98, exact McNemar p = 0.0625.
    a = np.r_[np.ones(93), np.zeros(7)]
    b = np.r_[np.ones(98), np.zeros(2)]
    d = stats.paired_difference(a, b)
    assert d.estimate == pytest.approx(-0.05)
    assert d.low < 0 < d.high, "five discordant items must not settle a difference"
    assert stats.mcnemar_p(a, b) == pytest.approx(0.0625)
    # Eighteen discordant items all one way do.
    a = np.r_[np.ones(80), np.zeros(20)]
    d = stats.paired_difference(a, b)
    assert d.high < 0 and stats.mcnemar_p(a, b) < 0.001


def test_agreement_on_few_items_does_not_settle_a_small_margin():
    # 40 items, both models right on the same 39: no discordant item, yet 40 items cannot show
    # that the difference is within 0.05 (Newcombe's interval: about +-0.08).
    a = np.r_[np.ones(39), np.zeros(1)]
    d = stats.paired_difference(a, a.copy())
    assert d.estimate == 0 and d.low < -0.05 and d.high > 0.05
    # 400 such items do.
    a = np.r_[np.ones(390), np.zeros(10)]
    d = stats.paired_difference(a, a.copy())
    assert -0.05 < d.low < 0 < d.high < 0.05


def test_binary_difference_approaches_the_normal_interval_on_many_items():
    # 2000 items, 150 right only for a, 100 only for b: the paired Wald interval is
    # d +- 1.96 sqrt(((b + c) / n - d^2) / n); the score interval agrees to within 0.002.
    n, only_a, only_b = 2000, 150, 100
    a = np.r_[np.ones(1200), np.ones(only_a), np.zeros(only_b), np.zeros(n - 1200 - only_a - only_b)]
    b = np.r_[np.ones(1200), np.zeros(only_a), np.ones(only_b), np.zeros(n - 1200 - only_a - only_b)]
    d = stats.paired_difference(a, b)
    est = (only_a - only_b) / n
    half = 1.959964 * (((only_a + only_b) / n - est ** 2) / n) ** 0.5
    assert d.estimate == pytest.approx(est)
    assert d.low == pytest.approx(est - half, abs=2e-3) and d.high == pytest.approx(est + half, abs=2e-3)


def test_bootstrap_for_continuous_metrics_is_reproducible_and_covers_the_mean():
    x = np.random.default_rng(1).normal(0.5, 0.1, size=200)
    i, j = stats.mean(x), stats.mean(x)
    assert i == j and i.method == "bootstrap"
    assert i.low < x.mean() < i.high and i.high - i.low < 0.05
    y = x + 0.2
    d = stats.paired_difference(y, x)
    assert d.method == "paired bootstrap" and d.low == pytest.approx(0.2) and d.high == pytest.approx(0.2)


def test_paired_ratio_is_the_retention_interval():
    ft = np.r_[np.ones(90), np.zeros(10)]
    merged = ft.copy()
    merged[:30] = 0
    r = stats.paired_ratio(merged, ft)
    assert r.estimate == pytest.approx(60 / 90)
    assert r.low < r.estimate < r.high < 1
    assert stats.paired_ratio(np.ones(5), np.zeros(5)).estimate is None
    # 19 of 20 kept: no narrower than the Wilson interval of 19/20 (0.76 to 0.99).
    ft, merged = np.ones(20), np.r_[np.ones(19), np.zeros(1)]
    assert stats.paired_ratio(merged, ft).low <= 0.77


def test_items_needed_follows_the_normal_approximation():
    # p = 0.9, distance 0.05 to the threshold: n = 1.96^2 * 0.09 / 0.0025 = 138.3 -> 139
    assert stats.items_needed(0.3, 0.05) == 139
    assert stats.items_needed(0.3, 0.0) is None


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="finite"):
        stats.mean([0.5, float("nan")])
