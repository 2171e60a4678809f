"""Where the pipeline's records go: embedded by default, real servers one setting away.

With nothing configured, Prefect starts a temporary local server inside the process and MLflow
writes `<workdir>/mlflow.db` (SQLite) with its artifacts in `<workdir>/mlartifacts`. Setting
`PREFECT_API_URL` (e.g. http://127.0.0.1:4200/api) or `MLFLOW_TRACKING_URI` (e.g.
http://127.0.0.1:5000) points the same pipeline at real servers. Both are checked here, in
well under a second, before any merge or evaluation is started: an unreachable server should
cost the user a clear message, not a half-finished run.

    python -m mergeline.flows.servers            # prints what a pipeline run would use, and checks it
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mergeline.flows.errors import InputError


class ServerUnreachable(InputError):
    """A configured Prefect or MLflow server did not answer its health check."""


class TrackingURIError(InputError):
    """A tracking URI with a scheme MLflow cannot store runs in (e.g. ftp://), refused by name."""


# What MLflow can keep runs in: a server, a database, a folder, Databricks.
MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc", "uc")


@dataclass(frozen=True)
class Tracking:
    """The resolved tracking targets of one pipeline run."""

    mlflow_uri: str
    artifact_location: str | None  # set explicitly for local stores (else ./mlruns of the cwd)
    prefect_api_url: str | None  # None = Prefect's temporary in-process server


def default_environment() -> None:
    """Settings every run wants, unless the user chose otherwise."""
    # The temporary Prefect server needs 16-27 s to start on 2 cores; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Avoid a write to the user's config folder and a network call.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network calls
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def resolve_tracking(workdir: Path, mlflow_uri: str | None = None,
                     prefect_api_url: str | None = None) -> Tracking:
    """Environment first (one setting away), then the pipeline file, then the embedded default."""
    workdir = Path(workdir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    api = os.environ.get("PREFECT_API_URL") or prefect_api_url or None
    _check_scheme(uri, "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else
                  "tracking.mlflow_tracking_uri", MLFLOW_SCHEMES, "http(s)://HOST:PORT of an `mlflow server`, "
                  "sqlite:///PATH, postgresql://..., or unset it for WORKDIR/mlflow.db")
    if api:
        _check_scheme(api, "PREFECT_API_URL" if os.environ.get("PREFECT_API_URL") else "tracking.prefect_api_url",
                      ("http", "https"), "http(s)://HOST:PORT/api of a `prefect server start`, or unset it")
    local = not uri.startswith(("http://", "https://", "databricks"))
    artifacts = (workdir / "mlartifacts").as_uri() if local else None
    _refuse_shared_sqlite(uri)
    return Tracking(mlflow_uri=uri, artifact_location=artifacts, prefect_api_url=api)


def _check_scheme(uri: str, setting: str, schemes: tuple[str, ...], hint: str) -> None:
    """Refuse a URI whose scheme the tool cannot use, before any work; a bare path is a folder."""
    scheme = urlsplit(uri).scheme.lower().split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if scheme and len(scheme) > 1 and scheme not in schemes:  # len 1: a Windows drive letter
        raise TrackingURIError(f"{setting}={uri}: unsupported scheme '{scheme}://' (use {hint})")


def _refuse_shared_sqlite(mlflow_uri: str) -> None:
    # Prefect and MLflow both keep an `alembic_version` table: one file for both corrupts either.
    prefect_db = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    if mlflow_uri.startswith("sqlite:") and prefect_db.startswith("sqlite"):
        a = mlflow_uri.split(":///", 1)[-1]
        b = prefect_db.split(":///", 1)[-1]
        if a and Path(a).resolve() == Path(b).resolve():
            raise ServerUnreachable(
                f"MLFLOW_TRACKING_URI and PREFECT_API_DATABASE_CONNECTION_URL name the same SQLite "
                f"file ({a}); give MLflow and Prefect separate databases")


def _get(url: str, timeout: float) -> int:
    req = urllib.request.Request(url, headers={"User-Agent": "mergeline"})
    # No proxies for loopback servers; a corporate proxy would answer for a dead local server.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        return resp.status


def _check_health(what: str, setting: str, base_url: str, hint: str, timeout: float) -> None:
    """Raise ServerUnreachable unless `base_url`/health answers 200; `hint` says how to fix it."""
    url = base_url.rstrip("/") + "/health"
    try:
        status = _get(url, timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ServerUnreachable(f"{what} server at {setting}={base_url} is unreachable ({_reason(e)}); {hint}") from None
    if status != 200:
        raise ServerUnreachable(f"{what} server at {base_url} answered {status} on {url}")


def check_prefect(api_url: str | None, timeout: float = 5.0) -> None:
    """Raise ServerUnreachable unless `api_url`'s /health answers 200 (None: nothing to check)."""
    if api_url:
        _check_health("Prefect", "PREFECT_API_URL", api_url, "start it with `prefect server start` "
                      "or unset PREFECT_API_URL to run without a server", timeout)


def check_mlflow(uri: str, timeout: float = 5.0) -> None:
    """Raise ServerUnreachable unless an http(s) MLflow server answers /health, or a local store's
    folder is writable."""
    if uri.startswith(("http://", "https://")):
        _check_health("MLflow", "MLFLOW_TRACKING_URI", uri, "start it with `mlflow server` or unset "
                      "MLFLOW_TRACKING_URI to use a local SQLite store", timeout)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ServerUnreachable(f"cannot create the MLflow store folder {folder}: {e}") from None
        if not os.access(folder, os.W_OK):
            raise ServerUnreachable(f"the MLflow store folder {folder} is not writable")


def check_servers(tracking: Tracking, timeout: float = 5.0) -> None:
    check_mlflow(tracking.mlflow_uri, timeout)
    check_prefect(tracking.prefect_api_url, timeout)


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or e
    return str(reason)


if __name__ == "__main__":
    t = resolve_tracking(Path.cwd())
    print(t)
    check_servers(t)
    print("reachable")
