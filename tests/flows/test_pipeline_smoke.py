"""The smoke stage in the pipeline, on the zoo (real Prefect runs, real MLflow, real lm-eval):
a garbage primary merge (task arithmetic with lambda 20) stops the run at stage `smoke` before
any evaluation of it, with report.md written and nothing registered; the same garbage as a
baseline is reported as failed and left out of the evaluation, and the run goes on to the gate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mergeline.flows.demo import smoke_text
from mergeline.flows.pipeline import run_pipeline
from mergeline.flows.pipeline_config import load_pipeline
from mergeline.tasks import tracking

PROMPTS = ["the red cat", "a dog is", "3 plus 4 is", "c a b backwards is"]


def _recipe(zoo, method: str, parameters: dict) -> dict:
    return {"merge_method": method, "base_model": str(zoo.base), "parameters": parameters, "dtype": "float32",
            "models": [{"model": str(zoo.finetunes[s]), "parameters": {"weight": 0.5}} for s in ("addition", "reverse")]}


def _write(root: Path, zoo, recipe: dict, baselines: list, name: str) -> Path:
    pipe = {
        "name": name,
        "workdir": str(root / "work"),
        "recipe": recipe,
        "baselines": baselines,
        "eval_suite": {"retention": {"addition": ["zoo_addition"], "reverse": ["zoo_reverse"]},
                       "include_paths": [str(zoo.tasks_dir)], "limit": 8, "batch_size": 16},
        "gate_policy": {"compatibility": {"must_pass": True},
                        "smoke": {"max_perplexity_ratio": 1.5, "max_new_tokens": 32}},
        "tracking": {"register_as": name, "experiment": name},
        "smoke": {"text": str(smoke_text(zoo)), "prompts": PROMPTS},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def test_broken_primary_stops_at_smoke(zoo, prefect_server, tmp_path):
    runaway = _recipe(zoo, "task_arithmetic", {"lambda": 20.0})
    path = _write(tmp_path, zoo, runaway, ["linear"], "smoke-stop")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded default
    r = subprocess.run([str(Path(sys.executable).parent / "mergeline"), "run", str(path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "NO-GO" in r.stdout and "stage: smoke" in r.stdout and "smoke." in r.stdout

    work = load_pipeline(path).workdir_path
    run_dir = next((work / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["decision"] == "NO-GO" and summary["stage"] == "smoke" and summary["registered"] is None
    assert summary["smoke"]["task_arithmetic"]["passed"] is False
    assert summary["reasons"] and all(x.startswith("task_arithmetic: smoke.") for x in summary["reasons"])
    assert not any(k.startswith("evaluate:") and k.endswith("task_arithmetic") for k in summary["states"])
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# NO-GO") and "smoke test" in md
    assert json.loads((run_dir / "decision.json").read_text())["stage"] == "smoke"

    c = tracking.client(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("smoke-stop")
    runs = {x.info.run_name: x for x in c.search_runs([exp.experiment_id])}
    assert {"smoke-stop", "check", "merge:task_arithmetic", "smoke:task_arithmetic"} <= set(runs)
    assert not {"evaluate", "gate", "register"} & set(runs)
    smoke_run = runs["smoke:task_arithmetic"]
    assert smoke_run.data.tags["status"] == "fail" and smoke_run.data.metrics["passed"] == 0.0
    assert smoke_run.data.tags["mlflow.parentRunId"] == runs["smoke-stop"].info.run_id
    assert {a.path for a in c.list_artifacts(smoke_run.info.run_id)} == {"smoke.json"}
    assert runs["smoke-stop"].data.tags["mergeline.decision"] == "NO-GO"
    assert not c.search_registered_models()  # nothing registered, let alone as champion


def test_broken_baseline_is_reported_not_evaluated(zoo, prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good = _recipe(zoo, "ties", {"density": 0.5, "normalize": True})
    runaway = {"name": "runaway", "recipe": _recipe(zoo, "task_arithmetic", {"lambda": 20.0})}
    path = _write(tmp_path, zoo, good, [runaway], "smoke-baseline")
    s = run_pipeline(path)
    assert s["stage"] == "gate", s
    assert s["smoke"]["ties"]["passed"] is True and s["smoke"]["runaway"]["passed"] is False
    assert s["smoke"]["runaway"]["reasons"]
    assert {"smoke:ties", "smoke:runaway", "evaluate:ties"} <= set(s["states"])
    assert "evaluate:runaway" not in s["states"]
    report = json.loads(Path(s["reports"]["json"]).read_text())
    assert "ties" in report["candidates"] and "runaway" not in report["candidates"]
    md = Path(s["reports"]["md"]).read_text()
    assert "## Smoke test" in md and "| runaway | FAIL (not evaluated) |" in md and "| ties | pass |" in md

    # a rerun takes every smoke result from the cache
    s2 = run_pipeline(path)
    assert s2["states"]["smoke:ties"] == s2["states"]["smoke:runaway"] == "Cached"
    assert s2["smoke"] == s["smoke"]


def test_merge_seeds_for_random_methods():
    from mergeline.flows.pipeline import merge_seeds

    assert merge_seeds("dare", {"merge_method": "dare_ties"}, [0, 1, 2], 7) == {
        "dare-seed0": 0, "dare-seed1": 1, "dare-seed2": 2}
    assert merge_seeds("della", {"merge_method": "della_linear"}, [3, 5], 7) == {"della-seed3": 3, "della-seed5": 5}
    assert merge_seeds("ties", {"merge_method": "ties"}, [0, 1, 2], 7) == {"ties": 7}  # deterministic
    assert merge_seeds("dare", {"merge_method": "dare_linear"}, [4], 7) == {"dare": 7}  # one eval seed


def test_random_method_is_merged_once_per_eval_seed(zoo, prefect_server, tmp_path, monkeypatch):
    """dare_ties under seeds [0, 1]: two merges (seed 0 and seed 1, different weights), each
    smoke-tested, evaluated as one candidate with merge seed k under eval seed k."""
    from mergeline.merge.checkpoint import Checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = _write(tmp_path, zoo, _recipe(zoo, "dare_ties", {"density": 0.5}), [], "smoke-seeds")
    pipe = yaml.safe_load(path.read_text())
    pipe["eval_suite"]["seeds"] = [0, 1]
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    s = run_pipeline(path)
    assert s["stage"] == "gate", s
    assert {"merge:dare_ties-seed0", "merge:dare_ties-seed1", "smoke:dare_ties-seed0", "smoke:dare_ties-seed1",
            "evaluate:dare_ties"} <= set(s["states"])
    report = json.loads(Path(s["reports"]["json"]).read_text())
    per_seed = report["inputs"]["models"]["dare_ties"]["per_seed"]
    folders = {int(k): Path(v["path"]) for k, v in per_seed.items()}
    assert set(folders) == {0, 1} and folders[0] != folders[1]
    for k, folder in folders.items():
        assert json.loads((folder / "lineage.json").read_text())["seed"] == k
    a, b = Checkpoint(folders[0]), Checkpoint(folders[1])
    assert any(not a.get(n).equal(b.get(n)) for n in a.names())  # DARE's drops differ by seed
    assert Path(s["models"]["dare_ties"]) == folders[0]  # the registered candidate: the first seed's
    spread = next(x for x in report["scores"] if x["model"] == "dare_ties")["seed_spread"]
    assert sorted(spread["seeds"]) == [0, 1]
