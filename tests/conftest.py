"""Shared fixtures. Tools' caches go to a per-session temporary folder; nothing is downloaded."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before any tool is imported: HF, Prefect, MLflow and matplotlib read these at import.
_SCRATCH = Path(tempfile.mkdtemp(prefix="mergeline-tests-"))
for var, sub in {
    "HF_HOME": "hf", "HF_DATASETS_CACHE": "hf/datasets", "PREFECT_HOME": "prefect",
    "MPLCONFIGDIR": "mpl",
}.items():
    os.environ[var] = str(_SCRATCH / sub)
os.environ.update(
    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
    MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    MLFLOW_TRACKING_URI=f"sqlite:///{_SCRATCH / 'mlflow.db'}",
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def scratch() -> Path:
    return _SCRATCH


# ---- real servers on loopback (engineer E): one of each per session, started on first use ----

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], health_url: str, log: Path, timeout: float = 120.0):
    """Start a server process, wait until `health_url` answers 200, yield, then stop it."""
    import subprocess
    import time
    import urllib.request

    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(_SCRATCH), start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not become healthy at {health_url}: "
                               f"{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def _stop(proc) -> None:
    """SIGTERM the process group (a server, or a `dask worker` nanny and its worker), SIGKILL if
    it lingers."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=20)


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """A real `prefect server start` on loopback; PREFECT_API_URL points at it for the session."""
    import sys

    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start",
           "--host", "127.0.0.1", "--port", str(port)]
    api = f"http://127.0.0.1:{port}/api"
    proc = _serve(cmd, f"{api}/health", _SCRATCH / "prefect-server.log")
    os.environ["PREFECT_API_URL"] = api
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        yield api
        # Send the last logs and events while the server still listens.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    os.environ.pop("PREFECT_API_URL", None)
    _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """A real `mlflow server` on loopback with its own SQLite store; yields its URI."""
    import sys

    port = _free_port()
    root = _SCRATCH / "mlflow-server"
    root.mkdir(exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    proc = _serve(cmd, f"{uri}/health", _SCRATCH / "mlflow-server.log")
    yield uri
    _stop(proc)


# ---- tiny GPT-2 models (engineer E): a base, two fine-tunes (base + small deltas) and a model
# of another base (a different random init); seconds to make, no zoo needed ----

def _tiny_tokenizer():
    """A byte-level BPE over digits and a few words: encodes any string lm-eval sends."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{a} + {b} = {a + b} yes no" for a in range(10) for b in range(10)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>")


def _save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> Path:
    """Three tiny multiple-choice lm-eval tasks (t_a, t_b: the fine-tunes' skills; t_gen: general)."""
    import json

    root = tmp_path_factory.mktemp("tiny_tasks")
    for name, offset in (("t_a", 0), ("t_b", 1), ("t_gen", 2)):
        rows = [{"q": f"{a} + {b + offset} =", "choices": [f" {a + b + offset}", f" {a + b + offset + 1}"],
                 "label": 0} for a in range(4) for b in range(3)]
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(_TASK.format(name=name, data=data))
    return root


@pytest.fixture(scope="session")
def recipe_models(tiny_models, tmp_path_factory) -> Path:
    """A folder with models/base, ft_a, ft_b (the tiny GPT-2s) and ft_c (ft_a's weights nudged
    again, so all three task vectors differ), as configs/recipes/*.yaml and mergekit's examples
    name them."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("recipe_models")
    for name in ("base", "ft_a", "ft_b"):
        shutil.copytree(tiny_models[name], root / "models" / name)
    ft_c = root / "models" / "ft_c"
    shutil.copytree(tiny_models["ft_a"], ft_c)
    g = torch.Generator().manual_seed(7)
    weights = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in load_file(ft_c / "model.safetensors").items()}
    save_file(weights, ft_c / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny")
    tok = _tiny_tokenizer()
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    out = {"base": _save(base, root / "base", tok)}
    for i, name in enumerate(["ft_a", "ft_b"]):
        ft = GPT2LMHeadModel(cfg)
        ft.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=g))
        out[name] = _save(ft, root / name, tok)
    torch.manual_seed(99)
    out["different_base"] = _save(GPT2LMHeadModel(cfg), root / "different_base", tok)
    return out


@pytest.fixture(scope="session")
def zoo():
    """The tiny zoo (base, fine-tunes, negatives, lm-eval tasks), built once per machine:
    `build_zoo()` caches it under $MERGELINE_CACHE_DIR (default ~/.cache/mergeline)."""
    from mergeline.zoo import build_zoo

    return build_zoo()
