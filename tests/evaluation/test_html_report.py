"""report.html: escaping (issue #11), verdict badges, intervals in the tables."""
import re
from html.parser import HTMLParser

import _report_v2 as v2
from mergeline.evaluation.html_report import CSS, render_html

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "span", "div", "table",
                "thead", "tbody", "tr", "th", "td", "figure", "img", "figcaption", "wbr"}
SCRIPT = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.cells, self._row, self._cell = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "tr":
            self.cells.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


def test_a_crafted_report_cannot_inject_markup():
    names = {"ties": SCRIPT, "addition": f"<td>{SCRIPT}", "t_reverse": "<img src=x onerror=alert(1)>",
             "default": f"policy {SCRIPT}", "t_gen": "x\" onmouseover=\"alert(1)"}
    rep, dec = v2.data("NO-GO", names=names)
    for c in dec["checks"]:
        c["message"] = f"<td class='pass'>{SCRIPT}</td>"   # the cell render_html used to copy in raw
        c["rule"] = f"<td>{c['rule']}"
    rep["baselines"]["answer"] = SCRIPT
    rep["compat"]["checks"][0]["message"] = SCRIPT
    page = render_html(*v2.typed(rep, dec))
    parsed = _parse(page)
    assert set(parsed.tags) <= ALLOWED_TAGS
    assert not [a for a, _ in parsed.attrs if a.startswith("on")]
    assert "<script" not in page
    # the names are still there, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert any(row and row[0] == f"<td>retention.mean" for row in parsed.cells)


def _badge_colours() -> dict[str, str]:
    out = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", CSS):
        bg = re.search(r"background:([^;]+)", body)
        for sel in selectors.split(","):
            m = re.fullmatch(r"\s*\.badge\.([\w-]+)\s*", sel)
            if m and bg:
                out[m.group(1)] = bg.group(1).strip()
    return out


def test_three_verdicts_have_three_badges():
    colours = _badge_colours()
    assert len({colours["go"], colours["no-go"], colours["inconclusive"], colours["not_applicable"]}) == 4
    assert colours["go"] == colours["pass"] and colours["no-go"] == colours["fail"]
    for verdict, cls in (("GO", "go"), ("NO-GO", "no-go"), ("INCONCLUSIVE", "inconclusive")):
        page = render_html(*v2.report(verdict))
        assert f"<h2>Decision<span class='badge {cls}'>{verdict}</span></h2>" in page


def test_each_check_shows_status_interval_threshold_and_items_needed():
    rep, dec = v2.report("INCONCLUSIVE")
    rows = {r[0]: r for r in _parse(render_html(rep, dec)).cells if r}
    mean = dec.check("retention.mean")
    assert rows["retention.mean"][1:5] == ["INCONCLUSIVE", mean.interval.text(), "0.850", "≈ 120 items per task"]
    assert rows["sign_conflict.rate"][1:3] == ["N/A", "–"]
    page = render_html(rep, dec)
    assert page.count("class='badge inconclusive'") >= 2   # the verdict and the rule


def test_paths_and_hashes_wrap_and_tables_scroll():
    page = render_html(*v2.report("GO"))
    assert "<td class='code'>/<wbr>work/<wbr>runs/<wbr>zoo/<wbr>models/<wbr>ties/<wbr>snapshots/<wbr>0123" in page
    assert re.search(r"td\.code\{[^}]*overflow-wrap:anywhere", CSS)
    assert re.search(r"\.tw\{overflow-x:auto", CSS)
    assert page.count("<div class='tw'><table>") == page.count("<table>")


def test_plots_drawn_once_are_embedded_as_given():
    """The report stage draws the plots once and hands them to the page: none are redrawn."""
    from mergeline.evaluation.plots import PLOTS, all_plots

    report, decision = v2.report("GO")
    drawn = all_plots(report, decision)
    assert render_html(report, decision, drawn) == render_html(report, decision)
    page = render_html(report, decision, {key: None for key in PLOTS})
    assert page.count("no data in this report") == len(PLOTS) and "<img" not in page
