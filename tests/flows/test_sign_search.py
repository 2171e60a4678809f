"""Validation-guided TIES signs end to end on the demo zoo: `mergeline tune` on a recipe with
`sign_source: validation` runs the greedy sign search (real Prefect tasks, MLflow child runs,
lm-eval on validation items), records a choice per group, writes a plain recipe with them, and
`mergeline merge` of that recipe alone reproduces the search's merge bit for bit."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from mergeline.flows import sign_search as signs
from mergeline.flows.demo import CONFIGS, write_pipeline, zoo_values
from mergeline.flows.tune import run_tune
from mergeline.tasks.merge_tasks import merge_key
from tests.merge._llama import read_all

MERGELINE = str(Path(sys.executable).parent / "mergeline")


def _pipeline(zoo, root: Path) -> Path:
    path = write_pipeline(CONFIGS / "pipeline_demo.yaml", root / "work", zoo_values(zoo))
    data = yaml.safe_load(path.read_text())
    data["baselines"] = []  # the final run: the sign-guided merge and the untuned one
    data["runner"] = {"kind": "threads", "max_workers": 2}
    recipe = yaml.safe_load(Path(data["recipe"]).read_text())
    recipe["parameters"]["sign_source"] = "validation"
    data["recipe"] = recipe
    suite_path = Path(data["eval_suite"])
    suite = yaml.safe_load(suite_path.read_text())
    suite.pop("limit", None)
    suite["splits"] = {"validation": [0, 6], "test": [6, 18]}
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_groups_in_blocks():
    assert signs.groups(3) == ["embeddings", "layers.0", "layers.1", "layers.2", "head"]
    assert signs.groups(10) == ["embeddings", "layers.0-2", "layers.3-5", "layers.6-8", "layers.9", "head"]
    assert signs.groups(3, block=3) == ["embeddings", "layers.0-2", "head"]


def test_greedy_keeps_the_best_per_group_and_the_election_on_ties():
    # a made-up objective: +1 for ft_b's signs on layers, +0.5 for ft_a's on the embeddings
    def score(tables):
        return [(t["layers.0"] == "b") + 0.5 * (t["embeddings"] == "a") for t in tables]

    seen = []
    best, value = signs.greedy(["embeddings", "layers.0", "head"], ["a", "b"], score,
                               lambda t, v, b, bv: seen.append(dict(t)))
    assert best == {"embeddings": "a", "layers.0": "b", "head": "elected"} and value == 1.5
    assert len(seen) == 1 + 3 * 2


def test_sign_search_end_to_end(zoo, prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workdir's own SQLite store
    path = _pipeline(zoo, tmp_path)
    out = run_tune(path, sign_block=10)  # the zoo's layers in one block: three groups
    search, final = out["search"], out["final"]
    n = signs.layer_count(yaml.safe_load(Path(search["best_recipe"]).read_text()))
    groups = ["embeddings", f"layers.0-{n - 1}", "head"]
    assert search["sampler"] == "signs" and search["groups"] == groups
    assert search["trials_finished"] == 1 + 3 * 3 and search["trials_failed"] == 0
    best = search["best"]["values"]
    assert set(best) == set(groups) and set(best.values()) <= {"elected", "addition", "reverse", "facts"}
    # the best table scores at least the all-elected start (trial 0), on validation items
    start = search["trials_run"][0]
    assert start["values"] == dict.fromkeys(groups, "elected")
    assert search["best"]["objective"] >= start["objective"]
    # a group where only embeddings moved (the zoo's fine-tunes train only `wte`): the layers' and
    # head's candidates merge to the same tensors as their start, so lm-eval is not run again
    assert search["trials_cached"] >= 2 * 3

    # the written recipe is plain and carries the choices; the final run judged it on test items
    recipe = yaml.safe_load(Path(search["best_recipe"]).read_text())
    assert recipe["parameters"]["sign_source"] == "validation" and recipe["parameters"]["sign_choices"] == best
    report = json.loads(Path(final["reports"]["json"]).read_text())
    assert {"ties", "untuned"} <= set(report["candidates"])
    assert report["inputs"]["suite"]["part"] == "test"
    assert f"greedy sign search over groups {', '.join(groups)}" in Path(out["report"]).read_text()

    # `mergeline merge` of the recipe alone reproduces the search's merge bit for bit, and
    # records the choices in merge_stats.json and lineage.json
    work = Path(search["out_dir"]).parents[1]
    searched = work / "models" / f"ties-{merge_key(recipe, 0)[:12]}"
    assert searched.is_dir()
    r = subprocess.run([MERGELINE, "merge", search["best_recipe"], str(tmp_path / "again"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_all(searched), read_all(tmp_path / "again")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "merge_stats.json").read_text())["sign_choices"] == best
    assert json.loads((tmp_path / "again" / "lineage.json").read_text())["recipe"]["parameters"]["sign_choices"] == best


def test_merge_refuses_validation_signs_without_choices(zoo, tmp_path):
    values = zoo_values(zoo)
    recipe = {"merge_method": "ties", "base_model": values["base"],
              "models": [{"model": values[n], "parameters": {"weight": 0.5}} for n in ("addition", "reverse")],
              "parameters": {"density": 0.5, "sign_source": "validation"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = subprocess.run([MERGELINE, "merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "sign_source: validation needs the recorded sign_choices; run `mergeline tune" in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_layer_groups_do_not_apply_to_the_sign_search(zoo, tmp_path):
    """The sign search has its own groups (--sign-block): --layer-groups is refused, exit 2."""
    path = _pipeline(zoo, tmp_path)
    r = subprocess.run([MERGELINE, "tune", str(path), "--layer-groups", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--layer-groups applies to the weight/density search" in r.stderr + r.stdout
