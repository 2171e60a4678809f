"""evaluation.stats against the figures in shared/notes/statistics.md and library references."""
import numpy as np
import pytest

from evaluation import stats


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


def test_no_discordant_items_gives_a_zero_width_difference():
    d = stats.paired_difference(np.ones(10), np.ones(10))
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)


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


def test_items_needed_follows_the_normal_approximation():
    # p = 0.9, distance 0.05 to the threshold: n = 1.96^2 * 0.09 / 0.0025 = 138.3 -> 139
    assert stats.items_needed(0.3, 0.05) == 139
    assert stats.items_needed(0.3, 0.0) is None


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="finite"):
        stats.mean([0.5, float("nan")])
