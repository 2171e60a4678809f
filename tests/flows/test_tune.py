"""`mergeline tune` end to end on the demo zoo with a tiny budget: real Prefect flow, real MLflow
store, real lm-eval. Trials are MLflow child runs, the best recipe is a valid mergekit recipe,
the final pipeline judges it on the test items beside the untuned recipe, and a rerun of the
same points is served from the caches."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergeline.flows.demo import CONFIGS, write_pipeline, zoo_values
from mergeline.flows.tune import run_tune
from mergeline.merge.recipe import load_recipe
from mergeline.tasks import tracking

MERGELINE = str(Path(sys.executable).parent / "mergeline")
SPLITS = {"validation": [0, 12], "test": [12, 36]}


def tune_pipeline(zoo, root: Path, splits: dict | None = SPLITS, runner: dict | None = None,
                  baselines: list | None = None, experiment: str | None = None, tasks: dict | None = None) -> Path:
    """The demo pipeline in `root`/work with the suite split (or `splits` None: unsplit), a short
    final run (`baselines`, default just linear; with none, the gate's baseline rule asks the
    tuned recipe to beat the untuned one), on `runner` (default two threads); `tasks` replaces the
    suite's `retention`/`general` (fewer lm-eval tasks, a shorter run)."""
    path = write_pipeline(CONFIGS / "pipeline_demo.yaml", root / "work", zoo_values(zoo))
    data = yaml.safe_load(path.read_text())
    data["baselines"] = ["linear"] if baselines is None else list(baselines)  # keep the final run short
    data["runner"] = runner or {"kind": "threads", "max_workers": 2}
    if experiment:
        data["tracking"] = {**data["tracking"], "experiment": experiment}
    if not data["baselines"]:
        policy_path = Path(data["gate_policy"])
        policy = yaml.safe_load(policy_path.read_text())
        policy["baseline"] = {**policy.get("baseline", {}), "must_beat": "untuned"}
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    suite_path = Path(data["eval_suite"])
    suite = yaml.safe_load(suite_path.read_text())
    suite.pop("limit", None)
    suite.update(tasks or {})
    if splits:
        suite["splits"] = splits
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tune_searches_on_validation_and_judges_on_test(zoo, prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workdir's own SQLite store
    path = tune_pipeline(zoo, tmp_path)
    out = run_tune(path, trials=3, seed=0)
    search, final = out["search"], out["final"]
    assert search["trials_finished"] == 3 and len(search["trials_run"]) == 3 and search["trials_failed"] == 0
    assert final["decision"] in ("GO", "NO-GO", "INCONCLUSIVE")
    # trial 0 is the untuned recipe's own point, so the report can say what tuning gained there
    from mergeline.tasks.recipes import resolved_recipe
    from mergeline.tasks.tune_tasks import recipe_point

    start = recipe_point(resolved_recipe(yaml.safe_load(path.read_text())["recipe"]))
    assert search["trials_run"][0]["values"] == start and search["untuned"]["trial"] == 0
    held = out["held_out"]
    assert held["validation_gain"] == pytest.approx(search["best"]["objective"] - search["trials_run"][0]["objective"])
    assert held["validation_gain"] >= 0 and held["verdict"] in ("held", "worse", "not shown", "no gain")

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
    assert parent.data.tags["mergeline.held_out"] == held["verdict"]
    assert parent.data.metrics["validation_gain"] == pytest.approx(held["validation_gain"])
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
    assert f"## Did the validation gain hold on the test items?\n\n**{held['verdict']}**: {held['why']}" in text

    # a rerun of the same points (a fresh in-memory study, same seed) costs no merge and no lm-eval run
    r = subprocess.run([MERGELINE, "tune", str(path), "--trials", "3", "--storage", "memory"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == {"GO": 0, "NO-GO": 1, "INCONCLUSIVE": 3}[final["decision"]], r.stderr[-3000:]
    again = json.loads((Path(search["out_dir"]).parent / search["study"] / "tune_report.json").read_text())
    assert again["search"]["trials_cached"] == 3, again["search"]["trials_run"]
    assert again["search"]["best"]["values"] == search["best"]["values"]
    assert "trial 2 (3/3): objective" in r.stderr and "best" in r.stderr  # plain progress lines
    assert f"held on test items? {again['held_out']['verdict']}: validation gain" in r.stdout, r.stdout
    # the sqlite study resumes with its 3 finished trials; a spent time budget starts no new one
    resumed = run_tune(path, trials=10, minutes=0.001, seed=0)
    s = resumed["search"]
    assert s["trials_finished"] == 3 and s["trials_run"] == [] and s["budget_spent"]
    assert resumed["final"]["lm_eval_runs"] == 0
    # lm-eval only ever ran the validation items (first 12) or, for the gate, the first 36
    work = Path(search["out_dir"]).parents[1]
    limits = {json.loads(m.read_text())["limit"] for m in (work / "score-cache").rglob("meta.json")}
    assert limits == {12, 36}, limits


def test_tune_per_layer_group(zoo, prefect_server, tmp_path, monkeypatch):
    """`--layer-groups 2`: the study searches two points of each gradient, trial 0 is the untuned
    recipe, and the best recipe (gradient lists) is judged on test items."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tune_pipeline(zoo, tmp_path, tasks={"retention": {"addition": ["zoo_addition"]},
                                               "general": ["zoo_general_mc"]})
    out = run_tune(path, trials=3, seed=0, storage="memory", layer_groups=2)
    s = out["search"]
    assert s["trials_finished"] == 3 and s["untuned"]["trial"] == 0
    assert set(s["trials_run"][1]["values"]) == {f"{k}.{n}@{j}" for k in ("weight", "density")
                                                 for n in ("addition", "reverse", "facts") for j in (0, 1)}
    recipe = yaml.safe_load(Path(s["best_recipe"]).read_text())
    load_recipe(recipe)
    best = s["best"]["values"]
    for m in recipe["models"]:
        name = Path(m["model"]).name
        w = [best[f"weight.{name}@0"], best[f"weight.{name}@1"]]
        assert m["parameters"]["weight"] == (w[0] if w[0] == w[1] else pytest.approx(w))
    assert out["final"]["decision"] in ("GO", "NO-GO", "INCONCLUSIVE") and out["held_out"]["verdict"] != "n/a"


def test_tune_refuses_a_suite_without_splits(zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tune_pipeline(zoo, tmp_path, splits=None)
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


def test_the_recipes_own_point(tiny_models):
    """Trial 0 of a search: the recipe's values, when each lies on the grid inside its range."""
    from mergeline.tasks.tune_tasks import apply, recipe_point

    m = tiny_models
    ties = {"merge_method": "ties", "base_model": str(m["base"]), "parameters": {"density": 0.5, "normalize": True},
            "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5, "density": 0.6}},
                       {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}]}
    point = recipe_point(ties)
    assert point == {"weight.ft_a": 0.5, "density.ft_a": 0.6, "weight.ft_b": 0.5, "density.ft_b": 0.5}
    merged = apply(ties, point)  # the same merge: the recipe-wide density moved onto the models
    assert [x["parameters"] for x in merged["models"]] == [{"weight": 0.5, "density": 0.6},
                                                           {"weight": 0.5, "density": 0.5}]
    off_grid = {**ties, "parameters": {"density": 0.33}}
    assert recipe_point(off_grid) is None
    gradient = {**ties, "models": [{"model": str(m["ft_a"]), "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                                   ties["models"][1]]}
    assert recipe_point(gradient) is None
    assert recipe_point({**ties, "parameters": {"density": 0.05}}) is None  # under the range


def test_layer_groups_are_mergekit_gradients(tiny_models, tmp_path):
    """`--layer-groups K`: each weight and density a gradient of K values over the layers, which
    mergeline merges as mergekit does; the recipe's own point is the flat gradient, written as
    its one value, so trial 0 merges to the untuned recipe's tensors bit for bit."""
    import torch
    from safetensors.torch import load_file

    from mergeline.merge.executor import run_merge
    from mergeline.tasks.tune_tasks import apply, recipe_point, space

    m = tiny_models
    ties = {"merge_method": "ties", "base_model": str(m["base"]), "parameters": {"density": 0.5},
            "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5, "density": 0.6}},
                       {"model": str(m["ft_b"]), "parameters": {"weight": 0.5}}]}
    assert set(space(ties, 2)) == {f"{k}.{n}@{j}" for k in ("weight", "density") for n in ("ft_a", "ft_b")
                                   for j in (0, 1)}
    point = recipe_point(ties, 2)
    assert point["density.ft_a@0"] == point["density.ft_a@1"] == 0.6
    values = {**point, "weight.ft_a@0": 0.2, "weight.ft_a@1": 0.9, "density.ft_b@1": 0.3}
    recipe = apply(ties, values)
    params = {Path(x["model"]).name: x["parameters"] for x in recipe["models"]}
    assert params["ft_a"] == {"weight": [0.2, 0.9], "density": 0.6}
    assert params["ft_b"] == {"weight": 0.5, "density": [0.5, 0.3]}
    load_recipe(recipe)

    untuned = run_merge(ties, tmp_path / "untuned", progress=False, device="cpu").path
    start = run_merge(apply(ties, point), tmp_path / "start", progress=False, device="cpu").path
    tuned = run_merge(recipe, tmp_path / "tuned", progress=False, device="cpu").path
    a, b, c = (load_file(str(p / "model.safetensors")) for p in (untuned, start, tuned))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # two layers: the first merges with the gradients' first values, the last with their last
    for layer, (w, d) in {"0": (0.2, 0.5), "1": (0.9, 0.3)}.items():
        flat = apply(ties, {**point, "weight.ft_a@0": w, "weight.ft_a@1": w, "density.ft_b@0": d, "density.ft_b@1": d})
        ref = load_file(str(run_merge(flat, tmp_path / f"flat{layer}", progress=False, device="cpu").path
                            / "model.safetensors"))
        names = [k for k in c if f".h.{layer}." in k]
        assert names and all(torch.equal(c[k], ref[k]) for k in names)
        assert not all(torch.equal(c[k], a[k]) for k in names)
    with pytest.raises(ValueError, match="layer groups must be >= 1"):
        space(ties, 0)


@pytest.mark.parametrize("best, test, verdict", [
    (0.60, (0.10, 0.05, 0.16), "held"),
    (0.60, (-0.10, -0.16, -0.05), "worse"),
    (0.60, (0.01, -0.05, 0.08), "not shown"),
    (0.50, (0.00, 0.00, 0.00), "no gain"),
])
def test_the_held_out_verdict(best, test, verdict):
    """Whether the validation gain shows on the test items is read from the paired interval."""
    from mergeline.flows.tune import held_out

    est, low, high = test
    cmp = {"difference_interval": {"estimate": est, "low": low, "high": high, "confidence": 0.95,
                                   "method": "paired bootstrap", "n": 266}}
    out = held_out({"best": {"objective": best}, "untuned": {"trial": 0, "objective": 0.5}}, cmp)
    assert out["verdict"] == verdict and out["validation_gain"] == pytest.approx(best - 0.5)
    assert f"[{low:.3f}, {high:.3f}]" in out["why"]
    assert held_out({"best": {"objective": best}, "untuned": None}, {"difference_interval": None})["verdict"] == "n/a"


def _prefect_runs(pipeline: Path) -> list:
    """[(flow run, its task runs)] of the `mergeline-tune` flow runs of `pipeline`, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = [r for r in c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["mergeline-tune"])))
                if r.parameters.get("pipeline") == str(pipeline)]
        return [(r, c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id]))))
                for r in sorted(runs, key=lambda r: r.created)]


def test_tune_resumes_after_sigterm_and_runs_trials_side_by_side(zoo, prefect_server, tmp_path, monkeypatch):
    """`mergeline tune` stopped by SIGTERM once its first batch of trials is finished, then run
    again: the finished trials are not run again (no second MLflow run, no new merge), the
    references come from Prefect's cache, the trials in flight are redone at the same points, and
    the two trials of a batch ran at the same time."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workdir's own SQLite store
    path = tune_pipeline(zoo, tmp_path, {"validation": [0, 8], "test": [8, 24]}, baselines=[])
    cmd = [MERGELINE, "tune", str(path), "--trials", "4"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        models = tmp_path / "work" / "models"
        # the first batch (trials 0, 1) is finished and the second batch's merges have started
        while "(2/4)" not in log.read_text() or len(list(models.iterdir())) < 3:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, log.read_text()[-3000:]
    progress = [line.split("] ", 1)[-1] for line in log.read_text().splitlines()]
    done_first = {int(line.split()[1]) for line in progress if line.startswith("trial ") and "): objective" in line}
    assert len(done_first) >= 2, log.read_text()[-3000:]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode in (0, 1, 3), again.stderr[-3000:]
    report = json.loads(next((tmp_path / "work" / "tune").glob("*/tune_report.json")).read_text())
    s = report["search"]
    assert s["trials_finished"] == 4 and s["trials_failed"] == 0
    rerun = [t["trial"] for t in s["trials_run"]]
    assert len(rerun) == 4 - len(done_first) and not set(rerun) & done_first, (rerun, done_first)
    # the trials interrupted in flight are redone at their own points (enqueued again); the
    # finished ones' points are not proposed again
    def points(trials):
        return {json.dumps(t["values"], sort_keys=True) for t in trials}

    interrupted = [t for t in s["all_trials"] if t["state"] == "FAIL" and t["values"]]  # {}: stopped before drawn
    assert interrupted and points(interrupted) <= points(s["trials_run"]), s["all_trials"]
    assert not points(t for t in s["all_trials"] if t["trial"] in done_first) & points(s["trials_run"])

    # MLflow: every finished trial is one child run, across both tune runs
    c = tracking.client(s["mlflow_uri"])
    exp = c.get_run(s["mlflow_run_id"]).info.experiment_id
    tune_runs = c.search_runs([exp], "attributes.run_name = 'tune:demo'")
    assert len(tune_runs) == 2
    trials = [r.info.run_name for r in c.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId")
              in {t.info.run_id for t in tune_runs}]
    assert sorted(trials) == sorted(f"trial:{n}" for n in done_first | set(rerun)), trials

    # Prefect: the rerun served the base's and fine-tunes' validation scores from its cache and
    # merged only the new trials' points; the first run's first batch merged side by side
    (run1, tasks1), (run2, tasks2) = _prefect_runs(path)
    evals2 = [t for t in tasks2 if t.name.startswith("evaluate")]
    assert sum(t.state.name == "Cached" for t in evals2) >= 4, [(t.name, t.state.name) for t in evals2]
    merges2 = [t for t in tasks2 if t.name.startswith("merge")]
    assert len(merges2) == len(rerun)
    merges1 = sorted((t for t in tasks1 if t.name.startswith("merge") and t.start_time), key=lambda t: t.start_time)
    a, b = merges1[:2]
    assert b.start_time < a.end_time, (a.start_time, a.end_time, b.start_time, b.end_time)
