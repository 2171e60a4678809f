"""Unreachable servers are reported in well under a second, before any heavy work."""
import time

import pytest

from mergeline.flows.servers import ServerUnreachable, check_mlflow, check_prefect, resolve_tracking


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_servers_fail_fast_with_the_setting_named():
    port = _dead_port()
    t = time.monotonic()
    with pytest.raises(ServerUnreachable, match="PREFECT_API_URL"):
        check_prefect(f"http://127.0.0.1:{port}/api", timeout=2)
    with pytest.raises(ServerUnreachable, match="MLFLOW_TRACKING_URI"):
        check_mlflow(f"http://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - t < 5


def test_embedded_default_and_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    t = resolve_tracking(tmp_path)
    assert t.mlflow_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert t.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert t.prefect_api_url is None
    check_mlflow(t.mlflow_uri)  # a writable folder is enough
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    t = resolve_tracking(tmp_path, mlflow_uri="sqlite:///ignored.db")
    assert (t.mlflow_uri, t.prefect_api_url, t.artifact_location) == (
        "http://127.0.0.1:5000", "http://127.0.0.1:4200/api", None)


def test_refuses_one_sqlite_file_for_both(tmp_path, monkeypatch):
    db = tmp_path / "shared.db"
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{db}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(ServerUnreachable, match="same SQLite"):
        resolve_tracking(tmp_path)


def test_run_with_unreachable_mlflow_exits_2_before_any_work(nogo_pipeline):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_dead_port()}")
    env.pop("PREFECT_API_URL", None)  # would otherwise need the session's server
    t = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "mergeline"), "run", str(nogo_pipeline)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "MLFLOW_TRACKING_URI" in r.stderr and "unreachable" in r.stderr
    assert "temporary server" not in r.stdout + r.stderr  # Prefect was never started
    assert time.monotonic() - t < 60
