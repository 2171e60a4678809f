"""Linear merge: a weighted average of the models' weights ("model soups",
Wortsman et al. 2022, arXiv:2203.05482), as mergekit's ``linear``: computed in float32
(float64 for float64 inputs), divided by the sum of the weights when ``normalize`` (default).

Run: python -m pytest tests/merge/test_methods.py -q -k linear
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.cpu import chunk_size, run_chunks
from mergeline.merge.methods.common import check_inputs, flat, work_dtype
from mergeline.merge.methods.stats import MethodResult, ModelStats, TensorStats


def linear(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
           generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``models`` are all models of the recipe (the base among them if listed); ``base`` is only
    used for statistics (deltas against it) and may be None (then stats are None)."""
    check_inputs("linear", base, models, need_base=False)
    xs, first = [flat(m) for m in models], models[0]
    w = torch.tensor([p.weight for p in model_params], dtype=work_dtype(first.dtype), device=first.device)
    denominator = float(w.sum()) if params.normalize else 1.0
    out = torch.empty_like(xs[0])
    C = chunk_size(out)

    def make_worker():
        buf = torch.empty(2, C, dtype=w.dtype, device=w.device)

        def work(s: int, e: int) -> None:
            r, t = buf[0, : e - s].zero_(), buf[1, : e - s]
            for xi, wi in zip(xs, w):
                r.addcmul_(t.copy_(xi[s:e]), wi)  # addcmul like mergekit: same (fused) rounding
            out[s:e].copy_(r.div_(denominator) if params.normalize else r)

        return work

    run_chunks(out.numel(), C, make_worker, out.device)
    stats = None if base is None else delta_stats(base, models, w.tolist())
    return MethodResult(out.reshape(first.shape), stats)


class _StatsWorker:
    """Deltas against the base: nonzero counts, |delta| sums, sign conflicts of weighted deltas."""

    def __init__(self, b: Tensor, xs: list[Tensor], w: Tensor, C: int) -> None:
        self.b, self.xs, self.w = b, xs, w
        self.D, self.Q = (torch.empty(len(xs), C, dtype=w.dtype, device=b.device) for _ in range(2))
        self.B = torch.empty(C, dtype=w.dtype, device=b.device)
        self.acc = torch.zeros(2, len(xs), dtype=torch.float64, device=b.device)  # nonzero, sum |d|
        self.pos = torch.zeros(2, dtype=torch.int64, device=b.device)  # conflicts, with a delta

    def __call__(self, s: int, e: int) -> None:
        d, q, bb = self.D[:, : e - s], self.Q[:, : e - s], self.B[: e - s].copy_(self.b[s:e])
        for i, x in enumerate(self.xs):
            d[i].copy_(x[s:e]).sub_(bb)
        self.acc[0] += torch.sign(d, out=q).abs_().sum(1)
        self.acc[1] += torch.abs(d, out=q).sum(1)
        lo, hi = torch.aminmax(torch.sign(d.mul_(self.w), out=q), dim=0)  # signs of weighted deltas
        self.pos[0] += ((lo < 0) & (hi > 0)).sum()
        self.pos[1] += ((lo < 0) | (hi > 0)).sum()


def delta_stats(base: Tensor, models: list[Tensor], weights: list[float]) -> TensorStats:
    """Stats for methods without trimming or election: kept = nonzero deltas against the base,
    conflicts = positions where weighted deltas of different models have opposite signs."""
    b, numel, C = flat(base), base.numel(), chunk_size(base)
    w = torch.tensor(weights, dtype=work_dtype(b.dtype), device=b.device).reshape(-1, 1)
    workers = run_chunks(numel, C, lambda: _StatsWorker(b, [flat(m) for m in models], w, C), b.device)
    (kept, mags), (conflicts, with_kept) = sum(x.acc for x in workers).tolist(), sum(x.pos for x in workers).tolist()
    return TensorStats(numel=numel, conflict_positions=conflicts, positions_with_kept=with_kept,
                       models=[ModelStats(numel=numel, kept=int(k), kept_magnitude=m) for k, m in zip(kept, mags)])
