"""Read a Hugging Face model folder's weights lazily, one tensor at a time.

A folder holds `config.json` plus either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are memory-mapped by safetensors, so opening a
70B checkpoint costs only its headers. Pickle checkpoints (`*.bin`) are refused unless
the caller opts in, because unpickling runs code; opted in, they load with
`torch.load(weights_only=True)`.

    python -c "from merge.checkpoint import Checkpoint; c = Checkpoint('MODEL_DIR'); print(len(c.names()))"
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# safetensors header dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A model folder that cannot be read; the message names the file at fault."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # shard file name inside the folder

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_json_object(path: Path) -> dict:
    """A JSON object from `path` (config.json, adapter_config.json); CheckpointError naming the
    file when it is missing, not JSON, or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {path.name} missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {path.name} must be a JSON object")
    return data


def _read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index (tensor name -> shard file)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index, no readable 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


class Checkpoint:
    """Lazy access to the tensors of one model folder, or of `BASE+ADAPTER` (a base model folder
    with a LoRA adapter merged into each tensor as it is read: merge/lora.py)."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        model, adapter = str(folder), None
        if "+" in model:
            from merge.lora import LoraAdapter
            from merge.resolve import split_adapter

            model, adapter_folder = split_adapter(model)
            adapter = LoraAdapter.load(adapter_folder)
        self.folder = Path(model)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: model folder not found")
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
        if index.exists():
            weight_map = _read_weight_map(index)
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index}: names shard {shard!r}, which is missing")
            return dict(weight_map)
        single = self.folder / SAFETENSORS_SINGLE
        if single.exists():
            return {name: SAFETENSORS_SINGLE for name in self._open(SAFETENSORS_SINGLE).keys()}
        loose = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if loose:
            return {name: shard for shard in loose for name in self._open(shard).keys()}
        pickles = [n for n in PICKLE_NAMES if (self.folder / n).exists()]
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
        self._pickled, weight_map = {}, {}
        for f in files:
            path = self.folder / f
            if not path.is_file():
                raise CheckpointError(f"{self.folder / name}: names shard {f!r}, which is missing")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{path}: cannot load pickle checkpoint ({e})") from e
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path}: pickle checkpoint is not a flat name -> tensor state dict")
            self._pickled.update(state)
            weight_map.update({k: f for k in state})
        return weight_map

    def _open(self, shard: str):
        if shard not in self._handles:
            path = self.folder / shard
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
        return self._handles[shard]

    # -- public API ------------------------------------------------------------
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
                    dtype = next((k for k, v in DTYPES.items() if v == t.dtype), str(t.dtype))
                    infos[name] = TensorInfo(dtype, tuple(t.shape), shard)
                    continue
                try:
                    sl = self._open(shard).get_slice(name)
                except SafetensorError as e:
                    raise CheckpointError(f"{self.folder / shard}: tensor {name!r} (listed in the index) "
                                          f"unreadable ({e})") from e
                infos[name] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()), shard)
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
