"""Peers from DNS names (`--peers dns:NAME[:PORT]`): every A/AAAA record of NAME is a candidate peer.

This is discovery where multicast does not reach, e.g. Kubernetes, where a headless Service's name resolves to
the addresses of its ready pods. Names are looked up again every `RESOLVE_INTERVAL_S`, so pods that appear or
disappear are followed. Each lookup runs `socket.getaddrinfo` in a daemon thread of its own: the loop is never
blocked, and a lookup the resolver leaves hanging (glibc waits 5 s x 2 attempts for a DNS server that does not
answer) holds up neither the node's exit nor the default executor that `asyncio.run` joins when it ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Self

from tadlora.node.config import DEFAULT_PORT
from tadlora.node.peerspec import address_problem

__all__ = [
    "RESOLVE_INTERVAL_S",
    "RESOLVE_TIMEOUT_S",
    "DnsPeers",
    "Resolver",
    "host_port",
    "resolve_addresses",
    "split_name",
]

log = logging.getLogger("tadlora.discovery")

# Addresses kept of one name's answer: a headless Service's are its ready pods, and a cluster mixes with at most
# MAX_DEGREE neighbours; each address is a handshake per scan, and the answer is the DNS server's to choose.
MAX_NAME_ADDRESSES = 1024
_TOO_MANY = "too many addresses"  # `DnsPeers._errors`' entry for a name past MAX_NAME_ADDRESSES
_NO_HOST = "no host address"  # ... and for one whose answer holds none (0.0.0.0, group or zoned addresses only)
RESOLVE_INTERVAL_S = 5.0  # s between lookups; a Kubernetes headless Service changes within seconds of a pod
RESOLVE_TIMEOUT_S = 10.0  # s for one lookup; glibc's resolver gives up after 5 s x 2 attempts by default

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> IP addresses``; raises `socket.gaierror` like `getaddrinfo`."""

# getaddrinfo's answers that mean "this name has no records" (the records are gone), not "ask again later".
_NO_RECORDS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The IPv4 and IPv6 addresses of ``host`` (A and AAAA records, or /etc/hosts), without blocking the loop.

    Cancelling the wait (a timeout, the node closing) abandons the lookup: its daemon thread ends when the
    resolver returns, or with the process. The loop's own `getaddrinfo` would keep `asyncio.run` from returning
    until then, since it runs in the default executor."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[list[str]] = loop.create_future()

    def settle(result: list[str] | None, exc: BaseException | None) -> None:
        if answer.done():  # abandoned: the waiter was cancelled
            return
        if exc is not None:
            answer.set_exception(exc)
        else:
            answer.set_result(result or [])

    def lookup() -> None:
        result: list[str] | None = None
        error: BaseException | None = None
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result = [str(sa[0]) for family, *_, sa in infos if family in (socket.AF_INET, socket.AF_INET6)]
        except Exception as exc:  # handed to the waiter, whose caller sorts gaierror from other OSErrors
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for this answer any more
            pass

    threading.Thread(target=lookup, name=f"tadlora-dns-{host}", daemon=True).start()
    return await answer


def split_name(name: str) -> tuple[str, int]:
    """``NAME[:PORT]`` (as `parse_peers_option` checked it) -> (NAME, PORT), PORT defaulting to `DEFAULT_PORT`."""
    host, _, port = name.partition(":")
    return host, int(port) if port else DEFAULT_PORT


