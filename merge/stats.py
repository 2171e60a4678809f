"""Aggregate the per-tensor merge counts into `merge_stats.json` and `merge_stats_tensors.csv`.

The merge methods return COUNTS per tensor (`merge.methods` TensorStats): per model the entries
kept by trimming, the kept entries dropped by sign election and the magnitudes involved; per
tensor the positions where kept deltas disagree in sign. Counts add up, so totals per layer and
per model are exact sums, and the fractions are computed last:

- kept_fraction = kept / numel, trimmed_fraction = 1 - kept_fraction (TIES step 1, Yadav et al. 2023)
- dropped_fraction_of_kept = dropped_by_election / kept (step 2/3: entries that lost the sign vote)
- dropped_magnitude_share = dropped_magnitude / kept_magnitude
- sign_conflict rate = conflict_positions / positions_with_kept (positions where >= 2 kept deltas disagree)

    python -c "import json; print(json.load(open('OUT/merge_stats.json'))['sign_conflict'])"
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from mergeline.merge.methods.stats import TensorStats
from mergeline.merge.parameters import layer_key

SCHEMA_VERSION = 1
STATS_JSON = "merge_stats.json"
STATS_CSV = "merge_stats_tensors.csv"
COUNT_KEYS = ("numel", "kept", "dropped_by_election", "kept_magnitude", "dropped_magnitude")
CSV_COLUMNS = ("tensor", "layer", "model", "numel", "kept", "kept_fraction", "dropped_by_election",
               "dropped_fraction_of_kept", "kept_magnitude", "dropped_magnitude", "dropped_magnitude_share",
               "conflict_positions", "positions_with_kept", "sign_conflict_rate")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(counts: dict[str, float]) -> dict[str, float | None]:
    """Counts of one model (over any set of tensors) -> the reported keys."""
    kept_fraction = _ratio(counts["kept"], counts["numel"])
    return {
        "numel": int(counts["numel"]),
        "kept": int(counts["kept"]),
        "kept_fraction": kept_fraction,
        "trimmed_fraction": None if kept_fraction is None else 1.0 - kept_fraction,
        "dropped_by_election": int(counts["dropped_by_election"]),
        "dropped_fraction_of_kept": _ratio(counts["dropped_by_election"], counts["kept"]),
        "dropped_magnitude_share": _ratio(counts["dropped_magnitude"], counts["kept_magnitude"]),
    }


def _zero() -> dict[str, float]:
    return dict.fromkeys(COUNT_KEYS, 0.0)


@dataclass
class StatsAggregator:
    """Add one tensor's stats at a time (streaming); write the files at the end."""

    method: str
    models: list[str]  # display names, in the order the method saw the models
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)
    per_layer: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    conflict: dict[str, list[int]] = field(default_factory=dict)  # layer -> [conflicts, with_kept]
    rows: list[dict] = field(default_factory=list)
    sign_choices: dict[str, str] | None = None  # TIES' sign per layer group, as the recipe fixed it

    def add(self, tensor: str, stats: TensorStats | None, models: list[str] | None = None) -> None:
        if stats is None:
            return
        names = models or self.models
        layer = layer_key(tensor)
        model_rows = stats.models
        if len(model_rows) != len(names):
            raise ValueError(f"tensor {tensor!r}: stats for {len(model_rows)} models, expected {len(names)}")
        conflicts, with_kept = stats.conflict_positions, stats.positions_with_kept
        c = self.conflict.setdefault(layer, [0, 0])
        c[0] += conflicts
        c[1] += with_kept
        for name, ms in zip(names, model_rows):
            counts = {k: float(getattr(ms, k)) for k in COUNT_KEYS}
            for target in (self.per_model.setdefault(name, _zero()),
                           self.per_layer.setdefault(layer, {}).setdefault(name, _zero())):
                for k in COUNT_KEYS:
                    target[k] += counts[k]
            s = summarize(counts)
            self.rows.append({
                "tensor": tensor, "layer": layer, "model": name, **{k: s[k] for k in s if k != "trimmed_fraction"},
                "kept_magnitude": counts["kept_magnitude"], "dropped_magnitude": counts["dropped_magnitude"],
                "conflict_positions": conflicts, "positions_with_kept": with_kept,
                "sign_conflict_rate": _ratio(conflicts, with_kept),
            })

    def to_dict(self) -> dict:
        total_c = sum(c[0] for c in self.conflict.values())
        total_k = sum(c[1] for c in self.conflict.values())
        order = sorted(self.per_layer, key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "models": list(self.models),
            "per_model": {m: summarize(self.per_model[m]) for m in self.models if m in self.per_model},
            "per_layer": {k: {m: summarize(v) for m, v in self.per_layer[k].items()} for k in order},
            "sign_conflict": {
                "rate": _ratio(total_c, total_k),
                "conflict_positions": total_c,
                "positions_with_kept": total_k,
                "per_layer": {k: _ratio(*self.conflict[k]) for k in order if k in self.conflict},
            },
            **({"sign_choices": dict(self.sign_choices)} if self.sign_choices else {}),
        }

    def write(self, folder: Path) -> dict:
        data = self.to_dict()
        (Path(folder) / STATS_JSON).write_text(json.dumps(data, indent=2) + "\n")
        with open(Path(folder) / STATS_CSV, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        return data
