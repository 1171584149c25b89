"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process in tests)."""

from __future__ import annotations

import errno
import logging
import math
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer

from tadlora.node.config import is_wildcard
from tadlora.node.peers import DROP_CAUSES

log = logging.getLogger("tadlora.node")

EXCHANGE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)  # s


# What binding an IPv6 socket fails with on a host or a container without IPv6 (disabled, or no such family).
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


class _DualStackServer(ThreadingWSGIServer):
    """/metrics on every address, IPv4 (as mapped addresses) and IPv6 alike, whatever the host's
    net.ipv6.bindv6only says: as gRPC serves a wildcard --listen."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Not a line on stderr per scrape."""


def _serve_dual_stack(port: int, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread] | None:
    """/metrics on ``[::]:port`` taking IPv4 too; None where this host has no IPv6 (then IPv4 alone will do)."""
    if not socket.has_ipv6:
        return None
    try:
        server = make_server("::", port, make_wsgi_app(registry), _DualStackServer, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno in _NO_IPV6:
            return None
        raise  # e.g. the port is taken: binding IPv4 alone would say the same, less clearly
    thread = threading.Thread(target=server.serve_forever, name="tadlora-metrics", daemon=True)
    thread.start()
    return server, thread


class NodeMetrics:
    """The node's counters and gauges; `serve` exposes them over HTTP until `close`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("tadlora_round", "Round the node is in", registry=r)
        self.rounds = Counter("tadlora_rounds", "Rounds completed", registry=r)
        self.peers = Gauge("tadlora_peers", "Verified peers", registry=r)
        self.degree = Gauge("tadlora_degree", "Neighbours in the current round", registry=r)
        self.exchanges = Counter("tadlora_exchanges", "Exchanges by result", ["result"], registry=r)
        self.refusals = Counter("tadlora_refusals", "Refusals given or received, by reason", ["reason"], registry=r)
        self.bytes_sent = Counter("tadlora_bytes_sent", "Payload bytes sent", registry=r)
        self.bytes_received = Counter("tadlora_bytes_received", "Payload bytes received", registry=r)
        # Buckets up to the default --exchange-timeout (60 s) and past it: the client default stops at 10 s, which
        # would put every slow exchange of a large adapter or a loaded edge device into +Inf.
        self.latency = Histogram(
            "tadlora_exchange_seconds", "Exchange latency", registry=r, buckets=EXCHANGE_SECONDS_BUCKETS
        )
        # NaN until there is a value (as `status` says null): a gauge starts at 0, and a loss or an accuracy of 0
        # before the first round or evaluation (after every restart too) reads as a model that is perfect or broken.
        self.loss = Gauge("tadlora_train_loss", "Mean training loss of the last round", registry=r)
        self.loss.set(math.nan)
        self.probes = Counter(
            "tadlora_probes", "Handshakes asking a peer whether it is alive and which round it is in, by why",
            ["why"], registry=r,
        )  # fmt: skip
        self.peer_drops = Counter(
            "tadlora_peer_drops", "Peers dropped, by cause (goodbye, leave, refused, unanswered, exchange)",
            ["cause"], registry=r,
        )  # fmt: skip
        for cause in DROP_CAUSES:  # each at 0 from the start: a rate() over a series that appears late misses it
            self.peer_drops.labels(cause)
        self.checkpoint_failures = Counter("tadlora_checkpoint_failures", "Checkpoints not written", registry=r)
        self.accuracy = Gauge("tadlora_eval_accuracy", "Last evaluation accuracy", registry=r)
        self.accuracy.set(math.nan)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics on ``addr:port`` (a daemon thread owned by this object); ``addr`` may be a --listen host,
        an IPv6 one in brackets. A wildcard (``0.0.0.0`` as much as ``[::]``) serves IPv4 and IPv6 alike, as the
        node's gRPC port does, or IPv4 alone on a host without IPv6. Logs the URL (port 0: the port chosen).
        OSError naming --metrics-port if it cannot be bound."""
        host = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr  # getaddrinfo takes no brackets
        try:
            served = _serve_dual_stack(port, self.registry) if is_wildcard(host) else None
            if served is None:
                served = start_http_server(port, addr=host, registry=self.registry)
            self._server, self._thread = served
        except OSError as exc:  # raised once the model has loaded: say which flag to change
            raise OSError(f"--metrics-port {port}: cannot serve on {addr}:{port}: {exc.strerror or exc}") from None
        log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, self.port)

    @property
    def port(self) -> int:
        """The port /metrics is served on (the one chosen, for port 0); RuntimeError before `serve`."""
        if self._server is None:
            raise RuntimeError("NodeMetrics is not serving")
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint (safe to call twice). Blocking, up to the server's poll interval (0.5 s): call it
        off the event loop."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
