"""Hostile and broken inputs (issue #11): each is refused with one line naming the file, tensor or
key, never a traceback, never a silently wrong model.

Tensors stored twice, shard paths that leave the model folder, side files linked to system
files, non-finite or absurd recipe numbers, text that is not UTF-8, 5000-digit numbers and
5000-character paths, deeply nested JSON, malformed added tokens, FP8 tensors, a full disk.

    pytest tests/merge/test_hostile_inputs.py -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.merge.checkpoint import Checkpoint, CheckpointError
from mergeline.merge.compat.tokenizer import read_tokenizer
from mergeline.merge.executor import run_merge
from mergeline.merge.recipe import RecipeError, load_recipe
from mergeline.merge.plan import MergeError
from mergeline.merge.writer import OutputError

SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (8, 8),
          "model.layers.1.mlp.up_proj.weight": (8, 8), "model.norm.weight": (8,)}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
          "vocab_size": 16, "torch_dtype": "float32"}


def tensors(seed: int) -> dict[str, torch.Tensor]:
    """Seed 0 is the base; any other seed a fine-tune of it (the base plus a small delta: the
    merge's own checks refuse unrelated weights)."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    if seed == 0:
        return base
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def save_model(folder: Path, ts: dict, shards: list[list[str]] | None = None) -> Path:
    """A model folder; `shards` lists the tensor names of each shard (None: one file)."""
    folder.mkdir(parents=True)
    if shards is None:
        save_file(ts, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: ts[n] for n in names}, str(folder / fname))
            weight_map.update(dict.fromkeys(names, fname))
        write_index(folder, weight_map)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def write_index(folder: Path, weight_map: dict, name: str = "model.safetensors.index.json") -> None:
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def models(tmp_path):
    return {"base": save_model(tmp_path / "base", tensors(0)),
            "ft_a": save_model(tmp_path / "ft_a", tensors(1)),
            "ft_b": save_model(tmp_path / "ft_b", tensors(2))}


def recipe(models, method="task_arithmetic", weights=(0.5, 0.5), **params) -> dict:
    return {"merge_method": method, "base_model": str(models["base"]),
            "models": [{"model": str(models[m]), "parameters": {"weight": w, **params}}
                       for m, w in zip(("ft_a", "ft_b"), weights)],
            "dtype": "float32"}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(res, code: int, *names: str, lines: int = 1) -> None:
    """Exit `code`, no traceback, at most `lines` lines of error, every name in it."""
    # The one-line estimate a merge prints before it starts is not part of the error.
    text = "\n".join(x for x in res.output.splitlines() if x.strip() and not x.startswith("estimate: "))
    assert res.exit_code == code, (res.exit_code, text, res.exception)
    assert "Traceback" not in text
    assert len(text.splitlines()) <= lines, text
    for n in names:
        assert n in text, (n, text)


# -- 1. one reading of a checkpoint: a tensor stored twice is refused ------------------------------
def test_tensor_in_two_shards_refused_naming_both(tmp_path, models):
    folder = save_model(tmp_path / "dup", tensors(0), shards=[list(SHAPES)[:2], list(SHAPES)[2:]])
    other = "model-00002-of-00002.safetensors"
    # the second shard also holds the first shard's tensor, with other values
    extra = {**{n: tensors(0)[n] for n in list(SHAPES)[2:]}, "model.embed_tokens.weight": torch.full((16, 8), 7.0)}
    save_file(extra, str(folder / other))
    with pytest.raises(CheckpointError, match="stored twice.*model-00001-of-00002.*model-00002-of-00002"):
        Checkpoint(folder)
    models = {**models, "ft_a": folder}
    r = write_recipe(tmp_path / "r.yaml", recipe(models))
    assert_one_line_error(cli("merge", str(r), str(tmp_path / "out")), 2, "stored twice", other)
    assert not (tmp_path / "out").exists()
    assert_one_line_error(cli("check", str(r)), 2, "stored twice", other)


