"""The compatibility gate on tiny generated models (no transformers import: config.json,
safetensors and a `tokenizers` tokenizer.json are written directly, so this file runs in seconds).

    pytest tests/merge/test_compat.py -q
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.merge.compat import CompatInputError, check_models, check_recipe, load_policy
from mergeline.merge.compat.policy import PolicyError
from mergeline.merge.checkpoint import CheckpointError

HIDDEN, LAYERS = 16, 2
WORDS = ["<eos>", "<pad>", "<unk>"] + [f"w{i}" for i in range(61)]  # 64 tokens


def base_tensors(seed: int = 0, hidden: int = HIDDEN, vocab: int = len(WORDS)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"transformer.wte.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
         "transformer.ln_f.weight": torch.ones(hidden)}
    for i in range(LAYERS):
        t[f"transformer.h.{i}.attn.c_attn.weight"] = torch.randn(hidden, 3 * hidden, generator=g) * 0.02
        t[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.randn(hidden, 4 * hidden, generator=g) * 0.02
    return t


def finetune(base: dict, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """base + a small random task vector (scale relative to each tensor's std)."""
    g = torch.Generator().manual_seed(100 + seed)
    return {k: v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g) for k, v in base.items()}


def config(hidden: int = HIDDEN, vocab: int = len(WORDS), **extra) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": hidden, "n_layer": LAYERS,
            "n_head": 2, "vocab_size": vocab, "n_positions": 64, "tie_word_embeddings": True,
            "transformers_version": "5.23.0", "dtype": "float32", **extra}


