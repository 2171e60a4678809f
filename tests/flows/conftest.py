"""Tiny GPT-2 models for pipeline tests that must not wait for the zoo: a base, two fine-tunes
(base + small deltas) and a model of a different base (another random init)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny")
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    out = {"base": _save(base, root / "base")}
    for i, name in enumerate(["ft_a", "ft_b"]):
        ft = GPT2LMHeadModel(cfg)
        ft.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=g))
        out[name] = _save(ft, root / name)
    torch.manual_seed(99)
    out["different_base"] = _save(GPT2LMHeadModel(cfg), root / "different_base")
    return out


@pytest.fixture(scope="session")
def nogo_pipeline(tiny_models, tmp_path_factory) -> Path:
    """A pipeline whose recipe includes a model of another base: the compat gate must stop it."""
    root = tmp_path_factory.mktemp("nogo")
    (root / "tasks").mkdir()
    m = tiny_models
    pipe = {
        "name": "nogo-tiny",
        "workdir": str(root / "work"),
        "recipe": {"merge_method": "ties", "base_model": str(m["base"]),
                   "parameters": {"density": 0.5},
                   "models": [{"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
                              {"model": str(m["different_base"]), "parameters": {"weight": 0.5}}]},
        "baselines": ["linear"],
        "eval_suite": {"retention": {"ft_a": ["t_a"], "different_base": ["t_b"]},
                       "include_paths": [str(root / "tasks")]},
        "gate_policy": {},
        "tracking": {"register_as": "nogo-tiny"},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path
