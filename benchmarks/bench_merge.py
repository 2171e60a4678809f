"""mergeline's TIES against mergekit's TIES on a Llama-shaped ~300M-parameter model.

Builds (once, cached under --cache, default ./.bench) a synthetic Llama (hidden 1024, 20 layers,
vocab 32000, intermediate 2816: 322.5M parameters, bf16, ~616 MB) and three fine-tunes whose deltas
are 1e-3 relative in norm (before rounding to bf16, which zeroes the smallest ones: the regime of
real bf16 fine-tunes, with many ties at the trim threshold), then runs the same recipe (TIES, density 0.2, weights 0.4/0.3/0.3, normalize,
dtype bfloat16) through both tools, each in its own subprocess so wall time and peak RSS are the
tool's own (peak RSS and CPU seconds from resource.getrusage(RUSAGE_CHILDREN) of a fresh child per run).
Also times the floor: reading all four inputs and writing one output, nothing computed, and
the compatibility gate on the same models (`bench_compat.compare`: header checks, norm pass).

The merge runs its compatibility checks inside (merge/executor.py: header checks first, the
norm statistics from the tensors it reads anyway); the target is at most 10% over the merge
without them. Both are timed in the same run, alternating, best of --repeat each
(`run_merge(checks=False)` is the merge as it was before the checks were folded in; both
without lineage.json, whose content hashes read every input and the output once more: a third
row times that, what `mergeline merge` does by default).

    python benchmarks/bench_merge.py                 # both tools, prints the table
    python benchmarks/bench_merge.py --only mergeline
    python benchmarks/bench_merge.py --only checks --repeat 5   # merge with vs without the checks
    python benchmarks/bench_merge.py --cache /data/bench --device cuda
    python benchmarks/bench_merge.py --sizes 0.3B,1B,3B    # time per GB and peak RSS across sizes

Hooks for other timings on the same models: `build_models(cache) -> BenchModels` returns the
paths; `timed_subprocess(code)` runs a Python snippet in a fresh process and returns
(seconds, peak_rss_bytes); `ROWS` collects extra rows printed in the same table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

HIDDEN, LAYERS, VOCAB, INTER, HEADS = 1024, 20, 32000, 2816, 16
REL_DELTA = 1e-3
ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, float, int, str]] = []  # (label, seconds, peak_rss_bytes, note) added by hooks


@dataclass
class BenchModels:
    base: Path
    finetunes: list[Path]
    recipe: Path  # the TIES recipe, local paths


def _shapes() -> dict[str, tuple[int, ...]]:
    s = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    s.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return s


def _config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def build_models(cache: str | Path = ".bench", seed: int = 0) -> BenchModels:
    """Create (or reuse) the base, three fine-tunes and the recipe under `cache`."""
    import torch
    from safetensors.torch import save_file

    cache = Path(cache).resolve()
    names = ["base", "ft1", "ft2", "ft3"]
    stamp = f"hidden={HIDDEN} layers={LAYERS} vocab={VOCAB} inter={INTER} rel_delta={REL_DELTA} seed={seed}\n"
    done = cache / "DONE"
    if not done.exists() or done.read_text() != stamp:
        g = torch.Generator().manual_seed(seed)
        base = {}
        for k, shape in _shapes().items():
            base[k] = (torch.ones(shape) if k.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g)).bfloat16()
        for i, name in enumerate(names):
            folder = cache / name
            folder.mkdir(parents=True, exist_ok=True)
            if i == 0:
                tensors = base
            else:  # a fine-tune: ||delta|| / ||base|| = REL_DELTA per tensor before rounding to bf16
                tensors = {}
                for k, v in base.items():
                    f = v.float()
                    rms = f.pow(2).mean().sqrt()
                    tensors[k] = (f + REL_DELTA * rms * torch.randn(v.shape, generator=g)).bfloat16()
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps(_config(), indent=2))
        done.write_text(stamp)
    return BenchModels(cache / "base", [cache / n for n in names[1:]], write_ties_recipe(cache))


def write_ties_recipe(folder: Path) -> Path:
    """The benchmark's TIES recipe over folder/base and folder/ft1..ft3: folder/ties.yaml."""
    recipe = folder / "ties.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        merge_method: ties
        base_model: {folder / 'base'}
        models:
          - model: {folder / 'ft1'}
            parameters: {{weight: 0.4, density: 0.2}}
          - model: {folder / 'ft2'}
            parameters: {{weight: 0.3, density: 0.2}}
          - model: {folder / 'ft3'}
            parameters: {{weight: 0.3, density: 0.2}}
        parameters: {{normalize: true}}
        dtype: bfloat16
        """))
    return recipe


def timed_subprocess(code: str, env: dict | None = None) -> tuple[float, int]:
    """Run `python -c code` in a fresh process; (wall seconds, that child's peak RSS in bytes)."""
    return timed_run(code, env)[:2]


def timed_run(code: str, env: dict | None = None) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds user + system) of `python -c code` in a fresh process.

    Each call is measured in a fresh helper process, so RUSAGE_CHILDREN there sees only this run.
    CPU seconds are printed too because wall times on a shared box swing with other people's load.
    """
    wrapper = textwrap.dedent(f"""\
        import resource, subprocess, sys, time, json
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", {code!r}])
        dt = time.perf_counter() - t
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(json.dumps([r.returncode, dt, u.ru_maxrss * 1024, u.ru_utime + u.ru_stime]))
        """)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=full_env, cwd=ROOT)
    try:
        rc, dt, rss, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"benchmark child failed:\n{out.stdout}\n{out.stderr}") from None
    if rc != 0:
        raise RuntimeError(f"benchmark child exited {rc}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return dt, rss, cpu


def run_mergeline(m: BenchModels, out: Path, device: str = "cpu", checks: bool = True,
                  lineage: bool = False) -> tuple[float, int, float]:
    return timed_run(textwrap.dedent(f"""\
        from mergeline.merge.executor import run_merge
        out = run_merge({str(m.recipe)!r}, {str(out)!r}, device={device!r}, overwrite=True, progress=False,
                        checks={checks!r}, lineage={lineage!r})
        assert (out.checks is not None) == {checks!r} and not out.waived
        """))


def compare_checks(m: BenchModels, out: Path, device: str, repeat: int) -> list[tuple]:
    """The merge with its checks folded in against the same merge without them: alternating runs
    (the shared machine's load drifts), best and median wall and CPU seconds of each, and the
    median of each pair's ratio (a run with checks against the run without just before it, so
    both saw about the same load; the 1-minute load average is printed before each pair)."""
    from statistics import median

    runs: dict[str, list] = {"with checks": [], "without checks": []}
    loads = []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        runs["without checks"].append(run_mergeline(m, out / "mergeline-nochecks", device, checks=False))
        runs["with checks"].append(run_mergeline(m, out / "mergeline", device, checks=True))
    best = {k: (min(r[0] for r in v), max(r[1] for r in v), min(r[2] for r in v)) for k, v in runs.items()}
    mid = {k: (median(r[0] for r in v), median(r[2] for r in v)) for k, v in runs.items()}
    (w1, _, c1), (w0, _, c0) = best["with checks"], best["without checks"]
    (mw1, mc1), (mw0, mc0) = mid["with checks"], mid["without checks"]
    pairs = list(zip(runs["with checks"], runs["without checks"]))
    pw, pc = median(a[0] / b[0] for a, b in pairs), median(a[2] / b[2] for a, b in pairs)
    print(f"\nmerge with checks vs without ({repeat} alternating runs each; target <= 1.10x):\n"
          f"  best:   wall {w1:.2f} / {w0:.2f} s = {w1 / w0:.3f}x, CPU {c1:.2f} / {c0:.2f} s = {c1 / c0:.3f}x\n"
          f"  median: wall {mw1:.2f} / {mw0:.2f} s = {mw1 / mw0:.3f}x, CPU {mc1:.2f} / {mc0:.2f} s = {mc1 / mc0:.3f}x\n"
          f"  median of the {repeat} pairs' ratios: wall {pw:.3f}x, CPU {pc:.3f}x")
    for k, v in runs.items():
        print(f"  {k:15s} wall " + " ".join(f"{r[0]:6.2f}" for r in v) + "   CPU " + " ".join(f"{r[2]:6.2f}" for r in v))
    print(f"  {'pair ratio':15s} wall " + " ".join(f"{a[0] / b[0]:6.3f}" for a, b in pairs)
          + "   CPU " + " ".join(f"{a[2] / b[2]:6.3f}" for a, b in pairs))
    print(f"  {'load before':15s}      " + " ".join(f"{x:6.2f}" for x in loads))
    return [(f"mergeline ties ({device}), checks, best of {repeat}", *best["with checks"]),
            (f"mergeline ties ({device}), no checks, best of {repeat}", *best["without checks"])]


def run_mergekit(m: BenchModels, out: Path, device: str = "cpu") -> tuple[float, int, float]:
    return timed_run(textwrap.dedent(f"""\
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
        cfg = MergeConfiguration.model_validate(yaml.safe_load(open({str(m.recipe)!r})))
        run_merge(cfg, {str(out)!r}, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                                  device={device!r}))
        """))


def run_floor(m: BenchModels, out: Path) -> tuple[float, int, float]:
    """Read every input tensor and write the base once: the I/O a merge cannot avoid."""
    folders = [str(m.base)] + [str(f) for f in m.finetunes]
    return timed_run(textwrap.dedent(f"""\
        from pathlib import Path
        from mergeline.merge.checkpoint import DTYPES, Checkpoint
        from mergeline.merge.reader import TensorReader
        from mergeline.merge.writer import OutTensor, ShardWriter
        readers = [TensorReader(Checkpoint(f)) for f in {folders!r}]
        out = Path({str(out)!r}); out.mkdir(parents=True, exist_ok=True)
        infos = readers[0].infos
        w = ShardWriter(out, [OutTensor(n, DTYPES[i.dtype], i.shape) for n, i in infos.items()], 5 * 10**9)
        names = list(infos)
        for n in names:
            ts = [r.read(n) for r in readers]
            w.write(n, ts[0])
        w.close()
        """))


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    ta = {}
    for f in sorted(a.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            ta.update({k: (f, k) for k in h.keys()})
    tb = {}
    for f in sorted(b.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tb.update({k: (f, k) for k in h.keys()})
    assert set(ta) == set(tb), "the two outputs hold different tensor names"
    for k in ta:
        with safe_open(str(ta[k][0]), "pt") as ha, safe_open(str(tb[k][0]), "pt") as hb:
            worst = max(worst, (ha.get_tensor(k).float() - hb.get_tensor(k).float()).abs().max().item())
    return worst


def warm_page_cache(m: BenchModels) -> None:
    for f in [m.base, *m.finetunes]:
        for p in f.glob("*.safetensors"):
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main(argv: list[str] | None = None) -> None:
    global LAYERS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".bench", help="folder for the synthetic models (built once)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["mergeline", "mergekit", "checks"], default=None,
                    help="checks: only the merge with vs without its compatibility checks")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each for the checks comparison")
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer layers for a quick check (the target is 20)")
    ap.add_argument("--sizes", default=None, metavar="0.3B,1B,3B",
                    help="the merge at several model sizes instead: floor, wall, peak RSS, s/GB, the estimate "
                         "(benchmarks/bench_sizes.py; models under CACHE/sizes)")
    args = ap.parse_args(argv)
    if args.sizes:
        sys.path.insert(0, str(ROOT))
        from benchmarks.bench_sizes import main as sizes_main

        return sizes_main(["--sizes", args.sizes, "--cache", str(Path(args.cache) / "sizes")])
    LAYERS = args.layers

    t = time.perf_counter()
    m = build_models(args.cache)
    print(f"models ready in {time.perf_counter() - t:.1f} s under {Path(args.cache).resolve()}")
    out = Path(args.cache).resolve() / "out"
    warm_page_cache(m)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())  # others' work on the box skews wall times
    rows = []
    floor = run_floor(m, out / "floor")
    rows.append(("floor: read 4 inputs + write 1", *floor))
    results = {}
    if args.only in (None, "mergeline", "checks"):
        rows += compare_checks(m, out, args.device, args.repeat)
        results["mergeline"] = rows[-2][1:]
    if args.only in (None, "mergeline"):
        rows.append((f"mergeline ties ({args.device}), checks + lineage.json",
                     *run_mergeline(m, out / "mergeline-lineage", args.device, lineage=True)))
    if args.only in (None, "mergekit"):
        results["mergekit"] = run_mergekit(m, out / "mergekit", args.device)
        rows.append((f"mergekit ties ({args.device})", *results["mergekit"]))
    rows += [(label, s, rss, float("nan")) for label, s, rss, _ in ROWS]
    print(f"\n{'run':38s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS GB':>12s}   (load average before: {load})")
    for label, s, rss, cpu in rows:
        print(f"{label:38s} {s:8.2f} {cpu:8.2f} {rss / 1e9:12.2f}")
    if len(results) == 2:
        (ml, ml_rss, _), (mk, mk_rss, _) = results["mergeline"], results["mergekit"]
        diff = max_abs_diff(out / "mergeline", out / "mergekit")
        print(f"\nspeed-up {mk / ml:.1f}x (target >= 5x), peak memory {ml_rss / mk_rss:.2f}x of mergekit's "
              f"(target <= 1), largest |mergeline - mergekit| = {diff:.3g}")
        print("(ties at the trim threshold are broken by index in mergeline, by argsort order in mergekit,"
              " so a few bf16 steps of difference are expected)")

    if args.only == "checks":
        return
    # The compatibility gate's speed targets (issue 4) on the same models, in this process.
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_compat import compare

    print("\ncompatibility gate on the same models:")
    compare(m.base, {p.name: p for p in m.finetunes})


if __name__ == "__main__":
    main()
