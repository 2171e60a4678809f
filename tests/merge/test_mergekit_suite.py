"""mergekit's own test suite and examples, swept: every merge configuration they contain, adapted
to tiny local models, run through mergeline and through the real mergekit 0.1.5 (`run_merge`,
in-process); the tensors must agree within the rounding of the recipe's dtype, or the case is a
difference the README's mergekit-compatibility section documents.

Sources (arcee-ai/mergekit): tests/test_basic_merges.py (TestBasicMerges, TestGraniteMerges, the
VLM merges), tests/test_chat_template.py, tests/test_tokenizer.py and examples/*.yml (the
adapted copies in configs/recipes/, merged through the `mergeline merge` CLI). mergekit's
`model_a, model_b, model_c` are the tiny Llama's `base, ft_a, ft_b` (fine-tunes of one base,
so the compatibility gate passes them; mergekit's are unrelated random models). mergekit's
gpt2-size model is a 4-layer GPT-2, its LLaVA a tiny CLIP tower + Llama decoder.

    nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider tests/merge/test_mergekit_suite.py
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("mergekit", reason="mergekit (the test extra) is the yardstick for parity")

from tests.merge._llama import build_llamas, read_all  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Relative tolerance of one unit in the last place of the compute dtype: summation order and
# fused kernels may round differently (mergekit and mergeline both compute in the recipe's dtype).
RTOL = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 1e-6, None: 1e-6}


# -- tiny models ---------------------------------------------------------------------------
def _save(model, folder: Path, own_names: bool = False) -> Path:
    """save_pretrained, or (own_names) the model's own parameter names: transformers 5 saves a
    LLaVA under its legacy names (language_model.model.*), which mergekit 0.1.5 does not find."""
    if not own_names:
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def _nudged(model_cls, cfg, base, folder: Path, seed: int, scale: float = 0.01, resize: int | None = None,
            own_names: bool = False):
    """A fine-tune of `base`: its weights plus small noise (optionally with resized token rows)."""
    model = model_cls(copy.deepcopy(cfg))
    model.load_state_dict(base.state_dict())
    if resize is not None:
        model.resize_token_embeddings(resize)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return _save(model, folder, own_names)


def make_tokenizer(vocab_size: int, added_tokens: list[str]):
    """mergekit's tests/test_tokenizer.py make_tokenizer: a BPE of `<unk> <s> </s> _tok_3 ...`."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size))), "merges": []},
            "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    with tempfile.TemporaryDirectory() as d:
        tok.save(os.path.join(d, "tokenizer.json"))
        res = LlamaTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    res.add_tokens(added_tokens)
    return res


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    """Every model the sweep needs, by the name the cases use."""
    from transformers import (CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM,
                              LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

    root = tmp_path_factory.mktemp("mk_suite")
    (root / "llama").mkdir()
    m = {k: str(v) for k, v in build_llamas(root / "llama", 4321).items()}
    torch.manual_seed(0)
    gcfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    granite = GraniteForCausalLM(gcfg)
    granite.save_pretrained(root / "granite_a", safe_serialization=True)
    m["granite_a"] = str(root / "granite_a")
    m["granite_b"] = str(_nudged(GraniteForCausalLM, gcfg, granite, root / "granite_b", 1))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=4, n_positions=64, vocab_size=64))
    gpt2.save_pretrained(root / "gpt2", safe_serialization=True)
    m["gpt2"] = str(root / "gpt2")
    vcfg = LlavaConfig(vision_config=CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                                      num_attention_heads=2, hidden_size=64, intermediate_size=128),
                       text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_attention_heads=4, num_hidden_layers=2),
                       image_seq_length=16)
    vlm = LlavaForConditionalGeneration(vcfg)
    m["vlm_c"] = str(_save(vlm, root / "vlm_c", own_names=True))
    for i, name in enumerate(["vlm_a", "vlm_b"]):
        m[name] = str(_nudged(LlavaForConditionalGeneration, vcfg, vlm, root / name, 10 + i, own_names=True))
    # test_tokenizer.py's models: a 64-token base, a chatml fine-tune with two added tokens (66
    # rows), and one whose tokenizer lists 4 unused tokens past its 64 rows.
    lcfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False)
    tbase = LlamaForCausalLM(lcfg)
    tbase.save_pretrained(root / "tok_base", safe_serialization=True)
    make_tokenizer(64, []).save_pretrained(root / "tok_base")
    _nudged(LlamaForCausalLM, lcfg, tbase, root / "tok_chatml", 20, resize=66)
    make_tokenizer(64, ["<|im_start|>", "<|im_end|>"]).save_pretrained(root / "tok_chatml")
    _nudged(LlamaForCausalLM, lcfg, tbase, root / "tok_padded", 21)
    make_tokenizer(64, [f"<UNUSED_{i}>" for i in range(4)]).save_pretrained(root / "tok_padded")
    _nudged(LlamaForCausalLM, lcfg, tbase, root / "tok_b", 22)  # test_chat_template's model_b: no tokenizer
    for name in ("tok_base", "tok_chatml", "tok_padded", "tok_b"):
        m[name] = str(root / name)
    return m


