"""Every stage result's type, in one place (issue #13): pydantic models that refuse unknown keys.

    CompatReport, Check as CompatCheckResult   the compatibility report (merge/compat/report.py)
    MergeResult, StatsSummary                  a merge's output, hash, statistics, waivers (merge/result.py)
    Score                                      one model on one task: primary metric with its interval
    EvaluationReport                           what evaluation.report.build_report returns (report.json)
    Decision, Check                            what evaluation.gate.decide(report, policy) returns (decision.json)
    Missing, NotApplicable                     evidence a report does not hold, with a message saying why

The report is evidence only: it holds no decision and is built without a policy. The gate reads
it through these types, so a renamed key in a report.json is a one-line error naming the key
(`load_report`), never a silent "no evidence". Evidence that is absent on purpose is a typed
value with its reason: a candidate's `sign_conflict` is `NotApplicable` for a method that elects
no signs and `Missing` without merge statistics; `compat` is `Missing` without a compatibility
report; `EvaluationReport.comparison(name)` is `Missing` for a baseline that was not evaluated.
The gate turns each into a check that says so.

report.json, schema_version 3 (changes from 2: no `decision`, which is decision.json now; a
candidate's `sign_conflict` has no `available` flag but is a typed absence instead; `compat` is
a typed absence instead of null; `interference.per_finetune` is gone (`per_model` has it)).
An interval is `evaluation.stats.Interval`: {estimate, low, high, confidence, method, n}.

    python -m mergeline.evaluation.schema runs/x/report/report.json    # validate; print what is absent
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from mergeline.evaluation.stats import Interval
from mergeline.evaluation.suite import EvalSuite
from mergeline.merge.compat.report import Check as CompatCheckResult
from mergeline.merge.compat.report import CompatReport
from mergeline.merge.config_files import explain
from mergeline.merge.result import MergeResult, StatsSummary

__all__ = ["CompatReport", "CompatCheckResult", "MergeResult", "StatsSummary", "Interval", "Missing",
           "NotApplicable", "SeedSpread", "Score", "RetentionRow", "RegressionRow", "Interference",
           "SignConflict", "Summary", "Candidate", "Comparison", "Baselines", "CompatSummary", "ModelInput",
           "Inputs", "EvaluationReport", "Check", "Decision", "ReportError", "load_report", "load_decision",
           "REPORT_SCHEMA_VERSION", "PASS", "FAIL", "INCONCLUSIVE", "NOT_APPLICABLE", "GO", "NO_GO", "UNSETTLED",
           "EXIT_CODES"]

REPORT_SCHEMA_VERSION = 3
REPORT_KIND = "mergeline.evaluation_report"
DECISION_KIND = "mergeline.decision"
PASS, FAIL, INCONCLUSIVE, NOT_APPLICABLE = "pass", "fail", "inconclusive", "not_applicable"
GO, NO_GO, UNSETTLED = "GO", "NO-GO", "INCONCLUSIVE"
EXIT_CODES = {GO: 0, NO_GO: 1, UNSETTLED: 3}
_LABELS = {PASS: "PASS", FAIL: "FAIL", INCONCLUSIVE: "INCONCLUSIVE", NOT_APPLICABLE: "N/A"}


class ReportError(ValueError):
    """A report or decision that cannot be used (missing, not JSON, wrong schema, unknown key)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- typed absence

class Missing(_Strict):
    """Evidence the report should hold and does not; `missing` says what and why."""
    missing: str


class NotApplicable(_Strict):
    """Evidence that does not exist for this case (a method that elects no signs); says why."""
    not_applicable: str


def _tag(value: Any) -> str:
    """Which member of an `X | Missing | NotApplicable` union a value is: by its one key."""
    if isinstance(value, dict):
        return "<missing>" if "missing" in value else "<n/a>" if "not_applicable" in value else "<present>"
    return {Missing: "<missing>", NotApplicable: "<n/a>"}.get(type(value), "<present>")


