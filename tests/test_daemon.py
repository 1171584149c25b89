"""The node daemon in-process, on real gRPC over loopback: it computes exactly what the simulator computes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import importlib.util
import itertools
import logging
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

import tadlora
from conftest import TINY_LORA
from tadlora.adapter import AdapterModel, ModelSpec
from tadlora.core import methods
from tadlora.core.methods import make_method
from tadlora.core.topology import client_name, link_up, make_topology
from tadlora.data import resolve_dataset
from tadlora.node import daemon, wire
from tadlora.node import peers as peers_module
from tadlora.node.config import NodeConfig
from tadlora.node.daemon import Node
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.peerspec import PeersOption, parse_peers_option
from tadlora.sim.engine import SequentialEngine
from tadlora.sim.runner import simulate
from tadlora.training import TrainSpec, encode
from tadlora.workload import client_shards, eval_subset

TRAIN = TrainSpec(local_steps=2, batch_size=4, max_length=32, lr=1e-2)
NO_PEERS = PeersOption(auto=False, static=(), dns=())


def cluster_name(tmp: Path) -> str:
    """A cluster name unique to this test in this pytest session (concurrent sessions share 127.0.0.1's mDNS)."""
    return f"test-{tmp.name}-{hashlib.blake2b(str(tmp).encode(), digest_size=4).hexdigest()}"


def node_config(tmp: Path, i: int, m: int, peers: PeersOption, **changes) -> NodeConfig:
    base = {
        "out": tmp / f"n{i}",
        "node_id": client_name(i),
        "cluster": cluster_name(tmp),
        "listen": "127.0.0.1:0",
        "peers": peers,
        "mdns_interface": "127.0.0.1",
        "model": "tiny",
        "shard": i,
        "num_shards": m,
        "samples_per_client": 40,
        "eval_samples": 16,
        "eval_every": 100,
        "lora": TINY_LORA,
        "train": TRAIN,
        "rounds": 3,
        "min_peers": m - 1,
        "peer_wait": 30.0,
        "exchange_timeout": 30.0,
        "device": "cpu",
        "insecure": True,  # plaintext on loopback; tests/test_tls.py runs nodes with certificates
    }
    base.update(changes)
    return NodeConfig(**base)


@contextlib.asynccontextmanager
async def cluster(tmp: Path, m: int, mdns: bool = False, **changes) -> AsyncIterator[list[Node]]:
    """m nodes in this process on 127.0.0.1; full mesh by mDNS or by static addresses (later nodes list earlier)."""
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(m):
            if mdns:
                peers = parse_peers_option("auto")
            else:
                peers = PeersOption(auto=False, static=tuple(n.address for n in nodes), dns=())
            nodes.append(await stack.enter_async_context(Node(node_config(tmp, i, m, peers, **changes))))
        yield nodes


async def run_all(nodes: list[Node]) -> None:
    async with asyncio.timeout(90):
        await asyncio.gather(*(n.run() for n in nodes))


def simulated(
    m: int,
    method_name: str,
    t: int | None,
    link_prob: float,
    rounds: int,
    topology: str = "er",
    train: TrainSpec = TRAIN,
    seed: int = 0,
) -> list[dict]:
    """The simulator's factors after ``rounds`` for the same seed, data, topology, method and training spec."""
    data = resolve_dataset("builtin:sst2-small", "train")
    model = AdapterModel(ModelSpec(model="tiny", label_names=data.label_names, lora=TINY_LORA, seed=seed))
    shards = [
        encode(model.tokenizer, data.subset(idx), TRAIN.max_length)
        for idx in client_shards(data, "label-skew", m, seed, 40)
    ]
    dev = encode(model.tokenizer, eval_subset(resolve_dataset("builtin:sst2-small", "dev"), 16), TRAIN.max_length)
    engine = SequentialEngine(model, shards, dev, train, seed=seed)
    topo = make_topology(topology, m, link_prob, seed)
    simulate(engine, make_method(method_name, t), topo, rounds, eval_every=10**6)
    return [engine.get_factors(i) for i in range(m)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "interval", "link_prob", "mdns"),
    [("tad", 1, 0.5, True), ("lora", None, 1.0, False), ("decaf", None, 1.0, False)],
)
async def test_daemon_adapters_equal_the_simulators(tmp_path, method, interval, link_prob, mdns) -> None:
    m, rounds = 3, 4
    changes = {"method": method, "switch_interval": interval, "link_prob": link_prob, "rounds": rounds}
    async with cluster(tmp_path, m, mdns=mdns, **changes) as nodes:
        await run_all(nodes)
        got = [n.factors for n in nodes]
    want = await asyncio.to_thread(simulated, m, method, interval, link_prob, rounds)
    for i in range(m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4, msg=f"node {i} {key}")
    if link_prob < 1.0:  # the per-round graph really varied, on both drivers alike
        degrees = {r["degree"] for r in _rounds(tmp_path / "n0")}
        assert len(degrees) > 1


