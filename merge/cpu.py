"""CPU plumbing of the merge kernels, the reader and the compatibility gate: cache-sized chunks,
worker threads that each run torch single-threaded, and huge-page buffers.

Why worker threads: torch's intra-op parallelism puts a barrier after every small op, and on a
busy machine (CI, six people on two cores) one descheduled thread stalls every op; measured
20-40x slower under load. So each chunk loop runs on its own Python threads, each with torch
single-threaded, and independent chunks only meet once, at the end (torch ops release the GIL).

Why not ``torch.set_num_threads(1)`` in the workers. Measured on this build (torch 2.13 CPU,
OpenMP; ``python -m mergeline.merge.cpu`` prints it): it sets the calling thread's OpenMP and
MKL settings AND torch's process-wide default, which every thread adopts at its first torch op.
A merge's worker calling it left the rest of the process single-threaded: lm-eval, running an
evaluation in another thread of the same Prefect flow, or any thread started later. So
``one_torch_thread`` makes only the per-thread calls (OpenMP's ``omp_set_num_threads``, MKL's
``mkl_set_num_threads_local``), after torch has initialised the thread.

Run: python -m mergeline.merge.cpu        # how torch's thread setting reaches other threads
     python -m pytest tests/merge/test_cpu.py -q
"""
from __future__ import annotations

import ctypes
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    """Worker threads for a chunk loop on CPU: the calling thread's torch thread count (default:
    the cores; 1 inside another loop's worker, so loops never nest into more threads)."""
    return max(1, torch.get_num_threads())


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _per_thread_setters() -> list:
    """The per-thread halves of torch.set_num_threads, from the libraries torch already loaded:
    OpenMP's omp_set_num_threads (torch's intra-op loops) and MKL's mkl_set_num_threads_local
    (its BLAS: a dot product). MKL needs its own call: once any thread has called
    torch.set_num_threads, torch gives every new thread an MKL setting of its own (measured: a
    worker's fp32 dot then ran on two threads and rounded differently). Empty where torch has no
    OpenMP; its workers then keep torch's own setting."""
    if _libc is None or "OpenMP" not in torch.__config__.parallel_info():
        return []
    omp = getattr(_libc, "omp_set_num_threads", None)  # the wheel's libgomp, loaded with global symbols
    setters = [omp] if omp is not None else []
    mkl = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"  # MKL is linked into it
    mkl_local = getattr(ctypes.CDLL(str(mkl)), "mkl_set_num_threads_local_", None) if mkl.is_file() else None
    if mkl_local is not None:  # MKL's Fortran interface: the count by reference
        setters.append(lambda n: mkl_local(ctypes.byref(ctypes.c_int(n))))
    return setters


_SETTERS = _per_thread_setters()


def one_torch_thread() -> None:
    """Run this thread's torch ops single-threaded, leaving every other thread as it is."""
    torch.get_num_threads()  # torch's per-thread initialisation first: it would undo the lines below
    for set_threads in _SETTERS:
        set_threads(1)


def worker_pool(n: int) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch single-threaded (``one_torch_thread``)."""
    return ThreadPoolExecutor(n, initializer=one_torch_thread)


def run_chunks(numel: int, chunk: int, make_worker, device) -> list:
    """Call ``worker(start, end)`` over all chunks of range(numel); return the workers.

    On CPU, each of ``cpu_workers()`` threads takes chunks from a shared queue with its own worker
    (own scratch, own accumulators), torch single-threaded in each (see the module docstring)."""
    todo = list(spans(numel, chunk))
    n = max(1, min(cpu_workers(), len(todo))) if device.type == "cpu" else 1
    workers = [make_worker() for _ in range(n)]
    if n == 1:
        for s, e in todo:
            workers[0](s, e)
        return workers
    queue, lock = iter(todo), threading.Lock()

    def loop(worker) -> None:
        while True:
            with lock:
                span = next(queue, None)
            if span is None:
                return
            worker(*span)

    with worker_pool(n) as pool:
        list(pool.map(loop, workers))  # re-raises a worker's exception here
    return workers


_HUGE = 2 << 20  # transparent huge page size on x86-64 Linux


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


def _measure(setter) -> dict[str, int]:
    """Thread counts seen by a worker thread that called ``setter()``, then by the main thread and
    by a thread started afterwards."""
    seen: dict[str, int] = {}

    def read(key: str) -> None:
        seen[key] = torch.get_num_threads()

    worker = threading.Thread(target=lambda: (torch.get_num_threads(), setter(), read("worker")))
    worker.start()
    worker.join()
    read("main thread")
    later = threading.Thread(target=read, args=("thread started later",))
    later.start()
    later.join()
    return seen


if __name__ == "__main__":
    backend = "OpenMP" if "OpenMP" in torch.__config__.parallel_info() else "no OpenMP"
    print(f"torch {torch.__version__} ({backend}); the main thread starts with {torch.get_num_threads()} threads")
    for what, setter in (("one_torch_thread()", one_torch_thread),
                         ("torch.set_num_threads(1)", lambda: torch.set_num_threads(1))):  # last: it leaks
        print(f"a worker thread calls {what}: {_measure(setter)}")
