"""PNG plots of a simulator run: accuracy vs round, accuracy vs T, cross-term norm vs round."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from tadlora.fsutil import atomic_write_bytes


def _label(run: dict[str, Any]) -> str:
    t = run["switch_interval"]
    return run["method"] if t is None else f"{run['method']} T={t}"


def _label_order(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The labels of ``runs`` by method, then T by value (T=2 before T=10; a method without T first)."""
    keys = {_label(r): (r["method"], -1 if r["switch_interval"] is None else r["switch_interval"]) for r in runs}
    return sorted(keys, key=keys.__getitem__)


def _palette(n: int) -> list[Any]:
    """``n`` colours: tab10's, or for more lines tab20's ten dark shades before its ten light ones (tab20 pairs a dark
    and a light shade of one hue, which in label order went to neighbours: ffa and lora both orange)."""
    if n <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i % 10) for i in range(n)]
    cmap = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [cmap(order[i % 20]) for i in range(n)]


def _series(runs: Sequence[dict[str, Any]], field: str) -> tuple[np.ndarray, np.ndarray]:
    """Rounds (1-based) at which any run has ``field``, and there the seed-mean of it: NaN (a gap in the line)
    at a round where some run lacks it (a NaN written as null), since a mean of the other seeds alone would make
    the curve jump from one set of seeds to another partway."""
    by_round: dict[int, list[float]] = {}
    for run in runs:
        for rec in run["rounds"]:
            if rec.get(field) is not None:
                by_round.setdefault(rec["round"] + 1, []).append(rec[field])
    xs = np.array(sorted(by_round))
    return xs, np.array([np.mean(by_round[x]) if len(by_round[x]) == len(runs) else np.nan for x in xs])


def _panels(results: dict[str, Any]) -> list[tuple[str, float, list[dict[str, Any]]]]:
    keys = sorted({(r["topology"], r["link_prob"]) for r in results["cells"]}, key=lambda k: (k[0], -k[1]))
    cells = results["cells"]
    return [(topo, p, [r for r in cells if (r["topology"], r["link_prob"]) == (topo, p)]) for topo, p in keys]


