"""`tadlora-node status` and `tadlora-node certs`: the subcommands that never import torch.

A container's HEALTHCHECK runs `status` every 30 s; importing torch would cost it seconds each time (3-4 s on
2 cores, more on a busy edge board). So this module, and everything it imports, stays free of torch, peft and
transformers; tests/test_node_cli.py checks it in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tadlora.cliutil import apply_env_defaults, command_line_only, from_environment, path_arg, printable
from tadlora.node.identity import kept_node_id
from tadlora.node.peerspec import StaticPeers, address_problem

if TYPE_CHECKING:
    import grpc


async def query_status(
    address: str, timeout: float, *, credentials: grpc.ChannelCredentials | None = None, peer_id: str | None = None
) -> dict[str, Any]:
    """A node's status as a JSON-able dict; plaintext unless ``credentials`` are given, and then the node's
    certificate must name ``peer_id`` (None: any node of the cluster). PeerUnavailable if it does not answer."""
    from tadlora.node.grpc_transport import PeerClient

    async with PeerClient(address, credentials=credentials, server_name=peer_id) as client:
        st = await client.status(timeout)
    return {
        "node_id": st.node.node_id,
        "address": st.node.address,
        "cluster": st.node.cluster,
        "fingerprint": st.node.fingerprint,
        "fingerprint_parts": st.node.fingerprint_parts,
        "method": st.node.method,
        "schedule": st.node.schedule,
        "round": st.node.round,
        "state": st.state,
        "phase": st.phase,
        "rounds_completed": st.rounds_completed,
        "last_loss": _number(st.last_loss),
        "last_accuracy": _number(st.last_accuracy),
        "insecure": st.node.insecure,
        "uptime_seconds": _number(st.uptime_seconds, 1),
        "release": st.release or None,  # None: a node older than the field
        "neighbours": [
            {
                "id": n.node_id,
                "address": n.address,
                "degree": n.degree,
                "weight": _number(n.weight),
                "last_exchanged_round": n.last_round - 1 if n.last_round else None,
                "release": n.release or None,  # None: a node older than the field
            }
            for n in st.neighbors
        ],
        "candidates": [
            {
                "key": c.key,
                "address": c.address,
                "source": c.source,
                "failures": c.failures,
                "retry_in_seconds": _number(c.retry_in_seconds, 1),
                "reason": c.reason,
            }
            for c in st.candidates
        ],
        # A node lists at most 1,024 neighbours and 64 candidates; these say how many it has.
        "neighbours_total": st.neighbors_total,
        "candidates_total": st.candidates_total,
    }


WALK_LIMIT = 1000  # nodes `status --all` asks at most: a cluster has tens; a bound, should listings run away
WALK_CONCURRENCY = 32  # status calls in flight at once during a walk


async def walk_cluster(
    address: str, timeout: float, *, credentials: grpc.ChannelCredentials | None = None, peer_id: str | None = None
) -> dict[str, Any]:
    """The status of every node that the node at ``address`` reaches through neighbour lists: it is asked first
    (as `query_status`, which raises if it does not answer), then each neighbour it lists at that neighbour's
    address, then theirs, and so on. Returns ``{"nodes": [status, ...], "unreachable": [...], "complete": bool}``:
    the statuses by node id; each listed node that did not answer, with the address it was listed at, the nodes
    that list it and the error; ``complete`` is False when the walk stopped at `WALK_LIMIT` nodes, or a node has
    more neighbours than its reply lists (`MAX_DEGREE`).

    Under TLS each listed node's certificate must name the id its neighbours list it by; in plaintext the node
    that answers must say it is that one, so that an address taken over by another node is not read as it."""
    from tadlora.node.peer_checks import node_id_problem
    from tadlora.node.protocol_types import PeerUnavailable
    from tadlora.node.wire import ExchangeRefused

    first = await query_status(address, timeout, credentials=credentials, peer_id=peer_id)
    answered: dict[str, dict[str, Any]] = {first["node_id"]: first}
    failed: dict[str, dict[str, Any]] = {}
    gate = asyncio.Semaphore(WALK_CONCURRENCY)

    async def ask(node_id: str, at: str) -> dict[str, Any] | str:
        """Its status, or why there is none."""
        if (problem := node_id_problem(node_id)) is not None:  # its certificate could name no such id
            return f"listed under an id that is none: {problem}"
        if not at:  # a neighbour its peer lists without an address (one known only by its inbound calls)
            return "listed without an address"
        if (problem := address_problem(at)) is not None:  # a reply need not come from a node that checks them
            return f"listed at an address that is no HOST:PORT: {problem}"
        async with gate:
            try:
                doc = await query_status(
                    at, timeout, credentials=credentials, peer_id=None if credentials is None else node_id
                )
            except (PeerUnavailable, ExchangeRefused) as exc:
                return str(exc)
        if doc["node_id"] != node_id:
            return f"node {doc['node_id']!r} answers at {at}, not {node_id!r}"
        return doc

    frontier = [first]
    complete = True
    while frontier:
        listing: dict[str, tuple[str, list[str]]] = {}  # node id -> (its address, the nodes listing it)
        for doc in frontier:
            if doc["neighbours_total"] > len(doc["neighbours"]):
                complete = False  # the neighbours it did not list may lead to nodes that none lists
            for n in doc["neighbours"]:
                if n["id"] in answered:
                    continue
                if n["id"] in failed:
                    failed[n["id"]]["listed_by"] = sorted({*failed[n["id"]]["listed_by"], doc["node_id"]})
                    continue
                listing.setdefault(n["id"], (n["address"], []))[1].append(doc["node_id"])
        room = WALK_LIMIT - len(answered) - len(failed)
        if len(listing) > room:
            complete = False
            listing = dict(sorted(listing.items())[: max(room, 0)])
        ids = sorted(listing)
        replies = await asyncio.gather(*(ask(i, listing[i][0]) for i in ids))
        frontier = []
        for node_id, reply in zip(ids, replies, strict=True):
            at, listed_by = listing[node_id]
            if isinstance(reply, str):
                failed[node_id] = {"node_id": node_id, "address": at, "listed_by": sorted(set(listed_by)),
                                   "error": reply}  # fmt: skip
            else:
                answered[node_id] = reply
                frontier.append(reply)
    return {
        "nodes": [answered[i] for i in sorted(answered)],
        "unreachable": [failed[i] for i in sorted(failed)],
        "complete": complete,
    }


TABLE_CELL_CHARS = 64  # a cell past this is cut ("..."): an id is at most 63, an address rarely more


def _cell(value: Any, digits: int = 3) -> str:
    # What a table shows comes from the nodes' replies, not all of which need be honest: `printable`, and cut, so
    # that one long value does not pad every line of the table to its width.
    if value is None or value == "":  # not known (yet), or not said by an older node
        return "-"
    text = f"{value:.{digits}f}" if isinstance(value, float) else printable(str(value))
    return text if len(text) <= TABLE_CELL_CHARS else text[: TABLE_CELL_CHARS - 3] + "..."


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def status_table(nodes: list[dict[str, Any]], unreachable: list[dict[str, Any]]) -> str:
    """The statuses as a table for a terminal: one line per node (id, address, round, state, phase, neighbours,
    candidates that are no peer, last loss and accuracy, release, uptime), then one per node listed that did not
    answer, and a last line on what the rows have in common or not (the rounds' range, the releases)."""
    header = ("NODE", "ADDRESS", "ROUND", "STATE", "PHASE", "PEERS", "CANDIDATES", "LOSS", "ACCURACY", "RELEASE",
              "UPTIME")  # fmt: skip
    rows = [header]
    for d in nodes:
        rows.append((_cell(d["node_id"]), _cell(d["address"]), str(d["round"]), _cell(d["state"]), _cell(d["phase"]),
                     str(d["neighbours_total"]), str(d["candidates_total"]), _cell(d["last_loss"], 4),
                     _cell(d["last_accuracy"]), _cell(d["release"]), _cell(_uptime(d["uptime_seconds"]))))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for u in unreachable:
        listed_by = ", ".join(map(_cell, u["listed_by"]))
        lines.append(f"{_cell(u['node_id']).ljust(widths[0])}  {_cell(u['address']).ljust(widths[1])}  did not "
                     f"answer (listed by {listed_by}): {printable(u['error'])}")  # fmt: skip
    rounds = sorted({d["round"] for d in nodes})
    releases = collections.Counter(printable(d["release"] or "too old to say") for d in nodes)
    span = f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]}-{rounds[-1]}"
    said = ", ".join(f"{r} ({n})" for r, n in sorted(releases.items())) if len(releases) > 1 else next(iter(releases))
    missing = f", {len(unreachable)} did not" if unreachable else ""
    lines.append(f"{len(nodes)} node{'s' * (len(nodes) != 1)} answered{missing}; {span}; release {said}")
    return "\n".join(lines) + "\n"


