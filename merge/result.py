"""The merge stage's result as a typed object: what a merge made and what it waived.

    MergeResult(path, content_hash, method, stats: StatsSummary | None, waived: [check names])
    MergeResult.from_output(run_merge(...))      # from merge/executor.py's MergeOutput
    StatsSummary.from_stats(merge_stats_dict)    # merge_stats.json reduced to what a report keeps

The evaluation report (evaluation/schema.py, which re-exports these) keeps the same
StatsSummary per candidate, so the merge side and the report agree on one shape. Unknown keys
are refused (extra="forbid"): a renamed key is an error naming it, not a silent None.

    python -m mergeline.merge.result MERGED_MODEL_DIR     # the result of a finished merge folder
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mergeline.merge.hashing import content_hash
from mergeline.merge.stats import STATS_JSON


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatsSummary(_Strict):
    """merge_stats.json in brief: the method, the merged models, the overall sign-conflict rate
    and per model its kept / dropped fractions (merge/stats.py `summarize`)."""
    method: str | None = None
    models: list[str] = Field(default_factory=list)
    sign_conflict_rate: float | None = None
    per_model: dict[str, dict[str, float | None]] = Field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: dict) -> "StatsSummary":
        conflict = stats.get("sign_conflict") or {}  # a method without sign election writes none
        return cls(method=stats.get("method"), models=list(stats.get("models") or []),
                   sign_conflict_rate=conflict.get("rate"), per_model=stats.get("per_model") or {})


class MergeResult(_Strict):
    path: Path
    content_hash: str | None = None           # merge/hashing.content_hash of the output folder
    method: str
    stats: StatsSummary | None = None          # None: the merge wrote no statistics
    waived: list[str] = Field(default_factory=list)  # failed checks merged anyway (allow_crimes)

    @classmethod
    def from_output(cls, out, hash_it: bool = True) -> "MergeResult":
        """From run_merge's MergeOutput (hashing the output folder unless hash_it=False)."""
        return cls(path=out.path, content_hash=content_hash(out.path) if hash_it else None, method=out.method,
                   stats=StatsSummary.from_stats(out.stats) if out.stats else None, waived=list(out.waived))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "MergeResult":
        """From a finished merge folder and its merge_stats.json."""
        folder = Path(folder)
        stats = json.loads((folder / STATS_JSON).read_text()) if (folder / STATS_JSON).is_file() else None
        return cls(path=folder, content_hash=content_hash(folder), method=(stats or {}).get("method") or "unknown",
                   stats=StatsSummary.from_stats(stats) if stats else None)


if __name__ == "__main__":
    print(MergeResult.from_folder(sys.argv[1]).model_dump_json(indent=2))
