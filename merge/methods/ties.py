"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Task arithmetic (Ilharco et al. 2022, arXiv:2212.04089) adds weighted task vectors
tau_i = theta_i - theta_0 to the base. TIES-Merging (Yadav et al. 2023, arXiv:2306.01708) first
1. Trims each tau_i to its largest-magnitude entries, 2. Elects a sign per coordinate from the
summed weighted trimmed vectors, 3. Disjoint-merges: averages only the entries agreeing with it.
DARE (arXiv:2311.03099), Model Breadcrumbs (arXiv:2312.06795) and DELLA (arXiv:2406.11617) swap
step 1 for another sparsifier (``sparsify.py``). Semantics follow mergekit 0.1.5's
``GeneralizedTaskArithmeticMerge``: weight before electing; elected sign + where the sum >= 0;
a zero contribution never agrees; normalize divides by the summed weights of the agreeing models
(0 -> 1); then lambda; then base + mixed, rounded to the base dtype.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

import torch
from torch import Tensor

from merge.methods import sparsify
from merge.methods.common import CHUNK, Rounder, check_inputs, compute_delta, flat, spans, work_dtype
from merge.methods.stats import ModelStats, TensorStats


def make_sparsifier(kind: str | None, delta: Tensor, p, shape, generator, threshold: float | None):
    """Step 1's keep-mask for one model's flat delta."""
    if threshold is not None:
        if kind != "magnitude":
            raise ValueError(f"whole-model thresholds need magnitude trimming, not {kind!r}")
        return sparsify.AtLeast(threshold)
    if kind is None:
        return sparsify.KeepAll()
    if kind == "magnitude":
        return sparsify.magnitude(delta, p.density)
    if kind == "random":
        return sparsify.random(delta, p.density, generator)
    if kind == "magnitude_outliers":
        return sparsify.magnitude_outliers(delta, p.density, p.gamma)
    if kind == "della_magprune":
        return sparsify.della_magprune(delta, p.density, p.epsilon, generator, shape)
    raise ValueError(f"unknown sparsification {kind!r}")


def generalized_task_arithmetic(
    base: Tensor,
    models: list[Tensor],
    model_params: list,
    params,
    *,
    name: str,
    sparsification: str | None,
    consensus: bool,
    generator: torch.Generator | None = None,
    thresholds: list[float] | None = None,
):
    from merge.methods.registry import MethodResult

    check_inputs(name, base, models, need_base=True)
    if len(model_params) != len(models):
        raise ValueError(f"{name}: {len(models)} models but {len(model_params)} parameter sets")
    dtype, n, numel = base.dtype, len(models), base.numel()
    rnd, wd = Rounder(dtype), work_dtype(dtype)
    b = flat(base)
    deltas = [compute_delta(b, m) for m in models]

    # 1. Trim: a keep-mask per model (and mergekit's optional L1 rescale of the survivors)
    masks = [
        make_sparsifier(sparsification, d, p, base.shape, generator, thresholds[i] if thresholds else None)
        for i, (d, p) in enumerate(zip(deltas, model_params))
    ]
    scales = [sparsify.l1_rescale(d, m) if params.rescale else 1.0 for d, m in zip(deltas, masks)]
    # weights are rounded to the compute dtype, as mergekit builds them with the deltas' dtype
    w = torch.tensor([p.weight for p in model_params], dtype=dtype).to(wd).reshape(n, 1)
    scale = torch.tensor(scales, dtype=dtype).to(wd).reshape(n, 1)
    rescaled = any(s != 1.0 for s in scales)
    weight_sum = float(rnd(w.sum(0)))
    divisor_all = 1.0 if abs(weight_sum) < 1e-8 else weight_sum

    out = torch.empty_like(b)
    C = min(CHUNK, numel)
    D, A = torch.empty(n, C, dtype=wd), torch.empty(n, C, dtype=wd)
    K, G = torch.empty(n, C, dtype=torch.bool), torch.empty(n, C, dtype=torch.bool)
    B = torch.empty(C, dtype=wd)
    acc = torch.zeros(5, n, dtype=torch.float64)  # kept, kept_mag, agree, agree_mag(weighted), -
    conflicts = with_kept = 0
    for s, e in spans(numel):
        L = e - s
        d, a, keep, agree, bb = D[:, :L], A[:, :L], K[:, :L], G[:, :L], B[:L]
        bb.copy_(b[s:e])
        for i in range(n):
            d[i].copy_(deltas[i][s:e])
            torch.abs(d[i], out=a[i])
            masks[i].mask(a[i], s, out=keep[i])
        # 1. Trim
        d.mul_(keep)
        acc[0] += torch.count_nonzero(d, dim=1)
        acc[1] += torch.linalg.vector_norm(d, ord=1, dim=1)
        if rescaled:
            rnd(d.mul_(scale))
        rnd(d.mul_(w))  # weight before electing, as mergekit does
        nonzero = torch.count_nonzero(d, dim=0)
        with_kept += int((nonzero > 0).sum())
        if consensus:
            # 2. Elect sign: + where the summed weighted trimmed deltas are >= 0
            sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).to(wd)
            # 3. Disjoint merge: only contributions with the elected sign (a zero never agrees)
            d.mul_(sign)
            torch.gt(d, 0, out=agree)
            agreeing = agree.sum(0)
            conflicts += int((nonzero > agreeing).sum())
            acc[2] += agree.sum(1)
            d.clamp_(min=0)
            acc[3] += d.sum(1)
            mixed = rnd(d.sum(0).mul_(sign))
            if params.normalize:
                a.copy_(agree).mul_(w)
                divisor = rnd(a.sum(0))
                rnd(mixed.div_(divisor.masked_fill_(divisor == 0, 1)))
        else:
            conflicts += int(((d > 0).any(0) & (d < 0).any(0)).sum())
            mixed = rnd(d.sum(0))
            if params.normalize:
                rnd(mixed.div_(divisor_all))
        if params.lambda_ != 1:
            rnd(mixed.mul_(params.lambda_))
        out[s:e].copy_(bb.add_(mixed))

    kept = acc[0].tolist()
    kept_mag = acc[1].tolist()
    stats = TensorStats(numel=numel, conflict_positions=conflicts, positions_with_kept=with_kept)
    for i in range(n):
        ms = ModelStats(numel=numel, kept=int(kept[i]), kept_magnitude=kept_mag[i])
        if consensus:
            ms.dropped_by_election = int(kept[i] - acc[2, i])
            # agreeing magnitude was summed weighted and rescaled: undo both for the unweighted share
            factor = abs(float(w[i, 0]) * float(scale[i, 0]))
            agree_mag = float(acc[3, i]) / factor if factor else 0.0
            ms.dropped_magnitude = max(0.0, kept_mag[i] - agree_mag)
        stats.models.append(ms)
    return MethodResult(out.reshape(base.shape), stats)
