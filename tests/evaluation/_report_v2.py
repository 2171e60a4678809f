"""Hand-made reports and decisions (intervals everywhere, three verdicts) for the renderer
tests, without models or lm-eval. Intervals come from evaluation.stats; the shape is the typed
schema's (evaluation/schema.py), so every report made here validates.

    data(verdict="GO" | "NO-GO" | "INCONCLUSIVE", finetunes=[...], general=[...], items=40)
        -> (report dict, decision dict), to edit (crafted names, messages) before typing
    typed(report_dict, decision_dict) -> (EvaluationReport, Decision)
    report(...) = typed(*data(...))
"""
from __future__ import annotations

import copy

from mergeline.evaluation import stats
from mergeline.evaluation.schema import Decision, EvaluationReport

CANDIDATES = {"ties": "ties", "linear": "linear", "dare_ties": "dare_ties"}


def _iv(interval) -> dict:
    return interval.model_dump()


def _score(k: int, n: int) -> tuple[float, dict]:
    i = stats.proportion(k, n)
    return i.estimate, _iv(i)


def _paired(a_right: int, b_right: int, n: int) -> dict:
    """An interval for (a - b) with the first min(a, b) items right in both."""
    a = [1.0 if i < a_right else 0.0 for i in range(n)]
    b = [1.0 if i < b_right else 0.0 for i in range(n)]
    return _iv(stats.paired_difference(a, b))


def _ratio(a_right: int, b_right: int, n: int) -> dict:
    a = [1.0 if i < a_right else 0.0 for i in range(n)]
    b = [1.0 if i < b_right else 0.0 for i in range(n)]
    return _iv(stats.paired_ratio(a, b))


def report(verdict: str = "GO", finetunes: list[str] | None = None, general: list[str] | None = None,
           items: int = 40, names: dict[str, str] | None = None) -> tuple[EvaluationReport, Decision]:
    return typed(*data(verdict, finetunes, general, items, names))


def typed(report_dict: dict, decision_dict: dict) -> tuple[EvaluationReport, Decision]:
    return EvaluationReport.model_validate(report_dict), Decision.model_validate(decision_dict)


