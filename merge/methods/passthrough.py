"""Passthrough: one model's tensors, unchanged or multiplied by ``scale``, as mergekit's
``passthrough`` (used for layer stacking and for scaling one model's weights).

Run: python -m pytest tests/merge/test_methods_more.py -q -k passthrough
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.stats import MethodResult


def passthrough(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
                generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``models == [the one model]``; its ``scale`` (None: a copy)."""
    check_inputs("passthrough", None, models, need_base=False)
    if len(models) != 1:
        raise ValueError(f"passthrough takes exactly one model, got {len(models)}")
    scale = model_params[0].scale
    x = models[0]
    return MethodResult(x.clone() if scale is None else x * scale, None)