@pytest.mark.asyncio
async def test_a_method_registered_from_a_user_module_runs_in_the_daemon_as_in_the_simulator(
    tmp_path, monkeypatch
) -> None:
    """examples/own_method.py (docs/simulator.md#extending): its method, registered before the nodes start, runs in
    the daemon (payload: B alone) to the simulator's adapters, and the nodes' schedule names it."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # the registration ends with this test
    spec = importlib.util.spec_from_file_location("own_method", Path(__file__).parent.parent / "examples/own_method.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    m, rounds = 3, 3
    async with cluster(tmp_path, m, method="lora-bmix", link_prob=1.0, rounds=rounds) as nodes:
        assert nodes[0].schedule.startswith("lora-bmix T=none ")
        await run_all(nodes)
        got = [n.factors for n in nodes]
    want = await asyncio.to_thread(simulated, m, "lora-bmix", None, 1.0, rounds)
    for i in range(m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4, msg=f"node {i} {key}")
    a_keys = [k for k in got[0] if k.endswith("lora_A.weight")]
    assert any(not torch.equal(got[0][k], got[1][k]) for k in a_keys)  # A is each node's own


@pytest.mark.asyncio
async def test_both_ends_of_an_exchange_count_it_and_its_bytes_and_the_peer_gauge_is_live(tmp_path) -> None:
    """Only the calling end used to count exchanges and bytes: the node with the highest id showed none, though it
    exchanged every round. The callee counts each committed pair as "served", with the same payload bytes the
    caller counts the other way round. The verified-peer gauge is set as peers come, not only when a round starts."""
    async with cluster(tmp_path, 2, rounds=2, min_peers=1) as nodes:
        caller, callee = nodes
        async with asyncio.timeout(30):
            while any(n.metrics.registry.get_sample_value("tadlora_peers") != 1 for n in nodes):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # before any round: the gauge follows the peer set itself
        await run_all(nodes)

    def value(node: Node, name: str, **labels: str) -> float:
        return node.metrics.registry.get_sample_value(name, labels) or 0.0

    assert value(caller, "tadlora_exchanges_total", result="ok") == 2
    assert value(callee, "tadlora_exchanges_total", result="served") == 2
    assert value(callee, "tadlora_exchanges_total", result="ok") == 0  # the two ends under two labels
    sent, received = value(caller, "tadlora_bytes_sent_total"), value(caller, "tadlora_bytes_received_total")
    assert sent > 0 and received > 0
    assert value(callee, "tadlora_bytes_received_total") == sent
    assert value(callee, "tadlora_bytes_sent_total") == received


@pytest.mark.asyncio
async def test_persistent_optimizer_state_survives_a_restart_and_matches_the_simulator(tmp_path) -> None:
    """Nodes keeping AdamW state across rounds, stopped after 2 rounds and restarted from their checkpoints,
    end where the simulator's uninterrupted 4 rounds end: the state is carried in memory and in the checkpoint
    (lora trains both factors every round, so rounds 2-3 need the state of rounds 0-1)."""
    m, train = 2, dataclasses.replace(TRAIN, optimizer_state="persistent")
    changes = {"method": "lora", "link_prob": 1.0, "train": train, "checkpoint_every": 1}
    async with cluster(tmp_path, m, rounds=2, **changes) as nodes:
        await run_all(nodes)
    from tadlora.node.state import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 2
    assert {float(v) for k, v in ckpt.optimizer.items() if k.endswith("/step")} == {2.0 * train.local_steps}
    async with cluster(tmp_path, m, rounds=4, **changes) as nodes:
        await run_all(nodes)
        got = [n.factors for n in nodes]
    want = await asyncio.to_thread(simulated, m, "lora", None, 1.0, 4, "er", train)
    for i in range(m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4, msg=f"node {i} {key}")


@pytest.mark.asyncio
async def test_a_slow_node_whose_links_the_schedule_kept_down_trains_its_own_rounds_as_the_simulator_does(
    tmp_path,
) -> None:
    """Seed 203, p = 0.5: node-2 has no live link in rounds 0-3 while node-0 and node-1 mix in rounds 1-3; node-0
    and node-2 are linked in round 4. node-2 trains slower, so the others reach round 4 (and wait there for it)
    while it is in round 1 or 2. Nothing failed: node-2 was not cut off, its links were down by the schedule, so it
    must run its own rounds as the simulator's client does, not adopt node-0's round and factors (it did: a
    catch-up took its missing mixing for a cut)."""
    m, rounds, seed, p = 3, 6, 203, 0.5
    names = [client_name(i) for i in range(m)]
    assert not any(link_up(seed, t, names[2], names[j], p) for t in range(4) for j in (0, 1))
    assert all(link_up(seed, t, names[0], names[1], p) for t in (1, 2, 3)) and link_up(seed, 4, names[0], names[2], p)
    async with cluster(tmp_path, m, method="lora", link_prob=p, seed=seed, rounds=rounds) as nodes:
        slow = nodes[2]
        train = slow._train

        def slow_train(t: int):  # in the worker thread: a slower machine
            time.sleep(1.0)
            return train(t)

        slow._train = slow_train  # type: ignore[method-assign]
        await run_all(nodes)
        got = [n.factors for n in nodes]
    assert [r["round"] for r in _rounds(tmp_path / "n2")] == list(range(rounds))
    want = await asyncio.to_thread(simulated, m, "lora", None, p, rounds, "er", TRAIN, seed)
    for i in range(m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4, msg=f"node {i} {key}")


@pytest.mark.asyncio
async def test_a_node_restarted_where_the_schedule_alone_kept_its_links_down_resumes_its_own_rounds(tmp_path) -> None:
    """Seed 203, p = 0.5 (as above): node-2 has no live link in rounds 0-3. It is stopped after round 1 and started
    again from its checkpoint at round 2 while node-0 and node-1 are in round 4, two rounds ahead. Nothing was lost:
    no link of node-2's was up in the rounds it did not run, and node-0 waits for it in round 4 as for any slow
    node. It must resume its own rounds as the simulator's client does; it took its restart for a sign that it was
    out of step and adopted node-0's round and factors, throwing its own rounds away."""
    m, rounds, seed, p = 3, 6, 203, 0.5
    names = [client_name(i) for i in range(m)]
    assert not any(link_up(seed, t, names[2], names[j], p) for t in range(4) for j in (0, 1))
    net = InMemoryNetwork()
    addresses = [f"10.0.0.{i + 1}:7070" for i in range(m)]

    def config(i: int, **changes) -> NodeConfig:
        peers = PeersOption(auto=False, static=tuple(a for a in addresses if a != addresses[i]), dns=())
        return node_config(
            tmp_path, i, m, peers, **{"method": "lora", "link_prob": p, "seed": seed, "rounds": rounds,
                                      "listen": addresses[i], "checkpoint_every": 1, **changes},
        )  # fmt: skip

    in_round_4 = threading.Event()  # node-0 and node-1 train round 4 once node-2 is back

    def gated(train):
        def run(t: int):  # in the worker thread
            if t == 4:
                assert in_round_4.wait(60)
            return train(t)

        return run

    async with contextlib.AsyncExitStack() as stack:
        group = [await stack.enter_async_context(Node(config(i), net)) for i in (0, 1)]
        for node in group:
            node._train = gated(node._train)  # type: ignore[method-assign]
        tasks = [asyncio.ensure_future(n.run()) for n in group]
        try:
            async with Node(config(2, rounds=2), net) as first:  # stopped at round 2, its checkpoint's
                async with asyncio.timeout(60):
                    await first.run()
            async with asyncio.timeout(60):
                await asyncio.gather(*(n.async_wait_for_round(4) for n in group))
            async with Node(config(2), net) as node:
                assert node.round == 2
                in_round_4.set()
                async with asyncio.timeout(90):
                    await asyncio.gather(node.run(), *tasks)
                got = [n.factors for n in (*group, node)]
        finally:
            in_round_4.set()
            for n in group:
                n.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert [r["round"] for r in _rounds(tmp_path / "n2")] == list(range(rounds))  # its own rounds, each once
    want = await asyncio.to_thread(simulated, m, "lora", None, p, rounds, "er", TRAIN, seed)
    for i in range(m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4, msg=f"node {i} {key}")


