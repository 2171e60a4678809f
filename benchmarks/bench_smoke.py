"""What the smoke stage costs against the full evaluation it guards, and what the statistics cost.

On the demo zoo (zoo), for the base and two merges (TIES, and task arithmetic with a
runaway lambda that the smoke test fails), in one run:

- the smoke test (evaluation/smoke.py) of each model: cold (the references' perplexities are
  computed: the first candidate of a pipeline run) and warm (remembered: every later candidate);
- one full evaluation of the same model: lm-eval on the demo suite (configs/eval_suite.yaml),
  no score cache;
- the statistics of the gate: evaluation.stats intervals over the evaluated items (per task a
  Wilson interval, the paired difference against the base, the retention ratio against the
  fine-tune, McNemar's p), against that evaluation.

Seconds are wall time. Each column runs under the same torch thread count (`--threads`, default
torch's own): on a machine whose cores are busy with other work, two intra-op threads on these
tiny models can be ten times slower than one, for the smoke test and lm-eval alike. Imports and
first-call set-up are paid once before the timings (a warm-up smoke test and interval).

    python benchmarks/bench_smoke.py [--text-lines 64] [--threads 1] [--zoo ZOO_DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mergeline.configs import DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars

CONFIGS = DIR
PROMPTS = ["the red cat", "a dog is", "3 plus 4 is", "there are 12", "c a b backwards is"]


def timed(fn):
    wall = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall


def merges(zoo, out: Path) -> dict[str, Path]:
    from mergeline.merge.executor import run_merge

    models = [{"model": str(f), "parameters": {"weight": 0.5}} for f in zoo.finetunes.values()]
    recipes = {"ties": {"merge_method": "ties", "parameters": {"density": 0.5, "normalize": True}},
               "runaway": {"merge_method": "task_arithmetic", "parameters": {"lambda": 20.0}}}
    return {name: run_merge({**r, "base_model": str(zoo.base), "dtype": "float32", "models": models},
                            out / name, device="cpu", progress=False).path for name, r in recipes.items()}


def statistics(table, suite, name: str) -> int:
    """The gate's intervals for candidate `name` over its items; returns how many were made."""
    from mergeline.evaluation import stats

    s = table.samples
    owner = suite.task_owner()
    made = 0
    for task in suite.all_tasks():
        def items(model):
            rows = s[(s["model"] == model) & (s["task"] == task)].sort_values(["seed", "doc_id"])
            return rows["correct"].astype(float).to_numpy()
        mine, base = items(name), items("base")
        stats.proportion(int(mine.sum()), len(mine))
        stats.paired_difference(mine, base)
        stats.mcnemar_p(mine, base)
        made += 3
        if task in owner:
            stats.paired_ratio(mine, items(owner[task]))
            made += 1
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-lines", type=int, default=64)
    ap.add_argument("--zoo", help="a built zoo folder (default: build or reuse the cached one)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from mergeline.evaluation.evaluate import ScoreTable, evaluate_models
    from mergeline.evaluation.smoke import SmokeRule, smoke_test
    from mergeline.evaluation.suite import load_suite
    from mergeline.zoo import build_zoo, load_zoo
    from mergeline.zoo.build import N_GENERIC
    from mergeline.zoo.data import generic_lines

    zoo = load_zoo(args.zoo) if args.zoo else build_zoo()
    text = "".join(generic_lines(N_GENERIC + args.text_lines, zoo.manifest["seed"])[N_GENERIC:])
    refs = {"base": zoo.base, **zoo.finetunes}
    suite = load_suite(CONFIGS / "eval_suite.yaml", {"zoo": zoo.tasks_dir})
    tmp = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    models = {"base": zoo.base, **merges(zoo, tmp)}

    # The references' own evaluations, for the statistics (base and fine-tunes: items to pair with).
    ref_table, ref_wall = timed(lambda: evaluate_models(suite, refs, None, log=None))
    smoke_test(zoo.base, {}, text, PROMPTS)  # warm-up: imports, first generate() call
    statistics(ref_table, suite, next(iter(zoo.finetunes)))  # warm-up: scipy, statsmodels
    print(f"zoo {zoo.root.name}; smoke text {args.text_lines} lines, {len(PROMPTS)} prompts; "
          f"suite {suite.name}: {len(suite.all_tasks())} tasks x {suite.limit} items, seeds {suite.seeds}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"(references evaluated first, for the statistics to pair with: {ref_wall:.1f} s for {len(refs)} models)")
    print("cold: the references' perplexities computed (first candidate of a run); warm: remembered\n")
    head = (f"{'model':<10} {'smoke':>6} {'cold s':>7} {'warm s':>7} {'eval s':>7} {'eval/smoke':>10} "
            f"{'stats s':>8} {'intervals':>9} {'stats/eval':>10}")
    print(head)
    print("-" * len(head))
    for name, path in models.items():
        from mergeline.evaluation import smoke as smoke_module

        smoke_module._REFERENCE_PPL.clear()  # cold: the references' perplexities are computed
        cold, cold_wall = timed(lambda: smoke_test(path, refs, text, PROMPTS, SmokeRule()))
        _, warm_wall = timed(lambda: smoke_test(path, refs, text, PROMPTS, SmokeRule()))
        label = "bench-" + name  # not "base": a candidate's role, paired with the references' items
        table, eval_wall = timed(lambda: evaluate_models(suite, {label: path}, None,
                                                         roles={label: "candidate"}, log=None))
        both = ScoreTable.concat([ref_table, table])
        made, stats_wall = timed(lambda: statistics(both, suite, label))
        print(f"{name:<10} {'pass' if cold.passed else 'FAIL':>6} {cold_wall:>7.2f} {warm_wall:>7.2f} "
              f"{eval_wall:>7.1f} {eval_wall / warm_wall:>9.0f}x {stats_wall:>8.3f} {made:>9} "
              f"{stats_wall / eval_wall:>10.4f}")
        if not cold.passed:
            print(f"{'':<10} failed: {', '.join(c.name for c in cold.failed())}")


if __name__ == "__main__":
    main()
