"""How far MiniLM's classification head is from the paper's, and what that does to learning MNLI.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sizing/probes/head_gain.py [--steps 300 --every 50]

The paper's RoBERTa head is dense(random, std 0.02) + tanh + out_proj(random), both frozen. MiniLM loads as a
BertForSequenceClassification: the pooler (dense + tanh on the [CLS] state) is *pretrained* and only the final
linear layer is random. This probe measures, at the shared init, the sizes along that path — the [CLS] state,
the pooled vector, the logits' spread over examples — with the pretrained pooler and with the pooler re-drawn
as the paper's random dense layer (std 0.02, bias 0). Then it trains one client on an IID sample of the MNLI
train subset with each head (AdamW 1e-3, moments kept across the whole run, both factors, batch 16, length 96)
and evaluates on the first 500 dev_matched pairs every EVERY steps: if the small logits of the pretrained pooler
are what hold the ~250-step plateau, the random pooler leaves chance earlier. Results: docs/simulator.md
(MNLI sizing).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from torch import nn

from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec
from tadlora.core.factors import Factor
from tadlora.data import resolve_dataset
from tadlora.training import Encoded, OptimizerState, TrainSpec, encode, evaluate, local_steps

LENGTH = 96
DEV = 500


def pooler_dense(model: AdapterModel) -> nn.Linear:
    """The pooler's dense layer (BERT-family models)."""
    for name, module in model.model.named_modules():
        if name.endswith("pooler.dense") and isinstance(module, nn.Linear):
            return module
    raise SystemExit("this model has no pooler.dense: the probe is for BERT-family encoders")


@torch.no_grad()
def head_sizes(model: AdapterModel, data: Encoded, n: int = 128) -> dict[str, float]:
    """Mean norms of the [CLS] state and the pooled vector, and the logits' std over ``n`` examples."""
    model.model.eval()
    batch = data.batch(np.arange(n), model.device)
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    cls = out.hidden_states[-1][:, 0]
    pooled = torch.tanh(pooler_dense(model)(cls))
    return {
        "cls_norm": float(cls.norm(dim=1).mean()),
        "pooled_norm": float(pooled.norm(dim=1).mean()),
        "logit_std": float(out.logits.std(dim=0).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per head")
    parser.add_argument("--every", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--heads", default="pretrained,random", help="which poolers, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = resolve_dataset("glue:MNLI", "train")
    dev = resolve_dataset("glue:MNLI", "dev")
    spec = ModelSpec(model="minilm", label_names=tuple(train.label_names), lora=LoraSpec(r=8, alpha=16.0), seed=0)
    train_spec = TrainSpec(
        local_steps=args.every,
        batch_size=16,
        max_length=LENGTH,
        lr=1e-3,
        precision="fp32",
        optimizer_state="persistent",
    )
    for head in args.heads.split(","):
        model = AdapterModel(spec)
        if head == "random":
            dense = pooler_dense(model)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                dense.weight.copy_(torch.randn(dense.weight.shape, generator=gen) * 0.02)
                dense.bias.zero_()
        elif head != "pretrained":
            raise SystemExit(f"unknown head {head!r}: pretrained or random")
        train_data = encode(model.tokenizer, train, LENGTH)
        dev_data = encode(model.tokenizer, dev, LENGTH).subset(np.arange(min(DEV, len(dev))))
        sizes = head_sizes(model, dev_data)
        print(f"{head} pooler: " + ", ".join(f"{k} {v:.4f}" for k, v in sizes.items()), flush=True)
        state: OptimizerState = {}
        both = frozenset({Factor.A, Factor.B})
        for chunk in range(args.steps // args.every):
            loss = local_steps(model, train_data, both, train_spec, seed=0, shard=0, t=chunk, state=state)
            acc, eval_loss = evaluate(model, dev_data, precision="fp32")
            step = (chunk + 1) * args.every
            print(f"{head} step {step}: dev acc {acc:.3f}, dev loss {eval_loss:.3f}, train loss {loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
