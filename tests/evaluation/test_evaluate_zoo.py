"""The evaluation suite and gate on the real zoo: real merges, real lm-eval, no stand-ins.

Builds (once per session) TIES, linear and task_arithmetic merges of the zoo's fine-tunes, plus
a TIES merge that wrongly includes the different-base specimen, evaluates all of them with
lm-eval through the score cache, and checks the gate's verdicts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergeline.evaluation.evaluate import evaluate_models
from mergeline.evaluation.gate import decide
from mergeline.evaluation.report import build_report, write_reports
from mergeline.evaluation.suite import load_suite
from mergeline.merge.hashing import content_hash

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def recipe(method: str, base: Path, models: dict[str, Path]) -> dict:
    """The demo's recipe (zoo/merges.py DEMO, configs/pipeline_demo.yaml): TIES is the
    candidate, linear and task arithmetic the baselines it must beat, at the same weights."""
    from mergeline.zoo.merges import demo_recipe

    return demo_recipe(method, base, models)


class Counting:
    """Counts the real lm-eval runs (the cache test needs to know whether lm-eval ran)."""

    def __init__(self):
        from mergeline.evaluation.lm_eval_runner import run_lm_eval
        self.fn, self.calls = run_lm_eval, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def world(zoo, tmp_path_factory):
    from mergeline.merge.compat import check_models
    from mergeline.merge.executor import run_merge

    root = tmp_path_factory.mktemp("eval_zoo")
    merged = {}
    for method in ("ties", "linear", "task_arithmetic"):
        merged[method] = run_merge(recipe(method, zoo.base, zoo.finetunes), root / method, progress=False).path
    bad_inputs = {**zoo.finetunes, "different_base": zoo.negatives["different_base"]}
    merged["ties_bad"] = run_merge(recipe("ties", zoo.base, bad_inputs), root / "ties_bad",
                                   progress=False, allow_crimes=True).path  # the gate would refuse it

    suite = load_suite(REPO / "configs/eval_suite.yaml", {"zoo": zoo.tasks_dir})
    models = {"base": zoo.base, **zoo.finetunes, **merged}
    runner = Counting()
    table = evaluate_models(suite, models, root / "cache", runner=runner, log=None)
    return {"root": root, "suite": suite, "models": models, "table": table, "runner": runner,
            "compat": check_models(zoo.base, zoo.finetunes).to_dict(),
            "compat_bad": check_models(zoo.base, bad_inputs).to_dict()}


def _report(world, primary: str, compat: dict, drop: str | None = None):
    t = world["table"]
    if drop:  # one report per judged merge: the other TIES variant is not a baseline
        from dataclasses import replace
        keep = [m for m in t.models if m != drop]
        t = replace(t, scores=t.scores[t.scores.model.isin(keep)], samples=t.samples[t.samples.model.isin(keep)],
                    models={m: t.models[m] for m in keep})
    return build_report(world["suite"], t, primary=primary, compat=compat)


def test_each_finetune_scores_high_on_its_own_tasks(world):
    t, suite = world["table"], world["suite"]
    for ft, tasks in suite.retention.items():
        for task in tasks:
            own, base = t.score(ft, task), t.score("base", task)
            print(f"{ft:>10} on {task:<16} fine-tune {own:.3f}  base {base:.3f}")
            # every fine-tune measures 1.0 on its own tasks on this zoo (seed 0; README "The demo zoo")
            assert own >= 0.7, (ft, task, own)
            assert own > base + 0.3, (ft, task, own, base)


def test_second_evaluation_hits_the_cache(world):
    runner = world["runner"]
    before = runner.calls
    # One lm-eval run per distinct model content: merges that come out byte-identical (TIES and
    # task arithmetic coincide when the task vectors do not overlap) share one cache entry.
    distinct = {content_hash(path) for path in world["models"].values()}
    assert before == len(distinct) * len(world["suite"].seeds)
    again = evaluate_models(world["suite"], world["models"], world["root"] / "cache", runner=runner, log=None)
    assert runner.calls == before and again.runs == 0
    assert again.primary()["value"].tolist() == world["table"].primary()["value"].tolist()


# The demo's recipe on the zoo (seed 0, zoo.json `merges`): TIES keeps every skill (retention
# lower bounds >= 0.5) and the general skill (drops within 0.10), plain averaging keeps almost
# none of the skills: GO under configs/gate_policy.yaml.
def test_ties_merge_is_go_under_the_default_policy(world, tmp_path):
    report = _report(world, "ties", world["compat"], drop="ties_bad")
    decision = decide(report, REPO / "configs/gate_policy.yaml")
    print(json.dumps({n: c.summary.model_dump(mode="json") for n, c in report.candidates.items()}, indent=1))
    print(report.baselines.answer)
    print("\n".join(decision.passed + decision.reasons))
    assert decision.go, decision.reasons
    # All four axes and the baselines are in the report.
    ties = report.candidates["ties"]
    assert {r.task for r in ties.retention} == set(world["suite"].retention_task_names())
    assert [r.task for r in ties.regression] == world["suite"].general
    assert {"generation", "multiple_choice"} <= set(ties.interference.by_type)
    assert ties.signs is not None and ties.signs.rate is not None
    assert {"linear", "task_arithmetic"} <= set(report.candidates)

    paths = write_reports(report, decision, tmp_path)
    html = paths["html"].read_text()
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', html)) == 6  # every plot


def test_plain_average_under_strict_policy_is_nogo(world):
    report = _report(world, "linear", world["compat"], drop="ties_bad")
    d = decide(report, REPO / "configs/gate_policy_strict.yaml")
    print(d.text())
    assert not d.go
    failing = {c.rule.split("[")[0] for c in d.checks if not c.passed}
    assert "retention.mean" in failing and "retention" in failing
    assert "baseline" in failing          # averaging cannot beat itself by the strict margin


def test_merge_with_the_different_base_specimen_is_nogo(world):
    report = _report(world, "ties_bad", world["compat_bad"], drop="ties")
    d = decide(report, {**_default_policy(), "candidate": "ties_bad"})
    print(d.text())
    assert not d.go
    assert any(r.startswith("compatibility: status 'fail'") for r in d.reasons), d.reasons


def _default_policy() -> dict:
    import yaml
    return yaml.safe_load((REPO / "configs/gate_policy.yaml").read_text())


def test_cli_evaluate_uses_the_cache(world, zoo, tmp_path):
    from mergeline.flows.cli import app
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["evaluate", str(zoo.base), "--suite", str(REPO / "configs/eval_suite.yaml"),
                                 "--zoo", str(zoo.root), "--cache-dir", str(world["root"] / "cache"),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "hit" in r.output and "zoo_general_mc" in r.output
    assert (out / "scores.csv").is_file() and (out / "samples.csv").is_file()
    r = CliRunner().invoke(app, ["evaluate", str(zoo.base), "--suite", str(REPO / "configs/eval_suite.yaml")])
    assert r.exit_code == 2 and "placeholder" in r.output
