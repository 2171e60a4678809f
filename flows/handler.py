"""The one handler every `mergeline` command runs under, so that the exit codes hold
(flows/errors.py): unusable input exits 2 with one line; anything unexpected exits 4 with one
line and its traceback in a log file; Ctrl-C exits 130 and SIGTERM 143 after removing the run's
unfinished output folders; no command ends in a traceback on the screen, or in 0 or 1 on a crash.

    MERGELINE_LOG_DIR=/tmp/logs mergeline ...     # where tracebacks of unexpected errors go
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException  # usage errors are TyperExceptions

from mergeline.flows.errors import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM, EXIT_UNEXPECTED, one_line

err = Console(stderr=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print a one-line error and exit with `code`."""
    from rich.text import Text

    err.print(Text.assemble(("error:", "bold red"), " ", one_line(message)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- one handler for every command


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds like Ctrl-C (finally blocks run)."""


def _on_sigterm(signum, frame):
    raise _Interrupted()


def log_dir() -> Path:
    """Where tracebacks go: $MERGELINE_LOG_DIR, else a mergeline-logs folder in the temp dir."""
    import tempfile

    return Path(os.environ.get("MERGELINE_LOG_DIR") or Path(tempfile.gettempdir()) / "mergeline-logs")


def _unexpected(e: BaseException) -> None:
    """One line on stderr, the traceback in a log file; exit 4 (never 0 or 1)."""
    folder = log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mergeline-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"mergeline {' '.join(sys.argv[1:])}\n\n" + "".join(
            traceback.format_exception(type(e), e, e.__traceback__)), encoding="utf-8")
        where = str(path)
    except OSError as write_error:  # no writable log folder: the traceback goes to stderr instead
        traceback.print_exception(type(e), e, e.__traceback__)
        where = f"not written: {write_error}; printed above"
    err.print(f"error: {type(e).__name__}: {one_line(str(e))} (traceback in {where})",
              highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(EXIT_UNEXPECTED)


def _interrupted(e: KeyboardInterrupt) -> None:
    from mergeline.flows import workdir

    code, what = (EXIT_SIGTERM, "SIGTERM") if isinstance(e, _Interrupted) else (EXIT_SIGINT, "Ctrl-C")
    note = ""
    if workdir.active is not None or workdir.released is not None:
        work, removed = (workdir.active, []) if workdir.active is not None else workdir.released
        removed = removed + workdir.remove_staging(work, os.getpid())
        note = (f"; removed {len(removed)} unfinished output folder(s)" if removed else "") + \
               f"; rerun to resume from the stages that finished ({work})"
    err.print(f"interrupted ({what}): stopped{note}", highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(code)


def _check_file_params(params: dict) -> None:
    """Refuse a YAML file argument that is not UTF-8 or not YAML, in one line naming the file,
    before any command reads it (recipes, pipelines, suites, policies alike)."""
    from mergeline.flows.errors import InputError, check_yaml_file, read_text

    from mergeline.merge.config_files import short

    for name, value in params.items():
        if not isinstance(value, Path):
            continue
        try:
            is_file = value.is_file()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise InputError(f"{short(str(value))}: {name.replace('_', ' ')}: {e.strerror or e}") from None
        if is_file:
            if value.suffix in (".yaml", ".yml"):
                check_yaml_file(value, name.replace("_", " "))
            elif value.suffix == ".json":
                read_text(value, name.replace("_", " "))


class Commands(TyperGroup):
    """The handler every subcommand runs under: exit codes kept, no traceback on the screen."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, TyperGroup) and not getattr(cmd, "_checked", False):
            inner = cmd.invoke

            def invoke(sub_ctx, inner=inner):
                _check_file_params(sub_ctx.params)
                return inner(sub_ctx)

            cmd.invoke, cmd._checked = invoke, True
        return name, cmd, rest

    def invoke(self, ctx):
        if ctx.parent is not None:  # a nested group (zoo): the outer one handles
            return super().invoke(ctx)
        previous = _sigterm_handler(_on_sigterm)
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):
            raise
        except KeyboardInterrupt as e:
            _interrupted(e)
        except Exception as e:
            from mergeline.flows.errors import input_errors

            if isinstance(e, input_errors()):
                fail(str(e), EXIT_BAD_INPUT)
            _unexpected(e)
        finally:
            if previous is not None:
                _sigterm_handler(previous)


def _sigterm_handler(handler):
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a test runner's thread): leave signals alone
        return None


class App(typer.Typer):
    """The entry point: after an interrupt, do not wait for worker threads to finish a merge."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as e:
            if e.code in (EXIT_SIGINT, EXIT_SIGTERM):
                _stop_now(e.code)
            raise


def _stop_now(code: int) -> None:
    """Exit with `code` without joining worker threads (a merge or an lm-eval run in a thread
    would otherwise finish first), after stopping the temporary Prefect server it started."""
    from mergeline.flows import workdir

    server_module = sys.modules.get("prefect.server.api.server")
    try:
        for server in list(getattr(getattr(server_module, "SubprocessASGIServer", None), "_instances", {}).values()):
            server.stop()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    for work in (workdir.active, workdir.released and workdir.released[0]):
        if work:
            workdir.remove_staging(work, os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


