"""Simulator throughput (client local steps per second) and peak memory for m clients, both engines.

Each configuration (engine, m) runs in a fresh subprocess, which reports its peak RSS (`resource.getrusage`
ru_maxrss: torch allocates outside Python's heap, so tracemalloc would miss it). A round = the engine's
`train_round` for every client + `mix_round` (Metropolis-Hastings mixing over an Erdos-Renyi graph, p = 0.5)
+ `set_factors`, i.e. the simulator loop without evaluation. One warm-up round, then the timed rounds.

Memory is compared with what m separate models (one process per client, as m daemons would be) would need:
* params: m x the bytes of one model's parameters + buffers;
* processes: m one-model processes (interpreter, torch and transformers included: each daemon pays them), each
  holding its own private memory at its peak, and the file-backed pages (the shared libraries' code and read-only
  data, from the page cache) once, as processes mapping the same files share them: m x (peak RSS - file-backed
  RSS) + file-backed RSS of a subprocess that builds one model. m x its peak RSS would count libtorch's resident
  pages m times (108 MiB of a tiny-model process with torch 2.13 on x86).
Two more subprocesses measure the baselines: "imports only" and "one model" (which builds the model but does not
train it: a training daemon also holds activations, gradients and optimizer state, which the "processes" column
leaves out).

Speed is compared between engines, not across runs: for each m the engines take turns ``--repeat`` times, the order
reversed every other turn (A B B A ...), and the table gives each one's median and its median ratio to the first
engine over the turns (each turn's engines ran next to each other).

    .venv/bin/python benchmarks/sim_throughput.py [--model tiny|minilm] [--clients 10 32 100] [--rounds 2] [--repeat 3]
        [--device cpu|cuda]   # on a GPU the table adds its peak allocation
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import add_out_argument, check_train_args, run_main, synchronize, write_results

DATASET = "builtin:sst2-small"
SAMPLES_PER_CLIENT = 24  # label-skew over its 3000 SST-2 examples allows at most 26 for 100 clients, 24 for 113
EVAL_SAMPLES = 16
LINK_PROB = 0.5
USAGE = 2  # a worker's exit status for a bad --device, which the parent (no torch) cannot check itself


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_file_bytes() -> int:
    """This process's resident file-backed bytes now (``RssFile`` of /proc/self/status, Linux >= 4.5): pages of
    mapped files, the shared libraries above all, which every process mapping the same files shares."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024  # kB there means KiB
    raise RuntimeError("/proc/self/status has no RssFile line: the memory comparison needs Linux >= 4.5")


def separate_processes_bytes(m: int, one: dict) -> int:
    """What m one-model processes hold at their peaks: each its own private memory (its peak RSS less its
    file-backed pages), and the file-backed pages once, since the processes share them through the page cache.

    ``one``: the one-model subprocess's ``maxrss_bytes`` and ``rss_file_bytes``. The file-backed RSS is read at
    the end of that process (there is no high-water mark of it alone); the libraries it counts are mapped at
    import and stay. Training's own memory (activations, gradients, optimizer state) is not in it."""
    shared = one["rss_file_bytes"]
    return m * (one["maxrss_bytes"] - shared) + shared


