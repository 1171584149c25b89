"""The serving side of the node protocol: `_Responder` answers each call on protobuf messages (handshake,
exchange, commit, fetch, status, leave) for a `NodeHandler`; both transports drive it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final, TypeVar

from tadlora.node.exchange_stream import _encode_capped, _payload_messages, _receive_chunks, _receive_header
from tadlora.node.limits import (
    DEFAULT_PAYLOAD_TIMEOUT_S,
    MAX_EXCHANGES_PER_CALLER,
    MAX_FETCHES_PER_CALLER,
    MAX_TEXT_CHARS,
)
from tadlora.node.pb_mapping import (
    _header_from_pb,
    _info_from_pb,
    _info_to_pb,
    _reason_to_wire,
    _refusal_message,
    _status_to_pb,
)
from tadlora.node.peer_checks import (
    _check_declared_size,
    _check_identity,
    _check_info,
    _check_node_id,
    _check_peer,
    check_compatible,
    check_sane,
)
from tadlora.node.progress import ExchangeProgress, describe
from tadlora.node.protocol_types import CallEnded, ExchangeHeader, PeerInfo
from tadlora.node.transport import NodeHandler
from tadlora.node.wire import ExchangeRefused, FactorSpec, Payload, PayloadError, Reason, decode_factors
from tadlora.v1 import node_pb2 as pb

if TYPE_CHECKING:
    from tadlora.node.protocol_types import Factors

log = logging.getLogger("tadlora.rpc")

_Reply = TypeVar("_Reply")


# The calls a refusal's log line names its caller for, as it names them.
_CALLS: Final = {
    "handshake": "a handshake",
    "commit": "a commit",
    "leave": "a leave",
    "exchange": "an exchange",
    "fetch": "a fetch",
}


# An identical refusal (the same call, caller, reason and detail) is logged at INFO again only this often. A peer
# refused for its settings (another seed, cluster or schedule) retries its handshake every RETRY_MAX_S (30 s) for as
# long as both run: without this, one such peer wrote a line here every 30 s, for ever. Its repeats go to DEBUG, and
# the next INFO line says how many there were; the refusal counter counts each.
REFUSAL_LOG_QUIET_S: Final = 600.0
_REFUSALS_REMEMBERED: Final = 256  # distinct refusals remembered (the oldest forgotten first): a bound on memory
_DETAIL_KEPT: Final = 1024  # characters of a refusal's detail that tell it from another


class _RefusalLog:
    """Logs refusals on this node's side, an identical one at INFO at most once per `REFUSAL_LOG_QUIET_S`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # (call, caller, reason, detail) -> (when last logged at INFO, repeats since)
        self._seen: collections.OrderedDict[tuple[str, str, str, str], tuple[float, int]] = collections.OrderedDict()

    def refused(self, what: str, caller: str, exc: ExchangeRefused) -> None:
        """Log that ``what`` (as a log line names the call: "a handshake") from ``caller`` was refused."""
        # Cut as the line cuts them: a caller's id is its own to choose, and a refusal may be for its length (a
        # request can be megabytes), so the raw text would make this bound one of count, not of memory.
        key = (what, caller[:MAX_TEXT_CHARS], exc.reason.name, exc.detail[:_DETAIL_KEPT])
        now = self._clock()
        logged, repeats = self._seen.get(key, (-math.inf, 0))
        line = f"refused {what} from {_caller_named(caller)}: {exc.reason.name}: {exc.detail}"
        if now - logged < REFUSAL_LOG_QUIET_S:
            self._seen[key] = (logged, repeats + 1)
            self._seen.move_to_end(key)
            log.debug("%s (again)", line)
            return
        if repeats:
            times = "time" if repeats == 1 else "times"
            line += f" (refused alike {repeats} more {times} since it was last logged, {now - logged:.0f} s ago)"
        log.info("%s", line)
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > _REFUSALS_REMEMBERED:
            self._seen.popitem(last=False)


class _OwnDial(ExchangeRefused):
    """A handshake from this node itself: its own address in another spelling (``localhost``, a host name, the IPv6
    record of a dual-stack name), or another node's advert that names an address of this host. Refused as any caller
    under this node's id is (the caller tells it apart by the reply's ``callee``), and left to the caller to log."""


class _ServiceFault(Exception):
    """The handler failed on a request that has no in-band refusal (Status); the detail is safe to send."""


