"""Merge methods: hand-computed cases and properties (TIES, arXiv:2306.01708, and family).

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

import pytest
import torch

from mergeline.merge.methods import METHODS, get_method
from mergeline.merge.methods.select import MagnitudeHistogram, topk


def run(name, base, models, weights, densities=None, **globals_):
    m = get_method(name)
    per = [dict(weight=w) for w in weights]
    if densities is not None:
        for p, d in zip(per, densities):
            p["density"] = d
    return m.fn(base, models, [m.model_params(**p) for p in per], m.global_params.model_validate(globals_))


def test_registry_names_and_errors():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                            "breadcrumbs_ties", "della", "della_linear", "slerp", "passthrough", "model_stock",
                            "nuslerp", "multislerp", "sce", "karcher", "nearswap", "arcee_fusion", "ram",
                            "ramplus_tl"}
    with pytest.raises(ValueError, match="allowed: .*ties"):
        get_method("tie")
    with pytest.raises(Exception, match="densty"):
        METHODS["ties"].model_params(weight=1, densty=0.5)
    with pytest.raises(Exception, match="density"):
        METHODS["ties"].model_params(weight=1, density=1.5)
    g = METHODS["ties"].global_params.model_validate({"lambda": 0.5})
    assert g.lambda_ == 0.5 and g.normalize and not g.rescale
    assert not METHODS["dare_ties"].global_params().normalize and METHODS["dare_ties"].global_params().rescale
    assert METHODS["dare_ties"].randomized and not METHODS["ties"].randomized


def test_ties_plus_point_four_minus_point_three():
    base = torch.zeros(1)
    out = run("ties", base, [torch.tensor([0.4]), torch.tensor([-0.3])], [1.0, 1.0], [1.0, 1.0])
    # elected +, only +0.4 agrees, normalize divides by the agreeing weight 1
    assert out.tensor.item() == pytest.approx(0.4)
    s = out.stats
    assert [m.kept for m in s.models] == [1, 1]
    assert [m.dropped_by_election for m in s.models] == [0, 1]
    assert s.models[1].dropped_magnitude == pytest.approx(0.3)
    assert s.conflict_positions == 1 and s.positions_with_kept == 1


def test_ties_three_models_split_vote():
    base = torch.tensor([1.0, 1.0])
    deltas = [torch.tensor([0.5, -0.2]), torch.tensor([-0.2, -0.2]), torch.tensor([-0.2, 0.3])]
    out = run("ties", base, [base + d for d in deltas], [1.0, 1.0, 1.0], [1.0] * 3)
    # coord 0: sum +0.1 -> +, only 0.5 agrees -> 1.5; coord 1: sum -0.1 -> -, two agree -> mean -0.2
    assert out.tensor.tolist() == pytest.approx([1.5, 0.8])
    assert [m.dropped_by_election for m in out.stats.models] == [0, 1, 2]
    assert out.stats.conflict_positions == 2
    # the same without normalize sums the agreeing deltas
    out = run("ties", base, [base + d for d in deltas], [1.0, 1.0, 1.0], [1.0] * 3, normalize=False)
    assert out.tensor.tolist() == pytest.approx([1.5, 0.6])


def test_ties_weights_before_election_and_lambda():
    base = torch.zeros(1)
    # unweighted sum is + (0.4 - 0.3), but weighted (0.1*0.4 - 1*0.3) is -: the election follows weights
    out = run("ties", base, [torch.tensor([0.4]), torch.tensor([-0.3])], [0.1, 1.0], [1.0, 1.0], **{"lambda": 2.0})
    assert out.tensor.item() == pytest.approx(2.0 * -0.3)


def test_kept_fraction_matches_density_exactly():
    torch.manual_seed(0)
    base = torch.randn(123, 77)
    models = [base + torch.randn_like(base) for _ in range(2)]
    out = run("ties", base, models, [0.5, 0.5], [0.2, 0.37])
    for m, d in zip(out.stats.models, [0.2, 0.37]):
        assert m.kept == max(1, int(d * base.numel()))


def test_one_model_density_one_equals_task_arithmetic():
    torch.manual_seed(1)
    base = torch.randn(50, 40)
    model = base + 0.1 * torch.randn_like(base)
    ties = run("ties", base, [model], [0.7], [1.0], normalize=False)
    ta = run("task_arithmetic", base, [model], [0.7])
    torch.testing.assert_close(ties.tensor, ta.tensor, rtol=0, atol=0)
    torch.testing.assert_close(ta.tensor, base + 0.7 * (model - base))


@pytest.mark.parametrize("name", ["ties", "task_arithmetic", "breadcrumbs_ties", "linear", "dare_ties"])
def test_identical_finetunes_merge_to_that_finetune(name):
    torch.manual_seed(2)
    base = torch.randn(64, 32)
    ft = base + 0.05 * torch.randn_like(base)
    if name == "linear":
        out = run(name, None, [ft, ft, ft], [0.2, 0.3, 0.5])
        torch.testing.assert_close(out.tensor, ft)
        return
    normalize = {"task_arithmetic": True, "breadcrumbs_ties": True, "dare_ties": True}.get(name, True)
    out = run(name, base, [ft, ft, ft], [0.2, 0.3, 0.5], [1.0] * 3, normalize=normalize, rescale=False)
    torch.testing.assert_close(out.tensor, ft)


def test_normalize_makes_ties_invariant_to_scaling_weights():
    torch.manual_seed(3)
    base = torch.randn(40, 30)
    models = [base + 0.1 * torch.randn_like(base) for _ in range(3)]
    a = run("ties", base, models, [0.5, 0.25, 0.25], [0.3, 0.3, 0.3])
    b = run("ties", base, models, [2.0, 1.0, 1.0], [0.3, 0.3, 0.3])
    torch.testing.assert_close(a.tensor, b.tensor)


def test_ties_at_threshold_keep_lowest_indices():
    d = torch.tensor([0.5, 0.25, 0.25, 0.9, 0.25, 0.25, 0.1])
    sel = topk(d, 3)  # 0.9, 0.5, then the first 0.25 (index 1)
    assert sel.threshold == 0.25 and sel.cut == 2
    assert sel.mask(d.abs()).tolist() == [True, True, False, True, False, False, False]
    # chunk-wise masks agree with the whole-tensor mask
    parts = torch.cat([sel.mask(d.abs()[s : s + 2], s) for s in range(0, 7, 2)])
    assert parts.tolist() == sel.mask(d.abs()).tolist()
    base = torch.zeros(7)
    out = run("ties", base, [d.bfloat16()], [1.0], [3 / 7 + 1e-6])
    assert out.tensor.float().ne(0).tolist() == [True, True, False, True, False, False, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_topk_is_exact_against_sort(dtype):
    torch.manual_seed(4)
    # few distinct magnitudes -> many ties at the threshold
    x = (torch.randint(-40, 40, (10_007,)) * 0.001).to(dtype)
    for k in [1, 17, 2500, 10_006, 10_007]:
        sel = topk(x, k)
        mask = sel.mask(x.abs())
        assert int(mask.sum()) == k
        # the kept set is the top-k under (|x| desc, index asc): compare with a stable sort
        order = torch.sort(-x.abs().double(), stable=True).indices[:k]
        expected = torch.zeros_like(mask)
        expected[order] = True
        assert torch.equal(mask, expected)


def test_magnitude_histogram_whole_model_threshold():
    torch.manual_seed(5)
    parts = [torch.randn(1000).bfloat16(), torch.randn(300, 7).bfloat16()]
    h = MagnitudeHistogram()
    for p in parts:
        h.add(p)
    t = h.threshold(0.1)
    whole = torch.cat([p.reshape(-1) for p in parts]).abs().float()
    assert t == float(torch.sort(whole, descending=True).values[int(0.1 * whole.numel()) - 1])
    base = torch.zeros(1000, dtype=torch.bfloat16)
    out = run_thr = get_method("ties").fn(base, [parts[0]], [METHODS["ties"].model_params(weight=1.0, density=0.1)],
                                          METHODS["ties"].global_params(), thresholds=[t])
    assert out.stats.models[0].kept == int((parts[0].abs().float() >= t).sum())
    del run_thr


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_reproducible_from_seed(name):
    torch.manual_seed(6)
    base = torch.randn(64, 48)
    models = [base + 0.1 * torch.randn_like(base) for _ in range(2)]
    m = get_method(name)
    mp = [m.model_params(weight=0.5, density=0.5) for _ in models]

    def go(seed):
        return m.fn(base, models, mp, m.global_params(), generator=torch.Generator().manual_seed(seed)).tensor

    assert torch.equal(go(1), go(1))
    assert not torch.equal(go(1), go(2))
    kept = m.fn(base, models, mp, m.global_params(), generator=torch.Generator().manual_seed(1)).stats.models[0].kept
    assert abs(kept / base.numel() - 0.5) < 0.05


def test_bf16_inputs_do_not_change_and_output_dtype_kept():
    torch.manual_seed(7)
    base = torch.randn(100, 10).bfloat16()
    models = [(base.float() + 0.01 * torch.randn(100, 10)).bfloat16() for _ in range(2)]
    copies = [t.clone() for t in [base, *models]]
    out = run("ties", base, models, [0.5, 0.5], [0.5, 0.5])
    assert out.tensor.dtype == torch.bfloat16 and out.tensor.shape == base.shape
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *models]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stats_match_direct_count(dtype):
    """Kept counts/magnitudes (from the histogram for 16-bit, counted in-pass for fp32) and
    election counts agree with a direct, unfused computation."""
    torch.manual_seed(8)
    base = torch.randn(300, 50).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(300, 50)).to(dtype) for _ in range(3)]
    weights, density = [0.5, 0.3, -0.2], 0.3
    out = run("ties", base, models, weights, [density] * 3)
    deltas = [(m - base).float().reshape(-1) for m in models]
    k = int(density * base.numel())
    trimmed = []
    for d, ms in zip(deltas, out.stats.models):
        sel = topk(d.to(dtype), k).mask(d.abs())
        assert ms.kept == int((sel & (d != 0)).sum()) == k
        assert ms.kept_magnitude == pytest.approx(float(d.abs()[sel].sum()), rel=1e-5)
        trimmed.append(d * sel)
    # weighted deltas in the compute dtype, as mergekit (and the kernel) round them
    weighted = torch.stack([(t.to(dtype) * torch.tensor(w, dtype=dtype)).float() for t, w in zip(trimmed, weights)])
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted * elected > 0
    for i, ms in enumerate(out.stats.models):
        dropped = (trimmed[i] != 0) & ~agree[i]
        assert ms.dropped_by_election == int(dropped.sum())
        assert ms.dropped_magnitude == pytest.approx(float(trimmed[i].abs()[dropped].sum()), rel=1e-2)
    assert out.stats.conflict_positions == int(((weighted > 0).any(0) & (weighted < 0).any(0)).sum())
    assert out.stats.positions_with_kept == int((weighted != 0).any(0).sum())


def test_linear_and_slerp_stats_against_base():
    base = torch.tensor([0.0, 1.0, 2.0])
    a, b = torch.tensor([0.5, 1.0, 1.0]), torch.tensor([-0.5, 1.0, 3.0])
    s = run("linear", base, [a, b], [1.0, 1.0]).stats
    assert [m.kept for m in s.models] == [2, 2]
    assert s.conflict_positions == 2 and s.positions_with_kept == 2
    assert run("linear", None, [a, b], [1.0, 1.0]).stats is None
    m = get_method("slerp")
    r = m.fn(base, [a], [m.model_params()], m.global_params(t=0.5))
    assert r.stats.models[0].kept == 2 and r.stats.models[0].kept_magnitude == pytest.approx(1.5)


@pytest.mark.parametrize("density", [0.01, 0.2, 0.77])
def test_magnitude_histogram_fp32_threshold_is_exact_after_a_second_pass(density):
    """fp32 deltas: the first pass only finds the 16-high-bit bin; the second makes it exact."""
    torch.manual_seed(11)
    parts = [torch.randn(4000) * 1e-3, torch.randn(70, 90) * 3e-3, -torch.rand(5) * 1e-2]
    h = MagnitudeHistogram()
    for p in parts:
        h.add(p)
    assert h.needs_second_pass
    with pytest.raises(ValueError, match="second pass"):
        h.threshold(density)
    h.begin_second_pass(density)
    for p in parts:
        h.add(p)
    assert not h.needs_second_pass
    whole = torch.cat([p.reshape(-1) for p in parts]).abs()
    k = int(density * whole.numel())
    assert h.threshold(density) == float(torch.sort(whole, descending=True).values[k - 1])
    assert int((whole >= h.threshold(density)).sum()) == k  # no ties in random fp32: exactly k kept
    with pytest.raises(ValueError, match="begin_second_pass"):
        h.threshold(density / 2)  # the second pass refined the bin for one density only


def test_magnitude_histogram_add_pair_equals_add():
    torch.manual_seed(9)
    base = torch.randn(5000).bfloat16()
    model = (base.float() + 0.01 * torch.randn(5000)).bfloat16()
    a, b = MagnitudeHistogram(), MagnitudeHistogram()
    a.add(model - base)
    b.add_pair(base, model)
    assert a.threshold(0.2) == b.threshold(0.2) and (a.hist == b.hist).all()


def test_errors_name_the_problem():
    m = get_method("ties")
    with pytest.raises(ValueError, match="needs a base"):
        m.fn(None, [torch.zeros(3)], [m.model_params(weight=1.0)], m.global_params())
    with pytest.raises(ValueError, match="shape"):
        m.fn(torch.zeros(3), [torch.zeros(4)], [m.model_params(weight=1.0)], m.global_params())
    d = get_method("della")
    with pytest.raises(ValueError, match="epsilon"):
        d.fn(torch.zeros(10), [torch.ones(10)], [d.model_params(weight=1.0, density=0.9, epsilon=0.2)],
             d.global_params(), generator=torch.Generator().manual_seed(0))
    s = get_method("slerp")
    with pytest.raises(ValueError, match="exactly two"):
        s.fn(torch.zeros(3), [torch.ones(3), torch.ones(3)], [s.model_params()] * 2, s.global_params(t=0.5))


def test_concurrent_merges_leave_torch_threads():
    """Concurrent chunk loops give the same bits and leave the caller's torch threads as they were
    (the other threads of the process: tests/merge/test_cpu.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from mergeline.merge.cpu import CHUNK

    before = torch.get_num_threads()
    base = torch.randn(4 * CHUNK + 3)
    models = [base + 0.1 * torch.randn_like(base) for _ in range(2)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: run("ties", base, models, [0.5, 0.5], [0.3, 0.3]).tensor, range(3)))
    assert torch.get_num_threads() == before
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (), (1,)])
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                  "breadcrumbs_ties", "della", "della_linear", "slerp"])
def test_degenerate_shapes(name, shape):  # the other methods: tests/merge/test_methods_more.py
    base = torch.zeros(shape, dtype=torch.bfloat16)
    models = [torch.full(shape, 0.5, dtype=torch.bfloat16), torch.full(shape, -0.25, dtype=torch.bfloat16)]
    m = get_method(name)
    if name == "slerp":
        r = m.fn(base, models[:1], [m.model_params()], m.global_params(t=0.5))
    elif name == "linear":
        r = m.fn(base, models, [m.model_params(weight=1.0)] * 2, m.global_params())
    else:
        r = m.fn(base, models, [m.model_params(weight=1.0, density=0.5)] * 2, m.global_params(),
                 generator=torch.Generator().manual_seed(0))
    assert r.tensor.shape == base.shape and r.tensor.dtype == base.dtype
