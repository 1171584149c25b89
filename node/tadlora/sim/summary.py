"""What results.json sums up: a cell's final accuracy (`_final`) and the summary rows over seeds (`summarize`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tadlora.sim.rounds import RoundRecord


def _final(records: Sequence[RoundRecord]) -> dict[str, float]:
    evals = [r for r in records if "acc_mean" in r]
    if not evals:
        return {}
    last = evals[-1]
    return {"acc_mean": last["acc_mean"], "acc_std": last["acc_std"], "round": last["round"]}


def _row_order(key: tuple[Any, ...]) -> tuple[str, str, float, int]:
    """A summary row's place: by method and topology, then by p and T as numbers (as text, a T sweep's rows came
    as T = 1, 10, 15, 2, 3, 5); a method without T (None) has one row per p."""
    method, topology, link_prob, switch_interval = key
    return str(method), str(topology), float(link_prob), -1 if switch_interval is None else int(switch_interval)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Final accuracy per (method, topology, p, T): mean over seeds of the client mean, the spread over clients
    (mean of per-seed std) and the spread over seeds; and the mean accuracy over every evaluation of the run (the
    area under the learning curve, which tells a fast learner from a slow one that ends at the same place)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["method"], run["topology"], run["link_prob"], run["switch_interval"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (method, topo, p, t), members in sorted(groups.items(), key=lambda kv: _row_order(kv[0])):
        means = [m["final"]["acc_mean"] for m in members if m["final"]]
        stds = [m["final"]["acc_std"] for m in members if m["final"]]
        curves = [np.mean([r["acc_mean"] for r in m["rounds"] if "acc_mean" in r]) for m in members if m["final"]]
        rows.append(
            {
                "method": method,
                "topology": topo,
                "link_prob": p,
                "switch_interval": t,
                "seeds": len(means),
                "acc_mean": float(np.mean(means)) if means else None,
                "acc_client_std": float(np.mean(stds)) if stds else None,
                "acc_seed_std": float(np.std(means)) if means else None,
                "acc_curve_mean": float(np.mean(curves)) if curves else None,
            }
        )
    return rows
