"""Which network interfaces mDNS uses (--mdns-interface): an address, an interface name, or the default route's."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

import ifaddr

from tadlora.node.peerspec import looks_like_ipv4

__all__ = [
    "InterfaceError",
    "has_ipv6_default_route",
    "interface_addresses",
    "ipv4_by_interface",
    "ipv4_networks",
    "ipv6_by_interface",
    "require_unicast_ipv4",
]

_ROUTE_TABLE = Path("/proc/net/route")  # Linux IPv4 routing table; where "the default route" is read from
_IPV6_ROUTE_TABLE = Path("/proc/net/ipv6_route")  # Linux IPv6 routing table: only to say why there is no IPv4 one
_RTF_UP = 0x1  # <linux/route.h>
_RTF_REJECT = 0x200  # <linux/route.h>: an unreachable route
SYS_NET = Path("/sys/class/net")  # Linux: /sys/class/net/IFACE/flags (hex) and operstate
IFF_UP = 0x1  # <linux/if.h>: the interface is up (`ip link set NAME up`)
NO_LINK = ("down", "lowerlayerdown")  # /sys/class/net/IFACE/operstate of an interface that is up without a link
# Why an IPv6-only network has no mDNS here, and what to use instead (see docs/deploy.md, "IPv6").
_IPV4_ONLY = (
    "mDNS (--peers auto) is IPv4 only; on an IPv6-only network give the peers as --peers [ADDRESS]:PORT or "
    "dns:NAME (AAAA records), with --listen [::]:PORT (and --advertise-address, an IPv6 address, for a wildcard)"
)


class InterfaceError(ValueError):
    """--mdns-interface names nothing usable (the message lists what is there)."""


def interface_addresses(spec: str | None) -> list[str]:
    """Map --mdns-interface to IPv4 addresses: an address (must be local), an interface name, or None.

    None means the interface of the IPv4 default route with the lowest metric (read from /proc/net/route on
    Linux): the one the kernel sends through. A host with several (wired and Wi-Fi) announces on that one only,
    with its address; --mdns-interface chooses another. Never answers "all interfaces"; raises InterfaceError
    with the choices when nothing fits.
    """
    by_name = ipv4_by_interface()
    if spec is None:
        names = _default_route_interfaces(_ROUTE_TABLE.read_text() if _ROUTE_TABLE.exists() else "")
        if not names:
            return _lone_lan_interface(by_name)
        # One interface: announcing on several would tell each network the first one's address, which another
        # network may not reach.
        for name in names:
            if by_name.get(name):
                return list(by_name[name])
        raise InterfaceError(f"default-route interface {names[0]} has no IPv4 address; use --mdns-interface")
    spec = spec.strip()
    if looks_like_ipv4(spec):
        try:
            require_unicast_ipv4(spec, "--mdns-interface")
        except ValueError as exc:
            raise InterfaceError(str(exc)) from None
        address = str(ipaddress.IPv4Address(spec))
        if not any(address in addrs for addrs in by_name.values()):
            raise InterfaceError(f"--mdns-interface {spec}: no local interface has this address")
        return [address]
    if ":" in spec:
        try:
            ipaddress.IPv6Address(spec)
        except ValueError:
            pass
        else:
            raise InterfaceError(
                f"--mdns-interface {spec}: an IPv6 address, but mDNS here is IPv4 only; give the interface's name "
                "or one of its IPv4 addresses"
            )
    if spec not in by_name:
        if spec in {name for _, name in socket.if_nameindex()}:  # ifaddr lists only interfaces with an address
            by_name[spec] = []
        else:
            raise InterfaceError(f"--mdns-interface {spec!r}: no such interface; have {', '.join(sorted(by_name))}")
    if not by_name[spec] and (ipv6 := ipv6_by_interface().get(spec)):
        raise InterfaceError(f"--mdns-interface {spec!r} has IPv6 addresses only ({', '.join(ipv6)}): {_IPV4_ONLY}")
    if not by_name[spec]:
        raise InterfaceError(
            f"--mdns-interface {spec!r} has no IPv4 address (yet?): give it one (DHCP, ip addr add) or choose "
            "another interface"
        )
    return by_name[spec]


def _lone_lan_interface(by_name: dict[str, list[str]]) -> list[str]:
    """With no IPv4 default route (a LAN testbed with no way out, an air-gapped lab): the addresses of the one
    interface that has a link and an IPv4 address other than loopback, there being exactly one; else
    InterfaceError, naming them where there are several."""
    lan = {
        name: [a for a in addrs if not ipaddress.IPv4Address(a).is_loopback]
        for name, addrs in sorted(by_name.items())
        if has_link(name)
    }
    lan = {name: addrs for name, addrs in lan.items() if addrs}
    if len(lan) == 1:
        return next(iter(lan.values()))
    if lan:
        listed = ", ".join(f"{name} ({', '.join(addrs)})" for name, addrs in lan.items())
        raise InterfaceError(
            f"no IPv4 default route to choose by, and {len(lan)} interfaces with an IPv4 address and a link: "
            f"{listed}; choose the peers' one with --mdns-interface (a name or an address)"
        )
    if has_ipv6_default_route(_ipv6_route_table()):
        raise InterfaceError(f"no IPv4 default route, only an IPv6 one: {_IPV4_ONLY}")
    raise InterfaceError("no IPv4 default route; choose one with --mdns-interface (an address or a name)")


def has_link(name: str) -> bool:
    """Whether interface ``name`` is up with a link, as far as /sys/class/net says (True where it cannot be read):
    not a cable out, nor a bridge with nothing attached (docker0 with no container)."""
    try:
        flags = int((SYS_NET / name / "flags").read_text().strip(), 16)
        operstate = (SYS_NET / name / "operstate").read_text().strip()
    except (OSError, ValueError):
        return True
    return bool(flags & IFF_UP) and operstate not in NO_LINK


def ipv4_networks(addresses: Sequence[str]) -> list[ipaddress.IPv4Network]:
    """The networks (address and prefix, as the host has them configured) of those of this host's IPv4
    ``addresses`` it still has: where a peer's address is on one of them, this host reaches it directly."""
    wanted = set(addresses)
    return [
        ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}").network
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and ip.ip in wanted
    ]


