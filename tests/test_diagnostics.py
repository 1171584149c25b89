"""Consensus distances and the cross term C = (1/m) Σ (B_i − B̄)(A_i − Ā)."""

from __future__ import annotations

import pytest
import torch

from tadlora.core.diagnostics import cross_term, diagnose
from tadlora.core.factors import Factor, factor_key

KA, KB = factor_key("m", Factor.A), factor_key("m", Factor.B)


def clients(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{KA: ai, KB: bi} for ai, bi in zip(a, b, strict=True)]


def test_cross_term_on_literal_inputs() -> None:
    # m = 2, scalars as 1x1: B = (1, 3), A = (2, 6) → deviations (-1, 1) and (-2, 2) → C = (2 + 2) / 2 = 2
    b = torch.tensor([[[1.0]], [[3.0]]])
    a = torch.tensor([[[2.0]], [[6.0]]])
    assert cross_term(b, a).item() == pytest.approx(2.0)


def test_cross_term_is_zero_when_either_factor_is_in_consensus() -> None:
    g = torch.Generator().manual_seed(0)
    same_a = torch.randn(3, 5, generator=g)
    d = diagnose(clients([same_a] * 4, [torch.randn(5, 3, generator=g) for _ in range(4)]))
    assert d.cross_term_norm == 0.0 and d.consensus_a == 0.0 and d.consensus_b > 0
    same_b = torch.randn(5, 3, generator=g)
    d = diagnose(clients([torch.randn(3, 5, generator=g) for _ in range(4)], [same_b] * 4))
    assert d.cross_term_norm == 0.0 and d.consensus_b == 0.0


def test_mean_of_products_equals_product_of_means_plus_cross_term() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    lhs = (b @ a).mean(0)
    rhs = b.mean(0) @ a.mean(0) + cross_term(b, a)
    torch.testing.assert_close(lhs, rhs)


def test_consensus_distance_of_identical_clients_is_zero() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 5, generator=g), torch.randn(5, 3, generator=g)
    d = diagnose(clients([a] * 3, [b] * 3))
    assert (d.consensus_a, d.consensus_b, d.cross_term_norm) == (0.0, 0.0, 0.0)
    assert d.consensus_ba == pytest.approx(0.0, abs=1e-24)  # the mean of equal float products may round


def test_diagnose_on_literal_inputs_sums_every_module() -> None:
    # Two clients, two modules of 1x1 factors. Module m: A = (2, 6), B = (1, 3); module n: A = (1, 3), B = (0, 4).
    # consensus_a = (4 + 4)/2 + (1 + 1)/2 = 5; consensus_b = (1 + 1)/2 + (4 + 4)/2 = 5;
    # B·A: m (2, 18) → (64 + 64)/2, n (0, 12) → (36 + 36)/2, so consensus_ba = 100; C_m = 2, C_n = 2 → ‖C‖ = √8.
    def one(value: float) -> torch.Tensor:
        return torch.tensor([[value]], dtype=torch.float64)

    ka_n, kb_n = factor_key("n", Factor.A), factor_key("n", Factor.B)
    d = diagnose(
        [
            {KA: one(2.0), KB: one(1.0), ka_n: one(1.0), kb_n: one(0.0)},
            {KA: one(6.0), KB: one(3.0), ka_n: one(3.0), kb_n: one(4.0)},
        ]
    )
    assert d.consensus_a == pytest.approx(5.0)
    assert d.consensus_b == pytest.approx(5.0)
    assert d.consensus_ba == pytest.approx(100.0)
    assert d.cross_term_norm == pytest.approx(8.0**0.5)


def test_diagnose_on_literal_matrices_uses_the_product_b_a_and_the_frobenius_norm() -> None:
    # The literal test above uses 1x1 factors, where B·A = A·B and every norm of C is |C|. Module p (r = 1):
    # client 0 B = e1, A = e1ᵀ; client 1 B = e2, A = e2ᵀ. Their B·A are diag(1, 0) and diag(0, 1), so
    # consensus_ba = (0.5 + 0.5)/2 = 0.5, while their A·B are both [[1]] (consensus 0). Module q (r = 2): B = A = I on
    # client 0 and −I on client 1: B·A = I on both (consensus 0) but C = I, whose Frobenius norm is √2 (its spectral
    # norm is 1). Module p's C = [[1, −1], [−1, 1]]/4 has ‖C‖²_F = 0.25, so ‖C‖_F over both modules is √2.25 = 1.5.
    def m(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float64)

    eye = torch.eye(2, dtype=torch.float64)
    ka_p, kb_p = factor_key("p", Factor.A), factor_key("p", Factor.B)
    ka_q, kb_q = factor_key("q", Factor.A), factor_key("q", Factor.B)
    d = diagnose(
        [
            {kb_p: m([[1.0], [0.0]]), ka_p: m([[1.0, 0.0]]), kb_q: eye, ka_q: eye},
            {kb_p: m([[0.0], [1.0]]), ka_p: m([[0.0, 1.0]]), kb_q: -eye, ka_q: -eye},
        ]
    )
    assert d.consensus_ba == pytest.approx(0.5)
    assert d.cross_term_norm == pytest.approx(1.5)
    assert d.consensus_a == pytest.approx(0.5 + 2.0) and d.consensus_b == pytest.approx(0.5 + 2.0)


def test_diagnostics_of_no_clients_are_refused() -> None:
    with pytest.raises(ValueError, match="no clients"):
        diagnose([])
