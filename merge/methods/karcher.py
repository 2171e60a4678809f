"""Karcher mean: the Riemannian (Frechet) mean of the models' weights on the unit hypersphere
(Karcher 1977; for model merging arXiv:2603.04972), as mergekit's ``karcher``: every input
(the base too, when the recipe names one) with equal weight, per tensor.

1. Split each tensor into its norm and direction u_i = x_i / ||x_i|| (norms <= tol are left out);
2. start from the normalized weighted average of the directions;
3. repeat up to ``max_iter`` times: the tangent step T = sum_i a_i theta_i / sin(theta_i)
   (u_i - cos(theta_i) m), theta_i the angle between m and u_i, then the exponential map
   m <- cos(|T|) m + sin(|T|) T / |T|, renormalized; stop when |T| < ``tol``;
4. scale the mean direction by the weighted average of the norms.
Norms in float32 (float64 for float64 inputs), the rest in the compute dtype, as mergekit.

Run: python -m pytest tests/merge/test_methods_more.py -q -k karcher
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.methods.common import check_inputs
from mergeline.merge.methods.stats import MethodResult


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    if len(tensors) == 1:
        return tensors[0]
    nd = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    # 1. Norms and directions
    norms = [torch.linalg.vector_norm(x.to(nd)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]

    # 2. Start: the normalized weighted average of the directions
    mean = torch.zeros_like(us[0])
    for ai, u in zip(a, us):
        mean += ai * u
    mean_norm = torch.linalg.vector_norm(mean.to(nd))
    mean = us[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    # 3. Riemannian gradient steps: log maps to the tangent space at the mean, exp map back
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(nd))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(nd))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    # 4. Scale by the weighted average norm
    return sum(ai * n for ai, n in zip(alphas, norms)) * mean


def karcher(base: Tensor | None, models: list[Tensor], model_params: list, params, *,
            generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``models``: every recipe input, the base among them when named (mergekit ignores the base)."""
    check_inputs("karcher", None, models, need_base=False)
    if len(models) == 1:
        return MethodResult(models[0].clone(), None)
    out = karcher_mean(list(models), [1.0 / len(models)] * len(models), params.max_iter, params.tol)
    return MethodResult(out.to(models[0].dtype), None)  # a 0-d float32 norm times a 0-d mean promotes
