"""Every payload is checked before it is mixed: a hostile neighbour's bad exchanges are refused with the right
reason (in the reply, the log and `tadlora_refusals_total`), and the honest nodes keep training."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from tadlora.adapter import LoraSpec
from tadlora.core.factors import Factors, select
from tadlora.core.mixing import sent_factors
from tadlora.node.daemon import Node
from tadlora.node.exchange_stream import _payload_messages
from tadlora.node.memory_transport import InMemoryClient, InMemoryNetwork
from tadlora.node.peerspec import PeersOption
from tadlora.node.responder import _Responder
from tadlora.node.rpc import (
    MAX_DEGREE,
    MAX_ROUND,
    PROTOCOL_VERSION,
    SAME_MODEL_FIX,
    ExchangeHeader,
    PeerInfo,
    StatusInfo,
)
from tadlora.node.wire import ExchangeRefused, FactorSpec, Reason, chunk_count, digest, encode_factors
from tadlora.v1 import node_pb2 as pb
from test_daemon import node_config

HOSTILE = "a-hostile"  # sorts before node-0, so the honest node waits for its call instead of calling it
# s: the exchange deadline of the honest nodes, long enough for a hostile attempt made while they run (one) on a busy
# machine: once round 0 closes, an exchange for it is refused from its header (ROUND_MISMATCH), before the payload
# check the attempt is there to provoke. The test making a dozen attempts makes them before the nodes run.
ROUND_S = 8.0


@contextlib.asynccontextmanager
async def honest_pair(tmp: Path, network: InMemoryNetwork, **changes) -> AsyncIterator[list[Node]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(2):
            peers = PeersOption(auto=False, static=tuple(n.address for n in nodes), dns=())
            cfg = node_config(tmp, i, 2, peers, method="lora", rounds=None, min_peers=1, exchange_timeout=ROUND_S,
                              **changes)  # fmt: skip
            nodes.append(await stack.enter_async_context(Node(cfg, network)))
        yield nodes


def refusals(node: Node, reason: str) -> float:
    return node.metrics.registry.get_sample_value("tadlora_refusals_total", {"reason": reason}) or 0.0


def _nan(f: Factors) -> None:
    next(iter(f.values()))[0, 0] = float("nan")


def _inf(f: Factors) -> None:
    next(iter(f.values()))[0, 0] = float("inf")


def _huge(f: Factors) -> None:
    next(iter(f.values())).fill_(1e6)  # finite, but its norm is far over --max-factor-norm


def _reshaped(f: Factors) -> None:
    key = next(iter(f))
    f[key] = torch.zeros(f[key].shape[0] + 1, *f[key].shape[1:])


def _extra(f: Factors) -> None:
    f["evil.lora_A.weight"] = torch.zeros(2, 2)


def _missing(f: Factors) -> None:
    del f[next(iter(f))]


def _retyped(f: Factors) -> None:
    key = next(iter(f))
    f[key] = f[key].to(torch.float64)


BAD_FACTORS: list[tuple[str, Callable[[Factors], None]]] = [
    ("NaN", _nan), ("inf", _inf), ("huge norm", _huge), ("wrong shape", _reshaped), ("extra key", _extra),
    ("missing key", _missing), ("wrong dtype", _retyped),
]  # fmt: skip


async def raw_exchange(client: InMemoryClient, messages: list[pb.ExchangeMessage]) -> pb.ExchangeMessage:
    """Send hand-made messages; the first reply message."""
    replies = client._call_exchange(iter(messages), 10.0)
    async with contextlib.aclosing(replies):
        async for reply in replies:
            return reply
    raise AssertionError("no reply")


@pytest.mark.asyncio
async def test_a_hostile_neighbours_bad_payloads_are_refused_with_their_reason_and_honest_nodes_keep_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tadlora")
    caplog.set_level(logging.DEBUG, logger="tadlora.rpc")  # an identical refusal again within minutes is DEBUG
    network = InMemoryNetwork()
    async with honest_pair(tmp_path, network) as (n0, n1):
        hostile = PeerInfo(node_id=HOSTILE, cluster=n0.config.cluster, fingerprint=n0.fingerprint,
                           address="127.0.0.1:9", round=0, degree=2)  # fmt: skip
        async with network.connect(n0.address) as client:
            await client.handshake(hostile, timeout=5.0)  # a verified peer: a neighbour in round 0
            tasks: list[asyncio.Future[None]] = []
            try:
                good = select(n0.factors, sent_factors(n0.method, 0))
                header = ExchangeHeader.from_info(hostile, at_round=0)
                outcomes: dict[str, Reason] = {}
                payload = encode_factors(good)
                wrong = digest(payload + b"x")
                reply = await raw_exchange(client, list(_payload_messages(header, payload, wrong)))
                outcomes["bad digest"] = Reason(reply.refusal.reason)
                head = pb.ExchangeHeader(protocol_version=PROTOCOL_VERSION, node_id=HOSTILE, cluster=header.cluster,
                                         fingerprint=header.fingerprint, round=0, degree=1, total_bytes=100 << 30,
                                         sha256=digest(b""), num_chunks=chunk_count(100 << 30))  # fmt: skip
                reply = await raw_exchange(client, [pb.ExchangeMessage(header=head)])
                outcomes["100 GB declared"] = Reason(reply.refusal.reason)
                for name, spoil in BAD_FACTORS:
                    bad = {k: v.clone() for k, v in good.items()}
                    spoil(bad)
                    with pytest.raises(ExchangeRefused) as caught:
                        await client.exchange(header, bad, timeout=10.0)
                    outcomes[name] = caught.value.reason
                for name, changed in [
                    ("degree 0", {"degree": 0}), (f"degree {MAX_DEGREE + 1}", {"degree": MAX_DEGREE + 1}),
                    ("round far ahead", {"round": 10**6}), ("round past the cap", {"round": MAX_ROUND + 1}),
                ]:  # fmt: skip
                    fields = {**vars(header), **changed}
                    with pytest.raises(ExchangeRefused) as caught:
                        await client.exchange(ExchangeHeader(**fields), good, timeout=10.0)
                    outcomes[name] = caught.value.reason
                # The honest nodes start once the attacks are over: started before, they could close round 0
                # meanwhile on a busy machine, and an attempt then is refused from its header (ROUND_MISMATCH) before
                # the check it is there to provoke.
                tasks = [asyncio.ensure_future(n.run()) for n in (n0, n1)]
                async with asyncio.timeout(60):
                    await asyncio.gather(n0.async_wait_for_round(3), n1.async_wait_for_round(3))
            finally:
                for n in (n0, n1):
                    n.request_stop()
                await asyncio.gather(*tasks)
    bad_payload = {name for name, _ in BAD_FACTORS} | {"degree 0", f"degree {MAX_DEGREE + 1}"}
    assert outcomes == {
        **dict.fromkeys(bad_payload, Reason.BAD_PAYLOAD),
        "round far ahead": Reason.ROUND_MISMATCH,
        "round past the cap": Reason.ROUND_MISMATCH,
        "bad digest": Reason.DIGEST_MISMATCH,
        "100 GB declared": Reason.TOO_LARGE,
    }
    assert refusals(n0, "BAD_PAYLOAD") == len(bad_payload)
    assert refusals(n0, "DIGEST_MISMATCH") == 1 and refusals(n0, "TOO_LARGE") == 1
    assert refusals(n0, "ROUND_MISMATCH") >= 2
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused an exchange from ")]
    assert sum("BAD_PAYLOAD" in m for m in logged) == len(bad_payload)  # each logged, the first of a kind at INFO
    first = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "BAD_PAYLOAD" in r.getMessage()]
    assert len(first) == len({m.removesuffix(" (again)") for m in logged if "BAD_PAYLOAD" in m}), first
    # Each refusal names whom it refused (the header's id): this node's log is the one that must say it.
    assert all(m.startswith(f"refused an exchange from {HOSTILE!r}: ") for m in logged if "BAD_PAYLOAD" in m), logged
    for n in (n0, n1):  # nothing hostile was mixed: the honest factors stay finite and sane
        assert all(bool(torch.isfinite(v).all()) and float(v.norm()) < 1e3 for v in n.factors.values())
    # Rounds 1 and 2, which both nodes finished before the stop: a node already in round 3 then closes it with the
    # pairs committed so far (none, when the stop came first; the documented graceful stop), logged all the same.
    rounds = [r for r in _rounds(n0) if 1 <= r["round"] < 3]
    assert len(rounds) == 2 and all([x["id"] for x in r["neighbours"]] == ["node-1"] for r in rounds), rounds


def _rounds(node: Node) -> list[dict]:
    from tadlora.node.state import read_rounds

    return read_rounds(node.config.out)


class HostileCallee:
    """A `NodeHandler` that answers every exchange, each time with the next spoiled reply."""

    def __init__(self, info: PeerInfo, good: Factors) -> None:
        self.info, self.good = info, good
        self.replies: list[tuple[int, Callable[[Factors], None] | None]] = [(0, None), (MAX_DEGREE, _huge), (1, _nan)]
        self.calls = 0
        self.degree = 1  # what local_info says: the reply header's degree
        self.commits: list[tuple[str, int, bool]] = []

    def local_info(self) -> PeerInfo:
        return dataclasses.replace(self.info, degree=self.degree)

    def expected_spec(self) -> None:
        return None

    def status(self) -> StatusInfo:
        return StatusInfo(node=self.info)

    async def async_handshake(self, remote: PeerInfo) -> None:
        pass

    async def async_exchange(self, header: ExchangeHeader, factors: Factors) -> Factors:
        self.degree, spoil = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        reply = {k: v.clone() for k, v in self.good.items()}
        if spoil is not None:
            spoil(reply)
        return reply

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, Factors]:
        raise ExchangeRefused(Reason.ROUND_MISMATCH, "no")

    async def async_commit(self, caller: str, r: int, accept: bool) -> None:
        self.commits.append((caller, r, accept))

    def observe_refusal(self, what: str, exc: ExchangeRefused) -> None:
        pass


@pytest.mark.asyncio
async def test_a_callee_replying_with_a_bad_degree_or_absurd_factors_is_refused_by_the_caller(tmp_path: Path) -> None:
    """The caller checks the reply as the callee checks the request: a hostile callee's degree 0 would otherwise
    crash the weight computation, and its huge or NaN factors would be mixed."""
    network = InMemoryNetwork()
    probe = node_config(tmp_path, 0, 2, PeersOption(False, (), ()))
    async with Node(dataclasses.replace(probe, out=tmp_path / "probe", min_peers=0), network) as model_of:
        good = select(model_of.factors, sent_factors(model_of.method, 0))
        info = PeerInfo(node_id="zz-hostile", cluster=probe.cluster, fingerprint=model_of.fingerprint,
                        address="127.0.0.1:7", round=0, degree=1)  # fmt: skip
    hostile = HostileCallee(info, good)
    async with network.serve(hostile, "127.0.0.1:7"):
        peers = PeersOption(auto=False, static=("127.0.0.1:7",), dns=())
        cfg = node_config(tmp_path, 0, 2, peers, method="lora", rounds=3, min_peers=1, exchange_timeout=ROUND_S)
        async with Node(cfg, network) as n0:
            async with asyncio.timeout(60):
                await n0.run()
    assert hostile.calls == 3
    assert refusals(n0, "BAD_PAYLOAD") == 3  # degree 0, a norm over the cap, NaN: each refused, none mixed
    # ... and the callee is told, so that it leaves each pair out too (and at once, not at its deadline).
    assert hostile.commits == [(n0.node_id, r, False) for r in range(3)]
    records = _rounds(n0)
    assert [r["round"] for r in records] == [0, 1, 2] and all(r["neighbours"] == [] for r in records)
    assert all(bool(torch.isfinite(v).all()) for v in n0.factors.values())


# ----------------------------------------------------------------------- refused from the header alone

HEADER_ONLY_S = 5.0  # s: a refusal from the header comes at once; a callee reading chunks would wait forever


async def reply_to_a_header_alone(
    node: Node, wait: float = HEADER_ONLY_S, **fields: object
) -> tuple[pb.ExchangeMessage | None, int]:
    """Open an exchange with ``node`` that sends a header (``fields`` over a plausible one) and then never a chunk;
    return the first reply (None: none within ``wait`` seconds) and how many request messages the node read."""
    head = pb.ExchangeHeader(protocol_version=PROTOCOL_VERSION, node_id="node-1", cluster=node.config.cluster,
                             fingerprint=node.fingerprint, round=0, degree=1, total_bytes=1024, sha256=digest(b""),
                             num_chunks=1)  # fmt: skip
    for name, value in fields.items():
        setattr(head, name, value)
    head.num_chunks = chunk_count(head.total_bytes)
    read = 0
    never = asyncio.Event()

    async def requests() -> AsyncGenerator[pb.ExchangeMessage, None]:
        nonlocal read
        read += 1
        yield pb.ExchangeMessage(header=head)
        read += 1  # asked for the first chunk
        await never.wait()
        yield pb.ExchangeMessage(chunk=b"x")

    # The serving side both transports drive, on the node as its handler (as `Node.start` serves it).
    responder = _Responder(node, max_payload_bytes=node.config.max_payload_bytes)
    async with contextlib.aclosing(responder.exchange(requests())) as replies:
        try:
            async with asyncio.timeout(wait):
                return await anext(replies), read
        except TimeoutError:
            return None, read


def round_spec(node: Node, t: int) -> FactorSpec:
    return FactorSpec.from_factors(select(node.factors, sent_factors(node.method, t)))


@pytest.mark.asyncio
async def test_an_exchange_declaring_more_bytes_than_its_round_can_carry_is_refused_before_a_chunk_is_read(
    tmp_path: Path,
) -> None:
    """Within the 512 MiB cap, but far over what the round's factors take: refused TOO_LARGE from the header, so a
    caller cannot make the node hold hundreds of MiB per exchange for a payload it would refuse anyway."""
    async with Node(node_config(tmp_path, 0, 2, PeersOption(False, (), ()), method="lora", min_peers=0)) as node:
        most = round_spec(node, 0).max_payload_bytes()
        declared = 256 << 20
        assert most < declared < node.config.max_payload_bytes
        reply, read = await reply_to_a_header_alone(node, total_bytes=declared)
        fits, read_fitting = await reply_to_a_header_alone(node, wait=0.5, total_bytes=most)
    assert reply is not None and Reason(reply.refusal.reason) is Reason.TOO_LARGE
    assert str(most) in reply.refusal.detail
    assert read == 1  # the header, and not one chunk
    assert refusals(node, "TOO_LARGE") == 1
    assert (fits, read_fitting) == (None, 2)  # the largest size the spec allows: the node reads on


@pytest.mark.asyncio
async def test_an_exchange_for_a_closed_round_or_from_a_non_neighbour_is_refused_before_a_chunk_is_read(
    tmp_path: Path,
) -> None:
    cfg = node_config(tmp_path, 0, 2, PeersOption(False, (), ()), method="lora", min_peers=0, rounds=1)
    async with Node(cfg) as node:
        async with asyncio.timeout(60):
            await node.run()  # round 0 is closed; the node is at round 1
        assert node.round == 1
        size = len(encode_factors(select(node.factors, sent_factors(node.method, 0))))
        closed, read_closed = await reply_to_a_header_alone(node, round=0, total_bytes=size)
        past_the_run, read_past = await reply_to_a_header_alone(node, round=2, total_bytes=size)
        # Round 1 published with node-2 as the only neighbour: node-1 is not one, and that is known from the header.
        await node.rounds.open(dict(node.factors), frozenset({"node-2"}))
        stranger, read_stranger = await reply_to_a_header_alone(node, round=1, total_bytes=size)
    assert closed is not None and past_the_run is not None and stranger is not None
    assert Reason(closed.refusal.reason) is Reason.ROUND_MISMATCH and "over here" in closed.refusal.detail
    assert Reason(past_the_run.refusal.reason) is Reason.ROUND_MISMATCH
    assert Reason(stranger.refusal.reason) is Reason.NOT_A_NEIGHBOR
    assert (read_closed, read_past, read_stranger) == (1, 1, 1)
    assert refusals(node, "ROUND_MISMATCH") == 2 and refusals(node, "NOT_A_NEIGHBOR") == 1


@pytest.mark.asyncio
async def test_an_exchange_declaring_degree_0_is_refused_before_a_chunk_is_read(tmp_path: Path) -> None:
    """docs/protocol.md: degree 0 is refused from the header, as a degree over `MAX_DEGREE` is: a caller is a
    neighbour of the node it calls, so no payload of it is worth reading."""
    async with Node(node_config(tmp_path, 0, 2, PeersOption(False, (), ()), method="lora", min_peers=0)) as node:
        size = len(encode_factors(select(node.factors, sent_factors(node.method, 0))))
        reply, read = await reply_to_a_header_alone(node, degree=0, total_bytes=size)
    assert reply is not None and Reason(reply.refusal.reason) is Reason.BAD_PAYLOAD
    assert "degree" in reply.refusal.detail
    assert read == 1  # the header, and not one chunk
    assert refusals(node, "BAD_PAYLOAD") == 1


# ------------------------------------------------------------------------------- checks off the loop


@pytest.mark.asyncio
async def test_factor_checks_run_off_the_event_loop_and_not_behind_training_and_still_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """isfinite and the norm over a payload take tens of ms per 32 MB: on the loop they would hold up handshakes
    and exchanges; in the torch worker they would wait for a training step. Both ends' checks, and a refusal."""
    threads: list[threading.Thread] = []
    check = FactorSpec.check

    def recording(self: FactorSpec, factors: Factors, max_norm: float | None = None) -> None:
        threads.append(threading.current_thread())
        check(self, factors, max_norm)

    monkeypatch.setattr(FactorSpec, "check", recording)
    loop_thread = threading.current_thread()
    network = InMemoryNetwork()
    async with honest_pair(tmp_path, network) as (n0, n1):
        hostile = PeerInfo(node_id=HOSTILE, cluster=n0.config.cluster, fingerprint=n0.fingerprint,
                           address="127.0.0.1:9", round=0, degree=2)  # fmt: skip
        async with network.connect(n0.address) as client:
            await client.handshake(hostile, timeout=5.0)
            tasks = [asyncio.ensure_future(n.run()) for n in (n0, n1)]
            try:
                bad = {k: v.clone() for k, v in select(n0.factors, sent_factors(n0.method, 0)).items()}
                _nan(bad)
                with pytest.raises(ExchangeRefused) as caught:
                    await client.exchange(ExchangeHeader.from_info(hostile, at_round=0), bad, timeout=10.0)
                async with asyncio.timeout(60):
                    await asyncio.gather(n0.async_wait_for_round(2), n1.async_wait_for_round(2))
            finally:
                for n in (n0, n1):
                    n.request_stop()
                await asyncio.gather(*tasks)
    assert caught.value.reason is Reason.BAD_PAYLOAD and "NaN" in caught.value.detail
    assert len(threads) >= 3  # the hostile request, and both ends of node-0's call to node-1 in two rounds
    assert loop_thread not in threads
    assert not [t.name for t in threads if t.name.startswith("tadlora-torch")]


