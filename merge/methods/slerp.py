"""SLERP: spherical linear interpolation between two models (Shoemake 1985, "Animating rotation
with quaternion curves"), per tensor over its flattened weights, as mergekit's ``slerp``:
v0 is the base, v1 the other model, t the interpolation factor. Norms and the angle are computed
in float32 (float64 for float64 inputs) on the normalized vectors; near-colinear or antipodal
pairs (|cos| > 0.9995) fall back to linear interpolation; zero-norm vectors are treated as norm 1.

Run: python -m pytest tests/merge/test_methods.py -q -k slerp
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mergeline.merge.cpu import chunk_size, run_chunks
from mergeline.merge.methods.common import check_inputs, flat, work_dtype
from mergeline.merge.methods.linear import delta_stats
from mergeline.merge.methods.stats import MethodResult

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _sums(a: Tensor, b: Tensor, fn) -> list[float]:
    """Sum ``fn(x, y)`` (a tuple of scalars) over work-dtype chunks of a and b, in parallel."""
    wd, C = work_dtype(a.dtype), chunk_size(a)

    class Worker:
        def __init__(self) -> None:
            self.buf = torch.empty(2, C, dtype=wd, device=a.device)
            self.acc = torch.zeros(3, dtype=torch.float64, device=a.device)

        def __call__(self, s: int, e: int) -> None:
            x, y = self.buf[0, : e - s].copy_(a[s:e]), self.buf[1, : e - s].copy_(b[s:e])
            self.acc = self.acc + torch.stack(fn(x, y)).double()

    return sum(w.acc for w in run_chunks(a.numel(), C, Worker, a.device)).tolist()


def slerp_coefficients(t: float, v0: Tensor, v1: Tensor) -> tuple[float, float]:
    """(c0, c1) with result = c0 * v0 + c1 * v1."""
    wd = work_dtype(v0.dtype)
    a, b = flat(v0), flat(v1)
    norm_a, norm_b, dot = _sums(a, b, lambda x, y: (x.dot(x), y.dot(y), x.dot(y)))
    norm_a, norm_b = math.sqrt(norm_a), math.sqrt(norm_b)
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
    if abs(dot) > DOT_THRESHOLD:  # nearly colinear: the angle is ill-conditioned, so lerp
        return 1 - t, t
    # coefficients in the work dtype, as mergekit computes them (keeps parity at ~1 ulp)
    theta, tt = torch.acos(torch.tensor(dot, dtype=wd)), torch.tensor(t, dtype=wd)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - tt) * theta) / sin_theta), float(torch.sin(tt * theta) / sin_theta)


def slerp(base: Tensor, models: list[Tensor], model_params: list, params, *,
          generator: torch.Generator | None = None, thresholds: list[float] | None = None):
    """``base`` is v0 and ``models == [v1]``."""
    check_inputs("slerp", base, models, need_base=True)
    if len(models) != 1:
        raise ValueError(f"slerp merges exactly two models (base + one), got base + {len(models)}")
    c0, c1 = slerp_coefficients(params.t, base, models[0])
    wd = work_dtype(base.dtype)
    a, b = flat(base), flat(models[0])
    out = torch.empty_like(a)
    C = chunk_size(a)

    def make_worker():
        buf = torch.empty(2, C, dtype=wd, device=a.device)

        def work(s: int, e: int) -> None:
            # copies: never in place on the borrowed inputs; two products then a sum, like mergekit
            x, y = buf[0, : e - s].copy_(a[s:e]).mul_(c0), buf[1, : e - s].copy_(b[s:e]).mul_(c1)
            out[s:e].copy_(x.add_(y))

        return work

    run_chunks(a.numel(), C, make_worker, a.device)
    return MethodResult(out.reshape(base.shape), delta_stats(base, models, [1.0]))