def test_loose_shards_holding_one_name_twice_refused(tmp_path):
    folder = tmp_path / "loose"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(folder / "two.safetensors"))
    with pytest.raises(CheckpointError, match="stored twice, in one.safetensors and two.safetensors"):
        Checkpoint(folder)


def test_spans_follow_the_weight_map(tmp_path):
    folder = save_model(tmp_path / "m", tensors(0), shards=[list(SHAPES)[:2], list(SHAPES)[2:]])
    c = Checkpoint(folder)
    spans = c.spans()
    assert set(spans) == set(SHAPES)
    for name, (shard, offset, nbytes) in spans.items():
        assert shard == c.weight_map[name]
        raw = (folder / shard).read_bytes()[offset:offset + nbytes]
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(SHAPES[name]), c.get(name))


# -- 2. shard paths that leave the model folder ---------------------------------------------------
@pytest.mark.parametrize("where", ["dotdot", "absolute", "link"])
def test_index_shard_outside_the_folder_refused(tmp_path, models, where):
    outside = tmp_path / "elsewhere" / "evil.safetensors"
    outside.parent.mkdir()
    save_file({"model.norm.weight": torch.full((8,), 1e4)}, str(outside))
    folder = save_model(tmp_path / "m", tensors(1), shards=[list(SHAPES)[:3], list(SHAPES)[3:]])
    (folder / "model-00002-of-00002.safetensors").unlink()
    shard = {"dotdot": "../elsewhere/evil.safetensors", "absolute": str(outside), "link": "inner.safetensors"}[where]
    if where == "link":
        (folder / "inner.safetensors").symlink_to(outside)
    wm = {**dict.fromkeys(list(SHAPES)[:3], "model-00001-of-00002.safetensors"), "model.norm.weight": shard}
    write_index(folder, wm)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(folder)
    r = write_recipe(tmp_path / "r.yaml", recipe({**models, "ft_a": folder}))
    assert_one_line_error(cli("merge", str(r), str(tmp_path / "out")), 2, "outside the model folder")
    assert not (tmp_path / "out").exists()
    assert_one_line_error(cli("check", str(r)), 2, "outside the model folder")


def test_pickle_index_shard_outside_the_folder_refused(tmp_path):
    outside = tmp_path / "evil.bin"
    torch.save({"a": torch.zeros(2)}, outside)
    folder = tmp_path / "m"
    folder.mkdir()
    write_index(folder, {"a": "../evil.bin"}, "pytorch_model.bin.index.json")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(folder, allow_pickle=True)


