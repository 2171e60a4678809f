"""The compatibility gate on the zoo's genuine fine-tunes and its negative specimens
(zoo, built once per machine by the session fixture `zoo`).

    pytest tests/merge/test_compat_zoo.py -q
"""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.merge.checkpoint import CheckpointError
from mergeline.merge.compat import check_models

pytestmark = pytest.mark.slow
runner = CliRunner()


def not_passing(report) -> list[str]:
    return [f"{c.name}: {c.status}: {c.message}" for c in report.checks if c.status not in ("pass", "skip")]


def with_specimen(zoo, key: str) -> dict:
    return {**zoo.finetunes, key: zoo.negatives[key]}


def test_good_finetunes_pass(zoo):
    report = check_models(zoo.base, zoo.finetunes)
    assert report.status == "pass", not_passing(report)
    per_model = report.norms["per_model"]
    assert all(0 < v["relative_delta_matrices"] < 1.25 and v["weight_cosine"] > 0.5 for v in per_model.values()), per_model


def test_different_base_is_flagged_by_the_norms(zoo):
    report = check_models(zoo.base, with_specimen(zoo, "different_base"))
    assert report.status == "fail", not_passing(report)
    unrelated = report.check("norms.unrelated")  # weights ~orthogonal to the base's
    assert unrelated.status == "fail" and "different_base" in unrelated.message, not_passing(report)
    assert abs(report.norms["per_model"]["different_base"]["weight_cosine"]) < 0.2
    by_size = [c for c in (report.check("norms.too_large"), report.check("norms.outlier")) if c.status in ("fail", "warn")]
    assert by_size and all("different_base" in c.message for c in by_size), not_passing(report)
    for good in zoo.finetunes:  # only the specimen is blamed
        for c in report.checks:
            if c.name.startswith("norms.") and c.status != "pass":
                assert f" {good} " not in f" {c.message} ".replace(",", " "), c.message


def test_different_tokenizer_fails_the_tokenizer_check(zoo):
    report = check_models(zoo.base, with_specimen(zoo, "different_tokenizer"))
    vocab = report.check("tokenizer.vocab")
    assert vocab.status == "fail", not_passing(report)
    assert vocab.details["different_tokenizer"]["ids_differ"] > 0
    assert report.status == "fail"


def test_different_arch_fails_on_config_and_shapes(zoo):
    report = check_models(zoo.base, with_specimen(zoo, "different_arch"))
    assert report.check("architecture").status == "fail", not_passing(report)
    assert "different_arch" in json.dumps(report.check("architecture").details)
    tensors = [report.check("tensors.shapes"), report.check("tensors.names")]
    assert any(c.status == "fail" for c in tensors), not_passing(report)
    assert report.check("norms.too_large").status == "skip"


def test_truncated_copy_of_a_good_model_names_the_file(zoo, tmp_path):
    name, folder = next(iter(zoo.finetunes.items()))
    bad = tmp_path / f"{name}-truncated"
    shutil.copytree(folder, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name) as e:
        check_models(zoo.base, {**zoo.finetunes, "truncated": bad})
    assert str(bad) in str(e.value)


def recipe(tmp_path, zoo, models: dict) -> str:
    lines = ["merge_method: ties", f"base_model: {zoo.base}", "models:"]
    for folder in models.values():
        lines += [f"  - model: {folder}", "    parameters: {weight: 0.5, density: 0.5}"]
    p = tmp_path / "recipe.yaml"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_cli_on_the_zoo(zoo, tmp_path):
    good = runner.invoke(app, ["check", recipe(tmp_path, zoo, zoo.finetunes), "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["status"] == "pass"
    for key in ("different_base", "different_tokenizer", "different_arch"):
        res = runner.invoke(app, ["check", recipe(tmp_path, zoo, with_specimen(zoo, key))])
        assert res.exit_code == 1, (key, res.output)


def test_waiver_is_reported_as_waived(zoo, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("waive: [tokenizer]\n")
    res = runner.invoke(app, ["check", recipe(tmp_path, zoo, with_specimen(zoo, "different_tokenizer")),
                              "--policy", str(policy), "--json"])
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["tokenizer.vocab"]["status"] == "waived" and checks["tokenizer.vocab"]["waived"]
    assert checks["tokenizer.vocab"]["details"]["waived_status"] == "fail"
