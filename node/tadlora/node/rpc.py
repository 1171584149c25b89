"""The node protocol (`tadlora.v1.Node`): its types, its serving and calling sides, and the transport interfaces.

Two transports carry it: gRPC (`tadlora.node.grpc_transport`, what the daemon uses) and an in-memory twin for
tests (`tadlora.node.memory_transport`). Both run the same protocol code on the same protobuf messages:
`_Responder` serves, `_Caller` calls; only the carriage differs (an HTTP/2 stream, or a task in this process).
An exchange is push-pull: the caller streams its round-t factors and reads the callee's round-t factors from
the same stream. Refusals travel in-band with a `Reason`, so a person can act on them; transport failures
raise `PeerUnavailable`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import math
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Final, Protocol, Self, cast

from tadlora.node.progress import ExchangeProgress, Transfer, describe
from tadlora.node.wire import (
    ExchangeRefused,
    FactorSpec,
    Payload,
    PayloadError,
    Reason,
    Reassembler,
    chunk,
    chunk_count,
    decode_factors,
)
from tadlora.v1 import node_pb2 as pb

__all__ = [
    "MAX_CANDIDATES_SHOWN",
    "MAX_DEGREE",
    "MAX_EXCHANGES_PER_CALLER",
    "MAX_FETCHES_PER_CALLER",
    "MAX_ROUND",
    "MAX_TEXT_CHARS",
    "NODE_ID_CHARS",
    "NODE_SERVICE_NAME",
    "PROTOCOL_VERSION",
    "BindError",
    "CandidateStatus",
    "ExchangeHeader",
    "ExchangeResult",
    "NeighborStatus",
    "NodeHandler",
    "OwnAddress",
    "PeerConnection",
    "PeerInfo",
    "PeerTimeout",
    "PeerUnavailable",
    "Server",
    "StatusInfo",
    "Transport",
    "check_compatible",
    "node_id_problem",
]

log = logging.getLogger("tadlora.rpc")

# Bump on any change a peer of the previous version would misread. 2: Exchange is ended by a Commit, without which
# the callee leaves the pair out (a version-1 caller never commits: its pairs would never count).
PROTOCOL_VERSION: Final = 2
NODE_SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Node"].full_name  # "tadlora.v1.Node"

# gRPC limits, set explicitly on both ends. Payloads travel in chunks of <= 1 MiB (wire.MAX_CHUNK_BYTES).
GRPC_MAX_MESSAGE_BYTES: Final = (4 << 20) + (64 << 10)  # bytes; TESTBED: 4 MiB default, + margin for framing
GRPC_MAX_CONCURRENT_STREAMS: Final = 32  # per HTTP/2 connection; a neighbour needs one or two at a time
GRPC_MAX_CONCURRENT_RPCS: Final = 128  # per server; more are answered RESOURCE_EXHAUSTED, not queued
GRPC_CLIENT_KEEPALIVE_MS: Final = 30_000  # ms between client pings: finds a vanished neighbour between rounds
GRPC_SERVER_KEEPALIVE_MS: Final = 60_000  # ms between server pings on idle connections
GRPC_KEEPALIVE_TIMEOUT_MS: Final = 10_000  # ms to wait for a ping's ack before the connection is dropped
GRPC_MIN_PING_INTERVAL_MS: Final = 15_000  # ms; server tolerates pings this often, half the client's interval
DEFAULT_GRACE_S: Final = 5.0  # s that in-flight calls get to finish when a server stops

# Sanity caps on what a peer says about itself; anything over them is refused, never stored or computed with.
MAX_DEGREE: Final = 1024  # neighbours; --max-neighbors bounds real degrees far below this
MAX_CANDIDATES_SHOWN: Final = 64  # failing candidates a status reply lists (the first by key): a flood of adverts
MAX_ROUND: Final = 1 << 40  # rounds; ~35 000 years of one-second rounds, and exact as a float in JSON logs
MAX_TEXT_CHARS: Final = 256  # chars in an id, cluster, fingerprint, address, method or schedule (ids are <= 63)
MAX_DETAIL_CHARS: Final = 1024  # chars of a peer's refusal detail kept (ours are one sentence)
_CALLS: Final = {"exchange": "an exchange", "fetch": "a fetch"}  # the streamed calls, as a log line names them
# Exchanges one caller may have in flight at a callee. A node calls each neighbour once per round, so one is the
# norm; the second covers a call for the next round arriving before the cancellation of the last one. Each costs
# the callee its payload (up to the spec's size: twice over while it arrives and is decoded, its decoded factors
# once) while it waits for the callee's round.
MAX_EXCHANGES_PER_CALLER: Final = 2
# Fetches (catch-ups) one caller may have in flight at a callee: a node fetches from one peer at a time, and each
# fetch costs the callee an encoded copy of its factors until the caller has read it.
MAX_FETCHES_PER_CALLER: Final = 2
# s a callee waits for a caller's exchange stream (header and payload) unless its handler says otherwise
# (`payload_timeout_s`; the daemon uses its --exchange-timeout, the time a caller gives a whole exchange).
DEFAULT_PAYLOAD_TIMEOUT_S: Final = 300.0

NODE_ID_CHARS: Final = 63  # chars; one DNS label, since a node id is also a DNS name in its certificate
# One spelling per node id. TLS matches a certificate's DNS names ignoring ASCII case and a trailing dot, and
# reads a dotted-digit name as an IP address, so uppercase and '.' would let one certificate pass as several
# nodes (a Sybil that defeats the trimmed-mean bound of robust mixing).
_NODE_ID: Final = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{NODE_ID_CHARS - 1}}}")

_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", GRPC_CLIENT_KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", GRPC_KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # 0 = unlimited: keepalive works on idle connections
    # Each connection its own subchannel. gRPC otherwise shares one per address among a process's channels, and a
    # new connection to a peer that has just restarted failed at once with the "Connection refused" of another one
    # still backing off there (a static address's retry): the peer, verified a moment before, was dropped again.
    ("grpc.use_local_subchannel_pool", 1),
)
_SERVER_OPTIONS: Final = (
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", GRPC_MAX_CONCURRENT_STREAMS),
    ("grpc.keepalive_time_ms", GRPC_SERVER_KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", GRPC_KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", GRPC_MIN_PING_INTERVAL_MS),
    ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it silently
)

if TYPE_CHECKING:  # torch stays out of the client's import (`tadlora.node.wire`'s docstring says why)
    import torch

    Factors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class PeerInfo:
    """Who a node is and where it serves; mirrors `tadlora.v1.PeerInfo`."""

    node_id: str
    cluster: str
    fingerprint: str
    address: str
    round: int = 0
    degree: int = 0
    method: str = ""
    insecure: bool = True  # it serves plaintext (--insecure); a node with --tls-dir says False
    protocol_version: int = PROTOCOL_VERSION
    last_mixed_round: int = 0  # 1 + the last round this node mixed with a neighbour; 0: never
    schedule: str = ""  # `NodeConfig.schedule`; "" from a node too old to send it, and then not compared

    def __post_init__(self) -> None:
        if min(self.round, self.degree, self.protocol_version, self.last_mixed_round) < 0:
            raise ValueError(f"round, degree, protocol_version and last_mixed_round must be >= 0: {self}")


@dataclass(frozen=True, kw_only=True)
class ExchangeHeader:
    """Who sends a payload and for which round: the header fields the node logic sees."""

    node_id: str
    cluster: str
    fingerprint: str
    round: int
    degree: int
    schedule: str = ""  # as in `PeerInfo`

    @classmethod
    def from_info(cls, info: PeerInfo, at_round: int | None = None) -> ExchangeHeader:
        """`info`'s header fields, for `at_round` (default: the round `info` reports)."""
        return cls(
            node_id=info.node_id,
            cluster=info.cluster,
            fingerprint=info.fingerprint,
            round=info.round if at_round is None else at_round,
            degree=info.degree,
            schedule=info.schedule,
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class ExchangeResult:
    """What a push-pull exchange brought back: the callee's header and factors, and what it cost."""

    peer: ExchangeHeader
    factors: Factors
    bytes_sent: int  # payload bytes, without framing
    bytes_received: int
    elapsed_s: float


@dataclass(frozen=True, kw_only=True)
class NeighborStatus:
    """One peer in a node's status: its degree and weight in the node's last round, and ``last_round``, 1 + the
    last round the node exchanged with it (0: none yet; the convention of `PeerInfo.last_mixed_round`)."""

    node_id: str
    address: str = ""
    degree: int = 0
    last_round: int = 0
    weight: float = 0.0


@dataclass(frozen=True, kw_only=True)
class CandidateStatus:
    """A candidate in a node's status that is not its neighbour: what discovery listed (``key``: an address, or an
    mDNS advert's node id), the address last dialled, how many tries in a row failed (0: its advert was refused
    before any dial), the seconds until the next try, and why."""

    key: str
    address: str = ""
    source: str = ""
    failures: int = 0
    retry_in_seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class StatusInfo:
    """What a node is doing; mirrors `tadlora.v1.StatusReply`. Loss and accuracy are NaN until known."""

    node: PeerInfo
    state: str = "idle"
    phase: str = ""
    rounds_completed: int = 0
    last_loss: float = math.nan
    last_accuracy: float = math.nan
    neighbors: tuple[NeighborStatus, ...] = ()
    uptime_seconds: float = 0.0
    candidates: tuple[CandidateStatus, ...] = ()  # listed by discovery, not neighbours: see `CandidateStatus`


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


class PeerUnavailable(Exception):
    """The peer could not be reached or did not answer: connection refused, reset, shut down, over its limits."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(address, detail)
        self.address = address
        self.detail = detail

    def __str__(self) -> str:
        return f"peer {self.address} unavailable: {self.detail}"


class PeerTimeout(PeerUnavailable):
    """The peer did not answer before the caller's deadline."""


class CallEnded(Exception):
    """Raised by a transport's read of a caller's stream that ended because the call did (its deadline passed, the
    caller cancelled it), not because the caller sent its last message: the stream is cut, not malformed, and no
    reply can reach the caller. The responder logs it as an exchange cut short (with how far it got, and the
    advice for a slow link), refuses nothing and counts no refusal."""


class OwnAddress(ExchangeRefused):
    """A handshake reached the calling node itself (its own address in another spelling: a host name, an IPv6
    record of a dual-stack name): the callee refused it, naming the caller's own id as its own."""


class BindError(RuntimeError):
    """A server could not listen on the address it was given."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"cannot listen on {address}: {detail}")
        self.address = address


def _check_identity(claimed: str, identity: str | None) -> None:
    """With TLS, a caller may only speak as the node its certificate names; ``identity`` "" (a certificate whose
    common name is not one of its DNS names, see grpc_transport) names none."""
    if identity is not None and claimed != identity:
        # "" would read as a certificate issued to an empty name: say what is wrong with it instead.
        unnamed = "no node id (its common name is not among its DNS names)"
        names = repr(identity[:MAX_TEXT_CHARS]) if identity else unnamed
        raise ExchangeRefused(
            Reason.IDENTITY_MISMATCH, f"claims node id {claimed[:MAX_TEXT_CHARS]!r} but its certificate is for {names}"
        )


def check_compatible(local: PeerInfo, remote: PeerInfo) -> None:
    """Raise `ExchangeRefused` (PROTOCOL/CLUSTER/FINGERPRINT/SCHEDULE_MISMATCH) unless the two nodes can exchange
    factors."""
    _check_peer(remote, ours=local)


def check_sane(what: str, *, round: int, degree: int, texts: Iterable[str]) -> None:
    """Raise `ExchangeRefused` unless a peer's self-description is within the caps: ROUND_MISMATCH for a round
    over `MAX_ROUND`, BAD_PAYLOAD for a degree over `MAX_DEGREE` or a text field over `MAX_TEXT_CHARS`."""
    if round > MAX_ROUND:
        raise ExchangeRefused(Reason.ROUND_MISMATCH, f"{what} claims round {round}, over the cap of {MAX_ROUND}")
    if degree > MAX_DEGREE:
        raise ExchangeRefused(Reason.BAD_PAYLOAD, f"{what} claims degree {degree}, over the cap of {MAX_DEGREE}")
    longest = max((len(text) for text in texts), default=0)
    if longest > MAX_TEXT_CHARS:
        raise ExchangeRefused(Reason.BAD_PAYLOAD, f"{what} has a text field of {longest} chars (cap {MAX_TEXT_CHARS})")


def node_id_problem(node_id: str) -> str | None:
    """Why ``node_id`` is not a node id (1-63 lowercase letters, digits, '_' or '-', starting with a letter or
    digit), or None when it is one."""
    if _NODE_ID.fullmatch(node_id):
        return None
    return (
        f"node id {node_id[:MAX_TEXT_CHARS]!r} is not 1-{NODE_ID_CHARS} lowercase letters, digits, '_' or '-' "
        "starting with a letter or digit"
    )


def _check_node_id(node_id: str, what: str) -> None:
    """BAD_PAYLOAD for a node id off the syntax: each node has exactly one spelling its certificate can bind."""
    if (problem := node_id_problem(node_id)) is not None:
        raise ExchangeRefused(Reason.BAD_PAYLOAD, f"{what}: {problem}")


def _check_info(info: PeerInfo, what: str) -> None:
    """`check_sane`, and ROUND_MISMATCH for a ``last_mixed_round`` over ``round + 1``: a node mixes round t
    before it moves on to t + 1, so it reports at most its own round + 1 (between closing a round and the next).
    Catch-up follows the peer that claims the latest mixing and adopts that claim, so a bigger one would pull
    every node to a round nobody reached."""
    texts = (info.node_id, info.cluster, info.fingerprint, info.address, info.method, info.schedule)
    check_sane(what, round=info.round, degree=info.degree, texts=texts)
    _check_node_id(info.node_id, what)
    if info.last_mixed_round > info.round + 1:
        raise ExchangeRefused(
            Reason.ROUND_MISMATCH,
            f"{what} claims it last mixed in round {info.last_mixed_round - 1}, past its round {info.round}",
        )


class _Claims(Protocol):
    """What a peer says of itself that decides whether two nodes may mix: a `PeerInfo`, or an exchange header
    (ours, or the protobuf one as it arrived)."""

    @property
    def node_id(self) -> str: ...
    @property
    def protocol_version(self) -> int: ...
    @property
    def cluster(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def schedule(self) -> str: ...


def _check_peer(theirs: _Claims, *, ours: PeerInfo | ExchangeHeader) -> None:
    """Refuse a peer (its info, or its header) whose protocol, cluster, model fingerprint or schedule is not
    ``ours``. The detail names each node with its own value, not "peer" and "this node": a refusal is sent to the
    peer, which logs it as the reason it was refused, and there "this node" would be the peer itself."""
    them, us = repr(theirs.node_id[:MAX_TEXT_CHARS]), repr(ours.node_id)
    if theirs.protocol_version != PROTOCOL_VERSION:
        raise ExchangeRefused(
            Reason.PROTOCOL_MISMATCH,
            f"{them} speaks protocol {theirs.protocol_version}, {us} speaks protocol {PROTOCOL_VERSION}: "
            f"{SAME_PROTOCOL_FIX}",
        )
    if theirs.cluster != ours.cluster:
        raise ExchangeRefused(
            Reason.CLUSTER_MISMATCH, f"{them} is in cluster {theirs.cluster!r}, {us} is in cluster {ours.cluster!r}"
        )
    if theirs.fingerprint != ours.fingerprint:
        # A schedule that differs too is said here as well: refused for the fingerprint alone, a pair started with
        # another --seed and another --method would find the second mistake only after fixing the first.
        also = (
            f"; and {them} runs {theirs.schedule!r}, {us} runs {ours.schedule!r}"
            if schedules_differ(theirs.schedule, ours.schedule)
            else ""
        )
        raise ExchangeRefused(
            Reason.FINGERPRINT_MISMATCH,
            f"{them} has model fingerprint {theirs.fingerprint[:16]!r}, "
            f"{us} has model fingerprint {ours.fingerprint[:16]!r}{also}: {SAME_MODEL_FIX}"
            + (f"; {SAME_SCHEDULE_FIX}" if also else ""),
        )
    if schedules_differ(theirs.schedule, ours.schedule):
        raise ExchangeRefused(
            Reason.SCHEDULE_MISMATCH,
            f"{them} runs {theirs.schedule!r}, {us} runs {ours.schedule!r}: {SAME_SCHEDULE_FIX}",
        )


# What to do about a peer of another model fingerprint (`tadlora.adapter.fingerprint`: one hash of what it covers,
# so which part differs cannot be told from it), wherever one is found.
SAME_MODEL_FIX: Final = (
    "the fingerprint covers --model (its weights, and its tokenizer under --init portable), the label set of "
    "--dataset, --lora-r, --lora-alpha, --lora-dropout, --lora-targets, --init and --seed: start every node of a "
    "cluster with the same"
)

# What to do about a peer of another protocol version (`PROTOCOL_VERSION`), wherever one is found.
SAME_PROTOCOL_FIX: Final = "upgrade the node of the older protocol: every node of a cluster must speak the same one"

# What to do about a peer of another schedule (`NodeConfig.schedule`), wherever one is found.
SAME_SCHEDULE_FIX: Final = (
    "start every node of a cluster with the same --method, --switch-interval, --link-prob and --max-neighbors"
)


def schedules_differ(theirs: str, ours: str) -> bool:
    """Whether two nodes' schedules rule out mixing: both known and not equal. An empty one is not compared: nodes
    of protocol 2 before the field existed send none (nor does their mDNS advert), and refusing them would split a
    cluster during a rolling upgrade; such a pair is no worse off than before the check. The handshake, the peer
    manager's advert filter and doctor all decide by this."""
    return bool(theirs and ours and theirs != ours)


# ------------------------------------------------------------------------------------- protobuf mapping


def _peer_refusal(reason: int, detail: str) -> ExchangeRefused:
    """A refusal a peer sent, its detail cut to `MAX_DETAIL_CHARS` (a peer chooses it, and it is logged here)."""
    cut = detail if len(detail) <= MAX_DETAIL_CHARS else detail[:MAX_DETAIL_CHARS] + "... (cut)"
    return ExchangeRefused(_reason_from_wire(reason), cut or "refused without detail")


def _reason_from_wire(value: int) -> Reason:
    try:
        return Reason(value)
    except ValueError:  # a newer peer's reason this version does not know
        return Reason.UNSPECIFIED


def _reason_to_wire(reason: Reason) -> pb.RefusalReason:
    return cast("pb.RefusalReason", int(reason))  # values are equal by construction; tests/test_wire.py checks


def _info_to_pb(info: PeerInfo) -> pb.PeerInfo:
    return pb.PeerInfo(
        protocol_version=info.protocol_version,
        cluster=info.cluster,
        fingerprint=info.fingerprint,
        node_id=info.node_id,
        round=info.round,
        degree=info.degree,
        address=info.address,
        method=info.method,
        insecure=info.insecure,
        last_mixed_round=info.last_mixed_round,
        schedule=info.schedule,
    )


def _info_from_pb(msg: pb.PeerInfo) -> PeerInfo:
    return PeerInfo(
        protocol_version=msg.protocol_version,
        cluster=msg.cluster,
        fingerprint=msg.fingerprint,
        node_id=msg.node_id,
        round=msg.round,
        degree=msg.degree,
        address=msg.address,
        method=msg.method,
        insecure=msg.insecure,
        last_mixed_round=msg.last_mixed_round,
        schedule=msg.schedule,
    )


def _status_to_pb(status: StatusInfo) -> pb.StatusReply:
    return pb.StatusReply(
        node=_info_to_pb(status.node),
        phase=status.phase,
        rounds_completed=status.rounds_completed,
        last_loss=status.last_loss,
        last_accuracy=status.last_accuracy,
        state=status.state,
        neighbors=[
            pb.NeighborStatus(
                node_id=n.node_id, address=n.address, degree=n.degree, last_round=n.last_round, weight=n.weight
            )
            for n in status.neighbors
        ],
        uptime_seconds=status.uptime_seconds,
        candidates=[pb.CandidateStatus(**asdict(c)) for c in status.candidates],
    )


def _status_from_pb(msg: pb.StatusReply) -> StatusInfo:
    return StatusInfo(
        node=_info_from_pb(msg.node),
        phase=msg.phase,
        rounds_completed=msg.rounds_completed,
        last_loss=msg.last_loss,
        last_accuracy=msg.last_accuracy,
        state=msg.state,
        neighbors=tuple(
            NeighborStatus(
                node_id=n.node_id, address=n.address, degree=n.degree, last_round=n.last_round, weight=n.weight
            )
            for n in msg.neighbors
        ),
        uptime_seconds=msg.uptime_seconds,
        candidates=tuple(
            CandidateStatus(**{f.name: getattr(c, f.name) for f in fields(CandidateStatus)}) for c in msg.candidates
        ),
    )


def _refusal_message(exc: ExchangeRefused) -> pb.ExchangeMessage:
    return pb.ExchangeMessage(refusal=pb.Refusal(reason=_reason_to_wire(exc.reason), detail=exc.detail))


# ---------------------------------------------------------------------------- the protocol, both sides


def _encode_capped(factors: Factors | Payload, max_payload_bytes: int) -> tuple[bytes, str]:
    """``factors`` encoded (or as already encoded), within the cap; in a worker thread, as encoding takes time."""
    payload = factors if isinstance(factors, Payload) else Payload.encode(factors)
    if len(payload.data) > max_payload_bytes:
        raise PayloadError(
            Reason.TOO_LARGE, f"own payload of {len(payload.data)} bytes is over the cap of {max_payload_bytes} bytes"
        )
    return payload.data, payload.sha256


def _payload_messages(
    header: ExchangeHeader, payload: bytes, sha256: str, progress: Transfer | None = None
) -> Iterator[pb.ExchangeMessage]:
    """Header, then the payload in chunks: lazily, so only the chunk in flight is copied; ``progress`` counts the
    bytes the transport has taken."""
    yield pb.ExchangeMessage(
        header=pb.ExchangeHeader(
            protocol_version=PROTOCOL_VERSION,
            node_id=header.node_id,
            cluster=header.cluster,
            fingerprint=header.fingerprint,
            round=header.round,
            degree=header.degree,
            total_bytes=len(payload),
            sha256=sha256,
            num_chunks=chunk_count(len(payload)),
            schedule=header.schedule,
        )
    )
    for piece in chunk(payload):
        yield pb.ExchangeMessage(chunk=bytes(piece))
        if progress is not None:
            progress.moved += len(piece)


async def _receive_payload(
    messages: AsyncIterable[pb.ExchangeMessage],
    *,
    max_payload_bytes: int,
    check: Callable[[pb.ExchangeHeader], None],
    opened: Callable[[pb.ExchangeHeader], None] | None = None,
    progress: Transfer | None = None,
) -> tuple[ExchangeHeader, bytes]:
    """Read a callee's reply, header + chunks (or a refusal, raised as `ExchangeRefused`), into a verified payload.
    ``opened`` is called once the reply opens with a header, before any check of it; ``progress`` follows its
    bytes."""
    iterator = aiter(messages)
    head = await _receive_header(iterator, check, from_callee=True, opened=opened)
    return await _receive_chunks(
        iterator, head, max_payload_bytes=max_payload_bytes, from_callee=True, progress=progress
    )


async def _receive_header(
    iterator: AsyncIterator[pb.ExchangeMessage],
    check: Callable[[pb.ExchangeHeader], None],
    *,
    from_callee: bool,
    opened: Callable[[pb.ExchangeHeader], None] | None = None,
) -> pb.ExchangeHeader:
    """Read a stream's first message: a header that passes the caps and ``check``, or, ``from_callee``, a refusal
    (raised). A caller has no refusal to send: in its stream one is BAD_PAYLOAD, never taken for this node's own
    (its reason would be counted here, its detail logged and sent back). ``opened``: called with the header once
    the stream is seen to open with one, before any check of it."""
    first = await anext(iterator, None)
    kind = None if first is None else first.WhichOneof("kind")
    if first is not None and kind == "refusal" and from_callee:
        raise _peer_refusal(first.refusal.reason, first.refusal.detail)
    if first is None or kind != "header":
        raise PayloadError(Reason.BAD_PAYLOAD, f"exchange stream opened with {kind or 'nothing'}, not a header")
    head = first.header
    if opened is not None:
        opened(head)
    texts = (head.node_id, head.cluster, head.fingerprint, head.sha256, head.schedule)
    check_sane("exchange header", round=head.round, degree=head.degree, texts=texts)
    _check_node_id(head.node_id, "exchange header")
    check(head)
    return head


async def _receive_chunks(
    iterator: AsyncIterator[pb.ExchangeMessage],
    head: pb.ExchangeHeader,
    *,
    max_payload_bytes: int,
    from_callee: bool,
    progress: Transfer | None = None,
) -> tuple[ExchangeHeader, bytes]:
    """Read the chunks ``head`` announced (or, ``from_callee``, a refusal, raised) into a verified payload;
    ``progress`` (if given) follows the bytes as they come."""
    assembler = Reassembler(head.total_bytes, head.sha256, head.num_chunks, max_payload_bytes=max_payload_bytes)
    progress = progress if progress is not None else Transfer()
    loop = asyncio.get_running_loop()
    progress.size, progress.began = head.total_bytes, loop.time()
    async for message in iterator:
        kind = message.WhichOneof("kind")
        if kind == "refusal" and from_callee:
            raise _peer_refusal(message.refusal.reason, message.refusal.detail)
        if kind != "chunk":
            raise PayloadError(Reason.BAD_PAYLOAD, f"unexpected {kind or 'empty message'} after the header")
        assembler.add(message.chunk)
        progress.moved = assembler.received_bytes
    progress.ended = loop.time()
    # finish() copies the whole payload (up to max_payload_bytes: ~0.1 s at 512 MiB): not on the event loop.
    return _header_from_pb(head), await asyncio.to_thread(assembler.finish)


def _header_from_pb(head: pb.ExchangeHeader) -> ExchangeHeader:
    return ExchangeHeader(
        node_id=head.node_id,
        cluster=head.cluster,
        fingerprint=head.fingerprint,
        round=head.round,
        degree=head.degree,
        schedule=head.schedule,
    )


def _check_declared_size(total_bytes: int, spec: FactorSpec | None) -> None:
    """TOO_LARGE for a payload declared larger than any payload meeting ``spec`` can be (checked from the header,
    so that a caller cannot make this node hold up to the cap's bytes for a payload it would refuse anyway)."""
    if spec is not None and total_bytes > (most := spec.max_payload_bytes()):
        raise PayloadError(
            Reason.TOO_LARGE,
            f"declared payload of {total_bytes} bytes, but the {len(spec.tensors)} factors expected take at most "
            f"{most} bytes: their shapes or dtypes differ from this node's",
        )


def _check_answerer(node_id: str, expected: str | None, address: str) -> None:
    """IDENTITY_MISMATCH unless the node that answered at ``address`` is the one the connection was made for (an
    address can reach another node: one that announced 0.0.0.0, a restarted host, a reused port). Exact: node ids
    have one spelling (`node_id_problem`), so the case-blind match TLS makes on the same name cannot widen it."""
    if expected is not None and node_id != expected:
        raise ExchangeRefused(
            Reason.IDENTITY_MISMATCH,
            f"{address} answers as {node_id[:MAX_TEXT_CHARS]!r}, not {expected!r}, the node it was dialled for",
        )


class _ServiceFault(Exception):
    """The handler failed on a request that has no in-band refusal (Status); the detail is safe to send."""


def _caller_named(who: str) -> str:
    """A caller as a refusal's log line names it: its node id as far as its request said it (quoted, cut to
    `MAX_TEXT_CHARS`: a peer chooses it), or that it is not known yet (a request that did not parse)."""
    return repr(who[:MAX_TEXT_CHARS]) if who else "a caller not yet known"


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
        # Calls in flight, by (call, caller id), from the caller's first message until its reply has been sent.
        self._in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        # Optional: a handler with `payload_timeout_s` bounds how long a caller may take to send its stream.
        self._payload_timeout_s: float = getattr(handler, "payload_timeout_s", DEFAULT_PAYLOAD_TIMEOUT_S)

    @property
    def payload_timeout_s(self) -> float:
        """The most seconds a caller may take to send its exchange stream (the handler's, or the default)."""
        return self._payload_timeout_s

    def _refused(self, what: str, exc: ExchangeRefused) -> None:
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

    async def handshake(self, request: pb.HandshakeRequest | None, identity: str | None = None) -> pb.HandshakeReply:
        """``identity``: the caller's authenticated name (its TLS certificate's common name), None without TLS."""
        callee = None
        # As far as the request names it, else as its certificate does (as for exchanges and fetches).
        who = ("" if request is None else request.caller.node_id) or identity or ""
        try:
            local = self._handler.local_info()
            callee = _info_to_pb(local)
            if request is None:
                raise _unparsed("handshake")
            if not request.HasField("caller"):
                raise ExchangeRefused(Reason.PROTOCOL_MISMATCH, "handshake carries no caller info")
            remote = _info_from_pb(request.caller)
            _check_info(remote, "handshake caller")
            _check_identity(remote.node_id, identity)
            check_compatible(local, remote)
            await self._handler.async_handshake(remote)
        except ExchangeRefused as exc:
            log.info("refused a handshake from %s: %s: %s", _caller_named(who), exc.reason.name, exc.detail)
            self._refused("handshake", exc)
            reason = _reason_to_wire(exc.reason)
            return pb.HandshakeReply(accepted=False, reason=reason, detail=exc.detail, callee=callee)
        except Exception:
            log.exception("handshake from %s failed inside this node", _caller_named(who))
            internal = _reason_to_wire(Reason.INTERNAL)
            return pb.HandshakeReply(accepted=False, reason=internal, detail="internal error, see the callee's log")
        return pb.HandshakeReply(accepted=True, callee=callee)

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
        who = ("" if request is None else request.node_id) or identity or ""
        try:
            if request is None:
                raise _unparsed("commit")
            check_sane("commit", round=request.round, degree=0, texts=(request.node_id,))
            _check_node_id(request.node_id, "commit")
            _check_identity(request.node_id, identity)
            if self._commit is not None:
                await self._commit(request.node_id, request.round, request.accept)
        except ExchangeRefused as exc:
            log.info("refused a commit from %s: %s: %s", _caller_named(who), exc.reason.name, exc.detail)
            self._refused("commit", exc)
            return pb.CommitReply(committed=False, reason=_reason_to_wire(exc.reason), detail=exc.detail)
        except Exception:
            log.exception("commit from %s failed inside this node", _caller_named(who))
            internal = _reason_to_wire(Reason.INTERNAL)
            return pb.CommitReply(committed=False, reason=internal, detail="internal error, see the callee's log")
        return pb.CommitReply(committed=request.accept)

    async def leave(self, request: pb.LeaveRequest | None, identity: str | None = None) -> pb.LeaveReply:
        """A peer says it is stopping (see `NodeHandler`): dropped, or refused with the reason. ``identity``: the
        caller's authenticated name, None without TLS; a Leave is only ever taken from the node it names, so that no
        one can make this node drop another."""
        who = ("" if request is None else request.caller.node_id) or identity or ""
        try:
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
        except ExchangeRefused as exc:
            log.info("refused a leave from %s: %s: %s", _caller_named(who), exc.reason.name, exc.detail)
            self._refused("leave", exc)
            return pb.LeaveReply(dropped=False, reason=_reason_to_wire(exc.reason), detail=exc.detail)
        except Exception:
            log.exception("leave from %s failed inside this node", _caller_named(who))
            internal = _reason_to_wire(Reason.INTERNAL)
            return pb.LeaveReply(dropped=False, reason=internal, detail="internal error, see the callee's log")
        return pb.LeaveReply(dropped=True)

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
            log.info("refused %s from %s: %s: %s", _CALLS[what], _caller_named(caller()), exc.reason.name, exc.detail)
            self._refused(what, exc)
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
            if reply.HasField("callee") and reply.callee.node_id == info.node_id:
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
        return _status_from_pb(await self._call_status(timeout))

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
