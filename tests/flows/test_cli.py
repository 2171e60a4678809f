import subprocess
import sys
import time

from typer.testing import CliRunner

from mergeline.flows.cli import app

runner = CliRunner()
SUBCOMMANDS = ["demo", "zoo", "check", "merge", "evaluate", "gate", "run", "lineage", "schedule"]


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.time(); from mergeline.flows.cli import app; "
        "heavy=[m for m in ('torch','prefect','mlflow','lm_eval','transformers') if m in sys.modules]; "
        "print(heavy, time.time()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, seconds = out.rsplit(" ", 1)
    assert heavy == "[]", f"--help path imports {heavy}"
    assert float(seconds) < 1.0


def test_missing_argument_is_a_usage_error():
    result = runner.invoke(app, ["merge"])
    assert result.exit_code == 2
