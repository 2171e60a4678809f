"""Linear merge: a weighted average of the models' weights ("model soups",
Wortsman et al. 2022, arXiv:2203.05482), as mergekit's ``linear``: computed in float32
(float64 for float64 inputs), divided by the sum of the weights when ``normalize`` (default).

Run: python -m pytest tests/merge/test_methods.py -q -k linear
"""
from __future__ import annotations

import torch
from torch import Tensor

from merge.methods.common import check_inputs, chunk_size, flat, spans, work_dtype
from merge.methods.stats import ModelStats, TensorStats


def linear(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
           generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``models`` are all models of the recipe (the base among them if listed); ``base`` is only
    used for statistics (deltas against it) and may be None (then stats are None)."""
    from merge.methods.registry import MethodResult

    check_inputs("linear", base, models, need_base=False)
    first = models[0]
    wd = work_dtype(first.dtype)
    xs = [flat(m) for m in models]
    dev = xs[0].device
    w = torch.tensor([p.weight for p in model_params], dtype=wd, device=dev)
    denominator = float(w.sum()) if params.normalize else 1.0
    out = torch.empty_like(xs[0])
    C = chunk_size(out)
    acc, x = torch.empty(C, dtype=wd, device=dev), torch.empty(C, dtype=wd, device=dev)
    for s, e in spans(out.numel(), C):
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
    n, numel, dev, C = len(models), b.numel(), b.device, chunk_size(b)
    D, Q = (torch.empty(n, C, dtype=work_dtype(b.dtype), device=dev) for _ in range(2))
    bb = torch.empty(C, dtype=D.dtype, device=dev)
    w = torch.tensor(weights, dtype=D.dtype, device=dev).reshape(n, 1)
    acc = torch.zeros(2, n, dtype=torch.float64, device=dev)  # nonzero deltas, sum |delta|
    pos = torch.zeros(2, dtype=torch.int64, device=dev)  # conflicts, positions with a delta
    for s, e in spans(numel, C):
        d, q = D[:, : e - s], Q[:, : e - s]
        bb[: e - s].copy_(b[s:e])
        for i, m in enumerate(models):
            d[i].copy_(flat(m)[s:e]).sub_(bb[: e - s])
        acc[0] += torch.sign(d, out=q).abs_().sum(1)
        acc[1] += torch.abs(d, out=q).sum(1)
        torch.sign(d.mul_(w), out=q)  # signs of the weighted deltas
        pos[0] += ((q.amin(0) < 0) & (q.amax(0) > 0)).sum()
        pos[1] += (q.abs_().amax(0) > 0).sum()
    (kept, mags), (conflicts, with_kept) = acc.tolist(), pos.tolist()
    return TensorStats(numel=numel, conflict_positions=conflicts, positions_with_kept=with_kept,
                       models=[ModelStats(numel=numel, kept=int(k), kept_magnitude=m) for k, m in zip(kept, mags)])
