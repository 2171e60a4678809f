"""Model-level parity with the real mergekit: same recipe, same tiny float32 Llama, same tensors.

For every deterministic method (linear, task_arithmetic, ties, breadcrumbs, breadcrumbs_ties,
slerp), including a gradient parameter and a {filter, value} parameter, and for the `slices:`
form (settings scoped per slice), mergekit 0.1.5 and mergeline must write the same tensors
within 1e-6. Deltas are continuous random values, so no
two magnitudes tie at a trim threshold (where mergekit's argsort order would decide).
mergekit is imported once for the module (about 9 s) and runs all recipes.

    pytest tests/merge/test_parity_mergekit.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")

from tests.merge._llama import LAYERS, build_llamas, read_all  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_llamas(tmp_path_factory.mktemp("parity_models"), seed=1234)


def recipes(m: dict[str, Path]) -> dict[str, dict]:
    b, a, bb, c = (str(m[k]) for k in ("base", "ft_a", "ft_b", "ft_c"))
    three = lambda **p: [  # noqa: E731
        {"model": a, "parameters": {"weight": 0.5, **p}},
        {"model": bb, "parameters": {"weight": [0.1, 0.6, 0.3]}},  # a gradient over the 3 layers
        {"model": c, "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": -0.2}]}},  # filters
    ]
    return {
        "linear": {"merge_method": "linear", "models": three(), "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": three(),
                            "parameters": {"lambda": 0.8}, "dtype": "float32"},
        "ties": {"merge_method": "ties", "base_model": b, "models": three(density=[0.3, 0.9]),
                 "parameters": {"density": [{"filter": "self_attn", "value": 0.4}, {"value": 0.6}], "normalize": True},
                 "dtype": "float32"},
        "ties_unnormalized": {"merge_method": "ties", "base_model": b, "models": three(density=0.5),
                              "parameters": {"normalize": False, "lambda": 1.3}, "dtype": "float32"},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b, "models": three(density=0.8, gamma=0.05),
                        "dtype": "float32"},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "models": three(density=0.7), "parameters": {"gamma": 0.1}, "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": a}],
                  "parameters": {"t": [{"filter": "mlp", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
                  "dtype": "float32"},
        # the `slices:` form: the canonical one-slice SLERP, and TIES with settings scoped per slice
        "slerp_slices": {"merge_method": "slerp", "base_model": b,
                         "slices": [{"sources": [{"model": b, "layer_range": [0, LAYERS]},
                                                 {"model": a, "layer_range": [0, LAYERS]}]}],
                         "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.7, 1.0]},
                                              {"filter": "mlp", "value": [1.0, 0.4, 0.0]}, {"value": 0.5}]},
                         "dtype": "float32"},
        "ties_slices": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                        "parameters": {"normalize": True, "density": 0.9},
                        "slices": [
                            {"sources": [{"model": b, "layer_range": [0, 1]},
                                         {"model": a, "layer_range": [0, 1], "parameters": {"weight": 0.5, "density": 0.3}},
                                         {"model": bb, "layer_range": [0, 1], "parameters": {"weight": 0.4}},
                                         {"model": c, "layer_range": [0, 1], "parameters": {"weight": [0.1, 0.9]}}]},
                            {"sources": [{"model": b, "layer_range": [1, LAYERS]},
                                         {"model": a, "layer_range": [1, LAYERS], "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
                                         {"model": bb, "layer_range": [1, LAYERS], "parameters": {"weight": 0.4}},
                                         {"model": c, "layer_range": [1, LAYERS], "parameters": {"weight": 0.3}}],
                             "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.35}]}},
                        ]},
    }


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory) -> dict[str, Path]:
    """Run every recipe through mergekit's own run_merge, once for the module."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = tmp_path_factory.mktemp("mergekit_out")
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    out = {}
    for name, recipe in recipes(models).items():
        run_merge(MergeConfiguration.model_validate(recipe), str(root / name), opts)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(recipes({k: Path(k) for k in ("base", "ft_a", "ft_b", "ft_c")})))
def test_same_tensors_as_mergekit(name, models, mergekit_outputs, tmp_path):
    from mergeline.merge.executor import run_merge

    run_merge(recipes(models)[name], tmp_path / "out", device="cpu", progress=False)
    theirs, ours = read_all(mergekit_outputs[name]), read_all(tmp_path / "out")
    assert set(theirs) == set(ours)
    worst = max((theirs[k].double() - ours[k].double()).abs().max().item() for k in theirs)
    for k in theirs:
        assert theirs[k].dtype == ours[k].dtype, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")
    assert worst <= 1e-6
    base = read_all(models["base"])  # the merge did something: not a copy of the base
    assert max((ours[k] - base[k]).abs().max().item() for k in base) > 1e-2
    ours_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == LAYERS
