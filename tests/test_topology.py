"""Topologies: per-round links that both ends agree on without talking."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import pytest

from tadlora.core.topology import (
    Topology,
    client_name,
    link_uniform,
    link_up,
    make_topology,
    overlay_neighbours,
    overlay_offsets,
    ring_edges,
)


def test_link_state_is_symmetric_and_a_pure_function_of_seed_round_and_ends() -> None:
    for t in range(50):
        assert link_up(7, t, "alpha", "beta", 0.3) == link_up(7, t, "beta", "alpha", 0.3)
    a = [link_up(1, t, "x", "y", 0.5) for t in range(200)]
    assert a != [link_up(2, t, "x", "y", 0.5) for t in range(200)]
    # The same bits in every process and on every version: two nodes decide a link's state each on its own, so the
    # draw is part of the protocol (a hash salted per process, or a changed digest, would pass a same-process check).
    assert "".join("1" if up else "0" for up in a[:40]) == "0101011001000011000010110100100100111010"
    assert link_uniform(7, 3, "alpha", "beta") == 0.7990820252259783


def test_erdos_renyi_links_are_up_with_probability_p() -> None:
    topo = make_topology("er", 10, link_prob=0.1, seed=3)
    ups = [len(topo.live_edges(t)) for t in range(2000)]
    assert np.mean(ups) / 45 == pytest.approx(0.1, abs=0.01)


def test_complete_ring_and_user_graphs() -> None:
    assert len(make_topology("complete", 6).edges) == 15
    ring = make_topology("ring", 6)
    assert ring.adjacency(0).sum(axis=1).tolist() == [2] * 6
    user = make_topology("edges:0-1,1-2,2-0,3-4", 5)
    assert user.live_edges(0) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    adj = user.adjacency(0)
    assert (adj == adj.T).all() and not adj.diagonal().any()


def test_edge_list_file(tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("0 1\n1 2  # comment\n\n")
    assert make_topology(f"file:{path}", 3).live_edges(0) == [(0, 1), (1, 2)]
    # A comment ends at its line, commas and edges in it included; commas still separate edges before one.
    path.write_text("# a chain, then a shortcut: 0-3 would close it\n0-1, 1-2  # the chain, in two\n2-3\n")
    assert make_topology(f"file:{path}", 4).live_edges(0) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("spec", ["star", "edges:0-9", "edges:1-1", "edges:a-b", "overlay:x"])
def test_bad_topologies_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        make_topology(spec, 4)


@pytest.mark.parametrize("spec", ["edges:-1-2", "edges:1--2", "edges:1-2-3"])
def test_an_edge_with_a_sign_or_a_doubled_separator_is_refused_not_read_as_another_edge(spec: str) -> None:
    with pytest.raises(ValueError, match="bad edge"):
        make_topology(spec, 4)


@pytest.mark.parametrize("spec", ["edges", "file", "overlay", "edges:", "overlay:"])
def test_a_topology_kind_without_its_argument_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="argument"):
        make_topology(spec, 4)


@pytest.mark.parametrize("spec", ["overlay:x", "overlay:2.5", "overlay:4,5"])
def test_an_overlay_bound_that_is_no_integer_is_refused_naming_the_spec(spec: str) -> None:
    # int()'s own "invalid literal for int() with base 10" names neither the topology nor what K is
    with pytest.raises(ValueError, match=f"topology '{spec}': K, the most neighbours a node keeps, must be an integer"):
        make_topology(spec, 6)


def test_an_unknown_topology_s_error_names_every_kind_and_names_must_fit_m() -> None:
    with pytest.raises(ValueError, match="overlay:K"):
        make_topology("star", 4)
    with pytest.raises(ValueError, match="names"):
        make_topology("overlay:2", 4, names=["a", "b"])


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_a_link_probability_outside_zero_one_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        link_up(0, 0, "a", "b", p)
    with pytest.raises(ValueError, match="probability"):  # refused when the topology is built, not in round t
        make_topology("er", 4, link_prob=p)
    assert link_up(0, 0, "a", "b", 1.0) and not link_up(0, 0, "a", "b", 0.0)


def test_simulator_names_match_what_a_daemon_would_use() -> None:
    topo = make_topology("er", 4, link_prob=0.5, seed=9)
    seen = set()
    for t in range(20):
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        daemon = {(i, j) for i, j in pairs if link_up(9, t, client_name(i), client_name(j), 0.5)}
        assert set(topo.live_edges(t)) == daemon, t
        seen.add(len(daemon))
    assert len(seen) > 1  # the links really varied from round to round


@pytest.mark.parametrize("n", [2, 5, 8, 9, 16, 33, 100])
@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_overlay_is_connected_bounded_and_agreed_by_both_ends(n: int, k: int) -> None:
    from tadlora.core.topology import overlay_neighbours

    ids = [f"peer-{i:03d}" for i in range(n)]
    nbrs = {me: overlay_neighbours(me, ids, k) for me in ids}
    for me, mine in nbrs.items():
        assert me not in mine and len(mine) <= k
        assert all(me in nbrs[other] for other in mine)  # both ends of every link agree
    seen, frontier = {ids[0]}, [ids[0]]
    while frontier:  # connected
        nxt = [j for i in frontier for j in nbrs[i] if j not in seen]
        seen.update(nxt)
        frontier = nxt
    assert seen == set(ids)
    if n > k + 1:
        assert max(len(v) for v in nbrs.values()) >= k - 1  # as many chords as the bound allows


@pytest.mark.parametrize(("n", "k", "degree"), [(8, 5, 5), (8, 4, 4), (9, 5, 4), (16, 7, 7), (16, 6, 6)])
def test_overlay_adds_every_chord_the_bound_allows_and_the_half_ring_chord_costs_one_link(
    n: int, k: int, degree: int
) -> None:
    # Offsets 1, 2, 4, ...: each adds two links per node, except n/2 for even n, which adds one (8: 1, 2, 4 → 5).
    from tadlora.core.topology import overlay_neighbours

    ids = [f"peer-{i:03d}" for i in range(n)]
    assert {len(overlay_neighbours(me, ids, k)) for me in ids} == {degree}


def test_overlay_topology_in_the_simulator_matches_the_daemons_choice() -> None:
    from tadlora.core.topology import overlay_neighbours

    topo = make_topology("overlay:4", 12)
    names = [client_name(i) for i in range(12)]
    adj = topo.adjacency(0)
    for i, me in enumerate(names):
        assert {names[j] for j in np.flatnonzero(adj[i])} == overlay_neighbours(me, names, 4)


def test_a_topology_whose_links_are_never_up_is_refused() -> None:
    # link_up accepts p = 0 (a link that is down), but a topology is built for links that live: (0, 1].
    with pytest.raises(ValueError, match=r"probability must be in \(0, 1\]"):
        make_topology("er", 4, link_prob=0.0)


def _documented_link_up(seed: int, t: int, a: str, b: str, p: float) -> bool:
    """`link_up` as docs/protocol.md ("A round, seen from the wire") spells it for a peer implementation."""
    if p >= 1:
        return True
    lo, hi = sorted((a, b))
    data = f"{seed}\0{t}\0{lo}\0{hi}".encode()
    u = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"tadlora-link").digest(), "big") / 2**64
    return u < p


def _documented_overlay(me: str, members: list[str], k: int) -> frozenset[str]:
    """The `--max-neighbors` overlay as docs/protocol.md spells it."""
    ids = sorted({*members, me})
    n, i = len(ids), ids.index(me)
    if n <= k + 1:
        return frozenset(ids) - {me}
    out, degree, d = set(), 0, 1
    while 2 * d <= n and degree + (cost := 1 if 2 * d == n else 2) <= k:
        out |= {ids[(i + d) % n], ids[(i - d) % n]}
        degree, d = degree + cost, 2 * d
    return frozenset(out)


def test_link_up_and_the_overlay_are_what_docs_protocol_spells_out() -> None:
    """A third party's node must pick the same links as ours from docs/protocol.md alone."""
    from tadlora.core.topology import overlay_neighbours

    ids = [client_name(i) for i in range(7)] + ["a", "zz-9", "node_x"]
    for seed, t, p in [(0, 0, 0.5), (7, 123, 0.3), (2**31, 10**9, 0.9), (1, 2, 1.0), (1, 2, 0.0)]:
        for a in ids:
            for b in ids:
                if a != b:
                    assert link_up(seed, t, a, b, p) == _documented_link_up(seed, t, a, b, p), (seed, t, a, b, p)
    for n in (2, 5, 8, 9, 16, 33):
        members = [f"peer-{i:03d}" for i in range(n)]
        for k in (2, 3, 4, 6):
            for me in members:
                assert overlay_neighbours(me, members, k) == _documented_overlay(me, members, k), (n, k, me)


