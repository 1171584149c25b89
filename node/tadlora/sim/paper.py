"""The paper's table: the grids that reproduce it from a preset, and the table and verdict from their results.

Two grids come from one preset (``paper_grids``):

* the **method grid**: every method × the preset's link probabilities p × its seeds, T = auto for the methods
  that take it (TAD-LoRA's topology-aware interval);
* the **T sweep**: ``tad`` with T ∈ {1, 2, 3, 5, 10, 15} at the preset's lowest and highest p.

``paper_table`` turns the finished cells of both into a table (mean ± spread of the clients' final dev accuracy;
then tad's gap to each other method and the T sweep, seed by seed, which a seed's shared split, initial factors and
link states make like for like) and checks the paper's three claims about TAD-LoRA against it:

1. *competitive at high connectivity*: at the highest p no other method is ahead of ``tad`` by more than the spread;
2. *ahead at low connectivity*: at the lowest p, ``tad`` is ahead of every other method by more than the spread;
3. *best T grows as connectivity falls*: every T within the spread of the sweep's best at the lowest p is larger
   than every T within the spread of the best at the highest p (so that noise could not have ordered them).

"The spread" is the larger of the two methods' standard deviations over seeds when both have two seeds or more,
and otherwise the larger of their mean standard deviations over clients (a harsher bar: label skew makes clients
differ far more than seeds do). A claim whose cells are not all finished is reported as incomplete, with what the
finished cells say so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tadlora.sim.config import ALL_METHODS, Cell, SimConfig, config_from_json
from tadlora.sim.summary import summarize

SWEEP_INTERVALS: tuple[int, ...] = (1, 2, 3, 5, 10, 15)
SWEEP_METHOD = "tad"


def paper_grids(base: SimConfig) -> tuple[SimConfig, SimConfig]:
    """The method grid and the T sweep for ``base`` (its data, model, budget, p and seeds are kept)."""
    grid = dataclasses.replace(
        base,
        name=f"{base.name}-methods",
        methods=ALL_METHODS,
        switch_intervals=("auto",),
        sweep_methods=("tad", "tad-nojoint"),
    )
    ps = sorted(set(base.link_probs))
    sweep = dataclasses.replace(
        base,
        name=f"{base.name}-T-sweep",
        methods=(SWEEP_METHOD,),
        link_probs=tuple(sorted({ps[0], ps[-1]}, reverse=True)),
        switch_intervals=SWEEP_INTERVALS,
        sweep_methods=(SWEEP_METHOD,),
    )
    return grid, sweep


@dataclasses.dataclass(frozen=True)
class Entry:
    """One (method, p, T) of a table: the client-mean accuracy averaged over its finished seeds."""

    mean: float
    client_std: float  # mean over seeds of the std over clients
    seed_std: float  # std over seeds of the client mean (0 with one seed)
    seeds: int
    curve: float | None = None  # mean accuracy over the run's evaluations (area under the learning curve)

    def spread(self, other: Entry) -> tuple[float, str]:
        """The bar a gap between ``self`` and ``other`` must clear (see the module docstring)."""
        if self.seeds >= 2 and other.seeds >= 2:
            return max(self.seed_std, other.seed_std), "seeds"
        return max(self.client_std, other.client_std), "clients"

    def text(self) -> str:
        out = f"{self.mean:.3f} ± {self.client_std:.3f}"
        return out + (f" (seeds ± {self.seed_std:.3f}, n={self.seeds})" if self.seeds >= 2 else " (n=1)")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims checked against the table."""

    name: str
    status: str  # "reproduced", "not reproduced" or "incomplete"
    detail: str


def entries(summary: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float, int | None], Entry]:
    """(method, p, T) → Entry, from the ``summary`` rows of a simulator results.json (one topology assumed)."""
    out = {}
    for row in summary:
        if row.get("acc_mean") is None:
            continue
        out[(row["method"], float(row["link_prob"]), row["switch_interval"])] = Entry(
            mean=row["acc_mean"],
            client_std=row["acc_client_std"],
            seed_std=row["acc_seed_std"],
            seeds=row["seeds"],
            curve=row.get("acc_curve_mean"),
        )
    return out


def _by_method(table: Mapping[tuple[str, float, int | None], Entry], p: float) -> dict[str, Entry]:
    """The method grid's entry of every method at p (its T is whatever auto/default chose)."""
    return {m: e for (m, q, _t), e in table.items() if math.isclose(q, p)}


