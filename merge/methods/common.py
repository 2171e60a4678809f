"""Shared plumbing of the merge kernels: chunking, deltas in the compute dtype, rounding.

Why chunks: each elementwise op over a whole tensor streams it through memory and allocates a
full-size temporary; over cache-sized chunks with preallocated buffers the same ops stay in L2.
Why float32 inside: on CPUs without native bf16 arithmetic torch's bf16 ops cost ~7 ns/element
against ~0.3 ns for fp32 (measured here), so chunks are upcast, computed in fp32 and rounded to
the compute dtype exactly where mergekit's bf16 arithmetic rounds (``Rounder``), which keeps
bf16 TIES results bit-identical to mergekit's away from threshold ties (tested).
Why worker threads: see ``run_chunks``.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

import ctypes
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor

CHUNK = 1 << 16  # elements per fused chunk on CPU: a worker's few fp32 rows of it stay in L2
CHUNK_GPU = 1 << 24  # on a GPU, chunks only bound the scratch memory; fewer kernel launches


def chunk_size(x: Tensor, cpu_chunk: int = CHUNK) -> int:
    return min(cpu_chunk if x.device.type == "cpu" else CHUNK_GPU, max(1, x.numel()))


def spans(n: int, chunk: int = CHUNK):
    """(start, end) of consecutive chunks covering range(n)."""
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def cpu_workers() -> int:
    """Worker threads for chunk loops on CPU: torch's intra-op thread count (default: the cores),
    as it was before any running chunk loop lowered it."""
    with _ops_lock:
        return max(1, _ops_threads if _ops_users else torch.get_num_threads())


def run_chunks(numel: int, chunk: int, make_worker, device) -> list:
    """Call ``worker(start, end)`` over all chunks of range(numel); return the workers.

    On CPU, each of ``cpu_workers()`` Python threads takes chunks from a shared queue with its own
    worker (own scratch, own accumulators), while torch's intra-op parallelism is set to 1. Why:
    per-op parallelism puts a barrier after every small op, and on a busy machine (CI, six people
    on two cores) one descheduled thread stalls every op; measured 20-40x slower under load.
    Independent chunks only meet once, at the end. Torch ops release the GIL, so threads overlap.
    """
    todo = list(spans(numel, chunk))
    n = max(1, min(cpu_workers(), len(todo))) if device.type == "cpu" else 1
    workers = [make_worker() for _ in range(n)]
    if n == 1:
        for s, e in todo:
            workers[0](s, e)
        return workers
    queue, lock = iter(todo), threading.Lock()

    def loop(worker) -> None:
        torch.set_num_threads(1)  # this thread's own OpenMP setting
        while True:
            with lock:
                span = next(queue, None)
            if span is None:
                return
            worker(*span)

    with single_threaded_ops():
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(loop, workers))  # re-raises a worker's exception here
    return workers


_ops_lock = threading.Lock()
_ops_users = 0
_ops_threads = 0


@contextmanager
def single_threaded_ops():
    """torch intra-op threads = 1 while any chunk loop runs; the first caller saves the setting
    and the last one restores it, so concurrent merges cannot leave the process single-threaded."""
    global _ops_users, _ops_threads
    with _ops_lock:
        if _ops_users == 0:
            _ops_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _ops_users += 1
    try:
        yield
    finally:
        with _ops_lock:
            _ops_users -= 1
            if _ops_users == 0:
                torch.set_num_threads(_ops_threads)


_HUGE = 2 << 20  # transparent huge page size on x86-64 Linux
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def empty_huge(numel: int, dtype: torch.dtype) -> Tensor:
    """torch.empty for a large flat CPU buffer, backed by transparent huge pages where the kernel
    allows them on request (THP mode "madvise", as here). Why: every merged tensor's inputs,
    deltas and output are fresh allocations, first touched once; with 4 KiB pages that was
    ~540k page faults and ~1.4 s of kernel time per 322M-parameter merge (measured: /usr/bin/time,
    and THP_MEM_ALLOC_ENABLE=1 which does the same for every torch allocation)."""
    t = torch.empty(numel, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _libc is not None and nbytes >= 2 * _HUGE:
        start = -(-t.data_ptr() // _HUGE) * _HUGE  # madvise wants page-aligned ranges
        end = (t.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
    return t


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(x: Tensor) -> Tensor:
    return x.detach().reshape(-1)


def compute_delta(base: Tensor, model: Tensor) -> Tensor:
    """model - base in the compute dtype (rounded like torch's own op), flat. 16-bit CPU tensors
    go through fp32 chunks: torch's bf16 arithmetic is ~20x slower than the conversions."""
    b, m = flat(base), flat(model)
    if b.dtype in (torch.float32, torch.float64) or b.device.type != "cpu":
        return m - b
    out = torch.empty_like(b)
    C = chunk_size(b)

    def make_worker():
        buf = torch.empty(2, C, dtype=torch.float32)

        def work(s: int, e: int) -> None:
            # same-dtype fp32 operands: a mixed bf16/fp32 sub_ takes a slow promotion path
            x, y = buf[0, : e - s].copy_(m[s:e]), buf[1, : e - s].copy_(b[s:e])
            out[s:e].copy_(x.sub_(y))

        return work

    run_chunks(b.numel(), C, make_worker, b.device)
    return out


class Rounder:
    """Round fp32 scratch to the compute dtype in place (no-op when computing in fp32/fp64).

    Goes through a preallocated 16-bit buffer: fresh chunk-sized allocations cost page faults."""

    def __init__(self, dtype: torch.dtype, rows: int, cols: int, device) -> None:
        self.active = dtype not in (torch.float32, torch.float64)
        self.buf = torch.empty(rows, cols, dtype=dtype, device=device) if self.active else None

    def __call__(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        b = self.buf[: x.shape[0], : x.shape[1]] if x.dim() == 2 else self.buf[0, : x.shape[0]]
        return x.copy_(b.copy_(x))


def check_inputs(name: str, base: Tensor | None, models: list[Tensor], need_base: bool) -> None:
    if need_base and base is None:
        raise ValueError(f"merge method {name!r} needs a base model tensor")
    if not models:
        raise ValueError(f"merge method {name!r} got no model tensors")
    ref = base if base is not None else models[0]
    for i, m in enumerate(models):
        if m.shape != ref.shape:
            raise ValueError(f"merge method {name!r}: model {i} has shape {tuple(m.shape)}, "
                             f"expected {tuple(ref.shape)}")
    if not ref.is_floating_point():
        raise TypeError(f"merge method {name!r} needs floating-point tensors, got {ref.dtype}")

