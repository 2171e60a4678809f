"""Base-delta norms: how far each model moved from the base, and in which direction.

Task vectors tau_i = theta_i - theta_0 (Ilharco et al., 2023, arXiv:2212.04089; TIES,
Yadav et al., 2023, arXiv:2306.01708). A genuine fine-tune moves a few percent of the base's
norm; an unrelated initialisation of the same architecture sits near sqrt(2). Streamed in
chunks of one tensor (all models together) from the memory-mapped files: per chunk, the Gram
matrix of [tau_1 .. tau_k, theta_0] (`gram.py`) yields every squared norm (diagonal) and
pairwise dot product (off-diagonal) at once, so cosine similarities cost no extra pass.
`mergeline check` reads the files itself (`stream_norms`); `mergeline merge` feeds the tensors
its own streaming read holds (merge/executor.py) to the same `NormAccumulator`: one
implementation, the same figures.

The flags use the relative delta over weight MATRICES only (`relative_delta_matrices`):
norm weights initialised to ones are shared by any two models of an architecture and, in
small models, dominate the base's norm, hiding a different base behind a ratio that looks
like a fine-tune. Over matrices, an unrelated base sits near sqrt(2) at any size.

    python -m benchmarks.bench_compat BASE MODEL [MODEL ...]
"""
from __future__ import annotations

import math
from typing import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mergeline.merge.checkpoint import DTYPES, Checkpoint
from mergeline.merge.cpu import cpu_workers, worker_pool

from .policy import NormsPolicy
from .report import Check


@dataclass
class NormResult:
    models: list[str]
    gram: torch.Tensor  # (k, k) float64: sum over tensors of <tau_i, tau_j>
    base_sq: float  # sum over tensors of ||theta_0||^2
    # Over tensors with 2+ dimensions, (k+1)-square: rows/columns 0..k-1 the task vectors,
    # k the base itself, so <tau_i, theta_0> is there too.
    gram_2d: torch.Tensor | None = None
    per_tensor: dict[str, dict] = field(default_factory=dict)
    nonfinite: list[dict] = field(default_factory=list)  # {tensor, model, nan, inf}
    tensors: int = 0
    numel: int = 0

    def delta_norm(self, i: int) -> float:
        return math.sqrt(max(float(self.gram[i, i]), 0.0))

    @property
    def base_norm(self) -> float:
        return math.sqrt(self.base_sq)

    def relative(self, i: int) -> float:
        """||tau_i|| / ||theta_0|| over every tensor (the reported figure)."""
        return self.delta_norm(i) / self.base_norm if self.base_norm > 0 else math.inf

    def relative_matrices(self, i: int) -> float:
        k = len(self.models)
        if self.gram_2d is None or self.gram_2d[k, k] <= 0:
            return self.relative(i)  # no matrices (odd checkpoint): fall back to all tensors
        return math.sqrt(max(float(self.gram_2d[i, i]), 0.0) / float(self.gram_2d[k, k]))

    def weight_cosine(self, i: int) -> float | None:
        """cos(theta_i, theta_0) over weight matrices: ~0 for an unrelated initialisation,
        still high for a fine-tune that moved far (base + an orthogonal tau of equal norm: 0.71)."""
        k = len(self.models)
        if self.gram_2d is None:
            return None
        bb, dd, db = (float(self.gram_2d[a, b]) for a, b in ((k, k), (i, i), (i, k)))
        denom = math.sqrt(bb) * math.sqrt(max(dd + 2 * db + bb, 0.0))
        return (bb + db) / denom if denom > 0 else None

    def cosine(self, i: int, j: int) -> float | None:
        denom = self.delta_norm(i) * self.delta_norm(j)
        return float(self.gram[i, j]) / denom if denom > 0 else None

    def to_dict(self) -> dict:
        per_model = {m: {"delta_norm": self.delta_norm(i), "base_norm": self.base_norm,
                         "relative_delta": _num(self.relative(i)),
                         "relative_delta_matrices": _num(self.relative_matrices(i)),
                         "weight_cosine": _num(self.weight_cosine(i))} for i, m in enumerate(self.models)}
        cosine = {a: {b: _num(self.cosine(i, j)) for j, b in enumerate(self.models)}
                  for i, a in enumerate(self.models)}
        return {"per_model": per_model, "cosine": cosine, "per_tensor": self.per_tensor,
                "tensors": self.tensors, "numel": self.numel}


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


