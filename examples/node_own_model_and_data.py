"""Two nodes on your own model and data, with static peers instead of mDNS.

Each node gets the same model, dataset, --num-shards, --method and --seed, and its own --shard, port and --out.
Here the model is `tiny` (built from a config: seconds) and the data a generated JSONL file. For yours, give this
script `--model /path/to/hf-model`, and give the nodes `--dataset /path/to/train.jsonl?text=sentence&label=label`
(the `--dataset` entry of `common` below; this script has no --dataset flag); a dev.jsonl beside the train file
is used for evaluation. `tiny` has random weights, so its accuracy stays near chance (about 0.5) in these few
rounds: the run shows the workflow, not learning; a pretrained model (`--model minilm`) is what learns.

    python examples/node_own_model_and_data.py --out runs/own-nodes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from sim_own_model_and_data import WORDS


def write_jsonl(folder: Path) -> Path:
    rng = random.Random(  # noqa: S311 - toy data, not security
        1
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", 300), ("dev.jsonl", 60)):
        with (folder / name).open("w") as f:
            for _ in range(n):
                label = rng.randint(0, 1)
                f.write(json.dumps({"sentence": " ".join(rng.choice(WORDS[label]) for _ in range(4)), "label": label}))
                f.write("\n")
    return folder / "train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (default: random weights, seconds), minilm, a Hugging Face model id or a local path",
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds each node runs (default: 4)")
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for the generated data (data/) and the nodes' own-0/, own-1/"
    )
    args = parser.parse_args()
    data = write_jsonl(args.out / "data")
    ports = [free_port(), free_port()]
    common = [
        "--model", args.model, "--dataset", f"{data}?text=sentence&label=label", "--num-shards", "2",
        "--rounds", str(args.rounds), "--min-peers", "1", "--local-steps", "4", "--batch-size", "8",
        "--max-length", "16", "--eval-every", "2", "--lr", "5e-3", "--log-format", "text",
        "--insecure",  # plaintext on loopback for brevity; see examples/local_cluster.py for TLS
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(2):
            cmd = [
                sys.executable, "-m", "tadlora.node.entry", *common, "--shard", str(i), "--node-id", f"own-{i}",
                "--listen", f"127.0.0.1:{ports[i]}", "--peers", f"127.0.0.1:{ports[1 - i]}",
                "--out", str(args.out / f"own-{i}"),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + 600
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    finally:
        # However this ends (the 10-minute limit, an error, Ctrl-C), no node is left running.
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"exit codes {codes}; adapters in {args.out}/own-*/adapter")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
