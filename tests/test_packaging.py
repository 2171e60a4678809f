"""The installed package: everything under the `mergeline` namespace, configs shipped as package
data, and a wheel that runs the demo with no checkout in sight.

    .venv/bin/python -m pytest tests/test_packaging.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("merge", "evaluation", "zoo", "tasks", "flows", "configs")


def _declared() -> tuple[list[str], dict[str, str]]:
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setup["packages"], setup["package-dir"]


def test_every_package_folder_is_declared_under_the_namespace():
    packages, dirs = _declared()
    assert {name.split(".")[1] for name in dirs} == set(FOLDERS)
    assert all(dirs[f"mergeline.{f}"] == f for f in FOLDERS)
    on_disk = {
        "mergeline." + str(d.relative_to(REPO)).replace(os.sep, ".")
        for f in FOLDERS for d in [REPO / f, *(REPO / f).rglob("*")]
        if d.is_dir() and d.name != "__pycache__"
    }
    assert set(packages) == on_disk, "pyproject's packages list and the folders disagree"


def test_default_configs_are_found_through_the_package():
    from mergeline.configs import DIR
    from mergeline.evaluation.policy import load_policy
    from mergeline.merge.compat.policy import DEFAULT_POLICY

    assert DEFAULT_POLICY.parent == DIR and DEFAULT_POLICY.is_file()
    assert load_policy(DIR / "gate_policy.yaml")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # pip installs the pinned stack: about two minutes on a quiet machine
def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path):
    """Build the wheel, install it with its pinned dependencies into a new virtual environment
    (pip, from the package index or its cache, as a user would), and run `mergeline demo` from an
    empty folder: the code must come from the venv, never from this checkout."""
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True)
    wheel = next(dist.glob("mergeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mergeline", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "mergeline/configs/gate_policy.yaml" in names
    assert "mergeline/merge/chat_templates/chatml.jinja" in names

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, capture_output=True)
    r = subprocess.run(pip + ["-c", str(REPO / "constraints.txt"), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import mergeline.flows.cli as c, mergeline.configs as k; "
                            "print(c.__file__); print(k.DIR)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout

    r = subprocess.run([str(venv / "bin" / "mergeline"), "demo", "--workdir", str(empty / "runs")],
                       cwd=empty, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "GO" in r.stdout
