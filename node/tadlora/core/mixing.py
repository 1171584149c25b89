"""Metropolis-Hastings mixing weights and the mixing step itself.

Weights: for an edge (i, j), w_ij = 1 / (1 + max(d_i, d_j)); w_ii = 1 − Σ_j w_ij; zero elsewhere. The matrix
is symmetric and doubly stochastic for any undirected graph (isolated nodes get w_ii = 1), so one mixing
round preserves the network average and repeated rounds on a connected graph converge to it.

`local_weights` computes one node's row from what that node can know (its degree and its neighbours'
degrees, which the daemon's exchanges carry); both drivers mix with it, the simulator one client's row at a time
(`tadlora.sim.rounds.mix_round`). `mh_matrix` builds the whole matrix from those rows, for tests that check its
invariants.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from tadlora.core.factors import Factor, Factors, factor_key, factor_of, modules
from tadlora.core.methods import Method
from tadlora.core.robust import RobustMixing, clip_differences, trimmed_combination


def edge_weight(d_i: int, d_j: int) -> float:
    """Metropolis-Hastings weight of an edge between nodes of degrees ``d_i`` and ``d_j`` (both ≥ 1)."""
    if d_i < 1 or d_j < 1:
        raise ValueError(f"an edge's ends have degree >= 1, got {d_i} and {d_j}")
    return 1.0 / (1.0 + max(d_i, d_j))


@dataclass(frozen=True)
class LocalWeights:
    """One node's row of the mixing matrix: its self weight and one weight per neighbour."""

    self_weight: float
    neighbours: Mapping[Hashable, float]


def local_weights(own_degree: int, neighbour_degrees: Mapping[Hashable, int]) -> LocalWeights:
    """MH weights from one node's local view.

    ``own_degree`` is the node's degree in this round's graph; ``neighbour_degrees`` maps each neighbour it
    actually mixes with to that neighbour's degree. A neighbour that drops out of the round is simply left out
    of ``neighbour_degrees``: its weight returns to the self weight, so the row still sums to 1.
    """
    if len(neighbour_degrees) > own_degree:
        raise ValueError(f"{len(neighbour_degrees)} neighbours but own degree {own_degree}")
    weights = {j: edge_weight(own_degree, d_j) for j, d_j in neighbour_degrees.items()}
    # fsum is exact, so the self weight does not depend on the order the neighbours are listed in (the daemon's
    # is the order replies arrived in, the simulator's is by index): both drivers compute the same row.
    return LocalWeights(self_weight=1.0 - math.fsum(weights.values()), neighbours=weights)


def mh_matrix(adjacency: np.ndarray) -> np.ndarray:
    """The MH mixing matrix of an undirected graph given as a symmetric 0/1 adjacency matrix."""
    adj = np.asarray(adjacency, dtype=bool)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {adj.shape}")
    if not np.array_equal(adj, adj.T):
        raise ValueError("adjacency must be symmetric (links are undirected)")
    if adj.diagonal().any():
        raise ValueError("adjacency must have no self loops")
    degrees = adj.sum(axis=1)
    m = adj.shape[0]
    w = np.zeros((m, m), dtype=np.float64)
    for i in range(m):
        row = local_weights(int(degrees[i]), {int(j): int(degrees[j]) for j in np.flatnonzero(adj[i])})
        for j, wij in row.neighbours.items():
            w[i, int(j)] = wij  # type: ignore[call-overload]
        w[i, i] = row.self_weight
    return w


def mix_factors(
    own: Mapping[str, torch.Tensor],
    neighbours: Mapping[Hashable, Mapping[str, torch.Tensor]],
    weights: LocalWeights,
    which: frozenset[Factor],
    robust: RobustMixing | None = None,
) -> Factors:
    """x_i ← w_ii x_i + Σ_j w_ij x_j for every key of a factor in ``which``; other keys are kept as they are.

    Sums run in float64 in a fixed order (self, then neighbours sorted by id) so that every driver computes
    bit-identical results from the same inputs. ``robust`` clips or trims the neighbours' values first
    (`tadlora.core.robust`).
    """
    missing = set(weights.neighbours) - set(neighbours)
    if missing:
        raise ValueError(f"weights name neighbours without factors: {sorted(map(str, missing))}")
    order = sorted(weights.neighbours, key=str)
    mixed_keys = [key for key in own if factor_of(key) in which]
    out: Factors = {key: value.detach().clone() for key, value in own.items() if key not in mixed_keys}
    own_mixed = {key: own[key] for key in mixed_keys}
    out.update(_combine(own_mixed, {j: neighbours[j] for j in order}, weights, robust))
    return {key: out[key].to(own[key].dtype) for key in own}


def _combine(
    own: Mapping[str, torch.Tensor],
    neighbours: Mapping[Hashable, Mapping[str, torch.Tensor]],
    weights: LocalWeights,
    robust: RobustMixing | None,
) -> dict[str, torch.Tensor]:
    """w_ii x_i + Σ_j w_ij x_j per key of ``own`` (float64), neighbours in the order given, robustly if asked."""
    order = list(neighbours)
    if robust is not None and robust.kind == "clip":
        neighbours = clip_differences(own, neighbours, robust.value)
    out: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        if robust is not None and robust.kind == "trim":
            out[key] = trimmed_combination(
                value,
                [neighbours[j][key] for j in order],
                weights.self_weight,
                [weights.neighbours[j] for j in order],
                int(robust.value),
            )
            continue
        acc = value.detach().to(torch.float64) * weights.self_weight
        for j in order:
            acc = acc + neighbours[j][key].detach().to(torch.float64) * weights.neighbours[j]
        out[key] = acc
    return out


