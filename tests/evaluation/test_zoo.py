"""The zoo keeps its promises: fine-tunes that genuinely differ, determinism, negative specimens."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evaluation.zoo import data, load_zoo
from evaluation.zoo.build import MARGIN, check_matrix, ZooBuildError


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_zoo_layout_and_manifest(zoo):
    from merge.hashing import content_hash

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
    for task in zoo.general_tasks:  # the base has a general skill worth regressing on
        assert matrix["base"][task] >= 0.8


def test_task_matrix_remeasured_with_the_runner(zoo):
    from evaluation.lm_eval_runner import run_lm_eval

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
    matrix["base"]["zoo_reverse"] = 0.9
    with pytest.raises(ZooBuildError, match="'reverse'.*'zoo_reverse'.*'base'"):
        check_matrix(matrix)


def test_same_seed_same_weights_and_different_seed_differs():
    from evaluation.zoo.tokenizer import train_tokenizer
    from evaluation.zoo.train import TrainSpec, encode, init_model, tiny_config, train

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


def test_finetunes_change_only_their_own_disjoint_sparse_entries(zoo):
    base = _weights(zoo.base)
    moved = {}
    for skill, folder in zoo.finetunes.items():
        ft = _weights(folder)
        moved[skill] = {k: base[k] != ft[k] for k in base}
        assert any(m.any() for m in moved[skill].values()), skill
        # only the token embedding (tied with the output head) moves
        assert not any(m.any() for k, m in moved[skill].items() if k != "transformer.wte.weight"), skill
    skills = list(moved)
    for i, a in enumerate(skills):  # composable: no entry is moved by two fine-tunes
        for b in skills[i + 1:]:
            assert not any((moved[a][k] & moved[b][k]).any() for k in base), (a, b)
    for skill, folder in zoo.finetunes.items():
        ft = _weights(folder)
        # only the embedding rows of the skill's own tokens move: a sparse task vector
        wte = "transformer.wte.weight"
        rows_changed = (base[wte] != ft[wte]).any(dim=1).float().mean().item()
        assert 0 < rows_changed < 0.5, (skill, rows_changed)


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
    from evaluation.zoo import build_zoo

    again = build_zoo()
    assert again.root == zoo.root and again.manifest == zoo.manifest


def test_build_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from evaluation.zoo import build_zoo

    (tmp_path / "something").write_text("not a zoo")
    with pytest.raises(FileExistsError, match="force"):
        build_zoo(tmp_path)
