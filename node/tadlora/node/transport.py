"""The interfaces between the node logic and a transport: `NodeHandler` (what the node gives the server),
`PeerConnection` (a connection to one peer), `Server` and `Transport`. gRPC (`tadlora.node.grpc_transport`) and
the in-memory network (`tadlora.node.memory_transport`) implement them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Self

from tadlora.node.limits import DEFAULT_GRACE_S
from tadlora.node.progress import ExchangeProgress
from tadlora.node.protocol_types import ExchangeHeader, ExchangeResult, PeerInfo, StatusInfo
from tadlora.node.wire import FactorSpec, Payload

if TYPE_CHECKING:
    from tadlora.node.protocol_types import Factors


class NodeHandler(Protocol):
    """What the node logic gives the transport; the server calls it for every incoming request.

    Optionally it also has (`_Responder` looks each up by name, and does without it):

    * ``payload_timeout_s: float``: the most seconds a caller may take to send an exchange's header and payload
      (DEADLINE after; default `DEFAULT_PAYLOAD_TIMEOUT_S`).
    * ``observe_refusal(what: str, exc: ExchangeRefused) -> None``: called for every refusal the server sends
      (including those made before the handler sees a request), e.g. to count them.
    * ``async async_admit_exchange(header: ExchangeHeader) -> FactorSpec | None``: awaited with an exchange's
      header before any of its payload is read; it raises `ExchangeRefused` for an exchange the handler would
      refuse anyway (its round, its caller), or returns the spec the payload must meet (None: `expected_spec()`),
      whose size bounds the payload the caller may declare.
    * ``async async_exchange_refused(caller: str, r: int) -> None``: awaited when this side refuses, or fails
      inside, an exchange whose header it accepted (``caller`` is then the authenticated sender of a round-``r``
      header): the caller leaves that pair out of round r on the refusal and does not call again for it, so the
      handler need not wait for it.
    * ``async async_commit(caller: str, r: int, accept: bool) -> None``: awaited with an authenticated caller's
      Commit of its round-``r`` exchange: with ``accept`` the pair it answered in `async_exchange` counts, else it
      is left out; it raises `ExchangeRefused` when it cannot commit (the round is over), and the caller then
      leaves the pair out too. A handler without it has nothing to commit and accepts every Commit.
    * ``observe_served(caller: str, r: int, received: int, sent: int) -> None``: called with the payload sizes
      (bytes) of each exchange whose whole reply was handed to the transport, e.g. to count them once the caller
      commits.
    * ``async async_leave(remote: PeerInfo) -> None``: awaited with an authenticated caller's Leave (it is stopping):
      the handler stops counting it as a peer, or raises `ExchangeRefused` (e.g. NOT_A_NEIGHBOR for a node that is
      not its peer). A handler without it keeps no peers and takes every Leave.
    """

    def local_info(self) -> PeerInfo: ...

    def expected_spec(self) -> FactorSpec | None:
        """The spec incoming payloads must meet; None accepts any decodable payload."""
        ...

    def status(self) -> StatusInfo: ...

    async def async_handshake(self, remote: PeerInfo) -> None:
        """Accept `remote` as a peer or raise `ExchangeRefused`."""
        ...

    async def async_exchange(self, header: ExchangeHeader, factors: Factors) -> Factors | Payload:
        """Take the caller's round-`header.round` factors, return ours for that round (or their `Payload`, encoded
        once for every caller of the round), or raise `ExchangeRefused`.

        May wait (e.g. until the local node reaches that round); it is cancelled if the caller gives up.
        """
        ...

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, Factors]:
        """Return this node's current round and its factors at the start of that round (catch-up), or raise
        `ExchangeRefused`."""
        ...


class PeerConnection(Protocol):
    """A connection to one peer, as the node logic uses it (gRPC `PeerClient` or `InMemoryClient`)."""

    address: str

    async def handshake(self, info: PeerInfo, timeout: float) -> PeerInfo: ...

    async def exchange(
        self,
        header: ExchangeHeader,
        factors: Factors | Payload,
        timeout: float,
        expected: FactorSpec | None = None,
        progress: ExchangeProgress | None = None,
    ) -> ExchangeResult: ...

    async def commit(self, header: ExchangeHeader, accept: bool, timeout: float) -> None: ...

    async def fetch(self, info: PeerInfo, timeout: float, expected: FactorSpec | None = None) -> ExchangeResult: ...

    async def status(self, timeout: float) -> StatusInfo: ...

    async def leave(self, info: PeerInfo, timeout: float) -> bool: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class Server(Protocol):
    """A running node service (gRPC `RpcServer` or `InMemoryServer`); `async with` starts and stops it."""

    @property
    def address(self) -> str: ...

    async def aclose(self, grace: float = DEFAULT_GRACE_S) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class Transport(Protocol):
    """How a node serves and reaches peers: `GrpcTransport` in the daemon, `InMemoryNetwork` in unit tests."""

    def serve(self, handler: NodeHandler, listen: str, *, max_payload_bytes: int | None = None) -> Server:
        """A server for `handler` on `listen` (port 0: any free port); `max_payload_bytes` overrides the cap."""
        ...

    def connect(self, address: str, node_id: str | None = None) -> PeerConnection:
        """A connection to the node at ``address``. With ``node_id``, a transport that authenticates servers (TLS)
        lets the connection work only if the server's certificate names that node id; without it, any server of
        the cluster is accepted (the id is not known yet, e.g. a static address before its first handshake)."""
        ...
