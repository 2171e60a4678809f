"""The whole pipeline to GO on tiny models: an interrupted run resumes without re-merging; MLflow parent + child runs, artifacts, registry with
aliases, Prefect artifacts; a rerun is served from the caches; a changed fine-tune re-does only
what depends on it (its evaluation, the merges and theirs, not the base's or the other's), here
on a local Dask cluster."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from safetensors.torch import load_file, save_file

from mergeline.flows.pipeline import run_pipeline
from mergeline.flows.pipeline_config import load_pipeline
from mergeline.tasks import tracking


# A folder name matplotlib's math-text parser chokes on ('$^$' is math with nothing to raise):
# the report stage must not die of it, and must name it if a plot cannot be drawn.
ODD = "ft$^$b"


def _copy_models(tiny_models, root: Path) -> dict[str, Path]:
    out = {}
    for k, folder in (("base", "base"), ("ft_a", "ft_a"), ("ft_b", ODD)):
        out[k] = root / "models_in" / folder
        shutil.copytree(tiny_models[k], out[k])
    return out


def test_go_pipeline_tracking_registry_and_caching(tiny_models, tiny_tasks, prefect_server, tmp_path,
                                                   monkeypatch, go_pipeline_writer, mlflow_server):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded SQLite default
    models = _copy_models(tiny_models, tmp_path)
    path = go_pipeline_writer(tmp_path, models, tiny_tasks)
    work = load_pipeline(path).workdir_path

    # a run killed once both merges are on disk ...
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mergeline"), "run", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + 240
    while len(list((work / "models").glob("*/lineage.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the first run ended early"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    # ... resumes: the merges are not computed again
    s1 = run_pipeline(path)
    assert s1["decision"] == "GO", s1
    for name in ("ties", "linear"):
        assert s1["states"][f"merge:{name}"] == "Cached" or name in s1["reused_merges"], s1
    assert s1["mlflow_uri"] == f"sqlite:///{work / 'mlflow.db'}"
    # the report stage survives the odd name: either the plots cope, or it says which name broke them
    assert Path(s1["reports"]["md"]).is_file()
    assert Path(s1["reports"].get("html", "")).is_file() or any(ODD in p for p in s1["problems"]), s1["problems"]

    c = tracking.client(s1["mlflow_uri"])
    exp = c.get_experiment_by_name("go")
    runs = c.search_runs([exp.experiment_id])
    parent = c.get_run(s1["mlflow_run_id"])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"check", "merge:ties", "merge:linear", "smoke:ties", "smoke:linear", "evaluate:base",
                             "evaluate:ft_a", f"evaluate:{ODD}", "evaluate:ties", "evaluate:linear", "gate", "register"}
    # each stage logs itself: a model's evaluation run holds its scores, the gate run the report
    assert "scores.t_a" in children["evaluate:ties"].data.metrics
    assert children["evaluate:ties"].data.tags["role"] == "candidate"
    assert parent.data.tags["mergeline.decision"] == "GO" and parent.data.metrics["go"] == 1.0
    assert parent.data.params["recipe.merge_method"] == "ties"
    assert {"ties.mean_retention", "linear.mean_retention"} <= set(parent.data.metrics)
    merge_run = children["merge:ties"]
    assert "sign_conflict_rate" in merge_run.data.metrics
    arts = {a.path for a in c.list_artifacts(merge_run.info.run_id, "merge")}
    assert {"merge/merge_stats.json", "merge/lineage.json", "merge/README.md", "merge/merge_stats_tensors.json"} <= arts
    table = json.loads(Path(c.download_artifacts(merge_run.info.run_id, "merge/merge_stats_tensors.json")).read_text())
    rows = list(csv.DictReader(open(Path(s1["models"]["ties"]) / "merge_stats_tensors.csv")))
    assert table["columns"][:3] == ["tensor", "layer", "model"] and len(table["data"]) == len(rows) > 0
    gate_arts = {a.path for a in c.list_artifacts(children["gate"].info.run_id, "report")}
    report_kinds = {".md", ".json"} | ({".html"} if "html" in s1["reports"] else set())
    assert {Path(p).suffix for p in gate_arts} >= report_kinds
    assert Path(exp.artifact_location.removeprefix("file://")) == work / "mlartifacts"

    mv = c.get_model_version_by_alias("go-tiny", "champion")
    assert str(mv.version) == s1["registered"]["version"] == "1"
    assert mv.tags["mergeline.decision"] == "GO"
    assert Path(tracking.folder_of(c, "go-tiny@candidate")) == Path(s1["models"]["ties"])
    lineage = (Path(s1["models"]["ties"]) / "lineage.json").read_text()
    assert s1["mlflow_run_id"] in lineage

    # an unchanged rerun on the same store: nothing registered again, and the summary says what it reused
    s1b = run_pipeline(path)
    assert s1b["decision"] == "GO" and set(s1b["states"].values()) == {"Cached"}, s1b["states"]
    assert s1b["registered"] == {**s1["registered"], "reused": True}, s1b["registered"]
    assert s1b["reused"] == {"merges": ["linear", "ties"], "evaluations": sorted(["base", "ft_a", ODD, "linear", "ties"])}
    assert s1b["reused_merges"] == ["linear", "ties"]
    assert len(c.search_model_versions("name='go-tiny'")) == 1

    # Prefect artifacts of the flow run: the markdown report and the score table
    import asyncio

    async def keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}
    assert {"mergeline-report", "mergeline-scores"} <= asyncio.run(keys())

    # an identical rerun, recorded on a real `mlflow server`: everything comes from the cache
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    s2 = run_pipeline(path)
    assert s2["decision"] == "GO" and s2["lm_eval_runs"] == 0
    assert set(s2["states"].values()) == {"Cached"}, s2["states"]
    assert s2["models"] == s1["models"]
    assert s2["mlflow_uri"] == mlflow_server
    cs = tracking.client(mlflow_server)
    assert tracking.folder_of(cs, "go-tiny@champion") == Path(s1["models"]["ties"])
    server_runs = cs.search_runs([cs.get_experiment_by_name("go").experiment_id])
    assert {r.info.run_name for r in server_runs} >= {"go-tiny", "check", "merge:ties", "gate", "register"}
    gate_run = next(r for r in server_runs if r.info.run_name == "gate")
    assert {Path(a.path).suffix for a in cs.list_artifacts(gate_run.info.run_id, "report")} >= report_kinds
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # one fine-tune changed: only what reads it is redone
    f = next(models["ft_b"].glob("*.safetensors"))
    sd = load_file(f)
    name = next(k for k in sd if k.endswith("mlp.c_fc.weight"))
    sd[name] = sd[name] + 1e-3
    save_file(sd, f, metadata={"format": "pt"})
    # ... and this time on a local Dask cluster (prefect-dask); the caches do not care
    go_pipeline_writer(tmp_path, models, tiny_tasks, runner="dask")
    s3 = run_pipeline(path)
    assert s3["lm_eval_runs"] == 3  # ft_b, ties, linear; base and ft_a reused
    assert s3["states"] == {"merge:ties": "Completed", "merge:linear": "Completed",
                            "smoke:ties": "Completed", "smoke:linear": "Completed",
                            "evaluate:base": "Cached", "evaluate:ft_a": "Cached",
                            f"evaluate:{ODD}": "Completed", "evaluate:ties": "Completed",
                            "evaluate:linear": "Completed"}
    assert s3["models"]["ties"] != s1["models"]["ties"]
    assert str(c.get_model_version_by_alias("go-tiny", "candidate").version) == "2"
