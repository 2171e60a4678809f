"""Exact top-k magnitude selection without sorting: a histogram (radix) select on float bits.

TIES (Yadav et al. 2023, arXiv:2306.01708) keeps the k entries of largest |delta|. mergekit
argsorts every tensor (~120 ns/element on one core); we only need the k-th largest magnitude.
For a non-negative IEEE float, ordering by value equals ordering by bit pattern, so:
- bf16/fp16: ONE bincount over the 15 magnitude bits gives the exact k-th value;
- fp32: a bincount over the high 16 bits finds the bin, a second over the low 16 bits of the
  entries in that bin finds the exact value (two passes, no sort);
- other dtypes: torch.kthvalue.

Ties at the threshold are broken DETERMINISTICALLY: the kept set is every entry with |x| > t plus
the lowest-flat-index entries with |x| == t until exactly k are kept (mergekit leaves this to
argsort's order). ``TopK.mask`` applies this as ``>= t`` before flat index ``cut`` and ``> t``
from there on, so masks can be built chunk by chunk.

Measured (8M elements, one thread, CPU time on the shared 2-core box): argsort 111 ns/element,
torch.topk 18, torch.kthvalue 12, this radix select 2.6 (fp32) and 1.6 (bf16).

Run: python -m pytest tests/merge/test_methods.py -q -k "topk or tie or histogram"
     python benchmarks/bench_select.py
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mergeline.merge.cpu import empty_huge, run_chunks
from mergeline.merge.methods.common import compute_delta, flat as flat_

CHUNK = 1 << 18  # elements per numpy pass: bincount's intp copy of a chunk stays in cache
_LO = 0 if sys.byteorder == "little" else 1  # which uint16 half of an fp32 holds the low bits


@dataclass(frozen=True)
class TopK:
    """The k largest |x| under the total order (|x| descending, then flat index ascending)."""

    k: int
    threshold: float  # the k-th largest magnitude (exactly representable in the dtype); inf if k == 0
    cut: int  # entries with |x| == threshold are kept iff their flat index < cut
    # filled when the histogram gives them for free (16-bit dtypes): the kept nonzero entries and
    # their summed |x|, so the merge kernel can skip counting them chunk by chunk
    kept_nonzero: int | None = None
    kept_magnitude: float | None = None

    def mask(self, a: Tensor, start: int = 0, out: Tensor | None = None) -> Tensor:
        """Boolean keep-mask of magnitudes ``a`` at flat positions ``[start, start + len(a))``."""
        t, end = self.threshold, start + a.numel()
        if end <= self.cut:
            return torch.ge(a, t, out=out)
        out = torch.gt(a, t, out=out)
        if start < self.cut:  # the one chunk that straddles the cut
            j = self.cut - start
            torch.ge(a[:j], t, out=out[:j])
        return out

    def trim(self, d: Tensor, start: int, out: Tensor) -> Tensor:
        """out = d where kept else 0, for flat positions [start, start + len(d)), by one fused
        ``hardshrink`` (keeps |x| > lambda) instead of abs + compare + multiply."""
        t, end = self.threshold, start + d.numel()
        if self.k == 0:
            return out.zero_()
        if end <= self.cut:
            return torch.hardshrink(d, below(t, d.dtype), out=out)
        torch.hardshrink(d, t, out=out)
        if start < self.cut:  # the one chunk straddling the tie cut: ties before it are kept
            j = self.cut - start
            torch.hardshrink(d[:j], below(t, d.dtype), out=out[:j])
        return out


def below(t: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` under t: |x| > below(t) is |x| >= t for values of dtype."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return float(np.nextafter(np_dtype(t), np_dtype(-np.inf)))


def _u16(x: Tensor) -> np.ndarray:
    """Bit patterns of a float tensor as a numpy uint16 view (no copy): one per 16-bit value, two
    per fp32 value (the high half second on little-endian, see ``_LO``)."""
    return x.view(torch.int16).numpy().view(np.uint16)


def _kth_desc(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Key of the k-th largest entry in a histogram of keys, and how many entries lie above it."""
    above_or_at = np.cumsum(hist[::-1])
    j = int(np.searchsorted(above_or_at, k))  # first key (from the top) reaching k entries
    return len(hist) - 1 - j, int(above_or_at[j - 1]) if j else 0


