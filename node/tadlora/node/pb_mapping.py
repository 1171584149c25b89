"""The mapping between the protocol's types (`tadlora.node.protocol_types`, `tadlora.node.wire.Reason`) and their
protobuf messages (`tadlora.v1`), both ways.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import cast

from tadlora.node.limits import MAX_CANDIDATES_SHOWN, MAX_DEGREE, MAX_DETAIL_CHARS, MAX_TEXT_CHARS
from tadlora.node.protocol_types import CandidateStatus, ExchangeHeader, NeighborStatus, PeerInfo, StatusInfo
from tadlora.node.wire import ExchangeRefused, Reason
from tadlora.v1 import node_pb2 as pb

# ------------------------------------------------------------------------------------- protobuf mapping


def _peer_refusal(reason: int, detail: str) -> ExchangeRefused:
    """A refusal a peer sent, its detail cut to `MAX_DETAIL_CHARS` (a peer chooses it, and it is logged here)."""
    return ExchangeRefused(_reason_from_wire(reason), _cut(detail, MAX_DETAIL_CHARS) or "refused without detail")


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
        fingerprint_parts=info.fingerprint_parts,
        release=info.release,
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
        fingerprint_parts=msg.fingerprint_parts,
        release=msg.release,
    )


def _status_to_pb(status: StatusInfo) -> pb.StatusReply:
    return pb.StatusReply(
        node=_info_to_pb(status.node),
        phase=status.phase,
        rounds_completed=status.rounds_completed,
        last_loss=status.last_loss,
        last_accuracy=status.last_accuracy,
        state=status.state,
        neighbors=[pb.NeighborStatus(**asdict(n)) for n in status.neighbors],
        uptime_seconds=status.uptime_seconds,
        candidates=[pb.CandidateStatus(**asdict(c)) for c in status.candidates],
        release=status.release,
        neighbors_total=status.neighbors_total,
        candidates_total=status.candidates_total,
    )


def _status_from_pb(msg: pb.StatusReply) -> StatusInfo:
    """A node's status reply, within what a node sends: at most `MAX_DEGREE` neighbours and `MAX_CANDIDATES_SHOWN`
    candidates (its totals say how many it has), their texts cut to `MAX_TEXT_CHARS` (a candidate's reason, which
    quotes a refusal, to twice `MAX_DETAIL_CHARS`), and NaN for a number that is not finite (the time fields: not
    negative either). What it says is printed and compared (`tadlora-node status`, `doctor`), and whoever answers
    chooses it; its `node` is checked as a handshake's is, by the caller."""
    neighbors = tuple(
        NeighborStatus(
            node_id=_cut(n.node_id, MAX_TEXT_CHARS),
            address=_cut(n.address, MAX_TEXT_CHARS),
            degree=n.degree,
            last_round=n.last_round,
            weight=_finite(n.weight),
            release=_cut(n.release, MAX_TEXT_CHARS),
        )
        for n in msg.neighbors[:MAX_DEGREE]
    )
    candidates = tuple(
        CandidateStatus(
            key=_cut(c.key, MAX_TEXT_CHARS),
            address=_cut(c.address, MAX_TEXT_CHARS),
            source=_cut(c.source, MAX_TEXT_CHARS),
            failures=c.failures,
            retry_in_seconds=_finite(c.retry_in_seconds, low=0.0),
            reason=_cut(c.reason, 2 * MAX_DETAIL_CHARS),
        )
        for c in msg.candidates[:MAX_CANDIDATES_SHOWN]
    )
    return StatusInfo(
        node=_info_from_pb(msg.node),
        phase=_cut(msg.phase, MAX_TEXT_CHARS),
        rounds_completed=msg.rounds_completed,
        last_loss=_finite(msg.last_loss),
        last_accuracy=_finite(msg.last_accuracy),
        state=_cut(msg.state, MAX_TEXT_CHARS),
        neighbors=neighbors,
        uptime_seconds=_finite(msg.uptime_seconds, low=0.0),
        candidates=candidates,
        release=_cut(msg.release, MAX_TEXT_CHARS),
        # 0 from a node older than the fields: what it lists is all that is known
        neighbors_total=max(msg.neighbors_total, len(neighbors)),
        candidates_total=max(msg.candidates_total, len(candidates)),
    )


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and a mark that it was cut: for what a peer chose, kept here."""
    return text if len(text) <= limit else text[:limit] + "... (cut)"


def _finite(value: float, low: float = -math.inf) -> float:
    return value if math.isfinite(value) and value >= low else math.nan


def _refusal_message(exc: ExchangeRefused) -> pb.ExchangeMessage:
    return pb.ExchangeMessage(refusal=pb.Refusal(reason=_reason_to_wire(exc.reason), detail=exc.detail))


def _header_from_pb(head: pb.ExchangeHeader) -> ExchangeHeader:
    return ExchangeHeader(
        node_id=head.node_id,
        cluster=head.cluster,
        fingerprint=head.fingerprint,
        round=head.round,
        degree=head.degree,
        schedule=head.schedule,
    )
