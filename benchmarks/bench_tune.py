"""What a tuning trial costs on the demo zoo, cold and as a repeated point (served from the caches).

Runs the search flow of `mergeline tune` (flows/tune.py, without the final pipeline) on the zoo
with a split suite, twice in one workdir: a fresh search of N trials, then the same N points again
(a fresh in-memory study with the same seed proposes them again), whose merges and evaluations
come from the content-keyed caches. Prints seconds per trial for both, with 1 and with 2 workers
(`runner.max_workers`: trials of a batch merge side by side; lm-eval runs one at a time per
process, tasks/eval_tasks.py).

Run: python benchmarks/bench_tune.py [--trials 4] [--validation 12]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml


def pipeline(root: Path, workers: int, validation: int) -> Path:
    from mergeline.zoo import build_zoo
    from mergeline.flows.demo import CONFIGS, write_pipeline, zoo_values

    path = write_pipeline(CONFIGS / "pipeline_demo.yaml", root, zoo_values(build_zoo()))
    data = yaml.safe_load(path.read_text())
    data["runner"] = {"kind": "threads", "max_workers": workers}
    suite_path = Path(data["eval_suite"])
    suite = yaml.safe_load(suite_path.read_text())
    suite.pop("limit", None)
    suite["splits"] = {"validation": [0, validation], "test": [validation, 2 * validation]}
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def search(path: Path, trials: int, storage: str) -> tuple[float, int]:
    """(seconds per trial of the trial loop, trials served from the caches); the references'
    evaluations before the loop are not counted."""
    from mergeline.flows.pipeline import task_runner
    from mergeline.flows.pipeline_config import load_pipeline
    from mergeline.flows.tune import tune_flow

    flow_fn = tune_flow.with_options(task_runner=task_runner(load_pipeline(path)))
    out = flow_fn(pipeline=str(path), trials=trials, storage=storage)
    assert out["trials_finished"] == trials and not out["trials_failed"], out
    return out["seconds"]["trials"] / trials, out["trials_cached"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--validation", type=int, default=12, help="validation items per task")
    args = ap.parse_args()
    from mergeline.flows.progress import quiet
    from mergeline.flows.servers import default_environment

    quiet()
    default_environment()
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> None:
        """Starts Prefect's temporary server (20-30 s here) before anything is timed."""

    warm_up()
    rows = []
    for workers in (1, 2):
        root = Path(tempfile.mkdtemp(prefix=f"bench-tune-{workers}-"))
        path = pipeline(root, workers, args.validation)
        (cold, c1), (warm, c2) = search(path, args.trials, "sqlite"), search(path, args.trials, "memory")
        rows.append((workers, cold, warm, c1, c2))
    print(f"\n{args.trials} trials, {args.validation} validation items per task; trial loop only "
          "(the base's and fine-tunes' evaluations before it are not counted)")
    print(f"{'workers':>7} | {'cold s/trial':>12} | {'repeat s/trial':>14} | cached (cold, repeat)")
    for workers, cold, warm, c1, c2 in rows:
        print(f"{workers:>7} | {cold:>12.2f} | {warm:>14.2f} | {c1}, {c2}")


if __name__ == "__main__":
    main()
