"""Which examples a client trains and evaluates on: one definition for the simulator and the node daemon."""

from __future__ import annotations

import numpy as np

from tadlora.data import TextDataset, make_shards
from tadlora.data.splits import parse_label_skew

DEV_SUBSET_SEED = 12345  # the evaluation subset is fixed: the same for every client, cell, seed and node


def client_shards(
    train: TextDataset, split: str, num_clients: int, seed: int, samples_per_client: int | None = None
) -> list[np.ndarray]:
    """Each client's training-set indices: the split scheme, capped at ``samples_per_client``."""
    n = samples_per_client
    skew = parse_label_skew(split)
    if n is not None and skew is not None:
        # n from the skew itself, so that every client keeps the skew's proportions (a random cap would not)
        per_client = n if skew[1] is None else min(n, skew[1])
        return make_shards(train, f"label-skew@{skew[0]!r}:{per_client}", num_clients, seed)
    shards = make_shards(train, split, num_clients, seed)
    if n is None:
        return shards
    rng = np.random.default_rng([seed, 7])
    return [s if len(s) <= n else np.sort(rng.choice(s, n, replace=False)) for s in shards]


def eval_subset(dev: TextDataset, eval_samples: int | None) -> TextDataset:
    """A fixed random subset of ``eval_samples`` dev examples (all of them when None or larger)."""
    if eval_samples is None or eval_samples >= len(dev):
        return dev
    rng = np.random.default_rng(DEV_SUBSET_SEED)
    return dev.subset(np.sort(rng.choice(len(dev), eval_samples, replace=False)))
