"""Pick the compute device for a merge: `auto`, `cpu`, `cuda` or `cuda:N`.

`auto` is CUDA when torch sees a GPU, else the CPU. The merge code is the same on both; only
where the input tensors are copied to differs (pinned host buffers + non-blocking copies on CUDA,
so reading the next tensor overlaps computing the current one).

    python -c "from mergeline.merge.device import resolve_device; print(resolve_device('auto'))"
"""
from __future__ import annotations

import re

import torch

_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A --device value that is malformed or names a device this machine lacks."""


def resolve_device(spec: str = "auto") -> torch.device:
    m = _SPEC.match(spec.strip().lower())
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise DeviceError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {spec!r}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    n = torch.cuda.device_count()
    i = int(index) if index is not None else torch.cuda.current_device()
    if i >= n:
        raise DeviceError(f"--device {spec!r}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", i)
