"""Sparsifiers: which entries of one task vector survive, as chunk-wise keep-masks.

Each sparsifier answers ``mask(a, start, out)``: the keep-mask of the magnitudes ``a`` at flat
positions [start, start + len(a)), and ``trim(d, start, out)``: the deltas ``d`` there with the
dropped entries zeroed (threshold sparsifiers do it in one fused ``hardshrink``). Semantics follow mergekit's ``mergekit/sparsify.py``:
- magnitude (TIES, Yadav et al. 2023, arXiv:2306.01708): the k = max(1, int(density * numel))
  largest |delta|, ties at the threshold by lowest flat index (see ``select.py``);
- magnitude_outliers (Model Breadcrumbs, Davari & Belilovsky 2023, arXiv:2312.06795): drop the
  int(gamma * numel) largest outliers, keep the next int(density * numel), drop the rest;
- random (DARE, Yu et al. 2023, arXiv:2311.03099): keep each entry with probability density;
- della_magprune (DELLA, Deep et al. 2024, arXiv:2406.11617): keep probability rises linearly
  with the magnitude rank within each row, from density - epsilon to density + epsilon.
Random draws come only from the ``torch.Generator`` passed in, so a seed reproduces them.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeline.merge.cpu import chunk_size, run_chunks
from mergeline.merge.methods.select import TopK, below, topk


class _TrimByMask:
    """``trim`` through the boolean keep-mask, for sparsifiers without a fused threshold."""

    def trim(self, d: Tensor, start: int, out: Tensor) -> Tensor:
        return torch.mul(d, self.mask(d.abs(), start), out=out)


@dataclass(frozen=True)
class KeepAll:
    def mask(self, a: Tensor, start: int = 0, out: Tensor | None = None) -> Tensor:
        return torch.ones_like(a, dtype=torch.bool) if out is None else out.fill_(True)

    def trim(self, d: Tensor, start: int, out: Tensor) -> Tensor:
        return out.copy_(d)


@dataclass(frozen=True)
class AtLeast:
    """|delta| >= threshold: the paper's whole-model trimming with a precomputed threshold."""

    threshold: float

    def mask(self, a: Tensor, start: int = 0, out: Tensor | None = None) -> Tensor:
        return torch.ge(a, self.threshold, out=out)

    def trim(self, d: Tensor, start: int, out: Tensor) -> Tensor:
        return torch.hardshrink(d, below(self.threshold, d.dtype), out=out)


@dataclass(frozen=True)
class Window(_TrimByMask):
    """In the top ``keep`` but not in the top ``drop`` (``drop`` is a subset of ``keep``)."""

    keep: TopK
    drop: TopK

    def mask(self, a: Tensor, start: int = 0, out: Tensor | None = None) -> Tensor:
        out = self.keep.mask(a, start, out)
        if self.drop.k:
            out.logical_and_(self.drop.mask(a, start).logical_not_())
        return out


@dataclass(frozen=True)
class Stored(_TrimByMask):
    """A precomputed flat boolean mask (random methods)."""

    keep: Tensor

    def mask(self, a: Tensor, start: int = 0, out: Tensor | None = None) -> Tensor:
        part = self.keep[start : start + a.numel()]
        return part.clone() if out is None else out.copy_(part)


def magnitude(delta: Tensor, density: float, hist=None):
    if density >= 1:
        return KeepAll()
    if density <= 0:
        return topk(delta, 0)
    return topk(delta, max(1, int(density * delta.numel())), hist)


def magnitude_outliers(delta: Tensor, density: float, gamma: float):
    if density >= 1:
        return KeepAll()
    n = delta.numel()
    target_n, n_top = int(density * n), int(gamma * n)
    # mergekit shrinks the outlier cut when needed to keep the target density
    n_bot = max(0, n - target_n - n_top)
    return Window(keep=topk(delta, n - n_bot), drop=topk(delta, n - n_bot - target_n))


def random(delta: Tensor, density: float, generator: torch.Generator | None, chunk: int = 1 << 20):
    if density >= 1:
        return KeepAll()
    # drawn chunk by chunk in a fixed order (same seed -> same mask) to bound the fp32 scratch
    keep = torch.empty(delta.numel(), dtype=torch.bool, device=delta.device)
    u = torch.empty(min(chunk, max(1, delta.numel())), device=delta.device)
    for s in range(0, delta.numel(), chunk):
        part = u[: min(chunk, delta.numel() - s)]
        torch.lt(torch.rand(part.shape, generator=generator, device=delta.device, out=part), density,
                 out=keep[s : s + part.numel()])
    return Stored(keep)


def della_magprune(delta: Tensor, density: float, epsilon: float, generator: torch.Generator | None, shape):
    if density >= 1:
        return KeepAll()
    if density <= 0 or delta.numel() == 0:
        return topk(delta, 0)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: epsilon={epsilon} must keep density +/- epsilon in (0, 1) (density={density})")
    # ranks within each row (the whole vector for 1-D tensors), as mergekit does for 2-D weights
    rows = delta.reshape(shape[0] if len(shape) >= 2 else 1, -1).abs().float()
    m = rows.shape[1]
    order = torch.argsort(rows, dim=1, stable=True)
    positions = torch.arange(m, dtype=rows.dtype, device=rows.device).expand_as(rows).contiguous()
    ranks = torch.empty_like(rows).scatter_(1, order, positions)  # 0 = smallest magnitude
    # a one-column row has no rank spread (mergekit divides 0 by 0): use the middle probability
    rank_norm = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    u = torch.rand(probs.shape, generator=generator, device=delta.device)
    return Stored((u < probs).reshape(-1))


def l1_rescale(delta: Tensor, sparsifier) -> float:
    """mergekit's ``rescale``: the factor making the kept entries' L1 norm equal the whole delta's,
    summed and divided in the delta's own dtype as mergekit does (1 when either is ~0).
    16-bit CPU deltas are summed over fp32 chunks (torch's bf16 ops are slow) and rounded after."""
    if delta.dtype in (torch.float32, torch.float64) or delta.device.type != "cpu":
        a = delta.abs()
        before, after = a.sum(), a.mul_(sparsifier.mask(a, 0)).sum()
    else:
        before, after = (torch.tensor(v, dtype=delta.dtype) for v in _l1_sums(delta, sparsifier))
    if before < 1e-7 or after < 1e-7:
        return 1.0
    return float(before / after)


def _l1_sums(delta: Tensor, sparsifier) -> tuple[float, float]:
    C = chunk_size(delta)

    class Worker:
        def __init__(self) -> None:
            self.buf, self.acc = torch.empty(C), torch.zeros(2, dtype=torch.float64)

        def __call__(self, s: int, e: int) -> None:
            a = self.buf[: e - s].copy_(delta[s:e]).abs_()
            self.acc[0] += a.sum()
            self.acc[1] += a.mul_(sparsifier.mask(a, s)).sum()

    total = sum(w.acc for w in run_chunks(delta.numel(), C, Worker, delta.device))
    return float(total[0]), float(total[1])
