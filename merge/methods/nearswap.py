"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as
mergekit's ``nearswap``: take the other model's value where it is near the base's, keep the
base's where they are far apart.

Per entry, with a the base and b the other model: weight = clamp(t / |a - b|, 0, 1) (|a - b|
floored at 1e-6), result = weight * b + (1 - weight) * a. Entries closer than t are swapped to b.

Run: python -m pytest tests/merge/test_methods_more.py -q -k nearswap
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.linear import delta_stats
from mergeline.merge.methods.stats import MethodResult


def nearswap(base: Tensor, models: list[Tensor], model_params: list, params, *,
             generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    check_inputs("nearswap", base, models, need_base=True)
    if len(models) != 1:
        raise ValueError(f"nearswap merges exactly two models (base + one), got base + {len(models)}")
    a, b = base, models[0]
    weight = (params.t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return MethodResult(weight * b + (1 - weight) * a, delta_stats(base, models, [1.0]))
