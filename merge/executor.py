"""Run a recipe: stream every tensor name through the merge method, out of core.

For each output tensor, in the order its bytes lie in the reference model's shards:
1. read the base's and each model's tensor straight from the safetensors files into fresh
   buffers (`os.preadv`, no memory map: touched mmap pages would stay in RSS for the whole
   run), in a prefetch thread so reading the next tensor overlaps computing this one (on CUDA
   via pinned host buffers and a side stream);
2. cast to the compute dtype (the recipe's `dtype`, else the inputs' promoted dtype: mergekit
   casts, it never upcasts on its own);
3. call the method with this tensor's parameters (gradients/filters resolved as mergekit does)
   and a generator seeded from (seed, tensor name), so random methods are reproducible and
   independent of order;
4. cast to `out_dtype` (else the compute dtype, as mergekit writes) and hand the result to a
   writer thread that appends it to the current output shard.
At most three tensor names' inputs (reading, queued, computing) and two outputs are alive.

    python -c "from merge.executor import run_merge; print(run_merge('configs/recipes/ties.yaml', 'out'))"
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from pydantic import ValidationError

from merge.checkpoint import DTYPES, Checkpoint, CheckpointError
from merge.device import resolve_device
from merge.methods.common import empty_huge
from merge.parameters import MISSING, layer_t, num_layers, resolve
from merge.recipe import MergeRecipe, RecipeError, load_recipe, model_names
from merge.recipe_checks import check_weight_sum, get_method_or_error
from merge.resolve import resolve_model
from merge.slices import layer_count, locate, parameter_sources
from merge.stats import StatsAggregator
from merge.writer import OutTensor, ShardWriter, copy_side_files, parse_size, staging_dir, write_chat_template, write_config

# A model that ties its output head to the input embedding stores only the embedding.
TIED_HEADS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
                                 "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight")}


class MergeError(ValueError):
    """A merge that cannot run; the message names the model and tensor at fault."""


@dataclass
class MergeOutput:
    path: Path
    stats: dict
    seconds: float
    method: str = ""
    tensors: int = 0
    nbytes: int = 0


# -- reading tensors without a memory map ---------------------------------------------
class TensorReader:
    """Byte ranges of a checkpoint's tensors, read with preadv into caller-owned buffers."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.infos = ckpt.infos()
        self._fds: dict[str, int] = {}
        self._spans: dict[str, tuple[str, int, int]] = {}
        if ckpt._pickled is None:
            for shard in sorted(set(ckpt.weight_map.values())):
                path = ckpt.folder / shard
                with open(path, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                for name, meta in header.items():
                    if name != "__metadata__":
                        start, end = meta["data_offsets"]
                        self._spans[name] = (shard, 8 + n + start, end - start)

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


# -- the plan ------------------------------------------------------------------------
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


@dataclass
class Plan:
    recipe: MergeRecipe
    method: Any
    inputs: list[Source]
    base_index: int | None  # index in inputs of the base handed to the method (requires_base)
    reference: Source
    jobs: list[TensorJob] = field(default_factory=list)

    @property
    def merged(self) -> list[Source]:
        return [s for i, s in enumerate(self.inputs) if i != self.base_index]


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def _source_name(reader: TensorReader, name: str) -> str | None:
    if name in reader.infos:
        return name
    for alt in TIED_HEADS.get(name, ()):
        if alt in reader.infos:
            return alt
    return None


def build_plan(recipe: MergeRecipe, allow_pickle: bool = False) -> Plan:
    """Resolve models and check every tensor's presence, shape and dtype from headers alone."""
    method = get_method_or_error(recipe.merge_method)
    names = model_names(recipe)
    inputs: list[Source] = []
    for m in recipe.inputs():
        try:
            folder = resolve_model(m.model, recipe.source_dir)
            reader = TensorReader(Checkpoint(folder, allow_pickle=allow_pickle))
        except (CheckpointError, ValueError) as e:
            raise MergeError(str(e)) from e
        inputs.append(Source(m.model, names[m.model], reader, m.parameters, m.model == recipe.base_model))
    base_index = next((i for i, s in enumerate(inputs) if s.is_base), None) if method.requires_base else None
    reference = next((s for s in inputs if s.ref == recipe.reference_model), inputs[0])
    plan = Plan(recipe, method, inputs, base_index, reference)

    ref_infos = reference.reader.infos
    out_names = list(ref_infos)
    for head in TIED_HEADS:  # the reference ties its head but a fine-tune has its own: merge it
        if head not in ref_infos and any(head in s.reader.infos for s in inputs):
            out_names.append(head)
    known = set(out_names) | {alt for alts in TIED_HEADS.values() for alt in alts}
    for s in inputs:
        extra = [n for n in s.reader.infos if n not in known]
        if extra:
            raise MergeError(f"model {s.ref!r} has tensor {extra[0]!r} (and {len(extra) - 1} more) that the "
                             f"reference model {reference.ref!r} lacks: not the same architecture")
    order = {n: reference.reader.position(n) for n in ref_infos}
    out_names.sort(key=lambda n: order.get(n, ("~", 0)))  # read the reference sequentially
    n_layers = num_layers(reference.reader.ckpt.config, out_names)
    if recipe.slices and layer_count(recipe.slices) != n_layers:
        raise MergeError(f"the slices cover layers [0, {layer_count(recipe.slices)}) but {reference.ref!r} has "
                         f"{n_layers}: slices must keep every layer (dropping or stacking layers is not supported)")
    out_dtype = _torch_dtype(recipe.out_dtype)
    compute = _torch_dtype(recipe.dtype)
    for name in out_names:
        srcs, dtypes, shape = [], [], None
        for s in inputs:
            src = _source_name(s.reader, name)
            if src is None:
                raise MergeError(f"model {s.ref!r} has no tensor {name!r} (found in {reference.ref!r})")
            info = s.reader.infos[src]
            if shape is None:
                shape = info.shape
            elif info.shape != shape:
                raise MergeError(f"tensor {name!r}: shape {list(info.shape)} in {s.ref!r} but {list(shape)} in "
                                 f"{inputs[0].ref!r}")
            srcs.append(src)
            dtypes.append(DTYPES[info.dtype])
        floating = all(d.is_floating_point for d in dtypes)
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        cdt = (compute or promoted) if floating else promoted
        odt = (out_dtype or cdt) if floating else promoted
        t, scope = layer_t(name, n_layers), None
        if recipe.slices:
            sl, t = locate(recipe.slices, name)
            scope = recipe.slices.index(sl)
        plan.jobs.append(TensorJob(name, srcs, cdt, OutTensor(name, odt, tuple(shape)), t, floating, scope))
    return plan


# -- per-tensor parameters -------------------------------------------------------------
def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _build(cls, values: dict, what: str):
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        raise RecipeError(f"{what}: parameter {key!r}: {err['msg']}") from None


def tensor_params(plan: Plan, job: TensorJob) -> tuple[list, Any]:
    """(per merged model parameter objects, global parameter object) for one tensor."""
    r, m = plan.recipe, plan.method
    scope = r.slices[job.slice_index] if job.slice_index is not None else None

    def sources(s: Source | None) -> list:  # highest precedence first, as mergekit searches them
        if scope is not None:
            return parameter_sources(scope, s.ref if s else None, r.parameters)
        return [s.parameters, r.parameters] if s else [r.parameters]

    global_keys = [f.alias or n for n, f in m.global_params.model_fields.items()]
    gvals = {k: v for k in global_keys if (v := resolve(k, sources(None), job.name, job.t)) is not MISSING}
    model_keys = [f.alias or n for n, f in m.model_params.model_fields.items()]
    per_model, merged_sources = [], []
    for i, s in enumerate(plan.inputs):
        if i == plan.base_index:
            continue
        src = job.sources[i]
        vals = {k: v for k in model_keys if (v := resolve(k, sources(s), src, job.t)) is not MISSING}
        per_model.append(_build(m.model_params, vals, f"model {s.ref!r}, tensor {job.name!r}"))
        merged_sources.append(sources(s))
    check_weight_sum(r, m, merged_sources, job.name, job.t)
    return per_model, _build(m.global_params, gvals, f"tensor {job.name!r}")


# -- the streaming loop ----------------------------------------------------------------
_DONE = object()


def _producer(plan: Plan, device: torch.device, out_q: queue.Queue, stop: threading.Event) -> None:
    """Read each job's inputs (and move them to the device) ahead of the compute loop."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    try:
        for job in plan.jobs:
            if stop.is_set():
                return
            tensors = [s.reader.read(src, pin=cuda) for s, src in zip(plan.inputs, job.sources)]
            if job.floating:
                if cuda:
                    with torch.cuda.stream(stream):
                        tensors = [t.to(device, non_blocking=True) for t in tensors]
                    stream.synchronize()
                tensors = [t.to(job.compute_dtype) for t in tensors]
            out_q.put((job, tensors))
    except BaseException as e:  # surfaced by the consumer
        out_q.put((None, e))
        return
    out_q.put((None, _DONE))


def _writer_loop(writer: ShardWriter, in_q: queue.Queue, errors: list) -> None:
    while True:
        item = in_q.get()
        if item is _DONE:
            return
        if errors:
            continue  # drain after a failure so the producer side never blocks
        try:
            writer.write(*item)
        except BaseException as e:
            errors.append(e)


def _progress_bar(total_tensors: int, total_bytes: int):
    """A rich bar over bytes written, with the tensor count beside it (to stderr, cleared at the end)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]merging"), BarColumn(), TextColumn("{task.fields[done]}/" + str(total_tensors) + " tensors"),
                   DownloadColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=Console(stderr=True))
    task = bar.add_task("merging", total=total_bytes, done=0)
    return bar, task


