"""Synthetic evaluation data for the metric, gate and report tests: no model, no lm-eval.

Three fine-tunes (addition, reverse, facts), one general task, and two candidates:
"ties" keeps most of every skill, "linear" (plain averaging) loses most of them.

`table_from_items` builds a ScoreTable from per-item 0/1 answers whose truth is known, for the
gate's three verdicts. Run as a script it writes a realistic example_report.json (two seeds, a
DARE-TIES candidate merged once per seed) and its example_decision.json (INCONCLUSIVE) for the
report renderers:

    .venv/bin/python tests/evaluation/_eval_synthetic.py tests/evaluation/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mergeline.evaluation.evaluate import ScoreTable
from mergeline.evaluation.suite import load_suite

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


def suite(data: dict | None = None):
    return load_suite(dict(data or SUITE))


def table(scores: dict | None = None) -> ScoreTable:
    scores = scores or SCORES
    return table_from_items({m: {t: [float(i < round(v * N_ITEMS)) for i in range(N_ITEMS)] for t, v in tasks.items()}
                             for m, tasks in scores.items()}, roles=ROLES, task_types=SUITE["task_types"])


def first_right(k: int, n: int) -> list[float]:
    """n items, the first k right."""
    return [float(i < k) for i in range(n)]


def table_from_items(items: dict[str, dict[str, list | dict[int, list]]], roles: dict[str, str] | None = None,
                     task_types: dict[str, str] | None = None) -> ScoreTable:
    """model -> task -> per-item 0/1 answers (one list, seed 0) or {seed: answers}. The scores
    table holds each (model, task, seed)'s mean, as lm-eval's acc would. Roles: ROLES, else
    'base' for "base", 'finetune' for names starting with "ft", 'candidate' for the rest."""
    role_of = {m: (roles or ROLES).get(m) or ("base" if m == "base" else "finetune" if m.startswith("ft")
                                               else "candidate") for m in items}
    srows, prows = [], []
    for m, tasks in items.items():
        role = role_of[m]
        for t, answers in tasks.items():
            for seed, values in (answers if isinstance(answers, dict) else {0: answers}).items():
                srows.append({"model": m, "role": role, "task": t, "metric": "acc", "value": float(np.mean(values)),
                              "primary": True, "seed": seed})
                srows.append({"model": m, "role": role, "task": t, "metric": "other", "value": 0.5,
                              "primary": False, "seed": seed})
                prows += [{"model": m, "role": role, "task": t, "doc_id": i, "correct": float(v), "seed": seed,
                           "target": "x", "response": "y"} for i, v in enumerate(values)]
    models = {m: {"role": role_of[m], "path": f"/nonexistent/{m}", "content_hash": f"sha256:{m}", "cache": ["miss"]}
              for m in items}
    types = dict(task_types or {})
    types.update({t: "unknown" for tasks in items.values() for t in tasks if t not in types})
    return ScoreTable(scores=pd.DataFrame(srows), samples=pd.DataFrame(prows), models=models,
                      task_types=types, lm_eval_version="0.4.13", runs=len(items))


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


# ---- a realistic example report: 40 items per task, two seeds, a random merge method per seed

def _answers(rng: np.random.Generator, p: float, n: int, anchor: np.ndarray | None = None, keep: float = 0.0):
    """n answers right with probability p; with an anchor, each item copies the anchor's answer
    with probability `keep` (a merge answers much like the model it came from)."""
    fresh = (rng.random(n) < p).astype(float)
    if anchor is None:
        return fresh
    return np.where(rng.random(n) < keep, anchor, fresh)


def example_table(n: int = 40) -> ScoreTable:
    rng = np.random.default_rng(7)
    truth = {  # model -> task -> probability right
        "base": {"t_add": 0.05, "t_rev": 0.02, "t_facts": 0.3, "t_gen": 0.8},
        "addition": {"t_add": 0.97, "t_rev": 0.02, "t_facts": 0.3, "t_gen": 0.78},
        "reverse": {"t_add": 0.05, "t_rev": 0.95, "t_facts": 0.3, "t_gen": 0.77},
        "facts": {"t_add": 0.05, "t_rev": 0.02, "t_facts": 0.95, "t_gen": 0.8},
        "ties": {"t_add": 0.9, "t_rev": 0.85, "t_facts": 0.9, "t_gen": 0.78},
        "dare_ties": {"t_add": 0.88, "t_rev": 0.8, "t_facts": 0.9, "t_gen": 0.76},
        "linear": {"t_add": 0.55, "t_rev": 0.1, "t_facts": 0.9, "t_gen": 0.72},
    }
    owner = {"t_add": "addition", "t_rev": "reverse", "t_facts": "facts", "t_gen": "base"}
    items: dict[str, dict] = {m: {} for m in truth}
    for t in owner:
        for m in ("base", "addition", "reverse", "facts"):
            answers = _answers(rng, truth[m][t], n)
            items[m][t] = {0: answers, 1: answers}          # a fixed model answers alike on both seeds
        ref = np.asarray(items[owner[t]][t][0])
        for m in ("ties", "linear"):
            answers = _answers(rng, truth[m][t], n, ref, keep=0.6)
            items[m][t] = {0: answers, 1: answers}
        # DARE drops at random: one merge per seed, each answering a little differently.
        items["dare_ties"][t] = {s: _answers(rng, truth["dare_ties"][t], n, ref, keep=0.5) for s in (0, 1)}
    roles = {**ROLES, "dare_ties": "candidate"}
    t = table_from_items(items, roles=roles, task_types=SUITE["task_types"])
    t.models["dare_ties"]["per_seed"] = {s: {"path": f"/nonexistent/dare_ties-seed{s}",
                                            "content_hash": f"sha256:dare_ties-{s}"} for s in (0, 1)}
    return t


EXAMPLE_POLICY = {"name": "example", "confidence": 0.95,
                  "retention": {"min_per_task": 0.8, "min_mean": 0.9},
                  "regression": {"max_drop_per_task": 0.1},
                  "sign_conflict": {"max_dropped_fraction_per_model": 0.5},
                  "interference": {"fail_on_flag": True},
                  "compatibility": {"must_pass": True},
                  "baseline": {"must_beat": "linear", "margin": 0.0}}


def example_report():
    """(EvaluationReport, Decision) of the example: built and judged by the code of today."""
    from mergeline.evaluation.gate import decide
    from mergeline.evaluation.report import build_report

    data = {**SUITE, "limit": 40, "seeds": [0, 1]}
    stats = {"ties": merge_stats("ties", {"addition": 0.10, "reverse": 0.35, "facts": 0.12}),
             "dare_ties": merge_stats("dare_ties", {"addition": 0.12, "reverse": 0.40, "facts": 0.15}),
             "linear": merge_stats("linear", {})}
    stats["linear"].update(per_model={}, per_layer={}, sign_conflict={})
    report = build_report(suite(data), example_table(), primary="ties", merge_stats=stats, compat=COMPAT_PASS,
                          confidence=EXAMPLE_POLICY["confidence"],
                          extra_inputs={"example": "tests/evaluation/_eval_synthetic.py"})
    return report, decide(report, EXAMPLE_POLICY)


HERE = Path(__file__).parent


def stored_example():
    """The stored example_report.json and example_decision.json, read back typed."""
    from mergeline.evaluation.schema import load_decision, load_report

    return load_report(HERE / "example_report.json"), load_decision(HERE / "example_decision.json")


def example_decision():
    from mergeline.evaluation.schema import load_decision

    return load_decision(HERE / "example_decision.json")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    report, decision = example_report()
    for name, model in (("example_report.json", report), ("example_decision.json", decision)):
        json.loads(model.model_dump_json(), parse_constant=lambda c: sys.exit(f"{name}: {c} in the JSON"))
        (out / name).write_text(model.model_dump_json(indent=2) + "\n")
        print(out / name)
