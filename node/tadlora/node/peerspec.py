"""The --peers grammar: 'auto' (mDNS), static HOST:PORT lists and dns:NAME[:PORT] entries, parsed and validated."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "PORT_MAX",
    "PeersOption",
    "StaticPeers",
    "address_problem",
    "is_hostname",
    "join_host_port",
    "looks_like_ipv4",
    "parse_peers_option",
    "unbracketed_hint",
]

PORT_MAX = 65535
_HOSTNAME_MAX_BYTES = 253  # bytes; RFC 1035 §2.3.4 limit on a name's text form
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_DECIMAL = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class StaticPeers:
    """Peers given as HOST:PORT; they have no node id until a handshake, so they are just addresses."""

    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(_parse_host_port(a) for a in self.addresses))

    @classmethod
    def parse(cls, value: str) -> StaticPeers:
        """Parse "HOST:PORT,HOST:PORT" (IPv4, host names, [IPv6]:PORT); ValueError names the bad entry."""
        return cls(tuple(_split_entries(value)))


@dataclass(frozen=True)
class PeersOption:
    """The parsed --peers flag: mDNS on or off, static addresses, DNS names (dns:NAME, resolved later)."""

    auto: bool
    static: tuple[str, ...]
    dns: tuple[str, ...]


def parse_peers_option(value: str) -> PeersOption:
    """Parse --peers: comma-separated 'auto' (mDNS), 'dns:NAME[:PORT]', and HOST:PORT entries."""
    if not value.strip().strip(",").strip():
        raise ValueError("--peers needs at least one entry: 'auto', 'dns:NAME[:PORT]' or HOST:PORT")
    auto = False
    static: list[str] = []
    dns: list[str] = []
    for entry in _split_entries(value):
        if entry.lower() == "auto":
            auto = True
        elif entry.lower().startswith("dns:"):
            name = entry[4:]
            host, _, port = name.partition(":")
            if not is_hostname(host) or looks_like_ipv4(host):
                raise ValueError(f"--peers entry {entry!r}: dns: needs a DNS name, e.g. dns:tadlora.default.svc")
            if port:
                _entry_port(port, entry)
            if name not in dns:
                dns.append(name)
        else:
            address = _parse_host_port(entry)
            if address not in static:
                static.append(address)
    return PeersOption(auto=auto, static=tuple(static), dns=tuple(dns))


def address_problem(address: str) -> str | None:
    """Why ``address`` is not one a node can be dialled at (HOST:PORT: an IPv4 address or a host name, or an
    [IPv6] address, and a port in 1..65535; not an address of no host, of many, or of a zone of the sender's own),
    or None when it is one. For an address another node gave: gRPC takes more than that as a target
    ('unix:/run/x.sock', 'dns://resolver/name', 'ipv4:a,b'), and a port over 65535 as itself less 65536, so a peer
    could otherwise have this node dial a local socket or another port than it said."""
    try:
        normal = _host_port(address)
    except _NotHostPort as exc:
        return str(exc)
    host = normal.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return f"{host!r} has a zone ({ip.scope_id!r}), an interface of the sending host, not of this one"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
        ip = ip.ipv4_mapped
    kind = ("unspecified" if ip.is_unspecified else "multicast" if ip.is_multicast
            else "broadcast" if ip == ipaddress.IPv4Address("255.255.255.255") else None)  # fmt: skip
    if kind is not None:
        return f"{host!r} is no one host's address ({kind})"
    return None


def _split_entries(value: str) -> list[str]:
    entries = [entry.strip() for entry in value.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(f"peer list {value!r} has an empty entry (stray comma?)")
    return entries


class _NotHostPort(ValueError):
    """Why a text is not HOST:PORT, without the text: `_parse_host_port` names it as a --peers entry,
    `address_problem` as an address a peer gave."""


def _parse_host_port(entry: str) -> str:
    """Validate HOST:PORT / [V6]:PORT and return it normalised (IPv6 compressed, in brackets); the ValueError names
    the entry."""
    try:
        return _host_port(entry)
    except _NotHostPort as exc:
        raise ValueError(f"peer {entry!r}: {exc}") from None


def _host_port(entry: str) -> str:
    """`_parse_host_port`, raising `_NotHostPort`."""
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
        if not sep:
            raise _NotHostPort("expected [IPv6]:PORT")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _NotHostPort(f"{host!r} is not an IPv6 address") from None
        return f"[{host}]:{_port(port)}"
    if entry.count(":") > 1:
        raise _NotHostPort(unbracketed_hint(entry))
    host, sep, port = entry.rpartition(":")
    if not sep or not host:
        raise _NotHostPort("expected HOST:PORT")
    if not is_hostname(host):
        raise _NotHostPort(f"{host!r} is neither an IPv4 address nor a host name")
    return f"{host}:{_port(port)}"


def _port(text: str) -> int:
    # ASCII digits only: str.isdigit() also holds for '²' (which int() refuses) and '١' (which int() reads as 1).
    if not _DECIMAL.fullmatch(text) or not 1 <= int(text) <= PORT_MAX:
        raise _NotHostPort(f"port {text!r} is not a number in 1..65535")
    return int(text)


def _entry_port(text: str, entry: str) -> int:
    """`_port` of a --peers entry, the ValueError naming it."""
    try:
        return _port(text)
    except _NotHostPort as exc:
        raise ValueError(f"peer {entry!r}: {exc}") from None


def unbracketed_hint(entry: str) -> str:
    """What to say of a HOST:PORT with several colons and no brackets (an IPv6 address written bare): where its
    last group reads as a port, the bracketed spelling to use instead. gRPC itself would not refuse it: it reads
    '::1:7070' as the address ::0.1.112.112 on its default port 443."""
    host, _, port = entry.rpartition(":")
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return "IPv6 addresses need brackets, e.g. [::1]:7070"
    if not _DECIMAL.fullmatch(port) or not 1 <= int(port) <= PORT_MAX:
        return "IPv6 addresses need brackets, e.g. [::1]:7070"
    # fd00::1:7070 is itself a valid IPv6 address: the port can only be a guess, so it is said as one.
    return f"IPv6 addresses need brackets: [{ipaddress.IPv6Address(host)}]:{port} if {port} is the port"


def join_host_port(host: str, port: int | str) -> str:
    """``HOST:PORT`` for a host as it stands alone (an IPv4 address, a name, a bare IPv6 address) or already in
    brackets: an IPv6 address is bracketed (and compressed), so that the port cannot be read as one of its groups."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return f"{host}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def looks_like_ipv4(text: str) -> bool:
    return re.fullmatch(r"[0-9.]+", text) is not None


def is_hostname(host: str) -> bool:
    if looks_like_ipv4(host):  # all digits and dots: must be a real IPv4 address, not a "host name"
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    # One trailing dot (a fully qualified name) at most: an empty label makes getaddrinfo raise UnicodeError.
    labels = host.removesuffix(".").split(".")
    return len(host) <= _HOSTNAME_MAX_BYTES and all(_HOST_LABEL.fullmatch(label) for label in labels)
