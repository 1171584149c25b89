"""Network-wide diagnostics of the clients' adapters: consensus distances and the cross term.

With m clients holding (A_i, B_i) per module, mixing A and B separately gives the average update
B̄ Ā instead of the average of the products (1/m) Σ B_i A_i; the difference is the cross term
C = (1/m) Σ (B_i − B̄)(A_i − Ā). It vanishes when either factor is in consensus, which is what joint mixing
with a frozen block aims at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tadlora.core.factors import Factor, factor_key, modules


def _stack(clients: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([c[key].detach().to(torch.float64) for c in clients])


def consensus_distance(stacked: torch.Tensor) -> float:
    """(1/m) Σ_i ||X_i − X̄||²_F for a tensor stacked along dim 0."""
    return float(((stacked - stacked.mean(dim=0, keepdim=True)) ** 2).sum() / stacked.shape[0])


@dataclass(frozen=True)
class Diagnostics:
    """Consensus distances (summed over modules) and the Frobenius norm of the cross term."""

    consensus_a: float
    consensus_b: float
    consensus_ba: float
    cross_term_norm: float


def diagnose(clients: Sequence[Mapping[str, torch.Tensor]]) -> Diagnostics:
    """Diagnostics over all clients' factor dicts (all with the same keys)."""
    if not clients:
        raise ValueError("no clients")
    cons_a = cons_b = cons_ba = cross_sq = 0.0
    for module in modules(clients[0]):
        a = _stack(clients, factor_key(module, Factor.A))  # (m, r, in)
        b = _stack(clients, factor_key(module, Factor.B))  # (m, out, r)
        cons_a += consensus_distance(a)
        cons_b += consensus_distance(b)
        cons_ba += consensus_distance(b @ a)
        cross_sq += float(torch.linalg.matrix_norm(cross_term(b, a)) ** 2)
    return Diagnostics(cons_a, cons_b, cons_ba, cross_sq**0.5)


def cross_term(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """C = (1/m) Σ_i (B_i − B̄)(A_i − Ā) for B stacked (m, out, r) and A stacked (m, r, in)."""
    db = b - b.mean(dim=0, keepdim=True)
    da = a - a.mean(dim=0, keepdim=True)
    return (db @ da).mean(dim=0)
