"""CPU and CUDA give the same merge to floating-point tolerance (skipped where torch sees no GPU).

The executor runs the same code on both devices; on CUDA it reads through pinned buffers and a
side stream. Deterministic methods must agree to fp tolerance; TIES's trim thresholds are exact
selections, so kept sets agree and only summation order differs.

    pytest tests/merge/test_gpu.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False here"),
]

SHAPES = {"model.embed_tokens.weight": (64, 32), "model.layers.0.mlp.up_proj.weight": (96, 32),
          "model.layers.1.mlp.up_proj.weight": (96, 32), "model.norm.weight": (32,), "lm_head.weight": (64, 32)}


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    out = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        f = tmp_path / name
        f.mkdir()
        save_file({k: v + (0.05 * i) * torch.randn(*v.shape, generator=g) for k, v in base.items()}, f / "model.safetensors")
        (f / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
        out[name] = f
    return out


@pytest.mark.parametrize("method, dtype", [("ties", "float32"), ("ties", "bfloat16"), ("task_arithmetic", "float32"),
                                           ("linear", "float32"), ("dare_ties", "float32")])
def test_cpu_and_cuda_agree(models, tmp_path, method, dtype):
    from mergeline.merge.checkpoint import Checkpoint
    from mergeline.merge.executor import run_merge

    recipe = {"merge_method": method, "dtype": dtype,
              "models": [{"model": str(models[n]), "parameters": {"weight": w, **({"density": 0.4} if method != "linear" else {})}}
                         for n, w in (("a", 0.4), ("b", 0.3), ("c", 0.3))]}
    if method != "linear":
        recipe["base_model"] = str(models["base"])
    cpu = run_merge(recipe, tmp_path / "cpu", device="cpu", seed=1, progress=False)
    gpu = run_merge(recipe, tmp_path / "gpu", device="cuda", seed=1, progress=False)
    c, g = Checkpoint(cpu.path), Checkpoint(gpu.path)
    assert c.names() == g.names()
    tol = {"float32": 1e-5, "bfloat16": 1e-2}[dtype]
    for n in c.names():
        if method == "dare_ties":  # CPU and CUDA generators draw different streams: same shape and dtype only
            assert c.get(n).shape == g.get(n).shape and c.get(n).dtype == g.get(n).dtype
            continue
        torch.testing.assert_close(g.get(n).float(), c.get(n).float(), rtol=tol, atol=tol, msg=lambda m, n=n: f"{n}: {m}")
    if method == "ties":
        assert cpu.stats["per_model"] == gpu.stats["per_model"]