def _rounds(out: Path) -> list[dict]:
    from tadlora.node.state import read_rounds

    return read_rounds(out)


@pytest.mark.asyncio
async def test_a_round_encodes_its_snapshot_once_for_all_its_exchanges_both_ways(tmp_path, monkeypatch) -> None:
    # Each exchange used to encode the snapshot itself: a node with d neighbours held d encodings of it at once
    # (each as big as the adapter), half of them as their caller, half answering them.
    encodes = []
    encode = wire.encode_factors
    monkeypatch.setattr(wire, "encode_factors", lambda *a, **k: encodes.append(1) or encode(*a, **k))
    m, rounds = 3, 2
    async with cluster(tmp_path, m, method="lora", rounds=rounds) as nodes:
        await run_all(nodes)
    for i in range(m):
        assert [len(r["neighbours"]) for r in _rounds(tmp_path / f"n{i}")] == [m - 1] * rounds
    assert len(encodes) == m * rounds  # not m * rounds * (m - 1)


@pytest.mark.asyncio
async def test_a_round_lets_go_of_its_neighbours_factors_once_mixed_not_after_evaluating(tmp_path, monkeypatch) -> None:
    # They were held through the round's evaluation and checkpoint: d adapters as large as the node's own, for
    # nothing. Each evaluation checks that the factors its node mixed in last are gone by then.
    mixed_in: dict[int, list[weakref.ref[torch.Tensor]]] = {}  # id of the snapshot mixed -> what was mixed into it
    mix = daemon.apply_method_mixing

    def mixing(method, t, snapshot, received, *rest):  # type: ignore[no-untyped-def]
        mixed_in[id(snapshot)] = [weakref.ref(x) for factors in received.values() for x in factors.values()]
        return mix(method, t, snapshot, received, *rest)

    evaluate = Node._evaluate
    alive: list[int] = []

    def evaluating(self: Node) -> tuple[float, float]:
        gc.collect()
        refs = mixed_in[id(self.last_snapshot)]
        assert refs  # it did mix something
        alive.append(sum(ref() is not None for ref in refs))
        return evaluate(self)

    monkeypatch.setattr(daemon, "apply_method_mixing", mixing)
    monkeypatch.setattr(Node, "_evaluate", evaluating)
    m, rounds = 3, 2
    async with cluster(tmp_path, m, method="lora", rounds=rounds, eval_every=1) as nodes:
        await run_all(nodes)
    assert alive == [0] * m * rounds


