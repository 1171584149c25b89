"""What the node protocol carries and raises, as the node logic sees it: the protocol version, who a node is
(`PeerInfo`), an exchange's header and result, a node's status, and the errors a call raises (`PeerUnavailable`,
`PeerTimeout`, `CallEnded`, `OwnAddress`, `ReplyRefused`, `BindError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from tadlora.node.wire import ExchangeRefused
from tadlora.v1 import node_pb2 as pb

# Bump on any change a peer of the previous version would misread. 2: Exchange is ended by a Commit, without which
# the callee leaves the pair out (a version-1 caller never commits: its pairs would never count).
PROTOCOL_VERSION: Final = 2
NODE_SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Node"].full_name  # "tadlora.v1.Node"

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
    # `tadlora.adapter.fingerprint_parts`: what a refusal for another fingerprint names the differing parts from; ""
    # from a node too old to send it (the refusal then gives the fingerprints alone)
    fingerprint_parts: str = ""
    release: str = ""  # the tadlora release it runs (`tadlora.__version__`); "" from a node too old to send it

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
    release: str = ""  # its `PeerInfo.release`


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
    release: str = ""  # the node's tadlora release; empty from a node older than the field
    # How many there are, listed or not: a reply lists at most `MAX_DEGREE` neighbours and `MAX_CANDIDATES_SHOWN`
    # candidates. Never fewer than it lists (`pb_mapping` reads a node older than the fields so).
    neighbors_total: int = 0
    candidates_total: int = 0


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


class ReplyRefused(ExchangeRefused):
    """A reply the caller refuses: what the peer says of itself in it (a status reply's `PeerInfo`) is what a
    handshake would refuse. Not the peer's refusal of the call: this side's of the answer."""


class BindError(RuntimeError):
    """A server could not listen on the address it was given."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"cannot listen on {address}: {detail}")
        self.address = address
