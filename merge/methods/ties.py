"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Task arithmetic (Ilharco et al. 2022, arXiv:2212.04089) adds weighted task vectors
tau_i = theta_i - theta_0 to the base. TIES-Merging (Yadav et al. 2023, arXiv:2306.01708) first
1. Trims each tau_i to its largest-magnitude entries, 2. Elects a sign per coordinate from the
summed weighted trimmed vectors, 3. Disjoint-merges: averages only the entries agreeing with it.
DARE (arXiv:2311.03099), Model Breadcrumbs (arXiv:2312.06795) and DELLA (arXiv:2406.11617) swap
step 1 for another sparsifier (``sparsify.py``). Semantics follow mergekit 0.1.5's
``GeneralizedTaskArithmeticMerge``: weight before electing; elected sign + where the sum >= 0;
a zero contribution never agrees; normalize divides by the summed weights of the agreeing models
(0 -> 1); then lambda; then base + mixed, rounded to the base dtype. One deliberate difference:
TIES keeps exactly k = max(1, int(density * numel)) entries per tensor, and entries tied at the
k-th magnitude are kept by lowest flat index (mergekit leaves that to argsort's order); see
``select.py``. With ``thresholds`` (whole-model trimming, the paper's variant) an entry is kept
iff |delta| >= its model's threshold. bf16/fp16 inputs are computed in fp32 chunks rounded where
mergekit's own bf16 ops round, so results are bit-identical to mergekit's away from such ties.

Sign choice (TIES only; the paper, sec. 7 and appendix, shows that a sign vector estimated from
validation data beats the magnitude election). ``sign_choices: {GROUP: elected | MODEL}`` fixes
step 2 per layer group: ``elected`` keeps the magnitude election; a model's name (its folder's
name, as in merge statistics) takes that model's own signs (of its trimmed, weighted delta) where
it kept an entry, and the elected sign where it kept none. Groups, by tensor name (``group_of``):
``embeddings`` (token and position embeddings), ``layers.A-B`` (decoder layers A to B inclusive,
``layers.A`` for one), ``head`` (everything after the layers: final norm, lm_head). A tensor whose
group is not listed keeps the election. ``sign_source: validation`` says the choices come from
the validation search of ``mergeline tune``; without ``sign_choices`` a merge refuses it.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, PrivateAttr
from torch import Tensor

from mergeline.merge.cpu import chunk_size, empty_huge, run_chunks
from mergeline.merge.methods import select, sparsify
from mergeline.merge.methods.common import Rounder, check_inputs, compute_delta, flat, work_dtype
from mergeline.merge.methods.stats import MethodResult, ModelStats, TensorStats
from mergeline.merge.parameters import layer_index, layer_key

ELECTED = "elected"
_GROUP_RE = re.compile(r"^(embeddings|head|layers\.(\d+)(?:-(\d+))?)$")


def group_of(name: str, groups) -> str | None:
    """The key of ``groups`` (sign_choices' keys) holding tensor ``name``, or None. A tensor outside
    the decoder layers is in ``embeddings`` if it is one (merge/parameters.py ``layer_key``), else
    in ``head`` (final norm, lm_head)."""
    idx = layer_index(name)
    if idx is None:
        group = "embeddings" if layer_key(name) == "embed" else "head"
        return group if group in groups else None
    return next((g for g in groups if (span := _span(g)) and span[0] <= idx <= span[1]), None)


def _span(group: str) -> tuple[int, int] | None:
    """``layers.A-B`` -> (A, B), ``layers.A`` -> (A, A); ``embeddings``, ``head`` -> None."""
    m = _GROUP_RE.match(group)
    return (int(m.group(2)), int(m.group(3) or m.group(2))) if m and m.group(2) is not None else None


def _check_groups(choices: dict[str, str] | None) -> dict[str, str] | None:
    """Group names as ``group_of`` reads them; layer ranges that do not overlap."""
    spans: list[tuple[int, int]] = []
    for g in choices or {}:
        if _GROUP_RE.match(g) is None:
            raise ValueError(f"sign_choices: group {g!r} is not embeddings, head, layers.A or layers.A-B")
        if (span := _span(g)) is not None:
            lo, hi = span
            if hi < lo or any(lo <= b and a <= hi for a, b in spans):
                raise ValueError(f"sign_choices: group {g!r} is empty or overlaps another")
            spans.append((lo, hi))
    return choices


class _GroupKeys(AfterValidator):
    def __str__(self) -> str:  # as a recipe error's "allowed:" shows it
        return "groups embeddings, head, layers.A or layers.A-B (not overlapping)"


class SignChoice(BaseModel):
    """TIES' sign parameters (global). ``for_tensor`` binds them to one tensor: ``sign_from`` is
    then the index of the model whose signs it takes, or None for the magnitude election."""

    model_config = ConfigDict(extra="forbid")
    sign_source: Literal["magnitude", "validation"] = "magnitude"
    # the check is in the type, so a recipe check (which validates the type) refuses a bad group
    sign_choices: Annotated[dict[str, str] | None, _GroupKeys(_check_groups)] = None
    _sign_from: int | None = PrivateAttr(default=None)

    @property
    def sign_from(self) -> int | None:
        return self._sign_from

    def for_tensor(self, name: str, models: list[str]) -> "SignChoice":
        """Bind to tensor ``name``; ``models`` are the merged models' names in the method's order."""
        if self.sign_choices is None:
            if self.sign_source == "validation":
                raise ValueError("parameters.sign_source: validation needs the recorded sign_choices; run "
                                 "`mergeline tune PIPELINE` (it has the validation data) and merge its best_recipe.yaml")
            return self
        for g, choice in self.sign_choices.items():
            if choice != ELECTED and choice not in models:
                raise ValueError(f"parameters.sign_choices.{g}: {choice!r} is neither {ELECTED!r} nor a merged "
                                 f"model (models: {', '.join(models)})")
        group = group_of(name, self.sign_choices)
        choice = self.sign_choices[group] if group else ELECTED
        self._sign_from = None if choice == ELECTED else models.index(choice)
        return self


def make_sparsifier(kind: str | None, delta: Tensor, p, shape, generator, threshold: float | None, hist=None):
    """Step 1's keep-mask for one model's flat delta."""
    if threshold is not None:
        if kind != "magnitude":
            raise ValueError(f"whole-model thresholds need magnitude trimming, not {kind!r}")
        return sparsify.AtLeast(threshold)
    if kind is None:
        return sparsify.KeepAll()
    if kind == "magnitude":
        return sparsify.magnitude(delta, p.density, hist)
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
    if base is not None and not models:  # nothing to merge into the base, as mergekit
        return MethodResult(base.clone(), None)
    check_inputs(name, base, models, need_base=True)
    if len(model_params) != len(models):
        raise ValueError(f"{name}: {len(models)} models but {len(model_params)} parameter sets")
    b = flat(base)
    hists = [None] * len(models)
    if sparsification == "magnitude" and not thresholds and b.device.type == "cpu" and b.element_size() == 2:
        deltas, hists = select.deltas_with_histograms(b, models)
    else:
        deltas = [compute_delta(b, m) for m in models]

    # 1. Trim: a keep-mask per model (and mergekit's optional L1 rescale of the survivors)
    masks = [
        make_sparsifier(sparsification, d, p, base.shape, generator, thresholds[i] if thresholds else None, h)
        for i, (d, p, h) in enumerate(zip(deltas, model_params, hists))
    ]
    scales = [sparsify.l1_rescale(d, m) if params.rescale else 1.0 for d, m in zip(deltas, masks)]
    out, stats = _merge_chunks(b, deltas, masks, model_params, scales, params, consensus)
    return MethodResult(out.reshape(base.shape), stats)


def _merge_chunks(b: Tensor, deltas: list[Tensor], masks: list, model_params: list, scales: list[float],
                  params, consensus: bool) -> tuple[Tensor, TensorStats]:
    """Steps 1-3 fused over cache-sized chunks (``run_chunks``: one worker per core)."""
    dtype, dev, n = b.dtype, b.device, len(deltas)
    wd = work_dtype(dtype)
    rnd = Rounder(dtype, n, 1, dev)
    # weights are rounded to the compute dtype, as mergekit builds them with the deltas' dtype
    w = torch.tensor([p.weight for p in model_params], dtype=dtype, device=dev).to(wd).reshape(n, 1)
    scale = torch.tensor(scales, dtype=dtype, device=dev).to(wd).reshape(n, 1)
    weight_sum = float(rnd(w.sum(0)))
    job = _Job(b, deltas, masks, w, scale if any(x != 1.0 for x in scales) else None, params, consensus,
               divisor_all=1.0 if abs(weight_sum) < 1e-8 else weight_sum, out=_empty_out(b))
    C = chunk_size(b, MERGE_CHUNK)
    workers = run_chunks(b.numel(), C, lambda: _Worker(job, C), dev)
    acc = sum(wk.acc for wk in workers)
    pos = torch.nan_to_num(sum(wk.pos for wk in workers)).round()  # NaN inputs: no count
    # 16-bit top-k selections already know their kept counts and magnitudes (from the histogram)
    if job.counted:
        acc[0] = torch.tensor([float(m.kept_nonzero) for m in masks], dtype=torch.float64)
        acc[1] = torch.tensor([m.kept_magnitude for m in masks], dtype=torch.float64)
    return job.out, _stats(b.numel(), acc.tolist(), pos.tolist(), w, scale, consensus)


def _empty_out(b: Tensor) -> Tensor:
    return empty_huge(b.numel(), b.dtype) if b.device.type == "cpu" else torch.empty_like(b)


# Chunk of the fused merge pass on CPU: twice common.CHUNK, because its ~50 small ops per chunk
# each hold the GIL for their Python overhead and the two workers queue for it (measured on two
# workers: 2^16 -> 2^17 took the pass from 13.8-15.0 to 9.2-11.3 ns/position; 2^18 was slower).
MERGE_CHUNK = 1 << 17


@dataclass
class _Job:
    b: Tensor
    deltas: list[Tensor]
    masks: list
    w: Tensor
    scale: Tensor | None
    params: object
    consensus: bool
    divisor_all: float
    out: Tensor

    @property
    def sign_from(self) -> int | None:
        return getattr(self.params, "sign_from", None)

    @property
    def counted(self) -> bool:
        return all(getattr(m, "kept_magnitude", None) is not None for m in self.masks)


class _Worker:
    """One thread's scratch and accumulators; ``__call__(s, e)`` merges flat positions [s, e).

    Signs are handled arithmetically: with g = the elected sign (+-1), a weighted contribution x
    agrees iff x * g > 0, so clamp(x * g, min=0) holds exactly the agreeing magnitudes.
    Only float elementwise ops over rows: torch's reductions over dim 0 of an (n, C) tensor,
    ``aminmax`` and bool compare/sum ops cost 5-50x more per element here (measured, CPU); the
    rows are summed in index order, as ``torch.sum(dim=0)`` does, so results are unchanged.
    """

    def __init__(self, job: _Job, C: int) -> None:
        b, n, dev = job.b, len(job.deltas), job.b.device
        wd = work_dtype(b.dtype)
        self.job, self.counted, self.rnd = job, job.counted, Rounder(b.dtype, n, C, dev)
        self.D, self.X = torch.empty(n, C, dtype=wd, device=dev), torch.empty(n, C, dtype=wd, device=dev)
        self.B, self.S, self.M, self.Y = (torch.empty(C, dtype=wd, device=dev) for _ in range(4))
        # per model: kept, kept |d|, agreeing, agreeing |weighted d|; per tensor: conflicts, with kept
        self.acc = torch.zeros(4, n, dtype=torch.float64, device=dev)
        self.pos = torch.zeros(2, dtype=torch.float64, device=dev)

    def __call__(self, s: int, e: int) -> None:
        job, rnd, acc, pos, L = self.job, self.rnd, self.acc, self.pos, e - s
        d, x, bb, mixed = self.D[:, :L], self.X[:, :L], self.B[:L], self.M[:L]
        bb.copy_(job.b[s:e])
        # 1. Trim
        for i, (delta, mask) in enumerate(zip(job.deltas, job.masks)):
            mask.trim(x[i].copy_(delta[s:e]), s, out=d[i])
        if not self.counted:
            acc[0] += _indicator(torch.abs(d, out=x)).sum(1)  # nonzero survivors (exact: chunk < 2^24)
            acc[1] += torch.abs(d, out=x).sum(1)
        if job.scale is not None:
            rnd(d.mul_(job.scale))
        rnd(d.mul_(job.w))  # weight before electing, as mergekit does
        if job.consensus:
            # 2. Elect sign: + where the summed weighted trimmed deltas are >= 0 (sign(0) -> +)
            g = _row_sum(d, self.S[:L]).sign_().add_(0.5).sign_()
            if job.sign_from is not None:  # a chosen model's own signs where it kept an entry
                own = torch.sign(d[job.sign_from], out=self.Y[:L])
                g.mul_(torch.abs(own, out=x[0]).neg_().add_(1)).add_(own)
            # 3. Disjoint merge: keep only contributions agreeing with g (a zero never agrees)
            d.mul_(g)
            pos[0] -= _row_min(d, self.Y[:L]).clamp_(max=0).sign_().sum()  # someone disagrees: a conflict
            d.clamp_(min=0)  # the agreeing magnitudes
            q = _indicator(torch.clamp(d, max=1, out=x))  # 1 where agreeing, else 0
            pos[1] += _row_sum(q, self.Y[:L]).sign_().sum()  # an agreeing contribution exists
            acc[2] += q.sum(1)
            acc[3] += d.sum(1)
            rnd(_row_sum(d, mixed).mul_(g))
            if job.params.normalize:
                divisor = rnd(_row_sum(q.mul_(job.w), self.S[:L]))
                # no agreeing weight: divide by 1 (divisor - (sign|divisor| - 1) adds 1 only at 0)
                divisor.sub_(torch.abs(divisor, out=self.Y[:L]).sign_().sub_(1))
                rnd(mixed.div_(divisor))
        else:
            nonzero = _indicator(torch.abs(d, out=x))
            pos[1] += _indicator(_row_sum(nonzero, self.Y[:L])).sum()
            # two kept signs conflict where both some entry > 0 and some entry < 0
            pos[0] += torch.minimum(_indicator(_row_max(d, self.Y[:L])),
                                    _indicator(_row_min(d, self.S[:L]).neg_())).sum()
            rnd(_row_sum(d, mixed))
            if job.params.normalize:
                rnd(mixed.div_(job.divisor_all))
        if job.params.lambda_ != 1:
            rnd(mixed.mul_(job.params.lambda_))
        job.out[s:e].copy_(bb.add_(mixed))


def _fold(op, x: Tensor, out: Tensor) -> Tensor:
    """op(...op(op(x[0], x[1]), x[2])..., x[-1]) into ``out``, one row at a time in index order."""
    op(x[0], x[1], out=out) if x.shape[0] > 1 else out.copy_(x[0])
    for row in x[2:]:
        op(out, row, out=out)
    return out


def _row_sum(x: Tensor, out: Tensor) -> Tensor:
    """x[0] + x[1] + ... in row order (torch.sum(x, 0) for fp32, without its strided reduction)."""
    return _fold(torch.add, x, out)


def _row_min(x: Tensor, out: Tensor) -> Tensor:
    return _fold(torch.minimum, x, out)


def _row_max(x: Tensor, out: Tensor) -> Tensor:
    return _fold(torch.maximum, x, out)


def _indicator(x: Tensor) -> Tensor:
    """In place: 1 where x > 0, else 0 (NaN stays NaN): clamp to [0, 1], then ceil."""
    return x.clamp_(0, 1).ceil_()


def _stats(numel: int, acc: list, pos: list, w: Tensor, scale: Tensor, consensus: bool) -> TensorStats:
    stats = TensorStats(numel=numel, conflict_positions=int(pos[0]), positions_with_kept=int(pos[1]))
    for i, (kept, kept_mag) in enumerate(zip(acc[0], acc[1])):
        ms = ModelStats(numel=numel, kept=int(kept), kept_magnitude=kept_mag)
        if consensus:
            ms.dropped_by_election = int(kept - acc[2][i])
            # agreeing magnitudes were summed weighted (and rescaled): undo both for an unweighted share
            factor = abs(float(w[i, 0]) * float(scale[i, 0]))
            ms.dropped_magnitude = max(0.0, kept_mag - (acc[3][i] / factor if factor else 0.0))
        stats.models.append(ms)
    return stats
