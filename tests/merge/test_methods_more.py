"""The methods beyond TIES and its family: hand-computed cases and properties, their typed
parameters, the model counts they take (checked when the recipe is read), the lenient handling
of another method's parameters, and the chat-template presets.

Run: python -m pytest tests/merge/test_methods_more.py -q
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from mergeline.merge.methods import METHODS, get_method
from mergeline.merge.recipe import RecipeError, load_recipe

NEW = ["passthrough", "model_stock", "nuslerp", "multislerp", "sce", "karcher", "nearswap", "arcee_fusion",
       "ram", "ramplus_tl"]


def run(name, base, models, per_model=None, **globals_):
    m = get_method(name)
    per_model = per_model or [{}] * len(models)
    return m.fn(base, models, [m.model_params(**p) for p in per_model], m.global_params.model_validate(globals_))


def test_registered_with_typed_parameters_that_refuse_unknown_keys():
    assert set(NEW) <= set(METHODS)
    with pytest.raises(Exception, match="select_top"):
        METHODS["sce"].global_params(select_top=0.5)
    with pytest.raises(Exception, match="select_topk"):
        METHODS["sce"].global_params(select_topk=1.5)
    with pytest.raises(Exception, match="scal"):
        METHODS["passthrough"].model_params(scal=2)
    with pytest.raises(Exception, match="t"):
        METHODS["nearswap"].global_params()  # t is required, as in mergekit
    g = METHODS["ramplus_tl"].global_params()
    assert (g.r, g.alpha, g.epsilon) == (0.1, 0.2, 1e-5)
    assert METHODS["arcee_fusion"].randomized and not METHODS["sce"].randomized


# Parameters mergeline adds to a mergekit method: TIES' validation-guided sign election.
MERGELINE_ONLY = {"ties": {"sign_source", "sign_choices"}}


def test_methods_parameter_names_defaults_and_model_counts_are_mergekits():
    """Every method mergekit 0.1.5 registers, with its parameters, defaults and input contract;
    mergeline's own additions (MERGELINE_ONLY) are the only extra names."""
    mk = pytest.importorskip("mergekit.merge_methods", reason="mergekit (test extra) is the yardstick")
    from mergekit.merge_methods.base import MISSING

    assert set(METHODS) == {m.spec.name for m in mk.registered_methods()}
    for name in METHODS:
        ours = {(f.alias or n): (None if f.is_required() else f.default)
                for cls in (METHODS[name].model_params, METHODS[name].global_params)
                for n, f in cls.model_fields.items()
                if (f.alias or n) not in MERGELINE_ONLY.get(name, ())}
        theirs = {p.name: (None if p.default is MISSING else p.default) for p in mk.get(name).spec.parameters}
        assert ours == theirs, name
        c, ic = METHODS[name].inputs, mk.get(name).spec.contract
        assert (c.base, c.min_models, c.max_models, c.min_others, c.max_others) == (
            ic.base.value, ic.min_inputs, ic.max_inputs, ic.min_non_base, ic.max_non_base), name


def test_passthrough_copies_or_scales_the_one_model():
    x = torch.tensor([1.0, -2.0])
    assert run("passthrough", None, [x]).tensor.tolist() == [1.0, -2.0]
    assert run("passthrough", None, [x], [{"scale": 0.5}]).tensor.tolist() == [0.5, -1.0]


def test_model_stock_ratio_follows_the_angle():
    base = torch.zeros(4)
    # orthogonal task vectors: cos = 0, t = 0 -> the base
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    assert run("model_stock", base, [a, b]).tensor.tolist() == [0, 0, 0, 0]
    # cos = 0.5 with two models: t = 2 * 0.5 / 1.5 = 2/3 of the average
    c = torch.tensor([0.5, math.sqrt(3) / 2, 0, 0])
    out = run("model_stock", base, [a, c]).tensor
    torch.testing.assert_close(out, (2 / 3) * (a + c) / 2)
    # filter_wise: one ratio per row
    rows = run("model_stock", torch.zeros(2, 4), [torch.stack([a, a]), torch.stack([b, a])], filter_wise=True).tensor
    torch.testing.assert_close(rows, torch.stack([torch.zeros(4), a]))


