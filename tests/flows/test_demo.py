"""`mergeline demo` end to end on the zoo (the README's main command), and the shipped NO-GO
pipeline (the zoo's different-base specimen, stopped by the compatibility gate)."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks import tracking

MERGELINE = str(Path(sys.executable).parent / "mergeline")


def _env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded default


def test_demo_go_end_to_end(zoo, prefect_server, tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run([MERGELINE, "demo", "--workdir", str(work), "--zoo", str(zoo.root)],
                       capture_output=True, text=True, env=_env(), timeout=900)
    out = r.stdout
    # The zoo's fine-tunes survive a TIES merge (see evaluation/zoo/train.py): the demo ships.
    assert r.returncode == 0, out + r.stderr[-3000:]
    assert "GO" in out and "NO-GO" not in out and "stage: gate" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{work.resolve()}/mlflow.db" in out
    report = Path(out.split("report: ", 1)[1].split()[0])
    assert report.is_file() and report.suffix == ".md"
    pipe = yaml.safe_load((work / "pipeline.yaml").read_text())
    assert Path(pipe["recipe"]).is_absolute() and pipe["workdir"] == str(work.resolve())
    c = tracking.client(f"sqlite:///{work.resolve()}/mlflow.db")
    candidate = tracking.folder_of(c, "mergeline-demo@candidate")
    assert candidate.parent == work.resolve() / "models" and (candidate / "lineage.json").is_file()
    aliases = c.get_registered_model("mergeline-demo").aliases
    assert {"candidate", "champion"} <= set(aliases)  # champion moves only on GO
    assert aliases["champion"] == aliases["candidate"]


def test_demo_nogo_pipeline(zoo, prefect_server, tmp_path):
    work = tmp_path / "nogo"
    r = subprocess.run([MERGELINE, "demo", "--nogo", "--workdir", str(work), "--zoo", str(zoo.root)],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "NO-GO" in r.stdout and "stage: check" in r.stdout and "different_base" in r.stdout
    assert not (work / "models").exists()