def _or_absent(present: type) -> Any:
    """The type `present | Missing | NotApplicable`, told apart by key so that a validation error
    names the key at fault in the present value, not three failed alternatives."""
    return Annotated[Union[Annotated[present, Tag("<present>")], Annotated[Missing, Tag("<missing>")],
                           Annotated[NotApplicable, Tag("<n/a>")]], Discriminator(_tag)]


def absent(value: Any) -> str | None:
    """The message of a typed absence, None when the value is present."""
    if isinstance(value, Missing):
        return value.missing
    if isinstance(value, NotApplicable):
        return value.not_applicable
    return None


# ---------------------------------------------------------------- scores and the four axes

class SeedSpread(_Strict):
    """A score (or ratio, difference) across merge seeds: for random methods (DARE, DELLA)."""
    seeds: list[int]
    values: list[float]
    min: float
    max: float
    std: float


class Score(_Strict):
    model: str
    role: str
    task: str
    value: float | None          # primary metric, mean over seeds
    interval: Interval
    seed_spread: SeedSpread | None = None


class RetentionRow(_Strict):
    candidate: str
    finetune: str
    task: str
    task_type: str
    finetune_score: float
    base_score: float | None
    merged_score: float
    retention: float | None      # merged / fine-tune; None when the fine-tune scored 0
    drop: float
    retention_interval: Interval | None = None
    difference_interval: Interval | None = None
    seed_spread: SeedSpread | None = None


class RegressionRow(_Strict):
    candidate: str
    task: str
    task_type: str
    base_score: float
    merged_score: float
    delta: float                 # merged - base
    delta_interval: Interval | None = None
    seed_spread: SeedSpread | None = None


class TypeBreakdown(_Strict):
    mean_retention: float | None
    tasks: int
    mean_regression: float | None = None
    general_tasks: int | None = None


class Spread(_Strict):
    min: float | None
    max: float | None
    mean: float | None
    std: float | None


class PerModel(_Strict):
    """A fine-tune's retention beside the share of its kept deltas that sign election dropped."""
    finetune: str
    retention: float | None
    retention_interval: Interval | None = None
    dropped_fraction_of_kept: float | None = None


class Pair(_Strict):
    kept: str
    lost: str
    gap: float


class Flip(_Strict):
    candidate: str
    task: str
    reference: str
    items: int
    reference_correct: int
    flips: int
    gains: int
    flip_rate: float | None


class Interference(_Strict):
    by_type: dict[str, TypeBreakdown]
    spread: Spread
    per_model: list[PerModel]
    flag: bool
    kept: list[str]
    lost: list[str]
    pairs: list[Pair]
    suspected: list[Pair]
    gap: float
    explanation: str
    flips: list[Flip]
    total_flips: int


class SignModel(_Strict):
    kept_fraction: float | None = None
    trimmed_fraction: float | None = None
    dropped_fraction_of_kept: float | None = None
    dropped_magnitude_share: float | None = None


class SignConflict(_Strict):
    """The sign-conflict proxy of a merge whose method elects signs (evaluation.metrics)."""
    method: str | None
    elects_signs: bool | None    # None: the method is not known
    rate: float | None
    per_model: dict[str, SignModel]
    per_layer: dict[str, dict[str, float | None]]
    max_dropped_fraction: float | None


class Summary(_Strict):
    mean_retention: float | None
    min_retention: float | None
    mean_retention_interval: Interval | None
    mean_regression: float | None
    mean_regression_interval: Interval | None
    worst_regression: float | None
    interference_flag: bool
    total_flips: int
    sign_conflict_rate: float | None
    max_dropped_fraction: float | None


class Candidate(_Strict):
    retention: list[RetentionRow]
    regression: list[RegressionRow]
    interference: Interference
    sign_conflict: _or_absent(SignConflict)
    summary: Summary

    @property
    def signs(self) -> SignConflict | None:
        """The sign-conflict proxy when the merge elected signs and said so; else None."""
        sc = self.sign_conflict
        return sc if isinstance(sc, SignConflict) and sc.elects_signs is not False else None


