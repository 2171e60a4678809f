"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere (Goddard,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit's ``multislerp``:

1. (with a base) take task vectors; flatten and project each onto the unit sphere;
2. mean direction m: the normalized weighted average of the unit vectors;
3. project the unit vectors onto the tangent space at m, and average them there with the weights;
4. map back to the sphere (exponential map) and scale by the weighted average norm; add the base.
Weights are normalized to sum 1 unless ``normalize_weights`` is false. Two antipodal inputs
with balancing weights fall back to linear interpolation; more are refused (no mean direction).

Run: python -m pytest tests/merge/test_methods_more.py -q -k multislerp
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.linear import delta_stats
from mergeline.merge.methods.stats import MethodResult


def multislerp(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
               generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    check_inputs("multislerp", base, models, need_base=False)
    if len(models) == 1:
        return MethodResult(models[0].clone(), None)
    eps = params.eps
    x = torch.stack(models, dim=0)
    if base is not None:  # 1. task vectors
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor([p.weight for p in model_params], dtype=x.dtype, device=x.device)
    if params.normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)

    # 2. The mean direction
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError("multislerp: the weighted sum of the (unit) inputs is zero: antipodal inputs with "
                             "weights that balance out; change a weight")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return _result(out, base, models)
    mean = mean / mean_norm

    # 3. Tangent space at the mean: project and interpolate
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)

    # 4. Back to the sphere, at the weighted average norm
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return _result(out, base, models)


def _result(out: Tensor, base: Tensor | None, models: list[Tensor]):
    if base is None:
        return MethodResult(out, None)
    return MethodResult(out + base, delta_stats(base, models, [1.0] * len(models)))
