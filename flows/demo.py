"""`mergeline demo`: the whole pipeline on the built-in zoo, from nothing to a decision.

Builds (or reuses, from the machine-wide cache) the tiny zoo of genuine fine-tunes
(evaluation.zoo), fills the zoo's folders into configs/pipeline_demo.yaml, writes that pipeline,
its recipe, suite and policies with absolute paths into the workdir (so the run can be repeated
with `mergeline run WORKDIR/pipeline.yaml`), and runs it: compatibility check, TIES and the
baselines, lm-eval, gate, MLflow registry.

    mergeline demo --workdir mergeline-runs/demo
    mlflow ui --backend-store-uri sqlite:///mergeline-runs/demo/mlflow.db
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flows.pipeline_config import fill

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def zoo_values(zoo) -> dict[str, str]:
    """Placeholder values: ${base}, ${<skill>} per fine-tune, ${<negative>}, ${zoo} (tasks),
    ${smoke_text} (a held-out slice of the zoo's generic text, for the smoke stage)."""
    values = {"base": str(zoo.base), "zoo": str(zoo.tasks_dir), "smoke_text": str(smoke_text(zoo))}
    values.update({k: str(v) for k, v in zoo.finetunes.items()})
    values.update({k: str(v) for k, v in zoo.negatives.items()})
    return values


def smoke_text(zoo, lines: int = 64) -> Path:
    """The `lines` generic sentences drawn right after the base's training text (the same
    generator, seed and stream: the same language, lines the base never trained on), written
    once beside the zoo's cache folder as `<zoo>.smoke.txt` (the zoo folder itself is left
    untouched: its content hash is its identity)."""
    import os
    import tempfile

    from evaluation.zoo.build import N_GENERIC
    from evaluation.zoo.data import generic_lines

    out = zoo.root.parent / f"{zoo.root.name}.smoke-{lines}.txt"
    if not out.is_file():
        text = "".join(generic_lines(N_GENERIC + lines, zoo.manifest["seed"])[N_GENERIC:])
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".smoke-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)  # complete or absent, even with two demos starting at once
    return out


def write_pipeline(template: Path, workdir: Path, values: dict[str, str]) -> Path:
    """The filled-in pipeline with every file it names copied beside it (absolute paths)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(fill(template.read_text(), values))
    data["workdir"] = str(workdir.resolve())
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(data["recipe"], sort_keys=False))
    data["recipe"] = str((workdir / "recipe.yaml").resolve())
    for key in ("eval_suite", "gate_policy", "compat_policy"):
        if isinstance(data.get(key), str):
            src = template.parent / data[key]
            shutil.copyfile(src, workdir / src.name)
            data[key] = str((workdir / src.name).resolve())
    out = workdir / "pipeline.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def run_demo(workdir: str | Path = "mergeline-runs/demo", overwrite: bool = False,
             nogo: bool = False, zoo_dir: str | Path | None = None) -> dict:
    """Build/reuse the zoo, write the demo pipeline into `workdir`, run it; the run's summary."""
    from evaluation.zoo import build_zoo, load_zoo
    from flows.pipeline import run_pipeline
    from flows.servers import default_environment

    default_environment()
    zoo = load_zoo(zoo_dir) if zoo_dir else build_zoo()
    template = CONFIGS / ("pipeline_nogo.yaml" if nogo else "pipeline_demo.yaml")
    path = write_pipeline(template, Path(workdir), zoo_values(zoo))
    summary = run_pipeline(path, refresh=overwrite)
    summary["pipeline"] = str(path)
    return summary
