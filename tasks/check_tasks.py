"""The check stage: the compatibility gate (merge.compat) on a recipe's models, before any merge.

`check_compat` is the cached work (keyed by the recipe's canonical dump, the inputs' content hashes,
the policy and the merge code); `check_stage` is the stage: it opens the MLflow child run `check`
(or `check:<stage>` for a stage of a multi-stage recipe) around the check and logs the report.

    from mergeline.tasks.check_tasks import check_stage
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeline.merge.compat.policy import CompatPolicy
from mergeline.merge.compat.report import CompatReport
from mergeline.merge.recipe import MergeRecipe
from mergeline.tasks.caching import code_version, key_of
from mergeline.tasks.recipes import canonical, input_hashes
from mergeline.tasks.tracking import RunLog, log_json, log_metrics, set_tags


def check_key(context, parameters: dict) -> str:
    recipe = parameters["recipe"]
    return key_of("check", canonical(recipe), input_hashes(recipe), parameters.get("policy"),
                  code_version("merge", "tasks"))  # tasks too: a result persisted by older code is never read back


@task(name="check", cache_key_fn=check_key, persist_result=True)
def check_compat(recipe: MergeRecipe | dict, policy: CompatPolicy | dict | None = None) -> CompatReport:
    """The CompatReport of the recipe's models (status pass / warn / fail)."""
    from mergeline.merge.compat import check_recipe
    from mergeline.tasks.recipes import typed

    return check_recipe(typed(recipe), policy)


@task(name="check-stage", cache_policy=NO_CACHE)
def check_stage(log: RunLog, recipe: MergeRecipe, policy: CompatPolicy | None, opts: dict,
                run_name: str = "check") -> CompatReport:
    """The compatibility report, in its own child run (`compat_report.json`, delta norms, status);
    also written to the run folder."""
    with log.child(run_name) as (c, run):
        state = check_compat.with_options(**opts)(recipe, policy, return_state=True)
        compat = state.result()
        data = compat.to_dict()
        log_json(c, run, data, "compat_report.json")
        log_metrics(c, run, {"delta_norms": compat.norms.get("per_model") or {}, "compat_fail": compat.status == "fail"})
        set_tags(c, run, {"status": compat.status})
    suffix = run_name.partition(":")[2]
    (Path(log.run_dir) / f"compat_report{'-' + suffix if suffix else ''}.json").write_text(json.dumps(data, indent=2))
    return compat
