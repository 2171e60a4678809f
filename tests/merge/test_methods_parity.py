"""Tensor-level parity with the real mergekit package (its own kernels via merge_tensors).

Random float32 data has no ties at the trim threshold, so TIES must match mergekit to 1e-6.

Run: python -m pytest tests/merge/test_methods_parity.py -q
"""
from __future__ import annotations

import pytest
import torch

from mergeline.merge.methods import get_method

mergekit_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit (test extra) not installed")

WEIGHTS, DENSITIES = [0.4, 0.3, -0.2], [0.2, 0.5, 0.35]


def inputs(shape, dtype=torch.float32, seed=0, scale=0.5):
    """Base + fine-tunes whose float32 deltas have no ties at any trim threshold used here
    (small deltas on a unit-scale base are quantized to its ulp and do tie; mergekit's argsort
    then picks an arbitrary one, we the lowest index)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in WEIGHTS]
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    if dtype == torch.float32:
        for m, d in zip(models, DENSITIES):
            mags = torch.sort((m - base).abs().reshape(-1), descending=True).values
            k = max(1, int(d * mags.numel()))
            assert k == mags.numel() or mags[k - 1] != mags[k], "test data has a tie at the threshold"
    return base, models


def ours(name, base, models, globals_, weights=WEIGHTS, densities=DENSITIES):
    m = get_method(name)
    per = [{"weight": w} | ({"density": d} if "density" in m.model_params.model_fields else {})
           for w, d in zip(weights, densities)]
    return m.fn(base, models, [m.model_params(**p) for p in per], m.global_params.model_validate(globals_)).tensor


def theirs(name, base, models, globals_, weights=WEIGHTS, densities=DENSITIES):
    params = {"weight": weights, "density": densities, **globals_}
    return mergekit_api.merge_tensors([base, *models], name, parameters=params, base_index=0)


GTA_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.8}),
    ("ties", {}),
    ("ties", {"normalize": False, "lambda": 1.3}),
    ("ties", {"rescale": True}),
    ("breadcrumbs", {}),
    ("breadcrumbs_ties", {}),
    ("breadcrumbs_ties", {"normalize": True}),
]


@pytest.mark.parametrize("shape", [(257, 129), (1000,), (3, 5, 7)])
@pytest.mark.parametrize("name,globals_", GTA_CASES)
def test_generalized_task_arithmetic_parity(name, globals_, shape):
    base, models = inputs(shape)
    torch.testing.assert_close(ours(name, base, models, globals_), theirs(name, base, models, globals_),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.5])
def test_breadcrumbs_gamma_parity(gamma):
    base, models = inputs((64, 64), seed=1)
    m = get_method("breadcrumbs")
    mp = [m.model_params(weight=w, density=d, gamma=gamma) for w, d in zip(WEIGHTS, DENSITIES)]
    got = m.fn(base, models, mp, m.global_params()).tensor
    ref = mergekit_api.merge_tensors([base, *models], "breadcrumbs", base_index=0,
                                     parameters={"weight": WEIGHTS, "density": DENSITIES, "gamma": gamma})
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_parity(normalize):
    base, models = inputs((300, 70), seed=2)
    weights = [0.1, 0.5, 0.2, 0.2]
    m = get_method("linear")
    got = m.fn(base, [base, *models], [m.model_params(weight=w) for w in weights],
               m.global_params(normalize=normalize)).tensor
    ref = mergekit_api.merge_tensors([base, *models], "linear",
                                     parameters={"weight": weights, "normalize": normalize})
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("far", [True, False])
def test_slerp_parity(t, far):
    base, models = inputs((200, 50), seed=3)
    other = torch.randn(200, 50, generator=torch.Generator().manual_seed(9)) if far else models[0]  # far: real angle
    m = get_method("slerp")
    got = m.fn(base, [other], [m.model_params()], m.global_params(t=t)).tensor
    ref = mergekit_api.merge_tensors([base, other], "slerp", parameters={"t": t}, base_index=0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ties", "task_arithmetic"])
def test_bf16_matches_mergekit_rounding(name):
    """bf16 compute: we upcast chunks but round where mergekit's bf16 ops round."""
    base, models = inputs((512, 256), dtype=torch.bfloat16, seed=4)
    got, ref = ours(name, base, models, {}), theirs(name, base, models, {})
    assert got.dtype == ref.dtype == torch.bfloat16
    # bit-identical except where an entry ties at a trim threshold (bf16 ties are common; which
    # of them survive is argsort's arbitrary order in mergekit, the lowest indices here)
    tied = torch.zeros(base.shape, dtype=torch.bool)
    if name != "task_arithmetic":
        for m, d in zip(models, DENSITIES):
            delta = (m - base).abs()
            k = max(1, int(d * delta.numel()))
            tied |= delta == torch.sort(delta.reshape(-1).float(), descending=True).values[k - 1]
        assert 0 < tied.sum() < 0.05 * base.numel()
    assert torch.equal(got[~tied], ref[~tied])


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "task_arithmetic"])
def test_parity_on_tensors_spanning_many_chunks(name):
    """Several fused chunks and worker threads; the tie cut falls inside a middle chunk."""
    from mergeline.merge.cpu import CHUNK

    base, models = inputs((CHUNK // 100 * 5 + 7, 100), seed=6)
    assert base.numel() > 4 * CHUNK
    torch.testing.assert_close(ours(name, base, models, {}), theirs(name, base, models, {}), rtol=0, atol=1e-6)


def test_bf16_tie_breaking_across_chunks_is_by_lowest_index():
    """Many bf16 ties at the threshold: exactly k kept, and the kept ties are the first ones."""
    from mergeline.merge.cpu import CHUNK

    g = torch.Generator().manual_seed(6)
    n = 5 * CHUNK + 11
    base = torch.zeros(n, dtype=torch.bfloat16)
    model = (torch.randint(1, 9, (n,), generator=g) * 0.125).bfloat16()  # 8 distinct magnitudes
    m = get_method("ties")
    out = m.fn(base, [model], [m.model_params(weight=1.0, density=0.3)], m.global_params())
    kept = out.tensor != 0
    k = int(0.3 * n)
    assert int(kept.sum()) == k == out.stats.models[0].kept
    mags = model.float().abs()
    t = float(torch.sort(mags, descending=True).values[k - 1])
    assert bool((mags[kept] >= t).all()) and bool(kept[mags > t].all())
    tie_idx = torch.nonzero(mags == t).flatten()
    kept_ties = kept[tie_idx]
    assert kept_ties[: int(kept_ties.sum())].all()  # a prefix of the tied positions
    assert 0 < int(kept_ties.sum()) < tie_idx.numel()


@pytest.mark.parametrize("name", ["linear", "slerp"])
def test_linear_slerp_parity_many_chunks(name):
    from mergeline.merge.cpu import CHUNK

    base, models = inputs((CHUNK // 50 * 3 + 1, 50), seed=7)
    m = get_method(name)
    if name == "linear":
        got = m.fn(base, [base, *models], [m.model_params(weight=w) for w in [0.1, 0.5, 0.2, 0.2]], m.global_params())
        ref = mergekit_api.merge_tensors([base, *models], "linear", parameters={"weight": [0.1, 0.5, 0.2, 0.2]})
    else:
        got = m.fn(base, [models[0]], [m.model_params()], m.global_params(t=0.3))
        ref = mergekit_api.merge_tensors([base, models[0]], "slerp", parameters={"t": 0.3}, base_index=0)
    torch.testing.assert_close(got.tensor, ref, rtol=0, atol=1e-6)
    assert got.stats is not None and got.stats.models[-1].kept > 0


def test_bf16_rescale_factor_within_one_step_of_mergekit():
    """rescale in bf16: mergekit's bf16 .sum() rounds partial sums (its L1 totals can be off by more
    than half a bf16 step), ours sums exactly and rounds once, so the factor may differ by one bf16
    step; the rescaled deltas then differ by at most ~2 steps (sign elections downstream can flip,
    so this is checked on the sparsified deltas, not the merge)."""
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify as mk_sparsify

    from mergeline.merge.methods import sparsify

    base, models = inputs((300, 200), dtype=torch.bfloat16, seed=9, scale=0.5)
    for m, d in zip(models, DENSITIES):
        delta = m - base
        sel = sparsify.magnitude(delta.reshape(-1), d)
        factor = torch.tensor(sparsify.l1_rescale(delta.reshape(-1), sel), dtype=torch.bfloat16).float()
        ours = (delta.float() * sel.mask(delta.float().abs().reshape(-1)).reshape(delta.shape) * factor).bfloat16()
        ref = mk_sparsify(delta, density=d, method=SparsificationMethod.magnitude, rescale_norm=RescaleNorm.l1)
        both = (ours != 0) & (ref != 0)  # entries both kept (tie choices aside)
        g, r = ours[both].float(), ref[both].float()
        step = torch.exp2(torch.floor(torch.log2(r.abs())) - 7)  # one bf16 step of ref
        assert bool(((g - r).abs() <= 2 * step).all())
        assert int(both.sum()) > 0.9 * int(d * delta.numel())  # most kept entries are compared
