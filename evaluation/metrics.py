"""The four axes that say whether a merge kept what its inputs knew, each number with its interval.

1. Retention (per fine-tune task): merged score / fine-tune score on that fine-tune's own task,
   plus the absolute drop (fine-tune - merged). TIES' own yardstick is "normalized accuracy",
   the same ratio (Yadav et al., 2023, arXiv:2306.01708, section 6).
2. Regression (per general task): merged score - base score; negative means the merge broke
   something the base could do.
3. Interference: retention broken down by task type (generation vs multiple choice), the spread
   of retentions (min/max/std), per-sample flips (items the reference got right and the merge
   got wrong, joined on task + doc_id), and the interference flag, read from the pattern: some
   fine-tune's retention is significantly above another's (their intervals do not overlap) by
   a large gap (>= `INTERFERENCE_GAP`, 0.5): the merge keeps one skill and loses another.
   Beside each fine-tune's retention, the share of its kept deltas that sign election dropped:
   the model that loses most coordinates in the election is the one whose skill is not inherited.
4. Sign-conflict proxy (from merge_stats.json): per model, the fraction of its kept (trimmed)
   deltas that sign election dropped and their share of its kept magnitude, and the overall
   rate of coordinates whose kept deltas disagree in sign. Only methods that elect signs
   (`SIGN_ELECTING_METHODS`) have one.

Every number carries an interval (`evaluation.stats`) built from the per-item results the runs
log (`ScoreTable.samples`). An item's value is its `correct` averaged over seeds, so it stays 0/1
(Wilson, paired score intervals) when the seeds agree. Two models on one task are paired on
doc_id. A mean over several tasks (mean retention, mean regression, a candidate against a
baseline) pools the items of all tasks, each item weighted so that the plain mean over the pooled
items equals the mean over tasks (`_weighted_difference`, `_weighted_ratio`). With several seeds,
`seed_spread` gives min/max/std of the score across seeds beside the item interval (for DARE and
DELLA, seed k is merge seed k).

All functions are pure: frames and dicts in, frames and dicts out.

    python -m mergeline.evaluation.metrics MERGE_STATS.json     # print the sign-conflict proxy
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mergeline.evaluation import stats
from mergeline.evaluation.suite import EvalSuite

INTERFERENCE_GAP = 0.5
# Methods whose merge elects a sign per coordinate; only they have a sign-conflict proxy.
SIGN_ELECTING_METHODS = ("ties", "dare_ties", "breadcrumbs_ties", "della")


def primary_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """model, task -> value: the primary metric, mean over seeds."""
    p = scores[scores["primary"].astype(bool)]
    return p.groupby(["model", "task"], as_index=False, sort=False)["value"].mean()


def _lookup(primary: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(m, t): float(v) for m, t, v in primary[["model", "task", "value"]].itertuples(index=False)}


# ---------------------------------------------------------------- evidence: items and seeds

@dataclass
class Evidence:
    """What the intervals are built from.

    items:    (model, task) -> doc_id -> correct, averaged over seeds
    per_seed: (model, task) -> seed -> primary score (from the scores table, else the samples)
    """
    items: dict[tuple[str, str], pd.Series] = field(default_factory=dict)
    per_seed: dict[tuple[str, str], pd.Series] = field(default_factory=dict)
    confidence: float = stats.DEFAULT_CONFIDENCE

    @classmethod
    def from_frames(cls, samples: pd.DataFrame, scores: pd.DataFrame | None = None,
                    confidence: float = stats.DEFAULT_CONFIDENCE) -> "Evidence":
        s = samples[["model", "task", "doc_id", "correct", "seed"]].copy() if len(samples) else None
        items, per_seed = {}, {}
        if s is not None:
            s["correct"] = pd.to_numeric(s["correct"], errors="coerce")
            s = s.dropna(subset=["correct"])
            s["doc_id"] = s["doc_id"].astype(str)
            for (m, t), g in s.groupby(["model", "task"], sort=False):
                items[(m, t)] = g.groupby("doc_id", sort=False)["correct"].mean()
                per_seed[(m, t)] = g.groupby("seed")["correct"].mean()
        if scores is not None and len(scores):
            p = scores[scores["primary"].astype(bool)]
            for (m, t), g in p.groupby(["model", "task"], sort=False):
                per_seed[(m, t)] = g.groupby("seed")["value"].mean()
        return cls(items=items, per_seed=per_seed, confidence=confidence)

    def aligned(self, task: str, *models: str) -> list[np.ndarray]:
        """The items of `task` that every model answered, in one order, one array per model."""
        series = [self.items.get((m, task), pd.Series(dtype=float)) for m in models]
        common = series[0].index
        for s in series[1:]:
            common = common.intersection(s.index)
        return [s.loc[common].to_numpy(dtype=float) for s in series]

    def score(self, model: str, task: str) -> dict:
        a, = self.aligned(task, model)
        return stats.mean(a, self.confidence).model_dump()

    def spread(self, model: str, task: str, other: str | None = None, op=None) -> dict | None:
        """min/max/std across seeds of a score (or of op(score, other's score), seed k with k)."""
        mine = self.per_seed.get((model, task))
        if mine is None:
            return None
        if other is not None:
            theirs = self.per_seed.get((other, task))
            if theirs is None:
                return None
            seeds = mine.index.intersection(theirs.index)
            values = pd.Series([op(mine[k], theirs[k]) for k in seeds], index=seeds, dtype=float).dropna()
        else:
            values = mine.dropna()
        if len(values) < 2:
            return None
        return {"seeds": [int(k) for k in values.index], "values": [float(v) for v in values],
                "min": float(values.min()), "max": float(values.max()), "std": float(values.std(ddof=1))}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _none(confidence: float, method: str) -> stats.Interval:
    return stats.Interval(estimate=None, low=None, high=None, confidence=confidence, method=method, n=0)


def _scaled(iv: stats.Interval, c: float) -> stats.Interval:
    def s(x):
        return None if x is None else x * c
    return iv.model_copy(update={"estimate": s(iv.estimate), "low": s(iv.low), "high": s(iv.high)})


def _weighted_difference(chunks: list[tuple[np.ndarray, np.ndarray, float]], confidence: float) -> stats.Interval:
    """(1/W) sum_t w_t (mean(a_t) - mean(b_t)), W = sum_t w_t, from the pooled items of all tasks.

    Item i of task t is scaled by c_t = N w_t / (W n_t) (N pooled items, n_t in task t), so the
    plain mean over the pooled items is the weighted mean over tasks. When every c_t is the same
    (one task, or equal weights and sizes) the unscaled items keep their 0/1 values and the exact
    paired interval, scaled by that one c; otherwise the paired bootstrap of the scaled items.
    """
    if not chunks or any(len(a) == 0 for a, _, _ in chunks):
        return _none(confidence, "paired (pooled)")
    n_total, w_total = sum(len(a) for a, _, _ in chunks), sum(w for _, _, w in chunks)
    scales = [n_total * w / (w_total * len(a)) for a, _, w in chunks]
    a_all, b_all = np.concatenate([a for a, _, _ in chunks]), np.concatenate([b for _, b, _ in chunks])
    if np.allclose(scales, scales[0]):
        return _scaled(stats.paired_difference(a_all, b_all, confidence), scales[0])
    c = np.concatenate([np.full(len(a), s) for (a, _, _), s in zip(chunks, scales)])
    return stats.paired_difference(a_all * c, b_all * c, confidence)


def _weighted_ratio(groups: list[tuple[np.ndarray, list[np.ndarray]]], confidence: float) -> stats.Interval:
    """The mean over (fine-tune, task) rows of mean(merged_t) / mean(finetune_r), from pooled items.

    groups: per task t, the merged items and the items of each fine-tune r measured on t (all on
    the same items). With s_r = N / (R n_t mean(f_r)) (R rows, N pooled items), x_i = m_i sum_r s_r
    and y_i = sum_r f_ri s_r: mean(x) / mean(y) is the mean of the per-row retentions, and its
    paired bootstrap over the pooled items carries the uncertainty of both merged and fine-tune.
    A fine-tune that scores 0 on its own task gives no reference and is left out, as in the mean.
    """
    rows = [(m, f) for m, fs in groups for f in fs if len(m) and f.mean() > 0]
    if not rows or any(len(m) == 0 for m, _ in groups):
        return _none(confidence, "paired bootstrap (pooled)")
    n_rows, n_total = len(rows), sum(len(m) for m, _ in groups)
    xs, ys = [], []
    for m, fs in groups:
        scales = [n_total / (n_rows * len(m) * f.mean()) for f in fs if f.mean() > 0]
        if not scales:
            continue
        xs.append(m * sum(scales))
        ys.append(sum(f * s for f, s in zip([f for f in fs if f.mean() > 0], scales)))
    return stats.paired_ratio(np.concatenate(xs), np.concatenate(ys), confidence)


def mean_retention_interval(ev: Evidence, ret: pd.DataFrame) -> dict | None:
    """The interval of the mean of `ret`'s retentions (rows of one candidate), pooled over items."""
    if not len(ret):
        return None
    cand = ret["candidate"].iloc[0]
    groups = []
    for task, g in ret.groupby("task", sort=False):
        arrays = ev.aligned(task, cand, *g["finetune"])
        groups.append((arrays[0], arrays[1:]))
    return _weighted_ratio(groups, ev.confidence).model_dump()


def retention_weights(ret: pd.DataFrame) -> dict[str, float]:
    """task -> sum over its rows of 1 / fine-tune score: the weights that make a pooled difference
    of merged scores the difference of mean retentions."""
    w: dict[str, float] = {}
    for task, ft_score in ret[["task", "finetune_score"]].itertuples(index=False):
        if ft_score and ft_score > 0:
            w[task] = w.get(task, 0.0) + 1.0 / ft_score
    return w


def pooled_difference(ev: Evidence, a: str, b: str, weights: dict[str, float], per: float = 1.0) -> dict:
    """sum_t weights_t (a_t - b_t) / per, paired over the pooled items of the tasks in `weights`."""
    total = sum(weights.values())
    chunks = [(*ev.aligned(t, a, b), w) for t, w in weights.items()]
    iv = _weighted_difference(chunks, ev.confidence)
    # _weighted_difference divides by sum(w); the caller's mean divides by `per` rows instead.
    return _scaled(iv, total / per if per else 1.0).model_dump()


# ---------------------------------------------------------------- the axes

def retention(primary: pd.DataFrame, suite: EvalSuite, candidate: str, base: str = "base",
              task_types: dict[str, str] | None = None, evidence: Evidence | None = None) -> pd.DataFrame:
    s, rows = _lookup(primary), []
    for ft, tasks in suite.retention.items():
        for task in tasks:
            ft_score, merged = s.get((ft, task)), s.get((candidate, task))
            if ft_score is None or merged is None:
                raise KeyError(f"retention: no score for {'fine-tune ' + ft if ft_score is None else candidate!r} on task {task!r}")
            row = {
                "candidate": candidate, "finetune": ft, "task": task,
                "task_type": (task_types or {}).get(task, "unknown"),
                "finetune_score": ft_score, "base_score": s.get((base, task)), "merged_score": merged,
                # A fine-tune that scores 0 on its own task gives no reference: leave it undefined.
                "retention": merged / ft_score if ft_score > 0 else math.nan,
                "drop": ft_score - merged,
                "retention_interval": None, "difference_interval": None, "seed_spread": None,
            }
            if evidence is not None:
                m, f = evidence.aligned(task, candidate, ft)
                row["retention_interval"] = stats.paired_ratio(m, f, evidence.confidence).model_dump()
                row["difference_interval"] = stats.paired_difference(m, f, evidence.confidence).model_dump()
                row["seed_spread"] = evidence.spread(candidate, task, ft, _ratio)
            rows.append(row)
    return pd.DataFrame(rows)


def regression(primary: pd.DataFrame, suite: EvalSuite, candidate: str, base: str = "base",
               task_types: dict[str, str] | None = None, evidence: Evidence | None = None) -> pd.DataFrame:
    s, rows = _lookup(primary), []
    for task in suite.general:
        b, m = s.get((base, task)), s.get((candidate, task))
        if b is None or m is None:
            raise KeyError(f"regression: no score for {base if b is None else candidate!r} on task {task!r}")
        row = {"candidate": candidate, "task": task, "task_type": (task_types or {}).get(task, "unknown"),
               "base_score": b, "merged_score": m, "delta": m - b, "delta_interval": None, "seed_spread": None}
        if evidence is not None:
            mi, bi = evidence.aligned(task, candidate, base)
            row["delta_interval"] = stats.paired_difference(mi, bi, evidence.confidence).model_dump()
            row["seed_spread"] = evidence.spread(candidate, task, base, lambda x, y: x - y)
        rows.append(row)
    return pd.DataFrame(rows, columns=["candidate", "task", "task_type", "base_score", "merged_score", "delta",
                                       "delta_interval", "seed_spread"])


def flips(samples: pd.DataFrame, suite: EvalSuite, candidate: str, base: str = "base",
          evidence: Evidence | None = None) -> pd.DataFrame:
    """Per task: items the reference got right and the merge got wrong (and the reverse).

    The reference is the task's own fine-tune for retention tasks and the base for general
    tasks. An item counts as right when its `correct` value, averaged over seeds, is >= 0.5.
    """
    ev = evidence or Evidence.from_frames(samples)
    owner = suite.task_owner()
    rows = []
    for task in suite.all_tasks():
        ref = owner.get(task, base)
        a, b = ev.aligned(task, ref, candidate)
        ref_ok, merged_ok = a >= 0.5, b >= 0.5
        n_ref_ok = int(ref_ok.sum())
        n_flips = int((ref_ok & ~merged_ok).sum())
        rows.append({"candidate": candidate, "task": task, "reference": ref, "items": len(a),
                     "reference_correct": n_ref_ok, "flips": n_flips, "gains": int((~ref_ok & merged_ok).sum()),
                     "flip_rate": n_flips / n_ref_ok if n_ref_ok else math.nan})
    return pd.DataFrame(rows)


def interference_pattern(per_model: list[dict], gap: float = INTERFERENCE_GAP, use_intervals: bool = True) -> dict:
    """The interference flag, read from the pattern of retentions across fine-tunes.

    A pair (kept, lost) is flagged when kept's retention exceeds lost's by at least `gap` and,
    with intervals, kept's interval lies wholly above lost's (non-overlapping intervals: a
    conservative test, since the two are measured on different items). A pair with the gap but
    overlapping intervals is `suspected`: the items cannot yet tell. Without intervals
    (`use_intervals=False`, a point-estimate gate) the gap alone flags.
    """
    pairs, suspected = [], []
    for a in per_model:
        for b in per_model:
            ra, rb = a.get("retention"), b.get("retention")
            if a is b or ra is None or rb is None or ra - rb < gap:
                continue
            ia, ib = a.get("retention_interval") or {}, b.get("retention_interval") or {}
            settled = (not use_intervals) or (ia.get("low") is not None and ib.get("high") is not None
                                              and ia["low"] > ib["high"])
            (pairs if settled else suspected).append({"kept": a["finetune"], "lost": b["finetune"],
                                                      "gap": ra - rb})
    kept = list(dict.fromkeys(p["kept"] for p in pairs))
    lost = list(dict.fromkeys(p["lost"] for p in pairs))
    by_name = {r["finetune"]: r for r in per_model}

    def show(name):
        r = by_name[name]
        iv = r.get("retention_interval")
        return f"{name} {stats.Interval(**iv).text() if iv and use_intervals else _fmt(r['retention'])}"

    how = "with non-overlapping intervals" if use_intervals else "(point estimates)"
    if pairs:
        text = (f"keeps {', '.join(show(k) for k in kept)} but loses {', '.join(show(l) for l in lost)}: "
                f"retention gap >= {gap} {how}, the pattern of task interference")
    elif suspected:
        text = ("retention gap >= " + str(gap) + " between " +
                "; ".join(f"{p['kept']} and {p['lost']}" for p in suspected) +
                ", but the intervals overlap: the items cannot yet tell")
    else:
        text = f"no fine-tune's retention is above another's by >= {gap}"
    return {"flag": bool(pairs), "kept": kept, "lost": lost, "pairs": pairs, "suspected": suspected,
            "gap": gap, "explanation": text}


def interference(ret: pd.DataFrame, flip_df: pd.DataFrame, reg: pd.DataFrame | None = None,
                 gap: float = INTERFERENCE_GAP, evidence: Evidence | None = None,
                 sign: dict | None = None) -> dict:
    r = ret["retention"].dropna()
    per_ft = ret.groupby("finetune", sort=False)["retention"].mean()
    by_type: dict[str, dict] = {}
    for kind, g in ret.groupby("task_type", sort=False):
        by_type[kind] = {"mean_retention": _f(g["retention"].mean()), "tasks": int(len(g))}
    if reg is not None and len(reg):
        for kind, g in reg.groupby("task_type", sort=False):
            by_type.setdefault(kind, {"mean_retention": None, "tasks": 0})
            by_type[kind]["mean_regression"] = _f(g["delta"].mean())
            by_type[kind]["general_tasks"] = int(len(g))
    dropped = (sign or {}).get("per_model") or {}
    per_model = [{"finetune": ft, "retention": _f(v),
                  "retention_interval": (mean_retention_interval(evidence, ret[ret["finetune"] == ft])
                                         if evidence is not None else None),
                  "dropped_fraction_of_kept": (dropped.get(ft) or {}).get("dropped_fraction_of_kept")}
                 for ft, v in per_ft.items()]
    pattern = interference_pattern(per_model, gap, use_intervals=evidence is not None)
    return {
        "by_type": by_type,
        "spread": {"min": _f(r.min()), "max": _f(r.max()), "mean": _f(r.mean()),
                   "std": _f(r.std(ddof=0)) if len(r) else None},
        "per_finetune": {ft: _f(v) for ft, v in per_ft.items()},
        "per_model": per_model,
        **pattern,
        "flips": _records(flip_df),
        "total_flips": int(flip_df["flips"].sum()) if len(flip_df) else 0,
    }


PER_MODEL_KEYS = ("kept_fraction", "trimmed_fraction", "dropped_fraction_of_kept", "dropped_magnitude_share")


def elects_signs(method: str | None) -> bool | None:
    """Whether `method` elects signs (None: the method is not known)."""
    return None if not method else method.lower() in SIGN_ELECTING_METHODS


def sign_conflict(merge_stats: dict | None) -> dict:
    """The sign-conflict proxy from a merge_stats.json dict (None: not available)."""
    if not merge_stats:
        return {"available": False, "method": None, "elects_signs": None, "rate": None, "per_model": {}, "per_layer": {},
                "max_dropped_fraction": None}
    per_model = {name: {k: _f(v.get(k)) for k in PER_MODEL_KEYS}
                 for name, v in (merge_stats.get("per_model") or {}).items()}
    per_layer = {layer: {name: _f(v.get("dropped_fraction_of_kept")) for name, v in models.items()}
                 for layer, models in (merge_stats.get("per_layer") or {}).items()}
    dropped = [v["dropped_fraction_of_kept"] for v in per_model.values() if v["dropped_fraction_of_kept"] is not None]
    sc = merge_stats.get("sign_conflict") or {}
    method = merge_stats.get("method")
    return {"available": True, "method": method, "elects_signs": elects_signs(method), "rate": _f(sc.get("rate")),
            "per_model": per_model, "per_layer": per_layer,
            "max_dropped_fraction": max(dropped) if dropped else None}


def candidate_axes(primary: pd.DataFrame, samples: pd.DataFrame, suite: EvalSuite, candidate: str,
                   merge_stats: dict | None = None, task_types: dict[str, str] | None = None,
                   base: str = "base", gap: float = INTERFERENCE_GAP, evidence: Evidence | None = None) -> dict:
    """All four axes for one candidate, plus a one-line summary used by the gate and plots."""
    ev = evidence or Evidence.from_frames(samples)
    ret = retention(primary, suite, candidate, base, task_types, ev)
    reg = regression(primary, suite, candidate, base, task_types, ev)
    fl = flips(samples, suite, candidate, base, ev)
    sc = sign_conflict(merge_stats)
    inter = interference(ret, fl, reg, gap, ev, sc)
    summary = {
        "mean_retention": inter["spread"]["mean"], "min_retention": inter["spread"]["min"],
        "mean_retention_interval": mean_retention_interval(ev, ret),
        "mean_regression": _f(reg["delta"].mean()) if len(reg) else None,
        "mean_regression_interval": (pooled_difference(ev, candidate, base, {t: 1.0 for t in reg["task"]}, len(reg))
                                     if len(reg) else None),
        "worst_regression": _f(reg["delta"].min()) if len(reg) else None,
        "interference_flag": inter["flag"], "total_flips": inter["total_flips"],
        "sign_conflict_rate": sc["rate"], "max_dropped_fraction": sc["max_dropped_fraction"],
    }
    return {"retention": _records(ret), "regression": _records(reg), "interference": inter,
            "sign_conflict": sc, "summary": summary}


def baseline_intervals(evidence: Evidence, suite: EvalSuite, primary_axes: dict, primary: str,
                       baseline: str) -> dict:
    """Paired intervals of primary - baseline over the pooled items: mean retention (each item
    weighted by 1 / its fine-tune's score, so the pooled mean difference is the difference of
    mean retentions) and mean regression (the base cancels: the difference of merged scores)."""
    ret = pd.DataFrame(primary_axes["retention"])
    rows = int(ret["retention"].notna().sum()) if len(ret) else 0
    out = {"difference_interval": None, "regression_difference_interval": None}
    if rows:
        out["difference_interval"] = pooled_difference(evidence, primary, baseline, retention_weights(ret), rows)
    if suite.general:
        out["regression_difference_interval"] = pooled_difference(
            evidence, primary, baseline, {t: 1.0 for t in suite.general}, len(suite.general))
    return out


def compare_baselines(summaries: dict[str, dict], primary: str, intervals: dict[str, dict] | None = None) -> list[dict]:
    """Does the primary candidate (TIES) beat each baseline? Difference of mean retention, with
    its paired interval when `intervals` (baseline -> baseline_intervals(...)) is given."""
    out = []
    p = summaries.get(primary, {}).get("mean_retention")
    for name, s in summaries.items():
        if name == primary:
            continue
        b = s.get("mean_retention")
        diff = None if p is None or b is None else p - b
        reg_diff = (None if summaries[primary].get("mean_regression") is None or s.get("mean_regression") is None
                    else summaries[primary]["mean_regression"] - s["mean_regression"])
        iv = (intervals or {}).get(name) or {}
        out.append({"baseline": name, "primary": primary, "primary_mean_retention": p,
                    "baseline_mean_retention": b, "difference": diff,
                    "difference_interval": iv.get("difference_interval"),
                    "regression_difference": reg_diff,
                    "regression_difference_interval": iv.get("regression_difference_interval"),
                    "primary_beats": diff is not None and diff > 0})
    return out


def _f(x) -> float | None:
    """A JSON-safe float: NaN and missing become None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: (_f(v) if isinstance(v, float) else v) for k, v in row.items()} for row in df.to_dict("records")]


if __name__ == "__main__":
    print(json.dumps(sign_conflict(json.loads(open(sys.argv[1]).read())), indent=2))
