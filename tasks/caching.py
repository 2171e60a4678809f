"""Cache keys for pipeline tasks: what a result depends on, and nothing else.

A key hashes the content of the inputs (`merge.hashing.content_hash` of model folders, never their
paths or times), the recipe or suite, and the version of the code that computes the result (the
source of the package doing the work). Prefect stores each task's result under its key
(`persist_result=True`, `result_storage=<workdir>/prefect-results`), so:

- a run that died halfway finds the finished stages' results and resumes at the failed one;
- a rerun with one fine-tune changed gets new keys only for what reads that fine-tune (its own
  evaluation, the merges, their evaluations): the base's and the other fine-tunes' evaluations
  are reused.

    python -m mergeline.tasks.caching        # prints the code versions
"""
from __future__ import annotations

import hashlib
import importlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=None)
def code_version(*packages: str) -> str:
    """Hash of the .py sources of the named mergeline packages, e.g. code_version("merge")."""
    h = hashlib.sha256()
    for pkg in packages:
        root = Path(importlib.import_module(f"mergeline.{pkg}").__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(f"{pkg}/{p.relative_to(root)}".encode() + b"\0" + p.read_bytes() + b"\0")
    return "code:" + h.hexdigest()[:16]


def key_of(*parts: Any) -> str:
    """A stable key from JSON-able parts (dicts hashed with sorted keys; a pydantic model as its
    JSON dump, so a typed policy or suite keys as its plain-dict form does)."""
    text = json.dumps(parts, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    from pydantic import BaseModel

    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def from_parameter(name: str):
    """A Prefect `cache_key_fn` that uses the task's `name` argument as the key: the flow computes
    keys (it knows the content hashes) and hands them to the task explicitly."""

    def fn(context, parameters: dict) -> str:
        return parameters[name]

    fn.__name__ = f"key_from_{name}"
    return fn


if __name__ == "__main__":
    for pkg in ("merge", "evaluation"):
        print(pkg, code_version(pkg))
