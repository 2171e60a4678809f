"""The gate policy: what a merge must show before it may ship. Every rule is optional.

    schema_version: 1
    candidate: ties                 # which candidate the gate judges (default: the report's primary)
    confidence: 0.95                # per rule; `none`: judge the point estimates (pass/fail only)
    retention:
      min_per_task: 0.8             # a number for every task, or {task: number}
      min_mean: 0.85
    regression:
      max_drop_per_task: 0.05       # merged - base must be >= -0.05 on every general task
    sign_conflict:
      max_dropped_fraction_per_model: 0.5
    interference:
      fail_on_flag: true            # NO-GO when one skill is kept and another lost
      min_gap: 0.5                  # ...by at least this retention gap, intervals apart
    compatibility:
      must_pass: true
      allow_warn: true              # a "warn" compatibility status still passes
    baseline:
      must_beat: linear             # the averaging baseline, by mean retention
      margin: 0.0
    smoke:                          # before the full evaluation (evaluation/smoke.py); null: skip
      max_perplexity_ratio: 1.5     # vs the worst of base and fine-tunes
      max_new_tokens: 64            # greedy continuations must end with EOS within this
      max_repeated_ngram_share: 0.5

Each rule is judged on its interval at `confidence` (evaluation/gate.py): it passes when the
interval clears the threshold, fails when the interval lies wholly on the wrong side, and is
inconclusive otherwise. The confidence is PER RULE: each rule's interval has that coverage on
its own, with no family-wise correction, so with k rules the chance that at least one of them is
misjudged can reach k x (1 - confidence). For a family-wise bound alpha over k rules, set
`confidence: 1 - alpha / k` (Bonferroni; e.g. 0.99 for 5 rules at 0.05). `confidence: none`
keeps the point-estimate gate (no interval, no INCONCLUSIVE). Sign-conflict and compatibility
rules read counts from the merge, not samples: they pass or fail on their values. The report
must be built at the same confidence (build_report(confidence=policy.confidence); the pipeline does).

The interference rule flags a task-conditional failure relative to the other fine-tunes: some
fine-tune's retention above another's by at least `min_gap`, their intervals not overlapping
(inconclusive when the gap is there but the intervals overlap). Sign-conflict rules apply only
to methods that elect signs (ties, dare_ties, breadcrumbs_ties, della); for others they are
reported "not applicable".

A rule whose evidence is missing from the report (no baseline run, no merge stats, no
compatibility report) FAILS: a release gate must not pass on absent evidence.

    python -m mergeline.evaluation.policy configs/gate_policy.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergeline.evaluation.metrics import INTERFERENCE_GAP
from mergeline.evaluation.smoke import SmokeRule
from mergeline.evaluation.stats import DEFAULT_CONFIDENCE
from mergeline.merge.config_files import explain, read_yaml_mapping


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetentionRule(_Strict):
    min_per_task: Optional[float | dict[str, float]] = None
    min_mean: Optional[float] = Field(None, ge=0)


class RegressionRule(_Strict):
    max_drop_per_task: Optional[float | dict[str, float]] = None


class SignConflictRule(_Strict):
    max_dropped_fraction_per_model: Optional[float] = Field(None, ge=0, le=1)
    max_conflict_rate: Optional[float] = Field(None, ge=0, le=1)


class InterferenceRule(_Strict):
    fail_on_flag: bool = False
    min_gap: float = Field(INTERFERENCE_GAP, gt=0, le=1)


class CompatibilityRule(_Strict):
    must_pass: bool = False
    allow_warn: bool = True


class BaselineRule(_Strict):
    must_beat: Optional[str | list[str]] = None
    margin: float = 0.0


class GatePolicy(_Strict):
    schema_version: int = 1
    name: str = "policy"
    candidate: Optional[str] = None
    confidence: Optional[float] = Field(DEFAULT_CONFIDENCE, gt=0, lt=1)   # None: point estimates
    retention: RetentionRule = Field(default_factory=RetentionRule)
    regression: RegressionRule = Field(default_factory=RegressionRule)
    sign_conflict: SignConflictRule = Field(default_factory=SignConflictRule)
    interference: InterferenceRule = Field(default_factory=InterferenceRule)
    compatibility: CompatibilityRule = Field(default_factory=CompatibilityRule)
    baseline: BaselineRule = Field(default_factory=BaselineRule)
    smoke: Optional[SmokeRule] = Field(default_factory=SmokeRule)

    @field_validator("confidence", mode="before")
    @classmethod
    def _none(cls, v):
        # YAML `none` is a string (YAML's null is `null` or `~`): both mean "point estimates".
        return None if isinstance(v, str) and v.strip().lower() == "none" else v


def load_policy(path: str | Path | dict) -> GatePolicy:
    if isinstance(path, dict):
        data, where = path, "<dict>"
    else:
        where = str(path)
        data = read_yaml_mapping(path, "gate policy", PolicyError)
    if data.get("schema_version", 1) != 1:
        raise PolicyError(f"{where}: schema_version {data['schema_version']!r} is not supported (expected 1)")
    try:
        return GatePolicy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(f"{where}: {explain(e)}") from None


if __name__ == "__main__":
    print(load_policy(sys.argv[1]).model_dump_json(indent=2))
