"""What the node daemon costs on top of its compute: 3 in-process nodes vs the same local steps in a bare loop.

Daemon: 3 `Node`s in this process on real gRPC over 127.0.0.1 (static peers, plaintext, full mesh), N rounds;
the time is `asyncio.gather(node.run() ...)` (model building and serving excluded; peer wait, training in each
node's worker thread, exchanges, mixing, the final evaluation, checkpoint and export included).

Bare loop: the same work's compute alone, sequentially in this thread: for each round and each node, the same
`tadlora.training.local_steps` call (same model, shard, trained factors, seed) on its own `AdapterModel`, then
one `evaluate` per node at the end (the daemon evaluates at its last round). No mixing, no I/O.

Both run in the same process one after the other, the bare loop first and again last; the ratio daemon/bare
is what to read. CPU only (no GPU is lent to this machine); torch uses one thread.

    .venv/bin/python benchmarks/daemon_overhead.py [--model minilm|tiny] [--rounds 5] [--local-steps 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path

import torch
from _common import write_results

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
from tadlora.core.methods import make_method
from tadlora.core.topology import client_name
from tadlora.data import resolve_dataset
from tadlora.node.config import NodeConfig
from tadlora.node.daemon import Node
from tadlora.node.peerspec import PeersOption
from tadlora.node.state import read_rounds
from tadlora.training import TrainSpec, encode, evaluate, local_steps
from tadlora.workload import client_shards, eval_subset

M = 3
DATASET = "builtin:sst2-small"
SAMPLES_PER_CLIENT = 64
EVAL_SAMPLES = 32
METHOD = "tad"


def node_config(out: Path, i: int, peers: tuple[str, ...], args: argparse.Namespace, train: TrainSpec) -> NodeConfig:
    return NodeConfig(
        out=out / f"n{i}", node_id=client_name(i), cluster=f"bench-{os.getpid()}", listen="127.0.0.1:0",
        peers=PeersOption(auto=False, static=peers, dns=()), model=args.model, dataset=DATASET, shard=i,
        num_shards=M, samples_per_client=SAMPLES_PER_CLIENT, eval_samples=EVAL_SAMPLES, eval_every=10**6,
        method=METHOD, lora=LoraSpec(), train=train, rounds=args.rounds, min_peers=M - 1, peer_wait=60.0,
        exchange_timeout=120.0, device="cpu", insecure=True,
    )  # fmt: skip


async def run_daemon(out: Path, args: argparse.Namespace, train: TrainSpec) -> tuple[float, list[list[dict]]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(M):
            cfg = node_config(out, i, tuple(n.address for n in nodes), args, train)
            nodes.append(await stack.enter_async_context(Node(cfg)))
        started = time.perf_counter()
        await asyncio.gather(*(n.run() for n in nodes))
        elapsed = time.perf_counter() - started
    return elapsed, [read_rounds(out / f"n{i}") for i in range(M)]


def bare_loop(args: argparse.Namespace, train: TrainSpec) -> float:
    """Sequential compute of the daemon run's local steps and final evaluations, models built beforehand."""
    data = resolve_dataset(DATASET, "train")
    dev_text = eval_subset(resolve_dataset(DATASET, "dev"), EVAL_SAMPLES)
    spec = ModelSpec(model=args.model, label_names=data.label_names, lora=LoraSpec(), seed=0)
    models = [AdapterModel(spec) for _ in range(M)]
    shards = [
        encode(models[0].tokenizer, data.subset(idx), train.max_length)
        for idx in client_shards(data, "label-skew", M, 0, SAMPLES_PER_CLIENT)
    ]
    dev = encode(models[0].tokenizer, dev_text, train.max_length)
    method = make_method(METHOD, None)
    started = time.perf_counter()
    for t in range(args.rounds):
        for i in range(M):
            local_steps(models[i], shards[i], method.trained(t), train, 0, i, t)
    for model in models:
        evaluate(model, dev)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm (default) or tiny (a quick run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    train = TrainSpec(local_steps=args.local_steps, batch_size=args.batch_size, max_length=args.max_length, lr=1e-3)
    bare_first = bare_loop(args, train)
    print(f"bare loop: {bare_first:.2f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="tadlora-bench-") as tmp:
        daemon_s, rounds = asyncio.run(run_daemon(Path(tmp), args, train))
    print(f"daemon: {daemon_s:.2f} s", flush=True)
    bare_last = bare_loop(args, train)
    print(f"bare loop again: {bare_last:.2f} s", flush=True)
    bare = (bare_first + bare_last) / 2
    per_round = [r["seconds"] for node in rounds for r in node]
    latency = [r["exchange_latency_s"] for node in rounds for r in node if r["exchange_latency_s"]]
    complete = all(len(r["neighbours"]) == M - 1 and not r["missed"] for node in rounds for r in node)
    bytes_sent = sum(r["bytes_sent"] for node in rounds for r in node)
    data = {
        "model": args.model, "nodes": M, "rounds": args.rounds, "method": METHOD,
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "max_length": args.max_length},
        "device": "cpu", "gpu": "not lent (CPU-only machine)",
        "bare_loop_s": [bare_first, bare_last], "daemon_s": daemon_s, "ratio_daemon_over_bare": daemon_s / bare,
        "rounds_all_neighbours": complete, "bytes_sent_total": bytes_sent,
        "round_seconds_mean": sum(per_round) / len(per_round),
        "exchange_latency_s_mean": sum(latency) / len(latency) if latency else None,
        "exchange_latency_s_max": max(latency, default=None),
    }  # fmt: skip
    headers = ["model", "nodes x rounds", "local steps (batch, len)", "bare loop s (before, after)",
               "daemon s", "daemon / bare", "mean exchange latency s", "all exchanges done"]  # fmt: skip
    rows = [(args.model, f"{M} x {args.rounds}", f"{args.local_steps} ({args.batch_size}, {args.max_length})",
             f"{bare_first:.2f}, {bare_last:.2f}", daemon_s, daemon_s / bare,
             data["exchange_latency_s_mean"] or 0.0, complete)]  # fmt: skip
    notes = (
        "The daemon's 3 nodes each train in their own worker thread, so on 2 cores (one busy with another job) "
        "their torch work can overlap, while the bare loop is strictly sequential: a ratio near or below 1 does "
        "not mean the daemon is free. The daemon time also holds peer verification, the per-round exchange "
        "barrier, mixing, the final checkpoint and adapter export. CPU only, one torch thread."
    )
    write_results("daemon_overhead", data, headers, rows, notes)


if __name__ == "__main__":
    main()
