"""LoRA factor dictionaries: naming, grouping by module, and small tensor helpers.

A *factor dict* maps peft's adapter-only state-dict keys (adapter name stripped, as returned by
``peft.get_peft_model_state_dict``) to tensors, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` → A of shape (r, in).
B has shape (out, r); the module's update is ``scaling * B @ A``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import torch

Factors = dict[str, torch.Tensor]


class Factor(enum.StrEnum):
    """Which of the two LoRA factors a tensor belongs to."""

    A = "A"
    B = "B"


BOTH: frozenset[Factor] = frozenset({Factor.A, Factor.B})
_MARKERS = {Factor.A: ".lora_A.", Factor.B: ".lora_B."}


def factor_of(key: str) -> Factor:
    """Return the factor a state-dict key holds; raise ValueError for a key that is neither."""
    for factor, marker in _MARKERS.items():
        if marker in key:
            return factor
    raise ValueError(f"not a LoRA factor key: {key!r}")


def module_of(key: str) -> str:
    """Return the module prefix of a factor key (the part before ``.lora_A.``/``.lora_B.``)."""
    return key.split(_MARKERS[factor_of(key)], 1)[0]


def factor_key(module: str, factor: Factor) -> str:
    """Build the key of ``factor`` for ``module`` (inverse of ``module_of``/``factor_of``)."""
    return f"{module}.lora_{factor.value}.weight"


def select(factors: Mapping[str, torch.Tensor], which: Iterable[Factor]) -> Factors:
    """The sub-dict holding only the factors in ``which`` (keys keep their order)."""
    wanted = frozenset(which)
    return {k: v for k, v in factors.items() if factor_of(k) in wanted}


def modules(factors: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes that have both an A and a B in ``factors``, in key order."""
    seen: dict[str, set[Factor]] = {}
    for key in factors:
        seen.setdefault(module_of(key), set()).add(factor_of(key))
    return [m for m, fs in seen.items() if fs == set(BOTH)]


def clone(factors: Mapping[str, torch.Tensor]) -> Factors:
    """A detached deep copy, so a snapshot cannot be changed by later training."""
    return {k: v.detach().clone() for k, v in factors.items()}


def num_bytes(factors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in ``factors`` (what an exchange of them would carry, before framing)."""
    return sum(t.numel() * t.element_size() for t in factors.values())
