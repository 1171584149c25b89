"""Metropolis-Hastings weights and the mixing step: invariants on literal and random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tadlora.core.factors import BOTH, Factor, clone, factor_key, factor_of, modules, num_bytes
from tadlora.core.methods import make_method, method_names
from tadlora.core.mixing import (
    apply_method_mixing,
    edge_weight,
    local_weights,
    mh_matrix,
    mix_factors,
    mix_products,
    sent_factors,
    truncate_product,
)
from tadlora.core.topology import ring_edges


def random_graph(m: int, p: float, rng: np.random.Generator) -> np.ndarray:
    upper = np.triu(rng.random((m, m)) < p, k=1)
    return upper | upper.T


def test_edge_weight_is_one_over_one_plus_max_degree() -> None:
    assert edge_weight(1, 1) == 0.5
    assert edge_weight(2, 5) == pytest.approx(1 / 6)
    assert edge_weight(5, 2) == edge_weight(2, 5)
    with pytest.raises(ValueError):
        edge_weight(0, 3)


def test_mh_matrix_on_a_literal_path_graph() -> None:
    # path 0-1-2: degrees 1, 2, 1 → w01 = w12 = 1/3
    adj = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    expected = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(mh_matrix(adj), expected)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.7, 1.0])
def test_mh_matrix_is_symmetric_nonnegative_doubly_stochastic_with_isolated_nodes(p: float) -> None:
    rng = np.random.default_rng(int(p * 100))
    for m in (1, 2, 7, 25):
        adj = random_graph(m, p, rng)
        adj[0, :] = adj[:, 0] = False  # node 0 always isolated
        w = mh_matrix(adj)
        np.testing.assert_allclose(w, w.T, atol=1e-15)
        assert (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        assert w[0, 0] == 1.0
        assert ((w > 0) == (adj | np.eye(m, dtype=bool))).all()


def test_local_view_equals_the_matrix_row() -> None:
    rng = np.random.default_rng(3)
    adj = random_graph(12, 0.3, rng)
    w = mh_matrix(adj)
    deg = adj.sum(axis=1)
    for i in range(12):
        row = local_weights(int(deg[i]), {int(j): int(deg[j]) for j in np.flatnonzero(adj[i])})
        assert row.self_weight == pytest.approx(w[i, i])
        assert set(row.neighbours) == set(np.flatnonzero(adj[i]).tolist())  # a weight for every neighbour
        for j, wij in row.neighbours.items():
            assert wij == w[i, j]


def test_a_dropped_neighbour_returns_its_weight_to_self() -> None:
    full = local_weights(3, {"a": 2, "b": 5, "c": 1})
    dropped = local_weights(3, {"a": 2, "c": 1})
    assert dropped.self_weight == pytest.approx(full.self_weight + full.neighbours["b"])
    assert sum(dropped.neighbours.values()) + dropped.self_weight == pytest.approx(1.0)


def make_factors(rng: torch.Generator, modules: int = 2, r: int = 3, d: int = 5) -> dict[str, torch.Tensor]:
    out = {}
    for k in range(modules):
        out[factor_key(f"layer.{k}.query", Factor.A)] = torch.randn(r, d, generator=rng)
        out[factor_key(f"layer.{k}.query", Factor.B)] = torch.randn(d, r, generator=rng)
    return out


def mix_network(adj: np.ndarray, states: list[dict[str, torch.Tensor]], which=BOTH) -> list[dict[str, torch.Tensor]]:
    deg = adj.sum(axis=1)
    out = []
    for i in range(len(states)):
        nbrs = [int(j) for j in np.flatnonzero(adj[i])]
        w = local_weights(int(deg[i]), {j: int(deg[j]) for j in nbrs})
        out.append(mix_factors(states[i], {j: states[j] for j in nbrs}, w, which))
    return out


def network_mean(states: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([s[key].double() for s in states]).mean(0)


def test_one_mixing_round_preserves_the_network_average() -> None:
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        adj = random_graph(9, 0.35, rng)
        states = [make_factors(gen) for _ in range(9)]
        mixed = mix_network(adj, states)
        for key in states[0]:
            torch.testing.assert_close(network_mean(mixed, key), network_mean(states, key), atol=1e-6, rtol=0)


def test_repeated_mixing_on_a_connected_irregular_graph_converges_to_the_average() -> None:
    gen = torch.Generator().manual_seed(1)
    m = 8
    adj = np.zeros((m, m), dtype=bool)
    for i, j in [*ring_edges(m), (0, 3), (0, 5), (2, 6)]:  # a ring with chords: irregular degrees
        adj[i, j] = adj[j, i] = True
    states = [{k: v.double() for k, v in make_factors(gen).items()} for _ in range(m)]
    target = {k: network_mean(states, k) for k in states[0]}
    for _ in range(300):
        states = mix_network(adj, states)
    for key, mean in target.items():
        for s in states:
            torch.testing.assert_close(s[key], mean, atol=1e-9, rtol=0)


def test_mixing_only_the_named_factor_leaves_the_other_untouched() -> None:
    gen = torch.Generator().manual_seed(2)
    own, other = make_factors(gen), make_factors(gen)
    w = local_weights(1, {"x": 1})
    mixed = mix_factors(own, {"x": other}, w, frozenset({Factor.B}))
    for key in own:
        if ".lora_A." in key:
            assert torch.equal(mixed[key], own[key])
        else:
            torch.testing.assert_close(mixed[key], (own[key] + other[key]) / 2)


def test_truncate_product_gives_the_best_rank_r_approximation_with_a_balanced_split() -> None:
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(12, 9, generator=gen, dtype=torch.float64)
    b, a = truncate_product(p, rank=3)
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(b @ a, best)
    # balanced: both factors carry sqrt of the singular values
    torch.testing.assert_close(torch.linalg.norm(b, dim=0), torch.sqrt(s[:3]))
    torch.testing.assert_close(torch.linalg.norm(a, dim=1), torch.sqrt(s[:3]))


def test_truncate_product_makes_the_largest_entry_of_each_column_of_b_positive() -> None:
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    b1, _ = truncate_product(p, 2)
    # each column of B has its largest-magnitude entry positive (that the rule holds whatever signs the SVD returns
    # is tested with a monkeypatched SVD below)
    pivot = b1.abs().argmax(dim=0)
    assert (b1[pivot, torch.arange(2)] > 0).all()


def test_decaf_reproduces_the_rank_r_truncation_of_the_mixed_product() -> None:
    gen = torch.Generator().manual_seed(6)
    states = [make_factors(gen, r=3) for _ in range(3)]
    w = local_weights(2, {1: 1, 2: 1})  # node 0 in a path 1-0-2: w01 = w02 = 1/3
    mixed = mix_products(states[0], {1: states[1], 2: states[2]}, w)
    for k in range(2):
        ka, kb = factor_key(f"layer.{k}.query", Factor.A), factor_key(f"layer.{k}.query", Factor.B)
        product = sum(s[kb].double() @ s[ka].double() for s in states) / 3
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close((mixed[kb].double() @ mixed[ka].double()), best, atol=1e-5, rtol=1e-5)
        assert mixed[ka].shape == states[0][ka].shape and mixed[kb].shape == states[0][kb].shape


def test_decaf_keeps_a_when_every_b_is_still_zero() -> None:
    gen = torch.Generator().manual_seed(7)
    own = make_factors(gen)
    own = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in own.items()}
    mixed = mix_products(own, {}, local_weights(0, {}))
    for key in own:
        assert torch.equal(mixed[key], own[key])


@pytest.mark.parametrize(
    ("name", "t", "mixed_factors"),
    [
        ("rolora", 0, "B"),  # round 0 trains and mixes B only
        ("rolora", 1, "A"),
        ("tad", 0, "AB"),  # trains B only, but mixes both (joint mixing): trained and mixed differ
        ("tad", 5, "AB"),
        ("tad-nojoint", 0, "B"),
        ("tad-nojoint", 5, "A"),
        ("ffa", 3, "B"),
        ("lora", 3, "AB"),
    ],
)
def test_apply_method_mixing_follows_the_method(name: str, t: int, mixed_factors: str) -> None:
    gen = torch.Generator().manual_seed(8)
    own, other = make_factors(gen), make_factors(gen)
    w = local_weights(1, {"x": 1})  # w_ii = w_ix = 1/2
    mixed = apply_method_mixing(make_method(name), t, own, {"x": other}, w)
    for key in own:
        if factor_of(key).value in mixed_factors:
            torch.testing.assert_close(mixed[key], (own[key] + other[key]) / 2)
        else:
            assert torch.equal(mixed[key], own[key])


def test_apply_method_mixing_mixes_products_for_decaf() -> None:
    gen = torch.Generator().manual_seed(8)
    own, other = make_factors(gen), make_factors(gen)
    w = local_weights(1, {"x": 1})
    mixed = apply_method_mixing(make_method("decaf"), 0, own, {"x": other}, w)
    want = mix_products(own, {"x": other}, w)
    assert all(torch.equal(mixed[key], want[key]) for key in own)
    assert not torch.equal(mixed[factor_key("layer.0.query", Factor.A)], own[factor_key("layer.0.query", Factor.A)])


def test_the_self_weight_does_not_depend_on_the_order_the_neighbours_are_listed_in() -> None:
    # The daemon lists neighbours as their replies arrive, the simulator by index; both must compute the same row.
    # Summed in listing order, 1/5 + 1/5 + 1/5 + 1/6 and 1/5 + 1/5 + 1/6 + 1/5 round differently.
    degrees = {"node-0": 1, "node-1": 1, "node-2": 1, "node-3": 5}
    by_index = local_weights(4, degrees)
    by_arrival = local_weights(4, {j: degrees[j] for j in ("node-0", "node-1", "node-3", "node-2")})
    assert by_arrival.self_weight == by_index.self_weight


def test_truncate_product_does_not_depend_on_the_signs_the_svd_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another LAPACK (or a GPU's solver) may return any singular pair (u_k, v_k) as (−u_k, −v_k).
    p = torch.randn(10, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = truncate_product(p, 3)
    svd = torch.linalg.svd

    def flipped(x: torch.Tensor, full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, s, vh = svd(x, full_matrices=full_matrices)
        signs = torch.tensor([(-1.0) ** k for k in range(s.shape[0])], dtype=u.dtype)
        return u * signs, s, vh * signs[:, None]

    monkeypatch.setattr(torch.linalg, "svd", flipped)
    got = truncate_product(p, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_truncate_product_pads_with_zeros_when_r_exceeds_the_product_s_rank_bound() -> None:
    p = torch.randn(5, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    b, a = truncate_product(p, rank=4)
    assert b.shape == (5, 4) and a.shape == (4, 2)
    torch.testing.assert_close(b @ a, p)
    assert not b[:, 2:].any() and not a[2:].any()


@pytest.mark.parametrize("rank", [0, -1])
def test_truncate_product_refuses_a_rank_below_one(rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        truncate_product(torch.ones(3, 3, dtype=torch.float64), rank)


def test_decaf_keeps_the_factor_shapes_when_r_exceeds_the_module_s_dimensions() -> None:
    gen = torch.Generator().manual_seed(11)
    states = [make_factors(gen, r=3, d=2) for _ in range(2)]  # B (2, 3) @ A (3, 2): rank at most 2 < r
    mixed = mix_products(states[0], {1: states[1]}, local_weights(1, {1: 1}))
    for key, value in states[0].items():
        assert mixed[key].shape == value.shape
    ka, kb = factor_key("layer.0.query", Factor.A), factor_key("layer.0.query", Factor.B)
    product = sum(s[kb].double() @ s[ka].double() for s in states) / 2
    torch.testing.assert_close(mixed[kb].double() @ mixed[ka].double(), product, atol=1e-5, rtol=1e-5)


def test_mixing_is_bit_identical_whatever_order_the_neighbours_arrive_in() -> None:
    # The daemon lists neighbours as their replies arrive, the simulator by index: the sum must run in one order.
    gen = torch.Generator().manual_seed(12)
    own = {k: v.double() for k, v in make_factors(gen).items()}
    nbrs = {f"node-{j}": {k: v.double() for k, v in make_factors(gen).items()} for j in range(6)}
    by_index = mix_factors(own, nbrs, local_weights(6, dict.fromkeys(nbrs, 6)), BOTH)
    arrival = dict(reversed(nbrs.items()))
    by_arrival = mix_factors(own, arrival, local_weights(6, dict.fromkeys(arrival, 6)), BOTH)
    assert all(torch.equal(by_arrival[k], by_index[k]) for k in own)


def test_weights_and_matrices_that_no_undirected_graph_gives_are_refused() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        mh_matrix(np.array([[0, 1], [0, 0]], dtype=bool))
    with pytest.raises(ValueError, match="self loops"):
        mh_matrix(np.eye(2, dtype=bool))
    with pytest.raises(ValueError, match="2 neighbours but own degree 1"):
        local_weights(1, {"a": 1, "b": 1})


@pytest.mark.parametrize("name", method_names())
def test_a_node_sends_every_factor_its_neighbours_mix(name: str) -> None:
    # The daemon sends select(snapshot, sent_factors(method, t)) and the simulator counts those bytes: tad and adf
    # must send both factors in every round (joint mixing), not only the one they train.
    method = make_method(name)
    for t in range(12):
        want = BOTH if method.product_mixing else method.mixed(t)
        assert sent_factors(method, t) == want, (name, t)
    if name in ("tad", "adf", "lora", "decaf"):
        assert all(sent_factors(method, t) == BOTH for t in range(12))


def test_decaf_is_bit_identical_whatever_order_the_neighbours_arrive_in() -> None:
    # As for factor mixing: the daemon lists neighbours in arrival order, the simulator by index. DeCAF sums the
    # products, and the SVD after it must see the same bits on every driver.
    gen = torch.Generator().manual_seed(13)
    own = {k: v.double() for k, v in make_factors(gen).items()}
    nbrs = {f"node-{j}": {k: v.double() for k, v in make_factors(gen).items()} for j in range(6)}
    by_index = mix_products(own, nbrs, local_weights(6, dict.fromkeys(nbrs, 6)))
    arrival = dict(reversed(nbrs.items()))
    by_arrival = mix_products(own, arrival, local_weights(6, dict.fromkeys(arrival, 6)))
    assert all(torch.equal(by_arrival[k], by_index[k]) for k in own)


def test_decaf_gives_a_zero_b_when_the_mixed_product_is_zero_though_the_own_b_is_not() -> None:
    # Two clients whose products cancel (B_1 = −B_0, same A): the mixed product is 0, so B·A must become 0 (B zero,
    # A kept), not stay the node's own nonzero B_0·A_0.
    gen = torch.Generator().manual_seed(14)
    own = {k: v.double() for k, v in make_factors(gen).items()}
    other = {k: (-v if factor_of(k) is Factor.B else v) for k, v in own.items()}
    mixed = mix_products(own, {"x": other}, local_weights(1, {"x": 1}))
    for key, value in own.items():
        if factor_of(key) is Factor.B:
            assert value.abs().max() > 0.1 and not mixed[key].any()
        else:
            assert torch.equal(mixed[key], value)


def best_rank(product: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of ``product`` (Eckart-Young), the oracle DeCAF's truncation must match."""
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def test_decaf_weighs_each_neighbour_s_product_by_its_own_weight() -> None:
    """P_0 = w_00 B_0 A_0 + Σ_j w_0j B_j A_j with unequal weights: the equal-weight test above cannot tell a
    neighbour's weight from the self weight."""
    gen = torch.Generator().manual_seed(15)
    states = [{k: v.double() for k, v in make_factors(gen, r=2, d=4).items()} for _ in range(3)]
    w = local_weights(3, {1: 1, 2: 3})  # w_01 = 1/(1+3), w_02 = 1/(1+3), w_00 = 1/2
    assert (w.self_weight, w.neighbours[1], w.neighbours[2]) == (0.5, 0.25, 0.25)
    mixed = mix_products(states[0], {1: states[1], 2: states[2]}, w)
    for k in range(2):
        ka, kb = factor_key(f"layer.{k}.query", Factor.A), factor_key(f"layer.{k}.query", Factor.B)
        p0, p1, p2 = (s[kb] @ s[ka] for s in states)
        torch.testing.assert_close(mixed[kb] @ mixed[ka], best_rank(0.5 * p0 + 0.25 * p1 + 0.25 * p2, 2))


