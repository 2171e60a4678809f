import json
import re
from pathlib import Path

import pytest

import _eval_synthetic as syn
from mergeline.evaluation.gate import decide
from mergeline.evaluation.report import build_report, load_outputs, write_reports
from mergeline.evaluation.schema import (
    CompatSummary, Decision, EvaluationReport, Missing, NotApplicable, ReportError, SignConflict, load_report,
)

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "configs/gate_policy.yaml"


@pytest.fixture
def report():
    return build_report(syn.suite(), syn.table(), primary="ties", merge_stats=syn.STATS, compat=syn.COMPAT_PASS)


@pytest.fixture
def decision(report):
    return decide(report, POLICY)


def test_report_json_holds_every_axis_and_the_baselines(report, decision):
    assert isinstance(report, EvaluationReport)
    assert report.schema_version == 3 and report.confidence == 0.95
    assert set(report.candidates) == {"ties", "linear"}
    assert report.inputs.models["base"].content_hash == "sha256:base"
    assert report.baselines.answer.startswith("ties beats averaging (linear) on mean retention: 0.900 vs 0.517")
    assert isinstance(report.compat, CompatSummary) and report.compat.status == "pass"
    assert report.merge_stats["ties"].sign_conflict_rate == pytest.approx(0.12)
    assert isinstance(report.candidates["ties"].sign_conflict, SignConflict)
    assert len(report.scores) == 6 * 4
    data = json.loads(report.model_dump_json())
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN sneaks in
    assert "decision" not in data      # the report is evidence only; the decision is its own file
    assert decision.verdict == "GO" and decision.exit_code == 0
    assert EvaluationReport.model_validate(data) == report   # report.json reads back to the same report


def test_report_requires_base_and_primary():
    with pytest.raises(ValueError, match="primary candidate 'dare'"):
        build_report(syn.suite(), syn.table(), primary="dare")


def test_write_reports_renders_md_and_self_contained_html(report, decision, tmp_path):
    paths = write_reports(report, decision, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"report.json", "decision.json", "report.md", "report.html"}
    assert load_outputs(paths["json"]) == (report, decision)
    md = paths["md"].read_text()
    assert "## Decision: **GO**" in md and "| t_rev | generation |" in md
    html = paths["html"].read_text()
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [a for a, _ in imgs] == ["Retention per task (primary vs baselines)", "Regression vs base",
                                    "Primary against each baseline",
                                    "Retention beside the fraction dropped by sign election, per fine-tune",
                                    "Dropped by sign election, per model by layer", "Delta norms (compatibility report)"]
    assert all(len(b) > 5000 for _, b in imgs)                      # real images, not placeholders
    assert not re.search(r'(src|href)="(?!data:)', html)            # nothing fetched from outside
    assert not list((tmp_path / "out").glob(".*tmp*"))              # temp files renamed away
    with pytest.raises(FileExistsError, match="overwrite"):
        write_reports(report, decision, tmp_path / "out")
    write_reports(report, decision, tmp_path / "out", overwrite=True)


def test_without_a_policy_there_is_no_decision_file(report, tmp_path):
    paths = write_reports(report, None, tmp_path, html=False)
    assert set(paths) == {"json", "md"}
    assert "no gate decision: no policy was given" in paths["md"].read_text()
    assert load_outputs(paths["json"]) == (report, None)


def test_missing_plot_data_is_said_not_drawn(tmp_path):
    rep = build_report(syn.suite(), syn.table(), primary="ties", merge_stats={"ties": None, "linear": None})
    html = write_reports(rep, None, tmp_path)["html"].read_text()
    assert html.count("<img") == 3  # retention, regression, baseline
    assert "Delta norms (compatibility report): no data in this report." in html
    assert rep.candidates["ties"].sign_conflict == Missing(
        missing="no merge statistics for 'ties' (no merge_stats.json beside the merge)")
    assert rep.compat == Missing(missing="no compatibility report was given")
    assert "no compatibility report was given" in html


