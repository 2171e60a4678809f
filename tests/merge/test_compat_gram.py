"""The fused Gram kernel of the norm pass (`merge/compat/gram.py`) against float64 torch.

    pytest tests/merge/test_compat_gram.py -q
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mergeline.merge.compat import gram
from mergeline.merge.compat.gram import BLOCK, slab_gram


def reference(rows: list[torch.Tensor]) -> np.ndarray:
    """Gram of [rows[i] - base ...] + [base], computed from the stored values in float64."""
    base = rows[-1].double()
    r = torch.stack([x.double() - base for x in rows[:-1]] + [base])
    return (r @ r.T).numpy()


def finetunes(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = [base + 0.01 * torch.randn(n, generator=g) for _ in range(k)]
    return [t.to(dtype) for t in [*models, base]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n", [7, BLOCK, 3 * BLOCK + 5])  # shorter than a block, one block, a ragged tail
def test_matches_float64_reference(dtype, k, n):
    rows = finetunes(k, n, dtype)
    got, want = slab_gram(rows), reference(rows)
    assert got.shape == (k + 1, k + 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)  # the lower triangle is mirrored from the upper


def test_mixed_dtypes_are_widened():
    rows = finetunes(2, 2 * BLOCK + 1, torch.float32)
    rows[0] = rows[0].bfloat16()
    np.testing.assert_allclose(slab_gram(rows), reference(rows), rtol=1e-5)


def test_identical_model_has_exactly_zero_delta():
    rows = finetunes(2, 5000, torch.bfloat16)
    rows[1] = rows[-1].clone()  # model 1 is the base
    g = slab_gram(rows)
    assert g[1, 1] == 0.0 and g[0, 1] == 0.0
    assert g[0, 0] > 0


def test_precision_does_not_degrade_with_length():
    """Blocks are summed in float64: a long slab keeps float32 accuracy per block."""
    rows = finetunes(1, 4_000_000, torch.bfloat16, seed=3)
    np.testing.assert_allclose(slab_gram(rows), reference(rows), rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, -1])  # in a model, in the base
def test_nonfinite_input_reaches_the_result(bad, where):
    rows = finetunes(2, 3000, torch.bfloat16)
    rows[where][2999] = bad  # in the ragged last block
    assert not np.isfinite(slab_gram(rows)).all()


@pytest.mark.parametrize("dtype, half_in_kernel", [(torch.bfloat16, True), (torch.float16, True),
                                                    (torch.float16, False)])
def test_every_16_bit_pattern_widens_exactly(dtype, half_in_kernel, monkeypatch):
    """The kernel widens 16-bit floats from their bits: all 65536 patterns against torch.
    With a base of 1, the Gram entry <tau, base> is v - 1, computed in float32: sign included.
    fp16 is checked both ways: in the kernel, and by torch (CPUs without a half conversion)."""
    if dtype == torch.float16 and half_in_kernel and not gram.HALF_IN_KERNEL:
        pytest.skip("this CPU has no fp16 conversion instruction: numba cannot widen fp16 itself")
    monkeypatch.setattr(gram, "HALF_IN_KERNEL", half_in_kernel)
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    one = torch.ones(1, dtype=dtype)
    got = np.array([slab_gram([v.reshape(1), one])[0, 1] for v in values])
    want = (values.float() - 1).double().numpy()
    np.testing.assert_array_equal(got, want)  # NaN where want is NaN, Inf where Inf


def test_loading_the_kernel_imports_no_scipy():
    """numba's first load of the kernel imports its CPU target's modules; numba.np.arraymath
    would import scipy.linalg (and numpy.f2py) for a BLAS probe the kernel does not need
    (`gram._import_arraymath_without_scipy`, 0.1-0.2 s off the merge's start). In a fresh
    interpreter, since this one may hold scipy already. numba's own linear algebra still finds
    BLAS afterwards: np.dot compiles and imports scipy when it is used."""
    code = textwrap.dedent("""\
        import sys, numba, numpy as np, torch
        from mergeline.merge.compat.gram import warm_up
        warm_up(3, {torch.bfloat16, torch.float32})
        print(sorted(m for m in ("scipy.linalg", "numpy.f2py") if m in sys.modules))
        dot = numba.njit(lambda a, b: np.dot(a, b))
        print(dot(np.ones(3), np.ones(3)), "scipy.linalg" in sys.modules)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "3.0 True"]
