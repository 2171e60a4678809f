"""Write a merged model folder: safetensors shards streamed as tensors arrive, then the rest.

Every output tensor's name, dtype and shape is known from the input headers before the merge
starts, so each shard's safetensors header is written first and tensor bytes are appended as
they are computed: memory stays constant however large the model. Shards are cut at
`--out-shard-size`; with more than one, `model.safetensors.index.json` maps names to shards.

Everything goes into a hidden staging folder beside OUTPUT_DIR that is renamed into place only
when complete, so a failed merge leaves no half-written model behind. One writer per output at
a time (a `flock` on `.OUTPUT_DIR.lock`, released by the kernel even on `kill -9`); staging and
swap folders carry their owner's pid and process start time in their names, so a later run
removes those whose owner is gone and puts back a model an interrupted `--overwrite` set aside.
A full disk is one line naming the output folder, with the staging folder removed.

    python -c "from mergeline.merge.writer import parse_size; print(parse_size('500MB'))"
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import math
import os
import re
import shutil
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeline.merge.chat_templates import template_text
from mergeline.merge.checkpoint import DTYPES
from mergeline.merge.model_folder import model_file, read_json_object, read_text, short_path

ST_NAME = {v: k for k, v in DTYPES.items()}  # torch dtype -> safetensors dtype name
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class OutputError(ValueError):
    """An output folder or option that cannot be used; the message names it."""


class OutputBusy(OutputError):
    """Another process is writing the same output folder right now."""


def parse_size(text: str | int) -> int:
    """'500MB' -> 500_000_000, '5GiB' -> 5 * 2**30, 1000 -> 1000 (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise OutputError(f"--out-shard-size {text!r}: expected a size like 500MB, 5GB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise OutputError(f"--out-shard-size {text!r}: must be positive")
    return size


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy, in merge order: a shard is closed when the next tensor would overflow it."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(shard: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Append tensors, in the planned order, to safetensors shards whose headers are already written."""

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._fh = None
        self._open_index = -1
        self.bytes_written = 0

    def _switch_to(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.folder / self.files[i], "wb")
        self._fh.write(_header_bytes(self.shards[i]))
        self._open_index = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise OutputError(f"tensor {name!r}: more tensors written than planned")
        i, spec = self._order[self._next]
        if spec.name != name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise OutputError(f"tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) does not match the planned "
                              f"{spec.name!r} ({spec.dtype}, {spec.shape})")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            if i != self._open_index:
                self._switch_to(i)
            self._fh.write(memoryview(data.numpy()))
        except OSError as e:
            raise _write_failed(self.folder, e) from None
        self.bytes_written += spec.nbytes
        self._next += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index when sharded; returns name -> shard file."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise OutputError(f"output incomplete: tensor {missing!r} and {len(self._order) - self._next - 1} more never written")
        weight_map = {t.name: self.files[i] for i, t in self._order}
        try:
            if self._open_index < 0 and self._order:  # nothing written yet: an all-empty model
                self._switch_to(0)
            if self._fh is not None:
                fh, self._fh = self._fh, None
                fh.close()
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
                (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        except OSError as e:
            raise _write_failed(self.folder, e) from None
        return weight_map

    def abort(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()  # flushing a full disk fails again; the staging folder goes anyway
            except OSError:
                pass


# -- the folder ------------------------------------------------------------------
def _write_failed(where: Path, e: OSError) -> OutputError:
    """One line for an OSError while writing the output (ENOSPC: the disk is full)."""
    out = _output_of(Path(where))
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large for the file system or its limit"}.get(e.errno, e.strerror or str(e))
    return OutputError(f"{short_path(out)}: cannot write the merged model ({why}); nothing was written")


def _output_of(path: Path) -> Path:
    """The output folder a staging folder (or a file in one) is for: `.NAME.tmp-...` -> NAME."""
    for p in (path, *path.parents):
        m = re.fullmatch(r"\.(.+)\.tmp-\d+-\d+-[0-9a-f]+", p.name)
        if m:
            return p.parent / m.group(1)
    return path


def _start_token(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    it names one process, so a reused pid is not mistaken for a staging folder's owner.
    None when the process does not exist (or /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has finished running


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{_start_token(pid) or 0}"


def _owner_gone(name: str) -> bool:
    """Whether the process named in a staging/swap folder's name (`...-PID-START-...`) is gone."""
    m = re.search(r"\.(?:tmp|old)-(\d+)-(\d+)-[0-9a-f]{8}$", name)
    if not m:
        return False  # not named by this version: not ours to judge
    pid, start = int(m.group(1)), int(m.group(2))
    if not Path("/proc").is_dir():  # no start times: fall back on whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    token = _start_token(pid)
    return token is None or (start != 0 and token != start)


def _recover(out_dir: Path) -> None:
    """Clean what dead runs left beside `out_dir` (the caller holds the output's lock): staging
    folders are removed; a model an interrupted `--overwrite` moved aside is put back when no
    model took its place, else removed."""
    prefix = f".{out_dir.name}."
    debris = sorted(p for p in out_dir.parent.iterdir() if p.name.startswith(prefix) and _owner_gone(p.name))
    for p in debris:
        kind = p.name[len(prefix):].split("-", 1)[0]
        if kind == "old" and not out_dir.exists():
            try:
                os.rename(p, out_dir)  # the swap was cut between its two renames: undo it
                continue
            except OSError:
                pass
        if kind in ("tmp", "old"):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def output_lock(out_dir: Path):
    """Hold `.NAME.lock` beside `out_dir` exclusively; OutputBusy when another process holds it.
    The kernel drops a flock when its holder dies, so a killed run never leaves it held."""
    lock = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a name too long, a read-only folder
            raise OutputError(f"{short_path(out_dir)}: unusable output folder ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusy(f"{short_path(out_dir)}: another merge (pid {holder}) is writing this output "
                             "folder now; wait for it or choose another folder") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file as we opened it: lock the new one
    try:
        try:  # who holds it, for the message a second merge prints; nothing depends on it
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        yield
    finally:
        try:
            os.unlink(lock)  # while still held, so a waiter on this inode sees it is stale
        except OSError:
            pass
        os.close(fd)


_RENAME_NOREPLACE = 1


def _rename_no_replace(src: Path, dst: Path) -> None:
    """rename(2) that fails if `dst` exists (renameat2 RENAME_NOREPLACE); plain os.rename onto a
    path checked absent where the call is missing (an empty folder could still be replaced)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        AT_FDCWD = -100
        if renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextmanager
def staging_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a fresh hidden folder beside `out_dir`; on success it replaces `out_dir` atomically-ish.

    Holds the output's lock throughout; cleans what killed runs left; turns an OSError (a full
    disk) into an OutputError naming `out_dir`, with the staging folder removed."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{short_path(out_dir)}: unusable output folder ({e.strerror or e})") from None
    with output_lock(out_dir):
        _recover(out_dir)
        if out_dir.exists() and not overwrite:
            raise OutputError(f"{out_dir}: output folder already exists (pass --overwrite to replace it)")
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a folder")
        tag = _owner_tag()
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise _write_failed(out_dir, e) from None
        try:
            yield tmp
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
                raise _write_failed(out_dir, e) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            old = None
            if out_dir.exists():
                old = out_dir.parent / f".{out_dir.name}.old-{tag}-{uuid.uuid4().hex[:8]}"
                os.rename(out_dir, old)
            _rename_no_replace(tmp, out_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out_dir.exists():
                os.rename(old, out_dir)
            raise OutputError(f"{out_dir}: cannot move the merged model into place ({e.strerror or e})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_config(folder: Path, config: dict, dtype: torch.dtype) -> None:
    """config.json of the reference model with its dtype keys set to the written dtype."""
    cfg = dict(config)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = name
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_side_files(plan, folder: Path) -> None:
    """Everything beside the weights: config.json (the plan's output config: a frankenmerge's
    layer count, a merged vocabulary's size; dtype set to what was written), the tokenizer (the
    one built by a tokenizer merge, else the tokenizer source's files), generation_config.json,
    the chat template and the recipe. `plan` is a merge.plan.Plan."""
    r = plan.recipe
    ref_folder = plan.reference.reader.ckpt.folder
    dtypes = {j.out.dtype for j in plan.jobs if j.floating}
    named = r.out_dtype or r.dtype
    out_dtype = next(iter(dtypes)) if len(dtypes) == 1 else (getattr(torch, named) if named else None)
    config = plan.out_config if plan.out_config is not None else plan.reference.reader.ckpt.config
    write_config(folder, config, out_dtype or torch.float32)
    built = plan.tokenizer
    src = (r.tokenizer.source if r.tokenizer else r.tokenizer_source) if built is not None else None
    if built is not None and (src == "union" or (r.tokenizer and r.tokenizer.tokens)):
        # a vocabulary no input has: saved as mergekit saves it (transformers' save_pretrained)
        built.tokenizer.save_pretrained(str(folder))
        copy_side_files(folder, None, ref_folder)
    else:
        tok_ref = r.tokenizer_ref
        tok_folder = plan.models[tok_ref].ckpt.folder if tok_ref in plan.models else ref_folder
        copy_side_files(folder, tok_folder, ref_folder)
    if r.chat_template:
        write_chat_template(folder, r.chat_template, [m.ckpt.folder for m in plan.models.values()])
    (folder / "mergeline_recipe.yaml").write_text(r.to_yaml())
    if r.stages:  # a multi-stage recipe's final model: every stage (merge/multistage.py)
        (folder / "mergeline_stages.json").write_text(json.dumps(r.stages, indent=2) + "\n")


def copy_side_files(folder: Path, tokenizer_from: Path | None, config_from: Path) -> list[str]:
    """Tokenizer files from the tokenizer source (None: none), generation_config.json from the
    reference model.
    Only the models' own regular files are copied: a link out of the model folder (a merges.txt
    pointing at a system file) is refused by name (merge.model_folder.model_file)."""
    copied = []
    tokenizer_files = TOKENIZER_FILES if tokenizer_from is not None else ()
    sources = [(tokenizer_from, name) for name in tokenizer_files] + [(config_from, "generation_config.json")]
    for src_folder, name in sources:
        src = model_file(src_folder, name, "side file")
        if src is not None:
            shutil.copyfile(src, folder / name)
            copied.append(name)
    return copied


def _model_template(folder: Path) -> str | None:
    jinja = model_file(folder, "chat_template.jinja", "side file")
    if jinja is not None:
        return read_text(jinja).strip()
    cfg = model_file(folder, "tokenizer_config.json", "side file")
    if cfg is not None:
        tpl = read_json_object(cfg).get("chat_template")
        if isinstance(tpl, dict):
            tpl = tpl.get("default")
        if isinstance(tpl, str):
            return tpl.strip()
    return None


def write_chat_template(folder: Path, template: str, model_folders: list[Path]) -> None:
    """`auto` (the most common template among the inputs), a mergekit preset name, or a Jinja string."""
    if template == "auto":
        found = [t for t in (_model_template(f) for f in model_folders) if t]
        if not found:
            return
        template = max(set(found), key=found.count)
    else:
        try:
            template = template_text(template)  # a preset's text, or the literal Jinja template
        except ValueError as e:
            raise OutputError(str(e)) from None
    (folder / "chat_template.jinja").write_text(template)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():  # a template here would shadow the .jinja file in older transformers
        cfg = read_json_object(cfg_path)
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