# -- the configurations ----------------------------------------------------------------------
@dataclass
class Case:
    source: str  # where in mergekit the configuration comes from
    recipe: Callable[[dict], dict]
    # None: both merge and agree. Otherwise a substring of the one-line error BOTH give (a
    # configuration mergekit's suite expects to fail), or, with `differs`, the README's reason.
    refused: str | None = None
    differs: str | None = None


def two(method: str, a="base", b="ft_a", base=None, params=None, dtype="bfloat16"):
    """mergekit's TestBasicMerges.two_model_config: weights 0.6 and 0.4, bfloat16."""
    def build(m):
        r = {"merge_method": method, "models": [{"model": m[a], "parameters": {"weight": 0.6}},
                                                {"model": m[b], "parameters": {"weight": 0.4}}], "dtype": dtype}
        if base:
            r["base_model"] = m[base]
        if params:
            r["parameters"] = dict(params)
        return r
    return build


def _nuslerp_zero(a, b, c):
    def build(m):
        r = two("nuslerp", a, b, c, {"nuslerp_row_wise": False, "nuslerp_flatten": False})(m)
        r["models"][0]["parameters"]["weight"], r["models"][1]["parameters"]["weight"] = -0.5, 0.5
        return r
    return build


def _passthrough_scale(m):
    return {"merge_method": "passthrough", "models": [{"model": m["base"], "parameters": {
        "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}


def _stack(m):
    return {"merge_method": "passthrough", "dtype": "bfloat16",
            "slices": [{"sources": [{"model": m["gpt2"], "layer_range": [0, 4]}]}] * 2}


def _tok(models, base="tok_base", method="linear", source=None, t=None, tokenizer=None):
    """mergekit's TestTokenizerMerges.make_config: weight 1 each, float32."""
    def build(m):
        r = {"merge_method": method, "base_model": m[base], "dtype": "float32",
             "models": [{"model": m[x], "parameters": {"weight": 1.0}} for x in models]}
        if source is not None:
            r["tokenizer_source"] = source if source in ("base", "union") else m[source]
        if t is not None:
            r["parameters"] = {"t": t}
        if tokenizer is not None:
            r["tokenizer"] = tokenizer(m)
        return r
    return build


def _chat(template):
    def build(m):
        return {"merge_method": "linear", "base_model": m["tok_base"], "dtype": "bfloat16", "chat_template": template,
                "models": [{"model": m["tok_base"], "parameters": {"weight": 0.5}},
                           {"model": m["tok_b"], "parameters": {"weight": 0.5}}]}
    return build


# The documented differences (README, "mergekit compatibility"), each checked by what it allows:
RANDOM = ("random: DARE's and DELLA's masks are drawn from mergeline's per-tensor generator "
          "(--seed), mergekit's from torch's global generator")
TIE = ("TIES tie-break: where several magnitudes tie at the trim threshold (common in 16-bit "
       "dtypes) mergeline keeps the lowest flat indices, mergekit whatever its top-k returns")
F32_OUT = ("float32 output: mergekit's arcee_fusion and ramplus_tl compute in float32 and write float32 "
           "whatever the recipe's dtype; mergeline writes the recipe's dtype")

BASIC = "tests/test_basic_merges.py"
CASES: dict[str, Case] = {
    "granite_copy": Case(BASIC, lambda m: {"merge_method": "passthrough", "models": [{"model": m["granite_a"]}],
                                           "dtype": "bfloat16"}),
    "granite_linear": Case(BASIC, two("linear", "granite_a", "granite_b")),
    "granite_slerp": Case(BASIC, lambda m: {**two("slerp", "granite_a", "granite_b", "granite_a")(m),
                                            "parameters": {"t": 0.5}}),
    "gpt2_copy": Case(BASIC, lambda m: {"merge_method": "passthrough", "models": [{"model": m["gpt2"]}],
                                        "dtype": "bfloat16"}),
    "gpt2_stack": Case(BASIC, _stack),
    "passthrough_scale": Case(BASIC, _passthrough_scale),
    "linear": Case(BASIC, two("linear")),
    "slerp": Case(BASIC, lambda m: {**two("slerp", base="base")(m), "parameters": {"t": 0.35}}),
    **{f"nuslerp_{'base' if c else 'nobase'}_row{int(rw)}_flat{int(fl)}":
       Case(BASIC, two("nuslerp", base=c, params={"nuslerp_row_wise": rw, "nuslerp_flatten": fl}))
       for c in (None, "ft_b") for rw in (False, True) for fl in (False, True)},
    "nuslerp_zero_sum": Case(BASIC, _nuslerp_zero("base", "ft_a", "ft_b")),
    "task_arithmetic": Case(BASIC, two("task_arithmetic", base="ft_b")),
    "breadcrumbs": Case(BASIC, two("breadcrumbs", base="ft_b")),
    "ties": Case(BASIC, two("ties", base="ft_b", params={"density": 0.3}), differs=TIE),
    "sce": Case(BASIC, two("sce", base="ft_b", params={"select_topk": 0.5})),
    "ram": Case(BASIC, two("ram", base="ft_b")),
    "ramplus_tl": Case(BASIC, two("ramplus_tl", base="ft_b", params={"r": 0.05, "alpha": 1.0}), differs=F32_OUT),
    "multislerp": Case(BASIC, two("multislerp", base="ft_b")),
    "dare_ties": Case(BASIC, two("dare_ties", base="ft_b", params={"density": 0.66}), differs=RANDOM),
    "model_stock": Case(BASIC, two("model_stock", "ft_a", "ft_b", "base")),
    "model_stock_filterwise": Case(BASIC, two("model_stock", "ft_a", "ft_b", "base", {"filter_wise": True})),
    "arcee_fusion": Case(BASIC, two("arcee_fusion", base="base"), differs=F32_OUT),
    "nearswap": Case(BASIC, two("nearswap", base="base", params={"t": 0.0001})),
    "della": Case(BASIC, two("della", base="ft_b", params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
                  differs=RANDOM),
    "della_invalid_epsilon": Case(BASIC, two("della", base="ft_b", params={"density": 0.66, "epsilon": 1.35,
                                                                           "lambda": 0.5}), refused="epsilon"),
    "karcher": Case(BASIC, two("karcher", base="ft_b", params={"max_iter": 5, "tol": 1e-5})),
    # the same merges of a LLaVA (vision tower + projector + Llama decoder), `models:` form
    "vlm_linear": Case(BASIC, two("linear", "vlm_a", "vlm_b")),
    "vlm_slerp": Case(BASIC, lambda m: {**two("slerp", "vlm_a", "vlm_b", "vlm_a")(m), "parameters": {"t": 0.35}}),
    **{f"vlm_nuslerp_{'base' if c else 'nobase'}_row{int(rw)}_flat{int(fl)}":
       Case(BASIC, two("nuslerp", "vlm_a", "vlm_b", c, {"nuslerp_row_wise": rw, "nuslerp_flatten": fl}))
       for c in (None, "vlm_c") for rw in (False, True) for fl in (False, True)},
    "vlm_nuslerp_zero_sum": Case(BASIC, _nuslerp_zero("vlm_a", "vlm_b", "vlm_c")),
    "vlm_task_arithmetic": Case(BASIC, two("task_arithmetic", "vlm_a", "vlm_b", "vlm_c")),
    "vlm_breadcrumbs": Case(BASIC, two("breadcrumbs", "vlm_a", "vlm_b", "vlm_c")),
    "vlm_ties": Case(BASIC, two("ties", "vlm_a", "vlm_b", "vlm_c", {"density": 0.3}), differs=TIE),
    "vlm_dare_ties": Case(BASIC, two("dare_ties", "vlm_a", "vlm_b", "vlm_c", {"density": 0.66}), differs=RANDOM),
    "vlm_model_stock": Case(BASIC, two("model_stock", "vlm_b", "vlm_c", "vlm_a")),
    "vlm_model_stock_filterwise": Case(BASIC, two("model_stock", "vlm_b", "vlm_c", "vlm_a", {"filter_wise": True})),
    # tests/test_chat_template.py
    "chat_template_chatml": Case("tests/test_chat_template.py", _chat("chatml")),
    "chat_template_literal": Case("tests/test_chat_template.py", _chat("{{messages[0]['content']}}")),
    # tests/test_tokenizer.py
    "tokenizer_legacy": Case("tests/test_tokenizer.py", _tok(["tok_base", "tok_padded", "tok_chatml"]),
                             refused="shape"),
    "tokenizer_source_base": Case("tests/test_tokenizer.py",
                                  _tok(["tok_base", "tok_padded", "tok_chatml"], source="base")),
    "tokenizer_source_union": Case("tests/test_tokenizer.py",
                                   _tok(["tok_base", "tok_padded", "tok_chatml"], source="union")),
    "tokenizer_source_model": Case("tests/test_tokenizer.py",
                                   _tok(["tok_base", "tok_padded", "tok_chatml"], source="tok_chatml")),
    "tokenizer_slerp_union": Case("tests/test_tokenizer.py",
                                  _tok(["tok_base", "tok_chatml"], method="slerp", source="union", t=0.5)),
    "tokenizer_force_token": Case("tests/test_tokenizer.py", _tok(
        ["tok_base", "tok_chatml"], tokenizer=lambda m: {"source": "union", "tokens": {
            "_tok_10": {"source": m["tok_chatml"], "force": True},
            "_tok_11": {"source": m["tok_base"], "force": True}}})),
    "tokenizer_model_token_id": Case("tests/test_tokenizer.py", _tok(
        ["tok_base", "tok_chatml"], tokenizer=lambda m: {"source": "base", "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": m["tok_chatml"], "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": m["tok_base"], "token": "<s>"}, "force": True}}})),
    "tokenizer_pad_to_multiple_of": Case("tests/test_tokenizer.py", _tok(
        ["tok_chatml"], base="tok_chatml", tokenizer=lambda m: {"source": "base", "pad_to_multiple_of": 16})),
}


# -- running both ------------------------------------------------------------------------------
def _mergekit(recipe: dict | Path, out: Path, cwd: Path | None = None):
    """mergekit's run_merge in-process; returns None or the exception it raised."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        import yaml

        data = yaml.safe_load(Path(recipe).read_text()) if isinstance(recipe, Path) else recipe
        run_merge(MergeConfiguration.model_validate(data), str(out),
                  MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, device="cpu"))
        return None
    except Exception as e:  # noqa: BLE001 - the error is what the refused cases compare
        return e
    finally:
        os.chdir(here)


def _ours(recipe: dict, out: Path):
    from mergeline.merge.executor import run_merge

    try:
        run_merge(recipe, out, device="cpu", progress=False, lineage=False)
        return None
    except Exception as e:  # noqa: BLE001
        return e


def assert_same_tensors(ours_dir: Path, theirs_dir: Path, dtype: str | None, what: str,
                        skip: dict[str, torch.Tensor] | None = None, cast: bool = False) -> None:
    """Same names, dtypes, shapes and values within one rounding of `dtype`, except at the
    entries `skip` marks (per tensor, a bool mask). `cast`: mergekit's float32 tensors are
    first rounded to our dtype (F32_OUT)."""
    theirs, ours = read_all(theirs_dir), read_all(ours_dir)
    assert set(ours) == set(theirs), f"{what}: tensor names differ: {sorted(set(ours) ^ set(theirs))[:4]}"
    rtol = RTOL[dtype]
    for k in theirs:
        if cast:
            assert theirs[k].dtype == torch.float32 and ours[k].dtype == getattr(torch, dtype), f"{what} {k}"
            theirs[k] = theirs[k].to(ours[k].dtype)
        assert ours[k].dtype == theirs[k].dtype, f"{what} {k}: {ours[k].dtype} vs {theirs[k].dtype}"
        assert ours[k].shape == theirs[k].shape, f"{what} {k}: {ours[k].shape} vs {theirs[k].shape}"
        a, b = ours[k].double(), theirs[k].double()
        if skip is not None and k in skip:
            a, b = a[~skip[k]], b[~skip[k]]
        # one rounding of the compute dtype, relative to the tensor's scale (a sum that cancels
        # to near zero carries the rounding of its terms)
        bound = rtol * max(b.abs().max().item(), 1e-12)
        worst = (a - b).abs().max().item()
        assert worst <= bound, f"{what} {k}: differs by {worst:.3g} > {bound:.3g} ({dtype} rounding)"


def _side_files(ours_dir: Path, theirs_dir: Path, what: str) -> None:
    """The config's layer and vocabulary sizes, the vocabulary and the chat template agree."""
    oc, tc = (json.loads((d / "config.json").read_text()) for d in (ours_dir, theirs_dir))
    for key in ("num_hidden_layers", "n_layer", "vocab_size"):
        assert oc.get(key) == tc.get(key), f"{what}: config {key} {oc.get(key)} vs {tc.get(key)}"
    if (theirs_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        to, tt = AutoTokenizer.from_pretrained(ours_dir), AutoTokenizer.from_pretrained(theirs_dir)
        assert to.get_vocab() == tt.get_vocab(), f"{what}: vocabularies differ"
        assert (to.chat_template or None) == (tt.chat_template or None), f"{what}: chat templates differ"


@pytest.mark.parametrize("name", list(CASES))
def test_mergekit_suite_case(name, zoo, tmp_path):
    case = CASES[name]
    recipe = case.recipe(zoo)
    theirs_err = _mergekit(recipe, tmp_path / "theirs")
    ours_err = _ours(recipe, tmp_path / "ours")
    if case.refused is not None:  # mergekit's suite expects this configuration to fail: both refuse it
        assert theirs_err is not None and ours_err is not None, f"{name}: mergekit {theirs_err!r}, mergeline {ours_err!r}"
        assert case.refused in str(ours_err), f"{name}: mergeline's refusal does not name {case.refused!r}: {ours_err}"
        assert not (tmp_path / "ours").exists(), f"{name}: a refused merge left an output behind"
        return
    assert theirs_err is None, f"{name}: mergekit failed: {theirs_err!r}"
    assert ours_err is None, f"{name}: mergeline failed: {ours_err}"
    _side_files(tmp_path / "ours", tmp_path / "theirs", name)
    if case.differs is not None:
        _documented_difference(name, case.differs, recipe, tmp_path)
        return
    assert_same_tensors(tmp_path / "ours", tmp_path / "theirs", recipe.get("dtype"), name)


def _documented_difference(name, differs: str, recipe, tmp_path, cwd: Path | None = None) -> None:
    """Each documented difference allows only what it says:
    TIE: entries differ only where some model's |delta| ties at its trim threshold;
    F32_OUT: our tensors are mergekit's float32 ones rounded to the recipe's dtype, bit for bit;
    RANDOM: at density 1 (nothing dropped, nothing random) both agree, and the recipe's
    density does drop something."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    if differs == TIE:
        ties = tie_positions(recipe, cwd)
        assert_same_tensors(ours, theirs, recipe.get("dtype"), name, skip=ties)
        a, b = read_all(ours), read_all(theirs)
        differ = sum(int((a[k] != b[k]).sum()) for k in ties)
        print(f"{name}: {differ} entries differ, all at {sum(int(m.sum()) for m in ties.values())} tied positions")
        return
    if differs == F32_OUT:
        assert_same_tensors(ours, theirs, recipe.get("dtype"), name, cast=True)
        return
    assert differs == RANDOM
    full = copy.deepcopy(recipe)
    full["parameters"] = {**full.get("parameters", {}), "density": 1.0}
    full["parameters"].pop("epsilon", None)
    assert _mergekit(full, tmp_path / "theirs_full") is None
    assert _ours(full, tmp_path / "ours_full") is None
    assert_same_tensors(tmp_path / "ours_full", tmp_path / "theirs_full", full.get("dtype"), name + " at density 1")
    dropped = read_all(tmp_path / "ours")
    kept = read_all(tmp_path / "ours_full")
    assert any(not torch.equal(dropped[k], kept[k]) for k in kept), f"{name}: density {recipe['parameters']} had no effect"


def tie_positions(recipe: dict, cwd: Path | None) -> dict[str, torch.Tensor]:
    """Per tensor, the entries where some model's |delta| (in the recipe's dtype, as both compute
    it) equals its k-th largest, k = int(density * numel): where the choice among tied
    magnitudes decides what TIES keeps. Scalar densities only (those of the swept recipes)."""
    path = lambda ref: Path(ref) if cwd is None else cwd / ref  # noqa: E731
    dtype = getattr(torch, recipe.get("dtype") or "float32")
    base = read_all(path(recipe["base_model"]))
    global_density = (recipe.get("parameters") or {}).get("density", 1.0)
    models = [(read_all(path(m["model"])), (m.get("parameters") or {}).get("density", global_density))
              for m in recipe["models"] if m["model"] != recipe["base_model"]]
    out = {}
    for k, b in base.items():
        mask = torch.zeros(b.shape, dtype=torch.bool)
        for tensors, density in models:
            delta = (tensors[k].to(dtype) - b.to(dtype)).abs()
            n = int(density * delta.numel())
            if 0 < n < delta.numel():
                mask |= delta == delta.flatten().topk(n).values[-1]
        out[k] = mask
    return out


# -- mergekit's examples/, as adapted in configs/recipes/, through the CLI ------------------------
EXAMPLES = {  # mergekit's examples/*.yml -> the adapted copy (local paths, tiny models)
    "arcee_fusion.yml": "arcee_fusion.yaml", "bio-merge.yml": "bio-merge.yaml",
    "gradient-slerp.yml": "gradient-slerp.yaml", "linear.yml": "linear.yaml", "ties.yml": "ties.yaml",
    "orcamini-platy-44layer.yml": "frankenmerge/orcamini-platy-44layer.yaml",
}
EXAMPLE_DIFFERS = {"arcee_fusion.yml": F32_OUT, "bio-merge.yml": TIE, "ties.yml": TIE}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_mergekit_example(example, recipe_models, tmp_path, monkeypatch):
    """`recipe_models`: models/base, ft_a, ft_b and ft_c (tests/conftest.py), as configs/recipes/*.yaml expect."""
    import yaml
    from typer.testing import CliRunner

    from mergeline.flows.cli import app

    recipe = ROOT / "configs" / "recipes" / EXAMPLES[example]
    shutil.copy(recipe, recipe_models / "recipe.yaml")
    err = _mergekit(recipe_models / "recipe.yaml", tmp_path / "theirs", cwd=recipe_models)
    assert err is None, f"{example}: mergekit failed: {err!r}"
    with monkeypatch.context() as m:
        m.chdir(recipe_models)
        result = CliRunner().invoke(app, ["merge", "recipe.yaml", str(tmp_path / "ours"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(recipe.read_text())
    _side_files(tmp_path / "ours", tmp_path / "theirs", example)
    if example in EXAMPLE_DIFFERS:
        _documented_difference(example, EXAMPLE_DIFFERS[example], data, tmp_path, cwd=recipe_models)
        return
    assert_same_tensors(tmp_path / "ours", tmp_path / "theirs", data.get("dtype"), example)


def test_every_configuration_is_swept():
    """The count the README gives: configurations of mergekit's suite and examples swept here."""
    assert len(CASES) + len(EXAMPLES) == 65
    differs = [c.differs for c in CASES.values() if c.differs] + list(EXAMPLE_DIFFERS.values())
    assert {r: differs.count(r) for r in (RANDOM, TIE, F32_OUT)} == {RANDOM: 3, TIE: 4, F32_OUT: 3}
    assert sum(c.refused is not None for c in CASES.values()) == 2
