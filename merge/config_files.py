"""Reading YAML config files (recipes, policies, suites, pipelines) with errors that name the
file and the key at fault. One place, so every config in mergeline fails the same way.

    python -c "from merge.config_files import read_yaml_mapping; print(read_yaml_mapping('configs/gate_policy.yaml', 'gate policy', ValueError))"
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError


def parse_yaml_mapping(text: str, where: str, kind: str, error: type[Exception]) -> dict:
    """YAML text -> a mapping; `error(...)` naming `where` if it is not valid YAML or not a mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{where}: a {kind} file must be a YAML mapping, not {type(data).__name__}")
    return data


def read_yaml_mapping(path: str | Path, kind: str, error: type[Exception]) -> dict:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {kind} file not found")
    return parse_yaml_mapping(path.read_text(), str(path), kind, error)


UNION_TAGS = ("str", "dict[", "list[", "function-")


def explain(e: ValidationError, allowed: Callable[[tuple], list[str]] | None = None,
            union_tags: tuple[str, ...] = UNION_TAGS) -> str:
    """A pydantic error as "unknown key 'a.b' (allowed: ...); c: must be > 0", one part per error.

    `allowed(parent_location)` may list the keys valid at that place, for unknown-key errors."""
    parts = []
    for err in e.errors():
        # Union members add their type name to the location; drop those for a readable key.
        loc = tuple(p for p in err["loc"] if not str(p).startswith(union_tags))
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            keys = allowed(loc[:-1]) if allowed else []
            parts.append(f"unknown key '{key}'" + (f" (allowed: {', '.join(keys)})" if keys else ""))
        elif err["type"] == "missing":
            parts.append(f"missing required key '{key}'")
        else:
            parts.append(f"key '{key}': {err['msg']}")
    return "; ".join(dict.fromkeys(parts))