def _judged_entries(results: Mapping[str, Any], config: SimConfig) -> dict[tuple[str, float, int | None], Entry]:
    """The entries of ``results`` (a results.json) summarized over the finished cells of ``config``'s grid only.

    A directory's summary is over every seed finished there, and other runs may have finished seeds ``config`` lacks:
    they would stand in for its unfinished ones (a claim judged as finished before its cells are) and move its means.
    Results without per-cell records are taken by their summary."""
    if "cells" not in results:
        return entries(results["summary"])
    wanted = set(config.cells())
    return entries(summarize([run for run in results["cells"] if Cell.from_dict(run) in wanted]))


def _paper_entries(
    grid: Mapping[tuple[str, float, int | None], Entry], config: SimConfig
) -> dict[tuple[str, float, int | None], Entry]:
    """The method grid's entries that the claims judge: those of the paper's grid (T = auto, `paper_grids`) at
    ``config``'s p only.

    Where the directory's grid grew to another T of a method (a run of another T axis there), that T's entry is
    left out even when it is the method's only one at a p: a method whose T = auto cell has no finished seed yet is
    unfinished there, not judged by another T."""
    wanted = _paper_keys(config)
    return {k: e for k, e in grid.items() if k in wanted}


def _paper_keys(config: SimConfig) -> set[tuple[str, float, int | None]]:
    """(method, p, T) of the paper's method grid at ``config``'s p: each method at its T = auto."""
    paper = dataclasses.replace(config, switch_intervals=("auto",))
    return {(c.method, c.link_prob, c.switch_interval) for c in paper.cells()}


def per_seed(results: Mapping[str, Any]) -> dict[tuple[str, float, int | None], dict[int, float]]:
    """(method, p, T) → {seed: the clients' mean final accuracy}, from the finished cells of a results.json."""
    out: dict[tuple[str, float, int | None], dict[int, float]] = {}
    for run in results.get("cells", []):
        final = run.get("final") or {}
        if final.get("acc_mean") is not None:
            key = (run["method"], float(run["link_prob"]), run["switch_interval"])
            out.setdefault(key, {})[int(run["seed"])] = float(final["acc_mean"])
    return out


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def paired_gaps(by_seed: Mapping[int, float], tad: Mapping[int, float]) -> str:
    """``s0 +0.012, s1 −0.003 → +0.005``: tad minus the other method on each seed both finished, then their mean;
    — without a common seed."""
    common = sorted(set(by_seed) & set(tad))
    if not common:
        return "—"
    gaps = [tad[s] - by_seed[s] for s in common]
    return ", ".join(f"s{s} {_signed(g)}" for s, g in zip(common, gaps, strict=True)) + (
        f" → {_signed(sum(gaps) / len(gaps))}" if len(gaps) > 1 else ""
    )


def _seed_tables(grid_results: Mapping[str, Any], sweep_results: Mapping[str, Any], paper_grid: SimConfig) -> list[str]:
    """The Markdown lines of tad's gaps to each other method seed by seed (the paper's T of each method), and of the
    T sweep's accuracy seed by seed."""
    wanted = _paper_keys(paper_grid)
    grid = {(m, q): seeds for (m, q, t), seeds in per_seed(grid_results).items() if (m, q, t) in wanted}
    link_probs = sorted({q for _m, q in grid}, reverse=True)
    lines = [
        "",
        f"{SWEEP_METHOD} minus each other method, seed by seed, then their mean (a seed draws the same split, initial "
        "factors and link states for every method: a pair differs by the method, and the seeds' spread cancels):",
        "",
        "| method | " + " | ".join(f"p = {p:g}" for p in link_probs) + " |",
        "|---|" + "---|" * len(link_probs),
    ]
    for method in paper_grid.methods:
        if method != SWEEP_METHOD:
            cells = [paired_gaps(grid.get((method, p), {}), grid.get((SWEEP_METHOD, p), {})) for p in link_probs]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    sweep = per_seed(sweep_results)
    sweep_ps = sorted({q for (m, q, _t) in sweep if m == SWEEP_METHOD}, reverse=True)
    lines += ["", f"T sweep ({SWEEP_METHOD}), seed by seed:", "", "| T | " + " | ".join(f"p = {p:g}" for p in sweep_ps)
              + " |", "|---|" + "---|" * len(sweep_ps)]  # fmt: skip
    for t in SWEEP_INTERVALS:
        cells = [
            ", ".join(f"s{s} {a:.3f}" for s, a in sorted(sweep.get((SWEEP_METHOD, p, t), {}).items())) or "—"
            for p in sweep_ps
        ]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _seed_counts(best: Entry, row: Iterable[Entry]) -> str:
    """``, 3 seeds; the T have 1 to 3``: where the T of a sweep row have different numbers of seeds, whose means are
    not like for like; empty where they have the same."""
    counts = sorted({e.seeds for e in row})
    return "" if len(counts) == 1 else f", {best.seeds} seeds; the T have {counts[0]} to {counts[-1]}"


