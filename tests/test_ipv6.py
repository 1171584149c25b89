"""A node on an IPv6 network: what works (listening, static and dns: peers, --advertise-address, status, rounds
over ::1) and what is refused, clearly and before the model loads (mDNS, which is IPv4 only here).

The real processes run on ::1 and skip where this machine has no IPv6 loopback; the AAAA-only dns: cluster runs in
a network namespace of its own (root), whose /etc/hosts `ip netns exec` bind-mounts from /etc/netns/NAME/hosts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns
from nodeproc import NodeProcess, console_script, node_env, running_node, unique_tag
from tadlora.node import netif
from tadlora.node.cli import build_run_parser, config_from_args, main
from tadlora.node.doctor import own_address
from tadlora.node.grpc_transport import readable_details
from tadlora.node.hostcheck import check_listen
from tadlora.node.peerspec import join_host_port

# s, waits (not timings): three nodes starting torch at once on two cores shared with other work can take minutes
START_S = 300.0
RUN_S = 180.0  # s for the short run itself, once every node serves
ROUNDS = 3
SMALL = (
    "--model", "tiny", "--local-steps", "2", "--batch-size", "4", "--max-length", "32", "--eval-samples", "32",
    "--eval-every", "100", "--insecure", "--log-format", "json", "--rounds", str(ROUNDS), "--num-shards", "3",
    "--min-peers", "2", "--peer-wait", "600", "--exchange-timeout", "30",
)  # fmt: skip


def parse(argv: list[str]):
    return config_from_args(build_run_parser().parse_args([*argv, "--insecure"]))


@functools.cache
def no_ipv6_loopback() -> str | None:
    """Why ::1 cannot be bound here (IPv6 disabled, no loopback address), or None."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback: binding [::1] fails ({exc})"
    return None


def free_ipv6_ports(count: int) -> list[int]:
    """``count`` distinct ports of ::1 free a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET6)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("::1", 0))
        return [sock.getsockname()[1] for sock in sockets]


# ---------------------------------------------------------------------------------------------------------------
# Flags: IPv6 spellings accepted, kept in one spelling, or refused saying what to write


@pytest.mark.parametrize("given", ["fd00:0:0::5", "[fd00::5]", "FD00::5"])
def test_an_ipv6_advertise_address_is_accepted_with_static_peers_and_kept_in_one_spelling(given: str) -> None:
    """An IPv6-only cluster (a Kubernetes pod IP from the downward API is written bare) has no IPv4 address to
    advertise: a wildcard --listen needs an IPv6 --advertise-address, which peers are told bracketed."""
    cfg = parse(["--listen", "[::]:7070", "--peers", "dns:tadlora-headless:7070", "--advertise-address", given])
    assert cfg.advertise_address == "fd00::5"
    assert cfg.advertised_host([]) == "[fd00::5]"
    assert own_address(cfg, []) == "[fd00::5]:7070"  # what the self-skip compares with the dns: answers
    assert check_listen(cfg).status == "OK"


@pytest.mark.parametrize("address", ["fe80::1", "fe80::1%eth0", "::", "ff02::1", "[fd00::5]:7070", "fd00::5]"])
def test_an_ipv6_advertise_address_no_peer_could_dial_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="--advertise-address"):
        parse(["--peers", "[fd00::7]:7070", "--advertise-address", address])


def test_an_mdns_node_told_to_advertise_an_ipv6_address_exits_2_before_its_model_loads(tmp_path, capsys) -> None:
    """An mDNS advert names IPv4 addresses only: this used to fail once the model had loaded, with exit 1
    (restarted for ever) and an internal field's name ("advertise_address 'fd00::5' is not an IPv4 address")."""
    argv = ["--peers", "auto", "--mdns-interface", "127.0.0.1", "--listen", "[::]:0", "--advertise-address",
            "fd00::5", "--insecure", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "n0")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--advertise-address fd00::5: mDNS (--peers auto) announces it, and announces IPv4 addresses only" in err
    assert "--peers [ADDRESS]:PORT or dns:NAME" in err
    assert not (tmp_path / "n0").exists()
    cfg = parse(["--peers", "auto", "--listen", "[::]:7070", "--advertise-address", "fd00::5"])
    assert check_listen(cfg).status == "FAIL"  # doctor says so too