def test_nuslerp_weights_set_t_and_zero_sum_means_halfway():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("nuslerp", None, [v0, v1], [{"weight": 1.0}, {"weight": 1.0}]).tensor
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    zero = run("nuslerp", None, [v0, v1], [{"weight": 1.0}, {"weight": -1.0}]).tensor
    torch.testing.assert_close(zero, out)
    out = run("nuslerp", None, [v0, v1], [{"weight": 2.0}, {"weight": 1.0}]).tensor  # t = 1/3
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # with a base: interpolates the task vectors
    base = torch.tensor([5.0, 5.0])
    out = run("nuslerp", base, [base + v0, base + v1], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out.tensor, base + torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert out.stats is not None


def test_nuslerp_row_wise_and_column_wise():
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    w = [{"weight": 1.0}, {"weight": 1.0}]
    cols = run("nuslerp", None, [v0, v1], w, nuslerp_flatten=False).tensor  # per row (last dim)
    torch.testing.assert_close(cols[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(cols[1], torch.tensor([0.0, 1.0]))  # colinear row: lerp
    # nuslerp_row_wise: along the first dimension, so per column; column 0 is e_1 -> e_2 here
    v1 = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    rows = run("nuslerp", None, [v0, v1], w, nuslerp_flatten=False, nuslerp_row_wise=True).tensor
    torch.testing.assert_close(rows[:, 0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(rows[:, 1], (v0[:, 1] + v1[:, 1]) / 2)  # colinear column: lerp


def test_multislerp_one_model_and_two_orthogonal():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(run("multislerp", None, [a], [{"weight": 1.0}]).tensor, a)
    out = run("multislerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}]).tensor
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="antipodal"):
        run("multislerp", None, [a, -a, b], [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])


def test_sce_selects_by_variance_elects_signs_and_counts_them():
    base = torch.zeros(3)
    # column 0: opposite signs (+0.4, -0.3): elected +, model 1 dropped
    # column 1: same value in both: zero variance -> not selected at select_topk < 1
    m1, m2 = torch.tensor([0.4, 0.2, 0.1]), torch.tensor([-0.3, 0.2, 0.5])
    out = run("sce", base, [m1, m2])
    w1, w2 = (m1.square().mean(), m2.square().mean())
    torch.testing.assert_close(out.tensor[0], torch.tensor(0.4))
    torch.testing.assert_close(out.tensor[2], (w1 * 0.1 + w2 * 0.5) / (w1 + w2))
    s = out.stats
    assert [m.kept for m in s.models] == [3, 3]
    assert [m.dropped_by_election for m in s.models] == [0, 1]
    assert s.models[1].dropped_magnitude == pytest.approx(0.3)
    assert s.conflict_positions == 1 and s.positions_with_kept == 3
    top = run("sce", base, [m1, m2], select_topk=0.5)  # 2 nonzero variances -> keep k = 1: column 0
    assert top.tensor.tolist()[1:] == [0.0, 0.0]
    assert [m.kept for m in top.stats.models] == [1, 1]


def test_karcher_of_two_directions_is_the_bisector_at_the_mean_norm():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    out = run("karcher", None, [a, b], max_iter=20).tensor
    torch.testing.assert_close(out, 3.0 * torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-5, rtol=0)
    assert torch.equal(run("karcher", None, [a]).tensor, a)


def test_nearswap_swaps_only_near_entries():
    base = torch.tensor([0.0, 0.0, 0.0])
    other = torch.tensor([0.05, 0.2, 1.0])
    out = run("nearswap", base, [other], t=0.1).tensor
    # weight = clamp(t / |diff|, 0, 1): 1 (swap), 0.5, 0.1
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, 0.1]))


def test_ram_keeps_unique_updates_whole_and_averages_shared_ones():
    base = torch.zeros(3)
    m1, m2 = torch.tensor([0.4, 0.2, 0.0]), torch.tensor([0.0, 0.6, 0.3])
    out = run("ram", base, [m1, m2])
    torch.testing.assert_close(out.tensor, torch.tensor([0.4, 0.4, 0.3]))
    assert [m.kept for m in out.stats.models] == [2, 2] and out.stats.positions_with_kept == 3
    # RAM+: unique entries scaled by 1 + r * clamp(shared / unique, 0, alpha); here 1 shared, 1 unique each
    plus = run("ramplus_tl", base, [m1, m2], r=0.5, alpha=0.4).tensor
    torch.testing.assert_close(plus, torch.tensor([0.4 * 1.2, 0.4, 0.3 * 1.2]))


def test_arcee_fusion_keeps_only_outlying_changes_and_counts_them():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    other = base + 0.01 * torch.randn(64, 32, generator=g)
    other[3, 7] += 5.0  # one large, important change
    out = run("arcee_fusion", base, [other])
    changed = out.tensor != base
    assert bool(changed[3, 7]) and out.tensor[3, 7] == other[3, 7]
    assert 0 < int(changed.sum()) < base.numel() // 4
    assert out.stats.models[0].kept == int(changed.sum())


def test_arcee_fusion_sample_is_reproducible_from_the_generator():
    """Above 1M entries the quantiles come from a sample: the same seed gives the same merge."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1100, 1000, generator=g)
    other = base + torch.randn(1100, 1000, generator=g) * torch.rand(1100, 1000, generator=g) ** 4
    m = get_method("arcee_fusion")
    merged = [m.fn(base, [other], [m.model_params()], m.global_params(),
                   generator=torch.Generator().manual_seed(s)).tensor for s in (7, 7, 8)]
    assert torch.equal(merged[0], merged[1])
    assert not torch.equal(merged[0], merged[2])


# -- recipes: model counts, lenient parameters, chat templates ---------------------------
def recipe(method, models, base="b", **params):
    r = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base:
        r["base_model"] = base
    if params:
        r["parameters"] = params
    return r


def error(r) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("r, words", [
    (recipe("slerp", ["b", "x", "y"], t=0.5), ["'slerp'", "exactly 2", "got 3"]),
    (recipe("nearswap", ["b", "x", "y"], t=0.5), ["'nearswap'", "exactly 2", "got 3"]),
    (recipe("arcee_fusion", ["x", "y"]), ["'arcee_fusion'", "exactly 2", "got 3"]),
    (recipe("model_stock", ["b", "x"]), ["'model_stock'", "at least 3", "got 2"]),
    (recipe("nuslerp", ["x", "y", "z"], weight=1.0), ["'nuslerp'", "exactly 2 models besides the base", "got 3"]),
    (recipe("nuslerp", ["x"], base=None, weight=1.0), ["'nuslerp'", "exactly 2", "got 1"]),
    (recipe("passthrough", ["x", "y"], base=None), ["'passthrough'", "exactly 1 model,", "got 2"]),
    (recipe("passthrough", ["x"]), ["'passthrough'", "exactly 1 model,", "got 2"]),  # mergekit adds the base
    (recipe("sce", ["x", "y"], base=None), ["'sce'", "base_model"]),
])
def test_model_count_is_refused_in_one_line_before_any_model_is_read(r, words):
    msg = error(r)  # the models do not exist: the count is judged first
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("r", [
    recipe("nuslerp", ["x", "y"], base=None, weight=1.0),
    recipe("nuslerp", ["x", "y"], weight=1.0),
    recipe("multislerp", ["x", "y", "z"], base=None, weight=1.0),
    recipe("model_stock", ["x", "y"]),
    recipe("passthrough", ["x"], base=None, scale=0.5),
    recipe("karcher", ["x", "y"], base=None, max_iter=3),
    recipe("nearswap", ["x"], t=0.001),
    recipe("sce", ["x", "y"], select_topk=0.1),
    recipe("ramplus_tl", ["x", "y"], r=0.2, alpha=0.3),
])
def test_recipes_mergekit_accepts_are_read(r):
    load_recipe(r)


def test_another_methods_parameter_is_a_warning_naming_the_key(caplog):
    r = recipe("slerp", ["b", "x"], t=0.5, weight=1.0)  # as in mergekit's own tests
    with caplog.at_level(logging.WARNING, logger="mergeline.merge.recipe_checks"):
        load_recipe(r)
    assert any("'weight'" in rec.getMessage() and "slerp" in rec.getMessage() for rec in caplog.records)
    r = recipe("ties", ["x"], weight=1.0)
    r["models"][0]["parameters"] = {"weight": 1.0, "t": 0.3}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergeline.merge.recipe_checks"):
        load_recipe(r)
    assert any("models[0].parameters.t" in rec.getMessage() for rec in caplog.records)


def test_a_key_no_method_takes_is_still_refused():
    msg = error(recipe("slerp", ["b", "x"], t=0.5, wieght=1.0))
    assert "wieght" in msg and "slerp" in msg
    r = recipe("nuslerp", ["x", "y"], base=None)
    r["models"][0]["parameters"] = {"weight": 1.0, "weigth": 2}
    r["models"][1]["parameters"] = {"weight": 1.0}
    assert "weigth" in error(r)


def test_chat_template_presets_are_mergekits_byte_for_byte():
    pytest.importorskip("mergekit", reason="mergekit (test extra) is the yardstick")
    from importlib.resources import files

    from mergekit._data import chat_templates

    from mergeline.merge.chat_templates import PRESETS

    theirs = {p.name.removesuffix(".jinja"): p.read_bytes() for p in files(chat_templates).iterdir()
              if p.name.endswith(".jinja")}
    assert set(PRESETS) == set(theirs)
    for name, text in PRESETS.items():
        assert text.encode("utf-8") == theirs[name], name


def test_chat_template_setting_is_checked_when_the_recipe_is_read():
    for ok in ("auto", "chatml", "llama3", "{{ messages[0]['content'] }}", "{% for m in messages %}{% endfor %}"):
        load_recipe(recipe("ties", ["x"], weight=1.0) | {"chat_template": ok})
    msg = error(recipe("ties", ["x"], weight=1.0) | {"chat_template": "chatm"})
    assert "chatm" in msg and "chatml" in msg and "Jinja" in msg


def test_writer_writes_the_preset_text_unchanged(tmp_path):
    from mergeline.merge.chat_templates import PRESETS
    from mergeline.merge.writer import OutputError, write_chat_template

    for name in PRESETS:
        write_chat_template(tmp_path, name, [])
        assert (tmp_path / "chat_template.jinja").read_bytes() == PRESETS[name].encode("utf-8")
    literal = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    write_chat_template(tmp_path, literal, [])
    assert (tmp_path / "chat_template.jinja").read_text() == literal
    with pytest.raises(OutputError, match="chatm"):
        write_chat_template(tmp_path, "chatm", [])


DEGENERATE = {  # name: (takes a base, models, per-model parameters, global parameters)
    "passthrough": (False, 1, [{}], {}), "model_stock": (True, 2, [{}] * 2, {}),
    "nuslerp": (True, 2, [{"weight": 1.0}] * 2, {}), "multislerp": (True, 2, [{"weight": 1.0}] * 2, {}),
    "sce": (True, 2, [{}] * 2, {"select_topk": 0.5}), "karcher": (False, 3, [{}] * 3, {}),
    "nearswap": (True, 1, [{}], {"t": 0.1}), "arcee_fusion": (True, 1, [{}], {}),
    "ram": (True, 2, [{}] * 2, {}), "ramplus_tl": (True, 2, [{}] * 2, {}),
}


@pytest.mark.parametrize("shape", [(0,), (0, 5), (), (1,)])
@pytest.mark.parametrize("name", NEW)
def test_degenerate_shapes(name, shape):
    with_base, n, per, glob = DEGENERATE[name]
    base = torch.zeros(shape, dtype=torch.bfloat16)
    models = [torch.full(shape, v, dtype=torch.bfloat16) for v in (0.5, -0.25, 0.125)][:n]
    m = get_method(name)
    r = m.fn(base if with_base else None, models, [m.model_params(**p) for p in per], m.global_params(**glob),
             generator=torch.Generator().manual_seed(0))
    assert r.tensor.shape == base.shape and r.tensor.dtype == base.dtype


def test_arcee_fusion_merge_is_reproducible_from_the_seed(tmp_path):
    """Through the executor: a tensor over 1M entries (sampled quantiles) merges to the same bytes
    for the same --seed, and differently for another seed."""
    import json

    from safetensors.torch import save_file

    from mergeline.merge.executor import run_merge

    vocab, hidden = 70_000, 16
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "vocab_size": vocab, "max_position_embeddings": 64, "tie_word_embeddings": True}
    g = torch.Generator().manual_seed(3)
    base = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for name, scale in (("base", 0.0), ("ft", 1.0)):
        (tmp_path / name).mkdir()
        noise = {k: scale * torch.randn(v.shape, generator=g) * torch.rand(v.shape, generator=g) ** 4 for k, v in base.items()}
        save_file({k: (v + noise[k]).contiguous() for k, v in base.items()}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    r = {"merge_method": "arcee_fusion", "base_model": str(tmp_path / "base"), "models": [{"model": str(tmp_path / "ft")}]}
    outs = [run_merge(r, tmp_path / f"out{i}", seed=s, progress=False).path / "model.safetensors"
            for i, s in enumerate((0, 0, 1))]
    data = [p.read_bytes() for p in outs]
    assert data[0] == data[1] and data[0] != data[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NEW)
def test_inputs_are_never_modified(name, dtype):
    """The executor lends its read buffers: a method (and its statistics) must not write into them."""
    with_base, n, per, glob = DEGENERATE[name]
    g = torch.Generator().manual_seed(11)
    base = torch.randn(40, 24, generator=g).to(dtype)
    models = [(base.float() + 0.3 * torch.randn(40, 24, generator=g)).to(dtype) for _ in range(n)]
    before = [base.clone(), *(m.clone() for m in models)]
    m = get_method(name)
    m.fn(base if with_base else None, models, [m.model_params(**p) for p in per], m.global_params(**glob),
         generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, [base, *models]))


def test_weights_summing_to_zero_refused_where_multislerp_normalizes_them_and_allowed_for_nuslerp():
    r = recipe("multislerp", ["x", "y"], base=None)
    r["models"][0]["parameters"], r["models"][1]["parameters"] = {"weight": 0.5}, {"weight": -0.5}
    msg = error(r)
    assert "sum to zero" in msg and "normalize_weights" in msg
    r["parameters"] = {"normalize_weights": False}
    load_recipe(r)
    load_recipe(r | {"merge_method": "nuslerp", "parameters": {}})  # nuslerp: halfway, as mergekit
