"""How one cluster scales: N `tadlora-node` processes on 127.0.0.1, for N = 4, 8, 16 by default.

For each N, N node processes (tiny model, --insecure, --min-peers N-1, a fixed number of rounds) are started
together, finding each other by mDNS on 127.0.0.1 (``--peers mdns``, the default) or by a static list of every
other node's address (``--peers static``). Measured from their JSON logs, their ``rounds.jsonl`` and /proc:

- discovery: the time from the last node serving to every node having verified all N-1 peers, and to the first
  round anywhere that mixed with a neighbour (the round line is written right after the exchanges and the mixing);
- pace: rounds per minute per node, from each node's first mixed round to its last round (median over nodes);
- agreement: pairs of records that disagree (i mixed with j in round t but j did not mix with i; the degree i used
  for j is not the degree j used), links the shared schedule gave that a round missed, rounds logged twice;
- resources per node (largest over the run, sampled every second): threads, open file descriptors, TCP sockets,
  RSS; CPU seconds and log bytes per round;
- mDNS traffic on 127.0.0.1: packets per second (queries and answers) seen by a passive listener during the run,
  beside what a node's traffic would be on its own (other tests on this machine share 127.0.0.1:5353, so run it
  on a quiet machine).

Every N runs the same rounds on the same machine, so what is compared is the ratio to the smallest N: how much
slower a round gets (on 2 cores, N processes share the CPU: rounds/min per node falls as 1/N there by CPU alone),
and how much more each node holds. Absolute speeds are this machine's.

    .venv/bin/python benchmarks/scale.py [--counts 4,8,16] [--rounds 60] [--peers mdns|static] [--link-prob 1.0]
        [--max-neighbors K]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import REPO, add_out_argument, run_main, write_results

sys.path.insert(0, str(REPO / "tests"))
from nodeproc import LOOPBACK, NodeProcess, free_ports, node_args, running_node, unique_tag
from tadlora.core.topology import link_up, overlay_neighbours

FINISH_S = 900.0  # s for a whole run: 16 processes importing torch on 2 busy cores take minutes to serve
SAMPLE_S = 1.0  # s between looks at each node's /proc entry
SEED = 0  # the nodes' --seed (the default), which the schedule's links are drawn from
PEAKS = ("threads", "open_fds", "tcp_sockets", "rss_kib", "rss_anon_kib")  # what ProcSampler keeps the largest of
MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353
_VERIFIED = re.compile(r"^peer (?P<peer>\S+) verified at ")
_SERVING = r"^serving tadlora\.v1\.Node on |^node \S+ serving on "


# ------------------------------------------------------------------------------------------------- the analysis


def first_verified(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Peer id -> when it was first verified (a peer verified again later counts at its first time)."""
    first: dict[str, float] = {}
    for record in records:
        if found := _VERIFIED.match(record["message"]):
            first.setdefault(found["peer"], float(record["time"]))
    return first


def scheduled(ids: Sequence[str], me: str, t: int, link_prob: float, max_neighbors: int | None) -> set[str]:
    """``me``'s neighbours in round t by the shared schedule, over the full membership ``ids``."""
    peers: set[str] | frozenset[str] = set(ids) - {me}
    if max_neighbors is not None:
        peers = overlay_neighbours(me, ids, max_neighbors)
    return {p for p in peers if link_up(SEED, t, me, p, link_prob)}


