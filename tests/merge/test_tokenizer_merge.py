"""Tokenizer merges (merge/tokenizer_merge.py): `tokenizer_source: union | base | MODEL` and the
`tokenizer:` block, on tiny Llamas whose vocabularies differ (a fine-tune that added tokens and
resized its embeddings). Each must write mergekit 0.1.5's tensors and vocabulary.

    pytest tests/merge/test_tokenizer_merge.py -q
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergeline.merge.executor import run_merge
from mergeline.merge.recipe import load_recipe
from mergeline.merge.tokenizer_merge import describe_remapping

ADDED = {"ft_a": ["<tool>", "</tool>"], "ft_b": ["<think>"]}


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    """base: the tiny BPE tokenizer; ft_a and ft_b: fine-tunes that each added tokens of their own
    (rows resized and trained), so their vocabularies differ from the base's and each other's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _tiny_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    tok = _tiny_tokenizer()
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base", safe_serialization=True)
    tok.save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i, name in enumerate(["ft_a", "ft_b"]):
        t = _tiny_tokenizer()
        t.add_tokens(ADDED[name])
        model = LlamaForCausalLM(copy.deepcopy(cfg))  # resizing changes the config it holds
        model.load_state_dict(base.state_dict())
        model.resize_token_embeddings(len(t))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.004 * torch.randn(p.shape, generator=g))  # a fine-tune's size of change
        model.save_pretrained(root / name, safe_serialization=True)
        t.save_pretrained(root / name)
        out[name] = root / name
    return out


