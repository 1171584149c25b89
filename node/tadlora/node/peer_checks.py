"""The checks on what a peer says of itself and sends: node-id syntax, the sanity caps, the identity a
certificate vouches for, whether two nodes can mix (protocol, cluster, fingerprint, schedule; with what to do about
each mismatch, and which parts of two fingerprints differ), and a payload's declared size. Each raises
`ExchangeRefused` with a reason a person can act on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Protocol

from tadlora.node.limits import MAX_DEGREE, MAX_ROUND, MAX_TEXT_CHARS
from tadlora.node.peerspec import address_problem
from tadlora.node.protocol_types import PROTOCOL_VERSION, ExchangeHeader, PeerInfo
from tadlora.node.wire import ExchangeRefused, FactorSpec, PayloadError, Reason

NODE_ID_CHARS: Final = 63  # chars; one DNS label, since a node id is also a DNS name in its certificate
# One spelling per node id. TLS matches a certificate's DNS names ignoring ASCII case and a trailing dot, and
# reads a dotted-digit name as an IP address, so uppercase and '.' would let one certificate pass as several
# nodes (a Sybil that defeats the trimmed-mean bound of robust mixing).
_NODE_ID: Final = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{NODE_ID_CHARS - 1}}}")
RELEASE_CHARS: Final = 64  # chars of a `PeerInfo.release`
# A release as PEP 440 spells one ("0.1.0", "1.0rc1", "2!1.0.post1+local.7"), or "" from a node too old to say:
# it is logged and shown in `status`, so no spaces, control characters or line breaks.
_RELEASE: Final = re.compile(rf"[0-9A-Za-z.+!_-]{{0,{RELEASE_CHARS}}}")


def is_release(text: str) -> bool:
    """Whether ``text`` may be a `PeerInfo.release` (or TXT ``rel``): "", or a version as PEP 440 spells one."""
    return _RELEASE.fullmatch(text) is not None


def _check_identity(claimed: str, identity: str | None) -> None:
    """With TLS, a caller may only speak as the node its certificate names; ``identity`` "" (a certificate whose
    common name is not one of its DNS names, see grpc_transport) names none."""
    if identity is not None and claimed != identity:
        # "" would read as a certificate issued to an empty name: say what is wrong with it instead.
        unnamed = "no node id (its common name is not among its DNS names)"
        names = repr(identity[:MAX_TEXT_CHARS]) if identity else unnamed
        raise ExchangeRefused(
            Reason.IDENTITY_MISMATCH, f"claims node id {claimed[:MAX_TEXT_CHARS]!r} but its certificate is for {names}"
        )


def check_compatible(local: PeerInfo, remote: PeerInfo) -> None:
    """Raise `ExchangeRefused` (PROTOCOL/CLUSTER/FINGERPRINT/SCHEDULE_MISMATCH) unless the two nodes can exchange
    factors."""
    _check_peer(remote, ours=local)


def check_sane(what: str, *, round: int, degree: int, texts: Iterable[str]) -> None:
    """Raise `ExchangeRefused` unless a peer's self-description is within the caps: ROUND_MISMATCH for a round
    over `MAX_ROUND`, BAD_PAYLOAD for a degree over `MAX_DEGREE` or a text field over `MAX_TEXT_CHARS`."""
    if round > MAX_ROUND:
        raise ExchangeRefused(Reason.ROUND_MISMATCH, f"{what} claims round {round}, over the cap of {MAX_ROUND}")
    if degree > MAX_DEGREE:
        raise ExchangeRefused(Reason.BAD_PAYLOAD, f"{what} claims degree {degree}, over the cap of {MAX_DEGREE}")
    longest = max((len(text) for text in texts), default=0)
    if longest > MAX_TEXT_CHARS:
        raise ExchangeRefused(Reason.BAD_PAYLOAD, f"{what} has a text field of {longest} chars (cap {MAX_TEXT_CHARS})")


def node_id_problem(node_id: str) -> str | None:
    """Why ``node_id`` is not a node id (1-63 lowercase letters, digits, '_' or '-', starting with a letter or
    digit), or None when it is one."""
    if _NODE_ID.fullmatch(node_id):
        return None
    return (
        f"node id {node_id[:MAX_TEXT_CHARS]!r} is not 1-{NODE_ID_CHARS} lowercase letters, digits, '_' or '-' "
        "starting with a letter or digit"
    )


def _check_node_id(node_id: str, what: str) -> None:
    """BAD_PAYLOAD for a node id off the syntax: each node has exactly one spelling its certificate can bind."""
    if (problem := node_id_problem(node_id)) is not None:
        raise ExchangeRefused(Reason.BAD_PAYLOAD, f"{what}: {problem}")


def _check_info(info: PeerInfo, what: str) -> None:
    """`check_sane`, BAD_PAYLOAD for an address that is no HOST:PORT (`address_problem`), and ROUND_MISMATCH for
    a ``last_mixed_round`` over ``round + 1``: a node mixes round t
    before it moves on to t + 1, so it reports at most its own round + 1 (between closing a round and the next).
    Catch-up follows the peer that claims the latest mixing and adopts that claim, so a bigger one would pull
    every node to a round nobody reached."""
    texts = (info.node_id, info.cluster, info.fingerprint, info.address, info.method, info.schedule,
             info.fingerprint_parts)  # fmt: skip
    check_sane(what, round=info.round, degree=info.degree, texts=texts)
    _check_node_id(info.node_id, what)
    # Dialled back (an inbound peer's, every probe and exchange after): only HOST:PORT, never another gRPC target.
    if info.address and (problem := address_problem(info.address)) is not None:
        raise ExchangeRefused(
            Reason.BAD_PAYLOAD, f"{what} says it is at {info.address!r}, which is no address to dial: {problem}"
        )
    if not is_release(info.release):
        raise ExchangeRefused(
            Reason.BAD_PAYLOAD,
            f"{what} says it runs release {info.release[:RELEASE_CHARS]!r}, not a version of up to {RELEASE_CHARS} "
            "letters, digits and '.+!_-'",
        )
    if info.last_mixed_round > info.round + 1:
        raise ExchangeRefused(
            Reason.ROUND_MISMATCH,
            f"{what} claims it last mixed in round {info.last_mixed_round - 1}, past its round {info.round}",
        )


class _Claims(Protocol):
    """What a peer says of itself that decides whether two nodes may mix: a `PeerInfo`, or an exchange header
    (ours, or the protobuf one as it arrived)."""

    @property
    def node_id(self) -> str: ...
    @property
    def protocol_version(self) -> int: ...
    @property
    def cluster(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def schedule(self) -> str: ...


def _check_peer(theirs: _Claims, *, ours: PeerInfo | ExchangeHeader) -> None:
    """Refuse a peer (its info, or its header) whose protocol, cluster, model fingerprint or schedule is not
    ``ours``. The detail names each node with its own value, not "peer" and "this node": a refusal is sent to the
    peer, which logs it as the reason it was refused, and there "this node" would be the peer itself."""
    them, us = repr(theirs.node_id[:MAX_TEXT_CHARS]), repr(ours.node_id)
    if theirs.protocol_version != PROTOCOL_VERSION:
        raise ExchangeRefused(
            Reason.PROTOCOL_MISMATCH,
            f"{them} speaks protocol {theirs.protocol_version}{_running(theirs)}, {us} speaks protocol "
            f"{PROTOCOL_VERSION}{_running(ours)}: {SAME_PROTOCOL_FIX}",
        )
    if theirs.cluster != ours.cluster:
        raise ExchangeRefused(
            Reason.CLUSTER_MISMATCH, f"{them} is in cluster {theirs.cluster!r}, {us} is in cluster {ours.cluster!r}"
        )
    if theirs.fingerprint != ours.fingerprint:
        # Which parts differ, where both sides said their parts (a handshake's infos; an exchange header has none).
        parts = fingerprint_differences(_parts_of(theirs), _parts_of(ours), them, us)
        differ = f"; {them} and {us} differ in {parts}" if parts else ""
        # A schedule that differs too is said here as well: refused for the fingerprint alone, a pair started with
        # another --seed and another --method would find the second mistake only after fixing the first.
        also = (
            f"; and {them} runs {theirs.schedule!r}, {us} runs {ours.schedule!r}"
            if schedules_differ(theirs.schedule, ours.schedule)
            else ""
        )
        raise ExchangeRefused(
            Reason.FINGERPRINT_MISMATCH,
            f"{them} has model fingerprint {theirs.fingerprint[:16]!r}, "
            f"{us} has model fingerprint {ours.fingerprint[:16]!r}{differ}{also}: {SAME_MODEL_FIX}"
            + (f"; {SAME_SCHEDULE_FIX}" if also else ""),
        )
    if schedules_differ(theirs.schedule, ours.schedule):
        raise ExchangeRefused(
            Reason.SCHEDULE_MISMATCH,
            f"{them} runs {theirs.schedule!r}, {us} runs {ours.schedule!r}: {SAME_SCHEDULE_FIX}",
        )


# What to do about a peer of another model fingerprint (`tadlora.adapter.fingerprint`: one hash of what it covers;
# which part differs is told from the two nodes' parts, `fingerprint_differences`, where both send them), wherever
# one is found.
SAME_MODEL_FIX: Final = (
    "the fingerprint covers --model (its weights, and its tokenizer under --init portable), the label set of "
    "--dataset, --lora-r, --lora-alpha, --lora-dropout, --lora-targets, --init and --seed: start every node of a "
    "cluster with the same"
)

# What to do about a peer of another protocol version (`PROTOCOL_VERSION`), wherever one is found.
SAME_PROTOCOL_FIX: Final = "upgrade the node of the older protocol: every node of a cluster must speak the same one"

# What to do about a peer of another schedule (`NodeConfig.schedule`), wherever one is found.
SAME_SCHEDULE_FIX: Final = (
    "start every node of a cluster with the same --method, --switch-interval, --link-prob and --max-neighbors"
)


def _running(claims: object) -> str:
    """What a refusal says of a node's release: ' (tadlora RELEASE)' for a node that said it (a handshake's info),
    nothing for one that did not (an exchange header carries none, a node older than `PeerInfo.release` sends none)."""
    release = claims.release if isinstance(claims, PeerInfo) else ""
    return f" (tadlora {release})" if release else ""


def _parts_of(claims: object) -> str:
    """A node's `PeerInfo.fingerprint_parts`; "" from an exchange header, which carries none."""
    return claims.fingerprint_parts if isinstance(claims, PeerInfo) else ""


