"""A two-stage recipe (mergekit-multi) through the pipeline on the zoo, with real Prefect runs, a
real MLflow SQLite store and real lm-eval: each stage checked and merged in its own child runs,
its intermediate model kept under the workdir, the final model's lineage naming every stage (so
`mergeline lineage` shows the generations), a rerun reusing every stage; and each stage's MLflow
child run spanning the stage (the merge run lasts at least the merge's own seconds and starts
after the check run ended)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.flows.pipeline import run_pipeline
from mergeline.flows.pipeline_config import load_pipeline
from mergeline.tasks import tracking


def _two_stage_recipe(zoo) -> str:
    f = zoo.finetunes
    first = {"name": "add-rev", "merge_method": "ties", "base_model": str(zoo.base), "dtype": "float32",
             "parameters": {"density": 0.5, "normalize": True},
             "models": [{"model": str(f["addition"]), "parameters": {"weight": 0.5}},
                        {"model": str(f["reverse"]), "parameters": {"weight": 0.5}}]}
    final = {"merge_method": "ties", "base_model": str(zoo.base), "dtype": "float32",
             "parameters": {"density": 0.5, "normalize": True},
             "models": [{"model": "add-rev", "parameters": {"weight": 0.67}},   # the first stage, by name
                        {"model": str(f["facts"]), "parameters": {"weight": 0.33}}]}
    return yaml.safe_dump_all([first, final], sort_keys=False)


def _write(root: Path, zoo) -> Path:
    (root / "recipe.yaml").write_text(_two_stage_recipe(zoo))
    pipe = {
        "name": "two-stage", "workdir": str(root / "work"), "recipe": "recipe.yaml", "baselines": [],
        "eval_suite": {"retention": {s: [f"zoo_{s}"] for s in ("addition", "reverse", "facts")},
                       "include_paths": [str(zoo.tasks_dir)], "limit": 8, "batch_size": 16},
        "gate_policy": {"compatibility": {"must_pass": True}},
        "tracking": {"register_as": "two-stage", "experiment": "two-stage"},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def test_two_stage_recipe_in_the_pipeline(zoo, prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = _write(tmp_path, zoo)
    pipe = load_pipeline(path)
    work = pipe.workdir_path
    stage_dir = work / "stages" / "ties" / "add-rev"
    assert [s.name for s in pipe.main.stages] == ["add-rev"] and pipe.main.stages[0].out == stage_dir
    assert sorted(pipe.main.leaves()) == ["addition", "base", "facts", "reverse"]

    s = run_pipeline(path)
    assert s["stage"] == "gate", s
    assert s["states"]["stage:add-rev"] == "Completed" and s["states"]["merge:ties"] == "Completed"
    assert (stage_dir / "model.safetensors").is_file() or list(stage_dir.glob("*.safetensors"))
    final = Path(s["models"]["ties"])
    assert final.parent == work / "models"
    lineage = json.loads((final / "lineage.json").read_text())
    assert [st["name"] for st in lineage["stages"]] == ["add-rev", None]
    parent = next(p for p in lineage["parents"] if p["path"] == str(stage_dir))
    assert {p["name"] for p in parent["lineage"]["parents"]} == {"addition", "reverse"}  # the earlier generation
    assert [r["name"] for r in json.loads((final / "mergeline_stages.json").read_text())] == ["add-rev", None]

    r = CliRunner().invoke(app, ["lineage", str(final)])
    assert r.exit_code == 0, r.output
    assert "facts" in r.output and "addition" in r.output and r.output.index("add-rev") < r.output.index("addition")

    c = tracking.client(s["mlflow_uri"])
    runs = {x.info.run_name: x for x in c.search_runs([c.get_experiment_by_name("two-stage").experiment_id])
            if x.data.tags.get("mlflow.parentRunId") == s["mlflow_run_id"]}
    assert {"check:add-rev", "stage:add-rev", "check", "merge:ties", "evaluate:ties", "gate", "register"} <= set(runs)
    # each stage's child run spans the stage: opened before its work, closed after it
    merge_run, check_run = runs["merge:ties"].info, runs["check"].info
    assert merge_run.start_time >= check_run.end_time
    assert merge_run.end_time - merge_run.start_time >= 1000 * runs["merge:ties"].data.metrics["seconds"] > 0
    stage_run = runs["stage:add-rev"].info
    assert stage_run.end_time - stage_run.start_time >= 1000 * runs["stage:add-rev"].data.metrics["seconds"] > 0
    assert stage_run.end_time <= runs["check"].info.start_time  # the final is checked once its inputs exist

    # a rerun reuses every stage, and the final merge and its evaluation
    stamp = (stage_dir / "mergeline_stages.json").stat().st_mtime_ns
    s2 = run_pipeline(path)
    assert set(s2["states"].values()) == {"Cached"}, s2["states"]
    assert s2["models"] == s["models"] and s2["lm_eval_runs"] == 0
    assert (stage_dir / "mergeline_stages.json").stat().st_mtime_ns == stamp  # not written again
    rerun = {x.info.run_name: x for x in c.search_runs([c.get_experiment_by_name("two-stage").experiment_id])
             if x.data.tags.get("mlflow.parentRunId") == s2["mlflow_run_id"]}
    for name in ("stage:add-rev", "merge:ties"):  # nothing merged in this run, and the run says so
        assert rerun[name].data.tags["mergeline.cached"] == "True" and rerun[name].data.metrics["seconds"] == 0.0
    assert s2["registered"]["reused"] is True
