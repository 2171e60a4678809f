from pathlib import Path

import pandas as pd
import pytest

from mergeline.evaluation.evaluate import ScoreTable, evaluate_models, infer_roles
from mergeline.evaluation.score_cache import CachedRun, ScoreCache, task_fingerprint
from mergeline.evaluation.suite import SuiteError, check_ready, load_suite

REPO = Path(__file__).resolve().parents[2]


def test_shipped_suite_loads_and_needs_the_zoo_placeholder(tmp_path):
    suite = load_suite(REPO / "configs/eval_suite.yaml")
    assert suite.unresolved() == ["zoo"]
    with pytest.raises(SuiteError, match="placeholder"):
        check_ready(suite)
    filled = load_suite(REPO / "configs/eval_suite.yaml", {"zoo": tmp_path})
    assert filled.include_paths == [str(tmp_path)]
    check_ready(filled)
    assert filled.task_owner()["zoo_facts_mc"] == "facts"
    assert filled.all_tasks()[-2:] == ["zoo_general_mc", "zoo_general_gen"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("retention: {a: [t]}\nlimt: 5\n")
    with pytest.raises(SuiteError, match=r"s.yaml: unknown key 'limt'"):
        load_suite(p)


def test_bad_values_are_named(tmp_path):
    with pytest.raises(SuiteError, match="key 'retention': Value error, fine-tune 'a' lists no tasks"):
        load_suite({"retention": {"a": []}})
    with pytest.raises(SuiteError, match="both in 'general' and 'retention'"):
        load_suite({"retention": {"a": ["t"]}, "general": ["t"]})
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(SuiteError, match=r"key 'seeds'.*distinct"):
        load_suite({"retention": {"a": ["t"]}, "seeds": [0, 0]})


def test_relative_include_path_resolves_against_the_yaml(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "s.yaml").write_text("retention: {a: [t]}\ninclude_paths: [tasks]\n")
    assert load_suite(tmp_path / "s.yaml").include_paths == [str(tmp_path / "tasks")]


# ---- evaluation with caching (a counting stand-in for the runner; the zoo test uses lm-eval)

class CountingRunner:
    def __init__(self):
        self.calls = []

    def __call__(self, model_dir, tasks, **kw):
        self.calls.append((Path(model_dir).name, tuple(tasks), kw["seed"]))
        scores = pd.DataFrame([{"task": t, "metric": "acc", "value": 0.5, "primary": True} for t in tasks])
        samples = pd.DataFrame([{"task": t, "doc_id": i, "correct": float(i % 2), "target": "1", "response": "1"}
                                for t in tasks for i in range(4)])
        return CachedRun(scores, samples, {"tasks": {t: {"task": t, "output_type": "generate_until"} for t in tasks}})


def _model(root: Path, name: str, payload: bytes) -> Path:
    d = root / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text("{}")
    return d


def test_second_evaluation_hits_the_cache_and_a_changed_task_misses(tmp_path):
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "t.yaml").write_text("task: t\noutput_type: generate_until\n")
    suite = load_suite({"retention": {"ft": ["t"]}, "general": ["g"], "include_paths": [str(tasks_dir)], "seeds": [0, 1]})
    models = {"base": _model(tmp_path, "base", b"a"), "ft": _model(tmp_path, "ft", b"b"), "ties": _model(tmp_path, "m", b"c")}
    runner, cache = CountingRunner(), tmp_path / "cache"

    first = evaluate_models(suite, models, cache, runner=runner, log=None)
    assert first.runs == len(runner.calls) == 6          # 3 models x 2 seeds
    assert first.task_types == {"t": "generation", "g": "generation"}
    assert len(ScoreCache(cache).entries()) == 6

    second = evaluate_models(suite, models, cache, runner=runner, log=None)
    assert second.runs == 0 and len(runner.calls) == 6   # nothing re-run
    assert all(m["cache"] == ["hit", "hit"] for m in second.models.values())
    pd.testing.assert_frame_equal(first.primary(), second.primary())
    assert len(second.samples) == len(first.samples)

    # A changed fine-tune misses for that model only.
    (models["ft"] / "model.safetensors").write_bytes(b"changed")
    third = evaluate_models(suite, models, cache, runner=runner, log=None)
    assert third.runs == 2 and third.models["ft"]["cache"] == ["miss", "miss"]

    # A changed task config misses for every model.
    (tasks_dir / "t.yaml").write_text("task: t\noutput_type: generate_until\nnum_fewshot: 1\n")
    fourth = evaluate_models(suite, models, cache, runner=runner, log=None)
    assert fourth.runs == 6


