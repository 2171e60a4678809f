"""The four axes that say whether a merge kept what its inputs knew.

1. Retention (per fine-tune task): merged score / fine-tune score on that fine-tune's own task,
   plus the absolute drop (fine-tune - merged). TIES' own yardstick is "normalized accuracy",
   the same ratio (Yadav et al., 2023, arXiv:2306.01708, section 6).
2. Regression (per general task): merged score - base score; negative means the merge broke
   something the base could do.
3. Interference: retention broken down by task type (generation vs multiple choice), the spread
   of retentions (min/max/std), per-sample flips (items the reference got right and the merge
   got wrong, joined on task + doc_id), and a flag when the merge keeps one fine-tune's skill
   (retention >= high) while losing another's (<= low): the signature of task interference.
4. Sign-conflict proxy (from merge_stats.json): per model, the fraction of its kept (trimmed)
   deltas that sign election dropped and their share of its kept magnitude, and the overall
   rate of coordinates whose kept deltas disagree in sign.

All functions are pure: frames and dicts in, frames and dicts out.

    python -m evaluation.metrics MERGE_STATS.json     # print the sign-conflict proxy
"""
from __future__ import annotations

import json
import math
import sys

import pandas as pd

from evaluation.suite import EvalSuite

HIGH_MARK, LOW_MARK = 0.9, 0.5


def primary_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """model, task -> value: the primary metric, mean over seeds."""
    p = scores[scores["primary"].astype(bool)]
    return p.groupby(["model", "task"], as_index=False, sort=False)["value"].mean()


def _lookup(primary: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(m, t): float(v) for m, t, v in primary[["model", "task", "value"]].itertuples(index=False)}


def retention(primary: pd.DataFrame, suite: EvalSuite, candidate: str, base: str = "base",
              task_types: dict[str, str] | None = None) -> pd.DataFrame:
    s, rows = _lookup(primary), []
    for ft, tasks in suite.retention.items():
        for task in tasks:
            ft_score, merged = s.get((ft, task)), s.get((candidate, task))
            if ft_score is None or merged is None:
                raise KeyError(f"retention: no score for {'fine-tune ' + ft if ft_score is None else candidate!r} on task {task!r}")
            rows.append({
                "candidate": candidate, "finetune": ft, "task": task,
                "task_type": (task_types or {}).get(task, "unknown"),
                "finetune_score": ft_score, "base_score": s.get((base, task)), "merged_score": merged,
                # A fine-tune that scores 0 on its own task gives no reference: leave it undefined.
                "retention": merged / ft_score if ft_score > 0 else math.nan,
                "drop": ft_score - merged,
            })
    return pd.DataFrame(rows)


def regression(primary: pd.DataFrame, suite: EvalSuite, candidate: str, base: str = "base",
               task_types: dict[str, str] | None = None) -> pd.DataFrame:
    s, rows = _lookup(primary), []
    for task in suite.general:
        b, m = s.get((base, task)), s.get((candidate, task))
        if b is None or m is None:
            raise KeyError(f"regression: no score for {base if b is None else candidate!r} on task {task!r}")
        rows.append({"candidate": candidate, "task": task, "task_type": (task_types or {}).get(task, "unknown"),
                     "base_score": b, "merged_score": m, "delta": m - b})
    return pd.DataFrame(rows, columns=["candidate", "task", "task_type", "base_score", "merged_score", "delta"])


def flips(samples: pd.DataFrame, suite: EvalSuite, candidate: str, base: str = "base") -> pd.DataFrame:
    """Per task: items the reference got right and the merge got wrong (and the reverse).

    The reference is the task's own fine-tune for retention tasks and the base for general
    tasks. An item counts as right when its `correct` value, averaged over seeds, is >= 0.5.
    """
    owner = suite.task_owner()
    rows = []
    for task in suite.all_tasks():
        ref = owner.get(task, base)
        a, b = _correct(samples, ref, task), _correct(samples, candidate, task)
        joined = a.to_frame("ref").join(b.to_frame("merged"), how="inner")
        ref_ok, merged_ok = joined["ref"] >= 0.5, joined["merged"] >= 0.5
        n_ref_ok = int(ref_ok.sum())
        n_flips = int((ref_ok & ~merged_ok).sum())
        rows.append({"candidate": candidate, "task": task, "reference": ref, "items": len(joined),
                     "reference_correct": n_ref_ok, "flips": n_flips, "gains": int((~ref_ok & merged_ok).sum()),
                     "flip_rate": n_flips / n_ref_ok if n_ref_ok else math.nan})
    return pd.DataFrame(rows)


def _correct(samples: pd.DataFrame, model: str, task: str) -> pd.Series:
    s = samples[(samples["model"] == model) & (samples["task"] == task)]
    return s.groupby(s["doc_id"].astype(str))["correct"].mean()


