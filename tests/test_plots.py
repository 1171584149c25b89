"""The simulator's plots draw what results.json holds: the seeds each point averages, and no other."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest

from tadlora.sim import plots
from tadlora.sim.summary import summarize


def cell(t: int | None, seed: int, acc: float, std: float = 0.01, method: str = "tad") -> dict[str, Any]:
    rounds = [{"round": 0, "acc_mean": acc, "acc_std": std, "cross_term_norm": 0.0}]
    return {"method": method, "topology": "er", "link_prob": 0.02, "switch_interval": t, "seed": seed,
            "rounds": rounds, "final": {"acc_mean": acc, "acc_std": std, "round": 0}}  # fmt: skip


@contextlib.contextmanager
def drawn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, cells: list[dict[str, Any]], summary: Any = None
) -> Iterator[list[Any]]:
    """Every figure write_plots draws for run ``name`` of ``cells`` (``summary``: `summarize`'s of them unless
    given), kept open (not saved) so that its lines can be read, and closed at the end."""
    figures: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    results = {"config": {"name": name}, "cells": cells, "summary": summarize(cells) if summary is None else summary}
    try:
        plots.write_plots(results, tmp_path)
        yield figures
    finally:
        for fig in figures:
            plt.close(fig)


def test_accuracy_vs_t_averages_the_same_seeds_at_every_t(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Seed 1 finished T = 5 only (a sweep still running, as benchmarks/paper/cpu-sst2/T-sweep was): a mean over
    seeds 0 and 1 at T = 5 beside seed 0 alone at the other T made a dip that was seed 1's, not T = 5's."""
    cells = [cell(1, 0, 0.78), cell(5, 0, 0.78, std=0.02), cell(10, 0, 0.78), cell(5, 1, 0.70, std=0.2)]
    with drawn(monkeypatch, tmp_path, "sweep", cells) as figures:
        (ax,) = figures[-1].axes
        (bars,) = ax.containers  # one errorbar: its data line, caps and bars
        line = bars[0]
        assert list(line.get_xdata()) == [1, 5, 10]
        assert list(line.get_ydata()) == pytest.approx([0.78, 0.78, 0.78])
        assert "seeds 0" in ax.get_legend().get_texts()[0].get_text()


def test_accuracy_vs_round_never_switches_seeds_partway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Seed 1's value at round 2 is missing (a NaN, written as null): the point there was seed 0's alone, so the
    curve jumped from the two seeds' mean to one seed's; now there is a gap. Round 4 has no std in any run: the
    band's rounds were then fewer than the line's, and drawing it failed the whole plot."""

    def run(seed: int, accs: list[float | None], stds: list[float | None]) -> dict[str, Any]:
        rounds = [{"round": i, "acc_mean": a, "acc_std": s} for i, (a, s) in enumerate(zip(accs, stds, strict=True))]
        return {**cell(None, seed, 0.0, method="lora"), "rounds": rounds}

    cells = [run(0, [0.6, 0.9, 0.7, 0.8], [0.1, 0.1, 0.1, None]), run(1, [0.4, None, 0.5, 0.8], [0.1, 0.1, None, None])]
    with drawn(monkeypatch, tmp_path, "nan", cells, summary=[]) as figures:
        (line,) = figures[0].axes[0].get_lines()
        assert list(line.get_xdata()) == [1, 2, 3, 4]
        assert line.get_ydata()[0] == pytest.approx(0.5) and np.isnan(line.get_ydata()[1])


def test_accuracy_vs_round_legend_orders_t_by_value_and_says_how_many_seeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The T sweep's legend read "tad T=1, T=10, T=15, T=2, ...", and nothing said that two of its lines were means of
    two seeds and the others one seed's run (benchmarks/paper/cpu-sst2/T-sweep while seed 1 was running)."""

    def at(p: float, c: dict[str, Any]) -> dict[str, Any]:
        return {**c, "link_prob": p}

    cells = [cell(1, 0, 0.8), cell(1, 1, 0.7), cell(2, 0, 0.8), cell(10, 0, 0.8), at(0.5, cell(1, 0, 0.8))]
    cells.append(at(0.5, cell(10, 0, 0.8)))
    with drawn(monkeypatch, tmp_path, "sweep", cells) as figures:
        legend = [t.get_text() for t in figures[0].axes[-1].get_legend().get_texts()]
        assert legend == ["tad T=1 (n=1|2)", "tad T=2 (n=1)", "tad T=10 (n=1)"]
        assert "n: seeds averaged" in figures[0].texts[0].get_text()
        for fig in figures:  # rounds and T are whole numbers: a tick at round 2.5 or T = 2.2 was drawn
            assert all(float(x).is_integer() for ax in fig.axes for x in ax.get_xticks())


