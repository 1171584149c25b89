"""Time from start to the first completed exchange: 3 `tadlora-node` processes finding each other by mDNS.

Three node processes (tiny model, --insecure, --peers auto, mDNS on 127.0.0.1 only, --min-peers 2, 2 rounds) are
started together; their JSON logs give, per node, the time from its process start to: serving, the first peer
verified, all peers verified, and the end of its first round that mixed with at least one neighbour (the round
log line is written right after the exchanges and the mixing, so it bounds the first completed exchange from
above by the mixing time, microseconds for the tiny model). The cluster's figure is the time from the first
process start to the first such round anywhere, and to the last node's. Repeated; median and range reported.

    .venv/bin/python benchmarks/discovery.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, add_out_argument, median_range, run_main, write_results

sys.path.insert(0, str(REPO / "tests"))
from nodeproc import NodeProcess, node_args, running_node, unique_tag

M = 3
ROUNDS = 2
FINISH_S = 300.0  # s for a whole run of 2 tiny rounds, 3 processes on 2 busy cores: startup dominates
# The RPC server's own "serving tadlora.v1.Node on ..." line: logged when gRPC is up, before mDNS starts (the
# daemon's "node X serving on" line comes after discovery has started, so peers can be verified before it).
SERVING = r"^serving tadlora\.v1\.Node on |^node \S+ serving on "
_VERIFIED = re.compile(r"peer (?P<peer>\S+) verified at ")
_ROUND = re.compile(r"round (?P<round>\d+) phase \S+: loss \S+, (?P<got>\d+)/(?P<degree>\d+) neighbours")


def first_time(node: NodeProcess, pattern: str) -> float | None:
    """The log time of the node's first record matching ``pattern``."""
    found = node.find(pattern)
    return float(found[0]["time"]) if found else None


def peers_verified(records: list[dict[str, Any]]) -> list[float]:
    """When each peer was first verified, earliest first: a peer logged again (dropped and verified anew, or met at
    another address) counts once, or "all peers verified" could be a repeat before the last peer came."""
    first: dict[str, float] = {}
    for record in records:
        if found := _VERIFIED.match(record["message"]):
            first.setdefault(found["peer"], record["time"])
    return sorted(first.values())


def first_mixed_round(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first round log record that mixed with at least one neighbour, whatever its round: a node whose round 0
    exchanged with nobody (its exchanges timed out) had its first exchange in a later round, not none."""
    for record in records:
        if (found := _ROUND.search(record["message"])) and int(found["got"]) > 0:
            return record
    return None


def one_run(root: Path, index: int) -> dict[str, Any]:
    tag = unique_tag()
    logs = root / f"run{index}"
    with contextlib.ExitStack() as stack:
        nodes = []
        for i in range(M):
            out = logs / f"out{i}"
            extra = ["--rounds", str(ROUNDS), "--min-peers", str(M - 1), "--eval-every", "100"]
            args = node_args(f"bench-{tag}", f"n{i}-{tag}", out, shard=i, num_shards=M, extra=extra)
            nodes.append(stack.enter_context(running_node(logs, f"n{i}", args, out)))
        for node in nodes:
            code = node.wait_exit(FINISH_S)
            if code != 0:
                raise RuntimeError(f"{node.name} exited with {code}\n{node.tail()}")
        t0 = min(n.started for n in nodes)
        per_node: list[dict[str, Any]] = []
        for node in nodes:
            records = node.records()
            mixed = first_mixed_round(records)
            verified = peers_verified(records)
            serving = first_time(node, SERVING)
            if serving is None:  # it exited 0, so it served; a log without the line is this script's mistake
                raise RuntimeError(f"{node.name} never logged {SERVING!r}\n{node.tail()}")
            per_node.append({
                "node": node.name,
                "serving_s": serving - node.started,
                "serving_abs": serving,
                "all_peers_abs": verified[M - 2] if len(verified) >= M - 1 else None,
                "first_peer_s": verified[0] - node.started if verified else None,
                "all_peers_s": verified[M - 2] - node.started if len(verified) >= M - 1 else None,
                "first_exchange_round_s": mixed["time"] - node.started if mixed else None,
                "first_exchange_round_abs": mixed["time"] if mixed else None,
                # the key predates rounds after 0 being counted: kept, so that runs stay comparable
                "round0_neighbours": mixed["message"] if mixed else None,
            })  # fmt: skip
    done = [p["first_exchange_round_abs"] for p in per_node if p["first_exchange_round_abs"] is not None]
    last_serving = max(p["serving_abs"] for p in per_node)
    all_peers = [p["all_peers_abs"] for p in per_node]
    return {
        "run": index,
        "last_serving_to_all_peers_everywhere_s": max(all_peers) - last_serving if None not in all_peers else None,
        "last_serving_to_first_exchange_s": min(done) - last_serving if done else None,
        "cluster_first_exchange_s": min(done) - t0 if done else None,
        "cluster_all_exchanged_s": max(done) - t0 if len(done) == M else None,
        "nodes": per_node,
    }


def table(summary: dict[str, list[float]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The Markdown table's headers and rows, from the JSON's ``summary_s`` (each measure's values, Nones left out)."""

    def stat(values: list[float]) -> str:
        if not values:
            return "n/a"
        med, lo, hi = median_range(values)
        return f"{med:.2f} ({lo:.2f} to {hi:.2f})"

    return ["measure", "n", "seconds: median (range)"], [(name, len(v), stat(v)) for name, v in summary.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="tadlora-discovery-") as tmp:
        for i in range(args.repeat):
            runs.append(one_run(Path(tmp), i))
            print(f"run {i}: first exchange after {runs[-1]['cluster_first_exchange_s']} s", flush=True)

    measures = {
        "process start -> gRPC serving (per node)": [p["serving_s"] for r in runs for p in r["nodes"]],
        "process start -> first peer verified (per node)": [p["first_peer_s"] for r in runs for p in r["nodes"]],
        "process start -> all peers verified (per node)": [p["all_peers_s"] for r in runs for p in r["nodes"]],
        "process start -> first round mixed with a neighbour (per node)":
            [p["first_exchange_round_s"] for r in runs for p in r["nodes"]],
        "last node serving -> every node has verified all peers (mDNS + handshakes)":
            [r["last_serving_to_all_peers_everywhere_s"] for r in runs],
        "last node serving -> first exchange in the cluster": [r["last_serving_to_first_exchange_s"] for r in runs],
        "first process start -> first exchange in the cluster": [r["cluster_first_exchange_s"] for r in runs],
        "first process start -> every node exchanged": [r["cluster_all_exchanged_s"] for r in runs],
    }  # fmt: skip
    summary = {name: [v for v in values if v is not None] for name, values in measures.items()}
    headers, rows = table(summary)
    notes = (
        f"{args.repeat} runs of {M} processes; seconds, median (min to max). Tiny model, --insecure, mDNS on "
        "127.0.0.1. Process start includes importing torch and transformers and building the model, with 3 "
        "processes starting at once on a 2-core machine that another job also uses: the serving time dominates, "
        "and it is CPU-bound, not discovery-bound; the 'last node serving ->' rows are what "
        "mDNS + handshakes cost."
    )
    write_results("discovery", {"repeat": args.repeat, "summary_s": summary, "runs": runs}, headers, rows, notes,
                  out=args.out)  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_main(main))
