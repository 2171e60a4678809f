"""Prefect tasks: evaluate one model on the suite (lm-eval through evaluation.evaluate), and
combine the per-model tables into one.

One task per model lets the evaluations run side by side (threads, or Dask workers) and lets a
rerun reuse every evaluation whose model did not change: the key is the model's content hash,
the suite and the evaluation code, never its path.

    from tasks.eval_tasks import evaluate_model, combine
"""
from __future__ import annotations

from pathlib import Path

from prefect import task

from merge.hashing import content_hash
from tasks.caching import code_version, key_of


def eval_key(context, parameters: dict) -> str:
    return key_of("eval", content_hash(parameters["path"]), parameters["suite"], parameters["name"],
                  parameters["role"], code_version("evaluation"))


@task(name="evaluate", cache_key_fn=eval_key, persist_result=True, retries=1, retry_delay_seconds=5)
def evaluate_model(name: str, path: str, role: str, suite: dict, cache_dir: str | None = None):
    """lm-eval scores of one model (a ScoreTable with one model), via the score cache."""
    from evaluation.evaluate import evaluate_models
    from evaluation.suite import EvalSuite

    s = EvalSuite.model_validate(suite)
    return evaluate_models(s, {name: Path(path)}, cache_dir, roles={name: role}, log=None)


def combine(tables: list):
    """One ScoreTable from the per-model tables (same suite)."""
    from evaluation.evaluate import ScoreTable

    return ScoreTable.concat(tables)