def test_an_ipv6_mdns_interface_address_exits_2_before_the_model_loads(tmp_path, capsys) -> None:
    """mDNS here is IPv4 only: an IPv6 --mdns-interface used to be refused only once the model had loaded (exit 1,
    restarted for ever). The flag alone decides it; without --peers auto it is not used, and not refused."""
    argv = ["--peers", "auto", "--mdns-interface", "::1", "--listen", "[::]:0", "--insecure", "--model",
            str(tmp_path / "no-model"), "--out", str(tmp_path / "n0")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--mdns-interface ::1: an IPv6 address, but mDNS here is IPv4 only" in err, err
    assert "--peers [ADDRESS]:PORT or dns:NAME" in err
    assert parse(["--peers", "[::1]:7070", "--mdns-interface", "::1"]).mdns_interface == "::1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "::1:7070"], "--listen '::1:7070': IPv6 addresses need brackets: [::1]:7070 if 7070 is"),
        (["--listen", "fd00::1:7070"], "[fd00::1]:7070 if 7070 is the port"),
        (["--listen", "fd00::1"], "IPv6 addresses need brackets, e.g. [::1]:7070"),
        (["--listen", "[localhost]:7070"], "'localhost' in brackets is not an IPv6 address"),
        (["--peers", "::1:7071"], "peer '::1:7071': IPv6 addresses need brackets: [::1]:7071 if 7071 is the port"),
        (["--peers", "[::1]:7071,fd00::2:7071"], "[fd00::2]:7071 if 7071 is the port"),
    ],
)
def test_an_unbracketed_ipv6_host_and_port_is_refused_with_the_spelling_to_use(argv, message) -> None:
    """gRPC itself reads '::1:7070' as the address ::0.1.112.112 on port 443; the refusal names the bracketed
    spelling with the port the user meant (a guess for fd00::1:7070, itself a valid address, so said as one)."""
    with pytest.raises(ValueError) as refused:
        parse(argv)
    assert message in str(refused.value)


def test_status_refuses_an_unbracketed_ipv6_address_naming_the_bracketed_one(capsys) -> None:
    assert main(["status", "::1:7070"]) == 2
    assert "[::1]:7070 if 7070 is the port" in capsys.readouterr().err


def test_an_ipv6_listen_host_is_kept_in_one_spelling_for_the_self_skip() -> None:
    """The node skips the entry of a shared --peers list equal to its own address as text: [0::1] must not
    miss [::1]."""
    cfg = parse(["--listen", "[0:0::1]:7070", "--peers", "[::1]:7070,[::1]:7071"])
    assert cfg.listen == "[::1]:7070"
    assert own_address(cfg, []) == "[::1]:7070" == cfg.peers.static[0]


def test_join_host_port_brackets_ipv6_hosts_only() -> None:
    assert join_host_port("fd00:0::1", 7070) == "[fd00::1]:7070"
    assert join_host_port("[::1]", 7070) == "[::1]:7070"
    assert join_host_port("10.0.0.1", 7070) == "10.0.0.1:7070"
    assert join_host_port("tadlora-0.local", 7070) == "tadlora-0.local:7070"


def test_grpc_errors_name_ipv6_peers_as_flags_write_them() -> None:
    detail = "failed to connect to all addresses; last error: UNKNOWN: ipv6:%5B::1%5D:7071: Failed to connect"
    assert readable_details(detail) == (
        "failed to connect to all addresses; last error: UNKNOWN: ipv6:[::1]:7071: Failed to connect"
    )
    assert readable_details("ipv6:%5Bfe80::1%25eth0%5D:7071") == "ipv6:[fe80::1%eth0]:7071"
    assert readable_details("ipv4:127.0.0.1:7071: 100%") == "ipv4:127.0.0.1:7071: 100%"


# ---------------------------------------------------------------------------------------------------------------
# mDNS on an IPv6-only network: refused, saying why and what to use


IPV6_ROUTES = (  # /proc/net/ipv6_route of a host whose only default route is IPv6 (via fd00::1 on eth0)
    "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 "
    "00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 "
    "00000400 00000003 00000000 00000003     eth0\n"
)
UNREACHABLE_ONLY = (  # the kernel's placeholder on lo where there is no IPv6 default route: RTF_REJECT | RTF_UP
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 "
    "ffffffff 00000001 00000000 00200200       lo\n"
)


