"""lineage.json + model card, and the tree of a merge of merges (two generations)."""
import json
import shutil

from huggingface_hub import ModelCard

from mergeline.merge import lineage as L
from mergeline.merge.hashing import content_hash


def _model(root, name):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(name.encode() * 8)
    return d


def _merge(root, name, base, parents, method="ties"):
    out = _model(root, name)
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in parents]}
    lin = L.build_lineage(
        name=name, model_dir=out, recipe=recipe, method=method, seed=0,
        base=L.describe_input("base", str(base), base),
        parents=[L.describe_input(p.name, str(p), p) for p in parents], mlflow_run_id="r1")
    L.write_lineage(out, lin)
    return out


def test_lineage_file_and_model_card(tmp_path):
    base, a, b = (_model(tmp_path, n) for n in ("base", "a", "b"))
    out = _merge(tmp_path, "m1", base, [a, b])
    lin = json.loads((out / "lineage.json").read_text())
    assert lin["content_hash"] == content_hash(out)
    assert lin["base"]["content_hash"] == content_hash(base)
    assert [p["content_hash"] for p in lin["parents"]] == [content_hash(a), content_hash(b)]
    assert lin["recipe_hash"] == L.recipe_hash(json.loads(json.dumps(lin["recipe"])))
    assert lin["mlflow_run_id"] == "r1" and lin["method"] == "ties"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(base)
    assert "merge" in card.data.tags and "ties" in card.data.tags
    # the card and lineage are not part of the model's identity
    assert lin["content_hash"] == content_hash(out)


def two_generations(tree: dict) -> bool:
    """A merge (m2) of one merge (m1) of plain models, and of plain models."""
    merges = [c for c in tree["children"] if c["children"]]
    return len(merges) == 1 and not any(c["children"] for c in merges[0]["children"])


def test_two_generation_tree_survives_removed_intermediate(tmp_path):
    base, a, b, c = (_model(tmp_path, n) for n in ("base", "a", "b", "c"))
    m1 = _merge(tmp_path, "m1", base, [a, b])
    m2 = _merge(tmp_path, "m2", base, [m1, c], method="linear")
    t = L.tree(L.load_lineage(m2))
    assert two_generations(t)
    text = L.format_tree(t)
    for name in ("m2 [linear]", "m1 [ties]", "parent: a", "parent: b", "parent: c"):
        assert name in text, text
    shutil.rmtree(m1)  # embedded lineage keeps the first generation
    assert two_generations(L.tree(L.load_lineage(m2)))
