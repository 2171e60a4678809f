"""`mergeline schedule` against a real `prefect server start` on loopback: the deployment exists
with its cron schedule, and a run triggered from it completes."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment


async def _deployment(name: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)


def test_schedule_serves_a_cron_deployment(prefect_server, nogo_pipeline, tmp_path):
    runs_dir = nogo_pipeline.parent / "work" / "runs"
    before = set(runs_dir.glob("*/summary.json"))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mergeline"), "schedule", str(nogo_pipeline),
         "--cron", "0 3 * * *", "--name", "nightly-test"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    try:
        dep = asyncio.run(_deployment("mergeline-pipeline/nightly-test"))
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
        assert dep.parameters == {"pipeline": str(nogo_pipeline.resolve())}
        run = run_deployment("mergeline-pipeline/nightly-test", timeout=300)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    # the served run really ran the pipeline: its NO-GO summary is on disk
    assert set(runs_dir.glob("*/summary.json")) - before


def test_schedule_without_a_server_is_refused(nogo_pipeline):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run([str(Path(sys.executable).parent / "mergeline"), "schedule", str(nogo_pipeline),
                        "--cron", "0 3 * * *"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "needs a Prefect server" in r.stderr


def test_prefect_yaml_deployment_is_loadable():
    """The example deployment names a real entrypoint, its parameters and a valid cron."""
    import inspect

    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[2]
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    flow = load_flow_from_entrypoint(str(root / dep["entrypoint"]))
    assert flow.name == "mergeline-pipeline"
    assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    assert (root / dep["parameters"]["pipeline"]).is_file()
    CronSchedule(cron=dep["schedules"][0]["cron"], timezone=dep["schedules"][0]["timezone"])
