"""The files of a model folder: names that stay inside it, JSON that parses, and one error type,
``CheckpointError``, whose message names the file at fault. Below the checkpoint reader
(merge/checkpoint.py) and the LoRA adapter reader (merge/lora.py), which both use them.

    python -c "from pathlib import Path; from mergeline.merge.model_folder import read_json_object; \
print(sorted(read_json_object(Path('MODEL_DIR/config.json'))))"
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from mergeline.merge.config_files import short


class CheckpointError(ValueError):
    """A model folder that cannot be read; the message names the file at fault."""


# JSON a model folder holds (index, config, tokenizer files) can fail to parse in these ways;
# RecursionError is json's answer to deeply nested arrays.
JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)


def short_path(path: str | Path, limit: int = 120) -> str:
    """A path for a one-line message: whole when short, else its start and its length."""
    return short(str(path), limit)


def _roots(folder: Path) -> list[Path]:
    """Where files of `folder` may really live: the folder itself, and for a Hugging Face cache
    snapshot (`.../snapshots/<rev>`), the repo's `blobs/` its links point into."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def model_file(folder: Path, name: str, what: str = "file") -> Path | None:
    """`folder/name` if it exists, None if not; CheckpointError naming it when `name` leaves the
    folder (`..`, an absolute path, a link to elsewhere) or is not a regular file.

    A file named by a model folder (an index's shard, a tokenizer file) is read and may be copied
    into a merged model, so it must be the folder's own: a link to /etc/passwd is refused. Links
    inside the folder, and a Hugging Face snapshot's links into its `blobs/`, are followed."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise CheckpointError(f"{folder}: {what} {short_path(name)!r} is outside the model folder (refused)")
    path = folder / name
    try:
        if not path.exists() and not path.is_symlink():
            return None
        real = path.resolve()
        regular = real.is_file()
    except (OSError, RuntimeError) as e:  # a name too long, a link loop
        raise CheckpointError(f"{short_path(path)}: unreadable {what} ({e.__class__.__name__}: {e})") from None
    if not any(real == r or real.is_relative_to(r) for r in _roots(folder)):
        raise CheckpointError(f"{path}: {what} is a link to {real}, outside the model folder (refused: copy the "
                              "file into the folder)")
    if not regular:
        raise CheckpointError(f"{path}: {what} is not a regular file")
    return path


def read_text(path: Path) -> str:
    """A text file of the folder (a chat template, a JSON file); CheckpointError when not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json_object(path: Path) -> dict:
    """A JSON object from `path` (config.json, adapter_config.json); CheckpointError naming the
    file when it is missing, not JSON, or not an object."""
    if model_file(path.parent, path.name) is None:
        raise CheckpointError(f"{path}: {path.name} missing")
    try:
        data = json.loads(read_text(path))
    except JSON_ERRORS as e:
        raise CheckpointError(f"{path}: invalid JSON ({error_text(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {path.name} must be a JSON object")
    return data


def error_text(e: Exception) -> str:
    """A parse error's first line, for a one-line message."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).splitlines()[0] if str(e) else e.__class__.__name__
