"""The gRPC transport of the node protocol: `RpcServer` (with health checking and reflection, and optionally a
plaintext health-only port for probes that cannot do mutual TLS), `PeerClient`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any, Final, Protocol, Self, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tadlora.node.caller import _Caller
from tadlora.node.limits import (
    _CHANNEL_OPTIONS,
    _SERVER_OPTIONS,
    DEFAULT_GRACE_S,
    GRPC_MAX_CONCURRENT_RPCS,
    MAX_DETAIL_CHARS,
)
from tadlora.node.pb_mapping import _cut, _peer_refusal
from tadlora.node.protocol_types import NODE_SERVICE_NAME, BindError, CallEnded, PeerTimeout, PeerUnavailable
from tadlora.node.responder import _Responder, _ServiceFault
from tadlora.node.tls import TLS_SERVER_NAME, TlsMaterial
from tadlora.node.transport import NodeHandler
from tadlora.node.wire import MAX_PAYLOAD_BYTES, ExchangeRefused, PayloadError, Reason
from tadlora.v1 import node_pb2 as pb
from tadlora.v1 import node_pb2_grpc as pb_grpc

__all__ = ["GrpcTransport", "PeerClient", "RpcServer", "readable_details"]

log = logging.getLogger("tadlora.rpc")

_Message = TypeVar("_Message")

# A connection to the server lives this long (gRPC adds up to 10% jitter), then gets a GOAWAY: its client reconnects
# for new calls, and the calls in flight get the grace below before the connection is closed under them. gRPC flow
# control holds a server's write until its caller reads, and grpc.aio cannot end one server call by itself, so this is
# what stops a caller that never reads its reply (keepalive keeps its connection up) from holding a call slot and the
# reply's payload for good.
GRPC_MAX_CONNECTION_AGE_MS: Final = 10 * 60_000  # ms (10 min); a reconnection (TCP + TLS) that often costs little
GRPC_MIN_CONNECTION_AGE_GRACE_MS: Final = 120_000  # ms; twice a catch-up Fetch's 60 s, whatever the payload timeout


def _certified_name(context: grpc.aio.ServicerContext) -> str | None:
    """The node id the caller's verified TLS certificate names: its common name, if that is also one of its DNS
    names (else "", which no node id equals); None on a plaintext server. A caller checks its callee by a DNS
    name (`PeerClient`), so a certificate whose common name were another node's would speak for one node and
    answer for another; `tls.issue` writes the node id in both."""
    auth = context.auth_context()
    names = auth.get("x509_common_name")  # b"" for a certificate without one
    if not names:
        return None
    name = names[0].decode()
    return name if name.encode() in auth.get("peer_dns", []) else ""


# gRPC names an IPv6 peer in its errors by URI, its brackets (and a zone's %) escaped: ipv6:%5B::1%5D:7070.
_ESCAPED_IPV6 = re.compile(r"ipv6:%5B([0-9A-Fa-f:.]+(?:%25[^%\s]+)?)%5D")


def readable_details(details: str) -> str:
    """gRPC's error text with the IPv6 addresses it escapes as URIs written as --peers writes them:
    ``ipv6:%5B::1%5D:7070`` -> ``ipv6:[::1]:7070``."""
    return _ESCAPED_IPV6.sub(lambda m: f"ipv6:[{m[1].replace('%25', '%')}]", details)


class _CallState(Protocol):
    """What `_Parsed` asks of a call: the part of `grpc.aio.ServicerContext` that says whether the call is over."""

    def cancelled(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


class _Parsed(AsyncIterator[pb.ExchangeMessage]):
    """A caller's exchange stream, read through. grpc.aio parses each message as it is read and raises the parser's
    DecodeError from the read: a message that does not parse is the caller's defect (BAD_PAYLOAD, refused as any
    other), not a fault inside this node. A stream that ends because its call did raises `CallEnded`."""

    def __init__(self, messages: AsyncIterable[pb.ExchangeMessage], context: _CallState) -> None:
        self._messages = aiter(messages)
        self._context = context

    async def __anext__(self) -> pb.ExchangeMessage:
        try:
            return await anext(self._messages)
        except StopAsyncIteration:
            # grpc.aio ends the read of a call whose deadline passed (or that its caller cancelled) as if the caller
            # had sent its last message, and only then cancels the handler: read as the end of the stream, a payload
            # cut short by a slow link's deadline would be refused as malformed (BAD_PAYLOAD, "payload truncated").
            remaining = self._context.time_remaining()
            if self._context.cancelled() or (remaining is not None and remaining <= 0):
                raise CallEnded from None
            raise
        except DecodeError as exc:
            raise PayloadError(Reason.BAD_PAYLOAD, f"a message that does not parse as tadlora.v1: {exc}") from None


class _CheckOnly(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpcio-health ships no types
    """grpc.health.v1 for the unauthenticated health port: ``Check`` answers as ``servicer`` does; ``Watch`` is
    UNIMPLEMENTED, because its streams stay open, and anyone who can connect could hold all of the port's few call
    slots (`_HEALTH_MAX_RPCS`) with them and fail every probe. Probes (kubelet's gRPC probe, grpc_health_probe)
    call ``Check``."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self._servicer = servicer

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return await self._servicer.Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not served on the health-only port: use Check")


def _or_none(parse: Callable[[bytes], _Message]) -> Callable[[bytes], _Message | None]:
    """``parse``, giving None for bytes that do not parse instead of raising."""

    def deserialize(data: bytes) -> _Message | None:
        try:
            return parse(data)
        except DecodeError:
            return None

    return deserialize


def _unary(behaviour: Callable[..., Any], request: Any, reply: Any) -> grpc.RpcMethodHandler:
    """A unary-unary handler whose request reaches ``behaviour`` as None when it does not parse."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=_or_none(request.FromString), response_serializer=reply.SerializeToString
    )


def _node_handlers(servicer: _NodeServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The Node service's methods by name, as the generated `add_NodeServicer_to_server` builds them, except that a
    unary request that does not parse reaches the servicer as None. grpc.aio parses it before the servicer runs, and
    left to itself fails the call UNKNOWN and logs the parser's error as a fault of this server; the protocol
    refuses a message that does not parse (BAD_PAYLOAD), in-band where the reply can carry a refusal. Exchange's
    messages are parsed as they are read, where `_Parsed` refuses them."""
    return {
        "Handshake": _unary(servicer.Handshake, pb.HandshakeRequest, pb.HandshakeReply),
        "Exchange": grpc.stream_stream_rpc_method_handler(
            servicer.Exchange,
            request_deserializer=pb.ExchangeMessage.FromString,
            response_serializer=pb.ExchangeMessage.SerializeToString,
        ),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch,
            request_deserializer=_or_none(pb.FetchRequest.FromString),
            response_serializer=pb.ExchangeMessage.SerializeToString,
        ),
        "Status": _unary(servicer.Status, pb.StatusRequest, pb.StatusReply),
        "Commit": _unary(servicer.Commit, pb.CommitRequest, pb.CommitReply),
        "Leave": _unary(servicer.Leave, pb.LeaveRequest, pb.LeaveReply),
    }