# ------------------------------------------------------------------------------------- another schedule


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ours", "theirs", "their_schedule"),
    [
        ({"method": "lora"}, {"method": "tad"}, "tad T=5 p=1.0 max-neighbors=all"),
        ({"method": "lora"}, {"method": "lora", "link_prob": 0.5}, "lora T=none p=0.5 max-neighbors=all"),
        ({"method": "tad"}, {"method": "tad", "switch_interval": 3}, "tad T=3 p=1.0 max-neighbors=all"),
        ({"method": "lora"}, {"method": "lora", "max_neighbors": 2}, "lora T=none p=1.0 max-neighbors=2"),
    ],
    ids=["method", "link-prob", "switch-interval", "max-neighbors"],
)
async def test_a_node_of_another_schedule_is_refused_at_handshake_naming_both_and_neither_takes_the_other(
    tmp_path: Path, ours: dict[str, object], theirs: dict[str, object], their_schedule: str
) -> None:
    """Two methods would mix silently (both send A and B); two link probabilities or degree caps would disagree on
    which links are up, and one end would wait out its deadline every round. Refused, counted, and said why."""
    network = InMemoryNetwork()
    cfg0 = node_config(tmp_path, 0, 2, PeersOption(False, (), ()), min_peers=0, **ours)
    async with Node(cfg0, network) as n0:
        cfg1 = node_config(tmp_path, 1, 2, PeersOption(False, (n0.address,), ()), min_peers=0, **theirs)
        async with Node(cfg1, network) as n1:
            assert n1.schedule == their_schedule != n0.schedule
            async with network.connect(n0.address) as client:
                with pytest.raises(ExchangeRefused) as refused:
                    await client.handshake(n1.local_info(), timeout=5.0)
            async with asyncio.timeout(30):  # n1's peer manager has dialled n0 too, and been refused
                while refusals(n0, "SCHEDULE_MISMATCH") < 2:  # noqa: ASYNC110 - a counter: no event to await
                    await asyncio.sleep(0.05)
            assert n0._peers is not None and n1._peers is not None
            assert (n0._peers.peers, n1._peers.peers) == ({}, {})
    assert refused.value.reason is Reason.SCHEDULE_MISMATCH
    assert f"{n1.node_id!r} runs {their_schedule!r}, {n0.node_id!r} runs {n0.schedule!r}" in refused.value.detail
    assert "--method, --switch-interval, --link-prob and --max-neighbors" in refused.value.detail