def interference(ret: pd.DataFrame, flip_df: pd.DataFrame, reg: pd.DataFrame | None = None,
                 high: float = HIGH_MARK, low: float = LOW_MARK) -> dict:
    r = ret["retention"].dropna()
    per_ft = ret.groupby("finetune", sort=False)["retention"].mean()
    kept = [ft for ft, v in per_ft.items() if v >= high]
    lost = [ft for ft, v in per_ft.items() if v <= low]
    by_type: dict[str, dict] = {}
    for kind, g in ret.groupby("task_type", sort=False):
        by_type[kind] = {"mean_retention": _f(g["retention"].mean()), "tasks": int(len(g))}
    if reg is not None and len(reg):
        for kind, g in reg.groupby("task_type", sort=False):
            by_type.setdefault(kind, {"mean_retention": None, "tasks": 0})
            by_type[kind]["mean_regression"] = _f(g["delta"].mean())
            by_type[kind]["general_tasks"] = int(len(g))
    return {
        "by_type": by_type,
        "spread": {"min": _f(r.min()), "max": _f(r.max()), "mean": _f(r.mean()),
                   "std": _f(r.std(ddof=0)) if len(r) else None},
        "per_finetune": {ft: _f(v) for ft, v in per_ft.items()},
        "marks": {"high": high, "low": low},
        "kept": kept, "lost": lost,
        # The interference signature: one skill survived while another died.
        "flag": bool(kept and lost),
        "flips": _records(flip_df),
        "total_flips": int(flip_df["flips"].sum()) if len(flip_df) else 0,
    }


PER_MODEL_KEYS = ("kept_fraction", "trimmed_fraction", "dropped_fraction_of_kept", "dropped_magnitude_share")


def sign_conflict(merge_stats: dict | None) -> dict:
    """The sign-conflict proxy from a merge_stats.json dict (None: not available)."""
    if not merge_stats:
        return {"available": False, "method": None, "rate": None, "per_model": {}, "per_layer": {},
                "max_dropped_fraction": None}
    per_model = {name: {k: _f(v.get(k)) for k in PER_MODEL_KEYS}
                 for name, v in (merge_stats.get("per_model") or {}).items()}
    per_layer = {layer: {name: _f(v.get("dropped_fraction_of_kept")) for name, v in models.items()}
                 for layer, models in (merge_stats.get("per_layer") or {}).items()}
    dropped = [v["dropped_fraction_of_kept"] for v in per_model.values() if v["dropped_fraction_of_kept"] is not None]
    sc = merge_stats.get("sign_conflict") or {}
    return {"available": True, "method": merge_stats.get("method"), "rate": _f(sc.get("rate")),
            "per_model": per_model, "per_layer": per_layer,
            "max_dropped_fraction": max(dropped) if dropped else None}


def candidate_axes(primary: pd.DataFrame, samples: pd.DataFrame, suite: EvalSuite, candidate: str,
                   merge_stats: dict | None = None, task_types: dict[str, str] | None = None,
                   base: str = "base", high: float = HIGH_MARK, low: float = LOW_MARK) -> dict:
    """All four axes for one candidate, plus a one-line summary used by the gate and plots."""
    ret = retention(primary, suite, candidate, base, task_types)
    reg = regression(primary, suite, candidate, base, task_types)
    fl = flips(samples, suite, candidate, base)
    inter = interference(ret, fl, reg, high, low)
    sc = sign_conflict(merge_stats)
    summary = {
        "mean_retention": inter["spread"]["mean"], "min_retention": inter["spread"]["min"],
        "mean_regression": _f(reg["delta"].mean()) if len(reg) else None,
        "worst_regression": _f(reg["delta"].min()) if len(reg) else None,
        "interference_flag": inter["flag"], "total_flips": inter["total_flips"],
        "sign_conflict_rate": sc["rate"], "max_dropped_fraction": sc["max_dropped_fraction"],
    }
    return {"retention": _records(ret), "regression": _records(reg), "interference": inter,
            "sign_conflict": sc, "summary": summary}


def compare_baselines(summaries: dict[str, dict], primary: str) -> list[dict]:
    """Does the primary candidate (TIES) beat each baseline? Difference of mean retention."""
    out = []
    p = summaries.get(primary, {}).get("mean_retention")
    for name, s in summaries.items():
        if name == primary:
            continue
        b = s.get("mean_retention")
        diff = None if p is None or b is None else p - b
        reg_diff = (None if summaries[primary].get("mean_regression") is None or s.get("mean_regression") is None
                    else summaries[primary]["mean_regression"] - s["mean_regression"])
        out.append({"baseline": name, "primary": primary, "primary_mean_retention": p,
                    "baseline_mean_retention": b, "difference": diff,
                    "regression_difference": reg_diff, "primary_beats": diff is not None and diff > 0})
    return out


def _f(x) -> float | None:
    """A JSON-safe float: NaN and missing become None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: (_f(v) if isinstance(v, float) else v) for k, v in row.items()} for row in df.to_dict("records")]


if __name__ == "__main__":
    print(json.dumps(sign_conflict(json.loads(open(sys.argv[1]).read())), indent=2))
