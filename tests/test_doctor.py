"""`tadlora-node doctor`: every check says OK, WARN or FAIL with a fix; nothing FAILs exits 0, else 1.

Everything runs on 127.0.0.1 (mDNS too) with the tiny model; a real node in this process plays the peer. The
netns tests run their mDNS inside network namespaces of their own (tests/netns.py), never on a real interface.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import netns
import tadlora
import test_discovery
from netns import Testbed
from tadlora.node.cli import main
from tadlora.node.config import NodeConfig
from tadlora.node.daemon import Node
from tadlora.node.discovery import SERVICE_TYPE, PeerCandidate
from tadlora.node.doctor import BROWSE_S as DOCTOR_BROWSE_S
from tadlora.node.doctor import Browsed, async_browse, async_check_peers, compare_peer, own_address, report
from tadlora.node.hostcheck import check_listen, check_precision, check_training, multicast_route_interfaces
from tadlora.node.identity import save_identity
from tadlora.node.peerspec import PeersOption, parse_peers_option
from tadlora.node.rpc import PROTOCOL_VERSION
from test_daemon import NO_PEERS, cluster_name, node_config
from test_discovery import FOREIGN_ALIASES, pointer_spammer, raw_info, raw_responder
from test_node_cli import free_port

quick_timing = test_discovery.quick_timing  # fixtures
testbeds = netns.testbeds

BROWSE_S = "2"  # s; the peer is registered before the doctor starts, so it answers the browse at once


def doctor_args(tmp: Path, peers: str = "auto", **flags: str) -> list[str]:
    """Doctor flags that match `node_config(tmp, ...)`'s nodes (tiny model, its LoRA, cluster and seed)."""
    args = {
        "peers": peers,
        "cluster": cluster_name(tmp),
        "model": "tiny",
        "lora-r": "4",
        "lora-alpha": "8",
        "num-shards": "2",
        "shard": "0",
        "mdns-interface": "127.0.0.1",
        "listen": f"127.0.0.1:{free_port()}",
        "device": "cpu",
        "out": str(tmp / "doctor-out"),
        "browse-seconds": BROWSE_S,
    }
    args.update({k.replace("_", "-"): v for k, v in flags.items()})
    return ["doctor", "--insecure", *(x for k, v in args.items() for x in (f"--{k}", v))]


async def run_doctor(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `tadlora-node doctor` (its own event loop, in a thread: ours serves the peer meanwhile)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, argv)
    return code, capsys.readouterr().out


async def run_doctor_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code, out = await run_doctor([*argv, "--json"], capsys)
    return code, json.loads(out)


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def ours_at(doc: dict, port: str) -> list[dict]:
    """The peer checks of this test's node (node-1, at ``port``): other tests, in this session's other workers or
    other sessions, run their own node-1 on 127.0.0.1's shared mDNS, and the doctor lists them too."""
    return [c for c in doc["checks"] if c["name"].startswith("peer node-1 ") and c["name"].endswith(f":{port}")]


def peer(tmp: Path, **changes) -> NodeConfig:
    return node_config(tmp, 1, 2, parse_peers_option("auto"), min_peers=0, **changes)


@pytest.mark.asyncio
async def test_a_ready_host_with_a_matching_peer_is_all_ok(tmp_path, capsys) -> None:
    async with Node(peer(tmp_path)) as node:
        port = node.address.rpartition(":")[2]
        argv = doctor_args(tmp_path, peers=f"auto,127.0.0.1:{port},dns:localhost:{port}")
        code, doc = await run_doctor_json(argv, capsys)
    assert code == 0 and doc["ok"]
    # Services that cannot be peers (WARN) may come from other test runs sharing 127.0.0.1: not this host's doing.
    not_ok = [c for c in doc["checks"] if c["status"] != "OK" and c["name"] != "tls" and c["name"][:8] != "service "]
    assert not not_ok, not_ok
    assert by_name(doc)["tls"]["status"] == "WARN"  # --insecure is allowed, but said out loud
    checks = by_name(doc)
    for name in ("interfaces", "mdns", "listen", "device", "precision", "out", "dataset", "model"):
        assert name in checks
    assert "no GPU: training on CPU" in checks["device"]["detail"] or "GPU" in checks["device"]["detail"]
    assert node.fingerprint in checks["model"]["detail"]
    ours = ours_at(doc, port)
    assert sorted(c["detail"].split(")")[0] for c in ours) == ["(dns:localhost:" + port, "(mdns", "(static"]
    assert all("fingerprint" in c["detail"] and "match" in c["detail"] for c in ours)


