"""Which examples a client trains and evaluates on: one definition for the simulator and the node daemon."""

from __future__ import annotations

import numpy as np

from tadlora.data import TextDataset, make_shards
from tadlora.data.splits import parse_label_skew

DEV_SUBSET_SEED = 12345  # the evaluation subset is fixed: the same for every client, cell, seed and node


def client_shards(
    train: TextDataset, split: str, num_clients: int, seed: int, samples_per_client: int | None = None
) -> list[np.ndarray]:
    """Each client's training-set indices: the split scheme, capped at ``samples_per_client`` (a cap no shard
    exceeds changes nothing)."""
    n = samples_per_client
    shards = make_shards(train, split, num_clients, seed)
    if n is None or all(len(s) <= n for s in shards):
        # For a label skew too: asked for more per client than its class counts allow, it would refuse the cap.
        return shards
    skew = parse_label_skew(split)
    if skew is not None:
        # n from the skew itself, so that every client keeps the skew's proportions (a random cap would not)
        return make_shards(train, f"label-skew@{skew[0]!r}:{n}", num_clients, seed)
    rng = np.random.default_rng([seed, 7])
    return [s if len(s) <= n else np.sort(rng.choice(s, n, replace=False)) for s in shards]


def eval_subset(dev: TextDataset, eval_samples: int | None) -> TextDataset:
    """A fixed random subset of ``eval_samples`` dev examples (all of them when None or larger)."""
    if eval_samples is None or eval_samples >= len(dev):
        return dev
    rng = np.random.default_rng(DEV_SUBSET_SEED)
    return dev.subset(np.sort(rng.choice(len(dev), eval_samples, replace=False)))
