"""The zoo keeps its promises: fine-tunes that genuinely differ and whose task vectors overlap
and conflict (the regime TIES was made for), a demo merge where TIES wins with intervals that
exclude zero, determinism, negative specimens, a progress line with an ETA."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mergeline.zoo import data, load_zoo
from mergeline.zoo.build import GENERAL_TOLERANCE, MARGIN, check_matrix, ZooBuildError
from mergeline.zoo.merges import DEMO, MIN_SIGN_CONFLICT, check_merges, demo_recipe


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_zoo_layout_and_manifest(zoo):
    from mergeline.merge.hashing import content_hash

    assert set(zoo.finetunes) == {"addition", "reverse", "facts"}
    assert set(zoo.negatives) == {"different_base", "different_tokenizer", "different_arch"}
    for name, folder in zoo.models.items():
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / f).is_file(), f"{name}: {f} missing"
        assert zoo.manifest["models"][name]["content_hash"] == content_hash(folder)
    assert len({zoo.manifest["models"][n]["content_hash"] for n in zoo.models}) == len(zoo.models)
    for task in zoo.tasks:
        yml = (zoo.tasks_dir / f"{task}.yaml").read_text()
        assert str((zoo.tasks_dir / f"{task}.jsonl").resolve()) in yml  # absolute data path
    assert load_zoo(zoo.root).manifest == zoo.manifest


def test_each_finetune_wins_its_own_tasks_in_the_manifest(zoo):
    matrix = zoo.manifest["task_matrix"]
    assert set(matrix) == set(zoo.models)
    for skill, tasks in zoo.retention_tasks.items():
        for task in tasks:
            others = [matrix[m][task] for m in ["base", *zoo.finetunes] if m != skill]
            assert matrix[skill][task] >= max(others) + MARGIN, (skill, task, matrix)
    assert len(zoo.general_tasks) >= 2  # regression measured on two general skills
    for task in zoo.general_tasks:  # the base has a general skill worth regressing on,
        assert matrix["base"][task] >= 0.8
        for skill in zoo.finetunes:  # and every fine-tune keeps it
            assert matrix[skill][task] >= matrix["base"][task] - GENERAL_TOLERANCE, (skill, task)
    for task, n in zoo.manifest["task_items"].items():  # enough items for intervals to separate
        assert n >= 48, (task, n)


def test_task_matrix_remeasured_with_the_runner(zoo):
    from mergeline.evaluation.lm_eval_runner import run_lm_eval

    run = run_lm_eval(zoo.finetunes["addition"], zoo.tasks, include_path=zoo.tasks_dir)
    for task in zoo.tasks:
        assert run.score(task) == pytest.approx(zoo.manifest["task_matrix"]["addition"][task], abs=1e-4)


def test_check_matrix_fails_loudly_naming_model_and_task():
    skills = data.SKILLS
    matrix = {m: {t: 0.0 for t in data.TASKS} for m in ["base", *skills]}
    for s in skills:
        for t in data.retention_tasks()[s]:
            matrix[s][t] = 1.0
    check_matrix(matrix)
    for m in matrix:
        matrix[m]["zoo_general_gen"] = 0.9
    check_matrix(matrix)
    matrix["base"]["zoo_reverse"] = 0.9
    with pytest.raises(ZooBuildError, match="'reverse'.*'zoo_reverse'.*'base'"):
        check_matrix(matrix)
    matrix["base"]["zoo_reverse"] = 0.0
    matrix["facts"]["zoo_general_gen"] = 0.9 - GENERAL_TOLERANCE - 0.01  # lost the general skill
    with pytest.raises(ZooBuildError, match="'facts'.*general task 'zoo_general_gen'"):
        check_matrix(matrix)


def test_same_seed_same_weights_and_different_seed_differs():
    from mergeline.zoo.tokenizer import train_tokenizer
    from mergeline.zoo.train import TrainSpec, encode, init_model, tiny_config, train

    lines = data.generic_lines(200, 0)
    tok = train_tokenizer(lines, 300)
    G = encode(tok, [("", line) for line in lines])
    T = encode(tok, [(p, a) for p, a in data.skill_examples("addition", 0)[0][:20]])

    def run(seed):
        model = init_model(tiny_config(len(tok), n_embd=32, n_layer=2, n_head=2), seed)
        spec = TrainSpec(steps=4, lr=1e-3, batch_size=8, replay=0.5, trainable=r"wte|h\.0\.",
                         task_rows_only=True)
        train(model, T, G, spec, seed, tok.pad_token_id)
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_task_vectors_are_dense_and_overlap(zoo):
    """Each fine-tune moves most entries of the (tied) token embedding a little, the same
    entries as the others: the task vectors overlap, as real LLM fine-tunes do."""
    base = _weights(zoo.base)
    wte = "transformer.wte.weight"
    deltas = {}
    for skill, folder in zoo.finetunes.items():
        ft = _weights(folder)
        deltas[skill] = (ft[wte] - base[wte]).flatten()
        assert (deltas[skill] != 0).float().mean() > 0.5, skill  # dense-ish, not a few rows
        assert all(torch.equal(base[k], ft[k]) for k in base if k != wte), skill  # the rest is the base's
    skills = list(deltas)
    for i, a in enumerate(skills):
        for b in skills[i + 1:]:
            both = (deltas[a] != 0) & (deltas[b] != 0)
            assert both.float().mean() > 0.5, (a, b)  # they move the same coordinates
            cos = torch.nn.functional.cosine_similarity(deltas[a], deltas[b], dim=0).item()
            # only wte moves, so this is the cosine over the whole task vector: as recorded
            assert cos == pytest.approx(zoo.manifest["merges"]["cosine"][f"{a}|{b}"], abs=1e-3)
            assert cos > 0.02, (a, b, cos)  # overlapping, not orthogonal


def test_demo_merge_is_the_regime_ties_was_made_for(zoo):
    m = zoo.manifest["merges"]
    assert m["sign_conflict_rate"] >= MIN_SIGN_CONFLICT
    for skill in zoo.finetunes:  # sign election drops some of every model's kept entries
        assert m["dropped_by_election"][skill] > 0, skill
    assert m["ties_vs_task_arithmetic_max_abs_difference"] > 0
    check_merges(m)  # the build's own check passes on what it recorded


def test_ties_beats_the_baselines_with_intervals_that_exclude_zero(zoo):
    m = zoo.manifest["merges"]
    ties, lin, ta = (m["methods"][k] for k in ("ties", "linear", "task_arithmetic"))
    assert ties["mean_retention"] > lin["mean_retention"]
    assert m["ties_minus"]["linear"]["retention_items"]["low"] > 0
    vs_ta = m["ties_minus"]["task_arithmetic"]
    assert vs_ta["retention_items"]["low"] > 0 or vs_ta["general_items"]["low"] > 0
    # Every figure is recorded with its interval.
    for method in m["methods"].values():
        for row in [*method["retention"].values(), *method["regression"].values()]:
            for iv in row.values():
                if isinstance(iv, dict):
                    assert iv["low"] <= iv["estimate"] <= iv["high"], row


def test_recorded_merge_stats_are_the_engines(zoo, tmp_path):
    """Re-run the demo TIES merge with the engine: the same sign conflicts as recorded."""
    from mergeline.merge.executor import run_merge

    out = run_merge(demo_recipe("ties", zoo.base, zoo.finetunes), tmp_path / "ties", progress=False, device="cpu")
    m = zoo.manifest["merges"]
    assert out.stats["sign_conflict"]["rate"] == pytest.approx(m["sign_conflict_rate"], abs=1e-4)
    for skill in zoo.finetunes:
        assert out.stats["per_model"][skill]["dropped_fraction_of_kept"] == pytest.approx(
            m["dropped_by_election"][skill], abs=1e-4)


def test_demo_pipeline_uses_the_measured_recipe():
    import yaml
    from pathlib import Path

    pipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/pipeline_demo.yaml").read_text())
    recipe = pipe["recipe"]
    assert recipe["merge_method"] == "ties"
    assert recipe["parameters"]["density"] == DEMO["density"]
    assert recipe["parameters"]["lambda"] == DEMO["lambda"]
    assert [mm["parameters"]["weight"] for mm in recipe["models"]] == [DEMO["weight"]] * 3
    per_model = {mm["model"].strip("${}"): mm["parameters"].get("density") for mm in recipe["models"]}
    assert per_model == {s: DEMO["density_per_model"].get(s) for s in ["addition", "reverse", "facts"]}
    assert set(pipe["baselines"]) == {"linear", "task_arithmetic"}


def test_check_merges_fails_loudly_naming_the_figure(zoo):
    import copy

    good = zoo.manifest["merges"]
    bad = copy.deepcopy(good)
    bad["sign_conflict_rate"] = MIN_SIGN_CONFLICT / 2
    with pytest.raises(ZooBuildError, match="sign-conflict rate"):
        check_merges(bad)
    bad = copy.deepcopy(good)
    bad["methods"]["linear"]["mean_retention"] = bad["methods"]["ties"]["mean_retention"] + 0.1
    with pytest.raises(ZooBuildError, match="averaging"):
        check_merges(bad)
    bad = copy.deepcopy(good)
    for k in ("retention_items", "general_items"):
        bad["ties_minus"]["task_arithmetic"][k]["low"] = -0.01
    with pytest.raises(ZooBuildError, match="task_arithmetic"):
        check_merges(bad)
    bad = copy.deepcopy(good)
    bad["ties_vs_task_arithmetic_max_abs_difference"] = 0.0
    with pytest.raises(ZooBuildError, match="identical"):
        check_merges(bad)


def test_progress_prints_plain_lines_with_an_eta_off_a_terminal():
    import io
    import re

    from mergeline.zoo.progress import BuildProgress

    out = io.StringIO()  # not a TTY: plain lines
    p = BuildProgress(100, stream=out, every=0.0)
    p.phase("training fine-tune addition", 60)
    p.advance(30)
    p.phase("evaluating", 2, unit="models", weight=20)
    p.advance()
    p.close()
    lines = out.getvalue().splitlines()
    assert "zoo: training fine-tune addition 0/60 steps, 0 s elapsed, ETA ?" in lines
    assert any(re.fullmatch(r"zoo: training fine-tune addition 30/60 steps, \d+ s elapsed, ETA \d+(m\d\d)?s", x)
               for x in lines), lines
    assert any(x.startswith("zoo: evaluating 1/2 models,") for x in lines), lines
    assert lines[-1].startswith("zoo: built in")


def test_different_base_has_same_shapes_but_is_far_from_the_base(zoo):
    base, other, ft = _weights(zoo.base), _weights(zoo.negatives["different_base"]), _weights(zoo.finetunes["addition"])
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in other.items()}
    dist = lambda x: sum((x[k] - base[k]).norm() ** 2 for k in base) ** 0.5  # noqa: E731
    assert dist(other) > 1.5 * dist(ft)  # not a task vector: a different model


def test_different_tokenizer_same_vocab_size_different_ids(zoo):
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(zoo.base)
    theirs = AutoTokenizer.from_pretrained(zoo.negatives["different_tokenizer"])
    assert len(mine) == len(theirs)
    assert mine.get_vocab().keys() == theirs.get_vocab().keys()
    text = "the red fox sees the dog . 7+8=15"
    assert mine(text)["input_ids"] != theirs(text)["input_ids"]
    assert mine.eos_token_id == theirs.eos_token_id and mine.pad_token_id == theirs.pad_token_id
    base, spec = _weights(zoo.base), _weights(zoo.negatives["different_tokenizer"])
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in spec.items()}
    # It still works with its own tokenizer: it is the addition fine-tune, renumbered.
    matrix = zoo.manifest["task_matrix"]
    assert matrix["different_tokenizer"]["zoo_addition"] == pytest.approx(matrix["addition"]["zoo_addition"], abs=0.05)


def test_different_arch_has_different_shapes(zoo):
    base, arch = _weights(zoo.base), _weights(zoo.negatives["different_arch"])
    shared = set(base) & set(arch)
    assert set(base) != set(arch) or any(base[k].shape != arch[k].shape for k in shared)
    assert any(base[k].shape != arch[k].shape for k in shared)
    cfg = json.loads((zoo.negatives["different_arch"] / "config.json").read_text())
    assert cfg["vocab_size"] == json.loads((zoo.base / "config.json").read_text())["vocab_size"]


def test_build_reuses_the_cache(zoo):
    from mergeline.zoo import build_zoo

    again = build_zoo()
    assert again.root == zoo.root and again.manifest == zoo.manifest


def test_build_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from mergeline.zoo import build_zoo

    (tmp_path / "something").write_text("not a zoo")
    with pytest.raises(FileExistsError, match="force"):
        build_zoo(tmp_path)
