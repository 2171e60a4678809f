"""Two real `mergeline run` processes on one workdir, and a run stopped by SIGTERM (issue #11):
the second is refused at once (exit 2) naming the holder's pid and start time; SIGTERM stops the
first cleanly (exit 143, one line, no traceback), removing its unfinished output folders; a
folder left by a run killed outright is removed by the next run on the workdir."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mergeline.flows.pipeline_config import load_pipeline

MERGELINE = str(Path(sys.executable).parent / "mergeline")


def test_second_run_refused_and_sigterm_stops_cleanly(tiny_models, tiny_tasks, go_pipeline_writer, tmp_path):
    path = go_pipeline_writer(tmp_path, tiny_models, tiny_tasks)
    work = load_pipeline(path).workdir_path
    stale = work / "models" / ".ties-0123.tmp-999999999-abcd1234"  # a run killed outright (no such pid)
    stale.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    first = subprocess.Popen([MERGELINE, "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    deadline = time.monotonic() + 120
    lock = work / ".lock"
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    assert not stale.exists()  # the lock holder knows nobody else writes there

    second = subprocess.run([MERGELINE, "run", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    err = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"pid {first.pid}, started " in err[0] and "in use" in err[0], second.stderr

    # an unfinished merge folder of the first run, as merge/writer.py names them
    own = work / "models" / f".ties-4567.tmp-{first.pid}-beef0001"
    own.mkdir(parents=True, exist_ok=True)
    first.send_signal(signal.SIGTERM)
    out, errout = first.communicate(timeout=120)
    assert first.returncode == 143, errout[-3000:]
    assert "interrupted (SIGTERM)" in errout and "Traceback" not in errout, errout[-3000:]
    assert not own.exists()
    assert lock.read_text() == ""  # released: the next run may start
