"""report.html: one self-contained page (inline CSS, plots as base64 PNG data: URIs), readable
offline and attachable to a CI run or an MLflow run as a single file.

It renders the same document as report.md (`evaluation.tables.document`). Every value from the
report goes through html.escape: no cell, name or message is ever copied in as markup (issue #11).
Verdicts and check statuses are badges: GO/pass green, NO-GO/fail red, INCONCLUSIVE amber,
not applicable grey. Tables sit in a horizontal scroll box and wrap long paths and hashes, so the
page fits a 1400-pixel window.

    render_html(report: EvaluationReport, decision: Decision | None = None, plots: dict | None = None) -> str

    python -m mergeline.evaluation.html_report report.json > report.html   # with decision.json beside it
"""
from __future__ import annotations

import base64
import html
import re
import sys

from mergeline.evaluation.plots import PLOTS, all_plots
from mergeline.evaluation.schema import Decision, EvaluationReport
from mergeline.evaluation.tables import Code, Ival, Plots, Section, Status, Table, cell_text, document

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1320px;
     color:#1d2330;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
.meta{color:#5b6475;font-size:.9em}
.badge{display:inline-block;padding:1px 8px;border-radius:4px;font-weight:700;font-size:.85em;color:#fff;
       white-space:nowrap;vertical-align:middle;letter-spacing:.02em}
h2 .badge{font-size:.8em;padding:4px 14px;margin-left:10px}
.badge.go,.badge.pass{background:#2e9e57} .badge.no-go,.badge.fail,.badge.flagged{background:#c4393b}
.badge.inconclusive,.badge.suspected{background:#f2b705;color:#1d2330;outline:2px dashed #8a6700;outline-offset:-3px}
.badge.warn{background:#d9822b} .badge.not_applicable,.badge.none{background:#8d94a0}
.tw{overflow-x:auto;max-width:100%;margin:8px 0 16px}
table{border-collapse:collapse;font-size:.88em}
th,td{border:1px solid #d8dde6;padding:4px 8px;text-align:left;vertical-align:top}
.long{overflow-wrap:anywhere}
th{background:#f1f4f9} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.num span{white-space:nowrap} .ci{color:#5b6475;font-size:.9em}
td.code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;overflow-wrap:anywhere;min-width:12em}
td.text{max-width:36em} td.none{text-align:center;color:#8d94a0}
figure{margin:12px 0 24px} figure img{max-width:100%;border:1px solid #e3e7ee}
figcaption{color:#5b6475;font-size:.9em}
p.para{margin:6px 0}
"""


LONG_WORD = 18  # characters


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _is_long(text: str) -> bool:
    """A word too long for a column: such text (class 'long') may break anywhere; other text breaks
    only between words, so short headers such as 'threshold' stay whole."""
    return any(len(w) > LONG_WORD for w in str(text).split())


def _breakable(text: str) -> str:
    """Escaped text with a break opportunity after _ . / [ - in long words (rule names, paths), so
    they wrap at a separator rather than mid-word (overflow-wrap stays the fallback)."""
    escaped = _e(text)
    return re.sub(r"([_./\[-])(?=\S)", r"\1<wbr>", escaped) if _is_long(text) else escaped


def _cell(x) -> str:
    if isinstance(x, Status):
        return f"<td><span class='badge {_e(x.key)}'>{_e(x.word)}</span></td>"
    if isinstance(x, Ival):
        est, ci = x.parts()
        ci_html = f" <span class='ci'>{_e(ci)}</span>" if ci else ""
        return f"<td class='num'><span>{_e(est)}</span>{ci_html}</td>"
    if isinstance(x, Code):
        return f"<td class='code'>{_breakable(x)}</td>"
    if x is None:
        return "<td class='none'>–</td>"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"<td class='num'>{_e(cell_text(x))}</td>"
    text = cell_text(x)
    return f"<td class='text{' long' if _is_long(text) else ''}'>{_breakable(text)}</td>"


def html_table(table: Table) -> str:
    head = "".join(f"<th class='long'>{_breakable(h)}</th>" if _is_long(h) else f"<th>{_e(h)}</th>"
                   for h in table.headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    return f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _plot(key: str, plots: dict) -> str:
    title = PLOTS[key][0]
    png = plots[key]
    if png is None:
        return f"<p class='meta'>{_e(title)}: no data in this report.</p>"
    return f"<figure>{_img(png, title)}<figcaption>{_e(title)}</figcaption></figure>"


def _section(sec: Section, plots: dict) -> str:
    badge = f"<span class='badge {_e(sec.badge.key)}'>{_e(sec.badge.word)}</span>" if sec.badge is not None else ""
    parts = [f"<h2>{_e(sec.title)}{badge}</h2>"]
    for b in sec.blocks:
        if isinstance(b, Table):
            parts.append(html_table(b))
        elif isinstance(b, Plots):
            parts += [_plot(key, plots) for key in PLOTS]
        else:
            parts.append(f"<p class='para'>{_e(b)}</p>")
    return "\n".join(parts)


def render_html(report: EvaluationReport, decision: Decision | None = None, plots: dict | None = None) -> str:
    """The page; `plots` ({key: PNG bytes or None}, evaluation.plots.all_plots) when already drawn."""
    meta, sections = document(report, decision)
    plots = all_plots(report, decision) if plots is None else plots
    body = [f"<h1>mergeline evaluation report</h1><p class='meta'>{' · '.join(_e(m) for m in meta)}</p>"]
    body += [_section(sec, plots) for sec in sections]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>mergeline report: {_e(report.primary)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


if __name__ == "__main__":
    from mergeline.evaluation.report import load_outputs

    print(render_html(*load_outputs(sys.argv[1])), end="")