class NormAccumulator:
    """Sums each tensor's Gram matrix into a `NormResult`: the one place the norm statistics are
    added up, fed by `stream_norms` (`mergeline check`, its own read) and by the merge's own
    streaming read (merge/executor.py), so both report the same figures.

    A tensor is split into slabs of `chunk` elements (a LoRA-adapted tensor, in `whole`, is one
    slab: it is built whole on each read); slab Gram matrices are summed in slab order, so the
    same tensor gives the same bits whichever caller feeds it.
    """

    def __init__(self, models: list[str], chunk: int = 1 << 22, whole: set[str] | frozenset = frozenset()):
        k = len(models)
        self.result = NormResult(list(models), torch.zeros(k, k, dtype=torch.float64), 0.0,
                                 gram_2d=torch.zeros(k + 1, k + 1, dtype=torch.float64))
        self.chunk, self.whole = chunk, set(whole)

    def spans(self, name: str, numel: int) -> list[tuple[int, int]]:
        step = max(numel, 1) if name in self.whole else self.chunk
        return [(s, min(s + step, numel)) for s in range(0, numel, step)]

    def add(self, name: str, models: list[torch.Tensor], base: torch.Tensor) -> None:
        """One tensor of every model (in `result.models` order) and of the base, as read."""
        from .gram import slab_gram  # numba: imported by the first caller (the merge's norm thread)

        flat = [t.reshape(-1) for t in (*models, base)]
        g = np.zeros((len(flat), len(flat)))
        for s, e in self.spans(name, base.numel()):
            g += slab_gram([t[s:e] for t in flat])
        self.add_gram(name, g, lambda: (base, dict(zip(self.result.models, models))), base.dim() >= 2, base.numel())

    def add_gram(self, name: str, g: np.ndarray, tensors: Callable[[], tuple[torch.Tensor, dict]],
                 is_matrix: bool, numel: int) -> None:
        """A tensor's summed Gram matrix; `tensors()` gives (base, {model: tensor}) to name the
        NaN/Inf when the sums are not finite (rare: only then are the tensors looked at again)."""
        gt = torch.from_numpy(g)
        bad = [] if torch.isfinite(gt).all() else _find_nonfinite(name, *tensors())
        _accumulate(self.result, name, gt, bad, is_matrix, numel)


def stream_norms(base: Checkpoint, models: dict[str, Checkpoint], names: list[str],
                 chunk: int = 1 << 22, threads: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> NormResult:
    """Accumulate delta norms and dot products over `names` (all present with equal shapes).

    Each tensor is split into chunks of `chunk` elements, and `threads` Python threads (default:
    torch's thread count) run the fused Gram kernel (`gram.slab_gram`, which releases the GIL)
    on one chunk at a time, so a large embedding does not leave one thread working alone.
    Tensors are memory-mapped: only the chunk being read is touched. `on_progress(done, total)`
    is called (in this thread) with the base's elements compared so far, for a progress bar.
    """
    from .gram import slab_gram  # numba, only where a norm pass runs

    keys = list(models)
    infos = base.infos()
    for m in models.values():
        m.infos()  # open every shard here, not concurrently in the workers
    weights = norm_tensors(infos, names)
    adapted = set().union(*(c.adapter.names() for c in [base, *models.values()] if c.adapter is not None))
    acc = NormAccumulator(keys, chunk, adapted)
    jobs = [(n, s, e) for n in weights for s, e in acc.spans(n, infos[n].numel)]

    def work(job: tuple[str, int, int]) -> np.ndarray:
        name, s, e = job
        rows = [models[m].get(name).reshape(-1)[s:e] for m in keys] + [base.get(name).reshape(-1)[s:e]]
        return slab_gram(rows)

    grams = {n: np.zeros((len(keys) + 1, len(keys) + 1)) for n in weights}
    workers = threads or cpu_workers()
    # The kernel is numba's, but dtypes other than bf16/float32 are widened by torch: one torch
    # thread per worker (that thread's own setting: merge/cpu.py), or torch's intra-op threads
    # fight the workers for the cores.
    total, done = sum(e - s for _, s, e in jobs), 0
    with worker_pool(workers) as pool:
        for (name, s, e), g in zip(jobs, pool.map(work, jobs)):
            grams[name] += g
            done += e - s
            if on_progress is not None:
                on_progress(done, total)
    for name in weights:
        acc.add_gram(name, grams[name], lambda name=name: (base.get(name), {m: models[m].get(name) for m in keys}),
                     len(infos[name].shape) >= 2, infos[name].numel)
    return acc.result


def norm_tensors(infos: dict, names: list[str]) -> list[str]:
    """The tensors the norms cover among `names`: floating point in the base (integer buffers
    such as position ids are not weights)."""
    return [n for n in names if _is_float(infos[n].dtype)]


def _is_float(dtype: str) -> bool:
    """A safetensors dtype name (or a pickled tensor's torch dtype name) is a floating type."""
    known = DTYPES.get(dtype)
    return known.is_floating_point if known is not None else dtype.removeprefix("torch.").startswith(("F", "BF", "float", "bfloat"))


def _accumulate(res: NormResult, name: str, g: torch.Tensor, bad: list[dict], is_matrix: bool, numel: int) -> None:
    k = len(res.models)
    if bad:
        res.nonfinite += bad
        return  # keep the totals meaningful for the other flags
    if is_matrix:
        res.gram_2d += g
    bsq, g = float(g[k, k]), g[:k, :k]
    res.gram += g
    res.base_sq += bsq
    res.tensors += 1
    res.numel += numel
    bn = math.sqrt(bsq)
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(k)]
    res.per_tensor[name] = {"base_norm": bn, **{
        m: {"delta_norm": norms[i], "relative_delta": _num(norms[i] / bn) if bn > 0 else None}
        for i, m in enumerate(res.models)}}