def run_merge(recipe: MergeRecipe | str | Path | Mapping, out_dir: str | Path, *, device: str = "auto",
              out_shard_size: str | int = "5GB", overwrite: bool = False, seed: int = 0,
              allow_pickle: bool = False, progress: bool = True,
              on_tensor: Callable[[str, int], None] | None = None) -> MergeOutput:
    """Merge the recipe's models into `out_dir`; returns the path, merge statistics and seconds."""
    t0 = time.perf_counter()
    if not isinstance(recipe, MergeRecipe):
        recipe = load_recipe(recipe)
    dev = resolve_device(device)
    max_shard = parse_size(out_shard_size)
    plan = build_plan(recipe, allow_pickle=allow_pickle)
    method = plan.method
    thresholds = model_thresholds(plan, dev)
    merged_names = [s.name for s in plan.merged]
    agg = StatsAggregator(method.name, merged_names)
    total_bytes = sum(j.out.nbytes for j in plan.jobs)
    try:
        with staging_dir(out_dir, overwrite) as tmp:
            writer = ShardWriter(tmp, [j.out for j in plan.jobs], max_shard)
            in_q: queue.Queue = queue.Queue(maxsize=1)
            out_q: queue.Queue = queue.Queue(maxsize=2)
            stop, write_errors = threading.Event(), []
            producer = threading.Thread(target=_producer, args=(plan, dev, in_q, stop), daemon=True)
            wthread = threading.Thread(target=_writer_loop, args=(writer, out_q, write_errors), daemon=True)
            producer.start()
            wthread.start()
            bar, done = None, 0
            if progress:
                bar, task = _progress_bar(len(plan.jobs), total_bytes)
                bar.start()
            try:
                while True:
                    job, tensors = in_q.get()
                    if job is None:
                        if tensors is _DONE:
                            break
                        raise tensors
                    if write_errors:
                        raise write_errors[0]
                    result = _merge_one(plan, job, tensors, dev, seed, thresholds)
                    if result.stats is not None:
                        agg.add(job.name, result.stats)
                    del tensors
                    out_q.put((job.name, result.tensor.to(job.out.dtype).cpu()))
                    if bar is not None:
                        done += 1
                        bar.update(task, advance=job.out.nbytes, done=done)
                    if on_tensor is not None:
                        on_tensor(job.name, job.out.nbytes)
            finally:
                stop.set()
                while producer.is_alive():  # unblock a producer waiting on a full queue
                    try:
                        in_q.get(timeout=0.05)
                    except queue.Empty:
                        pass
                out_q.put(_DONE)
                wthread.join()
                if bar is not None:
                    bar.stop()
                writer.abort()
            if write_errors:
                raise write_errors[0]
            writer.close()
            _write_side_files(plan, tmp)
            stats = agg.write(tmp)
    finally:
        for s in plan.inputs:
            s.reader.close()
    return MergeOutput(Path(out_dir), stats, time.perf_counter() - t0, method.name, len(plan.jobs), total_bytes)


