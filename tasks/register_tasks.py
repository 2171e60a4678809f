"""Prefect task: register the merged folder in the MLflow model registry (no copy).

Alias `candidate` moves to every new version; `champion` moves only on GO. Retries cover a
registry server that is briefly unavailable.

    from tasks.register_tasks import register_model
"""
from __future__ import annotations

from prefect import task


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 10])
def register_model(tracking_uri: str, name: str, folder: str, run_id: str, content_hash: str,
                   decision: str, extra_tags: dict | None = None) -> dict:
    from tasks import tracking

    c = tracking.client(tracking_uri)
    tags = {"mergeline.content_hash": content_hash, "mergeline.decision": decision, **(extra_tags or {})}
    version = tracking.register_folder(c, name, folder, run_id, tags)
    aliases = [tracking.CANDIDATE]
    if decision == "GO":
        tracking.promote(c, name, version)
        aliases.append(tracking.CHAMPION)
    return {"name": name, "version": version, "aliases": aliases}
