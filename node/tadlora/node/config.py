"""The node's configuration: one frozen dataclass, built from flags, ``TADLORA_*`` variables and defaults."""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from tadlora.adapter import INITS, LoraSpec, ModelSpec
from tadlora.core.methods import make_method, method_names, takes_switch_interval
from tadlora.core.robust import RobustMixing
from tadlora.data.loaders import check_dataset_spec
from tadlora.data.splits import parse_shard_scheme
from tadlora.node.identity import kept_init
from tadlora.node.netif import ipv4_by_interface, require_unicast_ipv4
from tadlora.node.peer_checks import node_id_problem
from tadlora.node.peerspec import (
    PeersOption,
    address_problem,
    join_host_port,
    parse_peers_option,
    unbracketed_hint,
)
from tadlora.training import TrainSpec

DEFAULT_PORT = 7070
# s; gRPC holds each connection's grace (twice the exchange timeout) as a C int of ms, so a timeout over ~12 days
# fails at start as an OverflowError. A day is far past what any exchange needs.
MAX_EXCHANGE_TIMEOUT_S = 86_400.0


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node needs. Nodes of one cluster must agree on model, LoRA, labels, seed, method, T,
    link probability, degree cap and sharding; the handshake checks the model fingerprint (model, LoRA, labels,
    seed) and the `schedule` (method, T, link probability, degree cap)."""

    out: Path
    node_id: str | None = None  # None: reuse the id saved in ``out``, else make one
    cluster: str = "default"
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    advertise_address: str | None = None
    peers: PeersOption = field(default_factory=lambda: parse_peers_option("auto"))
    mdns_interface: str | None = None
    model: str = "minilm"
    dataset: str = "builtin:sst2-small"
    split: str = "label-skew"
    shard: int = 0
    num_shards: int = 1
    samples_per_client: int | None = None
    eval_samples: int | None = 200
    eval_every: int = 5
    method: str = "tad"
    switch_interval: int | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(local_steps=10, batch_size=16, max_length=64))
    seed: int = 0
    init: str = "auto"  # how A and the head are drawn: auto (a kept run's, else portable), or one of INITS
    rounds: int | None = None  # None: run until stopped
    link_prob: float = 1.0
    max_neighbors: int | None = None  # None: every verified peer; K: a ring-plus-chords overlay of degree <= K
    min_peers: int = 1
    peer_wait: float = 60.0  # s to wait for min_peers before training alone
    exchange_timeout: float = 60.0  # s a round waits for its neighbours once its own snapshot is ready
    checkpoint_every: int = 5
    device: str = "auto"
    metrics_port: int | None = None
    # Plaintext grpc.health.v1 only, for probes that cannot present a client certificate (kubelet's gRPC probe).
    health_port: int | None = None
    max_payload_bytes: int = 512 << 20
    tls_dir: Path | None = None  # cluster CA + this node's certificate (tadlora-node certs ...)
    insecure: bool = False  # plaintext gRPC, explicitly asked for
    # Per-tensor Frobenius norm over which a neighbour's factor is refused (BAD_PAYLOAD): LoRA factors of a
    # healthy run stay in the single or low double digits, so this only catches absurd or hostile values.
    max_factor_norm: float = 1e4
    robust_mixing: RobustMixing | None = None  # None: plain MH mixing; see tadlora.core.robust

    def __post_init__(self) -> None:
        try:  # its form alone (glue:NO-SUCH-TASK): refused as a bad flag, not once the model has loaded
            check_dataset_spec(self.dataset)
        except ValueError as exc:
            raise ValueError(f"--dataset: {exc}") from exc  # as the daemon names a dataset that does not load
        if self.node_id is not None and (problem := node_id_problem(self.node_id)) is not None:
            # TLS would take other spellings ('A', 'a.') as the same certificate name: one spelling per node.
            raise ValueError(f"--node-id: {problem}")  # the flag, so that a TADLORA_NODE_ID that set it is named
        if self.advertise_address is not None:
            # Checked here, not only by mDNS's announcement: with static or dns: peers it is what handshakes tell
            # peers to call back, and an empty one would let a wildcard --listen announce 0.0.0.0 after all.
            # Kept in one spelling (IPv6 compressed, no brackets), which the self-skip compares with peer lists.
            object.__setattr__(self, "advertise_address", callable_ip(self.advertise_address))
        if not self.cluster:
            # mDNS refuses an empty cluster only once the model has loaded; no cluster could match it anyway.
            raise ValueError("--cluster must not be empty")
        if self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(method_names())}")
        if self.switch_interval is not None and not takes_switch_interval(self.method):
            raise ValueError(f"--switch-interval does not apply to method {self.method!r}")
        self.train.check_method(make_method(self.method, self.switch_interval))
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"--shard {self.shard} must be in 0..{self.num_shards - 1} (--num-shards)")
        if not 0.0 < self.link_prob <= 1.0:
            raise ValueError(f"--link-prob must be in (0, 1], got {self.link_prob}")
        if self.max_neighbors is not None and self.max_neighbors < 2:
            raise ValueError(
                f"--max-neighbors must be >= 2 (a ring keeps the graph connected), got {self.max_neighbors}"
            )
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        # Written so that NaN fails too: a NaN deadline times every exchange out at once, and a NaN --peer-wait
        # spins the wait for --min-peers forever. (An infinite --peer-wait is fine: wait for the peers, however long.)
        if not 0 < self.exchange_timeout <= MAX_EXCHANGE_TIMEOUT_S or not self.peer_wait >= 0:
            raise ValueError(
                f"--exchange-timeout must be in (0, {MAX_EXCHANGE_TIMEOUT_S:.0f}] seconds and --peer-wait >= 0, got "
                f"{self.exchange_timeout} and {self.peer_wait}"
            )
        if self.min_peers < 0:
            raise ValueError(f"--min-peers must be >= 0, got {self.min_peers}")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):  # else only once the model loads: exit 1, and
            # a supervisor restarting the node for ever
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.init not in ("auto", *INITS):
            raise ValueError(f"--init must be auto, {' or '.join(INITS)}, got {self.init!r}")
        if self.seed < 0:  # it seeds numpy's generators, which take no negative seed: exit 1 after the model loaded
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        # Zero examples would fail as a tokenizer traceback after the model has loaded.
        for flag, count in (("--eval-samples", self.eval_samples), ("--samples-per-client", self.samples_per_client)):
            if count is not None and count < 1:
                raise ValueError(f"{flag} must be >= 1, got {count}")
        for flag, every in (("--checkpoint-every", self.checkpoint_every), ("--eval-every", self.eval_every)):
            if every < 1:
                raise ValueError(f"{flag} must be >= 1, got {every}")
        try:
            parse_shard_scheme(self.split)  # here, not after minutes of model and data loading
        except ValueError as exc:
            raise ValueError(f"--split: {exc}") from None
        if not self.max_factor_norm > 0:
            raise ValueError(f"--max-factor-norm must be > 0, got {self.max_factor_norm}")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            if self.listen.count(":") > 1 and not self.listen.startswith("["):
                raise ValueError(f"--listen {self.listen!r}: {unbracketed_hint(self.listen)}")
            raise ValueError(f"--listen {self.listen!r}: expected HOST:PORT")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            # gRPC would read '::1:7070' as another address and port ([::0.1.112.112]:443), and fail to bind.
            raise ValueError(f"--listen {self.listen!r}: {unbracketed_hint(self.listen)}")
        if host.startswith("["):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:  # gRPC would fail to bind it only once the model has loaded: exit 1, retried for ever
                raise ValueError(
                    f"--listen {self.listen!r}: {host[1:-1]!r} in brackets is not an IPv6 address"
                ) from None
            # One spelling ([::1], not [0::1]): the node's own address is compared as text with its peer lists.
            object.__setattr__(self, "listen", join_host_port(host, port))
        # What peers are told to dial, unless --advertise-address or a wildcard names another: they refuse it
        # unless it is one host's HOST:PORT (`address_problem`, which also refuses a host that is no name).
        told = None if self.advertise_address is not None or is_wildcard(host) else join_host_port(host, 1)
        if told is not None and (problem := address_problem(told)) is not None:
            # Peers refuse it as the address to call back (BAD_PAYLOAD), each handshake, once the model has loaded.
            raise ValueError(
                f"--listen {self.listen!r}: peers would refuse it as this node's address: {problem}; listen on an "
                "address they can dial, or set --advertise-address to one"
            )
        if self.peers.auto and self.mdns_interface is not None and _is_ipv6(self.mdns_interface.strip()):
            # Here, not once the model has loaded (exit 1, restarted for ever): the flag alone decides it.
            raise ValueError(
                f"--mdns-interface {self.mdns_interface}: an IPv6 address, but mDNS here is IPv4 only; give the "
                "interface's name or one of its IPv4 addresses, or find IPv6 peers with --peers [ADDRESS]:PORT or "
                "dns:NAME"
            )
        # gRPC binds with SO_REUSEPORT: the --listen port twice would not fail, but split the connections.
        hp = self.health_port
        if hp is not None and (not 0 <= hp <= 65535 or hp == int(port) != 0):
            raise ValueError(f"--health-port {self.health_port}: must be in 0..65535 and not the --listen port")
        # Checked here: the metrics server binds only after the model has loaded, and a port out of range then
        # fails as a traceback (OverflowError), one taken by --listen or --health-port as an address in use.
        mp = self.metrics_port
        if mp is not None and (not 0 <= mp <= 65535 or (mp != 0 and mp in (int(port), hp))):
            raise ValueError(f"--metrics-port {mp}: must be in 0..65535 and not the --listen or --health-port port")
        if self.tls_dir is None and not self.insecure:
            raise ValueError(
                "no TLS certificates: create them with `tadlora-node certs init DIR` and "
                "`tadlora-node certs issue NODE_ID --dir DIR`, then pass --tls-dir DIR --node-id NODE_ID; "
                "or run without encryption or peer authentication with --insecure"
            )
        if self.tls_dir is not None and self.insecure:
            raise ValueError("--tls-dir and --insecure contradict each other: choose one")
        if self.tls_dir is not None and self.node_id is None:
            raise ValueError("--tls-dir needs --node-id: it names this node's certificate (NODE_ID.crt/.key)")

    def run_settings(self) -> dict[str, str | int | float | None]:
        """The settings, besides the model fingerprint, that a node resuming a run from ``out`` must share with the
        run kept there (`tadlora.node.identity.run_conflict`): resumed under others, the run's factors and round would
        carry into another run, and its rounds would be logged with that run's."""
        return {
            "cluster": self.cluster,
            "method": self.method,
            "switch_interval": make_method(self.method, self.switch_interval).switch_interval,
            "dataset": self.dataset,
            "split": self.split,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "link_prob": self.link_prob,
            # With link_prob, which links are up (`schedule`): resumed under another cap, its peers refuse it.
            "max_neighbors": self.max_neighbors,
        }

    def schedule(self) -> str:
        """What the nodes of one cluster must share, beyond the model fingerprint, for both ends of every link to
        agree each round: the method (which factors train and are mixed, and how), its effective switch interval T,
        the link probability p and the overlay degree cap (both decide which links are up; the seed, the third
        input, is in the fingerprint). Canonical, e.g. ``"tad T=5 p=0.5 max-neighbors=all"``: a default T written
        out and 0.10 for 0.1 give the same string. Peers compare it as a string (`tadlora.node.peer_checks`), so its
        spelling is part of the protocol. Per-node settings (shard, data, split, robust mixing, timeouts) are not in
        it: nodes that differ in them still mix consistently."""
        t = make_method(self.method, self.switch_interval).switch_interval
        cap = "all" if self.max_neighbors is None else str(self.max_neighbors)
        # repr: the shortest string that reads back as the same float, the same on every machine.
        return f"{self.method} T={'none' if t is None else t} p={float(self.link_prob)!r} max-neighbors={cap}"

    def model_spec(self, label_names: tuple[str, ...]) -> ModelSpec:
        """The model this node builds for a dataset of ``label_names``, drawn with ``init``; with "auto", portably
        (the same bits on every CPU) unless ``out`` holds a run that was not (`tadlora.node.identity.kept_init`)."""
        init = kept_init(self.out) if self.init == "auto" else self.init
        return ModelSpec(model=self.model, label_names=label_names, lora=self.lora, seed=self.seed, init=init)

    def advertised_host(self, interfaces: list[str]) -> str:
        """The host this node tells its peers to dial, as it stands in HOST:PORT (an IPv6 address in brackets),
        with ``interfaces`` its mDNS interface addresses ([] without mDNS): --advertise-address, else the --listen
        host, unless that is a wildcard: then the first of ``interfaces``. (The node refuses a wildcard host with
        neither --advertise-address nor mDNS, and its mDNS interface lookup raises unless it finds an address: so it
        never announces 0.0.0.0.)"""
        host = self.listen.rpartition(":")[0]
        chosen = self.advertise_address or (interfaces[0] if is_wildcard(host) and interfaces else host)
        return join_host_port(chosen, 0).rpartition(":")[0]


