"""What the node daemon costs on top of its compute: 3 in-process nodes vs the same local steps in a bare loop.

Daemon: 3 `Node`s in this process on real gRPC over 127.0.0.1 (static peers, plaintext, full mesh), N rounds;
the time is `asyncio.gather(node.run() ...)` (model building and serving excluded; peer wait, training in each
node's worker thread, exchanges, mixing, the final evaluation, checkpoint and export included).

Bare loops: the same work's compute alone: for each round and each node, the same
`tadlora.training.local_steps` call (same model, shard, trained factors, seed) on its own `AdapterModel`, then
one `evaluate` per node at the end (the daemon evaluates at its last round). No mixing, no I/O. Two versions:
- sequential: all of it in this thread, one node after the other;
- threaded: one thread per node, as the daemon's worker threads are, meeting at a barrier after every round as
  the daemon's nodes do at their exchange. This is the baseline the daemon's own machinery is measured against:
  same compute, same overlap between nodes, same per-round synchronization, minus gRPC, mixing and disk.

All run in the same process one after the other (sequential, threaded, daemon, threaded, sequential), so slow
drift of the machine's load hits both sides of each ratio alike; an uncounted one-round sequential loop runs
first, so that the process's one-time costs (torch's first passes) do not land on the first sequential loop only.
On the CPU by default, torch using one thread per worker; `--device cuda` puts the three nodes' models (daemon
and bare loops alike) on one GPU, for the ratio on a GPU (benchmarks/gpu/ runs it on a lent one).

    .venv/bin/python benchmarks/daemon_overhead.py [--model minilm|tiny|PATH] [--rounds 5] [--local-steps 5]
        [--device cpu|cuda|cuda:N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _common import add_out_argument, check_train_args, run_main, synchronize, write_results

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec, resolve_device
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
        exchange_timeout=120.0, device=args.device, insecure=True,
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


def bare_loop(args: argparse.Namespace, train: TrainSpec, threaded: bool) -> float:
    """Seconds of the daemon run's local steps and final evaluations, models built beforehand.

    threaded=False runs every node's work in this thread; threaded=True runs each node in its own thread, the
    threads meeting at a barrier after each round.
    """
    data = resolve_dataset(DATASET, "train")
    dev_text = eval_subset(resolve_dataset(DATASET, "dev"), EVAL_SAMPLES)
    spec = ModelSpec(model=args.model, label_names=data.label_names, lora=LoraSpec(), seed=0)
    models = [AdapterModel(spec, resolve_device(args.device)) for _ in range(M)]
    shards = [
        encode(models[0].tokenizer, data.subset(idx), train.max_length)
        for idx in client_shards(data, "label-skew", M, 0, SAMPLES_PER_CLIENT)
    ]
    dev = encode(models[0].tokenizer, dev_text, train.max_length)
    method = make_method(METHOD, None)
    barrier = threading.Barrier(M if threaded else 1)

    def node_work(i: int) -> None:
        try:
            for t in range(args.rounds):
                local_steps(models[i], shards[i], method.trained(t), train, 0, i, t)
                barrier.wait()
            evaluate(models[i], dev)
        except BaseException:
            barrier.abort()  # the other nodes' threads would wait at the barrier for this one for ever
            raise

    started = time.perf_counter()
    if threaded:
        with ThreadPoolExecutor(max_workers=M) as pool:
            futures = [pool.submit(node_work, i) for i in range(M)]
        # The failure itself, not the BrokenBarrierError it gave the nodes that were waiting for it.
        errors = [exc for f in futures if (exc := f.exception()) is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    else:
        for t in range(args.rounds):
            for i in range(M):
                local_steps(models[i], shards[i], method.trained(t), train, 0, i, t)
        for model in models:
            evaluate(model, dev)
    # Each pass already ends in a host read (its loss, its predictions) that waits for the GPU; the clock's reading
    # is not left to rest on that.
    synchronize(args.device)
    return time.perf_counter() - started


def device_line(dev: torch.device) -> str:
    """What the JSON's "gpu" field records: the GPU the run used, by name, or whether the machine has one."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "present, not used" if torch.cuda.is_available() else "none on this machine"