@pytest.mark.asyncio
async def test_work_per_round_follows_the_degree_bound_not_the_network_size(tmp_path) -> None:
    m, k = 8, 4
    async with cluster(tmp_path, m, method="lora", rounds=2, max_neighbors=k) as nodes:
        await run_all(nodes)
        got = [n.factors for n in nodes]
        per_message = sum(v.numel() * v.element_size() for v in nodes[0].last_snapshot.values())
    for i in range(m):
        records = _rounds(tmp_path / f"n{i}")
        assert [r["round"] for r in records] == [0, 1]
        for record in records:
            assert record["degree"] == k and len(record["neighbours"]) == k and not record["missed"]
            assert record["bytes_sent"] == k * per_message  # k exchanges, whatever m is
    want = await asyncio.to_thread(simulated, m, "lora", None, 1.0, 2, f"overlay:{k}")
    for i in range(m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4)


@pytest.mark.asyncio
async def test_mixing_preserves_the_average_across_live_nodes(tmp_path) -> None:
    async with cluster(tmp_path, 4, method="lora", rounds=2) as nodes:
        await run_all(nodes)
        before = [n.last_snapshot for n in nodes]
        after = [n.factors for n in nodes]
    for key in before[0]:
        mean_before = torch.stack([b[key].double() for b in before]).mean(0)
        mean_after = torch.stack([a[key].double() for a in after]).mean(0)
        torch.testing.assert_close(mean_after, mean_before, atol=1e-6, rtol=0)
    records = _rounds(tmp_path / "n0")
    assert [r["round"] for r in records] == [0, 1]
    for record in records:
        assert record["degree"] == 3 and not record["missed"]
        assert record["self_weight"] == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_nodes_that_mix_every_round_never_stop_to_ask_each_other_their_round(tmp_path) -> None:
    # Catch-up asks a peer for its round only when what we know of it is two rounds old. Mixing with it tells us
    # its round, so a healthy run asks nobody: a question to a peer that is cut off holds the round loop.
    async with cluster(tmp_path, 3, method="lora", rounds=6) as nodes:
        await run_all(nodes)
        for node in nodes:
            for why in ("catch-up", "missed"):
                assert (node.metrics.registry.get_sample_value("tadlora_probes_total", {"why": why}) or 0.0) == 0, why
            assert [r["degree"] for r in _rounds(node.config.out)] == [2] * 6


@pytest.mark.asyncio
async def test_a_late_node_catches_up_by_adopting_a_neighbours_round(tmp_path) -> None:
    async with cluster(tmp_path, 2, rounds=None, min_peers=1) as nodes:
        tasks = [asyncio.ensure_future(n.run()) for n in nodes]
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(n.async_wait_for_round(4) for n in nodes))
            late_cfg = node_config(
                tmp_path, 2, 3, PeersOption(False, (nodes[0].address,), ()), rounds=None, min_peers=1
            )
            async with Node(late_cfg) as late:
                late_task = asyncio.ensure_future(late.run())
                async with asyncio.timeout(60):
                    await late.async_wait_for_round(3)  # adopted a neighbour's round...
                    await late.async_wait_for_round(late.round + 2)  # ...and finished rounds from there
                late.request_stop()
                await late_task
            late_rounds = _rounds(tmp_path / "n2")
            assert late_rounds and late_rounds[0]["round"] >= 3, late_rounds  # it did not start from round 0
            assert any(r["degree"] == 1 and not r["missed"] for r in late_rounds)  # and it mixed with node-0
        finally:
            for n in nodes:
                n.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("state", ["fresh", "persistent"])