def check_callable_back(cfg: NodeConfig) -> None:
    """Raise ValueError for a wildcard --listen with neither mDNS nor --advertise-address: the node would tell
    its peers 0.0.0.0:PORT, and a peer that dials that reaches its own host (itself, or another node there); and
    for an mDNS node without --advertise-address whose --listen host is not an IPv4 address, which its mDNS advert
    could not name.
    Not one of `NodeConfig`'s own checks: `tadlora-node doctor` reports it as a FAIL with the others."""
    host = cfg.listen.rpartition(":")[0]
    if is_wildcard(host) and cfg.advertise_address is None and not cfg.peers.auto:
        raise ValueError(
            f"--listen {cfg.listen} serves on every address but names none that peers can call back, and there "
            "is no mDNS to announce one: set --advertise-address (TADLORA_ADVERTISE_ADDRESS) to the IP peers "
            "reach this node at (in Kubernetes: the pod IP), or --listen on that address"
        )
    if cfg.peers.auto and cfg.advertise_address is not None and _is_ipv6(cfg.advertise_address):
        # An mDNS advert carries IPv4 addresses only (see docs/protocol.md), and would fail once the model has loaded.
        raise ValueError(
            f"--advertise-address {cfg.advertise_address}: mDNS (--peers auto) announces it, and announces IPv4 "
            "addresses only: find IPv6 peers with --peers [ADDRESS]:PORT or dns:NAME instead of auto, or advertise "
            "an IPv4 address"
        )
    if cfg.peers.auto and cfg.advertise_address is None and not is_wildcard(host):
        # mDNS announces the --listen host, and an advert holds IPv4 addresses only: a name (localhost) or an IPv6
        # host would fail there, once the model has loaded, as exit 1 naming no flag (and be restarted for ever).
        try:
            require_unicast_ipv4(host.strip("[]"), "")
        except ValueError as exc:
            raise ValueError(
                f"--listen {cfg.listen}: mDNS (--peers auto) announces the --listen host, and "
                f"{str(exc).strip()}: --listen on an IPv4 address of this host (or 0.0.0.0:PORT), or set "
                "--advertise-address (TADLORA_ADVERTISE_ADDRESS) to the IPv4 address peers reach this node at"
            ) from None


