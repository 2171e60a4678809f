"""Merge statistics (``stats.TensorStats``) for methods that keep a subset of each task vector
and, optionally, elect a sign: SCE, RAM, Arcee Fusion. The counts mean what they mean for TIES
(see ``stats.py``): kept = nonzero entries surviving the method's selection, dropped by election =
kept entries whose sign lost the vote, conflicts = positions where kept entries disagree in sign.

Run: python -m pytest tests/merge/test_methods_more.py -q -k stats
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.stats import ModelStats, TensorStats


def masked_stats(tvs: Tensor, kept: Tensor | None = None, agree: Tensor | None = None) -> TensorStats:
    """``tvs``: (n, ...) unweighted task vectors; ``kept``: where each survives selection (None:
    everywhere; one row applies to all); ``agree``: where each agrees with the elected sign (None:
    no election). Row by row, in float arithmetic: on CPU, reductions over dim 0 and bool ops cost
    many times more per element (see ties.py)."""
    n = tvs.shape[0]
    d = tvs.reshape(n, -1)
    wd = torch.float64 if d.dtype == torch.float64 else torch.float32
    stats = TensorStats(numel=d.shape[1])
    hi = torch.zeros(d.shape[1], dtype=wd, device=d.device)  # 1 where some kept entry is > 0
    lo, anyone = torch.zeros_like(hi), torch.zeros_like(hi)  # -1 where some is < 0; 1 where any is kept
    for i in range(n):
        sign = torch.sign(d[i].to(wd))  # +-1 where nonzero
        if kept is not None:
            sign.mul_(kept[i if kept.shape[0] == n else 0].reshape(-1))
        keep = sign.abs()
        mag = d[i].abs().to(wd).mul_(keep)  # a new tensor: never in place on the inputs
        ms = ModelStats(numel=d.shape[1], kept=int(keep.sum()), kept_magnitude=float(mag.sum(dtype=torch.float64)))
        if agree is not None:
            lost = keep.sub_(agree[i].reshape(-1).to(wd)).clamp_(min=0)  # kept and not agreeing
            ms.dropped_by_election = int(lost.sum())
            ms.dropped_magnitude = float(mag.mul_(lost).sum(dtype=torch.float64))
            keep = sign.abs()
        stats.models.append(ms)
        torch.maximum(hi, sign, out=hi)
        torch.minimum(lo, sign, out=lo)
        torch.maximum(anyone, keep, out=anyone)
    stats.conflict_positions = int(hi.mul_(lo).neg_().sum())
    stats.positions_with_kept = int(anyone.sum())
    return stats
