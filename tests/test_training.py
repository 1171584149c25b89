"""Local steps touch exactly the factors a method trains; mixing touches exactly the ones it mixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN, tiny_spec
from tadlora.adapter import AdapterModel
from tadlora.core.factors import Factor, factor_of
from tadlora.core.methods import make_method
from tadlora.core.mixing import mh_matrix
from tadlora.core.topology import make_topology
from tadlora.sim.config import ALL_METHODS
from tadlora.sim.engine import SequentialEngine
from tadlora.sim.runner import mix_round
from tadlora.training import local_steps, round_batches


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[Factor]:
    return {factor_of(k) for k in before if not torch.equal(before[k], after[k])}


def test_round_batches_are_deterministic_and_cover_the_shard() -> None:
    a = round_batches(0, 3, 7, n=10, batch_size=4, steps=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in round_batches(0, 3, 7, 10, 4, 3)]
    assert sorted(np.concatenate(a)[:10].tolist()) == list(range(10))
    assert [x.tolist() for x in a] != [x.tolist() for x in round_batches(0, 3, 8, 10, 4, 3)]


def test_a_frozen_factor_and_the_base_do_not_change_during_local_steps(tiny_shards) -> None:
    model = AdapterModel(tiny_spec())
    base_before = {n: p.clone() for n, p in model.model.named_parameters() if ".lora_" not in n}
    before = model.factors()
    local_steps(model, tiny_shards[0], frozenset({Factor.B}), TINY_TRAIN, seed=0, shard=0, t=0)
    mid = model.factors()
    assert changed(before, mid) == {Factor.B}
    local_steps(model, tiny_shards[0], frozenset({Factor.A}), TINY_TRAIN, seed=0, shard=0, t=1)
    assert changed(mid, model.factors()) == {Factor.A}
    for n, p in model.model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base_before[n]), n


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_method_trains_and_mixes_exactly_its_factors(name: str, tiny_model, tiny_shards, tiny_dev) -> None:
    method = make_method(name, 2) if name in ("tad", "adf", "tad-nojoint") else make_method(name)
    engine = SequentialEngine(tiny_model, tiny_shards, tiny_dev, TINY_TRAIN, seed=0)
    initial = [engine.get_factors(i) for i in range(4)]
    assert all(torch.equal(initial[0][k], s[k]) for s in initial for k in s)  # all clients start identical
    topology = make_topology("complete", 4)  # every client has neighbours, so mixed factors must move
    for t in range(4):
        before = [engine.get_factors(i) for i in range(4)]
        engine.train_round(t, method.trained(t))
        trained = [engine.get_factors(i) for i in range(4)]
        for i in range(4):
            got = changed(before[i], trained[i])
            if t == 0 and method.trained(t) == {Factor.A, Factor.B}:
                # with B = 0 the first step gives A no gradient; B must move, A may move from step 2 on
                assert Factor.B in got
            else:
                assert got == method.trained(t), (name, t, got)
        mixed, _ = mix_round(method, t, topology, trained)
        w = mh_matrix(topology.adjacency(t))
        for i in range(4):
            for key in trained[i]:
                if method.product_mixing:
                    continue  # DeCAF's refactorisation is checked against the SVD in test_mixing
                if factor_of(key) in method.mixed(t):
                    expected = sum(w[i, j] * trained[j][key].double() for j in range(4))
                    torch.testing.assert_close(mixed[i][key].double(), expected, atol=1e-6, rtol=1e-6)
                else:
                    assert torch.equal(mixed[i][key], trained[i][key]), (name, t, key)
            engine.set_factors(i, mixed[i])
