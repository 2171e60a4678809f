"""Reading YAML config files (recipes, policies, suites, pipelines) with errors that name the
file and the key at fault. One place, so every config in mergeline fails the same way.

    python -c "from mergeline.merge.config_files import read_yaml_mapping; print(read_yaml_mapping('configs/gate_policy.yaml', 'gate policy', ValueError))"
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError


def short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (PyYAML's own text spans several, with a snippet)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{at}"


class Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that an integer too long for Python (over
    sys.get_int_max_str_digits() digits) is a YAML error with its line, not a bare ValueError."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node):
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"a number of {len(node.value)} digits is too long",
                                                node.start_mark) from None


Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml_mapping(text: str, where: str, kind: str, error: type[Exception]) -> dict:
    """YAML text -> a mapping; `error(...)` naming `where` if it is not valid YAML or not a mapping."""
    try:
        data = yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML ({yaml_problem(e)})") from None
    except RecursionError:
        raise error(f"{where}: not valid YAML (nested too deeply)") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise error(f"{where}: unreadable value ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{where}: a {kind} file must be a YAML mapping, not {type(data).__name__}")
    return data


def read_yaml_mapping(path: str | Path, kind: str, error: type[Exception]) -> dict:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise error(f"{short(str(path))}: {kind} file not found")
        raw = path.read_bytes()
    except OSError as e:  # a name too long for the file system, a folder, no permission
        raise error(f"{short(str(path))}: cannot read the {kind} file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: a {kind} file must be UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_yaml_mapping(text, str(path), kind, error)


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