def agreement(by_id: dict[str, list[dict[str, Any]]], link_prob: float, max_neighbors: int | None) -> dict[str, int]:
    """Counts over every node's rounds.jsonl: catch-up jumps (a line whose round does not follow the line before:
    the node adopted a peer's round, ahead or back), one-sided pairs (i mixed with j in round t, j's line for t does
    not list i), degree disagreements (the degree i was told for j is not the degree j's own line says), links the
    schedule gave over the full membership that a round missed, and pairs mixed that it did not give. A round
    number a node logged twice (after a catch-up back) is left out of the pair counts."""
    ids = sorted(by_id)
    counts = {"rounds": 0, "catch_up_jumps": 0, "one_sided_pairs": 0, "degree_disagreements": 0,
              "scheduled_links": 0, "scheduled_links_missed": 0, "unscheduled_links_mixed": 0}  # fmt: skip
    mixed: dict[tuple[str, int], set[str]] = {}
    degree: dict[tuple[str, int], int] = {}
    told: dict[tuple[str, int], dict[str, int]] = {}
    for i, records in by_id.items():
        rounds = [r["round"] for r in records]
        counts["catch_up_jumps"] += sum(b != a + 1 for a, b in itertools.pairwise(rounds))
        once = {t for t in rounds if rounds.count(t) == 1}
        for r in records:
            if r["round"] in once:
                key = (i, r["round"])
                mixed[key] = {n["id"] for n in r["neighbours"]}
                told[key] = {n["id"]: n["degree"] for n in r["neighbours"]}
                degree[key] = r["degree"]
    for (i, t), got in mixed.items():
        counts["rounds"] += 1
        want = scheduled(ids, i, t, link_prob, max_neighbors)
        counts["scheduled_links"] += len(want)
        counts["scheduled_links_missed"] += len(want - got)
        counts["unscheduled_links_mixed"] += len(got - want)
        for j in got:
            if (j, t) in mixed and i not in mixed[(j, t)]:
                counts["one_sided_pairs"] += 1
            if (j, t) in degree and told[(i, t)][j] != degree[(j, t)]:
                counts["degree_disagreements"] += 1
    return counts


def rounds_per_minute(records: Sequence[dict[str, Any]]) -> float | None:
    """Rounds per minute from the end of the node's first round that mixed to the end of its last round."""
    mixed = [r for r in records if r["neighbours"]]
    if not mixed or mixed[0] is records[-1]:
        return None
    first, last = mixed[0], records[-1]
    return 60.0 * (last["round"] - first["round"]) / (last["time"] - first["time"])


# ------------------------------------------------------------------------------------------ what runs beside them


class ProcSampler:
    """Samples each node's threads, open files, TCP sockets and RSS from /proc every `SAMPLE_S` (a thread this
    object owns; `close` stops it), keeping the largest value of each and the last CPU time."""

    def __init__(self, nodes: Sequence[NodeProcess]) -> None:
        self._nodes = nodes
        self.peak: dict[str, dict[str, int]] = {n.name: {} for n in nodes}
        self.cpu_s: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for node in self._nodes:
                with contextlib.suppress(OSError, ValueError, KeyError):  # a node that has exited (or is exiting)
                    self._sample(node)

    def _sample(self, node: NodeProcess) -> None:
        proc = Path(f"/proc/{node.proc.pid}")
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        fds = list((proc / "fd").iterdir())
        sockets = {os.readlink(fd) for fd in fds if os.readlink(fd).startswith("socket:")}
        tcp = _tcp_inodes() & {s[len("socket:[") : -1] for s in sockets}
        values = {"threads": int(status["Threads"]), "open_fds": len(fds), "tcp_sockets": len(tcp),
                  "rss_kib": int(status["VmRSS"].split()[0]),
                  "rss_anon_kib": int(status["RssAnon"].split()[0])}  # fmt: skip
        peak = self.peak[node.name]
        for key, value in values.items():
            peak[key] = max(peak.get(key, 0), value)
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        self.cpu_s[node.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _tcp_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            inodes.update(line.split()[9] for line in list(f)[1:])
    return inodes


class MdnsCounter:
    """Counts the mDNS packets on 127.0.0.1 (queries and answers, by the header's QR bit) in a thread it owns;
    joins the group on the loopback interface only and sends nothing."""

    def __init__(self) -> None:
        self.queries = self.answers = self.bytes = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._sock.bind(("", MDNS_PORT))
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                              socket.inet_aton(MDNS_GROUP) + socket.inet_aton(LOOPBACK))  # fmt: skip
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-mdns", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(9000)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) >= 4:
                (flags,) = struct.unpack("!H", data[2:4])
                self.bytes += len(data)
                if flags & 0x8000:
                    self.answers += 1
                else:
                    self.queries += 1

    def snapshot(self) -> tuple[int, int, int]:
        return self.queries, self.answers, self.bytes

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


# ----------------------------------------------------------------------------------------------------- one count


