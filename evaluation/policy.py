"""The gate policy: what a merge must show before it may ship. Every rule is optional.

    schema_version: 1
    candidate: ties                 # which candidate the gate judges (default: the report's primary)
    retention:
      min_per_task: 0.8             # a number for every task, or {task: number}
      min_mean: 0.85
    regression:
      max_drop_per_task: 0.05       # merged - base must be >= -0.05 on every general task
    sign_conflict:
      max_dropped_fraction_per_model: 0.5
    interference:
      fail_on_flag: true            # NO-GO when one skill is kept and another lost
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

A rule whose evidence is missing from the report (no baseline run, no merge stats, no
compatibility report) FAILS: a release gate must not pass on absent evidence.

    python -m evaluation.policy configs/gate_policy.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evaluation.smoke import SmokeRule
from merge.config_files import explain, read_yaml_mapping


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
    retention: RetentionRule = Field(default_factory=RetentionRule)
    regression: RegressionRule = Field(default_factory=RegressionRule)
    sign_conflict: SignConflictRule = Field(default_factory=SignConflictRule)
    interference: InterferenceRule = Field(default_factory=InterferenceRule)
    compatibility: CompatibilityRule = Field(default_factory=CompatibilityRule)
    baseline: BaselineRule = Field(default_factory=BaselineRule)
    smoke: Optional[SmokeRule] = Field(default_factory=SmokeRule)


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
