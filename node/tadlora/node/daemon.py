"""The node daemon: one long-lived asyncio process that trains, exchanges and mixes, round after round.

Round t on node i (every node runs the same schedule, so the phase follows from t alone):

1. **Train**: K local steps on the factor(s) the method trains in round t, in a worker thread; the event loop
   keeps serving gRPC and mDNS.
2. **Snapshot**: the factors after training. The round's neighbours are the verified peers (narrowed to their
   overlay under --max-neighbors, `overlay_neighbours`) whose link is up in round t (`link_up(seed, t, i, j, p)`:
   both ends agree on both without talking); d_i is their number.
3. **Exchange**: one push-pull exchange per link, called by the end with the smaller node id, so both ends apply
   the same pair. A callee answers only with its own round-t snapshot (waiting for its training if need be).
   Every exchange carries the sender's d, and w_ij = 1/(1+max(d_i, d_j)) comes from that pair, so both ends
   compute the same weight. A neighbour that misses the deadline is left out on both ends (its weight returns
   to w_ii); the round never waits longer than ``exchange_timeout`` after the snapshot.
4. **Mix** with `tadlora.core.mixing.apply_method_mixing`: the simulator's function on the same numbers.

A node that starts behind (late join, restart) adopts a neighbour's round and factors (`Fetch`) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tadlora import __version__
from tadlora.adapter import AdapterModel, resolve_device
from tadlora.core.factors import Factors, num_bytes, select
from tadlora.core.methods import Method, make_method
from tadlora.core.mixing import apply_method_mixing, local_weights, sent_factors
from tadlora.core.topology import link_up, overlay_neighbours
from tadlora.data import resolve_dataset
from tadlora.node import state
from tadlora.node.config import NodeConfig, check_callable_back, is_wildcard, loopback_told_to_others, new_node_id
from tadlora.node.discovery import Advertisement, MdnsDiscovery, PeerCandidate
from tadlora.node.dnspeers import DnsPeers
from tadlora.node.grpc_transport import GrpcTransport
from tadlora.node.identity import OutRefused, load_identity, out_refusal, run_conflict, save_identity
from tadlora.node.limits import MAX_CANDIDATES_SHOWN, MAX_DEGREE
from tadlora.node.metrics import NodeMetrics
from tadlora.node.netif import InterfaceError, interface_addresses
from tadlora.node.peers import Peer, PeerManager
from tadlora.node.peerspec import looks_like_ipv4
from tadlora.node.progress import TIMEOUT_HEADROOM, ExchangeProgress, describe
from tadlora.node.protocol_types import (
    PROTOCOL_VERSION,
    ExchangeHeader,
    ExchangeResult,
    NeighborStatus,
    PeerInfo,
    PeerTimeout,
    PeerUnavailable,
    StatusInfo,
)
from tadlora.node.rounds import Round, RoundState
from tadlora.node.tls import TlsMaterial
from tadlora.node.transport import Server, Transport
from tadlora.node.wire import ExchangeRefused, FactorSpec, Payload, PayloadError, Reason
from tadlora.training import Encoded, Interrupted, OptimizerState, encode, evaluate, local_steps, precision_warning
from tadlora.workload import client_shards, eval_subset

log = logging.getLogger("tadlora.node")

FETCH_TIMEOUT_S = 60.0  # s for a catch-up download of a full adapter
# s before a peer whose catch-up fetch failed is fetched from again: catch-up runs ahead of every round, and a peer
# that answers handshakes but hangs on Fetch would otherwise hold each round for FETCH_TIMEOUT_S.
FETCH_RETRY_S = 300.0
SHUTDOWN_GRACE_S = 2.0  # s in-flight calls get when the server stops
# s between looks at the mDNS interface's addresses (`Node._follow_interface`): a renumbering is rare, and until it
# is seen the node's peers only miss it for a round or two.
INTERFACE_POLL_S = 5.0
# s: a commit left less than this of the round's time that times out says nothing of the peer (`_exchange_with`).
COMMIT_SLACK_S = 1.0
# s a round waits for a neighbour's call before asking that neighbour whether it is still there (`Node._probe_quiet`):
# a node gone without an mDNS goodbye (a static or dns: peer stopped or killed, a crash) was waited for the whole
# --exchange-timeout, and with 16 nodes at --link-prob 0.1 each such wait put its neighbours out of step, which
# then waited out theirs for each other: rounds of the timeout, cluster-wide, for tens of seconds after 4 stopped.
QUIET_CALLER_S = 2.0
# s: the longest gap between two of those questions to one quiet neighbour in a round. They come at 2, 4, 8, 16, 32,
# 48 ... s into the round. Every 2 s, a neighbour whose local steps take 30 s was asked 14 times a round by each of
# its callees; now 4. A slow one answers each time and calls when its steps are done; a gone one is still caught.
QUIET_CALLER_MAX_S = 16.0
# s a catch-up waits for the answer of a peer whose liveness is being checked already (`Node._ask_rounds`), once the
# others have answered: a live peer answers a handshake in milliseconds, a frozen one only at its timeout (5 s).
SUSPECT_ANSWER_S = 1.0
# Rounds in a row whose local steps outlast --exchange-timeout, and miss neighbours, before the node says it is too
# slow for its cluster's deadline: one such round is a stall (a freeze, a swap storm), two in a row its pace.
SLOW_ROUNDS_TO_WARN = 2
# Rounds of the link schedule `Node._may_be_out_of_step` looks through for a link up: LINK_SCAN_FACTOR / p, in which
# a link up with probability p in each round is missed with probability e^-LINK_SCAN_FACTOR, and never more than
# LINK_SCAN_MAX_ROUNDS (~0.6 s on the event loop per peer ahead, reached below p = 2e-4).
LINK_SCAN_FACTOR = 20.0
LINK_SCAN_MAX_ROUNDS = 100_000


def _progress(done: int, total: int | None, width: int = 20) -> str:
    """A text progress bar for the per-round log line, e.g. ``[#####-----] 10/20``."""
    if total is None:
        return f"[{done}]"
    filled = round(width * done / total)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def is_catch_up_leader(peer_round: int, peer_last_mixed: int, t: int, last_mixed: int, *, restored: bool) -> bool:
    """Whether a node in round ``t`` that last mixed at ``last_mixed`` (1 + the round; 0: never) adopts the state of
    a peer in round ``peer_round`` that last mixed at ``peer_last_mixed`` (`Node._catch_up_if_behind` says why):
    the peer is two or more rounds away, either way, and mixed two or more rounds later; or, ``restored`` (the
    node's state is a checkpoint's with a mixing in its past, and it has not mixed since), the peer is two or more
    rounds ahead and mixed no earlier."""
    if abs(peer_round - t) >= 2 and peer_last_mixed >= last_mixed + 2:
        return True
    return restored and peer_round >= t + 2 and peer_last_mixed >= last_mixed


@dataclass(frozen=True)
class NodeResult:
    """What a finished run reached: ``rounds_completed`` is the round it reached (the rounds before it are done,
    counted across resumes and catch-ups, as --rounds counts them); ``rounds_run`` the rounds this process ran
    itself; ``stopped``, whether a stop ended it before --rounds."""

    node_id: str
    rounds_completed: int
    last_accuracy: float | None
    last_loss: float | None
    out: Path
    rounds_run: int = 0
    stopped: bool = False


class Node:
    """A tadlora node. ``async with Node(config) as node: await node.run()``; `request_stop` ends it cleanly."""

    def __init__(self, config: NodeConfig, transport: Transport | None = None) -> None:
        self.config = config
        if transport is not None:
            # The health server is the transport's: a config asking for one that the given transport does not
            # serve would leave probes failing with nothing said.
            served = transport.health_port if isinstance(transport, GrpcTransport) else None
            if config.health_port is not None and served != config.health_port:
                raise ValueError(
                    f"health_port={config.health_port} is served by the transport, and the given transport serves "
                    f"{'no health port' if served is None else f'port {served}'}: build it with "
                    f"health_port={config.health_port}, or leave the transport to the node"
                )
            self.transport: Transport = transport
        elif config.tls_dir is not None and config.node_id is not None:
            material = TlsMaterial.from_dir(config.tls_dir, config.node_id)
            self.transport = GrpcTransport.with_tls(
                material, max_payload_bytes=config.max_payload_bytes, health_port=config.health_port
            )
        else:
            self.transport = GrpcTransport(max_payload_bytes=config.max_payload_bytes, health_port=config.health_port)
        self.method: Method = make_method(config.method, config.switch_interval)
        self.schedule = config.schedule()  # sent in every handshake and exchange header; peers refuse another
        self.node_id = ""
        self.fingerprint = ""
        self.fingerprint_parts = ""  # sent in every handshake and mDNS advert: a refusal names the parts that differ
        self.address = ""
        self.metrics = NodeMetrics()
        self._model: AdapterModel | None = None
        self._shard: Encoded | None = None
        self._dev: Encoded | None = None
        # With --optimizer-state persistent: this node's AdamW state as of the last completed round; replaced,
        # never mutated, from the loop (a completed round, a catch-up), read in the worker (local steps, checkpoints).
        self._opt_state: OptimizerState = {}
        self._stop = asyncio.Event()
        self._stop_training = threading.Event()
        self.rounds = RoundState(stopping=self._stop.is_set)  # the schedule position, shared with exchanges
        self._state = "starting"
        self._last_loss: float | None = None
        self._last_accuracy: float | None = None
        self._last_weights: dict[str, tuple[int, float]] = {}
        self._last_exchanged: dict[str, int] = {}  # peer -> 1 + the last round exchanged with it (status)
        self.last_snapshot: Factors = {}  # the last round's post-training factors (diagnostics and tests)
        self._rounds_done = 0
        # Whether this process has run a round (a new node that has not may adopt a peer's state whatever it did
        # before; a restarted one, if its peers ran rounds with a link up to it meanwhile), and 1 + the last round in
        # which it left out a neighbour its link schedule gave it (a deadline, a refusal: a failure; 0: never). See
        # `_may_be_out_of_step`.
        self._ran_a_round = False
        self._rounds_run = 0  # rounds this process ran (`NodeResult.rounds_run`)
        self._last_missed = 0
        self._slow_rounds = 0  # rounds in a row whose local steps outlasted --exchange-timeout and missed neighbours
        # Whether our factors are a checkpoint's (restored, with a mixing in its past), plus rounds run alone since,
        # with no mixing or catch-up in this process yet: see `_catch_up_if_behind`.
        self._from_checkpoint = False
        self._resumed = False  # started from a checkpoint (its rounds before it are this node's own)
        self._started = time.monotonic()
        self._server: Server | None = None
        self._discovery: MdnsDiscovery | None = None
        self._dns: DnsPeers | None = None
        self._peers: PeerManager | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failed: tuple[str, BaseException] | None = None  # the first background task that failed, and how
        # caller -> (round, payload bytes received, sent) of its exchange served last, until it commits (metrics)
        self._served: dict[str, tuple[int, int, int]] = {}
        self._round_log: state.RoundLog | None = None
        self._out_lock: int | None = None  # the descriptor holding --out's lock (`state.hold_out`) while running
        self._peers_changed = asyncio.Event()
        self._probing: set[str] = set()  # peers whose liveness is being checked
        # (peer, round) of the exchanges that reached this node before their round closed, however slowly: the
        # caller's header admitted here, or the callee's reply begun. A peer that did is alive in that round.
        self._heard: set[tuple[str, int]] = set()
        self._fetch_failed: dict[str, float] = {}  # peer -> when (time.monotonic) it may be fetched from again
        self._closed = False
        # One worker thread owns the model: training, evaluation and export never overlap, and the event loop
        # never runs torch. It is this node's own, so shutting the node down ends it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tadlora-torch")

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Node:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            await self.aclose()
        except Exception:
            if exc is None:
                raise
            # `aclose` has logged it. The error that ended the block is what stopped the node: a close that fails
            # on the same cause (the round log's flush on a full or read-only disk) would replace it, and the
            # operator be told "[Errno 28] No space left on device" without a word of which file.

    async def start(self) -> None:
        """Load model and data (worker thread), restore a checkpoint, serve, start discovery."""
        cfg = self.config
        check_callable_back(cfg)  # before the (seconds-long) model load: a config error should fail fast
        # Also before it (and before --out is touched): an --mdns-interface that names nothing here, or no default
        # route, would otherwise be said only once the data and model had loaded. Exit 1 all the same: an interface
        # that comes up later (Wi-Fi, a DHCP lease at boot) is there for the restart. Off the loop: /proc is read.
        if cfg.peers.auto:
            await asyncio.to_thread(interface_addresses, cfg.mdns_interface)  # InterfaceError (a ValueError)
        try:
            cfg.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # Else only "[Errno 30] Read-only file system: '/srv/run'": no flag named (in a container or a unit,
            # TADLORA_OUT set it), nor that systemd's ProtectSystem=strict leaves only the state directory writable.
            raise OSError(  # one argument: str() is the message alone, without an "[Errno N]" in front
                f"--out {cfg.out}: cannot create it: {exc.strerror or exc}: choose a --out this user can write "
                "(`tadlora-node doctor` checks it), e.g. under the systemd unit its state directory",
            ) from exc
        # Before the (seconds-long) model load and before anything in --out is read or written: a node already
        # running on it would have its writes in flight removed as torn.
        self._out_lock = state.hold_out(cfg.out)
        await self._in_worker(self._build)
        assert self._model is not None  # noqa: S101 - set by _build
        self.fingerprint = self._model.fingerprint
        self.fingerprint_parts = self._model.fingerprint_parts
        await self._in_worker(state.remove_torn_writes, cfg.out)
        identity = await self._in_worker(load_identity, cfg.out)
        run = cfg.run_settings()
        init = self._model.spec.init
        refusal = out_refusal(
            cfg.out, identity, fingerprint=self.fingerprint, parts=self.fingerprint_parts, node_id=cfg.node_id,
            run=run, init=init,
        )  # fmt: skip
        if refusal is not None:
            problem, fix = refusal
            raise OutRefused(f"{problem}: {fix}")
        self.node_id = cfg.node_id or (identity or {}).get("node_id") or new_node_id()
        ckpt = await self._in_worker(state.load_checkpoint, cfg.out)
        if ckpt is not None and (ckpt.node_id, ckpt.fingerprint) != (self.node_id, self.fingerprint):
            # Copied in or restored from elsewhere: its factors may have the shapes load_factors checks (another
            # node, or another seed of this model) and would be taken as this node's own.
            raise OutRefused(
                f"{cfg.out / state.CHECKPOINT} is node {ckpt.node_id!r}'s with model fingerprint {ckpt.fingerprint}, "
                f"not node {self.node_id!r}'s with {self.fingerprint}: move it away to start from scratch"
            )
        if ckpt is not None and ckpt.run is not None and (conflict := run_conflict(ckpt.run, **run)):
            # node.json says the same, unless it is gone (or was written by a node that recorded fewer settings).
            raise OutRefused(
                f"{cfg.out / state.CHECKPOINT} is of a run of other settings, {conflict}: use another --out to start "
                "a new run, or the flags that run was started with"
            )
        if ckpt is not None:
            await self._in_worker(self._model.load_factors, ckpt.factors)  # checks keys and shapes
        # Only once the checkpoint is accepted: a refused start leaves node.json as it was. Written with an id drawn
        # anew, it would keep out the node the checkpoint names (--node-id), and the start refused for it.
        # With the fingerprint's parts: a later start under another fingerprint is told which part changed.
        parts = self.fingerprint_parts
        await self._in_worker(
            lambda: save_identity(cfg.out, self.node_id, self.fingerprint, **run, init=init, fingerprint_parts=parts)
        )
        if ckpt is not None:
            if ckpt.rounds_bytes is not None:  # the rounds logged after it are run again: log them once
                await self._in_worker(state.truncate_rounds, cfg.out, ckpt.rounds_bytes)
            last_mixed = ckpt.last_mixed
            if last_mixed is None:  # written by a node from before checkpoints recorded it: the log says
                last_mixed = await self._in_worker(state.last_mixed_logged, cfg.out)
                said = f"round {last_mixed - 1}" if last_mixed else "never"
                log.info("%s (an older node's) does not say when this node last mixed; %s says %s",
                         state.CHECKPOINT, state.ROUNDS, said)  # fmt: skip
            # Its last mixing too: a resumed node that claimed never to have mixed would pass for a newcomer, whose
            # state no late joiner adopts (`_catch_up_if_behind`). At most its round: that one it has yet to mix.
            self.rounds.restore(ckpt.round, ckpt.factors, min(last_mixed, ckpt.round))
            self._from_checkpoint = self.rounds.last_mixed > 0
            self._resumed = True
            if cfg.train.persistent:
                self._opt_state = dict(ckpt.optimizer)
            elif ckpt.optimizer:
                log.info("checkpoint holds optimizer state; --optimizer-state fresh ignores it")
            self._rounds_done = ckpt.round
            log.info("resuming at round %d from %s", ckpt.round, cfg.out / state.CHECKPOINT)
            self._last_logged(await self._in_worker(state.last_numbers, cfg.out, ("loss", "eval_accuracy")))
        else:
            self.rounds.restore(0, await self._in_worker(self._model.factors))
            # Rounds logged before a crash that came ahead of the first checkpoint are run again from round 0.
            await self._in_worker(state.truncate_rounds, cfg.out, 0)
        # A resumed node is in its checkpoint's round from now on, not in round 0 until its first round starts
        # (which may be --peer-wait away).
        self.metrics.round.set(self.rounds.t)
        self._round_log = await self._in_worker(state.RoundLog, cfg.out)  # it reads the log's end: off the loop
        self._server = self.transport.serve(self, cfg.listen, max_payload_bytes=cfg.max_payload_bytes)
        await self._server.__aenter__()
        host = cfg.listen.rpartition(":")[0]
        port = self._server.address.rpartition(":")[2]
        # Off the loop, as the watcher reads them: /proc and the interface list (the loop already serves). Read
        # again, not kept from the check before the model load: an address renumbered since would not bind.
        interfaces = await asyncio.to_thread(interface_addresses, cfg.mdns_interface) if cfg.peers.auto else []
        advertised_host = self.config.advertised_host(interfaces)
        self.address = f"{advertised_host}:{port}"
        if (unreachable := loopback_told_to_others(cfg, interfaces)) is not None:  # as doctor's `listen` check
            log.warning("%s: %s", *unreachable)
        if cfg.metrics_port is not None:
            # In a thread: binding looks the host up, and Python's HTTP server its name (reverse DNS, seconds with a
            # resolver that does not answer). Waited for even when cancelled: the close that follows must find the
            # endpoint to stop, not have it bound after.
            serving = asyncio.ensure_future(asyncio.to_thread(self.metrics.serve, cfg.metrics_port, addr=host))
            try:
                await asyncio.shield(serving)
            except asyncio.CancelledError:
                await asyncio.wait((serving,))
                raise
        self._peers = PeerManager(
            self.transport,
            self.local_info,
            self._candidates,
            self._on_peers_changed,
            on_drop=lambda cause: self.metrics.peer_drops.labels(cause).inc(),
        )
        if cfg.peers.auto:
            advert = Advertisement(
                node_id=self.node_id,
                port=int(port),
                cluster=cfg.cluster,
                fingerprint=self.fingerprint,
                protocol_version=PROTOCOL_VERSION,
                secure=not cfg.insecure,
                advertise_address=advertised_host,
                schedule=self.schedule,  # peers of another schedule pass this advert over instead of dialling it
                fingerprint_parts=self.fingerprint_parts,  # and of another fingerprint say which parts differ
                release=__version__,  # and of another protocol which release they run
            )
            self._discovery = MdnsDiscovery(advert, interfaces, on_change=self._peers.wake)
            await self._discovery.__aenter__()
            if cfg.mdns_interface is None or not looks_like_ipv4(cfg.mdns_interface):  # a name can be renumbered
                self._spawn(self._follow_interface(self._discovery, advert, interfaces), "mdns-interface")
        if cfg.peers.dns:
            self._dns = DnsPeers(cfg.peers.dns, on_change=self._peers.wake)
            await self._dns.__aenter__()
        self._spawn(self._peers.run(), "peer-manager")
        self._state = "idle"
        log.info(
            "node %s serving on %s (cluster %s, fingerprint %s [%s], schedule %s, shard %d/%d; tadlora %s)",
            self.node_id, self.address, cfg.cluster, self.fingerprint, self.fingerprint_parts, self.schedule,
            cfg.shard, cfg.num_shards, __version__,
        )  # fmt: skip
        if cfg.insecure:
            told = "status and the mDNS record say" if cfg.peers.auto else "status says"  # static peers: no record
            # A wildcard --listen (the default for mDNS on a network interface) serves every address, not only the
            # one announced.
            reach = f"port {port} of any address of this host" if is_wildcard(host) else self.address
            log.warning(
                "running WITHOUT TLS (--insecure): traffic is plaintext and any machine that reaches %s can join; "
                "%s so", reach, told,
            )  # fmt: skip

    async def _follow_interface(self, mdns: MdnsDiscovery, advert: Advertisement, interfaces: list[str]) -> None:
        """Move mDNS to the interface's new address when the host is renumbered (a new DHCP lease) or, with no
        --mdns-interface, when the default route moves to another interface (wired to Wi-Fi): the zeroconf sockets
        are bound to the old address, and the old announcement names an address that may reach nobody. The new
        advert names the new address (unless --advertise-address or a --listen address fixes it), and this node's
        own address follows. An interface that has lost its address keeps the old announcement until it has one."""
        spec = self.config.mdns_interface
        missing: str | None = None
        # A failed move may have left the old binding already (it leaves, then binds anew): until a move succeeds,
        # even the old address coming back (a lease that flapped) is a move to make.
        unbound = False
        while True:
            await asyncio.sleep(INTERFACE_POLL_S)
            try:
                now = await asyncio.to_thread(interface_addresses, spec)  # reads /proc and the interface list
            except (InterfaceError, OSError) as exc:
                if str(exc) != missing:
                    # Not only an address gone: with no default route, a second interface with a link is a choice
                    # this node does not make for the user (`netif`).
                    log.warning("mDNS: %s; still announcing %s until that is settled", exc, self.address)
                    missing = str(exc)
                continue
            missing = None
            if now == interfaces and not unbound:
                continue
            host = self.config.advertised_host(now)
            port = self.address.rpartition(":")[2]
            log.info("mDNS: interface address %s is now %s: announcing %s:%s there", ", ".join(interfaces),
                     ", ".join(now), host, port)  # fmt: skip
            advert = dataclasses.replace(advert, advertise_address=host)
            try:
                await mdns.async_rebind(now, advert)
            except RuntimeError:
                if self._closed:  # the node is closing, and with it discovery
                    return
                raise
            except (OSError, ValueError) as exc:  # the address went again meanwhile: the next look retries
                log.warning("mDNS: cannot move to %s (%s); retrying in %.0f s", ", ".join(now), exc, INTERFACE_POLL_S)
                unbound = True
            except Exception:  # zeroconf's own errors (a name conflict, a busy loop): retried too, never the end
                # of the watcher, which would leave discovery unbound for the rest of the run with nothing retrying
                log.exception("mDNS: moving to %s failed; retrying in %.0f s", ", ".join(now), INTERFACE_POLL_S)
                unbound = True
            else:
                moved = self.address != f"{host}:{port}"
                self.address = f"{host}:{port}"
                interfaces, unbound = now, False  # only once there: after a failed move the next look tries again
                if moved and self._peers is not None:
                    self._peers.own_address_changed()

    def _build(self) -> None:
        """Blocking setup: dataset, model, this node's shard and the dev subset."""
        cfg = self.config
        device = resolve_device(cfg.device)  # first: "no CUDA GPU" should not wait for a large dataset to be read
        try:
            train = resolve_dataset(cfg.dataset, "train")
            dev = eval_subset(resolve_dataset(cfg.dataset, "dev"), cfg.eval_samples)
        except (OSError, ValueError) as exc:
            # Named as a flag: in a container or a unit the spec came from TADLORA_DATASET, on no command line, and
            # the CLI then says so. An OSError stays one (exit 1 either way: retried, as a mount may come later).
            raise (OSError if isinstance(exc, OSError) else ValueError)(f"--dataset: {exc}") from exc
        spec = cfg.model_spec(train.label_names)
        if cfg.init == "auto" and spec.init != "portable":  # not when asked for: then it says nothing of a kept run
            log.info(
                "%s holds a run started before nodes drew their model portably: resumed with init %r (a node on a "
                "CPU with other vector instructions draws another head, and is refused)", cfg.out, spec.init,
            )  # fmt: skip
        self._model = AdapterModel(spec, device=device)
        slow = precision_warning(cfg.train.precision, self._model.device)
        if slow:
            log.warning("%s", slow)
        shard = client_shards(train, cfg.split, cfg.num_shards, cfg.seed, cfg.samples_per_client)[cfg.shard]
        self._shard = encode(self._model.tokenizer, train.subset(shard), cfg.train.max_length)
        self._dev = encode(self._model.tokenizer, dev, cfg.train.max_length)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A background task ended. One that failed stops the node (`run` then raises): running on without its
        peer manager or its mDNS watcher would leave it training alone, or unreachable, with nothing said but
        one log line; a stop saves a checkpoint, and a supervisor's restart resumes from it."""
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("background task %s failed; stopping the node", task.get_name(), exc_info=exc)
        if self._failed is None and not self._closed:
            self._failed = (task.get_name(), exc)
            self.request_stop()

    async def _unless_stopped(self, work: Awaitable[Any]) -> None:
        """Await ``work``, cancelling it once a stop is requested: a stop must not wait out a silent peer's deadline
        (an exchange's, a fetch's), which can outlast the grace a supervisor gives before it kills the node."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
            finished = task.done()
        finally:
            task.cancel()  # a no-op once done
            stopped.cancel()
            await asyncio.gather(task, stopped, return_exceptions=True)
        if finished:  # not cancelled by us (a cancelled gather ends with CancelledError as its exception)
            task.result()  # its failure, if any

    def request_stop(self) -> None:
        """Begin a graceful stop at the next safe point: local steps in progress are abandoned (the round is run
        again on resume); a round in its exchange ends there, mixed with the pairs committed so far."""
        if not self._stop.is_set():
            log.info("stop requested")
        self._stop.set()
        self._stop_training.set()
        if not self._closed:  # after aclose nothing waits on the rounds, and no one would cancel the task
            self._spawn(self.rounds.notify(), "stop-wake")

    async def aclose(self) -> None:
        """Unregister from mDNS, tell the peers this node leaves, stop serving, close connections and tasks. Safe to
        call twice.

        Every step runs even if an earlier one raised (a failed mDNS goodbye must not leave the server serving or
        the worker thread running); each failure is logged, and the first is raised once all steps are done. A
        cancellation does not cut the steps short either (a second call returns at once, so nothing would close what
        they left): the rest run, the server's without its grace, and then the cancellation is raised."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._stop_training.set()
        failures: list[Exception] = []
        cancelled: asyncio.CancelledError | None = None

        async def step(what: str, action: Callable[[], Awaitable[object] | object]) -> None:
            nonlocal cancelled
            try:
                result = action()
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError as exc:
                cancelled = cancelled or exc
            except Exception as exc:
                log.error("while closing, %s failed: %s", what, exc, exc_info=exc)
                failures.append(exc)

        async def end_tasks() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            if self._discovery is not None:
                await step("the mDNS goodbye", self._discovery.aclose)  # first: peers stop counting us promptly
            if self._dns is not None:
                await step("DNS discovery", self._dns.aclose)
            await step("ending the background tasks", end_tasks)
            if self._peers is not None and cancelled is None:
                # Every peer, however it found this node (static, dns:, mDNS), drops it now instead of waiting out a
                # round's deadline for it: after the peer manager's task has ended (a handshake of ours would have
                # the peer take us back), before the server stops. Bounded (`LEAVE_TIMEOUT_S`); skipped when
                # cancelled, as the server's grace is.
                await step("telling the peers this node leaves", self._peers.tell_leaving)
            await step("waking the round loop", self.rounds.notify)
            if self._server is not None:
                server = self._server
                await step("stopping the server", lambda: server.aclose(0.0 if cancelled else SHUTDOWN_GRACE_S))
            if self._peers is not None:
                await step("closing peer connections", self._peers.aclose)
            # In a thread: the HTTP server's shutdown waits for its poll loop, up to half a second of a stalled loop.
            await step("the metrics server", lambda: asyncio.to_thread(self.metrics.close))
        finally:
            # Training has been told to stop (between two steps), but a model load, an evaluation or an export is
            # not cut short: the wait for the worker is in a thread, so the loop (other nodes, servers) goes on. That
            # thread then closes the round log (which the worker writes) and releases --out (last: until the worker
            # has ended, a checkpoint or export may be under way), and goes on even if this close is cancelled: the
            # process may go on, and start a node on --out.
            lock, self._out_lock = self._out_lock, None
            ending = asyncio.get_running_loop().run_in_executor(None, self._end_worker, lock, self._round_log)
        await step("the worker thread, the round log and --out's lock", lambda: asyncio.shield(ending))
        if cancelled is not None:
            raise cancelled
        if failures:
            raise failures[0]

    def _end_worker(self, lock: int | None, round_log: state.RoundLog | None) -> None:
        """Any thread: wait until the worker thread has ended (work queued behind it is cancelled), then close
        ``round_log`` and release --out (``lock``, `state.hold_out`), whatever failed before."""
        try:
            self._executor.shutdown(wait=True, cancel_futures=True)
        finally:
            try:
                if round_log is not None:
                    round_log.close()
            finally:
                if lock is not None:
                    os.close(lock)

    # -------------------------------------------------------------------------------------------- peers

    def _candidates(self) -> list[tuple[str, str, PeerCandidate | None]]:
        # Static addresses and DNS answers skip this node's own address: one list shared by every host, or a name
        # that resolves to every pod (k8s), would otherwise have the node dial itself and be refused all run.
        out: list[tuple[str, str, PeerCandidate | None]] = [
            (a, a, None) for a in self.config.peers.static if a != self.address
        ]
        if self._discovery is not None:
            out += [(c.node_id, c.address, c) for c in self._discovery.candidates().values()]
        if self._dns is not None:
            out += [(a, a, None) for a in self._dns.addresses() if a != self.address]
        return out

    def _on_peers_changed(self) -> None:
        self._peers_changed.set()
        self.metrics.peers.set(len(self._peer_ids()))  # not only at a round's start: while waiting for peers too
        if not self._closed:
            self._spawn(self.rounds.notify(), "peers-changed")  # a round may be waiting for a departed peer

    def _departed(self, ids: Collection[str]) -> set[str]:
        """Those of ``ids`` that are no longer peers."""
        peers = self._peers.peers if self._peers is not None else {}
        return {j for j in ids if j not in peers}

    def _peer_ids(self) -> list[str]:
        return sorted(self._peers.peers) if self._peers is not None else []

    def _running_on(self) -> tuple[str, int] | None:
        """A verified peer two or more rounds ahead of this node resumed from a checkpoint, and its round: the
        cluster runs on without it. None for a node not resumed, or when every peer is within a round of it (a
        cluster restarting together, as it stopped: in step)."""
        if not self._from_checkpoint or self._peers is None:
            return None
        ahead = [(j, p.info.round) for j, p in self._peers.peers.items() if p.info.round >= self.rounds.t + 2]
        return max(ahead, key=lambda a: a[1]) if ahead else None

    async def _wait_for_peers(self) -> None:
        """Wait up to --peer-wait for --min-peers verified peers, so that a cluster starts (or restarts) together.
        A node resumed from a checkpoint stops waiting once a peer is two or more rounds ahead of it: that cluster
        runs on without it (a rolling restart while another node is down), and catch-up follows. Waiting for
        --min-peers there, it idled for --peer-wait beside live peers, which trained alone meanwhile."""
        need = self.config.min_peers
        if need <= 0:
            return
        if len(self._peer_ids()) >= need:
            return
        # Said in the log and the status: otherwise a node started alone shows nothing but "idle" for --peer-wait.
        log.info("waiting up to %.0f s for %d peer(s) before round %d (--min-peers, --peer-wait); %d so far",
                 self.config.peer_wait, need, self.rounds.t, len(self._peer_ids()))  # fmt: skip
        self._state = "waiting-for-peers"
        try:
            deadline = time.monotonic() + self.config.peer_wait
            while len(self._peer_ids()) < need and not self._stop.is_set():
                self._peers_changed.clear()  # before the probes: a peer verified meanwhile ends the wait below
                if self._from_checkpoint and self._peers is not None:
                    # What their rounds are now: a peer's round is otherwise the one it had when it was verified.
                    await asyncio.gather(*(self._peers.probe(j, "asked for its round") for j in self._peer_ids()))
                    if (ahead := self._running_on()) is not None:
                        log.info("peer %s is in round %d, past this node's %d: the cluster runs on without it, so it "
                                 "rejoins with %d of %d peers (--min-peers)", ahead[0], ahead[1], self.rounds.t,
                                 len(self._peer_ids()), need)  # fmt: skip
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("only %d of %d peers after %.0f s; starting anyway", len(self._peer_ids()), need,
                                self.config.peer_wait)  # fmt: skip
                    return
                with contextlib.suppress(TimeoutError):  # not wait_for, which drops a cancellation (PeerManager.run)
                    async with asyncio.timeout(min(left, 1.0)):
                        await self._peers_changed.wait()
        finally:
            if self._state == "waiting-for-peers":
                self._state = "idle"

    # ------------------------------------------------------------------------------------- NodeHandler

    @property
    def factors(self) -> Factors:
        """The current factors (between rounds: the next round's starting point)."""
        return self.rounds.factors

    @property
    def round(self) -> int:
        """The round the node is in (= rounds completed when idle)."""
        return self.rounds.t

    @property
    def last_mixed_round(self) -> int:
        """1 + the last round in which the node mixed with at least one neighbour; 0 if it never did."""
        return self.rounds.last_mixed

    async def async_wait_for_round(self, t: int) -> None:
        """Return once the node is in round ``t`` or later (bound it with ``asyncio.timeout``)."""
        await self.rounds.wait_until(lambda: self.rounds.t >= t)

    async def async_wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked whenever the round state changes (bound it with a timeout)."""
        await self.rounds.wait_until(predicate)

    def local_info(self) -> PeerInfo:
        return PeerInfo(
            node_id=self.node_id,
            cluster=self.config.cluster,
            fingerprint=self.fingerprint,
            address=self.address,
            round=self.rounds.t,
            degree=self.rounds.current.degree,
            method=self.method.name,
            insecure=self.config.insecure,
            protocol_version=PROTOCOL_VERSION,
            last_mixed_round=self.rounds.last_mixed,
            schedule=self.schedule,
            fingerprint_parts=self.fingerprint_parts,
            release=__version__,
        )

    def expected_spec(self) -> FactorSpec | None:
        return None  # depends on the round (which factors are sent); checked in async_exchange

    def _spec_for(self, t: int) -> FactorSpec:
        return FactorSpec.from_factors(select(self.rounds.factors, sent_factors(self.method, t)))

    def status(self) -> StatusInfo:
        weights = self._last_weights
        infos = {p: peer.info for p, peer in self._peers.peers.items()} if self._peers else {}
        peer_ids = self._peer_ids()
        unreachable = self._peers.unreachable() if self._peers else []
        return StatusInfo(
            node=self.local_info(),
            state=self._state,
            phase=self.method.phase(self.rounds.t),
            rounds_completed=self._rounds_done,
            last_loss=float("nan") if self._last_loss is None else self._last_loss,
            last_accuracy=float("nan") if self._last_accuracy is None else self._last_accuracy,
            neighbors=tuple(
                NeighborStatus(
                    node_id=p,
                    address=infos[p].address if p in infos else "",
                    degree=weights.get(p, (0, 0.0))[0],
                    weight=weights.get(p, (0, 0.0))[1],
                    last_round=self._last_exchanged.get(p, 0),
                    release=infos[p].release if p in infos else "",
                )
                # The first MAX_DEGREE, as a reader keeps (`pb_mapping._status_from_pb`): without TLS anyone may
                # handshake under thousands of ids, and a reply past gRPC's 4 MiB would fail every health check.
                for p in peer_ids[:MAX_DEGREE]
            ),
            uptime_seconds=time.monotonic() - self._started,
            candidates=tuple(unreachable[:MAX_CANDIDATES_SHOWN]),
            release=__version__,
            neighbors_total=len(peer_ids),
            candidates_total=len(unreachable),
        )

    async def async_handshake(self, remote: PeerInfo) -> None:
        if self._stop.is_set():
            raise ExchangeRefused(Reason.SHUTTING_DOWN, "node is stopping")
        if remote.node_id == self.node_id:  # at another address (its own dial is the responder's): another node
            raise ExchangeRefused(
                Reason.NOT_A_NEIGHBOR,
                f"that is this node's own id: {remote.address} and {self.address} run under one id, and never mix; "
                "give one of them another --node-id (or another --out, if it kept the id from a run there)",
            )
        if self._peers is not None and remote.address:
            await self._peers.add(remote, None, "inbound")
        if abs(remote.round - self.rounds.t) >= 2:
            self.rounds.gap_seen = True
        # A neighbour that handshakes from a later round (its catch-up or quiet-caller probe) will not call for ours.
        await self.rounds.note_round(remote.node_id, remote.round)

    async def async_leave(self, remote: PeerInfo) -> None:
        """Peer ``remote`` is stopping (see `NodeHandler`, `PeerManager.left`): dropped now, so that no round waits
        out --exchange-timeout for it; it is a peer again at its next handshake."""
        if self._stop.is_set():
            raise ExchangeRefused(Reason.SHUTTING_DOWN, "node is stopping")
        if self._peers is None:
            raise ExchangeRefused(Reason.NOT_A_NEIGHBOR, "node is starting: it has no peers yet")
        await self._peers.left(remote)

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, Factors]:
        if self._stop.is_set():
            raise ExchangeRefused(Reason.SHUTTING_DOWN, "node is stopping")
        return self.rounds.t, dict(self.rounds.factors)  # between rounds these are the next round's start

    @property
    def payload_timeout_s(self) -> float:
        """How long a caller may take to send an exchange's stream (`NodeHandler`): the time a caller of this
        cluster gives a whole exchange, so an honest one is never cut short by it."""
        return self.config.exchange_timeout

    def observe_refusal(self, what: str, exc: ExchangeRefused) -> None:
        """Count a refusal this node gave (the server has logged it); see `NodeHandler`."""
        self.metrics.refusals.labels(exc.reason.name).inc()

    async def async_exchange_refused(self, caller: str, r: int) -> None:
        """A neighbour's round-r exchange was refused here (see `NodeHandler`): round r stops waiting for it."""
        await self.rounds.refused(caller, r)

    def observe_served(self, caller: str, r: int, received: int, sent: int) -> None:
        """The payload sizes of ``caller``'s round-``r`` exchange, whose reply went out (see `NodeHandler`): counted
        once the caller commits it, as a caller counts its own exchanges only when they count."""
        self._served[caller] = (r, received, sent)

    async def async_commit(self, caller: str, r: int, accept: bool) -> None:
        """A neighbour ends its round-r exchange (see `NodeHandler`): the pair counts only if it accepted our reply
        and round r is still open here (else ROUND_MISMATCH, and it leaves the pair out too)."""
        sizes = self._served.pop(caller, None)
        await self.rounds.commit(caller, r, accept)
        if accept and sizes is not None and sizes[0] == r:
            # The callee's side of the exchange: `_exchange_with` counts the caller's ("ok"), so the two ends of
            # one pair are told apart and a cluster's totals are not counted twice under one label.
            self.metrics.exchanges.labels("served").inc()
            self.metrics.bytes_received.inc(sizes[1])
            self.metrics.bytes_sent.inc(sizes[2])

    def _check_round_sane(self, r: int, who: str) -> None:
        """Refuse (ROUND_MISMATCH) an exchange or a catch-up for a round past the run's last one, before it makes
        this node think it is behind (`MAX_ROUND` is checked on every header already)."""
        if self.config.rounds is not None and r > self.config.rounds:
            raise ExchangeRefused(
                Reason.ROUND_MISMATCH, f"{who} claims round {r}, past this run's last round {self.config.rounds}"
            )

    async def _async_check_neighbour(self, who: str, t: int, degree: int, factors: Factors) -> None:
        """Raise `PayloadError(BAD_PAYLOAD)` unless a neighbour's round-t degree and factors are fit to mix."""
        spec = self._spec_for(t)  # on the loop, which alone replaces the round state it reads
        # isfinite and a float64 norm over every factor take ~47 ms per 32 MB: off the loop, so that handshakes
        # and other exchanges are answered meanwhile. In the loop's default executor (as payload decoding), not
        # the node's one torch worker: there a check would queue behind a training step of seconds, and the
        # caller's deadline or a peer's handshake timeout would run out while it waits.
        await asyncio.to_thread(self._check_neighbour, who, spec, degree, factors)

    def _check_neighbour(self, who: str, spec: FactorSpec, degree: int, factors: Factors) -> None:
        """`_async_check_neighbour`'s checks, in any thread."""
        if not 1 <= degree <= MAX_DEGREE:
            raise PayloadError(Reason.BAD_PAYLOAD, f"{who} says its degree is {degree}, expected 1..{MAX_DEGREE}")
        spec.check(factors, max_norm=self.config.max_factor_norm)

    async def async_admit_exchange(self, header: ExchangeHeader) -> FactorSpec:
        """Refuse from its header, before its payload is read, an exchange that `async_exchange` would refuse for
        its round, its caller or its degree; return the spec its payload must meet (which bounds its size)."""
        r = header.round
        self._check_round_sane(r, header.node_id)
        if header.degree < 1:  # over MAX_DEGREE is refused with every header (`peer_checks.check_sane`)
            raise PayloadError(Reason.BAD_PAYLOAD, f"{header.node_id} says its degree is 0, expected 1..{MAX_DEGREE}")
        await self.rounds.admit(header.node_id, r)
        self._heard.add((header.node_id, r))
        return self._spec_for(r)

    async def async_exchange(self, header: ExchangeHeader, factors: Factors) -> Payload:
        """Answer a neighbour's round-r exchange with our round-r snapshot (waiting for it if we are training)."""
        r = header.round
        self._check_round_sane(r, header.node_id)
        # Checked before the round state is locked: the check takes a worker thread's time, and the lock holds
        # the round loop and every other exchange. `answer` then re-checks the round and the pair under the lock.
        await self._async_check_neighbour(header.node_id, r, header.degree, factors)
        return await self._sent_payload(await self.rounds.answer(header.node_id, r, header.degree, factors))

    async def _sent_payload(self, cur: Round) -> Payload:
        """Round ``cur``'s snapshot as sent, encoded once for all of the round's exchanges, both ways: encoded by
        each, a node with d neighbours held d encodings of the same factors at once."""
        async with cur.encoding:
            if cur.payload is None:
                assert cur.snapshot is not None  # noqa: S101
                sent = select(cur.snapshot, sent_factors(self.method, cur.t))
                cur.payload = await asyncio.to_thread(Payload.encode, sent)
            return cur.payload

    # ------------------------------------------------------------------------------------------- rounds

    async def run(self) -> NodeResult:
        """Run rounds until ``config.rounds`` are done or a stop is requested; checkpoint and export at the end."""
        cfg = self.config
        failed = True  # until the rounds end without an exception: then a failed final save is the error to raise
        try:
            if cfg.rounds is not None and self.rounds.t >= cfg.rounds:
                # A resume with the --rounds of the run before: it would end here without a word but "finished".
                log.info("round %d is reached already (--rounds %d: the round a run stops at, counted across resumes, "
                         "not a number of rounds to add): nothing to run; give a larger --rounds to go on",
                         self.rounds.t, cfg.rounds)  # fmt: skip
            else:
                await self._wait_for_peers()
            while not self._stop.is_set() and (cfg.rounds is None or self.rounds.t < cfg.rounds):
                await self._unless_stopped(self._catch_up_if_behind())
                if self._stop.is_set() or (cfg.rounds is not None and self.rounds.t >= cfg.rounds):
                    break
                try:
                    await self._run_round(self.rounds.t)
                except Interrupted:
                    break
            failed = False
        except BaseException:
            # Cancelled, or failed: local steps may still be running in the worker thread, which a cancelled await
            # does not end. Their round is abandoned, and the checkpoint below would queue behind all of them.
            self._stop_training.set()
            raise
        finally:
            self._state = "stopping"
            try:
                await self._save(self.rounds.t, export=True)
            except Exception:
                if not failed and self._failed is None:
                    raise
                # The run's own error (on its way out, or a background task's) is the one to report; this one only
                # adds to it.
                log.exception("the final checkpoint (round %d) failed too", self.rounds.t)
        if self._failed is not None:
            name, exc = self._failed
            raise RuntimeError(
                f"background task {name} failed ({type(exc).__name__}: {exc}); the node stopped after round "
                f"{self.rounds.t} with its checkpoint saved in {cfg.out}: run it again to resume"
            ) from exc
        stopped = cfg.rounds is None or self._rounds_done < cfg.rounds
        return NodeResult(
            self.node_id, self._rounds_done, self._last_accuracy, self._last_loss, cfg.out, self._rounds_run, stopped
        )

    async def _catch_up_if_behind(self) -> None:
        """Adopt a neighbour's round and factors when we are out of step with a group that kept mixing.

        A peer is followed when it is two or more rounds away from us (either way) *and* it mixed with its
        neighbours at least two rounds later than we last did. That covers a late or restarted node (never mixed,
        or long ago), and it settles a healed partition the right way round: a node cut off from the others keeps
        training alone and may run far ahead in round numbers, but its ``last_mixed_round`` stays at the cut, so
        it adopts the group's state and the group never adopts its solo weights. Only a node that may be out of
        step follows anyone (`_may_be_out_of_step`): with p < 1, a node whose links the schedule kept down runs
        ahead of or behind its peers in round numbers without having failed, and holds what the simulator's client
        holds; a live link's exchange waits for the end that reaches its round last instead.

        A node restarted from a checkpoint that has a mixing in its past, and that has neither mixed nor caught up
        in this process since (it may have trained rounds alone, e.g. with --min-peers 0 before its peers were
        found), also follows a peer two or more rounds *ahead* of it that mixed no earlier than it did: its state
        is a checkpoint's, older than that of a peer that mixed as late and went on. Without this, a node that
        stopped while its neighbour trained on alone (the neighbour's last mixing stays that of the pair) found no
        leader on its return, the two were too far apart for an exchange to wait, and each trained alone for ever.
        A fresh node (never mixed) is not covered, so it never takes a lone node's rounds for the group's; nor a
        node that has mixed here (with p < 1, its own rounds are the simulator's client's).
        """
        cfg = self.config
        if self._peers is None:
            return
        rounds = self.rounds
        # A peer's round is what our last handshake or mixing with it said (`PeerManager.note_mixed`). "Far" is
        # two or more rounds from ours now: out of step, or not heard from for two rounds (common in a sparse
        # topology, and cheap: one handshake refreshes it).
        far = [j for j, p in self._peers.peers.items() if abs(p.info.round - rounds.t) >= 2]
        if not far and not rounds.gap_seen:
            return
        if not self._may_be_out_of_step():
            # Peers rounds away are normal here: with p < 1 a node whose links are down runs ahead (or falls
            # behind) in round numbers, and a live link's exchange waits for the end that reaches its round last.
            # Its state is the simulator's client's; adopting a peer's would throw its own rounds away.
            rounds.gap_seen = False
            return
        # A refused exchange (gap_seen) does not say who is out of step: ask everyone. Otherwise only the far
        # peers: asking one that is cut off holds the round loop for a handshake timeout.
        asked = list(self._peers.peers) if rounds.gap_seen else far
        rounds.gap_seen = False
        self.metrics.probes.labels("catch-up").inc(len(asked))
        # All at once: one by one, every peer that is cut off from us would hold the round loop for a full
        # handshake timeout, and a node that is itself cut off would stall instead of training alone.
        peers = [(j, self._peers.peers[j]) for j in asked]
        answers = await self._ask_rounds([j for j, _ in peers])
        now = time.monotonic()
        self._fetch_failed = {j: until for j, until in self._fetch_failed.items() if until > now}
        leaders = [
            (info, peer)
            for info, (_, peer) in zip(answers, peers, strict=True)
            if info is not None
            and info.node_id not in self._fetch_failed
            and is_catch_up_leader(
                info.round, info.last_mixed_round, rounds.t, rounds.last_mixed, restored=self._from_checkpoint
            )
        ]
        if not leaders:
            return
        info, _ = max(leaders, key=lambda x: (x[0].last_mixed_round, x[0].round))
        # Its entry now, not the one the probes started from: meanwhile a scan may have moved it to a new address
        # (closing the old connection, so a fetch on it would fail and bar the leader for FETCH_RETRY_S).
        current = self._peers.peers.get(info.node_id)
        if current is None:  # dropped meanwhile
            return
        try:
            spec = FactorSpec.from_factors(rounds.factors)
            result = await current.conn.fetch(self.local_info(), FETCH_TIMEOUT_S, spec)
            # Off the loop, and not behind training: see `_async_check_neighbour`.
            await asyncio.to_thread(spec.check, result.factors, cfg.max_factor_norm)
            # What we are about to adopt must be a state a node can be in (the handshake's claims were checked
            # on their own; the fetch may come from a peer that restarted or lies since): a round within the run,
            # and a last mixing no later than that round's start allows (`peer_checks._check_info`).
            self._check_round_sane(result.peer.round, info.node_id)
            if info.last_mixed_round > result.peer.round + 1:
                raise ExchangeRefused(
                    Reason.ROUND_MISMATCH,
                    f"{info.node_id} claims it last mixed in round {info.last_mixed_round - 1} "
                    f"but sends the start of round {result.peer.round}",
                )
        except (ExchangeRefused, PeerUnavailable) as exc:
            if isinstance(exc, ExchangeRefused):
                self.metrics.refusals.labels(exc.reason.name).inc()
            log.warning("catch-up from %s failed (not asked again for %.0f s): %s", info.node_id, FETCH_RETRY_S, exc)
            self._fetch_failed[info.node_id] = time.monotonic() + FETCH_RETRY_S
            return
        log.info("catching up: adopting round %d and factors from %s (was at %d)", result.peer.round,
                 info.node_id, rounds.t)  # fmt: skip
        # We now hold the state the group reached: its round, its factors, its last mixing. That mixing is at most
        # the round before the one whose start we hold: a peer between closing round t and entering t + 1 already
        # says it mixed t (last_mixed_round t + 1) while it still serves the start of t.
        await rounds.adopt(result.peer.round, result.factors, min(info.last_mixed_round, result.peer.round))
        self._from_checkpoint = False
        self._rounds_done = rounds.t  # as after a resume: the rounds before the one we are in are done
        # Our moments describe our own gradient history at the factors we left; the adopted factors are the
        # group's, so the optimizer starts fresh from them.
        self._opt_state = {}

    async def _ask_rounds(self, asked: list[str]) -> list[PeerInfo | None]:
        """Each of ``asked``'s answer to a handshake (`PeerManager.probe`), None where there is none, in order.

        A peer whose liveness is already being checked (`_probing`: it missed a round, or has not called in this
        one) is waited for at most `SUSPECT_ANSWER_S` once the others have answered: a live one answers in
        milliseconds, but a frozen one (SIGSTOP, a suspended laptop) answers nothing until the handshake's timeout,
        and the round loop waits here. It held the next round for those 5 s, and a healthy neighbour's exchange in
        that round ran into its deadline: one frozen peer cost the two healthy ones a round with each other. Its
        own check drops it (or, if it answers, refreshes its round for the next look); the question cut here is
        cancelled, which drops nothing."""
        assert self._peers is not None  # noqa: S101
        calls = {j: asyncio.ensure_future(self._peers.probe(j, "asked for its round")) for j in asked}
        suspects = {calls[j] for j in asked if j in self._probing}
        try:
            if others := set(calls.values()) - suspects:
                await asyncio.wait(others)
            if suspects:
                await asyncio.wait(suspects, timeout=SUSPECT_ANSWER_S)
        finally:
            for call in calls.values():
                call.cancel()
            await asyncio.gather(*calls.values(), return_exceptions=True)
        return [None if call.cancelled() else call.result() for call in calls.values()]

    def _may_be_out_of_step(self) -> bool:
        """Whether not having mixed lately may mean this node fell out of step with its peers, so that a catch-up
        may adopt a peer's state: it is new (no round run yet, nor a checkpoint's), it left out a neighbour since it
        last mixed (a failure), or a round since then had a link up to one of its peers of now (it ran without them:
        cut off, or started alone). For a node restarted from its checkpoint that has run no round yet, the rounds
        each peer ran while it was down count too: one with a link up to that peer, which the peer ran without it.
        False when the link schedule alone explains every such round: then it is where the simulator's client would
        be, whatever round its peers are in (a restart that lost nothing is no reason to drop its own rounds)."""
        rounds, cfg = self.rounds, self.config
        if self._last_missed and self._last_missed >= rounds.last_mixed:
            return True
        overlay = self._overlay()
        # A link up is looked for in the first `_link_scan_rounds` rounds of a span only: a span can be as long as a
        # peer claims (up to MAX_ROUND), and this runs on the event loop.
        scan = self._link_scan_rounds()
        if any(
            self._round_neighbours(s, overlay)
            for s in range(rounds.last_mixed, min(rounds.t, rounds.last_mixed + scan))
        ):
            return True
        if self._ran_a_round:
            return False
        if not self._resumed:
            return True
        # Their rounds as their handshakes said since it started (it has run no round yet): fresh enough. Only a
        # peer's own rounds count: a link up to a peer in a round it has yet to run is an exchange still to come
        # (it waits for this node there), not one lost, however far another peer has run meanwhile.
        peers = self._peers.peers if self._peers is not None else {}
        return any(
            link_up(cfg.seed, s, self.node_id, j, cfg.link_prob)
            for j, peer in peers.items()
            if j in overlay
            for s in range(rounds.t, min(peer.info.round, rounds.t + scan))
        )

    def _link_scan_rounds(self) -> int:
        """How many rounds of the link schedule `_may_be_out_of_step` looks through for a link up: ``20 / p``, in
        which a link up with probability p in each round is missed with probability e^-20 (2e-9): 20 rounds at
        p = 1, 1,000 at p = 0.02; at most `LINK_SCAN_MAX_ROUNDS`. Unbounded, a peer that claimed round 2^40 held
        the event loop for days."""
        rounds = LINK_SCAN_FACTOR / self.config.link_prob  # inf for a p so small that the quotient overflows
        return LINK_SCAN_MAX_ROUNDS if rounds >= LINK_SCAN_MAX_ROUNDS else math.ceil(rounds)

    def _overlay(self) -> frozenset[str]:
        """The peers this node may have a link to: all of them, or its overlay among them under --max-neighbors."""
        peers = self._peer_ids()
        if self.config.max_neighbors is not None:
            # Work per round follows the degree, not the network size; every node that sees the same members
            # computes the same overlay, so both ends of a link agree on it.
            return overlay_neighbours(self.node_id, peers, self.config.max_neighbors)
        return frozenset(peers)

    def _round_neighbours(self, t: int, overlay: frozenset[str] | None = None) -> frozenset[str]:
        """The peers whose link to this node is up in round ``t`` (``overlay``: `_overlay`, if the caller has it)."""
        cfg = self.config
        members = self._overlay() if overlay is None else overlay
        return frozenset(p for p in members if link_up(cfg.seed, t, self.node_id, p, cfg.link_prob))

    def _train(self, t: int) -> tuple[float, Factors, OptimizerState]:
        """Worker thread: local steps from the current factors; returns the loss, the snapshot and the optimizer
        state after the steps (a new dict: the node's own is replaced only when the round completes)."""
        assert self._model is not None and self._shard is not None  # noqa: S101
        self._model.load_factors(self.rounds.factors)
        # A copy, so that a round interrupted in its exchange leaves no trace: the checkpoint then pairs the
        # factors the round started from with the moments they had (local_steps replaces entries, never edits).
        opt_state = dict(self._opt_state)
        loss = local_steps(
            self._model, self._shard, self.method.trained(t), self.config.train, self.config.seed,
            self.config.shard, t, stop=self._stop_training, state=opt_state,
        )  # fmt: skip
        return loss, self._model.factors(), opt_state

    async def _run_round(self, t: int) -> None:
        cfg = self.config
        started = time.monotonic()
        self._state = "training"
        self.metrics.round.set(t)
        loss, snapshot, opt_state = await self._in_worker(self._train, t)
        train_s = time.monotonic() - started
        neighbours = self._round_neighbours(t)
        cur = await self.rounds.open(snapshot, neighbours)
        self._state = "exchanging"
        self.metrics.degree.set(cur.degree)
        self.metrics.peers.set(len(self._peer_ids()))
        deadline = asyncio.get_running_loop().time() + cfg.exchange_timeout
        outbound = sorted(j for j in neighbours if self.node_id < j)
        progress = {j: ExchangeProgress() for j in outbound}
        calls = [asyncio.ensure_future(self._exchange_with(j, cur, deadline, progress[j])) for j in outbound]
        quiet = asyncio.ensure_future(self._probe_quiet(cur, neighbours - set(outbound)))
        timed_out = False
        try:
            async with asyncio.timeout_at(deadline):
                if calls:
                    await self._unless_stopped(asyncio.gather(*calls, return_exceptions=True))
                # A neighbour that is no longer a peer (its mDNS goodbye came), or whose call we refused, will not
                # call: stop waiting.
                await self.rounds.wait_until(
                    lambda: (
                        self._stop.is_set()
                        or neighbours
                        <= set(cur.received) | set(outbound) | cur.ahead | cur.refused | self._departed(neighbours)
                    )
                )
        except TimeoutError:
            timed_out = True
        finally:
            for call in [*calls, quiet]:
                call.cancel()
            await asyncio.gather(*calls, quiet, return_exceptions=True)
        self._report_failed_calls(t, outbound, calls)
        for j, call in zip(outbound, calls, strict=True):
            # Cancelled: still running when the round's time ran out (the cancellation above, or the one the
            # timeout's own cancelling of the wait passed on), unless a stop cut it.
            if timed_out and call.cancelled() and not self._stop.is_set():
                self._exchange_timed_out(j, t, progress[j])
        # A stop during the exchange ends the round with the pairs committed so far rather than abandoning it:
        # their other ends have mixed them, and leaving them out here would move the network average
        # (docs/protocol.md). A stopping node refuses every commit (SHUTTING_DOWN), so what `close` returns is
        # final. No evaluation and no periodic checkpoint then: the stop's own checkpoint, at t + 1, follows.
        stopping = self._stop.is_set()
        received = await self.rounds.close(cur)
        cur.payload = None  # its exchanges are over (a reply still on its way holds the bytes it sends)
        for j in received:
            self._last_exchanged[j] = t + 1
            if self._peers is not None:
                self._peers.note_mixed(j, t)
        missed = neighbours - set(received)
        if not stopping and missed:
            self._last_missed = t + 1
        if not stopping:
            self._note_training_pace(t, train_s, len(missed))
        if received:
            self._from_checkpoint = False
        # A neighbour whose exchange reached us this round is alive, only slow (a link too slow for the payload):
        # not checked. Its check would queue behind what is left of the cut exchange on that link, run out of its
        # 5 s and drop a live peer (measured on a 1 Mbit/s link), which then misses rounds until verified again.
        heard = {j for j, p in progress.items() if p.received.began is not None}
        heard |= {j for j, r in self._heard if r == t}
        self._forget_departed(t)
        # A neighbour that is no peer any more (it said it left, or its mDNS goodbye came) has nothing to check.
        for j in sorted(missed - heard - self._departed(missed)) if not stopping else ():
            # If j crashed or is cut off, no call tells us: our call to it ran into the round's deadline (and was
            # cancelled there, not failed), or it never called us; mDNS keeps its record until the TTL runs out.
            # Without this check every later round would wait for it in full.
            if j not in self._probing:
                self._probing.add(j)
                self._spawn(self._check_alive(j, t), f"check-alive {j}")
        self.last_snapshot = snapshot
        weights = local_weights(cur.degree, {j: d for j, (d, _) in received.items()})
        # In the worker too: DeCAF's SVDs (and large adapters in general) would otherwise stall the loop.
        mixed = await self._in_worker(
            apply_method_mixing,
            self.method, t, snapshot, {j: f for j, (_, f) in received.items()}, weights, cfg.robust_mixing,
        )  # fmt: skip
        self._last_weights = {str(j): (received[str(j)][0], w) for j, w in weights.neighbours.items()}
        await self.rounds.advance(mixed)
        self._ran_a_round = True
        self._rounds_run += 1
        self._opt_state = opt_state
        self._rounds_done = t + 1
        self._last_loss = loss
        record = self._record(t, cur, weights.self_weight, loss, started)
        # The neighbours' factors are mixed in and recorded: let them go now, not after the evaluation and the
        # checkpoint below (d adapters, each as large as this node's own, held for nothing meanwhile).
        mixed_with = len(received)
        del received
        cur.received.clear()
        if stopping:
            record["stopped"] = True
        try:
            if not stopping and ((t + 1) % cfg.eval_every == 0 or (cfg.rounds is not None and t + 1 == cfg.rounds)):
                self._state = "evaluating"
                acc, eval_loss = await self._in_worker(self._evaluate)
                self._last_accuracy = acc
                self.metrics.accuracy.set(acc)
                record.update(eval_accuracy=acc, eval_loss=eval_loss)
        finally:
            # The round has mixed and the exit's checkpoint will be at t + 1, so round t goes into the log even
            # when its evaluation fails (out of GPU memory): a restart resumes after it and would never log it.
            if self._round_log is not None:
                # In the worker, as the checkpoints that count its lines are; shielded, so that a cancelled run
                # still logs the round its checkpoint (queued behind) will say is done.
                write = asyncio.get_running_loop().run_in_executor(self._executor, self._round_log.write, record)
                await asyncio.shield(write)
        self.metrics.rounds.inc()
        self.metrics.loss.set(loss)
        log.info(
            "%s round %d phase %s: loss %.4f, %d/%d neighbours, %.1f s%s", _progress(t + 1, cfg.rounds), t,
            self.method.phase(t), loss, mixed_with, cur.degree, record["seconds"],
            f", accuracy {record['eval_accuracy']:.4f}" if "eval_accuracy" in record else "",
            extra={"round": t},
        )  # fmt: skip
        if stopping:
            raise Interrupted(f"stopped during round {t}'s exchange, which was mixed with the pairs committed so far")
        if (t + 1) % cfg.checkpoint_every == 0:
            try:
                await self._save(t + 1, export=False)
            except OSError as exc:  # a full disk: the previous checkpoint is intact, training can go on
                self.metrics.checkpoint_failures.inc()
                log.error("checkpoint of round %d failed, keeping the previous one: %s", t + 1, exc)
        self._state = "idle"

    def _note_training_pace(self, t: int, train_s: float, missed: int) -> None:
        """Say once (a WARNING) when this node's local steps outlast --exchange-timeout round after round and it misses
        neighbours: a neighbour waits that long for its answer after its own steps, so a node this much slower than
        its peers never mixes (it trains alone, catches up from them, and they wait out the deadline every round for
        it). Its peers' logs only say that its exchanges timed out, and its own that they were cut, which reads as a
        slow link; this names the cause and the flags."""
        timeout = self.config.exchange_timeout
        if train_s <= timeout or not missed:
            self._slow_rounds = 0
            return
        self._slow_rounds += 1
        if self._slow_rounds != SLOW_ROUNDS_TO_WARN:
            return
        log.warning(
            "round %d's local steps took %.1f s, and the round before's also longer than the %g s a neighbour waits "
            "for this node's answer after its own (--exchange-timeout), and %d neighbour(s) left it out: this node is "
            "too slow for the cluster (a slower or busier machine, or it was stopped meanwhile), so it misses its "
            "exchanges, and its neighbours wait out their deadline for it every round. Give it less work per round "
            "(--local-steps or --batch-size, each node's own), or set --exchange-timeout %d (or more) on every node",
            t, train_s, timeout, missed, math.ceil(train_s * TIMEOUT_HEADROOM),
        )  # fmt: skip

    def _forget_departed(self, t: int) -> None:
        """Once round ``t`` is closed, drop what this node keeps per peer for peers it is done with: the exchanges it
        answered in round t or before whose commit never came (a commit for them is refused now), the exchanges that
        reached it in round t or before (`_heard`), and the last round exchanged with each peer the peer manager has
        forgotten (`PeerManager.knows`). Without this, churn under new node ids (fresh --out directories, strangers)
        grew them for as long as the node ran."""
        self._served = {caller: sizes for caller, sizes in self._served.items() if sizes[0] > t}
        self._heard = {(j, r) for j, r in self._heard if r > t}
        if self._peers is not None:
            known = self._peers.knows
            self._last_exchanged = {j: r for j, r in self._last_exchanged.items() if known(j)}

    def _report_failed_calls(self, t: int, outbound: list[str], calls: list[asyncio.Task[None]]) -> None:
        """Log (with the traceback) and count every exchange call of round ``t`` that raised.

        `_exchange_with` handles all a peer can cause (a refusal, a bad reply, a lost connection), so what
        reaches here is a fault on this side (a bug, a torch error). It is not re-raised: the pair is left out of
        the round like a neighbour that missed the deadline (its other end leaves it out too, or mixed it once, as
        when a commit's answer is lost), and the node keeps mixing over its other links instead of dying for one.
        Loud instead: an ERROR with the traceback, and ``tadlora_exchanges_total{result="error"}``.
        """
        for j, call in zip(outbound, calls, strict=True):
            if call.cancelled() or (exc := call.exception()) is None:
                continue
            self.metrics.exchanges.labels("error").inc()
            log.error("exchange with %s in round %d failed inside this node", j, t, exc_info=exc)

    async def _probe_quiet(self, cur: Round, inbound: Collection[str]) -> None:
        """`QUIET_CALLER_S` into round ``cur``'s exchanges, ask each neighbour that calls this node (``inbound``) and
        has not yet whether it is there: one that does not answer is dropped, so the round stops waiting for it, and
        one that is in a later round will not call for it, so the round stops waiting for it too
        (`RoundState.note_round`). Asked again while it stays quiet, each time after as long as the round has waited
        so far (at most `QUIET_CALLER_MAX_S`): a caller behind is waited for, but it may then skip this round by a
        catch-up, and nothing else would tell this node (it waited out --exchange-timeout, and its own callers waited
        for it in turn); a caller that is only slow is asked a few times a round, not every 2 s. Owned by
        `_run_round`, which cancels it when the round's exchanges end; a neighbour that called meanwhile is not
        asked."""
        assert self._peers is not None  # noqa: S101
        waited = 0.0
        while True:
            pause = min(max(waited, QUIET_CALLER_S), QUIET_CALLER_MAX_S)
            await asyncio.sleep(pause)
            waited += pause
            quiet = sorted(
                j for j in inbound
                if j not in cur.received and j not in cur.pending and j not in cur.ahead and j not in cur.refused
                and (j, cur.t) not in self._heard and j not in self._probing
            )  # fmt: skip
            if not quiet:
                continue
            self._probing.update(quiet)
            self.metrics.probes.labels("quiet").inc(len(quiet))
            try:
                why = f"had not called in round {cur.t} after {waited:g} s"
                answers = await asyncio.gather(*(self._peers.probe(j, why) for j in quiet))
            finally:
                self._probing.difference_update(quiet)
            for j, info in zip(quiet, answers, strict=True):
                if info is not None:
                    await self.rounds.note_round(j, info.round)

    async def _check_alive(self, j: str, t: int) -> None:
        assert self._peers is not None  # noqa: S101
        self.metrics.probes.labels("missed").inc()
        try:
            await self._peers.probe(j, f"missed round {t}")
        finally:
            self._probing.discard(j)

    def _exchange_timed_out(self, j: str, t: int, progress: ExchangeProgress) -> None:
        """Say, and count (``tadlora_exchanges_total{result="timeout"}``), that the exchange with ``j`` ran into
        round ``t``'s deadline, with how far it got and, when the link is shown too slow for the payload, what
        --exchange-timeout it needs: such an exchange fails the same way every round, and nothing else says why."""
        self.metrics.exchanges.labels("timeout").inc()
        now = asyncio.get_running_loop().time()
        got, _ = describe(progress, now, self.config.exchange_timeout)
        if progress.rate(now) is None:  # no bytes of the reply to time
            got += f" ({j}'s log says how fast our payload reached it)"
        log.warning("exchange with %s in round %d did not finish within --exchange-timeout (%g s), and the pair is "
                    "left out: %s", j, t, self.config.exchange_timeout, got)  # fmt: skip

    async def _exchange_with(
        self, j: str, cur: Round, deadline: float, progress: ExchangeProgress | None = None
    ) -> None:
        """Exchange with ``j`` in round ``cur.t`` and deliver the pair, or leave it out saying why; ``progress``
        follows the payloads, for the round to say how far a call it cut at its deadline got."""
        assert self._peers is not None and cur.snapshot is not None  # noqa: S101
        progress = progress if progress is not None else ExchangeProgress()
        peer = self._peers.peers.get(j)
        if peer is None:
            return
        t = cur.t
        header = ExchangeHeader(
            node_id=self.node_id,
            cluster=self.config.cluster,
            fingerprint=self.fingerprint,
            round=t,
            degree=cur.degree,
            schedule=self.schedule,
        )
        loop = asyncio.get_running_loop()
        try:
            try:
                result = await peer.conn.exchange(
                    header, await self._sent_payload(cur), deadline - loop.time(), self._spec_for(t), progress
                )
            except PeerTimeout:
                # The round's deadline, reached by the transport's clock before the round's own: a peer that is
                # slow to answer (a slow link, a long training step), not one that is gone. Dropping it would cost
                # a handshake and the rounds until it is verified again; the round's probe of a neighbour it left
                # out (`_check_alive`) drops one that does not answer.
                self._exchange_timed_out(j, t, progress)
                return
            try:  # its reply, before it counts
                await self._async_check_neighbour(j, t, result.peer.degree, result.factors)
            except ExchangeRefused:
                # Tell j, so that it leaves the pair out at once instead of waiting for a commit until its deadline.
                with contextlib.suppress(ExchangeRefused, PeerUnavailable):
                    await peer.conn.commit(header, False, max(deadline - loop.time(), 0.0))
                raise
        except ExchangeRefused as exc:
            self._exchange_refused(j, t, exc)
            return
        except PeerUnavailable as exc:
            await self._exchange_failed(j, t, peer, exc)
            return
        # Only a committed exchange counts at either end: a reply lost on the way, or refused here, is left out by
        # both. Once the commit is on its way j may mix the pair, so the commit is seen through, and the pair
        # delivered, even when the round ends meanwhile (its deadline, or a stop: `_run_round` then cancels the calls
        # still running and waits for them). Cut there, j would have counted a pair this node left out, with
        # nothing logged at either end. The commit's own timeout, the round's deadline, bounds the wait.
        committing = asyncio.ensure_future(self._commit(j, cur, peer, header, result, deadline))
        try:
            await asyncio.shield(committing)
        except asyncio.CancelledError:
            try:
                await asyncio.wait({committing})
            finally:
                committing.cancel()  # a second cancellation (the node forced to close): nothing is waited for
            committing.result()  # a fault of its own, raised as in the shielded path
            # The call has ended with its pair settled at both ends: not a call cut at the deadline, which
            # `_run_round` would report as one (its own cancellation is its task's, not this call's).
            return

    async def _commit(
        self, j: str, cur: Round, peer: Peer, header: ExchangeHeader, result: ExchangeResult, deadline: float
    ) -> None:
        """Commit the exchange with ``j`` in round ``cur.t`` whose reply (``result``) passed its checks, and deliver
        the pair; or leave it out, saying why. If the commit's answer is lost, j may have mixed the pair alone
        (docs/protocol.md)."""
        t = cur.t
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await peer.conn.commit(header, True, max(remaining, 0.0))
        except ExchangeRefused as exc:
            self._exchange_refused(j, t, exc)
            return
        except PeerUnavailable as exc:
            log.warning("commit of the exchange with %s in round %d got no answer (%s): %s may have mixed the "
                        "pair, which this node leaves out", j, t, exc, j)  # fmt: skip
            if isinstance(exc, PeerTimeout) and remaining < COMMIT_SLACK_S:
                # The round's time ran out, not the peer: its reply came just before the deadline. Dropping it
                # would cost a handshake and the rounds until it is verified again, for being answered late.
                self.metrics.exchanges.labels("failed").inc()
                return
            await self._exchange_failed(j, t, peer, exc)
            return
        stats = (j, result.bytes_sent, result.bytes_received, result.elapsed_s)
        if not await self.rounds.deliver(cur, j, (result.peer.degree, result.factors), stats):
            # The round closed meanwhile. Not reached from `_run_round`, whose calls all end before it closes the
            # round; were it reached, the callee would have mixed the pair already, as when a commit's answer is lost.
            return
        self.metrics.exchanges.labels("ok").inc()
        self.metrics.bytes_sent.inc(result.bytes_sent)
        self.metrics.bytes_received.inc(result.bytes_received)
        self.metrics.latency.observe(result.elapsed_s)

    def _exchange_refused(self, j: str, t: int, exc: ExchangeRefused) -> None:
        """Count and log the exchange with ``j`` in round ``t`` that ``j`` (or its reply's check here) refused."""
        if exc.reason is Reason.ROUND_MISMATCH:
            self.rounds.gap_seen = True  # out of step with j: see whether one of us should catch up
        self.metrics.refusals.labels(exc.reason.name).inc()
        self.metrics.exchanges.labels("refused").inc()
        log.info("exchange with %s in round %d refused: %s: %s", j, t, exc.reason.name, exc.detail)

    async def _exchange_failed(self, j: str, t: int, peer: Peer, exc: PeerUnavailable) -> None:
        """Count and log the exchange with ``j`` in round ``t`` that failed on the way, and drop ``j`` (``peer``,
        the entry it failed as: one verified anew meanwhile stays)."""
        self.metrics.exchanges.labels("failed").inc()
        log.info("exchange with %s in round %d failed: %s", j, t, exc)
        if self._peers is not None:
            await self._peers.drop(j, str(exc), expected=peer, cause="exchange")

    def _record(self, t: int, cur: Round, self_weight: float, loss: float, started: float) -> dict[str, Any]:
        sent = num_bytes(select(cur.snapshot or {}, sent_factors(self.method, t)))
        n = len(cur.received)
        outbound = {s[0]: s for s in cur.stats}
        return {
            "round": t,
            "phase": self.method.phase(t),
            "node_id": self.node_id,
            "degree": cur.degree,
            "self_weight": self_weight,
            "neighbours": [
                {"id": j, "degree": d, "weight": self._last_weights.get(j, (0, 0.0))[1]}
                for j, (d, _) in sorted(cur.received.items())
            ],
            "missed": sorted(cur.neighbours - set(cur.received)),
            "bytes_sent": sent * n,
            "bytes_received": sum(num_bytes(f) for _, f in cur.received.values()),
            "exchange_latency_s": max((s[3] for s in outbound.values()), default=0.0),
            "loss": loss,
            "seconds": time.monotonic() - started,
            "time": time.time(),
        }

    def _last_logged(self, last: dict[str, float]) -> None:
        """Take a resumed run's last loss and accuracy from its log (``last``: `state.last_numbers`): status, the
        metrics and the result said NaN or "n/a" until the next round or evaluation (never, for a run resumed with
        its rounds all done), though the log held them."""
        if (loss := last.get("loss")) is not None:
            self._last_loss = loss
            self.metrics.loss.set(loss)
        if (accuracy := last.get("eval_accuracy")) is not None:
            self._last_accuracy = accuracy
            self.metrics.accuracy.set(accuracy)

    def _evaluate(self) -> tuple[float, float]:
        assert self._model is not None and self._dev is not None  # noqa: S101
        self._model.load_factors(self.rounds.factors)
        return evaluate(self._model, self._dev, precision=self.config.train.precision)

    async def _save(self, next_round: int, export: bool) -> None:
        """Checkpoint the factors at the start of ``next_round`` (and export the adapter) in a worker thread."""
        factors, last_mixed = self.rounds.factors, self.rounds.last_mixed
        round_log, lock = self._round_log, self._out_lock

        def write() -> None:
            if lock is not None:  # not into an --out removed or replaced meanwhile (OSError, as a full disk)
                state.check_out_held(self.config.out, lock)
            # In the worker, so the optimizer state is not mid-round (local steps run there too), and so is the log
            # (`_run_round`): every round before next_round has its line there by now.
            rounds_bytes = round_log.size if round_log is not None else None
            if round_log is not None:
                round_log.sync()  # the lines this checkpoint counts reach the disk before it does
            ckpt = state.Checkpoint(
                next_round, self.node_id, self.fingerprint, factors, dict(self._opt_state), rounds_bytes, last_mixed,
                self.config.run_settings(),
            )  # fmt: skip
            state.save_checkpoint(self.config.out, ckpt)
            if export and self._model is not None:
                self._model.load_factors(factors)
                # Never a torn adapter/; it says what length to cut texts to when it classifies (`from_export`).
                writer = functools.partial(self._model.export, max_length=self.config.train.max_length)
                state.replace_adapter(self.config.out, writer)

        if not self.node_id:
            return
        await self._in_worker(write)
