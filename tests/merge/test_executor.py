"""The streaming executor end to end on tiny safetensors models made here.

Sharded input, tied embeddings, output shards + index, overwrite refusal, nothing left behind on
failure, statistics files, seeded random methods, and the `mergeline merge` command.

    pytest tests/merge/test_executor.py -q
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeline.merge.checkpoint import Checkpoint
from mergeline.merge.compat import ChecksFailed
from mergeline.merge.executor import run_merge
from mergeline.merge.plan import MergeError
from mergeline.merge.recipe import RecipeError
from mergeline.merge.writer import OutputError, parse_size

SHAPES = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
          "vocab_size": 40, "torch_dtype": "float32"}


def save_model(folder: Path, tensors: dict, shards: int = 1, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, folder / fname)
            weight_map.update(dict.fromkeys(part, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "from": folder.name}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    return folder


@pytest.fixture
def zoo(tmp_path):
    """base (sharded, tied: no lm_head), ft_a (own lm_head), ft_b (tied, single file)."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    a = {k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    a["lm_head.weight"] = a["model.embed_tokens.weight"] + 0.1 * torch.randn(40, 8, generator=g)
    b = {k: v + 0.1 * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    paths = {
        "base": save_model(tmp_path / "base", base, shards=3),
        "ft_a": save_model(tmp_path / "ft_a", a),
        "ft_b": save_model(tmp_path / "ft_b", b),
    }
    return paths, {"base": base, "ft_a": a, "ft_b": b}


def ta_recipe(paths, **over):
    r = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
         "models": [{"model": str(paths["ft_a"]), "parameters": {"weight": 0.5}},
                    {"model": str(paths["ft_b"]), "parameters": {"weight": [1.0, 0.0]}}],
         "dtype": "float32"}
    r.update(over)
    return r


def read(folder: Path) -> dict[str, torch.Tensor]:
    c = Checkpoint(folder)
    return {n: c.get(n) for n in c.names()}


