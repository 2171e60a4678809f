"""The tuning objective: one number per candidate recipe, built from the gate's own rules.

`mergeline tune` maximises, on the validation items only (evaluation/splits.py):

    objective = mean retention
                - penalty * (sum over general tasks of the drop beyond regression.max_drop_per_task
                             + sum over retention tasks of the shortfall below retention.min_per_task)

Mean retention is the TIES paper's "normalized accuracy" (merged / fine-tune on the fine-tune's
own task; Yadav et al. 2023, arXiv:2306.01708, section 6), the number the gate's `min_mean` rule
reads. The gate's hard limits become penalties, zero while a limit holds, so the search is
steered back from a recipe the gate would refuse instead of only ranking recipes it would pass.
The search reads point estimates: the intervals that decide GO/NO-GO are built later, by the
gate, on the test items the search never saw.

Pure: a ScoreTable, a suite and a gate policy in, a dict out.

    python -m mergeline.evaluation.objective      # the objective of a made-up table, as a worked example
"""
from __future__ import annotations

import math

import pandas as pd

from mergeline.evaluation import metrics
from mergeline.evaluation.policy import GatePolicy, load_policy
from mergeline.evaluation.suite import EvalSuite

DEFAULT_PENALTY = 2.0  # per unit of drop beyond a limit: a 0.05 excess costs 0.10 of mean retention


def _threshold(value, task: str) -> float | None:
    return value.get(task) if isinstance(value, dict) else value


def objective(table, suite: EvalSuite, policy: GatePolicy | dict | None, candidate: str,
              base: str = "base", penalty: float = DEFAULT_PENALTY) -> dict:
    """{value, mean_retention, worst_regression, regression_excess, retention_shortfall,
    feasible (no limit exceeded and min_mean met), per_task}."""
    if policy is not None and not isinstance(policy, GatePolicy):
        policy = load_policy(policy)
    policy = policy or GatePolicy()
    primary = metrics.primary_scores(table.scores)
    ret = metrics.retention(primary, suite, candidate, base)
    reg = metrics.regression(primary, suite, candidate, base)
    # A fine-tune that scores 0 on its own task gives no reference (retention NaN): left out,
    # as the report's mean leaves it out.
    kept = ret["retention"].dropna()
    mean_ret = float(kept.mean()) if len(kept) else 0.0
    excess = 0.0
    for row in reg.itertuples(index=False):
        limit = _threshold(policy.regression.max_drop_per_task, row.task)
        if limit is not None:
            excess += max(0.0, -float(row.delta) - limit)
    shortfall = 0.0
    for row in ret.itertuples(index=False):
        floor = _threshold(policy.retention.min_per_task, row.task)
        if floor is not None and not math.isnan(row.retention):
            shortfall += max(0.0, floor - float(row.retention))
    min_mean = policy.retention.min_mean
    feasible = excess == 0 and shortfall == 0 and (min_mean is None or mean_ret >= min_mean)
    per_task = {f"retention.{r.task}": float(r.retention) for r in ret.itertuples(index=False)
                if not math.isnan(r.retention)}
    per_task.update({f"regression.{r.task}": float(r.delta) for r in reg.itertuples(index=False)})
    return {"value": mean_ret - penalty * (excess + shortfall), "mean_retention": mean_ret,
            "worst_regression": float(reg["delta"].min()) if len(reg) else None,
            "regression_excess": excess, "retention_shortfall": shortfall, "feasible": feasible,
            "penalty": penalty, "per_task": per_task}


if __name__ == "__main__":
    from mergeline.evaluation.evaluate import ScoreTable

    rows = [("base", "t_a", 0.2), ("base", "t_gen", 0.9), ("ft_a", "t_a", 0.8), ("ft_a", "t_gen", 0.9),
            ("ties", "t_a", 0.6), ("ties", "t_gen", 0.7)]
    scores = pd.DataFrame([{"model": m, "role": "", "task": t, "metric": "acc", "value": v, "primary": True,
                            "seed": 0} for m, t, v in rows])
    suite = EvalSuite(retention={"ft_a": ["t_a"]}, general=["t_gen"])
    print(objective(ScoreTable(scores=scores, samples=pd.DataFrame()), suite,
                    {"regression": {"max_drop_per_task": 0.1}}, "ties"))
