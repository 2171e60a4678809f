"""Read a checkpoint's tensors without a memory map: byte ranges, `os.preadv`, fresh buffers.

Memory-mapped pages a merge touches would stay in its RSS for the whole run; reading each
tensor's bytes into a buffer the merge frees keeps peak memory at a few tensors. Buffers are
huge-page backed where the system allows (far fewer page faults on large, fresh buffers), or
pinned for a CUDA copy. A LoRA reference (`BASE+ADAPTER`) gets its adapter merged in here.

    python -c "from mergeline.merge.checkpoint import Checkpoint; from mergeline.merge.reader import TensorReader; \
print(TensorReader(Checkpoint('MODEL_DIR')).read('model.norm.weight'))"
"""
from __future__ import annotations

import os

import torch

from mergeline.merge.checkpoint import DTYPES, Checkpoint, CheckpointError
from mergeline.merge.cpu import empty_huge


class TensorReader:
    """Byte ranges of a checkpoint's tensors, read with preadv into caller-owned buffers."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.infos = ckpt.infos()
        self._fds: dict[str, int] = {}
        # The checkpoint's one tensor -> (shard, offset, length) map, shared with the checks.
        self._spans: dict[str, tuple[str, int, int]] = ckpt.spans()

    def position(self, name: str) -> tuple[str, int]:
        span = self._spans.get(name)
        return (span[0], span[1]) if span else (self.ckpt.weight_map.get(name, ""), 0)

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        info = self.infos[name]
        dtype = DTYPES[info.dtype]
        if name not in self._spans:  # a pickle checkpoint (opted in): already in memory
            return self.ckpt.get(name)
        shard, offset, nbytes = self._spans[name]
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.ckpt.folder / shard, os.O_RDONLY)
        # huge pages: far fewer page faults on these large, fresh, once-written buffers
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) if pin else empty_huge(nbytes, torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.ckpt.folder / shard}: tensor {name!r} truncated")
            done += got
        return self.ckpt.adapt(name, buf.view(dtype).reshape(info.shape))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
