"""A node runs for days: what it keeps must not grow with rounds, with the peers it has seen or with their churn.

What it keeps per peer goes once the peer is gone for good (the peer manager has forgotten it); what it keeps per
exchange goes with the exchange's round. One real node (tiny model) on the in-memory network, rounds run one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tadlora.node import peers as peers_module
from tadlora.node.daemon import Node
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.rpc import ExchangeHeader
from test_daemon_faults import ScriptedPeer, lone_node

CHURN = 6  # peers that each come under an id of their own, mix, and leave for good


@contextlib.asynccontextmanager
async def peer_named(node: Node, net: InMemoryNetwork, node_id: str) -> AsyncIterator[ScriptedPeer]:
    """A `ScriptedPeer` under ``node_id``, served on ``net`` and made a verified peer of ``node``."""
    peer = ScriptedPeer(node)
    async with net.serve(peer, "10.0.0.9:0") as server:
        peer.info = dataclasses.replace(peer.info, node_id=node_id, address=server.address)
        assert node._peers is not None
        await node._peers.add(peer.info, None, "static")
        yield peer


def shift_the_peer_managers_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The peer manager (only) sees ``seconds`` more of `time.monotonic` than the event loop does."""
    monkeypatch.setattr(peers_module, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + seconds))


@pytest.mark.asyncio
async def test_peers_that_came_mixed_and_left_for_good_leave_nothing_behind_in_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=None) as node:
        assert node._peers is not None
        for k in range(CHURN):  # each a node started on a fresh --out: a new id
            async with peer_named(node, net, f"peer-{k}"):
                async with asyncio.timeout(60):
                    await node._run_round(node.round)
                assert node.status().neighbors[0].last_round == node.round  # it mixed in the round just run
            await node._peers.drop(f"peer-{k}", "gone", cause="unanswered")
        assert node._peers.knows("peer-0")  # just dropped: backed off, not forgotten
        shift_the_peer_managers_clock(monkeypatch, peers_module.STABLE_S)
        await node._peers.scan()  # gone for STABLE_S: forgotten
        assert not any(node._peers.knows(f"peer-{k}") for k in range(CHURN))
        async with asyncio.timeout(60):
            await node._run_round(node.round)
        assert node._last_exchanged == {}


@pytest.mark.asyncio
async def test_a_peer_dropped_but_not_yet_forgotten_keeps_its_last_exchanged_round(tmp_path: Path) -> None:
    """A flap costs a peer its entry, not its history: status still says when it last exchanged once it is back."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=None) as node:
        assert node._peers is not None
        async with peer_named(node, net, "peer-0"):
            async with asyncio.timeout(60):
                await node._run_round(node.round)
            mixed = node.round
            await node._peers.drop("peer-0", "flapped", cause="unanswered")
            async with asyncio.timeout(60):
                await node._run_round(node.round)  # without it
            async with peer_named(node, net, "peer-0"):
                [back] = node.status().neighbors
                assert back.last_round == mixed


@pytest.mark.asyncio
async def test_an_answered_exchange_whose_commit_never_came_is_forgotten_with_its_round(tmp_path: Path) -> None:
    """A caller killed between our reply and its commit (or whose commit was lost) never commits: the sizes kept for
    its commit went only when the same caller committed again, so callers under new ids grew them for ever."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=None, exchange_timeout=1.0) as node:
        assert node._peers is not None
        for k in range(CHURN):
            caller = f"a-{k}"  # sorts before "node-0": it calls, the node answers
            async with peer_named(node, net, caller):
                header = ExchangeHeader(node_id=caller, cluster=node.config.cluster, fingerprint=node.fingerprint,
                                        round=node.round, degree=1, schedule=node.schedule)  # fmt: skip
                conn = net.connect(node.address, node_id=node.node_id)
                try:
                    async with asyncio.timeout(60):
                        exchanged = asyncio.ensure_future(
                            conn.exchange(header, dict(node.factors), 30.0, node._spec_for(node.round))
                        )
                        await node._run_round(node.round)  # answers it; no commit: the pair is left out at 1 s
                        await exchanged
                finally:
                    await conn.aclose()
            await node._peers.drop(caller, "killed", cause="unanswered")
        assert node._served == {}
