"""Finding peers by mDNS (DNS-SD over multicast) on chosen interfaces: advertising this node, browsing for others.

The --peers grammar is in `tadlora.node.peerspec`, interface selection in `tadlora.node.netif`.

Discovery only reports candidates, with every field the node needs to decide; it never filters by cluster,
fingerprint, schedule or protocol, because the node must be able to say *why* it refuses a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from zeroconf import BadTypeInNameException, DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from tadlora.node.netif import ipv4_by_interface, ipv4_networks, require_unicast_ipv4
from tadlora.node.peer_checks import is_release, node_id_problem, parse_fingerprint_parts
from tadlora.node.peerspec import PORT_MAX

__all__ = [
    "QUESTION_TYPE",
    "REBIND_GRACE_S",
    "RESOLVE_TIMEOUT_MS",
    "SERVICE_TYPE",
    "Advertisement",
    "MdnsDiscovery",
    "PeerCandidate",
    "async_resolve_candidate",
    "candidate_from_info",
    "service_instance_name",
]

log = logging.getLogger("tadlora.discovery")

SERVICE_TYPE = "_tadlora._tcp.local."
# s a rebind keeps listing the peers seen before it: the new browser finds them in about 0.1 s (its first query),
# or at their next announcement; a peer that left meanwhile is dropped after this.
REBIND_GRACE_S = 10.0
# Addresses of one advert dialled in turn (`PeerManager._try`: up to a handshake timeout each): a host has a few, and
# an advert may name hundreds, which held every scan for minutes (the nearest, on this node's subnets, come first).
MAX_ADVERT_ADDRESSES = 4
RESOLVE_TIMEOUT_MS = 3000  # ms; one SRV/TXT/A resolution, zeroconf's own default (it re-asks several times)
_INSTANCE_MAX_BYTES = 63  # bytes; RFC 6763 §4.1.1: a service instance name is a single DNS label
_TXT_ENTRY_MAX_BYTES = 255  # bytes; RFC 6763 §6.1: one "key=value" string is length-prefixed by one byte
# Ask for multicast answers (QM), not unicast (QU, RFC 6762 §5.4): several nodes on one host share UDP port 5353,
# and the kernel hands a unicast answer to just one of those sockets, so a QU answer is often lost there.
QUESTION_TYPE = DNSQuestionType.QM

Source = Literal["mdns", "static", "dns"]
_SECURITY = {"tls": True, "insecure": False}
_HEX = re.compile(r"[0-9a-fA-F]+")
# ASCII digits only: str.isdigit() also holds for '²' (which int() refuses) and '١' (which int() reads as 1).
_DECIMAL = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class PeerCandidate:
    """A peer as discovery saw it; the node decides whether to talk to it (cluster, fingerprint, proto, sec,
    schedule)."""

    node_id: str
    address: str  # "host:port", host an IPv4 address
    cluster: str
    fingerprint: str  # hex
    protocol_version: int
    secure: bool
    source: Source
    service_name: str
    # The other addresses its advert names ("host:port", in order of preference): tried in turn when ``address`` does
    # not answer (a peer's interface may carry addresses on several subnets, and only some reach this node).
    alternates: tuple[str, ...] = ()
    # Its `NodeConfig.schedule` (TXT "sched"); "" from an advert without one (a node older than the key): unknown,
    # and then not compared, as the handshake does not compare an empty one.
    schedule: str = ""
    # Its `tadlora.adapter.fingerprint_parts` (TXT "fpp"); "" from an advert without one (a node older than the key)
    # or with one that is not such a text: then a refusal for another fingerprint names no part.
    fingerprint_parts: str = ""
    # The tadlora release it runs (TXT "rel"); "" from an advert without one (a node older than the key) or with one
    # that is no version (`is_release`). Only said, never compared.
    release: str = ""


@dataclass(frozen=True)
class Advertisement:
    """What this node announces; advertise_address None means the address of the chosen interface(s)."""

    node_id: str
    port: int
    cluster: str
    fingerprint: str
    protocol_version: int
    secure: bool
    advertise_address: str | None = None
    schedule: str = ""  # `NodeConfig.schedule`; "" publishes none (as a node older than the "sched" key)
    fingerprint_parts: str = ""  # `tadlora.adapter.fingerprint_parts`; "" publishes none (as before the "fpp" key)
    release: str = ""  # `tadlora.__version__`; "" publishes none (as before the "rel" key)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if not self.cluster:
            raise ValueError("cluster must not be empty")
        if not 1 <= self.port <= PORT_MAX:
            raise ValueError(f"port {self.port} is outside 1..65535")
        if not _HEX.fullmatch(self.fingerprint):
            raise ValueError(f"fingerprint {self.fingerprint!r} is not a hex string")
        if self.protocol_version < 0:
            raise ValueError(f"protocol_version {self.protocol_version} is negative")
        if self.advertise_address is not None:
            require_unicast_ipv4(self.advertise_address, "advertise_address")
        if self.fingerprint_parts and parse_fingerprint_parts(self.fingerprint_parts) is None:
            raise ValueError(f"fingerprint_parts {self.fingerprint_parts!r} is not a fingerprint_parts text")
        if not is_release(self.release):
            raise ValueError(f"release {self.release!r} is not a version")
        for key, value in self.txt().items():
            if len(f"{key}={value}".encode()) > _TXT_ENTRY_MAX_BYTES:
                raise ValueError(f"TXT entry {key!r} is longer than {_TXT_ENTRY_MAX_BYTES} bytes")

    def txt(self) -> dict[str, str]:
        """The TXT record this advertisement publishes."""
        txt = {
            "id": self.node_id,
            "cluster": self.cluster,
            "fp": self.fingerprint,
            "proto": str(self.protocol_version),
            "sec": "tls" if self.secure else "insecure",
        }
        if self.schedule:
            txt["sched"] = self.schedule
        if self.fingerprint_parts:
            txt["fpp"] = self.fingerprint_parts
        if self.release:
            txt["rel"] = self.release
        return txt


def service_instance_name(node_id: str, cluster: str) -> str:
    """The DNS-SD instance label for a node: ``id@cluster`` when both are tame and it fits, else a sanitised prefix
    and a hash of both.

    The cluster is part of it because node ids are only unique within a cluster: two clusters' ``node-0`` on one
    network would otherwise announce under one name, and zeroconf's renaming of the second is a race between probes.
    """
    # Lowercase only: DNS compares names case-insensitively, so clusters "Lab" and "lab" must not both be tame.
    parts = [re.sub(r"[^a-z0-9_-]+", "-", part.lower()).strip("-") or "node" for part in (node_id, cluster)]
    clean = "@".join(parts)
    if parts == [node_id, cluster] and len(clean) <= _INSTANCE_MAX_BYTES:
        return clean
    # The hash keeps two ids that sanitise alike (or share a long prefix) on different names.
    digest = _identity_digest(node_id, cluster)[:8]
    return f"{clean[: _INSTANCE_MAX_BYTES - len(digest) - 1]}-{digest}"


def _identity_digest(node_id: str, cluster: str) -> str:
    # JSON, so that no two (id, cluster) pairs encode alike.
    return hashlib.sha256(json.dumps([node_id, cluster]).encode()).hexdigest()


async def async_resolve_candidate(
    zeroconf: Zeroconf, service_type: str, name: str, reachable: Sequence[ipaddress.IPv4Network] = ()
) -> PeerCandidate | str | None:
    """Resolve the service instance ``name``: the candidate it announces, a reason it cannot be one (a foreign
    name, a malformed TXT record; see `candidate_from_info`, which ``reachable`` is passed to), or None if it did
    not answer within `RESOLVE_TIMEOUT_MS`."""
    try:
        info = AsyncServiceInfo(service_type, name)
    except BadTypeInNameException:  # anyone on the LAN may point a PTR of our type at any name
        return f"not an instance of {service_type}"
    if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS, question_type=QUESTION_TYPE):
        return None
    return candidate_from_info(info, reachable)


def candidate_from_info(info: AsyncServiceInfo, reachable: Sequence[ipaddress.IPv4Network] = ()) -> PeerCandidate | str:
    """A PeerCandidate from a resolved service, or the reason it is not one. Of the addresses it announces (an
    interface may have several, on different subnets), the candidate's is the first on one of the ``reachable``
    networks (this node's mDNS interfaces'), else the first: a peer is dialled where this node reaches it. The others
    are its ``alternates``, dialled in turn when that one does not answer (`MAX_ADVERT_ADDRESSES` in all)."""
    txt: dict[str, str] = {}
    for raw_key, raw_value in info.properties.items():
        try:
            txt[raw_key.decode()] = (raw_value or b"").decode()
        except UnicodeDecodeError:
            return f"TXT key {raw_key!r} is not UTF-8"
    missing = [key for key in ("id", "cluster", "fp", "proto", "sec") if not txt.get(key)]
    if missing:
        return f"TXT lacks {', '.join(missing)}"
    if not _DECIMAL.fullmatch(txt["proto"]):
        return f"TXT proto={txt['proto']!r} is not a non-negative integer"
    if not _HEX.fullmatch(txt["fp"]):
        return f"TXT fp={txt['fp']!r} is not hex"
    if txt["sec"] not in _SECURITY:
        return f"TXT sec={txt['sec']!r} is neither 'tls' nor 'insecure'"
    if (problem := node_id_problem(txt["id"])) is not None:
        return f"TXT id: {problem}"  # another spelling of a node id would make its certificate count twice
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or not info.port:
        return "no IPv4 address or port"
    addresses = [a for a in addresses if _is_unicast(a)]
    if not addresses:
        return f"no unicast IPv4 address in {info.parsed_addresses(IPVersion.V4Only)!r}"
    # zeroconf lists the most recently announced address first: that one, unless another is on our own subnets.
    # The rest follow as alternates, those on our subnets first.
    near = [a for a in addresses if any(ipaddress.IPv4Address(a) in net for net in reachable)]
    ordered = [f"{a}:{info.port}" for a in dict.fromkeys(near + addresses)][:MAX_ADVERT_ADDRESSES]
    # Absent from an older node's advert. One that is not a parts text is passed over, not the advert with it: it only
    # says which parts of another fingerprint differ, and the advert is good without it.
    parts = txt.get("fpp", "")
    parts = parts if parse_fingerprint_parts(parts) is not None else ""
    release = txt.get("rel", "")  # the same for the release, which is only ever said
    release = release if is_release(release) else ""
    return PeerCandidate(
        node_id=txt["id"],
        address=ordered[0],
        cluster=txt["cluster"],
        fingerprint=txt["fp"],
        protocol_version=int(txt["proto"]),
        secure=_SECURITY[txt["sec"]],
        source="mdns",
        service_name=info.name,
        alternates=tuple(ordered[1:]),
        schedule=txt.get("sched", ""),  # absent from an older node's advert
        fingerprint_parts=parts,
        release=release,
    )


def _check_interfaces(interfaces: list[str]) -> None:
    if not interfaces:
        raise ValueError("MdnsDiscovery needs at least one interface address; it never uses all of them")
    local = {address for addresses in ipv4_by_interface().values() for address in addresses}
    for address in interfaces:
        require_unicast_ipv4(address, "interface address")
        if address not in local:  # checked here: zeroconf would fail with ENODEV and leak its listen socket
            raise ValueError(f"interface address {address} is not an address of this host")


def _is_unicast(address: str) -> bool:
    try:
        require_unicast_ipv4(address, "address")
    except ValueError:
        return False
    return True


class MdnsDiscovery:
    """Advertise this node and browse for peers over mDNS on the given IPv4 interface addresses only.

    Use as ``async with MdnsDiscovery(advert, ["127.0.0.1"]) as mdns:``; leaving sends goodbye packets.
    """

    def __init__(
        self,
        advert: Advertisement,
        interfaces: list[str],
        on_change: Callable[[], None] | None = None,
    ) -> None:
        _check_interfaces(interfaces)
        self._advert = advert
        self._interfaces = list(interfaces)
        self._on_change = on_change
        self._aiozc: AsyncZeroconf | None = None
        # The zeroconf whose browser events count: the current binding's, None while it is being left. The old
        # browser lives on while its goodbyes are sent; an event from it then would start a resolution whose answer
        # lands in the next binding, where no browser of its own would ever remove it.
        self._browsing: Zeroconf | None = None
        self._reachable: list[ipaddress.IPv4Network] = []  # the networks of the bound addresses (see candidates)
        self._info: AsyncServiceInfo | None = None
        self._binding = contextlib.AsyncExitStack()  # zeroconf, browser, registration on the current interfaces
        self._binding_lock = asyncio.Lock()  # a rebind and a close never interleave (a close would miss its binding)
        self._started = False
        self._closed = False
        self._by_service: dict[str, PeerCandidate] = {}  # service name -> candidate; last resolved last
        # Across a rebind: what the previous binding had seen, listed until the new one sees it (or REBIND_GRACE_S).
        self._handover: dict[str, PeerCandidate] = {}
        self._handover_timer: asyncio.TimerHandle | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}  # service name -> its newest resolution
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged_bad: set[str] = set()
        # Services of our cluster under our node id resolved while our own name was still being probed: judged, and
        # warned of, once it is known (zeroconf may rename ours on a conflict). Service name -> its address.
        self._early_claims: dict[str, str] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self.async_start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def async_start(self) -> None:
        """Open zeroconf on the interfaces, register our service (probing takes ~1.2 s) and start browsing."""
        if self._started or self._closed:
            raise RuntimeError("MdnsDiscovery can be started once")
        self._started = True
        try:
            await self._async_bind(name=None)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop resolving, stop browsing, send goodbyes, close zeroconf; safe to call twice."""
        self._closed = True
        async with self._binding_lock:  # a rebind under way finishes first; its binding is closed here
            self._end_handover(notify=False)
            await self._async_cancel_resolutions()  # before the goodbyes, so nothing changes while they go out
            await self._binding.aclose()

    async def async_rebind(self, interfaces: list[str], advert: Advertisement | None = None) -> None:
        """Move to other interface addresses: the host was renumbered (a new DHCP lease) or its default route moved.

        Sends goodbyes from the old addresses where it still can (from an address that is gone they cannot leave;
        peers then learn the move from the new announcement, under the same service name), and advertises
        ``advert`` (default: the current one; same node id) on ``interfaces``. Peers seen before stay in
        `candidates` until the new browser sees them again or for `REBIND_GRACE_S`, so that a move does not look
        like every peer leaving. If the new addresses cannot be used, this raises and discovery sees nothing (the
        handover aside) until a later rebind succeeds; `aclose` is still the owner's to call.
        """
        advert = advert or self._advert
        if advert.node_id != self._advert.node_id:
            raise ValueError("async_rebind cannot change the node id; close and start a new MdnsDiscovery")
        await asyncio.to_thread(_check_interfaces, interfaces)  # reads the interface list: off the loop
        async with self._binding_lock:
            if not self._started or self._closed:
                raise RuntimeError("MdnsDiscovery is not running")
            name = self._info.name if self._info is not None else None
            await self._async_unbind()
            self._interfaces, self._advert = list(interfaces), advert
            await self._async_bind(name=name)

    async def _async_bind(self, name: str | None) -> None:
        """Open zeroconf on ``self._interfaces``, browse, register ``self._advert`` (as ``name`` if given).
        On failure, what was opened is closed again and the error raised."""
        binding = self._binding = contextlib.AsyncExitStack()
        # The interface list is read off the loop (zeroconf's own start, below, must run on it).
        self._reachable = await asyncio.to_thread(ipv4_networks, self._interfaces)
        try:
            try:
                aiozc = AsyncZeroconf(interfaces=list(self._interfaces), ip_version=IPVersion.V4Only)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"mDNS cannot use {', '.join(self._interfaces)} ({exc.strerror}); is it this host's?"
                ) from exc
            self._aiozc = aiozc
            self._browsing = aiozc.zeroconf
            binding.push_async_callback(aiozc.async_close)
            # Browse first, so peers are found while our own name is still being probed (~1.2 s).
            browser = AsyncServiceBrowser(
                aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change], question_type=QUESTION_TYPE
            )
            binding.push_async_callback(browser.async_cancel)
            info = self._service_info(self._advert, name=name)
            # allow_name_change: two ids may sanitise to one label; the TXT id stays the identity.
            await (await aiozc.async_register_service(info, allow_name_change=True))
            self._info = info
            for claimed, address in self._early_claims.items():
                if claimed != info.name:
                    self._warn_claim(claimed, address)
            self._early_claims.clear()
            binding.push_async_callback(self._async_unregister)
        except BaseException:
            await self._async_unbind(handover=False)
            raise
        log.info("mDNS: advertising %s on %s", info.name, ", ".join(self._interfaces))

    async def _async_unbind(self, handover: bool = True) -> None:
        """Close the current binding (goodbyes where they can leave); with ``handover``, keep what it had seen
        listed for `REBIND_GRACE_S`. A binding that saw nothing (a move that failed) hands nothing over and leaves
        the grace of what was handed over before it as it was: moves that keep failing must not keep it listed."""
        if handover and self._by_service:
            self._handover = {**self._handover, **self._by_service}  # a second move within the grace keeps both
            if self._handover_timer is not None:
                self._handover_timer.cancel()
            self._handover_timer = asyncio.get_running_loop().call_later(REBIND_GRACE_S, self._end_handover)
        self._browsing = None
        await self._async_cancel_resolutions()
        self._by_service = {}
        try:
            await self._binding.aclose()
        except Exception as exc:  # an address that is gone: its sockets cannot send the goodbyes
            log.warning("mDNS: leaving %s: %s", ", ".join(self._interfaces), exc)
        self._aiozc = None

    def _end_handover(self, notify: bool = True) -> None:
        if self._handover_timer is not None:
            self._handover_timer.cancel()
            self._handover_timer = None
        gone = self._handover.keys() - self._by_service.keys()
        self._handover = {}
        if gone and notify:
            self._notify()

    async def async_update(self, advert: Advertisement) -> None:
        """Re-announce changed TXT/port/address under the same service name (the node id cannot change)."""
        if self._aiozc is None or self._info is None or self._closed:
            raise RuntimeError("MdnsDiscovery is not running")
        if advert.node_id != self._advert.node_id:
            raise ValueError("async_update cannot change the node id; close and start a new MdnsDiscovery")
        info = self._service_info(advert, name=self._info.name)
        await (await self._aiozc.async_update_service(info))
        self._advert, self._info = advert, info

    def candidates(self) -> dict[str, PeerCandidate]:
        """A snapshot of the peers seen, keyed by node id: the most recently resolved service wins, except that
        one of our own cluster and fingerprint beats one that is not (ids are only unique within a cluster, so
        another cluster's "node-0" on the same network must not hide ours)."""

        def ours(c: PeerCandidate) -> bool:
            return (c.cluster, c.fingerprint) == (self._advert.cluster, self._advert.fingerprint)

        # Handed over from before a rebind: older than anything the current binding resolved.
        handed = [c for name, c in self._handover.items() if name not in self._by_service]
        out: dict[str, PeerCandidate] = {}
        for candidate in [*handed, *self._by_service.values()]:  # oldest resolution first
            seen = out.get(candidate.node_id)
            if seen is None or ours(candidate) or not ours(seen):
                out[candidate.node_id] = candidate
        return out

    async def async_wait_for(
        self,
        predicate: Callable[[dict[str, PeerCandidate]], bool],
        timeout: float,
    ) -> dict[str, PeerCandidate]:
        """Wait until predicate(candidates()) holds and return that snapshot; TimeoutError after timeout s."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(snapshot := self.candidates()):
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"discovery condition not met in {timeout} s; candidates: {self.candidates()}") from None
        return snapshot

    def _service_info(self, advert: Advertisement, name: str | None) -> AsyncServiceInfo:
        instance = service_instance_name(advert.node_id, advert.cluster)
        # The host name (its A records) is per cluster too: shared, two clusters' node-0 would mix their addresses.
        host = _identity_digest(advert.node_id, advert.cluster)[:12]
        addresses = [advert.advertise_address] if advert.advertise_address else self._interfaces
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name or f"{instance}.{SERVICE_TYPE}",
            port=advert.port,
            properties=advert.txt(),
            server=f"tadlora-{host}.local.",
            addresses=addresses,
        )

    async def _async_unregister(self) -> None:
        if self._aiozc is not None and self._info is not None:
            await (await self._aiozc.async_unregister_service(self._info))  # goodbyes: peers drop us now

    async def _async_cancel_resolutions(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser handler (runs on the loop): resolve added/updated services, drop removed ones. Events from a
        binding that is not the current one (being left) are ignored."""
        if self._closed or zeroconf is not self._browsing:
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # the newest event about a service wins
        if state_change is ServiceStateChange.Removed:
            self._logged_bad.discard(name)
            self._early_claims.pop(name, None)
            self._drop(name)
            return
        task = asyncio.get_running_loop().create_task(
            self._async_resolve(zeroconf, service_type, name), name=f"tadlora-mdns-resolve {name}"
        )
        self._tasks.add(task)
        self._resolving[name] = task
        task.add_done_callback(functools.partial(self._forget_task, name))

    def _forget_task(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("mDNS: resolution failed unexpectedly", exc_info=exc)

    async def _async_resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        result = await async_resolve_candidate(zeroconf, service_type, name, self._reachable)
        if result is None:
            log.debug("mDNS: %r did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        if isinstance(result, str):
            if name not in self._logged_bad:
                self._logged_bad.add(name)
                log.warning("mDNS: ignoring service %r: %s", name, result)
            self._drop(name)
            return
        if result.node_id == self._advert.node_id:
            # Another cluster's node of our id is no impostor: ids are unique only within a cluster.
            ours = result.cluster == self._advert.cluster
            if ours and self._info is None:
                # Browsing starts before our name is registered (~1.2 s of probing), and a node already running is
                # resolved in that time: dropped here, it would never be warned of by the node that came second.
                self._early_claims[name] = result.address
            elif ours and self._info is not None and name != self._info.name:
                self._warn_claim(name, result.address)
            self._drop(name)
            return
        self._logged_bad.discard(name)
        if self._by_service.get(name) == result:
            return
        self._by_service.pop(name, None)  # re-insert so the newest resolution is last
        self._by_service[name] = result
        self._notify()

    def _warn_claim(self, name: str, address: str) -> None:
        """Warn, once per service, that ``name`` (at ``address``) is another service of our cluster under our id."""
        if name not in self._logged_bad:
            self._logged_bad.add(name)
            log.warning(
                "mDNS: ignoring service %r at %s: it claims our node id %r", name, address, self._advert.node_id
            )

    def _drop(self, name: str) -> None:
        resolved = self._by_service.pop(name, None)
        handed = self._handover.pop(name, None)  # a goodbye seen after a rebind ends its handover too
        if resolved is not None or handed is not None:
            self._notify()

    def _notify(self) -> None:
        # Wake every waiter, then give later waiters a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("mDNS: on_change callback failed")
