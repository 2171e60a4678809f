"""`mergeline tune` end to end on the demo zoo with a tiny budget: real Prefect flow, real MLflow
store, real lm-eval. Trials are MLflow child runs, the best recipe is a valid mergekit recipe,
the final pipeline judges it on the test items beside the untuned recipe, and a rerun of the
same points is served from the caches."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergeline.flows.demo import CONFIGS, write_pipeline, zoo_values
from mergeline.flows.tune import run_tune
from mergeline.merge.recipe import load_recipe
from mergeline.tasks import tracking

MERGELINE = str(Path(sys.executable).parent / "mergeline")
SPLITS = {"validation": [0, 12], "test": [12, 36]}


def _pipeline(zoo, root: Path, splits: dict | None = SPLITS) -> Path:
    path = write_pipeline(CONFIGS / "pipeline_demo.yaml", root / "work", zoo_values(zoo))
    data = yaml.safe_load(path.read_text())
    data["baselines"] = ["linear"]  # keep the final run short
    data["runner"] = {"kind": "threads", "max_workers": 2}
    suite_path = Path(data["eval_suite"])
    suite = yaml.safe_load(suite_path.read_text())
    suite.pop("limit", None)
    if splits:
        suite["splits"] = splits
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tune_searches_on_validation_and_judges_on_test(zoo, prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workdir's own SQLite store
    path = _pipeline(zoo, tmp_path)
    out = run_tune(path, trials=3, seed=0)
    search, final = out["search"], out["final"]
    assert search["trials_finished"] == 3 and len(search["trials_run"]) == 3 and search["trials_failed"] == 0
    assert final["decision"] in ("GO", "NO-GO", "INCONCLUSIVE")

    # every trial is an MLflow child run of the tune run, with its values and objective
    c = tracking.client(search["mlflow_uri"])
    parent = c.get_run(search["mlflow_run_id"])
    runs = c.search_runs([parent.info.experiment_id])
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(trials) == {"trial:0", "trial:1", "trial:2"}
    objectives = {n: r.data.metrics["value"] for n, r in trials.items()}
    assert max(objectives.values()) == pytest.approx(search["best"]["objective"])
    assert all(any(k.startswith("weight.") for k in r.data.params) for r in trials.values())
    assert parent.data.tags["mergeline.decision"] == final["decision"]
    assert parent.data.tags["mergeline.split.tuning"].startswith("validation items")

    # the best recipe is a plain mergekit recipe carrying the best trial's values
    recipe = load_recipe(search["best_recipe"])
    weights = {Path(m.model).name: (m.parameters or {}).get("weight") for m in recipe.models}
    for key, value in search["best"]["values"].items():
        kind, name = key.split(".", 1)
        if kind == "weight":
            assert weights[name] == pytest.approx(value)

    # the final run: tuned recipe as primary, the untuned one as a baseline, scored on test items
    report = json.loads(Path(final["reports"]["json"]).read_text())
    assert {"ties", "linear", "untuned"} <= set(report["candidates"])
    assert report["inputs"]["suite"]["part"] == "test" and report["inputs"]["suite"]["splits"]["test"] == [12, 36]
    text = Path(out["report"]).read_text()
    assert "tuning (objective, 3 trials): validation items: zoo_addition [0, 12)" in text
    assert "gate (the final run below): test items: zoo_addition [12, 36)" in text
    assert "untuned" in text

    # a rerun of the same points (a fresh in-memory study, same seed) costs no merge and no lm-eval run
    r = subprocess.run([MERGELINE, "tune", str(path), "--trials", "3", "--storage", "memory"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == {"GO": 0, "NO-GO": 1, "INCONCLUSIVE": 3}[final["decision"]], r.stderr[-3000:]
    again = json.loads((Path(search["out_dir"]).parent / search["study"] / "tune_report.json").read_text())
    assert again["search"]["trials_cached"] == 3, again["search"]["trials_run"]
    assert again["search"]["best"]["values"] == search["best"]["values"]
    assert "trial 2 (3/3): objective" in r.stderr and "best" in r.stderr  # plain progress lines
    # the sqlite study resumes with its 3 finished trials; a spent time budget starts no new one
    resumed = run_tune(path, trials=10, minutes=0.001, seed=0)
    s = resumed["search"]
    assert s["trials_finished"] == 3 and s["trials_run"] == [] and s["budget_spent"]
    assert resumed["final"]["lm_eval_runs"] == 0
    # lm-eval only ever ran the validation items (first 12) or, for the gate, the first 36
    work = Path(search["out_dir"]).parents[1]
    limits = {json.loads(m.read_text())["limit"] for m in (work / "score-cache").rglob("meta.json")}
    assert limits == {12, 36}, limits


def test_tune_refuses_a_suite_without_splits(zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = _pipeline(zoo, tmp_path, splits=None)
    r = subprocess.run([MERGELINE, "tune", str(path), "--trials", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "declares no splits" in r.stderr + r.stdout and "--allow-no-split" in r.stderr + r.stdout


def test_search_space_and_trial_recipes(tiny_models):
    from mergeline.tasks.tune_tasks import apply, space

    m = tiny_models
    ties = {"merge_method": "ties", "base_model": str(m["base"]), "parameters": {"density": 0.5, "normalize": True},
            "models": [{"model": str(m["base"])}, {"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                       {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}]}
    assert set(space(ties)) == {"weight.ft_a", "density.ft_a", "weight.ft_b", "density.ft_b"}
    values = {"weight.ft_a": 0.30000000000000004, "density.ft_a": 0.25, "weight.ft_b": 0.9, "density.ft_b": 1.0}
    recipe = apply(ties, values)
    params = {Path(x["model"]).name: x.get("parameters") for x in recipe["models"]}
    assert params["ft_a"] == {"weight": 0.3, "density": 0.25} and params["ft_b"] == {"weight": 0.9, "density": 1.0}
    assert recipe["parameters"] == {"normalize": True}  # the recipe-wide density gave way
    load_recipe(recipe)
    assert apply(ties, values) == recipe  # same point, same recipe: the same merge key
    linear = {"merge_method": "linear", "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 1.0}},
                                                   {"model": str(m["ft_b"]), "parameters": {"weight": 1.0}}]}
    assert set(space(linear)) == {"weight.ft_a", "weight.ft_b"}
    with pytest.raises(ValueError, match="only recipes with a `models:` list"):
        space({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(m["ft_a"]),
                                                                       "layer_range": [0, 2]}]}]})
