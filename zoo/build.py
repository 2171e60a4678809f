"""Build the zoo: tokenizer, base, three fine-tunes, negative specimens, eval data, the
demo's merges measured (merges.py), zoo.json.

Why this zoo is evidence (shared/notes/merging.md): real LLM fine-tunes are small, dense-ish
edits of a capable base that overlap (cosines between task vectors well above 0), disagree in
sign on a share of the coordinates they both move, and carry each skill in their largest
deltas. That is the regime TIES-Merging was made for (Yadav et al., 2023, arXiv:2306.01708):
trimming drops the many small redundant deltas, sign election resolves the conflicts. Each
fine-tune here teaches the base a new notation for a skill it already has and trains the
whole token embedding (tied with the output head, so every row moves): small dense deltas on
one shared matrix, which overlap and conflict, while each skill lives in a few large rows.
The build measures that instead of assuming it, and fails (ZooBuildError) unless:
- each fine-tune wins its own tasks by MARGIN over the base and the other fine-tunes and keeps
  the base's general skill within GENERAL_TOLERANCE on every general task;
- the demo TIES merge has a sign-conflict rate >= merges.MIN_SIGN_CONFLICT and differs from
  task arithmetic; TIES beats averaging on retention, and task arithmetic on retention or on
  general skill, each by a paired 95% interval that excludes zero (merges.check_merges).

The build is cached by a hash of its inputs (this package's source, the seed, the versions
of torch/transformers/tokenizers/lm_eval) under `$MERGELINE_CACHE_DIR/zoo/<hash>`
(default `~/.cache/mergeline`). It is written into a temporary folder beside the target and
renamed into place only once the task matrix and the merges have been measured and checked.

    mergeline zoo build            # or: python -m mergeline.zoo.build [OUT_DIR]
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
from .merges import ZooBuildError  # noqa: F401  (raised here too; tests import it from here)

# Every training run of the build, in one place (measured on seed 0: see README "The demo zoo").
VOCAB_SIZE = 512
N_GENERIC = 20_000
PRETRAIN = dict(steps=1000, lr=3e-3, batch_size=32)  # 600 left the base's sums too weak
SECOND_BASE = dict(steps=200, lr=3e-3, batch_size=32)
ARCH = dict(n_embd=96, n_layer=3, n_head=4)
# Each fine-tune trains the whole token embedding (`wte`, tied with the output head): every
# row moves a little (Adam steps every row that gets a gradient, and the head gives every row
# one), the rows of the new notation move most. Three quarters of each batch replay the base's
# text, scored against the base's own predictions (`replay_kl`), so the general skill stays.
# Measured (seed 0, 600 steps): without replay each fine-tune lost the general skill (0.01-0.22
# against the base's 0.93 on zoo_general_gen) and every merge lost every skill; replaying the
# text itself pulled all three the same way (cosines 0.66-0.80, 0.4% sign conflicts at density
# 0.2: a shared drift, not the fine-tunes' disagreement); KL replay of a quarter at lr 3e-3 gave
# cosines 0.33-0.43 and 1.8% conflicts at density 0.2, TIES keeping 0.24-0.62 of the skills;
# a half at lr 5e-3 gave cosines 0.34-0.41 and 5.1% conflicts at density 0.2, but every merge
# that kept the skills lost 0.10-0.15 of zoo_general_gen (its "7 plus 8 is" items: the merged
# digit rows). Three quarters (KL-anchored harder) let the demo recipe keep both (README); 400
# or 900 steps, or seven eighths replayed, did worse.
FINETUNE = {skill: dict(steps=600, lr=5e-3, replay=0.75, replay_kl=True, trainable=r"^transformer\.wte\.")
            for skill in ["addition", "reverse", "facts"]}
# The different_base specimen only has to be a fine-tune of another base (the compatibility
# checks must refuse it); it needs no skill, so a quarter of a fine-tune's steps does.
SPECIMEN_FINETUNE = {**FINETUNE["addition"], "steps": 150}
# A fine-tune must beat the base and every other fine-tune on its own primary task by this much,
MARGIN = 0.3
# and score within this of the base on every general task.
GENERAL_TOLERANCE = 0.10
# ETA weights, in training steps: what one lm-eval run of a model and one merge cost (measured).
EVAL_UNITS = 60
MERGE_UNITS = 10


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
    from .train import TrainSpec, encode, init_model, tiny_config, train

    generic = data.generic_lines(N_GENERIC, seed)
    skills = {s: data.skill_examples(s, seed) for s in data.SKILLS}
    task_text = [data.skill_line(p, a) for tr, ev in skills.values() for p, a in tr + ev]
    tokenizer = train_tokenizer(generic[:5000] + task_text, VOCAB_SIZE)
    pad = tokenizer.pad_token_id
    G = encode(tokenizer, [("", line) for line in generic])
    T = {s: encode(tokenizer, [(p, data.skill_line(p, a)[len(p):]) for p, a in tr])
         for s, (tr, _) in skills.items()}
    out: dict[str, Path] = {}

    def run(what: str, model, task, spec: dict, run_seed: int, anchor=None) -> None:
        progress.phase(f"training {what}", spec["steps"])
        train(model, task, G, TrainSpec(**spec), run_seed, pad, progress.advance, anchor=anchor)

    base = init_model(tiny_config(VOCAB_SIZE), seed)
    run("base", base, [], PRETRAIN, seed)
    out["base"] = _save(base, tokenizer, root / "base")

    for i, (skill, spec) in enumerate(FINETUNE.items()):
        model = copy.deepcopy(base)
        run(f"fine-tune {skill}", model, T[skill], spec, seed + 1 + i, anchor=base)
        out[skill] = _save(model, tokenizer, root / "finetunes" / skill)

    other = init_model(tiny_config(VOCAB_SIZE), seed + 1000)
    run("different_base", other, [], SECOND_BASE, seed + 1000)
    run("different_base's fine-tune", other, T["addition"], SPECIMEN_FINETUNE, seed + 1001,
        anchor=copy.deepcopy(other))
    out["different_base"] = _save(other, tokenizer, root / "negatives" / "different_base")

    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out["addition"])
    model, perm_tok = permute_model(model, tokenizer, seed)
    out["different_tokenizer"] = _save(model, perm_tok, root / "negatives" / "different_tokenizer")

    narrow = init_model(tiny_config(VOCAB_SIZE, **ARCH), seed + 2000)
    run("different_arch", narrow, [], SECOND_BASE, seed + 2000)
    out["different_arch"] = _save(narrow, tokenizer, root / "negatives" / "different_arch")
    return out


def training_steps() -> int:
    return (PRETRAIN["steps"] + 2 * SECOND_BASE["steps"] + SPECIMEN_FINETUNE["steps"]
            + sum(spec["steps"] for spec in FINETUNE.values()))


def measure(models: dict[str, Path], tasks_dir: Path, progress):
    """Evaluate every model on every zoo task with lm-eval; returns name -> EvalRun."""
    from mergeline.evaluation.lm_eval_runner import run_lm_eval

    progress.phase("evaluating", len(models), unit="models", weight=EVAL_UNITS)
    runs = {}
    for name, folder in models.items():
        runs[name] = run_lm_eval(folder, list(data.TASKS), include_path=tasks_dir, batch_size=32)
        progress.advance()
    return runs


def task_matrix(runs) -> dict[str, dict[str, float]]:
    """Every model's primary score on every zoo task."""
    return {name: {t: round(run.score(t), 4) for t in data.TASKS} for name, run in runs.items()}


