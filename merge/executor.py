"""Run a recipe: stream every tensor name through the merge method, out of core.

Safe by default: the compatibility gate (merge/compat, the checks of `mergeline check`, with
the same policy) runs first on the headers alone (architecture, tensor names/shapes/dtypes,
tokenizer; the same model given twice is refused before that); a failed check stops the merge
before any tensor is read. The plan (merge/plan.py) is built from the headers next. Then, for
each output tensor, in the order its bytes lie in the reference model's shards:
1. read the base's and each model's tensor straight from the safetensors files into fresh
   buffers (merge/reader.py: `os.preadv`, no memory map), in a prefetch thread so reading the
   next tensor overlaps computing this one (on CUDA via pinned host buffers and a side stream);
   the tensors, as read, also go to the gate's norm statistics (the fused Gram kernel of
   merge/compat/gram.py, run by the prefetch thread while the loop computes): no second read;
2. cast to the compute dtype (the recipe's `dtype`, else the inputs' promoted dtype: mergekit
   casts, it never upcasts on its own);
3. call the method with this tensor's parameters (`plan.tensor_params`, resolved as mergekit does)
   and a generator seeded from (seed, tensor name), so random methods are reproducible and
   independent of order;
4. cast to `out_dtype` (else the compute dtype, as mergekit writes) and hand the result to a
   writer thread that appends it to the current output shard.
At most three tensor names' inputs (reading, queued, computing) and two outputs are alive.
When every tensor is written, the norm checks (NaN/Inf, a delta too large for a fine-tune,
weights unrelated to the base, a model identical to the base) are judged; a failure discards
the staged output (`ChecksFailed`). `allow_crimes=True` (mergekit's `--allow-crimes`) merges
anyway and records the waived failures in lineage.json and the model card.

    python -c "from mergeline.merge.executor import run_merge; print(run_merge('configs/recipes/ties.yaml', 'out'))"
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import yaml

from mergeline.merge.checkpoint import DTYPES, CheckpointError
from mergeline.merge.device import resolve_device
from mergeline.merge.plan import MergeError, Plan, TensorJob, build_plan, model_thresholds, tensor_params
from mergeline.merge.recipe import MergeRecipe, load_recipe, model_names
from mergeline.merge.resolve import ModelNotFound, resolve_model
from mergeline.merge.stats import StatsAggregator
from mergeline.merge.writer import ShardWriter, parse_size, staging_dir, write_side_files

if TYPE_CHECKING:  # the gate (and numba, for its kernel) is imported only when checks run
    from mergeline.merge.compat.gate import CompatGate
    from mergeline.merge.compat.norms import NormAccumulator
    from mergeline.merge.compat.report import CompatReport

@dataclass
class MergeOutput:
    path: Path
    stats: dict
    seconds: float
    method: str = ""
    tensors: int = 0
    nbytes: int = 0
    checks: dict | None = None  # the compatibility report (CompatReport.to_dict()); None when not checked
    waived: list[str] = field(default_factory=list)  # failed checks merged anyway (allow_crimes)


# -- the streaming loop ----------------------------------------------------------------
_DONE = object()


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


class _NormFeed:
    """Hands the tensors the merge reads to the gate's norm accumulator, as stored (before any
    cast or device move), so its figures are those `mergeline check` computes from the files.

    Called by the producer thread right after it has queued a job for the compute loop: the Gram
    kernel (merge/compat/gram.py, which releases the GIL) then runs while the loop computes, in
    the slack of the reading thread (reading is the fast stage), and no input outlives its job.
    (A thread of its own for the kernel, behind a queue of two tensors, blocked the reads
    whenever it waited for a core: 1.4-1.6 s at the start of a merge on a busy machine.) numba's
    start-up (its import and first kernel load, about 0.4 s of CPU) runs on a thread started with
    the feed; only the first call waits for it, while the loop computes the first job."""

    def __init__(self, gate: CompatGate, plan: Plan):
        index = {s.name: i for i, s in enumerate(plan.inputs)}  # the gate names inputs as the plan does
        self.models = [index[n] for n in gate.models]
        self.base = index[gate.base_name]
        self.names = gate.norm_names()
        self.acc: NormAccumulator = gate.accumulator()
        self.errors: list[BaseException] = []
        dtypes = {plan.inputs[self.base].reader.infos[n].dtype for n in self.names}
        self._start_up = threading.Thread(target=self._warm_up, args=(dtypes,), daemon=True)
        self._start_up.start()

    def _warm_up(self, dtypes: set[str]) -> None:
        try:
            from mergeline.merge.compat.gram import warm_up

            warm_up(len(self.models) + 1, {DTYPES[d] for d in dtypes if d in DTYPES})
        except BaseException as e:
            self.errors.append(e)

    def __call__(self, job: TensorJob, tensors: list[torch.Tensor]) -> None:
        """From the producer thread, once the job is queued; an error is kept for `result()`."""
        if job.name not in self.names or self.errors:  # shared by every model under this name (not a tied head)
            return
        self._start_up.join()
        try:
            self.acc.add(job.name, [tensors[i] for i in self.models], tensors[self.base])
        except BaseException as e:
            self.errors.append(e)

    def result(self):
        """The accumulated statistics (NormResult); raises the first error, if any."""
        self._start_up.join()
        if self.errors:
            raise self.errors[0]
        return self.acc.result


def _producer(plan: Plan, device: torch.device, out_q: queue.Queue, stop: threading.Event,
              feed: _NormFeed | None = None) -> None:
    """Read each job's inputs (and move them to the device) ahead of the compute loop."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    try:
        for job in plan.jobs:
            if stop.is_set():
                return
            # src None: a frankenmerge slot the job's slice leaves empty (slices of different sizes)
            tensors = stored = [s.reader.read(src, pin=cuda) if src is not None else None
                                for s, src in zip(plan.inputs, job.sources)]
            if job.floating:
                if cuda:
                    with torch.cuda.stream(stream):
                        tensors = [t.to(device, non_blocking=True) if t is not None else None for t in tensors]
                    stream.synchronize()
                tensors = [t.to(job.compute_dtype) if t is not None else None for t in tensors]
            out_q.put((job, tensors))
            if feed is not None:
                feed(job, stored)  # while the loop computes this job
            del stored  # the inputs as read, before any cast: not kept through the next read
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
              on_tensor: Callable[[str, int], None] | None = None,
              policy: Any = None, allow_crimes: bool = False, checks: bool = True,
              lineage: bool = True) -> MergeOutput:
    """Merge the recipe's models into `out_dir`; returns the path, merge statistics and seconds.

    `policy`: the compatibility policy (a YAML path, a dict, a CompatPolicy; None: the default
    file), as `mergeline check --policy` takes it. A failed check raises `ChecksFailed` and
    leaves nothing behind, unless `allow_crimes`, which merges anyway and records the waived
    failures. `checks=False` skips the gate (the benchmark's baseline; nothing else should).
    `lineage`: write lineage.json and the model card README.md (content hashes of every input
    and of the output: one extra read of each)."""
    t0 = time.perf_counter()
    if not isinstance(recipe, MergeRecipe):
        recipe = load_recipe(recipe)
    dev = resolve_device(device)
    max_shard = parse_size(out_shard_size)
    gate = _open_gate(recipe, policy, allow_pickle) if checks else None
    if gate is not None:
        _verdict(gate.report, "headers", allow_crimes)  # before any tensor is read
    plan = build_plan(recipe, allow_pickle=allow_pickle)
    if gate is not None:
        gate.close()  # the merge's own reader feeds the norms from here on
    method = plan.method
    thresholds = model_thresholds(plan, dev)
    merged_names = [s.name for s in plan.merged]
    takes_signs = "sign_choices" in method.global_params.model_fields  # TIES: record the choices
    agg = StatsAggregator(method.name, merged_names,
                          sign_choices=(plan.recipe.parameters or {}).get("sign_choices") if takes_signs else None)
    total_bytes = sum(j.out.nbytes for j in plan.jobs)
    report: CompatReport | None = None
    try:
        with staging_dir(out_dir, overwrite) as tmp:
            writer = ShardWriter(tmp, [j.out for j in plan.jobs], max_shard)
            in_q: queue.Queue = queue.Queue(maxsize=1)
            out_q: queue.Queue = queue.Queue(maxsize=2)
            stop, write_errors = threading.Event(), []
            feed = (_NormFeed(gate, plan) if gate is not None and gate.norm_skip_reason() is None
            and not plan.stacked and not plan.recipe.modules else None)  # slots, not models; or
            # modules that merge different models (merge/modules.py)
            producer = threading.Thread(target=_producer, args=(plan, dev, in_q, stop, feed), daemon=True)
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
                        agg.add(job.name, result.stats, plan.merged_names(job))
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
            if gate is not None:  # the norm checks, from what the loop read: a failure discards tmp
                report = gate.finish(feed.result() if feed is not None else None)
                _verdict(report, "norms", allow_crimes)
            writer.close()
            _write_side_files(plan, tmp)
            stats = agg.write(tmp)
            if lineage:
                _write_lineage(plan, tmp, Path(out_dir).name, seed, report)
    finally:
        for s in plan.inputs:
            s.reader.close()
    waived = [c.name for c in report.checks if c.details.get("waived_by")] if report is not None else []
    return MergeOutput(Path(out_dir), stats, time.perf_counter() - t0, method.name, len(plan.jobs), total_bytes,
                       report.to_dict() if report is not None else None, waived)


