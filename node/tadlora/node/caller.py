"""The calling side of the node protocol: `_Caller` makes each call (handshake, exchange, commit, fetch, status,
leave) on protobuf messages and checks the answers; each transport subclasses it to carry the messages.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Self

from tadlora.node.exchange_stream import _encode_capped, _payload_messages, _receive_payload
from tadlora.node.pb_mapping import _info_from_pb, _info_to_pb, _peer_refusal, _status_from_pb
from tadlora.node.peer_checks import _check_answerer, _check_declared_size, _check_info, _check_peer, check_compatible
from tadlora.node.progress import ExchangeProgress
from tadlora.node.protocol_types import (
    ExchangeHeader,
    ExchangeResult,
    OwnAddress,
    PeerInfo,
    PeerUnavailable,
    ReplyRefused,
    StatusInfo,
)
from tadlora.node.wire import ExchangeRefused, FactorSpec, Payload, Reason, decode_factors
from tadlora.v1 import node_pb2 as pb

if TYPE_CHECKING:
    from tadlora.node.protocol_types import Factors


class _Caller(abc.ABC):
    """The calling side of the protocol; subclasses carry the messages. Methods raise `ExchangeRefused`
    (the peer, or this side, refused), `PeerUnavailable`/`PeerTimeout` (transport), never anything else
    for a peer's misbehaviour."""

    def __init__(self, address: str, *, max_payload_bytes: int, node_id: str | None = None) -> None:
        """``node_id``: the node this connection is meant to reach; an answer from any other is refused
        (IDENTITY_MISMATCH). None: whoever answers (an address dialled before we know its node)."""
        self.address = address
        self.node_id = node_id
        self._max_payload_bytes = max_payload_bytes

    async def handshake(self, info: PeerInfo, timeout: float) -> PeerInfo:
        """Introduce `info` to the peer; return the peer's own info if it accepted, is compatible and is the node
        this connection was made for."""
        reply = await self._call_handshake(pb.HandshakeRequest(caller=_info_to_pb(info)), timeout)
        if not reply.accepted:
            # This node itself answered: its own id at its own address. Its id at another address is another node
            # started under it (a copied --out, a --node-id given twice): a refusal like any other, logged.
            callee = _info_from_pb(reply.callee) if reply.HasField("callee") else None
            if callee is not None and (callee.node_id, callee.address) == (info.node_id, info.address):
                raise OwnAddress(Reason.NOT_A_NEIGHBOR, f"{self.address} is this node itself")
            raise _peer_refusal(reply.reason, reply.detail)
        if not reply.HasField("callee"):
            raise ExchangeRefused(Reason.PROTOCOL_MISMATCH, f"{self.address} accepted without saying who it is")
        remote = _info_from_pb(reply.callee)
        _check_info(remote, f"{self.address}'s handshake reply")
        _check_answerer(remote.node_id, self.node_id, self.address)
        check_compatible(info, remote)
        return remote

    async def exchange(
        self,
        header: ExchangeHeader,
        factors: Factors | Payload,
        timeout: float,
        expected: FactorSpec | None = None,
        progress: ExchangeProgress | None = None,
    ) -> ExchangeResult:
        """Push `factors` (or their `Payload`) for `header.round`; pull the peer's factors for that round, checked
        against `expected`.

        The exchange is not over until `commit`: the callee holds the pair aside until then. A reply refused here
        (`ExchangeRefused`) is un-committed on the way out, so that the callee leaves the pair out at once.
        ``progress`` is filled in as the payloads go and come, for the caller to say how far a cut one got."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        progress = progress if progress is not None else ExchangeProgress()
        payload, sha256 = await asyncio.to_thread(_encode_capped, factors, self._max_payload_bytes)
        progress.sent.size, progress.sent.began = len(payload), loop.time()
        answered = False  # the callee sent a reply header: it holds our factors aside, awaiting a commit

        def opened(_: pb.ExchangeHeader) -> None:  # before the header's checks: one they refuse was an answer too
            nonlocal answered
            answered = True

        def check_reply(head: pb.ExchangeHeader) -> None:
            _check_answerer(head.node_id, self.node_id, self.address)
            _check_peer(head, ours=header)
            if head.round != header.round:
                raise ExchangeRefused(Reason.ROUND_MISMATCH, f"asked for round {header.round}, got {head.round}")
            _check_declared_size(head.total_bytes, expected)

        remaining = max(timeout - (loop.time() - started), 0.0)
        sent = len(payload)
        replies = self._call_exchange(_payload_messages(header, payload, sha256, progress.sent), remaining)
        # The request stream holds our payload until it is sent, and lets go of it then: the reply's bytes and
        # tensors need not sit beside it.
        del payload
        try:
            async with contextlib.aclosing(replies):
                peer, reply = await _receive_payload(
                    replies,
                    max_payload_bytes=self._max_payload_bytes,
                    check=check_reply,
                    opened=opened,
                    progress=progress.received,
                )
            reply_bytes = len(reply)
            received, _ = await asyncio.to_thread(decode_factors, reply, expected)
        except ExchangeRefused:
            if answered:  # best effort: without it the callee waits for a commit until its round's deadline
                with contextlib.suppress(ExchangeRefused, PeerUnavailable):
                    await self.commit(header, False, max(timeout - (loop.time() - started), 0.0))
            raise
        return ExchangeResult(
            peer=peer,
            factors=received,
            bytes_sent=sent,
            bytes_received=reply_bytes,
            elapsed_s=loop.time() - started,
        )

    async def commit(self, header: ExchangeHeader, accept: bool, timeout: float) -> None:
        """End the round-``header.round`` exchange made with ``header``: ``accept`` tells the callee to mix the pair
        (returns once it has; `ExchangeRefused` if it will not, e.g. its round closed meanwhile, and then neither
        end mixes it), or to leave it out (the reply was refused here). Transport failures raise `PeerUnavailable`:
        then whether the callee mixed the pair is unknown (see docs/protocol.md)."""
        request = pb.CommitRequest(node_id=header.node_id, round=header.round, accept=accept)
        reply = await self._call_commit(request, timeout)
        if accept and not reply.committed:
            raise _peer_refusal(reply.reason, reply.detail)

    async def fetch(self, info: PeerInfo, timeout: float, expected: FactorSpec | None = None) -> ExchangeResult:
        """Pull the peer's current round and start-of-round factors (catch-up); `result.peer.round` is that round."""
        loop = asyncio.get_running_loop()
        started = loop.time()

        def check_reply(head: pb.ExchangeHeader) -> None:
            _check_answerer(head.node_id, self.node_id, self.address)
            _check_peer(head, ours=info)
            _check_declared_size(head.total_bytes, expected)

        replies = self._call_fetch(pb.FetchRequest(caller=_info_to_pb(info)), timeout)
        async with contextlib.aclosing(replies):
            peer, reply = await _receive_payload(replies, max_payload_bytes=self._max_payload_bytes, check=check_reply)
        received, _ = await asyncio.to_thread(decode_factors, reply, expected)
        return ExchangeResult(
            peer=peer, factors=received, bytes_sent=0, bytes_received=len(reply), elapsed_s=loop.time() - started
        )

    async def status(self, timeout: float) -> StatusInfo:
        """The peer's status (`_status_from_pb` bounds it); `ReplyRefused` (BAD_PAYLOAD) if what it says of itself
        would be refused in a handshake, as its status is printed and compared."""
        status = _status_from_pb(await self._call_status(timeout))
        try:
            _check_info(status.node, f"{self.address}'s status reply")
        except ExchangeRefused as exc:
            raise ReplyRefused(exc.reason, exc.detail) from None
        return status

    async def leave(self, info: PeerInfo, timeout: float) -> bool:
        """Tell the peer that the node ``info`` describes is stopping, so that it drops it now. True once it has;
        False from a peer that does not serve Leave (an earlier release of protocol 2: it finds out as before).
        `ExchangeRefused` if it refused (e.g. it does not count this node as a peer), `PeerUnavailable` if it did
        not answer."""
        reply = await self._call_leave(pb.LeaveRequest(caller=_info_to_pb(info)), timeout)
        if reply is None:
            return False
        if not reply.dropped:
            raise _peer_refusal(reply.reason, reply.detail)
        return True

    @abc.abstractmethod
    def _call_fetch(self, request: pb.FetchRequest, timeout: float) -> AsyncGenerator[pb.ExchangeMessage, None]: ...

    @abc.abstractmethod
    async def _call_handshake(self, request: pb.HandshakeRequest, timeout: float) -> pb.HandshakeReply: ...

    @abc.abstractmethod
    async def _call_status(self, timeout: float) -> pb.StatusReply: ...

    @abc.abstractmethod
    async def _call_commit(self, request: pb.CommitRequest, timeout: float) -> pb.CommitReply: ...

    @abc.abstractmethod
    async def _call_leave(self, request: pb.LeaveRequest, timeout: float) -> pb.LeaveReply | None:
        """The peer's reply; None when it does not serve Leave (gRPC UNIMPLEMENTED: an earlier release)."""

    @abc.abstractmethod
    def _call_exchange(
        self, requests: Iterator[pb.ExchangeMessage], timeout: float
    ) -> AsyncGenerator[pb.ExchangeMessage, None]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
