"""Linear merge: a weighted average of the models' weights ("model soups",
Wortsman et al. 2022, arXiv:2203.05482), as mergekit's ``linear``: computed in float32
(float64 for float64 inputs), divided by the sum of the weights when ``normalize`` (default).

Run: python -m pytest tests/merge/test_methods.py -q -k linear
"""
from __future__ import annotations

import torch
from torch import Tensor

from merge.methods.common import CHUNK, check_inputs, flat, spans, work_dtype
from merge.methods.stats import ModelStats, TensorStats


def linear(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
           generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``models`` are all models of the recipe (the base among them if listed); ``base`` is only
    used for statistics (deltas against it) and may be None (then stats are None)."""
    from merge.methods.registry import MethodResult

    check_inputs("linear", base, models, need_base=False)
    first = models[0]
    wd = work_dtype(first.dtype)
    w = torch.tensor([p.weight for p in model_params], dtype=wd)
    denominator = float(w.sum()) if params.normalize else 1.0
    xs = [flat(m) for m in models]
    out = torch.empty_like(xs[0])
    C = min(CHUNK, out.numel())
    acc, x = torch.empty(C, dtype=wd), torch.empty(C, dtype=wd)
    for s, e in spans(out.numel()):
        r, t = acc[: e - s].zero_(), x[: e - s]
        for xi, wi in zip(xs, w):
            r.addcmul_(t.copy_(xi[s:e]), wi)  # addcmul like mergekit: same (fused) rounding
        out[s:e].copy_(r.div_(denominator) if params.normalize else r)
    stats = None if base is None else delta_stats(base, models, [float(v) for v in w])
    return MethodResult(out.reshape(first.shape), stats)


def delta_stats(base: Tensor, models: list[Tensor], weights: list[float]) -> TensorStats:
    """Stats for methods without trimming or election: kept = nonzero deltas against the base,
    conflicts = positions where weighted deltas of different models have opposite signs."""
    b = flat(base)
    n, numel = len(models), b.numel()
    stats = TensorStats(numel=numel, models=[ModelStats(numel=numel) for _ in models])
    C = min(CHUNK, numel)
    D = torch.empty(n, C, dtype=work_dtype(b.dtype))
    bb = torch.empty(C, dtype=D.dtype)
    for s, e in spans(numel):
        d = D[:, : e - s]
        bb[: e - s].copy_(b[s:e])
        for i, m in enumerate(models):
            d[i].copy_(flat(m)[s:e]).sub_(bb[: e - s])
        for i, (ms, k, mag) in enumerate(zip(stats.models, torch.count_nonzero(d, dim=1).tolist(),
                                             torch.linalg.vector_norm(d, ord=1, dim=1).tolist())):
            ms.kept += k
            ms.kept_magnitude += mag
        d.mul_(torch.tensor(weights, dtype=d.dtype).reshape(n, 1))
        stats.positions_with_kept += int((d != 0).any(0).sum())
        stats.conflict_positions += int(((d > 0).any(0) & (d < 0).any(0)).sum())
    return stats
