"""Interrupted merges and merges racing for one output folder, with real processes (issue #11).

`kill -9` mid-merge leaves a staging folder the next run removes; a kill between the two renames
of `--overwrite` leaves the old model aside, and the next run puts it back; two merges into the
same folder: one wins, the other fails cleanly; a live run's staging folder is never touched.

    pytest tests/merge/test_output_races.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeline.merge.executor import run_merge
from mergeline.merge.writer import OutputBusy, OutputError, _owner_tag, output_lock

REPO = Path(__file__).parents[2]
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (8, 8),
          "model.layers.1.mlp.up_proj.weight": (8, 8), "model.norm.weight": (8,)}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
          "vocab_size": 16, "torch_dtype": "float32"}

# Runs one merge that sleeps DELAY seconds per tensor, once GO exists; exit 2 on an OutputError.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    recipe, out, go, delay, overwrite, kill_after_set_aside = sys.argv[1:7]
    if kill_after_set_aside == "1":  # die like kill -9 right after the old model is moved aside
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if Path(src) == Path(out):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
    from mergeline.merge.executor import run_merge
    from mergeline.merge.writer import OutputError
    Path(go + f".ready-{os.getpid()}").touch()
    while not os.path.exists(go):
        time.sleep(0.01)
    try:
        run_merge(recipe, out, device="cpu", progress=False, overwrite=overwrite == "1",
                  on_tensor=lambda name, nbytes: time.sleep(float(delay)))
    except OutputError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
""")


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    for i, name in enumerate(("base", "ft_a", "ft_b")):
        f = tmp_path / name
        f.mkdir()
        # fine-tunes: the base plus a small delta (the merge's own checks refuse unrelated weights)
        ts = {k: v + 0.05 * i * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ts, str(f / "model.safetensors"))
        (f / "config.json").write_text(json.dumps(CONFIG))
    r = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
         "models": [{"model": str(tmp_path / m), "parameters": {"weight": 0.5}} for m in ("ft_a", "ft_b")]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def start(recipe: Path, out: Path, go: Path, delay: float = 0.0, overwrite=False, kill_after_set_aside=False):
    args = [str(recipe), str(out), str(go), str(delay), "1" if overwrite else "0", "1" if kill_after_set_aside else "0"]
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def debris(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_two_merges_to_one_output_one_wins(setup, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    procs = [start(setup, out, go, delay=0.5) for _ in range(2)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2:  # both past their imports
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()  # they reach the output together
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    assert "another merge" in loser and str(out) in loser and "Traceback" not in loser
    assert len(load_file(out / "model.safetensors")) == len(SHAPES)
    assert debris(out) == []


def test_kill_9_mid_merge_debris_removed_by_next_run(setup, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    go.touch()
    proc = start(setup, out, go, delay=2.0)
    deadline = time.time() + 120
    while not [n for n in debris(out) if ".tmp-" in n]:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(".tmp-" in n for n in debris(out)) and not out.exists()  # what the kill left
    run_merge(setup, out, device="cpu", progress=False)
    assert out.is_dir() and debris(out) == []


def test_live_runs_staging_folder_is_kept(setup, tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.tmp-{_owner_tag()}-0000abcd"  # a live owner: this test process
    mine.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / f".out.tmp-{dead.pid}-1-0000dcba"  # its pid is gone (or reused: start differs)
    gone.mkdir()
    run_merge(setup, out, device="cpu", progress=False)
    assert mine.is_dir() and not gone.exists()


def test_kill_between_the_two_renames_of_overwrite_restores_the_old_model(setup, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    go.touch()
    run_merge(setup, out, device="cpu", progress=False)
    before = (out / "model.safetensors").read_bytes()
    recipe = yaml.safe_load(setup.read_text())
    recipe["models"][0]["parameters"]["weight"] = 0.9  # a different model, so a swap would show
    setup.write_text(yaml.safe_dump(recipe))
    proc = start(setup, out, go, overwrite=True, kill_after_set_aside=True)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and any(".old-" in n for n in debris(out))  # the old model sits aside
    with pytest.raises(OutputError, match="already exists"):  # put back, so not replaced silently
        run_merge(setup, out, device="cpu", progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert debris(out) == []
    run_merge(setup, out, device="cpu", progress=False, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before and debris(out) == []


def test_output_locked_by_another_process_is_refused(setup, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusy, match="another merge"):
            run_merge(setup, out, device="cpu", progress=False)
    assert not out.exists()
    run_merge(setup, out, device="cpu", progress=False)
    assert out.is_dir() and debris(out) == []
