"""fp32 against bf16 autocast on the CPU: local-step speed side by side, and what bf16 does to learning.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision.py [--rounds 20] [--speed-blocks 4]

The workload is a `cpu-sst2` client's: MiniLM-L6 with LoRA r=8 on query/value, GLUE SST-2, batch 16, length 64,
AdamW 1e-3, 10 local steps a round, one torch thread.
* speed: blocks of 5 local steps, fp32 and bf16 taking turns from the same factors (so both see the same load
  on a shared machine); the median seconds per step of each and their ratio;
* learning: one client on 2,000 IID training sentences, ``--rounds`` rounds of 10 steps from the same seeded
  init in each precision, dev accuracy on 500 sentences every 5 rounds, and how far bf16's first-round update
  is from fp32's (relative Frobenius distance of the factor updates).
The factors and the optimizer stay fp32 in both; bf16 autocast only lowers the matmuls' inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import statistics
import sys
import time

from _common import add_out_argument, run_main, write_results

DATASET = "glue:SST-2"
SAMPLES = 2000
EVAL_SAMPLES = 500
STEPS_PER_ROUND = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="learning: rounds of 10 steps per precision")
    parser.add_argument("--speed-blocks", type=int, default=4, help="speed: blocks of 5 steps per precision")
    add_out_argument(parser)
    args = parser.parse_args()
    # Checked before minutes of model and data loading: 0 rounds has no first update to compare, 0 blocks no speed.
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.speed_blocks < 1:
        parser.error(f"--speed-blocks must be >= 1, got {args.speed_blocks}")

    import torch

    from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
    from tadlora.core.factors import BOTH
    from tadlora.data import resolve_dataset
    from tadlora.training import TrainSpec, encode, evaluate, local_steps
    from tadlora.workload import client_shards, eval_subset

    torch.set_num_threads(1)
    train_data = resolve_dataset(DATASET, "train")
    model = AdapterModel(ModelSpec(model="minilm", label_names=train_data.label_names, lora=LoraSpec(), seed=0))
    fp32 = TrainSpec(local_steps=STEPS_PER_ROUND, batch_size=16, max_length=64, lr=1e-3, precision="fp32")
    specs = {"fp32": fp32, "bf16": dataclasses.replace(fp32, precision="bf16")}
    [shard] = client_shards(train_data, "iid", 1, 0, SAMPLES)
    data = encode(model.tokenizer, train_data, fp32.max_length).subset(shard)
    dev = encode(model.tokenizer, eval_subset(resolve_dataset(DATASET, "dev"), EVAL_SAMPLES), fp32.max_length)
    init = model.factors()

    # Speed: the two precisions take turns, block by block, from the same factors.
    per_step: dict[str, list[float]] = {name: [] for name in specs}
    for block in range(args.speed_blocks + 1):  # block 0 warms both up and is not counted
        for name, spec in specs.items():
            model.load_factors(init)
            started = time.perf_counter()
            local_steps(model, data, BOTH, dataclasses.replace(spec, local_steps=5), 0, 0, block)
            if block:
                per_step[name].append((time.perf_counter() - started) / 5)
    speed = {name: statistics.median(v) for name, v in per_step.items()}
    print(f"speed: {speed} s per step", flush=True)

    # Learning: the same seeded run in each precision.
    curves: dict[str, list[tuple[int, float, float]]] = {}
    first_update = {}
    for name, spec in specs.items():
        model.load_factors(init)
        curves[name] = []
        for t in range(args.rounds):
            loss = local_steps(model, data, BOTH, spec, 0, 0, t)
            if t == 0:
                first_update[name] = {k: v - init[k] for k, v in model.factors().items()}
            if (t + 1) % 5 == 0 or t == args.rounds - 1:
                acc, _ = evaluate(model, dev, precision=spec.precision)
                curves[name].append((t + 1, loss, acc))
                print(f"{name} round {t + 1}: loss {loss:.3f} acc {acc:.3f}", flush=True)
    num = sum(float((first_update["bf16"][k] - first_update["fp32"][k]).norm() ** 2) for k in init) ** 0.5
    den = sum(float(first_update["fp32"][k].norm() ** 2) for k in init) ** 0.5
    update_distance = num / den

    rows = [[f[0], f[1], b[1], f[2], b[2]] for f, b in zip(curves["fp32"], curves["bf16"], strict=True)]
    ratio = speed["fp32"] / speed["bf16"]
    notes = (
        f"Speed (median of {args.speed_blocks} blocks of 5 steps each, taking turns): fp32 {speed['fp32'] * 1000:.0f} "
        f"ms per step, bf16 {speed['bf16'] * 1000:.0f} ms per step: **bf16 is {ratio:.2f}x fp32's speed**.\n"
        f"bf16's first-round update differs from fp32's by {update_distance:.3f} of its norm (relative Frobenius)."
    )
    write_results(
        "precision",
        {
            "workload": {"dataset": DATASET, "samples": SAMPLES, "eval_samples": EVAL_SAMPLES, "train": fp32.__dict__},
            "seconds_per_step": speed,
            "seconds_per_step_blocks": per_step,
            "speed_ratio_bf16_over_fp32": ratio,
            "first_update_relative_distance": update_distance,
            "curves": curves,
        },
        ["round", "train loss fp32", "train loss bf16", "dev acc fp32", "dev acc bf16"],
        rows,
        notes,
        out=args.out,
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