async def test_a_node_that_ran_alone_adopts_the_groups_state_and_never_the_reverse(tmp_path, state) -> None:
    # node-2 trains alone far ahead in round numbers (a partition, or a node started early); then node-0 and
    # node-1 start together and connect to it. Their rounds never jump to node-2's; node-2 adopts theirs.
    train = dataclasses.replace(TRAIN, optimizer_state=state)
    solo_cfg = node_config(tmp_path, 2, 3, NO_PEERS, rounds=None, min_peers=0, train=train)
    async with Node(solo_cfg) as solo:
        solo_task = asyncio.ensure_future(solo.run())
        group: list[Node] = []
        try:
            async with asyncio.timeout(60):
                await solo.async_wait_for_round(30)
            async with contextlib.AsyncExitStack() as stack:
                first = node_config(
                    tmp_path, 0, 3, PeersOption(False, (solo.address,), ()), rounds=None, min_peers=1, train=train
                )
                group.append(await stack.enter_async_context(Node(first)))
                second = node_config(
                    tmp_path, 1, 3, PeersOption(False, (group[0].address,), ()), rounds=None, train=train
                )
                group.append(await stack.enter_async_context(Node(dataclasses.replace(second, min_peers=1))))
                tasks = [asyncio.ensure_future(n.run()) for n in group]
                try:
                    async with asyncio.timeout(60):
                        await solo.async_wait_until(lambda: solo.last_mixed_round > 0)
                        await solo.async_wait_for_round(solo.round + 3)
                finally:
                    for n in group:
                        n.request_stop()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            solo.request_stop()
            await solo_task
    for i in (0, 1):
        rounds = [r["round"] for r in _rounds(tmp_path / f"n{i}")]
        assert rounds == list(range(len(rounds))), rounds  # the group never jumped to the solo node's rounds
    solo_rounds = [r["round"] for r in _rounds(tmp_path / "n2")]
    went_back = [b for a, b in itertools.pairwise(solo_rounds) if b < a]
    assert went_back and went_back[0] < 30, solo_rounds[-10:]
    assert any(r["degree"] >= 1 and r["neighbours"] for r in _rounds(tmp_path / "n2")[-3:])
    if state == "persistent":  # the solo moments (30+ rounds of them) were dropped with the solo factors
        from tadlora.node.state import load_checkpoint

        since = len(solo_rounds) - max(i for i in range(1, len(solo_rounds)) if solo_rounds[i] < solo_rounds[i - 1])
        ckpt = load_checkpoint(tmp_path / "n2")
        assert ckpt is not None and ckpt.optimizer
        steps = max(float(v) for k, v in ckpt.optimizer.items() if k.endswith("/step"))
        assert steps <= since * TRAIN.local_steps, (steps, since)


@pytest.mark.asyncio
async def test_status_says_the_last_round_each_neighbour_exchanged_in(tmp_path) -> None:
    """Seed 12 keeps the link up in rounds 0 and 1 of 4 only: status (and `tadlora-node status`) must say round 1,
    not the node's last round, for the neighbour."""
    from tadlora.node.admin import query_status

    up = [t for t in range(4) if link_up(12, t, "node-0", "node-1", 0.5)]
    assert up and up[-1] < 3  # the case this test is about: the link was down in the last rounds
    async with cluster(tmp_path, 2, rounds=4, seed=12, link_prob=0.5) as nodes:
        await run_all(nodes)
        for node, other in zip(nodes, reversed(nodes), strict=True):
            [neighbour] = node.status().neighbors
            assert (neighbour.node_id, neighbour.last_round) == (other.node_id, 1 + up[-1])
        doc = await query_status(nodes[0].address, 10.0)
    assert [n["last_exchanged_round"] for n in doc["neighbours"]] == [up[-1]]
    assert [n["release"] for n in doc["neighbours"]] == [tadlora.__version__]  # what its handshake said
    assert doc["schedule"] == "tad T=5 p=0.5 max-neighbors=all"