_RANK = {"behind": 0, "within the spread": 1, "ahead": 2}


def _compare(at_p: Mapping[str, Entry], expected: int) -> tuple[str, str] | None:
    """How tad stands against every other method at one p: (relation, detail), or None without tad.

    The relation is tad's worst against any of them, each gap judged by that pair's own spread: the best other
    method need not decide it (a slightly lower one with a narrow spread can be ahead of tad by more than its
    spread while the best is not). The detail names the best other method, and the deciding one if it differs."""
    if SWEEP_METHOD not in at_p or len(at_p) < 2:
        return None
    tad = at_p[SWEEP_METHOD]
    judged = {}  # method → (relation, detail)
    for name, rival in at_p.items():
        if name != SWEEP_METHOD:
            gap = tad.mean - rival.mean
            spread, kind = tad.spread(rival)
            relation = "ahead" if gap > spread else "behind" if gap < -spread else "within the spread"
            # Means over different seeds are not like for like (a seed can be easier for every method): said.
            seeds = "" if rival.seeds == tad.seeds else f" (seeds: tad {tad.seeds}, {name} {rival.seeds})"
            judged[name] = (
                relation,
                f"{rival.mean:.3f}: gap {gap:+.3f}{seeds}, spread over {kind} {spread:.3f} → {relation}",
            )
    best = max(judged, key=lambda m: at_p[m].mean)
    decider = min(judged, key=lambda m: (_RANK[judged[m][0]], tad.mean - at_p[m].mean))
    relation = judged[decider][0]
    missing = "" if len(at_p) >= expected else f"; only {len(at_p)} of {expected} methods finished"
    detail = f"tad {tad.mean:.3f} vs best other {best} {judged[best][1]}"
    if judged[decider][0] != judged[best][0]:
        detail += f"; vs {decider} {judged[decider][1]}"
    return relation, detail + missing


def claims(
    grid: Mapping[tuple[str, float, int | None], Entry],
    sweep: Mapping[tuple[str, float, int | None], Entry],
    link_probs: Sequence[float],
    methods: int = len(ALL_METHODS),
    seeds: int = 1,
    sweep_seeds: int | None = None,
) -> list[Claim]:
    """The three claims (module docstring), judged from the method grid and the T sweep (its T in
    `SWEEP_INTERVALS`; any other T there is left out); ``seeds`` and ``sweep_seeds`` (default ``seeds``) are how
    many seeds each grid holds: an entry with fewer is unfinished."""
    sweep_seeds = seeds if sweep_seeds is None else sweep_seeds
    high, low = max(link_probs), min(link_probs)
    out = []
    for name, p, wanted, needs_two_ps in (
        (f"competitive at p = {high:g}", high, ("ahead", "within the spread"), False),
        (f"ahead at p = {low:g}", low, ("ahead",), True),
    ):
        if needs_two_ps and high == low:
            out.append(Claim(name, "incomplete", "the grid has one p: no low-connectivity setting to compare"))
            continue
        at_p = _by_method(grid, p)
        compared = _compare(at_p, methods)
        if compared is None:
            out.append(Claim(name, "incomplete", "tad or every other method has no finished cell at this p"))
            continue
        relation, detail = compared
        unfinished = sum(max(seeds - e.seeds, 0) for e in at_p.values())  # the seeds of the methods that have one
        if unfinished and len(at_p) >= methods:
            detail += f"; {unfinished} of {methods * seeds} cells not finished"
        status = (
            "incomplete"
            if len(at_p) < methods or unfinished
            else "reproduced"
            if relation in wanted
            else "not reproduced"
        )
        out.append(Claim(name, status, detail))

    contenders: dict[float, list[int]] = {}  # at each p: the T within the spread of the best one
    notes = []
    complete = True
    for p in sorted({high, low}, reverse=True):
        # The paper's T only, as the table shows them: a T that a run of another T axis added to the sweep's
        # directory would otherwise be counted as one of the six ("7 of 6 T finished"), could be the best T, and
        # with seeds unfinished would hold the claim back.
        row = {
            t: e for (m, q, t), e in sweep.items() if m == SWEEP_METHOD and math.isclose(q, p) and t in SWEEP_INTERVALS
        }
        unfinished = sum(max(sweep_seeds - e.seeds, 0) for e in row.values())
        complete = complete and all(t in row for t in SWEEP_INTERVALS) and not unfinished
        if row:
            t_best, e_best = max(row.items(), key=lambda te: te[1].mean)
            close = sorted(t for t, e in row.items() if e_best.mean - e.mean <= e_best.spread(e)[0])
            contenders[p] = close
            notes.append(
                f"p = {p:g}: best T = {t_best} ({e_best.mean:.3f}"
                + _seed_counts(e_best, row.values())
                + f"); T within the spread of it: {close}"
                + ("" if len(row) == len(SWEEP_INTERVALS) else f" ({len(row)} of {len(SWEEP_INTERVALS)} T finished)")
                + (f" ({unfinished} of {len(row) * sweep_seeds} cells not finished)" if unfinished else "")
            )
    name = "best T grows as connectivity falls"
    if high == low:
        out.append(Claim(name, "incomplete", "the grid has one p: nothing to compare"))
    elif not complete:
        out.append(Claim(name, "incomplete", "; ".join(notes) or "no finished T-sweep cell"))
    else:
        grows = min(contenders[low]) > max(contenders[high])
        verdict = "" if grows else " → the best T at the two p are not told apart by more than the spread"
        if not grows and max(contenders[low]) < min(contenders[high]):
            verdict = " → it shrinks"
        out.append(Claim(name, "reproduced" if grows else "not reproduced", "; ".join(notes) + verdict))
    return out


