"""Shared fixtures: tiny models built from a config and a small slice of the shipped dataset."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
from tadlora.data import TextDataset, resolve_dataset
from tadlora.training import Encoded, TrainSpec, encode

# Tests run torch in one thread, and so do the node processes they start: several nodes (and pytest) share two
# cores, and OpenMP threads spinning against each other made a 10 s run take over a minute.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

TINY_LORA = LoraSpec(r=4, alpha=8.0)
TINY_TRAIN = TrainSpec(local_steps=2, batch_size=4, max_length=32, lr=1e-2)


def tiny_spec(seed: int = 0) -> ModelSpec:
    return ModelSpec(model="tiny", lora=TINY_LORA, seed=seed)


@pytest.fixture(scope="session")
def sst2_small() -> TextDataset:
    return resolve_dataset("builtin:sst2-small", "train")


@pytest.fixture(scope="session")
def shared_tiny_model() -> AdapterModel:
    """One tiny model for the session (building one per test would cost seconds each); use `tiny_model`."""
    return AdapterModel(tiny_spec())


@pytest.fixture
def tiny_model(shared_tiny_model: AdapterModel) -> AdapterModel:
    """The shared tiny model at its seed's initial factors: a test may train it, the next one starts clean."""
    shared_tiny_model.load_factors(shared_tiny_model.initial_factors())
    return shared_tiny_model


@pytest.fixture(scope="session")
def tiny_shards(shared_tiny_model: AdapterModel, sst2_small: TextDataset) -> list[Encoded]:
    enc = encode(shared_tiny_model.tokenizer, sst2_small.subset(np.arange(120)), TINY_TRAIN.max_length)
    return [enc.subset(np.arange(i * 30, (i + 1) * 30)) for i in range(4)]


@pytest.fixture(scope="session")
def tiny_dev(shared_tiny_model: AdapterModel) -> Encoded:
    dev = resolve_dataset("builtin:sst2-small", "dev").subset(np.arange(24))
    return encode(shared_tiny_model.tokenizer, dev, TINY_TRAIN.max_length)


def sentence_pairs(n: int = 24) -> TextDataset:
    """n premise/hypothesis pairs with binary labels: a sentence-pair task in memory (MNLI-shaped, two classes)."""
    premises = ("a cat sat on the mat", "the film ran long", "rain fell all day", "he sold the old car")
    hypotheses = ("an animal rested", "nobody liked the film", "the ground stayed dry", "the car was his")
    return TextDataset(
        "pairs",
        tuple(premises[i % 4] for i in range(n)),
        tuple(hypotheses[(i // 4 + i) % 4] for i in range(n)),
        np.array([i % 2 for i in range(n)], dtype=np.int64),
        ("no", "yes"),
    )