def callable_ip(text: str) -> str:
    """``text`` as an --advertise-address: an IPv4 or IPv6 address (bare or in brackets) that a peer can dial,
    in one spelling (IPv6 compressed, without brackets). ValueError naming the flag for anything else: a host name,
    a port, a wildcard, a multicast address, or an IPv6 link-local one (its zone is this host's own: no peer can
    dial it as written)."""
    what = "--advertise-address (TADLORA_ADVERTISE_ADDRESS)"
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not _is_ipv6(bare):
        require_unicast_ipv4(bare, what)  # raises, naming the flag, for all but a unicast IPv4 address
        return str(ipaddress.IPv4Address(bare))
    ip = ipaddress.IPv6Address(bare)
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.scope_id:
        raise ValueError(
            f"{what} {text} must be a unicast IPv6 address peers can dial: not ::, multicast or link-local (fe80::/10, "
            "whose zone only this host knows)"
        )
    return str(ip)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def is_wildcard(host: str) -> bool:
    """Whether a --listen host binds every address (0.0.0.0, ::), which names none a peer could dial."""
    return host.strip("[]") in ("0.0.0.0", "", "::")  # noqa: S104 - recognising it, not binding to it


def new_node_id() -> str:
    """A fresh random node id."""
    return f"node-{secrets.token_hex(4)}"