class Comparison(_Strict):
    """The primary candidate against one baseline: difference of mean retention (and regression)."""
    baseline: str
    primary: str
    primary_mean_retention: float | None
    baseline_mean_retention: float | None
    difference: float | None
    difference_interval: Interval | None = None
    regression_difference: float | None = None
    regression_difference_interval: Interval | None = None
    primary_beats: bool


class Baselines(_Strict):
    primary: str
    comparisons: list[Comparison]
    answer: str                  # "ties beats averaging (linear) on mean retention: ..."


class CompatCheck(_Strict):
    name: str
    status: str                  # pass | warn | fail | skip | waived
    message: str
    waived: bool = False


class CompatNorms(_Strict):
    per_model: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    cosine: dict[str, dict[str, float | None]] = Field(default_factory=dict)


class CompatSummary(_Strict):
    """A CompatReport in brief: status, checks, per-model norms and cosines (no per-tensor table)."""
    status: Literal["pass", "warn", "fail"]
    checks: list[CompatCheck]
    norms: CompatNorms = Field(default_factory=CompatNorms)

    @classmethod
    def of(cls, compat: CompatReport | dict) -> "CompatSummary":
        d = compat.to_dict() if isinstance(compat, CompatReport) else compat
        norms = d.get("norms") or {}  # a report of the header checks alone has no norms
        return cls(status=d["status"],
                   checks=[CompatCheck(**{k: c[k] for k in ("name", "status", "message", "waived") if k in c})
                           for c in d["checks"]],
                   norms=CompatNorms(per_model=norms.get("per_model") or {}, cosine=norms.get("cosine") or {}))


class SeedInput(_Strict):
    path: str | None = None
    content_hash: str | None = None


class ModelInput(_Strict):
    role: str
    path: str | None = None
    content_hash: str | None = None
    per_seed: dict[int, SeedInput] | None = None   # a random method merged once per seed


class Inputs(_Strict):
    models: dict[str, ModelInput]
    suite: EvalSuite
    extra: dict[str, Any] = Field(default_factory=dict)


class EvaluationReport(_Strict):
    """The evidence: every number with its interval, built without a policy (report.json)."""
    schema_version: Literal[3] = REPORT_SCHEMA_VERSION
    kind: Literal["mergeline.evaluation_report"] = REPORT_KIND
    created: str
    lm_eval_version: str
    primary: str
    confidence: float            # the confidence level of every interval in the report
    inputs: Inputs
    task_types: dict[str, str]
    scores: list[Score]
    candidates: dict[str, Candidate]
    baselines: Baselines
    compat: _or_absent(CompatSummary)
    merge_stats: dict[str, StatsSummary] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _primary_is_a_candidate(self):
        if self.primary not in self.candidates:
            raise ValueError(f"primary {self.primary!r} is not among the candidates {sorted(self.candidates)}")
        return self

    def comparison(self, baseline: str, candidate: str | None = None) -> Comparison | Missing:
        """`candidate` (default: the primary) against `baseline`, or why the report has none."""
        candidate = candidate or self.primary
        if baseline not in self.candidates:
            return Missing(missing=f"baseline {baseline!r} was not evaluated in this report "
                                   f"(candidates: {sorted(self.candidates)})")
        for c in self.baselines.comparisons:
            if c.primary == candidate and c.baseline == baseline:
                return c
        return Missing(missing=f"no paired comparison of {candidate!r} with {baseline!r} in this report "
                               f"(comparisons are made for the primary, {self.primary!r})")


# ---------------------------------------------------------------- the decision

class Check(_Strict):
    rule: str
    status: Literal["pass", "fail", "inconclusive", "not_applicable"]
    message: str
    interval: Interval | None = None     # the number judged, with its interval
    threshold: float | None = None
    items_needed: int | None = None      # items per task that would settle an inconclusive rule

    @property
    def passed(self) -> bool:
        return self.status == PASS


def verdict_of(checks: list[Check]) -> str:
    """NO-GO when any check fails, INCONCLUSIVE when none fails and some are, else GO."""
    statuses = {c.status for c in checks}
    return NO_GO if FAIL in statuses else UNSETTLED if INCONCLUSIVE in statuses else GO


