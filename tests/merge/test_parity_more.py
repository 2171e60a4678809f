"""Parity with the pinned mergekit (0.1.5) for passthrough, model_stock, nuslerp, multislerp, sce,
karcher, nearswap, arcee_fusion, ram and ramplus_tl: on single tensors (its kernels through
``merge_tensors``, float32 within 1e-6 and bfloat16 bit for bit) and on whole models (its
``run_merge`` on the same tiny float32 Llama and recipe, within 1e-6), including gradients and
{filter, value} parameters, recipes with and without a base, and weights summing to zero.

    pytest tests/merge/test_parity_more.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeline.merge.methods import get_method

mergekit_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit (test extra) is the yardstick")


# -- single tensors ------------------------------------------------------------------------
def inputs(shape, n=3, dtype=torch.float32, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


# (method, with a base, models besides it, per-model parameters, global parameters)
CASES = [
    ("passthrough", False, 1, {"scale": [0.7]}, {}),
    ("passthrough", False, 1, {}, {}),
    ("model_stock", True, 2, {}, {}),
    ("model_stock", True, 3, {}, {"filter_wise": True}),
    ("nuslerp", True, 2, {"weight": [0.3, 0.7]}, {}),
    ("nuslerp", False, 2, {"weight": [0.3, 0.7]}, {"nuslerp_flatten": False}),
    ("nuslerp", True, 2, {"weight": [0.3, 0.7]}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", True, 2, {"weight": [0.5, -0.5]}, {}),  # weights summing to zero: halfway
    ("multislerp", True, 3, {"weight": [0.2, 0.5, 0.3]}, {}),
    ("multislerp", False, 3, {"weight": [0.2, 0.5, 0.3]}, {"normalize_weights": False}),
    ("sce", True, 3, {}, {}),
    ("sce", True, 3, {}, {"select_topk": 0.3}),
    ("karcher", False, 4, {}, {}),
    ("karcher", False, 3, {}, {"max_iter": 2, "tol": 1e-3}),
    ("nearswap", True, 1, {}, {"t": 0.3}),
    ("arcee_fusion", True, 1, {}, {}),
    ("ram", True, 3, {}, {"epsilon": 0.3}),
    ("ramplus_tl", True, 3, {}, {"epsilon": 0.3, "r": 0.5, "alpha": 0.4}),
]


def ours(name, base, models, per_model, globals_):
    m = get_method(name)
    per = [{k: v[i] for k, v in per_model.items()} for i in range(len(models))]
    return m.fn(base, models, [m.model_params(**p) for p in per], m.global_params.model_validate(globals_),
                generator=torch.Generator().manual_seed(0))


def theirs(name, base, models, per_model, globals_):
    tensors = models if base is None else [base, *models]
    return mergekit_api.merge_tensors(tensors, name, parameters={**per_model, **globals_},
                                      base_index=None if base is None else 0)


def case_id(case) -> str:
    name, with_base, n, per, glob = case
    return f"{name}-{'base' if with_base else 'nobase'}-{n}-" + "-".join(f"{k}={v}" for k, v in {**per, **glob}.items())


@pytest.mark.parametrize("shape", [(57, 33), (300,), (3, 5, 7)])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_single_tensor_parity_float32(case, shape):
    name, with_base, n, per, glob = case
    base, models = inputs(shape, n)
    base = base if with_base else None
    got = ours(name, base, models[:n], per, glob)
    torch.testing.assert_close(got.tensor, theirs(name, base, models[:n], per, glob), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_single_tensor_parity_bfloat16_bit_for_bit(case):
    """Same operations in the same order in bf16: the same bits (mergekit returns float32 where its
    own float32 factors promote, arcee_fusion and ramplus_tl; the executor rounds that once, as here)."""
    name, with_base, n, per, glob = case
    base, models = inputs((64, 48), n, dtype=torch.bfloat16, seed=5)
    base = base if with_base else None
    got = ours(name, base, models[:n], per, glob).tensor
    ref = theirs(name, base, models[:n], per, glob).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def test_statistics_of_methods_that_trim_or_elect():
    base, models = inputs((40, 30), 3, seed=2)
    sce = ours("sce", base, models, {}, {"select_topk": 0.3}).stats
    for ms in sce.models:
        assert ms.kept == int(0.3 * base.numel())  # the same selected entries in every model
        assert 0 < ms.dropped_by_election < ms.kept and 0 < ms.dropped_magnitude < ms.kept_magnitude
    assert 0 < sce.conflict_positions <= sce.positions_with_kept == int(0.3 * base.numel())
    ram = ours("ram", base, models, {}, {"epsilon": 0.3}).stats
    for ms, m in zip(ram.models, models):
        assert ms.kept == int(((m - base).abs() > 0.3).sum())


# -- whole models ------------------------------------------------------------------------
from tests.merge._llama import build_llamas, read_all  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_llamas(tmp_path_factory.mktemp("parity_more_models"), seed=4321)


def recipes(m: dict[str, Path]) -> dict[str, dict]:
    b, a, bb, c = (str(m[k]) for k in ("base", "ft_a", "ft_b", "ft_c"))
    f32 = {"dtype": "float32"}
    return {
        "passthrough": {"merge_method": "passthrough", "models": [
            {"model": a, "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.5}]}}], **f32},
        "model_stock": {"merge_method": "model_stock", "base_model": b,
                        "models": [{"model": a}, {"model": bb}, {"model": c}], **f32},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": b, "models": [{"model": a}, {"model": bb}],
                                    "parameters": {"filter_wise": True}, **f32},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b, "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": bb, "parameters": {"weight": [0.1, 0.6, 0.3]}}], **f32},
        "nuslerp_no_base_rows": {"merge_method": "nuslerp", "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.2}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, **f32},
        "nuslerp_zero_sum": {"merge_method": "nuslerp", "base_model": b, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": bb, "parameters": {"weight": -0.5}}], **f32},
        "multislerp": {"merge_method": "multislerp", "base_model": b, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": bb, "parameters": {"weight": 0.2}},
            {"model": c, "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.3}]}}], **f32},
        "multislerp_no_base": {"merge_method": "multislerp", "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}], **f32},
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": a}, {"model": bb}, {"model": c}],
                "parameters": {"select_topk": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}]}, **f32},
        "karcher": {"merge_method": "karcher", "base_model": b, "models": [{"model": a}, {"model": bb}],
                    "parameters": {"max_iter": 5}, **f32},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": b}, {"model": bb}],
                     "parameters": {"t": [0.001, 0.05, 0.2]}, **f32},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": c}], **f32},
        "ram": {"merge_method": "ram", "base_model": b, "models": [{"model": a}, {"model": bb}, {"model": c}],
                "parameters": {"epsilon": 0.08}, **f32},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": [{"model": a}, {"model": c}],
                       "parameters": {"epsilon": 0.08, "r": 0.3, "alpha": 0.5}, **f32},
    }


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory) -> dict[str, Path]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = tmp_path_factory.mktemp("mergekit_more_out")
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    out = {}
    for name, recipe in recipes(models).items():
        run_merge(MergeConfiguration.model_validate(recipe), str(root / name), opts)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(recipes({k: Path(k) for k in ("base", "ft_a", "ft_b", "ft_c")})))
def test_same_tensors_as_mergekit(name, models, mergekit_outputs, tmp_path):
    from mergeline.merge.executor import run_merge

    out = run_merge(recipes(models)[name], tmp_path / "out", device="cpu", progress=False)
    theirs, ours_ = read_all(mergekit_outputs[name]), read_all(tmp_path / "out")
    assert set(theirs) == set(ours_)
    for k in theirs:
        assert theirs[k].dtype == ours_[k].dtype, k
        torch.testing.assert_close(ours_[k], theirs[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")
    base = read_all(models["base"])  # the merge did something: not a copy of the base
    assert max((ours_[k] - base[k]).abs().max().item() for k in base) > 1e-3
    if name in ("sce", "ram", "ramplus_tl", "arcee_fusion"):  # methods that trim or elect report it
        assert out.stats and json.loads((tmp_path / "out" / "merge_stats.json").read_text())
