"""NuSLERP: spherical interpolation of two models (Shoemake 1985) by their relative weights,
row-wise, column-wise or over the flattened tensor, optionally of task vectors, as mergekit's
``nuslerp``.

1. t = w_2 / (w_1 + w_2) from the two models' weights (0.5 where they sum to ~0);
2. with a base, interpolate the task vectors v_i = theta_i - theta_0 and add the base back;
3. v = [sin((1 - t) Omega) v_1 + sin(t Omega) v_2] / sin(Omega), Omega the angle between the
   normalized vectors: over the flattened tensor (``nuslerp_flatten``, the default), else per row
   of the last dimension, or of the first with ``nuslerp_row_wise``; (anti)colinear pairs lerp.

Run: python -m pytest tests/merge/test_methods_more.py -q -k nuslerp
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.linear import delta_stats
from mergeline.merge.methods.stats import MethodResult


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, dim: int = -1, eps: float = 1e-8,
                    flatten: bool = False) -> Tensor:
    """SLERP of v0 and v1 along ``dim`` (or over everything when ``flatten``)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: Tensor) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
            generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``models``: the two models to interpolate; ``base`` (optional): their common base."""
    check_inputs("nuslerp", base, models, need_base=False)
    if len(models) != 2:
        raise ValueError(f"nuslerp interpolates exactly two models besides the base, got {len(models)}")
    weights = [p.weight for p in model_params]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if params.nuslerp_row_wise else -1
    if base is None:
        out = nuslerp_vectors(t, models[0], models[1], dim=dim, flatten=params.nuslerp_flatten)
        return MethodResult(out, None)
    out = base + nuslerp_vectors(t, models[0] - base, models[1] - base, dim=dim, flatten=params.nuslerp_flatten)
    return MethodResult(out, delta_stats(base, models, [1 - t, t]))