def _merge_one(plan: Plan, job: TensorJob, tensors: list[torch.Tensor], dev: torch.device, seed: int,
               thresholds: list[float] | None):
    if not job.floating:  # integer buffers: copied from the reference, as mergekit copies them
        ref_i = plan.inputs.index(plan.reference)
        return _Result(tensors[ref_i], None)
    per_model, gparams = tensor_params(plan, job)
    base = tensors[plan.base_index] if plan.base_index is not None else None
    models = [t for i, t in enumerate(tensors) if i != plan.base_index]
    gen = None
    if plan.method.randomized:
        gen = torch.Generator(device=dev)
        gen.manual_seed(_seed_for(seed, job.name))
    kwargs = {"generator": gen}
    if thresholds is not None:
        kwargs["thresholds"] = thresholds
    return plan.method.fn(base, models, per_model, gparams, **kwargs)


@dataclass
class _Result:
    tensor: torch.Tensor
    stats: Any


def model_thresholds(plan: Plan, dev: torch.device) -> list[float] | None:
    """The paper's whole-model trimming (`trim_scope: model`): a streaming pass builds a histogram
    of each model's |delta| over ALL tensors and returns the k-th largest magnitude per model
    (k = density * model size), which the method then applies to every tensor. fp32 deltas take
    a second pass that refines the k-th value's bin to the exact value."""
    if plan.recipe.trim_scope != "model":
        return None
    from merge.methods.select import MagnitudeHistogram

    base_i = plan.base_index
    hists = [MagnitudeHistogram() for _ in plan.merged]
    densities = []
    for s in plan.merged:
        d = resolve("density", [s.parameters, plan.recipe.parameters], "", 0.0)
        densities.append(1.0 if d is MISSING else float(d))

    def stream(into: list) -> None:
        for job in plan.jobs:
            if not job.floating:
                continue
            ts = [s.reader.read(src).to(dev, job.compute_dtype) for s, src in zip(plan.inputs, job.sources)]
            # add_pair computes the delta in fp32 chunks on one worker per core: much faster than
            # a bf16 subtraction on this thread.
            others = [t for i, t in enumerate(ts) if i != base_i]
            for h, t in zip(into, others):
                if h is not None:
                    h.add_pair(ts[base_i], t)
            del ts, others

    stream(hists)
    second = [h if h.needs_second_pass else None for h in hists]
    if any(second):
        for h, d in zip(second, densities):
            if h is not None:
                h.begin_second_pass(d)
        stream(second)
    return [h.threshold(d) for h, d in zip(hists, densities)]


def _write_side_files(plan: Plan, folder: Path) -> None:
    r = plan.recipe
    ref_folder = plan.reference.reader.ckpt.folder
    dtypes = {j.out.dtype for j in plan.jobs if j.floating}
    out_dtype = next(iter(dtypes)) if len(dtypes) == 1 else (_torch_dtype(r.out_dtype) or _torch_dtype(r.dtype))
    write_config(folder, plan.reference.reader.ckpt.config, out_dtype or torch.float32)
    tok_ref = r.tokenizer_ref
    tok_folder = ref_folder
    if tok_ref is not None:
        tok_folder = next(s.reader.ckpt.folder for s in plan.inputs if s.ref == tok_ref)
    copy_side_files(folder, tok_folder, ref_folder)
    if r.chat_template:
        write_chat_template(folder, r.chat_template, [s.reader.ckpt.folder for s in plan.inputs])
    (folder / "mergeline_recipe.yaml").write_text(r.to_yaml())
