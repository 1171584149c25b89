"""Local training and evaluation on one adapter model: shared by the node daemon and the simulator.

Determinism is part of the contract: the examples a client uses in round t, and the base model's dropout masks
(MiniLM's hidden and attention dropout are on during training), are a pure function of (run seed, shard index,
t), so a daemon and the simulator given the same inputs take the same steps, and a resumed or shared simulator
cell is the run it stands for, whatever ran before it in the process. On one kind of device, that is: the masks
come from the device's generator, so for one key a CPU (Mersenne Twister) and a GPU (Philox) draw other masks, and
so may two GPUs with other multiprocessor counts (a GPU model, a MIG slice: CUDA's dropout spreads its draws over
a grid sized by them; pytorch/pytorch#25690). Same distribution, other draws. On a GPU, moreover, the attention
backward of scaled_dot_product_attention may sum in no fixed order (torch calls its memory-efficient kernel's
nondeterministic), so two runs of one round there may agree to float tolerance only. Nodes never need each
other's masks (each draws its own shard's), so a fleet of CPUs and GPUs still mixes.
By default the optimizer (AdamW, or plain SGD) is created fresh every round over the factors that train in that
round: mixing moves the parameters between rounds, so moment estimates from before the mix describe a different
point, and carrying no optimizer state makes a round's result depend only on the factors it starts from. The
price is that AdamW's first steps of a round are close to sign steps (each coordinate moves by about lr, whatever
its gradient's size). ``optimizer_state="persistent"`` keeps each client's AdamW moments (and step count) across
rounds instead, per factor, as FedOpt-style local optimizer state: never mixed, never sent, carried by the
checkpoints (see docs/simulator.md, MNLI sizing, for why both exist).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tadlora import rng
from tadlora.adapter import AdapterModel, UnusableSettings
from tadlora.core.factors import Factor
from tadlora.core.methods import Method
from tadlora.data import TextDataset


class Interrupted(Exception):
    """Local steps stopped early because a stop was requested; the round's work is discarded."""


@dataclass(frozen=True)
class TrainSpec:
    """Local-step hyper-parameters (paper: 20 local steps, batch 32, length 128)."""

    local_steps: int = 20
    batch_size: int = 32
    max_length: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Matmul precision of the forward/backward passes (factors and optimizer stay fp32): "auto" is bf16 autocast
    # on CUDA and fp32 on the CPU; "bf16" autocasts on the CPU too (much faster where the CPU has bf16 dot
    # products, AVX512-BF16 or AMX; slower where it has not); "fp32" never autocasts.
    precision: str = "auto"
    # Local optimizer: "adamw" (the paper's) or "sgd" (plain, no momentum: stateless, so a fresh one per round
    # loses nothing). SGD moves a coordinate by lr x |grad|, and LoRA gradients are small
    # (mean 3e-5 to 1e-4 on MiniLM), so it needs lr ~10 to move as far as AdamW at 1e-3; on MNLI it did not leave
    # the uniform prediction at lr 0.2-100 where AdamW learns (docs/simulator.md, MNLI sizing).
    optimizer: str = "adamw"
    # AdamW's moments: "fresh" each round (the default), or "persistent": each client keeps its own across rounds
    # (they are not mixed: they describe the client's own gradient history). SGD has no state to keep.
    optimizer_state: str = "fresh"

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("local_steps and batch_size must be >= 1 and max_length >= 8")
        if not 0 < self.lr < math.inf:  # written so that NaN fails: it would turn every factor to NaN
            raise ValueError(f"learning rate must be > 0 and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight decay must be >= 0 and finite, got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                f"optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, got {self.optimizer_state!r}"
            )
        if self.optimizer_state == "persistent" and self.optimizer == "sgd":
            raise ValueError("optimizer_state 'persistent' needs adamw: plain sgd keeps no state")

    @property
    def persistent(self) -> bool:
        """Whether the optimizer's state is carried from round to round."""
        return self.optimizer_state == "persistent"

    def check_method(self, method: Method) -> None:
        """Raise ValueError for a method these settings cannot train: carried optimizer state with product mixing
        (DeCAF re-factors B A by an SVD every round, so moments carried over would refer to other coordinates;
        a sign flip of a singular vector would even turn them against the new factors)."""
        if self.persistent and method.product_mixing:
            raise ValueError(
                f"method {method.name!r} re-factors B and A every round, so its optimizer state cannot carry "
                "over: use optimizer_state 'fresh', or leave it out of the methods"
            )


