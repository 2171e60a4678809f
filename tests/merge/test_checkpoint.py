"""Checkpoint: lazy header-only reads, and one clear error naming the file for each bad folder.

    pytest tests/merge/test_checkpoint.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeline.merge.checkpoint import Checkpoint, CheckpointError

TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.bias": torch.ones(5, dtype=torch.bfloat16)}


def folder(tmp_path: Path, name="m", config=True) -> Path:
    f = tmp_path / name
    f.mkdir()
    if config:
        (f / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return f


def sharded(tmp_path: Path) -> Path:
    f = folder(tmp_path)
    save_file({"a.weight": TENSORS["a.weight"]}, str(f / "model-00001-of-00002.safetensors"))
    save_file({"b.bias": TENSORS["b.bias"]}, str(f / "model-00002-of-00002.safetensors"))
    wm = {"a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}
    (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return f


def test_single_file_headers_and_tensors(tmp_path):
    f = folder(tmp_path)
    save_file(TENSORS, str(f / "model.safetensors"))
    c = Checkpoint(f)
    assert sorted(c.names()) == ["a.weight", "b.bias"]
    info = c.infos()["a.weight"]
    assert (info.dtype, info.shape, info.file, info.numel) == ("F32", (3, 4), "model.safetensors", 12)
    assert c.infos()["b.bias"].dtype == "BF16"
    assert torch.equal(c.get("a.weight"), TENSORS["a.weight"])
    assert c.config == {"model_type": "gpt2"}


def test_sharded_index(tmp_path):
    c = Checkpoint(sharded(tmp_path))
    assert c.infos()["b.bias"].file == "model-00002-of-00002.safetensors"
    assert torch.equal(c.get("b.bias"), TENSORS["b.bias"])


def test_index_naming_a_missing_shard(tmp_path):
    f = sharded(tmp_path)
    (f / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: names shard 'model-00002-of-00002\.safetensors', which is missing"):
        Checkpoint(f)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    f = sharded(tmp_path)
    idx = json.loads((f / "model.safetensors.index.json").read_text())
    idx["weight_map"]["c.weight"] = "model-00001-of-00002.safetensors"
    (f / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: tensor 'c\.weight'"):
        Checkpoint(f).infos()


def test_bad_index(tmp_path):
    f = sharded(tmp_path)
    (f / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    with pytest.raises(CheckpointError, match=r"index\.json: 'weight_map' must map"):
        Checkpoint(f)


@pytest.mark.parametrize("cut", [0, 5, 100, -1])
def test_truncated_file_is_named(tmp_path, cut):
    f = folder(tmp_path)
    save_file(TENSORS, str(f / "model.safetensors"))
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"m/model\.safetensors: unreadable safetensors file"):
        Checkpoint(f).infos()


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        Checkpoint(tmp_path / "nope")
    f = folder(tmp_path, config=False)
    save_file(TENSORS, str(f / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"m/config\.json: config\.json missing"):
        Checkpoint(f).config
    (f / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        Checkpoint(f).config


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(folder(tmp_path))


def test_pickle_refused_then_loaded_weights_only(tmp_path):
    f = folder(tmp_path)
    torch.save(TENSORS, f / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoint refused.*--allow-pickle"):
        Checkpoint(f)
    c = Checkpoint(f, allow_pickle=True)
    assert c.infos()["b.bias"].dtype == "BF16"
    assert torch.equal(c.get("a.weight"), TENSORS["a.weight"])


class Evil:  # weights_only=True must refuse to build arbitrary objects
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    f = folder(tmp_path)
    torch.save({"a": Evil()}, f / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot load pickle"):
        Checkpoint(f, allow_pickle=True)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    f = folder(tmp_path)
    torch.save({"state": TENSORS}, f / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a flat name -> tensor state dict"):
        Checkpoint(f, allow_pickle=True)
