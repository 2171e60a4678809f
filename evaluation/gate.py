"""GO / NO-GO / INCONCLUSIVE from a report and a gate policy, with every reason.

    decide(report: EvaluationReport, policy: GatePolicy | dict | Path) -> Decision   (evaluation/schema.py)

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
The report is typed: evidence it lacks is a typed absence with its reason (no merge
statistics, no compatibility report, a baseline not evaluated), and a rule that needs it fails
with that reason: a release gate must not pass on absent evidence.

    mergeline gate runs/x/report/report.json --policy configs/gate_policy.yaml
    # exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE, 2 unusable input
    python -m mergeline.evaluation.gate runs/x/report/report.json configs/gate_policy.yaml
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from mergeline.evaluation import stats
from mergeline.evaluation.metrics import interference_pattern
from mergeline.evaluation.policy import GatePolicy, load_policy
from mergeline.evaluation.schema import (  # noqa: F401  (re-exported: callers import them from here)
    EXIT_CODES, FAIL, GO, INCONCLUSIVE, NO_GO, NOT_APPLICABLE, PASS, REPORT_SCHEMA_VERSION, UNSETTLED, Candidate,
    Check, CompatSummary, Decision, EvaluationReport, Missing, NotApplicable, ReportError, absent, load_report,
)


def decide(report: EvaluationReport, policy: GatePolicy | dict | str | Path) -> Decision:
    if not isinstance(policy, GatePolicy):
        policy = load_policy(policy)
    name = policy.candidate or report.primary
    if name not in report.candidates:
        raise ReportError(f"policy.candidate: {name!r} is not in the report (has {sorted(report.candidates)})")
    conf = policy.confidence
    if conf is not None and not math.isclose(report.confidence, conf):
        raise ReportError(f"the report's intervals are at confidence {report.confidence}, the policy asks "
                          f"for {conf}: rebuild the report with confidence={conf} (or set the policy's confidence)")
    cand = report.candidates[name]
    checks: list[Check] = []
    checks += _retention(cand, policy)
    checks += _regression(cand, policy)
    checks += _sign_conflict(cand, policy)
    checks += _interference(cand, policy)
    checks += _compatibility(report.compat, policy)
    checks += _baseline(report, name, policy)
    return Decision.of(candidate=name, policy=policy.name, confidence=conf, checks=checks)


def judge(rule: str, value: float | None, interval: stats.Interval | None, threshold: float,
          confidence: float | None, what: str, tasks: int = 1) -> Check:
    """The rule "value >= threshold": on the interval at `confidence`, or on the point when None.
    `tasks`: how many tasks the interval pools (items_needed is per task)."""
    if value is None:
        return Check(rule=rule, status=FAIL, message=f"{what}: undefined in the report", interval=interval,
                     threshold=threshold)
    iv = interval
    shown = iv.text() if iv is not None and iv.estimate is not None and confidence is not None else f"{value:.3f}"

    def check(status: str, message: str, needed: int | None = None) -> Check:
        return Check(rule=rule, status=status, message=message, interval=iv, threshold=threshold,
                     items_needed=needed)

    if confidence is None:
        ok = value >= threshold
        return check(PASS if ok else FAIL, f"{what} {shown} {'>=' if ok else '<'} {threshold}")
    if iv is None or iv.low is None or iv.high is None:
        return check(INCONCLUSIVE, f"{what} {shown}: no interval in the report (no per-item results)")
    if iv.low >= threshold:
        return check(PASS, f"{what} {shown}: lower bound >= {threshold}")
    if iv.high < threshold:
        return check(FAIL, f"{what} {shown}: upper bound < {threshold}")
    needed = _items_needed(iv, threshold, tasks)
    more = f"; about {needed} items per task would settle it at this effect" if needed else \
        "; the estimate sits on the threshold: no number of items settles it"
    return check(INCONCLUSIVE, f"{what} {shown} straddles {threshold}{more}", needed)


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
    """A rule's threshold for `task`: one number for every task, or the task's own (the tasks
    judged are then the dict's keys)."""
    return value[task] if isinstance(value, dict) else value




def _retention(cand: Candidate, p: GatePolicy) -> list[Check]:
    out, rule = [], p.retention
    rows: dict[str, list] = {}
    for r in cand.retention:
        rows.setdefault(r.task, []).append(r)
    if rule.min_per_task is not None:
        tasks = list(rule.min_per_task) if isinstance(rule.min_per_task, dict) else list(rows)
        for task in tasks:
            lo = _threshold(rule.min_per_task, task)
            if task not in rows:
                out.append(Check(rule=f"retention[{task}]", status=FAIL, message="no retention score in the report",
                                 threshold=lo))
                continue
            for r in rows[task]:
                # Two fine-tunes of one task: one rule each, named by the fine-tune too.
                name = f"retention[{task}]" if len(rows[task]) == 1 else f"retention[{task}, {r.finetune}]"
                if r.retention is None:
                    out.append(Check(rule=name, status=FAIL, threshold=lo,
                                     message="retention undefined (fine-tune scored 0 on its own task)"))
                    continue
                c = judge(name, r.retention, r.retention_interval, lo, p.confidence, "retention")
                c.message += f" (merged {r.merged_score:.3f} vs {r.finetune} {r.finetune_score:.3f})"
                out.append(c)
    if rule.min_mean is not None:
        s = cand.summary
        out.append(judge("retention.mean", s.mean_retention, s.mean_retention_interval, rule.min_mean,
                         p.confidence, "mean retention", len(rows)))
    return out


def _regression(cand: Candidate, p: GatePolicy) -> list[Check]:
    rule, out = p.regression, []
    if rule.max_drop_per_task is None:
        return out
    rows = {r.task: r for r in cand.regression}
    tasks = list(rule.max_drop_per_task) if isinstance(rule.max_drop_per_task, dict) else list(rows)
    if not tasks:
        out.append(Check(rule="regression", status=FAIL, message="no general task in the report"))
    for task in tasks:
        hi = _threshold(rule.max_drop_per_task, task)
        if task not in rows:
            out.append(Check(rule=f"regression[{task}]", status=FAIL, message="no regression score in the report",
                             threshold=-hi))
            continue
        r = rows[task]
        c = judge(f"regression[{task}]", r.delta, r.delta_interval, -hi, p.confidence, "merged - base")
        c.message += f" (allowed drop {hi}; base {r.base_score:.3f})"
        out.append(c)
    return out


def _sign_conflict(cand: Candidate, p: GatePolicy) -> list[Check]:
    """Counts from the merge itself, not samples: judged on the point values. Only a method that
    elects signs has them; for any other the rules do not apply. No merge statistics: each rule
    fails, saying so."""
    rule, out = p.sign_conflict, []
    if rule.max_dropped_fraction_per_model is None and rule.max_conflict_rate is None:
        return out
    sc = cand.sign_conflict
    if isinstance(sc, NotApplicable):
        return [Check(rule="sign_conflict", status=NOT_APPLICABLE, message=sc.not_applicable)]
    if rule.max_dropped_fraction_per_model is not None:
        hi = rule.max_dropped_fraction_per_model
        if isinstance(sc, Missing) or not sc.per_model:
            why = sc.missing if isinstance(sc, Missing) else "the merge statistics name no model"
            out.append(Check(rule="sign_conflict.dropped_fraction", status=FAIL, message=why, threshold=hi))
        else:
            for model, v in sc.per_model.items():
                name, f = f"sign_conflict.dropped_fraction[{model}]", v.dropped_fraction_of_kept
                if f is None:
                    out.append(Check(rule=name, status=FAIL, message="not reported by the merge", threshold=hi))
                    continue
                ok = f <= hi
                out.append(Check(rule=name, status=PASS if ok else FAIL, threshold=hi,
                                 message=f"{f:.3f} of its kept deltas dropped by sign election "
                                         f"{'<=' if ok else '>'} {hi}"))
    if rule.max_conflict_rate is not None:
        hi = rule.max_conflict_rate
        if isinstance(sc, Missing) or sc.rate is None:
            why = sc.missing if isinstance(sc, Missing) else "no sign-conflict rate in the merge statistics"
            out.append(Check(rule="sign_conflict.rate", status=FAIL, message=why, threshold=hi))
        else:
            ok = sc.rate <= hi
            out.append(Check(rule="sign_conflict.rate", status=PASS if ok else FAIL, threshold=hi,
                             message=f"{sc.rate:.3f} {'<=' if ok else '>'} {hi}"))
    return out


def _interference(cand: Candidate, p: GatePolicy) -> list[Check]:
    """The pattern flag, re-read at the policy's gap (and on points under `confidence: none`)."""
    if not p.interference.fail_on_flag:
        return []
    per_model = cand.interference.per_model
    if not per_model:
        return [Check(rule="interference", status=FAIL, message="no fine-tune retention to compare in the report")]
    pat = interference_pattern([m.model_dump() for m in per_model], p.interference.min_gap,
                               use_intervals=p.confidence is not None)
    status = FAIL if pat["flag"] else INCONCLUSIVE if pat["suspected"] else PASS
    return [Check(rule="interference", status=status, message=pat["explanation"], threshold=p.interference.min_gap)]


def _compatibility(compat: CompatSummary | Missing | NotApplicable, p: GatePolicy) -> list[Check]:
    if not p.compatibility.must_pass:
        return []
    if not isinstance(compat, CompatSummary):
        return [Check(rule="compatibility", status=FAIL, message=absent(compat))]
    ok = compat.status == "pass" or (compat.status == "warn" and p.compatibility.allow_warn)
    failed = [c.name for c in compat.checks if c.status == "fail" and not c.waived]
    msg = f"status {compat.status!r}" + (f", failed checks: {failed}" if failed else "")
    return [Check(rule="compatibility", status=PASS if ok else FAIL, message=msg)]


def _baseline(report: EvaluationReport, name: str, p: GatePolicy) -> list[Check]:
    rule = p.baseline
    if rule.must_beat is None:
        return []
    out, mine = [], report.candidates[name]
    tasks = len({r.task for r in mine.retention})
    for b in [rule.must_beat] if isinstance(rule.must_beat, str) else rule.must_beat:
        rule_name = f"baseline[{b}]"
        if b not in report.candidates:
            out.append(Check(rule=rule_name, status=FAIL, message=absent(report.comparison(b, name)),
                             threshold=rule.margin))
            continue
        ours, theirs = mine.summary.mean_retention, report.candidates[b].summary.mean_retention
        if ours is None or theirs is None:
            out.append(Check(rule=rule_name, status=FAIL, threshold=rule.margin,
                             message=f"mean retention undefined for {name if ours is None else b!r}"))
            continue
        # Against itself the difference is exactly 0; else the report's paired interval (made for
        # its primary candidate: another candidate has none, and is inconclusive under intervals).
        if b == name:
            iv = stats.Interval(estimate=0.0, low=0.0, high=0.0, confidence=report.confidence,
                                method="identical", n=0)
        else:
            cmp = report.comparison(b, name)
            iv = None if isinstance(cmp, Missing) else cmp.difference_interval
        c = judge(rule_name, ours - theirs, iv, rule.margin, p.confidence,
                  f"mean retention {ours:.3f} vs {theirs:.3f}: difference", tasks)
        c.message += f" (margin {rule.margin})"
        out.append(c)
    return out


if __name__ == "__main__":
    try:
        d = decide(load_report(sys.argv[1]), sys.argv[2])
    except ReportError as e:
        print(e, file=sys.stderr)
        sys.exit(2)  # unusable input, as `mergeline gate`
    print(d.text())
    sys.exit(d.exit_code)
