"""MLflow tracking and registry helpers against the default SQLite store and a real `mlflow server`."""
from pathlib import Path

import mlflow
import pytest

from mergeline.tasks import tracking


def _folder(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "model.safetensors").write_bytes(b"\0" * 64 + name.encode())
    return d


def _runs_and_registry(uri: str, tmp_path: Path, artifact_location: str | None) -> None:
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, f"exp-{tmp_path.name}", artifact_location)
    assert tracking.ensure_experiment(c, f"exp-{tmp_path.name}", artifact_location) == exp
    parent = tracking.start_run(c, exp, "pipeline")
    with tracking.child_run(c, parent, "merge") as child:
        tracking.log_params(c, child, {"recipe": {"merge_method": "ties", "models": [{"model": "a"}]}})
        tracking.log_metrics(c, child, {"scores": {"acc,none": 0.5, "bad": float("nan")}, "go": True})
        tracking.log_json(c, child, {"status": "pass"}, "compat.json")
    run = c.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe.merge_method"] == "ties"
    assert run.data.metrics == {"scores.acc_none": 0.5, "go": 1.0}
    assert [a.path for a in c.list_artifacts(child)] == ["compat.json"]
    with pytest.raises(RuntimeError):
        with tracking.child_run(c, parent, "boom"):
            raise RuntimeError("x")
    failed = [r for r in c.search_runs([exp]) if r.info.run_name == "boom"]
    assert failed[0].info.status == "FAILED"

    model = _folder(tmp_path, "merged")
    name = f"m-{tmp_path.name}"
    v1 = tracking.register_folder(c, name, model, parent, {"mergeline.content_hash": "sha256:1"})
    v2 = tracking.register_folder(c, name, _folder(tmp_path, "merged2"), parent, {})
    assert (v1, v2) == ("1", "2")
    assert str(c.get_model_version_by_alias(name, "candidate").version) == "2"
    tracking.promote(c, name, v1)
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    assert tracking.folder_of(c, f"{name}@champion") == model.resolve()
    assert tracking.folder_of(c, f"{name}@2") == (tmp_path / "merged2").resolve()
    assert c.get_model_version(name, v1).tags["mergeline.content_hash"] == "sha256:1"


def test_sqlite_store_runs_registry_no_copy(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = (tmp_path / "mlartifacts").as_uri()
    _runs_and_registry(uri, tmp_path, artifacts)
    # artifacts stay in the workdir, not ./mlruns of the cwd
    assert list((tmp_path / "mlartifacts").rglob("compat.json"))
    assert not Path("mlruns").exists()
    # the registered version is the folder itself: nothing copied
    mlflow.set_tracking_uri(uri)
    got = mlflow.artifacts.download_artifacts(f"models:/m-{tmp_path.name}@champion")
    assert Path(got).resolve() == (tmp_path / "merged").resolve()


def test_real_mlflow_server(mlflow_server, tmp_path):
    _runs_and_registry(mlflow_server, tmp_path, None)


_SETUP = """
import sys, time
from mergeline.tasks import tracking
start = float(sys.argv[2])
while time.time() < start:  # all processes open the fresh store at the same moment
    pass
c = tracking.client(sys.argv[1])
tracking.ensure_experiment(c, "race", None)
print("ok")
"""


def test_fresh_sqlite_store_set_up_by_racing_processes(tmp_path):
    """Four fresh runs creating the same SQLite store at once: alembic's migrations race (table
    already exists / no such table) unless the set-up takes turns under a lock."""
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = str(time.time() + 8)  # imports take a few seconds on a busy machine
    procs = [subprocess.Popen([sys.executable, "-c", _SETUP, uri, start], cwd=repo, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    for p in procs:  # without the lock: "duplicate column name: step", "table ... already exists"
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    c = tracking.client(uri)
    assert c.get_experiment_by_name("race") is not None


def test_rerun_with_same_content_registers_nothing_new(tmp_path):
    """register_model re-uses the version with the same content hash; champion moves only on GO."""
    from mergeline.tasks.register_tasks import register_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = _folder(tmp_path, "merged")
    other = _folder(tmp_path, "other")
    first = register_model.fn(uri, "m", str(folder), None, "sha256:aaa", "NO-GO")
    assert first == {"name": "m", "version": "1", "aliases": ["candidate"], "reused": False}
    again = register_model.fn(uri, "m", str(folder), None, "sha256:aaa", "GO")  # same content, now GO
    assert again == {"name": "m", "version": "1", "aliases": ["candidate", "champion"], "reused": True}
    changed = register_model.fn(uri, "m", str(other), None, "sha256:bbb", "INCONCLUSIVE")
    assert changed["version"] == "2" and changed["aliases"] == ["candidate"]
    c = tracking.client(uri)
    assert str(c.get_model_version_by_alias("m", "champion").version) == "1"  # INCONCLUSIVE: not moved
    assert c.get_model_version("m", "1").tags["mergeline.decision"] == "GO"
    assert len(c.search_model_versions("name='m'")) == 2
