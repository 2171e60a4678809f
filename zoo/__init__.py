"""The tiny zoo: a base GPT-2 (~0.9M parameters), three genuine fine-tunes of it (addition,
reverse, facts), three negative specimens, and lm-eval tasks for all of it.

    from mergeline.zoo import build_zoo
    zoo = build_zoo()            # cached per machine; ~minutes on 2 cores the first time
    zoo.finetunes["addition"], zoo.tasks_dir, zoo.manifest["task_matrix"]

    mergeline zoo build [DIR]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import data


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    finetunes: dict[str, Path]  # skill -> HF folder
    negatives: dict[str, Path]  # "different_base" | "different_tokenizer" | "different_arch" -> folder
    tasks_dir: Path  # lm-eval include path
    retention_tasks: dict[str, list[str]]  # fine-tune name -> its lm-eval task names
    general_tasks: list[str]
    manifest: dict  # zoo.json

    @property
    def models(self) -> dict[str, Path]:
        """Every model by name: base, fine-tunes, negatives."""
        return {"base": self.base, **self.finetunes, **self.negatives}

    @property
    def tasks(self) -> list[str]:
        return [t for ts in self.retention_tasks.values() for t in ts] + list(self.general_tasks)


def load_zoo(root: str | Path) -> Zoo:
    """Open a built zoo folder (one holding zoo.json)."""
    root = Path(root)
    path = root / "zoo.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no zoo.json; build one with `mergeline zoo build`")
    manifest = json.loads(path.read_text())
    models = {name: root / m["path"] for name, m in manifest["models"].items()}
    for name, folder in models.items():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: model {name!r} missing at {folder}")
    tasks_dir = root / "tasks"
    _repoint_tasks(tasks_dir, manifest["seed"])
    return Zoo(root=root, base=models["base"],
               finetunes={s: models[s] for s in manifest["finetunes"]},
               negatives={n: models[n] for n in manifest["negatives"]},
               tasks_dir=tasks_dir, retention_tasks=manifest["retention_tasks"],
               general_tasks=manifest["general_tasks"], manifest=manifest)


def _repoint_tasks(tasks_dir: Path, seed: int) -> None:
    """Task YAMLs hold absolute data paths; rewrite them if the zoo folder was moved."""
    for task in data.TASKS:
        yml = tasks_dir / f"{task}.yaml"
        want = str((tasks_dir / f"{task}.jsonl").resolve())
        if yml.is_file() and want not in yml.read_text():
            data.write_eval_data(tasks_dir, seed)
            return


def build_zoo(out_dir: str | Path | None = None, seed: int = 0, force: bool = False) -> Zoo:
    """Build the zoo (or reuse the cached build with the same inputs) and open it."""
    from .build import build

    return load_zoo(build(Path(out_dir) if out_dir is not None else None, seed, force))
