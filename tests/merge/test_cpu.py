"""A merge's worker threads run torch single-threaded without changing any other thread's setting:
lm-eval evaluates in another thread of the same process (Prefect's thread pool runner).

Run: python -m pytest tests/merge/test_cpu.py -q
"""
from __future__ import annotations

import threading

import pytest
import torch

from mergeline.merge.cpu import CHUNK, one_torch_thread, run_chunks
from mergeline.merge.methods import get_method

THREADS = 3  # the process's setting during these tests: not 1, so that a leak of 1 shows


@pytest.fixture(autouse=True)
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # this thread's and torch's default for threads started later
    yield
    torch.set_num_threads(before)


def threads_in_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_chunk_loop_workers_are_single_threaded_and_nothing_else_is():
    """While a chunk loop's workers run (one torch thread each), a thread started then, and the
    thread running the loop, keep the process's setting."""
    seen: dict[str, list[int]] = {"worker": [], "started during the loop": [], "loop's thread": []}
    lock = threading.Lock()

    def make_worker():
        def work(s: int, e: int) -> None:
            with lock:
                seen["worker"].append(torch.get_num_threads())
                seen["started during the loop"].append(threads_in_new_thread())

        return work

    workers = run_chunks(8 * CHUNK, CHUNK, make_worker, torch.device("cpu"))
    seen["loop's thread"].append(torch.get_num_threads())
    assert len(workers) == THREADS
    assert set(seen["worker"]) == {1}
    assert set(seen["started during the loop"]) == {THREADS}
    assert seen["loop's thread"] == [THREADS]


def test_merge_in_one_thread_leaves_another_threads_setting():
    """A TIES merge over many chunks runs in one thread while another thread (lm-eval's, say)
    reads its torch thread count throughout and starts threads: none of them sees a change."""
    base = torch.randn(16 * CHUNK)
    models = [base + 0.01 * torch.randn_like(base) for _ in range(2)]
    m = get_method("ties")
    done, observed, merged = threading.Event(), [], []

    def merge() -> None:
        merged.append(m.fn(base, models, [m.model_params(weight=0.5, density=0.5)] * 2, m.global_params()))
        done.set()

    def evaluate() -> None:  # lm-eval's thread, started before the merge, and the threads it starts
        while not done.is_set():
            observed.append(torch.get_num_threads())
            observed.append(threads_in_new_thread())

    threads = [threading.Thread(target=evaluate), threading.Thread(target=merge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert merged and merged[0].stats.models[0].kept > 0
    assert set(observed) == {THREADS}
    assert threads_in_new_thread() == THREADS == torch.get_num_threads()


def test_one_torch_thread_is_per_thread():
    """The measured fact merge/cpu.py rests on (torch 2.13, OpenMP): `one_torch_thread` changes the
    calling thread only, where torch.set_num_threads also changes the default of later threads."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch built without OpenMP: workers keep torch's own setting")
    inside = []
    t = threading.Thread(target=lambda: (one_torch_thread(), inside.append(torch.get_num_threads())))
    t.start()
    t.join()
    assert inside == [1]
    assert threads_in_new_thread() == THREADS


def test_a_workers_blas_is_single_threaded_too():
    """Once torch.set_num_threads has run (the fixture), torch gives each new thread an MKL setting
    of its own: a worker's fp32 dot product must still be the single-threaded one, as the merge
    methods' sums (slerp's norms) are computed chunk by chunk in workers."""
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    in_worker = []
    t = threading.Thread(target=lambda: (one_torch_thread(), in_worker.append(float(x.dot(x)))))
    t.start()
    t.join()
    torch.set_num_threads(1)  # for the reference, single-threaded here; the fixture restores the setting
    assert in_worker == [float(x.dot(x))]
