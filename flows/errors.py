"""Exit codes, and which exceptions mean "unusable input", in one place for the whole CLI.

    0    success; the gate said GO
    1    NO-GO, or a check failed
    2    unusable input (a file, key, folder or server named in a one-line error), or a workdir
         another run holds
    3    INCONCLUSIVE: the gate could not tell GO from NO-GO on this evidence
    4    an unexpected error: one line on stderr, the traceback in a log file it names
    130  interrupted by SIGINT (Ctrl-C); 143 by SIGTERM. Staging folders are removed; a rerun
         resumes from the stages that finished.

Every library error class that means unusable input is listed once, in `input_errors()`;
`from mergeline.flows.errors import INPUT_ERRORS` gives the same tuple (imported lazily: the classes live
in modules that import torch, and `mergeline --help` must stay instant).

    python -c "from mergeline.flows.errors import INPUT_ERRORS; print(INPUT_ERRORS)"
"""
from __future__ import annotations

from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCONCLUSIVE, EXIT_UNEXPECTED = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
VERDICT_EXIT = {"GO": EXIT_OK, "NO-GO": EXIT_FAILED, "INCONCLUSIVE": EXIT_INCONCLUSIVE}

EXIT_CODES_HELP = (
    "Exit codes: 0 success or GO; 1 NO-GO or a failed check; 2 unusable input (named in one line) "
    "or a workdir in use by another run; 3 INCONCLUSIVE; 4 unexpected error (one line, traceback "
    "in a log file); 130 Ctrl-C, 143 SIGTERM."
)


class InputError(ValueError):
    """Unusable input found by the flows layer (a config file that is not UTF-8 or not YAML, an
    unsupported tracking URI, a workdir in use); the message names the file, key or setting."""


def exit_code_for(verdict: str) -> int:
    """0 GO, 1 NO-GO, 3 INCONCLUSIVE, from the verdict string (any other verdict: 4)."""
    return VERDICT_EXIT.get(str(verdict).upper(), EXIT_UNEXPECTED)


def input_errors() -> tuple[type[Exception], ...]:
    """Every exception class that means unusable input (exit 2), each with a one-line message."""
    from mergeline.evaluation.gate import ReportError
    from mergeline.evaluation.policy import PolicyError as GatePolicyError
    from mergeline.evaluation.suite import SuiteError
    from mergeline.merge.checkpoint import CheckpointError
    from mergeline.merge.compat import CompatInputError
    from mergeline.merge.compat.policy import PolicyError as CompatPolicyError
    from mergeline.merge.device import DeviceError
    from mergeline.merge.plan import MergeError
    from mergeline.merge.recipe import RecipeError
    from mergeline.merge.resolve import ModelNotFound
    from mergeline.merge.writer import OutputError

    # InputError covers the flows layer's own (PipelineError, ServerUnreachable, ...): they
    # subclass it, so this module imports none of the modules that import it.
    return (InputError, RecipeError, ModelNotFound, CheckpointError,
            CompatInputError, CompatPolicyError, GatePolicyError, SuiteError, ReportError, MergeError,
            DeviceError, OutputError)


def __getattr__(name: str):
    if name == "INPUT_ERRORS":
        return input_errors()
    raise AttributeError(name)


# ---------------------------------------------------------------- config files


def read_text(path: str | Path, kind: str = "config") -> str:
    """A file's text; InputError naming the file and the byte offset if it is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: {kind} file is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, "
                         f"offset {e.start}); save it as UTF-8") from None


def yaml_error_line(e: Exception, where: str) -> str:
    """A YAML syntax error as one line: 'FILE: not valid YAML (problem at line L, column C)'."""
    from mergeline.merge.config_files import yaml_problem

    return f"{where}: not valid YAML ({yaml_problem(e)})"


def check_yaml_file(path: str | Path, kind: str = "config") -> None:
    """Refuse, in one line naming the file, a YAML file that cannot be read, is not UTF-8 or is not
    YAML at all (one document or several, as a multi-stage recipe). Keys and values are left to
    the loader of that kind of file."""
    import yaml

    from mergeline.merge.config_files import Loader, short

    try:
        text = read_text(path, kind)
    except OSError as e:  # a name too long for the file system, no permission
        raise InputError(f"{short(str(path))}: cannot read the {kind} file ({e.strerror or e})") from None
    try:
        for _ in yaml.load_all(text, Loader=Loader):
            pass
    except yaml.YAMLError as e:
        raise InputError(yaml_error_line(e, str(path))) from None
    except RecursionError:
        raise InputError(f"{path}: not valid YAML (nested too deeply)") from None


def one_line(message: str) -> str:
    """Join a multi-line message into one line (a library's message may carry a YAML snippet)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