def _open_gate(recipe: MergeRecipe, policy: Any, allow_pickle: bool) -> CompatGate | None:
    """The gate of the recipe's models: the same model twice is refused, then every input is
    opened and the header checks run. An unusable input is a MergeError naming the file.
    None for a recipe of one model (a passthrough copy): there is nothing to compare."""
    from mergeline.merge.compat.gate import CompatInputError, recipe_gate

    if len({m.model for m in recipe.inputs()}) == 1:
        return None
    try:
        return recipe_gate(recipe, policy, allow_pickle=allow_pickle)
    except (CheckpointError, CompatInputError, ModelNotFound) as e:
        raise MergeError(str(e)) from e


def _verdict(report: CompatReport, stage: str, allow_crimes: bool) -> None:
    """Refuse on a failed check, or, with allow_crimes, mark the failures waived by it."""
    from mergeline.merge.compat.gate import ChecksFailed, waive_failures

    if report.failed():
        if not allow_crimes:
            raise ChecksFailed(report, stage)
        waive_failures(report)


def _merge_one(plan: Plan, job: TensorJob, tensors: list[torch.Tensor], dev: torch.device, seed: int,
               thresholds: list[float] | None):
    if not job.floating:  # integer buffers: copied from the reference, as mergekit copies them
        ref_i = plan.inputs.index(plan.reference)
        return _Result(tensors[ref_i] if tensors[ref_i] is not None else next(t for t in tensors if t is not None), None)
    per_model, gparams = tensor_params(plan, job)
    base = tensors[plan.base_index] if plan.base_index is not None else None
    models = [t for i, t in enumerate(tensors) if i != plan.base_index and t is not None]
    gen = None
    if plan.method.randomized:
        gen = torch.Generator(device=dev)
        gen.manual_seed(_seed_for(seed, job.name))
    kwargs = {"generator": gen}
    if thresholds is not None:
        kwargs["thresholds"] = thresholds
    try:
        return plan.method.fn(base, models, per_model, gparams, **kwargs)
    except (ValueError, RuntimeError):
        # A method that selects or elects (TIES' counts) cannot work on NaN/Inf: name the input.
        # Checked only on failure, so finite merges pay nothing; methods that merely propagate
        # NaN are stopped by the norm checks when the merge ends.
        for slot, t in zip(plan.inputs, tensors):
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                raise MergeError(f"{slot.ref}: tensor {job.name!r} holds NaN or Inf values; "
                                 f"{plan.method.name} cannot merge non-finite weights") from None
        raise


@dataclass
class _Result:
    tensor: torch.Tensor
    stats: Any


def _write_side_files(plan: Plan, folder: Path) -> None:
    write_side_files(plan, folder)  # merge/writer.py: config (layer count, vocabulary), tokenizer, template, recipe


def _write_lineage(plan: Plan, folder: Path, name: str, seed: int, report: CompatReport | None) -> None:
    """lineage.json and README.md (merge/lineage.py), with the checks and what was waived."""
    from mergeline.merge.compat.gate import summary
    from mergeline.merge.lineage import build_lineage, describe_input, write_lineage

    r = plan.recipe
    names = model_names(r)
    described = {ref: describe_input(names[ref], ref, resolve_model(ref, r.source_dir)) for ref in plan.models}
    base = described.get(r.base_model) if r.base_model else None
    parents = [d for ref, d in described.items() if ref != r.base_model]
    recipe = yaml.safe_load(r.to_yaml())
    write_lineage(folder, build_lineage(name=name, model_dir=folder, recipe=recipe, method=r.merge_method, seed=seed,
                                        base=base, parents=parents,
                                        checks=summary(report) if report is not None else None))
