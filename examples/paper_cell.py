"""Reproduce one cell of the paper's table with the simulator: TAD-LoRA vs decentralized LoRA and RoLoRA at
p = 0.02 on SST-2 (10 label-skewed clients, MiniLM, r = 8, alpha = 16 on query/value).

    python examples/paper_cell.py --out runs/paper-cell              # the cpu-sst2 budget; hours on 2 cores
    python examples/paper_cell.py --preset smoke --out runs/try      # the same code path in seconds

Interrupt it at any time and run the same command again: finished cells are kept, an unfinished one resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tadlora.sim.cli import run_grid
from tadlora.sim.config import PRESETS, override, preset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        default="cpu-sst2",
        choices=sorted(PRESETS),
        help="cpu-sst2 (default), cpu-mnli, paper-mnli or smoke",
    )
    parser.add_argument(
        "--link-prob", type=float, default=0.02, help="the table's column: 0.5, 0.1 or 0.02 (default: 0.02)"
    )
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory: results.json, cells/, plots; the same --out again resumes",
    )
    args = parser.parse_args()
    config = override(
        preset(args.preset),
        {
            "methods": ["tad", "lora", "rolora"],
            "link_probs": [args.link_prob],
            "seeds": [int(s) for s in args.seeds.split(",")],
        },
    )
    # As tadlora-sim runs it: a refusal or failure is one line, exit 2; a Ctrl-C exits 130 and the same command
    # resumes.
    code, results = run_grid(config, args.out, prog="paper_cell.py")
    if results is None:
        return code
    print(f"{'method':<8} {'T':>3}  accuracy (mean ± std over clients, seed-averaged)")
    for row in results["summary"]:
        t = row["switch_interval"] if row["switch_interval"] is not None else "-"
        print(f"{row['method']:<8} {t!s:>3}  {row['acc_mean']:.4f} ± {row['acc_client_std']:.4f}")
    print(f"plots and results.json in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