def test_task_fingerprint_tracks_names_and_file_bytes(tmp_path):
    (tmp_path / "a.yaml").write_text("x")
    fp = task_fingerprint(["a"], [tmp_path])
    assert fp == task_fingerprint(["a"], [tmp_path])
    assert fp != task_fingerprint(["a", "b"], [tmp_path])
    (tmp_path / "a.jsonl").write_text("{}")
    assert fp != task_fingerprint(["a"], [tmp_path])


def test_roles_from_names_and_missing_folder(tmp_path):
    suite = load_suite({"retention": {"ft": ["t"]}})
    assert infer_roles(suite, ["base", "ft", "ties"]) == {"base": "base", "ft": "finetune", "ties": "candidate"}
    with pytest.raises(ValueError, match="role"):
        infer_roles(suite, ["x"], {"x": "judge"})
    with pytest.raises(FileNotFoundError, match="'base'"):
        evaluate_models(suite, {"base": tmp_path / "nope"}, None, runner=CountingRunner(), log=None)


def test_tables_evaluated_apart_concat_into_one(tmp_path):
    suite = load_suite({"retention": {"ft": ["t"]}})
    runner = CountingRunner()
    a = evaluate_models(suite, {"base": _model(tmp_path, "b", b"1")}, None, runner=runner, log=None)
    b = evaluate_models(suite, {"ft": _model(tmp_path, "f", b"2")}, None, runner=runner, log=None)
    both = ScoreTable.concat([a, b])
    assert list(both.models) == ["base", "ft"] and both.runs == 2
    assert set(both.primary()["model"]) == {"base", "ft"}
    with pytest.raises(ValueError, match="more than one table"):
        ScoreTable.concat([a, a])


def test_a_merge_made_once_per_seed_is_evaluated_with_its_own_seed(tmp_path):
    """{seed: folder}: merge seed k is run with eval seed k, and the table's seed column names it."""
    suite = load_suite({"retention": {"ft": ["t"]}, "seeds": [0, 1]})
    runner = CountingRunner()
    models = {"base": _model(tmp_path, "base", b"a"), "ft": _model(tmp_path, "ft", b"b"),
              "dare_ties": {0: _model(tmp_path, "dare0", b"c"), 1: _model(tmp_path, "dare1", b"d")}}
    table = evaluate_models(suite, models, None, runner=runner, log=None)
    assert [c for c in runner.calls if c[0].startswith("dare")] == [("dare0", ("t",), 0), ("dare1", ("t",), 1)]
    info = table.models["dare_ties"]
    assert info["per_seed"][1]["path"].endswith("dare1") and info["path"].endswith("dare0")
    assert info["per_seed"][0]["content_hash"] != info["per_seed"][1]["content_hash"]
    assert sorted(table.scores[table.scores.model == "dare_ties"].seed.unique()) == [0, 1]
    with pytest.raises(ValueError, match=r"'dare_ties'.*seeds \[0\].*seeds \[0, 1\]"):
        evaluate_models(suite, {"dare_ties": {0: models["dare_ties"][0]}}, None, runner=runner, log=None)


def test_every_include_path_reaches_the_runner(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    suite = load_suite({"retention": {"ft": ["t"]}, "include_paths": [str(a), str(b)]})
    seen = []

    def runner(model_dir, tasks, **kw):
        seen.append(kw["include_path"])
        return CountingRunner()(model_dir, tasks, **kw)

    evaluate_models(suite, {"ft": _model(tmp_path, "ft", b"b")}, None, runner=runner, log=None)
    assert seen == [[str(a), str(b)]]
