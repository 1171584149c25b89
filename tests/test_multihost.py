"""`tadlora-node --peers auto` on several hosts: discovery, mixing, a cut and heal, a late join, a goodbye.

Each host is a network namespace behind a bridge (netns.py, as in shared/TESTBED.md) with its own veth and
address 10.77.0.I; each node is a real process inside its host, listening on 10.77.0.I:7070 and doing mDNS on
vethI only, so every packet between nodes crosses the bridge, and nothing leaves the testbed. Times measured
here are logged (run with ``-o log_cli=true --log-cli-level=INFO`` to see them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import netns
from netns import Host, Testbed
from nodeproc import STARTUP_S, NodeProcess, node_args, running_node, unique_tag
from tadlora.node.daemon import INTERFACE_POLL_S
from tadlora.node.peers import HANDSHAKE_TIMEOUT_S

log = logging.getLogger(__name__)

pytestmark = pytest.mark.netns
testbeds = netns.testbeds  # the fixture

PORT = 7070  # every host has its own address, so every node can listen on the same port
RUN_S = 90.0  # s for 3 nodes on two cores to start and do a few rounds
EXCHANGE_TIMEOUT_S = 3.0  # s; --exchange-timeout where a test cuts a link, so a missed neighbour costs little
LEAVE_EXCHANGE_TIMEOUT_S = 30.0  # s; long, so that a node that waited for a departed one would show it
MDNS_SETTLE_S = 2.0  # s after the last node served for every advert to have been seen (announcements: 0, 1 s)
GOODBYE_S = 5.0  # s for an mDNS goodbye to make the others drop the node (it takes well under 1 s)
CUT_S = 8.0  # s a host stays cut off after the others have dropped it
REJOIN_S = 60.0  # s after the heal for the cut host to be a neighbour again (peer retries back off to 30 s)
ROUND_GAP = 2  # rounds two nodes of one cluster may be apart (one being a round ahead of a neighbour is normal)
FREE_RUN = ["--min-peers", "2", "--eval-every", "1000", "--checkpoint-every", "1000"]  # no --rounds: runs on


def host_args(tag: str, host: Host, out: Path, hosts: int, extra: Sequence[str]) -> list[str]:
    return node_args(
        tag, f"h{host.index}-{tag}", out, shard=host.index - 1, num_shards=hosts, listen=f"{host.address}:{PORT}",
        extra=extra,
    )  # fmt: skip


def start_node(stack: contextlib.ExitStack, bed: Testbed, host: Host, tmp_path: Path, tag: str,
               extra: Sequence[str], *, defaults: bool = False) -> NodeProcess:  # fmt: skip
    """A node inside ``host``, listening on its address and doing mDNS on its veth only; with ``defaults``, given
    neither --listen nor --mdns-interface, as `tadlora-node --peers auto` on a LAN box: the host has no default
    route, its veth is its one interface with a link (lo aside), and the node listens on every address, port
    7070 (= PORT). Stopped when ``stack`` closes."""
    out = tmp_path / f"h{host.index}"
    args = host_args(tag, host, out, len(bed.hosts), extra)
    if defaults:
        at = args.index("--listen")
        del args[at : at + 2]
    mdns = None if defaults else host.interface
    return stack.enter_context(running_node(tmp_path, f"h{host.index}", args, out, netns=host.netns,
                                            mdns_interface=mdns))  # fmt: skip


def neighbour_ids(record: dict[str, Any]) -> list[str]:
    return sorted(n["id"] for n in record["neighbours"])


def started_at(record: dict[str, Any]) -> float:
    """When (wall clock) a rounds.jsonl record's round began."""
    return float(record["time"]) - float(record["seconds"])


def wait_rounds(node: NodeProcess, predicate: Callable[[dict[str, Any]], bool], count: int, what: str,
                timeout: float) -> list[dict[str, Any]]:  # fmt: skip
    """Wait until ``count`` of the node's rounds satisfy ``predicate``; returns those."""
    node.wait_until(lambda: len([r for r in node.rounds() if predicate(r)]) >= count, what, timeout)
    return [r for r in node.rounds() if predicate(r)]


