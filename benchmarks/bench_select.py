"""Micro-benchmark of exact top-k magnitude selection (TIES step 1, arXiv:2306.01708).

Compares mergekit's approach (a full argsort) and torch's topk/kthvalue with mergeline's radix
select on float bit patterns (``merge/methods/select.py``), on one thread, in ns per element
(CPU time of this process, so a busy machine inflates it less than wall time).

Run: python benchmarks/bench_select.py [--n 8000000] [--density 0.2] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from mergeline.merge.methods.select import topk


def clock(fn, n: int, repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeat):
        fn()
    return ((time.process_time() - cpu) / repeat / n * 1e9, (time.perf_counter() - wall) / repeat / n * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8_000_000)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(args.n, generator=g) * 1e-3
    k = max(1, int(args.density * args.n))
    print(f"n={args.n:,} k={k:,} threads={args.threads}  (ns/element: cpu / wall)")
    for dtype in (torch.float32, torch.bfloat16):
        x = delta.to(dtype)
        a = x.abs().float()
        rows = {
            "argsort (mergekit)": lambda: torch.argsort(a, descending=True)[:k],
            "torch.topk": lambda: torch.topk(a, k, sorted=False),
            "torch.kthvalue": lambda: torch.kthvalue(a, args.n - k + 1),
            "radix select (mergeline)": lambda: topk(x, k),
        }
        mine = topk(x, k)
        assert int(mine.mask(a).sum()) == k
        assert mine.threshold == float(torch.kthvalue(a, args.n - k + 1).values)
        for name, fn in rows.items():
            cpu, wall = clock(fn, args.n, 1 if "argsort" in name else args.repeat)
            print(f"  {str(dtype):15s} {name:26s} {cpu:7.2f} / {wall:7.2f}")


if __name__ == "__main__":
    main()
