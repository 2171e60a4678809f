"""Exit codes and one-line errors of the CLI (issue #10, #11): bad input is refused in one line
naming the file (exit 2), an unexpected error exits 4 with its traceback in a log file, the
help lists the codes. All in-process or before any heavy work: seconds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergeline.flows.cli import app
from mergeline.flows.errors import exit_code_for

runner = CliRunner()
MERGELINE = str(Path(sys.executable).parent / "mergeline")
LATIN1 = "# r\xe9glage\nmerge_method: ties\n".encode("latin-1")  # not UTF-8


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_help_lists_exit_codes():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for words in ("0 success or GO", "1 NO-GO", "2 unusable input", "3 INCONCLUSIVE", "4 unexpected", "143"):
        assert words in " ".join(r.output.split()), words


def test_verdicts_map_to_exit_codes():
    assert [exit_code_for(v) for v in ("GO", "NO-GO", "INCONCLUSIVE", "no-go")] == [0, 1, 3, 1]
    assert exit_code_for("MAYBE") == 4  # never 0 or 1 for a verdict nobody knows


def test_unexpected_error_exits_4_with_one_line_and_a_log(monkeypatch, tmp_path):
    from mergeline.flows import demo

    def crash(*args, **kwargs):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr(demo, "run_demo", crash)
    monkeypatch.setenv("MERGELINE_LOG_DIR", str(tmp_path / "logs"))
    r = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 4, r.output
    lines = _lines(r.output)
    assert len(lines) == 1 and lines[0].startswith("error: RuntimeError: something nobody planned for")
    log = Path(lines[0].split("(traceback in ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "crash" in log.read_text()


@pytest.mark.parametrize("command", [["check", "{f}"], ["merge", "{f}", "{tmp}/out"], ["run", "{f}"],
                                     ["evaluate", "{tmp}", "--suite", "{f}"], ["gate", "{tmp}/r.json", "--policy", "{f}"]])
def test_file_not_utf8_is_one_line(command, tmp_path):
    f = tmp_path / "config.yaml"
    f.write_bytes(LATIN1)
    (tmp_path / "r.json").write_text("{}")
    r = runner.invoke(app, [c.format(f=f, tmp=tmp_path) for c in command])
    assert r.exit_code == 2, r.output
    lines = _lines(r.output)
    assert len(lines) == 1 and str(f) in lines[0] and "not UTF-8" in lines[0] and "line 1" in lines[0], lines


@pytest.mark.parametrize("text, line", [("merge_method: ties\nmodels: [a, b\n", 3),
                                        ("a: 1\n  b: 2\n", 2), ("key: 'unclosed\n", 2), ("\tx: 1\n", 1)])
def test_yaml_syntax_error_is_one_line_with_its_place(text, line, tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    r = runner.invoke(app, ["check", str(f)])
    assert r.exit_code == 2, r.output
    lines = _lines(r.output)
    assert len(lines) == 1 and f"at line {line}," in lines[0] and str(f) in lines[0] and "not valid YAML" in lines[0], lines


def test_pipeline_naming_a_bad_file_is_refused_before_work(tmp_path):
    """A pipeline whose recipe (a file it names) is not UTF-8, or whose own YAML is broken."""
    (tmp_path / "recipe.yaml").write_bytes(LATIN1)
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "recipe": "recipe.yaml",
                                 "eval_suite": {}, "gate_policy": {}}))
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2 and len(_lines(r.output)) == 1, r.output
    assert "recipe.yaml" in r.output and "not UTF-8" in r.output and "'recipe'" in r.output
    assert not (tmp_path / "w").exists()
    p.write_text("name: x\nrecipe: {merge_method: ties\n")
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2 and len(_lines(r.output)) == 1 and str(p) in r.output and "at line 3," in r.output, r.output


@pytest.mark.parametrize("uri, setting", [("ftp://example.org/mlruns", "MLFLOW_TRACKING_URI"),
                                          ("gopher://x", "MLFLOW_TRACKING_URI")])
def test_unsupported_tracking_uri_refused_by_name(uri, setting, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "w"), "gate_policy": {},
        "recipe": {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_a"])},
                                                        {"model": str(tiny_models["ft_b"])}]},
        "eval_suite": {"retention": {"ft_a": ["t"]}}}))
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2, r.output
    assert len(_lines(r.output)) == 1 and setting in r.output and uri.split(":")[0] + "://" in r.output
    assert not (tmp_path / "w" / "mlflow.db").exists()
    # the same in the pipeline file's own key
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    data = yaml.safe_load(p.read_text())
    data["tracking"] = {"mlflow_tracking_uri": uri}
    p.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2 and "tracking.mlflow_tracking_uri" in r.output, r.output


def test_lineage_by_alias_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = runner.invoke(app, ["lineage", "mergeline-demo@champion"])
    assert r.exit_code == 2 and "--tracking-uri" in r.output, r.output
    r = runner.invoke(app, ["lineage", "mergeline-demo@champion", "--tracking-uri", "sqlite:///nowhere/m.db"])
    assert r.exit_code == 2 and "no MLflow store" in r.output, r.output
    assert list(tmp_path.rglob("*")) == []  # no mlflow.db, no folder


def test_usage_error_keeps_click_code():
    """A usage error stays click's 2 (not 4), without a traceback."""
    r = subprocess.run([MERGELINE, "gate"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_example_recipe_without_models_says_how_to_fill_them(monkeypatch):
    """`mergeline check configs/recipes/ties.yaml` from a fresh checkout: no models/ folder."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    r = runner.invoke(app, ["check", "configs/recipes/ties.yaml"])
    assert r.exit_code == 2 and len(_lines(r.output)) == 1, r.output
    assert "mergeline zoo recipes DIR" in r.output
