"""The node transport: one suite run against gRPC on 127.0.0.1 and against the in-memory network.

Each test serves a `FakeNode` and calls it through `transport.connect`; gRPC-only tests at the end cover health
checking and reflection. No sleeps wait for readiness: servers are ready when `async with` enters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from nodeproc import free_ports
from tadlora.node import grpc_transport, wire
from tadlora.node.doctor import async_check_address
from tadlora.node.exchange_stream import _payload_messages
from tadlora.node.grpc_transport import GrpcTransport, PeerClient, RpcServer
from tadlora.node.limits import MAX_DETAIL_CHARS
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.pb_mapping import _info_from_pb, _info_to_pb
from tadlora.node.peer_checks import (
    _check_identity,
    _check_info,
    check_sane,
    fingerprint_differences,
    is_release,
    parse_fingerprint_parts,
)
from tadlora.node.peers import PeerManager
from tadlora.node.peerspec import PeersOption
from tadlora.node.responder import _Responder
from tadlora.node.rpc import (
    MAX_DEGREE,
    MAX_EXCHANGES_PER_CALLER,
    MAX_FETCHES_PER_CALLER,
    MAX_ROUND,
    MAX_TEXT_CHARS,
    NODE_ID_CHARS,
    NODE_SERVICE_NAME,
    PROTOCOL_VERSION,
    SAME_MODEL_FIX,
    BindError,
    CandidateStatus,
    ExchangeHeader,
    NeighborStatus,
    PeerConnection,
    PeerInfo,
    PeerTimeout,
    PeerUnavailable,
    Server,
    StatusInfo,
    Transport,
    check_compatible,
    node_id_problem,
)
from tadlora.node.wire import (
    ExchangeRefused,
    FactorSpec,
    Payload,
    PayloadError,
    Reason,
    digest,
    encode_factors,
)
from tadlora.v1 import node_pb2 as pb
from test_daemon import node_config

LISTEN = "127.0.0.1:0"
CLUSTER = "glue-sst2"
FINGERPRINT = "sha256:" + "ab" * 32
SCHEDULE = "tad T=5 p=1.0 max-neighbors=all"  # as `NodeConfig.schedule` spells it
# As `tadlora.adapter.fingerprint_parts` spells them
PARTS = "model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0 init=portable weights=#1a03c612"
TIMEOUT = 10.0  # s; generous: calls expected to succeed never come near it
SHORT_TIMEOUT = 0.3  # s; the caller's deadline in tests where the callee never answers
THREAD_EXIT_TIMEOUT = 2.0  # s; join() returns as soon as a finished thread has exited
PREFIX = "base_model.model.bert.encoder.layer.0.attention.self"

Factors = dict[str, torch.Tensor]


def lora_factors(seed: int, *, width: int = 16, rank: int = 4, dtype: torch.dtype = torch.float32) -> Factors:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{PREFIX}.{proj}.lora_{ab}.weight": torch.randn(shape, generator=gen).to(dtype)
        for proj in ("query", "value")
        for ab, shape in (("A", (rank, width)), ("B", (width, rank)))
    }


def assert_bit_exact(actual: Factors, expected: Factors) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype
        assert torch.equal(actual[key].view(torch.uint8), tensor.contiguous().view(torch.uint8)), key


class FakeNode:
    """A `NodeHandler` that records what it was given and misbehaves on request."""

    def __init__(self, node_id: str, factors: Factors, *, cluster: str = CLUSTER, round: int = 3) -> None:
        self.info = PeerInfo(
            node_id=node_id,
            cluster=cluster,
            fingerprint=FINGERPRINT,
            address=f"{node_id}.test:7000",
            round=round,
            degree=2,
            method="tad",
            schedule=SCHEDULE,
            fingerprint_parts=PARTS,
        )
        self.factors = factors
        self.spec: FactorSpec | None = FactorSpec.from_factors(factors)
        self.refusal: tuple[Reason, str] | None = None  # raised by both async_handshake and async_exchange
        self.crash: str | None = None  # message of a RuntimeError raised by async_exchange
        self.hold = False  # async_exchange waits until cancelled
        self.entered = asyncio.Event()  # set when async_exchange starts
        self.handshakes: list[PeerInfo] = []
        self.exchanges: list[tuple[ExchangeHeader, Factors]] = []
        self.cancelled = asyncio.Event()
        self.status_info = StatusInfo(node=self.info)
        self.left_out: list[tuple[str, int]] = []  # exchanges the server told us to stop waiting a commit for
        self.left_out_seen = asyncio.Event()
        self.commits: list[tuple[str, int, bool]] = []

    def local_info(self) -> PeerInfo:
        return self.info

    def expected_spec(self) -> FactorSpec | None:
        return self.spec

    def status(self) -> StatusInfo:
        return self.status_info

    async def async_handshake(self, remote: PeerInfo) -> None:
        self.handshakes.append(remote)
        if self.refusal is not None:
            raise ExchangeRefused(*self.refusal)

    async def async_exchange(self, header: ExchangeHeader, factors: Factors) -> Factors:
        self.exchanges.append((header, factors))
        self.entered.set()
        if self.crash is not None:
            raise RuntimeError(self.crash)
        if self.refusal is not None:
            raise ExchangeRefused(*self.refusal)
        if self.hold:
            try:
                await asyncio.Event().wait()
            finally:
                self.cancelled.set()
        return self.factors

    async def async_exchange_refused(self, caller: str, r: int) -> None:
        self.left_out.append((caller, r))
        self.left_out_seen.set()

    async def async_commit(self, caller: str, r: int, accept: bool) -> None:
        self.commits.append((caller, r, accept))

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, Factors]:
        self.handshakes.append(remote)
        self.entered.set()
        if self.refusal is not None:
            raise ExchangeRefused(*self.refusal)
        return self.info.round, self.factors


def header_of(node: FakeNode, round: int | None = None) -> ExchangeHeader:
    return ExchangeHeader.from_info(node.info, at_round=round)


@pytest.fixture(autouse=True)
def no_thread_outlives_the_test(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    # grpc.aio stops its poller thread once its last channel and server objects are finalized, and does not join
    # it. Captured log records and exceptions keep tracebacks whose frames hold such objects: drop the records,
    # collect the cycles, then give the thread time to exit.
    for when in ("setup", "call"):
        caplog.get_records(when).clear()
    gc.collect()
    new = [t for t in threading.enumerate() if t not in before]
    for thread in new:
        thread.join(THREAD_EXIT_TIMEOUT)
    leftover = [t for t in new if t.is_alive()]
    assert not leftover, f"threads left running: {leftover}"


@pytest.fixture(params=["grpc", "memory"])
def transport(request: pytest.FixtureRequest) -> Transport:
    chosen: Transport = GrpcTransport() if request.param == "grpc" else InMemoryNetwork()
    return chosen


@contextlib.asynccontextmanager
async def serving(
    transport: Transport, node: FakeNode, *, max_payload_bytes: int | None = None
) -> AsyncIterator[tuple[Server, PeerConnection]]:
    """Serve `node` on loopback and connect to it; both are closed afterwards, whatever happens."""
    async with (
        transport.serve(node, LISTEN, max_payload_bytes=max_payload_bytes) as server,
        transport.connect(server.address) as client,
    ):
        yield server, client


@pytest.fixture
def alice() -> FakeNode:
    return FakeNode("alice", lora_factors(1))


@pytest.fixture
def bob() -> FakeNode:
    return FakeNode("bob", lora_factors(2))


# ---------------------------------------------------------------------------------------- handshake


@pytest.mark.asyncio
async def test_accepted_handshake_returns_the_callee_info(transport: Transport, alice: FakeNode, bob: FakeNode) -> None:
    async with serving(transport, bob) as (_, client):
        remote = await client.handshake(alice.info, TIMEOUT)
    assert remote == bob.info
    assert bob.handshakes == [alice.info]  # every PeerInfo field crossed intact
    assert remote.protocol_version == PROTOCOL_VERSION


@pytest.mark.asyncio
async def test_refused_handshake_carries_the_handler_reason_and_detail(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.refusal = (Reason.NOT_A_NEIGHBOR, "alice is not in bob's neighbourhood")
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.handshake(alice.info, TIMEOUT)
    assert refused.value.reason is Reason.NOT_A_NEIGHBOR
    assert refused.value.detail == "alice is not in bob's neighbourhood"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"cluster": "other-cluster"}, Reason.CLUSTER_MISMATCH),
        ({"fingerprint": "sha256:" + "cd" * 32}, Reason.FINGERPRINT_MISMATCH),
        ({"protocol_version": PROTOCOL_VERSION + 1}, Reason.PROTOCOL_MISMATCH),
        ({"schedule": "lora T=none p=1.0 max-neighbors=all"}, Reason.SCHEDULE_MISMATCH),
    ],
    ids=["cluster", "fingerprint", "protocol", "schedule"],
)
async def test_incompatible_peers_are_refused_before_the_handler_sees_them(
    transport: Transport, alice: FakeNode, bob: FakeNode, change: dict[str, object], reason: Reason
) -> None:
    stranger = PeerInfo(**{**alice.info.__dict__, **change})
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.handshake(stranger, TIMEOUT)
    assert refused.value.reason is reason
    assert bob.handshakes == []


@pytest.mark.asyncio
async def test_a_peer_of_another_schedule_is_refused_naming_both_and_an_older_peer_without_one_is_accepted(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    """Handshake and exchange header alike: another method, T, p or degree cap would mix or wait silently, so it is
    refused with both schedules and the flags to align. An empty schedule is an older node's, which sends none."""
    other = "lora T=none p=0.5 max-neighbors=all"
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as at_handshake:
            await client.handshake(dataclasses.replace(alice.info, schedule=other), TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_exchange:  # alice restarted under its id, once verified
            await client.exchange(dataclasses.replace(header_of(alice), schedule=other), alice.factors, TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_fetch:
            await client.fetch(dataclasses.replace(alice.info, schedule=other), TIMEOUT)
        older = dataclasses.replace(alice.info, schedule="")
        assert (await client.handshake(older, TIMEOUT)).schedule == SCHEDULE
        result = await client.exchange(dataclasses.replace(header_of(alice), schedule=""), alice.factors, TIMEOUT)
    for refused in (at_handshake, at_exchange, at_fetch):
        assert refused.value.reason is Reason.SCHEDULE_MISMATCH
        assert f"'alice' runs {other!r}, 'bob' runs {SCHEDULE!r}" in refused.value.detail
        assert "--method, --switch-interval, --link-prob and --max-neighbors" in refused.value.detail
    assert bob.handshakes == [older]  # the refused ones never reached the handler
    assert [h.schedule for h, _ in bob.exchanges] == [""]
    assert result.peer.schedule == SCHEDULE


def test_a_peer_of_another_protocol_is_told_to_upgrade_the_older_node() -> None:
    """A protocol refusal says what to do, as those for another model or schedule do, not only the two versions."""
    ours = PeerInfo(node_id="bob", cluster="c", fingerprint="f", address="127.0.0.1:1")
    older = dataclasses.replace(ours, node_id="alice", protocol_version=PROTOCOL_VERSION - 1)
    with pytest.raises(ExchangeRefused) as refused:
        check_compatible(ours, older)
    assert refused.value.reason is Reason.PROTOCOL_MISMATCH
    assert refused.value.detail == (
        f"'alice' speaks protocol {PROTOCOL_VERSION - 1}, 'bob' speaks protocol {PROTOCOL_VERSION}: upgrade the node "
        "of the older protocol: every node of a cluster must speak the same one"
    )


def test_a_protocol_refusal_names_the_release_each_node_runs_where_it_says() -> None:
    """Which release to install is what the operator of the older node needs; a node older than the field says
    none, and is named by its protocol alone."""
    ours = PeerInfo(node_id="bob", cluster="c", fingerprint="f", address="127.0.0.1:1", release="0.3.0")
    newer = dataclasses.replace(ours, node_id="alice", protocol_version=PROTOCOL_VERSION + 1, release="0.4.0rc1")
    with pytest.raises(ExchangeRefused) as refused:
        check_compatible(ours, newer)
    assert refused.value.detail.startswith(
        f"'alice' speaks protocol {PROTOCOL_VERSION + 1} (tadlora 0.4.0rc1), 'bob' speaks protocol {PROTOCOL_VERSION} "
        "(tadlora 0.3.0): upgrade the node of the older protocol"
    )
    with pytest.raises(ExchangeRefused) as unsaid:
        check_compatible(ours, dataclasses.replace(newer, release=""))
    assert unsaid.value.detail.startswith(f"'alice' speaks protocol {PROTOCOL_VERSION + 1}, 'bob' speaks protocol")


@pytest.mark.asyncio
@pytest.mark.parametrize("release", ["0.1\n0", "0.1.0 (evil)", "\x1b[31m0.1.0", "1" * 65], ids=repr)
async def test_a_release_that_is_no_version_is_refused_before_the_handler_sees_it(
    transport: Transport, alice: FakeNode, bob: FakeNode, release: str
) -> None:
    """What a peer says it runs is logged and shown in status: one with a line break or a terminal escape in it is
    refused, as an id off its syntax is."""
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.handshake(dataclasses.replace(alice.info, release=release), TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_fetch:
            await client.fetch(dataclasses.replace(alice.info, release=release), TIMEOUT)
        for fine in ("", "0.1.0", "2!1.0.post1+local.7", "1.0rc1.dev3"):  # PEP 440, and an older node's nothing
            await client.handshake(dataclasses.replace(alice.info, release=fine), TIMEOUT)
    for error in (refused, at_fetch):
        assert error.value.reason is Reason.BAD_PAYLOAD
        assert "runs release" in error.value.detail and "not a version" in error.value.detail
    assert [h.release for h in bob.handshakes] == ["", "0.1.0", "2!1.0.post1+local.7", "1.0rc1.dev3"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "address",
    ["unix:/run/containerd/containerd.sock", "127.0.0.1:99999", "dns://10.0.0.53/evil.example:7070",
     "ipv4:10.0.0.1:80,10.0.0.2:80", "[::1", "10.0.0.5", "10.0.0.5:0", "a b:7070",
     # HOST:PORT, but of no one host, or of an interface of the sender's (and a zone may hold any text)
     "0.0.0.0:7070", "[::]:7070", "224.0.0.251:5353", "[ff02::1]:7070", "255.255.255.255:7070",
     "[fe80::1%eth0]:7070", "[::1%x,ipv4:127.0.0.1:22]:7070"],
    ids=repr,
)  # fmt: skip
async def test_an_address_that_is_no_host_and_port_is_refused_both_ways_before_anyone_dials_it(
    transport: Transport, alice: FakeNode, bob: FakeNode, address: str
) -> None:
    """A node dials back the address an inbound peer gives, and gRPC takes more than HOST:PORT as a target: a unix
    socket of this host, another DNS resolver, a list of addresses, and a port over 65535 as itself less 65536 (it
    dialled 34463 for 99999). So an address that is no HOST:PORT is refused in every call that carries one, and in
    a handshake's reply, before the handler (and with it the peer table) sees it."""
    bad = dataclasses.replace(alice.info, address=address)
    async with serving(transport, bob) as (_, client):
        refusals = []
        for call in (client.handshake, client.fetch, client.leave):
            with pytest.raises(ExchangeRefused) as refused:
                await call(bad, TIMEOUT)
            refusals.append(refused.value)
        for fine in ("", "10.0.0.5:7070", "[fd00::5]:7070", "node-5.lab:7070", "localhost:1"):
            await client.handshake(dataclasses.replace(alice.info, address=fine), TIMEOUT)
        bob.info = dataclasses.replace(bob.info, address=address)  # the callee's own claim, in its reply
        with pytest.raises(ExchangeRefused) as in_reply:
            await client.handshake(alice.info, TIMEOUT)
    for error in [*refusals, in_reply.value]:
        assert error.reason is Reason.BAD_PAYLOAD
        assert f"says it is at {address!r}, which is no address to dial: " in error.detail
    assert "handshake reply" in in_reply.value.detail
    assert [h.address for h in bob.handshakes] == ["", "10.0.0.5:7070", "[fd00::5]:7070", "node-5.lab:7070",
                                                   "localhost:1", alice.info.address]  # fmt: skip


@pytest.mark.asyncio
async def test_a_peer_verified_on_another_release_is_logged_with_it_one_on_ours_without(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a rolling upgrade the verified line says which peers still run the old code, and says nothing more of
    those that run this node's."""

    class Conn:
        async def aclose(self) -> None:
            pass

    me = PeerInfo(node_id="me", cluster="c", fingerprint="f", address="127.0.0.1:1", release="0.2.0")
    pm = PeerManager(InMemoryNetwork(), lambda: me, list, lambda: None)
    caplog.set_level(logging.INFO, logger="tadlora.peers")
    for node_id, release in (("same", "0.2.0"), ("old", "0.1.0"), ("older", "")):
        info = dataclasses.replace(me, node_id=node_id, address=f"127.0.0.1:{len(node_id)}", release=release)
        await pm.add(info, Conn(), "static")  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records if "verified" in r.getMessage()] == [
        "peer same verified at 127.0.0.1:4 (static)",
        "peer old verified at 127.0.0.1:3 (static; it runs tadlora 0.1.0, this node 0.2.0)",
        "peer older verified at 127.0.0.1:5 (static; it runs a tadlora too old to say, this node 0.2.0)",
    ]
    await pm.aclose()


@pytest.mark.asyncio
async def test_a_scan_tries_at_most_64_candidates_those_that_failed_least_first() -> None:
    """Every candidate a scan was due to try was dialled at once: a flood of adverts or a DNS answer of thousands of
    addresses opened as many connections together. A scan now tries `MAX_SCAN_HANDSHAKES`, those that have failed
    least first and, among them, those listed last; the next scan the next ones: a node that appears among 300 dead
    addresses is tried in the scan after it appears."""
    from tadlora.node import peers as peers_module

    in_flight = most = 0
    dialled: list[str] = []

    class Conn:
        def __init__(self, address: str) -> None:
            self.address = address

        async def handshake(self, info: PeerInfo, timeout: float) -> PeerInfo:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            dialled.append(self.address)
            try:
                await asyncio.sleep(0.01)
            finally:
                in_flight -= 1
            raise PeerUnavailable(self.address, "nothing there")

        async def aclose(self) -> None:
            pass

    class Dialler:
        def connect(self, address: str, node_id: str | None = None) -> Conn:
            return Conn(address)

    me = PeerInfo(node_id="me", cluster="c", fingerprint="f", address="10.0.0.1:7070")
    dead = [f"10.1.{i // 200}.{i % 200 + 1}:7070" for i in range(300)]
    listed = [(a, a, None) for a in dead]
    pm = PeerManager(Dialler(), lambda: me, lambda: listed, lambda: None)  # type: ignore[arg-type]
    await pm.scan()  # 64 of the 300, all failing
    first = set(dialled)
    listed.append(("10.2.0.1:7070", "10.2.0.1:7070", None))  # a new node appears
    dialled.clear()
    await pm.scan()  # the next 64 that have never failed, the new one among them
    await pm.aclose()
    assert len(first) == 64 and most == peers_module.MAX_SCAN_HANDSHAKES == 64
    assert len(dialled) == 64 and "10.2.0.1:7070" in dialled and not first & set(dialled)


@pytest.mark.asyncio
async def test_a_node_keeps_at_most_max_peers_and_refuses_or_backs_off_a_new_one_past_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without TLS anyone who reaches a node may handshake under as many ids as it likes, and each verified peer
    was kept (a connection, its info, its place in every round's overlay) for as long as it answered. Past
    `MAX_PEERS` a new one is refused NOT_A_NEIGHBOR when it calls, and backed off when this node calls it; the
    peers it has stay, and one of them may handshake again (its round refreshed)."""
    from tadlora.node import peers as peers_module

    monkeypatch.setattr(peers_module, "MAX_PEERS", 3)

    class Conn:
        def __init__(self, answers: PeerInfo | None = None) -> None:
            self.answers = answers

        async def handshake(self, info: PeerInfo, timeout: float) -> PeerInfo:
            assert self.answers is not None
            return self.answers

        async def aclose(self) -> None:
            pass

    me = PeerInfo(node_id="me", cluster="c", fingerprint="f", address="10.0.0.1:7070")
    other = lambda i: dataclasses.replace(me, node_id=f"p{i}", address=f"10.0.0.{i + 2}:7070")  # noqa: E731

    class Dialler:
        def connect(self, address: str, node_id: str | None = None) -> Conn:
            return Conn(other(9))  # the static candidate below answers as p9

    pm = PeerManager(Dialler(), lambda: me, lambda: [("10.0.0.11:7070", "10.0.0.11:7070", None)], lambda: None)  # type: ignore[arg-type]
    for i in range(3):
        await pm.add(other(i), Conn(), "inbound")  # type: ignore[arg-type]
    with pytest.raises(ExchangeRefused) as refused:
        await pm.add(other(3), Conn(), "inbound")  # type: ignore[arg-type]
    assert refused.value.reason is Reason.NOT_A_NEIGHBOR and "the most it keeps" in refused.value.detail
    await pm.add(dataclasses.replace(other(1), round=7), Conn(), "inbound")  # type: ignore[arg-type]
    await pm.scan()  # dials the static candidate, which answers: no room, backed off, nothing raised
    [candidate] = pm.unreachable()
    kept = sorted(pm.peers), pm.peers["p1"].info.round
    await pm.aclose()
    assert kept == (["p0", "p1", "p2"], 7)
    assert candidate.failures == 1 and candidate.reason == "this node has 3 peers, the most it keeps", candidate


def test_every_peer_info_field_crosses_the_wire_and_an_older_node_s_info_has_no_parts_nor_release() -> None:
    info = PeerInfo(
        node_id="n1",
        cluster="c",
        fingerprint="f",
        address="a:1",
        round=2,
        degree=3,
        method="tad",
        insecure=False,
        protocol_version=7,
        last_mixed_round=2,
        schedule="s",
        fingerprint_parts="seed=1",
        release="9.9.9",
    )
    defaults = PeerInfo(node_id="", cluster="", fingerprint="", address="")
    assert all(getattr(info, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(PeerInfo)[4:])
    assert _info_from_pb(pb.PeerInfo.FromString(_info_to_pb(info).SerializeToString())) == info
    older = _info_to_pb(info)
    older.ClearField("fingerprint_parts")  # what a node from before field 12 sends
    older.ClearField("release")  # and from before field 13
    received = _info_from_pb(pb.PeerInfo.FromString(older.SerializeToString()))
    assert (received.fingerprint_parts, received.release) == ("", "")


@pytest.mark.asyncio
async def test_a_fingerprint_refusal_names_the_parts_that_differ_with_each_node_s_value(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    """A node started with another --seed (or --init, --lora-r, model, dataset) was refused with two hashes that
    named nothing: the refusal names each part that differs, with both values, at the handshake and at a fetch."""
    seed_1 = PARTS.replace("seed=0", "seed=1")
    other_seed = dataclasses.replace(alice.info, fingerprint="cd" * 16, fingerprint_parts=seed_1)
    torch_init = seed_1.replace("init=portable", "init=torch")
    other_init = dataclasses.replace(other_seed, fingerprint_parts=torch_init)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as at_handshake:
            await client.handshake(other_seed, TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_fetch:
            await client.fetch(other_seed, TIMEOUT)
        with pytest.raises(ExchangeRefused) as two_parts:
            await client.handshake(other_init, TIMEOUT)
    for refused in (at_handshake, at_fetch, two_parts):
        assert refused.value.reason is Reason.FINGERPRINT_MISMATCH
        # The fingerprints and the fix are said as before.
        assert refused.value.detail.startswith(f"'alice' has model fingerprint {'cd' * 8!r}, 'bob' has model "
                                               f"fingerprint {FINGERPRINT[:16]!r}; "), refused.value.detail  # fmt: skip
        assert refused.value.detail.endswith(": " + SAME_MODEL_FIX), refused.value.detail
    for refused in (at_handshake, at_fetch):
        assert "; 'alice' and 'bob' differ in seed ('alice' 1, 'bob' 0): " in refused.value.detail
    assert "; 'alice' and 'bob' differ in seed ('alice' 1, 'bob' 0) and init ('alice' torch, 'bob' portable): " \
        in two_parts.value.detail  # fmt: skip
    assert bob.handshakes == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "theirs",
    ["", "seed=1 seed=1", "seed 1", "seed=one\ntwo", "model=m\x1b[31m"],
    ids=["older node", "a key twice", "no '='", "a line break", "a control character"],
)
async def test_a_fingerprint_refusal_without_both_nodes_parts_says_the_fingerprints_alone(
    transport: Transport, alice: FakeNode, bob: FakeNode, theirs: str
) -> None:
    """From a node older than the parts (or one sending something else), as before them: the two fingerprints and
    the fix, and nothing of what it sent. An exchange header carries no parts either."""
    stranger = dataclasses.replace(alice.info, fingerprint="cd" * 16, fingerprint_parts=theirs)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as at_handshake:
            await client.handshake(stranger, TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_exchange:
            await client.exchange(ExchangeHeader.from_info(stranger), alice.factors, TIMEOUT)
    expected = (f"'alice' has model fingerprint {'cd' * 8!r}, 'bob' has model fingerprint {FINGERPRINT[:16]!r}: "
                f"{SAME_MODEL_FIX}")  # fmt: skip
    assert at_handshake.value.detail == at_exchange.value.detail == expected


def test_parts_that_differ_are_named_in_our_order_and_parts_one_side_lacks_are_passed_over() -> None:
    ours = "model=m labels=a,b lora=r8/a16/d0/q+v seed=0 init=portable weights=#00000000 tokenizer=#11111111"
    theirs = "model=n labels=a,b lora=r4/a16/d0/q+v seed=0 init=torch weights=#22222222 future=x"
    assert fingerprint_differences(theirs, ours, "'x'", "'y'") == (
        "model ('x' n, 'y' m), lora ('x' r4/a16/d0/q+v, 'y' r8/a16/d0/q+v), init ('x' torch, 'y' portable) and "
        "weights ('x' #22222222, 'y' #00000000)"
    )
    assert fingerprint_differences(ours, ours, "'x'", "'y'") == ""  # equal parts, other fingerprints: a 32-bit clash
    assert fingerprint_differences("", ours, "'x'", "'y'") == fingerprint_differences(ours, "", "'x'", "'y'") == ""
    assert parse_fingerprint_parts(ours) == {
        "model": "m", "labels": "a,b", "lora": "r8/a16/d0/q+v", "seed": "0", "init": "portable",
        "weights": "#00000000", "tokenizer": "#11111111",
    }  # fmt: skip
    for bad in ("", " seed=0", "seed=0 ", "Seed=0", "seed=", "=0", "seed=0  init=torch", "seed=\u00e9"):
        assert parse_fingerprint_parts(bad) is None, bad


def test_parts_whose_values_would_make_a_long_refusal_are_named_without_them() -> None:
    # Every part of one node differs from the other's, each value long: listing them would push the fix, said last,
    # past what the refused node keeps of a detail.
    ours = " ".join(f"{key}={key[0] * 30}" for key in ("model", "labels", "lora", "seed", "init", "weights"))
    theirs = ours.replace("=", "=x")
    named = fingerprint_differences(theirs, ours, "'n1'", "'n0'")
    assert named == "model, labels, lora, seed, init and weights"
    # The longest refusal for another fingerprint (ids of 63 chars, every part differing at full length) keeps its
    # fix within what the refused node keeps of a detail.
    mine = PeerInfo(node_id="a" * 63, cluster="c", fingerprint="f", address="x:1", fingerprint_parts=ours[:250])
    other = dataclasses.replace(mine, node_id="b" * 63, fingerprint="g", fingerprint_parts=theirs[:MAX_TEXT_CHARS])
    with pytest.raises(ExchangeRefused) as refused:
        check_compatible(mine, other)
    assert refused.value.detail.endswith(SAME_MODEL_FIX) and len(refused.value.detail) <= MAX_DETAIL_CHARS
    assert " differ in model, labels, lora, seed, init and weights: " in refused.value.detail


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("field", "theirs", "words"),
    [
        ("cluster", "other-cluster", "is in cluster"),
        ("fingerprint", "sha256:" + "cd" * 32, "has model fingerprint"),
        ("protocol_version", PROTOCOL_VERSION + 1, "speaks protocol"),
        ("schedule", "lora T=none p=0.5 max-neighbors=all", "runs"),
    ],
    ids=["cluster", "fingerprint", "protocol", "schedule"],
)
async def test_a_refusal_for_another_cluster_model_or_schedule_says_which_node_has_which_read_at_either_end(
    transport: Transport, alice: FakeNode, bob: FakeNode, field: str, theirs: object, words: str
) -> None:
    """The refused caller logs the callee's detail as the reason it was refused. Written as "peer runs X, this node
    Y", it told the caller that it ran the callee's schedule (a node restarted with another --method read, in its
    own log, that it ran the method it had just left): each value is named with the node that has it."""
    stranger = dataclasses.replace(alice.info, **{field: theirs})
    ours = repr(getattr(bob.info, field)) if field != "fingerprint" else repr(FINGERPRINT[:16])
    mine = repr(theirs) if field != "fingerprint" else repr(str(theirs)[:16])
    if field == "protocol_version":
        ours, mine = str(PROTOCOL_VERSION), str(theirs)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as at_handshake:
            await client.handshake(stranger, TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_fetch:
            await client.fetch(stranger, TIMEOUT)
        if field != "protocol_version":  # an exchange header's protocol is the one this code speaks
            with pytest.raises(ExchangeRefused) as at_exchange:
                await client.exchange(ExchangeHeader.from_info(stranger), alice.factors, TIMEOUT)
            assert f"'alice' {words} {mine}" in at_exchange.value.detail, at_exchange.value.detail
            assert f"'bob' {words} {ours}" in at_exchange.value.detail, at_exchange.value.detail
    for refused in (at_handshake, at_fetch):
        assert f"'alice' {words} {mine}" in refused.value.detail, refused.value.detail
        assert f"'bob' {words} {ours}" in refused.value.detail, refused.value.detail
        assert "this node" not in refused.value.detail  # whose node that is depends on which log it is read in


@pytest.mark.asyncio
async def test_a_fingerprint_refusal_says_what_the_fingerprint_covers_and_a_schedule_that_differs_too(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    """A node started with another --seed and another --method was refused for the fingerprint alone, a hash that
    names nothing: the operator fixed the seed, restarted, and only then learned of the method."""
    other = "lora T=none p=0.5 max-neighbors=all"
    stranger = dataclasses.replace(alice.info, fingerprint="sha256:" + "cd" * 32, schedule=other)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as both:
            await client.handshake(stranger, TIMEOUT)
        with pytest.raises(ExchangeRefused) as fingerprint_only:
            await client.handshake(dataclasses.replace(stranger, schedule=SCHEDULE), TIMEOUT)
    assert both.value.reason is fingerprint_only.value.reason is Reason.FINGERPRINT_MISMATCH
    for refused in (both, fingerprint_only):
        assert "--lora-r" in refused.value.detail and "--seed" in refused.value.detail, refused.value.detail
    assert f"'alice' runs {other!r}, 'bob' runs {SCHEDULE!r}" in both.value.detail, both.value.detail
    assert "--switch-interval" in both.value.detail
    assert " runs " not in fingerprint_only.value.detail and "--switch-interval" not in fingerprint_only.value.detail


@pytest.mark.asyncio
async def test_a_schedule_over_the_text_cap_is_refused_like_any_other_text_field(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    huge = "x" * (MAX_TEXT_CHARS + 1)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as at_handshake:
            await client.handshake(dataclasses.replace(alice.info, schedule=huge), TIMEOUT)
        with pytest.raises(ExchangeRefused) as at_exchange:
            await client.exchange(dataclasses.replace(header_of(alice), schedule=huge), alice.factors, TIMEOUT)
    for refused in (at_handshake, at_exchange):
        assert refused.value.reason is Reason.BAD_PAYLOAD and "text field" in refused.value.detail
    assert bob.handshakes == [] and bob.exchanges == []


@pytest.mark.asyncio
async def test_a_peer_claiming_to_have_mixed_a_round_it_has_not_reached_is_refused_both_ways(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    # last_mixed_round is 1 + the last round mixed: a node in round r says at most r + 1 (it closed round r and
    # has not moved on yet). Catch-up adopts the biggest claim, so a bigger one would pull every node with it.
    bob.info = PeerInfo(**{**bob.info.__dict__, "round": 3, "last_mixed_round": 4})
    async with serving(transport, bob) as (_, client):
        assert (await client.handshake(alice.info, TIMEOUT)).last_mixed_round == 4
        bob.info = PeerInfo(**{**bob.info.__dict__, "last_mixed_round": 10**12})
        with pytest.raises(ExchangeRefused) as refused:
            await client.handshake(alice.info, TIMEOUT)  # bob's reply is refused
        assert refused.value.reason is Reason.ROUND_MISMATCH
        bob.info = PeerInfo(**{**bob.info.__dict__, "last_mixed_round": 4})
        liar = PeerInfo(**{**alice.info.__dict__, "last_mixed_round": alice.info.round + 2})
        with pytest.raises(ExchangeRefused) as refused:
            await client.handshake(liar, TIMEOUT)  # alice's request is refused
        assert refused.value.reason is Reason.ROUND_MISMATCH
    assert bob.handshakes == [alice.info, alice.info]  # the liar never reached the handler


@pytest.mark.asyncio
async def test_a_connection_made_for_one_node_refuses_the_answers_of_another(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    """An address can reach another node than the one it was dialled for (a peer that announced 0.0.0.0 reaches
    the caller's own host): its handshake, exchange and fetch replies are refused, never taken for the peer's."""
    async with transport.serve(bob, LISTEN) as server:
        async with transport.connect(server.address, node_id="carol") as client:
            calls = {
                "handshake": client.handshake(alice.info, TIMEOUT),
                "exchange": client.exchange(header_of(alice), alice.factors, TIMEOUT),
                "fetch": client.fetch(alice.info, TIMEOUT),
            }
            for what, call in calls.items():
                with pytest.raises(ExchangeRefused) as refused:
                    await call
                assert refused.value.reason is Reason.IDENTITY_MISMATCH, what
                assert "'bob'" in refused.value.detail and "'carol'" in refused.value.detail, what
        async with transport.connect(server.address, node_id="bob") as client:
            assert (await client.handshake(alice.info, TIMEOUT)).node_id == "bob"
            assert (await client.exchange(header_of(alice), alice.factors, TIMEOUT)).peer.node_id == "bob"


async def assert_every_call_refused_for_its_spelling(client: PeerConnection, caller: FakeNode) -> None:
    """Handshake, exchange and fetch from ``caller`` over ``client`` are each refused for a node id's spelling."""
    for what, call in {
        "handshake": client.handshake(caller.info, TIMEOUT),
        "exchange": client.exchange(header_of(caller), caller.factors, TIMEOUT),
        "fetch": client.fetch(caller.info, TIMEOUT),
    }.items():
        with pytest.raises(ExchangeRefused) as refused:
            await call
        assert refused.value.reason is Reason.BAD_PAYLOAD and "lowercase" in refused.value.detail, what


@pytest.mark.asyncio
@pytest.mark.parametrize("spelling", ["Bob", "BOB", "bob.", "bob\nforged"])
async def test_a_node_id_in_another_spelling_is_refused_from_callers_and_callees(
    transport: Transport, alice: FakeNode, bob: FakeNode, spelling: str
) -> None:
    """TLS accepts "bob"'s certificate for "BOB" or "bob.", so a node answering or calling under such an id could
    pass as a second node with one certificate; every id from the network must be in its one spelling."""
    caller = FakeNode(spelling, lora_factors(1))
    async with serving(transport, bob) as (_, client):
        await assert_every_call_refused_for_its_spelling(client, caller)
        with pytest.raises(ExchangeRefused) as refused:  # a Commit names its caller too
            await client.commit(header_of(caller), True, TIMEOUT)
        assert refused.value.reason is Reason.BAD_PAYLOAD and "lowercase" in refused.value.detail
    assert bob.handshakes == [] and bob.exchanges == [] and bob.commits == []
    callee = FakeNode(spelling, lora_factors(2))
    async with (
        transport.serve(callee, LISTEN) as server,
        transport.connect(server.address, node_id=spelling) as client,  # dialled for that very id
    ):
        await assert_every_call_refused_for_its_spelling(client, alice)


@pytest.mark.parametrize(
    ("node_id", "ok"),
    [
        ("a", True), ("7", True), ("lab_box-0", True), ("n-", True), ("n" * NODE_ID_CHARS, True),
        ("", False), ("n" * (NODE_ID_CHARS + 1), False), ("-n", False), ("_n", False), ("node-A", False),
        ("bOB", False), ("a.b", False), ("a b", False), ("n\u00e9", False), ("n\n", False),
    ],
)  # fmt: skip
def test_a_node_id_is_1_to_63_lowercase_letters_digits_underscores_or_hyphens_starting_with_a_letter_or_digit(
    node_id: str, ok: bool
) -> None:
    """The one spelling `node_id_problem` documents. Uppercase past the first character ("node-A") would let one
    certificate, which TLS matches ignoring case, pass as two nodes; the spelling tests above only vary the first."""
    assert (node_id_problem(node_id) is None) is ok, node_id


def test_a_peers_self_description_is_refused_just_over_each_cap_and_taken_at_it() -> None:
    check_sane("peer", round=MAX_ROUND, degree=MAX_DEGREE, texts=["x" * MAX_TEXT_CHARS])
    for changes, reason in [
        ({"round": MAX_ROUND + 1}, Reason.ROUND_MISMATCH),
        ({"degree": MAX_DEGREE + 1}, Reason.BAD_PAYLOAD),
        ({"texts": ["", "x" * (MAX_TEXT_CHARS + 1)]}, Reason.BAD_PAYLOAD),
    ]:
        fields: dict[str, Any] = {"round": MAX_ROUND, "degree": MAX_DEGREE, "texts": ["x"], **changes}
        with pytest.raises(ExchangeRefused) as refused:
            check_sane("peer", **fields)
        assert refused.value.reason is reason, changes


def test_a_release_is_up_to_64_characters_and_has_no_spaces() -> None:
    assert is_release("1" * 64)
    assert not is_release("1" * 65)
    assert not is_release("0.1.0 rc1")  # logged and shown in status: a space would split it


@pytest.mark.parametrize("field", ["cluster", "fingerprint", "method", "schedule", "fingerprint_parts"])
def test_a_peers_info_with_any_text_field_over_the_cap_is_refused_as_bad_payload(field: str) -> None:
    """Each text a peer says of itself is stored, logged or shown in status: over `MAX_TEXT_CHARS` it is refused
    before anything else is made of it, whichever field it is."""
    info = PeerInfo(node_id="alice", cluster=CLUSTER, fingerprint=FINGERPRINT, address="alice.test:7000")
    _check_info(info, "peer")
    with pytest.raises(ExchangeRefused, match="text field of 257 chars") as refused:
        _check_info(dataclasses.replace(info, **{field: "x" * (MAX_TEXT_CHARS + 1)}), "peer")
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_a_certificate_that_names_no_node_id_vouches_for_none() -> None:
    """Identity "" is a certificate whose common name is not among its DNS names: it is no licence to speak as any
    node, unlike None (no TLS), which checks nothing."""
    _check_identity("alice", None)
    _check_identity("alice", "alice")
    for identity in ("", "bob"):
        with pytest.raises(ExchangeRefused) as refused:
            _check_identity("alice", identity)
        assert refused.value.reason is Reason.IDENTITY_MISMATCH, identity
    assert "no node id" in refused.value.detail or "'bob'" in refused.value.detail


@pytest.mark.parametrize("field", ["round", "degree", "protocol_version", "last_mixed_round"])
def test_peer_info_refuses_a_negative_count(field: str) -> None:
    fields: dict[str, Any] = {"node_id": "a", "cluster": CLUSTER, "fingerprint": FINGERPRINT, "address": ""}
    with pytest.raises(ValueError, match=">= 0"):
        PeerInfo(**fields, **{field: -1})


# ----------------------------------------------------------------------------------------- exchange


@pytest.mark.asyncio
async def test_exchange_is_push_pull_and_bit_exact_both_ways(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    alice.factors = lora_factors(1, dtype=torch.bfloat16)
    bob.factors = lora_factors(2, dtype=torch.bfloat16)
    bob.spec = FactorSpec.from_factors(alice.factors)
    async with serving(transport, bob) as (_, client):
        result = await client.exchange(
            header_of(alice, 5), alice.factors, TIMEOUT, FactorSpec.from_factors(bob.factors)
        )

    [(seen_header, seen_factors)] = bob.exchanges
    assert seen_header == header_of(alice, 5)
    assert_bit_exact(seen_factors, alice.factors)
    assert result.peer == header_of(bob, 5)  # the callee answers for the round it was asked about
    assert_bit_exact(result.factors, bob.factors)
    # payload bytes each way, without the framing: what the daemon's byte counters and round records report
    assert (result.bytes_sent, result.bytes_received) == (
        len(encode_factors(alice.factors)),
        len(encode_factors(bob.factors)),
    )
    assert 0 < result.elapsed_s < TIMEOUT


@pytest.mark.asyncio
async def test_fetch_pulls_the_callee_round_and_factors_without_sending_any(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    async with transport.serve(bob, "127.0.0.1:0") as server, transport.connect(server.address) as client:
        result = await client.fetch(alice.info, timeout=5.0, expected=alice.spec)
        assert result.peer.node_id == "bob" and result.peer.round == bob.info.round
        assert_bit_exact(result.factors, bob.factors)
        assert result.bytes_sent == 0 and not bob.exchanges
        bob.refusal = (Reason.SHUTTING_DOWN, "stopping")
        with pytest.raises(ExchangeRefused) as refused:
            await client.fetch(alice.info, timeout=5.0)
        assert refused.value.reason is Reason.SHUTTING_DOWN


@pytest.mark.asyncio
async def test_payloads_far_over_the_grpc_message_limit_stream_through(transport: Transport) -> None:
    big = {f"{PREFIX}.query.lora_A.weight": torch.randn(5_000_000)}  # 20 MB, five times gRPC's 4 MiB
    alice = FakeNode("alice", big)
    bob = FakeNode("bob", {k: v + 1 for k, v in big.items()})
    async with serving(transport, bob) as (_, client):
        result = await client.exchange(header_of(alice), big, TIMEOUT, FactorSpec.from_factors(big))
    assert result.bytes_sent > 4 * (1 << 20)
    assert_bit_exact(bob.exchanges[0][1], big)
    assert_bit_exact(result.factors, bob.factors)


@pytest.mark.asyncio
async def test_an_encoded_payload_is_sent_as_it_is_by_either_end_never_encoded_again(
    transport: Transport, alice: FakeNode, bob: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = Payload.encode(alice.factors), Payload.encode(bob.factors)
    answer = bob.factors
    bob.factors = theirs  # type: ignore[assignment]  # a handler may answer with a Payload
    monkeypatch.setattr(wire, "encode_factors", lambda *_: pytest.fail("encoded again"))
    async with serving(transport, bob) as (_, client):
        result = await client.exchange(header_of(alice), ours, TIMEOUT, FactorSpec.from_factors(answer))
    assert_bit_exact(bob.exchanges[0][1], alice.factors)
    assert_bit_exact(result.factors, answer)
    assert (result.bytes_sent, result.bytes_received) == (len(ours.data), len(theirs.data))


# A payload of 4 MiB (four float32 factors of 1 MiB): big beside everything else an exchange allocates in Python, small
# enough to run fast. tracemalloc sees what the payload costs: bytes, bytearrays and the tensors safetensors decodes
# (backed by bytes); not gRPC's C buffers, nor tensors torch allocates.
MEMORY_WIDTH, MEMORY_RANK = 4096, 64


class MeasuringNode(FakeNode):
    """A `FakeNode` that notes the bytes Python holds (tracemalloc) as its handler is called: what the exchange
    keeps while the handler waits, e.g. for the node's training."""

    held: int = 0

    async def async_exchange(self, header: ExchangeHeader, factors: Factors) -> Factors:
        gc.collect()
        self.held = tracemalloc.get_traced_memory()[0]
        return await super().async_exchange(header, factors)


def measuring_pair() -> tuple[FakeNode, MeasuringNode]:
    alice = FakeNode("alice", lora_factors(1, width=MEMORY_WIDTH, rank=MEMORY_RANK))
    bob = MeasuringNode("bob", lora_factors(2, width=MEMORY_WIDTH, rank=MEMORY_RANK))
    return alice, bob


@pytest.mark.asyncio
async def test_a_callee_lets_go_of_a_payload_s_bytes_once_decoded_not_after_its_handler_has_answered() -> None:
    alice, bob = measuring_pair()
    payload = encode_factors(alice.factors)
    responder = _Responder(bob, max_payload_bytes=len(payload))

    async def stream() -> AsyncIterator[pb.ExchangeMessage]:
        for message in _payload_messages(header_of(alice), payload, digest(payload)):
            yield message

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        replies = [m async for m in responder.exchange(stream())]
    finally:
        tracemalloc.stop()
    assert replies[0].HasField("header") and bob.exchanges
    # The caller's factors, decoded; their bytes as they came (joined) went with the decoding.
    assert bob.held - before < 1.5 * len(payload)


@pytest.mark.asyncio
async def test_a_caller_lets_go_of_its_own_payload_once_sent_not_after_the_reply(transport: Transport) -> None:
    alice, bob = measuring_pair()
    size = len(encode_factors(alice.factors))
    async with serving(transport, bob) as (_, client):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            result = await client.exchange(header_of(alice), alice.factors, TIMEOUT, bob.spec)
        finally:
            tracemalloc.stop()
    assert result.bytes_sent == size
    # While the callee answers, the exchange holds the factors it decoded there, and the caller's encoding no more.
    assert bob.held - before < 1.5 * size


@pytest.mark.asyncio
async def test_several_exchanges_share_one_connection(transport: Transport, alice: FakeNode, bob: FakeNode) -> None:
    callers = [FakeNode(f"caller-{i}", alice.factors) for i in range(4)]  # at most 2 in flight per caller
    async with serving(transport, bob) as (_, client):
        results = await asyncio.gather(
            *(client.exchange(header_of(c, r), c.factors, TIMEOUT) for r, c in enumerate(callers))
        )
    assert [r.peer.round for r in results] == [0, 1, 2, 3]
    assert sorted(h.node_id for h, _ in bob.exchanges) == [c.info.node_id for c in callers]


@pytest.mark.asyncio
async def test_a_caller_over_its_exchanges_in_flight_is_refused_busy_and_others_are_not(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.hold = True  # bob's handler keeps every exchange waiting, as a node does for its own round
    async with serving(transport, bob) as (_, client):
        held = [asyncio.ensure_future(client.exchange(header_of(alice, r), alice.factors, TIMEOUT)) for r in (0, 1)]
        async with asyncio.timeout(TIMEOUT):
            while len(bob.exchanges) < MAX_EXCHANGES_PER_CALLER:
                await bob.entered.wait()
                bob.entered.clear()  # checked after clearing: no entry is missed
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice, 2), alice.factors, TIMEOUT)
        assert refused.value.reason is Reason.BUSY and "alice" in refused.value.detail
        assert len(bob.exchanges) == 2  # the third payload was never taken in
        carol = FakeNode("carol", alice.factors)
        bob.hold = False
        assert (await client.exchange(header_of(carol, 2), carol.factors, TIMEOUT)).peer.node_id == "bob"
        for call in held:
            call.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        async with asyncio.timeout(TIMEOUT):  # the cancelled calls end on bob's side and free alice's places
            await bob.cancelled.wait()
            while True:
                try:
                    await client.exchange(header_of(alice, 3), alice.factors, TIMEOUT)
                    break
                except ExchangeRefused as exc:
                    assert exc.reason is Reason.BUSY
                    await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_payload_off_the_callee_spec_is_refused_bad_payload(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    alice.factors = lora_factors(1, rank=8)  # bob expects rank 4
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice), alice.factors, TIMEOUT)
    assert refused.value.reason is Reason.BAD_PAYLOAD
    assert "shape" in refused.value.detail
    assert bob.exchanges == []  # the handler never saw factors off its spec


@pytest.mark.asyncio
async def test_reply_off_the_caller_spec_raises_payload_error(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.factors = lora_factors(2, dtype=torch.float16)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(PayloadError) as refused:
            await client.exchange(header_of(alice), alice.factors, TIMEOUT, FactorSpec.from_factors(alice.factors))
    assert refused.value.reason is Reason.BAD_PAYLOAD
    assert "dtype" in refused.value.detail


@pytest.mark.asyncio
async def test_a_reply_declared_larger_than_the_caller_spec_allows_is_refused_too_large(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.factors = lora_factors(2, width=4096)  # ~0.5 MB where alice expects ~1 KB of factors
    async with serving(transport, bob) as (_, client):
        with pytest.raises(PayloadError) as refused:
            await client.exchange(header_of(alice), alice.factors, TIMEOUT, FactorSpec.from_factors(alice.factors))
    assert refused.value.reason is Reason.TOO_LARGE


@pytest.mark.asyncio
async def test_handler_refusal_reaches_the_caller_with_its_reason(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.refusal = (Reason.ROUND_MISMATCH, "bob is at round 3, asked for 9")
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice, 9), alice.factors, TIMEOUT)
    assert (refused.value.reason, refused.value.detail) == (Reason.ROUND_MISMATCH, "bob is at round 3, asked for 9")


@pytest.mark.asyncio
async def test_exchange_from_another_cluster_is_refused_before_the_payload(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    stranger = FakeNode("mallory", alice.factors, cluster="other-cluster")
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(stranger), stranger.factors, TIMEOUT)
    assert refused.value.reason is Reason.CLUSTER_MISMATCH
    assert bob.exchanges == []


@pytest.mark.asyncio
async def test_payload_over_the_callee_cap_is_refused_too_large(transport: Transport) -> None:
    big = {f"{PREFIX}.query.lora_A.weight": torch.randn(1_000_000)}  # 4 MB
    alice, bob = FakeNode("alice", big), FakeNode("bob", big)
    async with serving(transport, bob, max_payload_bytes=1 << 20) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice), big, TIMEOUT)
        assert refused.value.reason is Reason.TOO_LARGE
        assert bob.exchanges == []
        small = lora_factors(1)
        bob.factors, bob.spec = small, None
        result = await client.exchange(header_of(alice), small, TIMEOUT)  # the connection is still good
    assert_bit_exact(result.factors, small)


@pytest.mark.asyncio
async def test_handler_crash_is_an_internal_refusal_and_the_server_keeps_serving(
    transport: Transport, alice: FakeNode, bob: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    bob.crash = "bug in bob"
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice), alice.factors, TIMEOUT)
        assert refused.value.reason is Reason.INTERNAL
        assert "bug in bob" not in refused.value.detail  # internals stay in the callee's log...
        [record] = [r for r in caplog.records if r.exc_info]
        assert record.exc_info is not None
        assert "bug in bob" in str(record.exc_info[1])  # ...with their traceback
        bob.crash = None
        await client.exchange(header_of(alice), alice.factors, TIMEOUT)


class CrashingNode(FakeNode):
    """A `FakeNode` whose handshake, commit and leave handlers fail with a bug of their own."""

    async def async_handshake(self, remote: PeerInfo) -> None:
        raise RuntimeError("bug in bob's handshake")

    async def async_commit(self, caller: str, r: int, accept: bool) -> None:
        raise RuntimeError("bug in bob's commit")

    async def async_leave(self, remote: PeerInfo) -> None:
        raise RuntimeError("bug in bob's leave")


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["handshake", "commit", "leave"])
async def test_unary_handler_crash_is_an_internal_refusal_logged_with_its_traceback(
    transport: Transport, alice: FakeNode, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    bob = CrashingNode("bob", alice.factors)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            if call == "handshake":
                await client.handshake(alice.info, TIMEOUT)
            elif call == "commit":
                await client.commit(header_of(alice), True, TIMEOUT)
            else:
                await client.leave(alice.info, TIMEOUT)
        assert refused.value.reason is Reason.INTERNAL
        assert "bug in bob" not in refused.value.detail  # internals stay in the callee's log...
        [record] = [r for r in caplog.records if r.exc_info]
        assert record.exc_info is not None
        assert f"bug in bob's {call}" in str(record.exc_info[1])  # ...with their traceback
        assert record.getMessage() == f"{call} from 'alice' failed inside this node"
        assert (await client.status(TIMEOUT)).node.node_id == "bob"  # and the server keeps serving


@pytest.mark.asyncio
async def test_callee_that_never_answers_gives_the_caller_a_prompt_timeout(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.hold = True
    async with serving(transport, bob) as (_, client):
        async with asyncio.timeout(TIMEOUT):  # 'promptly': long before this bound
            with pytest.raises(PeerTimeout):
                await client.exchange(header_of(alice), alice.factors, SHORT_TIMEOUT)
            await bob.cancelled.wait()  # the deadline reached the callee, whose handler was cancelled
    assert issubclass(PeerTimeout, PeerUnavailable)


# ------------------------------------------------------------------- an answered exchange that never ends


@pytest.mark.asyncio
async def test_a_reply_the_callee_cannot_send_leaves_the_pair_out_at_once(transport: Transport) -> None:
    """The handler answered (it holds the caller's factors aside for a commit), then the reply failed to encode:
    the caller gets a refusal, so no commit will come, and the callee must stop waiting for one now rather than
    hold its round open until the deadline."""
    small = lora_factors(1)
    alice = FakeNode("alice", small)
    bob = FakeNode("bob", {f"{PREFIX}.query.lora_A.weight": torch.randn(1_000_000)})  # a 4 MB reply
    bob.spec = None
    async with serving(transport, bob, max_payload_bytes=1 << 20) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice), small, TIMEOUT)
        assert refused.value.reason is Reason.TOO_LARGE
    assert len(bob.exchanges) == 1  # answered by the handler...
    assert bob.left_out == [("alice", alice.info.round)]  # ...then left out, since the reply never went
    assert bob.commits == []  # the reply was a refusal: the caller has nothing to un-commit


@pytest.mark.asyncio
async def test_a_grpc_caller_gone_mid_reply_leaves_the_pair_out_at_once(alice: FakeNode, bob: FakeNode) -> None:
    """A caller that cancels its call (its deadline, its stop) after the reply began cannot commit: the callee
    hears of the cancelled call and leaves the pair out then, not at its round's deadline."""
    bob.factors = lora_factors(2, width=1 << 20)  # a 16 MiB reply: many chunks, far more than HTTP/2 buffers
    bob.spec = None
    payload = encode_factors(alice.factors)
    async with RpcServer(bob, LISTEN) as server, channel_to(server.address) as channel:
        requests = [header_message(alice, payload), pb.ExchangeMessage(chunk=payload)]
        call = channel.stream_stream(f"/{NODE_SERVICE_NAME}/Exchange")(m.SerializeToString() for m in requests)
        try:
            first = pb.ExchangeMessage.FromString(await call.read())
            assert first.WhichOneof("kind") == "header"  # the reply began: bob holds alice's factors aside
            assert bob.left_out == []
        finally:
            call.cancel()
        async with asyncio.timeout(TIMEOUT):
            await bob.left_out_seen.wait()
    assert bob.left_out == [("alice", alice.info.round)]


@pytest.mark.asyncio
async def test_a_caller_refusing_a_reply_header_unfit_to_read_still_un_commits_it(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    """A reply header that fails the caller's first checks (here a degree over MAX_DEGREE) still means the callee
    answered and holds the pair aside: the caller tells it so (accept = false) rather than leave it waiting."""
    bob.info = dataclasses.replace(bob.info, degree=MAX_DEGREE + 1)
    async with serving(transport, bob) as (_, client):
        with pytest.raises(ExchangeRefused) as refused:
            await client.exchange(header_of(alice), alice.factors, TIMEOUT)
    assert refused.value.reason is Reason.BAD_PAYLOAD
    assert bob.commits == [("alice", alice.info.round, False)]


@pytest.mark.asyncio
async def test_a_caller_whose_deadline_ends_the_wait_for_the_callee_s_snapshot_is_not_waited_for(
    transport: Transport, alice: FakeNode, bob: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    """The callee is still training when the caller's deadline cancels the exchange: the caller leaves the pair out
    and will not call again for the round, so the callee's round must stop waiting for it then, not at its own
    deadline."""
    caplog.set_level(logging.INFO, logger="tadlora.rpc")
    bob.hold = True  # the handler waits (for a snapshot) until the call is cancelled
    async with serving(transport, bob) as (_, client):
        with pytest.raises(PeerTimeout):
            await client.exchange(header_of(alice), alice.factors, SHORT_TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            await bob.left_out_seen.wait()
    assert bob.left_out == [("alice", alice.info.round)]
    assert any("from 'alice'" in r.getMessage() and "ended before it was answered" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# ------------------------------------------------------------------------------- status and lifecycle


@pytest.mark.asyncio
async def test_status_round_trips(transport: Transport, bob: FakeNode) -> None:
    bob.status_info = StatusInfo(
        node=bob.info,
        state="exchanging",
        phase="B",
        rounds_completed=12,
        last_loss=0.25,
        last_accuracy=math.nan,
        neighbors=(
            NeighborStatus(
                node_id="alice", address="10.0.0.1:7000", degree=2, last_round=11, weight=1 / 3, release="0.2.0"
            ),
            # a neighbour too old to say its release
            NeighborStatus(node_id="carol", address="10.0.0.3:7000", degree=3, last_round=12, weight=0.25),
        ),
        uptime_seconds=42.5,
        candidates=(
            CandidateStatus(key="dave", address="10.0.0.4:7000", source="mdns", reason="not dialled: its advert says"),
            CandidateStatus(
                key="10.0.0.5:7000",
                address="10.0.0.5:7000",
                source="static",
                failures=3,
                retry_in_seconds=3.5,
                reason="peer 10.0.0.5:7000 unavailable: connection refused",
            ),
        ),
        release="0.1.0",
        neighbors_total=1500,  # more than a reply lists
        candidates_total=70,
    )
    alice = bob.status_info.neighbors[0]
    assert all(getattr(alice, f.name) != f.default for f in dataclasses.fields(NeighborStatus))  # every field crosses
    async with serving(transport, bob) as (_, client):
        status = await client.status(TIMEOUT)
    assert math.isnan(status.last_accuracy)
    expected = bob.status_info.__dict__ | {"last_accuracy": status.last_accuracy}
    assert status.__dict__ == expected


@pytest.mark.asyncio
async def test_status_all_walks_the_neighbour_lists_and_names_each_listed_node_that_does_not_answer(
    alice: FakeNode, bob: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob lists alice, carol (nothing serves at her address), dave (no address) and frank (at a unix socket, which
    gRPC would dial); alice lists bob, carol, erin, at whose address mallory answers, and Evil, no node id. The walk
    from bob reaches alice through bob's list, and names the five that did not answer, each with who lists it and
    why, without dialling frank's or Evil's; `tadlora-node status --all` exits 1 for them. A terminal escape in what
    alice says is shown escaped in the table."""
    from tadlora.node import admin

    [dead] = free_ports(1)
    carol = f"127.0.0.1:{dead}"
    mallory = FakeNode("mallory", alice.factors)
    transport = GrpcTransport()
    async with (
        transport.serve(alice, LISTEN) as a,
        transport.serve(bob, LISTEN) as b,
        transport.serve(mallory, LISTEN) as m,
    ):
        alice.info = dataclasses.replace(alice.info, address=a.address)
        bob.info = dataclasses.replace(bob.info, address=b.address)
        listed = lambda *pairs: tuple(NeighborStatus(node_id=i, address=at) for i, at in pairs)  # noqa: E731
        bob.status_info = StatusInfo(
            node=bob.info,
            neighbors=listed(("alice", a.address), ("carol", carol), ("dave", ""), ("frank", "unix:/run/x.sock")),
        )
        alice.status_info = StatusInfo(
            node=alice.info,
            neighbors=listed(("bob", b.address), ("carol", carol), ("erin", m.address), ("Evil", b.address)),
            release="0.2.0",
            phase="\x1b[2JB",  # clears the screen, printed as it came
        )
        walked = await admin.walk_cluster(b.address, TIMEOUT)
        capsys.readouterr()
        code = await asyncio.to_thread(admin.status_main, [b.address, "--all", "--timeout", "5"])
        out, err = capsys.readouterr()
        table_code = await asyncio.to_thread(admin.status_main, [b.address, "--all", "--table", "--timeout", "5"])
        table = capsys.readouterr().out
        monkeypatch.setattr(admin, "WALK_LIMIT", 2)  # bob, then the first of the four he lists
        cut = await admin.walk_cluster(b.address, TIMEOUT)
        monkeypatch.setattr(admin, "WALK_LIMIT", 1000)
        # alice has more neighbours than her reply lists (past MAX_DEGREE): those it leaves out are not asked
        alice.status_info = dataclasses.replace(alice.status_info, neighbors_total=1500, candidates_total=80)
        capsys.readouterr()
        capped_code = await asyncio.to_thread(admin.status_main, [b.address, "--all", "--table", "--timeout", "5"])
        capped_table, capped_err = capsys.readouterr()
        capped = await admin.walk_cluster(b.address, TIMEOUT)

    assert [n["node_id"] for n in walked["nodes"]] == ["alice", "bob"] and walked["complete"]
    assert [n["release"] for n in walked["nodes"]] == ["0.2.0", None]
    unreachable = {u["node_id"]: u for u in walked["unreachable"]}
    assert list(unreachable) == ["Evil", "carol", "dave", "erin", "frank"]
    assert unreachable["Evil"]["error"].startswith("listed under an id that is none: node id 'Evil' is not")
    assert unreachable["carol"]["listed_by"] == ["alice", "bob"] and unreachable["carol"]["address"] == carol
    assert f"peer {carol} unavailable" in unreachable["carol"]["error"]
    assert (unreachable["dave"]["listed_by"], unreachable["dave"]["error"]) == (["bob"], "listed without an address")
    assert unreachable["erin"] == {"node_id": "erin", "address": m.address, "listed_by": ["alice"],
                                   "error": f"node 'mallory' answers at {m.address}, not 'erin'"}  # fmt: skip
    assert unreachable["frank"]["error"] == (
        "listed at an address that is no HOST:PORT: port '/run/x.sock' is not a number in 1..65535"
    )
    assert code == table_code == 1
    assert json.loads(out) == walked
    assert (
        err.startswith("tadlora-node status: 5 of the nodes listed did not answer: Evil at ") and "dave at (no" in err
    )
    lines = table.splitlines()
    assert lines[0].split() == ["NODE", "ADDRESS", "ROUND", "STATE", "PHASE", "PEERS", "CANDIDATES", "LOSS",
                                "ACCURACY", "RELEASE", "UPTIME"]  # fmt: skip
    assert [line.split()[:2] for line in lines[1:3]] == [["alice", a.address], ["bob", b.address]]
    assert lines[1].split()[4:] == ["\\x1b[2JB", "4", "0", "-", "-", "0.2.0", "0m00s"]  # no loss or accuracy yet
    assert lines[2].split()[4] == "-"  # no phase
    assert lines[2].split()[9] == "-"  # too old to say its release
    assert lines[4].split()[:2] == ["carol", carol] and "did not answer (listed by alice, bob): peer" in lines[4]
    assert (
        "\x1b" not in table
        and lines[-1] == "2 nodes answered, 5 did not; round 3; release 0.2.0 (1), too old to say (1)"
    )
    assert [n["node_id"] for n in cut["nodes"]] == ["alice", "bob"] and not cut["unreachable"]
    assert cut["complete"] is False
    # Counted, not listed: the totals are in the JSON and the table, and the walk says it could not be complete.
    assert [(n["neighbours_total"], n["candidates_total"]) for n in walked["nodes"]] == [(4, 0), (4, 0)]
    assert [(n["neighbours_total"], n["candidates_total"]) for n in capped["nodes"]] == [(1500, 80), (4, 0)]
    assert capped["complete"] is False and walked["complete"] is True and capped_code == 1
    assert capped_table.splitlines()[1].split()[5:7] == ["1500", "80"]
    assert "alice lists 4 of its 1500 neighbours; the walk asked those alone" in capped_err
    assert "stopped after" not in capped_err


@pytest.mark.asyncio
async def test_a_status_reply_is_read_within_what_a_node_sends_and_printed_as_valid_json_or_a_narrow_table(
    bob: FakeNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Whoever answers chooses its status reply, and `status` prints it, `doctor` compares it. A reply with numbers
    that are not finite made `status --table` die on a traceback and `status` print NaN, which JSON readers refuse;
    thousands of neighbours or a 20,000-character field went through whole, and a table padded every line to it.
    Now: NaN for such numbers (null in JSON), the lists and texts cut to what a node sends, table cells to 64
    characters; and a reply whose node says of itself what a handshake would refuse is refused, BAD_PAYLOAD."""
    from tadlora.node import admin

    transport = GrpcTransport()
    async with transport.serve(bob, LISTEN) as server:
        bob.info = dataclasses.replace(bob.info, address=server.address)
        bob.status_info = StatusInfo(
            node=bob.info, state="x" * 20_000, last_loss=math.inf, uptime_seconds=math.nan,
            neighbors=tuple(NeighborStatus(node_id=f"n{i}", address="", weight=-math.inf) for i in range(3000)),
            candidates=tuple(CandidateStatus(key=f"c{i}", retry_in_seconds=math.inf, reason="r" * 3000)
                             for i in range(500)),
        )  # fmt: skip
        async with transport.connect(server.address) as client:
            status = await client.status(TIMEOUT)
        capsys.readouterr()
        code = await asyncio.to_thread(admin.status_main, [server.address, "--timeout", "5"])
        out = capsys.readouterr().out
        table_code = await asyncio.to_thread(admin.status_main, [server.address, "--table", "--timeout", "5"])
        table = capsys.readouterr().out
        bob.status_info = dataclasses.replace(bob.status_info, node=dataclasses.replace(bob.info, address="unix:/x"))
        refused_code = await asyncio.to_thread(admin.status_main, [server.address, "--timeout", "5"])
        refused = capsys.readouterr().err
        cfg = node_config(tmp_path, 0, 1, PeersOption(False, (server.address,), ()), min_peers=0)
        doctor = await async_check_address(cfg, "ab", server.address, "static")

    assert (len(status.neighbors), len(status.candidates)) == (1024, 64)
    # It said no totals (as a node older than them): they are what it lists, as far as anyone can tell.
    assert (status.neighbors_total, status.candidates_total) == (1024, 64)
    assert len(status.state) == 256 + len("... (cut)") and len(status.candidates[0].reason) == 2048 + len("... (cut)")
    assert math.isnan(status.last_loss) and math.isnan(status.uptime_seconds)
    assert math.isnan(status.neighbors[0].weight) and math.isnan(status.candidates[0].retry_in_seconds)
    assert code == table_code == 0

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in the JSON")

    doc = json.loads(out, parse_constant=no_constants)
    assert doc["last_loss"] is None and doc["uptime_seconds"] is None and doc["neighbours"][0]["weight"] is None
    lines = table.splitlines()
    assert max(len(line) for line in lines) < 300, [len(line) for line in lines]
    assert lines[1].split()[3] == "x" * 61 + "..." and lines[1].split()[-1] == "-"  # the state; no uptime known
    assert refused_code == 1 and "which is no address to dial" in refused and "no tadlora node would" in refused
    # doctor says so too, not that it "does not answer"
    assert doctor.status == "WARN" and "answers, but says of itself what no tadlora node would" in doctor.detail


@pytest.mark.asyncio
async def test_status_escapes_what_a_node_that_fails_the_call_said(capsys: pytest.CaptureFixture[str]) -> None:
    """The error of a node that refuses `status` is the refuser's own words, printed on the terminal: escaped."""
    from tadlora.node import admin

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "\x1b[2Jforged\nline")

    server = grpc.aio.server()
    handlers = {"Status": grpc.unary_unary_rpc_method_handler(refuse)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tadlora.v1.Node", handlers),))
    port = server.add_insecure_port(LISTEN)
    await server.start()
    try:
        code = await asyncio.to_thread(admin.status_main, [f"127.0.0.1:{port}", "--all", "--timeout", "5"])
    finally:
        await server.stop(None)
    err = capsys.readouterr().err
    assert code == 1 and "\x1b" not in err
    assert err.splitlines()[0] == "tadlora-node status: BAD_PAYLOAD: \\x1b[2Jforged\\nline", err
    assert "no tadlora node would" not in err  # it refused our call; it said nothing of itself


@pytest.mark.asyncio
async def test_closing_twice_is_safe(transport: Transport, bob: FakeNode) -> None:
    async with transport.serve(bob, LISTEN) as server:
        client = transport.connect(server.address)
        await client.status(TIMEOUT)
        await client.aclose()
        await client.aclose()
        with pytest.raises(PeerUnavailable, match="closed"):  # for its caller, a transport failure like any other
            await client.status(TIMEOUT)
        await server.aclose(0)
        await server.aclose(0)
    # and never-used ones
    await transport.connect(server.address).aclose()


@pytest.mark.asyncio
async def test_a_failure_whose_grpc_details_are_long_is_cut_as_a_refusals_detail_is(alice: FakeNode) -> None:
    """What answers at a peer's address chooses the text of the gRPC status it fails a call with; it was kept whole,
    logged, and shown as the candidate's reason in this node's own status (up to 64 of them)."""
    from tadlora.node.limits import MAX_DETAIL_CHARS

    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "X" * 7000)

    handlers = {name: grpc.unary_unary_rpc_method_handler(abort) for name in ("Handshake", "Status")}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tadlora.v1.Node", handlers),))
    port = server.add_insecure_port(LISTEN)
    await server.start()
    try:
        async with PeerClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(PeerUnavailable) as failed:
                await client.handshake(alice.info, TIMEOUT)
    finally:
        await server.stop(None)
    assert failed.value.detail == "UNAVAILABLE: " + "X" * MAX_DETAIL_CHARS + "... (cut)"


@pytest.mark.asyncio
async def test_calling_a_stopped_server_raises_peer_unavailable(transport: Transport, alice: FakeNode) -> None:
    async with transport.serve(FakeNode("bob", alice.factors), LISTEN) as server:
        address = server.address
    async with transport.connect(address) as client:
        with pytest.raises(PeerUnavailable) as unavailable:
            await client.handshake(alice.info, TIMEOUT)
    assert not isinstance(unavailable.value, PeerTimeout)
    assert unavailable.value.address == address


@pytest.mark.asyncio
async def test_a_new_connection_reaches_a_restarted_peer_while_an_old_one_to_its_address_still_backs_off(
    alice: FakeNode, bob: FakeNode
) -> None:
    """A rolling restart: while a peer is down, connections to its address fail and gRPC backs them off. A new
    connection made once it serves again (its inbound handshake verified it) must reach it. With gRPC's shared
    subchannels it failed at once with the old connection's "Connection refused", so the probe of a neighbour that
    missed the restart's round dropped the peer that had just come back, and the cluster waited a whole deadline."""
    [port] = free_ports(1)
    address = f"127.0.0.1:{port}"
    transport = GrpcTransport()
    async with transport.connect(address) as old:  # e.g. the retry of a static address, or a dropped peer's
        for _ in range(3):
            with pytest.raises(PeerUnavailable):
                await old.handshake(alice.info, TIMEOUT)
            await asyncio.sleep(0.5)  # into gRPC's reconnect backoff (1 s, then 1.6x)
        async with transport.serve(bob, address), transport.connect(address) as new:
            assert (await new.handshake(alice.info, TIMEOUT)).node_id == "bob"


@pytest.mark.asyncio
async def test_stopping_a_server_ends_calls_still_running_after_the_grace_period(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.hold = True
    async with (
        asyncio.timeout(TIMEOUT),
        transport.serve(bob, LISTEN) as server,
        transport.connect(server.address) as client,
    ):
        call = asyncio.create_task(client.exchange(header_of(alice), alice.factors, TIMEOUT))
        try:
            await bob.entered.wait()
            await server.aclose(grace=0.05)
            with pytest.raises(PeerUnavailable) as unavailable:
                await call
        finally:
            call.cancel()
        await bob.cancelled.wait()
    assert not isinstance(unavailable.value, PeerTimeout)


@pytest.mark.asyncio
@pytest.mark.parametrize("when", ["as it begins", "during the grace"])
async def test_a_stop_cancelled_before_its_grace_is_over_ends_the_calls_in_flight_at_once(
    transport: Transport, alice: FakeNode, bob: FakeNode, when: str
) -> None:
    """Cancelling a stop means stopping now: the calls it was giving a grace end with it, never run on with no
    server left to end them (grpc.aio leaves the calls of a server whose stop was cancelled running)."""
    bob.hold = True
    async with (
        asyncio.timeout(TIMEOUT),
        transport.serve(bob, LISTEN) as server,
        transport.connect(server.address) as client,
    ):
        call = asyncio.create_task(client.exchange(header_of(alice), alice.factors, 10 * TIMEOUT))
        try:
            await bob.entered.wait()
            stopping = asyncio.create_task(server.aclose(grace=10 * TIMEOUT))
            await asyncio.sleep(0 if when == "as it begins" else SHORT_TIMEOUT)  # where the cancellation lands
            assert not stopping.done()
            stopping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopping
            await bob.cancelled.wait()  # at once: the grace, and the caller's deadline, are ten times the timeout
            with pytest.raises(PeerUnavailable):
                await call
        finally:
            call.cancel()


@pytest.mark.asyncio
async def test_a_start_cancelled_half_way_leaves_nothing_listening(bob: FakeNode) -> None:
    """`async with` does not call ``__aexit__`` when ``__aenter__`` raises, so a start that is cancelled must close
    what it opened itself: else its ports stay bound, serving, with no owner to close them."""
    steps = 0  # the loop iterations a start takes, counted, then a cancellation at each of them
    while True:
        listen, health_listen = (f"127.0.0.1:{port}" for port in free_ports(2))
        server = RpcServer(bob, listen, health_listen=health_listen)
        starting = asyncio.create_task(server.start())
        for _ in range(steps):
            await asyncio.sleep(0)
        starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            for address in (listen, health_listen):
                async with RpcServer(bob, address):  # BindError if the cancelled start left it bound
                    pass
            steps += 1
            continue
        await server.aclose(0)
        break
    assert steps > 1, "the cancellation never landed inside a start"


@pytest.mark.asyncio
async def test_serving_on_a_taken_address_fails_naming_it(transport: Transport, bob: FakeNode) -> None:
    async with transport.serve(bob, LISTEN) as server:
        with pytest.raises(BindError, match=server.address.replace(".", r"\.")):
            async with transport.serve(bob, server.address):
                pass


@pytest.mark.asyncio
async def test_closing_a_stopped_server_again_leaves_the_server_now_on_its_address_serving(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    async with transport.serve(FakeNode("carol", bob.factors), LISTEN) as first:
        address = first.address
    async with transport.serve(bob, address), transport.connect(address) as client:
        await first.aclose()  # closing is safe to call twice, even once another server took the address
        assert (await client.handshake(alice.info, TIMEOUT)).node_id == "bob"


@pytest.mark.asyncio
async def test_closing_a_client_mid_call_fails_the_call_without_cancelling_the_caller(
    transport: Transport, alice: FakeNode, bob: FakeNode
) -> None:
    bob.hold = True
    async with asyncio.timeout(TIMEOUT), transport.serve(bob, LISTEN) as server:
        client = transport.connect(server.address)
        call = asyncio.ensure_future(client.exchange(header_of(alice), alice.factors, 10 * TIMEOUT))
        try:
            await bob.entered.wait()
            await client.aclose()  # e.g. another task dropped this peer
            with pytest.raises(PeerUnavailable) as unavailable:
                await call
            assert not call.cancelled() and not isinstance(unavailable.value, PeerTimeout)
        finally:
            call.cancel()
        await bob.cancelled.wait()  # and the callee stopped working on it


# ------------------------------------------------------------------------------------------ gRPC only


@contextlib.asynccontextmanager
async def channel_to(address: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(address)
    try:
        yield channel
    finally:
        await channel.close()


GARBLED = b"\xff\xff\xff"  # not a protobuf message: a field key whose varint never ends


def header_message(node: FakeNode, payload: bytes) -> pb.ExchangeMessage:
    return pb.ExchangeMessage(
        header=pb.ExchangeHeader(
            protocol_version=PROTOCOL_VERSION, node_id=node.info.node_id, cluster=CLUSTER, fingerprint=FINGERPRINT,
            round=node.info.round, degree=node.info.degree, total_bytes=len(payload), sha256=digest(payload),
            num_chunks=1,
        )
    )  # fmt: skip


@contextlib.asynccontextmanager
async def raw_node_server(reply: bytes, stream: list[bytes]) -> AsyncIterator[str]:
    """A gRPC server of the Node service that answers in raw bytes: ``reply`` to unary calls, ``stream`` to
    streaming ones, whatever the request; its address."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for message in stream:
            yield message

    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(unary),
        "Status": grpc.unary_unary_rpc_method_handler(unary),
        "Exchange": grpc.stream_stream_rpc_method_handler(streaming),
        "Fetch": grpc.unary_stream_rpc_method_handler(streaming),
    }
    async with node_service(handlers) as address:
        yield address


@contextlib.asynccontextmanager
async def node_service(handlers: dict[str, grpc.RpcMethodHandler]) -> AsyncIterator[str]:
    """A plaintext gRPC server of the Node service with ``handlers`` (by method name) on loopback; its address."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(NODE_SERVICE_NAME, handlers)])
    port = server.add_insecure_port(LISTEN)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["handshake", "status", "exchange", "fetch"])
async def test_a_grpc_peer_answering_with_a_message_that_does_not_parse_is_refused_bad_payload(
    call: str, alice: FakeNode, bob: FakeNode
) -> None:
    # grpc.aio gives the caller None for a message it cannot parse: the caller's contract still holds.
    payload = encode_factors(bob.factors)
    stream = [header_message(bob, payload).SerializeToString(), GARBLED]
    async with raw_node_server(GARBLED, stream) as address, PeerClient(address) as client:
        calls = {
            "handshake": lambda: client.handshake(alice.info, TIMEOUT),
            "status": lambda: client.status(TIMEOUT),
            "exchange": lambda: client.exchange(header_of(alice), alice.factors, TIMEOUT),
            "fetch": lambda: client.fetch(alice.info, TIMEOUT),
        }
        with pytest.raises(PayloadError) as refused:
            await calls[call]()
    assert refused.value.reason is Reason.BAD_PAYLOAD


@pytest.mark.asyncio
async def test_a_grpc_caller_sending_a_message_that_does_not_parse_is_refused_bad_payload_not_logged_as_a_fault(
    alice: FakeNode, bob: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    payload = encode_factors(alice.factors)
    requests = [header_message(alice, payload).SerializeToString(), GARBLED]
    async with RpcServer(bob, LISTEN) as server, channel_to(server.address) as channel:
        exchange = channel.stream_stream(f"/{NODE_SERVICE_NAME}/Exchange")  # raw bytes both ways
        replies = [pb.ExchangeMessage.FromString(r) async for r in exchange(iter(requests), timeout=TIMEOUT)]
    assert [Reason(m.refusal.reason) for m in replies] == [Reason.BAD_PAYLOAD]
    assert not [r for r in caplog.records if r.name == "tadlora.rpc" and r.levelno >= logging.ERROR]
    assert bob.exchanges == []


STALL_S = 3.0  # s a caller sits on an unread reply: well past the connection's age and grace below
MAX_AGE_MS = 500  # ms; the server's connection age in the test below, shrunk from minutes
READ_BOUND_S = 0.3  # s; the callee's payload_timeout_s there: the grace is twice it


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["Exchange", "Fetch"])
async def test_a_grpc_caller_that_stops_reading_the_reply_is_cut_off_and_holds_no_call(
    method: str, alice: FakeNode, bob: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC flow control holds a callee's writes until its caller reads. A caller that stops reading (no deadline
    of its own, its connection kept up by keepalive) must not hold the call, and the reply's payload, for good:
    its connection ends after the server's connection age and grace."""
    monkeypatch.setattr(grpc_transport, "GRPC_MAX_CONNECTION_AGE_MS", MAX_AGE_MS)
    monkeypatch.setattr(grpc_transport, "GRPC_MIN_CONNECTION_AGE_GRACE_MS", 0)
    bob.factors = lora_factors(2, width=1 << 20)  # a 16 MiB reply: far more than HTTP/2 buffers for the caller
    bob.payload_timeout_s = READ_BOUND_S  # type: ignore[attr-defined]
    payload = encode_factors(alice.factors)
    server = RpcServer(bob, LISTEN)
    async with server, channel_to(server.address) as channel:
        if method == "Exchange":
            requests = [header_message(alice, payload), pb.ExchangeMessage(chunk=payload)]
            call = channel.stream_stream(f"/{NODE_SERVICE_NAME}/Exchange")(m.SerializeToString() for m in requests)
        else:
            request = pb.FetchRequest(caller=pb.PeerInfo(
                protocol_version=PROTOCOL_VERSION, cluster=CLUSTER, fingerprint=FINGERPRINT, node_id="alice",
            ))  # fmt: skip
            call = channel.unary_stream(f"/{NODE_SERVICE_NAME}/Fetch")(request.SerializeToString())
        try:
            await asyncio.sleep(STALL_S)  # reads nothing
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.aclose(grace=TIMEOUT)  # waits for the calls in flight, up to the grace
            assert loop.time() - started < TIMEOUT / 2, "the unread call was still running"
            with pytest.raises(grpc.aio.AioRpcError) as cut:  # what arrived before, then the end: not the reply
                async with asyncio.timeout(TIMEOUT):
                    async for _ in call:
                        pass
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            call.cancel()


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["Exchange", "Fetch"])
async def test_a_caller_sitting_on_unread_replies_holds_its_own_places_only(
    method: str, alice: FakeNode, bob: FakeNode
) -> None:
    """A caller's place is held until its reply has been sent, not only until it was answered: otherwise one
    caller could open call after call, read none of the replies, and hold every call slot of the server (and a
    copy of the payload in each) until the connections' age ends them. Fetch has its cap too. Others are served."""
    bob.factors = lora_factors(2, width=1 << 20)  # a 16 MiB reply: far more than HTTP/2 buffers for the caller
    bob.spec = None  # any payload of alice's shape is taken
    payload = encode_factors(alice.factors)
    fetch_request = pb.FetchRequest(caller=pb.PeerInfo(
        protocol_version=PROTOCOL_VERSION, cluster=CLUSTER, fingerprint=FINGERPRINT, node_id="alice",
    ))  # fmt: skip
    carol = FakeNode("carol", alice.factors)
    limit = MAX_EXCHANGES_PER_CALLER if method == "Exchange" else MAX_FETCHES_PER_CALLER
    async with RpcServer(bob, LISTEN) as server, channel_to(server.address) as channel:
        unread = []
        for _ in range(limit):
            if method == "Exchange":
                requests = [header_message(alice, payload), pb.ExchangeMessage(chunk=payload)]
                stub = channel.stream_stream(f"/{NODE_SERVICE_NAME}/Exchange")
                unread.append(stub(m.SerializeToString() for m in requests))
            else:
                unread.append(channel.unary_stream(f"/{NODE_SERVICE_NAME}/Fetch")(fetch_request.SerializeToString()))
        try:
            async with PeerClient(server.address) as client:

                async def as_caller(node: FakeNode) -> object:
                    if method == "Exchange":
                        return await client.exchange(header_of(node, limit), node.factors, TIMEOUT)
                    return await client.fetch(node.info, TIMEOUT)

                answered = bob.exchanges if method == "Exchange" else bob.handshakes  # what bob's handler took
                async with asyncio.timeout(TIMEOUT):
                    while len(answered) < limit:
                        await bob.entered.wait()
                        bob.entered.clear()  # checked after clearing: no entry is missed
                await asyncio.sleep(0.5)  # the handler has answered: the replies are on their way, and stuck
                with pytest.raises(ExchangeRefused) as busy:
                    await as_caller(alice)
                assert busy.value.reason is Reason.BUSY and "alice" in busy.value.detail, busy.value
                await as_caller(carol)  # another caller is served meanwhile
        finally:
            for call in unread:
                call.cancel()


NODE_METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Node"].methods]


async def refusal_of_a_garbled_request(channel: grpc.aio.Channel, method: str) -> tuple[Reason, str]:
    """Send ``method`` bytes that are not a message (raw, as a broken or hostile caller would) and return the
    refusal it gets: in-band where the reply can carry one, else the gRPC status INVALID_ARGUMENT."""
    path = f"/{NODE_SERVICE_NAME}/{method}"
    if method == "Handshake":
        reply = pb.HandshakeReply.FromString(await channel.unary_unary(path)(GARBLED, timeout=TIMEOUT))
        assert not reply.accepted
        return Reason(reply.reason), reply.detail
    if method == "Commit":
        committed = pb.CommitReply.FromString(await channel.unary_unary(path)(GARBLED, timeout=TIMEOUT))
        assert not committed.committed
        return Reason(committed.reason), committed.detail
    if method == "Leave":
        left = pb.LeaveReply.FromString(await channel.unary_unary(path)(GARBLED, timeout=TIMEOUT))
        assert not left.dropped
        return Reason(left.reason), left.detail
    if method in ("Exchange", "Fetch"):
        if method == "Exchange":
            call = channel.stream_stream(path)(iter([GARBLED]), timeout=TIMEOUT)
        else:
            call = channel.unary_stream(path)(GARBLED, timeout=TIMEOUT)
        [refusal] = [pb.ExchangeMessage.FromString(r).refusal async for r in call]
        return Reason(refusal.reason), refusal.detail
    if method == "Status":  # a StatusReply has no place for a refusal
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(path)(GARBLED, timeout=TIMEOUT)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return Reason.BAD_PAYLOAD, failed.value.details() or ""
    raise AssertionError(f"a new RPC {method!r}: say how it refuses a request that does not parse")


@pytest.mark.asyncio
@pytest.mark.parametrize("method", NODE_METHODS)
async def test_every_call_refuses_a_request_that_does_not_parse_bad_payload_never_with_an_error(
    method: str, bob: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    # grpc.aio parses a unary request before the servicer runs; left to itself it answers UNKNOWN and logs the
    # parser's traceback as an error of the server.
    refused: list[tuple[str, Reason]] = []
    bob.observe_refusal = lambda what, exc: refused.append((what, exc.reason))  # type: ignore[attr-defined]
    async with RpcServer(bob, LISTEN) as server, channel_to(server.address) as channel:
        reason, detail = await refusal_of_a_garbled_request(channel, method)
    assert reason is Reason.BAD_PAYLOAD
    assert "does not parse as tadlora.v1" in detail
    assert refused == [(method.lower(), Reason.BAD_PAYLOAD)]  # counted as any refusal is
    assert bob.handshakes == bob.exchanges == []  # the handler never saw it
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class GarblingClient(PeerClient):
    """A `PeerClient` whose requests reach the callee as bytes that are not a message."""

    def _node_stub(self) -> Any:
        stub = super()._node_stub()
        assert self._channel is not None
        for method, reply in (("Handshake", pb.HandshakeReply), ("Status", pb.StatusReply)):
            call = self._channel.unary_unary(
                f"/{NODE_SERVICE_NAME}/{method}",
                request_serializer=lambda _: GARBLED,
                response_deserializer=reply.FromString,
            )
            setattr(stub, method, call)
        stub.Fetch = self._channel.unary_stream(
            f"/{NODE_SERVICE_NAME}/Fetch",
            request_serializer=lambda _: GARBLED,
            response_deserializer=pb.ExchangeMessage.FromString,
        )
        return stub


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["handshake", "status", "fetch"])
async def test_a_caller_whose_request_did_not_parse_gets_a_bad_payload_refusal_not_an_unavailable_peer(
    call: str, alice: FakeNode, bob: FakeNode
) -> None:
    async with RpcServer(bob, LISTEN) as server, GarblingClient(server.address) as client:
        calls = {
            "handshake": lambda: client.handshake(alice.info, TIMEOUT),
            "status": lambda: client.status(TIMEOUT),
            "fetch": lambda: client.fetch(alice.info, TIMEOUT),
        }
        with pytest.raises(ExchangeRefused) as refused:
            await calls[call]()
    assert refused.value.reason is Reason.BAD_PAYLOAD
    assert "does not parse as tadlora.v1" in refused.value.detail


@pytest.mark.asyncio
async def test_health_is_serving_while_up_and_not_serving_on_shutdown(bob: FakeNode) -> None:
    serving_, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    server = RpcServer(bob, LISTEN)
    async with server, channel_to(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", NODE_SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == serving_
        watch = health.Watch(health_pb2.HealthCheckRequest(service=NODE_SERVICE_NAME), timeout=TIMEOUT)
        assert (await watch.read()).status == serving_
        closing = asyncio.create_task(server.aclose(grace=0.2))
        try:
            assert (await watch.read()).status == not_serving
        finally:
            watch.cancel()
            await closing
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_reflection_lists_the_services_and_describes_the_node_service(bob: FakeNode) -> None:
    async with RpcServer(bob, LISTEN) as server:
        async with channel_to(server.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            [reply] = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)]
        listed = {s.name for s in reply.list_services_response.service}
        assert {NODE_SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed

        def describe_node() -> dict[str, tuple[bool, bool]]:
            # The stock reflection client is synchronous: run it off the loop that serves it, and close its channel.
            with grpc.insecure_channel(server.address) as sync_channel:
                database = ProtoReflectionDescriptorDatabase(sync_channel)
                from google.protobuf.descriptor_pool import DescriptorPool

                service = DescriptorPool(database).FindServiceByName(NODE_SERVICE_NAME)
                return {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}

        methods = await asyncio.to_thread(describe_node)
    assert methods == {
        "Handshake": (False, False),
        "Exchange": (True, True),
        "Fetch": (False, True),
        "Status": (False, False),
        "Commit": (False, False),
        "Leave": (False, False),
    }


@pytest.mark.asyncio
async def test_a_grpc_failure_that_ends_a_cancelled_call_is_reported_as_the_cancellation() -> None:
    """grpc.aio may end a call whose task is being cancelled with a failure of its own (a connection attempt that
    times out), not CancelledError: taken as a peer failure, the cancellation was lost and its caller went on (the
    likely cause of a Ctrl-C in `status`, while it connected, that once exited 1 after the connect timeout, not 130)."""
    client = PeerClient("127.0.0.1:1")
    entered = asyncio.Event()

    async def call() -> None:
        with client._translated():
            entered.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:  # what grpc.aio can raise where the cancel meets a failing connection
                metadata = grpc.aio.Metadata()
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "timed out") from None

    task = asyncio.create_task(call())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the same failure, uncancelled
    with pytest.raises(PeerUnavailable, match="UNAVAILABLE: timed out"), client._translated():
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "timed out")


@pytest.mark.asyncio
async def test_a_refusal_repeated_by_a_retrying_peer_is_logged_once_per_quiet_period_with_its_count(
    bob: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer refused for its settings retries its handshake every 30 s for as long as both run: the refusing node
    wrote a line at each try, for ever. Now an identical refusal (call, caller, reason, detail) is INFO once per
    `REFUSAL_LOG_QUIET_S`, its repeats DEBUG and counted on the next INFO line; any other refusal is INFO at once."""
    from tadlora.node import responder as responder_module

    now = [1000.0]
    responder = responder_module._Responder(bob, max_payload_bytes=1 << 20)
    responder._refusal_log = responder_module._RefusalLog(clock=lambda: now[0])
    quiet = responder_module.REFUSAL_LOG_QUIET_S

    async def refused_handshake(caller: str = "carol") -> None:
        reply = await responder.handshake(None, identity=caller)
        assert not reply.accepted  # each is refused all the same: only its log line is spared

    def lines(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "tadlora.rpc"]

    with caplog.at_level(logging.DEBUG, logger="tadlora.rpc"):
        for _ in range(4):  # every 30 s, as the dialling side retries
            await refused_handshake()
            now[0] += 30
        await refused_handshake("dave")  # another caller
        await responder.commit(None, identity="carol")  # another call
        assert len(lines(logging.INFO)) == 3 and len(lines(logging.DEBUG)) == 3, caplog.text
        assert lines(logging.DEBUG)[0] == (
            "refused a handshake from 'carol': BAD_PAYLOAD: the handshake request does not parse as tadlora.v1 (again)"
        )
        now[0] = 1000.0 + quiet
        await refused_handshake()
    again = lines(logging.INFO)[-1]
    assert again == (
        "refused a handshake from 'carol': BAD_PAYLOAD: the handshake request does not parse as tadlora.v1 (refused "
        f"alike 3 more times since it was last logged, {quiet:.0f} s ago)"
    ), again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tadlora.rpc"):
        now[0] += 1
        await refused_handshake()  # within the new quiet period
        assert not lines(logging.INFO)
        # Only so many are remembered: the oldest is forgotten first, and logged anew.
        for i in range(responder_module._REFUSALS_REMEMBERED):
            await refused_handshake(f"n{i}")
        await refused_handshake()
    assert lines(logging.INFO)[-1].startswith("refused a handshake from 'carol': BAD_PAYLOAD: ")
    assert len(responder._refusal_log._seen) == responder_module._REFUSALS_REMEMBERED
    # A caller's id is its own to choose, of any length a request can carry: what is remembered of it is cut.
    await refused_handshake("x" * 1_000_000)
    assert max(len(caller) for _, caller, _, _ in responder._refusal_log._seen) == responder_module.MAX_TEXT_CHARS


@pytest.mark.asyncio
async def test_every_refusal_logs_its_caller_alike_and_one_not_yet_known_as_such(
    bob: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Handshakes and commits logged a request that did not parse as "from ''", exchanges and fetches "from a caller
    not yet known"; and only the latter fell back on the caller's certificate before its request named it."""
    from tadlora.node.responder import _Responder

    responder = _Responder(bob, max_payload_bytes=1 << 20)
    with caplog.at_level(logging.INFO, logger="tadlora.rpc"):
        await responder.handshake(None)
        await responder.commit(None)
        await responder.leave(None)
        await responder.handshake(None, identity="carol")
        await responder.commit(None, identity="carol")
        await responder.leave(None, identity="carol")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a ")]
    assert [m.split(": ")[0] for m in logged] == [
        "refused a handshake from a caller not yet known",
        "refused a commit from a caller not yet known",
        "refused a leave from a caller not yet known",
        "refused a handshake from 'carol'",
        "refused a commit from 'carol'",
        "refused a leave from 'carol'",
    ], logged
