"""The node's view of its peers: candidates from discovery become peers only after a verified handshake.

A candidate (an mDNS advert, a static address, a peer that called us) is only a hint. The `PeerManager`
handshakes with it; a peer of another cluster, fingerprint, schedule or protocol is refused with the reason, logged
once. A verified peer stays until it says it leaves (a `Leave` call, or its mDNS goodbye) or fails: then it is
dropped, and retried with an exponential backoff (so a flapping peer costs little); one that comes back is a peer
again at its first handshake, whichever end makes it. When its mDNS advert names another address (it restarted
elsewhere), it is handshaken there at the next scan and moves once that handshake succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from tadlora.node.discovery import PeerCandidate
from tadlora.node.limits import MAX_PEERS, MAX_TEXT_CHARS
from tadlora.node.peer_checks import (
    SAME_MODEL_FIX,
    SAME_PROTOCOL_FIX,
    SAME_SCHEDULE_FIX,
    check_compatible,
    fingerprint_differences,
    schedules_differ,
)
from tadlora.node.protocol_types import CandidateStatus, OwnAddress, PeerInfo, PeerUnavailable
from tadlora.node.transport import PeerConnection, Transport
from tadlora.node.wire import ExchangeRefused, Reason

log = logging.getLogger("tadlora.peers")

HANDSHAKE_TIMEOUT_S = 5.0  # s; a handshake is one small unary call
RETRY_MIN_S = 1.0  # s before the first retry of a failed peer
RETRY_MAX_S = 30.0  # s; backoff doubles up to this
# Candidates a scan tries (at once): a flood of adverts or addresses (up to zeroconf's cache of 10,000 records) would
# otherwise open as many connections together. Those that have failed least go first, and among them those listed
# last, so a node that just started is tried at once however many dead ones are listed; the rest wait for the next
# scan, which follows at once, and a scan still ends within one candidate's time.
MAX_SCAN_HANDSHAKES = 64
SCAN_INTERVAL_S = 2.0  # s between scans for candidates to (re)try, besides discovery's change events
STABLE_S = 60.0  # s a peer must stay verified before a drop no longer counts as a flap (2x RETRY_MAX_S)
# s for all of a stopping node's peers together to take its Leave: one small unary call each, in parallel, on
# connections already open (a LAN answers in milliseconds). A peer that has not answered by then finds out as before
# (its round's deadline, then a probe), and the stop is never held longer than this for any number of peers.
LEAVE_TIMEOUT_S = 1.0

# Why a peer was dropped, as `PeerManager`'s ``on_drop`` hears it (the node's tadlora_peer_drops_total{cause}):
# its mDNS goodbye, its Leave, a handshake it refused (it can no longer be a peer: another cluster, fingerprint or
# protocol), a handshake it did not answer, or an exchange call to it that failed in transport.
DropCause = Literal["goodbye", "leave", "refused", "unanswered", "exchange"]
DROP_CAUSES: Final = get_args(DropCause)
# Refusals after which a peer cannot be ours as it is now: its address reaches another node, or it came back under
# its id with another protocol, cluster, model or schedule. Others (SHUTTING_DOWN, BUSY, ...) come from a peer that
# still is.
_NOT_A_PEER_NOW = frozenset(
    {
        Reason.IDENTITY_MISMATCH,
        Reason.PROTOCOL_MISMATCH,
        Reason.CLUSTER_MISMATCH,
        Reason.FINGERPRINT_MISMATCH,
        Reason.SCHEDULE_MISMATCH,
    }
)


@dataclass
class Peer:
    """A verified peer and the connection to it."""

    info: PeerInfo
    conn: PeerConnection
    source: str
    verified_at: float = field(default_factory=lambda: time.monotonic())


# An attempt's retry time for an address that reached this node itself: never, until this node moves.
SELF = float("inf")


@dataclass
class _Attempt:
    failures: int = 0  # failed tries in a row (handshakes, or drops counted as flaps)
    flaps: int = 0  # drops soon after being verified, in a row
    retry_at: float = 0.0
    why: str = ""  # why it is not a peer: its last failure, or its advert's refusal; "" once verified
    source: str = ""  # "static" (an address, or one a dns: name gave) or "mdns"
    seen_at: float = field(default_factory=lambda: time.monotonic())  # when discovery last listed it
    since: float = field(default_factory=lambda: time.monotonic())  # when discovery first listed it
    address: str = ""  # the address last dialled (with retry_at SELF: the one that reached this node itself)


async def _aclose_quietly(conn: PeerConnection) -> None:
    try:
        await conn.aclose()
    except Exception:
        log.exception("closing a connection whose handshake did not finish failed")


def _other_release(theirs: str, ours: str) -> str:
    """Nothing when a peer runs this node's release; else what it runs, for the line that says it was verified: in
    a rolling upgrade, which peers still run the old code."""
    if theirs == ours:
        return ""
    return (
        f"; it runs tadlora {theirs}, this node {ours}"
        if theirs
        else f"; it runs a tadlora too old to say, this node {ours}"
    )


def retry_delay(failures: int) -> float:
    """Seconds before the next try of a candidate that failed ``failures`` (>= 1) times in a row: 1, 2, 4 ... 30,
    and 30 however many failures (a static peer may stay down for days)."""
    # Past the cap the exponent no longer matters; left unbounded, 2 ** 1024 overflows the float product.
    doublings = min(failures - 1, math.ceil(math.log2(RETRY_MAX_S / RETRY_MIN_S)))
    return min(RETRY_MAX_S, RETRY_MIN_S * 2.0**doublings)


# What gRPC's error says of a TLS handshake that failed, and what it means here: the peer did answer, so "does not
# answer" would send the operator to the network, not to the certificates. Each row: the marker, what it means, and
# whether it means that only when this node dials in plaintext (--insecure): a TLS node closes the plaintext
# connection it accepted, and gRPC says no more than "Socket closed", which a TLS dial can meet for other reasons.
_TLS_FAILURES: Final = (
    ("CERTIFICATE_VERIFY_FAILED", "its certificate is not signed by this node's CA (--tls-dir): another cluster CA?",
     False),
    ("WRONG_VERSION_NUMBER", "not in TLS: a node run with --insecure?", False),
    ("Tls handshake failed", "the TLS handshake failed", False),
    ("Socket closed", "closes plaintext connections: a node that requires TLS? (this node runs --insecure)", True),
)  # fmt: skip


def _tls_failure(error: str, *, insecure: bool = False) -> str | None:
    """What a dial's error says went wrong in TLS (`_TLS_FAILURES`), or None for one that is not about TLS.
    ``insecure``: this node dials in plaintext (--insecure)."""
    return next(
        (meaning for marker, meaning, plaintext in _TLS_FAILURES if marker in error and (insecure or not plaintext)),
        None,
    )


class PeerManager:
    """Turns candidates into verified peers. Owns one background task (`run`) and the peer connections."""

    def __init__(
        self,
        transport: Transport,
        local_info: Callable[[], PeerInfo],
        candidates: Callable[[], list[tuple[str, str, PeerCandidate | None]]],
        on_change: Callable[[], None],
        on_drop: Callable[[DropCause], None] | None = None,
    ) -> None:
        """``on_change``: the peer set changed. ``on_drop``: a peer was dropped, and why (metrics)."""
        self._transport = transport
        self._local_info = local_info
        self._candidates = candidates  # (key, address, mdns candidate or None) to try
        self._on_change = on_change
        self._on_drop = on_drop
        self.peers: dict[str, Peer] = {}
        self._by_address: dict[str, str] = {}
        self._attempts: dict[str, _Attempt] = {}
        self._key_of: dict[str, str] = {}  # node id -> the candidate key it was verified through
        self._refused_logged: set[tuple[str, str]] = set()
        self._listed: dict[str, str] = {}  # key -> address of every candidate the last scan listed
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Scan now (discovery changed)."""
        self._wake.set()

    def own_address_changed(self) -> None:
        """This node moved to another address (a renumbering): the addresses it found to be itself may now reach
        another node (its old one, given to someone else), so they are tried again at the next scan."""
        for attempt in self._attempts.values():
            if attempt.retry_at == SELF:
                attempt.retry_at = 0.0
        self._wake.set()

    async def run(self) -> None:
        """Scan candidates until cancelled."""
        while True:
            self._wake.clear()  # before the scan: a change that arrives during it wakes the next one at once
            await self.scan()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that comes as the event is
            # set, and this loop would scan on for ever while the node's close waits for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCAN_INTERVAL_S):
                    await self._wake.wait()

    async def scan(self) -> None:
        """Handshake with every candidate that is not a peer yet and is due for a try; drop vanished peers."""
        now = time.monotonic()
        wanted = self._candidates()
        live_keys = {key for key, _, _ in wanted}
        self._listed = {key: address for key, address, _ in wanted}
        for key in live_keys & self._attempts.keys():
            self._attempts[key].seen_at = now
        self._forget_gone(live_keys, now)
        for node_id, peer in list(self.peers.items()):
            if peer.source == "mdns" and node_id not in live_keys:
                await self.drop(node_id, "left (mDNS goodbye)", cause="goodbye")
        tries: list[tuple[str, tuple[str, ...], str, _Attempt, str | None]] = []
        tried: set[str] = set()
        for key, address, cand in wanted:
            if cand is not None and key in self.peers and self.peers[key].info.address == address:
                self.peers[key].source = "mdns"  # verified by its own call first: its mDNS goodbye must drop it too
            if self._by_address.get(address) in self.peers:
                continue  # the address reaches a verified peer
            # Not known to reach anyone. For a verified peer, its advert names a new address (a restart elsewhere,
            # a new lease): dial it there, bound to its id. Its entry changes only when that handshake succeeds
            # (`add`); until then it stays at the old address, and a failure is retried with backoff.
            attempt = self._attempts.setdefault(key, _Attempt())
            attempt.source = "static" if cand is None else "mdns"
            if attempt.retry_at > now and attempt.address and address != attempt.address:
                # An mDNS key is a node id, and its advert now names another address than the one that failed or
                # was us (a restart elsewhere, a new lease; or a stale or forged advert had named our address):
                # what happened there says nothing of here, so it is dialled now, not after up to RETRY_MAX_S. Its
                # failures stay counted: one here too backs off further.
                attempt.retry_at = 0.0
            if attempt.retry_at > now:
                continue
            if cand is not None and (refused := self._prefilter(cand)):
                attempt.address, attempt.why = address, f"not dialled: its advert says {refused}"
                continue
            if key in tried:  # listed twice (a static address that a dns: name resolves to): one try, one backoff
                continue
            tried.add(key)
            # An advert names its node: dial that id, so that only a certificate naming it answers.
            expected = cand.node_id if cand is not None else None
            if cand is not None:
                tries.append((key, (address, *cand.alternates), "mdns", attempt, expected))
            else:
                tries.append((key, (address,), "static", attempt, expected))
        if len(tries) > MAX_SCAN_HANDSHAKES:
            tries.sort(key=lambda t: (t[3].failures, -t[3].since, t[0]))
            tries = tries[:MAX_SCAN_HANDSHAKES]
            self._wake.set()  # the others are due: the next scan follows at once
        # A task group, not gather: should one handshake fail unexpectedly (a bug, not a peer being down), the others
        # are cancelled and awaited here, closing their connections, instead of running on with no owner.
        try:
            async with asyncio.TaskGroup() as group:
                for args in tries:
                    group.create_task(self._try(*args), name=f"tadlora-handshake {args[0]}")
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None  # as itself: the node's owner reports what ended the peer manager

    def _forget_gone(self, live_keys: set[str], now: float) -> None:
        """Forget candidates that are no peer and have been unlisted for `STABLE_S`, so that churn (pods at new IPs,
        nodes under new ids) cannot grow this bookkeeping without bound. By then their backoff has run out
        (`RETRY_MAX_S` < `STABLE_S`); one that returns after so long starts afresh, as a peer that stayed up that
        long does (see `drop`)."""
        in_use = {self._key_of.get(node_id, node_id) for node_id in self.peers}
        for key in [key for key, a in self._attempts.items() if now - a.seen_at >= STABLE_S]:
            if key not in live_keys and key not in in_use:
                del self._attempts[key]
        # Refusals are logged once per candidate that is around; one that returns after this is logged again.
        known = live_keys | self._attempts.keys()
        self._refused_logged = {(who, why) for who, why in self._refused_logged if who in known}

    def _prefilter(self, cand: PeerCandidate) -> str:
        """Why ``cand``'s advert says it cannot be our peer (logged once), or "" when it may be."""
        local = self._local_info()
        reason = ""
        # In the handshake's order (`peer_checks._check_peer`): protocol first, since another protocol's node may
        # compute its fingerprint or spell its schedule otherwise, and those reasons would send the user to the wrong
        # fix.
        if cand.protocol_version != local.protocol_version:
            # With the releases, where the advert says its ("" from a node older than the "rel" key): which to install.
            theirs = f" (tadlora {cand.release})" if cand.release else ""
            ours = f", tadlora {local.release}" if local.release else ""
            reason = (
                f"protocol {cand.protocol_version}{theirs} is not ours ({local.protocol_version}{ours}): "
                f"{SAME_PROTOCOL_FIX}"
            )
        elif cand.cluster != local.cluster:
            reason = f"cluster {cand.cluster!r} is not ours ({local.cluster!r})"
        elif cand.fingerprint != local.fingerprint:
            # Which parts differ, where its advert names them ("" from a node older than the "fpp" key).
            parts = fingerprint_differences(cand.fingerprint_parts, local.fingerprint_parts, "its", "ours")
            reason = (
                f"model fingerprint {cand.fingerprint} differs from ours ({local.fingerprint})"
                + (f" in {parts}" if parts else "")
                + f": {SAME_MODEL_FIX}"
            )
            if schedules_differ(cand.schedule, local.schedule):  # both said at once: else one restart finds each
                reason += f"; its schedule {cand.schedule!r} differs too ({local.schedule!r}): {SAME_SCHEDULE_FIX}"
        elif schedules_differ(cand.schedule, local.schedule):
            reason = f"schedule {cand.schedule!r} differs from ours ({local.schedule!r}): {SAME_SCHEDULE_FIX}"
        elif cand.secure == local.insecure:
            reason = "it requires TLS and we run --insecure" if local.insecure else "it runs without TLS, we require it"
        if reason:
            self._log_refusal(cand.node_id, reason)
        return reason

    def _log_refusal(self, who: str, reason: str) -> None:
        if (who, reason) not in self._refused_logged:
            self._refused_logged.add((who, reason))
            log.warning("not a neighbour: %s: %s", who, reason)

    async def _try(
        self, key: str, addresses: tuple[str, ...], source: str, attempt: _Attempt, expected: str | None
    ) -> None:
        """Handshake with candidate ``key`` at the first of ``addresses`` (its address, then the other addresses its
        advert names) where ``expected`` (None: whoever) answers. If none does, it is backed off; if every one reached
        this node itself, it is not dialled again (`SELF`) until its advert or this node's address changes."""
        attempt.address = addresses[0]
        failure: str | None = None  # why the last address that did not reach this node itself failed
        unanswered = ""  # why the last address that did not answer at all did not (refusals are logged as they come)
        tls: str | None = None  # what its error says went wrong in TLS, where it did answer (`_tls_failure`)
        for address in addresses:
            conn = self._transport.connect(address, node_id=expected)
            try:
                info = await conn.handshake(self._local_info(), timeout=HANDSHAKE_TIMEOUT_S)
            except OwnAddress:  # our own address in another spelling (a host name, our IPv6 record)
                await conn.aclose()
                # Said once per candidate and address while it is listed (a candidate whose other address fails is
                # dialled here again at each backoff): expected of a dual-stack name's record of this node, a slip
                # in a static list, or an advert that names an address of this host (a loopback --listen elsewhere).
                if (key, itself := f"itself at {address}") not in self._refused_logged:
                    self._refused_logged.add((key, itself))
                    log.info("%s (%s) reaches this node itself at %s: not a peer there", key, source, address)
                continue
            except ExchangeRefused as exc:
                await conn.aclose()
                failure = f"refused the handshake: {exc.reason.name}: {exc.detail}"
                self._log_refusal(key, failure)
                continue
            except PeerUnavailable as exc:
                await conn.aclose()
                unanswered = str(exc)
                # The status's reason says it too, and the log line below.
                tls = _tls_failure(unanswered, insecure=self._local_info().insecure)
                failure = unanswered if tls is None else f"answers, but {tls}: {unanswered}"
                continue
            except BaseException:  # shutting down mid-handshake, or a failure of ours: the connection is nobody's yet
                await _aclose_quietly(conn)  # a failing close must not replace what ended the handshake
                raise
            if info.node_id == self._local_info().node_id:
                await conn.aclose()  # our own static address
                continue
            if expected is not None and info.node_id != expected:
                await conn.aclose()
                failure = f"advertised as {expected!r} but answers as {info.node_id!r}"
                self._log_refusal(key, failure)
                continue
            break
        else:
            if failure is None:
                attempt.retry_at = SELF
            else:
                if unanswered and attempt.failures == 0:
                    # Once per outage (a drop logs its own): without it, a static peer with a typo in its address or
                    # behind a firewall is retried in silence, and the node trains alone with nothing saying why.
                    # Two lines, each whole in the code: troubleshooting.md quotes them (test_troubleshooting).
                    if tls is not None:
                        log.info("%s (%s) answers, but %s; retried up to every %.0f s: %s", key, source, tls,
                                 RETRY_MAX_S, unanswered)  # fmt: skip
                    else:
                        log.info("%s (%s) does not answer, retried up to every %.0f s: %s", key, source, RETRY_MAX_S,
                                 unanswered)  # fmt: skip
                self._backoff(attempt, failure)
            return
        if address != addresses[0]:
            log.info("%s answers at %s, not at %s", key, address, addresses[0])
        if expected is None:
            # Dialled by address: dial again expecting the id it claims, so that its certificate must name it
            # (with TLS; the first call only proved it belongs to the cluster).
            await conn.aclose()
            claimed = info.node_id
            conn = self._transport.connect(address, node_id=claimed)
            try:
                info = await conn.handshake(self._local_info(), timeout=HANDSHAKE_TIMEOUT_S)
                if info.node_id != claimed:
                    raise ExchangeRefused(Reason.IDENTITY_MISMATCH, f"then answered as {info.node_id!r}")
            except (ExchangeRefused, PeerUnavailable) as exc:
                await conn.aclose()
                failure = f"answers as {claimed!r}, which its certificate does not prove: {exc}"
                self._log_refusal(key, failure)
                self._backoff(attempt, failure)
                return
            except BaseException:  # as for the first dial: shutting down, or a failure of ours
                await _aclose_quietly(conn)
                raise
        if not self._has_room_for(info.node_id):  # `add` would refuse it: backed off like a refusal
            await conn.aclose()
            self._log_refusal(key, self._full())
            self._backoff(attempt, self._full())
            return
        attempt.failures, attempt.retry_at, attempt.why = 0, 0.0, ""  # its flaps stay counted (see drop)
        self._key_of[info.node_id] = key
        await self.add(info, conn, source)
        # The address we dialled may differ from the one the peer announces (localhost, a DNS record, another
        # interface), and from the candidate's own (when an alternate answered): remember them too, so the next scan
        # does not handshake the same peer again.
        if info.node_id in self.peers:
            self._by_address[address] = self._by_address[addresses[0]] = info.node_id

    def _has_room_for(self, node_id: str) -> bool:
        """Whether ``node_id`` is a peer, or may become one (fewer than `MAX_PEERS` are kept)."""
        return node_id in self.peers or len(self.peers) < MAX_PEERS

    @staticmethod
    def _full() -> str:
        """Why a new peer is refused while this node keeps `MAX_PEERS`."""
        return f"this node has {MAX_PEERS} peers, the most it keeps"

    def _backoff(self, attempt: _Attempt, reason: str) -> None:
        attempt.failures += 1
        attempt.why = reason
        attempt.retry_at = time.monotonic() + retry_delay(attempt.failures)

    def knows(self, node_id: str) -> bool:
        """Whether ``node_id`` is a peer, or one this manager still tracks (dropped and backed off, or still listed by
        discovery); one it has forgotten (`_forget_gone`: gone for `STABLE_S`) returns as a stranger, so what others
        keep about it may go too."""
        return node_id in self.peers or node_id in self._attempts

    def retry_at(self, key: str) -> float | None:
        """When (time.monotonic) candidate ``key`` is tried next after failing; None if it is not failing."""
        attempt = self._attempts.get(key)
        return attempt.retry_at if attempt is not None and attempt.failures else None

    def unreachable(self) -> list[CandidateStatus]:
        """The candidates the last scan listed that are no peer and failed or were refused, each with why (by key):
        what `status` shows, so that a node training alone says why without a look at its log. A candidate not tried
        yet, one whose address reaches a verified peer, and one that turned out to be this node itself are left
        out."""
        now = time.monotonic()
        verified = set(self.peers) | {self._key_of.get(node_id, node_id) for node_id in self.peers}
        found = []
        for key, address in sorted(self._listed.items()):
            attempt = self._attempts.get(key)
            if key in verified or self._by_address.get(address) in self.peers or attempt is None:
                continue
            if attempt.why and attempt.retry_at != SELF:
                retry_in = max(0.0, attempt.retry_at - now) if attempt.failures else 0.0
                found.append(
                    CandidateStatus(key=key, address=attempt.address or address, source=attempt.source,
                                    failures=attempt.failures, retry_in_seconds=retry_in, reason=attempt.why)
                )  # fmt: skip
        return found

    async def add(self, info: PeerInfo, conn: PeerConnection | None, source: str) -> None:
        """Make ``info`` a verified peer (a handshake succeeded, in either direction). `ExchangeRefused`
        (NOT_A_NEIGHBOR) for a new one while this node keeps `MAX_PEERS` already."""
        check_compatible(self._local_info(), info)
        if not self._has_room_for(info.node_id):
            raise ExchangeRefused(Reason.NOT_A_NEIGHBOR, self._full())
        old = self.peers.get(info.node_id)
        if old is not None and old.info.address == info.address:
            old.info = info
            if source == "mdns":
                old.source = source  # as in scan: advertised on mDNS, so its goodbye drops it
            if conn is not None:
                await conn.aclose()
            return
        # The table changes before any await, so that two adds of one peer at once cannot both replace the same
        # entry and leave one of their connections open and unreferenced; the replaced one is closed after.
        conn = conn or self._transport.connect(info.address, node_id=info.node_id)
        self.peers[info.node_id] = Peer(info, conn, source)
        if old is not None:  # it moved: the addresses that reached it may reach another node now (a reused IP)
            self._forget_addresses(info.node_id)
        self._by_address[info.address] = info.node_id
        log.info("peer %s verified at %s (%s%s)", info.node_id, info.address, source,
                 _other_release(info.release, self._local_info().release))  # fmt: skip
        self._on_change()
        if old is not None:
            await old.conn.aclose()

    async def probe(self, node_id: str, why: str) -> PeerInfo | None:
        """Handshake with peer ``node_id``; its answer, or None. A peer that does not answer, or that can no longer
        be a peer (`_NOT_A_PEER_NOW`), is dropped (``why``: what made us ask). Only the failed caller of an exchange
        sees a dead peer fail; its callee, or a node that was itself cut off, learns it here and stops waiting for
        the peer each round."""
        peer = self.peers.get(node_id)
        if peer is None:
            return None
        try:
            info = await peer.conn.handshake(self._local_info(), timeout=HANDSHAKE_TIMEOUT_S)
        except ExchangeRefused as exc:  # refused by it, or its reply by us (e.g. a state no node can be in)
            log.info("handshake with peer %s (%s) refused: %s: %s", node_id, why, exc.reason.name, exc.detail)
            if exc.reason in _NOT_A_PEER_NOW:  # kept, it would stay a neighbour that never exchanges
                await self.drop(node_id, f"{why}, and {exc.detail}", expected=peer, cause="refused")
            return None  # it answers, so it is alive, but will not tell us its state now
        except PeerUnavailable as exc:
            await self.drop(node_id, f"{why} and does not answer ({exc})", expected=peer, cause="unanswered")
            return None
        if self.peers.get(node_id) is peer and info.address == peer.info.address:
            peer.info = info  # what we know of its round is now fresh
        return info

    def note_mixed(self, node_id: str, t: int) -> None:
        """Peer ``node_id`` mixed with us in round ``t``: it is in round t or later and last mixed at t or later.
        Keeping this current is what lets catch-up tell a peer that is out of step from one we merely have not
        handshaken with since it started (`PeerInfo.round` would otherwise be its round at the last handshake)."""
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.info = dataclasses.replace(
                peer.info, round=max(peer.info.round, t), last_mixed_round=max(peer.info.last_mixed_round, t + 1)
            )

    async def drop(self, node_id: str, why: str, expected: Peer | None = None, *, cause: DropCause) -> None:
        """Forget a peer (it left or failed); a failed one is retried with backoff. With ``expected`` (the entry a
        failed call used), only if that entry is still the one stored: `add` closes a peer's old connection when
        its address changes, which fails calls in flight on it, and those must not drop the new, healthy entry.
        ``why`` goes to the log line; ``cause`` (one of `DROP_CAUSES`) to ``on_drop``, once per peer dropped."""
        peer = self.peers.get(node_id)
        if peer is None or (expected is not None and peer is not expected):
            return
        if self._on_drop is not None:
            try:
                self._on_drop(cause)
            except Exception:  # an observer's bug must not keep a dead peer in the set
                log.exception("peer-drop observer failed")
        del self.peers[node_id]
        key = self._key_of.pop(node_id, node_id)
        # Every candidate that reached it would dial it again at the next scan: a static or dns: address that it
        # was verified at by its own call (so `_key_of` has no key for it), or its mDNS id. All wait alike.
        others = {node_id, *(a for a, n in self._by_address.items() if n == node_id)} - {key}
        self._forget_addresses(node_id)
        attempt = self._attempts.setdefault(key, _Attempt())
        if time.monotonic() - peer.verified_at >= STABLE_S:
            attempt.flaps = 0  # it was up for long: a one-off failure, retried after RETRY_MIN_S
        attempt.flaps += 1
        attempt.failures = attempt.flaps - 1
        # A peer dropped again soon after it was verified waits longer each time.
        self._backoff(attempt, f"dropped: {why}")
        for other in others:
            self._attempts[other] = dataclasses.replace(attempt, seen_at=self._attempts.get(other, attempt).seen_at)
        log.info("peer %s dropped: %s", node_id, why)
        await peer.conn.aclose()
        self._on_change()

    async def left(self, info: PeerInfo) -> None:
        """Peer ``info`` says it is stopping (its `Leave`, authenticated by the transport): drop it now, as its mDNS
        goodbye does, so that no round waits out its deadline for it. It is not forgotten: its address stays a
        candidate, retried with backoff, and it is a peer again at its next handshake (a restarted node dials its
        peers). `ExchangeRefused` NOT_A_NEIGHBOR, and nothing dropped, for a node that is no peer here, or one that
        is a peer at another address than the one it leaves from (it has moved there since)."""
        peer = self.peers.get(info.node_id)
        me = self._local_info().node_id
        if peer is None:
            raise ExchangeRefused(Reason.NOT_A_NEIGHBOR, f"{info.node_id!r} is not a peer of {me!r}")
        if peer.info.address != info.address:
            raise ExchangeRefused(
                Reason.NOT_A_NEIGHBOR,
                f"{info.node_id!r} is a peer of {me!r} at {peer.info.address}, not at {info.address[:MAX_TEXT_CHARS]}",
            )
        await self.drop(info.node_id, "left (it said so as it stopped)", expected=peer, cause="leave")

    async def tell_leaving(self, timeout: float = LEAVE_TIMEOUT_S) -> None:
        """Tell every verified peer, in parallel, that this node is stopping (`Leave`), so that none waits out a
        round's deadline for it. Best effort: returns within ``timeout`` s whatever the peers do (one that does not
        answer, or refuses, finds out as before), and logs what each said in one line. Call it once nothing of this
        node handshakes any more (a handshake of ours would make a peer take us back)."""
        peers = list(self.peers.items())
        if not peers:
            return
        info = self._local_info()
        said: dict[str, str] = {}

        async def tell(node_id: str, peer: Peer) -> None:
            try:
                known = await peer.conn.leave(info, timeout)
            except ExchangeRefused as exc:
                said[node_id] = f"refused: {exc.reason.name}: {exc.detail}"
            except PeerUnavailable as exc:
                said[node_id] = f"no answer: {exc.detail}"
            else:
                said[node_id] = "dropped this node" if known else "an earlier release, without Leave"

        try:
            async with asyncio.timeout(timeout):
                async with asyncio.TaskGroup() as group:  # as in `scan`: no call outlives this, whatever happens
                    for node_id, peer in peers:
                        group.create_task(tell(node_id, peer), name=f"tadlora-leave {node_id}")
        except TimeoutError:
            pass  # those that did not answer in time are said below
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        told = "; ".join(f"{j}: {said.get(j, f'no answer within {timeout:g} s')}" for j, _ in peers)
        log.info("told %d peer(s) that this node is leaving: %s", len(peers), told)

    def _forget_addresses(self, node_id: str) -> None:
        for address in [a for a, n in self._by_address.items() if n == node_id]:
            del self._by_address[address]

    async def aclose(self) -> None:
        """Close every connection (safe to call twice). Each one is closed even if closing another failed or this
        was cancelled (the table is empty by then, so no one else would); then the cancellation, else the first
        failure, is raised."""
        peers, self.peers = self.peers, {}
        self._by_address.clear()
        cancelled: asyncio.CancelledError | None = None
        failures: list[Exception] = []
        for node_id, peer in peers.items():
            try:
                await peer.conn.aclose()
            except asyncio.CancelledError as exc:
                cancelled = cancelled or exc
            except Exception as exc:
                log.error("closing the connection to peer %s failed: %s", node_id, exc, exc_info=exc)
                failures.append(exc)
        if cancelled is not None:
            raise cancelled
        if failures:
            raise failures[0]