@pytest.mark.asyncio
async def test_a_taken_listen_port_fails_with_the_fix(tmp_path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, doc = await run_doctor_json(
            doctor_args(tmp_path, listen=f"127.0.0.1:{port}", browse_seconds="0.2"), capsys
        )
    listen = by_name(doc)["listen"]
    assert code == 1 and not doc["ok"]
    assert listen["status"] == "FAIL" and "in use" in listen["detail"].lower()
    assert "choose another --listen port" in listen["fix"] and f"tadlora-node status 127.0.0.1:{port}" in listen["fix"]


@pytest.mark.asyncio
async def test_a_model_that_does_not_load_fails_in_the_text_report(tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    code, out = await run_doctor(doctor_args(tmp_path, model=str(missing), browse_seconds="0.2"), capsys)
    assert code == 1
    line = next(x for x in out.splitlines() if x.split()[:2] == ["FAIL", "model"])
    assert str(missing) in line
    fix = out.splitlines()[out.splitlines().index(line) + 1]
    assert fix.strip().startswith("fix:") and "local directory" in fix
    assert out.splitlines()[-1].endswith("1 FAIL")


@pytest.mark.asyncio
async def test_a_peer_with_another_fingerprint_is_reported(tmp_path, capsys) -> None:
    async with Node(peer(tmp_path, seed=7)) as node:  # the seed is part of the fingerprint
        port = node.address.rpartition(":")[2]
        code, doc = await run_doctor_json(doctor_args(tmp_path, peers=f"auto,127.0.0.1:{port}"), capsys)
    ours = ours_at(doc, port)
    assert code == 0  # a mismatched peer is a warning: this node itself can run
    assert len(ours) == 2 and all(c["status"] == "WARN" for c in ours), ours
    for check in ours:  # its status (static) and its advert (mdns) both say its parts: the seed is named
        assert f"fingerprint {node.fingerprint} differs" in check["detail"] and "will not mix" in check["detail"]
        assert ") in seed (its 7, ours 0) and weights (its #" in check["detail"], check
        assert "--seed" in check["fix"] and "--model" in check["fix"]


@pytest.mark.asyncio
async def test_a_peer_with_another_schedule_is_reported(tmp_path, capsys) -> None:
    """Same model, so the same fingerprint, but another method: the node would refuse it at handshake (asked for
    its status) and pass its advert over (its mDNS TXT record says its schedule)."""
    async with Node(peer(tmp_path, method="lora")) as node:
        port = node.address.rpartition(":")[2]
        code, doc = await run_doctor_json(doctor_args(tmp_path, peers=f"auto,127.0.0.1:{port}"), capsys)
    ours = ours_at(doc, port)
    assert code == 0  # a warning, as for another fingerprint: this node itself can run
    assert len(ours) == 2 and {c["detail"].startswith("(mdns) ") for c in ours} == {True, False}, ours
    for check in ours:
        assert check["status"] == "WARN" and "will not mix" in check["detail"]
        assert f"{node.schedule!r}" in check["detail"] and "'tad T=5 p=1.0 max-neighbors=all'" in check["detail"]
        assert "--method" in check["fix"] and "--link-prob" in check["fix"]


@pytest.mark.asyncio
async def test_a_peer_of_this_cluster_already_running_under_this_nodes_id_fails(tmp_path, capsys) -> None:
    """Found by mDNS and asked at its static address alike; another cluster's node of that id is no conflict."""
    async with Node(peer(tmp_path)) as node:
        port = node.address.rpartition(":")[2]
        argv = doctor_args(tmp_path, peers=f"auto,127.0.0.1:{port}", node_id="node-1")
        code, doc = await run_doctor_json(argv, capsys)
        _, other_cluster = await run_doctor_json(
            doctor_args(tmp_path, peers=f"auto,127.0.0.1:{port}", node_id="node-1", cluster="elsewhere"), capsys
        )
        # No --node-id: the node would take the id its --out kept from an earlier run.
        save_identity(tmp_path / "doctor-out", "node-1", node.fingerprint, cluster=cluster_name(tmp_path))
        _, kept = await run_doctor_json(doctor_args(tmp_path, peers=f"auto,127.0.0.1:{port}"), capsys)
    ours = ours_at(doc, port)
    assert code == 1 and not doc["ok"]
    assert sorted(c["detail"].split(")")[0] for c in ours) == ["(mdns", "(static"]
    assert all(c["status"] == "FAIL" and "runs under this node's id" in c["detail"] for c in ours), ours
    assert all("--node-id" in c["fix"] for c in ours)
    assert [c["status"] for c in ours_at(other_cluster, port)] == ["OK", "OK"]
    assert [c["status"] for c in ours_at(kept, port)] == ["FAIL", "FAIL"], ours_at(kept, port)


def test_bf16_on_a_cpu_without_native_bf16_is_a_warn_with_the_fix(tmp_path) -> None:
    avx2_only = "processor\t: 0\nflags\t\t: fpu avx avx2\n"
    default = peer(tmp_path, device="cpu")
    bf16 = dataclasses.replace(default, train=dataclasses.replace(default.train, precision="bf16"))
    slow = check_precision(bf16, avx2_only)
    assert slow.status == "WARN" and "slower than fp32" in slow.detail and "--precision auto" in slow.fix
    fine = check_precision(bf16, "flags\t: avx2 amx_bf16\n")
    assert fine.status == "OK" and "native bf16" in fine.detail
    default = check_precision(default, avx2_only)
    assert default.status == "OK" and "fp32 on cpu" in default.detail


def test_bad_flags_exit_2(capsys) -> None:
    assert main(["doctor", "--shard", "5"]) == 2
    assert "--shard 5" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["nan", "-1", "inf"])
def test_the_doctors_own_flags_take_variables_too_and_a_bad_one_is_named(
    seconds: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--json` and `--browse-seconds` were added after the variables had been read: TADLORA_JSON did nothing, and
    a NaN browse time was taken."""
    monkeypatch.setenv("TADLORA_BROWSE_SECONDS", seconds)
    assert main(["doctor", "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "--browse-seconds must be a number of seconds >= 0" in err and "TADLORA_BROWSE_SECONDS" in err, err


def test_tadlora_json_makes_the_report_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("TADLORA_JSON", "1")
    args = [a for a in doctor_args(tmp_path, browse_seconds="0", model=str(tmp_path / "none")) if a != "--json"]
    assert main(args) == 1  # the model does not load
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_a_wildcard_listen_without_mdns_or_advertise_address_fails_as_the_node_would(tmp_path) -> None:
    """The node refuses to start so (peers told 0.0.0.0:PORT dial their own host): the doctor says FAIL, not WARN."""
    static = PeersOption(auto=False, static=("127.0.0.1:1",), dns=())
    wildcard = node_config(tmp_path, 0, 1, static, listen="0.0.0.0:0")
    listen = check_listen(wildcard)
    assert listen.status == "FAIL" and "--advertise-address" in listen.fix
    assert check_listen(dataclasses.replace(wildcard, advertise_address="10.1.2.3")).status == "OK"
    assert check_listen(dataclasses.replace(wildcard, peers=parse_peers_option("auto"))).status == "OK"


def test_a_listen_address_this_host_does_not_have_fails_naming_the_fix(tmp_path) -> None:
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no address of any host: the node would fail to bind it at start.
    listen = check_listen(node_config(tmp_path, 0, 1, NO_PEERS, listen="192.0.2.1:7070"))
    assert listen.status == "FAIL" and "cannot bind 192.0.2.1:7070" in listen.detail
    assert listen.fix == "use an address of this host (see 'interfaces') or 0.0.0.0"


def test_a_dataset_that_does_not_load_fails_the_dataset_check_with_what_went_wrong(tmp_path) -> None:
    """A user's file can fail in many ways; the check says how, in the loader's words, and what it takes."""
    data = tmp_path / "mine.csv"
    data.write_text("text,stars\ngood film,5\n", encoding="utf-8")  # no "label" column
    checks, _, _ = check_training(node_config(tmp_path, 0, 1, NO_PEERS, dataset=str(data)))
    [dataset] = [c for c in checks if c.name == "dataset"]
    assert dataset.status == "FAIL" and dataset.detail.startswith(f"{data}: ") and "label" in dataset.detail
    assert "path.csv?text=COL&label=COL" in dataset.fix


@pytest.mark.parametrize("port", ["health", "metrics"])
def test_a_health_or_metrics_port_taken_by_another_process_fails_the_listen_check(tmp_path, port: str) -> None:
    # The node binds the metrics port only once the model has loaded, and exits then: the doctor is where to learn
    # it first.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg = node_config(tmp_path, 0, 1, NO_PEERS, listen="127.0.0.1:0", **{f"{port}_port": busy})
        listen = check_listen(cfg)
    flag = f"--{port}-port"
    assert listen.status == "FAIL" and f"{flag} {busy}" in listen.detail and flag in listen.fix
    free = check_listen(cfg)  # released with the socket
    assert free.status == "OK" and f"{port} port {busy}" in free.detail


def test_another_clusters_node_is_fine_and_a_protocol_mismatch_warns(tmp_path) -> None:
    cfg = node_config(tmp_path, 0, 1, PeersOption(auto=True, static=(), dns=()))
    assert compare_peer(cfg, "ab", "x", "elsewhere", "cd", PROTOCOL_VERSION).status == "OK"
    newer = compare_peer(cfg, "ab", "x", cfg.cluster, "ab", PROTOCOL_VERSION + 1, release="9.0.0")
    assert newer.status == "WARN"
    assert newer.detail == f"protocol {PROTOCOL_VERSION + 1} (tadlora 9.0.0), ours {PROTOCOL_VERSION} (tadlora " \
        f"{tadlora.__version__})"  # fmt: skip
    assert newer.fix.startswith("upgrade the node of the older protocol")
    unsaid = compare_peer(cfg, "ab", "x", cfg.cluster, "ab", PROTOCOL_VERSION + 1)  # a node too old to say it
    assert unsaid.detail.startswith(f"protocol {PROTOCOL_VERSION + 1}, ours {PROTOCOL_VERSION} (tadlora ")
    assert compare_peer(cfg, "ab", "x", cfg.cluster, "ab", PROTOCOL_VERSION).status == "OK"
    # A schedule: the peer's status or mDNS advert says it; one not known (an older node's) is not compared.
    ours = cfg.schedule()
    assert compare_peer(cfg, "ab", "x", cfg.cluster, "ab", PROTOCOL_VERSION, schedule=ours).status == "OK"
    assert compare_peer(cfg, "ab", "x", cfg.cluster, "ab", PROTOCOL_VERSION, schedule="").status == "OK"
    other = compare_peer(
        cfg, "ab", "x", cfg.cluster, "ab", PROTOCOL_VERSION, schedule="lora T=none p=1.0 max-neighbors=all"
    )
    assert other.status == "WARN" and "'lora T=none p=1.0 max-neighbors=all'" in other.detail and ours in other.detail
    # Another fingerprint and another schedule: both said, with both fixes (one restart, not two).
    both = compare_peer(
        cfg, "ab", "x", cfg.cluster, "cd", PROTOCOL_VERSION, schedule="lora T=none p=1.0 max-neighbors=all"
    )
    assert both.status == "WARN" and "fingerprint cd differs" in both.detail and "'lora T=none" in both.detail
    assert all(flag in both.fix for flag in ("--seed", "--lora-dropout", "--init", "--method", "--link-prob"))


def test_a_peer_of_another_fingerprint_is_told_the_parts_that_differ_when_both_are_known(tmp_path) -> None:
    cfg = node_config(tmp_path, 0, 1, PeersOption(auto=True, static=(), dns=()))
    ours = "model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0 init=portable"
    theirs = ours.replace("init=portable", "init=torch")
    named = compare_peer(cfg, "ab", "x", cfg.cluster, "cd", PROTOCOL_VERSION, fingerprint_parts=theirs, our_parts=ours)
    assert named.status == "WARN"
    assert named.detail == (f"cluster {cfg.cluster!r} matches, but fingerprint cd differs from ours (ab) in init "
                            "(its torch, ours portable): the nodes will not mix")  # fmt: skip
    assert "--init" in named.fix
    # A peer too old to say its parts (or this node's model failed): the fingerprints alone, as before.
    for peer_parts, our_parts in ((theirs, ""), ("", ours)):
        plain = compare_peer(
            cfg, "ab", "x", cfg.cluster, "cd", PROTOCOL_VERSION, fingerprint_parts=peer_parts, our_parts=our_parts
        )
        assert plain.detail == f"cluster {cfg.cluster!r} matches, but fingerprint cd differs from ours (ab): the " \
            "nodes will not mix"  # fmt: skip


@pytest.mark.asyncio
async def test_an_mdns_peer_that_differs_in_tls_warns_since_the_node_would_pass_it_over(tmp_path) -> None:
    """A node skips an advert whose TLS setting is not its own (`PeerManager._prefilter`): cluster and fingerprint
    matching is then no reason to say OK."""
    cfg = node_config(tmp_path, 0, 1, PeersOption(auto=True, static=(), dns=()))  # --insecure
    tls = PeerCandidate("node-1", "127.0.0.1:7070", cfg.cluster, "ab", PROTOCOL_VERSION, True, "mdns", "node-1.x.")
    [check] = await async_check_peers(cfg, "ab", Browsed([tls], [], []), "127.0.0.1")
    assert check.status == "WARN" and "TLS" in check.detail and "--insecure" in check.fix
    [check] = await async_check_peers(cfg, "ab", Browsed([dataclasses.replace(tls, secure=False)], [], []), "lo")
    assert check.status == "OK"


@pytest.mark.asyncio
async def test_an_mdns_peer_of_another_schedule_warns_since_the_node_would_pass_it_over(tmp_path) -> None:
    """Its advert says its schedule: another one is a WARN with the flags to fix, as a static peer's is; the same
    one, or none (an older node's advert), is not compared."""
    cfg = node_config(tmp_path, 0, 1, PeersOption(auto=True, static=(), dns=()))
    theirs = "lora T=none p=1.0 max-neighbors=all"
    cand = PeerCandidate(
        "node-1", "127.0.0.1:7070", cfg.cluster, "ab", PROTOCOL_VERSION, False, "mdns", "node-1.x.", schedule=theirs
    )
    [check] = await async_check_peers(cfg, "ab", Browsed([cand], [], []), "127.0.0.1")
    assert check.status == "WARN" and check.detail.startswith("(mdns) ") and "will not mix" in check.detail
    assert repr(theirs) in check.detail and repr(cfg.schedule()) in check.detail
    assert "--method" in check.fix and "--max-neighbors" in check.fix
    for same in (cfg.schedule(), ""):
        [check] = await async_check_peers(cfg, "ab", Browsed([dataclasses.replace(cand, schedule=same)], [], []), "lo")
        assert check.status == "OK"


@pytest.mark.asyncio
async def test_nodes_of_other_clusters_alone_are_reported_as_no_peer_of_this_one(tmp_path: Path) -> None:
    """Another cluster's node is listed as OK (the node ignores it), but it is no peer: with only such nodes on the
    network the doctor must still warn that none of this cluster answered, as it does when nothing answers."""
    cfg = node_config(tmp_path, 0, 1, parse_peers_option("auto"), min_peers=0, insecure=True)
    other = PeerCandidate("node-1", "127.0.0.1:7070", "elsewhere", "ab", PROTOCOL_VERSION, False, "mdns", "node-1.x.")
    checks = {c.name: c for c in await async_check_peers(cfg, "ab", Browsed([other], [], []), "127.0.0.1")}
    assert checks["peer node-1 at 127.0.0.1:7070"].status == "OK"
    alone = checks["peers (mdns)"]
    assert alone.status == "WARN" and repr(cfg.cluster) in alone.detail, alone
    assert "(only nodes of other clusters, above)" in alone.detail, alone
    ours = dataclasses.replace(other, cluster=cfg.cluster)
    checks = {c.name: c for c in await async_check_peers(cfg, "ab", Browsed([other, ours], [], []), "127.0.0.1")}
    assert "peers (mdns)" not in checks, checks


@pytest.mark.asyncio
async def test_the_text_report_escapes_what_a_peer_said_that_a_terminal_would_act_on(tmp_path: Path) -> None:
    """The peer lines quote what mDNS adverts said, and anyone on the LAN can send one: a fingerprint or schedule
    with a terminal escape in it (one that clears the screen), or a line break and a forged line, is printed escaped
    on one line. It was printed as sent."""
    cfg = node_config(tmp_path, 0, 1, parse_peers_option("auto"), min_peers=0, insecure=True)
    odd = [
        PeerCandidate("node-1", "127.0.0.1:7070", cfg.cluster, "cd\x1b[2J", PROTOCOL_VERSION, False, "mdns", "n1.x."),
        PeerCandidate("node-2", "127.0.0.1:7071", cfg.cluster, "ab", PROTOCOL_VERSION, False, "mdns", "n2.x.",
                      schedule="tad\nOK    peer node-9 at 10.0.0.9:7070  all fine"),
    ]  # fmt: skip
    text = report(await async_check_peers(cfg, "ab", Browsed(odd, [], []), "127.0.0.1"), False)
    assert "\x1b" not in text and "fingerprint cd\\x1b[2J differs" in text
    assert [line for line in text.splitlines() if "node-9" in line] == [
        "WARN  peer node-2 at 127.0.0.1:7071  (mdns) cluster and fingerprint match, but it runs 'tad\\nOK    peer "
        f"node-9 at 10.0.0.9:7070  all fine' and this node {cfg.schedule()!r}: the nodes will not mix"
    ]


def test_multicast_routes_are_read_from_the_kernel_table() -> None:
    table = (
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"  # default route: covers 224.0.0.0/4
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 192.0.2.0/24
        "veth1\t000000E0\t00000000\t0001\t0\t0\t0\t000000F0\t0\t0\t0\n"  # 224.0.0.0/4
        "veth2\t000000E0\t00000000\t0000\t0\t0\t0\t000000F0\t0\t0\t0\n"  # 224.0.0.0/4, but down
        "veth3\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n"  # 10.0.0.0/8
    )
    assert multicast_route_interfaces(table) == {"eth0", "veth1"}


@pytest.mark.asyncio
async def test_missing_certificates_are_a_fail_with_the_fix_and_issued_ones_are_ok(tmp_path, capsys) -> None:
    from tadlora.node.doctor import check_tls
    from tadlora.node.tls import init_ca, issue

    argv = [a for a in doctor_args(tmp_path, browse_seconds="0.2") if a != "--insecure"]
    code, doc = await run_doctor_json(argv, capsys)
    assert code == 1
    tls_check = by_name(doc)["tls"]
    assert tls_check["status"] == "FAIL" and "certs init" in tls_check["fix"]
    init_ca(tmp_path / "certs")
    issue(tmp_path / "certs", "node-0")
    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()), insecure=False, tls_dir=tmp_path / "certs")
    assert check_tls(cfg).status == "OK"
    wrong = node_config(tmp_path, 1, 2, PeersOption(False, (), ()), insecure=False, tls_dir=tmp_path / "certs")
    missing = check_tls(wrong)  # no certificate for node-1, in a directory that holds the cluster's CA
    assert missing.status == "FAIL" and "certs init" not in missing.detail + missing.fix, missing
    issue = f"`tadlora-node certs issue node-1 --dir {tmp_path / 'certs'}`"  # forced, init would replace the CA
    assert issue in missing.fix and issue in missing.detail


def test_a_certificate_the_run_cannot_use_fails_and_one_expiring_within_30_days_warns(tmp_path, monkeypatch) -> None:
    from tadlora.node import tls
    from tadlora.node.doctor import check_tls

    certs = tmp_path / "certs"
    tls.init_ca(certs)
    for name in ("node-0", "node-1"):
        tls.issue(certs, name)
    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()), insecure=False, tls_dir=certs)
    ok = check_tls(cfg)
    assert ok.status == "OK" and "valid until" in ok.detail
    (certs / "node-0.key").write_bytes((certs / "node-1.key").read_bytes())
    stolen = check_tls(cfg)
    assert stolen.status == "FAIL" and "is not the key of" in stolen.detail
    monkeypatch.setattr(tls, "NODE_DAYS", 10)
    tls.issue(certs, "node-0", force=True)
    expiring = check_tls(cfg)
    assert expiring.status == "WARN" and "in 9 days" in expiring.detail
    assert "certs issue node-0" in expiring.fix
    monkeypatch.undo()  # certificates of the usual lifetime again
    tls.issue(certs, "node-0", force=True)
    (certs / "node-0.key").chmod(0o644)  # as a copy that did not keep the mode may leave it
    exposed = check_tls(cfg)
    assert exposed.status == "WARN" and "mode 644" in exposed.detail and exposed.fix == f"chmod 640 {certs}/node-0.key"
    (certs / "node-0.key").chmod(0o604)
    assert check_tls(cfg).fix == f"chmod 600 {certs}/node-0.key"  # no group read to keep
    # The systemd recipe's key: its group (the unit's, tadlora-certs) reads it; nothing to warn of, nor to "fix"
    # into a mode the service could not read.
    (certs / "node-0.key").chmod(0o640)
    grouped = check_tls(cfg)
    group = grp.getgrgid((certs / "node-0.key").stat().st_gid).gr_name
    assert grouped.status == "OK" and grouped.detail.endswith(f"; its key readable by the group {group}"), grouped
    (certs / "node-0.key").chmod(0o660)  # a group that may write it is warned of, as such
    assert "its group can write it (mode 660)" in check_tls(cfg).detail
    # Both at once: neither hides the other (the mode's WARN once came back before the expiry was looked at).
    (certs / "node-0.key").chmod(0o644)
    monkeypatch.setattr(tls, "NODE_DAYS", 10)
    tls.issue(certs, "node-0", force=True)
    (certs / "node-0.key").chmod(0o644)
    both = check_tls(cfg)
    assert both.status == "WARN" and "mode 644" in both.detail and "in 9 days" in both.detail, both
    assert both.fix.startswith(f"chmod 640 {certs}/node-0.key; tadlora-node certs issue node-0"), both.fix
    (certs / "node-0.key").chmod(0o600)
    assert "mode" not in check_tls(cfg).detail


def test_an_out_of_another_node_id_fails_as_the_node_would(tmp_path) -> None:
    """The daemon raises on start when --node-id differs from the id kept in --out/node.json."""
    from tadlora.node.hostcheck import check_out

    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()))
    cfg.out.mkdir()
    save_identity(cfg.out, "n0", "ab", cluster=cfg.cluster)
    other = check_out(dataclasses.replace(cfg, node_id="n1"), "ab")
    assert other.status == "FAIL" and other.detail == f"{cfg.out} belongs to node 'n0', not 'n1'", other
    assert other.fix == "use another --out for node 'n1', or --node-id n0 to resume that node"
    assert check_out(dataclasses.replace(cfg, node_id="n0"), "ab").status == "OK"
    assert check_out(dataclasses.replace(cfg, node_id=None), "ab").status == "OK"  # the node takes the kept id


def test_an_out_held_by_a_running_node_fails_as_the_node_would(tmp_path) -> None:
    """The daemon refuses an --out whose lock another node holds (exit 1, retried for ever); doctor said "OK:
    resumes node ..." for it. The lock is this test's own `hold_out`, as a running node holds it."""
    from tadlora.node import state
    from tadlora.node.hostcheck import check_out

    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()))
    cfg.out.mkdir()
    save_identity(cfg.out, "node-0", "ab", **cfg.run_settings())
    fd = state.hold_out(cfg.out)
    try:
        held = check_out(cfg, "ab")
    finally:
        os.close(fd)
    assert held.status == "FAIL" and f"process {os.getpid()} holds {cfg.out / state.LOCK}" in held.detail, held
    assert "stop that node" in held.fix
    assert check_out(cfg, "ab").status == "OK"  # released: a node stopped, or one that crashed, holds nothing
    assert sorted(p.name for p in cfg.out.iterdir()) == [state.LOCK, "node.json"]  # asking created nothing new


def test_an_out_of_another_run_fails_as_the_node_would(tmp_path) -> None:
    """The daemon refuses to resume a run of other settings (`NodeConfig.run_settings`): so does doctor."""
    from tadlora.node.hostcheck import check_out

    cfg = node_config(tmp_path, 0, 2, PeersOption(False, (), ()))
    cfg.out.mkdir()
    save_identity(cfg.out, "node-0", "ab", **cfg.run_settings())
    assert check_out(cfg, "ab").status == "OK"
    for change in ({"method": "lora"}, {"cluster": "other"}, {"shard": 1}, {"link_prob": 0.5}, {"max_neighbors": 4}):
        other = check_out(dataclasses.replace(cfg, **change), "ab")
        assert other.status == "FAIL" and "holds a run of other settings, --" in other.detail, change
        assert "the flags that run was started with" in other.fix


def test_an_out_of_another_model_fingerprint_fails_naming_the_part_as_the_node_would(tmp_path) -> None:
    """node.json keeps the fingerprint's parts (Node.start): doctor names the one that changed, in the node's words
    (`identity.out_refusal`, which both use)."""
    from tadlora.node.hostcheck import check_out

    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()))
    cfg.out.mkdir()
    kept = "model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0 init=portable weights=#00000001"
    now = kept.replace("seed=0", "seed=7").replace("#00000001", "#00000002")
    save_identity(cfg.out, "node-0", "ab", **cfg.run_settings(), fingerprint_parts=kept)
    other = check_out(cfg, "cd", now)
    assert other.status == "FAIL", other
    assert other.detail == (
        f"{cfg.out} belongs to a run with another model fingerprint (ab); it differs in seed (kept 0, now 7) and "
        "weights (kept #00000001, now #00000002)"
    )
    assert other.fix == "use another --out to start a new run, or the flags that run was started with"
    assert check_out(cfg, "cd").detail == f"{cfg.out} belongs to a run with another model fingerprint (ab)"  # no parts
    assert check_out(cfg, None).status == "OK"  # the model did not load (its own check fails): nothing to compare
    assert check_out(cfg, "ab", kept).status == "OK"


@pytest.mark.asyncio
async def test_peers_of_a_tls_cluster_are_asked_with_this_nodes_certificate(tmp_path, capsys) -> None:
    from tadlora.node.tls import init_ca, issue

    certs = tmp_path / "certs"
    init_ca(certs)
    for name in ("node-0", "node-1"):
        issue(certs, name)
    tls_peer = node_config(tmp_path, 1, 2, PeersOption(False, (), ()), min_peers=0, insecure=False, tls_dir=certs)
    async with Node(tls_peer) as node:
        port = node.address.rpartition(":")[2]
        args = doctor_args(tmp_path, peers=f"127.0.0.1:{port},dns:localhost:{port}", browse_seconds="0.2")
        argv = [a for a in args if a != "--insecure"]
        code, doc = await run_doctor_json([*argv, "--tls-dir", str(certs), "--node-id", "node-0"], capsys)
        _, plain = await run_doctor_json(args, capsys)  # the same peers in plaintext: they cannot answer
    assert code == 0 and by_name(doc)["tls"]["status"] == "OK"
    ours = ours_at(doc, port)
    assert len(ours) == 2 and all(c["status"] == "OK" and "match" in c["detail"] for c in ours), doc["checks"]
    down = [c for c in plain["checks"] if c["name"] == f"peer 127.0.0.1:{port}"]
    assert down and down[0]["status"] == "WARN" and "--tls-dir" in down[0]["fix"]


@pytest.mark.asyncio
@pytest.mark.parametrize("alias", FOREIGN_ALIASES)
async def test_the_mdns_browse_survives_a_pointer_to_a_name_that_is_not_our_service(
    quick_timing: None, alias: str
) -> None:
    """Anyone on the LAN may announce a PTR of our type to any name: the doctor must still report the others."""
    fine = f"fine-{uuid.uuid4().hex[:8]}"
    txt = {"id": fine, "cluster": "lab", "fp": "ab12", "proto": "1", "sec": "insecure"}
    async with raw_responder(raw_info(fine, txt)) as foreign, pointer_spammer(foreign, alias):
        found = await async_browse(["127.0.0.1"], DOCTOR_BROWSE_S)  # the doctor's: covers the 1 s multicast hold-off
    assert fine in {c.node_id for c in found.candidates}
    assert (alias, f"not an instance of {SERVICE_TYPE}") in found.ignored  # and says what it passed over


@pytest.mark.asyncio
async def test_a_service_no_node_would_take_is_reported_with_the_reason_not_hidden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quick_timing: None
) -> None:
    """A node of another tadlora version (here: a TXT proto that is no number) is passed over by every node, with
    one log line on each: the doctor, where a user looks first, must name it and say why, not just "no peers"."""
    odd = f"odd-{uuid.uuid4().hex[:8]}"
    txt = {"id": odd, "cluster": cluster_name(tmp_path), "fp": "ab12", "proto": "v2", "sec": "insecure"}
    async with raw_responder(raw_info(odd, txt)):
        code, doc = await run_doctor_json(doctor_args(tmp_path), capsys)
    service = by_name(doc)[f"service {f'{odd}.{SERVICE_TYPE}'!r}"]
    assert code == 0 and service["status"] == "WARN", service  # this node itself can run
    assert "proto='v2' is not a non-negative integer" in service["detail"]
    assert "same tadlora version" in service["fix"]
    alone = by_name(doc)["peers (mdns)"]
    assert alone["status"] == "WARN" and "only services that cannot be peers" in alone["detail"], alone


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["localhost", "[::1]"])
async def test_a_listen_host_that_mdns_cannot_announce_fails_as_the_node_would(tmp_path: Path, host: str) -> None:
    """With --peers auto and no --advertise-address the node announces its --listen host, which must then be an
    IPv4 address: the node refuses to start on a host name or an IPv6 address, so the doctor must say FAIL."""
    cfg = node_config(tmp_path, 0, 1, parse_peers_option("auto"), min_peers=0, listen=f"{host}:0")
    with pytest.raises(ValueError, match=r"--listen .* announces the --listen host"):
        async with Node(cfg):
            pass
    listen = check_listen(cfg)
    assert listen.status == "FAIL" and host in listen.detail and "--advertise-address" in listen.fix, listen
    assert check_listen(dataclasses.replace(cfg, advertise_address="127.0.0.1")).status == "OK"
    assert check_listen(dataclasses.replace(cfg, peers=NO_PEERS)).status == "OK"


@pytest.mark.netns
def test_a_loopback_listen_announced_on_a_network_interface_warns(testbeds: Callable[[int], Testbed]) -> None:
    """`--peers auto --mdns-interface eth0` with the default --listen 127.0.0.1:7070 tells the other hosts
    127.0.0.1:7070, which each of them dials on itself. Checked in a namespace of our own (veth1, 10.77.0.1)."""
    bed = testbeds(1)
    [host] = bed.hosts
    code = textwrap.dedent(
        f"""\
        import dataclasses, pathlib
        from tadlora.node.config import NodeConfig
        from tadlora.node.hostcheck import check_listen
        cfg = NodeConfig(pathlib.Path("unused"), insecure=True, listen="127.0.0.1:0", mdns_interface="{host.interface}")
        print(check_listen(cfg))
        print(check_listen(dataclasses.replace(cfg, listen="{host.address}:0")))
        print(check_listen(dataclasses.replace(cfg, mdns_interface="lo")))
        """
    )
    result = bed.run(host, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    loopback_on_veth, own_address, loopback_on_lo = result.stdout.splitlines()
    assert "status='WARN'" in loopback_on_veth and "127.0.0.1" in loopback_on_veth, loopback_on_veth
    assert "--listen" in loopback_on_veth and "--advertise-address" in loopback_on_veth, loopback_on_veth
    assert "status='OK'" in own_address, own_address
    assert "status='OK'" in loopback_on_lo, loopback_on_lo


MDNS_PEER_SCRIPT = textwrap.dedent(
    """\
    import asyncio, pathlib, sys
    from tadlora.node.config import NodeConfig
    from tadlora.node.discovery import Advertisement, MdnsDiscovery
    from tadlora.node.hostcheck import check_mdns_interface

    me, other, address, interface = sys.argv[1:]

    async def main() -> None:
        advert = Advertisement(me, 7070, "lab", "ab12", 1, False, advertise_address=address)
        async with MdnsDiscovery(advert, [address]) as mdns:
            seen = await mdns.async_wait_for(lambda c: other in c, 20.0)
            print("found", seen[other].address, flush=True)
            await asyncio.sleep(60.0)  # keep answering until the test is done with us

    print(check_mdns_interface(NodeConfig(pathlib.Path("unused"), insecure=True, mdns_interface=interface))[0])
    asyncio.run(main())
    """
)


@pytest.mark.netns
def test_an_interface_without_the_multicast_flag_or_route_is_a_warning_since_mdns_still_runs_there(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    """The node gives zeroconf its interface's address, so the kernel needs neither IFF_MULTICAST nor a route for
    224.0.0.0/4 to send and receive mDNS there: the doctor cannot tell, and must not FAIL a host that works."""
    bed = testbeds(2)
    script = tmp_path / "mdns_peer.py"
    script.write_text(MDNS_PEER_SCRIPT)
    for host in bed.hosts:
        assert bed.run(host, "ip", "link", "set", host.interface, "multicast", "off").returncode == 0
        assert bed.run(host, "ip", "route", "del", "224.0.0.0/4").returncode == 0
    h1, h2 = bed.hosts
    runs = [
        subprocess.Popen(
            h.command(sys.executable, str(script), f"n{h.index}", f"n{o.index}", h.address, h.interface),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h, o in ((h1, h2), (h2, h1))
    ]
    try:
        assert runs[0].stdout is not None
        check = runs[0].stdout.readline()
        found = runs[0].stdout.readline()  # ends when the script prints or fails (its wait is bounded)
    finally:
        for run in runs:
            run.kill()
            run.communicate()
    assert found == f"found {h2.address}:7070\n", (found, runs[0].stderr)
    assert "status='WARN'" in check and "no MULTICAST flag" in check and "fix=''" not in check, check


@pytest.mark.netns
def test_an_interface_that_is_down_fails_and_one_without_a_link_warns(
    testbeds: Callable[[int], Testbed], tmp_path: Path
) -> None:
    """An interface set down keeps its address, but zeroconf's sends there fail (Network is unreachable); one
    that is up without a link (a cable unplugged, the far end of a veth down) drops them unseen. Neither is
    "multicast capable"."""
    bed = testbeds(1)
    [host] = bed.hosts
    code = textwrap.dedent(
        f"""\
        import pathlib
        from tadlora.node.config import NodeConfig
        from tadlora.node.hostcheck import check_mdns_interface
        cfg = NodeConfig(pathlib.Path("unused"), insecure=True, mdns_interface="{host.interface}")
        print(check_mdns_interface(cfg)[0])
        """
    )

    def check() -> str:
        result = bed.run(host, sys.executable, "-c", code)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "status='OK'" in check()
    bed.cut(host)  # the bridge's end of the veth goes down: no carrier here
    no_link = check()
    assert "status='WARN'" in no_link and "no link" in no_link, no_link
    assert bed.run(host, "ip", "link", "set", host.interface, "down").returncode == 0
    down = check()
    assert "status='FAIL'" in down and "is down" in down and f"ip link set {host.interface} up" in down, down
    # The whole doctor there: the FAIL says it, and no browse of that interface adds "no node answered" to it.
    doctor = textwrap.dedent(
        f"""        import asyncio, pathlib
        from tadlora.node.config import NodeConfig
        from tadlora.node.doctor import async_doctor
        from tadlora.node.peerspec import parse_peers_option
        cfg = NodeConfig(pathlib.Path("{tmp_path / "out"}"), insecure=True, model="tiny", device="cpu",
                         peers=parse_peers_option("auto"), mdns_interface="{host.interface}")
        for c in asyncio.run(async_doctor(cfg, browse_seconds=1.0)):
            print(c.name, c.status)
        """
    )
    result = bed.run(host, sys.executable, "-c", doctor, timeout=120.0)
    assert result.returncode == 0, result.stderr
    checks = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert checks["mdns"] == "FAIL" and "peers (mdns)" not in checks, checks


def test_an_out_that_is_a_dangling_symbolic_link_fails_since_the_node_cannot_create_it(tmp_path) -> None:
    """`mkdir(parents=True, exist_ok=True)`, as the node makes --out, raises FileExistsError on a symbolic link to
    nothing (a volume not mounted), in --out or above it."""
    from tadlora.node.hostcheck import check_out

    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()))
    (tmp_path / "link").symlink_to(tmp_path / "not-mounted")
    for out in (tmp_path / "link", tmp_path / "link" / "run"):
        check = check_out(dataclasses.replace(cfg, out=out), None)
        assert check.status == "FAIL" and "not-mounted" in check.detail, check


def test_an_out_below_a_directory_this_user_cannot_search_fails_as_a_check_not_a_traceback(tmp_path: Path) -> None:
    """`--out /var/lib/tadlora` checked by an administrator while the node's user owns the directory above it
    (systemd's DynamicUser: /var/lib/private is mode 700): `Path.exists` raises PermissionError there, and the whole
    doctor ended in that traceback with no report. The node's mkdir fails there too: a FAIL of the 'out' check.
    Root searches every directory, so as root the child runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root's right to search any directory")
        os.chown(locked, 65534, 65534)  # nobody's, mode 700: root without the DAC capabilities may not search it
        locked.chmod(0o700)
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    else:
        locked.chmod(0o000)
        prefix = []
    out = locked / "out"
    code = (
        "import pathlib\n"
        "from tadlora.node.config import NodeConfig\n"
        "from tadlora.node.hostcheck import check_out\n"
        f"print(check_out(NodeConfig(pathlib.Path({str(out)!r}), insecure=True), None))\n"
    )
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o700)  # for pytest's clean-up of tmp_path
    assert result.returncode == 0, result.stderr
    assert "status='FAIL'" in result.stdout and "Permission denied" in result.stdout, result.stdout
    assert "the user the node runs as" in result.stdout, result.stdout


@pytest.mark.asyncio
async def test_this_nodes_own_address_in_a_shared_peer_list_is_skipped_as_the_node_skips_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One --peers list for every host (or a dns: name that resolves to every pod) holds each node's own address,
    which the node leaves out (`Node._candidates`): the doctor asked it, and WARNed that it "does not answer"."""
    port, other = free_port(), free_port()
    peers = f"127.0.0.1:{port},127.0.0.1:{other}"
    argv = doctor_args(tmp_path, peers=peers, listen=f"127.0.0.1:{port}", browse_seconds="0")
    code, doc = await run_doctor_json(argv, capsys)
    checks = by_name(doc)
    assert code == 0
    own = checks[f"peer 127.0.0.1:{port}"]
    assert own["status"] == "OK" and "own address" in own["detail"], own
    assert checks[f"peer 127.0.0.1:{other}"]["status"] == "WARN"  # any other peer that is down is still asked


@pytest.mark.asyncio
async def test_the_doctors_own_address_is_the_one_the_node_gives(tmp_path: Path) -> None:
    port = free_port()
    static = PeersOption(auto=False, static=(f"127.0.0.1:{port}",), dns=())
    cfg = node_config(tmp_path, 0, 1, static, listen=f"127.0.0.1:{port}", min_peers=0)
    async with Node(cfg) as node:
        assert own_address(cfg, []) == node.address
    # A wildcard --listen gives the first mDNS interface address, unless --advertise-address names one.
    wildcard = dataclasses.replace(cfg, listen=f"0.0.0.0:{port}")
    assert own_address(wildcard, ["10.1.2.3", "10.1.2.4"]) == f"10.1.2.3:{port}"
    assert own_address(dataclasses.replace(wildcard, advertise_address="10.9.9.9"), ["10.1.2.3"]) == f"10.9.9.9:{port}"
    assert own_address(dataclasses.replace(cfg, listen="127.0.0.1:0"), []) is None  # known once the node binds it


@pytest.mark.netns
def test_a_host_with_ipv6_beside_loopback_is_not_told_that_no_machine_can_reach_it(
    testbeds: Callable[[int], Testbed],
) -> None:
    """--listen and static or dns: peers take IPv6 (only mDNS is IPv4 only): a host whose only addresses beyond
    loopback are IPv6 is reachable, and the 'interfaces' WARN used to say "nodes on other machines cannot reach
    this one". Checked in a namespace of our own, whose veth1 has its IPv4 address replaced by 2001:db8::1."""
    bed = testbeds(1)
    [host] = bed.hosts
    assert bed.run(host, "ip", "-4", "addr", "flush", "dev", host.interface).returncode == 0
    added = bed.run(host, "ip", "addr", "add", "2001:db8::1/64", "dev", host.interface, "nodad")
    assert added.returncode == 0, added.stderr
    code = "from tadlora.node.hostcheck import check_interfaces\nprint(check_interfaces())\n"
    result = bed.run(host, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    check = result.stdout
    assert "status='WARN'" in check and f"{host.interface} 2001:db8::1" in check, check
    assert "cannot reach this one" not in check and "--listen [ADDRESS]:PORT" in check, check
    assert "fe80:" not in check, check  # link-local: no peer can be given it
