"""A per-round link pattern and a per-round diagnostic of your own, through the simulator's Python API.

`tadlora-sim` builds its graphs from specs only (complete/er, ring, overlay:K, edges:..., file:PATH, each link up
with probability p). Any other pattern, here a rotating matching (in round t client i is linked to client
i XOR (1 + t mod (m - 1)), a perfect matching for m a power of two), is a `Topology` whose `live_edges(t)` says the
round's links: `tadlora.sim.runner.simulate` takes it as it is (the degrees and the mixing weights, `live_links`
and `bytes` follow from it). `on_round` sees each round's record after mixing and may add to it: here the largest
distance of a client's B from the clients' mean. What this leaves out: the grid, results.json, checkpoints,
resuming and the plots are the `Simulator`'s (docs/simulator.md#extending), and no daemon runs such a pattern.

    python examples/own_topology.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
from tadlora.core.factors import Factor, factor_of
from tadlora.core.methods import make_method
from tadlora.core.topology import Edge, Topology, complete_edges
from tadlora.data import resolve_dataset
from tadlora.sim.engine import SequentialEngine
from tadlora.sim.runner import simulate
from tadlora.training import TrainSpec, encode
from tadlora.workload import client_shards, eval_subset


@dataclass(frozen=True)
class RotatingMatching(Topology):
    """Round t links client i to client i XOR (1 + t mod (m − 1)); m must be a power of two."""

    def live_edges(self, t: int) -> list[Edge]:
        shift = 1 + t % (self.m - 1)
        return sorted((i, i ^ shift) for i in range(self.m) if i < i ^ shift)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="a power of two")
    args = parser.parse_args()
    if args.clients < 2 or args.clients & (args.clients - 1):  # else a client is linked to one that does not exist
        parser.error(f"--clients must be a power of two (2, 4, 8, ...), got {args.clients}")
    m, seed, train = args.clients, 0, TrainSpec(local_steps=2, batch_size=4, max_length=32, lr=1e-2)
    data, dev = resolve_dataset("builtin:sst2-small", "train"), resolve_dataset("builtin:sst2-small", "dev")
    model = AdapterModel(
        ModelSpec(model="tiny", label_names=data.label_names, lora=LoraSpec(r=4, alpha=8.0), seed=seed)
    )
    shards = [
        encode(model.tokenizer, data.subset(i), train.max_length) for i in client_shards(data, "iid", m, seed, 32)
    ]
    engine = SequentialEngine(
        model, shards, encode(model.tokenizer, eval_subset(dev, 32), train.max_length), train, seed
    )
    topology = RotatingMatching(kind="rotating-matching", m=m, edges=complete_edges(m))

    def spread_of_b(t: int, record: dict) -> None:
        factors = [engine.get_factors(i) for i in range(m)]
        keys = [k for k in factors[0] if factor_of(k) is Factor.B]
        flat = torch.stack([torch.cat([f[k].flatten() for k in keys]) for f in factors]).double()
        record["max_client_distance_b"] = float((flat - flat.mean(dim=0)).norm(dim=1).max())

    records = simulate(
        engine, make_method("tad", 1), topology, args.rounds, eval_every=args.rounds, on_round=spread_of_b
    )
    for r in records:
        print(json.dumps({k: r[k] for k in ("round", "phase", "live_links", "max_client_distance_b")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
