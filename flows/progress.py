"""Plain progress lines for a pipeline run, and the other tools kept quiet.

A run writes lines like

    [0:41] merges 1/3 done (ties), ETA 1:10
    [2:05] evaluations 4/6 done (facts), ETA 1:02

to stderr, one per event, so a log file (`mergeline demo > demo.log 2>&1`) shows where the run
is, which a redrawn progress bar cannot. lm-eval's and datasets' tqdm bars, transformers'
warnings and Prefect's and MLflow's start-up lines are silenced unless `--verbose`.

    mergeline demo > /tmp/demo.log 2>&1; cat /tmp/demo.log
"""
from __future__ import annotations

import logging
import os
import sys
import time

_T0 = time.monotonic()
_QUIET_LOGGERS = ("lm-eval", "lm_eval", "mlflow", "alembic", "httpx", "urllib3", "datasets", "transformers",
                  "accelerate", "prefect", "distributed", "numexpr", "matplotlib", "torch")


def quiet(verbose: bool = False) -> None:
    """Silence progress bars and start-up chatter of the tools (before they are imported)."""
    if verbose:
        return
    for var, value in {
        "TQDM_DISABLE": "1",  # tqdm >= 4.66 reads TQDM_* defaults: lm-eval's and datasets' bars
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DATASETS_VERBOSITY": "error",
        "PREFECT_LOGGING_LEVEL": "WARNING",  # "Created flow run", "Starting temporary server", ...
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(var, value)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # lm-eval passes `disable=` to its tqdm bars itself, which TQDM_DISABLE cannot override; a bar
    # redrawn with "\r" is one endless line in a log file.
    from tqdm import std

    if not getattr(std.tqdm.__init__, "_mergeline_quiet", False):
        init = std.tqdm.__init__

        def quiet_init(self, *args, **kwargs):
            kwargs["disable"] = True
            init(self, *args, **kwargs)

        quiet_init._mergeline_quiet = True
        std.tqdm.__init__ = quiet_init
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + (f"{rest // 60:02d}" if h else f"{rest // 60}") + f":{rest % 60:02d}"


def say(message: str) -> None:
    """One progress line on stderr, stamped with the time since the command started. Written, not
    printed: inside a flow with `log_prints`, Prefect turns print() into log records."""
    sys.stderr.write(f"[{clock(time.monotonic() - _T0)}] {message}\n")
    sys.stderr.flush()


class Counter:
    """k of N done, with an ETA from the mean time per item so far."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.start = what, total, 0, time.monotonic()

    def tick(self, name: str, note: str = "") -> None:
        self.done += 1
        spent = time.monotonic() - self.start
        left = self.total - self.done
        eta = f", ETA {clock(spent / self.done * left)}" if left else f", in {clock(spent)}"
        say(f"{self.what} {self.done}/{self.total} done ({name}{note}){eta}")
