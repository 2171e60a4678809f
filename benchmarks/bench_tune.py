"""Does tuning help on items it never saw? Untuned TIES vs tuned (Optuna over weights and
densities) vs sign-guided TIES (greedy validation-chosen signs per layer group; Yadav et al. 2023,
arXiv:2306.01708, sec. 7), judged on held-out test items, with the search's cost.

Three sets, each three fine-tunes of the zoo's base on addition, reverse and facts:
- demo: the demo zoo's fine-tunes (token embedding only) under the demo recipe (TIES, density
  0.5, weights 0.5, lambda 1.15);
- no-trim: the same fine-tunes merged where their task vectors interfere most: no trimming
  (density 1.0, so every small redundant delta votes in the sign election) at weight 1.0 with
  lambda 1.0 (a task-arithmetic-sized sum; zoo/build.py describes the shared coordinates);
- conflicting: separately trained fine-tunes of every transformer block, the embedding frozen
  (benchmarks/conflicting_set.py: the usual shape of an LLM fine-tune, conflicting in sign in
  every layer, measured at build), under the demo recipe.
Each set runs `mergeline tune` three times (flows/tune.py `run_tune`, the final pipeline included)
in one workdir: weights/densities per model (TPE, `--trials`), the same as 2-point gradients over
the layers (`--layer-groups 2`), then the recipe with `sign_source: validation`.
The suite's items are split: validation [0, V) tunes, test [V, 150) judges (facts has 48 items:
where a task has fewer than 2V, its halves).
The final runs' reports give, on test items, mean retention of each recipe and the paired
difference to the untuned recipe with its 95% interval (evaluation/metrics.py `pooled_difference`
over evaluation/stats.py, paired per item). Validation figures come from the searches (the
untuned TIES merge is the sign search's first candidate, all groups elected). Cost: candidates
tried, seconds of the trial loop, evaluations served from the score cache.

Run: python benchmarks/bench_tune.py [--trials 30] [--validation 60] [--sets demo,no-trim,conflicting]
     python benchmarks/bench_tune.py --trial-cost [--trials 4]   # s/trial, cold vs a repeated point
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

NO_TRIM = {"parameters": {"density": 1.0, "lambda": 1.0, "normalize": True}, "weight": 1.0}
SETS = ("demo", "no-trim", "conflicting")
GROUPS = 2  # `--layer-groups`: each weight and density a gradient from the first layer to the last


def pipeline(root: Path, workers: int, validation: int, name: str = "demo", recipe: str = "demo",
             signs: bool = False, test_end: int | None = None) -> Path:
    """The demo pipeline on the zoo, its suite split; `recipe` "no-trim" swaps the recipe's
    numbers, "conflicting" the fine-tunes (conflicting_set.py); `signs` asks for
    validation-guided signs."""
    from mergeline.flows.demo import CONFIGS, write_pipeline, zoo_values
    from mergeline.zoo import build_zoo

    root.mkdir(parents=True, exist_ok=True)
    zoo = build_zoo()
    values = zoo_values(zoo)
    if recipe == "conflicting":
        from conflicting_set import build_set, finetunes

        values.update({skill: str(folder) for skill, folder in finetunes(build_set(zoo)).items()})
    path = write_pipeline(CONFIGS / "pipeline_demo.yaml", root, values)
    data = yaml.safe_load(path.read_text())
    data["name"] = name
    data["runner"] = {"kind": "threads", "max_workers": workers}
    data["baselines"] = ["linear"]  # the gate policy compares with it (without it: NO-GO)
    r = data["recipe"] = yaml.safe_load(Path(data["recipe"]).read_text())
    if recipe == "no-trim":
        r["parameters"] = dict(NO_TRIM["parameters"])
        for m in r["models"]:
            m["parameters"] = {"weight": NO_TRIM["weight"]}
    if signs:
        r.setdefault("parameters", {})["sign_source"] = "validation"
    suite_path = Path(data["eval_suite"])
    suite = yaml.safe_load(suite_path.read_text())
    suite.pop("limit", None)
    suite["splits"] = {"validation": [0, validation], "test": [validation, test_end or 2 * validation]}
    # a task with fewer than 2 x `validation` items (facts: 48) is split in halves instead
    small = {t: n for t, n in zoo.manifest["task_items"].items() if n < 2 * validation}
    if small:
        suite["splits"]["tasks"] = {t: {"validation": [0, n // 2], "test": [n // 2, n]} for t, n in small.items()}
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    path = path.with_name(f"pipeline-{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def compare(workdir: Path, kind: str, trials: int, validation: int) -> dict:
    """Tune one set three ways; the figures of the table's rows."""
    from mergeline.flows.tune import run_tune

    rows = {}
    for how in ("tuned", "groups", "signs"):
        path = pipeline(workdir, 2, validation, name=f"{kind}-{how}", recipe=kind, signs=how == "signs",
                        test_end=150)
        t0 = time.time()
        out = run_tune(path, trials=trials, seed=0, storage="memory", layer_groups=GROUPS if how == "groups" else 1)
        wall = time.time() - t0
        rows[how] = {"search": out["search"], "test": out["test"], "held_out": out["held_out"],
                     "decision": out["final"]["decision"],
                     "reasons": out["final"].get("reasons"), "wall": wall}
    return {"set": kind, "regime": regime(kind), **rows}