class Decision(_Strict):
    """The gate's verdict on one candidate under one policy, every check with its reason."""
    kind: Literal["mergeline.decision"] = DECISION_KIND
    verdict: Literal["GO", "NO-GO", "INCONCLUSIVE"]
    exit_code: int                       # 0 GO, 1 NO-GO, 3 INCONCLUSIVE
    candidate: str
    policy: str
    confidence: float | None             # None: judged on point estimates
    checks: list[Check] = Field(default_factory=list)

    @classmethod
    def of(cls, candidate: str, policy: str, confidence: float | None, checks: list[Check]) -> "Decision":
        verdict = verdict_of(checks)
        return cls(verdict=verdict, exit_code=EXIT_CODES[verdict], candidate=candidate, policy=policy,
                   confidence=confidence, checks=checks)

    @model_validator(mode="after")
    def _verdict_follows_the_checks(self):
        # A decision.json edited to say GO beside a failed check is refused, not believed.
        if self.verdict != verdict_of(self.checks) or self.exit_code != EXIT_CODES[self.verdict]:
            raise ValueError(f"verdict {self.verdict!r} (exit code {self.exit_code}) does not follow from its "
                             f"checks ({verdict_of(self.checks)!r})")
        return self

    @property
    def go(self) -> bool:
        return self.verdict == GO

    def _lines(self, status: str) -> list[str]:
        return [f"{c.rule}: {c.message}" for c in self.checks if c.status == status]

    @property
    def reasons(self) -> list[str]:
        return self._lines(FAIL)

    @property
    def passed(self) -> list[str]:
        return self._lines(PASS)

    @property
    def inconclusive(self) -> list[str]:
        return self._lines(INCONCLUSIVE)

    def check(self, rule: str) -> Check | None:
        return next((c for c in self.checks if c.rule == rule), None)

    def text(self) -> str:
        at = f"at confidence {self.confidence}" if self.confidence is not None else "on point estimates"
        lines = [f"{self.verdict} for candidate {self.candidate!r} under policy {self.policy!r} ({at})"]
        lines += [f"  {_LABELS[c.status]}  {c.rule}: {c.message}" for c in self.checks]
        if not self.checks:
            lines.append("  (the policy sets no rules)")
        return "\n".join(lines)


# ---------------------------------------------------------------- loading

def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ReportError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None


def _validate(model: type[BaseModel], data: Any, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # The union tags (<present>, ...) are not keys: leave them out of the key named.
        raise ReportError(f"{where}: {explain(e, union_tags=('<', 'function-'))}") from None


def parse_report(data: Any, where: str = "<report>") -> EvaluationReport:
    """A report from its JSON value; ReportError naming `where` and the key at fault."""
    if not isinstance(data, dict):
        raise ReportError(f"{where}: a report must be a JSON object")
    if data.get("schema_version") != REPORT_SCHEMA_VERSION:  # checked first: one line, not one per key
        raise ReportError(f"{where}: schema_version {data.get('schema_version')!r} is not supported "
                          f"(expected {REPORT_SCHEMA_VERSION}; rebuild the report with this version)")
    return _validate(EvaluationReport, data, where)


def load_report(path: str | Path) -> EvaluationReport:
    path = Path(path)
    return parse_report(_read_json(path, "report"), str(path))


def load_decision(path: str | Path) -> Decision:
    path = Path(path)
    return _validate(Decision, _read_json(path, "decision"), str(path))


if __name__ == "__main__":
    rep = load_report(sys.argv[1])
    print(f"{sys.argv[1]}: schema v{rep.schema_version}, primary {rep.primary}, candidates {sorted(rep.candidates)}")
    for name, cand in rep.candidates.items():
        if absent(cand.sign_conflict):
            print(f"  {name}.sign_conflict: {absent(cand.sign_conflict)}")
    if absent(rep.compat):
        print(f"  compat: {absent(rep.compat)}")
