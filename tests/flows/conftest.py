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


@pytest.fixture(scope="session")
def go_pipeline_writer():
    return write_go_pipeline


def write_go_pipeline(root: Path, models: dict[str, Path], tasks: Path, runner: str = "threads") -> Path:
    """TIES of ft_a + ft_b with a linear baseline, judged by a policy that only asks for a
    passing compatibility check: GO, so the registry path is exercised. The fine-tunes' names in
    the suite are their folders' names."""
    pipe = {
        "name": "go-tiny",
        "workdir": str(root / "work"),
        "recipe": {"merge_method": "ties", "base_model": str(models["base"]),
                   "parameters": {"density": 0.5}, "dtype": "float32",
                   "models": [{"model": str(models["ft_a"]), "parameters": {"weight": 0.5}},
                              {"model": str(models["ft_b"]), "parameters": {"weight": 0.5}}]},
        "baselines": ["linear"],
        "eval_suite": {"retention": {models["ft_a"].name: ["t_a"], models["ft_b"].name: ["t_b"]}, "general": ["t_gen"],
                       "include_paths": [str(tasks)], "batch_size": 8},
        "gate_policy": {"candidate": "ties", "compatibility": {"must_pass": True}},
        "tracking": {"register_as": "go-tiny", "experiment": "go"},
        "runner": {"kind": runner, "max_workers": 2},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path