def _number(value: float, digits: int | None = None) -> float | None:
    """A status number for JSON: None for NaN (not known yet, or not a number the node could have meant:
    `pb_mapping._status_from_pb`), which JSON has no spelling for."""
    if math.isnan(value):
        return None
    return value if digits is None else round(value, digits)


def build_status_parser() -> argparse.ArgumentParser:
    """Flags of `tadlora-node status`; the TLS ones read the same TADLORA_ variables as a run, so inside a node's
    container or unit `tadlora-node status 127.0.0.1:7070` connects the way the node serves."""
    p = argparse.ArgumentParser(
        prog="tadlora-node status",
        description="Print a running node's state as JSON; with --all, that of every node its neighbour lists lead "
        "to. Exit 0 when every node asked answered, 1 when one did not (what the others said is printed all the "
        "same), 2 for bad flags or TLS files.",
    )
    p.add_argument("address", help="HOST:PORT of the node")
    command_line_only(p.add_argument("--all", action="store_true",
                   help="walk the cluster: ask the node, then each neighbour it lists, then theirs...; prints "
                   '{"nodes": [...], "unreachable": [...], "complete": ...}, a node listed but not answering in '
                   f"unreachable (at most {WALK_LIMIT} nodes are asked). Under --tls-dir each neighbour's "
                   "certificate must name the id it is listed by (no TADLORA_ variable: a node's environment must not "
                   "make its health check ask the whole cluster)"))  # fmt: skip
    command_line_only(p.add_argument("--table", action="store_true",
                   help="a table for a terminal instead of JSON: one line per node (round, state, phase, peers, "
                   "candidates, loss, accuracy, release, uptime), then one on the rounds and releases"))  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--tls-dir", type=path_arg,
                   help="connect with mutual TLS: DIR/ca.crt and this node's DIR/NODE_ID.crt/.key as the client "
                   "certificate (default: plaintext)")  # fmt: skip
    p.add_argument("--node-id", help="whose certificate in --tls-dir to present (default: the id kept in --out)")
    p.add_argument("--peer-id", help="the node id the queried node's certificate must name (default: --node-id, "
                   "i.e. asking this node itself)")  # fmt: skip
    p.add_argument("--any-peer", action=argparse.BooleanOptionalAction, default=False,
                   help="accept any node certificate signed by DIR/ca.crt instead of --peer-id's: to ask a node "
                   "known only by its address (the JSON says which node answered)")  # fmt: skip
    p.add_argument("--out", type=path_arg, help="this node's --out, whose node.json gives --node-id if it is not set")
    p.add_argument(
        "--insecure", action=argparse.BooleanOptionalAction, default=False, help="plaintext even when --tls-dir is set"
    )
    apply_env_defaults(p)
    return p


