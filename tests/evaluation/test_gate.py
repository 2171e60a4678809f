import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import _eval_synthetic as syn
from mergeline.evaluation.gate import REPORT_SCHEMA_VERSION, ReportError, decide
from mergeline.evaluation.schema import CompatSummary, Decision, Missing
from mergeline.evaluation.policy import PolicyError, load_policy
from mergeline.evaluation.report import build_report
from mergeline.flows.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _report(primary="ties", compat=syn.COMPAT_PASS, stats=syn.STATS, scores=None):
    return build_report(syn.suite(), syn.table(scores), primary=primary, merge_stats=stats, compat=compat)


def test_shipped_policies_load():
    assert load_policy(REPO / "configs/gate_policy.yaml").baseline.must_beat == "linear"
    strict = load_policy(REPO / "configs/gate_policy_strict.yaml")
    assert strict.interference.fail_on_flag and strict.retention.min_per_task == 0.9


def test_good_merge_is_go_and_lists_every_passing_check():
    d = decide(_report(), REPO / "configs/gate_policy.yaml")
    assert d.go, d.text()
    assert d.reasons == []
    rules = [c.rule for c in d.checks]
    for expected in ("retention[t_add]", "retention.mean", "regression[t_gen]",
                     "sign_conflict.dropped_fraction[facts]", "compatibility", "baseline[linear]"):
        assert expected in rules
    assert all(c.passed for c in d.checks) and len(d.passed) == len(d.checks)


def test_averaging_under_strict_policy_is_nogo_with_the_right_reasons():
    d = decide(_report(primary="linear"), REPO / "configs/gate_policy_strict.yaml")
    assert not d.go and d.candidate == "linear" and d.verdict == "NO-GO" and d.exit_code == 1
    status = {c.rule: c.status for c in d.checks}
    assert {r for r, s in status.items() if s == "fail"} == {
        "retention[t_add]", "retention[t_rev]", "retention.mean", "interference",
        "sign_conflict.dropped_fraction", "baseline[linear]"}
    # 19 of 20 against 0.9, and 2 items lost on the general task against a 0.02 drop: 20 items cannot tell
    assert status["retention[t_facts]"] == status["regression[t_gen]"] == "inconclusive"
    assert any(i.startswith("retention[t_facts]") for i in d.inconclusive)
    assert any("keeps facts 0.950" in r and "loses reverse 0.100" in r for r in d.reasons)
    point = decide(_report(primary="linear"), {**load_policy(REPO / "configs/gate_policy_strict.yaml").model_dump(),
                                               "confidence": None})
    assert any("retention[t_facts]" in p for p in point.passed)     # 0.95 >= 0.9 on the point
    assert any("keeps facts 0.950 but loses reverse 0.100: retention gap >= 0.5 (point estimates)" in r
               for r in point.reasons)


def test_failed_compatibility_and_missing_evidence_fail():
    d = decide(_report(compat=syn.COMPAT_FAIL), REPO / "configs/gate_policy.yaml")
    assert not d.go
    assert [r for r in d.reasons if r.startswith("compatibility")] == [
        "compatibility: status 'fail', failed checks: ['same_base']"]
    d = decide(_report(compat=None), {"compatibility": {"must_pass": True}, "baseline": {"must_beat": "dare"}})
    assert not d.go and len(d.reasons) == 2
    # each absence is typed in the report, with its reason, and the check says it
    assert d.reasons[0] == "compatibility: no compatibility report was given"
    assert "baseline 'dare' was not evaluated" in d.reasons[1]


def test_missing_merge_statistics_fail_the_sign_rules_saying_so():
    rep = _report(stats={"ties": None, "linear": None})
    assert rep.candidates["ties"].sign_conflict == Missing(
        missing="no merge statistics for 'ties' (no merge_stats.json beside the merge)")
    d = decide(rep, {"sign_conflict": {"max_dropped_fraction_per_model": 0.5, "max_conflict_rate": 0.5}})
    assert [(c.rule, c.status) for c in d.checks] == [("sign_conflict.dropped_fraction", "fail"),
                                                      ("sign_conflict.rate", "fail")]
    assert all("no merge statistics for 'ties'" in c.message for c in d.checks)