def ipv4_by_interface() -> dict[str, list[str]]:
    """This host's IPv4 addresses by interface name (ifaddr lists IPv6 addresses as tuples)."""
    return {a.name: [ip.ip for ip in a.ips if isinstance(ip.ip, str)] for a in ifaddr.get_adapters()}


def ipv6_by_interface() -> dict[str, list[str]]:
    """This host's IPv6 addresses by interface name, link-local ones included (with their zone)."""
    out: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):  # (address, flowinfo, scope id)
                out.setdefault(adapter.name, []).append(ip.ip[0])
    return out


def has_ipv6_default_route(route_table: str) -> bool:
    """Whether /proc/net/ipv6_route text holds a default route (::/0) that is up."""
    for line in route_table.splitlines():
        fields = line.split()
        # destination, its prefix length (hex), ..., flags (hex) at index 8: up (RTF_UP), and not the kernel's
        # "unreachable" placeholder on lo (RTF_REJECT)
        if len(fields) >= 10 and fields[0] == "0" * 32 and fields[1] == "00":
            flags = int(fields[8], 16)
            if flags & _RTF_UP and not flags & _RTF_REJECT:
                return True
    return False


def _ipv6_route_table() -> str:
    try:
        return _IPV6_ROUTE_TABLE.read_text()
    except OSError:  # no IPv6 in this kernel: no such route
        return ""


def _default_route_interfaces(route_table: str) -> list[str]:
    """Interfaces of the IPv4 default routes in /proc/net/route text, lowest metric first."""
    routes: list[tuple[int, str]] = []
    for line in route_table.splitlines()[1:]:
        match line.split():
            case [iface, destination, _gateway, flags, _refcnt, _use, metric, mask, *_]:
                pass
            case _:
                continue
        if destination == "00000000" and mask == "00000000" and int(flags, 16) & 0x1:  # RTF_UP
            routes.append((int(metric), iface))
    return list(dict.fromkeys(iface for _, iface in sorted(routes)))


def require_unicast_ipv4(address: str, what: str) -> None:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"{what} {address!r} is not an IPv4 address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{what} {address} must be one interface's unicast address, not 0.0.0.0 or multicast")