def test_link_uniform_reaches_one_for_the_top_digests_and_link_up_reads_it_as_down_below_p_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A digest of 2^64 − 2^10 or more rounds to 2^64 in float64, so the draw is 1.0 (about 2^-54 of digests). The
    # range is [0, 1], not [0, 1): what matters is that `u < p` still says "down" for every p < 1.
    import types

    from tadlora.core import topology

    class Digest:
        def digest(self) -> bytes:
            return b"\xff" * 8

    monkeypatch.setattr(topology, "hashlib", types.SimpleNamespace(blake2b=lambda *a, **k: Digest()))
    assert link_uniform(0, 0, "a", "b") == 1.0
    assert not link_up(0, 0, "a", "b", float(np.nextafter(1.0, 0.0)))
    assert link_up(0, 0, "a", "b", 1.0)


@pytest.mark.parametrize(
    ("n", "k", "offsets"),
    [(12, 10, [1, 2, 4]), (20, 10, [1, 2, 4, 8]), (16, 10, [1, 2, 4, 8]), (8, 10, [1, 2, 4]), (9, 10, [1, 2, 4])],
)
def test_overlay_chords_are_powers_of_two_up_to_n_over_2_and_n_over_2_only_when_it_is_one(
    n: int, k: int, offsets: list[int]
) -> None:
    # n = 12: n/2 = 6 is no power of two and is no chord; n = 16: n/2 = 8 is one, and it is.
    from tadlora.core.topology import overlay_offsets

    assert overlay_offsets(n, k) == offsets


