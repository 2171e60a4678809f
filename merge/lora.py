"""Fine-tunes given as LoRA adapters: mergekit's `BASE+ADAPTER` model references.

A reference `./base+./my-lora` is the base model with a PEFT LoRA adapter merged in (Hu et al.,
2021, arXiv:2106.09685): for every adapted weight, W' = W + s * B @ A with s = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA), transposed for GPT-2's Conv1D (fan_in_fan_out), and
(B @ A)^T for embeddings. Modules in `modules_to_save` replace the base's tensor outright. This
is what peft's `merge_and_unload` computes (its default float32 adapter weights: the sum is
taken in float32 and rounded once to the base's dtype), but done one tensor at a time as the
tensor is read, so no merged copy of the model is ever written. Adapter features that change
the formula (DoRA, LoRA biases, per-module alpha) are refused by name, never misread.

    python -m mergeline.merge.lora BASE_DIR ADAPTER_DIR     # lists the adapted tensors
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mergeline.merge.model_folder import CheckpointError, model_file, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's key prefix for the wrapped model's modules
# key suffix -> (which matrix, on an embedding?); linear layers store .weight, embeddings not
_PARTS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
          ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}


class LoraError(CheckpointError):
    """An adapter that cannot be applied; the message names the file and key at fault."""


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, read once (adapters are small), applied tensor by tensor."""

    folder: Path
    # base tensor name -> (A, B, is_embedding); A: (r, in), B: (out, r) as peft stores them
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save
    alpha: float = 1.0
    rslora: bool = False
    fan_in_fan_out: bool = False

    @classmethod
    def load(cls, folder: str | Path) -> "LoraAdapter":
        folder = Path(folder)
        cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        cfg = read_json_object(cfg_path)
        _refuse_unsupported(cfg, cfg_path)
        if model_file(folder, ADAPTER_WEIGHTS, "adapter weights") is None:
            raise LoraError(f"{weights}: missing (adapters saved as adapter_model.bin are not read: pickle)")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as e:
            raise LoraError(f"{weights}: unreadable safetensors file ({e})") from e
        adapter = cls(folder, alpha=float(cfg.get("lora_alpha", 8)), rslora=bool(cfg.get("use_rslora")),
                      fan_in_fan_out=bool(cfg.get("fan_in_fan_out")))
        halves: dict[str, dict] = {}  # base tensor name -> {"A": ..., "B": ..., "emb": ...}
        for key, t in state.items():
            name = key.removeprefix(_PREFIX)
            suffix = next((s for s in _PARTS if name.endswith(s)), None)
            if suffix is None:
                if "lora_" in name:
                    raise LoraError(f"{weights}: tensor {key!r} is not a plain LoRA A/B matrix (DoRA, LoRA bias "
                                    "and other variants are not supported)")
                adapter.replaced[name] = t  # a module in modules_to_save: its full weights
                continue
            which, emb = _PARTS[suffix]
            halves.setdefault(name[: -len(suffix)] + ".weight", {"emb": emb})[which] = t
        for name, h in halves.items():
            a, b = h.get("A"), h.get("B")
            if a is None or b is None or a.shape[0] != b.shape[1]:
                raise LoraError(f"{weights}: the adapter of {name!r} needs a lora_A and a lora_B of equal rank")
            adapter.pairs[name] = (a, b, h["emb"])
        return adapter

    def scale(self, rank: int) -> float:
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def delta(self, name: str) -> torch.Tensor | None:
        """s * B @ A for tensor `name`, in float32, in the base tensor's layout; None if not adapted."""
        if name not in self.pairs:
            return None
        a, b, emb = self.pairs[name]
        d = (b.float() @ a.float()) * self.scale(a.shape[0])
        return d.T if (emb or self.fan_in_fan_out) else d

    def apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The base tensor `w` with the adapter merged in, in w's dtype (shapes were checked
        against the base's headers by `check_shapes` when the checkpoint was opened)."""
        if name in self.replaced:
            return self.replaced[name].to(w.dtype)
        d = self.delta(name)
        return w if d is None else (w.float() + d).to(w.dtype)

    def names(self) -> set[str]:
        return set(self.pairs) | set(self.replaced)

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fail before any compute if an update does not fit the base's tensor (from its header)."""
        for name in sorted(self.names()):
            if name in self.replaced:
                got = tuple(self.replaced[name].shape)
            else:
                a, b, emb = self.pairs[name]
                got = (b.shape[0], a.shape[1])
                got = got[::-1] if (emb or self.fan_in_fan_out) else got
            if name not in shapes or got != shapes[name]:
                where = f"shape {list(shapes[name])}" if name in shapes else "no such tensor"
                raise LoraError(f"{self.folder / ADAPTER_WEIGHTS}: the adapter changes {name!r} with shape {list(got)}, "
                                f"the base has {where} (a tied head, or an adapter for another model?)")


def _refuse_unsupported(cfg: dict, path: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r}: only LoRA adapters are supported")
    for key, why in (("use_dora", "DoRA rescales each column: not W + s * B @ A"),
                     ("lora_bias", "LoRA biases are not supported"),
                     ("alpha_pattern", "per-module lora_alpha is not supported"),
                     ("layer_replication", "layer replication changes the architecture"),
                     ("target_parameters", "LoRA on raw parameters is not supported"),
                     ("trainable_token_indices", "trainable tokens are not supported")):
        if cfg.get(key):
            raise LoraError(f"{path}: {key} is set: {why}")


if __name__ == "__main__":
    adapter = LoraAdapter.load(sys.argv[2] if len(sys.argv) > 2 else sys.argv[1])
    for n in sorted(adapter.names()):
        print(n, "replaced" if n in adapter.replaced else f"rank {adapter.pairs[n][0].shape[0]}")
