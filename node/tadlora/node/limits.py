"""The protocol's limits: the gRPC settings both ends set, the caps on what a peer may say of itself, how many
calls one caller may have in flight at a callee, and the default timeouts. Pure constants, each with its unit and
its reason.
"""

from __future__ import annotations

from typing import Final

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
# Verified peers a node keeps: past this a new one is refused (NOT_A_NEIGHBOR). A cluster mixes over at most
# MAX_DEGREE of them a round; without TLS anyone who reaches a node may handshake under as many ids as it likes.
MAX_PEERS: Final = 4 * MAX_DEGREE
MAX_CANDIDATES_SHOWN: Final = 64  # failing candidates a status reply lists (the first by key): a flood of adverts
MAX_ROUND: Final = 1 << 40  # rounds; ~35 000 years of one-second rounds, and exact as a float in JSON logs
MAX_TEXT_CHARS: Final = 256  # chars in an id, cluster, fingerprint, address, method or schedule (ids are <= 63)
MAX_DETAIL_CHARS: Final = 1024  # chars of a peer's refusal detail kept (ours are one sentence)
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
