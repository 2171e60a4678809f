"""mergeline's TIES merge at three model sizes: does time per GB stay flat and memory stay bounded?

Builds (once, cached under --cache, default ./.bench/sizes/SIZE) a synthetic bf16 Llama at each
size, base + three fine-tunes (deltas 1e-3 relative, as benchmarks/bench_merge.py), stored in
2 GB shards as Hugging Face stores them, written tensor by tensor so building a 3B set never
holds a whole model in memory:

    size   hidden layers intermediate vocab  parameters  one model
    0.3B    1024    20      2816      32000     322M       0.65 GB
    1B      2048    16      5632      32000     953M       1.9 GB
    3B      3072    26      8192      32000     3.1B       6.3 GB

Then, at each size, in this order and each in a fresh subprocess (peak RSS from
getrusage(RUSAGE_CHILDREN), as bench_merge.timed_run):
1. the floor: read every input tensor once and write one model (merge/reader.py, merge/writer.py:
   the I/O a merge cannot avoid), right before
2. the merge (TIES, density 0.2, weights 0.4/0.3/0.3, normalize, bf16, checks on, no lineage),
3. `merge.estimate.estimate(recipe)` from the headers, printed beside the measured peak,
4. the compatibility gate: the header checks (best of 3) and the streamed norm pass against a
   threaded read of the same inputs (benchmarks/bench_compat.py's functions; best of 3,
   alternating, where the set fits in memory, else one of each).
A 4.4M-parameter set is merged first: its wall time is the fixed cost of a run (imports, the
gate, numba's warm-up), taken off for the "net s/GB" column.
The page cache is warmed before the floor; a set larger than free memory (3B: 25 GB on a 24 GB
machine) cannot stay cached, so its floor and merge read from disk (the table says which).
Targets (issue #14): peak RSS at 3B under a quarter of the inputs' size, s/GB flat within 20%
across sizes, estimate within 25% of the measured peak, header checks < 1 s, norm pass <= 1.5x
one read.

    python benchmarks/bench_sizes.py --sizes 0.3B,1B,3B
    python benchmarks/bench_merge.py --sizes 0.3B,1B     # the same, from the merge benchmark
    python benchmarks/bench_sizes.py --sizes 3B --delete # drop the 3B set afterwards (25 GB)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_merge import (  # noqa: E402
    REL_DELTA, BenchModels, run_floor, run_mergeline, warm_page_cache, write_ties_recipe,
)

VOCAB = 32000
SIZES = {"0.3B": (1024, 20, 2816), "1B": (2048, 16, 5632), "3B": (3072, 26, 8192)}  # hidden, layers, intermediate
STARTUP = {"tiny": (64, 2, 128)}  # 4.4M parameters: the fixed cost of a run (imports, the gate, numba warm-up)
SHARD = "2GB"


def shapes(hidden: int, layers: int, inter: int, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """Llama tensor names and shapes, in the order Hugging Face stores them."""
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    s.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return s


def config(hidden: int, layers: int, inter: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _gen(seed: int, *key) -> "torch.Generator":
    import torch

    h = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


def build_size(size: str, cache: Path, seed: int = 0) -> BenchModels:
    """Base + three fine-tunes at `size`, one tensor at a time (each seeded from its name)."""
    import torch

    from mergeline.merge.writer import OutTensor, ShardWriter, parse_size

    hidden, layers, inter = {**SIZES, **STARTUP}[size]
    folder = cache / size
    names = ["base", "ft1", "ft2", "ft3"]
    stamp = f"size={size} hidden={hidden} layers={layers} inter={inter} vocab={VOCAB} rel_delta={REL_DELTA} " \
            f"seed={seed} shard={SHARD}\n"
    done = folder / "DONE"
    if not done.exists() or done.read_text() != stamp:
        shutil.rmtree(folder, ignore_errors=True)
        spec = shapes(hidden, layers, inter)
        outs = [OutTensor(k, torch.bfloat16, v) for k, v in spec.items()]
        writers = []
        for n in names:
            (folder / n).mkdir(parents=True)
            (folder / n / "config.json").write_text(json.dumps(config(hidden, layers, inter), indent=2))
            writers.append(ShardWriter(folder / n, outs, parse_size(SHARD)))
        for k, shape in spec.items():
            if k.endswith("norm.weight"):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=_gen(seed, "base", k)).mul_(0.02)
            rms = base.pow(2).mean().sqrt()
            writers[0].write(k, base.bfloat16())
            for i, w in enumerate(writers[1:], 1):  # ||delta|| / ||base|| = REL_DELTA before bf16 rounding
                delta = torch.randn(shape, generator=_gen(seed, i, k)).mul_(REL_DELTA * rms)
                w.write(k, delta.add_(base).bfloat16())
        for w in writers:
            w.close()
        done.write_text(stamp)
    return BenchModels(folder / "base", [folder / n for n in names[1:]], write_ties_recipe(folder))


def _available() -> int:
    """MemAvailable from /proc/meminfo, bytes (what the page cache can hold without evicting others)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gate_times(m: BenchModels, repeat: int = 1) -> tuple[float, float, float]:
    """(header checks best of 3, a threaded read of all inputs, the norm pass), seconds; the read
    and the norm pass best of `repeat`, alternating, so both see the same load."""
    import torch

    from benchmarks.bench_compat import best, norm_pass, threaded_read
    from mergeline.merge.compat import check_models

    models = {p.name: p for p in m.finetunes}
    inputs = [m.base, *m.finetunes]
    headers = best(lambda: check_models(m.base, models, {"norms": {"enabled": False}}), 3)
    read = norms = float("inf")
    for _ in range(repeat):
        read = min(read, best(lambda: threaded_read(inputs, torch.get_num_threads()), 1))
        norms = min(norms, best(lambda: norm_pass(m.base, models, 1 << 22), 1))
    return headers, read, norms


