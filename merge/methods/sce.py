"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models",
arXiv:2408.07990, sec. 3.3), as mergekit's ``sce``. With task vectors tau_i = theta_i - theta_0:

1. Select: keep the ``select_topk`` fraction of entries whose variance across the task vectors
   is largest (of the entries with nonzero variance), the same entries in every tau_i;
2. Calculate: a weight per model, the mean of its selected tau_i squared, normalized to sum 1;
3. Erase: elect a sign per entry from the sum of the selected tau_i (+ where >= 0) and drop the
   entries of the other sign (a zero never agrees);
then theta = theta_0 + sum_i w_i tau_i / sum_i w_i over the agreeing i (divisor floored at 1e-6).
Computed in the compute dtype, with mergekit's operations in mergekit's order. The statistics
count step 1 as trimming and step 3 as the election (``masked_stats``).

Run: python -m pytest tests/merge/test_methods_more.py -q -k sce
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.masked_stats import masked_stats
from mergeline.merge.methods.stats import MethodResult


def select_mask(tvs: Tensor, fraction: float) -> Tensor:
    """Step 1: where the variance across models is among the top ``fraction`` (bool, one row)."""
    if fraction <= 0:
        return torch.zeros_like(tvs[0], dtype=torch.bool)
    if fraction >= 1 or tvs[0].numel() == 0:
        return torch.ones_like(tvs[0], dtype=torch.bool)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var, dtype=torch.bool)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = True
    return mask


def model_weights(tvs: Tensor) -> Tensor:
    """Step 2: mean squared entry of each task vector, normalized to sum 1 (equal where ~0)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    return torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total


def sce(base: Tensor, models: list[Tensor], model_params: list, params, *,
        generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    if not models:  # nothing to merge into the base, as mergekit
        return MethodResult(base.clone(), None)
    check_inputs("sce", base, models, need_base=True)
    tvs = torch.stack([m - base for m in models], dim=0)
    raw = tvs

    # 1. Select
    selected = None
    if params.select_topk < 1:
        selected = select_mask(tvs, params.select_topk)
        tvs = tvs * selected.to(tvs.dtype).unsqueeze(0)

    # 3. Erase: the elected sign (computed before step 2's weights, which do not change signs)
    signs = tvs.sign()
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agree = signs == elected

    # 2. Calculate the weights, then the weighted mean of the agreeing entries
    w = model_weights(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    kept_w = w * agree.to(tvs.dtype)
    merged = (tvs * kept_w).sum(dim=0) / torch.sum(kept_w, dim=0).clamp(min=1e-6)

    kept = None if selected is None else selected.unsqueeze(0)  # the same entries in every model
    return MethodResult(base + merged, masked_stats(raw, kept, agree))
