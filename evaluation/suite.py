"""The eval suite: which lm-eval tasks measure which fine-tune, and which measure the base.

A suite names, for each fine-tune, the tasks it was made for (retention: does the merge keep
that skill?) and a list of general tasks (regression: did the merge break what the base could
do?), plus how to run them (limit, seeds, batch size, device) and where local task YAMLs live.

    retention:            # fine-tune name -> its own tasks
      addition: [zoo_addition]
    general: [zoo_general]
    include_paths: ["${zoo}"]   # placeholders are filled in by the caller (see `resolve`); several folders work
    limit: 50
    seeds: [0]                  # several: each score's spread across seeds is reported

Optional `splits:` (evaluation/splits.py) give every task a validation and a test range of items
(`mergeline tune` searches on validation, the gate judges test); `part:` says which one this
suite's evaluations score (default test). Without `splits` nothing changes.

    splits: {validation: [0, 24], test: [24, 48]}   # or per task: {tasks: {zoo_addition: {...}}}

Placeholders: an include path may contain `${NAME}`; `resolve(suite, {"zoo": zoo.tasks_dir})`
replaces it. `${zoo}` is the convention for the demo zoo's task folder. An environment variable
of the same name is used when the caller gives none. Relative paths resolve against the YAML's
folder (not the current folder), so a suite file can be moved with its tasks.

    python -m mergeline.evaluation.suite configs/eval_suite.yaml
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeline.evaluation.splits import Part, Splits, check as check_splits
from mergeline.merge.config_files import explain, read_yaml_mapping

TaskType = Literal["generation", "multiple_choice", "loglikelihood", "unknown"]
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file and the key."""


class EvalSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "suite"
    retention: dict[str, list[str]] = Field(
        description="fine-tune name -> the lm-eval tasks it was made for")
    general: list[str] = Field(default_factory=list, description="tasks that measure the base's abilities")
    include_paths: list[str] = Field(default_factory=list, description="folders of local task YAMLs")
    limit: Optional[int] = Field(None, ge=1, description="items per task (None: all)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    batch_size: int = Field(16, ge=1)
    device: str = "cpu"
    # Optional override of the task type used by the interference breakdown; otherwise it is
    # read from the lm-eval task config (output_type) that the runner returns.
    task_types: dict[str, TaskType] = Field(default_factory=dict)
    # Validation/test item ranges per task; None: every item is used for everything.
    splits: Optional[Splits] = None
    part: Optional[Part] = Field(None, description="the part evaluations score (default with splits: test)")

    @field_validator("retention")
    @classmethod
    def _nonempty_tasks(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v:
            raise ValueError("at least one fine-tune with its tasks is required")
        for name, tasks in v.items():
            if not tasks:
                raise ValueError(f"fine-tune {name!r} lists no tasks")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        # A seed is a run's identity (for DARE/DELLA, the merge's): twice would count it twice.
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _no_overlap(self) -> "EvalSuite":
        # A general task that is also a retention task would be scored against two references.
        overlap = set(self.general) & set(self.retention_task_names())
        if overlap:
            raise ValueError(f"tasks both in 'general' and 'retention': {sorted(overlap)}")
        if self.splits is None:
            if self.part is not None:
                raise ValueError(f"part: {self.part!r} needs 'splits' (the item ranges of each part)")
        else:
            if self.limit is not None:
                # One source of truth for which items run: the ranges.
                raise ValueError("give 'splits' or 'limit', not both: the ranges say which items run")
            check_splits(self.splits, self.all_tasks())
        return self

    def scored_part(self) -> str | None:
        """The part this suite's evaluations score: `part`, else test when splits are declared."""
        return (self.part or "test") if self.splits is not None else None

    def for_part(self, part: str) -> "EvalSuite":
        """This suite scoring `part` ("validation" or "test") of its splits."""
        if self.splits is None:
            raise SuiteError(f"suite {self.name!r} declares no splits: add e.g. "
                             "`splits: {validation: [0, 20], test: [20, 40]}`")
        return self.model_copy(update={"part": part})

    def run_limit(self) -> int | None:
        """How many items of each task lm-eval runs: `limit`, or with splits the largest end of
        the scored part (lm-eval's limit takes the first items, in doc_id order)."""
        if self.splits is None:
            return self.limit
        part = self.scored_part()
        return max(self.splits.ranges(t).of(part)[1] for t in self.all_tasks())

    def retention_task_names(self) -> list[str]:
        return [t for tasks in self.retention.values() for t in tasks]

    def all_tasks(self) -> list[str]:
        """Every task once, retention tasks first, in file order."""
        return list(dict.fromkeys(self.retention_task_names() + list(self.general)))

    def task_owner(self) -> dict[str, str]:
        """retention task -> the fine-tune it measures."""
        return {t: ft for ft, tasks in self.retention.items() for t in tasks}

    def unresolved(self) -> list[str]:
        return sorted({m for p in self.include_paths for m in _PLACEHOLDER.findall(p)})


def load_suite(path: str | Path | dict, placeholders: dict[str, str | Path] | None = None) -> EvalSuite:
    """Read and validate a suite YAML (or dict); fill placeholders when given."""
    base_dir = None
    if isinstance(path, dict):
        data, where = path, "<dict>"
    else:
        path = Path(path)
        where, base_dir = str(path), path.parent
        data = read_yaml_mapping(path, "eval suite", SuiteError)
    try:
        suite = EvalSuite.model_validate(data)
    except ValidationError as e:
        raise SuiteError(f"{where}: {explain(e)}") from None
    return resolve(suite, placeholders, base_dir=base_dir)


def resolve(suite: EvalSuite, placeholders: dict[str, str | Path] | None = None,
            base_dir: Path | None = None) -> EvalSuite:
    """Fill `${NAME}` placeholders (caller's values, then environment) and make paths absolute."""
    values = {k: str(v) for k, v in (placeholders or {}).items()}

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if key in values:
            return values[key]
        return os.environ.get(key, m.group(0))  # left as is: `unresolved()` reports it

    paths = []
    for p in suite.include_paths:
        p = _PLACEHOLDER.sub(fill, p)
        if not _PLACEHOLDER.search(p) and base_dir is not None and not Path(p).is_absolute():
            p = str((base_dir / p).resolve())
        paths.append(p)
    return suite.model_copy(update={"include_paths": paths})


def check_ready(suite: EvalSuite) -> None:
    """Raise if the suite cannot be run yet: unfilled placeholders or missing include folders."""
    if missing := suite.unresolved():
        raise SuiteError(f"include_paths: placeholder(s) not filled: {missing} "
                         f"(pass them to load_suite/resolve, e.g. {{'zoo': zoo.tasks_dir}})")
    for p in suite.include_paths:
        if not Path(p).exists():
            raise SuiteError(f"include_paths: folder {p} does not exist")


if __name__ == "__main__":
    s = load_suite(sys.argv[1])
    print(s.model_dump_json(indent=2))