def test_decaf_factors_a_small_mixed_product_instead_of_treating_it_as_zero() -> None:
    """Only a product of norm below 1e-12 has no direction; a small one (here |BA| ~ 1e-5, as B early in training)
    is a real update and must be truncated like any other, not reset to B = 0."""
    gen = torch.Generator().manual_seed(16)
    states = [
        {k: (v.double() * 1e-6 if factor_of(k) is Factor.B else v.double()) for k, v in make_factors(gen).items()}
        for _ in range(2)
    ]
    mixed = mix_products(states[0], {1: states[1]}, local_weights(1, {1: 1}))  # w_00 = w_01 = 1/2
    for k in range(2):
        ka, kb = factor_key(f"layer.{k}.query", Factor.A), factor_key(f"layer.{k}.query", Factor.B)
        product = (states[0][kb] @ states[0][ka] + states[1][kb] @ states[1][ka]) / 2
        assert 1e-7 < float(torch.linalg.matrix_norm(product)) < 1e-3
        torch.testing.assert_close(mixed[kb] @ mixed[ka], best_rank(product, 3), rtol=1e-6, atol=1e-14)


def test_a_key_without_its_partner_factor_is_no_module_and_decaf_passes_it_through() -> None:
    """A lone A (or B) has no product to mix: `modules` leaves it out, and `mix_products` returns it unchanged
    rather than failing or dropping it."""
    gen = torch.Generator().manual_seed(17)
    lone = factor_key("layer.9.value", Factor.A)
    states = [{**make_factors(gen), lone: torch.randn(3, 5, generator=gen)} for _ in range(2)]
    assert modules(states[0]) == ["layer.0.query", "layer.1.query"]
    mixed = mix_products(states[0], {1: states[1]}, local_weights(1, {1: 1}))
    assert list(mixed) == list(states[0])
    assert torch.equal(mixed[lone], states[0][lone])