def host_port(ip: str, port: int) -> str:
    """``IP:PORT``, or ``[IPv6]:PORT``."""
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class DnsPeers:
    """Follow the addresses of DNS names. ``async with DnsPeers(["tadlora-headless:7070"]) as dns: dns.addresses()``

    Owns one task that looks the names up every ``interval`` seconds until closed; ``on_change`` is called (on
    the loop) whenever the set of addresses changes. A name that stops existing (NXDOMAIN) loses its addresses;
    a lookup that fails for another reason (DNS unreachable, timeout) keeps the last answer.
    """

    def __init__(
        self,
        names: Iterable[str],
        *,
        interval: float = RESOLVE_INTERVAL_S,
        timeout: float = RESOLVE_TIMEOUT_S,
        resolver: Resolver = resolve_addresses,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._names = [split_name(name) for name in dict.fromkeys(names)]
        if not self._names:
            raise ValueError("DnsPeers needs at least one name")
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0 seconds")
        self._interval = interval
        self._timeout = timeout
        self._resolver = resolver
        self._on_change = on_change
        self._by_name: dict[tuple[str, int], tuple[str, ...]] = {}
        # What was last said of each name, once: a failure, or `_TOO_MANY` / `_NO_HOST` of an answer it gave
        self._errors: dict[tuple[str, int], str] = {}
        # The latest lookup of each name: one that outlasted its timeout runs on (its thread waits in the resolver),
        # and the next lookup of the name waits for it instead of starting a thread more.
        self._lookups: dict[tuple[str, int], asyncio.Task[list[str]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.async_start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def async_start(self) -> None:
        """Start the lookup task (the first lookup runs at once). Must run on the event loop."""
        if self._task is not None or self._closed:
            raise RuntimeError("DnsPeers can be started once")
        self._task = asyncio.get_running_loop().create_task(self._async_run(), name="tadlora-dns-peers")

    async def aclose(self) -> None:
        """Stop looking names up; safe to call twice."""
        self._closed = True
        task, self._task = self._task, None
        lookups, self._lookups = list(self._lookups.values()), {}
        # Everything is cancelled before anything is waited for: this close may itself be cancelled while it waits,
        # and the task, out of the object already, would then be no one's to cancel. Cancelled first, it starts no
        # lookup that the list above lacks.
        if task is not None:
            task.cancel()
        for lookup in lookups:
            lookup.cancel()  # its thread, if any, ends with the resolver's answer (`resolve_addresses`)
        await asyncio.gather(*lookups, return_exceptions=True)
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                # Ours, the lookup task's; a cancel of the task that is closing this one must go on.
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise

    def addresses(self) -> tuple[str, ...]:
        """The current peer addresses, ``HOST:PORT`` (``[V6]:PORT``), sorted and without duplicates."""
        return tuple(sorted({address for addresses in self._by_name.values() for address in addresses}))

    async def async_wait_for(self, predicate: Callable[[tuple[str, ...]], bool], timeout: float) -> tuple[str, ...]:
        """Wait until ``predicate(addresses())`` holds and return those addresses; TimeoutError after timeout s."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(snapshot := self.addresses()):
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"DNS peers condition not met in {timeout} s; addresses: {self.addresses()}") from None
        return snapshot

    async def async_refresh(self) -> None:
        """Look every name up once and apply the answers."""
        before = self.addresses()
        for key in self._names:
            await self._async_lookup(key)
        if self.addresses() != before:
            log.info("DNS peers: %s", ", ".join(self.addresses()) or "none")
            self._notify()

    async def _async_run(self) -> None:
        while True:
            await self.async_refresh()
            await asyncio.sleep(self._interval)

    async def _async_lookup(self, key: tuple[str, int]) -> None:
        host, port = key
        lookup = self._lookups.get(key)
        if lookup is None or lookup.done():
            lookup = self._lookups[key] = asyncio.ensure_future(self._resolver(host, port))
        try:
            async with asyncio.timeout(self._timeout):
                ips = await asyncio.shield(lookup)  # a timeout abandons the wait, not the lookup
        except socket.gaierror as exc:
            gone = exc.errno in _NO_RECORDS
            if gone:
                self._by_name.pop(key, None)
            self._log_failure(key, f"{exc.strerror or exc}" + ("" if gone else " (keeping the last answer)"))
            return
        except TimeoutError:  # its str() is empty: say what happened
            self._log_failure(key, f"no answer in {self._timeout} s (keeping the last answer)")
            return
        except OSError as exc:
            self._log_failure(key, f"{str(exc) or type(exc).__name__} (keeping the last answer)")
            return
        except Exception as exc:  # e.g. the idna codec's UnicodeError for a label it refuses: not the end of the task
            self._log_failure(key, f"{type(exc).__name__}: {exc} (keeping the last answer)")
            return
        # A host's own addresses only: one of no host (0.0.0.0), of a group or with a zone is not dialled.
        previous = self._errors.pop(key, None)
        kept = [address for address in dict.fromkeys(host_port(ip, port) for ip in ips) if not address_problem(address)]
        if len(kept) > MAX_NAME_ADDRESSES:
            if previous != _TOO_MANY:  # said once while it stays so
                log.warning("DNS peers: %s answers %d addresses; the first %d are dialled", key[0], len(kept),
                            MAX_NAME_ADDRESSES)  # fmt: skip
            self._errors[key] = _TOO_MANY
        elif ips and not kept:
            if previous != _NO_HOST:
                log.warning("DNS peers: %s answers no address of one host (%s), which nodes cannot be at; none is "
                            "dialled", key[0], ", ".join(map(str, list(ips)[:4])))  # fmt: skip
            self._errors[key] = _NO_HOST
        self._by_name[key] = tuple(kept[:MAX_NAME_ADDRESSES])

    def _log_failure(self, key: tuple[str, int], reason: str) -> None:
        if self._errors.get(key) != reason:
            self._errors[key] = reason
            log.warning("DNS peers: cannot resolve %s: %s", key[0], reason)

    def _notify(self) -> None:
        # Wake every waiter, then give later waiters a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("DNS peers: on_change callback failed")