HIST_CHUNK = 1 << 19  # positions per stored histogram row (0.25 B/element): the tie cut scans one row's span


@dataclass(frozen=True)
class ChunkHistograms:
    """15-bit magnitude histograms of one flat 16-bit tensor, one row per HIST_CHUNK positions.

    The rows sum to the tensor's histogram; their column at the threshold key tells which chunk
    holds the tie cut, so ``topk`` scans one chunk instead of the whole tensor for it."""

    rows: Tensor  # (chunks, 1 << 15) int32

    # numpy, not torch: a torch reduction over dim 0 here runs on the intra-op thread pool,
    # which stalled for seconds per merge on the loaded 2-core box (measured with py-spy)
    def total(self) -> np.ndarray:
        return self.rows.numpy().sum(0, dtype=np.int64)

    def locate(self, key: int, need: int) -> tuple[int, int]:
        """(start position of the chunk holding the ``need``-th entry with ``key``, entries with
        ``key`` before that chunk)."""
        seen = np.cumsum(self.rows.numpy()[:, key], dtype=np.int64)
        j = int(np.searchsorted(seen, need))
        return j * HIST_CHUNK, int(seen[j - 1]) if j else 0


def deltas_with_histograms(base: Tensor, models: list[Tensor]) -> tuple[list[Tensor], list[ChunkHistograms]]:
    """``compute_delta`` of every model and each delta's per-chunk 15-bit magnitude histograms,
    in ONE pass over 16-bit CPU tensors, one worker per core. Counting uses torch.bincount on the
    masked int16 bit patterns (0.7 ns/element, releases the GIL) rather than numpy's bincount
    (1.3 ns, holds the GIL: the two workers then took turns)."""
    b, ms, n = flat_(base), [flat_(m) for m in models], len(models)
    outs = [empty_huge(b.numel(), b.dtype) for _ in models]
    rows = torch.empty(n, -(-b.numel() // HIST_CHUNK), 1 << 15, dtype=torch.int32)

    def make_worker():
        keys = torch.empty(min(HIST_CHUNK, b.numel()), dtype=torch.int16)

        def work(s: int, e: int) -> None:
            for i, m in enumerate(ms):
                # torch's 16-bit sub computes in fp32 and rounds once, like compute_delta, and is
                # now 2x faster than its explicit fp32 chunks (measured: 0.37 vs 0.77 ns/element)
                d = torch.sub(m[s:e], b[s:e], out=outs[i][s:e])
                k = torch.bitwise_and(d.view(torch.int16), 0x7FFF, out=keys[: e - s])
                rows[i, s // HIST_CHUNK].copy_(torch.bincount(k, minlength=1 << 15))

        return work

    run_chunks(b.numel(), HIST_CHUNK, make_worker, b.device)
    return outs, [ChunkHistograms(r) for r in rows]


def _hist16(flat: Tensor) -> np.ndarray:
    """Counts of the 15 magnitude bits of a flat 16-bit float tensor: a histogram of the raw 16
    bits (no masking pass), then the negative half folded onto the positive one."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    bits = _u16(flat)
    for s in range(0, bits.size, CHUNK):
        hist += np.bincount(bits[s : s + CHUNK], minlength=1 << 16)
    return hist[: 1 << 15] + hist[1 << 15 :]


def _keys(flat: Tensor, s: int, e: int) -> np.ndarray:
    """Magnitude keys (bit patterns without sign) of flat[s:e], ordered like |x|."""
    if flat.element_size() == 2:
        return _u16(flat[s:e]) & np.uint16(0x7FFF)
    return flat[s:e].view(torch.int32).numpy().view(np.uint32) & np.uint32(0x7FFFFFFF)


def _tie_cut(flat: Tensor, key: int, need: int, ties: int, hist: ChunkHistograms | None = None) -> int:
    """Flat position just after the ``need``-th entry whose magnitude key equals ``key``."""
    if need >= ties:
        return flat.numel()
    start, seen = hist.locate(key, need) if hist is not None else (0, 0)
    for s in range(start, flat.numel(), CHUNK):
        eq = _keys(flat, s, min(s + CHUNK, flat.numel())) == key
        c = np.count_nonzero(eq)  # popcount: eq.sum() casts every bool to int64 first
        if seen + c >= need:
            return s + int(np.flatnonzero(eq)[need - seen - 1]) + 1
        seen += c
    return flat.numel()


def _key_to_float(key: int, dtype: torch.dtype) -> float:
    if dtype == torch.bfloat16:
        return float(np.array([key << 16], dtype=np.uint32).view(np.float32)[0])
    if dtype == torch.float16:
        return float(np.array([key], dtype=np.uint16).view(np.float16)[0])
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


def topk(x: Tensor, k: int, hist: np.ndarray | None = None) -> TopK:
    """Exact top-k of |x| (x is e.g. a task vector; signs are ignored). No sort of x.

    Ties at the k-th magnitude keep the lowest flat indices. NaN ranks above inf.
    ``hist``: x's 15-bit magnitude histogram when already known, as an array or as
    ``ChunkHistograms`` (``deltas_with_histograms``), which also locates the tie cut.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or n == 0:
        return TopK(0, math.inf, 0)
    k = min(k, n)
    if flat.device.type != "cpu" or flat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return _topk_kthvalue(flat, k)
    flat = flat.contiguous()
    if flat.element_size() != 2:
        key, above, ties = _kth32(flat, k)
        return TopK(k, _key_to_float(key, flat.dtype), _tie_cut(flat, key, k - above, ties))
    chunked = hist if isinstance(hist, ChunkHistograms) else None
    hist = _hist16(flat) if hist is None else chunked.total() if chunked else hist
    key, above = _kth_desc(hist, k)
    t = _key_to_float(key, flat.dtype)
    counts = hist[key + 1 :]
    occupied = np.flatnonzero(counts)  # skip empty inf/NaN bins: 0 * inf would poison the sum
    magnitude = float(counts[occupied] @ _values16(flat.dtype)[key + 1 :][occupied]) + (k - above) * t
    kept_nonzero = k if key > 0 else above  # ties at magnitude 0 are zeros
    return TopK(k, t, _tie_cut(flat, key, k - above, int(hist[key]), chunked), kept_nonzero, magnitude)


@functools.cache
def _values16(dtype: torch.dtype) -> np.ndarray:
    """Float64 value of every 15-bit magnitude key of a 16-bit dtype (NaN keys included)."""
    keys = np.arange(1 << 15, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        if dtype == torch.bfloat16:
            return (keys << 16).view(np.float32).astype(np.float64)
        return keys.astype(np.uint16).view(np.float16).astype(np.float64)


def _kth32(flat: Tensor, k: int) -> tuple[int, int, int]:
    """fp32 radix select: high-16-bit histogram, then low-16-bit histogram inside the bin."""
    halves = _u16(flat)
    hi, above = _kth_desc(_high_hist(halves), k)
    low_hist = _low_hist_in_bin(halves, hi)
    lo, above_lo = _kth_desc(low_hist, k - above)
    return (hi << 16) | lo, above + above_lo, int(low_hist[lo])


def _high_hist(halves: np.ndarray) -> np.ndarray:
    """Counts of the high 16 bits of each fp32 magnitude (sign bit masked off): 2^15 bins."""
    hist = np.zeros(1 << 15, dtype=np.int64)
    for s in range(0, halves.size, 2 * CHUNK):
        hist += np.bincount(halves[s + 1 - _LO : s + 2 * CHUNK : 2] & np.uint16(0x7FFF), minlength=1 << 15)
    return hist


def _low_hist_in_bin(halves: np.ndarray, hi: int) -> np.ndarray:
    """Counts of the low 16 bits of the fp32 magnitudes whose high bits are `hi`: 2^16 bins."""
    low_hist = np.zeros(1 << 16, dtype=np.int64)
    for s in range(0, halves.size, 2 * CHUNK):
        part = halves[s : s + 2 * CHUNK]
        in_bin = (part[1 - _LO :: 2] & np.uint16(0x7FFF)) == hi
        low_hist += np.bincount(part[_LO::2][in_bin], minlength=1 << 16)
    return low_hist


def _topk_kthvalue(flat: Tensor, k: int) -> TopK:
    """Fallback for other dtypes/devices: kthvalue, then the same deterministic tie rule.
    (16-bit values are exact in fp32, where every device implements kthvalue.)"""
    a = flat.abs() if flat.dtype == torch.float64 else flat.abs().float()
    t = a.kthvalue(a.numel() - k + 1).values
    above = int((a > t).sum())
    eq = (a == t).nonzero().flatten()
    need = k - above
    cut = a.numel() if need >= eq.numel() else int(eq[need - 1]) + 1
    return TopK(k, float(t), cut)


class MagnitudeHistogram:
    """Per-model histogram of |delta| across many tensors: the paper's whole-model threshold.

    Feed every tensor's delta of one model with ``add``; ``threshold(density)`` returns the
    magnitude t of the k-th largest entry over the whole model (k = max(1, int(density * total))).
    Keep entries with |delta| >= t. 16-bit deltas need one pass. fp32 deltas need two, as in
    ``_kth32``: the first finds the 16-high-bit bin of the k-th value; after
    ``begin_second_pass(density)``, feeding the same deltas again counts the low bits inside
    that bin, and the threshold is exact.
    """

    def __init__(self) -> None:
        self.hist = np.zeros(1 << 15, dtype=np.int64)
        self.dtype: torch.dtype | None = None
        self.total = 0
        self._second: tuple[float, int, int] | None = None  # (density, high bin, entries above it)
        self.low_hist = np.zeros(1 << 16, dtype=np.int64)

    def add(self, delta: Tensor) -> None:
        flat = delta.detach().reshape(-1).contiguous().cpu()
        if flat.dtype not in (torch.bfloat16, torch.float16):
            flat = flat.float()
        if self.dtype is not None and flat.dtype != self.dtype:
            raise ValueError(f"MagnitudeHistogram mixes {self.dtype} and {flat.dtype} deltas")
        self._add_flat(flat)

    def add_pair(self, base: Tensor, model: Tensor) -> None:
        """``add(model - base)`` with the delta computed fast (fp32 chunks, one worker per core)."""
        self.add(compute_delta(base.cpu(), model.cpu()))

    def _add_flat(self, flat: Tensor) -> None:
        if self._second is not None:
            self.low_hist += _low_hist_in_bin(_u16(flat), self._second[1])
            return
        self.dtype = flat.dtype
        self.total += flat.numel()
        self.hist += _hist16(flat) if flat.element_size() == 2 else _high_hist(_u16(flat))

    @property
    def needs_second_pass(self) -> bool:
        return self.dtype == torch.float32 and self._second is None

    def begin_second_pass(self, density: float) -> None:
        """fp32: fix the bin of the k-th value; the next ``add`` calls (the same deltas) refine it."""
        hi, above = _kth_desc(self.hist, self._k(density))
        self._second = (density, hi, above)

    def threshold(self, density: float) -> float:
        k = self._k(density)
        if self.dtype != torch.float32:
            return _key_to_float(_kth_desc(self.hist, k)[0], self.dtype)
        if self._second is None or self._second[0] != density:
            raise ValueError("MagnitudeHistogram: fp32 deltas need begin_second_pass(density) and a second "
                             "pass over the same deltas before threshold(density)")
        _, hi, above = self._second
        if int(self.low_hist.sum()) < k - above:
            raise ValueError("MagnitudeHistogram: the second pass saw fewer deltas than the first")
        lo, _ = _kth_desc(self.low_hist, k - above)
        return _key_to_float((hi << 16) | lo, torch.float32)

    def _k(self, density: float) -> int:
        if self.total == 0:
            raise ValueError("MagnitudeHistogram.threshold: no tensors were added")
        return max(1, int(density * self.total))
