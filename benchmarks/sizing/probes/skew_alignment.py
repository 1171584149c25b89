"""How much of a descent step survives when label-skewed clients each take their own AdamW step and average them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sizing/probes/skew_alignment.py [--checkpoint CKPT --client I]

A fresh AdamW's first step is lr * sign(grad). Ten clients that each take that step on their own data and then
average (what one mixing round does at consensus) move the model by lr * mean_i sign(g_i); a single learner with
all their data moves by lr * sign(mean_i g_i). Plain SGD's average is lr * mean_i g_i, the same as central SGD's.
This measures, on MiniLM/MNLI with the cpu-mnli settings, how much each direction lowers the loss on a balanced
(IID) sample: the first-order descent d . g_ref, with g_ref that sample's gradient, relative to the descent of a
central AdamW step on the same sample (sign(g_ref) . g_ref). It does so for the paper's dominant share 0.9 and
milder ones, at the shared init (B = 0: B alone has a gradient) or at a simulator checkpoint's factors.

Each client's gradient is the mean over BATCHES batches of 16 of its own shard (eval mode: no dropout, so the
spread comes from the data alone). Results: docs/simulator.md (MNLI sizing).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
from tadlora.core.factors import Factor
from tadlora.data import make_shards, resolve_dataset
from tadlora.training import Encoded, encode

SHARES = (1 / 3, 0.5, 0.6, 0.7, 0.8, 0.9)
CLIENTS = 10
BATCH = 16


def flat_grad(model: AdapterModel, data: Encoded, rows: np.ndarray, trained: frozenset[Factor]) -> torch.Tensor:
    """The mean loss gradient over ``rows`` (in batches of 16) of the factors in ``trained``, flattened."""
    params = model.set_trainable(trained)
    try:
        model.model.eval()
        total = [torch.zeros_like(p) for p in params]
        for start in range(0, len(rows), BATCH):
            batch = data.batch(rows[start : start + BATCH], model.device)
            logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits, batch["labels"]) * len(batch["labels"]) / len(rows)
            grads = torch.autograd.grad(loss, params)
            for acc, g in zip(total, grads, strict=True):
                acc += g
    finally:
        model.set_trainable(frozenset())
    return torch.cat([g.flatten() for g in total])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 per client gradient")
    parser.add_argument("--reference", type=int, default=512, help="IID examples in the reference gradient")
    parser.add_argument("--checkpoint", help="a simulator cell checkpoint (.ckpt.safetensors) to take factors from")
    parser.add_argument("--client", type=int, default=0, help="which client's factors to take from the checkpoint")
    parser.add_argument("--factor", choices=("A", "B"), default="B", help="the factor whose step is measured")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = resolve_dataset("glue:MNLI", "train")
    spec = ModelSpec(model="minilm", label_names=tuple(train.label_names), lora=LoraSpec(r=8, alpha=16.0), seed=0)
    model = AdapterModel(spec)
    where = "shared init (B = 0)"
    if args.checkpoint:
        saved = load_file(args.checkpoint)
        prefix = f"{args.client}/"
        model.load_factors({k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)})
        where = f"{args.checkpoint}, client {args.client}"
    data = encode(model.tokenizer, train, 96)
    trained = frozenset({Factor[args.factor]})
    rng = np.random.default_rng(0)
    ref_rows = np.sort(rng.choice(len(train), args.reference, replace=False))
    g_ref = flat_grad(model, data, ref_rows, trained)
    central_sign = float(torch.sign(g_ref) @ g_ref)
    print(f"factor {args.factor} at {where}; |g_ref| = {float(g_ref.norm()):.3e} over {args.reference} IID pairs")
    print("descent on the IID sample, relative to one central AdamW step on it (sign(g_ref) . g_ref = 1):")
    print("share  mean_i sign(g_i)  sign(mean_i g_i)  cos(mean_i sign(g_i), g_ref)  |mean g_i| / mean |g_i|")
    for share in SHARES:
        scheme = "iid" if share < 0.34 else f"label-skew@{share}"
        shards = make_shards(train, scheme, CLIENTS, seed=0)
        grads = []
        for shard in shards:
            rows = np.sort(rng.choice(shard, args.batches * BATCH, replace=False))
            grads.append(flat_grad(model, data, rows, trained))
        g = torch.stack(grads)
        mean_sign = torch.sign(g).mean(dim=0)
        sign_mean = torch.sign(g.mean(dim=0))
        cos = float(mean_sign @ g_ref / (mean_sign.norm() * g_ref.norm()))
        coherence = float(g.mean(dim=0).norm() / g.norm(dim=1).mean())
        print(
            f"{scheme:>15s}  {float(mean_sign @ g_ref) / central_sign:16.3f}  "
            f"{float(sign_mean @ g_ref) / central_sign:16.3f}  {cos:28.3f}  {coherence:23.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
