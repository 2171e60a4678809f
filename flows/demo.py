"""`mergeline demo`: the whole pipeline on the built-in zoo, from nothing to a decision.

Builds (or reuses, from the machine-wide cache) the tiny zoo of genuine fine-tunes
(zoo), fills the zoo's folders into configs/pipeline_demo.yaml, writes that pipeline,
its recipe, suite and policies with absolute paths into the workdir (so the run can be repeated
with `mergeline run WORKDIR/pipeline.yaml`), and runs it: compatibility check, TIES and the
baselines, lm-eval, gate, MLflow registry.

    mergeline demo                      # workdir mergeline-runs/demo
    mergeline demo --nogo               # its own workdir, mergeline-runs/demo-nogo
    mergeline zoo recipes recipes/      # configs/recipes/ with the zoo's folders filled in
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import yaml

from mergeline.configs import DIR
from mergeline.flows.pipeline_config import fill

CONFIGS = DIR


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
    once beside the zoo's folder as `<zoo>.smoke-<lines>.txt` (the zoo folder itself is left
    untouched: its content hash is its identity)."""
    import os
    import tempfile

    from mergeline.zoo.build import N_GENERIC
    from mergeline.zoo.data import generic_lines

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


def default_workdir(nogo: bool = False) -> Path:
    """Each shipped pipeline has its own workdir: a NO-GO demo never touches the GO demo's."""
    return Path("mergeline-runs") / ("demo-nogo" if nogo else "demo")


def zoo_or_build(zoo_dir: str | Path | None = None):
    """The zoo at `zoo_dir`, else the cached one, built (and said so) on a machine's first run."""
    from mergeline.zoo import build_zoo, load_zoo
    from mergeline.flows.progress import say

    if zoo_dir:
        return load_zoo(zoo_dir)
    start = time.monotonic()
    say("zoo: reusing the cached zoo, or building it (first run on this machine: ~2-3 min on 2 cores)")
    zoo = build_zoo()
    say(f"zoo: ready in {time.monotonic() - start:.0f} s ({zoo.root})")
    return zoo


# The example recipes name models/base and three fine-tunes; the zoo's fine-tunes stand in.
_EXAMPLE_MODELS = re.compile(r"\bmodels/(base|ft_a|ft_b|ft_c)\b(?!\+)")


def write_zoo_recipes(zoo, out_dir: str | Path, overwrite: bool = False) -> tuple[list[Path], dict[str, str]]:
    """configs/recipes/*.yaml with `models/base`, `models/ft_a|b|c` replaced by the zoo's base and
    fine-tunes (in the zoo's order); recipes that need something the zoo lacks are skipped."""
    out_dir = Path(out_dir)
    folders = {"base": zoo.base, **dict(zip(("ft_a", "ft_b", "ft_c"), zoo.finetunes.values()))}
    written, skipped = [], {}
    for src in sorted((CONFIGS / "recipes").glob("*.yaml")):
        text = src.read_text(encoding="utf-8")
        if "+models/" in text:
            skipped[src.name] = "needs LoRA adapters (models/lora_a, models/lora_b), which the zoo has none of"
            continue
        target = out_dir / src.name
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists (pass --overwrite to replace)")
        written.append((target, _EXAMPLE_MODELS.sub(lambda m: str(folders[m.group(1)]), text)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for target, text in written:
        target.write_text(text, encoding="utf-8")
    return [t for t, _ in written], skipped


def run_demo(workdir: str | Path | None = None, overwrite: bool = False,
             nogo: bool = False, zoo_dir: str | Path | None = None) -> dict:
    """Build/reuse the zoo, write the demo pipeline into `workdir`, run it; the run's summary."""
    from mergeline.flows.pipeline import run_pipeline
    from mergeline.flows.servers import default_environment
    from mergeline.flows.workdir import workdir_lock

    default_environment()
    work = Path(workdir) if workdir else default_workdir(nogo)
    with workdir_lock(work):  # before writing pipeline.yaml: a running demo's files stay its own
        zoo = zoo_or_build(zoo_dir)
        template = CONFIGS / ("pipeline_nogo.yaml" if nogo else "pipeline_demo.yaml")
        path = write_pipeline(template, work, zoo_values(zoo))
        summary = run_pipeline(path, refresh=overwrite)
    summary["pipeline"] = str(path)
    return summary
