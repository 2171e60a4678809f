"""Suite splits: declared ranges are checked; a suite scores only its part's items (real lm-eval
on a tiny model); a suite without splits is unchanged; the tuning objective follows the policy."""
import json

import pandas as pd
import pytest

from mergeline.evaluation.evaluate import ScoreTable, evaluate_models
from mergeline.evaluation.objective import objective
from mergeline.evaluation.splits import describe, restrict, task_ranges
from mergeline.evaluation.suite import SuiteError, load_suite

SUITE = {"retention": {"ft_a": ["t_a"]}, "general": ["t_gen"]}


def test_ranges_are_checked_and_named(tmp_path):
    with pytest.raises(SuiteError, match="overlap"):
        load_suite({**SUITE, "splits": {"validation": [0, 10], "test": [5, 20]}})
    with pytest.raises(SuiteError, match="start < end"):
        load_suite({**SUITE, "splits": {"validation": [4, 4], "test": [5, 20]}})
    with pytest.raises(SuiteError, match="not both"):
        load_suite({**SUITE, "limit": 20, "splits": {"validation": [0, 5], "test": [5, 20]}})
    with pytest.raises(SuiteError, match=r"no validation/test range for task\(s\) \['t_gen'\]"):
        load_suite({**SUITE, "splits": {"tasks": {"t_a": {"validation": [0, 5], "test": [5, 9]}}}})
    with pytest.raises(SuiteError, match="not in the suite"):
        load_suite({**SUITE, "splits": {"validation": [0, 5], "test": [5, 9],
                                        "tasks": {"t_x": {"validation": [0, 5], "test": [5, 9]}}}})
    with pytest.raises(SuiteError, match="needs 'splits'"):
        load_suite({**SUITE, "part": "validation"})
    with pytest.raises(SuiteError, match="splits.bogus"):
        load_suite({**SUITE, "splits": {"validation": [0, 5], "test": [5, 9], "bogus": 1}})


def test_per_task_ranges_win_and_the_run_limit_is_the_parts_end():
    s = load_suite({**SUITE, "splits": {"validation": [0, 5], "test": [5, 12],
                                        "tasks": {"t_gen": {"test": [0, 4], "validation": [4, 30]}}}})
    assert s.scored_part() == "test" and s.run_limit() == 12
    assert task_ranges(s) == {"t_a": (5, 12), "t_gen": (0, 4)}
    v = s.for_part("validation")
    assert v.run_limit() == 30 and task_ranges(v) == {"t_a": (0, 5), "t_gen": (4, 30)}
    assert "validation items: t_a [0, 5)" in describe(v)
    plain = load_suite({**SUITE, "limit": 7})
    assert plain.run_limit() == 7 and plain.scored_part() is None and task_ranges(plain) == {}
    with pytest.raises(SuiteError, match="declares no splits"):
        plain.for_part("validation")


def _table(rows):
    samples = pd.DataFrame([{"model": m, "role": "x", "task": t, "doc_id": d, "correct": c, "seed": 0}
                            for m, t, d, c in rows])
    scores = (samples.groupby(["model", "role", "task", "seed"], as_index=False)["correct"].mean()
              .rename(columns={"correct": "value"}).assign(metric="acc", primary=True))
    extra = scores.assign(metric="acc_norm", primary=False)
    return ScoreTable(scores=pd.concat([scores, extra], ignore_index=True), samples=samples)


def test_restrict_keeps_the_parts_items_and_rescores_them():
    rows = [("m", "t_a", d, float(d < 3)) for d in range(10)] + [("m", "t_gen", d, 1.0) for d in range(10)]
    table = _table(rows)
    s = load_suite({**SUITE, "splits": {"validation": [0, 4], "test": [4, 10]}})
    val = restrict(table, s.for_part("validation"))
    test = restrict(table, s)
    assert set(val.samples["doc_id"]) == {0, 1, 2, 3} and set(test.samples["doc_id"]) == set(range(4, 10))
    assert val.score("m", "t_a") == pytest.approx(0.75) and test.score("m", "t_a") == 0.0
    assert list(test.scores["metric"]) == ["acc", "acc"]  # other metrics were computed on every item
    assert restrict(table, load_suite(SUITE)) is table  # no splits: nothing changes
    f1 = table.scores.assign(metric="f1")
    with pytest.raises(ValueError, match="not a mean of per-item values"):
        restrict(ScoreTable(scores=f1, samples=table.samples), s)


def test_objective_penalises_what_the_gate_would_refuse():
    rows = ([("base", "t_a", d, 0.0) for d in range(10)] + [("base", "t_gen", d, 1.0) for d in range(10)]
            + [("ft_a", "t_a", d, 1.0) for d in range(10)] + [("ft_a", "t_gen", d, 1.0) for d in range(10)]
            + [("ties", "t_a", d, float(d < 8)) for d in range(10)]
            + [("ties", "t_gen", d, float(d < 7)) for d in range(10)])
    s = load_suite(SUITE)
    free = objective(_table(rows), s, {}, "ties")
    assert free["value"] == pytest.approx(0.8) and free["feasible"]
    strict = objective(_table(rows), s, {"regression": {"max_drop_per_task": 0.1},
                                         "retention": {"min_per_task": 0.9}}, "ties", penalty=2.0)
    # drop 0.3 on t_gen is 0.2 beyond the limit; retention 0.8 is 0.1 short of 0.9
    assert strict["regression_excess"] == pytest.approx(0.2) and strict["retention_shortfall"] == pytest.approx(0.1)
    assert strict["value"] == pytest.approx(0.8 - 2.0 * 0.3) and not strict["feasible"]


def test_a_split_suite_scores_only_its_part_with_real_lm_eval(tiny_models, tiny_tasks, tmp_path):
    suite = load_suite({**SUITE, "include_paths": [str(tiny_tasks)], "batch_size": 8,
                        "splits": {"validation": [0, 5], "test": [5, 12]}})
    cache = tmp_path / "cache"
    val = evaluate_models(suite.for_part("validation"), {"base": tiny_models["base"]}, cache, log=None)
    test = evaluate_models(suite, {"base": tiny_models["base"]}, cache, log=None)
    assert set(val.samples["doc_id"]) == set(range(5))
    assert set(test.samples["doc_id"]) == set(range(5, 12))
    for table in (val, test):
        for task in ("t_a", "t_gen"):
            items = table.samples[table.samples["task"] == task]["correct"]
            assert table.score("base", task) == pytest.approx(items.mean())
    # the validation run asked lm-eval for its 5 items only; the test run for the first 12
    limits = sorted(json.loads(p.read_text())["limit"] for p in cache.rglob("meta.json"))
    assert limits == [5, 12], limits
