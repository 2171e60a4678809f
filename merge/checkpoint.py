"""Read a Hugging Face model folder's weights lazily, one tensor at a time.

A folder holds `config.json` plus either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are memory-mapped by safetensors, so opening a
70B checkpoint costs only its headers. Pickle checkpoints (`*.bin`) are refused unless
the caller opts in, because unpickling runs code; opted in, they load with
`torch.load(weights_only=True)`.

    python -c "from mergeline.merge.checkpoint import Checkpoint; c = Checkpoint('MODEL_DIR'); print(len(c.names()))"
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mergeline.merge.lora import LoraAdapter
from mergeline.merge.model_folder import JSON_ERRORS, CheckpointError, error_text, model_file, read_json_object, short_path
from mergeline.merge.resolve import split_adapter

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# safetensors header dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # shard file name inside the folder

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index (tensor name -> shard file), every shard
    a regular file inside the model folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (*JSON_ERRORS, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index, no readable 'weight_map' ({error_text(e)})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    for shard in sorted(set(weight_map.values())):
        if model_file(index.parent, shard, "shard") is None:
            raise CheckpointError(f"{index}: names shard {short_path(shard)!r}, which is missing")
    return weight_map


def _one_owner(found: list[tuple[str, list[str]]], folder: Path) -> dict[str, str]:
    """(file, tensor names) per file -> name -> file; a name stored in two files is refused,
    since which copy a reader takes would depend on the reader."""
    owner: dict[str, str] = {}
    for file, names in found:
        for name in names:
            if name in owner:
                raise CheckpointError(f"{folder}: tensor {name!r} is stored twice, in {owner[name]} and {file} "
                                      "(refused: which copy is meant is ambiguous)")
            owner[name] = file
    return owner


class Checkpoint:
    """Lazy access to the tensors of one model folder, or of `BASE+ADAPTER` (a base model folder
    with a LoRA adapter merged into each tensor as it is read: merge/lora.py)."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        model, adapter = str(folder), None
        if "+" in model:
            model, adapter_folder = split_adapter(model)
            adapter = LoraAdapter.load(adapter_folder)
        self.folder = Path(model)
        try:
            found = self.folder.is_dir()
        except OSError as e:  # a name too long for the file system
            raise CheckpointError(f"{short_path(self.folder)}: unusable model folder ({e.strerror})") from None
        if not found:
            raise CheckpointError(f"{short_path(self.folder)}: model folder not found")
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.weight_map = self._find_weights(allow_pickle)
        self._infos: dict[str, TensorInfo] | None = None
        self.adapter = adapter
        if adapter is not None:
            adapter.check_shapes({n: info.shape for n, info in self.infos().items()})

    # -- discovery -------------------------------------------------------------
    def _find_weights(self, allow_pickle: bool) -> dict[str, str]:
        index = self.folder / SAFETENSORS_INDEX
        if model_file(self.folder, SAFETENSORS_INDEX, "index") is not None:
            weight_map = _read_weight_map(index)
            # Every shard's header is read once here, so a name two shards hold is refused
            # before anyone (check, merge) reads either copy.
            _one_owner([(s, list(self._open(s).keys())) for s in sorted(set(weight_map.values()))], self.folder)
            return dict(weight_map)
        if model_file(self.folder, SAFETENSORS_SINGLE) is not None:
            return {name: SAFETENSORS_SINGLE for name in self._open(SAFETENSORS_SINGLE).keys()}
        loose = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if loose:
            for shard in loose:
                model_file(self.folder, shard, "shard")
            return _one_owner([(s, list(self._open(s).keys())) for s in loose], self.folder)
        pickles = [n for n in PICKLE_NAMES if model_file(self.folder, n) is not None]
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.folder / pickles[0]}: pickle checkpoint refused (loading a pickle runs code); "
                    "convert it to safetensors, or pass --allow-pickle to load it with weights_only=True"
                )
            return self._load_pickle(pickles[0])
        raise CheckpointError(f"{self.folder}: no model.safetensors or {SAFETENSORS_INDEX} found")

    def _load_pickle(self, name: str) -> dict[str, str]:
        files = [name]
        if name.endswith(".index.json"):
            files = sorted(set(_read_weight_map(self.folder / name).values()))
        self._pickled, found = {}, []
        for f in files:
            path = self.folder / f
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{path}: cannot load pickle checkpoint ({error_text(e)})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path}: pickle checkpoint is not a flat name -> tensor state dict")
            found.append((f, list(state)))
            self._pickled.update(state)
        return _one_owner(found, self.folder)

    def _open(self, shard: str):
        if shard not in self._handles:
            path = self.folder / shard
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError, RecursionError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({error_text(e)})") from None
        return self._handles[shard]

    # -- public API ------------------------------------------------------------
    def spans(self) -> dict[str, tuple[str, int, int]]:
        """Name -> (shard, byte offset, byte length) of each tensor's data, for the weight map's
        own tensor -> shard pairs only (the one reading of this checkpoint: a reader that maps
        shard headers itself must not pick up a copy the map does not name)."""
        out: dict[str, tuple[str, int, int]] = {}
        if self._pickled is not None:
            return out
        wanted: dict[str, set[str]] = {}
        for name, shard in self.weight_map.items():
            wanted.setdefault(shard, set()).add(name)
        for shard, names in wanted.items():
            path = self.folder / shard
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))  # safetensors already parsed it in _open
            for name in names & header.keys():
                start, end = header[name]["data_offsets"]
                out[name] = (shard, 8 + n + start, end - start)
        return out

    @property
    def config(self) -> dict:
        return read_json_object(self.folder / "config.json")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def infos(self) -> dict[str, TensorInfo]:
        """Name -> dtype, shape, shard, read from the headers alone (no tensor data)."""
        if self._infos is None:
            infos = {}
            for name, shard in self.weight_map.items():
                if self._pickled is not None:
                    t = self._pickled[name]
                    dtype = next((k for k, v in DTYPES.items() if v == t.dtype), str(t.dtype).removeprefix("torch."))
                    infos[name] = TensorInfo(dtype, tuple(t.shape), shard)
                else:
                    try:
                        sl = self._open(shard).get_slice(name)
                    except SafetensorError as e:
                        raise CheckpointError(f"{self.folder / shard}: tensor {name!r} (listed in the index) "
                                              f"unreadable ({e})") from None
                    infos[name] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()), shard)
                if infos[name].dtype not in DTYPES:  # FP8, F4, ...: no merge arithmetic is defined on them
                    raise CheckpointError(f"{self.folder / shard}: tensor {name!r} has dtype {infos[name].dtype}, which "
                                          f"mergeline cannot read (supported: {', '.join(DTYPES)}); dequantize the "
                                          "model first")
            self._infos = infos
        return self._infos

    def get(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped from its shard (a CPU tensor)."""
        if self._pickled is not None:
            return self.adapt(name, self._pickled[name])
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r}")
        try:
            return self.adapt(name, self._open(shard).get_tensor(name))
        except SafetensorError as e:
            raise CheckpointError(f"{self.folder / shard}: tensor {name!r} unreadable ({e})") from e

    def adapt(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """The tensor this checkpoint means, given the bytes stored under `name`: itself, or with
        the LoRA adapter merged in."""
        return self.adapter.apply(name, stored) if self.adapter is not None else stored

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in {self.folder / s for s in set(self.weight_map.values())})
