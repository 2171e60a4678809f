"""Where the pipeline's records go: embedded by default, real servers one setting away.

With nothing configured, Prefect starts a temporary local server inside the process and MLflow
writes `<workdir>/mlflow.db` (SQLite) with its artifacts in `<workdir>/mlartifacts`. Setting
`PREFECT_API_URL` (e.g. http://127.0.0.1:4200/api) or `MLFLOW_TRACKING_URI` (e.g.
http://127.0.0.1:5000) points the same pipeline at real servers. Both are checked here, in
well under a second, before any merge or evaluation is started: an unreachable server should
cost the user a clear message, not a half-finished run.

A Dask cluster of worker processes (`runner: {kind: dask, dask_address: tcp://HOST:8786}`, the
README's multi-machine section) is checked the same way (`check_dask`): its scheduler answers and
has workers, each worker runs the same mergeline code and sees the workdir and the model folders
at the same paths, and Prefect is a real server the workers can reach (they report their task
runs to it; the temporary in-process server is not reachable from another process).

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


class DaskClusterError(ServerUnreachable):
    """A Dask cluster (runner.dask_address) the run cannot use; the message says why and what to do."""


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
    # An MLflow server makes every finished run print a "View run ... at: URL" line to stdout;
    # the progress lines say what happened, and the summary names the UI.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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


def _loopback(url: str) -> bool:
    host = (urlsplit(url if "://" in url else f"tcp://{url}").hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def check_dask(address: str, tracking: Tracking, paths: list[str | Path], timeout: float = 10.0) -> int:
    """Raise DaskClusterError unless the Dask scheduler at `address` can run the pipeline's tasks:
    it answers within `timeout` and has workers; Prefect is a real server (workers report their
    task runs there), reachable from other machines when the scheduler is not on this one (and
    so is MLflow, which the stage tasks write to); every worker imports the same mergeline code
    as this process and sees every path in `paths` (the workdir, the models). Returns the number
    of workers."""
    setting = f"runner.dask_address={address}"
    if not tracking.prefect_api_url:
        raise DaskClusterError(
            f"{setting}: Dask worker processes report their task runs to Prefect, so they need a real "
            "server: start `prefect server start` and set PREFECT_API_URL (e.g. http://HOST:4200/api); "
            "the temporary in-process server is not reachable from them")
    if not _loopback(address):
        if _loopback(tracking.prefect_api_url):
            raise DaskClusterError(
                f"PREFECT_API_URL={tracking.prefect_api_url} is a loopback address but the Dask scheduler "
                f"({address}) is not: workers on other machines cannot reach it; use the server's host name")
        uri = tracking.mlflow_uri
        if not uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")) or _loopback(uri):
            raise DaskClusterError(
                f"MLFLOW_TRACKING_URI={uri} cannot be reached from workers on other machines (Dask scheduler "
                f"{address}); start `mlflow server --host 0.0.0.0` and set MLFLOW_TRACKING_URI=http://HOST:5000")
    from distributed import Client

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise DaskClusterError(f"{setting}: no Dask scheduler answered within {timeout:g} s ({_reason(e)}); "
                               f"start one with `dask scheduler` and workers with `dask worker {address}`") from None
    with client:
        workers = client.scheduler_info()["workers"]
        if not workers:
            raise DaskClusterError(f"{setting}: the scheduler has no workers; start `dask worker {address}` "
                                   "on each machine")
        want = [str(p) for p in paths]
        try:
            seen = client.run(_worker_view, want)
        except Exception as e:  # noqa: BLE001 - e.g. the worker cannot import mergeline
            raise DaskClusterError(f"{setting}: a worker could not run mergeline's check ({type(e).__name__}: "
                                   f"{e}); install the same environment on every worker") from None
        code = _worker_view([])["code"]
        for worker, view in sorted(seen.items()):
            if view["missing"]:
                raise DaskClusterError(f"{setting}: worker {worker} does not see {view['missing'][0]}; every "
                                       "worker needs the workdir and the model folders at the same paths "
                                       "(a shared file system)")
            if view["code"] != code:
                raise DaskClusterError(f"{setting}: worker {worker} runs other mergeline code ({view['code']}, "
                                       f"here {code}); install the same checkout on every worker")
        return len(workers)


def _worker_view(paths: list[str]) -> dict:
    """Runs on each Dask worker: which of `paths` it cannot see, and its mergeline code version."""
    from mergeline.tasks.caching import code_version

    return {"missing": [p for p in paths if not os.path.exists(p)],
            "code": code_version("merge", "evaluation", "tasks", "flows")}


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or e
    return str(reason)


if __name__ == "__main__":
    t = resolve_tracking(Path.cwd())
    print(t)
    check_servers(t)
    print("reachable")
