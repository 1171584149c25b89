"""Start a local cluster of tadlora nodes on this machine and print what they reached.

The nodes are separate `tadlora-node` processes that find each other by mDNS on 127.0.0.1 (nothing leaves the
machine) over mutual TLS with certificates the script makes first, train the packaged MiniLM encoder on the
shipped SST-2 slice (each its own label-skewed shard), mix
their LoRA factors with TAD-LoRA every round, and stop after --rounds. Offline; the default 20 rounds took about
5 minutes on 2 cores that two other jobs were using too (less on an idle machine). With every link up, each round's
mixing leaves the nodes holding the same average adapter, so they report the same accuracy.

    python examples/local_cluster.py                  # 3 nodes, 20 rounds
    python examples/local_cluster.py --nodes 4 --rounds 10 --method lora --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

# The names `tadlora-node --method` takes (tadlora.core.method_names(); importing it here would cost the script
# torch's start-up): a typo is refused here, before certificates are made and nodes started.
METHODS = ("adf", "decaf", "ffa", "lora", "rolora", "tad", "tad-nojoint")
LOG_TAIL = 5  # lines of a failed node's log shown
SERVING = re.compile(r"node node-0 serving on (\S+) ")  # node-0's log line once it serves, with its address


def node_command(i: int, args: argparse.Namespace, cluster: str) -> list[str]:
    return [
        sys.executable, "-m", "tadlora.node.entry",
        "--peers", "auto", "--mdns-interface", "127.0.0.1", "--listen", "127.0.0.1:0",
        "--cluster", cluster, "--node-id", f"node-{i}", "--shard", str(i), "--num-shards", str(args.nodes),
        "--min-peers", str(args.nodes - 1), "--rounds", str(args.rounds), "--method", args.method,
        "--model", args.model, "--eval-every", str(args.eval_every), "--out", str(args.out / f"node-{i}"),
        "--log-format", "text", "--tls-dir", str(args.out / "certs"),
    ]  # fmt: skip


def replaceable(out: Path) -> bool:
    """Whether ``out`` may be deleted to make room for this run: empty, or holding only what a run of this script
    writes (certs/, node-*/, node-*.log). ``--out .`` or a folder of other runs is refused rather than deleted."""
    return all(entry.name == "certs" or entry.name.startswith("node-") for entry in out.iterdir())


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop(procs: list[subprocess.Popen[bytes]], grace: float = 120.0) -> list[int]:
    """Send each node still running ONE SIGINT (graceful: it checkpoints and says goodbye; a second signal would
    mean "exit now, without a checkpoint"), wait up to ``grace`` seconds for them, SIGKILL any left; return the
    exit codes. Nodes that have exited are left alone, so calling it again is harmless."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # a node stuck past the grace period: the script must not leave it running
    return [p.wait() for p in procs]


def status_command(address: str, args: argparse.Namespace) -> str:
    """The command that shows every node of the cluster while it runs, a line each, asked at node-0's ``address``
    with node-0's certificate."""
    # The installed command where there is one (the README's venv); else the module the nodes were started as.
    script = Path(sys.executable).parent / "tadlora-node"
    node = [str(script)] if script.exists() else [sys.executable, "-m", "tadlora.node.entry"]
    certs = (args.out / "certs").resolve()  # absolute: the other shell may be in another directory
    return shlex.join([*node, "status", address, "--all", "--table", "--tls-dir", str(certs), "--node-id", "node-0"])


