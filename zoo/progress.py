"""One progress line for the zoo build, with an ETA, on a terminal or in a log file.

On a terminal it is a rich bar (redrawn in place). When stderr is not a terminal (CI, `> log`,
a Prefect worker) a rich bar would print nothing until the end, so plain lines are printed
instead, at most one every `every` seconds:

    zoo: training fine-tune addition 340/600 steps, 45 s elapsed, ETA 2m10s

The ETA is over the whole build: work is counted in units (one training step is one unit;
an evaluation or a merge is worth the units its measured cost is, see build.py), and the
rate so far is extrapolated to the units left.

    python -c "from mergeline.zoo.progress import BuildProgress as P; p = P(10); p.phase('x', 10); p.advance(10); p.close()"
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """45 -> '45s', 130 -> '2m10s'."""
    s = max(0, int(round(seconds)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class BuildProgress:
    def __init__(self, total_units: float, stream: TextIO | None = None, every: float = 5.0,
                 plain: bool | None = None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.every = float(total_units), 0.0, every
        self.started = self.last = time.monotonic()
        self.working: float | None = None  # when the first phase began (setup is not extrapolated)
        self.what, self.n, self.of, self.unit, self.weight = "", 0, 0, "", 1.0
        self.plain = plain if plain is not None else not self.stream.isatty()
        self._bar = None
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("zoo: {task.description}"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=self.stream))
            self._task = self._bar.add_task("starting", total=self.total)
            self._bar.start()

    def phase(self, what: str, of: int, unit: str = "steps", weight: float = 1.0) -> None:
        """Start a phase of `of` items (each worth `weight` units of the whole build)."""
        self.what, self.n, self.of, self.unit, self.weight = what, 0, of, unit, weight
        if self.working is None:
            self.working = time.monotonic()
        self._show(force=True)

    def advance(self, n: int = 1) -> None:
        self.n += n
        self.done = min(self.total, self.done + n * self.weight)
        self._show(force=self.n >= self.of)

    def eta(self) -> float | None:
        if self.done <= 0 or self.working is None:
            return None
        return (time.monotonic() - self.working) / self.done * max(0.0, self.total - self.done)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        eta = self.eta()
        return (f"zoo: {self.what} {self.n}/{self.of} {self.unit}, {int(elapsed)} s elapsed, "
                f"ETA {'?' if eta is None else duration(eta)}")

    def _show(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done,
                             description=f"{self.what} {self.n}/{self.of} {self.unit}")
            return
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.total)
            self._bar.stop()
        else:
            print(f"zoo: built in {duration(time.monotonic() - self.started)}", file=self.stream, flush=True)
