"""Memory and disk a merge will need, from the safetensors headers alone (no tensor read).

The model (merge/executor.py streams one tensor name at a time; see its docstring):

    peak RSS = overhead                        python, torch, numba, the gate, the plan
             + input buffers                   every input's tensors of IN_FLIGHT consecutive jobs
                                               (computing, queued, being read), as stored
             + method workspace                one delta per merged model of the largest tensor,
                                               in the compute dtype, plus TIES's 16-bit magnitude
                                               histograms (0.25 B per element per model)
             + output buffers                  OUT_FLIGHT consecutive results (computing, queued
                                               for the writer, being written), in the output dtype
    disk     = the output's tensors + shard headers (staged next to the output, then renamed:
               no second copy)

The window maxima are taken over the jobs in merge order, so a model whose large tensors sit
side by side (70B's MLP) counts them together, while Llama's embedding, flanked by small norms,
counts alone. Calibration: benchmarks/bench_sizes.py measured the peak RSS of a bf16 TIES merge
of four models on CPU at 0.3B, 1B and 3B (two runs, 2026-11-28: 1.00-1.07, 1.77-1.89 and
2.16-2.29 GB); the three variable terms come from the code's buffers, and OVERHEAD is the mean of
what is left (0.39-0.67 GB). The estimate was then 0.98-1.12x the measured peak at every size
(README "Benchmarks"). Runs vary by about 10% with thread timing.
CUDA merges hold the workspace on the device, not in RSS: the estimate is then an upper bound.

    python -c "from mergeline.merge.estimate import estimate; print(estimate('RECIPE.yaml').text())"
    python -c "from mergeline.merge.estimate import estimate_shapes, llama_shapes; \
print(estimate_shapes(llama_shapes(8192, 80, 28672, kv_hidden=1024), inputs=4).text())"
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from mergeline.merge.plan import Plan
    from mergeline.merge.recipe import MergeRecipe

OVERHEAD = 500 * 2**20  # bytes: measured peak minus the other three terms, 0.39-0.67 GB at 0.3B/1B/3B
IN_FLIGHT = 3  # jobs whose inputs are alive: computing, queued (maxsize 1), being read
OUT_FLIGHT = 3  # results alive: computing, queued for the writer (maxsize 2 shared with), being written
HIST_BYTES_PER_ELEMENT = 0.25  # merge/methods/select.py: one 2^15-bin int32 row per 2^19 elements
DEFAULT_SHARD = 5 * 10**9


@dataclass(frozen=True)
class TensorSize:
    """One output tensor as the merge sees it: elements and bytes per element at each stage."""

    name: str
    numel: int
    in_bytes: int = 2  # stored element size of the inputs (bf16: 2)
    compute_bytes: int = 2  # the compute dtype's element size
    out_bytes: int = 2  # the output dtype's element size
    floating: bool = True


class Estimate(BaseModel):
    """What a merge needs; peak_rss_bytes is the sum of the four terms below it."""

    model_config = ConfigDict(extra="forbid")

    peak_rss_bytes: int
    disk_bytes: int
    overhead_bytes: int
    input_buffers_bytes: int
    workspace_bytes: int
    output_buffers_bytes: int
    inputs: int  # models read per tensor (base included)
    merged: int  # models whose deltas the method holds
    largest_tensor: str
    largest_tensor_bytes: int  # as stored
    output_bytes: int  # the merged model's tensors
    shards: int
    largest_shard_bytes: int

    def summary(self) -> str:
        """One line: what `mergeline merge` prints before it starts."""
        return (f"~{self.peak_rss_bytes / 1e9:.2f} GB of memory (peak RSS), {self.disk_bytes / 1e9:.2f} GB of disk "
                f"({self.shards} shard{'s' if self.shards != 1 else ''})")

    def text(self) -> str:
        g = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        return (f"memory: peak RSS ~{g(self.peak_rss_bytes)} = overhead {g(self.overhead_bytes)} + input buffers "
                f"{g(self.input_buffers_bytes)} ({self.inputs} models x {IN_FLIGHT} tensors in flight; largest "
                f"{self.largest_tensor} {g(self.largest_tensor_bytes)}) + workspace {g(self.workspace_bytes)} "
                f"+ output buffers {g(self.output_buffers_bytes)}\n"
                f"disk: {g(self.disk_bytes)} for the output ({self.shards} shard{'s' if self.shards != 1 else ''}, "
                f"largest {g(self.largest_shard_bytes)})")


def _window_max(values: list[int], width: int) -> int:
    best = run = 0
    for i, v in enumerate(values):
        run += v
        if i >= width:
            run -= values[i - width]
        best = max(best, run)
    return best


def estimate_shapes(tensors: Iterable[TensorSize], inputs: int, merged: int | None = None,
                    out_shard_size: int = DEFAULT_SHARD, histograms: bool = True) -> Estimate:
    """The estimate from a table of output tensors in merge order (no files needed).

    `inputs`: models read per tensor (a TIES merge of a base and three fine-tunes: 4);
    `merged`: models the method holds a delta of (default inputs - 1: all but the base);
    `histograms`: TIES/magnitude trimming of 16-bit tensors keeps 0.25 B/element per model."""
    ts = list(tensors)
    if not ts:
        raise ValueError("estimate: no tensors")
    merged = inputs - 1 if merged is None else merged
    read = [inputs * t.numel * t.in_bytes for t in ts]
    out = [t.numel * t.out_bytes for t in ts]
    big = max(ts, key=lambda t: t.numel * t.in_bytes)
    work_one = [
        (merged * t.numel * t.compute_bytes + (int(merged * t.numel * HIST_BYTES_PER_ELEMENT) if histograms and t.compute_bytes == 2 else 0))
        if t.floating else 0 for t in ts]
    input_buffers = _window_max(read, IN_FLIGHT)
    workspace = max(work_one)
    output_buffers = _window_max(out, OUT_FLIGHT)
    # shards as merge/writer.py plans them (greedy, in merge order)
    shard_sizes, size = [], 0
    for b in out:
        if size and size + b > out_shard_size:
            shard_sizes.append(size)
            size = 0
        size += b
    shard_sizes.append(size)
    header = sum(100 + len(t.name) for t in ts)  # ~JSON per tensor entry
    peak = OVERHEAD + input_buffers + workspace + output_buffers
    return Estimate(peak_rss_bytes=peak, disk_bytes=sum(out) + header, overhead_bytes=OVERHEAD,
                    input_buffers_bytes=input_buffers, workspace_bytes=workspace, output_buffers_bytes=output_buffers,
                    inputs=inputs, merged=merged, largest_tensor=big.name,
                    largest_tensor_bytes=big.numel * big.in_bytes, output_bytes=sum(out),
                    shards=len(shard_sizes), largest_shard_bytes=max(shard_sizes))


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def plan_sizes(plan: Plan) -> list[TensorSize]:
    """The table of a merge plan, from its headers: stored, compute and output element sizes."""
    from mergeline.merge.checkpoint import DTYPES

    ref = plan.inputs.index(plan.reference)
    rows = []
    for job in plan.jobs:
        info = plan.inputs[ref].reader.infos.get(job.sources[ref])
        stored = _itemsize(DTYPES[info.dtype]) if info is not None and info.dtype in DTYPES else _itemsize(job.out.dtype)
        n = 1
        for d in job.out.shape:
            n *= d
        rows.append(TensorSize(job.name, n, stored, _itemsize(job.compute_dtype), _itemsize(job.out.dtype), job.floating))
    return rows


def estimate(source: MergeRecipe | Plan | str | Path | Mapping, out_shard_size: str | int = "5GB",
             allow_pickle: bool = False) -> Estimate:
    """The estimate for a recipe (a path, a dict, a MergeRecipe) or a built Plan, headers only."""
    from mergeline.merge.plan import Plan, build_plan
    from mergeline.merge.recipe import MergeRecipe, load_recipe
    from mergeline.merge.writer import parse_size

    shard = parse_size(out_shard_size)
    if isinstance(source, Plan):
        return _from_plan(source, shard)
    recipe = source if isinstance(source, MergeRecipe) else load_recipe(source)
    plan = build_plan(recipe, allow_pickle=allow_pickle)
    try:
        return _from_plan(plan, shard)
    finally:
        for s in plan.inputs:
            s.reader.close()


def _from_plan(plan: Plan, shard: int) -> Estimate:
    histograms = plan.recipe.merge_method == "ties"  # the only method that trims by magnitude (select.py)
    merged = len(plan.merged) if plan.base_index is not None else len(plan.inputs)
    return estimate_shapes(plan_sizes(plan), len(plan.inputs), merged, shard, histograms)


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int = 32000, kv_hidden: int | None = None,
                 dtype_bytes: int = 2) -> list[TensorSize]:
    """A Llama's tensor table in Hugging Face's order, for an estimate without files
    (Llama-2-7B: 4096, 32, 11008; Llama-2-70B: 8192, 80, 28672, kv_hidden=1024)."""
    kv = kv_hidden or hidden
    b = dtype_bytes
    rows = [TensorSize("model.embed_tokens.weight", vocab * hidden, b, b, b)]
    for i in range(layers):
        p = f"model.layers.{i}."
        rows += [TensorSize(p + "input_layernorm.weight", hidden, b, b, b),
                 TensorSize(p + "self_attn.q_proj.weight", hidden * hidden, b, b, b),
                 TensorSize(p + "self_attn.k_proj.weight", kv * hidden, b, b, b),
                 TensorSize(p + "self_attn.v_proj.weight", kv * hidden, b, b, b),
                 TensorSize(p + "self_attn.o_proj.weight", hidden * hidden, b, b, b),
                 TensorSize(p + "post_attention_layernorm.weight", hidden, b, b, b),
                 TensorSize(p + "mlp.gate_proj.weight", intermediate * hidden, b, b, b),
                 TensorSize(p + "mlp.up_proj.weight", intermediate * hidden, b, b, b),
                 TensorSize(p + "mlp.down_proj.weight", hidden * intermediate, b, b, b)]
    rows += [TensorSize("model.norm.weight", hidden, b, b, b), TensorSize("lm_head.weight", vocab * hidden, b, b, b)]
    return rows
