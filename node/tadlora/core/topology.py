"""Communication graphs: a static base graph whose links are up in round t with probability p.

Whether link (i, j) is up in round t is a pure function of (seed, t, the two node names): both ends of a link
compute the same answer without talking to each other, which is how the daemon reproduces the paper's
per-round Erdős–Rényi links on a real network. Node names are strings (the daemon's node ids); the simulator
names its clients with `client_name` so that a daemon started with the same names makes the same choices.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Edge = tuple[int, int]


def client_name(index: int) -> str:
    """The node id the simulator gives client ``index`` (and a daemon must use to match it)."""
    return f"node-{index}"


def link_uniform(seed: int, t: int, a: str, b: str) -> float:
    """A uniform number in [0, 1] that depends only on (seed, t, {a, b}); symmetric in a and b.

    1.0 is reached by the top 2^-54 of digests (those round to 2^64 in float64); `link_up`'s ``u < p`` reads it as
    down for every p < 1, as it should."""
    lo, hi = sorted((a, b))
    digest = hashlib.blake2b(f"{seed}\x00{t}\x00{lo}\x00{hi}".encode(), digest_size=8, person=b"tadlora-link").digest()
    (value,) = struct.unpack(">Q", digest)
    return int(value) / 2.0**64


def link_up(seed: int, t: int, a: str, b: str, p: float) -> bool:
    """Whether the link between nodes ``a`` and ``b`` is up in round ``t`` when links live with prob. ``p``."""
    if not 0.0 <= p <= 1.0:  # written so that NaN fails too
        raise ValueError(f"link probability must be in [0, 1], got {p}")
    if p >= 1.0:
        return True
    return link_uniform(seed, t, a, b) < p


def _normalise(edges: Iterable[Edge], m: int) -> frozenset[Edge]:
    out: set[Edge] = set()
    for i, j in edges:
        if not (0 <= i < m and 0 <= j < m):
            raise ValueError(f"edge ({i}, {j}) names a node outside 0..{m - 1}")
        if i == j:
            raise ValueError(f"edge ({i}, {j}) is a self loop")
        out.add((min(i, j), max(i, j)))
    return frozenset(out)


@dataclass(frozen=True)
class Topology:
    """A base graph on ``m`` nodes whose links are each up with probability ``link_prob`` in every round."""

    kind: str
    m: int
    edges: frozenset[Edge]
    link_prob: float = 1.0
    seed: int = 0
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.link_prob <= 1.0:
            raise ValueError(f"link probability must be in (0, 1], got {self.link_prob}")
        if not self.names:
            object.__setattr__(self, "names", tuple(client_name(i) for i in range(self.m)))
        if len(self.names) != self.m or len(set(self.names)) != self.m:
            raise ValueError("names must be m distinct node ids")

    def live_edges(self, t: int) -> list[Edge]:
        """The links that are up in round ``t``, sorted."""
        return sorted(
            (i, j) for i, j in self.edges if link_up(self.seed, t, self.names[i], self.names[j], self.link_prob)
        )

    def adjacency(self, t: int) -> np.ndarray:
        """Symmetric boolean adjacency matrix of round ``t``'s graph."""
        adj = np.zeros((self.m, self.m), dtype=bool)
        for i, j in self.live_edges(t):
            adj[i, j] = adj[j, i] = True
        return adj

    def expected_degree(self) -> float:
        """Mean number of live links per node per round."""
        return 2.0 * len(self.edges) * self.link_prob / self.m if self.m else 0.0


def complete_edges(m: int) -> frozenset[Edge]:
    """All pairs."""
    return frozenset((i, j) for i in range(m) for j in range(i + 1, m))


def ring_edges(m: int) -> frozenset[Edge]:
    """Each node linked to the next, the last to the first (a path for m = 2, nothing for m = 1)."""
    if m < 2:
        return frozenset()
    return _normalise(((i, (i + 1) % m) for i in range(m)), m)