@pytest.mark.asyncio
async def test_nodes_of_another_cluster_fingerprint_or_schedule_are_never_mixed_with(tmp_path) -> None:
    """... and each says why in its status: the address it was given is listed as a candidate, refused."""
    from tadlora.node.admin import query_status

    async with contextlib.AsyncExitStack() as stack:
        good = await stack.enter_async_context(Node(node_config(tmp_path, 0, 2, NO_PEERS, min_peers=1)))
        addr = (good.address,)
        other_cluster = node_config(tmp_path, 1, 2, PeersOption(False, addr, ()), cluster="elsewhere", min_peers=0)
        other_seed = node_config(tmp_path, 2, 3, PeersOption(False, addr, ()), seed=7, min_peers=0, rounds=1)
        # The same model, so the same fingerprint, but another method: it would mix B and A as tad does, silently.
        other_method = node_config(tmp_path, 4, 5, PeersOption(False, addr, ()), method="lora", min_peers=0, rounds=1)
        foreign = [await stack.enter_async_context(Node(c)) for c in (other_cluster, other_seed, other_method)]
        mate = await stack.enter_async_context(
            Node(node_config(tmp_path, 3, 4, PeersOption(False, addr, ()), min_peers=1))
        )
        assert foreign[1].fingerprint != good.fingerprint
        assert foreign[2].fingerprint == good.fingerprint and foreign[2].schedule != good.schedule
        await run_all([good, mate, *foreign])
        refusals = ("CLUSTER_MISMATCH", "FINGERPRINT_MISMATCH", "SCHEDULE_MISMATCH")
        for node, reason in zip(foreign, refusals, strict=True):
            [candidate] = node.status().candidates
            assert (candidate.key, candidate.source) == (good.address, "static")
            assert candidate.failures >= 1 and f"refused the handshake: {reason}: " in candidate.reason, candidate
        # Another seed: the refusal names it with both values, not only two hashes.
        assert "differ in seed ('node-2' 7, 'node-0' 0)" in foreign[1].status().candidates[0].reason
        assert not good.status().candidates and not mate.status().candidates  # each other's peer: nothing failing
        doc = await query_status(foreign[0].address, 10.0)
    [listed] = doc["candidates"]
    assert listed["key"] == listed["address"] == good.address and "CLUSTER_MISMATCH" in listed["reason"]
    assert doc["fingerprint_parts"] == foreign[0].fingerprint_parts and " seed=0 " in doc["fingerprint_parts"]
    records = _rounds(tmp_path / "n0")
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert [n["id"] for n in record["neighbours"]] == ["node-3"]
    for i, rounds in ((1, 3), (2, 1), (4, 1)):
        records = _rounds(tmp_path / f"n{i}")
        assert [r["round"] for r in records] == list(range(rounds)), i
        assert all(r["degree"] == 0 for r in records)
    assert good.metrics.registry.get_sample_value("tadlora_refusals_total", {"reason": "SCHEDULE_MISMATCH"})


@pytest.mark.asyncio
async def test_a_node_waiting_for_its_min_peers_says_so_in_its_status_and_log(tmp_path, caplog) -> None:
    """A node started alone (the README's single-node command) waits --peer-wait for --min-peers before round 0.
    It used to show nothing of it: no log line until "starting anyway" a minute later, and "idle" in `status`."""
    caplog.set_level("INFO", logger="tadlora.node")
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, min_peers=1, peer_wait=3.0, rounds=1)) as node:
        assert node.status().state == "idle"  # serving, not waiting yet
        # an --insecure node of static peers publishes no mDNS record that could say so
        assert "WITHOUT TLS" in caplog.text and "status says so" in caplog.text and "mDNS record" not in caplog.text
        run = asyncio.create_task(node.run())
        async with asyncio.timeout(2.5):  # well inside the wait
            while node.status().state != "waiting-for-peers":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert "waiting up to 3 s for 1 peer(s) before round 0" in caplog.text
        await run
        assert node.status().state != "waiting-for-peers"
    assert "only 0 of 1 peers after 3 s; starting anyway" in caplog.text
    assert [r["round"] for r in _rounds(tmp_path / "n0")] == [0]


@pytest.mark.asyncio
async def test_a_static_peer_list_that_names_the_node_itself_is_shared_without_dialling_itself(
    tmp_path, caplog
) -> None:
    """One --peers list for every host is the easy way to configure a static cluster; the entry that is the node
    itself is skipped, not dialled and refused every 30 s for the whole run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(Node(node_config(tmp_path, 0, 2, NO_PEERS, min_peers=1)))
        shared = PeersOption(False, (first.address, f"127.0.0.1:{port}"), ())
        second = await stack.enter_async_context(
            Node(node_config(tmp_path, 1, 2, shared, listen=f"127.0.0.1:{port}", min_peers=1))
        )
        await run_all([first, second])
        refused = second.metrics.registry.get_sample_value("tadlora_refusals_total", {"reason": "NOT_A_NEIGHBOR"})
    assert not refused
    assert "own id" not in caplog.text
    records = _rounds(tmp_path / "n1")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all([n["id"] for n in r["neighbours"]] == ["node-0"] for r in records)


@pytest.mark.asyncio
async def test_the_node_s_own_address_in_another_spelling_is_dialled_once_not_every_backoff(
    tmp_path, monkeypatch, caplog
) -> None:
    """A static list (or a dual-stack DNS name) may name the node itself in a spelling other than its own address
    (localhost for 127.0.0.1, its IPv6 record): the skip by address cannot see it, its handshake reaches the node
    itself and is refused. Once is enough: it must not be dialled again at every backoff for the whole run. The
    dialling side says so once, naming the entry; the answering side, the same node, said it as a refusal of a
    caller under its own id, which sent the reader looking for a second node."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(peers_module, "RETRY_MIN_S", 0.05)  # retries that would come every 50 ms, not every 1-30 s
    monkeypatch.setattr(peers_module, "RETRY_MAX_S", 0.05)
    monkeypatch.setattr(peers_module, "SCAN_INTERVAL_S", 0.05)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    itself = PeersOption(False, (f"localhost:{port}",), ())
    async with Node(node_config(tmp_path, 0, 1, itself, listen=f"127.0.0.1:{port}", min_peers=0)) as node:
        await asyncio.sleep(1.5)  # about 30 retries' worth
        refused = node.metrics.registry.get_sample_value("tadlora_refusals_total", {"reason": "NOT_A_NEIGHBOR"})
        assert node._peers is not None and not node._peers.peers
        assert refused == 1
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert [m for m in said if "itself" in m] == [
            f"localhost:{port} (static) reaches this node itself at localhost:{port}: not a peer there"
        ]
        assert not [m for m in said if "own id" in m]
        # Once the node has moved (renumbered), that address may reach another node: it is tried again, once.
        node._peers.own_address_changed()
        await asyncio.sleep(1.0)
        again = node.metrics.registry.get_sample_value("tadlora_refusals_total", {"reason": "NOT_A_NEIGHBOR"})
    assert again == 2


