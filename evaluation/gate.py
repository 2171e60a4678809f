"""GO / NO-GO from a report and a gate policy, with every reason.

    decide(report: dict, policy: GatePolicy | dict | Path) -> Decision

`Decision.go` is True only when every rule the policy sets passes. `Decision.checks` lists every
rule evaluated (passing and failing, one line each); `Decision.reasons` holds the failing ones,
`Decision.passed` the passing ones. A report missing the evidence a rule needs fails that rule.

    mergeline gate runs/report.json --policy configs/gate_policy.yaml   # exit 0 GO, 1 NO-GO, 2 bad input
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evaluation.policy import GatePolicy, load_policy

REPORT_SCHEMA_VERSION = 1


class ReportError(ValueError):
    """A report that cannot be judged (missing, not JSON, wrong schema)."""


@dataclass
class Check:
    rule: str
    passed: bool
    message: str


@dataclass
class Decision:
    go: bool
    candidate: str
    policy: str
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.rule}: {c.message}" for c in self.checks if not c.passed]

    @property
    def passed(self) -> list[str]:
        return [f"{c.rule}: {c.message}" for c in self.checks if c.passed]

    def to_dict(self) -> dict:
        return {"go": self.go, "verdict": "GO" if self.go else "NO-GO", "candidate": self.candidate,
                "policy": self.policy, "reasons": self.reasons, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks]}

    def text(self) -> str:
        lines = [f"{'GO' if self.go else 'NO-GO'} for candidate {self.candidate!r} under policy {self.policy!r}"]
        lines += [f"  {'PASS' if c.passed else 'FAIL'}  {c.rule}: {c.message}" for c in self.checks]
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
    for key in ("primary", "candidates"):
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
    cand = report["candidates"][name]
    checks: list[Check] = []
    checks += _retention(cand, policy)
    checks += _regression(cand, policy)
    checks += _sign_conflict(cand, policy)
    checks += _interference(cand, policy)
    checks += _compatibility(report.get("compat"), policy)
    checks += _baseline(report, name, policy)
    return Decision(go=all(c.passed for c in checks), candidate=name, policy=policy.name, checks=checks)


def _threshold(value: float | dict[str, float] | None, task: str) -> float | None:
    return value.get(task) if isinstance(value, dict) else value


def _retention(cand: dict, p: GatePolicy) -> list[Check]:
    out, rule = [], p.retention
    rows = {r["task"]: r for r in cand.get("retention", [])}
    if rule.min_per_task is not None:
        tasks = list(rule.min_per_task) if isinstance(rule.min_per_task, dict) else list(rows)
        for task in tasks:
            lo, r = _threshold(rule.min_per_task, task), rows.get(task)
            if r is None:
                out.append(Check(f"retention[{task}]", False, "no retention score in the report"))
            elif r.get("retention") is None:
                out.append(Check(f"retention[{task}]", False, "retention undefined (fine-tune scored 0 on its own task)"))
            else:
                ok = r["retention"] >= lo
                out.append(Check(f"retention[{task}]", ok, f"{r['retention']:.3f} {'>=' if ok else '<'} {lo} "
                                 f"(merged {r['merged_score']:.3f} vs {r['finetune']} {r['finetune_score']:.3f})"))
    if rule.min_mean is not None:
        m = cand.get("summary", {}).get("mean_retention")
        ok = m is not None and m >= rule.min_mean
        out.append(Check("retention.mean", ok, "no retention in the report" if m is None
                         else f"{m:.3f} {'>=' if ok else '<'} {rule.min_mean}"))
    return out


def _regression(cand: dict, p: GatePolicy) -> list[Check]:
    rule, out = p.regression, []
    if rule.max_drop_per_task is None:
        return out
    rows = {r["task"]: r for r in cand.get("regression", [])}
    tasks = list(rule.max_drop_per_task) if isinstance(rule.max_drop_per_task, dict) else list(rows)
    if not tasks:
        out.append(Check("regression", False, "no general task in the report"))
    for task in tasks:
        hi, r = _threshold(rule.max_drop_per_task, task), rows.get(task)
        if r is None:
            out.append(Check(f"regression[{task}]", False, "no regression score in the report"))
            continue
        ok = r["delta"] >= -hi
        out.append(Check(f"regression[{task}]", ok, f"merged - base = {r['delta']:+.3f} "
                         f"({'within' if ok else 'beyond'} the allowed drop {hi}; base {r['base_score']:.3f})"))
    return out


def _sign_conflict(cand: dict, p: GatePolicy) -> list[Check]:
    rule, out = p.sign_conflict, []
    sc = cand.get("sign_conflict") or {}
    if rule.max_dropped_fraction_per_model is not None:
        hi = rule.max_dropped_fraction_per_model
        if not sc.get("available") or not sc.get("per_model"):
            out.append(Check("sign_conflict.dropped_fraction", False, "no merge statistics in the report"))
        for model, v in (sc.get("per_model") or {}).items():
            f = v.get("dropped_fraction_of_kept")
            if f is None:
                out.append(Check(f"sign_conflict.dropped_fraction[{model}]", False, "not reported by the merge"))
            else:
                ok = f <= hi
                out.append(Check(f"sign_conflict.dropped_fraction[{model}]", ok,
                                 f"{f:.3f} of its kept deltas dropped by sign election {'<=' if ok else '>'} {hi}"))
    if rule.max_conflict_rate is not None:
        rate = sc.get("rate")
        ok = rate is not None and rate <= rule.max_conflict_rate
        out.append(Check("sign_conflict.rate", ok, "no sign-conflict rate in the report" if rate is None
                         else f"{rate:.3f} {'<=' if ok else '>'} {rule.max_conflict_rate}"))
    return out


def _interference(cand: dict, p: GatePolicy) -> list[Check]:
    if not p.interference.fail_on_flag:
        return []
    inter = cand.get("interference") or {}
    if "flag" not in inter:
        return [Check("interference", False, "no interference analysis in the report")]
    if inter["flag"]:
        return [Check("interference", False, f"keeps {inter.get('kept')} but loses {inter.get('lost')}")]
    return [Check("interference", True, "no fine-tune kept while another is lost")]


def _compatibility(compat: dict | None, p: GatePolicy) -> list[Check]:
    if not p.compatibility.must_pass:
        return []
    if not compat or "status" not in compat:
        return [Check("compatibility", False, "no compatibility report")]
    status = compat["status"]
    ok = status == "pass" or (status == "warn" and p.compatibility.allow_warn)
    failed = [c["name"] for c in compat.get("checks", []) if c.get("status") == "fail" and not c.get("waived")]
    msg = f"status {status!r}" + (f", failed checks: {failed}" if failed else "")
    return [Check("compatibility", ok, msg)]


def _baseline(report: dict, name: str, p: GatePolicy) -> list[Check]:
    rule = p.baseline
    if rule.must_beat is None:
        return []
    out, mine = [], report["candidates"][name].get("summary", {}).get("mean_retention")
    for b in [rule.must_beat] if isinstance(rule.must_beat, str) else rule.must_beat:
        other = report["candidates"].get(b, {}).get("summary", {}).get("mean_retention")
        if b not in report["candidates"] or other is None or mine is None:
            out.append(Check(f"baseline[{b}]", False, f"baseline {b!r} was not evaluated in this report"))
            continue
        diff = mine - other
        ok = not math.isnan(diff) and diff >= rule.margin
        out.append(Check(f"baseline[{b}]", ok, f"mean retention {mine:.3f} vs {other:.3f}: difference {diff:+.3f} "
                         f"{'>=' if ok else '<'} margin {rule.margin}"))
    return out


if __name__ == "__main__":
    d = decide(load_report(sys.argv[1]), sys.argv[2])
    print(d.text())
    sys.exit(0 if d.go else 1)
