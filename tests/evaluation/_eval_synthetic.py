"""Synthetic evaluation data for the metric, gate and report tests: no model, no lm-eval.

Three fine-tunes (addition, reverse, facts), one general task, and two candidates:
"ties" keeps most of every skill, "linear" (plain averaging) loses most of them.
"""
from __future__ import annotations

import pandas as pd

from evaluation.evaluate import ScoreTable
from evaluation.suite import load_suite

N_ITEMS = 20
SUITE = {"name": "synthetic", "retention": {"addition": ["t_add"], "reverse": ["t_rev"], "facts": ["t_facts"]},
         "general": ["t_gen"], "limit": N_ITEMS, "task_types": {"t_add": "generation", "t_rev": "generation",
                                                                  "t_facts": "multiple_choice", "t_gen": "multiple_choice"}}

# model -> task -> fraction of items right (the first k items are right)
SCORES = {
    "base":     {"t_add": 0.05, "t_rev": 0.0, "t_facts": 0.25, "t_gen": 0.80},
    "addition": {"t_add": 1.0, "t_rev": 0.0, "t_facts": 0.25, "t_gen": 0.80},
    "reverse":  {"t_add": 0.05, "t_rev": 1.0, "t_facts": 0.25, "t_gen": 0.75},
    "facts":    {"t_add": 0.05, "t_rev": 0.0, "t_facts": 1.0, "t_gen": 0.80},
    "ties":     {"t_add": 0.95, "t_rev": 0.90, "t_facts": 0.85, "t_gen": 0.80},
    "linear":   {"t_add": 0.50, "t_rev": 0.10, "t_facts": 0.95, "t_gen": 0.70},
}
ROLES = {"base": "base", "addition": "finetune", "reverse": "finetune", "facts": "finetune",
         "ties": "candidate", "linear": "candidate"}


def suite():
    return load_suite(dict(SUITE))


def table(scores: dict | None = None) -> ScoreTable:
    scores = scores or SCORES
    srows, prow = [], []
    for m, tasks in scores.items():
        for t, v in tasks.items():
            srows.append({"model": m, "role": ROLES[m], "task": t, "metric": "acc", "value": v, "primary": True, "seed": 0})
            srows.append({"model": m, "role": ROLES[m], "task": t, "metric": "other", "value": 0.5, "primary": False, "seed": 0})
            k = round(v * N_ITEMS)
            prow += [{"model": m, "role": ROLES[m], "task": t, "doc_id": i, "correct": float(i < k), "seed": 0,
                      "target": "x", "response": "y"} for i in range(N_ITEMS)]
    models = {m: {"role": ROLES[m], "path": f"/nonexistent/{m}", "content_hash": f"sha256:{m}", "cache": ["miss"]}
              for m in scores}
    return ScoreTable(scores=pd.DataFrame(srows), samples=pd.DataFrame(prow), models=models,
                      task_types=dict(SUITE["task_types"]), lm_eval_version="0.4.13", runs=len(scores))


def merge_stats(method: str, dropped: dict[str, float]) -> dict:
    per_model = {m: {"numel": 1000, "kept": 200, "kept_fraction": 0.2, "trimmed_fraction": 0.8,
                     "dropped_by_election": int(200 * f), "dropped_fraction_of_kept": f,
                     "dropped_magnitude_share": f / 2} for m, f in dropped.items()}
    per_layer = {layer: {m: dict(v, dropped_fraction_of_kept=min(1.0, v["dropped_fraction_of_kept"] * s))
                         for m, v in per_model.items()}
                 for layer, s in {"embed": 0.5, "0": 0.8, "1": 1.0, "2": 1.2, "head": 0.6}.items()}
    return {"schema_version": 1, "method": method, "models": list(dropped), "per_model": per_model,
            "per_layer": per_layer,
            "sign_conflict": {"rate": 0.12, "conflict_positions": 120, "positions_with_kept": 1000,
                              "per_layer": {l: 0.1 for l in per_layer}}}


STATS = {"ties": merge_stats("ties", {"addition": 0.10, "reverse": 0.15, "facts": 0.20}),
         "linear": None}

COMPAT_PASS = {"schema_version": 1, "status": "pass",
               "checks": [{"name": "architecture", "status": "pass", "message": "same", "details": {}, "waived": False},
                          {"name": "tokenizer", "status": "pass", "message": "same", "details": {}, "waived": False}],
               "norms": {"per_model": {m: {"delta_norm": d, "base_norm": 10.0, "relative_delta": d / 10}
                                       for m, d in {"addition": 0.3, "reverse": 0.4, "facts": 0.25}.items()},
                         "cosine": {a: {b: (1.0 if a == b else 0.05) for b in ("addition", "reverse", "facts")}
                                    for a in ("addition", "reverse", "facts")}}}
COMPAT_FAIL = {**COMPAT_PASS, "status": "fail",
               "checks": COMPAT_PASS["checks"] + [{"name": "same_base", "status": "fail",
                                                   "message": "different_base is not a fine-tune of base",
                                                   "details": {}, "waived": False}]}
