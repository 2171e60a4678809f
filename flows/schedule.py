"""Scheduling: a Prefect deployment that runs a pipeline file on a cron schedule.

Schedules live on a Prefect server (the temporary in-process one cannot keep them), so
`PREFECT_API_URL` must name a running `prefect server start` (or Prefect Cloud). This process
then serves the deployment: it polls the server and runs each scheduled (or manually triggered)
flow run, until stopped with Ctrl-C.

    prefect server start &                                   # once, anywhere
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    mergeline schedule configs/pipeline_demo.yaml --cron "0 3 * * *" --name nightly
    prefect deployment run mergeline-pipeline/nightly        # trigger one run now

For workers on other machines, `prefect.yaml` holds the same deployment for `prefect deploy`
with a process work pool (see the README).
"""
from __future__ import annotations

from pathlib import Path

from mergeline.flows.pipeline_config import load_pipeline
from mergeline.flows.servers import ServerUnreachable, check_prefect, default_environment

FLOW_NAME = "mergeline-pipeline"


def prefect_api_url() -> str:
    """The configured server (environment or active profile), checked; a clear error if none."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServerUnreachable(
            "scheduling needs a Prefect server: start one with `prefect server start` and set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    check_prefect(url)
    return url


def make_deployment(pipeline: str | Path, cron: str, name: str | None = None):
    """A RunnerDeployment of the pipeline flow with `cron` (validated by Prefect's croniter)."""
    from mergeline.flows.pipeline import pipeline_flow

    path = Path(pipeline).resolve()
    pipe = load_pipeline(path)  # refuse a bad file now, not at 3 a.m.
    return pipeline_flow.to_deployment(
        name=name or pipe.name, cron=cron, parameters={"pipeline": str(path)},
        tags=["mergeline"], description=f"mergeline pipeline {path}")


def serve(pipeline: str | Path, cron: str, name: str | None = None) -> None:
    """Create the deployment on the server and serve its runs until interrupted."""
    default_environment()
    prefect_api_url()
    from prefect import serve as prefect_serve

    prefect_serve(make_deployment(pipeline, cron, name))
