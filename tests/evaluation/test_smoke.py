"""The smoke test (evaluation/smoke.py) on the zoo: the base and a good merge pass; a merge with
one scrambled tensor, a NaN tensor or a runaway task-arithmetic lambda fails, naming the check."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeline.evaluation.policy import PolicyError, load_policy
from mergeline.evaluation.smoke import SmokeRule, repeated_ngram_share, smoke_test
from mergeline.zoo.build import N_GENERIC
from mergeline.zoo.data import generic_lines
from mergeline.merge.executor import run_merge

PROMPTS = ["the red cat", "a dog is", "3 plus 4 is", "there are 12", "c a b backwards is"]


@pytest.fixture(scope="module")
def text(zoo) -> str:
    # the lines drawn right after the base's training text: same language, never trained on
    return "".join(generic_lines(N_GENERIC + 48, zoo.manifest["seed"])[N_GENERIC:])


@pytest.fixture(scope="module")
def refs(zoo) -> dict[str, Path]:
    return {"base": zoo.base, **zoo.finetunes}


def _copy_with(folder: Path, out: Path, change) -> Path:
    """A copy of `folder` whose weights went through `change(state_dict)`, saved with safetensors."""
    shutil.copytree(folder, out)
    f = next(out.glob("*.safetensors"))
    sd = load_file(f)
    change(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return out


def _merge(zoo, tmp_path: Path, name: str, recipe: dict) -> Path:
    params = recipe.pop("model_parameters")
    recipe = {"base_model": str(zoo.base), "dtype": "float32", **recipe,
              "models": [{"model": str(f), "parameters": params} for f in zoo.finetunes.values()]}
    return run_merge(recipe, tmp_path / name, device="cpu", progress=False).path


def test_base_and_a_good_merge_pass(zoo, text, refs, tmp_path):
    base = smoke_test(zoo.base, refs, text, PROMPTS, SmokeRule())
    assert base.passed, base.checks
    assert base.reference_perplexity["base"] == pytest.approx(base.perplexity)
    assert all(c.ended_with_eos for c in base.continuations)
    ties = _merge(zoo, tmp_path, "ties", {"merge_method": "ties", "parameters": {"density": 0.5, "normalize": True},
                                          "model_parameters": {"weight": 0.5}})
    result = smoke_test(ties, refs, text, PROMPTS, SmokeRule())
    assert result.passed, result.reasons()
    statuses = {c.name: c.status for c in result.checks}
    assert statuses == {"finite_logits": "pass", "perplexity": "pass", "eos": "pass", "repetition": "pass",
                        "chat_template": "skipped"}
    ratio = next(c for c in result.checks if c.name == "perplexity").value
    assert ratio <= 1.5 and result.perplexity / max(result.reference_perplexity.values()) == pytest.approx(ratio)


def _scramble(name: str, seed: int = 0):
    """Permute the rows of tensor `name`: its values stay, their places do not."""
    g = torch.Generator().manual_seed(seed)

    def change(sd):
        w = sd[name]
        sd[name] = w[torch.randperm(w.shape[0], generator=g)].contiguous()

    return change


@pytest.mark.parametrize("tensor", ["transformer.wte.weight",                # tied with the output head
                                    "transformer.h.0.attn.c_attn.weight"])   # first layer's q, k, v
def test_one_scrambled_tensor_fails(zoo, text, refs, tmp_path, tensor):
    broken = _copy_with(zoo.base, tmp_path / "scrambled", _scramble(tensor))
    result = smoke_test(broken, refs, text, PROMPTS, SmokeRule())
    assert not result.passed
    failed = {c.name for c in result.failed()}
    assert "perplexity" in failed, result.checks
    assert any(r.startswith("smoke.perplexity: perplexity") for r in result.reasons())
    assert result.perplexity > 1.5 * max(result.reference_perplexity.values())


def test_a_nan_tensor_fails_finite_logits(zoo, text, refs, tmp_path):
    def poison(sd):
        sd["transformer.h.0.attn.c_proj.weight"][0, 0] = float("nan")

    result = smoke_test(_copy_with(zoo.base, tmp_path / "nan", poison), refs, text, PROMPTS, SmokeRule())
    checks = {c.name: c for c in result.checks}
    assert checks["finite_logits"].status == "fail" and checks["finite_logits"].value > 0
    assert checks["perplexity"].status == "fail"


def test_runaway_task_arithmetic_fails(zoo, text, refs, tmp_path):
    merged = _merge(zoo, tmp_path, "ta20", {"merge_method": "task_arithmetic", "parameters": {"lambda": 20.0},
                                            "model_parameters": {"weight": 1.0}})
    result = smoke_test(merged, refs, text, PROMPTS, SmokeRule())
    assert not result.passed, result.checks


def test_without_text_or_prompts_the_checks_are_skipped_not_passed(zoo):
    result = smoke_test(zoo.base, {"base": zoo.base}, None, [], SmokeRule())
    statuses = {c.name: c.status for c in result.checks}
    assert statuses == {"finite_logits": "pass", "perplexity": "skipped", "eos": "skipped",
                        "repetition": "skipped", "chat_template": "skipped"}
    assert result.passed


def test_eos_bound_and_chat_template(zoo, text, tmp_path):
    # Two new tokens are too few for any sentence of the zoo's language to end.
    tight = smoke_test(zoo.base, {}, None, PROMPTS, SmokeRule(max_new_tokens=2))
    eos = next(c for c in tight.checks if c.name == "eos")
    assert eos.status == "fail" and eos.value == len(PROMPTS)
    assert all(c.new_tokens <= 2 for c in tight.continuations)

    import json

    folder = tmp_path / "chat"
    shutil.copytree(zoo.base, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ok = {c.name: c.status for c in smoke_test(folder, {}, None, PROMPTS[:1]).checks}
    assert ok["chat_template"] == "pass"
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }"  # unclosed
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    bad = smoke_test(folder, {}, None, PROMPTS[:1])
    assert {c.name: c.status for c in bad.checks}["chat_template"] == "fail" and not bad.passed


def test_repeated_ngram_share():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6], 3) == 0.0
    assert repeated_ngram_share([7] * 20, 3) == pytest.approx(1 - 1 / 18)
    assert repeated_ngram_share([1, 2] * 10, 3) > 0.8
    assert repeated_ngram_share([1, 2], 3) == 0.0


def test_policy_smoke_section():
    assert load_policy({}).smoke == SmokeRule()  # on by default
    assert load_policy({"smoke": None}).smoke is None
    assert load_policy({"smoke": {"enabled": False}}).smoke.enabled is False
    with pytest.raises(PolicyError, match="smoke.max_ppl"):
        load_policy({"smoke": {"max_ppl": 2}})
    with pytest.raises(PolicyError, match="smoke.max_repeated_ngram_share"):
        load_policy({"smoke": {"max_repeated_ngram_share": 1.5}})
