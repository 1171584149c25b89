"""`tadlora-node doctor`: check that this machine can run a node with the given flags, and say how to fix what
cannot. It takes the same flags (and TADLORA_ variables) as a run, changes nothing, and advertises nothing:

  tadlora-node doctor --peers auto --mdns-interface eth0 --listen 0.0.0.0:7070
  tadlora-node doctor --json --peers dns:tadlora-headless.default.svc.cluster.local:7070

Checks: network interfaces; multicast on the --mdns-interface; that the --listen port can be bound; GPU and
driver; --out; that --dataset and --model load (and the model fingerprint); and every peer it can find (mDNS
browse, static and dns: peers), with whether its cluster, fingerprint and schedule match (the static and dns: peers
it asks say their schedule, and an mDNS advert carries it unless it comes from a node older than that). Each check
prints OK, WARN or FAIL and, unless OK, how to fix it. Exit status 0 when nothing FAILs, 1 otherwise, 2 for bad
flags.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import sys
from typing import TYPE_CHECKING, Any

from tadlora.cliutil import printable
from tadlora.node.config import NodeConfig
from tadlora.node.discovery import (
    QUESTION_TYPE,
    RESOLVE_TIMEOUT_MS,
    SERVICE_TYPE,
    PeerCandidate,
    async_resolve_candidate,
)
from tadlora.node.dnspeers import host_port, resolve_addresses, split_name
from tadlora.node.hostcheck import (
    Check,
    check_device,
    check_interfaces,
    check_listen,
    check_mdns_interface,
    check_out,
    check_precision,
    check_training,
)
from tadlora.node.identity import kept_node_id
from tadlora.node.netif import ipv4_networks
from tadlora.node.peer_checks import SAME_MODEL_FIX, SAME_SCHEDULE_FIX, fingerprint_differences, schedules_differ

if TYPE_CHECKING:
    import grpc

__all__ = [
    "BROWSE_S",
    "Browsed",
    "Check",
    "async_doctor",
    "build_doctor_parser",
    "compare_peer",
    "doctor_main",
    "report",
]

BROWSE_S = 3.0  # s of mDNS browsing; peers answer a new browser in ~0.1 s, one still announcing itself in ~1.2 s
STATUS_TIMEOUT_S = 5.0  # s for one peer's Status call
CERT_EXPIRY_WARN_DAYS = 30  # days before a node certificate expires that the tls check WARNs (time to reissue)
_DNS_FIX = "check the name (in Kubernetes: the headless Service and the namespace) and that the peers run"


# ---------------------------------------------------------------------------------------------- peers


@dataclasses.dataclass(frozen=True)
class Browsed:
    """What an mDNS browse saw: the candidates, and the services a node would pass over, with the reason."""

    candidates: list[PeerCandidate]
    ignored: list[tuple[str, str]]  # (service name, why it cannot be a peer: a foreign name, a malformed TXT)
    unresolved: list[str]  # service names that did not answer a resolution within RESOLVE_TIMEOUT_MS


async def async_browse(addresses: list[str], seconds: float) -> Browsed:
    """Browse mDNS on ``addresses`` for ``seconds`` without advertising, then resolve what was seen.
    OSError if zeroconf cannot use the interface."""
    from zeroconf import IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    names: set[str] = set()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            names.discard(name)
        else:
            names.add(name)

    aiozc = AsyncZeroconf(interfaces=list(addresses), ip_version=IPVersion.V4Only)
    try:
        browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change], question_type=QUESTION_TYPE)
        try:
            await asyncio.sleep(seconds)
        finally:
            await browser.async_cancel()
        seen = sorted(names)
        reachable = ipv4_networks(list(addresses))
        found = await asyncio.gather(
            *(async_resolve_candidate(aiozc.zeroconf, SERVICE_TYPE, n, reachable) for n in seen)
        )
    finally:
        await aiozc.async_close()
    return Browsed(
        candidates=[c for c in found if isinstance(c, PeerCandidate)],
        ignored=[(name, c) for name, c in zip(seen, found, strict=True) if isinstance(c, str)],
        unresolved=[name for name, c in zip(seen, found, strict=True) if c is None],
    )


def compare_peer(
    cfg: NodeConfig,
    fingerprint: str | None,
    who: str,
    cluster: str,
    peer_fingerprint: str,
    protocol: int,
    secure: bool | None = None,
    *,
    same_id: bool = False,
    schedule: str = "",
    fingerprint_parts: str = "",
    our_parts: str = "",
    release: str = "",
) -> Check:
    """Would this node mix with that peer? OK if so (or it is another cluster's), WARN with the fix if not.
    ``secure``: whether the peer says it runs with TLS (its mDNS record), None if unknown. ``same_id``: the peer
    runs under the node id this node would take, a FAIL within one cluster. ``schedule`` and
    ``fingerprint_parts``: the peer's (`NodeConfig.schedule`, `tadlora.adapter.fingerprint_parts`, from its status
    or mDNS record), "" if unknown (a node too old to say); ``our_parts``: this node's, to name the parts of
    another fingerprint that differ; ``release``: the tadlora release the peer runs, "" if unknown (said where the
    protocols differ: the release to upgrade to)."""
    from tadlora import __version__
    from tadlora.node.peer_checks import SAME_PROTOCOL_FIX
    from tadlora.node.protocol_types import PROTOCOL_VERSION

    name = f"peer {who}"
    if cluster != cfg.cluster:
        return Check(name, "OK", f"cluster {cluster!r}, not ours ({cfg.cluster!r}): ignored by this node")
    if same_id:
        # Each would ignore the other's advert as a claim on its own id, and every other node keeps one of the two.
        return Check(
            name,
            "FAIL",
            "runs under this node's id in this cluster: two nodes under one id never mix with each other, and "
            "their peers take one for the other",
            "give this node another --node-id (ids must be unique within a cluster), or another --out if the id "
            "was kept from a run in it",
        )
    if protocol != PROTOCOL_VERSION:
        theirs = f" (tadlora {release})" if release else ""
        return Check(
            name,
            "WARN",
            f"protocol {protocol}{theirs}, ours {PROTOCOL_VERSION} (tadlora {__version__})",
            SAME_PROTOCOL_FIX,
        )
    if fingerprint is None:
        return Check(
            name,
            "WARN",
            f"cluster matches; fingerprint {peer_fingerprint} not compared (model failed)",
            "fix the model check first",
        )
    if peer_fingerprint != fingerprint:
        also = schedules_differ(schedule, ours := cfg.schedule())  # said with it: else one restart finds each
        parts = fingerprint_differences(fingerprint_parts, our_parts, "its", "ours")
        return Check(
            name,
            "WARN",
            f"cluster {cluster!r} matches, but fingerprint {peer_fingerprint} differs from ours ({fingerprint})"
            + (f" in {parts}" if parts else "")
            + (f", and it runs {schedule!r} and this node {ours!r}" if also else "")
            + ": the nodes will not mix",
            SAME_MODEL_FIX + (f"; {SAME_SCHEDULE_FIX}" if also else ""),
        )
    if schedules_differ(schedule, ours := cfg.schedule()):
        return Check(
            name,
            "WARN",
            f"cluster and fingerprint match, but it runs {schedule!r} and this node {ours!r}: the nodes will not mix",
            SAME_SCHEDULE_FIX,
        )
    if secure is not None and secure == cfg.insecure:  # the node passes such an advert over (PeerManager)
        theirs, ours = ("with", "without (--insecure)") if secure else ("without (--insecure)", "with")
        return Check(
            name,
            "WARN",
            f"cluster and fingerprint match, but it runs {theirs} TLS and this node {ours}: the nodes will not mix",
            "run every node of a cluster with TLS (--tls-dir and --node-id), or every one with --insecure",
        )
    return Check(name, "OK", f"cluster {cluster!r} and fingerprint {fingerprint} match")


def peer_credentials(cfg: NodeConfig) -> grpc.ChannelCredentials | None:
    """How the node would dial its peers: mutual TLS with its certificate, or plaintext (None) with --insecure.
    OSError or ValueError if the certificates cannot be loaded (the 'tls' check says why)."""
    if cfg.insecure or cfg.tls_dir is None or cfg.node_id is None:
        return None
    from tadlora.node.tls import TlsMaterial

    return TlsMaterial.from_dir(cfg.tls_dir, cfg.node_id).channel_credentials()


async def async_check_address(
    cfg: NodeConfig,
    fingerprint: str | None,
    address: str,
    via: str,
    credentials: grpc.ChannelCredentials | None = None,
    node_id: str | None = None,
    our_parts: str = "",
) -> Check:
    """Ask the node at ``address`` for its status, over TLS with ``credentials`` (any node of the cluster CA may
    answer) or else in plaintext, and compare it with ours (``node_id``: the id this node would run under, None for
    one it will draw; ``our_parts``: this node's `tadlora.adapter.fingerprint_parts`, "" if the model failed)."""
    from tadlora.node.grpc_transport import PeerClient
    from tadlora.node.protocol_types import PeerUnavailable, ReplyRefused
    from tadlora.node.wire import ExchangeRefused

    try:
        async with PeerClient(address, credentials=credentials) as client:
            st = await client.status(STATUS_TIMEOUT_S)
    except ReplyRefused as exc:  # it answers: but not as a node would
        return Check(
            f"peer {address}",
            "WARN",
            f"({via}) answers, but says of itself what no tadlora node would: {exc}",
            f"find out what runs at {address}: the node would refuse it the same way",
        )
    except (PeerUnavailable, ExchangeRefused) as exc:
        if credentials is None:
            tls_fix = "; if the peers run with TLS, give this node's --tls-dir and --node-id"
        else:
            tls_fix = f"; its certificate must come from the same cluster CA ({cfg.tls_dir}/ca.crt)"
        return Check(
            f"peer {address}",
            "WARN",
            f"({via}) does not answer: {exc}",
            f"start it, or check the address and that TCP port {address.rpartition(':')[2]} is open between the "
            f"hosts{tls_fix}",
        )
    check = compare_peer(
        cfg,
        fingerprint,
        f"{st.node.node_id} at {address}",
        st.node.cluster,
        st.node.fingerprint,
        st.node.protocol_version,
        same_id=st.node.node_id == node_id,
        schedule=st.node.schedule,
        fingerprint_parts=st.node.fingerprint_parts,
        our_parts=our_parts,
        release=st.node.release or st.release,  # the second from a node between the two fields
    )
    return dataclasses.replace(check, detail=f"({via}) {check.detail}")


def own_address(cfg: NodeConfig, interfaces: list[str]) -> str | None:
    """The IP:PORT the node would give as its own (`Node.address`: `NodeConfig.advertised_host` and the --listen
    port), with ``interfaces`` its mDNS interface addresses ([] without mDNS). None for --listen port 0, known only
    once the node binds it."""
    port = int(cfg.listen.rpartition(":")[2])
    return None if port == 0 else f"{cfg.advertised_host(interfaces)}:{port}"


async def async_check_peers(
    cfg: NodeConfig,
    fingerprint: str | None,
    browsed: Browsed | None,
    mdns_where: str,
    own: str | None = None,
    node_id: str | None = None,
    our_parts: str = "",
) -> list[Check]:
    """One check per peer found by mDNS (and per service that cannot be one), and per static or dns: address;
    ``own`` (this node's `own_address`) is not asked but said to be skipped, as the node skips it. ``node_id``: the
    id this node would run under (None for one it will draw): a peer of this cluster under it is a FAIL.
    ``our_parts``: this node's `tadlora.adapter.fingerprint_parts`, to name the parts of another fingerprint that
    differ."""
    checks = []
    for c in browsed.candidates if browsed is not None else []:
        check = compare_peer(
            cfg, fingerprint, f"{c.node_id} at {c.address}", c.cluster, c.fingerprint, c.protocol_version, c.secure,
            same_id=c.node_id == node_id and c.address != own,  # at our own address: this node, already running
            schedule=c.schedule, fingerprint_parts=c.fingerprint_parts, our_parts=our_parts, release=c.release,
        )  # fmt: skip
        checks.append(dataclasses.replace(check, detail=f"(mdns) {check.detail}"))
    for name, why in browsed.ignored if browsed is not None else []:
        checks.append(
            Check(
                f"service {name!r}",  # quoted: the name is anyone's to choose
                "WARN",
                f"(mdns) announced as {SERVICE_TYPE} but ignored by every node: {why}",
                "if it is a tadlora node, run the same tadlora version as this one; otherwise stop it announcing "
                f"{SERVICE_TYPE}",
            )
        )
    for name in browsed.unresolved if browsed is not None else []:
        checks.append(
            Check(
                f"service {name!r}",
                "WARN",
                f"(mdns) announced, but its address and TXT records did not come within {RESOLVE_TIMEOUT_MS} ms",
                "it may be shutting down; if it stays, check that multicast from its host reaches this one both "
                "ways (UDP 5353)",
            )
        )
    # Nodes of other clusters are listed above as OK (this node ignores them), so they are no peers either: a LAN
    # or a shared 127.0.0.1 with other clusters' nodes on it must still say that none of this one answered.
    if browsed is not None and not any(c.cluster == cfg.cluster for c in browsed.candidates):
        seen = ["services that cannot be peers"] if browsed.ignored or browsed.unresolved else []
        seen += ["nodes of other clusters"] if browsed.candidates else []
        checks.append(
            Check(
                "peers (mdns)",
                "WARN",
                f"no tadlora node of cluster {cfg.cluster!r} answered on {mdns_where}"
                + (f" (only {' and '.join(seen)}, above)" if seen else ""),
                "start the other nodes; their --mdns-interface must be on this network, and UDP 5353 "
                "multicast must pass between the hosts (else use --peers HOST:PORT or dns:NAME)",
            )
        )
    targets = [(a, "static") for a in cfg.peers.static]
    for name in cfg.peers.dns:
        host, port = split_name(name)
        try:
            async with asyncio.timeout(STATUS_TIMEOUT_S):
                addresses = list(dict.fromkeys(host_port(ip, port) for ip in await resolve_addresses(host, port)))
        except (OSError, TimeoutError) as exc:
            checks.append(Check(f"peers (dns:{name})", "WARN", f"cannot resolve {host}: {exc}", _DNS_FIX))
            continue
        targets += [(a, f"dns:{name}") for a in addresses]
    # One --peers list shared by every host, or a name that resolves to every pod, holds this node's own address:
    # the node leaves it out (`Node._candidates`), and asked now it would only "not answer", as no node runs yet.
    checks += [
        Check(f"peer {a}", "OK", f"({via}) this node's own address: the node leaves it out")
        for a, via in targets
        if a == own
    ]
    targets = [(a, via) for a, via in targets if a != own]
    if not targets:
        return checks
    try:
        credentials = await asyncio.to_thread(peer_credentials, cfg)
    except (OSError, ValueError) as exc:
        # Plaintext would only make every TLS peer look down: say why they were not asked instead.
        checks.append(Check("peers", "WARN", f"not asked: cannot load this node's certificate: {exc}", _TLS_FIX))
        return checks
    checks += await asyncio.gather(
        *(async_check_address(cfg, fingerprint, a, via, credentials, node_id, our_parts) for a, via in targets)
    )
    return checks


# ------------------------------------------------------------------------------------------------ main


def check_tls(cfg: NodeConfig) -> Check:
    """Certificates present, issued to this node id by the cluster CA, with their key (WARN if others may read
    it), and not expiring within CERT_EXPIRY_WARN_DAYS (WARN); or --insecure said out loud."""
    if cfg.insecure:
        return Check("tls", "WARN", "--insecure: plaintext, and anyone who reaches the port may join", _TLS_FIX)
    if cfg.tls_dir is None or cfg.node_id is None:
        return _NO_CERTIFICATES
    from tadlora.node.tls import TlsFilesMissing, TlsMaterial

    try:
        material = TlsMaterial.from_dir(cfg.tls_dir, cfg.node_id)
    except TlsFilesMissing as exc:  # its fix knows what is there: beside the cluster's ca.crt, not `certs init`
        return Check("tls", "FAIL", str(exc), exc.fix)
    except (OSError, ValueError) as exc:
        return Check("tls", "FAIL", str(exc), _TLS_FIX)
    path = cfg.tls_dir / f"{cfg.node_id}.crt"
    key = cfg.tls_dir / f"{cfg.node_id}.key"
    warnings: list[tuple[str, str]] = []  # (what, its fix): each is said, neither hides the other
    info = key.stat()
    mode = info.st_mode & 0o777
    if mode & 0o037:
        # `certs issue` writes it 0600; a copy (scp, a volume, an archive) may not keep that, and then any user
        # of this host can take the node's identity. Its group may read it: the systemd unit's dynamic user reads
        # it so, through a group of its own (deploy/systemd: 0640, group tadlora-certs).
        def can(bits: int) -> str:
            return " or ".join(
                verb for mask, verb in ((0o444, "read"), (0o222, "write"), (0o111, "run")) if bits & mask
            )

        said = [f"{who} can {can(mode & bits)} it" for bits, who in
                ((0o007, "users other than its owner and group"), (0o030, "its group")) if mode & bits]  # fmt: skip
        keep = "640" if mode & 0o040 else "600"
        warnings.append((f"{key}: {'; '.join(said)} (mode {mode:o})", f"chmod {keep} {key}"))
    expires = material.certificate().not_valid_after_utc
    left = expires - dt.datetime.now(dt.UTC)
    if left < dt.timedelta(days=CERT_EXPIRY_WARN_DAYS):
        warnings.append((
            f"{path} expires on {expires:%Y-%m-%d %H:%M} UTC, in {left.days} days; then this node can serve no peer",
            f"tadlora-node certs issue {cfg.node_id} --dir {cfg.tls_dir} --force (needs ca.key), then restart",
        ))  # fmt: skip
    if warnings:
        return Check("tls", "WARN", "; ".join(w for w, _ in warnings), "; ".join(f for _, f in warnings))
    # Group read is not warned of (the systemd recipe's), but said: a key readable by a group others share is the
    # operator's to judge.
    shared = f"; its key readable by the group {_group_name(info.st_gid)}" if mode & 0o040 else ""
    return Check("tls", "OK", f"mutual TLS with {path} (valid until {expires:%Y-%m-%d}){shared}")


def _group_name(gid: int) -> str:
    """The name of group ``gid`` on this host, or the number where it has none (a container's volume)."""
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_TLS_FIX = (
    "tadlora-node certs init DIR (once per cluster), tadlora-node certs issue NODE_ID --dir DIR, "
    "then --tls-dir DIR --node-id NODE_ID"
)
_NO_CERTIFICATES = Check("tls", "FAIL", "no certificates (--tls-dir DIR --node-id NAME)", _TLS_FIX)


async def async_doctor(cfg: NodeConfig, browse_seconds: float = BROWSE_S) -> list[Check]:
    """Run every check; mDNS browsing overlaps with loading the model."""
    checks: list[Check] = await asyncio.to_thread(lambda: [check_interfaces(), check_tls(cfg)])
    mdns, addresses = await asyncio.to_thread(check_mdns_interface, cfg)
    checks.append(mdns)
    # Not on an interface found unusable (down): the browse would only add a "no node answered" to its FAIL.
    usable = addresses if mdns.status != "FAIL" else []
    browse = asyncio.ensure_future(async_browse(usable, browse_seconds)) if usable else None
    try:
        checks.append(await asyncio.to_thread(check_listen, cfg))
        checks.append(await asyncio.to_thread(check_device, cfg))
        checks.append(await asyncio.to_thread(check_precision, cfg))
        training, fingerprint, our_parts = await asyncio.to_thread(check_training, cfg)
        checks.append(await asyncio.to_thread(check_out, cfg, fingerprint, our_parts))
        checks += training
        browsed: Browsed | None = None
        if browse is not None:
            try:
                browsed = await browse
            except OSError as exc:
                checks.append(
                    Check(
                        "peers (mdns)",
                        "FAIL",
                        f"mDNS cannot start on {', '.join(addresses)}: {exc}",
                        "see the 'mdns' check; or use --peers HOST:PORT or dns:NAME",
                    )
                )
    finally:
        if browse is not None and not browse.done():
            browse.cancel()
            await asyncio.gather(browse, return_exceptions=True)
    # The id the node would run under: given, or kept in --out from an earlier run (else it draws a new one).
    node_id = cfg.node_id or await asyncio.to_thread(kept_node_id, cfg.out)
    own = own_address(cfg, addresses)
    checks += await async_check_peers(cfg, fingerprint, browsed, ", ".join(addresses), own, node_id, our_parts)
    return checks


def report(checks: list[Check], as_json: bool) -> str:
    """The checks as text (one line each, fixes indented below) or as one JSON object."""
    counts = {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL")}
    if as_json:
        doc: dict[str, Any] = {
            "ok": counts["FAIL"] == 0,
            "counts": counts,
            "checks": [dataclasses.asdict(c) for c in checks],
        }
        return json.dumps(doc, indent=2) + "\n"
    # The peer checks quote what other nodes and mDNS adverts said, which anyone on the LAN can send: `printable`.
    width = max(len(printable(c.name)) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {printable(c.name):<{width}}  {printable(c.detail)}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {printable(c.fix)}")
    lines.append(f"{counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return "\n".join(lines) + "\n"


def build_doctor_parser() -> argparse.ArgumentParser:
    """The run flags plus the doctor's own."""
    from tadlora.node.cli import build_run_parser

    def doctor_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("doctor")
        g.add_argument(
            "--json", action=argparse.BooleanOptionalAction, default=False, help="print the checks as one JSON object"
        )
        g.add_argument("--browse-seconds", type=float, default=BROWSE_S, help="seconds to browse mDNS for peers")

    p = build_run_parser(doctor_flags)
    p.prog, p.description = "tadlora-node doctor", __doc__
    return p


def doctor_main(argv: list[str]) -> int:
    """`tadlora-node doctor [run flags] [--json]`: 0 if no check FAILs, 1 if one does, 2 for bad flags."""
    from tadlora.cliutil import from_environment
    from tadlora.node.cli import config_from_args, setup_logging

    parser = build_doctor_parser()
    a = parser.parse_args(argv)
    setup_logging(a.log_format, "WARNING")  # the checks are the output; a node's INFO lines would be noise
    # No certificates yet is something to diagnose, not a reason to refuse: check the rest as if --insecure and
    # report TLS as a FAIL with its fix.
    no_tls = a.tls_dir is None and not a.insecure
    a.insecure = a.insecure or no_tls
    try:
        if not 0 <= a.browse_seconds < math.inf:  # NaN too
            raise ValueError(f"--browse-seconds must be a number of seconds >= 0, got {a.browse_seconds}")
        cfg = config_from_args(a)
    except ValueError as exc:
        sys.stderr.write(f"tadlora-node doctor: error: {exc}{from_environment(parser, a, str(exc))}\n")
        return 2
    checks = asyncio.run(async_doctor(cfg, a.browse_seconds))
    if no_tls:
        checks = [_NO_CERTIFICATES if c.name == "tls" else c for c in checks]
    sys.stdout.write(report(checks, a.json))
    return 0 if all(c.status != "FAIL" for c in checks) else 1
