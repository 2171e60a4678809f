import json
import re
from pathlib import Path

import pytest

import _eval_synthetic as syn
from evaluation.gate import validate_report
from evaluation.report import build_report, write_reports

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def report():
    return build_report(syn.suite(), syn.table(), primary="ties", merge_stats=syn.STATS, compat=syn.COMPAT_PASS,
                        policy=REPO / "configs/gate_policy.yaml")


def test_report_json_holds_every_axis_and_the_baselines(report):
    validate_report(report)
    assert report["schema_version"] == 1
    assert set(report["candidates"]) == {"ties", "linear"}
    for c in report["candidates"].values():
        assert {"retention", "regression", "interference", "sign_conflict", "summary"} <= set(c)
    assert report["inputs"]["models"]["base"]["content_hash"] == "sha256:base"
    assert report["baselines"]["answer"].startswith("ties beats averaging (linear) on mean retention: 0.900 vs 0.517")
    assert report["compat"]["status"] == "pass"
    assert report["merge_stats"]["ties"]["sign_conflict_rate"] == pytest.approx(0.12)
    assert report["decision"]["verdict"] == "GO"
    assert len(report["scores"]) == 6 * 4
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN sneaks in


def test_report_requires_base_and_primary():
    with pytest.raises(ValueError, match="primary candidate 'dare'"):
        build_report(syn.suite(), syn.table(), primary="dare")


def test_write_reports_renders_md_and_self_contained_html(report, tmp_path):
    paths = write_reports(report, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "report.html"}
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
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
        write_reports(report, tmp_path / "out")
    write_reports(report, tmp_path / "out", overwrite=True)


def test_missing_plot_data_is_said_not_drawn(tmp_path):
    rep = build_report(syn.suite(), syn.table(), primary="ties", merge_stats={"ties": None, "linear": None})
    html = write_reports(rep, tmp_path)["html"].read_text()
    assert html.count("<img") == 3  # retention, regression, baseline
    assert "Delta norms (compatibility report): no data in this report." in html
    assert rep["candidates"]["ties"]["sign_conflict"]["available"] is False