def test_an_ipv6_default_route_is_read_from_proc_net_ipv6_route() -> None:
    assert netif.has_ipv6_default_route(IPV6_ROUTES)
    assert not netif.has_ipv6_default_route(UNREACHABLE_ONLY)
    assert not netif.has_ipv6_default_route("")


def test_mdns_on_an_interface_with_ipv6_addresses_only_says_mdns_is_ipv4_only(monkeypatch) -> None:
    """It used to say "has no IPv4 address (yet?)", as if one were coming, and nothing of IPv6."""
    monkeypatch.setattr(netif, "ipv4_by_interface", lambda: {"lo": ["127.0.0.1"], "eth0": []})
    monkeypatch.setattr(netif, "ipv6_by_interface", lambda: {"lo": ["::1"], "eth0": ["fd00::2", "fe80::1%eth0"]})
    with pytest.raises(netif.InterfaceError) as refused:
        netif.interface_addresses("eth0")
    assert "'eth0' has IPv6 addresses only (fd00::2, fe80::1%eth0): mDNS (--peers auto) is IPv4 only" in str(
        refused.value
    )
    assert "--peers [ADDRESS]:PORT or dns:NAME" in str(refused.value)


def test_mdns_on_a_host_whose_only_default_route_is_ipv6_says_mdns_is_ipv4_only(monkeypatch, tmp_path) -> None:
    # and no IPv4 address but loopback's (one interface with one would be taken: test_discovery)
    monkeypatch.setattr(netif, "ipv4_by_interface", lambda: {"lo": ["127.0.0.1"], "eth0": []})
    (tmp_path / "route").write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n")
    (tmp_path / "ipv6_route").write_text(IPV6_ROUTES)
    monkeypatch.setattr(netif, "_ROUTE_TABLE", tmp_path / "route")
    monkeypatch.setattr(netif, "_IPV6_ROUTE_TABLE", tmp_path / "ipv6_route")
    with pytest.raises(netif.InterfaceError, match=r"no IPv4 default route, only an IPv6 one: mDNS \(--peers auto\)"):
        netif.interface_addresses(None)
    (tmp_path / "ipv6_route").write_text(UNREACHABLE_ONLY)
    with pytest.raises(netif.InterfaceError, match="no IPv4 default route; choose one with --mdns-interface"):
        netif.interface_addresses(None)


# ---------------------------------------------------------------------------------------------------------------
# Real nodes over IPv6