def hf_snapshot(root: Path, ts: dict, merges_target: Path | None = None) -> Path:
    """The Hugging Face cache layout: snapshots/<rev>/FILE -> ../../blobs/<sha>."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    staged = save_model(root / "staged", ts)
    (staged / "merges.txt").write_text("#version: 0.2\na b\n")
    for i, f in enumerate(sorted(staged.iterdir())):
        blob = blobs / f"{i:040x}"
        f.rename(blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snap


def test_hugging_face_cache_links_keep_working(tmp_path, models):
    snap = hf_snapshot(tmp_path / "hub", tensors(0))
    c = Checkpoint(snap)
    assert set(c.names()) == set(SHAPES) and c.config["model_type"] == "llama"
    assert read_tokenizer(snap) is not None
    r = recipe({**models, "base": snap})
    out = run_merge(r, tmp_path / "out", device="cpu", progress=False)
    assert (out.path / "merges.txt").read_text().startswith("#version")  # copied through the link


# -- 3. side files linked out of the folder ------------------------------------------------------
def test_side_file_linked_to_a_system_file_refused(tmp_path, models):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (models["base"] / "merges.txt").symlink_to(secret)
    with pytest.raises((CheckpointError, MergeError), match="merges.txt.*outside the model folder"):
        run_merge(recipe(models), tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    r = write_recipe(tmp_path / "r.yaml", recipe(models))
    assert_one_line_error(cli("check", str(r)), 2, "merges.txt")


def test_generation_config_linked_out_refused(tmp_path, models):
    secret = tmp_path / "gen.json"
    secret.write_text("{}")
    (models["base"] / "generation_config.json").symlink_to(secret)
    with pytest.raises((CheckpointError, MergeError), match="generation_config.json"):
        run_merge(recipe(models), tmp_path / "out", device="cpu", progress=False)


# -- 4. recipe numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e308", "1.0e308", "5000000"])
def test_non_finite_or_absurd_weights_refused_by_key(tmp_path, models, method, value):
    r = recipe(models, method)
    text = yaml.safe_dump(r).replace("weight: 0.5", f"weight: {value}", 1)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight"):
        load_recipe(path)
    assert_one_line_error(cli("merge", str(path), str(tmp_path / "out")), 2, "models[0].parameters.weight")
    assert not (tmp_path / "out").exists()


def test_non_finite_global_and_gradient_values_named(models):
    r = recipe(models, "ties", density=0.5)
    r["models"][1]["parameters"]["weight"] = [0.5, float("nan")]
    with pytest.raises(RecipeError, match=r"models\[1\]\.parameters\.weight\[1\]"):
        load_recipe(r)
    r = recipe(models, "ties", density=0.5)
    r["parameters"] = {"lambda": float("inf")}
    with pytest.raises(RecipeError, match=r"parameters\.lambda"):
        load_recipe(r)


# -- 5. one-line errors ---------------------------------------------------------------------------
def test_recipe_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"merge_method: linear\nmodels: \xff\xfe\x00\x81\n")
    with pytest.raises(RecipeError, match="UTF-8"):
        load_recipe(path)
    assert_one_line_error(cli("merge", str(path), str(tmp_path / "out")), 2, "r.yaml", "UTF-8")


def test_5000_digit_number(tmp_path, models):
    text = yaml.safe_dump(recipe(models)).replace("weight: 0.5", "weight: " + "9" * 5000, 1)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="5000 digits is too long at line"):
        load_recipe(path)
    assert_one_line_error(cli("merge", str(path), str(tmp_path / "out")), 2, "r.yaml", "5000 digits")
    # under Python's conversion limit it is read, then refused as absurd by key
    path.write_text(text.replace("9" * 5000, "9" * 4000))
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight = a 4000-digit number"):
        load_recipe(path)


def test_5000_character_paths(tmp_path, models):
    long = "x" * 5000
    assert_one_line_error(cli("merge", long, str(tmp_path / "out")), 2, "5000 characters")
    r = recipe(models)
    r["models"][0]["model"] = long
    with pytest.raises(ValueError, match="5000 characters"):  # ModelNotFound, as MergeError
        run_merge(r, tmp_path / "out", device="cpu", progress=False)
    assert_one_line_error(cli("merge", str(write_recipe(tmp_path / "r.yaml", r)), str(tmp_path / "out")), 2,
                          "5000 characters")
    with pytest.raises(OutputError, match=r"\d{4} characters"):
        run_merge(recipe(models), tmp_path / long, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"\d{4} characters"):
        Checkpoint(tmp_path / long)


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json(tmp_path, models):
    folder = save_model(tmp_path / "deep_index", tensors(0), shards=[list(SHAPES)])
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match="index.json.*nested too deeply"):
        Checkpoint(folder)
    (models["base"] / "config.json").write_text(DEEP)
    with pytest.raises(CheckpointError, match="config.json.*nested too deeply"):
        Checkpoint(models["base"]).config
    r = write_recipe(tmp_path / "r.yaml", recipe(models))
    assert_one_line_error(cli("merge", str(r), str(tmp_path / "out")), 2, "config.json", "nested too deeply")
    (models["ft_a"] / "tokenizer.json").write_text(DEEP)
    with pytest.raises(CheckpointError, match="tokenizer.json.*nested too deeply"):
        read_tokenizer(models["ft_a"])


def test_deeply_nested_recipe_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nparameters: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match="r.yaml"):
        load_recipe(path)


@pytest.mark.parametrize("added", [[{"content": "<x>"}], [5], [{"id": "abc", "content": "<x>"}],
                                   [{"id": 3, "content": None}], {"id": 3}])
def test_malformed_added_tokens(tmp_path, added):
    folder = tmp_path / "tok"
    folder.mkdir()
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "added_tokens": added}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match="tokenizer.json.*added_tokens"):
        read_tokenizer(folder)


def test_malformed_added_tokens_decoder(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"x": {"content": "<x>"}}}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*added_tokens_decoder"):
        read_tokenizer(folder)


def test_malformed_added_tokens_via_check_is_one_line(tmp_path, models):
    tj = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": [{"content": "<x>"}]}
    for m in models.values():
        (m / "tokenizer.json").write_text(json.dumps(tj))
    r = write_recipe(tmp_path / "r.yaml", recipe(models))
    assert_one_line_error(cli("check", str(r)), 2, "tokenizer.json", "added_tokens[0]")


def test_fp8_tensor_refused_in_check_and_merge(tmp_path, models):
    ts = tensors(1)
    ts["model.layers.0.mlp.up_proj.weight"] = ts["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    fp8 = save_model(tmp_path / "fp8", ts)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight.*F8_E4M3"):
        Checkpoint(fp8).infos()
    r = write_recipe(tmp_path / "r.yaml", recipe({**models, "ft_a": fp8}))
    for res in (cli("check", str(r)), cli("merge", str(r), str(tmp_path / "out"))):
        assert_one_line_error(res, 2, "model.layers.0.mlp.up_proj.weight", "F8_E4M3")
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_in_two_lines_at_most(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nmodels: [\n  - model: a\n")
    assert_one_line_error(cli("merge", str(path), str(tmp_path / "out")), 2, "r.yaml", "line", lines=2)


def test_pickle_refusal_in_two_lines_at_most(tmp_path, models):
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    torch.save(tensors(1), folder / "pytorch_model.bin")
    r = write_recipe(tmp_path / "r.yaml", recipe({**models, "ft_a": folder}))
    assert_one_line_error(cli("merge", str(r), str(tmp_path / "out")), 2, "pytorch_model.bin", "--allow-pickle",
                          lines=2)


# -- disk full --------------------------------------------------------------------------------------
BIG = {"model.embed_tokens.weight": (1024, 256), "model.layers.0.mlp.up_proj.weight": (256, 256),
       "model.layers.1.mlp.up_proj.weight": (256, 256), "model.norm.weight": (256,)}


def big_models(root: Path) -> dict[str, Path]:
    cfg = {**CONFIG, "hidden_size": 256, "vocab_size": 1024}
    out = {}
    for i, name in enumerate(("base", "ft_a", "ft_b")):
        g = torch.Generator().manual_seed(i)
        out[name] = save_model(root / name, {k: torch.randn(*s, generator=g) for k, s in BIG.items()})
        (out[name] / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, tiny_disk):
    models = big_models(tmp_path / "in")  # a ~1.6 MB merged model: does not fit in 1 MiB
    r = write_recipe(tmp_path / "r.yaml", recipe(models))
    res = cli("merge", str(r), str(tiny_disk / "out"), "--device", "cpu")
    assert_one_line_error(res, 2, str(tiny_disk / "out"), "no space left")
    assert sorted(p.name for p in tiny_disk.iterdir()) == []  # no staging folder, no lock file


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """The same without root: RLIMIT_FSIZE makes writes past 1 MB fail with EFBIG."""
    models = big_models(tmp_path / "in")
    r = write_recipe(tmp_path / "r.yaml", recipe(models))
    out = tmp_path / "outdir"
    out.mkdir()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        from mergeline.flows.cli import app
        sys.argv = ["mergeline", "merge", {str(r)!r}, {str(out / "m")!r}, "--device", "cpu"]
        app()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    err = "\n".join(x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("estimate: "))
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(out / "m") in err and "too large" in err
    assert list(out.iterdir()) == []
