"""RAM, Reinforced Agent Merging (arXiv:2601.13572), and its tensor-local RAM+ variant, as
mergekit's ``ram`` and ``ramplus_tl``. With task vectors tau_i = theta_i - theta_0:

1. an entry of tau_i contributes when |tau_i| > ``epsilon``;
2. where only one model contributes, its value is kept whole (unique); where several do, they
   are averaged over the contributors (shared) -- no dilution of what only one model learned;
3. RAM+ (tensor-local): each model's unique entries are scaled by
   lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = its shared / its unique contribution counts
   in this tensor, compensating models whose updates are mostly shared.
The statistics count step 1 as trimming (``masked_stats``).

Run: python -m pytest tests/merge/test_methods_more.py -q -k ram
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.masked_stats import masked_stats
from mergeline.merge.methods.stats import MethodResult


def _vectors(base: Tensor, models: list[Tensor], epsilon: float):
    """Flat task vectors, where each contributes, and where one / several contribute."""
    tvs = torch.stack([m - base for m in models], dim=0).view(len(models), -1)
    contributes = tvs.abs() > epsilon
    counts = contributes.sum(dim=0, keepdim=True)
    return tvs, contributes, counts, counts > 1, counts == 1


def _ram(base: Tensor, models: list[Tensor], params, plus: bool):
    if not models:  # nothing to merge into the base, as mergekit
        return MethodResult(base.clone(), None)
    check_inputs("ramplus_tl" if plus else "ram", base, models, need_base=True)
    tvs, contributes, counts, shared, unique = _vectors(base, models, params.epsilon)
    z = tvs * contributes
    if plus:  # 3. tensor-local rescaling of each model's unique entries
        rho = (contributes & shared).sum(dim=1) / (contributes & unique).sum(dim=1).clamp(min=params.epsilon)
        lam = 1 + params.r * rho.clamp(min=0, max=params.alpha)
        merged = ((z * unique * lam.unsqueeze(-1)) + (z * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    else:  # 2. unique entries whole, shared ones averaged over their contributors
        merged = ((z * unique) + (z * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    # RAM+'s float32 lambda promotes 16-bit inputs to float32, as in mergekit: rounded once at the end
    return MethodResult((base + merged.reshape_as(base)).to(base.dtype), masked_stats(tvs, contributes))


def ram(base: Tensor, models: list[Tensor], model_params: list, params, *,
        generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    return _ram(base, models, params, plus=False)


def ramplus_tl(base: Tensor, models: list[Tensor], model_params: list, params, *,
               generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    return _ram(base, models, params, plus=True)