# -------------------------------------------------------------------------------------- another fingerprint


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("theirs", "named"),
    [
        ({"seed": 7}, "seed ('node-1' 7, 'node-0' 0) and weights ('node-1' #"),
        ({"init": "torch"}, "init ('node-1' torch, 'node-0' portable) and weights ('node-1' #"),
        ({"lora": LoraSpec(r=2, alpha=8.0)}, "lora ('node-1' r2/a8/d0/query+value, 'node-0' r4/a8/d0/query+value)"),
    ],
    ids=["seed", "init", "lora-r"],
)
async def test_a_node_of_another_fingerprint_is_refused_naming_the_settings_that_differ(
    tmp_path: Path, theirs: dict[str, object], named: str
) -> None:
    """The most common mistake, one node started with another --seed, --init or --lora-r, was refused with two
    hashes: the refusal names the part that differs with each node's value (the weights' digest too where the seed
    or init drew them: `tiny` draws every weight), on both nodes, and in the refused node's status."""
    network = InMemoryNetwork()
    cfg0 = node_config(tmp_path, 0, 2, PeersOption(False, (), ()), min_peers=0)
    async with Node(cfg0, network) as n0:
        cfg1 = node_config(tmp_path, 1, 2, PeersOption(False, (n0.address,), ()), min_peers=0, **theirs)
        async with Node(cfg1, network) as n1:
            assert n1.fingerprint != n0.fingerprint
            async with network.connect(n0.address) as client:
                with pytest.raises(ExchangeRefused) as refused:
                    await client.handshake(n1.local_info(), timeout=5.0)
            async with asyncio.timeout(30):  # n1's peer manager has dialled n0 too, and been refused
                while not n1.status().candidates:  # noqa: ASYNC110 - status has no event to await
                    await asyncio.sleep(0.05)
            [candidate] = n1.status().candidates
    assert refused.value.reason is Reason.FINGERPRINT_MISMATCH
    detail = refused.value.detail
    assert f"'node-1' has model fingerprint {n1.fingerprint[:16]!r}, 'node-0' has model fingerprint " in detail
    assert f"; 'node-1' and 'node-0' differ in {named}" in detail, detail
    assert detail.endswith(": " + SAME_MODEL_FIX)
    assert f"FINGERPRINT_MISMATCH: {detail}" in candidate.reason, candidate
