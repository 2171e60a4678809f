"""Merge statistics (``stats.TensorStats``) for methods that keep a subset of each task vector
and, optionally, elect a sign: SCE, RAM, Arcee Fusion. The counts mean what they mean for TIES
(see ``stats.py``): kept = nonzero entries surviving the method's selection, dropped by election =
kept entries whose sign lost the vote, conflicts = positions where kept entries disagree in sign.

Run: python -m pytest tests/merge/test_methods_more.py -q -k stats
"""
from __future__ import annotations

import torch
from torch import Tensor

from merge.methods.stats import ModelStats, TensorStats


def masked_stats(tvs: Tensor, kept: Tensor | None = None, agree: Tensor | None = None) -> TensorStats:
    """``tvs``: (n, ...) unweighted task vectors; ``kept``: where each survives selection (None:
    everywhere); ``agree``: where each agrees with the elected sign (None: no election)."""
    n = tvs.shape[0]
    d = tvs.reshape(n, -1)
    numel = d.shape[1]
    keep = d != 0
    if kept is not None:
        keep &= kept.reshape(n, -1).to(torch.bool)
    mag = torch.where(keep, d.abs(), 0).double()
    stats = TensorStats(numel=numel)
    pos = (keep & (d > 0)).any(0)
    neg = (keep & (d < 0)).any(0)
    stats.conflict_positions = int((pos & neg).sum())
    stats.positions_with_kept = int(keep.any(0).sum())
    lost = None if agree is None else keep & ~agree.reshape(n, -1).to(torch.bool)
    for i in range(n):
        ms = ModelStats(numel=numel, kept=int(keep[i].sum()), kept_magnitude=float(mag[i].sum()))
        if lost is not None:
            ms.dropped_by_election = int(lost[i].sum())
            ms.dropped_magnitude = float(mag[i][lost[i]].sum())
        stats.models.append(ms)
    return stats
