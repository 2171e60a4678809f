"""Write a merged model folder: safetensors shards streamed as tensors arrive, then the rest.

Every output tensor's name, dtype and shape is known from the input headers before the merge
starts, so each shard's safetensors header is written first and tensor bytes are appended as
they are computed: memory stays constant however large the model. Shards are cut at
`--out-shard-size`; with more than one, `model.safetensors.index.json` maps names to shards.

Everything goes into a hidden staging folder beside OUTPUT_DIR that is renamed into place only
when complete, so a failed merge leaves no half-written model behind.

    python -c "from merge.writer import parse_size; print(parse_size('500MB'))"
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.checkpoint import DTYPES

ST_NAME = {v: k for k, v in DTYPES.items()}  # torch dtype -> safetensors dtype name
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class OutputError(ValueError):
    """An output folder or option that cannot be used; the message names it."""


def parse_size(text: str | int) -> int:
    """'500MB' -> 500_000_000, '5GiB' -> 5 * 2**30, 1000 -> 1000 (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise OutputError(f"--out-shard-size {text!r}: expected a size like 500MB, 5GB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise OutputError(f"--out-shard-size {text!r}: must be positive")
    return size


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy, in merge order: a shard is closed when the next tensor would overflow it."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(shard: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Append tensors, in the planned order, to safetensors shards whose headers are already written."""

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._fh = None
        self._open_index = -1
        self.bytes_written = 0

    def _switch_to(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.folder / self.files[i], "wb")
        self._fh.write(_header_bytes(self.shards[i]))
        self._open_index = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise OutputError(f"tensor {name!r}: more tensors written than planned")
        i, spec = self._order[self._next]
        if spec.name != name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise OutputError(f"tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) does not match the planned "
                              f"{spec.name!r} ({spec.dtype}, {spec.shape})")
        if i != self._open_index:
            self._switch_to(i)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self.bytes_written += spec.nbytes
        self._next += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index when sharded; returns name -> shard file."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise OutputError(f"output incomplete: tensor {missing!r} and {len(self._order) - self._next - 1} more never written")
        if self._open_index < 0 and self._order:  # nothing written yet: an all-empty model
            self._switch_to(0)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        weight_map = {t.name: self.files[i] for i, t in self._order}
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# -- the folder ------------------------------------------------------------------
@contextmanager
def staging_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a fresh hidden folder beside `out_dir`; on success it replaces `out_dir` atomically-ish."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError(f"{out_dir}: output folder already exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_config(folder: Path, config: dict, dtype: torch.dtype) -> None:
    """config.json of the reference model with its dtype keys set to the written dtype."""
    cfg = dict(config)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = name
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_side_files(folder: Path, tokenizer_from: Path, config_from: Path) -> list[str]:
    """Tokenizer files from the tokenizer source, generation_config.json from the reference model."""
    copied = []
    for name in TOKENIZER_FILES:
        src = tokenizer_from / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    gen = config_from / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, folder / "generation_config.json")
        copied.append("generation_config.json")
    return copied


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


def _model_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        tpl = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(tpl, dict):
            tpl = tpl.get("default")
        if isinstance(tpl, str):
            return tpl.strip()
    return None


def write_chat_template(folder: Path, template: str, model_folders: list[Path]) -> None:
    """`auto` (the most common template among the inputs), a built-in name, or a Jinja string."""
    if template == "auto":
        found = [t for t in (_model_template(f) for f in model_folders) if t]
        if not found:
            return
        template = max(set(found), key=found.count)
    elif template in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[template]
    elif "{" not in template:
        raise OutputError(f"chat_template {template!r}: expected 'auto', {', '.join(BUILTIN_TEMPLATES)} or a Jinja template")
    (folder / "chat_template.jinja").write_text(template)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():  # a template here would shadow the .jinja file in older transformers
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
