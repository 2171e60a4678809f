"""Shared fixtures. Tools' caches go to a per-session temporary folder; nothing is downloaded."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before any tool is imported: HF, Prefect, MLflow and matplotlib read these at import.
_SCRATCH = Path(tempfile.mkdtemp(prefix="mergeline-tests-"))
for var, sub in {
    "HF_HOME": "hf", "HF_DATASETS_CACHE": "hf/datasets", "PREFECT_HOME": "prefect",
    "MPLCONFIGDIR": "mpl",
}.items():
    os.environ[var] = str(_SCRATCH / sub)
os.environ.update(
    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
    MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    MLFLOW_TRACKING_URI=f"sqlite:///{_SCRATCH / 'mlflow.db'}",
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def scratch() -> Path:
    return _SCRATCH
