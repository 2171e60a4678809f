"""The shared report document (evaluation.tables) and report.md (evaluation.render)."""
import re
from functools import partial

import _report_v2 as v2
from mergeline.evaluation.metrics import SIGN_ELECTING_METHODS
from mergeline.evaluation.render import md_escape, render_markdown
from mergeline.evaluation.stats import Interval
from mergeline.evaluation.tables import Ival, Status, Table, cell_text, document

CRAFTED = {"ties": "<script>alert('model')</script>", "t_addition": "t|<img src=x onerror=alert(1)>|",
           "addition": "add`*[x](javascript:alert(1))*`", "default": "<b>policy</b>",
           "t_gen": "gen\n| injected | row |"}


def test_sign_electing_methods_mirror_the_merge_registry():
    from mergeline.merge.methods.registry import METHODS
    electing = {name for name, m in METHODS.items() if isinstance(m.fn, partial) and m.fn.keywords.get("consensus")}
    assert electing == set(SIGN_ELECTING_METHODS)


def test_cells_show_an_interval_as_the_stats_module_does():
    iv = Interval(estimate=0.925, low=0.801, high=0.974, confidence=0.95, method="wilson", n=40)
    assert cell_text(Ival(iv.estimate, iv.low, iv.high)) == iv.text()
    assert cell_text(Ival(-0.05, -0.1, 0.01, signed=True)) == "-0.050 [-0.100, +0.010]"
    assert cell_text(Ival(0.5)) == "0.500"                      # no bounds: a plain number
    assert Status("not_applicable").word == "N/A" and Status("INCONCLUSIVE").key == "inconclusive"


def test_markdown_gives_every_rule_its_status_interval_threshold_and_items_needed():
    rep, dec = v2.report("INCONCLUSIVE")
    md = render_markdown(rep, dec)
    assert "## Decision: **INCONCLUSIVE**" in md
    mean = dec.check("retention.mean")
    row = next(line for line in md.splitlines() if line.startswith("| retention.mean |"))
    assert f"| INCONCLUSIVE | {mean.interval.text()} | 0.850 | ≈ 120 items per task |" in row
    assert "| sign_conflict.rate | N/A |" in md
    # retention, regression and the baseline difference carry their intervals
    assert rep.candidates["ties"].retention[0].retention_interval.text() in md
    d = rep.baselines.comparisons[0].difference_interval
    assert f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" in md
    # the typed absences say why, in the tables
    assert "| linear | – | – | method 'linear' elects no signs |" in md


def _pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_escapes_markup_and_table_pipes_in_crafted_names():
    rep, dec = v2.data("NO-GO", names=CRAFTED)
    dec["checks"][0]["message"] = "<script>alert('check')</script> | x"
    md = render_markdown(*v2.typed(rep, dec))
    assert "<script" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script>alert('model')&lt;/script>" in md
    assert "\\`\\*[x\\](javascript:alert(1))\\*\\`" in md
    # every table row splits into exactly as many cells as its header
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = _pipes(lines[i - 1])
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                assert _pipes(row) == width, row


def test_md_escape_keeps_plain_names_readable():
    assert md_escape("t_rev") == "t_rev"
    assert md_escape("_x_ a|b") == "\\_x\\_ a\\|b"
    assert md_escape("- list", paragraph=True) == "\\- list"


def test_document_is_the_same_for_markdown_and_html_and_stands_without_a_decision():
    rep, dec = v2.report("GO")
    meta, sections = document(rep, dec)
    assert [s.title for s in sections][:2] == ["Decision", "Does ties beat averaging?"]
    assert sections[0].badge == "GO"
    tables = [b for s in sections for b in s.blocks if isinstance(b, Table)]
    assert all(len(r) == len(t.headers) for t in tables for r in t.rows)
    # the report alone (no policy given): every section but the decision is the same
    meta_alone, alone = document(rep)
    assert meta_alone == meta and alone[0].blocks == ["no gate decision: no policy was given"]
    assert alone[0].badge is None and alone[1:] == sections[1:]


def test_a_markdown_renderer_sees_no_tag_in_a_crafted_report():
    """Render report.md with markdown-it, raw HTML allowed and GFM tables on: the crafted names
    come out as text, and every table is still a table."""
    from markdown_it import MarkdownIt

    rep, dec = v2.data("NO-GO", names=CRAFTED)
    dec["checks"][0]["message"] = "<script>alert('check')</script> | x"
    md = render_markdown(*v2.typed(rep, dec))
    page = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    tags = set(re.findall(r"<([a-z0-9]+)", page))
    assert tags <= {"h1", "h2", "p", "strong", "table", "thead", "tbody", "tr", "th", "td"}, tags
    assert "&lt;script&gt;alert('model')&lt;/script&gt;" in page
    assert page.count("<table>") == md.count("\n|---")
