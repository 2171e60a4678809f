"""Speed of the compatibility gate (issue 4, item 9), against a plain read of the inputs.

Targets: the header checks (config, safetensors headers, tokenizer) well under 1 s on the
300M-parameter set; the streamed delta-norm pass at most 2x the time of reading every input
tensor once from the page cache (here: each tensor copied out of its memory map once).

    python benchmarks/bench_compat.py                          # the merge benchmark's 300M set (./.bench)
    python benchmarks/bench_compat.py --cache /tmp/bench       # built there once by bench_merge.build_models
    python benchmarks/bench_compat.py BASE MODEL [MODEL ...]   # your own folders

The 300M set is the one `benchmarks/bench_merge.py` builds (synthetic Llama, hidden 1024,
20 layers, vocab 32000, bf16; base + 3 fine-tunes, 2.5 GB on disk). Timings on a shared
2-core machine are noisy: the best of --repeat runs is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mergeline.merge.checkpoint import Checkpoint  # noqa: E402
from mergeline.merge.compat import check_models  # noqa: E402
from mergeline.merge.compat.norms import stream_norms  # noqa: E402

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


def threaded_read(folders: list[Path], threads: int) -> None:
    """The same read spread over threads (the norm pass uses threads too)."""
    from concurrent.futures import ThreadPoolExecutor

    ckpts = [Checkpoint(f) for f in folders]
    jobs = [(c, n) for c in ckpts for n in c.names()]
    with ThreadPoolExecutor(threads) as pool:
        # keep only a count: holding the copies would hold every input in memory at once (3B: 25 GB)
        sum(pool.map(lambda job: job[0].get(job[1]).clone().numel(), jobs))


def norm_pass(base: Path, models: dict[str, Path], chunk: int) -> None:
    b = Checkpoint(base)
    ms = {n: Checkpoint(p) for n, p in models.items()}
    stream_norms(b, ms, b.names(), chunk)


def compare(base: Path, models: dict[str, Path], repeat: int = 3, chunks: list[int] | None = None) -> None:
    """Print the header checks and the norm pass against a plain read of the same inputs."""
    chunks = chunks or [1 << 22]
    inputs = [base, *models.values()]
    nbytes = sum(Checkpoint(f).nbytes() for f in inputs)
    print(f"inputs: {len(inputs)} folders, {nbytes / 1e9:.2f} GB; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    plain_read(inputs)  # warm the page cache so every measurement reads from memory

    headers = best(lambda: check_models(base, models, {"norms": {"enabled": False}}), repeat)
    read = best(lambda: plain_read(inputs), repeat)
    print(f"{'header checks (config, headers, tokenizer)':<46} {headers:8.3f} s   target < 1 s")
    print(f"{'plain read of all inputs once':<46} {read:8.3f} s   ({nbytes / read / 1e9:.2f} GB/s)")
    threads = torch.get_num_threads()
    read_t = best(lambda: threaded_read(inputs, threads), repeat)
    print(f"{f'plain read, {threads} threads':<46} {read_t:8.3f} s   ({nbytes / read_t / 1e9:.2f} GB/s)")
    read = min(read, read_t)  # compare against the faster read
    for chunk in chunks:
        t = best(lambda: norm_pass(base, models, chunk), repeat)
        print(f"{'delta-norm pass, chunk ' + str(chunk):<46} {t:8.3f} s   {t / read:5.2f}x the read (target <= 2x)")
    full = best(lambda: check_models(base, models), 1)
    print(f"{'full check_models (default policy)':<46} {full:8.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, help="BASE MODEL [MODEL ...]")
    ap.add_argument("--cache", type=Path, default=Path(".bench"), help="where bench_merge.py builds its 300M set")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunks", default="1048576,4194304,16777216", help="chunk sizes (elements per job) to compare")
    args = ap.parse_args()
    if len(args.folders) >= 2:
        base, models = args.folders[0], {p.name: p for p in args.folders[1:]}
    elif args.folders:
        ap.error("give BASE and at least one MODEL, or no folders to use the merge benchmark's set")
    else:
        from benchmarks.bench_merge import build_models

        bench = build_models(args.cache)
        base, models = bench.base, {p.name: p for p in bench.finetunes}
    compare(base, models, args.repeat, [int(c) for c in args.chunks.split(",")])


if __name__ == "__main__":
    main()
