"""An exchange on a link too slow for the adapter: it runs into the round's deadline every round, so each end must
say so, with how far it got and what --exchange-timeout it needs, count it, and keep the peer (a slow peer is not a
gone one). The maths of the estimate on literal inputs; the ends with a stream that stalls where the test says."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tadlora.node.grpc_transport import RpcServer, _Parsed
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.progress import ExchangeProgress, Transfer, describe, size_text
from tadlora.node.protocol_types import CallEnded
from tadlora.node.responder import _Responder
from tadlora.node.rpc import NODE_SERVICE_NAME, PROTOCOL_VERSION, ExchangeHeader, PeerInfo, PeerTimeout, StatusInfo
from tadlora.node.wire import MAX_CHUNK_BYTES, ExchangeRefused, FactorSpec, Reason
from tadlora.v1 import node_pb2 as pb
from test_daemon_faults import PEER_ID, SilentPeer, lone_node, scripted_peer

MiB = 1 << 20
SHORT_TIMEOUT_S = 0.5  # s; a round's exchange that cannot finish runs into it at once


def metric(node: Any, name: str, **labels: str) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


# ------------------------------------------------------------------------------------------------ the estimate


def test_an_exchange_cut_mid_reply_says_what_it_needs_at_the_rate_the_reply_came() -> None:
    # Measured on a 1 Mbit/s link (tbf): 1 MiB each way, the caller's payload took 8.8 s to arrive, the reply
    # was cut by a 10 s deadline 1.2 s into it.
    progress = ExchangeProgress(
        sent=Transfer(size=MiB, moved=MiB, began=0.0, ended=4.2),
        received=Transfer(size=MiB, moved=150_000, began=8.8),
    )
    text, too_slow = describe(progress, 10.0, 10.0)
    assert too_slow
    assert "1.0 MiB of 1.0 MiB sent, 146.5 KiB of 1.0 MiB received at 1 Mbit/s" in text
    assert "need ~17 s on the link" in text and "--exchange-timeout 26 (or more) on every node" in text


def test_a_payload_that_stalls_at_the_callee_is_estimated_with_the_reply_as_large_as_it() -> None:
    # 0.5 MiB of 1 MiB in 10 s: 0.5 MiB still to come and a reply of 1 MiB, at 0.05 MiB/s.
    progress = ExchangeProgress(received=Transfer(size=MiB, moved=MiB // 2, began=0.0))
    text, too_slow = describe(progress, 10.0, 10.0)
    assert too_slow and "need ~40 s" in text and "--exchange-timeout 60 " in text


def test_an_exchange_with_no_measured_rate_or_one_fast_enough_gives_no_advice() -> None:
    nothing_back = ExchangeProgress(sent=Transfer(size=MiB, moved=MiB, began=0.0, ended=1.0))
    assert describe(nothing_back, 10.0, 10.0) == ("1.0 MiB of 1.0 MiB sent, nothing received yet", False)
    # The reply came fast; the deadline was spent waiting for the peer's training, not on the link.
    fast = ExchangeProgress(
        sent=Transfer(size=MiB, moved=MiB, began=0.0, ended=0.1),
        received=Transfer(size=MiB, moved=MiB - 1, began=9.9),
    )
    text, too_slow = describe(fast, 10.0, 10.0)
    assert not too_slow and "--exchange-timeout" not in text


def test_sizes_read_as_a_person_writes_them() -> None:
    assert [size_text(n) for n in (0, 812, 64 << 10, 1_049_696, 5 << 30)] == [
        "0 B", "812 B", "64.0 KiB", "1.0 MiB", "5.0 GiB",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the callee


class _Callee:
    """The least `NodeHandler` a `_Responder` needs, with a short payload timeout."""

    payload_timeout_s = SHORT_TIMEOUT_S
    info = PeerInfo(node_id="callee", cluster="c", fingerprint="f" * 32, address="")

    def local_info(self) -> PeerInfo:
        return self.info

    def expected_spec(self) -> FactorSpec | None:
        return None

    def status(self) -> StatusInfo:
        return StatusInfo(node=self.info)

    async def async_handshake(self, remote: PeerInfo) -> None:
        pass

    async def async_exchange(self, header: ExchangeHeader, factors: Any) -> Any:
        return factors

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, Any]:
        raise AssertionError("not called")


async def _stalling_stream(
    chunks_sent: int, chunks_declared: int, stalled: asyncio.Event | None = None
) -> AsyncIterator[pb.ExchangeMessage]:
    """A caller's stream whose link carries ``chunks_sent`` of its ``chunks_declared`` full chunks, then nothing
    (``stalled`` is set once the callee has taken those and asks for more)."""
    yield pb.ExchangeMessage(
        header=pb.ExchangeHeader(
            protocol_version=PROTOCOL_VERSION, node_id="caller", cluster="c", fingerprint="f" * 32, round=0,
            degree=1, total_bytes=chunks_declared * MAX_CHUNK_BYTES, sha256="0" * 64, num_chunks=chunks_declared,
        )
    )  # fmt: skip
    for _ in range(chunks_sent):
        yield pb.ExchangeMessage(chunk=bytes(MAX_CHUNK_BYTES))
    if stalled is not None:
        stalled.set()
    await asyncio.Event().wait()  # the rest is still on a slow link
    raise AssertionError("unreachable")


@pytest.mark.asyncio
async def test_a_caller_s_payload_that_does_not_arrive_in_time_is_refused_saying_how_much_came_and_what_it_needs() -> (
    None
):
    responder = _Responder(_Callee(), max_payload_bytes=64 * MiB)
    async with asyncio.timeout(30):
        replies = [m async for m in responder.exchange(_stalling_stream(1, 8))]
    [reply] = replies
    assert reply.refusal.reason == Reason.DEADLINE
    # The deadline passed with 1 of 8 MiB here: 16 MiB (with the reply) at that rate need 16 times as long.
    assert "1.0 MiB of 8.0 MiB received" in reply.refusal.detail
    assert "the link is too slow for this adapter; set --exchange-timeout" in reply.refusal.detail


@pytest.mark.asyncio
async def test_a_caller_that_gives_up_on_a_slow_payload_is_logged_with_how_much_of_it_came(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller's deadline (its call cancelled) comes before this end's own: this end is told nothing by the
    caller, so its own log is where its operator learns the link is too slow."""
    caplog.set_level(logging.INFO, logger="tadlora.rpc")
    callee = _Callee()
    callee.payload_timeout_s = 600.0  # this end's own deadline is far off: the caller's comes first
    stalled = asyncio.Event()
    replies = _Responder(callee, max_payload_bytes=64 * MiB).exchange(_stalling_stream(1, 2, stalled))
    serving = asyncio.ensure_future(anext(aiter(replies)))
    async with asyncio.timeout(30):
        await stalled.wait()  # the first MiB has been taken
    serving.cancel()  # what gRPC does to a call whose caller cancelled it
    with pytest.raises(asyncio.CancelledError):
        await serving
    [line] = [r for r in caplog.records if "ended before it was answered" in r.getMessage()]
    assert "1.0 MiB of 2.0 MiB received" in line.getMessage()


