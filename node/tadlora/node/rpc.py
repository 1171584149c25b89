"""The node protocol (`tadlora.v1.Node`): its types, its serving and calling sides, and the transport interfaces.

Two transports carry it: gRPC (`tadlora.node.grpc_transport`, what the daemon uses) and an in-memory twin for
tests (`tadlora.node.memory_transport`). Both run the same protocol code on the same protobuf messages:
`_Responder` serves, `_Caller` calls; only the carriage differs (an HTTP/2 stream, or a task in this process).
An exchange is push-pull: the caller streams its round-t factors and reads the callee's round-t factors from
the same stream. Refusals travel in-band with a `Reason`, so a person can act on them; transport failures
raise `PeerUnavailable`.

The protocol lives in the modules below; this one is its front door, and re-exports their names:

* `tadlora.node.limits`: the gRPC settings, caps and default timeouts;
* `tadlora.node.protocol_types`: `PROTOCOL_VERSION`, `PeerInfo`, the exchange and status types, and the errors;
* `tadlora.node.peer_checks`: the checks on what a peer says of itself (`check_compatible`, `node_id_problem`);
* `tadlora.node.pb_mapping`: those types to and from their protobuf messages;
* `tadlora.node.exchange_stream`: a payload as a header and chunks, and read back verified;
* `tadlora.node.transport`: the interfaces (`NodeHandler`, `PeerConnection`, `Server`, `Transport`);
* `tadlora.node.responder` and `tadlora.node.caller`: `_Responder` and `_Caller`.
"""

from __future__ import annotations

from tadlora.node.caller import _Caller as _Caller
from tadlora.node.exchange_stream import _payload_messages as _payload_messages
from tadlora.node.exchange_stream import _receive_payload as _receive_payload
from tadlora.node.limits import _CHANNEL_OPTIONS as _CHANNEL_OPTIONS
from tadlora.node.limits import _SERVER_OPTIONS as _SERVER_OPTIONS
from tadlora.node.limits import DEFAULT_GRACE_S as DEFAULT_GRACE_S
from tadlora.node.limits import DEFAULT_PAYLOAD_TIMEOUT_S as DEFAULT_PAYLOAD_TIMEOUT_S
from tadlora.node.limits import GRPC_CLIENT_KEEPALIVE_MS as GRPC_CLIENT_KEEPALIVE_MS
from tadlora.node.limits import GRPC_KEEPALIVE_TIMEOUT_MS as GRPC_KEEPALIVE_TIMEOUT_MS
from tadlora.node.limits import GRPC_MAX_CONCURRENT_RPCS as GRPC_MAX_CONCURRENT_RPCS
from tadlora.node.limits import GRPC_MAX_CONCURRENT_STREAMS as GRPC_MAX_CONCURRENT_STREAMS
from tadlora.node.limits import GRPC_MAX_MESSAGE_BYTES as GRPC_MAX_MESSAGE_BYTES
from tadlora.node.limits import GRPC_MIN_PING_INTERVAL_MS as GRPC_MIN_PING_INTERVAL_MS
from tadlora.node.limits import GRPC_SERVER_KEEPALIVE_MS as GRPC_SERVER_KEEPALIVE_MS
from tadlora.node.limits import MAX_CANDIDATES_SHOWN as MAX_CANDIDATES_SHOWN
from tadlora.node.limits import MAX_DEGREE as MAX_DEGREE
from tadlora.node.limits import MAX_DETAIL_CHARS as MAX_DETAIL_CHARS
from tadlora.node.limits import MAX_EXCHANGES_PER_CALLER as MAX_EXCHANGES_PER_CALLER
from tadlora.node.limits import MAX_FETCHES_PER_CALLER as MAX_FETCHES_PER_CALLER
from tadlora.node.limits import MAX_ROUND as MAX_ROUND
from tadlora.node.limits import MAX_TEXT_CHARS as MAX_TEXT_CHARS
from tadlora.node.pb_mapping import _peer_refusal as _peer_refusal
from tadlora.node.peer_checks import NODE_ID_CHARS as NODE_ID_CHARS
from tadlora.node.peer_checks import SAME_MODEL_FIX as SAME_MODEL_FIX
from tadlora.node.peer_checks import SAME_PROTOCOL_FIX as SAME_PROTOCOL_FIX
from tadlora.node.peer_checks import SAME_SCHEDULE_FIX as SAME_SCHEDULE_FIX
from tadlora.node.peer_checks import _check_peer as _check_peer
from tadlora.node.peer_checks import check_compatible as check_compatible
from tadlora.node.peer_checks import check_sane as check_sane
from tadlora.node.peer_checks import node_id_problem as node_id_problem
from tadlora.node.peer_checks import schedules_differ as schedules_differ
from tadlora.node.protocol_types import NODE_SERVICE_NAME as NODE_SERVICE_NAME
from tadlora.node.protocol_types import PROTOCOL_VERSION as PROTOCOL_VERSION
from tadlora.node.protocol_types import BindError as BindError
from tadlora.node.protocol_types import CallEnded as CallEnded
from tadlora.node.protocol_types import CandidateStatus as CandidateStatus
from tadlora.node.protocol_types import ExchangeHeader as ExchangeHeader
from tadlora.node.protocol_types import ExchangeResult as ExchangeResult
from tadlora.node.protocol_types import NeighborStatus as NeighborStatus
from tadlora.node.protocol_types import OwnAddress as OwnAddress
from tadlora.node.protocol_types import PeerInfo as PeerInfo
from tadlora.node.protocol_types import PeerTimeout as PeerTimeout
from tadlora.node.protocol_types import PeerUnavailable as PeerUnavailable
from tadlora.node.protocol_types import StatusInfo as StatusInfo
from tadlora.node.responder import _Responder as _Responder
from tadlora.node.responder import _ServiceFault as _ServiceFault
from tadlora.node.transport import NodeHandler as NodeHandler
from tadlora.node.transport import PeerConnection as PeerConnection
from tadlora.node.transport import Server as Server
from tadlora.node.transport import Transport as Transport

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
