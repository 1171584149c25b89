"""Robust mixing (`--robust-mixing clip:TAU|trim:F`) on literal inputs, and what it does to the average."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import pytest
import torch

from tadlora.core.factors import Factor
from tadlora.core.methods import make_method
from tadlora.core.mixing import apply_method_mixing, local_weights, mh_matrix, mix_factors
from tadlora.core.robust import RobustMixing, clip_differences, parse_robust_mixing, trimmed_combination

A = "m.lora_A.weight"
B = "m.lora_B.weight"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    ("text", "want"),
    [("none", None), ("", None), ("clip:0.5", RobustMixing("clip", 0.5)), ("trim:2", RobustMixing("trim", 2))],
)
def test_rules_parse_from_their_flag_spelling(text: str, want: RobustMixing | None) -> None:
    assert parse_robust_mixing(text) == want
    if want is not None:
        assert parse_robust_mixing(str(want)) == want


@pytest.mark.parametrize("text", ["clip", "clip:0", "clip:-1", "clip:inf", "trim:0", "trim:1.5", "median:1", "x"])
def test_malformed_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_robust_mixing(text)


def test_clipping_leaves_short_differences_and_scales_long_ones_to_tau() -> None:
    own = {"x": t(0.0, 0.0)}
    got = clip_differences(own, {"near": {"x": t(0.3, 0.4)}, "far": {"x": t(30.0, 40.0)}}, tau=1.0)
    torch.testing.assert_close(got["near"]["x"], t(0.3, 0.4))  # norm 0.5 <= 1: unchanged
    torch.testing.assert_close(got["far"]["x"], t(0.6, 0.8))  # norm 50 -> 1, same direction


def test_clipping_takes_one_norm_over_every_key() -> None:
    own = {"a": t(1.0), "b": t(1.0)}
    got = clip_differences(own, {"j": {"a": t(4.0), "b": t(5.0)}}, tau=2.5)  # difference (3, 4), norm 5
    torch.testing.assert_close(got["j"]["a"], t(1.0 + 1.5))
    torch.testing.assert_close(got["j"]["b"], t(1.0 + 2.0))


def test_trim_drops_the_extremes_per_coordinate_and_rescales_the_kept_weights() -> None:
    own = t(0.0, 0.0)
    values = [t(1.0, 100.0), t(2.0, -100.0), t(1000.0, 3.0)]
    got = trimmed_combination(own, values, 0.25, [0.25, 0.25, 0.25], f=1)
    # Coordinate 0 keeps 2.0, coordinate 1 keeps 3.0; the kept one carries all 0.75 of the neighbours' weight.
    torch.testing.assert_close(got, t(0.75 * 2.0, 0.75 * 3.0))


def test_trim_with_too_few_neighbours_keeps_the_own_value() -> None:
    torch.testing.assert_close(trimmed_combination(t(5.0), [t(1.0), t(9.0)], 0.4, [0.3, 0.3], f=1), t(5.0))


def test_trim_with_unequal_weights_shares_the_total_in_proportion() -> None:
    got = trimmed_combination(t(0.0), [t(-9.0), t(1.0), t(2.0), t(9.0)], 0.4, [0.1, 0.2, 0.1, 0.2], f=1)
    # kept 1.0 (w 0.2) and 2.0 (w 0.1); they share the neighbours' 0.6 as 0.4 and 0.2
    torch.testing.assert_close(got, t(0.4 * 1.0 + 0.2 * 2.0))


def _network(m: int = 3) -> tuple[list[dict[str, torch.Tensor]], list[dict[int, float]], list[float]]:
    adj = torch.ones(m, m, dtype=torch.bool) ^ torch.eye(m, dtype=torch.bool)
    w = mh_matrix(adj.numpy())
    nodes = [{A: torch.full((2, 3), float(i * i)), B: torch.full((3, 2), float(-i))} for i in range(m)]
    rows = [{j: float(w[i, j]) for j in range(m) if j != i} for i in range(m)]
    return nodes, rows, [float(w[i, i]) for i in range(m)]


def _mix_all(rule: RobustMixing | None) -> list[dict[str, torch.Tensor]]:
    nodes, _, _ = _network()
    method = make_method("lora", None)
    out = []
    for i, own in enumerate(nodes):
        weights = local_weights(2, {j: 2 for j in range(3) if j != i})
        out.append(apply_method_mixing(method, 0, own, {j: nodes[j] for j in range(3) if j != i}, weights, rule))
    return out


def _mean(nodes: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([n[key].double() for n in nodes]).mean(0)


def test_trim_breaks_a_tie_at_its_cut_by_neighbour_order() -> None:
    # Two neighbours hold 1.0 and one of them is trimmed as the lowest: the first listed, as the docstring says
    # (stable ascending sort). Their weights differ, so which one is kept changes the result; the same rule at the
    # top cut drops the last listed of a tie.
    low = trimmed_combination(t(0.0), [t(1.0), t(1.0), t(3.0), t(9.0)], 0.3, [0.1, 0.3, 0.2, 0.1], f=1)
    torch.testing.assert_close(low, t((1.0 * 0.3 + 3.0 * 0.2) * 0.7 / 0.5))  # kept: the second 1.0 (w 0.3) and 3.0
    high = trimmed_combination(t(0.0), [t(-9.0), t(3.0), t(5.0), t(5.0)], 0.3, [0.1, 0.2, 0.3, 0.1], f=1)
    torch.testing.assert_close(high, t((3.0 * 0.2 + 5.0 * 0.3) * 0.7 / 0.5))  # kept: 3.0 and the first 5.0 (w 0.3)


def test_clip_with_a_tau_no_difference_reaches_is_exactly_plain_mixing() -> None:
    plain, clipped = _mix_all(None), _mix_all(RobustMixing("clip", 1e9))
    for p, c in zip(plain, clipped, strict=True):
        for key in p:
            torch.testing.assert_close(c[key], p[key], atol=1e-12, rtol=0)


def test_symmetric_clipping_with_one_tau_everywhere_still_preserves_the_average() -> None:
    nodes, _, _ = _network()
    mixed, plain = _mix_all(RobustMixing("clip", 0.5)), _mix_all(None)
    for m, p in zip(mixed, plain, strict=True):  # every difference is clipped: no node mixes as plain MH would
        assert all(not torch.allclose(m[key], p[key]) for key in (A, B))
    for key in (A, B):
        torch.testing.assert_close(_mean(mixed, key), _mean(nodes, key).float().double(), atol=1e-6, rtol=0)


def test_trim_does_not_preserve_the_average_in_general() -> None:
    nodes = [{A: t(0.0)}, {A: t(1.0)}, {A: t(2.0)}, {A: t(100.0)}]
    w = 0.25  # complete graph of 4: degree 3, w_ij = 1/4
    mixed = []
    for i, own in enumerate(nodes):
        others = [nodes[j][A] for j in range(4) if j != i]
        mixed.append(trimmed_combination(own[A], others, w, [w] * 3, f=1))
    assert not math.isclose(float(torch.stack(mixed).mean()), float(torch.stack([n[A] for n in nodes]).mean()))
    assert float(torch.stack(mixed).max()) < 100.0  # but the outlier no longer drags the others far


def test_robust_rules_reach_only_the_mixed_factors() -> None:
    own = {A: t(1.0), B: t(7.0)}
    nbrs = {"j": {A: t(3.0), B: t(-7.0)}}
    weights = local_weights(1, {"j": 1})
    for rule in (RobustMixing("clip", 1.0), RobustMixing("trim", 1)):
        out = mix_factors(own, nbrs, weights, frozenset({Factor.A}), rule)
        torch.testing.assert_close(out[B], t(7.0))  # B is not mixed in this round
    clipped = mix_factors(own, nbrs, weights, frozenset({Factor.A}), RobustMixing("clip", 1.0))
    torch.testing.assert_close(clipped[A], t(0.5 * 1.0 + 0.5 * 2.0))  # difference 2 clipped to 1


@pytest.mark.parametrize(("f", "kept_mean"), [(1, (-1.0 + 1.0 + 2.0) / 3), (2, 1.0)])
def test_mixing_trims_the_f_the_rule_names(f: int, kept_mean: float) -> None:
    own = {A: t(0.0)}
    nbrs: dict[Hashable, dict[str, torch.Tensor]] = {j: {A: t(v)} for j, v in enumerate((-100, -1, 1, 2, 100))}
    weights = local_weights(5, dict.fromkeys(nbrs, 5))  # every weight 1/6, so the neighbours share 5/6
    out = mix_factors(own, nbrs, weights, frozenset({Factor.A}), RobustMixing("trim", f))
    torch.testing.assert_close(out[A], t(5 / 6 * kept_mean))


def test_decaf_product_mixing_accepts_a_rule() -> None:
    nodes, _, _ = _network()
    method = make_method("decaf", None)
    weights = local_weights(2, {1: 2, 2: 2})
    plain = apply_method_mixing(method, 0, nodes[0], {1: nodes[1], 2: nodes[2]}, weights)
    loose = apply_method_mixing(method, 0, nodes[0], {1: nodes[1], 2: nodes[2]}, weights, RobustMixing("clip", 1e9))
    for key in plain:
        torch.testing.assert_close(loose[key], plain[key], atol=1e-6, rtol=1e-6)
    trimmed = apply_method_mixing(method, 0, nodes[0], {1: nodes[1], 2: nodes[2]}, weights, RobustMixing("trim", 1))
    # two neighbours, F = 1: nothing is kept, so the product is node 0's own (B = 0: zero product, A kept)
    torch.testing.assert_close(trimmed[A], nodes[0][A])


def test_a_fractional_trim_count_is_refused_as_not_an_integer() -> None:
    with pytest.raises(ValueError, match="not an integer"):
        parse_robust_mixing("trim:1.5")


@pytest.mark.parametrize("device", ["meta", *(["cuda"] if torch.cuda.is_available() else [])])
def test_trim_works_on_the_values_device(device: str) -> None:
    # meta stands in for a GPU on every machine: the weights must be made where the values are.
    own = torch.zeros(2, dtype=torch.float64, device=device)
    values = [torch.full((2,), float(v), dtype=torch.float64, device=device) for v in (1.0, 2.0, 9.0)]
    got = trimmed_combination(own, values, 0.25, [0.25] * 3, f=1)
    assert got.device == own.device
    if device != "meta":
        torch.testing.assert_close(got.cpu(), t(0.75 * 2.0, 0.75 * 2.0))


def test_trim_keeps_the_own_value_at_the_self_weight() -> None:
    """The trim reaches only the neighbours: w_ii x_i stays in the sum (every test above has x_i = 0)."""
    got = trimmed_combination(t(4.0), [t(0.0), t(1.0), t(2.0)], 0.25, [0.25] * 3, f=1)
    torch.testing.assert_close(got, t(0.25 * 4.0 + 0.75 * 1.0))  # kept: 1.0, carrying the neighbours' 0.75


def test_trim_keeps_each_value_s_own_weight_when_the_neighbours_are_not_listed_in_value_order() -> None:
    """The weights are sorted along with the values: a kept value carries the weight of the neighbour that sent it,
    not that of the neighbour at its rank in the listing."""
    values = [t(2.0), t(1.0), t(3.0), t(0.0), t(5.0)]
    got = trimmed_combination(t(0.0), values, 0.0, [0.1, 0.2, 0.3, 0.15, 0.25], f=1)
    # 0.0 (w 0.15) and 5.0 (w 0.25) are dropped; 2.0 (w 0.1), 1.0 (w 0.2) and 3.0 (w 0.3) share all 1.0
    torch.testing.assert_close(got, t((0.1 * 2.0 + 0.2 * 1.0 + 0.3 * 3.0) / 0.6))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: clip_differences({"x": t(1.0)}, {"j": {"x": t(2.0)}}, 0.0), "TAU", id="clip-tau-0"),
        pytest.param(lambda: trimmed_combination(t(0.0), [t(1.0)] * 3, 0.25, [0.25] * 3, f=0), "F must be", id="f-0"),
        pytest.param(
            lambda: trimmed_combination(t(0.0), [t(1.0)] * 3, 0.25, [0.25] * 2, f=1), "weights", id="weights-short"
        ),
    ],
)
def test_robust_rules_refuse_arguments_they_cannot_apply(call: Callable[[], object], message: str) -> None:
    """Called directly (not through `RobustMixing`, which checks TAU and F too), the functions still refuse a TAU of
    0, an F of 0 (a trim that drops nothing) and a weight list that does not match the values."""
    with pytest.raises(ValueError, match=message):
        call()