def _recipes(m: dict[str, Path]) -> dict[str, dict]:
    b, a = str(m["base"]), str(m["ft_a"])
    two = [{"model": b, "parameters": {"weight": 0.4}}, {"model": a, "parameters": {"weight": 0.6}}]
    return {
        "union_linear": {"merge_method": "linear", "base_model": b, "models": two, "tokenizer_source": "union",
                         "dtype": "float32"},
        "union_ties": {"merge_method": "ties", "base_model": b, "dtype": "float32", "tokenizer_source": "union",
                       "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}]},
        "base_vocab": {"merge_method": "linear", "base_model": b, "models": two, "tokenizer_source": "base",
                       "dtype": "float32"},
        "model_vocab": {"merge_method": "linear", "base_model": b, "models": two, "tokenizer_source": a,
                        "dtype": "float32"},
        "tokens_block": {"merge_method": "linear", "base_model": b, "models": two, "dtype": "float32",
                         "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                             "<tool>": {"source": a, "force": True},
                             "<|eos|>": {"source": {"kind": "zero"}, "force": True},
                             "<new>": {"source": {"kind": "model_token", "model": a, "token": "<tool>"}}}}},
    }


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def mergekit_outputs(vocab_models, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge as mk_run

    root = tmp_path_factory.mktemp("mergekit_vocab")
    opts = MergeOptions(write_model_card=False, quiet=True, device="cpu")
    for name, recipe in _recipes(vocab_models).items():
        mk_run(MergeConfiguration.model_validate(recipe), str(root / name), opts)
    return {name: root / name for name in _recipes(vocab_models)}


@pytest.mark.parametrize("name", list(_recipes({k: Path(k) for k in ("base", "ft_a", "ft_b")})))
def test_same_tensors_vocabulary_and_config_as_mergekit(name, vocab_models, mergekit_outputs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    run_merge(_recipes(vocab_models)[name], out, device="cpu", progress=False)
    theirs, ours = _read(mergekit_outputs[name]), _read(out)
    assert set(theirs) == set(ours)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")
    cfg, their_cfg = (json.loads((d / "config.json").read_text()) for d in (out, mergekit_outputs[name]))
    assert cfg["vocab_size"] == their_cfg["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(
        mergekit_outputs[name]).get_vocab()


def test_union_keeps_every_models_rows_and_the_model_runs(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "union"
    run_merge(_recipes(vocab_models)["union_linear"], out, device="cpu", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    base_tok = AutoTokenizer.from_pretrained(vocab_models["base"])
    a_tok = AutoTokenizer.from_pretrained(vocab_models["ft_a"])
    merged, base, a = _read(out), _read(vocab_models["base"]), _read(vocab_models["ft_a"])
    emb = merged["model.embed_tokens.weight"]
    # a token both have: 0.4 * base's row + 0.6 * ft_a's row, wherever each keeps it
    t = "yes"
    expect = 0.4 * base["model.embed_tokens.weight"][base_tok.get_vocab()[t]] + \
        0.6 * a["model.embed_tokens.weight"][a_tok.get_vocab()[t]]
    torch.testing.assert_close(emb[tok.get_vocab()[t]], expect)
    # a token only ft_a has: its row in every model, so the merge keeps it
    tid = tok.get_vocab()["<tool>"]
    torch.testing.assert_close(emb[tid], a["model.embed_tokens.weight"][a_tok.get_vocab()["<tool>"]])
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("1 + 2 = 3 <tool>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == tid
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_three_vocabularies_union_in_recipe_order_and_reported(vocab_models, tmp_path):
    b, a, f = (str(vocab_models[k]) for k in ("base", "ft_a", "ft_b"))
    recipe = {"merge_method": "linear", "base_model": b, "tokenizer_source": "union", "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (b, a, f)]}
    summary = describe_remapping(load_recipe(recipe))
    n_base = len(json.loads((vocab_models["base"] / "tokenizer.json").read_text())["model"]["vocab"])
    assert summary.source == "union" and summary.added_tokens == 3 and summary.vocab_size == n_base + 3
    rows = {Path(m.model).name: m for m in summary.models}
    assert rows["base"].filled == 3 and rows["base"].filled_from == {a: 2, f: 1}
    assert rows["ft_a"].filled == 1 and rows["ft_a"].filled_from == {f: 1}
    assert rows["ft_b"].moved == 1 and rows["ft_b"].filled == 2  # <think> moves past ft_a's two tokens
    out = tmp_path / "three"
    run_merge(recipe, out, device="cpu", progress=False)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert [vocab[t] for t in ("<tool>", "</tool>", "<think>")] == [n_base, n_base + 1, n_base + 2]
    assert "3 tokens beyond the base" in summary.text()


def test_no_tokenizer_keeps_refusing_different_vocabularies(vocab_models, tmp_path):
    from mergeline.merge.plan import MergeError, build_plan

    recipe = _recipes(vocab_models)["union_linear"]
    recipe.pop("tokenizer_source")
    with pytest.raises(MergeError, match=r"shape \[285, 16\].*tokenizer_source: union"):
        build_plan(load_recipe(recipe))
    with pytest.raises(Exception, match="285"):  # the plan's refusal, or the compatibility gate's before it
        run_merge(recipe, tmp_path / "x", device="cpu", progress=False)
    assert not (tmp_path / "x").exists()
    assert describe_remapping(load_recipe(recipe)) is None


def test_union_example_runs_on_the_tiny_models(tiny_models, tmp_path, monkeypatch):
    """configs/recipes/tokenizer/union.yaml beside models/ (the tiny models share one tokenizer:
    the union is the base's vocabulary, padded to a multiple of 8, <|eos|> forced from the base)."""
    import shutil

    from transformers import AutoTokenizer

    recipe = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "tokenizer" / "union.yaml"
    for name in ("base", "ft_a", "ft_b"):
        shutil.copytree(tiny_models[name], tmp_path / "models" / name)
    shutil.copy(recipe, tmp_path / recipe.name)
    monkeypatch.chdir(tmp_path)
    run_merge(recipe.name, tmp_path / "out", device="cpu", progress=False)
    n = len(AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab())
    wte = load_file(tmp_path / "out" / "model.safetensors")["transformer.wte.weight"]
    assert wte.shape[0] == -(-n // 8) * 8 == json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"]
    eos = AutoTokenizer.from_pretrained(tmp_path / "out").eos_token_id
    base = load_file(tmp_path / "models" / "base" / "model.safetensors")["transformer.wte.weight"]
    torch.testing.assert_close(wte[eos], base[eos])  # forced: the base's row in every model
    summary = describe_remapping(load_recipe(recipe.name))
    assert summary.added_tokens == 0 and all(m.filled == 1 for m in summary.models)  # only the forced <|eos|>


def test_bad_tokens_entries_are_refused_before_any_tensor_is_read(vocab_models, tmp_path):
    from mergeline.merge.plan import MergeError, build_plan
    from mergeline.merge.recipe import RecipeError

    a = str(vocab_models["ft_a"])
    recipe = _recipes(vocab_models)["tokens_block"]
    bad_model = {**recipe, "tokenizer": {"source": "union", "tokens": {"<x>": {"source": "./nowhere"}}}}
    with pytest.raises(MergeError, match=r"tokens\['<x>'\].source: './nowhere' is not one of the recipe's models"):
        build_plan(load_recipe(bad_model))
    bad_token = {**recipe, "tokenizer": {"source": "union", "tokens": {
        "<x>": {"source": {"kind": "model_token", "model": a, "token": "<absent>"}}}}}
    with pytest.raises(MergeError, match="token '<absent>' is not in model"):
        build_plan(load_recipe(bad_token))
    with pytest.raises(RecipeError, match="pad_to_multiple_of"):
        load_recipe({**recipe, "tokenizer": {"source": "union", "pad_to_multiple_of": 0}})
    with pytest.raises(RecipeError, match="token_id or token"):
        load_recipe({**recipe, "tokenizer": {"source": "union", "tokens": {
            "<x>": {"source": {"kind": "model_token", "model": a}}}}})
    assert not (tmp_path / "out").exists()


def test_a_renumbered_vocabulary_is_merged_token_by_token(zoo, tmp_path):
    """The zoo's `different_tokenizer` is the `addition` fine-tune with its token ids renumbered
    (rows permuted to match). Merged with `addition` on addition's tokenizer, its rows are put
    back in place, so the merge is `addition` itself; row by row it would mix tokens."""
    add, perm = str(zoo.finetunes["addition"]), str(zoo.negatives["different_tokenizer"])
    recipe = {"merge_method": "linear", "base_model": add, "tokenizer_source": "base", "dtype": "float32",
              "models": [{"model": add, "parameters": {"weight": 0.5}}, {"model": perm, "parameters": {"weight": 0.5}}]}
    # After remapping, different_tokenizer IS its base (addition): the checks rightly say
    # "identical to the base"; this test is about the rows, so it merges anyway.
    run_merge(recipe, tmp_path / "by_token", device="cpu", progress=False, allow_crimes=True)
    merged, original = _read(tmp_path / "by_token"), _read(zoo.finetunes["addition"])
    assert merged.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(merged[k], original[k].float(), rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    summary = describe_remapping(load_recipe(recipe))
    moved = {Path(m.model).name: m.moved for m in summary.models}
    assert moved["addition"] == 0 and moved["different_tokenizer"] > 100 and summary.added_tokens == 0