def _caller_named(who: str) -> str:
    """A caller as a refusal's log line names it: its node id as far as its request said it (quoted, cut to
    `MAX_TEXT_CHARS`: a peer chooses it), or that it is not known yet (a request that did not parse)."""
    return repr(who[:MAX_TEXT_CHARS]) if who else "a caller not yet known"


def _named_by(request: pb.HandshakeRequest | pb.LeaveRequest | None, identity: str | None) -> str:
    """The caller of a handshake or a leave as far as its request names it, else as its certificate does (as for
    exchanges and fetches); "" when neither says."""
    return ("" if request is None else request.caller.node_id) or identity or ""


def _unparsed(what: str) -> PayloadError:
    """The refusal of a request whose bytes did not parse (a transport hands it to `_Responder` as None)."""
    return PayloadError(Reason.BAD_PAYLOAD, f"the {what} request does not parse as tadlora.v1")


class _Responder:
    """The serving side of the protocol on protobuf messages; both transports drive it. A request given as None is
    one whose bytes did not parse: it is refused BAD_PAYLOAD like any other malformed message, in-band where the
    reply can carry a refusal."""

    def __init__(self, handler: NodeHandler, *, max_payload_bytes: int) -> None:
        self._handler = handler
        self._max_payload_bytes = max_payload_bytes
        # Optional: a handler with `observe_refusal(what, exc)` hears of every refusal this side gives (metrics).
        self._observe: Callable[[str, ExchangeRefused], None] | None = getattr(handler, "observe_refusal", None)
        # Optional: a handler with `async_admit_exchange(header)` refuses exchanges from their header (NodeHandler).
        self._admit: Callable[[ExchangeHeader], Awaitable[FactorSpec | None]] | None = getattr(
            handler, "async_admit_exchange", None
        )
        # Optional: a handler with `async_exchange_refused(caller, r)` hears of each exchange refused after its header.
        self._refused_exchange: Callable[[str, int], Awaitable[None]] | None = getattr(
            handler, "async_exchange_refused", None
        )
        # Optional: a handler with `async_commit(caller, r, accept)` counts an answered pair only once it is committed.
        self._commit: Callable[[str, int, bool], Awaitable[None]] | None = getattr(handler, "async_commit", None)
        # Optional: a handler with `observe_served(caller, r, received, sent)` hears the payload sizes of each
        # exchange whose whole reply was handed to the transport (metrics; the pair counts only once committed).
        self._served: Callable[[str, int, int, int], None] | None = getattr(handler, "observe_served", None)
        # Optional: a handler with `async_leave(remote)` drops a peer that says it is stopping (NodeHandler).
        self._leave: Callable[[PeerInfo], Awaitable[None]] | None = getattr(handler, "async_leave", None)
        self._refusal_log = _RefusalLog()
        # Calls in flight, by (call, caller id), from the caller's first message until its reply has been sent.
        self._in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        # Optional: a handler with `payload_timeout_s` bounds how long a caller may take to send its stream.
        self._payload_timeout_s: float = getattr(handler, "payload_timeout_s", DEFAULT_PAYLOAD_TIMEOUT_S)

    @property
    def payload_timeout_s(self) -> float:
        """The most seconds a caller may take to send its exchange stream (the handler's, or the default)."""
        return self._payload_timeout_s

    def _refused(self, what: str, exc: ExchangeRefused, caller: str | None = None) -> None:
        """Log (`_RefusalLog`, naming ``caller``: "" for one not known yet) and observe a refusal of call ``what``;
        None for a call that names no caller (status), whose own line says it."""
        if isinstance(exc, _OwnDial):
            # The calling side says it, naming the entry or advert that led there (`PeerManager._try`).
            log.debug("refused %s from this node itself: %s", _CALLS[what], exc)
        elif caller is not None:
            self._refusal_log.refused(_CALLS[what], caller, exc)
        if self._observe is not None:
            try:
                self._observe(what, exc)
            except Exception:
                log.exception("refusal observer failed")

    async def _exchange_refused(self, caller: str, r: int) -> None:
        if self._refused_exchange is not None:
            try:
                await self._refused_exchange(caller, r)
            except Exception:
                log.exception("refused-exchange observer failed")

    async def _unary(
        self,
        what: str,
        who: Callable[[], str],
        answer: Callable[[], Awaitable[_Reply]],
        refusal: Callable[[pb.RefusalReason, str], _Reply],
    ) -> _Reply:
        """A unary call's reply: ``answer()``'s, or ``refusal(wire reason, detail)`` for an `ExchangeRefused` it
        raises (logged and observed) or for a fault inside this node (logged with its traceback here, sent as
        INTERNAL with no detail of it). ``who()`` names the caller as far as its request said it so far."""
        try:
            return await answer()
        except ExchangeRefused as exc:
            self._refused(what, exc, who())
            return refusal(_reason_to_wire(exc.reason), exc.detail)
        except Exception:
            log.exception("%s from %s failed inside this node", what, _caller_named(who()))
            return refusal(_reason_to_wire(Reason.INTERNAL), "internal error, see the callee's log")

    async def handshake(self, request: pb.HandshakeRequest | None, identity: str | None = None) -> pb.HandshakeReply:
        """``identity``: the caller's authenticated name (its TLS certificate's common name), None without TLS."""
        callee: pb.PeerInfo | None = None  # this node's info once it is had: a refusal carries it too

        async def answer() -> pb.HandshakeReply:
            nonlocal callee
            local = self._handler.local_info()
            callee = _info_to_pb(local)
            if request is None:
                raise _unparsed("handshake")
            if not request.HasField("caller"):
                raise ExchangeRefused(Reason.PROTOCOL_MISMATCH, "handshake carries no caller info")
            remote = _info_from_pb(request.caller)
            _check_info(remote, "handshake caller")
            _check_identity(remote.node_id, identity)
            if (remote.node_id, remote.address) == (local.node_id, local.address):
                raise _OwnDial(Reason.NOT_A_NEIGHBOR, "that is this node's own id")
            check_compatible(local, remote)
            await self._handler.async_handshake(remote)
            return pb.HandshakeReply(accepted=True, callee=callee)

        def refusal(reason: pb.RefusalReason, detail: str) -> pb.HandshakeReply:
            return pb.HandshakeReply(accepted=False, reason=reason, detail=detail, callee=callee)

        return await self._unary("handshake", lambda: _named_by(request, identity), answer, refusal)

    async def exchange(
        self, requests: AsyncIterable[pb.ExchangeMessage], identity: str | None = None
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        # The caller's place (`_one_more`) is held until its reply has been sent: a caller that stops reading its
        # reply holds the call, and the reply's payload, until the connection's age ends it (grpc_transport).
        held = contextlib.ExitStack()
        # (caller, round) once the handler has answered: it holds the caller's factors aside for a commit, which
        # can come only if the whole reply is sent. A reply that fails after that (its encoding, the caller gone
        # mid-reply, its deadline) is noted as refused here at once, so the round does not wait for that commit
        # until its deadline. Safe if the caller did take the reply: its commit then finds nothing and both ends
        # leave the pair out.
        aside: tuple[str, int] | None = None
        received = 0  # the caller's payload, bytes
        who = identity or ""  # the caller's node id, once its header says it (its certificate's before that)
        # How far the caller's payload and our reply got: what a log line says of an exchange cut short.
        progress = ExchangeProgress()

        async def answer() -> tuple[ExchangeHeader, Factors | Payload]:
            local = self._handler.local_info()

            def named(head: pb.ExchangeHeader) -> None:  # before its checks: a refusal of them names whom it refused
                nonlocal who
                who = head.node_id

            def check(head: pb.ExchangeHeader) -> None:
                _check_identity(head.node_id, identity)  # before a byte of payload is read
                _check_peer(head, ours=local)

            # Everything that can refuse an exchange from its header does so before a chunk is read: each payload
            # read costs this node its size twice over (chunks, then joined bytes, then tensors) until decoded.
            iterator = aiter(requests)
            # The caller's stream, header and payload, must arrive within this node's bound, whatever deadline the
            # caller set (or did not): a caller that stops sending would otherwise hold a call slot, and the
            # chunks it sent, until its connection drops.
            deadline = asyncio.get_running_loop().time() + self._payload_timeout_s
            async with self._receiving(deadline, progress):
                head = await _receive_header(iterator, check, from_callee=False, opened=named)
            try:
                held.enter_context(self._one_more("exchange", head.node_id, MAX_EXCHANGES_PER_CALLER))
                expected = self._handler.expected_spec()
                if self._admit is not None and (admitted := await self._admit(_header_from_pb(head))) is not None:
                    expected = admitted
                _check_declared_size(head.total_bytes, expected)
                async with self._receiving(deadline, progress):
                    header, payload = await _receive_chunks(
                        iterator,
                        head,
                        max_payload_bytes=self._max_payload_bytes,
                        from_callee=False,
                        progress=progress.received,
                    )
                nonlocal received
                received = len(payload)
                factors, _ = await asyncio.to_thread(decode_factors, payload, expected)
                # Decoded: its bytes go now, not once the handler has answered, which may mean waiting out this
                # node's training (each caller's bytes would double what its factors cost here meanwhile).
                del payload
                reply = await self._handler.async_exchange(header, factors)
            except (asyncio.CancelledError, CallEnded):  # the caller's deadline (or its stop) ended the call: it
                # will not call again for this round, so the round stops waiting for it now, not at its own deadline
                self._log_cut(
                    f"exchange from {head.node_id!r} for round {head.round} ended before it was answered (the "
                    "caller's deadline or stop, or the transport refused a message of it)",
                    progress,
                )
                await self._exchange_refused(head.node_id, head.round)
                raise
            except Exception:  # a refusal, or a fault here that `_reply` turns into one: the caller gets either
                await self._exchange_refused(head.node_id, head.round)
                raise
            nonlocal aside
            aside = (head.node_id, head.round)
            return ExchangeHeader.from_info(self._handler.local_info(), at_round=header.round), reply

        delivered = False  # the whole reply was handed to the transport, and it was the payload, not a refusal
        with held:
            try:
                last, sent = None, 0
                async with contextlib.aclosing(self._reply("exchange", answer, lambda: who)) as replies:
                    async for last in replies:
                        if last.HasField("header"):
                            progress.sent.size = last.header.total_bytes
                            progress.sent.began = asyncio.get_running_loop().time()
                        yield last
                        sent += len(last.chunk)  # 0 for a header or a refusal
                        progress.sent.moved = sent
                delivered = last is not None and last.WhichOneof("kind") != "refusal"
            finally:
                if aside is not None and not delivered:
                    if progress.sent.began is not None:  # the caller went (its deadline, its stop) mid-reply
                        self._log_cut(
                            f"exchange from {aside[0]!r} for round {aside[1]} ended while this node's reply was on "
                            "its way (the caller's deadline or stop)",
                            progress,
                        )
                    await self._exchange_refused(*aside)
            if aside is not None and delivered and self._served is not None:
                try:
                    self._served(*aside, received, sent)
                except Exception:
                    log.exception("served-exchange observer failed")

    async def commit(self, request: pb.CommitRequest | None, identity: str | None = None) -> pb.CommitReply:
        """End the caller's exchange (see `NodeHandler`): committed, or refused with the reason. ``identity``: the
        caller's authenticated name, None without TLS; a Commit is only ever taken from the exchange's own caller."""

        async def answer() -> pb.CommitReply:
            if request is None:
                raise _unparsed("commit")
            check_sane("commit", round=request.round, degree=0, texts=(request.node_id,))
            _check_node_id(request.node_id, "commit")
            _check_identity(request.node_id, identity)
            if self._commit is not None:
                await self._commit(request.node_id, request.round, request.accept)
            return pb.CommitReply(committed=request.accept)

        def refusal(reason: pb.RefusalReason, detail: str) -> pb.CommitReply:
            return pb.CommitReply(committed=False, reason=reason, detail=detail)

        who = ("" if request is None else request.node_id) or identity or ""
        return await self._unary("commit", lambda: who, answer, refusal)

    async def leave(self, request: pb.LeaveRequest | None, identity: str | None = None) -> pb.LeaveReply:
        """A peer says it is stopping (see `NodeHandler`): dropped, or refused with the reason. ``identity``: the
        caller's authenticated name, None without TLS; a Leave is only ever taken from the node it names, so that no
        one can make this node drop another."""

        async def answer() -> pb.LeaveReply:
            if request is None:
                raise _unparsed("leave")
            if not request.HasField("caller"):
                raise ExchangeRefused(Reason.PROTOCOL_MISMATCH, "leave carries no caller info")
            remote = _info_from_pb(request.caller)
            _check_info(remote, "leave caller")
            _check_identity(remote.node_id, identity)
            check_compatible(self._handler.local_info(), remote)
            if self._leave is not None:
                await self._leave(remote)
            return pb.LeaveReply(dropped=True)

        def refusal(reason: pb.RefusalReason, detail: str) -> pb.LeaveReply:
            return pb.LeaveReply(dropped=False, reason=reason, detail=detail)

        return await self._unary("leave", lambda: _named_by(request, identity), answer, refusal)

    @contextlib.asynccontextmanager
    async def _receiving(self, deadline: float, progress: ExchangeProgress) -> AsyncIterator[None]:
        """Bound reading a caller's stream by ``deadline`` (loop time): DEADLINE once it passes, saying how much of
        it came (``progress``) and, for a link too slow for it, what it needs."""
        try:
            async with asyncio.timeout_at(deadline):
                yield
        except TimeoutError:
            got, _ = describe(progress, asyncio.get_running_loop().time(), self._payload_timeout_s)
            raise ExchangeRefused(
                Reason.DEADLINE, f"the exchange stream did not arrive within {self._payload_timeout_s:g} s: {got}"
            ) from None

    def _log_cut(self, what: str, progress: ExchangeProgress) -> None:
        """Log an exchange the caller ended before it was over, with how far it got: a WARNING where that shows
        the link too slow for the payload (nothing else would say so on this end), else INFO."""
        got, too_slow = describe(progress, asyncio.get_running_loop().time(), self._payload_timeout_s)
        log.log(logging.WARNING if too_slow else logging.INFO, "%s: %s", what, got)

    @contextlib.contextmanager
    def _one_more(self, what: str, caller: str, most: int) -> Iterator[None]:
        """Count a ``what`` call from ``caller`` while it runs; BUSY if it has ``most`` already. Without the cap one
        peer could hold up to the server's concurrent-call limit of payloads here."""
        key = (what, caller)
        if self._in_flight[key] >= most:
            raise ExchangeRefused(
                Reason.BUSY,
                f"{caller[:MAX_TEXT_CHARS]!r} already has {self._in_flight[key]} {what} calls in flight here "
                f"(at most {most})",
            )
        self._in_flight[key] += 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]  # the counter holds only callers with calls running

    async def fetch(
        self, request: pb.FetchRequest | None, identity: str | None = None
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        held = contextlib.ExitStack()  # the caller's place, until its reply has been sent (as in `exchange`)
        who = identity or ""  # the caller's node id, once its request says it (its certificate's before that)

        async def answer() -> tuple[ExchangeHeader, Factors]:
            if request is None:
                raise _unparsed("fetch")
            if not request.HasField("caller"):
                raise ExchangeRefused(Reason.PROTOCOL_MISMATCH, "fetch carries no caller info")
            nonlocal who
            who = request.caller.node_id
            caller = _info_from_pb(request.caller)
            _check_info(caller, "fetch caller")
            _check_identity(caller.node_id, identity)
            check_compatible(self._handler.local_info(), caller)
            held.enter_context(self._one_more("fetch", caller.node_id, MAX_FETCHES_PER_CALLER))
            at_round, factors = await self._handler.async_fetch(caller)
            return ExchangeHeader.from_info(self._handler.local_info(), at_round=at_round), factors

        with held:
            async with contextlib.aclosing(self._reply("fetch", answer, lambda: who)) as replies:
                async for message in replies:
                    yield message

    async def _reply(
        self,
        what: str,
        answer: Callable[[], Awaitable[tuple[ExchangeHeader, Factors | Payload]]],
        caller: Callable[[], str],
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        """Stream ``answer()``'s factors back (header + chunks), or one in-band refusal; ``caller()``: the caller's
        node id as far as ``answer`` got ("" before it knew it), for the log of a refusal."""
        replies: Iterable[pb.ExchangeMessage]
        try:
            own, factors = await answer()
            payload, sha256 = await asyncio.to_thread(_encode_capped, factors, self._max_payload_bytes)
        except CallEnded:  # no one is left to send a refusal to; `answer` logged it if it got as far as a header
            return
        except ExchangeRefused as exc:
            # Plain values: records outlive calls. Named, as handshakes and commits are: this node's log must say whom
            # it refused (the refused end is told why, not this node's operator).
            self._refused(what, exc, caller())
            replies = [_refusal_message(exc)]
        except Exception:
            log.exception("%s failed inside this node", what)
            replies = [_refusal_message(ExchangeRefused(Reason.INTERNAL, "internal error, see the callee's log"))]
        else:
            replies = _payload_messages(own, payload, sha256)
        for message in replies:
            yield message

    def status(self, request: pb.StatusRequest | None) -> pb.StatusReply:
        """The node's status; `PayloadError` (logged and counted) for a request that did not parse, since a
        StatusReply cannot carry a refusal, and `_ServiceFault` if the handler fails."""
        if request is None:
            exc = _unparsed("status")
            log.info("refused a status request: %s: %s", exc.reason.name, exc.detail)
            self._refused("status", exc)
            raise exc
        try:
            return _status_to_pb(self._handler.status())
        except Exception as exc:
            log.exception("status failed inside this node")
            raise _ServiceFault("status failed, see the node's log") from exc
