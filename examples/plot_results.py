"""A plot of your own from a simulator run's results.json: the consensus distance of BA after mixing, per round,
one line per (method, T) averaged over its finished seeds, read by the keys docs/simulator.md documents
("What results.json holds"). Round numbers are shown from 1, as the simulator's own plots show them.

    python examples/plot_results.py runs/smoke            # writes runs/smoke/consensus_ba_vs_round.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a tadlora-sim --out directory (it holds results.json)")
    args = parser.parse_args()
    results = json.loads((args.out / "results.json").read_text())
    lines: dict[tuple[str, str, float, int | None], list[list[float]]] = defaultdict(list)
    for cell in results["cells"]:  # one record per finished cell; "rounds" in order, "round" counted from 0
        key = (cell["method"], cell["topology"], cell["link_prob"], cell["switch_interval"])
        lines[key].append([r["consensus_ba"] for r in cell["rounds"]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, topology, p, t), seeds in sorted(lines.items(), key=str):
        mean = [sum(values) / len(values) for values in zip(*seeds, strict=True)]
        label = f"{method}{'' if t is None else f' T={t}'} ({topology}, p={p}, n={len(seeds)})"
        ax.plot(range(1, len(mean) + 1), mean, marker="o", ms=3, label=label)
    ax.set(xlabel="round", ylabel="consensus distance of BA after mixing", yscale="symlog")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = args.out / "consensus_ba_vs_round.png"
    fig.savefig(path, dpi=120)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
