"""Build the zoo: tokenizer, base, three fine-tunes, negative specimens, eval data, zoo.json.

The build is cached by a hash of its inputs (this package's source, the seed, the versions
of torch/transformers/tokenizers/lm_eval) under `$MERGELINE_CACHE_DIR/zoo/<hash>`
(default `~/.cache/mergeline`). It is written into a temporary folder beside the target and
renamed into place only once the task matrix has been measured and checked.

    mergeline zoo build            # or: python -m evaluation.zoo.build [OUT_DIR]
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import data

# Every training run of the build, in one place. Measured on this build (seed 0): each
# fine-tune wins its own task, and a TIES merge of the three keeps each skill while plain
# averaging loses them (see train.py for why).
VOCAB_SIZE = 512
N_GENERIC = 20_000
PRETRAIN = dict(steps=1000, lr=3e-3, batch_size=32)  # 600 left the base's sums too weak
SECOND_BASE = dict(steps=200, lr=3e-3, batch_size=32)
ARCH = dict(n_embd=96, n_layer=3, n_head=4)
# Each fine-tune trains only the embedding rows of its own notation's tokens (train.py,
# `exclusive_rows`); a high learning rate because only a handful of rows move.
FINETUNE = {skill: dict(steps=400, lr=3e-2, replay=0.25, trainable="wte")
            for skill in ["addition", "reverse", "facts"]}
# A fine-tune must beat the base and every other fine-tune on its own primary task by this much.
MARGIN = 0.3


class ZooBuildError(RuntimeError):
    """The built models do not have the promised properties; the message names model and task."""


def cache_root() -> Path:
    return Path(os.environ.get("MERGELINE_CACHE_DIR") or Path.home() / ".cache" / "mergeline")


def input_hash(seed: int) -> str:
    import lm_eval
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    versions = [torch.__version__, transformers.__version__, tokenizers.__version__,
                getattr(lm_eval, "__version__", "?")]
    h.update(json.dumps({"seed": seed, "versions": versions}).encode())
    return h.hexdigest()[:16]


def _save(model, tokenizer, folder: Path) -> Path:
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     do_sample=False).save_pretrained(folder)
    return folder


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def train_models(root: Path, seed: int, progress) -> dict[str, Path]:
    """Train every model of the zoo into `root`; returns name -> folder."""
    import copy

    from .specimens import permute_model
    from .tokenizer import train_tokenizer
    from .train import TrainSpec, encode, exclusive_rows, init_model, tiny_config, train

    generic = data.generic_lines(N_GENERIC, seed)
    skills = {s: data.skill_examples(s, seed) for s in data.SKILLS}
    task_text = [data.skill_line(p, a) for tr, ev in skills.values() for p, a in tr + ev]
    tokenizer = train_tokenizer(generic[:5000] + task_text, VOCAB_SIZE)
    pad = tokenizer.pad_token_id
    G = encode(tokenizer, [("", line) for line in generic])
    T = {s: encode(tokenizer, [(p, data.skill_line(p, a)[len(p):]) for p, a in tr])
         for s, (tr, _) in skills.items()}
    rows = exclusive_rows(T, G, {pad, tokenizer.eos_token_id})

    total = (PRETRAIN["steps"] + SECOND_BASE["steps"] * 2 + FINETUNE["addition"]["steps"]
             + sum(spec["steps"] for spec in FINETUNE.values()))
    bar = progress.add_task("training", total=total)
    step = lambda n: progress.advance(bar, n)  # noqa: E731
    out: dict[str, Path] = {}

    def describe(what: str) -> None:
        progress.update(bar, description=f"training {what}")

    describe("base")
    base = init_model(tiny_config(VOCAB_SIZE), seed)
    train(base, [], G, TrainSpec(**PRETRAIN), seed, pad, step)
    out["base"] = _save(base, tokenizer, root / "base")

    for i, (skill, spec) in enumerate(FINETUNE.items()):
        describe(f"fine-tune {skill}")
        model = copy.deepcopy(base)
        train(model, T[skill], G, TrainSpec(**spec), seed + 1 + i, pad, step, rows=rows[skill])
        out[skill] = _save(model, tokenizer, root / "finetunes" / skill)

    describe("different_base")
    other = init_model(tiny_config(VOCAB_SIZE), seed + 1000)
    train(other, [], G, TrainSpec(**SECOND_BASE), seed + 1000, pad, step)
    train(other, T["addition"], G, TrainSpec(**FINETUNE["addition"]), seed + 1001, pad, step,
          rows=rows["addition"])
    out["different_base"] = _save(other, tokenizer, root / "negatives" / "different_base")

    describe("different_tokenizer")
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out["addition"])
    model, perm_tok = permute_model(model, tokenizer, seed)
    out["different_tokenizer"] = _save(model, perm_tok, root / "negatives" / "different_tokenizer")

    describe("different_arch")
    narrow = init_model(tiny_config(VOCAB_SIZE, **ARCH), seed + 2000)
    train(narrow, [], G, TrainSpec(**SECOND_BASE), seed + 2000, pad, step)
    out["different_arch"] = _save(narrow, tokenizer, root / "negatives" / "different_arch")
    return out


def measure(models: dict[str, Path], tasks_dir: Path, progress) -> dict[str, dict[str, float]]:
    """The task matrix: every model's primary score on every zoo task, measured with lm-eval."""
    from evaluation.lm_eval_runner import run_lm_eval

    bar = progress.add_task("evaluating", total=len(models))
    matrix = {}
    for name, folder in models.items():
        progress.update(bar, description=f"evaluating {name}")
        run = run_lm_eval(folder, list(data.TASKS), include_path=tasks_dir, batch_size=32)
        matrix[name] = {t: round(run.score(t), 4) for t in data.TASKS}
        progress.advance(bar)
    return matrix