def status_of(address: str) -> dict:
    result = subprocess.run(
        [console_script("tadlora-node"), "status", address, "--timeout", "10"],
        capture_output=True, text=True, timeout=60, env=node_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_mixed_every_round(node: NodeProcess, neighbours: set[str]) -> None:
    rounds = node.rounds()
    assert [r["round"] for r in rounds] == list(range(ROUNDS)), node.tail()
    for r in rounds:
        assert {n["id"] for n in r["neighbours"]} == neighbours and r["missed"] == [], r


@pytest.mark.timeout(900)
def test_three_nodes_on_ipv6_loopback_find_each_other_by_one_shared_static_list_and_mix_every_round(
    tmp_path: Path,
) -> None:
    """Every node gets the same --peers list of [::1]:PORT entries, its own among them (skipped by address, so
    never dialled); one listens on [::] and advertises ::1, as a pod of an IPv6-only cluster would its pod IP.
    Logs and status name each address unambiguously, in brackets."""
    if (why := no_ipv6_loopback()) is not None:
        pytest.skip(why)
    tag = unique_tag()
    ports = free_ipv6_ports(3)
    shared = ",".join(f"[::1]:{p}" for p in ports)
    listens = [f"[::]:{ports[0]}", f"[::1]:{ports[1]}", f"[::1]:{ports[2]}"]
    with contextlib.ExitStack() as stack:
        nodes = []
        for i, listen in enumerate(listens):
            args = ["--listen", listen, "--peers", shared, "--cluster", tag, "--node-id", f"n{i}-{tag}",
                    "--shard", str(i), "--out", str(tmp_path / f"o{i}"), *SMALL]  # fmt: skip
            if listen.startswith("[::]"):
                args += ["--advertise-address", "::1"]
            nodes.append(stack.enter_context(running_node(tmp_path, f"n{i}", args, tmp_path / f"o{i}")))
            if i == 0:
                # Asked while it waits for --min-peers (the others are not started yet): once all three serve,
                # the 3 short rounds can be over, and the node gone, before a status call reaches it.
                assert nodes[0].serving(START_S)
                doc = status_of(nodes[0].address)  # asked at [::1]:PORT, answered by the node on [::]
                assert doc["node_id"] == f"n0-{tag}" and doc["address"] == f"[::1]:{ports[0]}"
        assert [n.serving(START_S) and n.address for n in nodes] == [f"[::1]:{p}" for p in ports]
        for node in nodes:
            assert node.wait_exit(RUN_S) == 0, node.tail()
        ids = {n.node_id for n in nodes}
        for node in nodes:
            assert_mixed_every_round(node, ids - {node.node_id})
            # its own entry of the shared list was skipped: never dialled, never refused as itself
            assert not node.find(r"NOT_A_NEIGHBOR"), node.tail()
            verified = {r["message"].split()[4] for r in node.find(r"^peer \S+ verified at ")}
            assert verified <= {n.address for n in nodes} - {node.address}, verified


@contextlib.contextmanager
def ipv6_only_namespace(names: dict[str, list[str]]) -> Iterator[str]:
    """A network namespace of our own with only IPv6 beside loopback (fd00:77::1..3 on lo) and an /etc/hosts
    (bind-mounted by `ip netns exec` from /etc/netns/NAME/hosts) where each of ``names`` has AAAA records only.
    Deleted, with whatever runs in it, at exit."""
    if (why := netns.unavailable_reason()) is not None:
        pytest.skip(why)
    netns.delete_stale_namespaces()
    name = f"tl{os.getpid()}x{secrets.token_hex(3)}h1"  # netns.py's pattern: a later run deletes it if we die
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(
            "::1 localhost\n" + "".join(f"{ip} {host}\n" for host, ips in names.items() for ip in ips)
        )
        run = ["ip", "netns", "exec", name]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        for i in (1, 2, 3):
            subprocess.run([*run, "ip", "addr", "add", f"fd00:77::{i}/128", "dev", "lo", "nodad"], check=True,
                           timeout=10)  # fmt: skip
        yield name
    finally:
        result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
        for pid in (int(p) for p in result.stdout.split() if p.isdigit()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):  # /etc/netns itself, only if nothing else is in it
            etc.parent.rmdir()


@pytest.mark.netns
@pytest.mark.timeout(900)
def test_a_dns_name_with_only_aaaa_records_gives_every_node_its_peers_as_in_an_ipv6_only_kubernetes(
    tmp_path: Path,
) -> None:
    """As a headless Service of an IPv6-only cluster: one name whose AAAA records are every node, this one
    included; each node advertises its own address (the pod IP), skips its own record and mixes with the two
    others every round."""
    ips = [f"fd00:77::{i}" for i in (1, 2, 3)]
    with ipv6_only_namespace({"tadlora-headless.test": ips}) as ns, contextlib.ExitStack() as stack:
        resolved = subprocess.run(["ip", "netns", "exec", ns, "getent", "ahostsv6", "tadlora-headless.test"],
                                  capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        assert set(ips) <= set(resolved.stdout.split()), resolved
        tag = unique_tag()
        nodes = []
        for i, ip in enumerate(ips):
            # Each on its own address, where pods would each listen on [::]: here they share one namespace's port.
            args = ["--listen", f"[{ip}]:7070", "--advertise-address", ip, "--peers", "dns:tadlora-headless.test:7070",
                    "--cluster", tag, "--node-id", f"n{i}-{tag}", "--shard", str(i), "--out", str(tmp_path / f"o{i}"),
                    *SMALL]  # fmt: skip
            nodes.append(stack.enter_context(running_node(tmp_path, f"n{i}", args, tmp_path / f"o{i}", netns=ns)))
        assert [n.serving(START_S) and n.address for n in nodes] == [f"[{ip}]:7070" for ip in ips]
        for node in nodes:
            assert node.wait_exit(RUN_S) == 0, node.tail()
        ids = {n.node_id for n in nodes}
        for node in nodes:
            assert_mixed_every_round(node, ids - {node.node_id})
            assert not node.find(r"NOT_A_NEIGHBOR"), node.tail()  # its own record was skipped, not dialled
