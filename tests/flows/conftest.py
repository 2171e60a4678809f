"""Pipeline files over the tiny models of tests/conftest.py (`tiny_models`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def nogo_pipeline(tiny_models, tmp_path_factory) -> Path:
    """A pipeline whose recipe includes a model of another base: the compat gate must stop it."""
    root = tmp_path_factory.mktemp("nogo")
    (root / "tasks").mkdir()
    m = tiny_models
    pipe = {
        "name": "nogo-tiny",
        "workdir": str(root / "work"),
        "recipe": {"merge_method": "ties", "base_model": str(m["base"]),
                   "parameters": {"density": 0.5},
                   "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                              {"model": str(m["different_base"]), "parameters": {"weight": 0.5}}]},
        "baselines": ["linear"],
        "eval_suite": {"retention": {"ft_a": ["t_a"], "different_base": ["t_b"]},
                       "include_paths": [str(root / "tasks")]},
        "gate_policy": {},
        "tracking": {"register_as": "nogo-tiny"},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path
