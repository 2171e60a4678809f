"""Run a recipe: stream every tensor name through the merge method, out of core.

The plan (merge/plan.py) is built from the headers first. Then, for each output tensor, in the
order its bytes lie in the reference model's shards:
1. read the base's and each model's tensor straight from the safetensors files into fresh
   buffers (merge/reader.py: `os.preadv`, no memory map), in a prefetch thread so reading the
   next tensor overlaps computing this one (on CUDA via pinned host buffers and a side stream);
2. cast to the compute dtype (the recipe's `dtype`, else the inputs' promoted dtype: mergekit
   casts, it never upcasts on its own);
3. call the method with this tensor's parameters (`plan.tensor_params`, resolved as mergekit does)
   and a generator seeded from (seed, tensor name), so random methods are reproducible and
   independent of order;
4. cast to `out_dtype` (else the compute dtype, as mergekit writes) and hand the result to a
   writer thread that appends it to the current output shard.
At most three tensor names' inputs (reading, queued, computing) and two outputs are alive.

    python -c "from merge.executor import run_merge; print(run_merge('configs/recipes/ties.yaml', 'out'))"
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from merge.device import resolve_device
from merge.plan import Plan, TensorJob, build_plan, model_thresholds, tensor_params
from merge.recipe import MergeRecipe, load_recipe
from merge.stats import StatsAggregator
from merge.writer import ShardWriter, parse_size, staging_dir, write_side_files

@dataclass
class MergeOutput:
    path: Path
    stats: dict
    seconds: float
    method: str = ""
    tensors: int = 0
    nbytes: int = 0


# -- the streaming loop ----------------------------------------------------------------
_DONE = object()


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


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


def _write_side_files(plan: Plan, folder: Path) -> None:
    write_side_files(plan, folder)  # merge/writer.py: config (layer count, vocabulary), tokenizer, template, recipe
