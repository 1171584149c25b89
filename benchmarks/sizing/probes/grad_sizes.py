"""How large the LoRA factors' gradients are on MiniLM/MNLI: what plain SGD's lr must be to move like AdamW.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sizing/probes/grad_sizes.py

A fresh AdamW's first step moves every coordinate with a gradient by about lr (1e-3 in the presets), whatever the
gradient's size; SGD moves it by lr x |grad|. This prints the mean and median |grad| of A and B on one batch of 16
MNLI pairs (length 96, the cpu-mnli settings) at the shared init and after 10, 20 and 30 AdamW steps of one client,
so that an SGD lr can be chosen as about 1e-3 / |grad| instead of guessed. Results: docs/simulator.md (MNLI).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import torch.nn.functional as F

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
from tadlora.core.factors import Factor, factor_of
from tadlora.data import resolve_dataset
from tadlora.training import Encoded, TrainSpec, encode, local_steps

BOTH = frozenset({Factor.A, Factor.B})


def grad_sizes(model: AdapterModel, data: Encoded) -> dict[str, tuple[float, float]]:
    """(mean, median) |grad| per factor on the first 16 examples, in training mode (dropout on, as in a step)."""
    params = model.set_trainable(BOTH)
    try:
        model.model.train()
        batch = data.batch(np.arange(16), model.device)
        logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        sizes: dict[str, list[torch.Tensor]] = {}
        for name, p in model.model.named_parameters():
            if p.grad is not None and "lora_" in name:
                sizes.setdefault("A" if "lora_A" in name else "B", []).append(p.grad.detach().abs().flatten())
        for p in params:
            p.grad = None
    finally:
        model.set_trainable(frozenset())
    return {f: (float(torch.cat(v).mean()), float(torch.cat(v).median())) for f, v in sorted(sizes.items())}


def main() -> None:
    torch.set_num_threads(1)
    train = resolve_dataset("glue:MNLI", "train")
    spec = ModelSpec(model="minilm", label_names=tuple(train.label_names), lora=LoraSpec(r=8, alpha=16.0), seed=0)
    model = AdapterModel(spec)
    assert {factor_of(k) for k in model.factors()} == set(BOTH)
    data = encode(model.tokenizer, train.subset(np.arange(2000)), 96)
    steps = TrainSpec(local_steps=10, batch_size=16, max_length=96, lr=1e-3)
    print("steps  factor  mean|grad|  median|grad|  SGD lr moving like AdamW 1e-3 (from the mean)")
    for done in range(0, 40, 10):
        if done:
            local_steps(model, data, BOTH, steps, seed=0, shard=0, t=done // 10 - 1)
        for factor, (mean, median) in grad_sizes(model, data).items():
            lr = f"{1e-3 / mean:.0f}" if mean > 0 else "-"
            print(f"{done:5d}  {factor:6s}  {mean:10.2e}  {median:12.2e}  {lr}")


if __name__ == "__main__":
    main()