def test_the_simulator_names_its_clients_node_i() -> None:
    """docs/architecture.md: a daemon matches the simulator's links by naming its nodes ``node-i``, as `client_name`
    does; another spelling (zero-padded, say) would draw other links."""
    assert [client_name(i) for i in (0, 11)] == ["node-0", "node-11"]


def test_a_ring_of_two_nodes_is_one_link_and_of_one_node_none() -> None:
    assert ring_edges(2) == frozenset({(0, 1)})
    assert ring_edges(1) == frozenset()


def test_an_overlay_of_max_neighbours_plus_one_nodes_is_complete() -> None:
    """n <= K + 1 gives the complete graph (docs/protocol.md spells it so); at n = K + 1 the chords would reach only
    6 of the 8 others."""
    ids = [f"peer-{i}" for i in range(9)]
    assert overlay_neighbours(ids[0], ids, 8) == frozenset(ids[1:])


def test_a_simulated_overlay_with_custom_names_places_nodes_by_their_sorted_names() -> None:
    """The simulator and a daemon started with the same names must pick the same overlay links: ring positions follow
    the sorted names, not the client indices (here the two orders differ)."""
    names = ["n-e", "n-a", "n-h", "n-c", "n-b", "n-g", "n-d", "n-f"]
    adj = make_topology("overlay:2", 8, names=names).adjacency(0)
    for i, me in enumerate(names):
        assert {names[j] for j in np.flatnonzero(adj[i])} == overlay_neighbours(me, names, 2), me


def test_expected_degree_is_twice_the_links_times_p_over_the_nodes() -> None:
    # a ring of 6 has 6 links: 2 * 6 * 0.5 / 6 = 1 live link per node per round
    assert make_topology("ring", 6, link_prob=0.5).expected_degree() == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: make_topology("edges:0-4", 4), "outside", id="edge-end-m"),
        pytest.param(
            lambda: Topology(kind="ring", m=2, edges=frozenset({(0, 1)}), names=("a", "a")),
            "distinct",
            id="names-twice",
        ),
        pytest.param(lambda: overlay_offsets(10, 1), "max neighbours", id="overlay-k-1"),
        pytest.param(lambda: make_topology("ring", 0), "at least one node", id="no-nodes"),
    ],
)
def test_graphs_that_cannot_be_built_are_refused_saying_why(call: Callable[[], object], message: str) -> None:
    """Node m on m nodes (indices run 0..m−1), one name for two nodes, an overlay bound below a ring's 2, no nodes."""
    with pytest.raises(ValueError, match=message):
        call()
