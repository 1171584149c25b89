"""Client engines: how the simulator runs m clients' local steps on ONE shared frozen base model.

* `SequentialEngine` swaps each client's factors into the one peft model and calls the same
  `tadlora.training.local_steps` the daemon calls: the reference, bit-for-bit what a node on the same kind of
  device computes (a GPU's dropout masks are not a CPU's: see `tadlora.training`).
* `BatchedEngine` runs all clients in one forward/backward pass: the base model is shared, so client i's
  batch only differs in its LoRA update, which a hook on every adapted layer adds with a batched matmul over
  per-client stacked factors (m, r, in) and (m, out, r). AdamW and SGD are elementwise, so one optimizer over the
  stacks is exactly m per-client optimizers, and the summed per-client mean losses give each client's slice
  its own gradient. It agrees with the sequential engine to float tolerance (tested) and is faster.

With ``TrainSpec.optimizer_state == "persistent"`` both keep each client's AdamW state across rounds (the
batched engine as (m, ...) stacks beside the factors' stacks; every client trains the same factors in the same
rounds, so one step count serves them all), and expose it per client for checkpoints.

Neither engine ever holds more than one copy of the base weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tadlora.adapter import AdapterModel
from tadlora.core.factors import Factor, Factors, factor_key, factor_of, modules
from tadlora.training import (
    DROPOUT_STREAM,
    Encoded,
    OptimizerState,
    TrainSpec,
    autocast,
    eval_batches,
    evaluate,
    local_steps,
    make_optimizer,
    model_inputs,
    round_batches,
    seeded_rng,
)

BATCHED_STREAM = 2  # the batched engine's dropout key: (seed, t, DROPOUT_STREAM, BATCHED_STREAM)


class ClientEngine(Protocol):
    """What the simulator needs from an engine."""

    num_clients: int

    def get_factors(self, i: int) -> Factors: ...
    def set_factors(self, i: int, factors: Factors) -> None: ...
    def train_round(self, t: int, trained: frozenset[Factor]) -> list[float]: ...
    def evaluate(self) -> list[tuple[float, float]]: ...
    def get_optimizer_state(self, i: int) -> OptimizerState: ...
    def set_optimizer_state(self, i: int, state: OptimizerState) -> None: ...
    def close(self) -> None: ...


class SequentialEngine:
    """One client at a time through the shared peft model (the daemon's exact code path)."""

    def __init__(self, model: AdapterModel, shards: Sequence[Encoded], dev: Encoded, spec: TrainSpec, seed: int):
        self.model, self.shards, self.dev, self.spec, self.seed = model, list(shards), dev, spec, seed
        self.num_clients = len(self.shards)
        init = model.initial_factors()  # never what an earlier cell left in the shared model
        self._factors = [{k: v.clone() for k, v in init.items()} for _ in self.shards]
        self._states: list[OptimizerState] = [{} for _ in self.shards]

    def get_factors(self, i: int) -> Factors:
        return {k: v.clone() for k, v in self._factors[i].items()}

    def get_optimizer_state(self, i: int) -> OptimizerState:
        """Client ``i``'s persistent optimizer state (empty when the state is fresh each round)."""
        return {k: v.clone() for k, v in self._states[i].items()}

    def set_optimizer_state(self, i: int, state: OptimizerState) -> None:
        self._states[i] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def set_factors(self, i: int, factors: Factors) -> None:
        self._factors[i] = {k: v.detach().to("cpu", copy=True) for k, v in factors.items()}

    def train_round(self, t: int, trained: frozenset[Factor]) -> list[float]:
        losses = []
        for i, shard in enumerate(self.shards):
            self.model.load_factors(self._factors[i])
            losses.append(local_steps(self.model, shard, trained, self.spec, self.seed, i, t, state=self._states[i]))
            self._factors[i] = self.model.factors()
        return losses

    def evaluate(self) -> list[tuple[float, float]]:
        out = []
        for i in range(self.num_clients):
            self.model.load_factors(self._factors[i])
            out.append(evaluate(self.model, self.dev, precision=self.spec.precision))
        return out

    def close(self) -> None:
        """Put the run seed's initial factors back into the shared model (it holds a client's until then)."""
        self.model.load_factors(self.model.initial_factors())


class BatchedEngine:
    """All clients in one pass through the shared base, with per-client LoRA factors stacked."""

    def __init__(
        self,
        model: AdapterModel,
        shards: Sequence[Encoded],
        dev: Encoded,
        spec: TrainSpec,
        seed: int,
        max_group_sequences: int = 256,
        eval_batch_size: int = 64,
    ):
        self.model, self.shards, self.dev, self.spec, self.seed = model, list(shards), dev, spec, seed
        self.num_clients = m = len(self.shards)
        self.device = model.device
        self.scaling = model.spec.lora.scaling
        self.dropout = model.spec.lora.dropout
        self.eval_batch_size = eval_batch_size
        self.train_group = max(1, min(m, max_group_sequences // spec.batch_size))
        self.eval_group = max(1, min(m, max_group_sequences // eval_batch_size))
        init = model.initial_factors()  # never what an earlier cell left in the shared model
        self.keys = list(init)
        # stacks[key]: (m, *shape) leaf tensor holding every client's copy of that factor
        self.stacks: dict[str, torch.Tensor] = {
            k: v.to(self.device).unsqueeze(0).repeat(m, *([1] * v.dim())).contiguous() for k, v in init.items()
        }
        # With persistent optimizer state: the AdamW state of each stack, kept between rounds (see the module doc).
        self._opt: dict[str, dict[str, torch.Tensor]] = {}
        self._group: tuple[int, int] | None = None
        self._hooks = [
            model.model.get_submodule(module).register_forward_hook(self._make_hook(module)) for module in modules(init)
        ]

    def close(self) -> None:
        """Remove the hooks, leaving the shared model as it was."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _make_hook(self, module: str) -> Any:
        ka, kb = factor_key(module, Factor.A), factor_key(module, Factor.B)

        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._group is None:
                return output
            lo, hi = self._group
            x = args[0]
            xs = x.reshape(hi - lo, -1, x.shape[-1])
            if self.dropout and self.model.model.training:
                xs = F.dropout(xs, p=self.dropout, training=True)
            a, b = self.stacks[ka][lo:hi], self.stacks[kb][lo:hi]
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2).to(xs.dtype)), b.transpose(1, 2).to(xs.dtype))
            return output + (delta * self.scaling).reshape(output.shape).to(output.dtype)

        return hook

    def get_factors(self, i: int) -> Factors:
        return {k: s[i].detach().to("cpu", copy=True) for k, s in self.stacks.items()}

    def set_factors(self, i: int, factors: Factors) -> None:
        with torch.no_grad():
            for k in self.keys:
                self.stacks[k][i].copy_(factors[k])

    def get_optimizer_state(self, i: int) -> OptimizerState:
        """Client ``i``'s slice of the persistent optimizer state (empty when the state is fresh each round)."""
        out: OptimizerState = {}
        for k, entry in self._opt.items():
            out[f"{k}/exp_avg"] = entry["exp_avg"][i].detach().to("cpu", copy=True)
            out[f"{k}/exp_avg_sq"] = entry["exp_avg_sq"][i].detach().to("cpu", copy=True)
            out[f"{k}/step"] = entry["step"].detach().to("cpu", copy=True)
        return out

    def set_optimizer_state(self, i: int, state: OptimizerState) -> None:
        """Write client ``i``'s slice. Every client holds state for the same factors at the same step count
        (they train in lockstep), so a slice that disagrees with the others' step is an error."""
        for key in {name.rsplit("/", 1)[0] for name in state}:
            stack = self.stacks[key]
            step = state[f"{key}/step"].detach().to("cpu", torch.float32)
            entry = self._opt.setdefault(
                key, {"exp_avg": torch.zeros_like(stack), "exp_avg_sq": torch.zeros_like(stack), "step": step.clone()}
            )
            if float(entry["step"]) != float(step):
                raise ValueError(f"optimizer state of {key}: client {i} is at step {float(step)}, "
                                 f"the others at {float(entry['step'])}")  # fmt: skip
            entry["exp_avg"][i].copy_(state[f"{key}/exp_avg"])
            entry["exp_avg_sq"][i].copy_(state[f"{key}/exp_avg_sq"])

    def _forward(self, group: tuple[int, int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._group = group
        try:
            # peft's own LoRA path is switched off; the hooks add every client's update instead.
            with self.model.model.disable_adapter(), autocast(self.device, self.spec.precision):
                out = self.model.model(**model_inputs(batch))
            logits: torch.Tensor = out.logits
            return logits.float()
        finally:
            self._group = None
            # peft's exit from disable_adapter turns requires_grad back on for the model's own factors (and the
            # head's copy): this engine trains neither, it trains its stacks.
            self.model.set_trainable(frozenset())
            self.model.refreeze()

    def _groups(self, size: int) -> list[tuple[int, int]]:
        return [(lo, min(self.num_clients, lo + size)) for lo in range(0, self.num_clients, size)]

    def train_round(self, t: int, trained: frozenset[Factor]) -> list[float]:
        spec = self.spec
        params = {}
        for k, s in self.stacks.items():
            s.requires_grad_(factor_of(k) in trained)
            if factor_of(k) in trained:
                params[k] = s
        optimizer = make_optimizer(list(params.values()), spec)
        if spec.persistent:  # the stacks' state, not per-client slices: no copies through the CPU
            for k, p in params.items():
                if k in self._opt:
                    optimizer.state[p] = self._opt[k]
        plans = [
            round_batches(self.seed, i, t, len(shard), spec.batch_size, spec.local_steps)
            for i, shard in enumerate(self.shards)
        ]
        self.model.model.train()
        losses = np.zeros((self.num_clients, spec.local_steps))
        # One pass draws every client's dropout masks at once: seeded per round, not per client (so with
        # dropout the batched engine is the same random process as the sequential one, not the same draws).
        with seeded_rng(self.device, self.seed, t, DROPOUT_STREAM, BATCHED_STREAM):
            for step in range(spec.local_steps):
                optimizer.zero_grad(set_to_none=True)
                for lo, hi in self._groups(self.train_group):
                    # One width for the group, each client's rows padded by its tokenizer (not with zeros: a
                    # decoder classifier pools at the last token that is not the pad id).
                    width = max(self.shards[i].width(plans[i][step]) for i in range(lo, hi))
                    plan = [self.shards[i].batch(plans[i][step], torch.device("cpu"), width) for i in range(lo, hi)]
                    batch = {k: v.to(self.device) for k, v in _concat(plan).items()}
                    logits = self._forward((lo, hi), batch)
                    per_client = F.cross_entropy(logits, batch["labels"], reduction="none").view(hi - lo, -1).mean(1)
                    per_client.sum().backward()
                    losses[lo:hi, step] = per_client.detach().cpu().numpy()
                optimizer.step()
        if spec.persistent:
            for k, p in params.items():
                self._opt[k] = optimizer.state[p]
        for s in self.stacks.values():
            s.requires_grad_(False)
            s.grad = None
        return [float(x) for x in losses.mean(axis=1)]

    @torch.no_grad()
    def evaluate(self) -> list[tuple[float, float]]:
        self.model.model.eval()
        correct = np.zeros(self.num_clients)
        loss = np.zeros(self.num_clients)
        for indices in eval_batches(len(self.dev), self.eval_batch_size):
            base = self.dev.batch(indices, self.device)
            for lo, hi in self._groups(self.eval_group):
                n = hi - lo
                batch = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in base.items()}
                logits = self._forward((lo, hi), batch).view(n, len(indices), -1)
                labels = base["labels"].unsqueeze(0).expand(n, -1)
                correct[lo:hi] += (logits.argmax(-1) == labels).sum(1).cpu().numpy()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
                loss[lo:hi] += ce.view(n, -1).sum(1).cpu().numpy()
        n_dev = len(self.dev)
        return [(float(c / n_dev), float(lo / n_dev)) for c, lo in zip(correct, loss, strict=True)]


def _concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-client batches of one width into one."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def make_engine(
    kind: str,
    model: AdapterModel,
    shards: Sequence[Encoded],
    dev: Encoded,
    spec: TrainSpec,
    seed: int,
    max_group_sequences: int = 256,
) -> SequentialEngine | BatchedEngine:
    """The engine named ``kind``: "batched", "sequential", or "auto" (batched on CUDA, sequential on CPU)."""
    kind = resolve_engine(kind, model.device)
    if kind == "batched":
        return BatchedEngine(model, shards, dev, spec, seed, max_group_sequences)
    if kind == "sequential":
        return SequentialEngine(model, shards, dev, spec, seed)
    raise ValueError(f"unknown engine {kind!r}")


def resolve_engine(kind: str, device: torch.device) -> str:
    """The engine ``kind`` is on ``device``: "auto" is batched on CUDA and sequential elsewhere."""
    if kind == "auto":
        return "batched" if device.type == "cuda" else "sequential"
    return kind
