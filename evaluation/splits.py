"""Validation and test parts of an eval suite: tuning reads one part, the gate the other.

Tuning a recipe on the items that later judge it would overfit the gate's own evidence: the
search picks the weights that happen to fit those items, and the gate's interval no longer
covers what a fresh item would show. So a suite may split each task's items in two disjoint
ranges of lm-eval `doc_id`s (an item's position in the task's evaluation split), and say which
part its evaluations score:

    splits:
      validation: [0, 24]        # [start, end): items 0..23, for every task ...
      test: [24, 48]
      tasks:                     # ... unless a task has its own ranges
        zoo_addition: {validation: [0, 30], test: [30, 60]}
    part: test                   # the part this suite's evaluations score (default: test)

How: lm-eval runs the first `end` items of every task (`limit` = the largest end of the part:
lm-eval's `limit` takes the first items in doc_id order), and `restrict` keeps only the rows of
the part's range and recomputes each primary score as the mean over the kept items. This keeps
task names, the policy's per-task rules and the score cache's raw runs as they are, works for
local and built-in tasks alike, and never writes derived task YAMLs; a validation run never
computes a test item when validation comes first. Only metrics that are a plain mean of
per-item values (exact_match, acc, acc_norm) can be restricted this way; others are refused.

A suite without `splits` is unchanged: `run_limit()` is its `limit` and `restrict` returns the
table as it is.

    python -m mergeline.evaluation.splits configs/eval_suite.yaml     # print each task's ranges
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Literal, Optional

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

Part = Literal["validation", "test"]
PARTS: tuple[str, ...] = ("validation", "test")
# Primary metrics whose task score is the plain mean of the per-item values lm-eval logs.
MEAN_METRICS = ("exact_match", "acc", "acc_norm")


class Ranges(BaseModel):
    """A validation range and a test range of item indices, [start, end) each, disjoint."""
    model_config = ConfigDict(extra="forbid")

    validation: tuple[int, int]
    test: tuple[int, int]

    @model_validator(mode="after")
    def _valid(self) -> "Ranges":
        for part in PARTS:
            start, end = getattr(self, part)
            if not 0 <= start < end:
                raise ValueError(f"{part}: range [{start}, {end}) must have 0 <= start < end")
        (a, b), (c, d) = self.validation, self.test
        if a < d and c < b:
            raise ValueError(f"validation [{a}, {b}) and test [{c}, {d}) overlap: "
                             "an item used to tune must never judge the tuned recipe")
        return self

    def of(self, part: str) -> tuple[int, int]:
        return getattr(self, part)


class Splits(BaseModel):
    """Suite-wide ranges and/or per-task ranges; every task of the suite must get one."""
    model_config = ConfigDict(extra="forbid")

    validation: Optional[tuple[int, int]] = None
    test: Optional[tuple[int, int]] = None
    tasks: dict[str, Ranges] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _both_or_neither(self) -> "Splits":
        if (self.validation is None) != (self.test is None):
            raise ValueError("give both 'validation' and 'test' suite-wide ranges, or neither")
        if self.validation is not None:
            Ranges(validation=self.validation, test=self.test)  # same checks as a task's
        return self

    def ranges(self, task: str) -> Ranges | None:
        if task in self.tasks:
            return self.tasks[task]
        if self.validation is not None:
            return Ranges(validation=self.validation, test=self.test)
        return None


def check(splits: Splits, tasks: list[str]) -> None:
    """Every task gets ranges, and per-task ranges name only the suite's tasks."""
    if unknown := sorted(set(splits.tasks) - set(tasks)):
        raise ValueError(f"splits.tasks names task(s) not in the suite: {unknown}")
    if missing := [t for t in tasks if splits.ranges(t) is None]:
        raise ValueError(f"splits: no validation/test range for task(s) {missing} "
                         "(give suite-wide ranges or one per task)")


def task_ranges(suite, part: str | None = None) -> dict[str, tuple[int, int]]:
    """task -> [start, end) of `part` (default: the suite's own part); {} without splits."""
    if suite.splits is None:
        return {}
    part = part or suite.scored_part()
    return {t: suite.splits.ranges(t).of(part) for t in suite.all_tasks()}


def describe(suite) -> str:
    """One line: which items score this suite's evaluations."""
    if suite.splits is None:
        return f"no splits: every item up to limit={suite.limit} is used for everything"
    part = suite.scored_part()
    shown = ", ".join(f"{t} [{a}, {b})" for t, (a, b) in task_ranges(suite).items())
    return f"{part} items: {shown}"


def restrict(table, suite):
    """The ScoreTable with only the suite's part: per-item rows in each task's range, and each
    primary score recomputed as their mean (other metrics dropped: they were computed on every
    item lm-eval ran). Returns `table` itself when the suite declares no splits."""
    ranges = task_ranges(suite)
    if not ranges:
        return table
    samples = table.samples
    keep = pd.Series(False, index=samples.index)
    for task, (start, end) in ranges.items():
        keep |= (samples["task"] == task) & (samples["doc_id"] >= start) & (samples["doc_id"] < end)
    kept = samples[keep].reset_index(drop=True)
    scores = table.scores[table.scores["primary"].astype(bool)].copy()
    if bad := sorted(set(scores.loc[~scores["metric"].isin(MEAN_METRICS), "task"])):
        metric = scores.loc[scores["task"].isin(bad), "metric"].iloc[0]
        raise ValueError(f"splits: task(s) {bad} score with {metric!r}, not a mean of per-item values "
                         f"({', '.join(MEAN_METRICS)}); a part of their items cannot be scored alone")
    means = (kept.assign(correct=pd.to_numeric(kept["correct"], errors="coerce"))
             .groupby(["model", "task", "seed"])["correct"].agg(["mean", "size"]))
    values = []
    for row in scores.itertuples(index=False):
        key = (row.model, row.task, row.seed)
        if key not in means.index:
            start, end = ranges[row.task]
            raise ValueError(f"splits: task {row.task!r} has no items in [{start}, {end}) "
                             f"for model {row.model!r} (fewer items than the range starts at?)")
        values.append(float(means.loc[key, "mean"]))
    scores["value"] = values
    return dataclasses.replace(table, scores=scores.reset_index(drop=True), samples=kept)


def item_counts(table) -> dict[str, int]:
    """task -> items per model and seed in the table (the first model's count)."""
    s = table.samples
    if not len(s):
        return {}
    first = s[(s["model"] == s["model"].iloc[0]) & (s["seed"] == s["seed"].iloc[0])]
    return {t: int(n) for t, n in first.groupby("task").size().items()}


if __name__ == "__main__":
    from mergeline.evaluation.suite import load_suite

    s = load_suite(sys.argv[1])
    for p in PARTS:
        print(p, task_ranges(s, p) if s.splits else "(no splits)")
