"""`mergeline merge` is safe by default: the compatibility checks run inside the merge.

Header checks (architecture, tensors, tokenizer) before any tensor is read; the norm statistics
from the merge's own read, equal to what `mergeline check` computes; a failed check exits 1
naming it, with nothing at the output path; unusable input exits 2; `--allow-crimes` merges
anyway and records the waived failures in lineage.json and README.md.

    pytest tests/merge/test_merge_safety.py -q
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.merge.compat import ChecksFailed, check_recipe
from mergeline.merge.executor import run_merge
from mergeline.merge.reader import TensorReader

runner = CliRunner()


def write_recipe(folder: Path, base, models: list, name: str = "recipe.yaml") -> Path:
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "parameters": {"normalize": True},
              "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every tensor the merge reads from an input (TensorReader.read), in order."""
    seen: list[str] = []
    real = TensorReader.read

    def counting(self, name, pin=False):
        seen.append(name)
        return real(self, name, pin)

    monkeypatch.setattr(TensorReader, "read", counting)
    return seen


def merge_cli(*args: str):
    return runner.invoke(app, ["merge", *map(str, args), "--device", "cpu"])


def error_lines(res) -> list[str]:
    """The output's lines but the one-line estimate a merge prints before it starts."""
    return [line for line in res.output.splitlines() if line.strip() and not line.startswith("estimate: ")]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    debris = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert debris == [], debris


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def with_weight(src: Path, dst: Path, name: str, index: tuple[int, ...], value: float) -> Path:
    """A copy of model `src` at `dst` whose tensor `name` holds `value` at `index`."""
    ft = copy_model(src, dst)
    weights = load_file(ft / "model.safetensors")
    weights[name][index] = value
    save_file(weights, ft / "model.safetensors", metadata={"format": "pt"})
    return ft


# -- refusals -----------------------------------------------------------------------------
@pytest.mark.slow
def test_different_base_is_refused_by_the_in_merge_norms(zoo, tmp_path):
    recipe = write_recipe(tmp_path, zoo.base, [*zoo.finetunes.values(), zoo.negatives["different_base"]])
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert "check failed: norms." in line and "different_base" in line and "--allow-crimes" in line, line
    assert_nothing_written(out)


@pytest.mark.slow
def test_permuted_tokenizer_is_refused_before_any_tensor_is_read(zoo, tmp_path, reads):
    recipe = write_recipe(tmp_path, zoo.base, [*zoo.finetunes.values(), zoo.negatives["different_tokenizer"]])
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert "check failed: tokenizer.vocab" in line and "different_tokenizer" in line, line
    assert reads == []
    assert_nothing_written(out)


@pytest.mark.slow
def test_different_architecture_is_a_failed_check(zoo, tmp_path, reads):
    recipe = write_recipe(tmp_path, zoo.base, [*zoo.finetunes.values(), zoo.negatives["different_arch"]])
    res = merge_cli(recipe, tmp_path / "out")
    assert res.exit_code == 1, res.output
    assert "check failed: architecture" in res.output and reads == []
    assert_nothing_written(tmp_path / "out")


