"""The paper's table from a simulator preset: every method x p x seed, a T sweep, plots, and a verdict.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_table.py --preset cpu-sst2 [--out DIR] [--report-only]

Runs (or resumes) two simulator grids into DIR (default benchmarks/paper/PRESET):
* DIR/methods: tad, adf, lora, ffa, rolora, decaf, tad-nojoint x the preset's p x its seeds (T = auto);
* DIR/T-sweep: tad with T in {1, 2, 3, 5, 10, 15} at the preset's lowest and highest p.
Each finished cell is its own file (DIR/*/cells/KEY.json) and an unfinished one is checkpointed, so an
interrupted run resumes where it stopped. A computation runs once: a cell that both grids contain (tad T=1 at
p=0.5), or one whose policy equals another's (adf is tad with T=5; tad-nojoint with T=1 is rolora), is copied
from the finished one and names it under "same_as".
Each grid writes its results.json and plots; DIR/table.md and DIR/table.json hold the table and the check of the
paper's claims (tadlora.sim.paper). --report-only runs nothing and reports the cells finished so far, which is
how to look at a grid that is still running elsewhere.

A cpu-sst2 cell took 13-122 minutes on one core of a shared 2-core machine (docs/benchmarks.md): the full cpu-sst2
table (21 method cells + 11 more sweep cells per seed) is days of CPU; on a GPU, minutes per cell. Each process runs
one cell at a time with one torch thread: to use two cores, run `--only methods` and `--only T-sweep` side by side.
Side by side, a computation both grids hold (tad T=1 at p=0.5, adf = tad T=5) is copied only once the other process
has finished it: the one that starts it first does not stop the other from starting it too. Where that matters,
run the sweep first (`--only T-sweep`) or pick its cells with tadlora-sim (docs/benchmarks.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from _common import out_dir

from tadlora.cliutil import csv_list, interrupts_kept
from tadlora.fsutil import atomic_write_bytes, atomic_write_json
from tadlora.sim.config import PRESET_CAVEATS, PRESETS, preset
from tadlora.sim.paper import checkpoint_progress, markdown, paper_grids
from tadlora.sim.runner import Simulator

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the simulator preset to tabulate")
    parser.add_argument("--out", type=out_dir, help="output directory (default benchmarks/paper/PRESET)")
    parser.add_argument("--seeds", type=csv_list(int), help="comma list of seeds (default: the preset's)")
    parser.add_argument("--rounds", type=int, help="rounds per cell (default: the preset's; for a quick look)")
    parser.add_argument("--only", choices=("methods", "T-sweep"), help="run only this grid (both are reported)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: table the finished cells")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)

    base = preset(args.preset)
    if args.preset in PRESET_CAVEATS and not args.report_only:
        print(f"paper_table: warning: preset {args.preset} is {PRESET_CAVEATS[args.preset]}", file=sys.stderr)
    try:
        if args.seeds:
            base = dataclasses.replace(base, seeds=tuple(args.seeds))
        if args.rounds is not None:  # 0 is refused by the config, not taken for "the preset's"
            base = dataclasses.replace(base, rounds=args.rounds)
    except ValueError as exc:
        print(f"paper_table: error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out or HERE / "paper" / args.preset
    methods, sweep = paper_grids(base)
    grids = {"methods": (methods, out / "methods"), "T-sweep": (sweep, out / "T-sweep")}

    def reported_only(name: str) -> bool:
        return args.report_only or (args.only is not None and args.only != name)

    results = {}
    # The grids that run go first, so that a grid only reported sees (and copies) the cells they have just finished.
    for name in sorted(grids, key=reported_only):
        config, grid_out = grids[name]
        # The other grid, once it has started (its cells are this grid's wherever their computations are equal).
        others = [o for other, (_c, o) in grids.items() if other != name and (o / "config.json").exists()]
        try:
            with interrupts_kept():  # one Ctrl-C stops the run, wherever it lands
                simulator = Simulator(config, grid_out, quiet=args.quiet, share_from=others)
                results[name] = simulator.run(report_only=reported_only(name))
        except (ValueError, OSError, RuntimeError) as exc:  # another run's settings here, a bad setting, a path
            print(f"paper_table: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\npaper_table: interrupted; run the same command again to resume", file=sys.stderr)
            return 130
    results = {name: results[name] for name in grids}  # table.json in the grids' order, whichever ran first

    # Unfinished cells with a checkpoint (a grid still running, here or in another process): where each stands.
    in_progress = {}
    for _config, grid_out in grids.values():
        for path in sorted((grid_out / "cells").glob("*.partial.json")):
            key = path.name.removesuffix(".partial.json")
            if (path.parent / f"{key}.json").exists():  # finished (or copied) after its checkpoint: a leftover
                continue
            try:
                in_progress[key] = checkpoint_progress(json.loads(path.read_text(encoding="utf-8")))
            except FileNotFoundError:  # its cell finished in another process since the listing
                continue
    title = f"{args.preset}: the paper's table"
    text, verdict = markdown(results["methods"], results["T-sweep"], title, in_progress, paper=(methods, sweep))
    atomic_write_bytes(out / "table.md", text.encode())
    atomic_write_json(
        out / "table.json",
        {
            "preset": args.preset,
            "config": base.to_dict(),
            "claims": [dataclasses.asdict(c) for c in verdict],
            "summary": {name: r["summary"] for name, r in results.items()},
            "missing_cells": {name: r["missing_cells"] for name, r in results.items()},
            "in_progress": in_progress,
        },
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