def test_warn_status_obeys_allow_warn():
    rep = _report(compat={**syn.COMPAT_PASS, "status": "warn"})
    assert isinstance(rep.compat, CompatSummary) and rep.compat.status == "warn"
    assert decide(rep, {"compatibility": {"must_pass": True, "allow_warn": True}}).go
    assert not decide(rep, {"compatibility": {"must_pass": True, "allow_warn": False}}).go


def test_per_task_thresholds_and_margin():
    rep = _report()
    assert not decide(rep, {"retention": {"min_per_task": {"t_facts": 0.9}}}).go   # ties keeps 0.85
    assert decide(rep, {"retention": {"min_per_task": {"t_add": 0.7}}}).go         # 0.95 [0.76, 1.0]
    assert decide(rep, {"retention": {"min_per_task": {"t_add": 0.9}}, "confidence": "none"}).go
    assert not decide(rep, {"baseline": {"must_beat": "linear", "margin": 0.5}}).go
    empty = decide(rep, {})
    assert empty.go and empty.checks == []


def test_policy_errors_name_the_key(tmp_path):
    with pytest.raises(PolicyError, match=r"unknown key 'retention.min_meen'"):
        load_policy({"retention": {"min_meen": 0.5}})
    with pytest.raises(PolicyError, match="schema_version 2"):
        load_policy({"schema_version": 2})
    with pytest.raises(ReportError, match="not in the report"):
        decide(_report(), {"candidate": "slerp"})


# ---- the CLI: 0 GO, 1 NO-GO, 2 unusable input

@pytest.fixture
def report_files(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(_report().model_dump_json())
    bad.write_text(_report(compat=syn.COMPAT_FAIL).model_dump_json())
    return good, bad


def test_gate_cli_exit_codes(report_files, tmp_path):
    good, bad = report_files
    policy = str(REPO / "configs/gate_policy.yaml")
    r = runner.invoke(app, ["gate", str(good), "--policy", policy])
    assert r.exit_code == 0, r.output
    assert "GO for candidate 'ties'" in r.output and "PASS  baseline[linear]" in r.output

    r = runner.invoke(app, ["gate", str(bad), "--policy", policy])
    assert r.exit_code == 1, r.output
    assert "NO-GO" in r.output and "FAIL  compatibility" in r.output

    r = runner.invoke(app, ["gate", str(bad), "--policy", policy, "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["verdict"] == "NO-GO"
    assert Decision.model_validate_json(r.stdout).reasons  # the decision.json shape, typed


def test_gate_cli_unusable_input_exits_2(report_files, tmp_path):
    good, _ = report_files
    policy = REPO / "configs/gate_policy.yaml"
    typo = tmp_path / "typo.yaml"
    typo.write_text("retention:\n  min_mean: 0.5\nregresion: {}\n")
    not_json = tmp_path / "x.json"
    not_json.write_text("{not json")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 99}))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"schema_version": REPORT_SCHEMA_VERSION, "primary": "ties", "confidence": 0.95,
                                  "candidates": {"ties": {"retention": [{}]}}}))
    data = json.loads(good.read_text())
    data["candidates"]["ties"]["summary"]["mean_retentoin"] = data["candidates"]["ties"]["summary"].pop("mean_retention")
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    cases = {
        (str(tmp_path / "missing.json"), str(policy)): "report not found",
        (str(not_json), str(policy)): "not valid JSON",
        (str(old), str(policy)): "schema_version 99",
        (str(broken), str(policy)): "missing required key 'created'",
        (str(renamed), str(policy)): "unknown key 'candidates.ties.summary.mean_retentoin'",
        (str(good), str(typo)): "unknown key 'regresion'",
        (str(good), str(tmp_path / "nope.yaml")): "policy file not found",
    }
    for (rep, pol), message in cases.items():
        r = runner.invoke(app, ["gate", rep, "--policy", pol])
        assert r.exit_code == 2, (rep, pol, r.output)
        assert message in r.output.replace("\n", ""), r.output
        if pol == str(policy):  # one line, naming the report file and then what is wrong with it
            assert r.output.startswith(f"error: {rep}: ") and r.output.count("\n") == 1, r.output


# ---- three verdicts on per-item data whose truth is known

