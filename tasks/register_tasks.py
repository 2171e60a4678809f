"""The register stage: the merged folder into the MLflow model registry (no copy).

Alias `candidate` moves to every new version; `champion` moves only on GO. A rerun whose merge
has the content hash of a version already registered registers nothing new: it re-uses that
version and moves `champion` to it only if the decision is now GO. Retries cover a registry
server that is briefly unavailable.

`register_model` is the work (retried); `register_stage` opens the MLflow child run `register`
around it.

    from mergeline.tasks.register_tasks import register_stage
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeline.tasks.merge_tasks import MergeOutcome
from mergeline.tasks.tracking import RunLog


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 10])
def register_model(tracking_uri: str, name: str, folder: str, run_id: str, content_hash: str,
                   decision: str, extra_tags: dict | None = None) -> dict:
    """Register `folder` as a new version of `name`, or re-use the version already registered
    with the same content hash (an unchanged rerun registers nothing). `candidate` moves to every
    new version; `champion` moves only on GO (never on NO-GO or INCONCLUSIVE)."""
    from mergeline.tasks import tracking

    c = tracking.client(tracking_uri)
    tags = {"mergeline.content_hash": content_hash, "mergeline.decision": decision, **(extra_tags or {})}
    existing = tracking.version_with_hash(c, name, content_hash)
    if existing is None:
        version = tracking.register_folder(c, name, folder, run_id, tags)  # moves `candidate`
    else:
        version = str(existing.version)
        if (existing.tags or {}).get("mergeline.decision") != decision:
            c.set_model_version_tag(name, version, "mergeline.decision", decision)
    if decision == "GO":
        tracking.promote(c, name, version)
    aliases = sorted(c.get_model_version(name, version).aliases or [])
    return {"name": name, "version": version, "aliases": aliases, "reused": existing is not None}


@task(name="register-stage", cache_policy=NO_CACHE)
def register_stage(log: RunLog, register_as: str | None, m: MergeOutcome, verdict: str,
                   recipe_hash: str) -> dict | None:
    """The primary merge `m` into the registry as `register_as` (None: not registered), in its own
    child run `register`; its lineage.json names the run and is logged on the parent run."""
    from mergeline.merge.lineage import set_run_id
    from mergeline.tasks import tracking

    set_run_id(m.path, log.parent)  # a reused merge records the run that registered it
    registered = None
    if register_as:
        with log.child("register") as (c, run):
            registered = register_model(log.mlflow_uri, register_as, str(m.path), log.parent, m.content_hash,
                                        verdict, {"mergeline.recipe_hash": recipe_hash})
            tracking.log_params(c, run, registered)
    tracking.log_artifact(log.client(), log.parent, m.path / "lineage.json")
    return registered
