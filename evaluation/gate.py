"""GO / NO-GO / INCONCLUSIVE from a report and a gate policy, with every reason.

    decide(report: dict, policy: GatePolicy | dict | Path) -> Decision

Each rule is judged on the interval the report gives for its number, at the policy's
`confidence` (per rule, see evaluation/policy.py): a rule "value >= threshold" passes when the
interval's lower bound is >= the threshold, fails when its upper bound is below it, and is
inconclusive otherwise; an inconclusive rule says how many items per task would settle it at
the observed effect (`stats.items_needed`). With `confidence: none` the point estimates decide,
as before intervals existed: every rule passes or fails.

The verdict: NO-GO when any rule fails, INCONCLUSIVE when none fails and some are
inconclusive, GO when every rule passes (a rule that does not apply, such as a sign-conflict
rule on a method that elects no signs, is reported as `not_applicable` and counts for neither).
`Decision.exit_code` is 0 (GO), 1 (NO-GO) or 3 (INCONCLUSIVE); `Decision.go` is True only for GO.
A report missing the evidence a rule needs fails that rule.

    mergeline gate runs/report.json --policy configs/gate_policy.yaml
    # exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE, 2 unusable input
    python -m mergeline.evaluation.gate runs/report.json configs/gate_policy.yaml
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergeline.evaluation import stats
from mergeline.evaluation.metrics import interference_pattern
from mergeline.evaluation.policy import GatePolicy, load_policy

REPORT_SCHEMA_VERSION = 2
PASS, FAIL, INCONCLUSIVE, NOT_APPLICABLE = "pass", "fail", "inconclusive", "not_applicable"
GO, NO_GO, UNSETTLED = "GO", "NO-GO", "INCONCLUSIVE"
EXIT_CODES = {GO: 0, NO_GO: 1, UNSETTLED: 3}
_LABELS = {PASS: "PASS", FAIL: "FAIL", INCONCLUSIVE: "INCONCLUSIVE", NOT_APPLICABLE: "N/A"}


class ReportError(ValueError):
    """A report that cannot be judged (missing, not JSON, wrong schema)."""


@dataclass
class Check:
    rule: str
    status: str          # pass | fail | inconclusive | not_applicable
    message: str
    interval: dict | None = None        # stats.Interval.model_dump() of the number judged
    threshold: float | None = None
    items_needed: int | None = None     # items per task that would settle an inconclusive rule

    @property
    def passed(self) -> bool:
        return self.status == PASS


@dataclass
class Decision:
    candidate: str
    policy: str
    confidence: float | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        statuses = {c.status for c in self.checks}
        return NO_GO if FAIL in statuses else UNSETTLED if INCONCLUSIVE in statuses else GO

    @property
    def go(self) -> bool:
        return self.verdict == GO

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

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

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "go": self.go, "exit_code": self.exit_code, "candidate": self.candidate,
                "policy": self.policy, "confidence": self.confidence,
                # `passed` per check is kept for renderers written against schema 1.
                "checks": [{**asdict(c), "passed": c.passed} for c in self.checks],
                "reasons": self.reasons, "passed": self.passed, "inconclusive": self.inconclusive}

    def text(self) -> str:
        at = f"at confidence {self.confidence}" if self.confidence is not None else "on point estimates"
        lines = [f"{self.verdict} for candidate {self.candidate!r} under policy {self.policy!r} ({at})"]
        lines += [f"  {_LABELS[c.status]}  {c.rule}: {c.message}" for c in self.checks]
        if not self.checks:
            lines.append("  (the policy sets no rules)")
        return "\n".join(lines)


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: report not found")
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from e
    validate_report(report, str(path))
    return report


def validate_report(report: dict, where: str = "<report>") -> None:
    if not isinstance(report, dict):
        raise ReportError(f"{where}: a report must be a JSON object")
    if report.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise ReportError(f"{where}: schema_version {report.get('schema_version')!r} is not supported "
                          f"(expected {REPORT_SCHEMA_VERSION})")
    for key in ("primary", "candidates", "confidence"):
        if key not in report:
            raise ReportError(f"{where}: key {key!r} is missing")
    if not isinstance(report["candidates"], dict) or not report["candidates"]:
        raise ReportError(f"{where}: 'candidates' holds no candidate")


def decide(report: dict, policy: GatePolicy | dict | str | Path) -> Decision:
    if not isinstance(policy, GatePolicy):
        policy = load_policy(policy)
    validate_report(report)
    name = policy.candidate or report["primary"]
    if name not in report["candidates"]:
        raise ReportError(f"policy.candidate: {name!r} is not in the report (has {sorted(report['candidates'])})")
    conf = policy.confidence
    if conf is not None and not math.isclose(report.get("confidence") or 0, conf):
        raise ReportError(f"the report's intervals are at confidence {report.get('confidence')}, the policy asks "
                          f"for {conf}: rebuild the report with confidence={conf} (or set the policy's confidence)")
    cand = report["candidates"][name]
    checks: list[Check] = []
    checks += _retention(cand, policy)
    checks += _regression(cand, policy)
    checks += _sign_conflict(cand, policy)
    checks += _interference(cand, policy)
    checks += _compatibility(report.get("compat"), policy)
    checks += _baseline(report, name, policy)
    return Decision(candidate=name, policy=policy.name, confidence=conf, checks=checks)


def judge(rule: str, value: float | None, interval: dict | None, threshold: float, confidence: float | None,
          what: str, tasks: int = 1) -> Check:
    """The rule "value >= threshold": on the interval at `confidence`, or on the point when None.
    `tasks`: how many tasks the interval pools (items_needed is per task)."""
    if value is None:
        return Check(rule, FAIL, f"{what}: undefined in the report", interval, threshold)
    iv = stats.Interval(**interval) if interval else None
    shown = iv.text() if iv is not None and iv.estimate is not None and confidence is not None else f"{value:.3f}"
    if confidence is None:
        ok = value >= threshold
        return Check(rule, PASS if ok else FAIL, f"{what} {shown} {'>=' if ok else '<'} {threshold}",
                     interval, threshold)
    if iv is None or iv.low is None or iv.high is None:
        return Check(rule, INCONCLUSIVE, f"{what} {shown}: no interval in the report (no per-item results)",
                     interval, threshold)
    if iv.low >= threshold:
        return Check(rule, PASS, f"{what} {shown}: lower bound >= {threshold}", interval, threshold)
    if iv.high < threshold:
        return Check(rule, FAIL, f"{what} {shown}: upper bound < {threshold}", interval, threshold)
    needed = _items_needed(iv, threshold, tasks)
    more = f"; about {needed} items per task would settle it at this effect" if needed else \
        "; the estimate sits on the threshold: no number of items settles it"
    return Check(rule, INCONCLUSIVE, f"{what} {shown} straddles {threshold}{more}", interval, threshold, needed)


def _items_needed(iv: stats.Interval, threshold: float, tasks: int) -> int | None:
    """From the interval's reach on n items toward the threshold, the per-item spread it implies
    (sd = reach * sqrt(n) / z; the side toward the threshold, since exact intervals are not
    symmetric), then the items at which that side would clear the threshold at the observed
    effect (stats.items_needed), divided among the pooled tasks."""
    from scipy.stats import norm

    if iv.low is None or iv.high is None or iv.n <= 0 or iv.estimate is None:
        return None
    reach = iv.high - iv.estimate if iv.estimate < threshold else iv.estimate - iv.low
    z = float(norm.ppf(1 - (1 - iv.confidence) / 2))
    total = stats.items_needed(reach * math.sqrt(iv.n) / z, abs(iv.estimate - threshold), iv.confidence)
    return None if total is None else math.ceil(total / max(tasks, 1))


def _threshold(value: float | dict[str, float] | None, task: str) -> float | None:
    return value.get(task) if isinstance(value, dict) else value


def _retention(cand: dict, p: GatePolicy) -> list[Check]:
    out, rule = [], p.retention
    rows: dict[str, list[dict]] = {}
    for r in cand.get("retention", []):
        rows.setdefault(r["task"], []).append(r)
    if rule.min_per_task is not None:
        tasks = list(rule.min_per_task) if isinstance(rule.min_per_task, dict) else list(rows)
        for task in tasks:
            lo = _threshold(rule.min_per_task, task)
            if task not in rows:
                out.append(Check(f"retention[{task}]", FAIL, "no retention score in the report", threshold=lo))
            for r in rows.get(task, []):
                # Two fine-tunes of one task: one rule each, named by the fine-tune too.
                name = f"retention[{task}]" if len(rows[task]) == 1 else f"retention[{task}, {r['finetune']}]"
                if r.get("retention") is None:
                    out.append(Check(name, FAIL, "retention undefined (fine-tune scored 0 on its own task)",
                                     threshold=lo))
                    continue
                c = judge(name, r["retention"], r.get("retention_interval"), lo, p.confidence, "retention")
                c.message += f" (merged {r['merged_score']:.3f} vs {r['finetune']} {r['finetune_score']:.3f})"
                out.append(c)
    if rule.min_mean is not None:
        s = cand.get("summary", {})
        tasks = len({r["task"] for r in cand.get("retention", [])})
        out.append(judge("retention.mean", s.get("mean_retention"), s.get("mean_retention_interval"),
                         rule.min_mean, p.confidence, "mean retention", tasks))
    return out


def _regression(cand: dict, p: GatePolicy) -> list[Check]:
    rule, out = p.regression, []
    if rule.max_drop_per_task is None:
        return out
    rows = {r["task"]: r for r in cand.get("regression", [])}
    tasks = list(rule.max_drop_per_task) if isinstance(rule.max_drop_per_task, dict) else list(rows)
    if not tasks:
        out.append(Check("regression", FAIL, "no general task in the report"))
    for task in tasks:
        hi, r = _threshold(rule.max_drop_per_task, task), rows.get(task)
        if r is None:
            out.append(Check(f"regression[{task}]", FAIL, "no regression score in the report", threshold=-hi))
            continue
        c = judge(f"regression[{task}]", r["delta"], r.get("delta_interval"), -hi, p.confidence, "merged - base")
        c.message += f" (allowed drop {hi}; base {r['base_score']:.3f})"
        out.append(c)
    return out


def _sign_conflict(cand: dict, p: GatePolicy) -> list[Check]:
    """Counts from the merge itself, not samples: judged on the point values. Only a method that
    elects signs has them; for any other the rules do not apply."""
    rule, out = p.sign_conflict, []
    if rule.max_dropped_fraction_per_model is None and rule.max_conflict_rate is None:
        return out
    sc = cand.get("sign_conflict") or {}
    if sc.get("available") and sc.get("elects_signs") is False:
        return [Check("sign_conflict", NOT_APPLICABLE, f"method {sc.get('method')!r} elects no signs")]
    if rule.max_dropped_fraction_per_model is not None:
        hi = rule.max_dropped_fraction_per_model
        if not sc.get("available") or not sc.get("per_model"):
            out.append(Check("sign_conflict.dropped_fraction", FAIL, "no merge statistics in the report", threshold=hi))
        for model, v in (sc.get("per_model") or {}).items():
            f = v.get("dropped_fraction_of_kept")
            if f is None:
                out.append(Check(f"sign_conflict.dropped_fraction[{model}]", FAIL, "not reported by the merge",
                                 threshold=hi))
            else:
                ok = f <= hi
                out.append(Check(f"sign_conflict.dropped_fraction[{model}]", PASS if ok else FAIL,
                                 f"{f:.3f} of its kept deltas dropped by sign election {'<=' if ok else '>'} {hi}",
                                 threshold=hi))
    if rule.max_conflict_rate is not None:
        rate = sc.get("rate")
        ok = rate is not None and rate <= rule.max_conflict_rate
        out.append(Check("sign_conflict.rate", PASS if ok else FAIL,
                         "no sign-conflict rate in the report" if rate is None
                         else f"{rate:.3f} {'<=' if ok else '>'} {rule.max_conflict_rate}",
                         threshold=rule.max_conflict_rate))
    return out


def _interference(cand: dict, p: GatePolicy) -> list[Check]:
    """The pattern flag, re-read at the policy's gap (and on points under `confidence: none`)."""
    if not p.interference.fail_on_flag:
        return []
    per_model = (cand.get("interference") or {}).get("per_model")
    if not per_model:
        return [Check("interference", FAIL, "no interference analysis in the report")]
    pat = interference_pattern(per_model, p.interference.min_gap, use_intervals=p.confidence is not None)
    status = FAIL if pat["flag"] else INCONCLUSIVE if pat["suspected"] else PASS
    return [Check("interference", status, pat["explanation"], threshold=p.interference.min_gap)]


