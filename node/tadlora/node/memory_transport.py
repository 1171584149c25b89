"""The in-memory transport of the node protocol: the same protocol code and bytes as gRPC, without sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, Self, TypeVar

from tadlora.node.caller import _Caller
from tadlora.node.limits import DEFAULT_GRACE_S, GRPC_MAX_MESSAGE_BYTES
from tadlora.node.protocol_types import BindError, PeerTimeout, PeerUnavailable
from tadlora.node.responder import _Responder, _ServiceFault
from tadlora.node.transport import NodeHandler
from tadlora.node.wire import MAX_PAYLOAD_BYTES
from tadlora.v1 import node_pb2 as pb

__all__ = ["InMemoryClient", "InMemoryNetwork", "InMemoryServer"]

_T = TypeVar("_T")


def _over_the_wire(message: _T, parse: Callable[[bytes], _T], address: str) -> _T:
    """Serialize and parse, as a network would: the peers share no objects and gRPC's size limit applies."""
    data = message.SerializeToString()  # type: ignore[attr-defined]
    if len(data) > GRPC_MAX_MESSAGE_BYTES:
        raise PeerUnavailable(address, f"RESOURCE_EXHAUSTED: message of {len(data)} bytes is over the limit")
    return parse(data)


class _Replay(AsyncIterator[_T]):
    """Messages already sent, read back as a stream."""

    def __init__(self, items: Iterable[_T]) -> None:
        self._items = iter(items)

    async def __anext__(self) -> _T:
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None