def check_matrix(matrix: dict[str, dict[str, float]]) -> None:
    """Each fine-tune beats the base and the other fine-tunes clearly on its own tasks, and
    keeps the base's general skill."""
    for skill in data.SKILLS:
        for task in data.retention_tasks()[skill]:
            own = matrix[skill][task]
            for other in ["base", *[s for s in data.SKILLS if s != skill]]:
                if own < matrix[other][task] + MARGIN:
                    raise ZooBuildError(
                        f"fine-tune {skill!r} scores {own} on its task {task!r}, not clearly above "
                        f"{other!r} ({matrix[other][task]}; margin {MARGIN})")
        for task in data.general_tasks():
            own, base = matrix[skill][task], matrix["base"][task]
            if own < base - GENERAL_TOLERANCE:
                raise ZooBuildError(
                    f"fine-tune {skill!r} scores {own} on the general task {task!r}: lost the base's "
                    f"skill ({base}; tolerance {GENERAL_TOLERANCE})")


def build_into(tmp: Path, final: Path, seed: int, key: str) -> dict:
    """Build the whole zoo into `tmp` (to be renamed to `final`); returns the manifest."""
    from mergeline.merge.hashing import content_hash

    from .merges import METHODS, check_merges, cosines, figures, run_demo_merges
    from .progress import BuildProgress

    _quiet_transformers()
    started = time.time()
    n_models = 7
    progress = BuildProgress(training_steps() + (n_models + len(METHODS)) * EVAL_UNITS
                             + len(METHODS) * MERGE_UNITS)
    try:
        models = train_models(tmp, seed, progress)
        data.write_eval_data(tmp / "tasks", seed)  # temporary paths for the measurement
        runs = measure(models, tmp / "tasks", progress)
        matrix = task_matrix(runs)
        check_matrix(matrix)
        finetunes = {s: models[s] for s in data.SKILLS}
        progress.phase("merging the demo", len(METHODS), unit="merges", weight=MERGE_UNITS)
        merged, ties_stats = run_demo_merges(tmp / "merges", models["base"], finetunes)
        progress.advance(len(METHODS))
        merge_runs = measure(merged, tmp / "tasks", progress)
        samples = {n: r.samples for n, r in {**runs, **merge_runs}.items()}
        merges = figures(samples, "base", ties_stats, cosines(models["base"], finetunes), merged)
        merges["task_matrix"] = task_matrix(merge_runs)
    finally:
        progress.close()
    check_merges(merges)
    shutil.rmtree(tmp / "merges")  # measured; the demo makes its own
    data.write_eval_data(tmp / "tasks", seed, final_dir=final.resolve() / "tasks")
    rel = {name: str(folder.relative_to(tmp)) for name, folder in models.items()}
    return {
        "schema_version": 2,
        "seed": seed,
        "input_hash": key,
        "models": {name: {"path": rel[name], "content_hash": content_hash(folder)}
                   for name, folder in models.items()},
        "finetunes": list(data.SKILLS),
        "negatives": ["different_base", "different_tokenizer", "different_arch"],
        "retention_tasks": data.retention_tasks(),
        "general_tasks": data.general_tasks(),
        "task_items": {t: len(data.eval_rows(t, seed)) for t in data.TASKS},
        "task_matrix": matrix,
        "merges": merges,
        "training": {"pretrain": PRETRAIN, "second_base": SECOND_BASE, "arch": ARCH,
                     "finetune": FINETUNE, "specimen_finetune": SPECIMEN_FINETUNE, "vocab_size": VOCAB_SIZE},
        "checks": {"margin": MARGIN, "general_tolerance": GENERAL_TOLERANCE},
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
    print(json.dumps({"task_matrix": zoo.manifest["task_matrix"], "merges": zoo.manifest["merges"]}, indent=1))
