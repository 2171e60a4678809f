"""Prefect tasks: evaluate one model on the suite (lm-eval through evaluation.evaluate), and
combine the per-model tables into one.

One task per model lets the evaluations run beside the merges (and side by side on Dask workers
in separate processes) and lets a rerun reuse every evaluation whose model did not change: the
key is the model's content hash, the suite and the evaluation code, never its path.

    from mergeline.tasks.eval_tasks import evaluate_model, combine
"""
from __future__ import annotations

import threading
from pathlib import Path

from prefect import task

from mergeline.merge.hashing import content_hash
from mergeline.tasks.caching import code_version, key_of


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
def evaluate_model(name: str, path: str | dict[int, str], role: str, suite: dict, cache_dir: str | None = None):
    """lm-eval scores of one model (a ScoreTable with one model), via the score cache. `path`
    may be {seed: folder}: a random merge made once per seed, merge seed k run with eval seed k."""
    return _evaluate(name, path, role, suite, cache_dir)


def _evaluate(name: str, path: str | dict[int, str], role: str, suite: dict, cache_dir: str | None):
    # A plain module-level function: Dask pickles it by reference, so the lock never travels.
    from mergeline.evaluation.evaluate import evaluate_models
    from mergeline.evaluation.suite import EvalSuite

    s = EvalSuite.model_validate(suite)
    folder = {int(k): Path(p) for k, p in path.items()} if isinstance(path, dict) else Path(path)
    _no_git_describe()
    with _LM_EVAL_LOCK:
        return evaluate_models(s, {name: folder}, cache_dir, roles={name: role}, log=None)


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
