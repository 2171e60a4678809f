"""Content hashes of model folders: the identity used by caches, lineage and the registry.

The hash covers the bytes of the weights, config and tokenizer files, not their paths or
times, so a copied folder hashes the same and a changed fine-tune does not.

    python -m mergeline.merge.hashing MODEL_DIR
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from mergeline.merge.resolve import split_adapter

# Files that define what a model computes. README, lineage and merge statistics are left
# out on purpose: rewriting a model card must not change the model's identity.
HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")
NOT_HASHED = {"lineage.json", "merge_stats.json", "zoo.json"}

_memo: dict[tuple, str] = {}


def hashed_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix in HASHED_SUFFIXES and p.name not in NOT_HASHED
    )


def content_hash(folder: str | Path) -> str:
    """sha256 over (file name, file bytes) of the model-defining files, e.g. 'sha256:ab12...'.
    For `BASE+ADAPTER` (a LoRA adapter on a base), the hash of the two folders' hashes."""
    base, adapter = split_adapter(str(folder))
    if adapter is not None:
        return text_hash(f"{content_hash(base)}+{content_hash(adapter)}")
    folder = Path(folder)
    files = hashed_files(folder)
    # Memo by (path, size, mtime) so a pipeline hashing the same folder twice reads it once.
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key in _memo:
        return _memo[key]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    digest = "sha256:" + h.hexdigest()
    _memo[key] = digest
    return digest


def text_hash(text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(content_hash(arg), arg)