def write_tokenizer(folder: Path, words=WORDS, chat_template: str | None = None) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<eos>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_model(folder: Path, tensors: dict, cfg: dict | None = None, tokenizer=True, dtype=None) -> Path:
    folder.mkdir(parents=True)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg or config()))
    if tokenizer:
        write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A base, three genuine fine-tunes and the negative specimens, as folders."""
    root = tmp_path_factory.mktemp("compat")
    b = base_tensors()
    out = {"base": write_model(root / "base", b)}
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"]):
        out[name] = write_model(root / name, finetune(b, i))
    out["other_base"] = write_model(root / "other_base", finetune(base_tensors(seed=7), 3))
    shuffled = WORDS[:3] + WORDS[3:][::-1]  # same size, same tokens, different ids
    out["other_tok"] = write_model(root / "other_tok", finetune(b, 4), tokenizer=False)
    write_tokenizer(out["other_tok"], shuffled)
    out["other_arch"] = write_model(root / "other_arch", base_tensors(hidden=24), config(hidden=24))
    out["base_copy"] = write_model(root / "base_copy", b)
    out["bf16"] = write_model(root / "bf16", finetune(b, 5), dtype=torch.bfloat16)
    out["chat"] = write_model(root / "chat", finetune(b, 6), tokenizer=False)
    write_tokenizer(out["chat"], chat_template="{{ messages }}")
    return out


def fts(tiny, *names) -> dict[str, Path]:
    return {n: tiny[n] for n in names}


# -- the good set ------------------------------------------------------------
def test_genuine_finetunes_pass(tiny):
    threads = torch.get_num_threads()
    report = check_models(tiny["base"], fts(tiny, "ft_a", "ft_b", "ft_c"))
    assert torch.get_num_threads() == threads  # the streamed pass leaves this thread's setting (merge/cpu.py)
    d = report.to_dict()
    assert d["status"] == "pass", [c for c in d["checks"] if c["status"] != "pass"]
    assert d["schema_version"] == 1
    assert set(d["norms"]["per_model"]) == {"ft_a", "ft_b", "ft_c"}
    rel = d["norms"]["per_model"]["ft_a"]["relative_delta"]
    assert 0.005 < rel < 0.05
    # independent random task vectors are nearly orthogonal; self-similarity is 1
    assert abs(d["norms"]["cosine"]["ft_a"]["ft_b"]) < 0.2
    assert d["norms"]["cosine"]["ft_a"]["ft_a"] == pytest.approx(1.0)
    assert json.loads(json.dumps(d)) == d  # JSON-safe


def test_norms_match_a_direct_computation(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "ft_b"), {"norms": {"chunk_elements": 100}})
    from safetensors.torch import load_file
    b = load_file(tiny["base"] / "model.safetensors")
    a = load_file(tiny["ft_a"] / "model.safetensors")
    c = load_file(tiny["ft_b"] / "model.safetensors")
    da = torch.cat([(a[k] - b[k]).flatten() for k in b]).double()
    dc = torch.cat([(c[k] - b[k]).flatten() for k in b]).double()
    bn = torch.cat([b[k].flatten() for k in b]).double().norm()
    pm = report.norms["per_model"]["ft_a"]
    assert pm["delta_norm"] == pytest.approx(float(da.norm()), rel=1e-5)
    assert pm["base_norm"] == pytest.approx(float(bn), rel=1e-5)
    assert report.norms["cosine"]["ft_a"]["ft_b"] == pytest.approx(float(da @ dc / da.norm() / dc.norm()), abs=1e-5)
    mats = [k for k in b if b[k].dim() >= 2]
    fa, fb = (torch.cat([x[k].flatten() for k in mats]).double() for x in (a, b))
    assert pm["weight_cosine"] == pytest.approx(float(fa @ fb / fa.norm() / fb.norm()), abs=1e-6)
    assert pm["relative_delta_matrices"] == pytest.approx(float((fa - fb).norm() / fb.norm()), rel=1e-5)
    per_t = report.norms["per_tensor"]["transformer.wte.weight"]["ft_a"]
    assert per_t["delta_norm"] == pytest.approx(float((a["transformer.wte.weight"] - b["transformer.wte.weight"]).norm()), rel=1e-5)


def test_norm_pass_reports_progress_up_to_every_element(tiny):
    calls = []
    report = check_models(tiny["base"], fts(tiny, "ft_a", "ft_b"), {"norms": {"chunk_elements": 100}},
                          on_progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 1 and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1][0] == calls[-1][1] == report.norms["numel"]


# -- negative specimens --------------------------------------------------------
def test_different_base_is_flagged_by_the_norms(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "ft_b", "other_base"))
    assert report.status == "fail"
    too_large = report.check("norms.too_large")
    assert too_large.status == "fail" and "other_base" in too_large.message
    assert report.check("norms.outlier").status == "warn"
    assert "other_base" in report.check("norms.outlier").message
    unrelated = report.check("norms.unrelated")
    assert unrelated.status == "fail" and "other_base" in unrelated.message and "ft_a" not in unrelated.message
    assert abs(report.norms["per_model"]["other_base"]["weight_cosine"]) < 0.2
    assert report.check("tensors.shapes").status == "pass"  # nothing but the norms can tell


def test_a_far_but_genuine_finetune_is_not_called_unrelated(tiny, tmp_path):
    far = write_model(tmp_path / "far", finetune(base_tensors(), 8, scale=0.8))
    report = check_models(tiny["base"], {"far": far})
    pm = report.norms["per_model"]["far"]
    assert 0.7 < pm["relative_delta_matrices"] < 0.9 and 0.7 < pm["weight_cosine"] < 0.85
    assert report.check("norms.unrelated").status == "pass"
    assert report.check("norms.too_large").status == "pass"


def test_outlier_with_two_models_flags_only_the_larger(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "other_base"))
    ratios = report.check("norms.outlier").details["ratio_to_median_of_others"]
    assert ratios["other_base"] > 5 and ratios["ft_a"] < 1
    assert "ft_a" not in report.check("norms.outlier").message


def test_same_size_tokenizer_with_different_ids_fails(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "other_tok"))
    vocab = report.check("tokenizer.vocab")
    assert vocab.status == "fail"
    d = vocab.details["other_tok"]
    assert d["base_size"] == d["model_size"] == len(WORDS)
    assert d["ids_differ"] == len(WORDS) - 3 - 1  # the middle word of an odd-length reversal keeps its id
    assert d["examples"]
    assert report.check("tokenizer.special_tokens").status == "pass"  # <eos>, <pad> kept their ids
    assert report.check("tensors.shapes").status == "pass"
    assert report.status == "fail"


def test_different_architecture_fails_on_config_and_shapes(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "other_arch"))
    arch = report.check("architecture")
    assert arch.status == "fail"
    assert arch.details["differing_critical"]["hidden_size"] == {"base": HIDDEN, "ft_a": HIDDEN, "other_arch": 24}
    assert "hidden_size" in arch.message
    shapes = report.check("tensors.shapes")
    assert shapes.status == "fail" and "transformer.wte.weight" in json.dumps(shapes.details)
    assert report.check("norms.too_large").status == "skip"


def test_identical_to_base_fails(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "base_copy"))
    assert report.check("norms.identical").status == "fail"
    assert "base_copy" in report.check("norms.identical").message


def test_dtype_difference_is_a_warning(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "bf16"))
    assert report.check("tensors.dtypes").status == "warn"
    assert report.status == "warn"
    assert "F32->BF16" in report.check("tensors.dtypes").message


def test_chat_template_is_a_warning_and_can_be_waived(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "chat"))
    assert report.check("tokenizer.chat_template").status == "warn"
    waived = check_models(tiny["base"], fts(tiny, "ft_a", "chat"), {"waive": ["tokenizer.chat_template"]})
    c = waived.check("tokenizer.chat_template")
    assert c.status == "waived" and c.waived and c.details["waived_status"] == "warn"
    assert waived.status == "pass"
    assert c.to_dict()["waived"] is True  # reported, not hidden


def test_waiving_a_config_field(tiny, tmp_path):
    longer = write_model(tmp_path / "longer", finetune(base_tensors(), 9), config(n_positions=128))
    report = check_models(tiny["base"], {"longer": longer, "ft_a": tiny["ft_a"]})
    assert report.check("architecture").status == "fail"
    waived = check_models(tiny["base"], {"longer": longer, "ft_a": tiny["ft_a"]},
                          {"waive": ["architecture.max_position_embeddings"]})
    assert waived.check("architecture").status == "waived"


def test_severity_override(tiny):
    report = check_models(tiny["base"], fts(tiny, "ft_a", "bf16"), {"severity": {"tensors.dtypes": "fail"}})
    assert report.check("tensors.dtypes").status == "fail"


def test_nan_is_named(tiny, tmp_path):
    t = finetune(base_tensors(), 1)
    t["transformer.h.1.mlp.c_fc.weight"][0, 3] = math.nan
    bad = write_model(tmp_path / "nan", t)
    report = check_models(tiny["base"], {"ft_a": tiny["ft_a"], "nan": bad})
    c = report.check("norms.finite")
    assert c.status == "fail" and "transformer.h.1.mlp.c_fc.weight" in c.message and "nan" in c.message
    assert report.norms["per_model"]["nan"]["relative_delta"] > 0  # other tensors still counted


def test_missing_tokenizer_warns(tiny, tmp_path):
    notok = write_model(tmp_path / "notok", finetune(base_tensors(), 2), tokenizer=False)
    report = check_models(tiny["base"], {"ft_a": tiny["ft_a"], "notok": notok})
    assert report.check("tokenizer.present").status == "warn"
    assert report.status == "warn"


def test_missing_tensor_is_named(tiny, tmp_path):
    t = finetune(base_tensors(), 2)
    del t["transformer.ln_f.weight"]
    t["extra.bias"] = torch.zeros(3)
    odd = write_model(tmp_path / "odd", t)
    c = check_models(tiny["base"], {"odd": odd}).check("tensors.names")
    assert c.status == "fail"
    assert c.details["odd"] == {"missing": ["transformer.ln_f.weight"], "extra": ["extra.bias"]}


# -- bad input -----------------------------------------------------------------
def test_unknown_policy_key_names_it(tiny):
    with pytest.raises(PolicyError, match="norms.max_relativ"):
        load_policy({"norms": {"max_relativ": 1}})
    with pytest.raises(PolicyError, match="tokenizer.chat"):
        load_policy({"waive": ["tokenizer.chat"]})


@pytest.mark.parametrize("file,text", [("tokenizer.json", '{"model": {"vocab": '), ("tokenizer.json", '{"x": 1}'),
                                       ("tokenizer_config.json", "[1, 2]")])
def test_corrupt_tokenizer_names_the_file(tiny, tmp_path, file, text):
    bad = tmp_path / "badtok"
    shutil.copytree(tiny["ft_a"], bad)
    (bad / file).write_text(text)
    with pytest.raises(CheckpointError, match=rf"badtok/{file}: unreadable tokenizer file"):
        check_models(tiny["base"], {"bad": bad})


def test_same_model_twice_is_refused(tiny):
    with pytest.raises(CompatInputError, match="twice"):
        check_models(tiny["base"], {"a": tiny["ft_a"], "b": tiny["ft_a"] / ".." / "ft_a"})


def test_truncated_safetensors_names_the_file(tiny, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny["ft_a"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated/model\.safetensors"):
        check_models(tiny["base"], {"t": bad})


# -- recipes and the CLI ---------------------------------------------------------
def recipe(tmp_path: Path, tiny, *names: str, base="base") -> Path:
    lines = ["merge_method: ties", f"base_model: {tiny[base]}", "models:"]
    for n in names:
        lines += [f"  - model: {tiny[n]}", "    parameters: {weight: 0.5, density: 0.5}"]
    lines += ["parameters: {normalize: true}", "dtype: float32"]
    p = tmp_path / "recipe.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_check_recipe_uses_short_names(tiny, tmp_path):
    report = check_recipe(recipe(tmp_path, tiny, "ft_a", "ft_b"))
    assert report.status == "pass"
    assert set(report.norms["per_model"]) == {"ft_a", "ft_b"}
    assert report.norms["not_compared"] == []


def test_recipe_without_base_compares_with_the_first_model(tiny, tmp_path):
    p = tmp_path / "linear.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny['ft_a']}\n    parameters: {{weight: 0.5}}\n"
                 f"  - model: {tiny['other_base']}\n    parameters: {{weight: 0.5}}\n")
    report = check_recipe(p)
    assert report.base == str(tiny["ft_a"])
    assert report.check("norms.unrelated").status == "fail" and "other_base" in report.check("norms.unrelated").message


runner = CliRunner()


def test_cli_pass_json(tiny, tmp_path):
    res = runner.invoke(app, ["check", str(recipe(tmp_path, tiny, "ft_a", "ft_b")), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "pass"


def test_cli_fail_table(tiny, tmp_path):
    res = runner.invoke(app, ["check", str(recipe(tmp_path, tiny, "ft_a", "other_tok"))])
    assert res.exit_code == 1, res.output
    assert "tokenizer.vocab" in res.output and "fail" in res.output.lower()


def test_cli_warn_exits_zero(tiny, tmp_path):
    res = runner.invoke(app, ["check", str(recipe(tmp_path, tiny, "ft_a", "bf16"))])
    assert res.exit_code == 0, res.output


def test_cli_policy_waiver(tiny, tmp_path):
    pol = tmp_path / "policy.yaml"
    pol.write_text("waive: [norms]\n")
    res = runner.invoke(app, ["check", str(recipe(tmp_path, tiny, "ft_a", "other_base")), "--policy", str(pol), "--json"])
    assert res.exit_code == 0, res.output
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["norms.too_large"]["status"] == "waived" and checks["norms.too_large"]["waived"]


def _bad(tmp_path, tiny, kind: str) -> Path:
    """A model folder broken in one way."""
    bad = tmp_path / kind
    shutil.copytree(tiny["ft_a"], bad)
    st = bad / "model.safetensors"
    if kind == "no_config":
        (bad / "config.json").unlink()
    elif kind == "no_weights":
        st.unlink()
    elif kind == "pickle":
        st.unlink()
        torch.save(finetune(base_tensors(), 1), bad / "pytorch_model.bin")
    elif kind == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif kind == "missing_shard":
        st.rename(bad / "model-00001-of-00002.safetensors")
        wm = {k: "model-00001-of-00002.safetensors" for k in base_tensors()}
        wm["transformer.ln_f.weight"] = "model-00002-of-00002.safetensors"
        (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    elif kind == "bad_tokenizer":
        (bad / "tokenizer_config.json").write_text("{not json")
    return bad


@pytest.mark.parametrize("kind,needle", [
    ("no_config", "config.json"), ("no_weights", "no model.safetensors"), ("pickle", "pytorch_model.bin"),
    ("truncated", "model.safetensors"), ("missing_shard", "model-00002-of-00002.safetensors"),
    ("bad_tokenizer", "tokenizer_config.json"), ("missing_folder", "missing_folder"),
])
def test_cli_bad_input_exit_2(tiny, tmp_path, kind, needle):
    bad = tmp_path / kind if kind == "missing_folder" else _bad(tmp_path, tiny, kind)
    p = tmp_path / "r.yaml"
    p.write_text(f"merge_method: ties\nbase_model: {tiny['base']}\nmodels:\n"
                 f"  - model: {bad}\n    parameters: {{weight: 1.0}}\n")
    before = sorted(tmp_path.rglob("*"))
    res = runner.invoke(app, ["check", str(p)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())  # rich may wrap long paths
    assert needle in out and "error" in out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_cli_allow_pickle(tiny, tmp_path):
    bad = _bad(tmp_path, tiny, "pickle")
    p = tmp_path / "r.yaml"
    p.write_text(f"merge_method: ties\nbase_model: {tiny['base']}\nmodels:\n  - model: {bad}\n    parameters: {{weight: 1.0}}\n")
    res = runner.invoke(app, ["check", str(p), "--allow-pickle", "--json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("second", ["{ft}/", "{ft}", "{base}"])
def test_cli_same_model_twice_exit_2(tiny, tmp_path, second):
    second = second.format(ft=tiny["ft_a"], base=tiny["base"] / ".." / "base")
    p = tmp_path / "r.yaml"
    p.write_text(f"merge_method: ties\nbase_model: {tiny['base']}\nmodels:\n"
                 f"  - model: {tiny['ft_a']}\n    parameters: {{weight: 0.5}}\n"
                 f"  - model: {second}\n    parameters: {{weight: 0.5}}\n")
    res = runner.invoke(app, ["check", str(p)])
    assert res.exit_code == 2, res.output
    assert "twice" in res.output


def test_cli_bad_recipe_and_policy_exit_2(tiny, tmp_path):
    p = recipe(tmp_path, tiny, "ft_a")
    pol = tmp_path / "pol.yaml"
    pol.write_text("norms: {max_relative_delta: -1}\n")
    res = runner.invoke(app, ["check", str(p), "--policy", str(pol)])
    assert res.exit_code == 2 and "pol.yaml" in res.output and "max_relative_delta" in res.output
    res = runner.invoke(app, ["check", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "nope.yaml" in res.output


# -- tokenizer details -------------------------------------------------------------
def test_special_token_moved_fails(tiny, tmp_path):
    moved = write_model(tmp_path / "moved", finetune(base_tensors(), 3), tokenizer=False)
    write_tokenizer(moved)
    cfg = json.loads((moved / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "w5"  # same vocabulary, a different end-of-sequence id
    (moved / "tokenizer_config.json").write_text(json.dumps(cfg))
    report = check_models(tiny["base"], {"moved": moved})
    c = report.check("tokenizer.special_tokens")
    assert c.status == "fail" and c.details["moved"]["eos_token"] == {"base": ["<eos>", 0], "model": ["w5", 8]}
    assert report.check("tokenizer.vocab").status == "pass"


def test_sentencepiece_compared_by_file_hash(tiny, tmp_path):
    a = write_model(tmp_path / "sp_a", finetune(base_tensors(), 3), tokenizer=False)
    b = write_model(tmp_path / "sp_b", finetune(base_tensors(), 4), tokenizer=False)
    base = write_model(tmp_path / "sp_base", base_tensors(), tokenizer=False)
    for f, data in ((base, b"model-1"), (a, b"model-1"), (b, b"model-2")):
        (f / "tokenizer.model").write_bytes(data)
    report = check_models(base, {"sp_a": a, "sp_b": b})
    c = report.check("tokenizer.vocab")
    assert c.status == "fail" and list(c.details) == ["sp_b"]
