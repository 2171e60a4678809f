"""report.html: one self-contained page (inline CSS, plots as base64 PNG data: URIs), readable
offline and attachable to a CI run or an MLflow run as a single file.

    render_html(report: dict) -> str

    python -m evaluation.html_report report.json > report.html
"""
from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

from evaluation.plots import PLOTS, all_plots
from evaluation.report import score_matrix, sign_conflict_table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;
     color:#1d2330;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
.meta{color:#5b6475;font-size:.9em}
.verdict{display:inline-block;padding:6px 16px;border-radius:6px;font-weight:700;font-size:1.3em;color:#fff}
.go{background:#2e9e57} .nogo{background:#c4393b} .none{background:#7b7b7b}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.88em}
th,td{border:1px solid #d8dde6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f4f9} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pass{color:#1f7a41;font-weight:600} td.fail{color:#b02a2c;font-weight:600}
figure{margin:12px 0 24px} figure img{max-width:100%;border:1px solid #e3e7ee}
figcaption{color:#5b6475;font-size:.9em} .answer{font-size:1.05em;background:#f6f8fb;padding:8px 12px;border-left:4px solid #1f6fb4}
code{font-size:.85em;word-break:break-all}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _cell(x) -> str:
    if x is None:
        return '<td class="num">–</td>'
    if isinstance(x, bool):
        return f"<td>{'yes' if x else 'no'}</td>"
    if isinstance(x, (int, float)):
        return f'<td class="num">{x:.3f}</td>' if isinstance(x, float) else f'<td class="num">{x}</td>'
    return f"<td>{_e(x)}</td>"


def _table(headers: list[str], rows: list[list], raw_cells: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if raw_cells and isinstance(c, str) and c.startswith("<td")
                                    else _cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(report: dict) -> str:
    p, d = report["primary"], report.get("decision")
    parts = [f"<h1>mergeline evaluation report</h1><p class='meta'>primary candidate <b>{_e(p)}</b> · "
             f"created {_e(report['created'])} · lm-eval {_e(report['lm_eval_version'])} · "
             f"schema v{report['schema_version']}</p>"]
    if d:
        cls = "go" if d["go"] else "nogo"
        parts.append(f"<p><span class='verdict {cls}'>{_e(d['verdict'])}</span> &nbsp;candidate <b>{_e(d['candidate'])}</b> "
                     f"under policy <b>{_e(d['policy'])}</b></p>")
        parts.append(_table(["check", "result", "detail"],
                            [[c["rule"], f"<td class='{'pass' if c['passed'] else 'fail'}'>{'PASS' if c['passed'] else 'FAIL'}</td>",
                              c["message"]] for c in d["checks"]], raw_cells=True))
    else:
        parts.append("<p><span class='verdict none'>no gate decision</span></p>")

    parts.append(f"<h2>Does {_e(p)} beat averaging?</h2><p class='answer'>{_e(report['baselines']['answer'])}</p>")
    keys = ["mean_retention", "min_retention", "mean_regression", "worst_regression", "interference_flag",
            "total_flips", "sign_conflict_rate", "max_dropped_fraction"]
    parts.append(_table(["candidate"] + [k.replace("_", " ") for k in keys],
                        [[n] + [c["summary"][k] for k in keys] for n, c in report["candidates"].items()]))

    parts.append("<h2>Plots</h2>")
    for key, png in all_plots(report).items():
        title = PLOTS[key][0]
        if png is None:
            parts.append(f"<p class='meta'>{_e(title)}: no data in this report.</p>")
        else:
            parts.append(f"<figure>{_img(png, title)}<figcaption>{_e(title)}</figcaption></figure>")

    models, tasks, values = score_matrix(report)
    parts.append("<h2>Scores (primary metric)</h2>")
    parts.append(_table(["task", "type"] + models,
                        [[t, report["task_types"].get(t)] + [values.get((m, t)) for m in models] for t in tasks]))

    parts.append("<h2>Retention</h2>")
    parts.append(_table(["candidate", "fine-tune", "task", "type", "fine-tune score", "merged", "retention", "drop"],
                        [[r["candidate"], r["finetune"], r["task"], r["task_type"], r["finetune_score"],
                          r["merged_score"], r["retention"], r["drop"]]
                         for c in report["candidates"].values() for r in c["retention"]]))
    parts.append("<h2>Regression vs base</h2>")
    parts.append(_table(["candidate", "task", "base", "merged", "delta"],
                        [[r["candidate"], r["task"], r["base_score"], r["merged_score"], r["delta"]]
                         for c in report["candidates"].values() for r in c["regression"]]))

    parts.append("<h2>Interference</h2>")
    rows = []
    for n, c in report["candidates"].items():
        i, s = c["interference"], c["interference"]["spread"]
        by_type = ", ".join(f"{k}: {v['mean_retention']:.3f}" for k, v in i["by_type"].items()
                            if v.get("mean_retention") is not None)
        rows.append([n, s["min"], s["max"], s["std"], ", ".join(i["kept"]) or "–", ", ".join(i["lost"]) or "–",
                     "YES" if i["flag"] else "no", by_type or "–", i["total_flips"]])
    parts.append(_table(["candidate", "min", "max", "std", "kept (≥ high)", "lost (≤ low)", "flag",
                         "retention by type", "flips"], rows))
    parts.append(_table(["candidate", "task", "reference", "items", "reference right", "flips", "gains", "flip rate"],
                        [[n, f["task"], f["reference"], f["items"], f["reference_correct"], f["flips"], f["gains"],
                          f["flip_rate"]] for n, c in report["candidates"].items() for f in c["interference"]["flips"]]))

    parts.append("<h2>Sign-conflict proxy</h2>")
    parts.append(_table(*sign_conflict_table(report)))

    parts.append("<h2>Compatibility</h2>")
    comp = report.get("compat")
    if comp:
        parts.append(f"<p>status: <b>{_e(comp['status'])}</b></p>")
        parts.append(_table(["check", "status", "message"],
                            [[c["name"], f"{c['status']}{' (waived)' if c.get('waived') else ''}", c["message"]]
                             for c in comp["checks"]]))
    else:
        parts.append("<p class='meta'>no compatibility report was given</p>")

    parts.append("<h2>Inputs</h2>")
    parts.append(_table(["model", "role", "content hash", "path"],
                        [[n, m["role"], m["content_hash"], m["path"]] for n, m in report["inputs"]["models"].items()]))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>mergeline report: {_e(p)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


if __name__ == "__main__":
    print(render_html(json.loads(Path(sys.argv[1]).read_text())))
