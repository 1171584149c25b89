"""Leave: a node that stops gracefully tells each of its peers, which drop it at once instead of waiting out a
round's deadline for it, and take it back at its next handshake.

The call runs against gRPC on 127.0.0.1 and the in-memory network (`FakeNode` handlers, as in test_rpc.py); a node
of the release before Leave is the Node service as served now, less that one method. The peer manager's side (drop,
rejoin, telling every peer within a bound) runs on real gRPC servers; the daemon's on in-process nodes. Real node
processes stopping and restarting are in test_rolling_restart.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tadlora.node import grpc_transport
from tadlora.node.daemon import Node
from tadlora.node.grpc_transport import GrpcTransport
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.peers import PeerManager
from tadlora.node.peerspec import PeersOption
from tadlora.node.responder import _Responder
from tadlora.node.rpc import PeerInfo, Transport
from tadlora.node.wire import ExchangeRefused, Reason
from test_daemon import node_config
from test_rpc import LISTEN, TIMEOUT, FakeNode, lora_factors, node_service

SHORT_S = 0.5  # s; the bound given to a leave in the tests where a peer never answers


class LeavingAware(FakeNode):
    """A `FakeNode` that keeps peers: it records each Leave, refuses one on request, or never answers."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id, lora_factors(1))
        self.left: list[PeerInfo] = []
        self.leave_refusal: tuple[Reason, str] | None = None
        self.silent = False

    async def async_leave(self, remote: PeerInfo) -> None:
        self.left.append(remote)
        if self.silent:
            await asyncio.Event().wait()
        if self.leave_refusal is not None:
            raise ExchangeRefused(*self.leave_refusal)


@pytest.fixture(params=["grpc", "memory"])
def transport(request: pytest.FixtureRequest) -> Transport:
    chosen: Transport = GrpcTransport() if request.param == "grpc" else InMemoryNetwork()
    return chosen


@contextlib.asynccontextmanager
async def earlier_release(handler: FakeNode) -> AsyncIterator[str]:
    """A node of the release before Leave: the Node service as this one serves it, less Leave; its address."""
    servicer = grpc_transport._NodeServicer(_Responder(handler, max_payload_bytes=1 << 20))
    handlers = grpc_transport._node_handlers(servicer)
    del handlers["Leave"]
    async with node_service(handlers) as address:
        yield address


# ------------------------------------------------------------------------------------------------ the call


@pytest.mark.asyncio
async def test_a_leave_reaches_the_handler_with_the_callers_info_and_is_answered_dropped(transport: Transport) -> None:
    alice, bob = FakeNode("alice", lora_factors(1)), LeavingAware("bob")
    async with transport.serve(bob, LISTEN) as server, transport.connect(server.address) as client:
        assert await client.leave(alice.info, TIMEOUT) is True
    assert bob.left == [alice.info]


@pytest.mark.asyncio
async def test_a_leave_the_handler_refuses_is_raised_with_its_reason_and_counted(transport: Transport) -> None:
    alice, bob = FakeNode("alice", lora_factors(1)), LeavingAware("bob")
    bob.leave_refusal = (Reason.NOT_A_NEIGHBOR, "'alice' is not a peer of 'bob'")
    refused: list[tuple[str, Reason]] = []
    bob.observe_refusal = lambda what, exc: refused.append((what, exc.reason))  # type: ignore[attr-defined]
    async with transport.serve(bob, LISTEN) as server, transport.connect(server.address) as client:
        with pytest.raises(ExchangeRefused) as raised:
            await client.leave(alice.info, TIMEOUT)
    assert (raised.value.reason, raised.value.detail) == bob.leave_refusal
    assert refused == [("leave", Reason.NOT_A_NEIGHBOR)]


@pytest.mark.asyncio
async def test_a_leave_of_another_cluster_or_off_the_id_syntax_never_reaches_the_handler(transport: Transport) -> None:
    bob = LeavingAware("bob")
    stranger = FakeNode("mallory", lora_factors(1), cluster="elsewhere").info
    misspelt = dataclasses.replace(FakeNode("alice", lora_factors(1)).info, node_id="Alice")
    async with transport.serve(bob, LISTEN) as server, transport.connect(server.address) as client:
        for info, reason in ((stranger, Reason.CLUSTER_MISMATCH), (misspelt, Reason.BAD_PAYLOAD)):
            with pytest.raises(ExchangeRefused) as raised:
                await client.leave(info, TIMEOUT)
            assert raised.value.reason is reason, raised.value
    assert bob.left == []