def test_mixed_and_cloned_factors_share_no_memory_with_their_input() -> None:
    """A node trains its factors in place after mixing: a result that aliased its input (an unmixed key kept as it
    was, the A DeCAF keeps, a key it passes through) would change the input with it, and `clone` promises a snapshot
    that later training cannot change."""
    gen = torch.Generator().manual_seed(18)
    lone = factor_key("layer.9.value", Factor.A)
    own = {**make_factors(gen), lone: torch.randn(3, 5, generator=gen)}
    other = {**make_factors(gen), lone: torch.randn(3, 5, generator=gen)}
    zero_b = {k: (torch.zeros_like(v) if factor_of(k) is Factor.B else v) for k, v in own.items()}
    before = {k: v.clone() for k, v in own.items()}
    zero_before = {k: v.clone() for k, v in zero_b.items()}
    results = [
        mix_factors(own, {"x": other}, local_weights(1, {"x": 1}), frozenset({Factor.B})),
        mix_products(own, {"x": other}, local_weights(1, {"x": 1})),
        mix_products(zero_b, {}, local_weights(0, {})),  # zero product: A kept
        clone(own),
    ]
    for result in results:
        for value in result.values():
            value.add_(1)
    for key in own:
        assert torch.equal(own[key], before[key]), key
        assert torch.equal(zero_b[key], zero_before[key]), key


def test_num_bytes_counts_each_tensor_at_its_own_element_size() -> None:
    # 3 float64 (8 bytes each) + 4 bfloat16 (2 bytes each): 24 + 8
    factors = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.bfloat16)}
    assert num_bytes(factors) == 32


def test_weights_that_name_a_neighbour_whose_factors_did_not_arrive_are_refused() -> None:
    own = make_factors(torch.Generator().manual_seed(19))
    with pytest.raises(ValueError, match="without factors"):
        mix_factors(own, {}, local_weights(1, {"x": 1}), BOTH)