def distinct_computations(keys: Sequence[str]) -> int:
    """How many runs the cells named by ``keys`` (`Cell.key`, from grids of one config) still need: cells of one
    computation (`Cell.computation`: ``adf`` is ``tad`` with T = 5, a cell in both grids) run once."""
    seen = set()
    for key in keys:
        # A key is method__topology__pP__TT__sS; its topology part is the sanitized name, which is enough to tell
        # the grids' topologies apart (the key is unique per cell for that reason). That name may hold "__" itself
        # (file:/PATH is file__PATH), so only the first separator and the last three delimit fields: no method
        # name holds "__".
        method, rest = key.split("__", 1)
        topology, p, t, seed = rest.rsplit("__", 3)
        interval = None if t == "T-" else int(t[1:])
        cell = Cell(method, topology, float(p[1:]), interval, int(seed[1:]))
        seen.add(cell.computation)
    return len(seen)


def left_to_run(cells: int, runs: int) -> str:
    """The table's line on what is left: ``cells`` not finished, which ``runs`` distinct computations produce (a cell
    whose policy equals another's under another name is a copy of it)."""
    if cells == 1:
        return "1 cell not finished yet."
    if runs == cells:
        return f"{cells} cells not finished yet, each a run of its own."
    return f"{cells} cells not finished yet: {runs} distinct run{'' if runs == 1 else 's'} (the others are copies)."


def checkpoint_progress(partial: Mapping[str, Any]) -> dict[str, Any]:
    """Where an unfinished cell stands, from its checkpoint's ``KEY.partial.json``: the rounds it holds, and its
    last evaluation (round counted from 1, accuracy mean and std over clients) when it has had one."""
    records = partial.get("records", [])
    done = max((int(r["round"]) + 1 for r in records), default=0)
    evals = [r for r in records if r.get("acc_mean") is not None]
    last = None
    if evals:
        r = evals[-1]
        last = {"round": int(r["round"]) + 1, "acc_mean": r["acc_mean"], "acc_std": r.get("acc_std", 0.0)}
    return {"rounds_done": done, "last_eval": last, "seconds": partial.get("seconds")}


def _pace(where: Mapping[str, Any], rounds_total: int) -> str:
    """A checkpointed cell's pace so far and the time its other rounds would take at it (`checkpoint_progress`),
    as a clause of its line; "" where its checkpoint does not say its seconds. The seconds are summed over every
    process that ran its rounds, each on its own machine and load: an estimate, not a promise."""
    seconds, done = where.get("seconds"), where["rounds_done"]
    if not seconds or done <= 0:
        return ""
    per_round = seconds / done
    left = max(rounds_total - done, 0) * per_round
    to_go = f"{left / 60:.0f} min" if left < 3600 else f"{left / 3600:.1f} h"
    return f"; {per_round:.0f} s a round so far, about {to_go} to go at that pace"