@pytest.mark.asyncio
async def test_a_leave_to_a_node_of_the_earlier_release_is_answered_false_and_its_other_calls_still_work() -> None:
    """An earlier release answers UNIMPLEMENTED for Leave alone; that is no protocol mismatch (as a server without
    the Node service is), so a new node neither fails nor drops such a peer: the peer finds out as before."""
    alice, old = FakeNode("alice", lora_factors(1)), FakeNode("old", lora_factors(2))
    async with earlier_release(old) as address, GrpcTransport().connect(address) as client:
        assert (await client.handshake(alice.info, TIMEOUT)).node_id == "old"
        assert await client.leave(alice.info, TIMEOUT) is False
        assert (await client.handshake(alice.info, TIMEOUT)).node_id == "old"  # the connection is as good as before


# ----------------------------------------------------------------------------------- the peer manager


def me() -> PeerInfo:
    return FakeNode("me", lora_factors(1)).info


def peer_info(node_id: str, address: str) -> PeerInfo:
    return dataclasses.replace(me(), node_id=node_id, address=address)


@pytest.mark.asyncio
async def test_a_peer_that_leaves_is_dropped_at_once_kept_as_a_candidate_and_a_peer_again_at_its_next_handshake() -> (
    None
):
    net = InMemoryNetwork()
    changes: list[int] = []
    causes: list[str] = []
    pm = PeerManager(
        net, me, lambda: [("10.0.0.1:7070", "10.0.0.1:7070", None)], lambda: changes.append(1), causes.append
    )
    p1, p2 = peer_info("p1", "10.0.0.1:7070"), peer_info("p2", "10.0.0.2:7070")
    for info in (p1, p2):
        await pm.add(info, net.connect(info.address, node_id=info.node_id), "static")
    changes.clear()
    await pm.left(p1)
    assert set(pm.peers) == {"p2"} and changes == [1]  # a round waiting for p1 is woken (`Node._departed`)
    assert causes == ["leave"]
    await pm.left(p2)
    await pm.drop("p2", "again", cause="unanswered")  # no longer a peer: neither dropped nor counted twice
    assert causes == ["leave", "leave"]
    assert pm.knows("p1") and pm.retry_at("10.0.0.1:7070") is not None  # not forgotten: retried with backoff
    await pm.scan()  # not due yet: nothing dialled, and status says why it is no peer
    [candidate] = pm.unreachable()
    assert candidate.key == "10.0.0.1:7070" and candidate.reason == "dropped: left (it said so as it stopped)"
    await pm.add(p1, None, "inbound")  # it restarted and called us
    assert set(pm.peers) == {"p1"}
    await pm.aclose()


@pytest.mark.asyncio
async def test_each_drop_is_counted_once_by_its_cause() -> None:
    """The causes a probe gives (`tadlora_peer_drops_total{cause}`): a peer that refuses because it can no longer
    be one (another cluster at its address now), one that does not answer, and one that answers BUSY (kept)."""
    net = InMemoryNetwork()
    causes: list[str] = []
    pm = PeerManager(net, me, list, lambda: None, causes.append)
    other_cluster, busy = FakeNode("moved", lora_factors(1)), FakeNode("busy", lora_factors(1))
    other_cluster.refusal = (Reason.CLUSTER_MISMATCH, "this is another cluster now")
    busy.refusal = (Reason.BUSY, "too many calls")
    async with net.serve(other_cluster, LISTEN) as moved_at, net.serve(busy, LISTEN) as busy_at:
        peers = {
            "moved": peer_info("moved", moved_at.address),
            "busy": peer_info("busy", busy_at.address),
            "gone": peer_info("gone", "10.0.0.9:7070"),  # nothing serves there
        }
        for info in peers.values():
            await pm.add(info, net.connect(info.address, node_id=info.node_id), "static")
        for node_id in peers:
            assert await pm.probe(node_id, "asked") is None
        assert set(pm.peers) == {"busy"}  # alive and still a peer: it will answer when it can
        assert sorted(causes) == ["refused", "unanswered"]
    await pm.aclose()


@pytest.mark.asyncio
async def test_a_leave_from_a_node_that_is_no_peer_or_a_peer_at_another_address_is_refused_and_drops_nothing() -> None:
    net = InMemoryNetwork()
    pm = PeerManager(net, me, list, lambda: None)
    p1 = peer_info("p1", "10.0.0.1:7070")
    await pm.add(p1, net.connect(p1.address, node_id="p1"), "static")
    for claimed, says in (
        (peer_info("stranger", "10.0.0.9:7070"), "'stranger' is not a peer of 'me'"),
        (dataclasses.replace(p1, address="10.0.0.7:7070"), "'p1' is a peer of 'me' at 10.0.0.1:7070, not at 10.0.0"),
    ):
        with pytest.raises(ExchangeRefused) as raised:
            await pm.left(claimed)
        assert raised.value.reason is Reason.NOT_A_NEIGHBOR
        assert says in raised.value.detail
    assert set(pm.peers) == {"p1"}
    await pm.aclose()


