"""One run per workdir, and no half-written folders left behind.

`mergeline run` and `mergeline demo` hold an exclusive `fcntl.flock` on `WORKDIR/.lock` for
the whole run; a second run on the same workdir is refused at once (exit 2) with the holder's
pid and start time, instead of two runs racing on the same caches, models and MLflow store. The
kernel drops the lock when the holder dies, however it dies, so a stale lock never blocks.

Merges write into hidden staging folders (`.NAME.tmp-PID-XXXX`, merge/writer.py) that are
renamed into place when complete. A run interrupted by Ctrl-C or SIGTERM removes its own; one
killed outright (SIGKILL, power loss) leaves them, and the next run, which holds the lock and so
knows nobody else is writing, removes them.

    python -m mergeline.flows.workdir mergeline-runs/demo    # hold its lock until Ctrl-C; a run there is refused
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mergeline.flows.errors import InputError

LOCK_FILE = ".lock"
_STAGING = re.compile(r"^\..+\.tmp-(\d+)(-[0-9a-f]+)?$")

# The workdir this process holds, and the last one it released with what it removed then: for
# the interrupt handler in flows/cli.py, which runs after the lock is released.
active: Path | None = None
released: tuple[Path, list[Path]] | None = None


class WorkdirBusy(InputError):
    """Another run holds the workdir's lock."""


@contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[Path]:
    """Hold WORKDIR/.lock for the block; WorkdirBusy naming the holder if another process has it."""
    global active, released
    work = Path(workdir).resolve()
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    path = work / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise WorkdirBusy(f"{work} is in use by another mergeline run ({holder}); wait for it to "
                              f"finish, or give this run another workdir") from None
        stamp = f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        active = work
        remove_staging(work)  # we hold the lock: any staging folder is a dead run's
        try:
            yield work
        finally:
            # Ours and unfinished: a stopped run's (Ctrl-C, SIGTERM, an error) half-written merges.
            released = (work, remove_staging(work, os.getpid()))
            active = None
            os.ftruncate(fd, 0)
            if created and [p.name for p in work.iterdir()] == [LOCK_FILE]:
                # refused before any work (bad input): leave no empty workdir behind; done while
                # still holding the lock, so no other run's lock file is removed
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    work.rmdir()
    finally:
        os.close(fd)  # closing releases the flock


def staging_folders(workdir: Path, pid: int | None = None) -> list[Path]:
    """Hidden `.NAME.tmp-PID[-XXXX]` folders and files under WORKDIR (of `pid` only, if given)."""
    found = []
    for folder in (workdir / "models", *sorted((workdir / "runs").glob("*/report"))):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _STAGING.match(p.name)
            if m and (pid is None or int(m.group(1)) == pid):
                found.append(p)
    return found


def remove_staging(workdir: Path, pid: int | None = None) -> list[Path]:
    """Remove staging folders (of `pid` only, if given); return what was removed."""
    removed = staging_folders(workdir, pid)
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


if __name__ == "__main__":
    import sys

    with workdir_lock(sys.argv[1]) as held:
        print(f"holding {held / LOCK_FILE} ({(held / LOCK_FILE).read_text()}); Ctrl-C to release")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
