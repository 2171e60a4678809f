"""Speed of the compatibility gate (issue 4, item 9), against a plain read of the inputs.

Targets: the header checks (config, safetensors headers, tokenizer) well under 1 s on the
300M-parameter set; the streamed delta-norm pass at most 2x the time of reading every input
tensor once from the page cache (here: each tensor copied out of its memory map once).

    python benchmarks/bench_compat.py --build /tmp/bench300m            # base + 3 fine-tunes, 322M params, bf16
    python benchmarks/bench_compat.py --build /tmp/benchsmall --size small
    python benchmarks/bench_compat.py BASE MODEL [MODEL ...]             # your own folders

The 300M set matches shared/notes/merging.md (synthetic Llama, hidden 1024, 20 layers, vocab
32000; 2.5 GB on disk). Timings on a shared 2-core machine are noisy: the best of --repeat runs
is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from merge.checkpoint import Checkpoint  # noqa: E402
from merge.compat import check_models  # noqa: E402
from merge.compat.norms import stream_norms  # noqa: E402

SIZES = {  # hidden, layers, intermediate, vocab
    "300m": (1024, 20, 2816, 32000),
    "small": (256, 4, 704, 8000),
}


def llama_tensors(hidden, layers, inter, vocab, gen) -> dict[str, torch.Tensor]:
    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = w(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return t


def build(root: Path, size: str, n_models: int = 3) -> tuple[Path, dict[str, Path]]:
    """Base + n fine-tunes (base + small noise) as safetensors folders; reused when present."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    hidden, layers, inter, vocab = SIZES[size]
    names = ["base"] + [f"ft{i}" for i in range(n_models)]
    folders = {n: root / n for n in names}
    if all((f / "model.safetensors").exists() for f in folders.values()):
        return folders["base"], {n: folders[n] for n in names[1:]}
    gen = torch.Generator().manual_seed(0)
    base = llama_tensors(hidden, layers, inter, vocab, gen)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "intermediate_size": inter, "vocab_size": vocab,
              "num_attention_heads": 16, "num_key_value_heads": 16, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "dtype": "bfloat16"}
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    for i, n in enumerate(names):
        folders[n].mkdir(parents=True, exist_ok=True)
        tensors = base if n == "base" else {
            k: (v.float() + 0.002 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in base.items()}
        save_file(tensors, str(folders[n] / "model.safetensors"))
        (folders[n] / "config.json").write_text(json.dumps(config))
        tok.save(str(folders[n] / "tokenizer.json"))
        print(f"built {folders[n]}", flush=True)
    return folders["base"], {n: folders[n] for n in names[1:]}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def plain_read(folders: list[Path]) -> None:
    """Every tensor of every input copied out of its memory map once: the floor for any pass."""
    for f in folders:
        c = Checkpoint(f)
        for name in c.names():
            c.get(name).clone()


def norm_pass(base: Path, models: dict[str, Path], chunk: int) -> None:
    b = Checkpoint(base)
    ms = {n: Checkpoint(p) for n, p in models.items()}
    stream_norms(b, ms, b.names(), chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, help="BASE MODEL [MODEL ...]")
    ap.add_argument("--build", type=Path, help="build (or reuse) a synthetic set here")
    ap.add_argument("--size", choices=sorted(SIZES), default="300m")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunks", default="65536,262144,1048576,4194304", help="chunk sizes to compare")
    args = ap.parse_args()
    if args.build:
        base, models = build(args.build, args.size)
    elif len(args.folders) >= 2:
        base, models = args.folders[0], {p.name: p for p in args.folders[1:]}
    else:
        ap.error("give BASE MODEL [MODEL ...] or --build DIR")
    inputs = [base, *models.values()]
    nbytes = sum(Checkpoint(f).nbytes() for f in inputs)
    print(f"inputs: {len(inputs)} folders, {nbytes / 1e9:.2f} GB; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    plain_read(inputs)  # warm the page cache so every measurement reads from memory

    headers = best(lambda: check_models(base, models, {"norms": {"enabled": False}}), args.repeat)
    read = best(lambda: plain_read(inputs), args.repeat)
    print(f"{'header checks (config, headers, tokenizer)':<46} {headers:8.3f} s   target < 1 s")
    print(f"{'plain read of all inputs once':<46} {read:8.3f} s   ({nbytes / read / 1e9:.2f} GB/s)")
    for chunk in (int(c) for c in args.chunks.split(",")):
        t = best(lambda: norm_pass(base, models, chunk), args.repeat)
        print(f"{'delta-norm pass, chunk ' + str(chunk):<46} {t:8.3f} s   {t / read:5.2f}x the read (target <= 2x)")
    full = best(lambda: check_models(base, models), 1)
    print(f"{'full check_models (default policy)':<46} {full:8.3f} s")


if __name__ == "__main__":
    main()
