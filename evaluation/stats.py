"""Intervals for every number the gate uses (shared/notes/statistics.md).

Evaluation items are samples: "0.925 on 40 items" is 37 items, and a gate that compares point
estimates flips on a handful of them. Every score and every difference therefore carries an
interval, computed by a kept library:

- one model's score on n items: the Wilson score interval when every item is 0 or 1
  (statsmodels' `proportion_confint`), else a percentile bootstrap over items (scipy);
- two models on the same items (retention, regression, candidate vs baseline): paired. For 0/1
  items the difference is (b - c) / n over the b + c discordant items (right for one model,
  wrong for the other). Its interval is the wider of two: Newcombe's hybrid score interval for
  paired proportions (1998, method 10; built from statsmodels' Wilson bounds of each model's
  score and their correlation), which stays honest about magnitude when few items disagree
  (40 items all alike: about +-0.08, not 0); and the exact interval conditional on the
  discordant items (Clopper-Pearson on b among b + c), which excludes zero exactly when
  McNemar's exact test rejects (5 discordant items out of 100, all one way: p = 0.0625, not
  settled, where Newcombe's alone would call it). The ratio of means (retention) of 0/1 items
  is 1 + difference / reference score, on the same interval. For other metrics, a paired
  percentile bootstrap over items (`scipy.stats.bootstrap(paired=True)`).
- the items per task that would settle a rule at the observed effect: n = (z * sd / d)^2.

The bootstrap draws from a fixed seed, so a report is reproducible bit for bit.

    python -m mergeline.evaluation.stats 37 40          # Wilson interval of 37 right out of 40
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

DEFAULT_CONFIDENCE = 0.95
RESAMPLES = 2000  # percentile bootstrap: enough for the 2.5% and 97.5% points on a few hundred items
SEED = 0


class Interval(BaseModel):
    """An estimate with its interval at `confidence`; None bounds when the data cannot give one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    estimate: float | None
    low: float | None
    high: float | None
    confidence: float
    method: str
    n: int

    def text(self, digits: int = 3) -> str:
        """'0.925 [0.801, 0.974]' (or '–' without an estimate)."""
        if self.estimate is None:
            return "–"
        if self.low is None or self.high is None:
            return f"{self.estimate:.{digits}f}"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


def _array(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"expected one value per item, got an array of shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("per-item values must be finite")
    return a


def is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def proportion(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """k successes out of n items: the Wilson score interval."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return Interval(estimate=None, low=None, high=None, confidence=confidence, method="wilson", n=0)
    low, high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    return Interval(estimate=k / n, low=float(low), high=float(high), confidence=confidence, method="wilson", n=n)


def mean(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The mean of per-item values: Wilson for 0/1 items, else a percentile bootstrap."""
    a = _array(values)
    if is_binary(a):
        return proportion(int(a.sum()), len(a), confidence)
    return _bootstrap((a,), np.mean, confidence, paired=False)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """mean(a) - mean(b) for two models scored on the same items (see the module docstring)."""
    a, b = _pair(a, b)
    if len(a) and is_binary(a) and is_binary(b):
        return _binary_difference(a, b, confidence)
    return _bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), confidence)


def paired_ratio(a: Sequence[float], b: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """mean(a) / mean(b) on the same items; no estimate where mean(b) is 0."""
    a, b = _pair(a, b)
    if len(a) and is_binary(a) and is_binary(b):
        ref = b.mean()
        if ref == 0:
            return Interval(estimate=None, low=None, high=None, confidence=confidence, method="paired score", n=len(a))
        d = _binary_difference(a, b, confidence)
        return Interval(estimate=a.mean() / ref, low=1 + d.low / ref, high=1 + d.high / ref,
                        confidence=confidence, method="paired score", n=len(a))

    def ratio(x, y, axis=-1):
        den = y.mean(axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, x.mean(axis=axis) / np.where(den > 0, den, 1.0), np.nan)

    return _bootstrap((a, b), ratio, confidence)


def _binary_difference(a: np.ndarray, b: np.ndarray, confidence: float) -> Interval:
    """The wider of Newcombe's hybrid score interval and the exact conditional interval."""
    from statsmodels.stats.proportion import proportion_confint

    n = len(a)
    both, only_a = int(((a == 1) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    only_b, neither = int(((a == 0) & (b == 1)).sum()), int(((a == 0) & (b == 0)).sum())
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    estimate = p1 - p2
    # Newcombe (1998), method 10: Wilson bounds of each score, joined through their correlation.
    l1, u1 = proportion_confint(both + only_a, n, alpha=1 - confidence, method="wilson")
    l2, u2 = proportion_confint(both + only_b, n, alpha=1 - confidence, method="wilson")
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    low, high = estimate - down, estimate + up
    # Exact, conditional on the discordant items: agrees with McNemar's exact test.
    m = only_a + only_b
    if m:
        lo, hi = proportion_confint(only_a, m, alpha=1 - confidence, method="beta")
        low, high = min(low, m * (2 * float(lo) - 1) / n), max(high, m * (2 * float(hi) - 1) / n)
    return Interval(estimate=estimate, low=max(-1.0, low), high=min(1.0, high), confidence=confidence,
                    method="paired score", n=n)


def mcnemar_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Exact two-sided McNemar test on 0/1 items; None when the items are not 0/1."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = _pair(a, b)
    if not (is_binary(a) and is_binary(b)):
        return None
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    if only_a + only_b == 0:
        return 1.0
    both, neither = int(((a == 1) & (b == 1)).sum()), int(((a == 0) & (b == 0)).sum())
    return float(mcnemar([[both, only_a], [only_b, neither]], exact=True).pvalue)


def items_needed(sd: float, distance: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """Items at which an interval of per-item spread `sd` is narrower than `distance` on each
    side, i.e. would settle a threshold that far from the estimate. None when the estimate sits
    on the threshold (no number of items settles it) or there is no spread."""
    from scipy.stats import norm

    if distance <= 0 or not math.isfinite(distance) or sd <= 0:
        return None
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    return math.ceil((z * sd / distance) ** 2)


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a), _array(b)
    if len(a) != len(b):
        raise ValueError(f"paired values need the same items: {len(a)} against {len(b)}")
    return a, b


def _bootstrap(data: tuple[np.ndarray, ...], statistic, confidence: float, paired: bool = True) -> Interval:
    from scipy.stats import bootstrap

    n = len(data[0])
    method = "paired bootstrap" if len(data) > 1 else "bootstrap"
    if n == 0:
        return Interval(estimate=None, low=None, high=None, confidence=confidence, method=method, n=0)
    estimate = float(statistic(*data, axis=-1))
    if not math.isfinite(estimate):
        return Interval(estimate=None, low=None, high=None, confidence=confidence, method=method, n=n)
    if n < 2 or all(np.ptp(d) == 0 for d in data):
        # Every item alike: the resamples all equal the estimate.
        return Interval(estimate=estimate, low=estimate, high=estimate, confidence=confidence, method=method, n=n)
    res = bootstrap(data, statistic, paired=paired and len(data) > 1, vectorized=True, n_resamples=RESAMPLES,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(SEED))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return Interval(estimate=estimate, low=None, high=None, confidence=confidence, method=method, n=n)
    return Interval(estimate=estimate, low=low, high=high, confidence=confidence, method=method, n=n)


if __name__ == "__main__":
    print(proportion(int(sys.argv[1]), int(sys.argv[2])).text())
