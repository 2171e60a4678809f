"""Chat templates a recipe's ``chat_template`` may name: mergekit 0.1.5's presets, byte for byte
(the ``.jinja`` files here are copied from mergekit's ``_data/chat_templates``, LGPL-3.0), or
"auto" (the most common template among the input models, chosen by the writer), or a literal
Jinja template (a string containing ``{%`` or ``{{``).

    python -c "from mergeline.merge.chat_templates import PRESETS; print(sorted(PRESETS))"
"""
from __future__ import annotations

from importlib.resources import files

PRESETS: dict[str, str] = {
    p.name.removesuffix(".jinja"): p.read_text(encoding="utf-8")
    for p in sorted(files(__name__).iterdir(), key=lambda p: p.name)
    if p.name.endswith(".jinja")
}


def problem(value: str) -> str | None:
    """Why ``value`` is not a usable ``chat_template`` setting, or None."""
    if value == "auto" or value in PRESETS or "{%" in value or "{{" in value:
        return None
    return (f"chat_template {value if len(value) <= 40 else value[:37] + '...'!r} is neither 'auto', "
            f"a preset ({', '.join(PRESETS)}) nor a Jinja template (a string containing '{{%' or '{{{{')")


def template_text(value: str) -> str:
    """The template to write for a preset name or a literal template ('auto' is the writer's)."""
    why = problem(value)
    if why or value == "auto":
        raise ValueError(why or "chat_template 'auto' is chosen from the input models")
    return PRESETS.get(value, value)