def markdown(
    grid_results: Mapping[str, Any],
    sweep_results: Mapping[str, Any],
    title: str,
    in_progress: Mapping[str, Mapping[str, Any]] | None = None,
    paper: tuple[SimConfig, SimConfig] | None = None,
) -> tuple[str, list[Claim]]:
    """The Markdown table (methods × p, then T × p) and the claims, from the two grids' results.json;
    ``in_progress`` (cell key → `checkpoint_progress`) lists the unfinished cells that have a checkpoint.

    ``paper``: the method grid and the T sweep the claims are about (`paper_grids` of the preset): the tables show
    every cell of the directories, which other runs may have grown (another p, seed or T), but the claims judge
    only these grids' p, T and seeds. None: the grids the results' configs describe."""
    grid, sweep = entries(grid_results["summary"]), entries(sweep_results["summary"])
    link_probs = sorted(grid_results["config"]["link_probs"], reverse=True)
    rounds = grid_results["config"]["rounds"]
    lines = [
        f"# {title}",
        "",
        f"Final dev accuracy (round {rounds}): mean over clients ± std over clients, averaged over the finished "
        "seeds (with two or more: ± std over seeds, n = seeds). — = not finished.",
        "",
    ]
    methods = grid_results["config"]["methods"]
    header = ["| method | " + " | ".join(f"p = {p:g}" for p in link_probs) + " |", "|---|" + "---|" * len(link_probs)]
    lines += header
    curves = [
        "",
        "Mean accuracy over the run's evaluations (the area under the learning curve: how fast a method gets there):",
        "",
        *header,
    ]
    for method in methods:
        cells, curve_cells = [], []
        for p in link_probs:
            found = [(t, e) for (m, q, t), e in grid.items() if m == method and math.isclose(q, p)]
            cells.append(" ".join((f"T={t}: " if t is not None else "") + e.text() for t, e in found) or "—")
            # Several T of a method at a p (a grid grown by a run of another T axis): each number says its T, as
            # in the table above, else they would be a row of numbers of unknown T.
            curve_cells.append(
                " ".join(
                    (f"T={t}: " if len(found) > 1 else "") + f"{e.curve:.3f}" for t, e in found if e.curve is not None
                )
                or "—"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        curves.append(f"| {method} | " + " | ".join(curve_cells) + " |")
    lines += curves
    sweep_ps = sorted(sweep_results["config"]["link_probs"], reverse=True)
    lines += ["", f"T sweep ({SWEEP_METHOD}):", "", "| T | " + " | ".join(f"p = {p:g}" for p in sweep_ps) + " |"]
    lines.append("|---|" + "---|" * len(sweep_ps))
    for t in SWEEP_INTERVALS:
        row = [sweep.get((SWEEP_METHOD, float(p), t)) for p in sweep_ps]
        lines.append(f"| {t} | " + " | ".join(e.text() if e else "—" for e in row) + " |")
    if paper is None:
        paper = (
            config_from_json(json.dumps(grid_results["config"])),
            config_from_json(json.dumps(sweep_results["config"])),
        )
    judged_grid, judged_sweep = paper
    lines += _seed_tables(grid_results, sweep_results, judged_grid)
    verdict = claims(
        _paper_entries(_judged_entries(grid_results, judged_grid), judged_grid),
        _judged_entries(sweep_results, judged_sweep),
        judged_grid.link_probs,
        len(judged_grid.methods),
        len(set(judged_grid.seeds)),
        len(set(judged_sweep.seeds)),
    )
    lines += ["", "Claims:", ""]
    lines += [f"* **{c.name}**: {c.status}. {c.detail}" for c in verdict]
    missing = list(grid_results.get("missing_cells", [])) + list(sweep_results.get("missing_cells", []))
    if missing:
        lines += ["", left_to_run(len(missing), distinct_computations(missing))]
    if in_progress:
        rounds_total = grid_results["config"]["rounds"]
        lines += ["", "Checkpointed, not finished (the command that started them resumes them):", ""]
        for key, where in sorted(in_progress.items()):
            last = where["last_eval"]
            seen = "" if last is None else f"; at round {last['round']}: {last['acc_mean']:.3f} ± {last['acc_std']:.3f}"
            pace = _pace(where, rounds_total)
            lines.append(f"* `{key}`: {where['rounds_done']} of {rounds_total} rounds{seen}{pace}")
    return "\n".join(lines) + "\n", verdict
