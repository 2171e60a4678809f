"""Turn a recipe's model reference into a local folder, never downloading anything.

A reference is a local folder (absolute, relative to the working directory, or relative to the
recipe's own folder) or a Hugging Face repo id with an optional `@revision`
(`org/name@main`, `org/name@<commit>`), looked up in huggingface_hub's cache with
`local_files_only=True`. A repo that is not cached is an error that says how to fetch it.

    python -m mergeline.merge.resolve org/name@main
"""
from __future__ import annotations

import sys
from pathlib import Path


class ModelNotFound(ValueError):
    """A model reference that names neither a local folder nor a cached Hugging Face repo."""


def split_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); more than one '@' is an error (as in mergekit)."""
    if ref.count("@") > 1:
        raise ModelNotFound(f"model reference {ref!r}: more than one '@' (expected PATH or REPO_ID@REVISION)")
    path, _, rev = ref.partition("@")
    return path, (rev or None)


def split_adapter(ref: str) -> tuple[str, str | None]:
    """'base+adapter' (a LoRA adapter on its base, mergekit's syntax) -> ('base', 'adapter');
    a plain reference -> (ref, None)."""
    if "+" not in ref:
        return ref, None
    model, _, adapter = ref.partition("+")
    if not model or not adapter or "+" in adapter:
        raise ModelNotFound(f"model reference {ref!r}: expected MODEL+ADAPTER (one '+', both sides given)")
    return model, adapter


def _looks_like_repo_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def resolve_model(ref: str, base_dir: str | Path | None = None) -> Path:
    """Local folder holding the model `ref` names; raises ModelNotFound with a fix if absent.
    `BASE+ADAPTER` (a LoRA adapter on a base, mergekit's syntax) resolves each side."""
    model, adapter = split_adapter(ref)
    if adapter is not None:
        return Path(f"{resolve_model(model, base_dir)}+{resolve_model(adapter, base_dir)}")
    path, revision = split_ref(ref)
    candidates = [Path(path).expanduser()]
    if base_dir is not None and not Path(path).is_absolute():
        candidates.append(Path(base_dir) / path)
    for c in candidates:
        try:
            found = c.is_dir()
        except OSError as e:  # a name too long for the file system
            shown = ref if len(ref) <= 120 else f"{ref[:120]}... ({len(ref)} characters)"
            raise ModelNotFound(f"model reference {shown!r}: unusable path ({e.strerror})") from None
        if found:
            if revision is not None:
                raise ModelNotFound(f"model reference {ref!r}: a local folder cannot take an @revision")
            return c.resolve()
    if not _looks_like_repo_id(path):
        raise ModelNotFound(f"model reference {ref!r}: no such folder (looked in {', '.join(map(str, candidates))})")
    if len(path) > 200:  # Hugging Face repo ids are at most 96 characters
        raise ModelNotFound(f"model reference {ref[:120]!r}... ({len(ref)} characters): not a folder, too long for a repo id")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(path, revision=revision, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, ...: all mean "not cached"
        rev = f" --revision {revision}" if revision else ""
        raise ModelNotFound(
            f"model reference {ref!r}: not a local folder and not in the Hugging Face cache "
            f"(mergeline never downloads). Fetch it first with: hf download {path}{rev} "
            f"(older clients: huggingface-cli download {path}{rev}) [{type(e).__name__}]"
        ) from e
    return Path(folder)


if __name__ == "__main__":
    print(resolve_model(sys.argv[1]))