def _compatibility(compat: dict | None, p: GatePolicy) -> list[Check]:
    if not p.compatibility.must_pass:
        return []
    if not compat or "status" not in compat:
        return [Check("compatibility", FAIL, "no compatibility report")]
    status = compat["status"]
    ok = status == "pass" or (status == "warn" and p.compatibility.allow_warn)
    failed = [c["name"] for c in compat.get("checks", []) if c.get("status") == "fail" and not c.get("waived")]
    msg = f"status {status!r}" + (f", failed checks: {failed}" if failed else "")
    return [Check("compatibility", PASS if ok else FAIL, msg)]


def _baseline(report: dict, name: str, p: GatePolicy) -> list[Check]:
    rule = p.baseline
    if rule.must_beat is None:
        return []
    out, mine = [], report["candidates"][name].get("summary", {}).get("mean_retention")
    comparisons = {(c.get("primary"), c.get("baseline")): c
                   for c in (report.get("baselines") or {}).get("comparisons", [])}
    tasks = len({r["task"] for r in report["candidates"][name].get("retention", [])})
    for b in [rule.must_beat] if isinstance(rule.must_beat, str) else rule.must_beat:
        other = report["candidates"].get(b, {}).get("summary", {}).get("mean_retention")
        if b not in report["candidates"] or other is None or mine is None:
            out.append(Check(f"baseline[{b}]", FAIL, f"baseline {b!r} was not evaluated in this report",
                             threshold=rule.margin))
            continue
        # Against itself the difference is exactly 0; else the report's paired interval (made for
        # its primary candidate: another candidate has none, and is inconclusive under intervals).
        if b == name:
            iv = stats.Interval(estimate=0.0, low=0.0, high=0.0, confidence=report["confidence"],
                                method="identical", n=0).model_dump()
        else:
            iv = (comparisons.get((name, b)) or {}).get("difference_interval")
        c = judge(f"baseline[{b}]", mine - other, iv, rule.margin, p.confidence,
                  f"mean retention {mine:.3f} vs {other:.3f}: difference", tasks)
        c.message += f" (margin {rule.margin})"
        out.append(c)
    return out


if __name__ == "__main__":
    d = decide(load_report(sys.argv[1]), sys.argv[2])
    print(d.text())
    sys.exit(d.exit_code)
