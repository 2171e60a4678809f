"""MLflow tracking and registry for pipeline runs, through explicit run ids.

MLflow's "active run" lives in a thread-local, and Prefect runs tasks in worker threads, so this
module never relies on it: the flow creates one parent run, and each stage task opens its own
child run (tagged `mlflow.parentRunId`) around its work through a `RunLog`, so the child run's
start and end are the stage's; every call names its run id. A merged model is registered as a
model version whose `source` is its folder (`file://...`): nothing is copied, and
`mlflow.artifacts.download_artifacts("models:/NAME@champion")` returns the folder itself.

    mlflow ui --backend-store-uri sqlite:///mergeline-runs/demo/mlflow.db
"""
from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CANDIDATE, CHAMPION = "candidate", "champion"
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on one param value


_READY: set[str] = set()


def client(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri`. A new SQLite store is created (its tables migrated by alembic)
    under a file lock beside it: two fresh runs setting up the same store at once otherwise race
    on the migration ("table experiments already exists", "no such table")."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    db = Path(tracking_uri[len("sqlite:///"):])
    with _file_lock(db.with_name(db.name + ".setup-lock")):
        c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)  # may open the store
        c.search_experiments(max_results=1)  # creates and migrates the tracking tables
        c.search_registered_models(max_results=1)  # and the registry's
    _READY.add(tracking_uri)
    return c


def open_existing_store(tracking_uri: str) -> MlflowClient:
    """A client for a store that must exist already: a SQLite URI naming a missing file is
    refused (MLflow would create an empty database there)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {path} (from {tracking_uri})")
    return client(tracking_uri)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the other set-up is done
        yield
    finally:
        os.close(fd)


def ensure_experiment(c: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created on first use. With a local store the artifact location is set
    explicitly: otherwise artifacts land in ./mlruns of whatever folder the user ran from."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def start_run(c: MlflowClient, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return c.create_run(experiment_id, tags=tags, run_name=name).info.run_id


@contextmanager
def child_run(c: MlflowClient, parent_run_id: str, name: str) -> Iterator[str]:
    """A child run of `parent_run_id`, marked FAILED if the block raises."""
    exp = c.get_run(parent_run_id).info.experiment_id
    run_id = start_run(c, exp, name, parent_run_id=parent_run_id)
    try:
        yield run_id
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")


@dataclass(frozen=True)
class RunLog:
    """Where a stage task records itself: the MLflow store, the flow's parent run and the run
    folder. Plain strings, so it travels to a thread or a Dask worker as a task argument."""

    mlflow_uri: str
    parent: str
    run_dir: str

    @contextmanager
    def child(self, name: str) -> Iterator[tuple[MlflowClient, str]]:
        """(client, run id) of a new child run `name`, FINISHED at the end of the block (FAILED
        if it raises)."""
        c = client(self.mlflow_uri)
        with child_run(c, self.parent, name) as run:
            yield c, run

    def client(self) -> MlflowClient:
        return client(self.mlflow_uri)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept whole (as JSON) so a recipe's model list
    stays readable in the UI."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = []
    for k, v in flatten(params).items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        items.append(Param(_key(k), text[:MAX_PARAM_CHARS]))
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    """Log every finite number in `metrics` (nested dicts flattened; bools as 0/1; rest skipped)."""
    import time

    now = int(time.time() * 1000)
    items = []
    for k, v in flatten(metrics).items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            items.append(Metric(_key(k), float(v), now, step))
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i:i + 1000])


def set_tags(c: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    c.log_batch(run_id, tags=[RunTag(_key(k), str(v)) for k, v in tags.items()])


def log_artifact(c: MlflowClient, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    elif path.exists():
        c.log_artifact(run_id, str(path), artifact_path)


def log_csv_table(c: MlflowClient, run_id: str, path: Path, artifact_file: str) -> None:
    """A CSV as an MLflow table artifact: browsable in the UI's artifact view, and read back with
    `mlflow.load_table(artifact_file, run_ids=[run_id])` as a DataFrame."""
    import pandas as pd

    if Path(path).is_file():
        table = pd.read_csv(path)
        # Text columns as 'object': MLflow looks for them that way, and pandas 3 warns on 'str'.
        text = [col for col in table.columns if pd.api.types.is_string_dtype(table[col])]
        table[text] = table[text].astype(object)
        c.log_table(run_id, table, artifact_file)


def log_json(c: MlflowClient, run_id: str, obj: Any, name: str) -> None:
    log_text(c, run_id, json.dumps(obj, indent=2, default=str), name)


def log_text(c: MlflowClient, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        c.log_artifact(run_id, str(p))


def _key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space : / ; anything else (e.g. "," in lm-eval's
    # "acc,none") becomes "_".
    return "".join(ch if ch.isalnum() or ch in "_-. :/" else "_" for ch in k)[:250]


# ---------------------------------------------------------------- registry


def register_folder(c: MlflowClient, name: str, folder: Path, run_id: str | None,
                    tags: dict[str, str]) -> str:
    """Register `folder` as a new version of model `name` without copying it; return the version.

    The version's source is the folder's file:// URI. A real `mlflow server` refuses local
    sources outside the run's artifact folder (a security check on the server), so there the
    version points at an external LoggedModel (no weights uploaded) and the folder is kept in
    the `mergeline.folder` tag, which the lineage command reads either way."""
    folder = Path(folder).resolve()
    tags = {**tags, "mergeline.folder": str(folder)}
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    try:
        mv = c.create_model_version(name, source=folder.as_uri(), run_id=run_id, tags=tags)
    except MlflowException as e:
        if "Invalid model version source" not in str(e):
            raise
        mv = _register_external(c, name, folder, run_id, tags)
    c.set_registered_model_alias(name, CANDIDATE, mv.version)
    return str(mv.version)


def _register_external(c: MlflowClient, name: str, folder: Path, run_id: str | None,
                       tags: dict[str, str]):
    exp = c.get_run(run_id).info.experiment_id if run_id else "0"
    model = c.create_logged_model(experiment_id=exp, name=name, source_run_id=run_id,
                                  tags={"mergeline.folder": str(folder)}, model_type="external")
    c.finalize_logged_model(model.model_id, "READY")
    tags = {**tags, "mergeline.model_id": model.model_id}
    return c.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                  tags=tags, model_id=model.model_id)


def version_with_hash(c: MlflowClient, name: str, content_hash: str):
    """The newest version of `name` registered with this content hash whose folder still exists,
    or None: an unchanged rerun re-uses it instead of registering a copy."""
    quoted = name.replace("'", "\\'")
    try:
        versions = c.search_model_versions(f"name='{quoted}'")
    except MlflowException:
        return None
    same = [v for v in versions if (v.tags or {}).get("mergeline.content_hash") == content_hash
            and Path((v.tags or {}).get("mergeline.folder", "")).is_dir()]
    return max(same, key=lambda v: int(v.version), default=None)


def promote(c: MlflowClient, name: str, version: str) -> None:
    """Move `champion` to `version` (only called on GO)."""
    c.set_registered_model_alias(name, CHAMPION, version)


def folder_of(c: MlflowClient, name_at_alias: str) -> Path:
    """`NAME@alias` (or `NAME@3`, or `NAME/3`) -> the registered model folder."""
    name, sep, ref = name_at_alias.replace("/", "@").partition("@")
    if not sep or not ref:
        raise ValueError(f"expected NAME@alias or NAME@VERSION, got {name_at_alias!r}")
    mv = c.get_model_version(name, ref) if ref.isdigit() else c.get_model_version_by_alias(name, ref)
    if "mergeline.folder" in (mv.tags or {}):
        return Path(mv.tags["mergeline.folder"])
    if mv.source.startswith("file://"):
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(mv.source))
    raise ValueError(f"{name_at_alias} (version {mv.version}) does not point at a local folder: "
                     f"{mv.source}")