@dataclass(frozen=True)
class Encoded:
    """A tokenized dataset: padded ids (N, L), attention mask (N, L) and labels (N,), all CPU tensors; for sentence
    pairs also the segment ids (N, L) the tokenizer gave (0 for the first sentence, 1 for the second), None else."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | Sequence[int]) -> Encoded:
        """The rows ``indices`` as a new Encoded (copies)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        types = None if self.token_type_ids is None else self.token_type_ids[idx]
        return Encoded(self.input_ids[idx], self.attention_mask[idx], self.labels[idx], types)

    def width(self, indices: np.ndarray | Sequence[int]) -> int:
        """The longest real (unpadded) sequence among the rows ``indices``: the width `batch` cuts them to."""
        mask = self.attention_mask[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        return max(1, int(mask.sum(dim=1).max()))

    def batch(
        self, indices: np.ndarray | Sequence[int], device: torch.device, width: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The rows ``indices``, cut to the longest real sequence among them (or to ``width``, no less than that
        and no more than the encoded length), on ``device``: input_ids, attention_mask, labels and, for pairs,
        token_type_ids. Columns past a row's end hold the tokenizer's own padding (its pad id, mask 0), so a
        batch cut wider, to be stacked with others, classifies each row as the narrow one does."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        mask = self.attention_mask[idx]
        if width is None:
            width = max(1, int(mask.sum(dim=1).max()))
        elif not self.width(indices) <= width <= mask.shape[1]:
            raise ValueError(f"cannot cut rows of {self.width(indices)} real tokens to width {width} "
                             f"(encoded length {mask.shape[1]})")  # fmt: skip
        batch = {
            "input_ids": self.input_ids[idx, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": self.labels[idx].to(device),
        }
        if self.token_type_ids is not None:
            batch["token_type_ids"] = self.token_type_ids[idx, :width].to(device)
        return batch


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a model's forward takes from an `Encoded.batch`: everything but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


# How `encode` turns examples into model inputs, for a simulator run's record (its stamp): a resumed cell must go on
# reading examples as its first rounds did. 2 (2026-12-05): a sentence pair's segment ids reach the model; before,
# a pair was read as one sentence. Single sentences read alike in both.
INPUTS_VERSION = 2


def encode(tokenizer: object, data: TextDataset, max_length: int) -> Encoded:
    """Tokenize ``data`` once (pairs as pairs), truncated and padded to ``max_length`` on the right (a tokenizer
    that pads on the left is refused: `Encoded.batch` cuts padding off the right end). A ``max_length`` past the
    tokenizer's ``model_max_length`` (for an `AdapterModel`'s, at most its position embeddings) is refused."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise UnusableSettings(
            f"max_length {max_length} is past the {limit} tokens the model takes (its position embeddings): use a "
            f"--max-length of at most {limit}"
        )
    kwargs = {"truncation": True, "max_length": max_length, "padding": "max_length", "return_tensors": "pt"}
    if data.text_b is not None:
        enc = tokenizer(list(data.text_a), list(data.text_b), **kwargs)  # type: ignore[operator]
    else:
        enc = tokenizer(list(data.text_a), **kwargs)  # type: ignore[operator]
    mask = enc["attention_mask"]
    if bool((mask[:, 1:] > mask[:, :-1]).any()):  # a 0 before a 1: padding on the left
        raise ValueError(
            "the tokenizer pads on the left; batches are cut to their longest sequence from the right, "
            "so set tokenizer.padding_side = 'right'"
        )
    return Encoded(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        labels=torch.tensor(np.asarray(data.labels, dtype=np.int64)),  # a copy: the dataset is read-only
        # Pairs only: a BERT-style encoder tells premise from hypothesis by them (a RoBERTa tokenizer gives none).
        # A single sentence's would be all zeros, which is what the model assumes without them.
        token_type_ids=enc.get("token_type_ids") if data.text_b is not None else None,
    )


def round_batches(seed: int, shard: int, t: int, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """Indices (into a shard of size ``n``) of the ``steps`` batches of round ``t``.

    A permutation drawn from (seed, shard, t) is walked in order, wrapping when a round needs more examples
    than the shard holds, so a round sees each example at most once per pass.
    """
    if n < 1:
        raise ValueError("a client needs at least one training example")
    rng = np.random.default_rng([seed, shard, t])
    order = rng.permutation(n)
    need = steps * batch_size
    reps = -(-need // n)
    flat = np.concatenate([order] * reps)[:need]
    return [flat[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags (Linux /proc/cpuinfo) of native bf16 dot products. Without them torch runs bf16 autocast through
# conversions: measured 11x slower than fp32 on an AVX2-only EPYC (10.6 against 0.95 s per MiniLM step, batch 16,
# length 64, one thread; benchmarks/results/precision-avx2), where an AVX512-BF16 EPYC ran it at 1.75x fp32's
# speed (docs/benchmarks.md).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    """The first value of field ``name`` ("flags", "model name") in the text of /proc/cpuinfo (read when ``cpuinfo``
    is None); None where there is none (no /proc/cpuinfo, or no such line: an ARM board's lacks both)."""
    if cpuinfo is None:
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == name:
            return value.strip()
    return None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has native bf16 dot products (`CPU_BF16_FLAGS`), from the text of /proc/cpuinfo
    (read when ``cpuinfo`` is None); None when that cannot be told (no /proc/cpuinfo, or no flags line)."""
    flags = cpuinfo_field("flags", cpuinfo)
    if flags is None:
        return None
    return any(flag in CPU_BF16_FLAGS for flag in flags.split())


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` has native bf16 matmuls: compute capability 8.0 (Ampere, Jetson Orin) or later.
    Older ones (Pascal, Volta, Turing: Jetson TX2 and Xavier, T4) run bf16 autocast emulated, slower than fp32."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def device_name(device: torch.device, cpuinfo: str | None = None) -> str:
    """What ``device`` is, for a record of where something ran: a GPU's name, or the CPU's model name from the
    text of /proc/cpuinfo (read when ``cpuinfo`` is None; "cpu" alone where it names none)."""
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}"
    model = cpuinfo_field("model name", cpuinfo)
    return f"{device}: {model}" if model else str(device)


def precision_warning(precision: str, device: torch.device, cpuinfo: str | None = None) -> str | None:
    """A sentence for the user when ``precision`` will run bf16 autocast on a CPU or a GPU without native bf16
    (slower than fp32 there, not faster); None otherwise."""
    if device.type == "cuda":
        if matmul_precision(device, precision) != "bf16" or cuda_has_bf16(device):
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return (
            f"--precision {precision} runs bf16 autocast on {device}, a GPU without native bf16 (compute capability "
            f"{major}.{minor}; bf16 needs 8.0, Ampere, or later): it is emulated there and slower than fp32; "
            "use --precision fp32"
        )
    if precision != "bf16" or device.type != "cpu" or cpu_has_bf16(cpuinfo) is not False:
        return None
    return (
        "--precision bf16 on a CPU without native bf16 (no " + " or ".join(CPU_BF16_FLAGS) + " flag): bf16 autocast "
        "is emulated there and runs many times slower than fp32 (11x measured); use --precision auto or fp32"
    )


OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_STATES = ("fresh", "persistent")

# One client's persistent optimizer state, flat so that safetensors can store it: for each factor key K that has
# trained, "K/exp_avg" and "K/exp_avg_sq" (the factor's shape) and "K/step" (a 0-d float tensor): AdamW's own
# per-parameter state under its own names. Always on the CPU between rounds.
OptimizerState = dict[str, torch.Tensor]
MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def restore_state(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], state: OptimizerState) -> None:
    """Give each parameter in ``params`` (by factor key) the state ``state`` holds for it; a parameter with no
    entry starts fresh. The moments move to the parameter's device; the step count stays a CPU tensor, where
    AdamW keeps it (neither fused nor capturable)."""
    for key, param in params.items():
        if f"{key}/step" not in state:
            continue
        entry = {name: state[f"{key}/{name}"].clone() for name in MOMENTS}
        for name in ("exp_avg", "exp_avg_sq"):
            if entry[name].shape != param.shape:
                raise ValueError(f"optimizer state {key}/{name}: {tuple(entry[name].shape)} != {tuple(param.shape)}")
            entry[name] = entry[name].to(param.device)
        optimizer.state[param] = entry


def export_state(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> OptimizerState:
    """The state ``optimizer`` holds for ``params`` (by factor key), as CPU copies (see `OptimizerState`)."""
    out: OptimizerState = {}
    for key, param in params.items():
        entry = optimizer.state.get(param)
        if entry:
            for name in MOMENTS:
                out[f"{key}/{name}"] = entry[name].detach().to("cpu", copy=True)
    return out


def make_optimizer(params: Sequence[torch.Tensor], spec: TrainSpec) -> torch.optim.Optimizer:
    """A fresh optimizer of kind ``spec.optimizer`` over ``params``. Both kinds are elementwise, so one optimizer
    over stacked per-client tensors is exactly one optimizer per client (the batched simulator relies on it)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def seeded_rng(device: torch.device, *key: int) -> contextlib.AbstractContextManager[None]:
    """Torch's global RNG (which dropout draws from) seeded from ``key`` inside the block, and restored after it:
    what runs there is a function of ``key`` (see `tadlora.rng`)."""
    return rng.seeded(device, int(np.random.default_rng([*key]).integers(2**62)))


def matmul_precision(device: torch.device, precision: str = "auto") -> str:
    """What ``precision`` (see `TrainSpec.precision`) computes in on ``device``: "bf16" or "fp32"."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[None]:
    """The autocast context of ``precision`` (see `TrainSpec.precision`) on ``device``."""
    if matmul_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def local_steps(
    model: AdapterModel,
    data: Encoded,
    trained: frozenset[Factor],
    spec: TrainSpec,
    seed: int,
    shard: int,
    t: int,
    stop: threading.Event | None = None,
    state: OptimizerState | None = None,
) -> float:
    """Run round ``t``'s local steps on the factors in ``trained``; return the mean training loss.

    Only those factors change: the others and the base model have requires_grad off and are not in the
    optimizer. Blocking (torch work): the daemon calls it from a worker thread, with ``stop`` to end it
    between two steps (raising `Interrupted`). With ``spec.persistent``, ``state`` is the client's optimizer
    state: the trained factors' entries are read at the start and replaced in place when the round completes
    (an interrupted round leaves it as it was; the model's factors keep the steps already taken, for the caller
    to discard); the other factors' entries are kept.
    """
    if spec.persistent and state is None:
        raise ValueError("optimizer_state is 'persistent' but no state was passed to carry it")
    params = model.set_trainable(trained)
    optimizer = make_optimizer(params, spec)
    by_key = {k: p for k, p in model.factor_parameters().items() if p.requires_grad}
    if spec.persistent:
        assert state is not None  # noqa: S101 (checked above; for mypy)
        restore_state(optimizer, by_key, state)
    model.model.train()
    losses = []
    try:
        with seeded_rng(model.device, seed, shard, t, DROPOUT_STREAM):
            for indices in round_batches(seed, shard, t, len(data), spec.batch_size, spec.local_steps):
                if stop is not None and stop.is_set():
                    raise Interrupted(f"round {t} stopped during local steps")
                batch = data.batch(indices, model.device)
                with autocast(model.device, spec.precision):
                    logits = model.model(**model_inputs(batch)).logits
                loss = F.cross_entropy(logits.float(), batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        if spec.persistent:
            assert state is not None  # noqa: S101
            state.update(export_state(optimizer, by_key))
    finally:
        model.set_trainable(frozenset())
    return float(np.mean(losses))


# The seed key of the dropout masks is (seed, shard, t, DROPOUT_STREAM): another stream than round_batches'
# (seed, shard, t), so that the masks are not drawn from the numbers that chose the examples.
DROPOUT_STREAM = 1


def eval_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive index batches covering 0..n−1."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


@torch.no_grad()
def evaluate(model: AdapterModel, data: Encoded, batch_size: int = 64, precision: str = "auto") -> tuple[float, float]:
    """Accuracy and mean loss of ``model`` on ``data`` (``precision``: as `TrainSpec.precision`). Blocking.
    ValueError for an empty ``data``, which has neither."""
    if len(data) == 0:
        raise ValueError("nothing to evaluate on: the dev set is empty")
    model.model.eval()
    correct, total_loss = 0, 0.0
    for indices in eval_batches(len(data), batch_size):
        batch = data.batch(indices, model.device)
        with autocast(model.device, precision):
            logits = model.model(**model_inputs(batch)).logits
        total_loss += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / len(data), total_loss / len(data)


@torch.no_grad()
def classify(
    model: AdapterModel,
    texts: Sequence[str],
    second: Sequence[str] | None = None,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    precision: str = "auto",
) -> torch.Tensor:
    """Class probabilities of ``model`` for each text (or pair: ``texts[i]`` with ``second[i]``, as MNLI's premise
    and hypothesis), a float32 (n, classes) CPU tensor in the order of ``model.spec.label_names``. Tokenized as
    training tokenized (`encode`), cut to ``max_length`` tokens. Blocking. ValueError for no texts, or a ``second``
    of another length."""
    if isinstance(texts, str) or isinstance(second, str):  # a str is a sequence too: of one-character texts
        raise TypeError("classify takes a list of texts (and of second texts), not one str")
    if not texts:
        raise ValueError("nothing to classify: no texts")
    if second is not None and len(second) != len(texts):
        raise ValueError(f"{len(texts)} first texts but {len(second)} second ones: a pair needs both")
    labels = np.zeros(len(texts), dtype=np.int64)  # not used: `encode` takes a labelled dataset
    data = TextDataset("input", tuple(texts), None if second is None else tuple(second), labels, model.spec.label_names)
    encoded = encode(model.tokenizer, data, max_length)
    model.model.eval()
    out = []
    for indices in eval_batches(len(data), batch_size):
        batch = encoded.batch(indices, model.device)
        with autocast(model.device, precision):
            logits = model.model(**model_inputs(batch)).logits
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)