def _add_node_servicer(servicer: _NodeServicer, server: grpc.aio.Server) -> None:
    """Register the Node service (`_node_handlers`) on ``server``."""
    handlers = _node_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(NODE_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(NODE_SERVICE_NAME, handlers)


class _NodeServicer(pb_grpc.NodeServicer):
    """The Node service over `_Responder`; a request given as None did not parse (see `_add_node_servicer`)."""

    def __init__(self, responder: _Responder) -> None:
        self._responder = responder

    async def Handshake(
        self, request: pb.HandshakeRequest | None, context: grpc.aio.ServicerContext
    ) -> pb.HandshakeReply:
        return await self._responder.handshake(request, _certified_name(context))

    async def Exchange(
        self, request_iterator: AsyncIterable[pb.ExchangeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        requests = _Parsed(request_iterator, context)
        async with contextlib.aclosing(self._responder.exchange(requests, _certified_name(context))) as replies:
            async for message in replies:
                yield message

    async def Commit(self, request: pb.CommitRequest | None, context: grpc.aio.ServicerContext) -> pb.CommitReply:
        return await self._responder.commit(request, _certified_name(context))

    async def Leave(self, request: pb.LeaveRequest | None, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        return await self._responder.leave(request, _certified_name(context))

    async def Fetch(
        self, request: pb.FetchRequest | None, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        async with contextlib.aclosing(self._responder.fetch(request, _certified_name(context))) as replies:
            async for message in replies:
                yield message

    async def Status(self, request: pb.StatusRequest | None, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        try:
            return self._responder.status(request)
        except ExchangeRefused as exc:  # a StatusReply cannot carry a refusal: the status code does (see PeerClient)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.detail)
            raise  # unreachable: abort raises
        except _ServiceFault as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
            raise  # unreachable: abort raises


class RpcServer:
    """The Node service with gRPC health checking and reflection; `async with RpcServer(handler) as s: s.port`."""

    def __init__(
        self,
        handler: NodeHandler,
        listen: str = "127.0.0.1:0",
        *,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        grace_s: float = DEFAULT_GRACE_S,
        credentials: grpc.ServerCredentials | None = None,
        health_listen: str | None = None,
    ) -> None:
        """``health_listen``: HOST:PORT of a second, always plaintext server with only grpc.health.v1 (the same
        status as the main server's), for probes that cannot present a client certificate; None: none."""
        self.listen = listen
        self.health_listen = health_listen
        self._credentials = credentials  # None: plaintext (the node only allows that with --insecure)
        self._responder = _Responder(handler, max_payload_bytes=max_payload_bytes)
        self._grace_s = grace_s
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port = 0
        self._health_port = 0

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("RpcServer is not started")
        return self._port

    @property
    def address(self) -> str:
        """host:port as bound (the real port when `listen` asked for port 0)."""
        return f"{self.listen.rpartition(':')[0]}:{self.port}"

    @property
    def health_address(self) -> str | None:
        """host:port of the plaintext health server as bound; None without ``health_listen``."""
        if self.health_listen is None:
            return None
        if not self._health_port:
            raise RuntimeError("RpcServer is not started")
        return f"{self.health_listen.rpartition(':')[0]}:{self._health_port}"

    async def start(self) -> None:
        """Bind and serve; `BindError` if an address cannot be bound. A start that does not end serving (that,
        another error, its cancellation) leaves nothing listening: its owner holds no server to close then, and
        `async with` does not call ``__aexit__`` when ``__aenter__`` raises."""
        if self._server is not None:
            raise RuntimeError("RpcServer already started")
        # The grace covers an honest call in flight at the GOAWAY: its stream may take the payload timeout to
        # arrive, and the reply as long to be read.
        grace_ms = max(GRPC_MIN_CONNECTION_AGE_GRACE_MS, round(2_000 * self._responder.payload_timeout_s))
        options = (
            *_SERVER_OPTIONS,
            ("grpc.max_connection_age_ms", GRPC_MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", grace_ms),
        )
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=GRPC_MAX_CONCURRENT_RPCS)
        servicer = health.aio.HealthServicer()
        _add_node_servicer(_NodeServicer(self._responder), server)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection((NODE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = await _bind_and_start(server, self.listen, self._credentials)
        health_server: grpc.aio.Server | None = None
        try:
            if self.health_listen is not None:
                # Only grpc.health.v1, never the Node service: plaintext here must not open a way around mutual TLS.
                health_server = grpc.aio.server(options=_SERVER_OPTIONS, maximum_concurrent_rpcs=_HEALTH_MAX_RPCS)
                health_pb2_grpc.add_HealthServicer_to_server(_CheckOnly(servicer), health_server)
                self._health_port = await _bind_and_start(health_server, self.health_listen, None)
            for service in ("", NODE_SERVICE_NAME):
                await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            self._health_port = 0
            try:
                await server.stop(None)
            finally:
                if health_server is not None:  # a no-op if `_bind_and_start` stopped it already
                    await health_server.stop(None)
            raise
        self._server, self._health_server, self._health, self._port = server, health_server, servicer, port
        log.info("serving %s on %s", NODE_SERVICE_NAME, self.address)
        if self.health_listen is not None:
            log.info("serving %s (plaintext, health only) on %s", health.SERVICE_NAME, self.health_address)

    async def aclose(self, grace: float = DEFAULT_GRACE_S) -> None:
        """Report NOT_SERVING, then stop, giving in-flight calls `grace` seconds; cancelled, stop at once, ending
        the calls in flight. Safe to call twice."""
        server, self._server = self._server, None
        health_server, self._health_server = self._health_server, None
        if server is None:
            return
        try:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            await server.stop(grace)
        except BaseException:
            # grpc.aio leaves a server whose stop was cancelled serving the calls in flight, and this object no
            # longer holds it: nothing would ever end them.
            await server.stop(None)
            raise
        finally:
            # After the main server: probes see NOT_SERVING, not a refused connection, while calls drain.
            if health_server is not None:
                await health_server.stop(None)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose(self._grace_s)


_HEALTH_MAX_RPCS = 16  # concurrent calls on the health-only port: probes are one call every few seconds


async def _bind_and_start(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``listen`` (plaintext without ``credentials``) and start ``server``; the bound port. BindError if it
    cannot bind; then, or if this is cancelled, the server is stopped (no caller holds it yet)."""
    try:
        port = int(
            server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
        )
    except RuntimeError as exc:  # grpcio >= 1.60 raises; older versions returned 0
        port, detail = 0, str(exc)
    else:
        detail = "gRPC could not bind the address"
    # Started even when unbound: grpcio 1.85 can segfault garbage-collecting a never-started server. Shielded:
    # grpc.aio's start, cancelled while it waits for its serving loop to begin, breaks that loop (InvalidStateError),
    # and the stop after it fails; so a start always runs to its end, and a cancellation stops the server after it.
    starting = asyncio.ensure_future(server.start())
    try:
        await asyncio.shield(starting)
        if not port:
            raise BindError(listen, detail)
    except BaseException:
        await asyncio.wait((starting,))
        await server.stop(None)
        raise
    return port


class PeerClient(_Caller):
    """A gRPC channel to one peer at "host:port"; insecure unless `credentials` are given."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        server_name: str | None = None,
    ) -> None:
        """``server_name``: the node id this connection is for; with ``credentials`` its certificate must name it,
        and in any case the node that answers must say it is that one (None: any node of the cluster)."""
        super().__init__(address, max_payload_bytes=max_payload_bytes, node_id=server_name)
        self._credentials = credentials
        self._server_name = server_name or TLS_SERVER_NAME
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.NodeStub | None = None
        self._closed = False

    def _node_stub(self) -> pb_grpc.NodeStub:
        if self._closed:
            # Closed by its owner, e.g. the peer was dropped while another task still held this connection:
            # for that caller it is a transport failure like any other, not a programming error.
            raise PeerUnavailable(self.address, "connection closed (the peer was dropped)")
        if self._stub is None:  # created on first use, inside the event loop that will drive it
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            else:
                # Peers are dialled by IP; their certificates are checked against the cluster CA and, instead of
                # the address, against the node id we expect there (a DNS name in its certificate) or, before we
                # know it, the fixed name every node certificate carries.
                options = (*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", self._server_name))
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=options)
            self._stub = pb_grpc.NodeStub(self._channel)
        return self._stub

    def _failure(self, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return PeerTimeout(self.address, "no answer before the deadline")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ExchangeRefused(Reason.PROTOCOL_MISMATCH, f"{self.address} does not serve {NODE_SERVICE_NAME}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # How a callee refuses a request whose reply has no place for a refusal (Status): a refusal like any
            # other for the caller, not a peer that is down.
            return _peer_refusal(Reason.BAD_PAYLOAD, exc.details() or "")
        # Cut as a refusal's detail is: the peer (or what answers at its address) chose it, and it is logged and
        # kept as the candidate's reason that this node's own status shows.
        return PeerUnavailable(
            self.address, f"{code.name}: {_cut(readable_details(exc.details() or ''), MAX_DETAIL_CHARS)}"
        )

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn a call's gRPC failure into the protocol's errors. Also: grpc.aio cancels the calls of a channel that
        is closed (e.g. the peer was dropped by another task) by raising CancelledError in their awaiters; unless
        our own task is being cancelled, that is a transport failure for the caller, reported as PeerUnavailable."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Our task was cancelled (a Ctrl-C in `status`, a node stopping) while grpc.aio finished the call
                # with a failure of its own: the cancellation wins, or the caller would handle a peer failure and
                # go on, the cancellation lost.
                raise asyncio.CancelledError from exc
            raise self._failure(exc) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise PeerUnavailable(self.address, "connection closed during the call") from None

    def _parsed(self, message: _Message | None) -> _Message:
        """``message``, or BAD_PAYLOAD for None: what grpc.aio hands back for a message that does not parse (it
        logs the parser's error and goes on), which would otherwise fail as None deep in the protocol code."""
        if message is None:
            raise PayloadError(Reason.BAD_PAYLOAD, f"{self.address} sent a message that does not parse as tadlora.v1")
        return message

    async def _stream(self, call: Any) -> AsyncGenerator[pb.ExchangeMessage, None]:
        try:
            with self._translated():
                async for message in call:
                    yield self._parsed(message)
        finally:
            call.cancel()  # a no-op once finished; stops the upload when we stop reading early

    async def _call_handshake(self, request: pb.HandshakeRequest, timeout: float) -> pb.HandshakeReply:
        with self._translated():
            reply: pb.HandshakeReply | None = await self._node_stub().Handshake(request, timeout=timeout)
        return self._parsed(reply)

    async def _call_commit(self, request: pb.CommitRequest, timeout: float) -> pb.CommitReply:
        with self._translated():
            reply: pb.CommitReply | None = await self._node_stub().Commit(request, timeout=timeout)
        return self._parsed(reply)

    async def _call_leave(self, request: pb.LeaveRequest, timeout: float) -> pb.LeaveReply | None:
        with self._translated():
            try:
                reply: pb.LeaveReply | None = await self._node_stub().Leave(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                # A node of an earlier release serves the Node service without Leave: gRPC answers UNIMPLEMENTED for
                # the method alone, and that peer is as good a peer as before (unlike a server that lacks the whole
                # service, which a handshake refuses PROTOCOL_MISMATCH). Not while cancelled: `_translated` decides.
                task = asyncio.current_task()
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED or (task is not None and task.cancelling()):
                    raise
                return None
        return self._parsed(reply)

    async def _call_status(self, timeout: float) -> pb.StatusReply:
        with self._translated():
            reply: pb.StatusReply | None = await self._node_stub().Status(pb.StatusRequest(), timeout=timeout)
        return self._parsed(reply)

    def _call_exchange(
        self, requests: Iterator[pb.ExchangeMessage], timeout: float
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        return self._stream(self._node_stub().Exchange(requests, timeout=timeout))

    def _call_fetch(self, request: pb.FetchRequest, timeout: float) -> AsyncGenerator[pb.ExchangeMessage, None]:
        return self._stream(self._node_stub().Fetch(request, timeout=timeout))

    async def aclose(self) -> None:
        """Close the channel, cancelling calls in flight. Safe to call twice."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()


class GrpcTransport:
    """`Transport` over gRPC: `serve` gives an `RpcServer`, `connect` a `PeerClient`."""

    def __init__(
        self,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        health_port: int | None = None,
    ) -> None:
        """``health_port``: servers also serve grpc.health.v1 alone, in plaintext, on this port of their listen
        host (see `RpcServer`); None: not."""
        self._credentials = credentials
        self._server_credentials = server_credentials
        self._max_payload_bytes = max_payload_bytes
        self._health_port = health_port

    @property
    def health_port(self) -> int | None:
        """The port its servers serve grpc.health.v1 on (None: not served)."""
        return self._health_port

    @classmethod
    def with_tls(
        cls, material: TlsMaterial, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES, health_port: int | None = None
    ) -> GrpcTransport:
        """Mutual TLS on both ends with the cluster CA in ``material``."""
        return cls(
            credentials=material.channel_credentials(),
            server_credentials=material.server_credentials(),
            max_payload_bytes=max_payload_bytes,
            health_port=health_port,
        )

    def serve(self, handler: NodeHandler, listen: str, *, max_payload_bytes: int | None = None) -> RpcServer:
        return RpcServer(
            handler,
            listen,
            max_payload_bytes=max_payload_bytes or self._max_payload_bytes,
            credentials=self._server_credentials,
            health_listen=None if self._health_port is None else f"{listen.rpartition(':')[0]}:{self._health_port}",
        )

    def connect(self, address: str, node_id: str | None = None) -> PeerClient:
        return PeerClient(
            address, credentials=self._credentials, max_payload_bytes=self._max_payload_bytes, server_name=node_id
        )