def data(verdict: str = "GO", finetunes: list[str] | None = None, general: list[str] | None = None,
         items: int = 40, names: dict[str, str] | None = None) -> tuple[dict, dict]:
    """A report and its decision as dicts; `names` renames models and tasks (for crafted or long names)."""
    finetunes = finetunes or ["addition", "reverse", "facts"]
    general = general or ["t_gen"]
    tasks = {ft: f"t_{ft}" for ft in finetunes}
    n = items
    # right answers out of n: fine-tunes ace their task; ties keeps most, linear loses most.
    ft_right = {ft: n - (i % 3) for i, ft in enumerate(finetunes)}
    keep = {"GO": 0.93, "NO-GO": 0.55, "INCONCLUSIVE": 0.8}[verdict]
    right = {"ties": {ft: round(ft_right[ft] * (keep - 0.03 * (i % 2))) for i, ft in enumerate(finetunes)},
             "linear": {ft: round(ft_right[ft] * (0.5 + 0.1 * (i % 3))) for i, ft in enumerate(finetunes)},
             "dare_ties": {ft: round(ft_right[ft] * (keep - 0.05)) for ft in finetunes}}
    base_gen = {g: round(n * 0.8) for g in general}
    cand_gen = {"ties": {g: base_gen[g] - {"GO": 0, "NO-GO": 8, "INCONCLUSIVE": 2}[verdict] for g in general},
                "linear": {g: base_gen[g] - 3 for g in general}, "dare_ties": {g: base_gen[g] - 1 for g in general}}

    scores = []
    roles = {"base": "base", **{ft: "finetune" for ft in finetunes}, **{c: "candidate" for c in CANDIDATES}}
    for m, role in roles.items():
        for ft, t in tasks.items():
            k = ft_right[ft] if m == ft else right[m][ft] if m in right else n // 10
            v, iv = _score(k, n)
            scores.append({"model": m, "role": role, "task": t, "value": v, "interval": iv,
                           "seed_spread": ({"seeds": [0, 1, 2], "values": [v - 0.02, v + 0.01, v], "min": v - 0.02,
                                            "max": v + 0.01, "std": 0.015} if m == "dare_ties" else None)})
        for g in general:
            k = cand_gen[m][g] if m in cand_gen else base_gen[g]
            v, iv = _score(k, n)
            scores.append({"model": m, "role": role, "task": g, "value": v, "interval": iv, "seed_spread": None})

    candidates = {}
    for c, method in CANDIDATES.items():
        ret = []
        for ft, t in tasks.items():
            r_iv = _ratio(right[c][ft], ft_right[ft], n)
            d_iv = _paired(right[c][ft], ft_right[ft], n)
            ret.append({"candidate": c, "finetune": ft, "task": t, "task_type": "generation",
                        "finetune_score": ft_right[ft] / n, "base_score": 0.1, "merged_score": right[c][ft] / n,
                        "retention": r_iv["estimate"], "drop": (ft_right[ft] - right[c][ft]) / n,
                        "retention_interval": r_iv, "difference_interval": d_iv})
        reg = []
        for g in general:
            d_iv = _paired(cand_gen[c][g], base_gen[g], n)
            reg.append({"candidate": c, "task": g, "task_type": "multiple_choice", "base_score": base_gen[g] / n,
                        "merged_score": cand_gen[c][g] / n, "delta": d_iv["estimate"], "delta_interval": d_iv})
        rets = [r["retention"] for r in ret]
        elect = method != "linear"
        dropped = {ft: 0.1 + 0.05 * i for i, ft in enumerate(finetunes)} if elect else {ft: 0.0 for ft in finetunes}
        per_model = [{"finetune": r["finetune"], "retention": r["retention"], "retention_interval": r["retention_interval"],
                      "dropped_fraction_of_kept": dropped[r["finetune"]] if elect else None} for r in ret]
        kept = [r["finetune"] for r in ret if r["retention"] >= 0.9]
        lost = [r["finetune"] for r in ret if r["retention"] <= 0.5]
        candidates[c] = {
            "retention": ret, "regression": reg,
            "interference": {
                "by_type": {"generation": {"mean_retention": sum(rets) / len(rets), "tasks": len(rets)}},
                "spread": {"min": min(rets), "max": max(rets), "mean": sum(rets) / len(rets), "std": 0.02},
                "kept": kept, "lost": lost, "flag": bool(kept and lost),
                "pairs": [{"kept": k, "lost": lo, "gap": 0.5} for k in kept for lo in lost], "suspected": [],
                "gap": 0.5,
                "explanation": (f"keeps {kept} (retention >= 0.9) while losing {lost} (<= 0.5)"
                                if kept and lost else "no fine-tune kept while another is lost"),
                "flips": [{"candidate": c, "task": r["task"], "reference": r["finetune"], "items": n,
                           "reference_correct": ft_right[r["finetune"]], "flips": ft_right[r["finetune"]] - right[c][r["finetune"]],
                           "gains": 0, "flip_rate": (ft_right[r["finetune"]] - right[c][r["finetune"]]) / ft_right[r["finetune"]]}
                          for r in ret],
                "total_flips": sum(ft_right[ft] - right[c][ft] for ft in finetunes),
                "per_model": per_model},
            "sign_conflict": {"not_applicable": f"method {method!r} elects no signs"} if not elect else {
                "method": method, "elects_signs": True, "rate": 0.12 if elect else None,
                "per_model": {ft: {"kept_fraction": 0.2, "trimmed_fraction": 0.8,
                                   "dropped_fraction_of_kept": dropped[ft] if elect else 0.0,
                                   "dropped_magnitude_share": dropped[ft] / 2 if elect else 0.0} for ft in finetunes},
                "per_layer": ({layer: {ft: dropped[ft] * s for ft in finetunes}
                               for layer, s in {"embed": 0.5, "0": 0.8, "1": 1.0, "2": 1.2, "head": 0.6}.items()}
                              if elect else {}),
                "max_dropped_fraction": max(dropped.values()) if elect else None},
            "summary": {"mean_retention": sum(rets) / len(rets), "min_retention": min(rets),
                        "mean_regression": sum(r["delta"] for r in reg) / len(reg),
                        "worst_regression": min(r["delta"] for r in reg),
                        "interference_flag": bool(kept and lost), "total_flips": 0,
                        "sign_conflict_rate": 0.12 if elect else None,
                        "max_dropped_fraction": max(dropped.values()) if elect else None,
                        "mean_retention_interval": _iv(stats.mean(rets)),
                        "mean_regression_interval": reg[0]["delta_interval"]}}

    p = candidates["ties"]["summary"]
    comparisons = []
    for b in ("linear", "dare_ties"):
        s = candidates[b]["summary"]
        diff = p["mean_retention"] - s["mean_retention"]
        comparisons.append({"baseline": b, "primary": "ties", "primary_mean_retention": p["mean_retention"],
                            "baseline_mean_retention": s["mean_retention"], "difference": diff,
                            "regression_difference": p["mean_regression"] - s["mean_regression"],
                            "primary_beats": diff > 0,
                            "difference_interval": {"estimate": diff, "low": diff - 0.08, "high": diff + 0.07,
                                                    "confidence": 0.95, "method": "paired bootstrap", "n": n},
                            "regression_difference_interval": _paired(cand_gen["ties"][general[0]],
                                                                      cand_gen[b][general[0]], n)})

    first = finetunes[0]
    checks = [{"rule": f"retention[{r['task']}]", "status": "pass" if r["retention_interval"]["low"] >= 0.5 else
               ("fail" if r["retention_interval"]["high"] < 0.5 else "inconclusive"),
               "message": f"retention {r['retention']:.3f} against 0.5", "interval": r["retention_interval"],
               "threshold": 0.5, "items_needed": None} for r in candidates["ties"]["retention"]]
    mean_iv = p["mean_retention_interval"]
    status = {"GO": "pass", "NO-GO": "fail", "INCONCLUSIVE": "inconclusive"}[verdict]
    checks.append({"rule": "retention.mean", "status": status, "message": f"mean retention against 0.85 ({first})",
                   "interval": mean_iv, "threshold": 0.85,
                   "items_needed": 120 if verdict == "INCONCLUSIVE" else None})
    checks.append({"rule": f"regression[{general[0]}]", "status": "pass" if verdict != "NO-GO" else "fail",
                   "message": "merged - base against -0.10", "interval": candidates["ties"]["regression"][0]["delta_interval"],
                   "threshold": -0.10, "items_needed": None})
    checks.append({"rule": "sign_conflict.rate", "status": "not_applicable",
                   "message": "the policy sets no conflict-rate limit", "interval": None, "threshold": None,
                   "items_needed": None})
    checks.append({"rule": "baseline[linear]", "status": "pass" if comparisons[0]["primary_beats"] else "fail",
                   "message": "mean retention difference against margin 0.0",
                   "interval": comparisons[0]["difference_interval"], "threshold": 0.0, "items_needed": None})
    decision = {"verdict": verdict, "exit_code": {"GO": 0, "NO-GO": 1, "INCONCLUSIVE": 3}[verdict],
                "candidate": "ties", "policy": "default", "confidence": 0.95, "checks": checks}

    rep = {
        "schema_version": 3, "kind": "mergeline.evaluation_report", "created": "2026-11-28T18:00:00Z",
        "lm_eval_version": "0.4.13", "primary": "ties", "confidence": 0.95,
        "inputs": {"models": {m: {"role": role, "path": f"/work/runs/zoo/models/{m}/snapshots/" + "0123456789abcdef" * 4,
                                  "content_hash": "sha256:" + "ab" * 32} for m, role in roles.items()},
                   "suite": {"name": "v2", "retention": {ft: [t] for ft, t in tasks.items()}, "general": general},
                   "extra": {}},
        "task_types": {**{t: "generation" for t in tasks.values()}, **{g: "multiple_choice" for g in general}},
        "scores": scores, "candidates": candidates,
        "baselines": {"primary": "ties", "comparisons": comparisons,
                      "answer": f"ties {'beats' if comparisons[0]['primary_beats'] else 'does not beat'} averaging (linear)"},
        "compat": {"status": "pass", "checks": [{"name": "architecture", "status": "pass", "message": "same", "waived": False},
                                                {"name": "tokenizer", "status": "warn", "message": "chat template differs",
                                                 "waived": False}],
                   "norms": {"per_model": {ft: {"relative_delta": 0.03 + 0.01 * i} for i, ft in enumerate(finetunes)},
                             "cosine": {a: {b: 1.0 if a == b else 0.05 for b in finetunes} for a in finetunes}}},
        "merge_stats": {},
    }
    return (rename(rep, names), rename(decision, names)) if names else (rep, decision)


def rename(report: dict, names: dict[str, str]) -> dict:
    """The same report with every model, task and policy name replaced by names[...] (exact
    string values and dict keys; merge method names stay)."""
    def walk(x):
        if isinstance(x, dict):
            return {names.get(k, k) if isinstance(k, str) else k: v if k == "method" else walk(v)
                    for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            return names.get(x, x)
        return x
    return walk(copy.deepcopy(report))