def regime(kind: str) -> str:
    """The set's measured interference under the demo recipe (zoo.json, or set.json)."""
    from mergeline.zoo import build_zoo

    zoo = build_zoo()
    if kind == "conflicting":
        from conflicting_set import build_set

        merges = json.loads((build_set(zoo) / "set.json").read_text())["merges"]
    else:
        merges = zoo.manifest["merges"]
    layers = merges.get("sign_conflict_by_layer")
    per_layer = f" (per block {', '.join(f'{r:.2f}' for r in layers.values())})" if layers else ""
    return (f"{kind}: fine-tunes as measured under the demo recipe: sign conflicts {merges['sign_conflict_rate']:.2f} "
            f"of kept positions{per_layer}, task-vector cosines "
            f"{min(merges['cosine'].values()):.2f}-{max(merges['cosine'].values()):.2f}, TIES mean retention "
            f"{merges['methods']['ties']['mean_retention']:.2f}")


def _iv(iv: dict | None) -> str:
    from mergeline.evaluation.stats import Interval

    return Interval(**iv).text() if iv and iv.get("low") is not None else "n/a"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _held(h: dict) -> str:
    gain = h["validation_gain"]
    return h["verdict"] + (f" (validation {gain:+.3f})" if gain is not None else "")


def table(results: list[dict], trials: int, validation: int) -> str:
    lines = [f"validation items [0, {validation}) per task tune; test items [{validation}, 150) judge "
             f"(a task with fewer than {2 * validation} items: its halves); TPE {trials} trials",
             "",
             "| set | recipe | validation objective (mean retention) | test mean retention | test worst regression "
             "| test difference vs untuned [95% CI] | validation gain held? | gate | candidates (cache hits) "
             "| trial loop s | tune wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        u, start = res["tuned"]["test"]["untuned"], res["signs"]["search"]["trials_run"][0]
        lines.append(f"| {res['set']} | untuned TIES | {_f(start['objective'])} ({_f(start['mean_retention'])}) | "
                     f"{_f(u.get('mean_retention'))} | {_f(u.get('worst_regression'))} | | | | | | |")
        for how, label in (("tuned", "tuned (TPE)"), ("groups", f"tuned per layer group (TPE, {GROUPS}-point gradients)"),
                           ("signs", "sign-guided")):
            r = res[how]
            s, test, best = r["search"], r["test"], r["search"]["best"]
            row = next(t for t in s["trials_run"] if t["trial"] == best["trial"]) if s["trials_run"] else {}
            lines.append(
                f"| {res['set']} | {label} | {_f(best['objective'])} ({_f(row.get('mean_retention'))}) | "
                f"{_f(test['tuned'].get('mean_retention'))} | {_f(test['tuned'].get('worst_regression'))} | "
                f"{_iv(test['difference_interval'])} | {_held(r['held_out'])} | {r['decision']} | "
                f"{s['trials_finished']} ({s['trials_cached']}) | "
                f"{s['seconds']['trials']:.0f} | {r['wall']:.0f} |")
        chosen = ", ".join(f"{g}={m}" for g, m in res["signs"]["search"]["best"]["values"].items())
        lines.append(f"| {res['set']} | signs chosen: {chosen} | | | | | | | | | |")
    lines += [""] + [f"- {res['regime']}" for res in results]
    return "\n".join(lines)


def trial_cost(trials: int, validation: int) -> None:
    """The earlier measurement: seconds per trial, cold and as a repeated point (both caches)."""
    from mergeline.flows.pipeline import task_runner
    from mergeline.flows.pipeline_config import load_pipeline
    from mergeline.flows.tune import tune_flow

    def search(path: Path, storage: str) -> tuple[float, int]:
        flow_fn = tune_flow.with_options(task_runner=task_runner(load_pipeline(path)))
        out = flow_fn(pipeline=str(path), trials=trials, storage=storage)
        assert out["trials_finished"] == trials and not out["trials_failed"], out
        return out["seconds"]["trials"] / trials, out["trials_cached"]

    rows = []
    for workers in (1, 2):
        path = pipeline(Path(tempfile.mkdtemp(prefix=f"bench-tune-{workers}-")), workers, validation)
        (cold, c1), (warm, c2) = search(path, "sqlite"), search(path, "memory")
        rows.append((workers, cold, warm, c1, c2))
    print(f"\n{trials} trials, {validation} validation items per task; trial loop only")
    print(f"{'workers':>7} | {'cold s/trial':>12} | {'repeat s/trial':>14} | cached (cold, repeat)")
    for workers, cold, warm, c1, c2 in rows:
        print(f"{workers:>7} | {cold:>12.2f} | {warm:>14.2f} | {c1}, {c2}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--validation", type=int, default=60, help="validation items per task (a task with fewer than twice as many: its halves)")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--trial-cost", action="store_true", help="the per-trial cost measurement instead")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
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
    if args.trial_cost:
        trial_cost(args.trials, args.validation)
        return
    results = []
    unknown = sorted(set(args.sets.split(",")) - set(SETS))
    if unknown:
        ap.error(f"--sets: unknown set(s) {unknown}; known: {', '.join(SETS)}")
    for kind in args.sets.split(","):
        results.append(compare(Path(tempfile.mkdtemp(prefix=f"bench-tune-{kind}-")), kind, args.trials,
                               args.validation))
        print(table(results, args.trials, args.validation), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
