import json
import re
from pathlib import Path

import pytest

import _eval_synthetic as syn
from mergeline.evaluation.gate import validate_report
from mergeline.evaluation.report import build_report, write_reports

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def report():
    return build_report(syn.suite(), syn.table(), primary="ties", merge_stats=syn.STATS, compat=syn.COMPAT_PASS,
                        policy=REPO / "configs/gate_policy.yaml")


def test_report_json_holds_every_axis_and_the_baselines(report):
    validate_report(report)
    assert report["schema_version"] == 2 and report["confidence"] == 0.95
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


def test_every_score_has_an_interval_and_the_shape_agreed_with_the_renderers(report):
    keys = {"estimate", "low", "high", "confidence", "method", "n"}
    for sc in report["scores"]:
        assert set(sc) == {"model", "role", "task", "value", "interval", "seed_spread"}
        assert set(sc["interval"]) == keys and sc["interval"]["method"] == "wilson"
        assert sc["interval"]["estimate"] == pytest.approx(sc["value"]) and sc["seed_spread"] is None
    ties = report["candidates"]["ties"]
    assert {"retention_interval", "difference_interval"} <= set(ties["retention"][0])
    assert "delta_interval" in ties["regression"][0]
    assert {"mean_retention_interval", "mean_regression_interval"} <= set(ties["summary"])
    assert {"explanation", "per_model", "flag"} <= set(ties["interference"])
    assert set(ties["interference"]["per_model"][0]) == {"finetune", "retention", "retention_interval",
                                                          "dropped_fraction_of_kept"}
    [cmp] = report["baselines"]["comparisons"]
    assert set(cmp["difference_interval"]) == keys and set(cmp["regression_difference_interval"]) == keys
    d = report["decision"]
    assert {"verdict", "go", "exit_code", "candidate", "policy", "confidence", "checks", "reasons", "passed",
            "inconclusive"} <= set(d)
    assert {"rule", "status", "message", "interval", "threshold", "items_needed"} <= set(d["checks"][0])


def test_the_example_report_is_built_by_the_code_of_today():
    """tests/evaluation/example_report.json (for the renderers) has the shape build_report gives now;
    regenerate it with `.venv/bin/python tests/evaluation/_eval_synthetic.py tests/evaluation/example_report.json`."""
    def shape(x):
        if isinstance(x, dict):
            return {k: shape(v) for k, v in x.items() if k not in ("created",)}
        if isinstance(x, list):
            return [shape(v) for v in x[:1]]
        return type(x).__name__ if x is not None else None

    fresh = syn.example_report()
    stored = json.loads((Path(__file__).parent / "example_report.json").read_text())
    assert shape(stored) == shape(json.loads(json.dumps(fresh)))
    assert fresh["decision"]["verdict"] in ("GO", "NO-GO", "INCONCLUSIVE")
    assert any(s["seed_spread"] for s in fresh["scores"] if s["model"] == "dare_ties")
