"""The smoke stage: the smoke test of one merged model (evaluation.smoke), between merge and full
evaluation. `smoke_model` is the cached work; `smoke_stage` opens the MLflow child run
`smoke:<name>` around it and logs the checks.

Cached by content like the other stages (tasks/caching.py): the key hashes the model's and the
references' content, the text, the prompts, the rule and the evaluation code, never paths; a
rerun with nothing changed reads the stored result instead of loading the models again.

    from mergeline.tasks.smoke_tasks import smoke_stage
"""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeline.evaluation.smoke import SmokeRule
from mergeline.merge.hashing import content_hash
from mergeline.tasks import tracking
from mergeline.tasks.caching import code_version, key_of
# transformers' model loading is not safe beside another load in the same process (seen: a tied
# lm_head left on the meta device while lm-eval loaded a model in another thread, "Cannot copy
# out of meta tensor"): the smoke test takes the lock the lm-eval evaluations hold.
from mergeline.tasks.eval_tasks import _LM_EVAL_LOCK


def smoke_key(context, parameters: dict) -> str:
    refs = {n: content_hash(p) for n, p in sorted(parameters["references"].items())}
    return key_of("smoke", content_hash(parameters["path"]), refs, parameters["text"],
                  parameters["prompts"], parameters["rule"], parameters.get("device", "cpu"),
                  code_version("evaluation"))


@task(name="smoke", cache_key_fn=smoke_key, persist_result=True, retries=1, retry_delay_seconds=5)
def smoke_model(name: str, path: str, references: dict[str, str], text: str | None,
                prompts: list[str], rule: SmokeRule | dict, device: str = "cpu"):
    """evaluation.smoke.smoke_test of `path` against `references` (name -> folder): a SmokeResult."""
    return _smoke(path, references, text, prompts, rule, device)


def _smoke(path: str, references: dict[str, str], text: str | None, prompts: list[str], rule: SmokeRule | dict,
           device: str):
    # A plain module-level function: Dask pickles it by reference, so the lock never travels.
    from mergeline.evaluation.smoke import smoke_test

    with _LM_EVAL_LOCK:
        return smoke_test(path, references, text, prompts, rule if isinstance(rule, SmokeRule) else SmokeRule.model_validate(rule), device=device)


@task(name="smoke-stage", cache_policy=NO_CACHE)
def smoke_stage(log: tracking.RunLog, name: str, path: str, references: dict[str, str], text: str | None,
                prompts: list[str], rule: SmokeRule, device: str, opts: dict):
    """One merge's smoke test in its own child run `smoke:<name>` (metrics, pass/fail, smoke.json),
    also written to the run folder; returns (SmokeResult, the cached work's Prefect state name)."""
    with log.child(f"smoke:{name}") as (c, run):
        state = smoke_model.with_options(**opts)(name=name, path=path, references=references, text=text,
                                                 prompts=prompts, rule=rule, device=device, return_state=True)
        result = state.result()
        tracking.log_metrics(c, run, result.metrics())
        tracking.set_tags(c, run, {"status": "pass" if result.passed else "fail"})
        tracking.log_json(c, run, result.model_dump(mode="json"), "smoke.json")
    (Path(log.run_dir) / f"smoke-{name}.json").write_text(result.model_dump_json(indent=2))
    return result, state.name
