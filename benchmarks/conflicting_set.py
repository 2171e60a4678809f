"""A set of conflicting fine-tunes for the tuning benchmark: the zoo's base fine-tuned on the
same three skills, but in every transformer block instead of the token embedding.

Why this set (the demo zoo's opposite; shared/notes/merging.md): most LLM fine-tunes, full or
LoRA, train the attention and MLP weights of every block and leave the embeddings alone. Each
task vector is then dense in every layer, the three overlap on the same matrices, and each
skill is carried by weights the other skills also need: the regime where merges interfere
(merging.md measured full fine-tunes of a tiny GPT-2 losing their skills in every merge). The
demo zoo trains only the tied embedding, where a skill lives in its own rows, so merges keep it
and a sign search over layer groups has nothing to choose. Here every layer group holds all
three fine-tunes' deltas, so choosing a group's signs (TIES sec. 7, flows/sign_search.py) and
tuning densities and weights both have room, and the benchmark can show whether they help on
held-out items. The set is measured, not assumed: the build fails (ZooBuildError) unless

- each fine-tune wins its own tasks and keeps the base's general skill (zoo/build.py's
  check_matrix, the zoo's own thresholds), and
- the demo recipe's TIES merge of the set interferes: a sign-conflict rate of at least
  zoo/merges.MIN_SIGN_CONFLICT in every layer, and mean retention under MAX_RETENTION.

The models are the zoo's base and tokenizer, so the zoo's lm-eval tasks score them. Built once
per machine (about 2 minutes on 2 cores), cached by a hash of the zoo's inputs and this file
under `$MERGELINE_CACHE_DIR/conflicting/<hash>`, staged in a temporary folder and renamed into
place when measured.

    python benchmarks/conflicting_set.py        # build or reuse; print the folder and its figures
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

# Measured on seed 0 (this machine, 2026-11-28): 400 steps at lr 1e-3 with half of each batch
# replayed against the base (KL) give each fine-tune 1.00 on its own task and the base's
# general skill within 0.04; the demo recipe's TIES merge keeps 0.22-0.39 of the skills.
FINETUNE = dict(steps=400, lr=1e-3, replay=0.5, replay_kl=True, trainable=r"^transformer\.h\.")
MAX_RETENTION = 0.6  # a merge keeping more than this of the skills on average does not conflict


def input_hash(zoo, spec: dict) -> str:
    h = hashlib.sha256()
    h.update(zoo.manifest["input_hash"].encode() + b"\0" + Path(__file__).read_bytes())
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:16]


def build_set(zoo, spec: dict | None = None, out_dir: Path | None = None) -> Path:
    """The conflicting set's folder (holding base-relative fine-tunes `<skill>/` and `set.json`),
    built if missing. `spec` replaces FINETUNE (tests); `out_dir` the cache folder."""
    from mergeline.zoo.build import cache_root

    spec = spec or FINETUNE
    final = Path(out_dir) if out_dir else cache_root() / "conflicting" / input_hash(zoo, spec)
    if (final / "set.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        manifest = _build_into(zoo, spec, tmp)
        (tmp / "set.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same build first
            if not (final / "set.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def finetunes(folder: Path) -> dict[str, Path]:
    """skill -> fine-tune folder of a built set."""
    manifest = json.loads((Path(folder) / "set.json").read_text())
    return {s: Path(folder) / s for s in manifest["finetunes"]}


def _build_into(zoo, spec: dict, root: Path) -> dict:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from mergeline.zoo import data
    from mergeline.zoo.build import N_GENERIC, _quiet_transformers, _save, check_matrix, measure, task_matrix
    from mergeline.zoo.merges import METHODS, cosines, figures, run_demo_merges
    from mergeline.zoo.progress import BuildProgress
    from mergeline.zoo.train import TrainSpec, encode, train

    _quiet_transformers()
    started, seed = time.time(), zoo.manifest["seed"]
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    generic = encode(tokenizer, [("", line) for line in data.generic_lines(N_GENERIC, seed)])
    base = GPT2LMHeadModel.from_pretrained(zoo.base)
    progress = BuildProgress(len(data.SKILLS) * spec["steps"] + 70 * (1 + len(data.SKILLS) + len(METHODS)))
    models = {"base": zoo.base}
    try:
        for i, skill in enumerate(data.SKILLS):  # the zoo's seeds: the same data order per skill
            train_pairs, _ = data.skill_examples(skill, seed)
            task = encode(tokenizer, [(p, data.skill_line(p, a)[len(p):]) for p, a in train_pairs])
            model = copy.deepcopy(base)
            progress.phase(f"training {skill} (every block)", spec["steps"])
            train(model, task, generic, TrainSpec(**spec), seed + 1 + i, tokenizer.pad_token_id,
                  progress.advance, anchor=base)
            models[skill] = _save(model, tokenizer, root / skill)
        runs = measure(models, zoo.tasks_dir, progress)
        check_matrix(task_matrix(runs))
        fts = {s: models[s] for s in data.SKILLS}
        merged, ties_stats = run_demo_merges(root / "merges", zoo.base, fts)
        merge_runs = measure(merged, zoo.tasks_dir, progress)
    finally:
        progress.close()
    samples = {n: r.samples for n, r in {**runs, **merge_runs}.items()}
    fig = figures(samples, "base", ties_stats, cosines(zoo.base, fts), merged)
    fig["sign_conflict_by_layer"] = _conflict_by_layer(root / "merges" / "ties")
    shutil.rmtree(root / "merges")
    check_conflicting(fig)
    return {"finetunes": list(data.SKILLS), "finetune": spec, "zoo": str(zoo.root),
            "task_matrix": {**task_matrix(runs), **task_matrix(merge_runs)}, "merges": fig,
            "build_seconds": round(time.time() - started, 1)}


def _conflict_by_layer(merged: Path) -> dict[str, float]:
    """The TIES merge's sign-conflict rate per transformer block (merge_stats.json; the
    embedding and other tensors, which no fine-tune here moves, have no rate)."""
    stats = json.loads((merged / "merge_stats.json").read_text())
    return {k: round(r, 4) for k, r in stats["sign_conflict"]["per_layer"].items() if k.isdigit() and r is not None}


def check_conflicting(fig: dict) -> None:
    """The set interferes where a sign search looks: conflicts in every layer, and the demo
    recipe's TIES merge loses much of the skills (ZooBuildError naming the figure)."""
    from mergeline.zoo.merges import MIN_SIGN_CONFLICT, ZooBuildError

    low = {k: r for k, r in fig["sign_conflict_by_layer"].items() if r < MIN_SIGN_CONFLICT}
    if not fig["sign_conflict_by_layer"] or low:
        raise ZooBuildError(f"conflicting set: sign-conflict rate under {MIN_SIGN_CONFLICT} in layers {low}: "
                            "the fine-tunes do not disagree there")
    kept = fig["methods"]["ties"]["mean_retention"]
    if kept is None or kept >= MAX_RETENTION:
        raise ZooBuildError(f"conflicting set: the demo TIES merge keeps mean retention {kept} >= "
                            f"{MAX_RETENTION}: the fine-tunes do not interfere")


if __name__ == "__main__":
    from mergeline.zoo import build_zoo

    folder = build_set(build_zoo())
    manifest = json.loads((folder / "set.json").read_text())
    print(folder)
    print(json.dumps({k: manifest["merges"][k] for k in ("sign_conflict_rate", "sign_conflict_by_layer",
                                                         "dropped_by_election", "cosine")}, indent=1))
    print(json.dumps({m: v["mean_retention"] for m, v in manifest["merges"]["methods"].items()}))