@pytest.mark.asyncio
async def test_two_nodes_under_one_id_say_so_in_their_status_and_logs_not_that_they_reached_themselves(
    tmp_path, caplog
) -> None:
    """A --node-id given twice (or an --out copied with its node.json): the two never mix. Each caller took the
    refusal it got for a dial of itself and went silent (logged at DEBUG, left out of status, never dialled again);
    now the caller sees the id at another address, and both sides name the two addresses and the fix."""
    caplog.set_level(logging.INFO)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            Node(node_config(tmp_path, 0, 2, NO_PEERS, min_peers=0, rounds=None, peer_wait=0.0))
        )
        twin = await stack.enter_async_context(
            Node(node_config(tmp_path, 1, 2, PeersOption(False, (first.address,), ()), node_id=first.node_id,
                             min_peers=0, rounds=None, peer_wait=0.0))
        )  # fmt: skip
        async with asyncio.timeout(30):  # its first dial comes at once
            while not twin.status().candidates:  # noqa: ASYNC110 - status has no event to wait on
                await asyncio.sleep(0.05)
        [candidate] = twin.status().candidates
    assert candidate.key == first.address
    assert candidate.reason == (
        f"refused the handshake: NOT_A_NEIGHBOR: that is this node's own id: {twin.address} and {first.address} run "
        "under one id, and never mix; give one of them another --node-id (or another --out, if it kept the id from "
        "a run there)"
    )
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert f"refused a handshake from {first.node_id!r}: NOT_A_NEIGHBOR: {candidate.reason.split(': ', 2)[2]}" in said
    assert not [m for m in said if "itself" in m]


@pytest.mark.asyncio
@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
async def test_a_wildcard_listen_without_mdns_or_advertise_address_is_refused_at_start(tmp_path, listen) -> None:
    """It would announce 0.0.0.0:PORT (or [::]:PORT) in its handshakes, and a peer dialling that reaches its own
    host: refused before anything is loaded or served, naming the flag to set."""
    static = PeersOption(auto=False, static=("127.0.0.1:1",), dns=())
    with pytest.raises(ValueError, match="--advertise-address") as refused:
        async with Node(node_config(tmp_path, 0, 1, static, listen=listen, min_peers=0)):
            pass
    assert listen in str(refused.value)
    assert not (tmp_path / "n0").exists()  # refused before it touched --out


