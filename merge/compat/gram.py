"""One fused pass over a slab of a tensor: the Gram matrix of the task vectors and the base.

For the rows R = [tau_1 .. tau_k, theta_0] (tau_i = theta_i - theta_0, Ilharco et al., 2023,
arXiv:2212.04089) the (k+1)-square Gram matrix R @ R.T holds every squared delta norm, every
pairwise dot product (so cosines cost no extra pass) and ||theta_0||^2. The compatibility gate
needs it for every tensor of every model, so it must run near the speed of reading the inputs.

Why a numba kernel rather than torch ops: torch runs one op at a time, so widening bf16 to
float32, subtracting the base and the matmul each stream the data through memory again; on two
cores that measured 2-2.7x the time of a plain read of the inputs. Here each block of BLOCK
elements is widened and subtracted into a small buffer that stays in the L1/L2 cache, and its
dot products are summed there: the inputs are read from memory once. bfloat16 is widened by a
16-bit shift of its bits (bf16 is the top half of a float32), exact. Each block's float32 sums
are added into float64, so precision does not degrade with the tensor's size.

The kernel releases the GIL, so Python threads run it in parallel. It is compiled on first use
for each number of models and cached on disk by numba (about a second, once): next to this file,
else in ~/.cache/numba; set NUMBA_CACHE_DIR where neither is writable.

    python benchmarks/bench_compat.py --cache /tmp/bench   # norm pass vs a plain read
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba.extending import overload

BLOCK = 1024  # elements per cache-resident block: (k+1) x 1024 x 4 bytes stays in L1/L2
WIDEN = 1 << 16  # elements per torch widening step for other dtypes (fp16, fp64, mixed)
# reassoc lets the dot products use vector partial sums; no "nnan"/"ninf": a NaN or Inf in the
# inputs must reach the result, where the caller looks for it.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


def slab_gram(rows: list[torch.Tensor]) -> np.ndarray:
    """(k+1)-square float64 Gram matrix of [rows[i] - rows[-1] for i < k] + [rows[-1]].

    `rows` are flat slabs of equal length: the k models, then the base. bf16 and float32 are
    read in place; any other dtype (or a mix) is widened to float32 by torch, a cache-sized
    piece at a time (widening a whole slab into fresh memory measured 7x slower).
    """
    dtypes = {r.dtype for r in rows}
    g = np.zeros((len(rows), len(rows)))
    if dtypes == {torch.bfloat16}:
        _gram(tuple(r.view(torch.int16).numpy().view(np.uint16) for r in rows), g)
    elif dtypes == {torch.float32}:
        _gram(tuple(r.numpy() for r in rows), g)
    else:  # widen WIDEN elements at a time into a float32 buffer that stays in cache
        buf = torch.empty(len(rows), WIDEN)
        for s in range(0, rows[0].numel(), WIDEN):
            n = min(WIDEN, rows[0].numel() - s)
            for i, r in enumerate(rows):
                buf[i, :n].copy_(r[s : s + n])
            _gram(tuple(buf[i, :n].numpy() for i in range(len(rows))), g)
    return g + np.triu(g, 1).T  # the kernel fills the upper triangle


def _load(src, bits, out):
    """Widen src to float32 into `out` (`bits` is the same buffer seen as uint32)."""


@overload(_load)
def _load_impl(src, bits, out):
    # Loops index whole slices from 0: an offset index (src[s + j]) could be negative, and
    # numba's wrap-around check for that stops LLVM vectorising the loop (3x slower).
    if src.dtype == numba.uint16:  # bfloat16 bits: the top 16 bits of the float32
        def widen_bf16(src, bits, out):
            for j in range(src.size):
                bits[j] = np.uint32(src[j]) << 16
        return widen_bf16

    def copy_f32(src, bits, out):
        for j in range(src.size):
            out[j] = src[j]
    return copy_f32


@numba.njit(nogil=True, cache=True, fastmath=_FAST, boundscheck=False)
def _dot(a, b):
    acc = np.float32(0.0)
    for j in range(a.size):
        acc += a[j] * b[j]
    return acc


@numba.njit(nogil=True, cache=True, fastmath=_FAST, boundscheck=False)
def _subtract(a, b):
    for j in range(a.size):
        a[j] -= b[j]


@numba.njit(nogil=True, cache=True, fastmath=_FAST, boundscheck=False)
def _gram(rows, g):
    k = len(rows) - 1  # rows[k] is the base
    n = rows[0].size
    bits = np.empty((k + 1, BLOCK), np.uint32)
    buf = bits.view(np.float32)
    for s in range(0, n, BLOCK):
        w = min(BLOCK, n - s)
        _load(rows[k][s : s + w], bits[k, :w], buf[k, :w])
        base = buf[k, :w]
        for i in range(k):
            _load(rows[i][s : s + w], bits[i, :w], buf[i, :w])
            _subtract(buf[i, :w], base)  # tau_i = theta_i - theta_0
        for p in range(k + 1):
            for q in range(p, k + 1):
                g[p, q] += _dot(buf[p, :w], buf[q, :w])