def wait_with_progress(procs: list[subprocess.Popen[bytes]], args: argparse.Namespace) -> list[int]:
    """Wait for the nodes, printing a line each time node-0 finishes a round (the full logs are in the files), and
    once node-0 serves, the command that shows them all."""
    rounds_file = args.out / "node-0" / "rounds.jsonl"
    node_log = args.out / "node-0.log"
    shown = 0
    hinted = False
    while any(p.poll() is None for p in procs):
        time.sleep(2)
        if not hinted and node_log.exists() and (serving := SERVING.search(node_log.read_text(errors="replace"))):
            print(f"to see every node while they run, in another shell: {status_command(serving[1], args)}",
                  flush=True)  # fmt: skip
            hinted = True
        text = rounds_file.read_text() if rounds_file.exists() else ""
        lines = text.split("\n")[:-1]  # whole lines only: the node may be writing the last one
        for line in lines[shown:]:
            r = json.loads(line)
            acc = f", dev accuracy {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else ""
            print(f"node-0 round {r['round'] + 1}/{args.rounds} (phase {r['phase']}): loss {r['loss']:.4f}, "
                  f"{r['degree']} neighbours, {r['seconds']:.0f} s{acc}", flush=True)  # fmt: skip
        shown = max(shown, len(lines))
    return [p.wait() for p in procs]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default in --help."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes")
    parser.add_argument("--rounds", type=int, default=20, help="rounds each node runs")
    parser.add_argument("--method", default="tad", choices=METHODS, help="decentralized LoRA method (README, Methods)")
    parser.add_argument("--model", default="minilm", help="minilm (packaged, offline) or tiny (random: seconds, a try)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/local-cluster"),
        help="output directory (a previous run of this script in it is replaced)",
    )
    args = parser.parse_args()
    if args.out.exists():
        if not args.out.is_dir() or not replaceable(args.out):
            parser.error(f"--out {args.out} holds files this script did not write; give a new or empty directory")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    cluster = f"demo-{uuid.uuid4().hex[:8]}"  # never mixes with another demo running on this machine
    # Mutual TLS, as in production: a cluster CA and one certificate per node (tadlora-node certs ...).
    certs = [sys.executable, "-m", "tadlora.node.entry", "certs"]
    subprocess.run([*certs, "init", str(args.out / "certs"), "--cluster", cluster], check=True, capture_output=True)
    for i in range(args.nodes):
        issue = [*certs, "issue", f"node-{i}", "--dir", str(args.out / "certs")]
        subprocess.run(issue, check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the nodes share the machine's cores
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop the nodes the same way when this script is stopped
        signal.signal(sig, interrupt)
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    print(f"starting {args.nodes} nodes (cluster {cluster}); logs in {args.out}/node-*.log", flush=True)
    try:
        try:
            for i in range(args.nodes):
                # A session of their own: Ctrl-C on a terminal reaches this script only, which then sends each node
                # ONE SIGINT (a node takes a second signal as "exit now, without a checkpoint").
                cmd = node_command(i, args, cluster)
                with (args.out / f"node-{i}.log").open("w") as log:  # the node holds its own copy of the file
                    procs.append(
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                    )
            codes = wait_with_progress(procs, args)
        except KeyboardInterrupt:
            codes = stop(procs)
    finally:
        # Any other way out (an error here, a second Ctrl-C while they stop): the nodes are in sessions of their
        # own, so nothing else would stop them.
        stop(procs)
    print(f"finished in {time.monotonic() - started:.0f} s; exit codes {codes}")
    for i in range(args.nodes):
        rounds_file = args.out / f"node-{i}" / "rounds.jsonl"
        records = [json.loads(line) for line in rounds_file.read_text().splitlines()] if rounds_file.exists() else []
        curve = ", ".join(f"r{r['round'] + 1}: {r['eval_accuracy']:.3f}" for r in records if "eval_accuracy" in r)
        degree = records[-1]["degree"] if records else 0
        print(f"node-{i}: {len(records)} rounds, {degree} neighbours, dev accuracy {curve or 'n/a'}")
        if codes[i] != 0:  # say why, rather than leave only an exit code
            log = args.out / f"node-{i}.log"
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:] if log.exists() else []
            print(f"node-{i} failed (exit code {codes[i]}); the end of {log}:")
            print("\n".join(f"    {line}" for line in tail) or "    (empty)")
    print(f"adapters (peft format): {args.out}/node-*/adapter")
    if all(c == 0 for c in codes):
        # Absolute paths, as for the status command above: the example runs from anywhere.
        classify = Path(__file__).resolve().parent / "classify_with_adapter.py"
        adapter = (args.out / "node-0" / "adapter").resolve()
        print(f"to classify with it: {shlex.quote(sys.executable)} {shlex.quote(str(classify))} "
              f"{shlex.quote(str(adapter))} 'a gripping, funny film' 'dull and far too long'")  # fmt: skip
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