def one_count(root: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    tag = unique_tag()
    logs = root / f"n{n}"
    ids = [f"n{i:02d}-{tag}" for i in range(n)]
    ports = free_ports(n)
    extra = ["--rounds", str(args.rounds), "--min-peers", str(n - 1), "--peer-wait", "600", "--eval-every", "1000",
             "--exchange-timeout", str(args.exchange_timeout), "--link-prob", str(args.link_prob)]  # fmt: skip
    if args.max_neighbors is not None:
        extra += ["--max-neighbors", str(args.max_neighbors)]
    counter = MdnsCounter() if args.peers == "mdns" else None
    with contextlib.ExitStack() as stack:
        nodes: list[NodeProcess] = []
        for i in range(n):
            out = logs / f"out{i}"
            peers = "auto" if args.peers == "mdns" else ",".join(f"{LOOPBACK}:{p}" for k, p in enumerate(ports)
                                                                 if k != i)  # fmt: skip
            node_extra = [*extra, "--peers", peers]  # after node_args' own --peers auto: the last one counts
            node = node_args(f"scale-{tag}", ids[i], out, shard=i, num_shards=n, listen=f"{LOOPBACK}:{ports[i]}",
                             extra=node_extra)  # fmt: skip
            nodes.append(stack.enter_context(running_node(logs, f"n{i:02d}", node, out)))
        sampler = ProcSampler(nodes)
        stack.callback(sampler.close)
        for node in nodes:
            node.serving(FINISH_S)
        served_at = time.time()
        cpu_at_serving = dict(sampler.cpu_s)
        mdns_start = counter.snapshot() if counter else None
        for node in nodes:
            code = node.wait_exit(FINISH_S)
            if code != 0:
                raise RuntimeError(f"{node.name} exited with {code}\n{node.tail()}")
        ended_at = time.time()
        mdns_end = counter.snapshot() if counter else None
        if counter:
            counter.close()
    by_id = {ids[i]: node.rounds() for i, node in enumerate(nodes)}
    records = {node.name: node.records() for node in nodes}
    t0 = min(node.started for node in nodes)
    last_serving = max(float(node.find(_SERVING)[0]["time"]) for node in nodes)
    verified = [first_verified(records[node.name]) for node in nodes]
    all_peers = [max(v.values()) if len(v) >= n - 1 else None for v in verified]
    mixed_first = [next((r["time"] for r in by_id[i] if r["neighbours"]), None) for i in ids]
    pace = [p for i in ids if (p := rounds_per_minute(by_id[i])) is not None]
    log_bytes = [node.stderr_path.stat().st_size for node in nodes]
    peak = sampler.peak
    result: dict[str, Any] = {
        "nodes": n,
        "launch_to_last_serving_s": last_serving - t0,
        "last_serving_to_all_peers_verified_s": (max(all_peers) - last_serving) if None not in all_peers else None,
        "nodes_that_verified_every_peer": sum(a is not None for a in all_peers),
        "last_serving_to_first_exchange_s": (min(m for m in mixed_first if m is not None) - last_serving)
        if any(m is not None for m in mixed_first)
        else None,
        "last_serving_to_every_node_exchanged_s": (max(mixed_first) - last_serving)  # type: ignore[type-var]
        if None not in mixed_first
        else None,
        "rounds_per_min_per_node_median": statistics.median(pace) if pace else None,
        "rounds_per_min_per_node_min": min(pace, default=None),
        "agreement": agreement(by_id, args.link_prob, args.max_neighbors),
        "mean_degree": statistics.mean(r["degree"] for rs in by_id.values() for r in rs),
        "peak_per_node": {key: max(p.get(key, 0) for p in peak.values()) for key in PEAKS},
        # From the last node serving on: startup (importing torch, building the model) is not a round's cost.
        "cpu_s_per_round_per_node": statistics.median(
            (sampler.cpu_s[k] - cpu_at_serving.get(k, 0.0)) for k in sampler.cpu_s
        )
        / args.rounds,
        "log_bytes_per_round_per_node": statistics.median(log_bytes) / args.rounds,
    }
    if mdns_start is not None and mdns_end is not None:
        seconds = max(ended_at - served_at, 1e-9)
        result["mdns_per_s"] = {"queries": (mdns_end[0] - mdns_start[0]) / seconds,
                                "answers": (mdns_end[1] - mdns_start[1]) / seconds,
                                "bytes": (mdns_end[2] - mdns_start[2]) / seconds}  # fmt: skip
    if args.keep is not None:
        result["logs"] = str(logs)
    return result


def table(data: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The Markdown table's headers and rows, from the JSON's ``runs`` (ratios against the first count's run)."""
    headers = ["N", "last serving -> all peers verified s", "last serving -> first exchange s",
               "last serving -> every node exchanged s", "rounds/min per node", "x N (vs first N)",
               "one-sided pairs", "degree disagreements", "scheduled links missed", "mean degree",
               "threads", "open fds", "TCP sockets", "RSS MiB", "CPU s / round", "log KiB / round",
               "mDNS packets/s"]  # fmt: skip
    runs = data["runs"]
    base = runs[0]
    rows = []
    for r in runs:
        pace, agree, peak = r["rounds_per_min_per_node_median"], r["agreement"], r["peak_per_node"]
        scaled = (pace * r["nodes"]) / (base["rounds_per_min_per_node_median"] * base["nodes"]) if pace else "n/a"
        mdns = r.get("mdns_per_s")
        rows.append((
            r["nodes"], _or_na(r["last_serving_to_all_peers_verified_s"]),
            _or_na(r["last_serving_to_first_exchange_s"]),
            _or_na(r["last_serving_to_every_node_exchanged_s"]), _or_na(pace), scaled,
            agree["one_sided_pairs"], agree["degree_disagreements"],
            f"{agree['scheduled_links_missed']}/{agree['scheduled_links']}", float(r["mean_degree"]),
            peak["threads"], peak["open_fds"], peak["tcp_sockets"], peak["rss_kib"] / 1024,
            r["cpu_s_per_round_per_node"], r["log_bytes_per_round_per_node"] / 1024,
            "n/a" if mdns is None else mdns["queries"] + mdns["answers"],
        ))  # fmt: skip
    return headers, rows


def _or_na(value: float | None) -> float | str:
    return "n/a" if value is None else float(value)


def counts_arg(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated node counts, got {text!r}") from None
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"every count must be >= 2, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=counts_arg, default=[4, 8, 16], help="node counts, in order (default 4,8,16)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--peers", choices=("mdns", "static"), default="mdns")
    parser.add_argument("--link-prob", type=float, default=1.0)
    parser.add_argument("--max-neighbors", type=int, default=None, help="the nodes' --max-neighbors (default: none)")
    parser.add_argument("--exchange-timeout", type=float, default=60.0, help="the nodes' --exchange-timeout")
    parser.add_argument("--keep", type=Path, default=None, help="keep the nodes' logs and --out under this directory")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2, got {args.rounds}")
    if not 0.0 < args.link_prob <= 1.0:
        parser.error(f"--link-prob must be in (0, 1], got {args.link_prob}")
    if args.max_neighbors is not None and args.max_neighbors < 2:
        parser.error(f"--max-neighbors must be >= 2, got {args.max_neighbors}")
    runs = []
    with contextlib.ExitStack() as stack:
        root = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tadlora-scale-")))
        for n in args.counts:
            runs.append(one_count(root, n, args))
            print(f"N = {n}: {runs[-1]['rounds_per_min_per_node_median']} rounds/min per node", flush=True)
    data = {"counts": args.counts, "rounds": args.rounds, "peers": args.peers, "link_prob": args.link_prob,
            "max_neighbors": args.max_neighbors, "exchange_timeout": args.exchange_timeout, "runs": runs}  # fmt: skip
    headers, rows = table(data)
    notes = (
        "Tiny model, --insecure, 127.0.0.1, all N processes on this one machine: they share its cores, so rounds/min "
        "per node falls with N by CPU alone; 'x N' is rounds/min per node times N over the same for the first N "
        "(1.0: the machine's work per minute is unchanged). One-sided pairs, degree disagreements and missed links "
        "are counted over every node's rounds.jsonl (see the script's docstring). Threads, fds, TCP sockets and RSS "
        "are the largest of any node over the run. mDNS packets/s: on 127.0.0.1, between the last node serving "
        "and the last exit, as a passive listener saw them."
    )
    name = (
        "scale"
        if args.peers == "mdns" and args.link_prob == 1.0 and args.max_neighbors is None
        else (f"scale-{args.peers}-p{args.link_prob:g}" + (f"-k{args.max_neighbors}" if args.max_neighbors else ""))
    )
    write_results(name, data, headers, rows, notes, out=args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
