"""evaluation/schema.py: one place for every stage result's type, each refusing unknown keys."""
import json

import pytest
from pydantic import ValidationError

import _eval_synthetic as syn
from mergeline.evaluation import schema
from mergeline.merge.compat.report import CompatReport
from mergeline.merge.result import MergeResult, StatsSummary


def test_every_stage_result_type_is_read_from_one_module():
    assert schema.CompatReport is CompatReport
    assert schema.MergeResult is MergeResult and schema.StatsSummary is StatsSummary
    for name in ("Score", "EvaluationReport", "Decision", "Check", "Missing", "NotApplicable"):
        assert issubclass(getattr(schema, name), schema.BaseModel)


def test_a_merge_result_from_a_merge_folder(tmp_path):
    stats = syn.merge_stats("ties", {"addition": 0.1, "reverse": 0.2})
    (tmp_path / "merge_stats.json").write_text(json.dumps(stats))
    (tmp_path / "config.json").write_text("{}")
    r = MergeResult.from_folder(tmp_path)
    assert r.method == "ties" and r.content_hash.startswith("sha256:") and r.waived == []
    assert r.stats == StatsSummary(method="ties", models=["addition", "reverse"], sign_conflict_rate=0.12,
                                   per_model=stats["per_model"])
    assert MergeResult.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(ValidationError, match="waivers"):
        MergeResult.model_validate({**r.model_dump(), "waivers": ["norms.delta"]})   # the key is `waived`


def test_the_typed_absence_is_told_apart_by_its_key():
    cand = syn.example_report()[0].candidates
    assert isinstance(cand["linear"].sign_conflict, schema.NotApplicable) and cand["linear"].signs is None
    assert isinstance(cand["ties"].sign_conflict, schema.SignConflict) and cand["ties"].signs is not None
    assert schema.absent(cand["linear"].sign_conflict) == "method 'linear' elects no signs"
    assert schema.absent(cand["ties"].sign_conflict) is None
