"""A TensorReader look-alike over renamed (and optionally rebuilt) tensors of other readers.

The executor reads a plan's inputs through `reader.read(name)`, one reader per input. Two
recipe forms need an input that is not one model's tensors under their own names:
- a frankenmerge (merge/slices.py): input slot j of output layer 12 may be layer 30 of one
  model and input slot j of layer 13 layer 2 of another; the view maps each key the plan
  names to (reader, tensor name);
- a vocabulary remap (merge/tokenizer_merge.py): the embedding and head rows of each model are
  rebuilt for the output tokenizer; the view's `load` does it when the tensor is read.
So the executor's streaming loop runs both unchanged.

    python -c "from mergeline.merge.tensor_views import ViewReader; help(ViewReader)"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mergeline.merge.checkpoint import TensorInfo


def identity_views(reader) -> dict[str, "View"]:
    """Every tensor of `reader` under its own name."""
    return {n: View(reader, n, info) for n, info in reader.infos.items()}


@dataclass
class View:
    """One tensor as the plan sees it: `name` read from `reader`, or what `load()` builds from it
    (a remapped vocabulary: merge/tokenizer_merge.py)."""

    reader: object  # a TensorReader (or another ViewReader)
    name: str
    info: TensorInfo  # shape and dtype of what the plan gets
    load: Callable[[], torch.Tensor] | None = None


class ViewReader:
    """Reads tensors by the plan's keys; `ckpt` is the model that stands for this input (its
    config and folder), `views` maps every key to where it is read."""

    def __init__(self, ckpt, views: dict[str, View]):
        self.ckpt = ckpt
        self.views = views
        self.infos = {k: v.info for k, v in views.items()}

    def position(self, key: str) -> tuple[str, int]:
        v = self.views[key]
        return v.reader.position(v.name)

    def read(self, key: str, pin: bool = False) -> torch.Tensor:
        v = self.views[key]
        return v.load() if v.load is not None else v.reader.read(v.name, pin=pin)

    def close(self) -> None:
        for reader in {id(v.reader): v.reader for v in self.views.values()}.values():
            reader.close()
