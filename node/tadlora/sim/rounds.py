"""The simulator's rounds, pure of files: `mix_round`, every client's end-of-round mixing with its live
neighbours, and `simulate`, which runs rounds on an engine (local steps, mixing, diagnostics, evaluation) and
returns one record per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tadlora.core.diagnostics import diagnose
from tadlora.core.factors import Factors, num_bytes, select
from tadlora.core.methods import Method
from tadlora.core.mixing import apply_method_mixing, local_weights, sent_factors
from tadlora.core.robust import RobustMixing
from tadlora.core.topology import Topology
from tadlora.sim.engine import ClientEngine

RoundRecord = dict[str, Any]


def mix_round(
    method: Method, t: int, topology: Topology, snapshots: Sequence[Factors], robust: RobustMixing | None = None
) -> tuple[list[Factors], int]:
    """Every client's end-of-round mixing from the round-``t`` snapshots; also the bytes that would cross
    the network (each live link carries the sent factors once in each direction)."""
    adj = topology.adjacency(t)
    deg = adj.sum(axis=1)
    mixed = []
    for i in range(topology.m):
        nbrs = [int(j) for j in np.flatnonzero(adj[i])]
        weights = local_weights(int(deg[i]), {j: int(deg[j]) for j in nbrs})
        mixed.append(apply_method_mixing(method, t, snapshots[i], {j: snapshots[j] for j in nbrs}, weights, robust))
    per_message = num_bytes(select(snapshots[0], sent_factors(method, t)))
    return mixed, int(adj.sum()) * per_message  # adj.sum() counts each link twice: one message each way


def simulate(
    engine: ClientEngine,
    method: Method,
    topology: Topology,
    rounds: int,
    eval_every: int,
    start_round: int = 0,
    on_round: Callable[[int, RoundRecord], None] | None = None,
    robust: RobustMixing | None = None,
) -> list[RoundRecord]:
    """Run rounds ``start_round .. rounds-1`` on ``engine``; return one record per round (``robust``: see
    `tadlora.core.robust`)."""
    records = []
    for t in range(start_round, rounds):
        trained = method.trained(t)
        losses = engine.train_round(t, trained)
        snapshots = [engine.get_factors(i) for i in range(engine.num_clients)]
        mixed, sent = mix_round(method, t, topology, snapshots, robust)
        for i, factors in enumerate(mixed):
            engine.set_factors(i, factors)
        diag = diagnose(mixed)
        record: RoundRecord = {
            "round": t,
            "phase": method.phase(t),
            "train_loss": float(np.mean(losses)),
            "live_links": len(topology.live_edges(t)),
            "bytes": sent,
            "consensus_a": diag.consensus_a,
            "consensus_b": diag.consensus_b,
            "consensus_ba": diag.consensus_ba,
            "cross_term_norm": diag.cross_term_norm,
        }
        if (t + 1) % eval_every == 0 or t == rounds - 1:
            results = engine.evaluate()
            accs = np.array([a for a, _ in results])
            record.update(
                acc_mean=float(accs.mean()),
                acc_std=float(accs.std()),
                acc_min=float(accs.min()),
                acc_max=float(accs.max()),
                eval_loss=float(np.mean([lo for _, lo in results])),
            )
        records.append(record)
        if on_round is not None:
            on_round(t, record)
    return records