def test_sharded_input_tied_embeddings_and_hand_computed_result(zoo, tmp_path):
    paths, t = zoo
    out = run_merge(ta_recipe(paths), tmp_path / "out", device="cpu", progress=False)
    got = read(out.path)
    base, a, b = t["base"], t["ft_a"], t["ft_b"]
    for name in SHAPES:
        idx = 1 if ".1." in name else 0
        wb = 1.0 - idx if "layers" in name else 1.0  # gradient [1, 0] over 2 layers; non-layers: first value
        expect = base[name] + 0.5 * (a[name] - base[name]) + wb * (b[name] - base[name])
        torch.testing.assert_close(got[name], expect, rtol=0, atol=1e-6)
    # ft_a has its own head; the tied base and ft_b contribute their embedding there (mergekit's fallback)
    emb = "model.embed_tokens.weight"
    expect_head = base[emb] + 0.5 * (a["lm_head.weight"] - base[emb]) + (b[emb] - base[emb])
    torch.testing.assert_close(got["lm_head.weight"], expect_head, rtol=0, atol=1e-6)
    assert out.tensors == len(SHAPES) + 1
    cfg = json.loads((out.path / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["num_hidden_layers"] == 2
    assert json.loads((out.path / "tokenizer_config.json").read_text())["from"] == "base"
    assert (out.path / "generation_config.json").is_file()


def test_out_shards_and_index_equal_single_file(zoo, tmp_path):
    paths, _ = zoo
    single = run_merge(ta_recipe(paths), tmp_path / "one", device="cpu", progress=False)
    sharded = run_merge(ta_recipe(paths), tmp_path / "many", device="cpu", out_shard_size="1KB", progress=False)
    files = sorted(p.name for p in sharded.path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sharded.nbytes
    assert not (single.path / "model.safetensors.index.json").exists()
    one, many = read(single.path), read(sharded.path)
    assert one.keys() == many.keys()
    for k in one:
        assert torch.equal(one[k], many[k])
    # each shard is a valid safetensors file on its own
    for f in files:
        load_file(sharded.path / f)


def test_out_dtype_and_compute_dtype(zoo, tmp_path):
    paths, _ = zoo
    out = run_merge(ta_recipe(paths, dtype="bfloat16", out_dtype="float16"), tmp_path / "o", device="cpu", progress=False)
    assert {v.dtype for v in read(out.path).values()} == {torch.float16}
    assert json.loads((out.path / "config.json").read_text())["torch_dtype"] == "float16"


def test_existing_output_refused_unless_overwrite(zoo, tmp_path):
    paths, _ = zoo
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        run_merge(ta_recipe(paths), target, device="cpu", progress=False)
    assert (target / "keep.txt").exists()
    run_merge(ta_recipe(paths), target, device="cpu", overwrite=True, progress=False)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failure_mid_merge_leaves_nothing(zoo, tmp_path):
    paths, _ = zoo
    r = ta_recipe(paths)
    # weight resolves for the embedding and the layers but not for model.norm.weight (the last tensor)
    r["models"][0]["parameters"]["weight"] = [{"filter": "embed", "value": 1.0}, {"filter": "layers", "value": 0.5}]
    with pytest.raises(RecipeError, match="weight"):
        run_merge(r, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shape_mismatch_named_before_any_output(zoo, tmp_path):
    paths, t = zoo
    bad = dict(t["ft_b"])
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(17, 8)
    save_model(tmp_path / "bad", bad)
    r = ta_recipe(paths)
    r["models"][1]["model"] = str(tmp_path / "bad")
    # the compatibility check names it first (exit 1 in the CLI); merging anyway cannot work
    with pytest.raises(ChecksFailed, match=r"tensors.shapes.*model.layers.1.mlp.up_proj.weight \(17, 8\)"):
        run_merge(r, tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(MergeError, match=r"model.layers.1.mlp.up_proj.weight.*\[17, 8\]"):
        run_merge(r, tmp_path / "out", device="cpu", progress=False, allow_crimes=True)
    assert not (tmp_path / "out").exists()


def test_ties_writes_stats_json_and_csv(zoo, tmp_path):
    paths, _ = zoo
    r = ta_recipe(paths, merge_method="ties", parameters={"density": 0.5})
    r["models"][1]["parameters"]["weight"] = 0.5
    out = run_merge(r, tmp_path / "out", device="cpu", progress=False)
    s = json.loads((out.path / "merge_stats.json").read_text())
    assert s["schema_version"] == 1 and s["method"] == "ties" and s["models"] == ["ft_a", "ft_b"]
    for name in s["models"]:
        pm = s["per_model"][name]
        assert set(pm) == {"numel", "kept", "kept_fraction", "trimmed_fraction", "dropped_by_election",
                           "dropped_fraction_of_kept", "dropped_magnitude_share"}
        assert pm["kept_fraction"] == pytest.approx(0.5, abs=0.02)  # density 0.5, per tensor
        assert 0 < pm["dropped_fraction_of_kept"] < 1
    assert set(s["per_layer"]) == {"0", "1", "embed", "head", "other"}
    assert 0 < s["sign_conflict"]["rate"] < 1
    assert s["sign_conflict"]["conflict_positions"] <= s["sign_conflict"]["positions_with_kept"]
    rows = list(csv.DictReader(open(out.path / "merge_stats_tensors.csv")))
    assert len(rows) == 2 * out.tensors and {r["model"] for r in rows} == {"ft_a", "ft_b"}
    assert out.stats == s


def test_random_methods_are_seeded_per_tensor(zoo, tmp_path):
    paths, _ = zoo
    r = ta_recipe(paths, merge_method="dare_ties", parameters={"density": 0.5})
    r["models"][1]["parameters"]["weight"] = 0.5
    x = read(run_merge(r, tmp_path / "x", device="cpu", seed=7, progress=False).path)
    y = read(run_merge(r, tmp_path / "y", device="cpu", seed=7, progress=False).path)
    z = read(run_merge(r, tmp_path / "z", device="cpu", seed=8, progress=False).path)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(not torch.equal(x[k], z[k]) for k in x)


def test_whole_model_trim_scope(zoo, tmp_path):
    paths, t = zoo
    r = ta_recipe(paths, merge_method="ties", parameters={"density": 0.3}, trim_scope="model")
    r["models"][1]["parameters"]["weight"] = 0.5
    out = run_merge(r, tmp_path / "out", device="cpu", progress=False)
    for name in ("ft_a", "ft_b"):  # fp32 deltas without ties: the two-pass threshold keeps exactly k
        pm = out.stats["per_model"][name]
        assert pm["kept"] == int(0.3 * pm["numel"]), name  # over the whole model
    per_tensor = [float(row["kept_fraction"]) for row in csv.DictReader(open(out.path / "merge_stats_tensors.csv"))]
    assert max(per_tensor) - min(per_tensor) > 0.05  # per tensor it varies


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(OutputError, match="--out-shard-size"):
        parse_size("lots")


def test_cli_merge(zoo, tmp_path):
    from typer.testing import CliRunner

    from mergeline.flows.cli import app

    paths, _ = zoo
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ta_recipe(paths)))
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "task_arithmetic" in res.output and "tensors" in res.output and str(tmp_path / "out") in res.output
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 2 and "already exists" in res.output
    recipe.write_text("merge_method: nope\nmodels: [{model: x}]\n")
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "o2")])
    assert res.exit_code == 2 and "nope" in res.output


def test_tokenizer_source_and_chat_template(zoo, tmp_path):
    paths, _ = zoo
    r = ta_recipe(paths, tokenizer_source=str(paths["ft_b"]), chat_template="chatml")
    out = run_merge(r, tmp_path / "out", device="cpu", progress=False)
    tok = json.loads((out.path / "tokenizer_config.json").read_text())
    assert tok["from"] == "ft_b" and "<|im_start|>" in tok["chat_template"]
    assert "<|im_start|>" in (out.path / "chat_template.jinja").read_text()


def test_pickle_checkpoint_refused_unless_allowed(zoo, tmp_path):
    paths, t = zoo
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(t["ft_b"], folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    r = ta_recipe(paths)
    r["models"][1]["model"] = str(folder)
    with pytest.raises(MergeError, match="pickle"):
        run_merge(r, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    out = run_merge(r, tmp_path / "out", device="cpu", allow_pickle=True, progress=False)
    ref = read(run_merge(ta_recipe(paths), tmp_path / "ref", device="cpu", progress=False).path)
    got = read(out.path)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
