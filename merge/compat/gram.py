"""One fused pass over a slab of a tensor: the Gram matrix of the task vectors and the base.

For the rows R = [tau_1 .. tau_k, theta_0] (tau_i = theta_i - theta_0, Ilharco et al., 2023,
arXiv:2212.04089) the (k+1)-square Gram matrix R @ R.T holds every squared delta norm, every
pairwise dot product (so cosines cost no extra pass) and ||theta_0||^2. The compatibility gate
needs it for every tensor of every model, so it must run near the speed of reading the inputs.

Why a numba kernel rather than torch ops: torch runs one op at a time, so widening bf16 to
float32, subtracting the base and the matmul each stream the data through memory again; on two
cores that measured 2-2.7x the time of a plain read of the inputs. Here each block of BLOCK
elements is widened and subtracted into a small buffer that stays in the L1/L2 cache, and its
dot products are summed there: the inputs are read from memory once. 16-bit floats are widened
from their bits, exactly (bf16 is the top half of a float32; fp16 by the CPU's conversion). Each block's
float32 sums are added into float64, so precision does not degrade with the tensor's size.

The kernel releases the GIL, so Python threads run it in parallel. It is compiled on first use
for each number of models and cached on disk by numba (about a second, once): next to this file,
else in ~/.cache/numba; set NUMBA_CACHE_DIR where neither is writable. Loading it from that cache
compiles nothing, but numba's first load in a process imports every implementation module of its
CPU target; one of them would import scipy.linalg (see `_import_arraymath_without_scipy`).

    python benchmarks/bench_compat.py --cache /tmp/bench   # norm pass vs a plain read
"""
from __future__ import annotations

import platform
import sys

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba.extending import intrinsic, overload


def _import_arraymath_without_scipy() -> None:
    """Import numba.np.arraymath while numba's BLAS probe answers "none".

    numba loads a cached kernel only after refreshing its CPU target, which imports all of its
    implementation modules. numba.np.arraymath, at import, imports scipy.linalg.cython_blas only
    to learn whether np.convolve and np.correlate may call BLAS; that pulls in scipy.linalg and
    numpy.f2py: 0.1-0.2 s of a numba start-up of about 0.5 s, spent while the merge runs
    (merge/executor.py starts it on a thread of its own). The kernel calls neither function. The only effect on
    other numba code in this process: those two use numba's own loop instead of BLAS; numba's
    linear algebra still imports scipy when it is compiled.
    """
    if "numba.np.arraymath" in sys.modules:
        return  # numba already compiled something in this process: nothing left to save
    import numba.np.linalg as linalg

    probe = linalg.ensure_blas  # arraymath binds this name at import and calls it once

    def no_blas() -> None:
        raise ImportError("BLAS not probed: the Gram kernel needs none")

    linalg.ensure_blas = no_blas
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        linalg.ensure_blas = probe


_import_arraymath_without_scipy()

BLOCK = 1024  # elements per cache-resident block: (k+1) x 1024 x 4 bytes stays in L1/L2
WIDEN = 1 << 16  # elements per torch widening step for other inputs (float64, mixed dtypes)


def _cpu_converts_half() -> bool:
    """Whether the CPU numba compiles for converts fp16 itself (x86 F16C, every 64-bit ARM).
    Without it LLVM calls a helper numba cannot link, which aborts the process, so fp16 is then
    widened by torch instead."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:  # compiling for a chosen CPU
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(llvm.get_host_cpu_features().get("f16c"))


HALF_IN_KERNEL = _cpu_converts_half()
# reassoc lets the dot products use vector partial sums; no "nnan"/"ninf": a NaN or Inf in the
# inputs must reach the result, where the caller looks for it.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


def slab_gram(rows: list[torch.Tensor]) -> np.ndarray:
    """(k+1)-square float64 Gram matrix of [rows[i] - rows[-1] for i < k] + [rows[-1]].

    `rows` are flat slabs of equal length: the k models, then the base. bf16, float32 and (where
    the CPU converts it, `HALF_IN_KERNEL`) fp16 are read in place; any other dtype (or a mix) is
    widened to float32 by torch, a cache-sized piece at a time (widening a whole slab into fresh
    memory measured 7x slower).
    """
    dtypes = {r.dtype for r in rows}
    g = np.zeros((len(rows), len(rows)))
    if dtypes == {torch.float32}:
        _gram(tuple(r.numpy() for r in rows), g)
    elif dtypes == {torch.bfloat16}:  # numba has no 16-bit floats: pass the bits, as uint16...
        _gram(tuple(r.view(torch.int16).numpy().view(np.uint16) for r in rows), g)
    elif dtypes == {torch.float16} and HALF_IN_KERNEL:  # ...and fp16 as int16, to tell the two apart
        _gram(tuple(r.view(torch.int16).numpy() for r in rows), g)
    else:
        buf = torch.empty(len(rows), WIDEN)
        for s in range(0, rows[0].numel(), WIDEN):
            n = min(WIDEN, rows[0].numel() - s)
            for i, r in enumerate(rows):
                buf[i, :n].copy_(r[s : s + n])
            _gram(tuple(buf[i, :n].numpy() for i in range(len(rows))), g)
    return g + np.triu(g, 1).T  # the kernel fills the upper triangle


def warm_up(rows: int, dtypes: set[torch.dtype]) -> None:
    """Load (or compile) the kernel for `rows` rows of each dtype now: the first call in a
    process costs about 0.3 s of numba start-up, which a caller can take off its critical path."""
    for d in dtypes:
        slab_gram([torch.zeros(1, dtype=d)] * rows)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with the same bits (C's memcpy / a union)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return numba.float32(numba.uint32), codegen


@intrinsic
def _f32_from_f16_bits(typingctx, bits):
    """The float32 value of fp16 bits (an int16): LLVM's own half -> float conversion, which is
    one vector instruction (vcvtph2ps) on x86 CPUs since 2012 and on ARM."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return numba.float32(numba.int16), codegen


def _widen(src, out):
    """out[:] = src as float32, for the kernel's three input formats."""


@overload(_widen)
def _widen_impl(src, out):
    # Loops index whole slices from 0: an offset index (src[s + j]) could be negative, and
    # numba's wrap-around check for that stops LLVM vectorising the loop (3x slower).
    if src.dtype == numba.uint16:  # bfloat16 bits: the top 16 bits of the float32
        def widen_bf16(src, out):
            for j in range(src.size):
                out[j] = _f32_from_bits(np.uint32(src[j]) << np.uint32(16))
        return widen_bf16
    if src.dtype == numba.int16:  # float16 bits
        def widen_f16(src, out):
            for j in range(src.size):
                out[j] = _f32_from_f16_bits(src[j])
        return widen_f16

    def copy_f32(src, out):
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
    buf = np.empty((k + 1, BLOCK), np.float32)
    for s in range(0, n, BLOCK):
        w = min(BLOCK, n - s)
        base = buf[k, :w]
        _widen(rows[k][s : s + w], base)
        for i in range(k):
            _widen(rows[i][s : s + w], buf[i, :w])
            _subtract(buf[i, :w], base)  # tau_i = theta_i - theta_0
        for p in range(k + 1):
            for q in range(p, k + 1):
                g[p, q] += _dot(buf[p, :w], buf[q, :w])
