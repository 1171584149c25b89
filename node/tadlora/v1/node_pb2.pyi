from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_REASON_UNSPECIFIED: _ClassVar[RefusalReason]
    REFUSAL_REASON_PROTOCOL_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_CLUSTER_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_FINGERPRINT_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_ROUND_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_NOT_A_NEIGHBOR: _ClassVar[RefusalReason]
    REFUSAL_REASON_BAD_PAYLOAD: _ClassVar[RefusalReason]
    REFUSAL_REASON_DIGEST_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_TOO_LARGE: _ClassVar[RefusalReason]
    REFUSAL_REASON_SHUTTING_DOWN: _ClassVar[RefusalReason]
    REFUSAL_REASON_DEADLINE: _ClassVar[RefusalReason]
    REFUSAL_REASON_INTERNAL: _ClassVar[RefusalReason]
    REFUSAL_REASON_IDENTITY_MISMATCH: _ClassVar[RefusalReason]
    REFUSAL_REASON_BUSY: _ClassVar[RefusalReason]
    REFUSAL_REASON_SCHEDULE_MISMATCH: _ClassVar[RefusalReason]
REFUSAL_REASON_UNSPECIFIED: RefusalReason
REFUSAL_REASON_PROTOCOL_MISMATCH: RefusalReason
REFUSAL_REASON_CLUSTER_MISMATCH: RefusalReason
REFUSAL_REASON_FINGERPRINT_MISMATCH: RefusalReason
REFUSAL_REASON_ROUND_MISMATCH: RefusalReason
REFUSAL_REASON_NOT_A_NEIGHBOR: RefusalReason
REFUSAL_REASON_BAD_PAYLOAD: RefusalReason
REFUSAL_REASON_DIGEST_MISMATCH: RefusalReason
REFUSAL_REASON_TOO_LARGE: RefusalReason
REFUSAL_REASON_SHUTTING_DOWN: RefusalReason
REFUSAL_REASON_DEADLINE: RefusalReason
REFUSAL_REASON_INTERNAL: RefusalReason
REFUSAL_REASON_IDENTITY_MISMATCH: RefusalReason
REFUSAL_REASON_BUSY: RefusalReason
REFUSAL_REASON_SCHEDULE_MISMATCH: RefusalReason

class PeerInfo(_message.Message):
    __slots__ = ("protocol_version", "cluster", "fingerprint", "node_id", "round", "degree", "address", "method", "insecure", "last_mixed_round", "schedule", "fingerprint_parts", "release")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INSECURE_FIELD_NUMBER: _ClassVar[int]
    LAST_MIXED_ROUND_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_PARTS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    cluster: str
    fingerprint: str
    node_id: str
    round: int
    degree: int
    address: str
    method: str
    insecure: bool
    last_mixed_round: int
    schedule: str
    fingerprint_parts: str
    release: str
    def __init__(self, protocol_version: _Optional[int] = ..., cluster: _Optional[str] = ..., fingerprint: _Optional[str] = ..., node_id: _Optional[str] = ..., round: _Optional[int] = ..., degree: _Optional[int] = ..., address: _Optional[str] = ..., method: _Optional[str] = ..., insecure: _Optional[bool] = ..., last_mixed_round: _Optional[int] = ..., schedule: _Optional[str] = ..., fingerprint_parts: _Optional[str] = ..., release: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("caller",)
    CALLER_FIELD_NUMBER: _ClassVar[int]
    caller: PeerInfo
    def __init__(self, caller: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("accepted", "reason", "detail", "callee")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CALLEE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: RefusalReason
    detail: str
    callee: PeerInfo
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[_Union[RefusalReason, str]] = ..., detail: _Optional[str] = ..., callee: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class ExchangeHeader(_message.Message):
    __slots__ = ("protocol_version", "node_id", "cluster", "fingerprint", "round", "degree", "total_bytes", "sha256", "num_chunks", "schedule")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    cluster: str
    fingerprint: str
    round: int
    degree: int
    total_bytes: int
    sha256: str
    num_chunks: int
    schedule: str
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., cluster: _Optional[str] = ..., fingerprint: _Optional[str] = ..., round: _Optional[int] = ..., degree: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., num_chunks: _Optional[int] = ..., schedule: _Optional[str] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("reason", "detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: RefusalReason
    detail: str
    def __init__(self, reason: _Optional[_Union[RefusalReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ExchangeMessage(_message.Message):
    __slots__ = ("header", "chunk", "refusal")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    header: ExchangeHeader
    chunk: bytes
    refusal: Refusal
    def __init__(self, header: _Optional[_Union[ExchangeHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("node_id", "round", "accept")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    accept: bool
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., accept: _Optional[bool] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("committed", "reason", "detail")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    reason: RefusalReason
    detail: str
    def __init__(self, committed: _Optional[bool] = ..., reason: _Optional[_Union[RefusalReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("caller",)
    CALLER_FIELD_NUMBER: _ClassVar[int]
    caller: PeerInfo
    def __init__(self, caller: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("caller",)
    CALLER_FIELD_NUMBER: _ClassVar[int]
    caller: PeerInfo
    def __init__(self, caller: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("dropped", "reason", "detail")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    reason: RefusalReason
    detail: str
    def __init__(self, dropped: _Optional[bool] = ..., reason: _Optional[_Union[RefusalReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NeighborStatus(_message.Message):
    __slots__ = ("node_id", "address", "degree", "last_round", "weight", "release")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    degree: int
    last_round: int
    weight: float
    release: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., degree: _Optional[int] = ..., last_round: _Optional[int] = ..., weight: _Optional[float] = ..., release: _Optional[str] = ...) -> None: ...

class CandidateStatus(_message.Message):
    __slots__ = ("key", "address", "source", "failures", "retry_in_seconds", "reason")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    RETRY_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key: str
    address: str
    source: str
    failures: int
    retry_in_seconds: float
    reason: str
    def __init__(self, key: _Optional[str] = ..., address: _Optional[str] = ..., source: _Optional[str] = ..., failures: _Optional[int] = ..., retry_in_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node", "phase", "rounds_completed", "last_loss", "last_accuracy", "state", "neighbors", "uptime_seconds", "candidates", "release", "neighbors_total", "candidates_total")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    node: PeerInfo
    phase: str
    rounds_completed: int
    last_loss: float
    last_accuracy: float
    state: str
    neighbors: _containers.RepeatedCompositeFieldContainer[NeighborStatus]
    uptime_seconds: float
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateStatus]
    release: str
    neighbors_total: int
    candidates_total: int
    def __init__(self, node: _Optional[_Union[PeerInfo, _Mapping]] = ..., phase: _Optional[str] = ..., rounds_completed: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_accuracy: _Optional[float] = ..., state: _Optional[str] = ..., neighbors: _Optional[_Iterable[_Union[NeighborStatus, _Mapping]]] = ..., uptime_seconds: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[CandidateStatus, _Mapping]]] = ..., release: _Optional[str] = ..., neighbors_total: _Optional[int] = ..., candidates_total: _Optional[int] = ...) -> None: ...
