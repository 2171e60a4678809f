"""The lm-eval runner: offline, local YAML tasks, tidy frames."""
from __future__ import annotations

import pytest

from mergeline.evaluation.lm_eval_runner import SAMPLE_COLUMNS, SCORE_COLUMNS, run_lm_eval


@pytest.fixture(scope="module")
def base_run(zoo):
    return run_lm_eval(zoo.base, ["zoo_addition", "zoo_general_mc"], include_path=zoo.tasks_dir, limit=8)


def test_scores_frame_has_the_promised_columns(base_run):
    s = base_run.scores
    assert list(s.columns) == SCORE_COLUMNS
    assert set(s.task) == {"zoo_addition", "zoo_general_mc"}
    primary = s[s.primary].set_index("task").metric.to_dict()
    assert primary == {"zoo_addition": "exact_match", "zoo_general_mc": "acc"}
    assert s.value.between(0, 1).all()
    assert not s.metric.str.contains("stderr").any()


def test_samples_frame_has_one_row_per_item(base_run):
    s = base_run.samples
    assert list(s.columns) == SAMPLE_COLUMNS
    assert (s.groupby("task").size() == 8).all()
    assert set(s.correct.unique()) <= {0.0, 1.0}
    # the per-sample rows agree with the aggregate score
    for task in ("zoo_addition", "zoo_general_mc"):
        assert s[s.task == task].correct.mean() == pytest.approx(base_run.score(task))
    mc = s[s.task == "zoo_general_mc"]
    assert mc.response.str.fullmatch(r"\d").all()  # index of the chosen answer


def test_config_identifies_tasks_and_lm_eval_version(base_run, zoo):
    cfg = base_run.config
    assert cfg["lm_eval_version"].startswith("0.4")
    assert set(cfg["tasks"]) == {"zoo_addition", "zoo_general_mc"}
    assert str(zoo.tasks_dir.resolve()) in str(cfg["tasks"]["zoo_addition"])


def test_finetune_scores_high_on_its_own_task(zoo):
    run = run_lm_eval(zoo.finetunes["reverse"], ["zoo_reverse"], include_path=zoo.tasks_dir, limit=20)
    assert run.score("zoo_reverse") >= 0.8


def test_bad_inputs_name_what_is_wrong(zoo, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_lm_eval(tmp_path, ["zoo_addition"], include_path=zoo.tasks_dir)
    with pytest.raises(KeyError, match="zoo_nope"):
        run_lm_eval(zoo.base, ["zoo_nope"], include_path=zoo.tasks_dir)


def test_a_lora_adapter_on_its_base_is_evaluated_through_peft(zoo, base_run, tmp_path):
    """BASE+ADAPTER runs lm-eval's `peft=` argument: an adapter that scrambles attention must
    change the base's scores; a missing adapter folder is named."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(zoo.base),
                           LoraConfig(r=8, lora_alpha=64, target_modules=["c_attn"], fan_in_fan_out=True,
                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "scramble")
    run = run_lm_eval(f"{zoo.base}+{tmp_path / 'scramble'}", ["zoo_general_mc"], include_path=zoo.tasks_dir, limit=8)
    assert run.score("zoo_general_mc") != base_run.score("zoo_general_mc")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        run_lm_eval(f"{zoo.base}+{tmp_path}", ["zoo_general_mc"], include_path=zoo.tasks_dir)


def test_tasks_from_two_include_folders_run_together(zoo, tmp_path):
    """A suite whose include_paths names two folders finds the tasks of both (issue #10, part 7):
    lm-eval's TaskManager takes the list; a real run through evaluate_models."""
    import shutil

    from mergeline.evaluation.evaluate import evaluate_models
    from mergeline.evaluation.suite import load_suite

    skills, general = tmp_path / "skills", tmp_path / "general"
    for folder, task in ((skills, "zoo_addition"), (general, "zoo_general_mc")):
        folder.mkdir()
        shutil.copy(zoo.tasks_dir / f"{task}.yaml", folder)   # its data file is named by absolute path
    run = run_lm_eval(zoo.base, ["zoo_addition", "zoo_general_mc"], include_path=[skills, general], limit=4)
    assert set(run.scores.task) == {"zoo_addition", "zoo_general_mc"}
    suite = load_suite({"retention": {"addition": ["zoo_addition"]}, "general": ["zoo_general_mc"],
                        "include_paths": [str(skills), str(general)], "limit": 4})
    table = evaluate_models(suite, {"base": zoo.base}, None, log=None)
    assert set(table.primary().task) == {"zoo_addition", "zoo_general_mc"}
    assert table.task_types == {"zoo_addition": "generation", "zoo_general_mc": "multiple_choice"}
