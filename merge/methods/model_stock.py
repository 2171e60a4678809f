"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522), as mergekit's ``model_stock``: the fine-tunes' average is pulled towards the
base by an interpolation ratio set by the angle between their task vectors.

With k fine-tunes w_1..w_k of the base w_0 and cos(theta) the mean pairwise cosine of the task
vectors w_i - w_0 (over the whole tensor, or per row with ``filter_wise``):
    t = k cos(theta) / (1 + (k - 1) cos(theta))          (eq. 5 of the paper)
    w_H = t * mean(w_i) + (1 - t) * w_0
Where 1 + (k - 1) cos(theta) is ~0 there is no finite ratio and the base is kept (t = 0).
Computed in the compute dtype, with mergekit's operations in mergekit's order.

Run: python -m pytest tests/merge/test_methods_more.py -q -k model_stock
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.linear import delta_stats
from mergeline.merge.methods.stats import MethodResult


def model_stock(base: Tensor, models: list[Tensor], model_params: list, params, *,
                generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    check_inputs("model_stock", base, models, need_base=True)
    if len(models) < 2:
        raise ValueError(f"model_stock needs at least two fine-tunes besides the base, got {len(models)}")
    w0, ws = base, list(models)
    if params.filter_wise:  # one ratio per row (output filter); a 1-D tensor is one row
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:  # one ratio for the whole tensor
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]

    # 1. Task vectors and the mean pairwise cosine between them
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)

    # 2. Interpolation ratio t = k cos / (1 + (k - 1) cos); the base where that is singular
    k = len(ws)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (k * cos_theta) / torch.where(singular, torch.ones_like(denominator), denominator))

    # 3. Interpolate between the fine-tunes' average and the base
    average = sum(ws) / k
    out = (t * average + (1 - t) * w0).reshape(base.shape)
    return MethodResult(out, delta_stats(base, models, [1.0] * k))
