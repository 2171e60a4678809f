"""Evaluate a set of models (base, fine-tunes, merge candidates) on a suite, with caching.

The one call the pipeline makes:

    evaluate_models(suite: EvalSuite, models: dict[str, Path | dict[int, Path]], cache_dir: Path | None,
                    *, roles: dict[str, str] | None = None, runner=None, log=print) -> ScoreTable

`models` maps a name to a Hugging Face folder, or to {seed: folder} for a merge made once per
seed (DARE, DELLA drop at random): merge seed k is evaluated with eval seed k, so the tables'
`seed` column names the merge seed and the metrics report the spread across seeds. Such a dict
must give one folder for every seed of the suite. Roles come from the names unless `roles` says
otherwise: "base" is the base, a name listed under the suite's `retention` is that fine-tune,
anything else ("ties", "linear", "task_arithmetic", ...) is a merge candidate. Every model runs
every suite task (the tasks are tiny; base scores on the skills and fine-tune scores on the
general tasks make the report easier to read). Each (model, seed) run is looked up in the score
cache first (`evaluation.score_cache`); `ScoreTable.runs` counts the lm-eval runs really made.

`ScoreTable.scores`:  model, role, task, metric, value, primary, seed
`ScoreTable.samples`: model, role, task, doc_id, correct, seed (+ target, response)
`ScoreTable.models`:  name -> role, path, content_hash, cache (per seed); a per-seed model also
                      has per_seed {seed: {path, content_hash}} (path/content_hash: the first seed's)

    python -m mergeline.evaluation.evaluate SUITE.yaml NAME=MODEL_DIR [NAME=MODEL_DIR ...]
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from mergeline.evaluation.score_cache import ScoreCache, cache_key, lm_eval_version, task_fingerprint
from mergeline.evaluation.splits import restrict
from mergeline.evaluation.suite import EvalSuite, check_ready
from mergeline.merge.hashing import content_hash
from mergeline.merge.resolve import split_adapter

ROLES = ("base", "finetune", "candidate")
SCORE_COLUMNS = ["model", "role", "task", "metric", "value", "primary", "seed"]
SAMPLE_COLUMNS = ["model", "role", "task", "doc_id", "correct", "seed"]
_OUTPUT_TYPES = {"generate_until": "generation", "multiple_choice": "multiple_choice",
                 "loglikelihood": "loglikelihood", "loglikelihood_rolling": "loglikelihood"}


@dataclass
class ScoreTable:
    scores: pd.DataFrame
    samples: pd.DataFrame
    models: dict[str, dict] = field(default_factory=dict)   # name -> role, path, content_hash, cache
    task_types: dict[str, str] = field(default_factory=dict)
    lm_eval_version: str = ""
    runs: int = 0

    def primary(self) -> pd.DataFrame:
        """One number per (model, task): the primary metric, averaged over seeds."""
        p = self.scores[self.scores["primary"].astype(bool)]
        return (p.groupby(["model", "role", "task"], as_index=False, sort=False)["value"].mean())

    def score(self, model: str, task: str) -> float | None:
        p = self.primary()
        row = p[(p["model"] == model) & (p["task"] == task)]
        return None if row.empty else float(row["value"].iloc[0])

    def names(self, role: str) -> list[str]:
        return [n for n, m in self.models.items() if m["role"] == role]

    @classmethod
    def concat(cls, tables: list["ScoreTable"]) -> "ScoreTable":
        """One table from per-model tables of the same suite (e.g. evaluated in parallel tasks)."""
        if not tables:
            raise ValueError("no score tables to combine")
        models, types = {}, {}
        for t in tables:
            if dup := set(models) & set(t.models):
                raise ValueError(f"model(s) {sorted(dup)} appear in more than one table")
            models.update(t.models)
            types.update({k: v for k, v in t.task_types.items() if v != "unknown" or k not in types})
        return cls(scores=pd.concat([t.scores for t in tables], ignore_index=True),
                   samples=pd.concat([t.samples for t in tables], ignore_index=True),
                   models=models, task_types=types, lm_eval_version=tables[0].lm_eval_version,
                   runs=sum(t.runs for t in tables))


def infer_roles(suite: EvalSuite, names: list[str], roles: dict[str, str] | None = None) -> dict[str, str]:
    out = {}
    for n in names:
        r = (roles or {}).get(n) or ("base" if n == "base" else "finetune" if n in suite.retention else "candidate")
        if r not in ROLES:
            raise ValueError(f"model {n!r}: role {r!r} is not one of {ROLES}")
        out[n] = r
    return out


def _per_seed(suite: EvalSuite, name: str, path) -> dict[int, str | Path]:
    """seed -> folder for one model: one folder for every seed, or the model's own {seed: folder}."""
    if not isinstance(path, dict):
        return {seed: path for seed in suite.seeds}
    given = {int(k): v for k, v in path.items()}
    if set(given) != set(suite.seeds):
        raise ValueError(f"model {name!r}: per-seed folders for seeds {sorted(given)}, "
                         f"but the suite runs seeds {suite.seeds}")
    return {seed: given[seed] for seed in suite.seeds}


