import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import _eval_synthetic as syn
from evaluation.gate import ReportError, decide
from evaluation.policy import PolicyError, load_policy
from evaluation.report import build_report
from flows.cli import app

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
    assert not d.go and d.candidate == "linear"
    failing = {c.rule for c in d.checks if not c.passed}
    assert {"retention[t_add]", "retention[t_rev]", "retention.mean", "regression[t_gen]", "interference",
            "sign_conflict.dropped_fraction", "baseline[linear]"} <= failing
    assert "retention[t_facts]" not in failing          # 0.95 >= 0.9: listed as a pass
    assert any("retention[t_facts]" in p for p in d.passed)
    assert any("keeps ['facts'] but loses ['addition', 'reverse']" in r for r in d.reasons)


def test_failed_compatibility_and_missing_evidence_fail():
    d = decide(_report(compat=syn.COMPAT_FAIL), REPO / "configs/gate_policy.yaml")
    assert not d.go
    assert [r for r in d.reasons if r.startswith("compatibility")] == [
        "compatibility: status 'fail', failed checks: ['same_base']"]
    d = decide(_report(compat=None), {"compatibility": {"must_pass": True}, "baseline": {"must_beat": "dare"}})
    assert not d.go and len(d.reasons) == 2
    assert "baseline 'dare' was not evaluated" in d.reasons[1]


def test_warn_status_obeys_allow_warn():
    rep = _report(compat={**syn.COMPAT_PASS, "status": "warn"})
    assert decide(rep, {"compatibility": {"must_pass": True, "allow_warn": True}}).go
    assert not decide(rep, {"compatibility": {"must_pass": True, "allow_warn": False}}).go


def test_per_task_thresholds_and_margin():
    rep = _report()
    assert not decide(rep, {"retention": {"min_per_task": {"t_facts": 0.9}}}).go   # ties keeps 0.85
    assert decide(rep, {"retention": {"min_per_task": {"t_add": 0.9}}}).go
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
    good.write_text(json.dumps(_report()))
    bad.write_text(json.dumps(_report(compat=syn.COMPAT_FAIL)))
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
    broken.write_text(json.dumps({"schema_version": 1, "primary": "ties", "candidates": {"ties": {"retention": [{}]}}}))
    cases = {
        (str(tmp_path / "missing.json"), str(policy)): "report not found",
        (str(not_json), str(policy)): "not valid JSON",
        (str(old), str(policy)): "schema_version 99",
        (str(broken), str(policy)): "malformed report",
        (str(good), str(typo)): "unknown key 'regresion'",
        (str(good), str(tmp_path / "nope.yaml")): "policy file not found",
    }
    for (rep, pol), message in cases.items():
        r = runner.invoke(app, ["gate", rep, "--policy", pol])
        assert r.exit_code == 2, (rep, pol, r.output)
        assert message in r.output.replace("\n", ""), r.output
