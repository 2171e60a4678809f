"""What a merge method returns: the merged tensor and its statistics, kept as COUNTS and SUMS so
they aggregate by addition.

No merging tool reports what TIES (Yadav et al. 2023, arXiv:2306.01708) actually did to a
tensor; these counts are collected in the same pass as the merge itself.

Definitions (all per tensor; the executor sums them per layer and per model):
- ``ModelStats.numel``: entries of the tensor.
- ``kept``: entries whose delta survives trimming/sparsification AND is nonzero (a zero delta
  carries nothing and can never agree with an elected sign). Without trimming: the nonzero count.
- ``dropped_by_election``: kept entries whose weighted sign differs from the elected sign
  (0 for methods without sign election).
- ``kept_magnitude`` / ``dropped_magnitude``: sum of the UNWEIGHTED, un-rescaled |delta| over the
  kept / dropped-by-election entries, so ``dropped_magnitude / kept_magnitude`` is the share
  of a fine-tune's surviving task vector that the election threw away.
- ``TensorStats.conflict_positions``: positions where at least two contributions (trimmed,
  weighted deltas) are nonzero with opposite signs.
- ``positions_with_kept``: positions where at least one contribution is nonzero.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import Tensor


@dataclass
class ModelStats:
    numel: int = 0
    kept: int = 0
    dropped_by_election: int = 0
    kept_magnitude: float = 0.0
    dropped_magnitude: float = 0.0

    def __iadd__(self, other: "ModelStats") -> "ModelStats":
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)
        return self


@dataclass
class TensorStats:
    """Statistics of one merged tensor; ``models[i]`` matches ``models[i]`` given to the method."""

    numel: int
    models: list[ModelStats] = field(default_factory=list)
    conflict_positions: int = 0
    positions_with_kept: int = 0

    def __iadd__(self, other: "TensorStats") -> "TensorStats":
        if len(other.models) != len(self.models):
            raise ValueError(f"cannot add stats of {len(other.models)} models to {len(self.models)}")
        self.numel += other.numel
        for mine, theirs in zip(self.models, other.models):
            mine += theirs
        self.conflict_positions += other.conflict_positions
        self.positions_with_kept += other.positions_with_kept
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MethodResult:
    """What every merge method returns (``registry.METHODS[name].fn``); ``stats`` is None for
    methods that count nothing."""

    tensor: Tensor
    stats: TensorStats | None