def _loopback_interface(spec: str) -> bool:
    """Whether --mdns-interface ``spec`` (an address or a name) is loopback: an address in 127.0.0.0/8, or an
    interface whose IPv4 addresses all are (lo)."""
    spec = spec.strip()
    try:
        return ipaddress.IPv4Address(spec).is_loopback
    except ValueError:
        pass
    addresses = ipv4_by_interface().get(spec)
    return bool(addresses) and all(ipaddress.IPv4Address(a).is_loopback for a in addresses or ())


def default_listen(peers: PeersOption, mdns_interface: str | None) -> str:
    """--listen when neither the flag nor TADLORA_LISTEN gives it: every address (``0.0.0.0:7070``) for an mDNS
    node on a network interface, which then announces that interface's address (and follows it when renumbered);
    else ``127.0.0.1:7070``, reachable from this host only. A loopback default there made `tadlora-node --peers
    auto` announce 127.0.0.1 to the LAN, where every other node dialled itself at it and none ever mixed."""
    if peers.auto and not (mdns_interface is not None and _loopback_interface(mdns_interface)):
        return f"0.0.0.0:{DEFAULT_PORT}"
    return f"127.0.0.1:{DEFAULT_PORT}"


def loopback_told_to_others(cfg: NodeConfig, mdns_addresses: list[str]) -> tuple[str, str] | None:
    """(problem, fix) when this node would give other hosts a loopback address to dial, which each of them would
    dial on itself: its --listen host is loopback (and no --advertise-address says otherwise), and mDNS announces
    it on a network interface (``mdns_addresses``, its addresses) or a static peer is an address on another host.
    None otherwise: a cluster on this host alone runs so (``--mdns-interface 127.0.0.1``)."""
    host, _, port = cfg.listen.rpartition(":")
    try:
        if cfg.advertise_address is not None or not ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: what it names is not known here
        return None
    fix = (
        f"--listen 0.0.0.0:{port} (or this host's address on the peers' network), or set --advertise-address; keep "
        "a loopback --listen only when every node runs on this host"
    )
    lan = [a for a in mdns_addresses if not ipaddress.IPv4Address(a).is_loopback]
    if lan:
        return (
            f"--listen {cfg.listen} is reachable from this host only, but mDNS on {', '.join(lan)} tells other hosts "
            f"{cfg.listen}, which each of them dials on itself",
            fix + " (then --mdns-interface 127.0.0.1)",
        )
    remote = [p for p in cfg.peers.static if _is_remote_address(p.rpartition(":")[0].strip("[]"))]
    if remote:
        return (
            f"--listen {cfg.listen} is reachable from this host only, but static peers on other hosts "
            f"({', '.join(remote)}) are told {cfg.listen}, which each of them dials on itself",
            fix,
        )
    return None


def _is_remote_address(host: str) -> bool:
    """Whether ``host`` is an IP address other than loopback (a name: not known here, so not counted)."""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