def _one_skill(merged_right: int, n: int, policy: dict, ft_right: int | None = None):
    """One fine-tune `ft` on task t (n items), a candidate `ties` right on `merged_right` of them."""
    s = syn.suite({"retention": {"ft": ["t"]}})
    t = syn.table_from_items({"base": {"t": syn.first_right(0, n)},
                              "ft": {"t": syn.first_right(n if ft_right is None else ft_right, n)},
                              "ties": {"t": syn.first_right(merged_right, n)}})
    return decide(build_report(s, t, primary="ties"), policy)


RETAIN_80 = {"retention": {"min_per_task": 0.8}}


def test_clearly_above_is_go_clearly_below_is_nogo():
    above = _one_skill(190, 200, RETAIN_80)                 # retention 0.95, interval well above 0.8
    assert above.verdict == "GO" and above.exit_code == 0 and above.go is True
    [c] = above.checks
    assert c.status == "pass" and c.interval.low >= 0.8 and c.threshold == 0.8
    below = _one_skill(100, 200, RETAIN_80)                 # retention 0.5, interval well below 0.8
    assert below.verdict == "NO-GO" and below.exit_code == 1 and below.go is False
    assert below.checks[0].status == "fail" and below.checks[0].interval.high < 0.8
    assert below.reasons and not below.inconclusive


def test_straddling_is_inconclusive_and_says_how_many_items_would_settle_it():
    from math import ceil

    n, p = 50, 0.86
    d = _one_skill(round(p * n), n, RETAIN_80)
    assert d.verdict == "INCONCLUSIVE" and d.exit_code == 3 and d.go is False
    [c] = d.checks
    assert c.status == "inconclusive" and c.interval.low < 0.8 <= c.interval.high
    assert d.inconclusive == [f"retention[t]: {c.message}"] and d.reasons == []
    # The figure: at sd = sqrt(p(1-p)) and distance p - 0.8, n = (1.96 sd / d)^2; the Wilson
    # interval's lower reach at 50 items is longer than the normal one (skewed towards 0.5), so
    # the figure read from it lies above the textbook's, never below ...
    textbook = ceil((1.96 * (p * (1 - p)) ** 0.5 / (p - 0.8)) ** 2)
    assert 0.9 * textbook <= c.items_needed <= 2 * textbook, (c.items_needed, textbook)
    assert c.items_needed > n
    # ... and the same effect on that many items settles it (at exactly that many the lower bound
    # sits on the threshold, half the time below; half as many again clears it).
    m = ceil(1.5 * c.items_needed)
    settled = _one_skill(round(p * m), m, RETAIN_80)
    assert settled.verdict == "GO", settled.checks


def test_confidence_none_judges_the_point_estimates():
    point = {**RETAIN_80, "confidence": "none"}
    d = _one_skill(43, 50, point)                           # 0.86 >= 0.8: the point gate says GO
    assert d.verdict == "GO" and d.confidence is None and d.checks[0].items_needed is None
    assert _one_skill(39, 50, point).verdict == "NO-GO"  # 0.78 < 0.8
    assert load_policy({"confidence": None}).confidence is None
    with pytest.raises(PolicyError, match="confidence"):
        load_policy({"confidence": 1.5})


def test_issue_example_ties_093_vs_averaging_098_on_100_items_is_inconclusive_not_nogo():
    """Two fine-tunes of one task from one base; TIES right on 93 of 100 items, averaging on 98:
    5 discordant items, all one way. Exact McNemar p = 0.0625: not significant, so the paired
    interval of the difference holds 0 and the rule 'TIES >= averaging' is not settled."""
    from mergeline.evaluation.stats import mcnemar_p

    n = 100
    s = syn.suite({"retention": {"ft_a": ["t"], "ft_b": ["t"]}})
    t = syn.table_from_items({"base": {"t": syn.first_right(20, n)}, "ft_a": {"t": syn.first_right(99, n)},
                              "ft_b": {"t": syn.first_right(98, n)}, "ties": {"t": syn.first_right(93, n)},
                              "linear": {"t": syn.first_right(98, n)}})
    assert mcnemar_p(syn.first_right(93, n), syn.first_right(98, n)) == pytest.approx(0.0625)
    policy = {"retention": {"min_per_task": 0.5}, "baseline": {"must_beat": "linear"}}
    report = build_report(s, t, primary="ties")
    d = decide(report, policy)
    assert d.verdict == "INCONCLUSIVE", d.checks
    [b] = [c for c in d.checks if c.rule == "baseline[linear]"]
    assert b.status == "inconclusive" and b.interval.method == "paired score"
    assert b.interval.low < 0 < b.interval.high and b.interval.estimate < 0
    assert b.items_needed > n
    # both fine-tunes of the one task get their own retention rule
    assert {c.rule for c in d.checks} >= {"retention[t, ft_a]", "retention[t, ft_b]"}
    # the point-estimate gate said NO-GO
    assert decide(report, {**policy, "confidence": "none"}).verdict == "NO-GO"


