"""The merge plan's parts: its inputs (`Source`), one job per output tensor (`TensorJob`), the
`Plan` itself, and what both planners use to build them: merge/plan.py plans models whose layers
line up, merge/frankenmerge.py plans slices that move layers. Both import this module, and
plan.py's `build_plan` picks one of them.

    python -c "from mergeline.merge.plan_types import TIED_HEADS; print(TIED_HEADS)"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mergeline.merge.checkpoint import DTYPES, Checkpoint, CheckpointError
from mergeline.merge.reader import TensorReader
from mergeline.merge.recipe import MergeRecipe
from mergeline.merge.resolve import resolve_model
from mergeline.merge.tokenizer_merge import VOCAB_TENSORS
from mergeline.merge.writer import OutTensor

# A model that ties its output head to the input embedding stores only the embedding.
TIED_HEADS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
                                 "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight")}


class MergeError(ValueError):
    """A merge that cannot run; the message names the model and tensor at fault."""


@dataclass
class Source:
    """One input model of the merge."""

    ref: str
    name: str  # display name (stats, reports)
    reader: TensorReader
    parameters: dict | None
    is_base: bool


@dataclass
class TensorJob:
    name: str
    sources: list[str]  # per input (same order as plan.inputs): the name to read there
    compute_dtype: torch.dtype
    out: OutTensor
    t: float
    floating: bool
    slice_index: int | None = None  # `slices:` recipes: the slice whose settings apply
    # Frankenmerges: per input slot, the model whose settings apply and the tensor's name there
    # (parameter filters match it); None: plan.inputs[i].ref and sources[i].
    refs: list[str] | None = None
    input_names: list[str] | None = None
    module: str | None = None  # multimodal `modules:` recipes: the module owning it (merge/modules.py)


@dataclass
class Plan:
    recipe: MergeRecipe
    method: Any
    inputs: list[Source]
    base_index: int | None  # index in inputs of the base handed to the method (requires_base)
    reference: Source
    jobs: list[TensorJob] = field(default_factory=list)
    out_config: dict | None = None  # config.json to write (layer count, vocab size set)
    models: dict[str, TensorReader] = field(default_factory=dict)  # model reference -> its reader
    tokenizer: Any = None  # merge.tokenizer_merge.TokenizerInfo, when the recipe sets a tokenizer
    stacked: bool = False  # a frankenmerge: inputs are slots over several models, not the models

    @property
    def merged(self) -> list[Source]:
        return [s for i, s in enumerate(self.inputs) if i != self.base_index]

    def merged_names(self, job: TensorJob) -> list[str]:
        """Display names of the models merged into this job (a frankenmerge slice may fill fewer slots)."""
        return [s.name for i, s in enumerate(self.inputs) if i != self.base_index and job.sources[i] is not None]


def torch_dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def source_name(reader: TensorReader, name: str) -> str | None:
    if name in reader.infos:
        return name
    for alt in TIED_HEADS.get(name, ()):
        if alt in reader.infos:
            return alt
    return None


def open_reader(ref: str, recipe: MergeRecipe, allow_pickle: bool) -> TensorReader:
    try:
        return TensorReader(Checkpoint(resolve_model(ref, recipe.source_dir), allow_pickle=allow_pickle))
    except (CheckpointError, ValueError) as e:
        raise MergeError(str(e)) from e


def tensor_job(recipe: MergeRecipe, name: str, found: list[tuple[str, TensorReader, str]], t: float,
               scope: int | None, vocab: bool) -> TensorJob:
    """One output tensor from (model ref, reader, name there) per input: shapes and dtypes
    checked, compute and output dtypes fixed. `vocab`: token rows are rebuilt, so only the
    width must agree."""
    dtypes, shape = [], None
    for ref, reader, src in found:
        info = reader.infos[src]
        if shape is None:
            shape = info.shape
        elif (info.shape[1:] != shape[1:]) if vocab else (info.shape != shape):
            hint = ""
            if name in VOCAB_TENSORS and info.shape[1:] == shape[1:]:
                hint = (": the vocabularies differ; set `tokenizer_source: union` (or base, or a model) to merge "
                        "them token by token")
            raise MergeError(f"tensor {name!r}: shape {list(info.shape)} in {ref!r} but {list(shape)} in "
                             f"{found[0][0]!r}{hint}")
        dtypes.append(DTYPES[info.dtype])
    floating = all(d.is_floating_point for d in dtypes)
    promoted = dtypes[0]
    for d in dtypes[1:]:
        promoted = torch.promote_types(promoted, d)
    compute, out_dtype = torch_dtype(recipe.dtype), torch_dtype(recipe.out_dtype)
    cdt = (compute or promoted) if floating else promoted
    odt = (out_dtype or cdt) if floating else promoted
    return TensorJob(name, [src for _, _, src in found], cdt, OutTensor(name, odt, tuple(shape)), t, floating, scope)
