"""The tiny float32 Llama the parity tests merge with mergekit and mergeline, and a reader.

    from tests.merge._llama import LAYERS, build_llamas, mergekit_merge, read_all
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, VOCAB = 16, 40, 3, 48
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    s = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    s.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return s


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def mergekit_merge(recipe: dict, out: Path) -> None:
    """The recipe merged by the real mergekit (the yardstick), in-process, into `out`."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu"))


def build_llamas(root: Path, seed: int) -> dict[str, Path]:
    """A base and three fine-tunes (base + 0.05, 0.10, 0.15 x noise) under `root`, float32."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*v, generator=g) for k, v in llama_shapes().items()}
    out = {}
    for i, name in enumerate(["base", "ft_a", "ft_b", "ft_c"]):
        folder = root / name
        folder.mkdir()
        scale = 0.0 if i == 0 else 0.05 * i
        tensors = {k: (v + scale * torch.randn(*v.shape, generator=g)).contiguous() for k, v in base.items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG))
        out[name] = folder
    return out
