"""report.md from a report and its decision, and the writer of report.json, decision.json,
report.md and report.html (the types: evaluation/schema.py).

Both renderers walk the same document (`evaluation.tables.document`). Every value from the
report is escaped for Markdown: `<` and `&` become entities (no HTML tag), and the characters
that would end a table cell or start markup (| \\ ` * a link's ]( and a word-edge _) get a
backslash, so a crafted model or task name cannot inject markup or break a table.

    render_markdown(report: EvaluationReport, decision: Decision | None = None) -> str
    write_reports(report, decision, out_dir: Path, *, overwrite=False, html=True, plots=None)
        -> {"json": report.json, "decision": decision.json (with a decision), "md": report.md, "html": report.html}

    python -m mergeline.evaluation.report report.json OUT_DIR     # re-render md + html from a report.json
                                                                  # (and the decision.json beside it)
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mergeline.evaluation.schema import Decision, EvaluationReport
from mergeline.evaluation.tables import Plots, Section, Table, cell_text, document

# `](` is what every Markdown link and image needs; a bracket alone ("[0.80, 0.97]") is plain text.
_MD_SPECIAL = re.compile(r"[\\|`*]|\](?=\()|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_escape(text, paragraph: bool = False) -> str:
    """Text safe inside a Markdown table cell (or, with paragraph=True, a paragraph)."""
    # `<` starts every HTML tag and `&` every entity; `>` alone is plain text ("lower bound >= 0.8").
    text = str(text).replace("&", "&amp;").replace("<", "&lt;")
    text = _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)
    text = re.sub(r"\s*[\r\n]+\s*", " ", text)  # a newline would end the table row
    # A paragraph must not turn into a heading, quote or list through its first character.
    return re.sub(r"^([#>+-])", r"\\\1", text) if paragraph else text


def md_table(table: Table) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(md_escape(cell_text(x)) for x in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _section(sec: Section) -> list[str]:
    title = md_escape(sec.title) + (f": **{md_escape(sec.badge.word)}**" if sec.badge is not None else "")
    out = [f"## {title}\n"]
    if any(isinstance(b, Plots) for b in sec.blocks):
        out.append("The plots are in report.html and plots/*.png.\n")
    for b in sec.blocks:
        if isinstance(b, Table):
            out.append(md_table(b) + "\n")
        elif isinstance(b, str):
            out.append(md_escape(b, paragraph=True) + "\n")
    return out


def render_markdown(report: EvaluationReport, decision: Decision | None = None) -> str:
    meta, sections = document(report, decision)
    out = ["# mergeline evaluation report\n", " · ".join(md_escape(m) for m in meta) + "\n"]
    for sec in sections:
        out += _section(sec)
    return "\n".join(out)


def write_reports(report: EvaluationReport, decision: Decision | None, out_dir: str | Path, *,
                  overwrite: bool = False, html: bool = True, plots: dict | None = None) -> dict[str, Path]:
    """Write report.json, decision.json (when there is a decision), report.md and, unless
    html=False, report.html; each to a temp name, then renamed. Every text is made before the
    first file is written, so a renderer that fails leaves no file behind."""
    out_dir = Path(out_dir)
    texts = {"json": report.model_dump_json(indent=2)}
    if decision is not None:
        texts["decision"] = decision.model_dump_json(indent=2)
    texts["md"] = render_markdown(report, decision)
    if html:
        from mergeline.evaluation.html_report import render_html  # matplotlib: only when drawing
        texts["html"] = render_html(report, decision, plots)
    names = {"json": "report.json", "decision": "decision.json", "md": "report.md", "html": "report.html"}
    targets = {kind: out_dir / names[kind] for kind in texts}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"report(s) already exist: {existing} (pass overwrite=True to replace)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, path in targets.items():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(texts[kind] + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return targets