# chars of `fingerprint_differences` with the values; past it the parts are named without them, so that a refusal's
# detail keeps within the `MAX_DETAIL_CHARS` its receiver keeps, the fix at its end included.
DIFFERENCES_MAX_CHARS: Final = 400

# One "key=value" of a `tadlora.adapter.fingerprint_parts` text: a lowercase key, a value of printable ASCII without
# spaces (what a peer sends is logged: no control characters, no line breaks).
_PART: Final = re.compile(r"([a-z][a-z0-9_-]*)=([!-~]+)")


def parse_fingerprint_parts(text: str) -> dict[str, str] | None:
    """The parts of a `tadlora.adapter.fingerprint_parts` text by key, in its order; None for "" (a node too old to
    send one) or a text that is not one (over `MAX_TEXT_CHARS`, a token that is not "key=value", a key twice): a
    peer's, from its handshake or mDNS advert, is read only to say which parts differ, never trusted further."""
    if not text or len(text) > MAX_TEXT_CHARS:
        return None
    parts: dict[str, str] = {}
    for token in text.split(" "):
        if (match := _PART.fullmatch(token)) is None or match.group(1) in parts:
            return None
        parts[match.group(1)] = match.group(2)
    return parts


def fingerprint_differences(theirs: str, ours: str, them: str, us: str) -> str:
    """The parts of two `fingerprint_parts` texts that differ, each with both values, ``them``'s first, e.g.
    "seed ('n1' 1, 'n0' 0) and init ('n1' torch, 'n0' portable)", in ``ours``' order; the parts alone ("model,
    labels and lora") where that would pass `DIFFERENCES_MAX_CHARS`; "" when either text is missing or unreadable
    (`parse_fingerprint_parts`) or no part both name differs (then the fingerprints alone say it). A part one side
    alone names is passed over: a newer node's, or the tokenizer, which torch's init leaves out (the init then
    differs too, and is named)."""
    theirs_parts, ours_parts = parse_fingerprint_parts(theirs), parse_fingerprint_parts(ours)
    if theirs_parts is None or ours_parts is None:
        return ""
    keys = [key for key, value in ours_parts.items() if theirs_parts.get(key, value) != value]
    named = _listed([f"{key} ({them} {theirs_parts[key]}, {us} {ours_parts[key]})" for key in keys])
    return named if len(named) <= DIFFERENCES_MAX_CHARS else _listed(keys)


