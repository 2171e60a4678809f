"""Evaluate one model folder with lm-eval, offline, and return pandas frames.

Scores and per-sample rows come back as tidy frames so metrics, caches and reports never
touch lm-eval's nested result dicts. Local task YAMLs are found through `include_path` (one
folder or a list of folders); built-in task names work too (then lm-eval indexes its own tasks, about 12 s more).

    python -m mergeline.evaluation.lm_eval_runner MODEL_DIR TASK [TASK ...] --include-path DIR
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mergeline.merge.resolve import split_adapter

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SCORE_COLUMNS = ["task", "metric", "value", "primary"]
SAMPLE_COLUMNS = ["task", "doc_id", "correct", "target", "response"]
# Metrics that decide "did the model get this item right", in order of preference.
PRIMARY_METRICS = ("exact_match", "acc", "acc_norm", "f1", "bleu")
NOT_METRICS = {"alias", "sample_len", "sample_count", "samples"}  # bookkeeping in `results`


@dataclass
class EvalRun:
    model_dir: Path
    scores: pd.DataFrame  # task, metric, value, primary
    samples: pd.DataFrame  # task, doc_id, correct, target, response
    config: dict = field(default_factory=dict)  # task configs + lm_eval version (cache keys)

    def score(self, task: str) -> float:
        """The primary metric of `task`."""
        row = self.scores[(self.scores.task == task) & self.scores.primary]
        if row.empty:
            raise KeyError(f"task {task!r} not in this run; have {sorted(set(self.scores.task))}")
        return float(row.value.iloc[0])


def _offline_env() -> None:
    # lm-eval, datasets and transformers read these at import time: set before importing.
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    if "HF_DATASETS_CACHE" not in os.environ:
        os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mergeline-hf-datasets-")


def include_paths(include_path: str | Path | list[str | Path] | None) -> list[str] | None:
    """One folder or several, as the list of strings lm-eval's TaskManager takes."""
    if not include_path:
        return None
    items = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    return [str(p) for p in items]


def task_manager(tasks: list[str], include_path: str | Path | list[str | Path] | None):
    """Index only the local YAMLs when they define every requested task (skips ~12 s of
    indexing lm-eval's built-ins); otherwise fall back to the built-ins as well."""
    from lm_eval.tasks import TaskManager

    paths = include_paths(include_path)
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=paths, include_defaults=True)


def _primary(metrics: list[str]) -> str | None:
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    return metrics[0] if metrics else None


def scores_frame(results: dict) -> pd.DataFrame:
    """lm-eval `results` -> one row per (task, metric), stderr entries dropped."""
    rows = []
    for task, entries in results.items():
        metrics = {}
        for key, value in entries.items():
            if key in NOT_METRICS or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metrics[key.split(",")[0]] = float(value)
        primary = _primary(list(metrics))
        rows += [{"task": task, "metric": m, "value": v, "primary": m == primary}
                 for m, v in metrics.items()]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def _response(sample: dict):
    resp = sample.get("filtered_resps")
    if isinstance(resp, list) and len(resp) == 1 and isinstance(resp[0], str):
        return resp[0]
    if isinstance(resp, list) and resp and isinstance(resp[0], (list, tuple)):
        # multiple choice: (loglik, is_greedy) per choice -> index of the best choice
        lls = [float(r[0]) for r in resp]
        return int(max(range(len(lls)), key=lls.__getitem__))
    return str(resp)


def samples_frame(samples: dict, scores: pd.DataFrame) -> pd.DataFrame:
    """lm-eval per-sample logs -> task, doc_id, correct (the primary metric), target, response."""
    rows = []
    for task, items in samples.items():
        primary = scores[(scores.task == task) & scores.primary].metric
        metric = primary.iloc[0] if not primary.empty else None
        for s in items:
            value = s.get(metric) if metric else None
            correct = float(value) if isinstance(value, (int, float, bool)) else math.nan
            rows.append({"task": task, "doc_id": int(s["doc_id"]), "correct": correct,
                         "target": str(s.get("target")), "response": str(_response(s))})
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def run_lm_eval(model_dir, tasks: list[str], include_path=None, device: str = "cpu",
                batch_size: int = 16, limit: int | float | None = None, seed: int = 0,
                log_samples: bool = True) -> EvalRun:
    """Evaluate `model_dir` (a Hugging Face folder, or `BASE+ADAPTER`: a PEFT LoRA adapter on
    its base, run by lm-eval's own `peft=` model argument) on lm-eval `tasks`, offline."""
    base, adapter = split_adapter(str(model_dir))
    model_args = {"pretrained": base, "dtype": "float32", **({"peft": adapter} if adapter else {})}
    model_dir = Path(model_dir)
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{base}: not a model folder (no config.json)")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    if not tasks:
        raise ValueError("run_lm_eval: no tasks given")
    _offline_env()
    import lm_eval
    from lm_eval import evaluator

    tm = task_manager(list(tasks), include_path)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise KeyError(f"unknown lm-eval task(s) {missing} (include_path={include_path})")
    res = evaluator.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks), task_manager=tm, device=device, batch_size=batch_size,
        limit=limit, log_samples=log_samples, bootstrap_iters=0,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    scores = scores_frame({t: res["results"][t] for t in tasks if t in res["results"]})
    samples = samples_frame(res.get("samples", {}), scores) if log_samples else \
        pd.DataFrame(columns=SAMPLE_COLUMNS)
    config = {"lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
              "tasks": {t: res["configs"].get(t) for t in tasks},
              "limit": limit, "seed": seed}
    return EvalRun(model_dir=model_dir, scores=scores, samples=samples, config=config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--include-path", action="append", help="a folder of task YAMLs (repeatable)")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    run = run_lm_eval(args.model_dir, args.tasks, include_path=args.include_path, limit=args.limit)
    print(run.scores.to_string(index=False))


if __name__ == "__main__":
    main()