def _by_label(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(_label(run), []).append(run)
    return out


def _round_plot(results: dict[str, Any], field: str, ylabel: str, path: Path, log: bool = False) -> Path:
    _save(_round_figure(results, field, ylabel, log), path)
    return path


def _round_figure(results: dict[str, Any], field: str, ylabel: str, log: bool = False) -> Any:
    """One panel per (topology, p), a line per method and T. A (method, T) line has one colour in every panel and
    the legend names every line of every panel: the panels of a grid still running need not hold the same methods.
    A method whose T differs by panel (``switch_intervals: auto``) is a different line, and colour, in each."""
    panels = _panels(results)
    labels = _label_order(results["cells"])
    colors = dict(zip(labels, _palette(len(labels)), strict=True))
    shown: dict[str, Any] = {}  # label → a line drawn with it, for the legend
    # label → per panel, the seeds its line averages there (None: no line there): lines of one seed and lines of
    # several (a grid still running) look alike otherwise.
    seeds: dict[str, list[int | None]] = {label: [None] * len(panels) for label in labels}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for k, (ax, (topo, p, runs)) in enumerate(zip(axes[0], panels, strict=True)):
        for label, members in sorted(_by_label(runs).items(), key=lambda lm: labels.index(lm[0])):
            xs, ys = _series(members, field)
            if len(xs):
                seeds[label][k] = len(members)
                marker = "o" if len(xs) < 30 else None
                (line,) = ax.plot(xs, ys, marker=marker, ms=3, label=label, color=colors[label])
                shown.setdefault(label, line)
                if field == "acc_mean":  # the spread over clients, which a gap between methods must exceed
                    std_xs, std = _series(members, "acc_std")
                    at = dict(zip(std_xs.tolist(), std.tolist(), strict=True))
                    std = np.array([at.get(x, np.nan) for x in xs.tolist()])  # on the line's rounds, none missing
                    ax.fill_between(xs, ys - std, ys + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(f"{topo}, p = {p:g}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # rounds are whole: no tick at round 2.5
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("symlog", linthresh=1e-8)
        ax.grid(alpha=0.3)
    if shown:  # none when every value is missing (NaN, written as null)
        ordered = [label for label in labels if label in shown]
        texts = [f"{label} (n={_seed_counts(seeds[label])})" for label in ordered]
        # Beside the last panel, not in it: with the method grid's 11 lines, "best" still covered the lowest ones
        # at p = 0.02. tight_layout makes room for it within the figure.
        axes[0][-1].legend(
            [shown[label] for label in ordered], texts, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
        )  # fmt: skip
    band = " (band: ± std over clients)" if field == "acc_mean" else ""
    where = "; n: seeds averaged, panel by panel where they differ" if len(panels) > 1 else "; n: seeds averaged"
    _suptitle(fig, f"{results['config']['name']}: {ylabel}, mean over seeds{band}{where}", fontsize=9)
    fig.tight_layout()
    return fig


def _seed_counts(per_panel: Sequence[int | None]) -> str:
    """``2`` when a line averages the same number of seeds in every panel it is in, else ``2|1|–`` panel by panel
    (– where it has no line)."""
    drawn = {n for n in per_panel if n is not None}
    if len(drawn) == 1:
        return str(drawn.pop())
    return "|".join("–" if n is None else str(n) for n in per_panel)


def _t_curves(
    results: dict[str, Any],
) -> dict[tuple[str, str, float], tuple[list[int], list[tuple[int, float, float]]]]:
    """Per (method, topology, p) swept over T: the seeds that finished every T of it, and per T (ascending) the
    mean over those seeds of the final client-mean accuracy and of the final std over clients. Only the common
    seeds: a T that has finished a second seed would otherwise be a mean of other seeds than its neighbours, and
    the curve would move with the seeds rather than with T. Curves of fewer than two T are left out."""
    finals: dict[tuple[str, str, float], dict[int, dict[int, dict[str, float]]]] = {}
    for run in results["cells"]:
        final = run.get("final") or {}
        if run["switch_interval"] is None or final.get("acc_mean") is None:
            continue
        key = (run["method"], run["topology"], run["link_prob"])
        finals.setdefault(key, {}).setdefault(run["switch_interval"], {})[run["seed"]] = final
    curves = {}
    for key, by_t in finals.items():
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in by_t.values())))
        if len(by_t) < 2 or not seeds:
            continue
        points = [
            (
                t,
                float(np.mean([by_t[t][s]["acc_mean"] for s in seeds])),
                float(np.mean([by_t[t][s]["acc_std"] for s in seeds])),
            )
            for t in sorted(by_t)
        ]
        curves[key] = (seeds, points)
    return curves


def _t_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Final accuracy vs T, a line per (method, topology, p) over the seeds that finished each of its T
    (`_t_curves`), error bars ± the std over clients; None (no file) when no curve has two T."""
    curves = _t_curves(results)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, topo, p), (seeds, pts) in sorted(curves.items()):
        ts, acc, std = zip(*pts, strict=True)
        seed_label = ",".join(map(str, seeds))
        ax.errorbar(ts, acc, yerr=std, marker="o", capsize=3, label=f"{method} {topo} p={p:g} (seeds {seed_label})")
    ax.set_xlabel("switching interval T")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("final accuracy (mean ± client std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _suptitle(fig, f"{results['config']['name']}: accuracy vs T, over the seeds that finished every T", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    return path


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the plots that the results support; return their paths."""
    paths = [
        _round_plot(results, "acc_mean", "accuracy", out_dir / "accuracy_vs_round.png"),
        _round_plot(results, "cross_term_norm", "cross-term norm ‖C‖_F", out_dir / "cross_term_vs_round.png", log=True),
    ]
    t_plot = _t_plot(results, out_dir / "accuracy_vs_T.png")
    if t_plot is not None:
        paths.append(t_plot)
    return paths


def _suptitle(fig: Any, text: str, fontsize: float) -> None:
    """``text`` as ``fig``'s title, wrapped to the figure's width: one 5-inch panel is narrower than a long title,
    which was cut at both edges. A character is taken as 0.6 em wide (DejaVu Sans averages about 0.55)."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle(textwrap.fill(text, width=chars), fontsize=fontsize)


def _save(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (a run killed mid-write leaves the previous plot, not a torn file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