def _listed(items: list[str]) -> str:
    """The items as a sentence lists them: a; a and b; a, b and c."""
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def schedules_differ(theirs: str, ours: str) -> bool:
    """Whether two nodes' schedules rule out mixing: both known and not equal. An empty one is not compared: nodes
    of protocol 2 before the field existed send none (nor does their mDNS advert), and refusing them would split a
    cluster during a rolling upgrade; such a pair is no worse off than before the check. The handshake, the peer
    manager's advert filter and doctor all decide by this."""
    return bool(theirs and ours and theirs != ours)


def _check_declared_size(total_bytes: int, spec: FactorSpec | None) -> None:
    """TOO_LARGE for a payload declared larger than any payload meeting ``spec`` can be (checked from the header,
    so that a caller cannot make this node hold up to the cap's bytes for a payload it would refuse anyway)."""
    if spec is not None and total_bytes > (most := spec.max_payload_bytes()):
        raise PayloadError(
            Reason.TOO_LARGE,
            f"declared payload of {total_bytes} bytes, but the {len(spec.tensors)} factors expected take at most "
            f"{most} bytes: their shapes or dtypes differ from this node's",
        )


def _check_answerer(node_id: str, expected: str | None, address: str) -> None:
    """IDENTITY_MISMATCH unless the node that answered at ``address`` is the one the connection was made for (an
    address can reach another node: one that announced 0.0.0.0, a restarted host, a reused port). Exact: node ids
    have one spelling (`node_id_problem`), so the case-blind match TLS makes on the same name cannot widen it."""
    if expected is not None and node_id != expected:
        raise ExchangeRefused(
            Reason.IDENTITY_MISMATCH,
            f"{address} answers as {node_id[:MAX_TEXT_CHARS]!r}, not {expected!r}, the node it was dialled for",
        )
