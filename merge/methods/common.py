"""Shared plumbing of the merge kernels: deltas in the compute dtype, rounding, input checks.

Why chunks (``merge/cpu.py``): each elementwise op over a whole tensor streams it through memory
and allocates a full-size temporary; over cache-sized chunks with preallocated buffers the same
ops stay in L2.
Why float32 inside: on CPUs without native bf16 arithmetic torch's bf16 ops cost ~7 ns/element
against ~0.3 ns for fp32 (measured here), so chunks are upcast, computed in fp32 and rounded to
the compute dtype exactly where mergekit's bf16 arithmetic rounds (``Rounder``), which keeps
bf16 TIES results bit-identical to mergekit's away from threshold ties (tested).
Why worker threads: see ``merge/cpu.py``.

Run: python -m pytest tests/merge/test_methods.py -q
"""
from __future__ import annotations

import torch
from torch import Tensor

from mergeline.merge.cpu import chunk_size, run_chunks


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