def check_matrix(matrix: dict[str, dict[str, float]]) -> None:
    """Each fine-tune beats the base and the other fine-tunes clearly on its own tasks."""
    for skill in data.SKILLS:
        for task in data.retention_tasks()[skill]:
            own = matrix[skill][task]
            for other in ["base", *[s for s in data.SKILLS if s != skill]]:
                if own < matrix[other][task] + MARGIN:
                    raise ZooBuildError(
                        f"fine-tune {skill!r} scores {own} on its task {task!r}, not clearly above "
                        f"{other!r} ({matrix[other][task]}; margin {MARGIN})")


def build_into(tmp: Path, final: Path, seed: int, key: str) -> dict:
    """Build the whole zoo into `tmp` (to be renamed to `final`); returns the manifest."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from merge.hashing import content_hash

    _quiet_transformers()
    started = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as progress:
        models = train_models(tmp, seed, progress)
        data.write_eval_data(tmp / "tasks", seed)  # temporary paths for the measurement
        matrix = measure(models, tmp / "tasks", progress)
    check_matrix(matrix)
    data.write_eval_data(tmp / "tasks", seed, final_dir=final.resolve() / "tasks")
    rel = {name: str(folder.relative_to(tmp)) for name, folder in models.items()}
    return {
        "schema_version": 1,
        "seed": seed,
        "input_hash": key,
        "models": {name: {"path": rel[name], "content_hash": content_hash(folder)}
                   for name, folder in models.items()},
        "finetunes": list(data.SKILLS),
        "negatives": ["different_base", "different_tokenizer", "different_arch"],
        "retention_tasks": data.retention_tasks(),
        "general_tasks": data.general_tasks(),
        "task_matrix": matrix,
        "training": {"pretrain": PRETRAIN, "second_base": SECOND_BASE, "arch": ARCH,
                     "finetune": FINETUNE, "vocab_size": VOCAB_SIZE},
        "build_seconds": round(time.time() - started, 1),
    }


def build(out_dir: Path | None, seed: int, force: bool) -> Path:
    """Build (or reuse) the zoo and return its root folder."""
    key = input_hash(seed)
    final = Path(out_dir) if out_dir is not None else cache_root() / "zoo" / key
    manifest_path = final / "zoo.json"
    if final.exists() and not force:
        if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("input_hash") == key:
            return final
        raise FileExistsError(f"{final} exists and is not a zoo built from these inputs "
                              f"(input hash {key}); pass force=True (--force) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        manifest = build_into(tmp, final, seed, key)
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # only reached with force: swap the old zoo out, then delete it
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            shutil.rmtree(old)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same build first; its result is equivalent.
            if not (manifest_path.is_file() and json.loads(manifest_path.read_text())["input_hash"] == key):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    from . import build_zoo

    zoo = build_zoo(Path(sys.argv[1]) if len(sys.argv) > 1 else None, force="--force" in sys.argv)
    print(zoo.root)
    print(json.dumps(zoo.manifest["task_matrix"], indent=1))