@pytest.mark.asyncio
async def test_a_wildcard_listen_with_mdns_announces_the_interface_address(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tadlora.node"):
        config = node_config(tmp_path, 0, 1, parse_peers_option("auto"), listen="0.0.0.0:0", min_peers=0)
        async with Node(config) as node:
            assert node.address.startswith("127.0.0.1:")  # the --mdns-interface address, never 0.0.0.0
            assert node.local_info().address == node.address
    # --insecure: what anyone can reach is every address's port, not only the one announced
    port = node.address.rpartition(":")[2]
    assert f"any machine that reaches port {port} of any address of this host can join" in caplog.text, caplog.text


@pytest.mark.asyncio
async def test_graceful_stop_checkpoints_and_leaves_no_task_or_thread(tmp_path) -> None:
    threads_before = set(threading.enumerate())
    async with cluster(tmp_path, 2, rounds=None, min_peers=1, checkpoint_every=1000) as nodes:
        tasks = [asyncio.ensure_future(n.run()) for n in nodes]
        async with asyncio.timeout(60):
            await asyncio.gather(*(n.async_wait_for_round(2) for n in nodes))
        for n in nodes:
            n.request_stop()
        results = await asyncio.gather(*tasks)
    for n, result in zip(nodes, results, strict=True):
        from tadlora.node.state import load_checkpoint

        ckpt = load_checkpoint(n.config.out)
        assert ckpt is not None and ckpt.round == n.round >= 2
        for key, value in ckpt.factors.items():
            assert torch.equal(value, n.factors[key])
        assert (n.config.out / "adapter" / "adapter_model.safetensors").exists()
        assert result.rounds_completed >= 2
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not pending, pending
    await asyncio.get_running_loop().shutdown_default_executor()  # the loop's own workers (gRPC decoding)
    import gc

    gc.collect()
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(timeout=10)
    # grpc.aio's process-wide poller thread is grpc's own: it ends when grpc's last objects are finalized, which
    # the garbage collector may do later. Every thread of the node (torch worker, zeroconf, metrics) must be gone.
    leftover = [
        t for t in set(threading.enumerate()) - threads_before if t.is_alive() and "_poll_wrapper" not in t.name
    ]
    assert not leftover, leftover


@pytest.mark.parametrize("link_prob", [1.0, 0.02])
def test_a_peer_claiming_a_round_far_ahead_costs_a_bounded_look_at_the_link_schedule(
    tmp_path, monkeypatch, link_prob
) -> None:
    """A node resumed from its checkpoint that has run no round yet asks, of each peer ahead of it, whether a round
    that peer ran had a link up to this node (`_may_be_out_of_step`), on the event loop. It looked through every
    round up to the peer's claim, and a peer may claim up to MAX_ROUND (2^40): days, for one whose link is never up
    (outside this node's overlay). Now a peer outside the overlay is not looked at, and one inside for at most 20 / p
    rounds; the answers stay those of the schedule."""
    from types import SimpleNamespace

    from tadlora.node.limits import MAX_ROUND

    ids = ["node-1", "node-2", "node-3", "node-4", "node-5"]
    node = Node(node_config(tmp_path, 0, 6, NO_PEERS, max_neighbors=2, link_prob=link_prob))
    node.node_id = "node-0"
    node.rounds.restore(10, {}, 10)
    node._resumed = True
    calls: list[tuple] = []
    up = daemon.link_up
    monkeypatch.setattr(daemon, "link_up", lambda *a: calls.append(a) or up(*a))

    def claims(rounds: dict[str, int]) -> bool:
        peers = {j: SimpleNamespace(info=SimpleNamespace(round=r)) for j, r in rounds.items()}
        node._peers = SimpleNamespace(peers=peers)  # type: ignore[assignment]
        calls.clear()
        return node._may_be_out_of_step()

    at_ten = dict.fromkeys(ids, 10)
    claims(at_ten)
    overlay = sorted(node._overlay())
    outside = sorted(set(ids) - set(overlay))
    assert len(overlay) == 2 and outside
    scan = node._link_scan_rounds()
    assert scan == (20 if link_prob == 1.0 else 1000)
    assert claims(at_ten) is False and calls == []  # no one ahead: nothing to look through
    # One outside the overlay claims the last round there is: no link to it, ever, and nothing looked through.
    assert claims({**at_ten, outside[0]: MAX_ROUND}) is False and calls == []
    # One inside it that ran rounds ahead had a link up in one of them (at p = 0.02, within 1,000 rounds).
    assert claims({**at_ten, overlay[0]: MAX_ROUND}) is True
    assert 0 < len(calls) <= scan
    # Were its link down in every round, the look ends after `scan` rounds.
    monkeypatch.setattr(daemon, "link_up", lambda *a: calls.append(a) and False)
    assert claims({**at_ten, overlay[0]: MAX_ROUND}) is False and len(calls) == scan


@pytest.mark.asyncio
async def test_status_lists_at_most_max_degree_neighbours_however_many_peers_handshook(tmp_path) -> None:
    """Without TLS anyone may handshake under thousands of ids; listed whole, a status reply past gRPC's 4 MiB
    failed every health check (about 40,000 peers). It lists the first MAX_DEGREE, as its readers keep."""
    from tadlora.node.limits import MAX_DEGREE
    from tadlora.node.peers import PeerManager

    class Conn:
        async def aclose(self) -> None:
            pass

    node = Node(node_config(tmp_path, 0, 1, NO_PEERS))
    node.node_id, node.address = "node-0", "127.0.0.1:7070"
    node._peers = PeerManager(InMemoryNetwork(), node.local_info, list, lambda: None)
    for i in range(MAX_DEGREE + 5):
        info = dataclasses.replace(node.local_info(), node_id=f"p{i:05d}", address=f"127.0.1.{i % 250 + 1}:{i + 1}")
        await node._peers.add(info, Conn(), "inbound")  # type: ignore[arg-type]
    listed = node.status().neighbors
    assert len(listed) == MAX_DEGREE and listed[0].node_id == "p00000"
    assert node.status().neighbors_total == MAX_DEGREE + 5  # all of them counted
    await node._peers.aclose()


@pytest.mark.parametrize(("link_prob", "rounds"), [(1.0, 20), (0.02, 1000), (1e-4, 100_000), (5e-324, 100_000)])
def test_the_look_at_the_link_schedule_is_20_over_p_rounds_and_never_more_than_100_000(
    tmp_path, link_prob, rounds
) -> None:
    """The smallest --link-prob there is made 20 / p overflow (and a tiny one a scan of tens of seconds)."""
    node = Node(node_config(tmp_path, 0, 2, NO_PEERS, link_prob=link_prob))
    assert node._link_scan_rounds() == rounds == min(daemon.LINK_SCAN_MAX_ROUNDS, rounds)