def overlay_offsets(n: int, max_neighbours: int) -> list[int]:
    """Ring offsets of the bounded-degree overlay on n nodes: 1 (the ring), then chords 2, 4, 8, ..., every power of
    two up to n/2 (n/2 itself only when it is a power of two, and then it adds one link per node instead of two:
    n = 16 takes 8, n = 12 stops at 4), while the degree stays <= max_neighbours."""
    if max_neighbours < 2:
        raise ValueError(f"max neighbours must be >= 2 (a ring), got {max_neighbours}")
    offsets: list[int] = []
    degree, d = 0, 1
    while 2 * d <= n:
        cost = 1 if 2 * d == n else 2
        if degree + cost > max_neighbours:
            break
        offsets.append(d)
        degree += cost
        d *= 2
    return offsets


def overlay_edges(n: int, max_neighbours: int) -> frozenset[Edge]:
    """A connected graph on nodes 0..n−1 (in sorted-id order) with degree <= max_neighbours: a ring plus chords at
    power-of-two offsets, so its diameter is O(log n) when max_neighbours ~ 2 log2 n. n <= max_neighbours + 1
    gives the complete graph."""
    if n <= max_neighbours + 1:
        return complete_edges(n)
    return _normalise(((k, (k + d) % n) for d in overlay_offsets(n, max_neighbours) for k in range(n)), n)


def overlay_neighbours(me: str, members: Collection[str], max_neighbours: int) -> frozenset[str]:
    """``me``'s neighbours in the overlay over ``members`` (node ids, ``me`` included or not). Every node that sees
    the same member set computes the same graph, so both ends of every link agree on it without talking."""
    ids = sorted(set(members) | {me})
    k = ids.index(me)
    out = set()
    for i, j in overlay_edges(len(ids), max_neighbours):
        if k in (i, j):
            out.add(ids[j if i == k else i])
    return frozenset(out)


def parse_edges(text: str, m: int) -> frozenset[Edge]:
    """Parse ``"0-1,1-2"`` (or one ``i j`` / ``i-j`` pair per line) into edges on nodes 0..m−1."""
    pairs: list[Edge] = []
    # A comment runs to the end of its line, commas in it included: cut per line, before splitting on commas.
    items = (item.strip() for line in text.splitlines() for item in line.split("#", 1)[0].split(","))
    for item in items:
        if not item:
            continue
        # One separator: "-1-2" or "1--2" must not pass as 1-2.
        parts = re.split(r"\s*-\s*|\s+", item)
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"bad edge {item!r}: expected 'i-j' or 'i j' with node indices (edges are separated by commas or lines)"
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return _normalise(pairs, m)


def make_topology(spec: str, m: int, link_prob: float = 1.0, seed: int = 0, names: Sequence[str] = ()) -> Topology:
    """Build a topology from a spec: ``complete`` (alias ``er``: Erdős–Rényi when p < 1), ``ring``,
    ``overlay:K`` (ring plus chords, degree <= K: what ``tadlora-node --max-neighbors K`` builds),
    ``edges:0-1,1-2,...``, or ``file:PATH`` (an edge list, one ``i j`` per line)."""
    if m < 1:
        raise ValueError(f"a topology needs at least one node, got m={m}")
    if names and len(names) != m:
        raise ValueError(f"names must be m distinct node ids: {len(names)} names for m={m}")
    kind, _, arg = spec.partition(":")
    if kind in ("overlay", "edges", "file") and not arg:
        raise ValueError(f"topology {spec!r} needs its argument: overlay:K, edges:0-1,... or file:PATH")
    if spec in ("complete", "er"):
        edges = complete_edges(m)
    elif spec == "ring":
        edges = ring_edges(m)
    elif kind == "overlay":
        try:
            max_neighbours = int(arg)
        except ValueError:
            raise ValueError(
                f"topology {spec!r}: K, the most neighbours a node keeps, must be an integer (overlay:4)"
            ) from None
        # Positions on the ring follow the sorted node ids, as a daemon orders its peers.
        order = sorted(range(m), key=lambda i: (list(names) or [client_name(x) for x in range(m)])[i])
        edges = _normalise(((order[a], order[b]) for a, b in overlay_edges(m, max_neighbours)), m)
    elif kind == "edges":
        edges = parse_edges(arg, m)
    elif kind == "file":
        edges = parse_edges(Path(arg).read_text(encoding="utf-8"), m)
    else:
        raise ValueError(f"unknown topology {spec!r}: use complete, er, ring, overlay:K, edges:0-1,... or file:PATH")
    return Topology(kind=kind, m=m, edges=edges, link_prob=link_prob, seed=seed, names=tuple(names))