@pytest.mark.asyncio
async def test_a_stopping_node_tells_every_peer_and_an_old_a_refusing_a_silent_or_a_gone_one_holds_it_no_longer_than_the_bound(  # noqa: E501
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Told in parallel, each once; a peer that never answers costs the bound, not a handshake's 5 s or more, and
    what each said is one log line. Nothing is timed here: a leave that waited on a silent peer would hang the test."""
    transport = GrpcTransport()
    new, refusing, silent, old = LeavingAware("new"), LeavingAware("refusing"), LeavingAware("silent"), FakeNode(
        "old", lora_factors(2)
    )  # fmt: skip
    refusing.leave_refusal = (Reason.SHUTTING_DOWN, "node is stopping")
    silent.silent = True
    pm = PeerManager(transport, me, list, lambda: None)
    async with contextlib.AsyncExitStack() as stack:
        addresses = {}
        for handler in (new, refusing, silent):
            server = await stack.enter_async_context(transport.serve(handler, LISTEN))
            addresses[handler.info.node_id] = server.address
        addresses["old"] = await stack.enter_async_context(earlier_release(old))
        async with transport.serve(FakeNode("gone", lora_factors(3)), LISTEN) as server:
            addresses["gone"] = server.address
        for node_id, address in addresses.items():
            await pm.add(peer_info(node_id, address), transport.connect(address, node_id=node_id), "static")
        with caplog.at_level(logging.INFO, logger="tadlora.peers"):
            async with asyncio.timeout(TIMEOUT):  # far beyond the bound: only a leave that is not bounded reaches it
                await pm.tell_leaving(SHORT_S)
        await pm.aclose()
    assert [info.node_id for info in new.left + refusing.left + silent.left] == ["me"] * 3
    [line] = [r.getMessage() for r in caplog.records if "that this node is leaving" in r.getMessage()]
    said = dict(part.split(": ", 1) for part in line.split(" is leaving: ", 1)[1].split("; "))
    assert said["new"] == "dropped this node"
    assert said["old"] == "an earlier release, without Leave"
    assert said["refusing"] == "refused: SHUTTING_DOWN: node is stopping"
    assert said["silent"].startswith("no answer")
    assert said["gone"].startswith("no answer: UNAVAILABLE")
    assert line.startswith("told 5 peer(s) that this node is leaving: ")


# ------------------------------------------------------------------------------------------- the daemon


@pytest.mark.asyncio
async def test_a_node_that_closes_is_dropped_by_its_static_peer_at_once_and_a_stranger_cannot_make_it_drop_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process nodes on gRPC, plaintext: node 1 lists node 0 statically. A leave naming node 0 from another
    address is refused and drops nothing (test_tls.py covers the certificate); node 0's own close drops it."""
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(Node(node_config(tmp_path, 0, 2, PeersOption(False, (), ()))))
        second = await stack.enter_async_context(
            Node(node_config(tmp_path, 1, 2, PeersOption(False, (first.address,), ())))
        )
        async with asyncio.timeout(60):
            await second.async_wait_until(lambda: first.node_id in second._peer_ids())
            await first.async_wait_until(lambda: second.node_id in first._peer_ids())
            impostor = dataclasses.replace(first.local_info(), address="127.0.0.1:1")
            async with GrpcTransport().connect(second.address) as conn:
                with pytest.raises(ExchangeRefused) as refused:
                    await conn.leave(impostor, TIMEOUT)
            assert refused.value.reason is Reason.NOT_A_NEIGHBOR
            assert second._peer_ids() == [first.node_id]
            drops = "tadlora_peer_drops_total"
            assert second.metrics.registry.get_sample_value(drops, {"cause": "leave"}) == 0  # present at 0 from start
            with caplog.at_level(logging.INFO, logger="tadlora"):
                await first.aclose()
            assert second._peer_ids() == []
            assert second.metrics.registry.get_sample_value(drops, {"cause": "leave"}) == 1
    assert f"peer {first.node_id} dropped: left (it said so as it stopped)" in caplog.text
    assert f"told 1 peer(s) that this node is leaving: {second.node_id}: dropped this node" in caplog.text