def table(data: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The Markdown table's headers and its one row, from the JSON's fields."""
    headers = ["model", "nodes x rounds", "local steps (batch, len)", "bare sequential s", "bare threaded s",
               "daemon s", "daemon / threaded", "daemon / sequential", "mean exchange latency s",
               "all exchanges done"]  # fmt: skip
    train = data["train"]
    # A GPU run names its device beside the model; the CPU runs' tables (committed before runs on a GPU) do not.
    model = data["model"] if data.get("device", "cpu") == "cpu" else f"{data['model']} on {data['gpu']}"
    # No completed exchange has no latency: "n/a", not 0 s.
    rows = [(model, f"{data['nodes']} x {data['rounds']}",
             f"{train['local_steps']} ({train['batch_size']}, {train['max_length']})",
             ", ".join(f"{x:.2f}" for x in data["bare_sequential_s"]),
             ", ".join(f"{x:.2f}" for x in data["bare_threaded_s"]), data["daemon_s"],
             data["ratio_daemon_over_threaded"], data["ratio_daemon_over_sequential"],
             "n/a" if data["exchange_latency_s_mean"] is None else data["exchange_latency_s_mean"],
             data["rounds_all_neighbours"])]  # fmt: skip
    return headers, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm (default), tiny (a quick run) or a model's path")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto: where the models run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    check_train_args(parser, args)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    args.device, gpu = str(device), device_line(device)  # "auto" is recorded as what it resolved to
    try:  # a model that does not load is a usage error now, not a traceback from the first loop's first model
        AdapterModel(ModelSpec(model=args.model, label_names=resolve_dataset(DATASET, "train").label_names), device)
    except RuntimeError as exc:
        parser.error(f"--model: {exc}")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    train = TrainSpec(local_steps=args.local_steps, batch_size=args.batch_size, max_length=args.max_length, lr=1e-3)
    timings: dict[str, list[float]] = {"sequential": [], "threaded": []}

    def bare(kind: str) -> None:
        timings[kind].append(bare_loop(args, train, threaded=kind == "threaded"))
        print(f"bare loop, {kind}: {timings[kind][-1]:.2f} s", flush=True)

    # Not counted: the first forward/backward passes in a process pay one-time costs that would otherwise fall on
    # the first sequential loop alone, and the mean of the two sequential loops would not cancel them.
    bare_loop(argparse.Namespace(**{**vars(args), "rounds": 1}), train, threaded=False)
    bare("sequential")
    bare("threaded")
    with tempfile.TemporaryDirectory(prefix="tadlora-bench-") as tmp:
        daemon_s, rounds = asyncio.run(run_daemon(Path(tmp), args, train))
    print(f"daemon: {daemon_s:.2f} s", flush=True)
    bare("threaded")
    bare("sequential")
    seq = sum(timings["sequential"]) / 2
    thr = sum(timings["threaded"]) / 2
    per_round = [r["seconds"] for node in rounds for r in node]
    latency = [r["exchange_latency_s"] for node in rounds for r in node if r["exchange_latency_s"]]
    complete = all(len(r["neighbours"]) == M - 1 and not r["missed"] for node in rounds for r in node)
    bytes_sent = sum(r["bytes_sent"] for node in rounds for r in node)
    data = {
        "model": args.model, "nodes": M, "rounds": args.rounds, "method": METHOD,
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "max_length": args.max_length},
        "device": args.device, "gpu": gpu,
        "bare_sequential_s": timings["sequential"], "bare_threaded_s": timings["threaded"], "daemon_s": daemon_s,
        "ratio_daemon_over_sequential": daemon_s / seq, "ratio_daemon_over_threaded": daemon_s / thr,
        "rounds_all_neighbours": complete, "bytes_sent_total": bytes_sent,
        "round_seconds_mean": sum(per_round) / len(per_round),
        "exchange_latency_s_mean": sum(latency) / len(latency) if latency else None,
        "exchange_latency_s_max": max(latency, default=None),
    }  # fmt: skip
    headers, rows = table(data)
    notes = (
        "daemon / threaded is the daemon's own cost: the threaded bare loop does the same compute with the same "
        "overlap between nodes and the same per-round barrier, without gRPC, mixing, checkpoint or export. "
        "daemon / sequential compares with one node after the other; on a machine with spare cores it can be "
        "below 1 because the nodes' torch work overlaps. Each bare loop ran before and after the daemon (after an "
        "uncounted one-round warm-up); the ratios use their means. The daemon ran once: a ratio closer to 1 than "
        "the two runs of one bare loop are to each other is within the noise. "
        + ("CPU only, one torch thread per worker." if args.device == "cpu" else f"Models on {args.device} ({gpu}).")
    )
    write_results("daemon_overhead", data, headers, rows, notes, out=args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
