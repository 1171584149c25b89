"""Hostile input: whatever bytes or field values a peer sends, the decoder, the reassembler and the handshake
answer with the documented refusal (`PayloadError` / `ExchangeRefused` / a refusing reply), never another
exception, and never allocate more than what actually arrived."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import tracemalloc
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadlora.node import exchange_stream, grpc_transport, limits, peer_checks
from tadlora.node.caller import _Caller
from tadlora.node.exchange_stream import _receive_payload
from tadlora.node.limits import MAX_DETAIL_CHARS
from tadlora.node.responder import _Responder
from tadlora.node.rpc import (
    MAX_EXCHANGES_PER_CALLER,
    MAX_TEXT_CHARS,
    PROTOCOL_VERSION,
    ExchangeHeader,
    PeerInfo,
    StatusInfo,
)
from tadlora.node.wire import (
    MAX_CHUNK_BYTES,
    ExchangeRefused,
    FactorSpec,
    PayloadError,
    Reason,
    Reassembler,
    decode_factors,
    digest,
    encode_factors,
)
from tadlora.v1 import node_pb2 as pb

NODE_SRC = Path(__file__).resolve().parents[1] / "node"
CLUSTER, FINGERPRINT = "hostile-test", "f" * 64
SCHEDULE = "tad T=5 p=1.0 max-neighbors=all"
SPEC = FactorSpec({"a": ((2, 3), "float32"), "b": ((3,), "float16")})
SMALL_PEAK = 1 << 20  # bytes: what a refused 100 GB header may cost at most (Python allocations)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------ safetensors payloads by hand


def safetensors_bytes(header: str | bytes, body: bytes = b"", declared_length: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    length = len(raw) if declared_length is None else declared_length
    return struct.pack("<Q", length) + raw + body


def entry(dtype: str, shape: list[int], start: int, end: int) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [start, end]})


def assert_refused(payload: bytes, expected: FactorSpec | None = SPEC) -> PayloadError:
    with pytest.raises(PayloadError) as refused:
        decode_factors(payload, expected)
    return refused.value


def test_a_header_naming_one_tensor_twice_is_refused() -> None:
    body = bytes(24)
    header = '{"a":' + entry("F32", [2, 3], 0, 24) + ',"a":' + entry("F32", [2, 3], 0, 24) + "}"
    refused = assert_refused(safetensors_bytes(header, body), None)
    assert refused.reason is Reason.BAD_PAYLOAD


def test_repeated_metadata_keys_are_refused() -> None:
    header = '{"__metadata__":{"k":"1","k":"2"},"a":' + entry("F32", [1], 0, 4) + "}"
    assert assert_refused(safetensors_bytes(header, bytes(4)), None).reason is Reason.BAD_PAYLOAD


@pytest.mark.parametrize(
    ("what", "payload"),
    [
        ("a 100 GB tensor over 24 bytes", safetensors_bytes('{"a":' + entry("F32", [25_000_000_000], 0, 24) + "}",
                                                            bytes(24))),
        ("offsets past the end", safetensors_bytes('{"a":' + entry("F32", [2, 3], 0, 1 << 40) + "}", bytes(24))),
        ("a header length of 2^63", safetensors_bytes("{}", declared_length=1 << 63)),
        ("a header length past the data", safetensors_bytes('{"a":1}', declared_length=1 << 30)),
        ("an unknown dtype", safetensors_bytes('{"a":' + entry("X9", [2, 3], 0, 24) + "}", bytes(24))),
        ("a negative dimension", safetensors_bytes('{"a":' + entry("F32", [-2, 3], 0, 24) + "}", bytes(24))),
        ("overlapping tensors", safetensors_bytes(
            '{"a":' + entry("F32", [2, 3], 0, 24) + ',"b":' + entry("F16", [3], 0, 6) + "}", bytes(24))),
        ("a header that is a list", safetensors_bytes("[1,2,3]")),
        ("metadata that maps to numbers", safetensors_bytes('{"__metadata__":{"k":1}}')),
        ("not UTF-8", safetensors_bytes(b"\xff\xfe{}")),
    ],
)  # fmt: skip
def test_hand_made_headers_are_refused_without_allocating_what_they_declare(what: str, payload: bytes) -> None:
    tracemalloc.start()
    try:
        assert_refused(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK, f"{what}: {peak} bytes"


@st.composite
def hand_made_payloads(draw: st.DrawFn) -> bytes:
    """Headers of plausible shape with arbitrary dtypes, shapes, offsets and keys, over an arbitrary body."""
    keys = st.sampled_from(["a", "b", "c", "__metadata__", ""])
    dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X9", ""])
    entries = []
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, 64))
        end = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**64)))
        shape = draw(st.lists(st.one_of(st.integers(0, 8), st.integers(-(2**63), 2**64)), max_size=4))
        value = json.dumps({"dtype": draw(dtypes), "shape": shape, "data_offsets": [start, end]})
        entries.append(f"{json.dumps(draw(keys))}:{value}")
    header = "{" + ",".join(entries) + "}"
    body = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    return safetensors_bytes(header, body, length)


@FAST
@given(hand_made_payloads())
def test_hand_made_payloads_raise_nothing_but_payload_error(payload: bytes) -> None:
    with contextlib.suppress(PayloadError):
        factors, _ = decode_factors(payload, SPEC)
        SPEC.check(factors)  # whatever is accepted meets the spec


@FAST
@given(st.binary(max_size=2048), st.integers(0, 2048))
def test_truncated_and_extended_valid_payloads_raise_nothing_but_payload_error(tail: bytes, cut: int) -> None:
    valid = encode_factors({"a": torch.ones(2, 3), "b": torch.ones(3, dtype=torch.float16)})
    for payload in (valid[: max(len(valid) - cut, 0)], valid + tail):
        with contextlib.suppress(PayloadError):
            decode_factors(payload, SPEC)


# ---------------------------------------------------------------------------------------- reassembly


@FAST
@given(
    st.integers(-(2**64), 2**64),
    st.one_of(st.text(max_size=70), st.just(digest(b"x"))),
    st.integers(-(2**32), 2**32),
    st.lists(st.binary(max_size=64), max_size=6),
)
def test_any_header_and_chunks_raise_nothing_but_payload_error(
    total: int, sha256: str, num_chunks: int, chunks: list[bytes]
) -> None:
    with contextlib.suppress(PayloadError):
        assembler = Reassembler(total, sha256, num_chunks)
        for data in chunks:
            assembler.add(data)
        payload = assembler.finish()
        assert len(payload) == total and digest(payload) == sha256


def test_a_declared_100_gb_payload_is_refused_before_anything_is_allocated() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError) as refused:
            Reassembler(100 << 30, digest(b""), (100 << 30) // MAX_CHUNK_BYTES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reason is Reason.TOO_LARGE
    assert peak < SMALL_PEAK


def test_memory_follows_what_arrived_not_what_was_declared() -> None:
    """Even with a cap as large as the declared size, nothing is reserved ahead of the chunks."""
    tracemalloc.start()
    try:
        assembler = Reassembler(100 << 30, digest(b""), (100 << 30) // MAX_CHUNK_BYTES, max_payload_bytes=1 << 40)
        for _ in range(3):
            assembler.add(bytes(64 << 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * (64 << 10) + SMALL_PEAK


def test_tiny_chunks_cost_no_more_memory_than_the_bytes_they_carry() -> None:
    """A peer may cut its payload into chunks as small as it likes; holding them must not cost Python's overhead
    per object on each (~50 bytes to hold a 2-byte chunk: 25 times the payload's size)."""
    size = 256 << 10
    payload = bytes(range(256)) * (size // 256)
    tracemalloc.start()
    try:
        assembler = Reassembler(size, digest(payload), size // 2)
        for start in range(0, size, 2):
            assembler.add(payload[start : start + 2])  # a new object for each chunk, as gRPC gives them
        held, _ = tracemalloc.get_traced_memory()
        assert assembler.finish() == payload
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * size
    assert peak < 3 * size + SMALL_PEAK


@FAST
@given(st.lists(st.sampled_from(["header", "chunk", "refusal", "empty", "garbled"]), max_size=6), st.data())
def test_any_exchange_stream_raises_nothing_but_a_refusal(kinds: list[str], data: st.DataObject) -> None:
    def message(kind: str) -> pb.ExchangeMessage:
        if kind == "header":
            return pb.ExchangeMessage(header=pb.ExchangeHeader(
                protocol_version=data.draw(st.sampled_from([PROTOCOL_VERSION, 0, 2**32 - 1])),
                node_id=data.draw(st.text(max_size=300)), cluster=CLUSTER, fingerprint=FINGERPRINT,
                round=data.draw(st.integers(0, 2**64 - 1)), degree=data.draw(st.integers(0, 2**32 - 1)),
                total_bytes=data.draw(st.integers(0, 2**64 - 1)), sha256=data.draw(st.text(max_size=70)),
                num_chunks=data.draw(st.integers(0, 2**32 - 1)),
                schedule=data.draw(st.one_of(st.just(SCHEDULE), st.text(max_size=300))),
            ))  # fmt: skip
        if kind == "chunk":
            return pb.ExchangeMessage(chunk=data.draw(st.binary(max_size=32)))
        if kind == "refusal":
            return pb.ExchangeMessage(refusal=pb.Refusal(reason=data.draw(st.integers(0, 2**31 - 1)), detail="x"))
        if kind == "garbled":
            with contextlib.suppress(Exception):
                return pb.ExchangeMessage.FromString(data.draw(st.binary(max_size=64)))
        return pb.ExchangeMessage()

    async def stream() -> AsyncGenerator[pb.ExchangeMessage, None]:
        for kind in kinds:
            yield message(kind)

    async def receive() -> None:
        ours = ExchangeHeader(node_id="me", cluster=CLUSTER, fingerprint=FINGERPRINT, round=0, degree=1,
                              schedule=SCHEDULE)  # fmt: skip
        check = lambda head: peer_checks._check_peer(head, ours=ours)  # noqa: E731
        with contextlib.suppress(ExchangeRefused):
            await _receive_payload(stream(), max_payload_bytes=1 << 20, check=check)

    asyncio.run(receive())


# ----------------------------------------------------------------------------------------- handshake


class QuietHandler:
    """A `NodeHandler` that accepts any compatible handshake."""

    info = PeerInfo(node_id="callee", cluster=CLUSTER, fingerprint=FINGERPRINT, address="127.0.0.1:1", degree=1,
                    fingerprint_parts="model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0 "
                    "init=portable weights=#1a03c612")  # fmt: skip

    def local_info(self) -> PeerInfo:
        return self.info

    def expected_spec(self) -> FactorSpec | None:
        return SPEC

    def status(self) -> StatusInfo:
        return StatusInfo(node=self.info)

    async def async_handshake(self, remote: PeerInfo) -> None:
        pass

    async def async_exchange(self, header: ExchangeHeader, factors: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise ExchangeRefused(Reason.NOT_A_NEIGHBOR, "no")

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, dict[str, Any]]:
        raise ExchangeRefused(Reason.NOT_A_NEIGHBOR, "no")


def test_a_declared_size_over_what_the_expected_spec_takes_is_refused_before_a_chunk_is_read() -> None:
    """Under the node's cap but over the most a payload of the expected spec can take: TOO_LARGE from the header."""
    read = 0

    async def requests() -> AsyncGenerator[pb.ExchangeMessage, None]:
        nonlocal read
        read += 1
        total = SPEC.max_payload_bytes() + 1
        yield pb.ExchangeMessage(header=pb.ExchangeHeader(
            protocol_version=PROTOCOL_VERSION, node_id="caller", cluster=CLUSTER, fingerprint=FINGERPRINT, round=0,
            degree=1, total_bytes=total, sha256=digest(b""), num_chunks=-(-total // MAX_CHUNK_BYTES),
        ))  # fmt: skip
        read += 1  # asked for a chunk
        await asyncio.Event().wait()

    async def first_reply() -> pb.ExchangeMessage:
        responder = _Responder(QuietHandler(), max_payload_bytes=1 << 30)
        async with contextlib.aclosing(responder.exchange(requests())) as replies, asyncio.timeout(5):
            return await anext(replies)

    reply = asyncio.run(first_reply())
    assert Reason(reply.refusal.reason) is Reason.TOO_LARGE and read == 1


class ObservingHandler(QuietHandler):
    """`QuietHandler` that records the refusals the server reports giving."""

    def __init__(self) -> None:
        self.refusals: list[Reason] = []

    def observe_refusal(self, what: str, exc: ExchangeRefused) -> None:
        self.refusals.append(exc.reason)


def header_message(total_bytes: int, sha256: str) -> pb.ExchangeMessage:
    return pb.ExchangeMessage(header=pb.ExchangeHeader(
        protocol_version=PROTOCOL_VERSION, node_id="caller", cluster=CLUSTER, fingerprint=FINGERPRINT, round=0,
        degree=1, total_bytes=total_bytes, sha256=sha256, num_chunks=1,
    ))  # fmt: skip


def serve_exchange(handler: QuietHandler, messages: list[pb.ExchangeMessage]) -> list[pb.ExchangeMessage]:
    """What a `_Responder` serving ``handler`` answers to an exchange stream of ``messages``."""

    async def requests() -> AsyncGenerator[pb.ExchangeMessage, None]:
        for message in messages:
            yield message

    async def replies() -> list[pb.ExchangeMessage]:
        responder = _Responder(handler, max_payload_bytes=1 << 20)
        async with contextlib.aclosing(responder.exchange(requests())) as answer, asyncio.timeout(5):
            return [message async for message in answer]

    return asyncio.run(replies())


@pytest.mark.parametrize("after_header", [False, True])
def test_a_caller_sending_a_refusal_is_refused_bad_payload_and_its_refusal_is_not_reflected(after_header: bool) -> None:
    """A caller's stream is a header and chunks. A refusal in it is a malformed stream, not a reason this node gave:
    reflected, its reason would be counted here and its detail (up to gRPC's 4 MiB) logged and sent back."""
    handler = ObservingHandler()
    refusal = pb.ExchangeMessage(refusal=pb.Refusal(reason=Reason.SHUTTING_DOWN, detail="x" * 100_000))
    opening = [header_message(16, digest(bytes(16)))] if after_header else []
    [reply] = serve_exchange(handler, [*opening, refusal])
    assert Reason(reply.refusal.reason) is Reason.BAD_PAYLOAD
    assert len(reply.refusal.detail) < 1000
    assert handler.refusals == [Reason.BAD_PAYLOAD]


def test_a_callees_refusal_detail_is_cut_before_this_node_keeps_or_logs_it() -> None:
    """A callee chooses its refusal's detail (up to gRPC's 4 MiB a message); the caller keeps a bounded prefix."""

    async def replies() -> AsyncGenerator[pb.ExchangeMessage, None]:
        yield pb.ExchangeMessage(refusal=pb.Refusal(reason=Reason.SHUTTING_DOWN, detail="x" * 1_000_000))

    async def receive() -> None:
        await _receive_payload(replies(), max_payload_bytes=1 << 20, check=lambda head: None)

    with pytest.raises(ExchangeRefused) as refused:
        asyncio.run(receive())
    assert refused.value.reason is Reason.SHUTTING_DOWN
    assert refused.value.detail.startswith("xxx") and len(refused.value.detail) <= MAX_DETAIL_CHARS + 20


@pytest.mark.parametrize("stall_after_header", [False, True])
def test_a_caller_that_stops_sending_is_refused_deadline_and_frees_its_place(stall_after_header: bool) -> None:
    """A caller that opens an exchange and then sends nothing more (whatever deadline it set itself) is refused with
    DEADLINE after the callee's `payload_timeout_s`, and its place among its exchanges in flight is freed."""
    handler = ObservingHandler()
    handler.payload_timeout_s = 0.2  # type: ignore[attr-defined]

    async def stalled() -> AsyncGenerator[pb.ExchangeMessage, None]:
        if stall_after_header:
            yield header_message(16, digest(bytes(16)))
        await asyncio.Event().wait()  # never sends (more)
        yield pb.ExchangeMessage()  # pragma: no cover

    async def scenario() -> list[pb.ExchangeMessage]:
        responder = _Responder(handler, max_payload_bytes=1 << 20)
        replies = []
        for _ in range(MAX_EXCHANGES_PER_CALLER + 1):  # a place held for good would refuse the last one BUSY
            async with contextlib.aclosing(responder.exchange(stalled())) as answer, asyncio.timeout(5):
                replies.append(await anext(answer))
        return replies

    replies = asyncio.run(scenario())
    assert [Reason(r.refusal.reason) for r in replies] == [Reason.DEADLINE] * (MAX_EXCHANGES_PER_CALLER + 1)
    assert "did not arrive within 0.2 s" in replies[0].refusal.detail
    assert handler.refusals == [Reason.DEADLINE] * (MAX_EXCHANGES_PER_CALLER + 1)


class AdmittingHandler(QuietHandler):
    """Takes any decodable payload at large (no `expected_spec`), but admits each exchange with `SPEC`."""

    def __init__(self) -> None:
        self.given: dict[str, torch.Tensor] | None = None

    def expected_spec(self) -> FactorSpec | None:
        return None

    async def async_admit_exchange(self, header: ExchangeHeader) -> FactorSpec:
        return SPEC

    async def async_exchange(self, header: ExchangeHeader, factors: dict[str, torch.Tensor]) -> dict[str, Any]:
        self.given = factors
        return factors


def test_a_payload_off_the_spec_its_exchange_was_admitted_with_is_refused_bad_payload() -> None:
    handler = AdmittingHandler()
    payload = encode_factors({"c": torch.zeros(2, 3), "d": torch.zeros(3, dtype=torch.float16)})  # SPEC's size
    assert len(payload) <= SPEC.max_payload_bytes()
    [reply] = serve_exchange(
        handler, [header_message(len(payload), digest(payload)), pb.ExchangeMessage(chunk=payload)]
    )
    assert Reason(reply.refusal.reason) is Reason.BAD_PAYLOAD and "differ from the spec" in reply.refusal.detail
    assert handler.given is None


texts = st.one_of(st.text(max_size=40), st.text(min_size=MAX_TEXT_CHARS + 1, max_size=MAX_TEXT_CHARS + 2),
                  st.just("x" * 100_000), st.just(CLUSTER), st.just(FINGERPRINT))  # fmt: skip
# `fingerprint_parts` texts that parse, with values of any length up to the text cap: each differing part is echoed
# in a refusal's detail.
parts_texts = st.lists(
    st.tuples(st.sampled_from(["model", "labels", "lora", "seed", "init", "weights"]),
              st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=120)),
    unique_by=lambda kv: kv[0], min_size=1,
).map(lambda kvs: " ".join(f"{k}={v}" for k, v in kvs)[:MAX_TEXT_CHARS])  # fmt: skip


@st.composite
def garbled_infos(draw: st.DrawFn) -> pb.PeerInfo:
    return pb.PeerInfo(
        protocol_version=draw(st.sampled_from([PROTOCOL_VERSION, 0, 2, 2**32 - 1])),
        cluster=draw(texts), fingerprint=draw(texts), node_id=draw(texts), address=draw(texts), method=draw(texts),
        schedule=draw(texts), fingerprint_parts=draw(st.one_of(texts, parts_texts)),
        round=draw(st.sampled_from([0, 1, 2**40, 2**40 + 1, 2**63, 2**64 - 1])),
        degree=draw(st.sampled_from([0, 1, 1024, 1025, 2**31, 2**32 - 1])),
        insecure=draw(st.booleans()),
    )  # fmt: skip


@FAST
@given(garbled_infos(), st.booleans())
def test_garbled_handshakes_are_answered_with_a_reply_never_an_exception(info: pb.PeerInfo, present: bool) -> None:
    responder = _Responder(QuietHandler(), max_payload_bytes=1 << 20)
    request = pb.HandshakeRequest(caller=info) if present else pb.HandshakeRequest()
    reply = asyncio.run(responder.handshake(request))
    if reply.accepted:
        assert (info.cluster, info.fingerprint, info.protocol_version) == (CLUSTER, FINGERPRINT, PROTOCOL_VERSION)
        texts = (info.node_id, info.address, info.method, info.schedule, info.fingerprint_parts)
        assert max(len(text) for text in texts) <= MAX_TEXT_CHARS
        assert info.round <= limits.MAX_ROUND and info.degree <= limits.MAX_DEGREE
    else:
        assert reply.reason not in (Reason.UNSPECIFIED, Reason.INTERNAL), reply.detail
        assert len(reply.detail) < 1000  # the detail never echoes a huge field back


class ScriptedCaller(_Caller):
    """A caller whose 'peer' answers with a given reply."""

    def __init__(self, reply: pb.HandshakeReply) -> None:
        super().__init__("peer.test:1", max_payload_bytes=1 << 20)
        self.reply = reply

    async def _call_handshake(self, request: pb.HandshakeRequest, timeout: float) -> pb.HandshakeReply:
        return self.reply

    async def _call_status(self, timeout: float) -> pb.StatusReply:
        raise NotImplementedError

    def _call_exchange(self, requests: Iterator[pb.ExchangeMessage], timeout: float) -> Any:
        raise NotImplementedError

    def _call_fetch(self, request: pb.FetchRequest, timeout: float) -> Any:
        raise NotImplementedError

    async def _call_commit(self, request: pb.CommitRequest, timeout: float) -> pb.CommitReply:
        raise NotImplementedError

    async def _call_leave(self, request: pb.LeaveRequest, timeout: float) -> pb.LeaveReply | None:
        return self.leave_reply

    leave_reply: pb.LeaveReply | None = None

    async def aclose(self) -> None:
        pass


@FAST
@given(st.booleans(), st.integers(0, 2**31 - 1), st.text(max_size=5000))
def test_garbled_leave_replies_raise_nothing_but_a_refusal(dropped: bool, reason: int, detail: str) -> None:
    """A stopping node's `Leave` reply, whatever it holds: taken (True), or a refusal with a bounded detail."""
    caller = ScriptedCaller(pb.HandshakeReply())
    caller.leave_reply = pb.LeaveReply(dropped=dropped, reason=reason, detail=detail)  # type: ignore[arg-type]
    try:
        assert asyncio.run(caller.leave(QuietHandler.info, timeout=1.0)) is dropped
    except ExchangeRefused as exc:
        assert not dropped and len(exc.detail) <= MAX_TEXT_CHARS


@FAST
@given(garbled_infos(), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_garbled_handshake_replies_raise_nothing_but_a_refusal(
    info: pb.PeerInfo, accepted: bool, present: bool, reason: int
) -> None:
    reply = pb.HandshakeReply(accepted=accepted, reason=reason, detail="d")  # type: ignore[arg-type]
    if present:
        reply.callee.CopyFrom(info)
    with contextlib.suppress(ExchangeRefused):
        remote = asyncio.run(ScriptedCaller(reply).handshake(QuietHandler.info, timeout=1.0))
        assert remote.cluster == CLUSTER and len(remote.node_id) <= MAX_TEXT_CHARS


class ReplyingCaller(ScriptedCaller):
    """A caller whose 'peer' answers every exchange and fetch with the given messages, and takes every Commit."""

    def __init__(self, replies: list[pb.ExchangeMessage]) -> None:
        super().__init__(pb.HandshakeReply())
        self.replies = replies
        self.commits: list[tuple[int, bool]] = []

    async def _stream(self) -> AsyncGenerator[pb.ExchangeMessage, None]:
        for message in self.replies:
            yield message

    def _call_exchange(self, requests: Iterator[pb.ExchangeMessage], timeout: float) -> Any:
        return self._stream()

    def _call_fetch(self, request: pb.FetchRequest, timeout: float) -> Any:
        return self._stream()

    async def _call_commit(self, request: pb.CommitRequest, timeout: float) -> pb.CommitReply:
        self.commits.append((request.round, request.accept))
        return pb.CommitReply(committed=request.accept)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("cluster", "other-cluster", Reason.CLUSTER_MISMATCH),
        ("fingerprint", "e" * 64, Reason.FINGERPRINT_MISMATCH),
        ("schedule", "lora T=none p=0.5 max-neighbors=all", Reason.SCHEDULE_MISMATCH),
        ("protocol_version", PROTOCOL_VERSION + 1, Reason.PROTOCOL_MISMATCH),
        ("round", 4, Reason.ROUND_MISMATCH),
        ("round", 6, Reason.ROUND_MISMATCH),
        (None, None, None),
    ],
    ids=["cluster", "fingerprint", "schedule", "protocol", "earlier round", "later round", "compatible"],
)
def test_a_reply_from_a_node_this_one_may_not_mix_with_is_refused_by_the_caller(
    field: str | None, value: object, reason: Reason | None
) -> None:
    """The callee's header is checked as the caller's is at the callee: a node of another cluster, model, schedule
    or protocol, or a reply for another round than the one asked, is never mixed (exchange) or adopted (fetch, whose
    reply is the callee's own round), and an exchange reply refused is un-committed. The in-process tests only ever
    meet callees that refuse such a caller first."""
    factors = {"a": torch.ones(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    payload = encode_factors(factors)
    callee = ExchangeHeader(node_id="callee", cluster=CLUSTER, fingerprint=FINGERPRINT, round=5, degree=1,
                            schedule=SCHEDULE)  # fmt: skip
    replies = list(exchange_stream._payload_messages(callee, payload, digest(payload)))
    if field is not None:
        setattr(replies[0].header, field, value)
    ours = PeerInfo(node_id="me", cluster=CLUSTER, fingerprint=FINGERPRINT, address="", round=5, degree=1,
                    schedule=SCHEDULE)  # fmt: skip

    async def scenario() -> tuple[ExchangeRefused | None, ExchangeRefused | None, list[tuple[int, bool]]]:
        caller = ReplyingCaller(replies)
        outcomes: list[ExchangeRefused | None] = []
        for call in (
            caller.exchange(ExchangeHeader.from_info(ours), factors, 5.0, SPEC),
            caller.fetch(ours, 5.0, SPEC),
        ):
            try:
                await call
                outcomes.append(None)
            except ExchangeRefused as exc:
                outcomes.append(exc)
        return outcomes[0], outcomes[1], caller.commits

    exchanged, fetched, commits = asyncio.run(scenario())
    if reason is None:
        assert exchanged is None and fetched is None and commits == []
        return
    assert exchanged is not None and exchanged.reason is reason, exchanged
    assert commits == [(5, False)]  # the callee holds the pair aside until told: told to leave it out
    if field == "round":
        assert fetched is None  # a fetch asks for whatever round the callee is in
    else:
        assert fetched is not None and fetched.reason is reason, fetched


# ------------------------------------------------------------------------------ gRPC limits, no pickle


def _as_dict(options: Any) -> dict[str, Any]:
    return dict(options or ())


def test_grpc_limits_are_set_explicitly_on_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real = grpc.aio.server

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(options=_as_dict(kwargs.get("options")), max_rpcs=kwargs.get("maximum_concurrent_rpcs"))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", spy)

    async def start_stop() -> None:
        async with grpc_transport.RpcServer(QuietHandler()):
            pass

    asyncio.run(start_stop())
    options = seen["options"]
    assert options["grpc.max_receive_message_length"] == limits.GRPC_MAX_MESSAGE_BYTES
    assert options["grpc.max_send_message_length"] == limits.GRPC_MAX_MESSAGE_BYTES
    assert options["grpc.max_concurrent_streams"] == limits.GRPC_MAX_CONCURRENT_STREAMS
    assert options["grpc.keepalive_time_ms"] == limits.GRPC_SERVER_KEEPALIVE_MS
    assert options["grpc.keepalive_timeout_ms"] == limits.GRPC_KEEPALIVE_TIMEOUT_MS
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == limits.GRPC_MIN_PING_INTERVAL_MS
    assert seen["max_rpcs"] == limits.GRPC_MAX_CONCURRENT_RPCS
    # Connections end after an age and a grace, which is what bounds a caller that never reads its reply; the grace
    # outlasts any honest call in flight at the end: its stream and its reply each take up to the payload timeout.
    assert options["grpc.max_connection_age_ms"] == grpc_transport.GRPC_MAX_CONNECTION_AGE_MS
    assert options["grpc.max_connection_age_grace_ms"] >= 2_000 * limits.DEFAULT_PAYLOAD_TIMEOUT_S
    assert limits.GRPC_MAX_MESSAGE_BYTES > MAX_CHUNK_BYTES  # a chunk and its framing always fit


@pytest.mark.parametrize("secure", [False, True])
def test_grpc_limits_are_set_explicitly_on_the_client(monkeypatch: pytest.MonkeyPatch, secure: bool) -> None:
    seen: dict[str, Any] = {}
    real = grpc.aio.secure_channel if secure else grpc.aio.insecure_channel

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(_as_dict(kwargs.get("options")))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "secure_channel" if secure else "insecure_channel", spy)

    async def connect() -> None:
        creds = grpc.ssl_channel_credentials() if secure else None
        client = grpc_transport.PeerClient("127.0.0.1:1", credentials=creds)
        client._node_stub()
        await client.aclose()

    asyncio.run(connect())
    assert seen["grpc.max_receive_message_length"] == limits.GRPC_MAX_MESSAGE_BYTES
    assert seen["grpc.max_send_message_length"] == limits.GRPC_MAX_MESSAGE_BYTES
    assert seen["grpc.keepalive_time_ms"] == limits.GRPC_CLIENT_KEEPALIVE_MS
    assert seen["grpc.keepalive_timeout_ms"] == limits.GRPC_KEEPALIVE_TIMEOUT_MS
    # The client pings no more often than the server tolerates, or the server would drop it.
    assert limits.GRPC_CLIENT_KEEPALIVE_MS >= limits.GRPC_MIN_PING_INTERVAL_MS


_UNSAFE = re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.|(?<![\w.])torch\.load\(|\bcloudpickle\b|\bdill\b")


def test_no_code_under_node_unpickles_checkpoints_and_payloads_load_with_safetensors() -> None:
    assert _UNSAFE.search("x = torch.load(path)") and _UNSAFE.search("import pickle")
    assert not _UNSAFE.search("safetensors.torch.load(data)")
    offenders = [
        f"{path.relative_to(NODE_SRC)}:{number}: {line.strip()}"
        for path in sorted(NODE_SRC.rglob("*.py"))
        if "/v1/" not in path.as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _UNSAFE.search(line)
    ]
    assert not offenders, offenders
    assert "safetensors" in (NODE_SRC / "tadlora" / "node" / "state.py").read_text(encoding="utf-8")