def test_folder_without_config_is_unusable_input(tiny_models, tmp_path, reads):
    ft = copy_model(tiny_models["ft_a"], tmp_path / "ft_a")
    (ft / "config.json").unlink()
    recipe = write_recipe(tmp_path, tiny_models["base"], [ft, tiny_models["ft_b"]])
    res = merge_cli(recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    (line,) = error_lines(res)
    assert str(ft / "config.json") in line.replace("\n", ""), line
    assert reads == []
    assert_nothing_written(tmp_path / "out")


def test_missing_folder_is_unusable_input(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models["base"], [tiny_models["ft_a"], tmp_path / "nowhere"])
    res = merge_cli(recipe, tmp_path / "out")
    assert res.exit_code == 2 and "nowhere" in res.output, res.output
    assert_nothing_written(tmp_path / "out")


def test_inf_weights_are_refused_naming_the_tensor(tiny_models, tmp_path):
    name = "transformer.h.1.mlp.c_fc.weight"
    ft = with_weight(tiny_models["ft_a"], tmp_path / "ft_inf", name, (3, 5), math.inf)
    recipe = write_recipe(tmp_path, tiny_models["base"], [ft, tiny_models["ft_b"]])
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert res.exit_code == 1, res.output
    (line,) = error_lines(res)
    assert "check failed: norms.finite" in line and name in line and "ft_inf" in line and "1 Inf" in line, line
    assert_nothing_written(out)


def test_nan_weights_in_a_ties_merge_are_one_line_naming_the_tensor(tiny_models, tmp_path):
    """TIES counts and elects: NaN input stops it mid-merge (it used to crash with a traceback)."""
    name = "transformer.h.0.mlp.c_fc.weight"
    ft = with_weight(tiny_models["ft_a"], tmp_path / "ft_nan", name, (0, 0), math.nan)
    recipe = write_recipe(tmp_path, tiny_models["base"], [ft, tiny_models["ft_b"]])  # a TIES recipe
    out = tmp_path / "out"
    res = merge_cli(recipe, out)
    assert res.exit_code == 2, res.output
    (line,) = error_lines(res)
    assert name in line and "ft_nan" in line and "NaN" in line, line
    assert_nothing_written(out)


@pytest.mark.parametrize("spelling", ["trailing_slash", "symlink"])
def test_same_model_twice_is_refused_before_any_read(tiny_models, tmp_path, reads, spelling):
    ft = copy_model(tiny_models["ft_a"], tmp_path / "ft1")
    if spelling == "trailing_slash":
        twice = f"{ft}/"
    else:
        twice = tmp_path / "link_to_ft1"
        twice.symlink_to(ft, target_is_directory=True)
    recipe = write_recipe(tmp_path, tiny_models["base"], [ft, twice])
    res = merge_cli(recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    (line,) = error_lines(res)
    assert "the same model is given twice" in line, line
    assert reads == []
    assert_nothing_written(tmp_path / "out")


def test_library_call_raises_checks_failed_and_keeps_an_existing_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path, tiny_models["base"], [tiny_models["ft_a"], tiny_models["different_base"]])
    with pytest.raises(ChecksFailed) as e:
        run_merge(recipe, out, device="cpu", progress=False, overwrite=True)
    assert e.value.stage == "norms" and {c.name for c in e.value.report.failed()} >= {"norms.unrelated"}
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the merge was discarded, not moved in
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- merging anyway -----------------------------------------------------------------------
@pytest.mark.slow
def test_allow_crimes_writes_and_records_the_waived_failures(zoo, tmp_path):
    recipe = write_recipe(tmp_path, zoo.base, [*zoo.finetunes.values(), zoo.negatives["different_tokenizer"]])
    out = tmp_path / "out"
    res = merge_cli(recipe, out, "--allow-crimes")
    assert res.exit_code == 0, res.output
    assert "--allow-crimes" in res.output and "tokenizer.vocab" in res.output
    assert (out / "model.safetensors").is_file()
    lineage = json.loads((out / "lineage.json").read_text())
    waived = {w["name"]: w for w in lineage["checks"]["waived"]}
    assert waived["tokenizer.vocab"]["by"] == "--allow-crimes" and waived["tokenizer.vocab"]["status"] == "fail"
    statuses = {c["name"]: c["status"] for c in lineage["checks"]["checks"]}
    assert statuses["tokenizer.vocab"] == "waived" and "fail" not in statuses.values()
    assert lineage["checks"]["norms"]["per_model"]["different_tokenizer"]["relative_delta_matrices"] > 0
    card = (out / "README.md").read_text()
    assert "merged with `--allow-crimes`" in card and "`tokenizer.vocab`" in card


def test_a_policy_waiver_lets_the_merge_through_and_is_recorded(tiny_models, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("waive: [norms.unrelated, norms.too_large, norms.outlier]\n")
    recipe = write_recipe(tmp_path, tiny_models["base"], [tiny_models["ft_a"], tiny_models["different_base"]])
    out = tmp_path / "out"
    res = merge_cli(recipe, out, "--policy", policy)
    assert res.exit_code == 0, res.output
    assert "--allow-crimes" not in res.output
    lineage = json.loads((out / "lineage.json").read_text())
    assert {w["by"] for w in lineage["checks"]["waived"]} == {"policy"}
    assert "norms.unrelated" in {w["name"] for w in lineage["checks"]["waived"]}
    assert "Waived by the compatibility policy" in (out / "README.md").read_text()


def test_a_clean_merge_records_its_checks(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models["base"], [tiny_models["ft_a"], tiny_models["ft_b"]])
    out = run_merge(recipe, tmp_path / "out", device="cpu", progress=False)
    assert out.waived == [] and out.checks["status"] in ("pass", "warn")
    lineage = json.loads((out.path / "lineage.json").read_text())
    assert lineage["checks"]["status"] == out.checks["status"] and lineage["checks"]["waived"] == []
    assert lineage["base"]["path"] == str(Path(tiny_models["base"]).resolve())
    assert "allow-crimes" not in (out.path / "README.md").read_text()


SHAPES = {"model.embed_tokens.weight": (40, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
          "model.layers.1.mlp.up_proj.weight": (16, 8), "model.norm.weight": (8,)}
CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 40}


def save_model(folder: Path, tensors: dict, shards: int) -> Path:
    folder.mkdir()
    names = list(tensors)
    per = -(-len(names) // shards)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i * per:(i + 1) * per] for i in range(shards)}
    for fname, part in files.items():
        save_file({n: tensors[n].contiguous() for n in part}, folder / fname)
    weight_map = {n: f for f, part in files.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


# -- the in-merge statistics are the check's --------------------------------------------
def assert_same_norms(ours: dict, theirs: dict) -> None:
    assert ours["tensors"] == theirs["tensors"] and ours["numel"] == theirs["numel"]
    assert ours["per_tensor"] == theirs["per_tensor"]  # same slabs summed in the same order: same bits
    assert ours.get("not_compared") == theirs.get("not_compared")
    for model, figures in theirs["per_model"].items():
        for key, value in figures.items():
            assert ours["per_model"][model][key] == pytest.approx(value, rel=1e-12, abs=1e-15), (model, key)
    for a, row in theirs["cosine"].items():
        for b, value in row.items():
            assert ours["cosine"][a][b] == pytest.approx(value, rel=1e-12, abs=1e-15), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("negative", [None, "different_base", "different_tokenizer"])
def test_in_merge_norms_equal_the_check_pass_on_the_zoo(zoo, tmp_path, negative):
    models = [*zoo.finetunes.values()] + ([zoo.negatives[negative]] if negative else [])
    recipe = write_recipe(tmp_path, zoo.base, models)
    checked = check_recipe(recipe)
    merged = run_merge(recipe, tmp_path / "out", device="cpu", progress=False, allow_crimes=True)
    assert_same_norms(merged.checks["norms"], checked.norms)
    ours = {c["name"]: c for c in merged.checks["checks"]}
    for c in checked.checks:  # the same verdicts; failures here are waived by --allow-crimes
        expect = "waived" if c.status == "fail" else c.status
        assert ours[c.name]["status"] == expect, (c.name, ours[c.name], c.status)
    assert sorted(merged.waived) == sorted(c.name for c in checked.failed())
    assert bool(merged.waived) == (negative is not None)


def test_in_merge_norms_equal_the_check_pass_with_a_tied_head_and_small_chunks(tmp_path):
    """A fine-tune with its own lm_head on a tied base (merged from the embedding, not compared),
    sharded input, and tensors split into several slabs."""
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    a = {k: v + 0.05 * torch.randn(*v.shape, generator=g) for k, v in base.items()}
    a["lm_head.weight"] = a["model.embed_tokens.weight"].clone()
    b = {k: (v + 0.05 * torch.randn(*v.shape, generator=g)).bfloat16() for k, v in base.items()}
    paths = [save_model(tmp_path / n, t, shards=s) for n, t, s in (("base", base, 3), ("a", a, 1), ("b", b, 2))]
    recipe = write_recipe(tmp_path, paths[0], paths[1:])
    policy = {"norms": {"chunk_elements": 48}}
    checked = check_recipe(recipe, policy)
    assert checked.check("tensors.names").status == "warn" and "lm_head.weight" in checked.check("tensors.names").message
    merged = run_merge(recipe, tmp_path / "out", device="cpu", progress=False, policy=policy)
    assert merged.waived == [] and merged.checks["status"] == checked.status == "warn"
    assert_same_norms(merged.checks["norms"], checked.norms)
    assert merged.checks["norms"]["not_compared"] == ["lm_head.weight"]


def test_the_checks_read_no_tensor_twice(tiny_models, tmp_path, reads, monkeypatch):
    """The norm statistics come from the merge's own read: every input tensor is read once, and
    the memory-mapped path `mergeline check` reads through (Checkpoint.get) is never used."""
    from mergeline.merge.checkpoint import Checkpoint

    def refuse(self, name):
        raise AssertionError(f"second read of {name!r} through Checkpoint.get")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    recipe = write_recipe(tmp_path, tiny_models["base"], [tiny_models["ft_a"], tiny_models["ft_b"]])
    out = run_merge(recipe, tmp_path / "out", device="cpu", progress=False, lineage=False)
    assert out.checks["norms"]["tensors"] > 0 and out.checks["status"] in ("pass", "warn")
    names = list(load_file(Path(tiny_models["base"]) / "model.safetensors"))
    assert sorted(reads) == sorted(names * 3)  # base, ft_a, ft_b: each tensor once