def status_credentials(a: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """The channel credentials and the node id the answering certificate must name, from `status`'s flags;
    (None, None): plaintext; (credentials, None): any node of the cluster (--any-peer). ValueError, saying what
    to pass, if TLS is asked for and cannot be set up."""
    if a.any_peer and a.peer_id:
        raise ValueError("--any-peer accepts any node of the cluster, --peer-id one node: pass one of them")
    if not 0 < a.timeout < math.inf:  # NaN too: gRPC gives up at once, and the hint would blame the address
        raise ValueError(f"--timeout must be > 0 and finite seconds, got {a.timeout}")
    if a.insecure or a.tls_dir is None:
        return None, None
    from tadlora.node.peer_checks import node_id_problem
    from tadlora.node.tls import TlsMaterial

    if a.node_id and (problem := node_id_problem(a.node_id)):  # named, so that a TADLORA_NODE_ID that set it is too
        raise ValueError(f"--node-id: {problem}")

    node_id = a.node_id or kept_node_id(a.out)
    if node_id is None:
        raise ValueError(
            f"--tls-dir {a.tls_dir} needs --node-id NODE_ID (or TADLORA_NODE_ID, or --out of a node that ran): "
            "it names the client certificate NODE_ID.crt/.key"
        )
    material = TlsMaterial.from_dir(a.tls_dir, node_id)
    return material.channel_credentials(), None if a.any_peer else a.peer_id or node_id


def _accepts_connections(address: str, timeout: float) -> bool:
    """Whether a TCP connection to ``address`` (HOST:PORT) is accepted: tells "nothing listens" apart from a
    listener that refused us (TLS, another protocol), which gRPC reports alike."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def status_main(argv: list[str]) -> int:
    """`tadlora-node status HOST:PORT [--all] [--table] [--tls-dir DIR --node-id ID]`: 0 and the JSON (or table)
    if the node answers, and with --all every node it leads to; 1 if it, or with --all any node listed, does not
    (the rest is printed all the same); 2 for bad flags or TLS files."""
    parser = build_status_parser()
    a = parser.parse_args(argv)
    from tadlora.node.protocol_types import PeerUnavailable, ReplyRefused
    from tadlora.node.wire import ExchangeRefused, Reason

    try:
        if a.address.strip() == "auto" or a.address.strip().startswith("dns:"):  # --peers sources, not an address
            raise ValueError(f"{a.address!r}: status asks one node, at its HOST:PORT (not auto or dns:NAME)")
        # gRPC would dial port 443 for an address without one, and 99999 - 65536 for 99999.
        addresses = StaticPeers.parse(a.address).addresses
        if len(addresses) != 1:
            raise ValueError(f"{a.address!r}: status asks one node, at one HOST:PORT")
        a.address = addresses[0]
        credentials, peer_id = status_credentials(a)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"tadlora-node status: error: {exc}{from_environment(parser, a, str(exc))}\n")
        return 2
    try:
        if a.all:
            walked = asyncio.run(walk_cluster(a.address, a.timeout, credentials=credentials, peer_id=peer_id))
        else:
            doc = asyncio.run(query_status(a.address, a.timeout, credentials=credentials, peer_id=peer_id))
            walked = {"nodes": [doc], "unreachable": [], "complete": True}
    except (PeerUnavailable, ExchangeRefused) as exc:
        if isinstance(exc, PeerUnavailable) and not _accepts_connections(a.address, a.timeout):
            hint = "nothing accepts connections there: is the node running, and is this its --listen HOST:PORT?"
        elif isinstance(exc, PeerUnavailable) and "HTTP/2" in str(exc):  # an HTTP/1 server: not gRPC at all
            hint = "something other than gRPC answers there (a node's --metrics-port?): give its --listen HOST:PORT"
        elif isinstance(exc, ExchangeRefused) and exc.reason is Reason.PROTOCOL_MISMATCH:
            # A gRPC server without the node's service: TLS flags would not help, the port is wrong (most likely
            # the plaintext --health-port, which sits next to the --listen port in every deployment).
            hint = "another gRPC service answers there (a node's --health-port?): give the node's --listen HOST:PORT"
        elif isinstance(exc, ReplyRefused):
            hint = "the node there says of itself what no tadlora node would: it is not shown"
        elif credentials is None:
            hint = (
                "if the node runs with TLS, pass --tls-dir DIR --node-id NODE_ID (or TADLORA_TLS_DIR and "
                "TADLORA_NODE_ID) with a certificate of its cluster"
            )
        else:
            named = "" if peer_id is None else f"name {peer_id!r} (--peer-id, for another node than --node-id) and "
            hint = (
                f"the node's certificate must {named}be signed by {a.tls_dir / 'ca.crt'}; a node run with "
                "--insecure needs --insecure here"
            )
        # Escaped: the detail is what answered there chose (a refusal's, a gRPC error's).
        sys.stderr.write(f"tadlora-node status: {printable(str(exc))}\n  {hint}\n")
        return 1
    if a.table:
        sys.stdout.write(status_table(walked["nodes"], walked["unreachable"]))
    else:
        # allow_nan=False: no bare NaN, which JSON readers (jq, JSON.parse) refuse; `_number` leaves none.
        sys.stdout.write(json.dumps(walked if a.all else walked["nodes"][0], indent=2, allow_nan=False) + "\n")
    if not walked["complete"]:
        capped = [d for d in walked["nodes"] if d["neighbours_total"] > len(d["neighbours"])]
        if len(walked["nodes"]) + len(walked["unreachable"]) >= WALK_LIMIT:
            sys.stderr.write(f"tadlora-node status: stopped after {WALK_LIMIT} nodes; more are listed\n")
        for d in capped:
            sys.stderr.write(
                printable(f"tadlora-node status: {d['node_id']} lists {len(d['neighbours'])} of its "
                          f"{d['neighbours_total']} neighbours; the walk asked those alone") + "\n"
            )  # fmt: skip
    if walked["unreachable"]:
        said = [
            printable(f"{u['node_id']} at {u['address'] or '(no address)'}: {u['error']}")
            for u in walked["unreachable"]
        ]
        sys.stderr.write(f"tadlora-node status: {len(said)} of the nodes listed did not answer: {'; '.join(said)}\n")
        return 1
    return 0


def ip_address(text: str) -> str:
    """An argparse type: an IPv4 or IPv6 address, as given."""
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ca_passphrase(confirm: bool) -> bytes | None:
    """The CA key's passphrase: from `tls.CA_PASSPHRASE_ENV`, else asked on the terminal (twice with ``confirm``);
    None where neither can give one (no variable, no terminal: a script)."""
    import getpass

    from tadlora.node.tls import CA_PASSPHRASE_ENV

    if given := os.environ.get(CA_PASSPHRASE_ENV):
        return given.encode()
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("CA key passphrase: ")
    if not first:  # said here: None would tell a user at a terminal to "run on a terminal"
        raise ValueError("the passphrase is empty; nothing was written")
    if confirm and getpass.getpass("CA key passphrase, again: ") != first:
        raise ValueError("the two passphrases differ; nothing was written")
    return first.encode()


def build_certs_parser() -> argparse.ArgumentParser:
    """Flags of `tadlora-node certs` (its subcommands ``init`` and ``issue``)."""
    from tadlora.node import tls

    p = argparse.ArgumentParser(prog="tadlora-node certs", description="Create the cluster CA and node certificates.")
    sub = p.add_subparsers(dest="action", required=True)
    init = sub.add_parser(
        "init",
        help="create the cluster CA (DIR/ca.crt, DIR/ca.key)",
        description=f"Create the cluster CA: DIR/ca.crt (valid {tls.CA_DAYS} days) and DIR/ca.key (mode "
        "0600; keep it off the nodes). Existing files are never replaced without --force.",
    )
    init.add_argument("dir", help="directory for ca.crt and ca.key (created if missing)")
    init.add_argument("--cluster", default="default", help="cluster name, written into the CA's subject")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.add_argument(
        "--encrypt",
        action="store_true",
        help=f"encrypt ca.key under a passphrase: ${tls.CA_PASSPHRASE_ENV}, else asked twice on the terminal "
        "(`certs issue` then asks for it the same way)",
    )
    iss = sub.add_parser(
        "issue",
        help="issue DIR/NAME.crt and DIR/NAME.key signed by the cluster CA",
        description=f"Issue DIR/NAME.crt (valid {tls.NODE_DAYS} days, never past the CA's end) and "
        "DIR/NAME.key (mode 0600) for node id NAME, signed by DIR/ca.key. Existing files are never replaced without "
        f"--force. An encrypted ca.key is decrypted with ${tls.CA_PASSPHRASE_ENV}, else with a passphrase asked on "
        "the terminal. If DIR/ca.crt bundles several CAs (a cluster moving to a new one), the one whose key is "
        "ca.key signs.",
    )
    iss.add_argument("name", help="the node id that will use this certificate (its --node-id)")
    iss.add_argument("--dir", required=True, help="the directory made by `certs init`")
    iss.add_argument("--ip", action="append", default=[], type=ip_address,
                     help="an IP address to add to the certificate (repeat)")  # fmt: skip
    iss.add_argument("--force", action="store_true", help="replace existing files")
    return p


def certs_main(argv: list[str]) -> int:
    """`tadlora-node certs init DIR` and `tadlora-node certs issue NAME --dir DIR`: 0 when written, 2 for bad flags
    or files that cannot be written."""
    from tadlora.node import tls

    a = build_certs_parser().parse_args(argv)
    try:
        # An unset shell variable (`certs init $DIR`) would otherwise put the CA into the working directory.
        if not (a.dir or "").strip():
            raise ValueError(f"{'DIR' if a.action == 'init' else '--dir'} must not be empty")
        if a.action == "init":
            stale = sorted(c.stem for c in Path(a.dir).glob("*.crt") if c.name != "ca.crt") if a.force else []
            secret = None
            if a.encrypt and (secret := _ca_passphrase(confirm=True)) is None:
                raise ValueError(f"--encrypt needs a passphrase: set {tls.CA_PASSPHRASE_ENV}, or run on a terminal")
            path = tls.init_ca(Path(a.dir), cluster=a.cluster, force=a.force, passphrase=secret)
            if stale:  # issued by the CA just replaced: no node of the new one accepts them
                sys.stderr.write(
                    f"tadlora-node certs: note: {len(stale)} node certificates in {a.dir} were issued by the CA just "
                    f"replaced and no longer verify ({', '.join(stale)}): reissue each with `tadlora-node certs issue "
                    f"NAME --dir {a.dir} --force`, and give every node the new {path}\n"
                )
        else:
            path = tls.issue(
                Path(a.dir), a.name, ips=tuple(a.ip), force=a.force, passphrase=lambda: _ca_passphrase(confirm=False)
            )
    except (OSError, ValueError) as exc:  # OSError: DIR cannot be created or written, say so without a traceback
        sys.stderr.write(f"tadlora-node certs: error: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {path} and {path.with_suffix('.key')}\n")  # the key too: the file to keep safe
    return 0
