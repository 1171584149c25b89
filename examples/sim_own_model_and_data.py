"""Run the simulator on your own model and data, from Python.

Your data: a CSV, JSONL or TSV file with a text column (or two, for sentence pairs) and a label column, and a
sibling dev/validation file. `--data` reads the columns named `text` and `label`; for other names or a sentence
pair, edit `?text=text&label=label` in `dataset=` below (e.g. `?text=sentence1,sentence2&label=gold`). Your model:
any Hugging Face sequence-classification model id or local directory (here `tiny`, a 2-layer BERT built from a
config, nothing to load; try `minilm` or a path, each with an --out of its own: a directory keeps one run's
settings). `tiny` has random weights, so its run shows the workflow, not
learning: on this toy data, where every word gives the label away, LoRA still reached 0.97 at round 8 while TAD-LoRA
stayed at chance (0.49). `--model minilm` reached 1.00 with both by round 4. Each run took under a minute on 2
cores that two other jobs were using too.

    python examples/sim_own_model_and_data.py --out runs/own
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from tadlora.adapter import LoraSpec
from tadlora.sim.cli import run_grid
from tadlora.sim.config import SimConfig
from tadlora.training import TrainSpec

WORDS = {0: ["dull", "boring", "awful", "flat", "tedious"], 1: ["great", "moving", "sharp", "funny", "lovely"]}


def write_toy_data(folder: Path, n_train: int = 400, n_dev: int = 100) -> Path:
    """A made-up review dataset with 'text' and 'label' columns (stand-in for your own files)."""
    rng = random.Random(  # noqa: S311 - toy data, not security
        0
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", n_train), ("dev.csv", n_dev)):
        with (folder / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for _ in range(n):
                label = rng.randint(0, 1)
                words = [rng.choice(WORDS[label]) for _ in range(3)] + ["film"]
                writer.writerow([" ".join(rng.sample(words, len(words))), "positive" if label else "negative"])
    return folder / "train.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default), minilm, a HF model id or a local path")
    parser.add_argument("--data", type=Path, help="your train file (default: a generated toy CSV)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory: results.json, cells/, plots (and data/, the toy data, without --data)",
    )
    args = parser.parse_args()
    train_file = args.data or write_toy_data(args.out / "data")
    config = SimConfig(
        name="own-model-and-data",
        model=args.model,
        dataset=f"{train_file}?text=text&label=label",
        num_clients=4,
        split="dirichlet:0.5",
        lora=LoraSpec(r=4, alpha=8.0),
        train=TrainSpec(local_steps=4, batch_size=8, max_length=16, lr=5e-3),
        rounds=8,
        eval_every=4,
        methods=("tad", "lora"),
        link_probs=(0.5,),
        switch_intervals=(2,),
        engine="batched",
        device="cpu",
    )
    # As tadlora-sim runs it: a refusal (an --out holding another run, say of another --model) or a failure is one
    # line and exit 2; a Ctrl-C exits 130, and the same command resumes.
    code, results = run_grid(config, args.out, prog="sim_own_model_and_data.py")
    if results is None:
        return code
    for row in results["summary"]:
        print(f"{row['method']:<6} accuracy {row['acc_mean']:.3f} ± {row['acc_client_std']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