def stop_all(nodes: Sequence[NodeProcess]) -> None:
    for node in nodes:
        if node.proc.poll() is None:
            node.send(signal.SIGTERM)
    for node in nodes:
        assert node.wait_exit(30) == 0, node.tail()


def verified(node: NodeProcess, peer: NodeProcess, host: Host) -> dict[str, Any]:
    """The node's "peer X verified at ADDRESS" record for ``peer`` on ``host``."""
    (record, *_) = node.find(rf"^peer {peer.node_id} verified at {host.address}:{PORT} ")
    return record


# ---------------------------------------------------------------------------------------------------------------


_LISTEN = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
s.settimeout(30)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
"""


def test_testbed_hosts_reach_each_other_only_through_their_bridge_ports_and_vanish_at_teardown(
    testbeds: Callable[[int], Testbed],
) -> None:
    bed = testbeds(2)
    server, client = bed.hosts
    listener = subprocess.Popen(server.command(sys.executable, "-c", _LISTEN, server.address, str(PORT)),
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"

        def connects() -> bool:
            return bed.run(client, sys.executable, "-c", _CONNECT, server.address, str(PORT), "1").returncode == 0

        assert connects()
        for _ in range(3):  # heal() must leave nothing behind: a stale ARP entry once delayed the reconnect by 1 s
            bed.cut(client)
            assert not connects()
            bed.heal(client)
            assert connects()
    finally:
        listener.kill()
        listener.wait()
    # The addresses exist only inside the testbed; closing it (which the fixture would do) removes every name.
    assert server.address not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    bed.close()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert bed.prefix not in names, names
    bed.close()  # twice is fine


def test_nodes_on_three_hosts_find_each_other_by_mdns_and_mix_every_round_across_hosts(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    """The third is given neither --listen nor --mdns-interface. Its host, as a LAN testbed with no way out, has no
    default route: mDNS goes on its one interface with an IPv4 address and a link (this was an error, "no IPv4
    default route"), and the node listens on every address and announces that interface's (it listened on
    127.0.0.1 and announced that, so that each other node dialled itself at it)."""
    bed, tag, rounds = testbeds(3), unique_tag(), 5
    extra = ["--rounds", str(rounds), "--min-peers", "2", "--eval-every", "1000"]
    with contextlib.ExitStack() as stack:
        nodes = [start_node(stack, bed, host, tmp_path, tag, extra, defaults=host.index == 3)
                 for host in bed.hosts]  # fmt: skip
        for node in nodes:
            assert node.wait_exit(RUN_S) == 0, node.tail()

    launched = min(n.started for n in nodes)
    for node, host in zip(nodes, bed.hosts, strict=True):
        assert node.serving()["message"].startswith(f"node {node.node_id} serving on {host.address}:{PORT} ")
        assert node.find(rf"^mDNS: advertising \S+ on {host.address}$"), node.tail()
    found = []
    for i, node in enumerate(nodes):
        others = [(n, h) for j, (n, h) in enumerate(zip(nodes, bed.hosts, strict=True)) if j != i]
        # Each found the other two at their own hosts' addresses: the handshakes crossed the bridge.
        found.append(max(verified(node, peer, host)["time"] for peer, host in others))
        records = node.rounds()
        assert [r["round"] for r in records] == list(range(rounds)), node.tail()
        for r in records:
            assert (r["degree"], neighbour_ids(r), r["missed"]) == (2, sorted(p.node_id for p, _ in others), []), r
            assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    round_s = statistics.median(r["seconds"] for n in nodes for r in n.rounds())
    # The gRPC server starts just before mDNS; the node's "serving" line comes after its advert is registered.
    mdns_started = max(n.wait_for(r"^serving tadlora\.v1\.Node on ", 0)["time"] for n in nodes)
    log.info("3 hosts: all serving %.1f s after launch; every node had both peers %.2f s after the last one "
             "started mDNS; median round %.3f s", max(n.serving()["time"] for n in nodes) - launched,
             max(found) - mdns_started, round_s)  # fmt: skip
    # Both ends of every link agree on its weight in every round.
    by_id = {n.node_id: n.rounds() for n in nodes}
    for i, records in by_id.items():
        for r in records:
            for n in r["neighbours"]:
                (theirs,) = [m for m in by_id[n["id"]][r["round"]]["neighbours"] if m["id"] == i]
                assert theirs["weight"] == n["weight"]


def test_a_host_cut_off_mid_run_is_dropped_by_the_others_who_carry_on_and_rejoins_them_after_the_heal(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    bed, tag = testbeds(3), unique_tag()
    extra = [*FREE_RUN, "--exchange-timeout", str(EXCHANGE_TIMEOUT_S)]
    with contextlib.ExitStack() as stack:
        nodes = [start_node(stack, bed, host, tmp_path, tag, extra) for host in bed.hosts]
        *others, cut_node = nodes
        cut_host = bed.hosts[-1]
        for node in nodes:
            wait_rounds(node, lambda r: r["degree"] == 2, 3, "3 rounds with both neighbours", RUN_S)

        bed.cut(cut_host)
        cut_at = time.time()
        for node in others:  # they drop it and go on together
            wait_rounds(node, lambda r: started_at(r) > cut_at and r["degree"] == 1, 3,
                        "3 rounds without the cut host", 30)  # fmt: skip
        dropped_at = time.time()
        time.sleep(CUT_S)
        bed.heal(cut_host)
        healed_at = time.time()

        def rejoined(r: dict[str, Any]) -> bool:
            return started_at(r) > healed_at and r["degree"] == 2 and not r["missed"]

        rejoined_at = max(
            min(r["time"] for r in wait_rounds(n, rejoined, 1, "a round with both neighbours after the heal",
                                               REJOIN_S))
            for n in nodes
        )  # fmt: skip
        together = [wait_rounds(n, rejoined, 3, "3 rounds with both neighbours after the heal", 30) for n in nodes]
        stop_all(nodes)

    adopted = [(n.name, r["message"]) for n in nodes for r in n.find(r"^catching up: ")]
    log.info("cut: the others dropped the cut host and did 3 rounds in %.1f s; after a %.1f s cut, all three "
             "mixed again %.1f s after the heal; catch-ups: %s", dropped_at - cut_at, healed_at - cut_at,
             rejoined_at - healed_at, adopted)  # fmt: skip
    for node, after_heal in zip(others, together[:-1], strict=True):
        assert all(cut_node.node_id in neighbour_ids(r) for r in after_heal), after_heal  # a neighbour again
        records = node.rounds()
        during = [r for r in records if r["time"] > cut_at and r["time"] < healed_at]
        assert len(during) >= 3, "the others did not carry on while the host was cut off"
        missed = [r["round"] for r in during if cut_node.node_id in r["missed"]]
        # It is missed in the round in flight, which then probes it, and in those that start while the probe
        # waits for an answer that cannot come...
        assert 1 <= len(missed) <= 1 + math.ceil(HANDSHAKE_TIMEOUT_S / EXCHANGE_TIMEOUT_S), (missed, during)
        assert cut_node.node_id in node.find(r"^peer \S+ dropped: ")[0]["message"], node.tail()
        for r in during:  # ... then it was dropped: no longer a neighbour, and no round waited for it
            if r["round"] > missed[-1]:
                assert cut_node.node_id not in neighbour_ids(r) + r["missed"], r
            assert r["seconds"] < EXCHANGE_TIMEOUT_S + 2.0, r
    # An exchange pairs the same round on both ends, so mixing again means being in the same round again.
    last = [n.rounds()[-1]["round"] for n in nodes]
    assert max(last) - min(last) <= ROUND_GAP, last
    # The cut host drops the others once its probes time out, and then runs alone until the heal.
    alone = [r for r in cut_node.rounds() if started_at(r) > cut_at and r["time"] < healed_at and r["degree"] == 0]
    assert len(alone) >= 3, cut_node.tail()


def test_a_host_started_late_catches_up_with_the_round_of_the_others(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    bed, tag = testbeds(3), unique_tag()
    early = ["--min-peers", "1", *FREE_RUN[2:]]
    with contextlib.ExitStack() as stack:
        first = [start_node(stack, bed, host, tmp_path, tag, early) for host in bed.hosts[:2]]
        for node in first:
            wait_rounds(node, lambda r: r["degree"] == 1, 4, "4 rounds together", RUN_S)
        late = start_node(stack, bed, bed.hosts[2], tmp_path, tag, FREE_RUN)
        record = late.wait_for(r"^catching up: adopting round \d+ and factors from ", STARTUP_S)
        caught_up_s = record["time"] - late.serving()["time"]
        wait_rounds(late, lambda r: r["degree"] == 2, 3, "3 rounds with both neighbours", 30)
        joined = [wait_rounds(n, lambda r: late.node_id in neighbour_ids(r), 1, "the late host as neighbour", 30)
                  for n in first]  # fmt: skip
        stop_all([*first, late])

    rounds = late.rounds()
    log.info("late join: adopted round %d %.2f s after it served", rounds[0]["round"], caught_up_s)
    assert rounds[0]["round"] >= 4, rounds[0]  # it did not start from round 0
    assert [r["round"] for r in rounds] == list(range(rounds[0]["round"], rounds[-1]["round"] + 1))
    first_joint = min(r["round"] for j in joined for r in j)
    assert first_joint - rounds[0]["round"] <= ROUND_GAP, (first_joint, rounds[0])


def test_a_host_leaving_with_sigterm_says_goodbye_and_the_others_stop_counting_it_at_once(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    """The leaving node has the smallest id, so it is the caller on both its links: the others wait for its call.
    Its goodbye must end that wait, not the (long) exchange deadline."""
    bed, tag = testbeds(3), unique_tag()
    extra = [*FREE_RUN, "--exchange-timeout", str(LEAVE_EXCHANGE_TIMEOUT_S)]
    with contextlib.ExitStack() as stack:
        nodes = [start_node(stack, bed, host, tmp_path, tag, extra) for host in bed.hosts]
        leaver, *others = sorted(nodes, key=lambda n: n.node_id)
        for node in nodes:
            wait_rounds(node, lambda r: r["degree"] == 2, 3, "3 rounds with both neighbours", RUN_S)
        # Rounds take tens of ms: let every advert be seen (resolved in ~0.1 s) before one node leaves, or the
        # others may know it only from its own handshake, which no goodbye can retract.
        time.sleep(max(0.0, max(n.serving()["time"] for n in nodes) + MDNS_SETTLE_S - time.time()))
        leaver.send(signal.SIGTERM)
        sent_at = time.time()
        assert leaver.wait_exit(30) == 0, leaver.tail()
        gone = [n.wait_for(rf"^peer {leaver.node_id} dropped: left \(mDNS goodbye\)", GOODBYE_S) for n in others]
        for node in others:
            wait_rounds(node, lambda r: started_at(r) > sent_at and r["degree"] == 1, 3, "3 rounds without it", 30)
        stop_all(others)

    log.info("leave: the others dropped it %.2f s after SIGTERM", max(g["time"] for g in gone) - sent_at)
    for node, dropped in zip(others, gone, strict=True):
        records = node.rounds()
        after = [r for r in records if r["time"] > sent_at]
        # Only rounds begun before the goodbye arrived count it (as missed): the one in flight at the SIGTERM, which
        # ends at once if the stop cut an exchange of it short, and the one in flight when the goodbye arrives
        # (the same round, unless that happened). Every later round starts without it.
        missed = [r for r in after if leaver.node_id in r["missed"]]
        assert len(missed) <= 2 and all(started_at(r) <= dropped["time"] for r in missed), missed
        for r in after:
            if started_at(r) > dropped["time"]:
                assert r["degree"] == 1 and leaver.node_id not in neighbour_ids(r) + r["missed"], r
            assert r["seconds"] < GOODBYE_S, r  # no round waited out the exchange deadline for the departed node


def test_a_host_renumbered_mid_run_announces_its_new_address_and_its_peer_mixes_with_it_there(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    """A new DHCP lease moves host 2 to another address while its node runs on --listen 0.0.0.0 and
    --mdns-interface veth2 (a name, as on a real device): the node must move its mDNS sockets and announcement to
    the new address, and host 1's node must find it there and mix with it again."""
    bed, tag = testbeds(2), unique_tag()
    first, moved = bed.hosts
    new_address = f"{netns.SUBNET}.102"
    extra = ["--min-peers", "1", *FREE_RUN[2:], "--exchange-timeout", str(EXCHANGE_TIMEOUT_S)]
    with contextlib.ExitStack() as stack:
        one = start_node(stack, bed, first, tmp_path, tag, extra)
        out = tmp_path / "h2"
        args = node_args(tag, f"h2-{tag}", out, shard=1, num_shards=2, listen=f"0.0.0.0:{PORT}", extra=extra)
        two = stack.enter_context(
            running_node(tmp_path, "h2", args, out, netns=moved.netns, mdns_interface=moved.interface)
        )
        for node in (one, two):
            wait_rounds(node, lambda r: r["degree"] == 1, 2, "2 rounds together", RUN_S)
        verified(one, two, moved)

        # The lease changes: the old address goes, the new one comes (as a DHCP client does it).
        for change in (["addr", "del", f"{moved.address}/24", "dev", moved.interface],
                       ["addr", "add", f"{new_address}/24", "dev", moved.interface],
                       ["route", "replace", "224.0.0.0/4", "dev", moved.interface]):  # fmt: skip
            result = bed.run(moved, "ip", *change)
            assert result.returncode == 0, result.stderr
        renumbered_at = time.time()
        moved_record = two.wait_for(
            rf"^mDNS: interface address {moved.address} is now {new_address}: announcing {new_address}:{PORT} there$",
            2 * INTERFACE_POLL_S + 5,
        )
        found = one.wait_for(rf"^peer {two.node_id} verified at {new_address}:{PORT} ", REJOIN_S)
        for node in (one, two):
            wait_rounds(node, lambda r: started_at(r) > found["time"] and r["degree"] == 1, 3,
                        "3 rounds together after the move", 30)  # fmt: skip
        asked = bed.run(moved, sys.executable, "-m", "tadlora.node.entry", "status", f"{new_address}:{PORT}")
        assert asked.returncode == 0, asked.stderr
        status = json.loads(asked.stdout)
        # Walked from the other host: its neighbour list leads to the moved node at its new address.
        walk = bed.run(first, sys.executable, "-m", "tadlora.node.entry", "status", f"{first.address}:{PORT}", "--all")
        assert walk.returncode == 0, walk.stderr
        walked = json.loads(walk.stdout)
        stop_all([one, two])

    log.info("renumbering: the node moved its announcement %.1f s after the new lease, its peer verified it there "
             "%.1f s after", moved_record["time"] - renumbered_at, found["time"] - moved_record["time"])  # fmt: skip
    assert status["address"] == f"{new_address}:{PORT}", status  # the node's own address followed
    assert sorted((n["node_id"], n["address"]) for n in walked["nodes"]) == sorted(
        [(one.node_id, f"{first.address}:{PORT}"), (two.node_id, f"{new_address}:{PORT}")]
    ), walked
    assert walked["unreachable"] == [], walked
    assert two.find(rf"^mDNS: advertising \S+ on {new_address}$"), two.tail()