def truncate_product(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``product`` (out × in) into B (out × r) and A (r × in) with B @ A its best rank-r approximation.

    The singular values are split evenly: B = U_r √S_r, A = √S_r V_rᵀ, so both factors carry the same
    scale. The factorization is made deterministic by (1) ordering singular values descending (SVD's order)
    and (2) fixing each singular pair's sign so that the entry of largest magnitude in the column of U is
    positive — otherwise two nodes holding the same product could get factors of opposite sign: the same
    product (all that DeCAF mixes), and sign-equivariant local training (SGD, AdamW) keeps them the same product,
    but the consensus distances of A and B and the cross term would report a disagreement that is not there, and
    a result would depend on the LAPACK build that computed it. Nodes whose products only nearly agree can still
    get a pair of opposite signs (where a column's two largest entries nearly tie with opposite signs; no rule
    that each node applies alone avoids every such flip, as no continuous choice of sign exists): so for DeCAF the
    consensus distances of A and B and the cross term overstate the disagreement, and only that of BA is free of
    the factorization (docs/simulator.md). A zero product (e.g. B still at its zero init)
    has no direction; the caller handles it (see `mix_products`). A rank above min(out, in) is padded with zero
    columns of B and zero rows of A, so the factors keep their shapes.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vh = torch.linalg.svd(product.to(torch.float64), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank, :]
    if s.shape[0] < rank:
        pad = rank - s.shape[0]
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
        s = torch.cat([s, s.new_zeros(pad)])
        vh = torch.cat([vh, vh.new_zeros(pad, vh.shape[1])])
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    u, vh = u * signs, vh * signs[:, None]
    root = torch.sqrt(s)
    return (u * root).contiguous(), (root[:, None] * vh).contiguous()


_ZERO_PRODUCT = 1e-12  # Frobenius norm under which a mixed product counts as zero (float64)


def mix_products(
    own: Mapping[str, torch.Tensor],
    neighbours: Mapping[Hashable, Mapping[str, torch.Tensor]],
    weights: LocalWeights,
    robust: RobustMixing | None = None,
) -> Factors:
    """DeCAF: P_i = w_ii B_i A_i + Σ_j w_ij B_j A_j per module, then (B_i, A_i) ← rank-r truncation of P_i.

    If P_i is zero (all B are still zero) there is nothing to factor: A is kept and B stays zero, so the
    adapter can still start learning. ``robust`` clips or trims the neighbours' products B_j A_j.
    """
    order = sorted(weights.neighbours, key=str)
    out: Factors = {}

    def product(factors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
        b = factors[factor_key(module, Factor.B)].detach().to(torch.float64)
        return b @ factors[factor_key(module, Factor.A)].detach().to(torch.float64)

    pairs = modules(own)
    if robust is not None:
        own_products = {module: product(own, module) for module in pairs}
        products = {j: {module: product(neighbours[j], module) for module in pairs} for j in order}
        combined = _combine(own_products, products, weights, robust)
    for module in pairs:
        ka, kb = factor_key(module, Factor.A), factor_key(module, Factor.B)
        a, b = own[ka], own[kb]
        if robust is not None:
            acc = combined[module]
        else:
            # `_combine`'s weighted sum, written out so that only one module's d x k products are alive at a time:
            # `_combine` takes every neighbour's products at once, which only robust rules need.
            acc = (b.detach().to(torch.float64) @ a.detach().to(torch.float64)) * weights.self_weight
            for j in order:
                bj, aj = neighbours[j][kb].to(torch.float64), neighbours[j][ka].to(torch.float64)
                acc = acc + (bj @ aj) * weights.neighbours[j]
        if float(torch.linalg.matrix_norm(acc)) < _ZERO_PRODUCT:
            out[ka], out[kb] = a.detach().clone(), torch.zeros_like(b)
            continue
        new_b, new_a = truncate_product(acc, rank=a.shape[0])
        out[ka], out[kb] = new_a.to(a.dtype), new_b.to(b.dtype)
    for key, value in own.items():  # keys that are not part of a complete (A, B) pair pass through
        out.setdefault(key, value.detach().clone())
    return {k: out[k] for k in own}


def apply_method_mixing(
    method: Method,
    t: int,
    own: Mapping[str, torch.Tensor],
    neighbours: Mapping[Hashable, Mapping[str, torch.Tensor]],
    weights: LocalWeights,
    robust: RobustMixing | None = None,
) -> Factors:
    """The end-of-round mixing of ``method`` in round ``t``: the single entry point both drivers call.

    ``robust`` (None: plain MH mixing) clips or trims what neighbours sent; see `tadlora.core.robust` for what
    that does to the averaging guarantee.
    """
    if method.product_mixing:
        return mix_products(own, neighbours, weights, robust)
    return mix_factors(own, neighbours, weights, method.mixed(t), robust)


def sent_factors(method: Method, t: int) -> frozenset[Factor]:
    """Factors a node must send its neighbours in round ``t`` (DeCAF sends both and multiplies locally)."""
    return frozenset({Factor.A, Factor.B}) if method.product_mixing else method.mixed(t)
