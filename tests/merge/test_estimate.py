"""merge/estimate.py: the memory and disk a merge needs, from the safetensors headers.

Small synthetic checkpoints (single file and sharded) made here; the terms add up, the window
counts neighbouring large tensors together, the disk figure is the size of what the merge
writes, and `mergeline check` / `mergeline merge` print it.

    pytest tests/merge/test_estimate.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.merge.estimate import OVERHEAD, TensorSize, estimate, estimate_shapes, llama_shapes
from mergeline.merge.executor import run_merge
from tests.merge.test_executor import CONFIG, SHAPES, save_model  # merge order: the embedding (largest) first



@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    """A sharded bf16 base and three bf16 fine-tunes, one of them sharded too."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in SHAPES.items()}
    cfg = {**CONFIG, "torch_dtype": "bfloat16"}
    out = {"base": save_model(tmp_path / "base", base, shards=3, config=cfg)}
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"]):
        ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        out[name] = save_model(tmp_path / name, ft, shards=2 if i == 0 else 1, config=cfg)
    return out


def ties_recipe(tmp_path: Path, models: dict[str, Path]) -> Path:
    lines = ["merge_method: ties", f"base_model: {models['base']}", "models:"]
    for name in ("ft_a", "ft_b", "ft_c"):
        lines += [f"  - model: {models[name]}", "    parameters: {weight: 0.3, density: 0.5}"]
    lines += ["dtype: bfloat16"]
    p = tmp_path / "ties.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_estimate_from_headers_adds_up(tmp_path, models):
    e = estimate(ties_recipe(tmp_path, models))
    assert e.inputs == 4 and e.merged == 3
    assert e.largest_tensor == "model.embed_tokens.weight" and e.largest_tensor_bytes == 40 * 8 * 2
    assert e.peak_rss_bytes == e.overhead_bytes + e.input_buffers_bytes + e.workspace_bytes + e.output_buffers_bytes
    assert e.overhead_bytes == OVERHEAD
    # three consecutive jobs' inputs, at the largest: the embedding + the two tensors after it
    assert e.input_buffers_bytes == 4 * 2 * (40 * 8 + 8 * 8 + 16 * 8)
    # one bf16 delta per fine-tune of the largest tensor, plus its 0.25 B/element histograms
    assert e.workspace_bytes == 3 * 40 * 8 * 2 + int(3 * 40 * 8 * 0.25)
    assert e.output_buffers_bytes == 2 * (40 * 8 + 8 * 8 + 16 * 8)
    assert e.output_bytes == 2 * sum(torch.Size(s).numel() for s in SHAPES.values())
    assert e.shards == 1 and e.largest_shard_bytes == e.output_bytes
    assert "peak RSS" in e.text() and "disk" in e.text()


def test_disk_estimate_matches_what_the_merge_writes(tmp_path, models):
    recipe = ties_recipe(tmp_path, models)
    e = estimate(recipe, out_shard_size=600)  # small shards: the output is sharded
    out = run_merge(recipe, tmp_path / "out", device="cpu", progress=False, lineage=False, out_shard_size=600)
    files = sorted(out.path.glob("*.safetensors"))
    assert e.shards == len(files) > 1
    written = sum(f.stat().st_size for f in files)
    assert e.output_bytes == out.nbytes
    assert e.output_bytes < written <= e.disk_bytes + 8 * len(files)  # headers: estimated per tensor


def test_window_counts_neighbouring_large_tensors_together():
    big = [TensorSize(f"t{i}", 1000) for i in range(5)]
    spread = [TensorSize("a", 1000), *[TensorSize(f"s{i}", 1) for i in range(4)], TensorSize("b", 1000)]
    together, apart = estimate_shapes(big, inputs=4), estimate_shapes(spread, inputs=4)
    assert together.input_buffers_bytes == 3 * 4 * 2000 > apart.input_buffers_bytes == 4 * 2 * (1000 + 2)
    assert together.workspace_bytes == apart.workspace_bytes  # one tensor at a time in the method


def test_llama_70b_needs_more_than_7b_and_far_less_than_its_inputs():
    e7 = estimate_shapes(llama_shapes(4096, 32, 11008), inputs=4)
    e70 = estimate_shapes(llama_shapes(8192, 80, 28672, kv_hidden=1024), inputs=4)
    assert 6.5e9 < e7.output_bytes < 7e9 * 2 and 6.5e10 < e70.output_bytes < 7e10 * 2
    assert e7.peak_rss_bytes < e70.peak_rss_bytes < 0.1 * 4 * e70.output_bytes


def test_check_prints_the_estimate(tmp_path, models):
    recipe = ties_recipe(tmp_path, models)
    expected = estimate(recipe)
    r = CliRunner().invoke(app, ["check", str(recipe)])
    assert r.exit_code == 0, r.output
    assert "merge needs memory: peak RSS" in r.output and "disk:" in r.output
    assert f"{expected.peak_rss_bytes / 1e9:.2f} GB" in r.output
    j = CliRunner().invoke(app, ["check", str(recipe), "--json"])
    assert j.exit_code == 0, j.output
    assert json.loads(j.output[j.output.index("{"):])["estimate"] == expected.model_dump()


def test_merge_prints_the_estimate_first(tmp_path, models):
    recipe = ties_recipe(tmp_path, models)
    r = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "merged"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    expected = estimate(recipe)
    assert r.output.index("estimate: this merge needs") < r.output.index("merged ties")
    assert f"~{expected.peak_rss_bytes / 1e9:.2f} GB of memory" in r.output
