"""Several hosts on one machine: network namespaces behind a bridge, as in shared/TESTBED.md (root only).

``with Testbed(3) as bed:`` makes host namespaces ``…h1``..``…h3``, each with one veth (``veth1``..) holding
10.77.0.1/24.. and a multicast route, plus a bridge namespace ``…br`` that joins their peer ends (``bv1``..).
Addresses and multicast exist only inside these namespaces, so nothing reaches the machine's real network, and
two testbeds (concurrent runs) never see each other. Names are ``tl<pid>x<random>…``: unique per run, and a later
run deletes those whose pid is gone (a run that was killed). Leaving the block kills whatever still runs in its
namespaces and deletes them, whatever happened.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import pytest

SUBNET = "10.77.0"  # /24; private to each testbed's namespaces, so every testbed can use the same one
IP_TIMEOUT_S = 10.0  # s for one `ip` command (they take milliseconds)
_NAME = re.compile(r"^tl(?P<pid>\d+)x[0-9a-f]{6}(?:br|h\d+)$")  # only namespaces this module made


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot host a testbed (not root, no `ip`, namespaces refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"tl{os.getpid()}x{secrets.token_hex(3)}br"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _namespaces() -> list[str]:
    # `ip netns list` prints "NAME" or "NAME (id: N)" per line.
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_all_in(netns: str) -> None:
    """SIGKILL every process left in ``netns`` (only ever one of ours: the names are ours)."""
    result = _ip("netns", "pids", netns, check=False)
    for pid in (int(p) for p in result.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_stale_namespaces() -> list[str]:
    """Delete the namespaces of earlier testbeds whose process is gone; returns their names."""
    stale = [n for n in _namespaces() if (m := _NAME.match(n)) and not _pid_alive(int(m["pid"]))]
    for netns in stale:
        _kill_all_in(netns)
        _ip("netns", "del", netns, check=False)
    return stale


@dataclass(frozen=True)
class Host:
    """One host of a testbed: its namespace, interface and address."""

    index: int  # 1-based, as in its names and address
    netns: str
    interface: str  # "vethI", inside netns
    address: str  # "10.77.0.I"
    bridge_port: str  # "bvI", the other end of the veth, in the bridge namespace

    def command(self, *args: str) -> list[str]:
        """``args`` as a command line that runs inside this host (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *args]


class Testbed:
    """``hosts`` namespaces behind one bridge (see the module docstring); close() is safe to call twice."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, hosts: int, subnet: str = SUBNET) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be 1..250, not {hosts}")
        self.prefix = f"tl{os.getpid()}x{secrets.token_hex(3)}"
        self.bridge = f"{self.prefix}br"
        self.hosts = [Host(i, f"{self.prefix}h{i}", f"veth{i}", f"{subnet}.{i}", f"bv{i}") for i in range(1, hosts + 1)]
        self._made: list[str] = []
        self._closed = False

    def __enter__(self) -> Self:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _netns_add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)  # recorded at once: close() deletes it even if the next step fails
        _ip("-n", name, "link", "set", "lo", "up")

    def setup(self) -> None:
        """Build the bridge and the hosts (about 0.2 s for three)."""
        delete_stale_namespaces()
        self._netns_add(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for host in self.hosts:
            self._netns_add(host.netns)
            # Both ends are created inside their namespaces: the names never exist in the machine's own.
            _ip("link", "add", host.interface, "netns", host.netns, "type", "veth",
                "peer", "name", host.bridge_port, "netns", self.bridge)  # fmt: skip
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.netns, "link", "set", host.interface, "up", "multicast", "on")
            _ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", host.interface)
            _ip("-n", self.bridge, "link", "set", host.bridge_port, "master", "br0")
            _ip("-n", self.bridge, "link", "set", host.bridge_port, "up")

    def run(self, host: Host, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside ``host`` and wait (no check: look at returncode)."""
        return subprocess.run(host.command(*args), capture_output=True, text=True, timeout=timeout, check=False)

    def cut(self, host: Host) -> None:
        """Take the host's bridge port down: the host is cut off from every other (its own link stays up)."""
        _ip("-n", self.bridge, "link", "set", host.bridge_port, "down")

    def heal(self, host: Host) -> None:
        """Bring the host's bridge port back up, with every host's neighbour (ARP) cache emptied.

        Traffic sent during the cut leaves entries INCOMPLETE or FAILED; the kernel would then hold the first packet
        after the heal until its next ARP retry, up to 1 s later (seen as connects that took 1.02 s, and failed
        under a 1 s timeout). A flushed cache resolves at once, so the heal is complete when this returns."""
        _ip("-n", self.bridge, "link", "set", host.bridge_port, "up")
        for each in self.hosts:
            _ip("-n", each.netns, "neigh", "flush", "dev", each.interface)

    def close(self) -> None:
        """Kill what still runs in the namespaces and delete them. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for netns in reversed(self._made):
            _kill_all_in(netns)
            _ip("netns", "del", netns, check=False)


def require_netns() -> None:
    """Skip the calling test, with the reason, where testbeds cannot be built."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")


@pytest.fixture
def testbeds() -> Iterator[Callable[[int], Testbed]]:
    """``testbeds(n)`` builds a testbed of n hosts; all are torn down after the test, whatever happened.
    Skips the test, saying why, where namespaces cannot be made (not root, no iproute2)."""
    require_netns()
    with contextlib.ExitStack() as stack:
        yield lambda hosts: stack.enter_context(Testbed(hosts))
