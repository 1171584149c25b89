"""The mapping between the protocol's types (`tadlora.node.protocol_types`, `tadlora.node.wire.Reason`) and their
protobuf messages (`tadlora.v1`), both ways.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import cast

from tadlora.node.limits import MAX_DETAIL_CHARS
from tadlora.node.protocol_types import CandidateStatus, ExchangeHeader, NeighborStatus, PeerInfo, StatusInfo
from tadlora.node.wire import ExchangeRefused, Reason
from tadlora.v1 import node_pb2 as pb

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
            NeighborStatus(**{f.name: getattr(n, f.name) for f in fields(NeighborStatus)}) for n in msg.neighbors
        ),
        uptime_seconds=msg.uptime_seconds,
        candidates=tuple(
            CandidateStatus(**{f.name: getattr(c, f.name) for f in fields(CandidateStatus)}) for c in msg.candidates
        ),
        release=msg.release,
    )


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
