"""Arcee Fusion (Arcee AI, https://arcee.ai; as mergekit's ``arcee_fusion``): keep only the
other model's changes that matter most, judged by a dynamic threshold on an importance score.

With a the base and b the other model, per entry:
1. importance = |b - a| * KL(softmax(b) || softmax(a)), the KL taken along the last dimension;
2. threshold = median + 1.5 (Q3 - Q1) of the importance (the usual outlier fence); quantiles are
   read from the sorted values, from a sample of 1M drawn with replacement for larger tensors
   (drawn from the merge's seeded generator here, so ``--seed`` reproduces it);
3. result = a + (b - a) where importance >= threshold, a elsewhere.
The statistics count the kept changes (step 3) as kept.

Run: python -m pytest tests/merge/test_methods_more.py -q -k arcee_fusion
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.masked_stats import masked_stats
from mergeline.merge.methods.stats import MethodResult

SAMPLE = 1_000_000


def importance(b: Tensor, a: Tensor) -> Tensor:
    """Step 1."""
    eps = 1e-8
    p, q = F.softmax(b, dim=-1) + eps, F.softmax(a, dim=-1) + eps
    return (b - a).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fence(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    """Step 2: median + 1.5 * IQR."""
    x = scores.reshape(-1)
    if x.numel() > SAMPLE:
        x = x[torch.randint(x.numel(), (SAMPLE,), device=x.device, generator=generator)]
    ordered = torch.sort(x).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, models: list[Tensor], model_params: list, params, *,
                 generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    check_inputs("arcee_fusion", base, models, need_base=True)
    if len(models) != 1:
        raise ValueError(f"arcee_fusion merges exactly two models (base + one), got base + {len(models)}")
    a, b = base, models[0]
    if a.numel() == 0:
        return MethodResult(a.clone(), None)
    scores = importance(b, a)
    mask = (scores >= fence(scores, generator)).float()
    out = a + (b - a) * mask  # in float32 (the mask's dtype), as mergekit; rounded once at the end
    return MethodResult(out.to(a.dtype), masked_stats((b - a).unsqueeze(0), mask.bool().unsqueeze(0)))
