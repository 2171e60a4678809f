"""`mergeline demo` end to end on the zoo (the README's main command), and the shipped NO-GO
pipeline (the zoo's different-base specimen, stopped by the compatibility gate)."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mergeline.tasks import tracking

MERGELINE = str(Path(sys.executable).parent / "mergeline")


def _env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded default


def test_demo_go_end_to_end(zoo, prefect_server, tmp_path):
    work = tmp_path / "demo"
    cmd = [MERGELINE, "demo", "--workdir", str(work), "--zoo", str(zoo.root)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    out = r.stdout
    # The zoo's fine-tunes survive a TIES merge (see zoo/train.py): the demo ships.
    assert r.returncode == 0, out + r.stderr[-3000:]
    assert "GO" in out and "NO-GO" not in out and "stage: gate" in out
    # an `mlflow ui` that works without an activated venv, and where MLflow 3 shows the runs
    mlflow = Path(sys.executable).parent / "mlflow"
    assert f"{mlflow} ui --backend-store-uri sqlite:///{work.resolve()}/mlflow.db" in out and "Model training" in out
    report = Path(out.split("report: ", 1)[1].split()[0])
    assert report.is_file() and report.suffix == ".md"
    html = Path(out.split("html report: ", 1)[1].split()[0])
    assert html.is_file() and html.suffix == ".html"
    # plain progress lines for a log file, and no bars or start-up chatter of the tools
    log = r.stderr
    assert "merges 3/3 done" in log and "evaluations 7/7 done" in log and "ETA" in log, log[-3000:]
    assert "it/s]" not in log and "| INFO" not in log and "alembic" not in log, log[-3000:]
    pipe = yaml.safe_load((work / "pipeline.yaml").read_text())
    assert Path(pipe["recipe"]).is_absolute() and pipe["workdir"] == str(work.resolve())
    c = tracking.client(f"sqlite:///{work.resolve()}/mlflow.db")
    candidate = tracking.folder_of(c, "mergeline-demo@candidate")
    assert candidate.parent == work.resolve() / "models" and (candidate / "lineage.json").is_file()
    aliases = c.get_registered_model("mergeline-demo").aliases
    assert {"candidate", "champion"} <= set(aliases)  # champion moves only on GO
    assert aliases["champion"] == aliases["candidate"]

    # an unchanged rerun: everything from the caches, nothing registered again, and it says so
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "already registered as mergeline-demo version 1" in r.stdout, r.stdout
    assert "reused from earlier runs: merges linear, task_arithmetic, ties; evaluations" in r.stdout, r.stdout
    assert len(c.search_model_versions("name='mergeline-demo'")) == 1


def test_demo_nogo_pipeline_has_its_own_workdir(zoo, prefect_server, tmp_path):
    r = subprocess.run([MERGELINE, "demo", "--nogo", "--zoo", str(zoo.root)], cwd=tmp_path,
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "NO-GO" in r.stdout and "stage: check" in r.stdout and "different_base" in r.stdout
    work = tmp_path / "mergeline-runs" / "demo-nogo"
    assert (work / "pipeline.yaml").is_file() and not (work / "models").exists()
    assert not (tmp_path / "mergeline-runs" / "demo").exists()  # the GO demo's workdir is untouched