class InMemoryNetwork:
    """`Transport` inside one process: servers register by address, clients reach them through the protocol code
    and the bytes a gRPC peer would see, so node logic can be unit-tested without sockets."""

    def __init__(self, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self._max_payload_bytes = max_payload_bytes
        self._servers: dict[str, InMemoryServer] = {}
        self._next_port = 1

    def serve(
        self, handler: NodeHandler, listen: str = "127.0.0.1:0", *, max_payload_bytes: int | None = None
    ) -> InMemoryServer:
        return InMemoryServer(self, handler, listen, max_payload_bytes=max_payload_bytes or self._max_payload_bytes)

    def connect(self, address: str, node_id: str | None = None) -> InMemoryClient:
        # No authentication in memory (nothing here can hold a certificate); ``node_id`` is checked against the ids
        # the node there answers with, as on gRPC.
        return InMemoryClient(self, address, max_payload_bytes=self._max_payload_bytes, node_id=node_id)

    def _bind(self, server: InMemoryServer, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        if port == "0":  # like a kernel: hand out a port nobody in this network uses
            while f"{host}:{self._next_port}" in self._servers:
                self._next_port += 1
            port = str(self._next_port)
        address = f"{host}:{port}"
        if address in self._servers:
            raise BindError(listen, "address already in use")
        self._servers[address] = server
        return address

    def _unbind(self, server: InMemoryServer, address: str) -> None:
        # Only ``server``'s own binding: once it is closed, another server may have taken the address.
        if self._servers.get(address) is server:
            del self._servers[address]

    def _lookup(self, address: str) -> InMemoryServer:
        try:
            return self._servers[address]
        except KeyError:
            raise PeerUnavailable(address, "UNAVAILABLE: connection refused (nothing serves there)") from None


class InMemoryServer:
    """A node served on an `InMemoryNetwork`. Server-side work runs in tasks this server owns and cancels."""

    def __init__(self, network: InMemoryNetwork, handler: NodeHandler, listen: str, *, max_payload_bytes: int) -> None:
        self._network = network
        self._listen = listen
        self._address = ""
        self._responder = _Responder(handler, max_payload_bytes=max_payload_bytes)
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        if not self._address:
            raise RuntimeError("InMemoryServer is not started")
        return self._address

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    async def start(self) -> None:
        if self._address:
            raise RuntimeError("InMemoryServer already started")
        self._address = self._network._bind(self, self._listen)

    async def aclose(self, grace: float = DEFAULT_GRACE_S) -> None:
        """Stop taking calls, give those in flight `grace` seconds, cancel the rest; cancelled, cancel them at once.
        Safe to call twice."""
        self._network._unbind(self, self._address)
        try:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=grace)
        finally:  # as `RpcServer`: a cancelled stop must not leave the calls running
            for task in list(self._tasks):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _call(self, work: Coroutine[Any, Any, _T], timeout: float, calls: set[asyncio.Task[Any]]) -> _T:
        """Run `work` as a task of this server, also listed in ``calls`` (the calling connection's, which cancels
        them when it closes, as closing a gRPC channel does); the caller's deadline cancels it, as a gRPC deadline
        would."""
        task = asyncio.create_task(work)
        for owner in (self._tasks, calls):
            owner.add(task)
            task.add_done_callback(owner.discard)
        try:
            async with asyncio.timeout(timeout):
                return await task
        except TimeoutError:
            raise PeerTimeout(self._address, "no answer before the deadline") from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                detail = "UNAVAILABLE: server shut down or connection closed during the call"
                raise PeerUnavailable(self._address, detail) from None
            raise

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class InMemoryClient(_Caller):
    """A connection to an `InMemoryNetwork` address; same methods and errors as `PeerClient`."""

    def __init__(
        self, network: InMemoryNetwork, address: str, *, max_payload_bytes: int, node_id: str | None = None
    ) -> None:
        super().__init__(address, max_payload_bytes=max_payload_bytes, node_id=node_id)
        self._network = network
        self._closed = False
        self._calls: set[asyncio.Task[Any]] = set()  # server tasks of this connection's calls in flight

    def _server(self) -> InMemoryServer:
        if self._closed:
            # Closed by its owner, e.g. the peer was dropped while another task still held this connection:
            # for that caller it is a transport failure like any other, not a programming error.
            raise PeerUnavailable(self.address, "connection closed (the peer was dropped)")
        return self._network._lookup(self.address)

    async def _call_handshake(self, request: pb.HandshakeRequest, timeout: float) -> pb.HandshakeReply:
        server = self._server()
        wire_request = _over_the_wire(request, pb.HandshakeRequest.FromString, self.address)
        reply = await server._call(server._responder.handshake(wire_request), timeout, self._calls)
        return _over_the_wire(reply, pb.HandshakeReply.FromString, self.address)

    async def _call_commit(self, request: pb.CommitRequest, timeout: float) -> pb.CommitReply:
        server = self._server()
        wire_request = _over_the_wire(request, pb.CommitRequest.FromString, self.address)
        reply = await server._call(server._responder.commit(wire_request), timeout, self._calls)
        return _over_the_wire(reply, pb.CommitReply.FromString, self.address)

    async def _call_leave(self, request: pb.LeaveRequest, timeout: float) -> pb.LeaveReply | None:
        server = self._server()
        wire_request = _over_the_wire(request, pb.LeaveRequest.FromString, self.address)
        reply = await server._call(server._responder.leave(wire_request), timeout, self._calls)
        return _over_the_wire(reply, pb.LeaveReply.FromString, self.address)

    async def _call_status(self, timeout: float) -> pb.StatusReply:
        server = self._server()

        async def status() -> pb.StatusReply:
            try:
                return server._responder.status(pb.StatusRequest())
            except _ServiceFault as exc:
                raise PeerUnavailable(self.address, f"INTERNAL: {exc}") from None

        reply = await server._call(status(), timeout, self._calls)
        return _over_the_wire(reply, pb.StatusReply.FromString, self.address)

    async def _call_exchange(
        self, requests: Iterator[pb.ExchangeMessage], timeout: float
    ) -> AsyncGenerator[pb.ExchangeMessage, None]:
        server = self._server()
        sent = [_over_the_wire(m, pb.ExchangeMessage.FromString, self.address) for m in requests]

        async def serve() -> list[pb.ExchangeMessage]:
            async with contextlib.aclosing(server._responder.exchange(_Replay(sent))) as replies:
                return [_over_the_wire(m, pb.ExchangeMessage.FromString, self.address) async for m in replies]

        for message in await server._call(serve(), timeout, self._calls):
            yield message

    async def _call_fetch(self, request: pb.FetchRequest, timeout: float) -> AsyncGenerator[pb.ExchangeMessage, None]:
        server = self._server()
        wire_request = _over_the_wire(request, pb.FetchRequest.FromString, self.address)

        async def serve() -> list[pb.ExchangeMessage]:
            async with contextlib.aclosing(server._responder.fetch(wire_request)) as replies:
                return [_over_the_wire(m, pb.ExchangeMessage.FromString, self.address) async for m in replies]

        for message in await server._call(serve(), timeout, self._calls):
            yield message

    async def aclose(self) -> None:
        """Close the connection, failing its calls in flight (`PeerUnavailable`), as gRPC does. Safe to call twice."""
        self._closed = True
        for task in list(self._calls):
            task.cancel()