def test_more_than_ten_lines_take_ten_hues_before_any_shade_repeats_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With 11 lines (the cpu-sst2 method grid) tab20's pairs of shades went to neighbours in the legend: ffa and lora
    both orange, rolora and tad T=1 both green, adf and decaf both blue."""
    methods = ["adf", "decaf", "ffa", "lora", "rolora", "m5", "m6", "m7", "m8", "m9", "m10"]
    cells = [cell(None, 0, 0.8, method=m) for m in methods]
    with drawn(monkeypatch, tmp_path, "grid", cells) as figures:
        lines = {line.get_label(): line.get_color() for line in figures[0].axes[0].get_lines()}
        tab20 = [plt.get_cmap("tab20")(i) for i in range(20)]
        pairs = [tab20.index(tuple(lines[m])) // 2 for m in sorted(methods)[:10]]
        assert len(set(pairs)) == 10  # the first ten lines: ten different hues


def test_every_plot_title_fits_inside_its_figure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's redraw of its cpu-sst2 figure (one panel: tad and lora at p = 0.02) cut the title at both edges,
    "u-sst2: accuracy, mean over seeds (band: ± std over clients); n: seeds averag": one 5-inch panel is narrower
    than that line. A title wraps to the figure's width instead; so does the T plot's."""
    cells = [cell(12, 0, 0.75), cell(None, 0, 0.76, method="lora"), cell(1, 0, 0.7), cell(12, 1, 0.74)]
    with drawn(monkeypatch, tmp_path, "cpu-sst2", cells) as figures:
        assert len(figures) == 3  # accuracy and cross term vs round, accuracy vs T
        for fig in figures:
            fig.canvas.draw()
            width = fig.bbox.width
            for text in fig.texts:
                box = text.get_window_extent()
                assert box.x0 >= 0 and box.x1 <= width, (text.get_text(), box, width)
            for ax in fig.axes:  # and the title leaves the panels' own titles clear
                assert ax.title.get_window_extent().y1 <= min(t.get_window_extent().y0 for t in fig.texts)


def test_the_round_plot_s_legend_sits_beside_the_panels_inside_the_figure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the method grid's 11 lines the legend, placed "best" inside the last panel, covered the lowest lines
    of p = 0.02 (FFA-LoRA's, at the end). It goes beside the panels now, and within the figure."""
    methods = ["adf", "decaf", "ffa", "lora", "rolora", "m5", "m6", "m7", "m8", "m9", "m10"]
    cells = [cell(None, 0, 0.8, method=m) | {"link_prob": p} for m in methods for p in (0.5, 0.02)]
    with drawn(monkeypatch, tmp_path, "grid", cells) as figures:
        fig = figures[0]
        fig.canvas.draw()
        legend = fig.axes[-1].get_legend().get_window_extent()
        assert len(fig.axes) == 2
        for ax in fig.axes:
            assert not legend.overlaps(ax.get_window_extent()), (legend, ax.get_window_extent())
        assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width, (legend, fig.bbox.width)
