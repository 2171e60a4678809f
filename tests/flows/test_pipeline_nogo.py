"""The compatibility gate stops a pipeline before any merge (NO-GO), recorded in MLflow; bad
pipeline files are refused with the key named."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.flows.pipeline_config import PipelineError, load_pipeline
from mergeline.tasks import tracking


def test_bad_keys_are_named(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"recipe": {}, "eval_suite": {}, "gate_policy": {},
                                 "tracking": {"experimnt": "x"}, "colour": 1}))
    with pytest.raises(PipelineError, match=r"unknown key 'tracking.experimnt'.*unknown key 'colour'|"
                                            r"unknown key 'colour'.*unknown key 'tracking.experimnt'"):
        load_pipeline(p)
    p.write_text(yaml.safe_dump({"recipe": "missing.yaml", "eval_suite": {}, "gate_policy": {}}))
    with pytest.raises(PipelineError, match="key 'recipe': file missing.yaml not found"):
        load_pipeline(p)
    result = CliRunner().invoke(app, ["run", str(p)])
    assert result.exit_code == 2


def test_nogo_stops_before_merge(nogo_pipeline, prefect_server):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded default
    result = subprocess.run([str(Path(sys.executable).parent / "mergeline"), "run", str(nogo_pipeline)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NO-GO" in result.stdout and "stage: check" in result.stdout
    assert "different_base" in result.stdout
    work = load_pipeline(nogo_pipeline).workdir_path
    assert not (work / "models").exists()  # nothing merged
    c = tracking.client(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("mergeline")
    assert Path(exp.artifact_location.removeprefix("file://")) == work / "mlartifacts"
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}
    assert set(runs) == {"nogo-tiny", "check"}
    parent = runs["nogo-tiny"]
    assert parent.data.tags["mergeline.decision"] == "NO-GO"
    assert parent.data.metrics["go"] == 0.0
    assert runs["check"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["check"].data.tags["status"] == "fail"
    assert {a.path for a in c.list_artifacts(runs["check"].info.run_id)} == {"compat_report.json"}
    assert not c.search_registered_models()  # a NO-GO at the check registers nothing


def test_retention_names_must_be_the_recipes_finetunes():
    """The pipeline and `mergeline tune` share this check: a suite naming a model the recipe does
    not merge (or the base) is unusable input, named with the recipe's fine-tunes."""
    from mergeline.evaluation.suite import load_suite
    from mergeline.flows.pipeline_config import check_retention_names

    folders = {"base": Path("b"), "ft_a": Path("a"), "ft_b": Path("c")}
    check_retention_names(load_suite({"retention": {"ft_a": ["t_a"]}, "general": ["t_gen"]}), folders, "base")
    for wrong in ("ft_x", "base"):
        suite = load_suite({"retention": {wrong: ["t_a"]}, "general": ["t_gen"]})
        with pytest.raises(PipelineError, match=rf"retention names \['{wrong}'\] are not models of the recipe "
                                                r"\(models: \['ft_a', 'ft_b'\]\)"):
            check_retention_names(suite, folders, "base")