def measure(size: str, cache: Path, gate: bool = True) -> dict:
    from mergeline.merge.checkpoint import Checkpoint
    from mergeline.merge.estimate import estimate

    t = time.perf_counter()
    m = build_size(size, cache)
    built = time.perf_counter() - t
    nbytes = sum(Checkpoint(f).nbytes() for f in [m.base, *m.finetunes])
    out = cache / size / "out"
    warm = nbytes < 0.8 * _available()
    if warm:
        warm_page_cache(m)
    load = os.getloadavg()
    floor = run_floor(m, out)
    shutil.rmtree(out, ignore_errors=True)
    merge = run_mergeline(m, out, "cpu", checks=True, lineage=False)
    shutil.rmtree(out, ignore_errors=True)
    est = estimate(m.recipe)
    row = {"size": size, "inputs_gb": nbytes / 1e9, "cache": "warm" if warm else "cold (> RAM)", "built_s": built,
           "floor_s": floor[0], "floor_rss": floor[1], "merge_s": merge[0], "merge_cpu_s": merge[2],
           "peak_rss": merge[1], "estimate": est.peak_rss_bytes, "disk": est.disk_bytes,
           "load": " ".join(f"{x:.1f}" for x in load)}
    if gate:
        row["headers_s"], row["read_s"], row["norms_s"] = gate_times(m, 3 if warm else 1)  # cold: 1 (25 GB each)
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict], fixed: float = 0.0) -> None:
    """The size table; `fixed`: the seconds of a merge of a tiny set (start-up), taken off for "net s/GB"."""
    print(f"\n{'size':5s} {'inputs GB':>9s} {'cache':>12s} {'floor s':>8s} {'merge s':>8s} {'CPU s':>7s} "
          f"{'floor s/GB':>10s} {'merge s/GB':>10s} {'x floor':>7s} {'peak RSS GB':>11s} {'/inputs':>7s} "
          f"{'estimate GB':>11s} {'est/peak':>8s} {'net s/GB':>8s}  load")
    for r in rows:
        gb = r["inputs_gb"]
        print(f"{r['size']:5s} {gb:9.2f} {r['cache']:>12s} {r['floor_s']:8.1f} {r['merge_s']:8.1f} "
              f"{r['merge_cpu_s']:7.1f} {r['floor_s'] / gb:10.2f} {r['merge_s'] / gb:10.2f} "
              f"{r['merge_s'] / r['floor_s']:7.2f} {r['peak_rss'] / 1e9:11.2f} {r['peak_rss'] / (gb * 1e9):7.3f} "
              f"{r['estimate'] / 1e9:11.2f} {r['estimate'] / r['peak_rss']:8.2f} "
              f"{(r['merge_s'] - fixed) / gb:8.2f}  {r['load']}")
    spg = [r["merge_s"] / r["inputs_gb"] for r in rows]
    net = [(r["merge_s"] - fixed) / r["inputs_gb"] for r in rows]
    print(f"merge s/GB spread: max/min = {max(spg) / min(spg):.2f}, net of the {fixed:.1f} s start-up "
          f"{max(net) / min(net):.2f} (target <= 1.20)")
    big = rows[-1]
    print(f"peak RSS at {big['size']}: {big['peak_rss'] / (big['inputs_gb'] * 1e9):.3f} of the inputs (target < 0.25); "
          f"estimate/peak within 25%: " + ", ".join(f"{r['size']} {r['estimate'] / r['peak_rss']:.2f}" for r in rows))
    if "headers_s" in rows[0]:
        print(f"\n{'size':5s} {'header checks s':>15s} {'read s':>8s} {'norm pass s':>11s} {'norms/read':>10s}"
              f"   (targets: < 1 s, <= 1.5x)")
        for r in rows:
            print(f"{r['size']:5s} {r['headers_s']:15.3f} {r['read_s']:8.1f} {r['norms_s']:11.1f} "
                  f"{r['norms_s'] / r['read_s']:10.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.3B,1B,3B", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--cache", type=Path, default=Path(".bench/sizes"))
    ap.add_argument("--no-gate", action="store_true", help="skip the compatibility gate timings")
    ap.add_argument("--delete", action="store_true", help="delete each size's models once measured")
    args = ap.parse_args(argv)
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown size {unknown[0]!r}: expected {', '.join(SIZES)}")
    cache = args.cache.resolve()
    m = build_size("tiny", cache)
    fixed = run_mergeline(m, cache / "tiny" / "out", "cpu", checks=True, lineage=False)[0]
    shutil.rmtree(cache / "tiny" / "out", ignore_errors=True)
    print(f"fixed cost of a merge run (a 4.4M-parameter set): {fixed:.1f} s", flush=True)
    rows = []
    for size in sizes:
        rows.append(measure(size, cache, gate=not args.no_gate))
        if args.delete:
            shutil.rmtree(cache / size, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, cpus {os.cpu_count()}, "
          f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    print_table(rows, fixed)


if __name__ == "__main__":
    main()
