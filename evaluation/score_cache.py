"""A file cache of lm-eval results, so an unchanged base or fine-tune is never evaluated twice.

The key is everything that decides a score:
  - the model's content hash (`merge.hashing.content_hash`: weights, config, tokenizer bytes),
  - the task configuration: the task names plus the bytes of every file under the suite's
    include paths (task YAMLs and their data; built-in tasks are fixed by the lm-eval version),
  - the lm-eval version, and the run settings that change results (limit, seed, device).
Batch size is left out on purpose: it changes speed, not which answers a model gives.

Layout: `<cache_dir>/<key>/{scores.json, samples.json, config.json, meta.json}`, written to a
temporary folder beside it and renamed into place, so a killed run never leaves half an entry.

    python -m mergeline.evaluation.score_cache CACHE_DIR      # list entries
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd

from mergeline.merge.hashing import text_hash

CACHE_FORMAT = 1


@dataclass
class CachedRun:
    """Same fields as the runner's EvalRun: scores, samples (DataFrames) and config (dict)."""
    scores: pd.DataFrame
    samples: pd.DataFrame
    config: dict = field(default_factory=dict)


def lm_eval_version() -> str:
    # From the installed metadata: importing lm_eval itself costs ~2 s.
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "not-installed"


def task_fingerprint(tasks: list[str], include_paths: list[str | Path]) -> str:
    """Hash of the task names and of every file under the include paths (names and bytes)."""
    parts = [json.dumps(sorted(tasks))]
    for root in include_paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            if "__pycache__" in p.parts:
                continue
            rel = p.relative_to(root) if root.is_dir() else Path(p.name)
            parts.append(f"{rel}:{text_hash(p.read_bytes())}")
    return text_hash("\n".join(parts))


def cache_key(model_hash: str, task_fp: str, *, limit: int | None, seed: int, device: str,
              version: str | None = None) -> str:
    payload = {
        "format": CACHE_FORMAT, "model": model_hash, "tasks": task_fp,
        "lm_eval": version or lm_eval_version(), "limit": limit, "seed": seed, "device": device,
    }
    return text_hash(json.dumps(payload, sort_keys=True)).split(":", 1)[1][:32]


class ScoreCache:
    """get(key) -> CachedRun | None; put(key, run, meta) stores it atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> CachedRun | None:
        d = self.path(key)
        if not (d / "meta.json").is_file():
            return None
        try:
            scores = pd.DataFrame.from_records(json.loads((d / "scores.json").read_text()))
            samples = pd.DataFrame.from_records(json.loads((d / "samples.json").read_text()))
            config = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            return None  # a damaged entry is a miss, not an error: it will be rewritten
        return CachedRun(scores=scores, samples=samples, config=config)

    def put(self, key: str, run, meta: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            _dump(tmp / "scores.json", _records(run.scores))
            _dump(tmp / "samples.json", _records(run.samples))
            _dump(tmp / "config.json", run.config)
            _dump(tmp / "meta.json", meta)  # written last: its presence marks a complete entry
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def entries(self) -> list[dict]:
        out = []
        for d in sorted(self.root.glob("*/meta.json")):
            out.append({"key": d.parent.name, **json.loads(d.read_text())})
        return out


def _records(df: pd.DataFrame | None) -> list[dict]:
    # Not DataFrame.to_json: it rounds floats to 10 significant digits (at most 15), so a
    # cached score would differ from the fresh one (0.1666666667 vs 1/6). json writes every
    # float with repr, which reads back bit for bit.
    if df is None or len(df) == 0:
        return []
    return df.to_dict(orient="records")


def _plain(obj):
    """json's fallback: numpy values as Python ones, anything else (timestamps) as text."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=_plain, sort_keys=True))


if __name__ == "__main__":
    for e in ScoreCache(sys.argv[1]).entries():
        print(e["key"], e.get("model"), e.get("tasks"), e.get("created"))