class _Recording(_Callee):
    """A `_Callee` that records the refusals it is told of and the exchanges it is told to stop waiting for."""

    def __init__(self) -> None:
        self.refusals: list[tuple[str, Reason]] = []
        self.left_out: list[tuple[str, int]] = []

    def observe_refusal(self, what: str, exc: ExchangeRefused) -> None:
        self.refusals.append((what, exc.reason))

    async def async_exchange_refused(self, caller: str, r: int) -> None:
        self.left_out.append((caller, r))


async def _cut_stream(chunks_sent: int, chunks_declared: int) -> AsyncIterator[pb.ExchangeMessage]:
    """A caller's stream whose call ends (its deadline, its cancel) after ``chunks_sent`` of ``chunks_declared``
    chunks, as the gRPC transport's read reports it."""
    async for message in _stalling_stream(chunks_sent, chunks_declared, asyncio.Event()):
        yield message
        if message.HasField("chunk"):
            chunks_sent -= 1
            if chunks_sent == 0:
                raise CallEnded


@pytest.mark.asyncio
async def test_a_caller_s_stream_cut_by_its_call_ending_is_logged_as_cut_not_refused_as_truncated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Measured through a 1 Mbit/s link: grpc.aio sometimes ends the read of a call whose deadline passed before it
    cancels the handler, so the stream looked finished and the payload was refused BAD_PAYLOAD "payload truncated",
    counted as a malformed peer, without the slow link's advice. A cut stream is logged as cut, with how far it
    got, and neither refused nor counted."""
    caplog.set_level(logging.INFO, logger="tadlora.rpc")
    callee = _Recording()
    callee.payload_timeout_s = 600.0  # the caller's deadline comes first
    async with asyncio.timeout(30):
        replies = [m async for m in _Responder(callee, max_payload_bytes=64 * MiB).exchange(_cut_stream(1, 2))]
    assert replies == []  # nobody is left to read a refusal
    assert callee.refusals == []
    assert callee.left_out == [("caller", 0)]  # the round stops waiting for the caller's commit
    [line] = [r for r in caplog.records if "ended before it was answered" in r.getMessage()]
    assert "1.0 MiB of 2.0 MiB received" in line.getMessage()
    assert not [r for r in caplog.records if r.getMessage().startswith("refused") or r.levelno >= logging.ERROR]


class _Call:
    """The state of a gRPC call as `grpc.aio.ServicerContext` reports it."""

    def __init__(self, remaining: float | None, cancelled: bool = False) -> None:
        self.remaining, self._cancelled = remaining, cancelled

    def cancelled(self) -> bool:
        return self._cancelled

    def time_remaining(self) -> float | None:
        return self.remaining


async def _one_message() -> AsyncIterator[pb.ExchangeMessage]:
    yield pb.ExchangeMessage(chunk=b"x")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("call", "ended"),
    [(_Call(None), False), (_Call(5.0), False), (_Call(0.0), True), (_Call(None, cancelled=True), True)],
    ids=["no-deadline", "deadline-ahead", "deadline-passed", "cancelled"],
)
async def test_the_grpc_read_tells_a_caller_s_last_message_from_its_call_ending(call: _Call, ended: bool) -> None:
    """What grpc.aio's read reports as the end of the stream is the caller's last message unless the call is over
    (at the end of the stream above, its deadline had passed: time_remaining() was 0, cancelled() False)."""
    messages = _Parsed(_one_message(), call)
    assert (await anext(messages)).chunk == b"x"
    with pytest.raises(CallEnded if ended else StopAsyncIteration):
        await anext(messages)


@pytest.mark.asyncio
async def test_a_grpc_caller_whose_deadline_passes_mid_payload_is_never_refused_as_malformed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same through gRPC: the caller's deadline passes with half its payload sent. Either way grpc.aio ends the
    call (the handler cancelled, or its read ended first), the cut is logged and no refusal is given."""
    caplog.set_level(logging.INFO, logger="tadlora.rpc")
    callee = _Recording()
    callee.payload_timeout_s = 600.0
    async with RpcServer(callee, "127.0.0.1:0") as server, grpc.aio.insecure_channel(server.address) as channel:
        call = channel.stream_stream(f"/{NODE_SERVICE_NAME}/Exchange")(
            (m.SerializeToString() async for m in _stalling_stream(1, 2)), timeout=SHORT_TIMEOUT_S
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        async with asyncio.timeout(30):
            while not callee.left_out:  # noqa: ASYNC110 - the handler's end, on the server's side
                await asyncio.sleep(0.01)
    assert callee.refusals == []
    assert [r for r in caplog.records if "ended before it was answered" in r.getMessage()]
    assert not [r for r in caplog.records if r.getMessage().startswith("refused")]


# ------------------------------------------------------------------------------------------------ the caller


@pytest.mark.asyncio
async def test_an_exchange_that_runs_into_the_round_s_deadline_is_said_and_counted_every_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that answers handshakes but whose exchanges never finish in time (a link too slow for the adapter
    looks the same from here): each round says so at WARNING and counts it, and the peer stays a peer."""
    caplog.set_level(logging.INFO, logger="tadlora")
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=2, exchange_timeout=SHORT_TIMEOUT_S) as node,
        scripted_peer(node, net, SilentPeer),
    ):
        async with asyncio.timeout(60):
            await node.run()
        assert node._peers is not None and PEER_ID in node._peers.peers  # slow is not gone
        assert metric(node, "tadlora_exchanges_total", result="timeout") == 2
    said = [r for r in caplog.records if "did not finish within --exchange-timeout" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING] * 2
    assert all(PEER_ID in r.getMessage() and "sent" in r.getMessage() for r in said)
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


class _TimingOut:
    """A connection whose exchange fills in some progress and then runs into the transport's deadline."""

    address = "10.0.0.9:7070"

    async def exchange(self, *args: Any, **kwargs: Any) -> Any:
        progress = args[4] if len(args) > 4 else kwargs["progress"]
        progress.sent = Transfer(size=MiB, moved=MiB // 4, began=0.0)
        raise PeerTimeout(self.address, "no answer before the deadline")

    async def leave(self, info: PeerInfo, timeout: float) -> bool:
        raise PeerTimeout(self.address, "no answer before the deadline")

    async def aclose(self) -> None:
        pass


@pytest.mark.asyncio
async def test_an_exchange_that_times_out_in_the_transport_keeps_the_peer_and_says_how_far_it_got(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC's deadline and the round's are the same instant; when gRPC's fires first, the call fails with
    `PeerTimeout`. That is the same slow exchange as one the round cut, not a peer that is down: it was dropped
    ("peer ... unavailable"), re-dialled with backoff, and missed more rounds for being slow."""
    caplog.set_level(logging.INFO, logger="tadlora")
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net) as node:
        assert node._peers is not None
        info = PeerInfo(node_id=PEER_ID, cluster=node.config.cluster, fingerprint=node.fingerprint,
                        address=_TimingOut.address)  # fmt: skip
        await node._peers.add(info, _TimingOut(), "static")  # type: ignore[arg-type]
        cur = await node.rounds.open(dict(node.factors), frozenset({PEER_ID}))
        loop = asyncio.get_running_loop()
        await node._exchange_with(PEER_ID, cur, loop.time() + 30, ExchangeProgress())
        assert PEER_ID in node._peers.peers
        assert metric(node, "tadlora_exchanges_total", result="timeout") == 1
    [said] = [r for r in caplog.records if "did not finish within --exchange-timeout" in r.getMessage()]
    assert said.levelno == logging.WARNING and "256.0 KiB of 1.0 MiB sent" in said.getMessage()


class _SlowLink:
    """A connection on a link too slow for the payload: an exchange's reply begins (its header came) and then stalls
    until the round's deadline cuts it; a handshake, queued behind what is left of it, does not get through."""

    address = "10.0.0.9:7070"

    def __init__(self) -> None:
        self.handshakes = 0

    async def exchange(self, *args: Any, **kwargs: Any) -> Any:
        progress = args[4] if len(args) > 4 else kwargs["progress"]
        now = asyncio.get_running_loop().time()
        progress.sent = Transfer(size=MiB, moved=MiB, began=now, ended=now)
        progress.received = Transfer(size=MiB, moved=MiB // 8, began=now)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def handshake(self, info: PeerInfo, timeout: float) -> PeerInfo:
        self.handshakes += 1
        raise PeerTimeout(self.address, "no answer before the deadline")

    async def leave(self, info: PeerInfo, timeout: float) -> bool:
        raise PeerTimeout(self.address, "no answer before the deadline")  # queued behind the cut exchange too

    async def aclose(self) -> None:
        pass


async def _settle(node: Any) -> None:
    """Until the liveness checks a round spawned (if any) are over."""
    async with asyncio.timeout(30):
        await asyncio.sleep(0.05)
        while node._probing:  # noqa: ASYNC110 - a set the checks empty
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_callee_whose_reply_began_before_the_deadline_is_not_checked_nor_dropped(tmp_path: Path) -> None:
    """Measured on a 1 Mbit/s link: the check of a neighbour left out of the round (a 5 s handshake) queued behind
    the rest of the cut exchange, ran out, and dropped a peer that had been answering all along; it then missed the
    rounds until it was verified again. A callee whose reply began this round is alive: it is not checked."""
    net = InMemoryNetwork()
    link = _SlowLink()
    async with lone_node(tmp_path, net, rounds=None, exchange_timeout=SHORT_TIMEOUT_S) as node:
        assert node._peers is not None
        info = PeerInfo(node_id=PEER_ID, cluster=node.config.cluster, fingerprint=node.fingerprint,
                        address=_SlowLink.address, schedule=node.schedule)  # fmt: skip
        await node._peers.add(info, link, "static")  # type: ignore[arg-type]
        for _ in range(2):
            async with asyncio.timeout(60):
                await node._run_round(node.round)
        await _settle(node)
        assert PEER_ID in node._peers.peers and link.handshakes == 0
        assert metric(node, "tadlora_probes_total", why="missed") == 0
        assert metric(node, "tadlora_exchanges_total", result="timeout") == 2


@pytest.mark.asyncio
async def test_a_caller_whose_header_came_this_round_is_not_checked_but_one_that_never_called_is(
    tmp_path: Path,
) -> None:
    """The callee's side of the same link: the caller's header came (its payload then stalled, and its call was
    cut). It is alive, so it is not checked; in a round it does not call at all, it is, and, not answering, dropped."""
    net = InMemoryNetwork()
    link = _SlowLink()
    caller = "a-9"  # sorts before "node-0": it calls the node
    async with lone_node(tmp_path, net, rounds=None, exchange_timeout=SHORT_TIMEOUT_S) as node:
        assert node._peers is not None
        info = PeerInfo(node_id=caller, cluster=node.config.cluster, fingerprint=node.fingerprint,
                        address=_SlowLink.address, schedule=node.schedule)  # fmt: skip
        await node._peers.add(info, link, "static")  # type: ignore[arg-type]
        header = ExchangeHeader(node_id=caller, cluster=node.config.cluster, fingerprint=node.fingerprint,
                                round=node.round, degree=1, schedule=node.schedule)  # fmt: skip
        running = asyncio.ensure_future(node._run_round(node.round))
        await node.async_admit_exchange(header)  # its header came; the rest of its stream never does
        async with asyncio.timeout(60):
            await running
        await _settle(node)
        assert caller in node._peers.peers and link.handshakes == 0
        async with asyncio.timeout(60):
            await node._run_round(node.round)  # it does not call: checked, and dropped for not answering
        await _settle(node)
        assert link.handshakes == 1 and caller not in node._peers.peers
        assert metric(node, "tadlora_probes_total", why="missed") == 1
