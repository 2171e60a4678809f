"""The report's plots: literal names (issue #11), no overlapping labels, intervals as error bars,
sign-election plots only for methods that elect signs."""
import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

import _eval_synthetic as syn
import _report_v2 as v2
from mergeline.evaluation.plots import PLOTS, all_plots, figure
from mergeline.evaluation.schema import NotApplicable

PNG = b"\x89PNG\r\n\x1a\n"
# Names matplotlib's math-text parser refuses or misreads when parse_math is on.
MATH_NAMES = {"ties": "ties$x^$", "addition": "add_$\\frac{1}{", "t_addition": "t$_a$_b$", "reverse": "rev\\",
              "t_gen": "gen $$ 50% $", "linear": "lin^$_"}
LONG = [f"task_{i}_" + "abcdefghijklmnopqrstuvwxyz"[: 30 - 7 - len(str(i))] for i in range(8)]


def test_names_with_math_text_characters_render_literally():
    rep, dec = v2.report("NO-GO", names=MATH_NAMES)
    pngs = all_plots(rep, dec)
    assert set(pngs) == set(PLOTS)
    assert all(p is not None and p.startswith(PNG) for p in pngs.values())
    fig = figure("retention", rep)
    FigureCanvasAgg(fig).draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "t$_a$_b$" in labels and not any(t.get_parse_math() for t in fig.findobj(Text))


def _drawn_texts(fig, monkeypatch):
    """(text, window extent) of every non-empty text the figure actually draws."""
    drawn, draw = [], Text.draw

    def record(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    with monkeypatch.context() as m:
        m.setattr(Text, "draw", record)
        FigureCanvasAgg(fig).draw()
    return drawn


@pytest.mark.parametrize("key", list(PLOTS))
def test_eight_tasks_with_thirty_character_names_do_not_overlap(key, monkeypatch):
    finetunes = [n[:-2] for n in LONG]
    names = {f"t_{ft}": n for ft, n in zip(finetunes, LONG)}
    names.update({"ties": "ties_" + "x" * 25, "dare_ties": "dare_ties_candidate_with_a_long_name"})
    rep, dec = v2.report("GO", finetunes=finetunes, general=["general_knowledge_benchmark_v2_x"], names=names)
    fig = figure(key, rep, dec)
    assert fig is not None
    texts = _drawn_texts(fig, monkeypatch)
    assert len(texts) > 8
    for (a, ea), (b, eb) in itertools.combinations(texts, 2):
        assert not ea.padded(2).overlaps(eb), f"{key}: {a!r} overlaps {b!r} (or comes within 2 pixels)"


@pytest.fixture(scope="module")
def example():
    return syn.example_report()


@pytest.mark.parametrize("key", list(PLOTS))
def test_the_example_report_draws_every_plot_without_overlaps(key, example, monkeypatch):
    texts = _drawn_texts(figure(key, *example), monkeypatch)
    for (a, ea), (b, eb) in itertools.combinations(texts, 2):
        assert not ea.padded(2).overlaps(eb), f"{key}: {a!r} overlaps {b!r} (or comes within 2 pixels)"


def _error_segments(ax):
    """The (low, high) x-range of every error bar segment on an axes."""
    segs = []
    for container in ax.containers:
        err = getattr(container, "errorbar", None)
        if err is not None:
            for coll in err.lines[2]:
                segs += [tuple(sorted((s[0][0], s[1][0]))) for s in coll.get_segments()]
    return segs


def test_intervals_are_error_bars_in_retention_regression_and_baseline_plots():
    rep, dec = v2.report("INCONCLUSIVE")
    first = rep.candidates["ties"].retention[0].retention_interval
    delta = rep.candidates["ties"].regression[0].delta_interval
    diff = rep.baselines.comparisons[0].difference_interval
    for key, iv in (("retention", first), ("regression", delta), ("baseline", diff)):
        segs = _error_segments(figure(key, rep, dec).axes[0])
        assert any(lo == pytest.approx(iv.low) and hi == pytest.approx(iv.high) for lo, hi in segs), key


def test_the_baseline_plot_marks_the_threshold_of_the_decision_it_is_given():
    rep, dec = v2.report("GO")
    dotted = [ln for ln in figure("baseline", rep, dec).axes[0].get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_xdata()[0] for ln in dotted] == [dec.check("baseline[linear]").threshold]
    assert not [ln for ln in figure("baseline", rep).axes[0].get_lines() if ln.get_linestyle() == ":"]


def test_sign_election_plots_only_for_methods_that_elect_signs():
    rep, _ = v2.report("GO")
    fig = figure("retention_and_dropped", rep)
    titles = [sub.get_suptitle() for sub in fig.subfigs]
    assert [t.split(":")[0] for t in titles] == ["ties", "dare_ties"]
    titles = [ax.get_title() for ax in figure("dropped_by_layer", rep).axes]
    assert len(titles) == 2 and not any(t.startswith("linear") for t in titles)
    none_elect = rep.model_copy(update={"candidates": {
        n: c.model_copy(update={"sign_conflict": NotApplicable(not_applicable="method 'task_arithmetic' elects no signs")})
        for n, c in rep.candidates.items()}})
    rep = none_elect
    assert figure("retention_and_dropped", rep) is None and figure("dropped_by_layer", rep) is None
