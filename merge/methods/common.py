"""Shared plumbing of the merge kernels: chunking, deltas in the compute dtype, rounding.

Why chunks: each elementwise op over a whole tensor streams it through memory and allocates a
full-size temporary; over cache-sized chunks with preallocated buffers the same ops stay in L2.
Why float32 inside: on CPUs without native bf16 arithmetic torch's bf16 ops cost ~7 ns/element
against ~0.3 ns for fp32 (measured here), so chunks are upcast, computed in fp32 and rounded to
the compute dtype exactly where mergekit's bf16 arithmetic rounds (``Rounder``), which keeps
bf16 results bit-identical to mergekit's wherever its own sums are.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 18  # elements per fused chunk on CPU (1 MiB of fp32 per row): fits L2 with a few rows
CHUNK_GPU = 1 << 24  # on a GPU, chunks only bound the scratch memory; fewer kernel launches


def chunk_size(x: Tensor) -> int:
    return min(CHUNK if x.device.type == "cpu" else CHUNK_GPU, max(1, x.numel()))


def spans(n: int, chunk: int = CHUNK):
    """(start, end) of consecutive chunks covering range(n)."""
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(x: Tensor) -> Tensor:
    return x.detach().reshape(-1)


def compute_delta(base: Tensor, model: Tensor) -> Tensor:
    """model - base in the compute dtype (rounded like torch's own op), flat."""
    b, m = flat(base), flat(model)
    if b.dtype in (torch.float32, torch.float64) or b.device.type != "cpu":
        return m - b
    out = torch.empty_like(b)
    buf = torch.empty(chunk_size(b), dtype=torch.float32)
    for s, e in spans(b.numel()):
        d = buf[: e - s]
        d.copy_(m[s:e])
        d.sub_(b[s:e])
        out[s:e].copy_(d)
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
            raise ValueError(f"merge method {name!r}: model {i} has shape {tuple(m.shape)}, expected {tuple(ref.shape)}")
    if not ref.is_floating_point():
        raise TypeError(f"merge method {name!r} needs floating-point tensors, got {ref.dtype}")
