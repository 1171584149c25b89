"""Partitions of a dataset across federated clients: IID, Dirichlet, and the paper's label skew.

Every function is pure and deterministic for a given ``seed``, and returns one ascending int64
array of dataset indices per client; the arrays are pairwise disjoint.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tadlora.data.dataset import TextDataset

__all__ = [
    "SHARD_SCHEMES",
    "label_skew_proportions",
    "make_shards",
    "parse_label_skew",
    "split_dirichlet",
    "split_iid",
    "split_label_skew",
]

Shards = list[npt.NDArray[np.int64]]

SHARD_SCHEMES = ("iid", "label-skew", "label-skew:N", "label-skew@SHARE", "label-skew@SHARE:N", "dirichlet:ALPHA")
DOMINANT_SHARE = 0.9  # the paper's label skew: a skewed client holds 90% of one class
_DIRICHLET_ATTEMPTS = 100  # redraws before concluding min_samples cannot be met


def _labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}")
    out = arr.astype(np.int64, copy=False)
    if out.size and out.min() < 0:
        raise ValueError(f"labels must be non-negative class ids, got {out.min()}")
    return out


def _check_clients(num_clients: int, num_samples: int, per_client: int = 1) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_samples < num_clients * per_client:
        raise ValueError(f"{num_samples} samples cannot give {num_clients} clients {per_client} sample(s) each")


def _finish(parts: list[list[npt.NDArray[np.int64]]]) -> Shards:
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts]


def split_iid(labels: npt.ArrayLike, num_clients: int, seed: int) -> Shards:
    """Shuffle all indices and cut them into ``num_clients`` shards whose sizes differ by <= 1.

    The shards cover the dataset. Raises ``ValueError`` if there are fewer samples than clients.
    """
    n = _labels(labels).shape[0]
    _check_clients(num_clients, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s).astype(np.int64) for s in np.array_split(perm, num_clients)]


def split_dirichlet(
    labels: npt.ArrayLike,
    num_clients: int,
    alpha: float,
    seed: int,
    min_samples: int = 1,
) -> Shards:
    """Split each class's indices across clients in proportions drawn from Dirichlet(alpha).

    Small ``alpha`` gives strong skew; large ``alpha`` approaches IID. The shards cover the
    dataset; a class's samples are dealt in a shuffled order, so data stored sorted (by source,
    by length) does not hand each client one contiguous run of it. A draw that leaves a client
    below ``min_samples`` is redrawn (from the same generator, so still deterministic). Raises
    ``ValueError`` if 100 draws all fail or an argument is out of range.
    """
    y = _labels(labels)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a positive number, got {alpha}")
    _check_clients(num_clients, y.shape[0], min_samples)
    rng = np.random.default_rng(seed)
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * idx.size).astype(np.int64)
            # Dealt in an order of its own per class: with near-equal shares and fewer samples of a class than
            # clients, the same cuts would give every class's samples to the same clients and none to the rest.
            order = rng.permutation(num_clients)
            for client, piece in zip(order, np.split(idx, cuts), strict=True):
                parts[client].append(piece)
        shards = _finish(parts)
        if min(s.size for s in shards) >= min_samples:
            return shards
    raise ValueError(
        f"dirichlet(alpha={alpha}) left a client with fewer than {min_samples} samples in "
        f"{_DIRICHLET_ATTEMPTS} draws; use a larger alpha or fewer clients"
    )


def label_skew_proportions(
    num_clients: int, num_classes: int, dominant_share: float = DOMINANT_SHARE
) -> npt.NDArray[np.float64]:
    """The paper's label-skew class mix: shape ``(num_clients, num_classes)``, rows sum to 1.

    The rule, for m clients, K classes and dominant share s (the paper's s = 0.9):
      - K = 2: the first round(0.3 m) clients hold [s, 1 - s], the next round(0.3 m) hold
        [1 - s, s], the rest [0.5, 0.5] (round half up; m = 10 gives the paper's 3/3/4).
      - K >= 3: clients form K consecutive groups, as even as possible with earlier groups
        taking the extras (m = 10, K = 3 gives the paper's 4/3/3 for MNLI); group c holds
        s of class c and (1 - s) / (K - 1) of each other class.
    s = 1/K is an even mix on every client; s must lie in [1/K, 1].
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_classes < 2:
        raise ValueError(f"label skew needs at least 2 classes, got {num_classes}")
    if not (math.isfinite(dominant_share) and 1.0 / num_classes - 1e-12 <= dominant_share <= 1.0):
        raise ValueError(
            f"the dominant share of a label skew over {num_classes} classes must lie in "
            f"[1/{num_classes}, 1], got {dominant_share}"
        )
    # round() so that binary tasks get exactly 0.1, not 1 - 0.9 = 0.09999999999999998.
    minor = round(1.0 - dominant_share, 12) / (num_classes - 1)
    if num_classes == 2:
        skewed = (3 * num_clients + 5) // 10  # round(0.3 m) half up, in exact integers
        dominant = [0] * skewed + [1] * skewed + [-1] * (num_clients - 2 * skewed)
    else:
        base, extra = divmod(num_clients, num_classes)
        dominant = [c for c in range(num_classes) for _ in range(base + (c < extra))]
    props = np.full((num_clients, num_classes), minor, dtype=np.float64)
    for client, c in enumerate(dominant):
        if c < 0:
            props[client] = 1.0 / num_classes
        else:
            props[client, c] = dominant_share
    return props


def _client_counts(props: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
    """Per-client class counts summing to ``n``: largest-remainder rounding of ``props * n``
    (ties to the lower class id), so every count is within 1 of its exact share."""
    # Rounding to 1e-9 first keeps float noise (0.9 * 10 = 8.999...) from deciding which
    # class gets the leftover sample.
    exact = np.round(props * n, 9)
    counts = np.floor(exact).astype(np.int64)
    short = n - counts.sum(axis=1)
    order = np.argsort(-(exact - counts), axis=1, kind="stable")
    for client in range(props.shape[0]):
        counts[client, order[client, : short[client]]] += 1
    return counts


def _fits(props: npt.NDArray[np.float64], pools: npt.NDArray[np.int64], n: int) -> bool:
    return bool(np.all(_client_counts(props, n).sum(axis=0) <= pools))


def _label_skew_capacity(props: npt.NDArray[np.float64], pools: npt.NDArray[np.int64], upper: int) -> int:
    """Largest n <= ``upper`` whose `_client_counts` take no more of a class than ``pools``."""
    # Class c needs at least (sum of its shares) * n - num_clients samples, which bounds n
    # from above; scanning down from that bound takes a handful of steps.
    # A class no client has a share of (dominant share 1 with fewer clients than classes) bounds nothing.
    shares = props.sum(axis=0)
    used = shares > 0
    bound = int(np.min((pools[used] + props.shape[0]) / shares[used]))
    n = min(upper, bound)
    while n > 0 and not _fits(props, pools, n):
        n -= 1
    return n


def split_label_skew(
    labels: npt.ArrayLike,
    num_clients: int,
    seed: int,
    samples_per_client: int | None = None,
    num_classes: int | None = None,
    dominant_share: float = DOMINANT_SHARE,
) -> Shards:
    """Give every client n samples, drawn without replacement in the class mix of
    `label_skew_proportions` with ``dominant_share`` (largest-remainder rounding: each class count
    within 1 of exact; a tie between two remainders goes to the lower class id, so every process
    that splits the same labels gives the same shards).

    ``n`` defaults to the largest value, at most ``len(labels) // num_clients``, that exhausts
    no class; ``num_classes`` defaults to ``max(labels) + 1``. The shards need not cover the
    dataset. Raises ``ValueError`` if ``samples_per_client`` needs more of a class than exists.
    """
    y = _labels(labels)
    _check_clients(num_clients, y.shape[0])
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if y.max() >= k:
        raise ValueError(f"labels reach {y.max()} but num_classes is {k}")
    props = label_skew_proportions(num_clients, k, dominant_share)
    pools = np.bincount(y, minlength=k)
    upper = y.shape[0] // num_clients
    if samples_per_client is None:
        n = _label_skew_capacity(props, pools, upper)
        if n == 0:
            raise ValueError(
                f"class counts {pools.tolist()} are too small for {num_clients} label-skewed clients: give fewer "
                "clients or more rows, or another split (iid or dirichlet:ALPHA)"
            )
    else:
        n = samples_per_client
        if n < 1:
            raise ValueError(f"samples_per_client must be >= 1, got {n}")
        if n > upper or not _fits(props, pools, n):
            capacity = _label_skew_capacity(props, pools, upper)
            raise ValueError(
                f"samples_per_client={n} exceeds what class counts {pools.tolist()} allow for "
                f"{num_clients} label-skewed clients (at most {capacity})"
            )
    counts = _client_counts(props, n)
    rng = np.random.default_rng(seed)
    class_pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(k)]
    taken = np.zeros(k, dtype=np.int64)
    parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_clients)]
    for client in range(num_clients):
        for c in range(k):
            parts[client].append(class_pools[c][taken[c] : taken[c] + counts[client, c]])
            taken[c] += counts[client, c]
    return _finish(parts)


def parse_label_skew(scheme: str) -> tuple[float, int | None] | None:
    """``(dominant share, samples per client or None)`` of a ``label-skew[@SHARE][:N]`` scheme; None for a
    scheme of another kind. Raises ``ValueError`` for a malformed label-skew scheme."""
    head, sep, arg = scheme.strip().lower().partition(":")
    kind, at, share_text = head.partition("@")
    if kind != "label-skew":
        return None
    share = DOMINANT_SHARE
    if at:
        try:
            share = float(share_text)
        except ValueError:
            raise ValueError(
                f"shard scheme {scheme!r}: label-skew@SHARE needs the dominant class's share, e.g. label-skew@0.7"
            ) from None
    per_client = None
    if sep:
        try:
            per_client = int(arg)
        except ValueError:
            raise ValueError(f"shard scheme {scheme!r}: label-skew:N needs an integer N samples per client") from None
    return share, per_client


def make_shards(
    dataset_or_labels: TextDataset | npt.ArrayLike,
    scheme: str,
    num_clients: int,
    seed: int,
) -> Shards:
    """Partition a dataset (or its label array) for ``num_clients`` clients by a scheme string.

    Schemes: ``iid``; ``label-skew`` (the paper's split, `split_label_skew`), with ``@SHARE`` for
    another dominant share than the paper's 0.9 and ``:N`` for N samples per client (``label-skew:500``,
    ``label-skew@0.7``, ``label-skew@0.7:500``); ``dirichlet:ALPHA``. Raises ``ValueError`` for an
    unknown or malformed scheme (or one the data cannot satisfy).
    """
    if isinstance(dataset_or_labels, TextDataset):
        labels, num_classes = dataset_or_labels.labels, dataset_or_labels.num_classes
    else:
        labels, num_classes = _labels(dataset_or_labels), None
    kind, arg = parse_shard_scheme(scheme)
    if kind == "label-skew":
        assert isinstance(arg, tuple)  # noqa: S101 (what the parser returns for it)
        share, per_client = arg
        return split_label_skew(labels, num_clients, seed, per_client, num_classes, share)
    if kind == "dirichlet":
        assert isinstance(arg, float)  # noqa: S101 (what the parser returns for it)
        return split_dirichlet(labels, num_clients, arg, seed)
    return split_iid(labels, num_clients, seed)


def parse_shard_scheme(scheme: str) -> tuple[str, tuple[float, int | None] | float | None]:
    """``(kind, argument)`` of a `make_shards` scheme, checked without any data, so that a config can refuse a
    bad one before loading a model: ("iid", None), ("label-skew", (share, n or None)), ("dirichlet", alpha).
    Raises ``ValueError`` saying what is wrong (what only the data can tell, such as too few samples, is left to
    `make_shards`)."""
    skew = parse_label_skew(scheme)
    if skew is not None:
        if not (math.isfinite(skew[0]) and 0.0 < skew[0] <= 1.0):
            raise ValueError(f"shard scheme {scheme!r}: the dominant share must lie in (0, 1]")
        if skew[1] is not None and skew[1] < 1:
            raise ValueError(f"shard scheme {scheme!r}: label-skew:N needs N >= 1 samples per client")
        return "label-skew", skew
    kind, sep, arg = scheme.strip().lower().partition(":")
    if kind == "iid" and not sep:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"shard scheme {scheme!r}: dirichlet needs a concentration, e.g. dirichlet:0.5") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"shard scheme {scheme!r}: dirichlet alpha must be a positive number")
        return "dirichlet", alpha
    raise ValueError(f"unknown shard scheme {scheme!r}; expected one of {', '.join(SHARD_SCHEMES)}")