def worker(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess; returns what it measured."""
    import numpy as np
    import torch

    from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec, resolve_device
    from tadlora.core.methods import make_method
    from tadlora.core.topology import make_topology
    from tadlora.data import resolve_dataset
    from tadlora.sim.engine import make_engine
    from tadlora.sim.rounds import mix_round
    from tadlora.training import TrainSpec, encode
    from tadlora.workload import client_shards, eval_subset

    torch.set_num_threads(1)
    try:
        device = resolve_device(args.device)  # no CUDA context yet: the imports-only baseline stays one
    except (ValueError, RuntimeError) as exc:
        print(f"--device: {exc}", file=sys.stderr)
        raise SystemExit(USAGE) from None
    if args.engine == "imports":
        return {"maxrss_bytes": _maxrss_bytes(), "rss_file_bytes": _rss_file_bytes()}
    train_data = resolve_dataset(DATASET, "train")
    spec = ModelSpec(model=args.model, label_names=train_data.label_names, lora=LoraSpec(), seed=0)
    try:
        model = AdapterModel(spec, device)
    except RuntimeError as exc:  # said by the one-model subprocess, before any engine runs
        print(f"--model: {' '.join(str(exc).split())}", file=sys.stderr)  # one line: the parent shows the last
        raise SystemExit(USAGE) from None
    param_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    param_bytes += sum(b.numel() * b.element_size() for b in model.model.buffers())
    if args.engine == "model":  # its device is the run's: --device auto resolved
        return {"maxrss_bytes": _maxrss_bytes(), "rss_file_bytes": _rss_file_bytes(), "param_buffer_bytes": param_bytes,
                "device": str(device)}  # fmt: skip
    train = TrainSpec(local_steps=args.local_steps, batch_size=args.batch_size, max_length=args.max_length, lr=1e-3)
    encoded = encode(model.tokenizer, train_data, train.max_length)
    shards = [encoded.subset(idx) for idx in client_shards(train_data, "label-skew", args.m, 0, SAMPLES_PER_CLIENT)]
    dev = encode(model.tokenizer, eval_subset(resolve_dataset(DATASET, "dev"), EVAL_SAMPLES),
                 train.max_length)  # fmt: skip
    engine = make_engine(args.engine, model, shards, dev, train, seed=0)
    method = make_method("tad", None)
    topology = make_topology("er", args.m, LINK_PROB, 0)

    def one_round(t: int) -> tuple[float, float]:
        started = time.perf_counter()
        engine.train_round(t, method.trained(t))
        synchronize(str(device))  # queued GPU work counts in the interval that queued it
        trained = time.perf_counter()
        snapshots = [engine.get_factors(i) for i in range(args.m)]
        mixed, _ = mix_round(method, t, topology, snapshots)
        for i, factors in enumerate(mixed):
            engine.set_factors(i, factors)
        synchronize(str(device))
        return trained - started, time.perf_counter() - started

    one_round(0)  # warm-up
    train_s, total_s = [], []
    for t in range(1, args.rounds + 1):
        a, b = one_round(t)
        train_s.append(a)
        total_s.append(b)
    steps = args.m * args.local_steps * args.rounds
    gpu = {"gpu_peak_bytes": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}
    return {
        **gpu,
        "maxrss_bytes": _maxrss_bytes(),
        "param_buffer_bytes": param_bytes,
        "client_steps": steps,
        "train_s": float(np.sum(train_s)),
        "round_s": float(np.sum(total_s)),
        "client_steps_per_s": steps / float(np.sum(total_s)),
        "client_steps_per_s_train_only": steps / float(np.sum(train_s)),
    }


def run_worker(args: argparse.Namespace, engine: str, m: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--engine", engine, "--m", str(m),
           "--model", args.model, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--device", args.device]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    # A device the machine lacks, said by the first subprocess, or a model that does not load, by the second: before
    # anything is measured.
    if done.returncode == USAGE:
        print(f"sim_throughput.py: error: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        raise SystemExit(USAGE)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} m={m} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(engine=engine, m=m, subprocess_wall_s=time.perf_counter() - started)
    print(f"{engine:>10} m={m:<4} {json.dumps({k: v for k, v in result.items() if 'per_s' in k or 'rss' in k})}",
          flush=True)  # fmt: skip
    return result


def schedule(clients: Sequence[int], engines: Sequence[str], repeat: int) -> list[tuple[int, int, str]]:
    """(m, turn, engine) in run order: per m, the engines take turns ``repeat`` times, every other turn in reverse
    (A B B A ...), so that a drift in the shared machine's load hits every engine alike."""
    return [
        (m, turn, engine)
        for m in clients
        for turn in range(repeat)
        for engine in (engines if turn % 2 == 0 else list(reversed(engines)))
    ]


def summarize(runs: Sequence[dict], engines: Sequence[str]) -> list[dict]:
    """Per (m, engine): median client-steps/s (train+mix, train only), median peak RSS, and the median over turns of
    its speed / the first engine's speed in the same turn (1.0 for the first engine)."""
    out = []
    for m in dict.fromkeys(r["m"] for r in runs):
        by = {(r["engine"], r["turn"]): r for r in runs if r["m"] == m}
        turns = sorted({t for _, t in by})
        for engine in engines:
            mine = [by[engine, t] for t in turns if (engine, t) in by]
            ratios = [by[engine, t]["client_steps_per_s"] / by[engines[0], t]["client_steps_per_s"]
                      for t in turns if (engine, t) in by and (engines[0], t) in by]  # fmt: skip
            out.append({
                "engine": engine, "m": m, "turns": len(mine),
                "client_steps_per_s": statistics.median(r["client_steps_per_s"] for r in mine),
                "client_steps_per_s_train_only": statistics.median(r["client_steps_per_s_train_only"] for r in mine),
                "maxrss_bytes": statistics.median(r["maxrss_bytes"] for r in mine),
                **({"gpu_peak_bytes": statistics.median(r["gpu_peak_bytes"] for r in mine)}
                   if "gpu_peak_bytes" in mine[0] else {}),
                "speed_over_first_engine": statistics.median(ratios),
                "speed_over_first_engine_all": ratios,
            })  # fmt: skip
    return out


HEADERS = ["engine", "m", "turns", "client-steps/s (train+mix)", "client-steps/s (train)",
           "speed / {first} (same turn)", "peak RSS MiB", "m x params+buffers MiB",
           "m one-model processes MiB (libraries once)", "m processes / simulator RSS"]  # fmt: skip
GPU_HEADERS = ["GPU peak MiB", "m x params+buffers / GPU peak"]  # a run on a GPU: what its memory holds


def table(data: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    """The Markdown table's headers and rows, from the JSON's fields (memory in MiB); a run on a GPU adds the GPU's
    peak allocation, against the parameters and buffers of m models that m one-GPU daemons would hold there."""
    mib = 2**20
    gpu = "gpu_peak_bytes" in data["summary"][0]  # what the runs measured, whatever --device said
    headers = [h.format(first=data["summary"][0]["engine"]) for h in HEADERS] + (GPU_HEADERS if gpu else [])
    rows = [
        (r["engine"], r["m"], r["turns"], r["client_steps_per_s"], r["client_steps_per_s_train_only"],
         f"{r['speed_over_first_engine']:.2f}", r["maxrss_bytes"] / mib, r["m_params_buffers_bytes"] / mib,
         r["m_processes_bytes"] / mib, r["m_processes_bytes"] / r["maxrss_bytes"])
        + ((r["gpu_peak_bytes"] / mib, r["m_params_buffers_bytes"] / r["gpu_peak_bytes"]) if gpu else ())
        for r in data["summary"]
    ]  # fmt: skip
    return headers, rows


def check_clients(parser: argparse.ArgumentParser, clients: Sequence[int]) -> None:
    """Refuse an m the label-skewed split cannot serve now, not after the configurations before it have run. No
    torch here: a subprocess's ru_maxrss starts from this process's peak (exec keeps it), so this one stays small."""
    from tadlora.data import resolve_dataset
    from tadlora.workload import client_shards

    train_data = resolve_dataset(DATASET, "train")
    for m in clients:
        if m < 1:
            parser.error(f"--clients: {m} is not a number of clients")
        try:
            shards = client_shards(train_data, "label-skew", m, 0, SAMPLES_PER_CLIENT)
        except ValueError as exc:
            parser.error(f"--clients {m}: {exc}")
        # SAMPLES_PER_CLIENT is a cap: a split that serves fewer would time m clients on other shards than the rest
        if (least := min(len(s) for s in shards)) < SAMPLES_PER_CLIENT:
            parser.error(
                f"--clients {m}: the label-skewed split of {DATASET} gives a client {least} examples, fewer than "
                f"the {SAMPLES_PER_CLIENT} every m is measured with"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default) or minilm")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 32, 100])
    parser.add_argument("--engines", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched"],
                        help="the first is the baseline of the speed ratio")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after one warm-up round")
    parser.add_argument("--repeat", type=int, default=3, help="turns of the engines per m, alternating order")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, cuda:N or auto: where each subprocess's model runs"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    # Before the two baseline subprocesses: each worker would otherwise fail on its TrainSpec after they ran.
    check_train_args(parser, args)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    clients = list(dict.fromkeys(args.clients))
    check_clients(parser, clients)
    imports = run_worker(args, "imports", 0)
    one = run_worker(args, "model", 1)
    engines = list(dict.fromkeys(args.engines))
    runs = [
        {**run_worker(args, engine, m), "turn": turn} for m, turn, engine in schedule(clients, engines, args.repeat)
    ]
    summary = summarize(runs, engines)
    for r in summary:  # in the JSON too, so that the table's memory columns can be checked against it
        r["m_params_buffers_bytes"] = r["m"] * one["param_buffer_bytes"]
        r["m_processes_bytes"] = separate_processes_bytes(r["m"], one)
    mib = 2**20
    notes = (
        f"Model {args.model}: one model's parameters + buffers = {one['param_buffer_bytes'] / mib:.1f} MiB; peak RSS "
        f"of a process that only imports = {imports['maxrss_bytes'] / mib:.0f} MiB, that builds one model = "
        f"{one['maxrss_bytes'] / mib:.0f} MiB (file-backed at its end: {one['rss_file_bytes'] / mib:.0f} MiB, the "
        "libraries' pages, which m processes share: 'm one-model processes' counts them once and the rest of the "
        f"peak m times). Local steps {args.local_steps}, batch {args.batch_size}, length "
        f"{args.max_length}; {args.rounds} timed rounds after a warm-up round; method tad, ER graph p = {LINK_PROB}. "
        f"Each (engine, m) ran {args.repeat} times, the engines taking turns per m in alternating order; medians "
        "over the turns, and the speed ratio is the median of each turn's ratio. One torch thread per subprocess, on "
        "a shared machine: compare rows of this table, not with other runs. "
        "The one-model process builds a model without training it, so 'm one-model processes' leaves out what m "
        "training daemons would add for training (activations, gradients, optimizer state)."
        + (
            ""
            if one["device"] == "cpu"
            else f" Models on {one['device']}: the GPU peak is torch's peak allocation there."
        )
    )
    data = {"model": args.model, "device": one["device"],
            "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "max_length": args.max_length},
            "rounds": args.rounds, "repeat": args.repeat, "imports_only": imports, "one_model": one,
            "summary": summary, "runs": runs}  # fmt: skip
    headers, rows = table(data)
    write_results("sim_throughput", data, headers, rows, notes, out=args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