def _find_nonfinite(name: str, base: torch.Tensor, models: dict[str, torch.Tensor]) -> list[dict]:
    found = []
    for who, t in {"base": base, **models}.items():
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            found.append({"tensor": name, "model": who, "nan": nan, "inf": inf})
    if not found:  # values finite but their squares overflow float32
        found.append({"tensor": name, "model": "?", "nan": 0, "inf": 0, "note": "norm overflows float32"})
    return found


def norm_checks(res: NormResult, policy: NormsPolicy) -> list[Check]:
    """The flags: NaN/Inf, identical to the base, too large, unrelated, outlier, duplicate."""
    rel = {m: res.relative_matrices(i) for i, m in enumerate(res.models)}
    checks = []
    if res.nonfinite:
        ex = ", ".join(f"{d['tensor']} in {d['model']} ({d['nan']} NaN, {d['inf']} Inf)" for d in res.nonfinite[:3])
        checks.append(Check("norms.finite", "fail", f"non-finite values: {ex}", {"nonfinite": res.nonfinite}))
    else:
        checks.append(Check("norms.finite", "pass", f"no NaN or Inf in {res.tensors} tensors"))

    same = {m: res.relative(i) for i, m in enumerate(res.models) if res.relative(i) <= policy.identical_tolerance}
    checks.append(Check("norms.identical", "fail", f"identical to the base (nothing to merge): {', '.join(same)}",
                        {"relative_delta": same}) if same else
                  Check("norms.identical", "pass", "every model differs from the base"))

    big = {m: r for m, r in rel.items() if r > policy.max_relative_delta}
    if big:
        ex = ", ".join(f"{m} {r:.3g}" for m, r in big.items())
        checks.append(Check("norms.too_large", "fail",
                            f"relative delta (weight matrices) above {policy.max_relative_delta}: not a fine-tune of "
                            f"this base? {ex}", {"relative_delta_matrices": rel, "threshold": policy.max_relative_delta}))
    else:
        checks.append(Check("norms.too_large", "pass",
                            "relative deltas (weight matrices) " + ", ".join(f"{m} {r:.3g}" for m, r in rel.items()),
                            {"relative_delta_matrices": rel, "threshold": policy.max_relative_delta}))
    checks.append(_unrelated(res, policy.min_weight_cosine))
    checks.append(_outliers(rel, policy.outlier_ratio))
    checks.append(_duplicates(res, policy.duplicate_cosine))
    return checks


def _unrelated(res: NormResult, threshold: float) -> Check:
    """A model whose weights are nearly orthogonal to the base's shares no init with it."""
    cos = {m: res.weight_cosine(i) for i, m in enumerate(res.models)}
    low = {m: c for m, c in cos.items() if c is not None and c < threshold}
    details = {"weight_cosine": cos, "threshold": threshold}
    if low:
        ex = ", ".join(f"{m} {c:.3g}" for m, c in low.items())
        return Check("norms.unrelated", "fail",
                     f"weights nearly orthogonal to the base's (cosine below {threshold}): another base? {ex}", details)
    shown = ", ".join(f"{m} {c:.3g}" for m, c in cos.items() if c is not None)
    return Check("norms.unrelated", "pass", f"weights aligned with the base (cosine {shown})", details)


def _outliers(rel: dict[str, float], threshold: float) -> Check:
    moved = {m: r for m, r in rel.items() if r > 0}
    if len(moved) < 2:
        return Check("norms.outlier", "skip", "needs at least two models that differ from the base")
    # Against the median of the OTHER models: a robust reference that the suspect cannot drag
    # towards itself. With two models the larger is compared with the smaller.
    ratios = {}
    for m, r in moved.items():
        others = sorted(v for n, v in moved.items() if n != m)
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        ratios[m] = r / median
    out = {m: x for m, x in ratios.items() if x > threshold}
    details = {"ratio_to_median_of_others": ratios, "threshold": threshold}
    if out:
        ex = ", ".join(f"{m} ({x:.3g}x the others)" for m, x in out.items())
        return Check("norms.outlier", "warn", f"relative delta is an outlier: {ex}", details)
    return Check("norms.outlier", "pass", f"relative deltas within {threshold}x of each other", details)


def _duplicates(res: NormResult, threshold: float) -> Check:
    dup = []
    for i in range(len(res.models)):
        for j in range(i + 1, len(res.models)):
            c, ni, nj = res.cosine(i, j), res.delta_norm(i), res.delta_norm(j)
            if c is not None and c > threshold and abs(ni - nj) <= 1e-3 * max(ni, nj):
                dup.append([res.models[i], res.models[j]])
    if dup:
        return Check("norms.duplicate", "warn",
                     "same task vector twice: " + ", ".join(f"{a} = {b}" for a, b in dup), {"pairs": dup})
    return Check("norms.duplicate", "pass", "no two models share a task vector")
