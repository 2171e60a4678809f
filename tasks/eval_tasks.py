"""The evaluate stage: one model on the suite (lm-eval through evaluation.evaluate), and the
per-model tables combined into one.

One task per model lets the evaluations run beside the merges (and side by side on Dask workers
in separate processes) and lets a rerun reuse every evaluation whose model did not change: the
key is the model's content hash, the suite and the evaluation code, never its path.

`evaluate_model` is the cached work; `evaluate_stage` is the stage: it opens the MLflow child run
`evaluate:<name>` around the evaluation and logs the model's scores.

    from mergeline.tasks.eval_tasks import evaluate_stage, combine
"""
from __future__ import annotations

import threading
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeline.evaluation.suite import EvalSuite
from mergeline.merge.hashing import content_hash
from mergeline.tasks import tracking
from mergeline.tasks.caching import code_version, key_of
from mergeline.tasks.tracking import RunLog


# lm-eval and transformers keep process-wide state (seeds, loaded task registries, accelerate's
# state); two evaluations in threads of one process failed intermittently ("'NoneType' object has
# no attribute 'type'"). One lm-eval run at a time per process: merges still run beside it, and
# Dask workers in other processes or machines still evaluate in parallel.
_LM_EVAL_LOCK = threading.Lock()


def eval_key(context, parameters: dict) -> str:
    path = parameters["path"]
    model = ({int(k): content_hash(p) for k, p in path.items()} if isinstance(path, dict)
             else content_hash(path))
    return key_of("eval", model, parameters["suite"], parameters["name"],
                  parameters["role"], code_version("evaluation"))


@task(name="evaluate", cache_key_fn=eval_key, persist_result=True, retries=1, retry_delay_seconds=5)
def evaluate_model(name: str, path: str | dict[int, str], role: str, suite: EvalSuite | dict,
                   cache_dir: str | None = None):
    """lm-eval scores of one model (a ScoreTable with one model), via the score cache. `path`
    may be {seed: folder}: a random merge made once per seed, merge seed k run with eval seed k."""
    return _evaluate(name, path, role, suite, cache_dir)


def _evaluate(name: str, path: str | dict[int, str], role: str, suite: EvalSuite | dict, cache_dir: str | None):
    # A plain module-level function: Dask pickles it by reference, so the lock never travels.
    from mergeline.evaluation.evaluate import evaluate_models
    s = suite if isinstance(suite, EvalSuite) else EvalSuite.model_validate(suite)
    folder = {int(k): Path(p) for k, p in path.items()} if isinstance(path, dict) else Path(path)
    _no_git_describe()
    with _LM_EVAL_LOCK:
        return evaluate_models(s, {name: folder}, cache_dir, roles={name: role}, log=None)


@task(name="evaluate-stage", cache_policy=NO_CACHE)
def evaluate_stage(log: RunLog, name: str, path: str | dict[int, str], role: str, suite: EvalSuite,
                   cache_dir: str | None, opts: dict):
    """One model's evaluation in its own child run `evaluate:<name>` (its primary score per task,
    the lm-eval runs it took); returns (ScoreTable, the cached work's Prefect state name)."""
    with log.child(f"evaluate:{name}") as (c, run):
        state = evaluate_model.with_options(**opts)(name=name, path=path, role=role, suite=suite,
                                                    cache_dir=cache_dir, return_state=True)
        table = state.result()
        tracking.set_tags(c, run, {"role": role, "mergeline.cached": state.name == "Cached"})
        tracking.log_metrics(c, run, {"scores": {r.task: r.value for r in table.primary().itertuples()},
                                      "lm_eval_runs": 0 if state.name == "Cached" else table.runs})
    return table, state.name


def _no_git_describe() -> None:
    """lm-eval records the git commit of the current folder by running `git describe`, which
    prints "fatal: not a git repository" to the terminal outside a checkout; its own fallback
    reads the same commit from .git silently."""
    import os

    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    lm_eval.evaluator.get_git_commit_hash = lambda: get_commit_from_path(os.getcwd())


def combine(tables: list):
    """One ScoreTable from the per-model tables (same suite)."""
    from mergeline.evaluation.evaluate import ScoreTable

    return ScoreTable.concat(tables)
