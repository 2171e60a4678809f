"""`mergeline lineage` on a real merge of merges (two generations), by folder and by NAME@alias."""
import json

from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.tasks import tracking
from mergeline.tasks.merge_tasks import merge_key, merge_model
from mergeline.tasks.recipes import resolved_recipe

runner = CliRunner()


def _merge(name, base, models, out):
    recipe = resolved_recipe({"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
                              "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in models]})
    return merge_model.fn(name=name, recipe=recipe, models_dir=str(out), key=merge_key(recipe, 0))


def test_two_generation_lineage(tiny_models, tmp_path, monkeypatch):
    m = tiny_models
    first = _merge("gen1", m["base"], [m["ft_a"], m["ft_b"]], tmp_path / "models")
    second = _merge("gen2", m["base"], [first.path, m["ft_b"]], tmp_path / "models")

    r = runner.invoke(app, ["lineage", str(second.path)])
    assert r.exit_code == 0, r.output
    assert "gen2 [ties]" in r.output and "gen1 [ties]" in r.output
    assert r.output.count("parent: ft_b") == 2  # once per generation
    assert r.output.index("gen1") > r.output.index("gen2")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    tracking.ensure_experiment(c, "lineage", (tmp_path / "art").as_uri())
    tracking.register_folder(c, "gen2-model", str(second.path), None, {})
    r = runner.invoke(app, ["lineage", "gen2-model@candidate", "--json", "--tracking-uri", uri])
    assert r.exit_code == 0, r.output
    lin = json.loads(r.output)
    assert lin["content_hash"] == second.content_hash
    gen1 = next(p for p in lin["parents"] if p["name"].startswith("gen1"))
    assert gen1["lineage"]["content_hash"] == first.content_hash

    # without --tracking-uri: the store in the current folder that registered the name
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["lineage", "gen2-model@candidate", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["content_hash"] == second.content_hash, r.output

    r = runner.invoke(app, ["lineage", "gen2-model@champion", "--tracking-uri", uri])
    assert r.exit_code == 2 and "champion" in r.output
    r = runner.invoke(app, ["lineage", str(m["base"])])
    assert r.exit_code == 1 and "no lineage.json" in r.output