def test_a_method_that_elects_no_signs_has_a_typed_absence():
    stats = {**syn.STATS, "linear": syn.merge_stats("linear", {})}
    rep = build_report(syn.suite(), syn.table(), primary="ties", merge_stats=stats)
    assert rep.candidates["linear"].sign_conflict == NotApplicable(not_applicable="method 'linear' elects no signs")
    assert json.loads(rep.model_dump_json())["candidates"]["linear"]["sign_conflict"] == {
        "not_applicable": "method 'linear' elects no signs"}


def test_every_score_has_an_interval_and_the_shape_agreed_with_the_renderers(report, decision):
    keys = {"estimate", "low", "high", "confidence", "method", "n"}
    data = json.loads(report.model_dump_json())
    for sc in data["scores"]:
        assert set(sc) == {"model", "role", "task", "value", "interval", "seed_spread"}
        assert set(sc["interval"]) == keys and sc["interval"]["method"] == "wilson"
        assert sc["interval"]["estimate"] == pytest.approx(sc["value"]) and sc["seed_spread"] is None
    ties = report.candidates["ties"]
    assert ties.retention[0].retention_interval is not None and ties.retention[0].difference_interval is not None
    assert ties.regression[0].delta_interval is not None
    assert ties.summary.mean_retention_interval is not None and ties.summary.mean_regression_interval is not None
    assert [m.finetune for m in ties.interference.per_model] == ["addition", "reverse", "facts"]
    [cmp] = report.baselines.comparisons
    assert cmp.difference_interval is not None and cmp.regression_difference_interval is not None
    d = json.loads(decision.model_dump_json())
    assert set(d) == {"kind", "verdict", "exit_code", "candidate", "policy", "confidence", "checks"}
    assert set(d["checks"][0]) == {"rule", "status", "message", "interval", "threshold", "items_needed"}


# ---- report.json and decision.json read back typed, refusing what they do not know

def test_a_renamed_key_in_report_json_is_an_error_naming_the_file_and_the_key(report, tmp_path):
    data = json.loads(report.model_dump_json())
    data["candidates"]["linear"]["retention"][1]["finetune_scroe"] = data["candidates"]["linear"]["retention"][1].pop(
        "finetune_score")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as e:
        load_report(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert "unknown key 'candidates.linear.retention.1.finetune_scroe'" in msg
    assert "missing required key 'candidates.linear.retention.1.finetune_score'" in msg


def test_a_renamed_key_inside_a_typed_absence_union_names_the_key(report, tmp_path):
    data = json.loads(report.model_dump_json())
    data["candidates"]["ties"]["sign_conflict"]["raet"] = data["candidates"]["ties"]["sign_conflict"].pop("rate")
    data["compat"] = {"missnig": "typo"}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=r"unknown key 'candidates\.ties\.sign_conflict\.raet'") as e:
        load_report(path)
    assert "unknown key 'compat.missnig'" in str(e.value)


def test_an_old_report_and_a_doctored_decision_are_refused(report, decision, tmp_path):
    data = json.loads(report.model_dump_json())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(ReportError, match="schema_version 2 is not supported .expected 3"):
        load_report(old)
    nogo = decide(build_report(syn.suite(), syn.table(), primary="linear"), REPO / "configs/gate_policy_strict.yaml")
    doctored = json.loads(nogo.model_dump_json())
    doctored.update(verdict="GO", exit_code=0)
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(doctored))
    from mergeline.evaluation.schema import load_decision
    with pytest.raises(ReportError, match="verdict 'GO' .exit code 0. does not follow from its checks .'NO-GO'."):
        load_decision(path)
    assert Decision.model_validate_json(nogo.model_dump_json()) == nogo


def test_the_example_report_is_built_by_the_code_of_today():
    """tests/evaluation/example_report.json and example_decision.json (for the renderers) are what
    build_report and decide give now; regenerate them with
    `.venv/bin/python tests/evaluation/_eval_synthetic.py tests/evaluation/`."""
    fresh, decision = syn.example_report()
    stored = load_report(Path(__file__).parent / "example_report.json")
    assert stored.model_copy(update={"created": fresh.created}) == fresh
    assert syn.example_decision() == decision
    assert decision.verdict == "INCONCLUSIVE"
    assert any(s.seed_spread for s in fresh.scores if s.model == "dare_ties")