def test_policy_and_report_must_agree_on_the_confidence():
    rep = _report()
    assert rep.confidence == 0.95
    with pytest.raises(ReportError, match="confidence 0.95.*0.99"):
        decide(rep, {"confidence": 0.99})
    assert decide(rep, {"confidence": "none"}).confidence is None   # points need no intervals


def test_sign_rules_do_not_apply_to_a_method_that_elects_no_signs():
    stats = {"ties": syn.merge_stats("linear", {"addition": 0.9, "reverse": 0.9, "facts": 0.9}), "linear": None}
    d = decide(_report(stats=stats), {"sign_conflict": {"max_dropped_fraction_per_model": 0.1,
                                                        "max_conflict_rate": 0.01}})
    assert [(c.rule, c.status) for c in d.checks] == [("sign_conflict", "not_applicable")]
    assert d.verdict == "GO" and "N/A  sign_conflict: method 'linear' elects no signs" in d.text()
    d = decide(_report(), {"sign_conflict": {"max_dropped_fraction_per_model": 0.1}})   # ties: applies
    assert d.verdict == "NO-GO" and "sign_conflict.dropped_fraction[facts]" in " ".join(d.reasons)


# ---- interference: a task-conditional failure relative to the other fine-tunes

def _three_skills(merged: dict[str, int], n: int = 40):
    s = syn.suite({"retention": {"ft_a": ["a"], "ft_b": ["b"], "ft_c": ["c"]}})
    items = {"base": {t: syn.first_right(0, n) for t in "abc"}}
    for t in "abc":
        items[f"ft_{t}"] = {u: syn.first_right(n if u == t else 0, n) for u in "abc"}
    items["ties"] = {t: syn.first_right(merged[t], n) for t in "abc"}
    rep = build_report(s, syn.table_from_items(items), primary="ties")
    return rep, decide(rep, {"interference": {"fail_on_flag": True}})


def test_one_skill_kept_at_075_while_the_others_fall_to_0_raises_the_flag():
    rep, d = _three_skills({"a": 30, "b": 0, "c": 0})
    i = rep.candidates["ties"].interference
    assert i.flag is True and i.kept == ["ft_a"] and i.lost == ["ft_b", "ft_c"]
    assert "keeps ft_a 0.750" in i.explanation
    assert [m.finetune for m in i.per_model] == ["ft_a", "ft_b", "ft_c"]
    assert i.per_model[0].retention_interval.low > i.per_model[1].retention_interval.high
    assert d.verdict == "NO-GO"
    assert d.checks[0].status == "fail"


def test_the_flag_is_relative_not_fixed_marks():
    # 0.85 / 0.30 / 0.30: under the old marks (kept >= 0.9) no flag; the gap of 0.55 is one.
    assert _three_skills({"a": 34, "b": 12, "c": 12})[0].candidates["ties"].interference.flag is True
    # all skills lost alike: no task-conditional pattern (retention rules catch the loss)
    even, d = _three_skills({"a": 4, "b": 2, "c": 3})
    assert even.candidates["ties"].interference.flag is False
    assert d.verdict == "GO"


def test_a_gap_the_items_cannot_settle_is_inconclusive():
    rep, d = _three_skills({"a": 4, "b": 1, "c": 4}, n=5)      # 0.8 vs 0.2 on 5 items: gap, overlapping intervals
    i = rep.candidates["ties"].interference
    assert i.flag is False and i.suspected
    assert d.verdict == "INCONCLUSIVE"
    assert "cannot yet tell" in d.checks[0].message