def evaluate_models(suite: EvalSuite, models: dict[str, str | Path | dict[int, str | Path]],
                    cache_dir: str | Path | None, *, roles: dict[str, str] | None = None,
                    runner: Callable | None = None, log: Callable[[str], None] | None = print) -> ScoreTable:
    check_ready(suite)
    folders = {name: _per_seed(suite, name, path) for name, path in models.items()}
    for name, per_seed in folders.items():
        for path in per_seed.values():
            for folder in split_adapter(str(path)):  # BASE+ADAPTER: a LoRA adapter on its base
                if folder is not None and not Path(folder).is_dir():
                    raise FileNotFoundError(f"model {name!r}: folder {folder} does not exist")
    if runner is None:
        from mergeline.evaluation.lm_eval_runner import run_lm_eval as runner  # heavy: imports lm_eval
    roles = infer_roles(suite, list(models), roles)
    cache = ScoreCache(cache_dir) if cache_dir is not None else None
    tasks = suite.all_tasks()
    task_fp = task_fingerprint(tasks, suite.include_paths)
    version = lm_eval_version()
    # Every folder of the suite (lm-eval's TaskManager takes a list of include paths).
    include = list(suite.include_paths) or None
    limit = suite.run_limit()  # `limit`, or the end of the scored part's ranges (evaluation/splits.py)

    score_frames, sample_frames, info, task_types, runs = [], [], {}, dict(suite.task_types), 0
    for name, per_seed in folders.items():
        hashes = {seed: content_hash(path) for seed, path in per_seed.items()}
        first = suite.seeds[0]
        info[name] = {"role": roles[name], "path": str(Path(per_seed[first]).resolve()),
                      "content_hash": hashes[first], "cache": []}
        if isinstance(models[name], dict):
            info[name]["per_seed"] = {seed: {"path": str(Path(p).resolve()), "content_hash": hashes[seed]}
                                      for seed, p in per_seed.items()}
        for seed, path in per_seed.items():
            mhash = hashes[seed]
            key = cache_key(mhash, task_fp, limit=limit, seed=seed, device=suite.device, version=version)
            run = cache.get(key) if cache else None
            if run is not None:
                info[name]["cache"].append("hit")
            else:
                t0 = time.time()
                run = runner(Path(path), tasks, include_path=include, device=suite.device,
                             batch_size=suite.batch_size, limit=limit, seed=seed, log_samples=True)
                runs += 1
                info[name]["cache"].append("miss")
                if cache:
                    cache.put(key, run, {"model": mhash, "model_name": name, "tasks": tasks,
                                         "task_fingerprint": task_fp, "lm_eval": version, "limit": limit,
                                         "seed": seed, "device": suite.device, "seconds": round(time.time() - t0, 2),
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            if log:
                log(f"  {name:<16} seed {seed}: {info[name]['cache'][-1]}")
            score_frames.append(_tag(run.scores, name, roles[name], seed))
            sample_frames.append(_tag(run.samples, name, roles[name], seed))
            for t, kind in task_types_from_config(run.config).items():
                task_types.setdefault(t, kind)

    scores = pd.concat(score_frames, ignore_index=True) if score_frames else pd.DataFrame(columns=SCORE_COLUMNS)
    samples = pd.concat(sample_frames, ignore_index=True) if sample_frames else pd.DataFrame(columns=SAMPLE_COLUMNS)
    missing = sorted(set(tasks) - set(scores.loc[scores["primary"].astype(bool), "task"])) if len(scores) else tasks
    if missing:
        raise RuntimeError(f"lm-eval returned no primary score for task(s) {missing}")
    table = ScoreTable(scores=scores, samples=samples, models=info, runs=runs, lm_eval_version=version,
                       task_types={t: task_types.get(t, "unknown") for t in tasks})
    return restrict(table, suite)  # only the scored part's items when the suite has splits


def task_types_from_config(config: dict) -> dict[str, str]:
    """Find `output_type` per task in the runner's config dict, wherever it is nested."""
    found: dict[str, str] = {}

    def walk(node, key=None):
        if isinstance(node, dict):
            out_type = node.get("output_type")
            name = node.get("task", key)
            if isinstance(out_type, str) and isinstance(name, str):
                found.setdefault(name, _OUTPUT_TYPES.get(out_type, "unknown"))
            for k, v in node.items():
                walk(v, k)

    walk(config or {})
    return found


def _tag(df: pd.DataFrame, name: str, role: str, seed: int) -> pd.DataFrame:
    df = df.copy()
    df.insert(0, "model", name)
    df.insert(1, "role", role)
    df["seed"] = seed
    return df


if __name__ == "__main__":
    from mergeline.evaluation.suite import load_suite
    s = load_suite(sys.argv[1])
    table = evaluate_models(s, dict(a.split("=", 1) for a in sys.argv[2:]), cache_dir=None)
    print(table.primary().pivot(index="task", columns="model", values="value").round(3).to_string())
