"""`tadlora-node`: run a node, ask a running node for its status, or check a host before running one (doctor).

  tadlora-node --peers auto --mdns-interface 127.0.0.1 --listen 127.0.0.1:7070 --rounds 20 --out runs/n0 \\
               --node-id n0 --tls-dir certs/          # or --insecure, to run without TLS
  tadlora-node status 127.0.0.1:7070 --tls-dir certs/ --node-id n0   # TADLORA_TLS_DIR/_NODE_ID work too
  tadlora-node status 127.0.0.1:7070 --all --table   # every node the neighbour lists lead to, a line each
  tadlora-node certs init certs/ && tadlora-node certs issue n0 --dir certs/   # then --tls-dir certs --node-id n0
  tadlora-node doctor --peers auto --mdns-interface eth0     # checks network, GPU, model, data and peers

Nodes of one cluster must be started with the same model, dataset, --num-shards, LoRA flags (--lora-*), --init,
--method, --switch-interval, --seed, --link-prob and --max-neighbors; each with its own --shard, --listen port and
--out. With no model or data flags a node trains the packaged MiniLM encoder on the shipped SST-2 slice, offline.
SIGINT/SIGTERM stop it gracefully (checkpoint, a goodbye to every peer so that none waits for it, exit 0); a second
signal forces the exit. Running it again with the same --out resumes from the checkpoint with the same node id; it
is refused under another model fingerprint (model, LoRA, --seed) or another --cluster, --method, --switch-interval,
--dataset, --split, --shard, --num-shards, --link-prob or --max-neighbors than the run kept there.

Exit status: 0 when it finished its --rounds or was stopped gracefully; 2 for what no restart fixes (bad flags, TLS
files it cannot use, an --out it must not use); 1 for the rest (a port in use, an --out held by a running node, a
GPU out of memory), which a restart may fix; 128 + the signal's number (130, 143) when a second signal forced the
exit. docs/troubleshooting.md goes from each message to its fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tadlora.adapter import INITS, LoraSpec, UnusableSettings
from tadlora.cliutil import (
    VERSION_HELP,
    apply_env_defaults,
    csv_list,
    error_text,
    from_environment,
    out_not_a_directory,
    path_arg,
    printable,
    version_text,
)
from tadlora.core.methods import make_method, method_names, takes_switch_interval
from tadlora.core.robust import RobustMixing, parse_robust_mixing
from tadlora.node.config import DEFAULT_PORT, NodeConfig, check_callable_back, default_listen
from tadlora.node.identity import OutRefused, kept_node_id
from tadlora.node.peerspec import parse_peers_option
from tadlora.node.protocol_types import BindError
from tadlora.training import OPTIMIZER_STATES, OPTIMIZERS, PRECISIONS, TrainSpec

if TYPE_CHECKING:
    from tadlora.node.daemon import Node

log = logging.getLogger("tadlora.node")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # --log-level; setup_logging would raise on any other


def _why_unbound(config: NodeConfig) -> str:
    """For a node that could not bind its --listen (or --health-port) address: what `tadlora-node doctor` finds there,
    with its fix. gRPC's own message names no cause ("Failed to bind ...; set GRPC_VERBOSITY=debug ...")."""
    from tadlora.node.hostcheck import check_listen

    check = check_listen(config)
    return f"\n  {check.detail}\n  fix: {check.fix}" if check.status == "FAIL" else ""


def robust_mixing_type(text: str) -> RobustMixing | None:
    """`parse_robust_mixing` as an argparse type: its reason reaches the error line (for a plain ValueError
    argparse prints only "invalid parse_robust_mixing value")."""
    try:
        return parse_robust_mixing(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_run_parser(
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """Flags of `tadlora-node` (run); ``extend`` adds a subcommand's own (doctor's) before the ``TADLORA_``
    variables are read, so that those flags take variables too."""
    p = argparse.ArgumentParser(
        prog="tadlora-node", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=version_text("tadlora-node"), help=VERSION_HELP)
    g = p.add_argument_group("network")
    g.add_argument(
        "--peers",
        default="auto",
        help="auto (mDNS), HOST:PORT, dns:NAME[:PORT] (every A/AAAA record of NAME), comma-separated: "
        "'auto,10.0.0.5:7070'; an entry equal to this node's advertised IP:PORT is skipped, so every host can "
        "share one list",
    )
    g.add_argument(
        "--listen",
        help="HOST:PORT to serve on, an IPv6 address in brackets: [::1]:7070 (port 0: any) (default: "
        f"0.0.0.0:{DEFAULT_PORT} with --peers auto on a network interface, which announces that interface's "
        f"address; else 127.0.0.1:{DEFAULT_PORT}, this host only)",
    )
    g.add_argument(
        "--mdns-interface",
        help="IPv4 address or interface name for mDNS, which is IPv4 only (default: the lowest-metric default "
        "route's; with no default route, the one interface with an IPv4 address and a link); a name or the default "
        "is followed when its address changes (a new DHCP lease)",
    )
    g.add_argument(
        "--advertise-address",
        help="IP address peers are told to dial: IPv4, or IPv6 with static or dns: peers (mDNS announces IPv4 only) "
        "(default: the listen/interface address)",
    )
    g.add_argument("--cluster", default="default", help="cluster name; only nodes of the same cluster mix")
    g.add_argument(
        "--node-id",
        help="this node's id (default: kept in --out, else random; required with --tls-dir: it names the certificate)",
    )
    g.add_argument(
        "--tls-dir",
        type=path_arg,
        help="certificates: DIR/ca.crt and DIR/NODE_ID.crt/.key (see `tadlora-node certs`) (default: none; a node "
        "without it refuses to start unless --insecure)",
    )
    g.add_argument(
        "--insecure",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run without TLS: plaintext, and anyone who reaches the port may join (--no-insecure: require TLS "
        "even where TADLORA_INSECURE turns this on)",
    )
    g.add_argument("--link-prob", type=float, default=1.0, help="probability a link is up in a round (paper's p)")
    g.add_argument(
        "--max-neighbors", type=int, help="bound the degree: ring plus chords over sorted peer ids (default: all)"
    )
    g.add_argument("--min-peers", type=int, default=1,
                   help="peers to wait for before round 0, and on a resume until a peer is 2 rounds ahead "
                        "(0: start at once)")  # fmt: skip
    g.add_argument("--peer-wait", type=float, default=60.0,
                   help="seconds to wait for --min-peers, then start with the peers there are")  # fmt: skip
    g.add_argument("--exchange-timeout", type=float, default=60.0, help="seconds a round waits for neighbours")
    g.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port of the listen host (0: any free port; the log says "
                   "which) (default: off)")  # fmt: skip
    g.add_argument("--health-port", type=int,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (listen host): for probes "
                   "that cannot do mutual TLS, such as Kubernetes' gRPC probe (default: off)")  # fmt: skip
    g.add_argument("--max-factor-norm", type=float, default=1e4,
                   help="refuse a neighbour's factor whose norm is over this (BAD_PAYLOAD)")  # fmt: skip
    g.add_argument("--robust-mixing", type=robust_mixing_type, default="none",
                   help="none, clip:TAU (clip each neighbour's difference to norm TAU) or trim:F "
                   "(drop the F largest and F smallest neighbour values per coordinate)")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--model", default="minilm", help="minilm (packaged, offline), tiny, HF model id or local path")
    t.add_argument("--dataset", default="builtin:sst2-small",
                   help="builtin:sst2-small (shipped), glue:SST-2|MNLI|QNLI|RTE (the GLUE files in "
                   "$TADLORA_GLUE_DIR, else ../shared/data/glue), a .tsv/.csv/.jsonl file "
                   "(path.csv?text=COL&label=COL, with a dev or validation file of the same type beside it), "
                   "or hub:NAME[/CONFIG]")  # fmt: skip
    t.add_argument("--split", default="label-skew",
                   help="label-skew (the paper's: 0.9 of one class), label-skew@SHARE (another dominant share), "
                   "iid or dirichlet:ALPHA")  # fmt: skip
    t.add_argument("--shard", type=int, default=0, help="this node's shard index (0-based)")
    t.add_argument("--num-shards", type=int, default=1, help="number of shards (= nodes in the cluster)")
    t.add_argument("--samples-per-client", type=int,
                   help="cap on this node's training examples (default: its whole shard)")  # fmt: skip
    t.add_argument("--method", default="tad", choices=method_names(), help="decentralized LoRA method")
    alternating = [m for m in method_names() if takes_switch_interval(m)]
    default_t = ", ".join(sorted({str(make_method(m).switch_interval) for m in alternating}))
    t.add_argument(
        "--switch-interval", type=int,
        help=f"T: rounds between factor switches, for {', '.join(alternating)} (default: {default_t})",
    )  # fmt: skip
    t.add_argument("--rounds", type=int,
                   help="the round to stop at: the run ends once rounds 0 to ROUNDS-1 are done, counted across "
                   "resumes on --out and catch-ups, not ROUNDS more (default: until stopped)")  # fmt: skip
    t.add_argument("--local-steps", type=int, default=10, help="local steps per round (K)")
    t.add_argument("--batch-size", type=int, default=16, help="examples per local step")
    t.add_argument("--max-length", type=int, default=64, help="tokens per example")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW: 1e-3; SGD: ~10)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="local optimizer: adamw (the paper's) or sgd (plain)")  # fmt: skip
    t.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default="fresh",
                   help="AdamW's moments: fresh every round, or persistent across rounds (kept in the "
                   "checkpoint, never sent; reset when the node catches up from a peer; not with decaf)")  # fmt: skip
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="matmul precision: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 (also on the CPU: "
                   "faster where it has AVX512-BF16 or AMX, ~11x slower where it has not: doctor says which), "
                   "fp32")  # fmt: skip
    t.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    t.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha")
    t.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    t.add_argument("--lora-targets", type=csv_list(str), default=("query", "value"), help="modules to adapt")
    t.add_argument("--seed", type=int, default=0, help="run seed (shared by all nodes of a cluster)")
    t.add_argument("--init", choices=("auto", *INITS), default="auto",
                   help="how LoRA's A and the classification head are drawn from --seed: portable (the same bits on "
                   "every CPU, x86 or ARM), torch (torch's own, whose bits depend on the CPU; how nodes drew them "
                   "before 2026-12-05: a new node joins such a cluster with it), or auto (default: the init of the "
                   "run kept in --out, else portable)")  # fmt: skip
    t.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:N")
    t.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds")
    t.add_argument("--eval-samples", type=int, default=200, help="dev examples to evaluate on")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=path_arg, default=Path("tadlora-out"),
                   help="the run's directory: checkpoint, rounds.jsonl (one line per round), node.json (its id and "
                   "run settings), adapter/ (peft) and .node.lock (held while it runs: one node per --out); the same "
                   "--out again resumes (the log goes to stderr)")  # fmt: skip
    o.add_argument("--checkpoint-every", type=int, default=5, help="checkpoint every N rounds")
    o.add_argument("--log-format", choices=("auto", "json", "text"), default="auto",
                   help="auto: text on a terminal, JSON lines otherwise")  # fmt: skip
    o.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                   help="what the node logs (any case)")  # fmt: skip
    if extend is not None:
        extend(p)
    apply_env_defaults(p)
    return p


def config_from_args(a: argparse.Namespace) -> NodeConfig:
    """Map parsed flags onto a NodeConfig (validated there)."""
    peers = parse_peers_option(a.peers)
    return NodeConfig(
        out=a.out,
        node_id=a.node_id,
        cluster=a.cluster,
        listen=a.listen if a.listen is not None else default_listen(peers, a.mdns_interface),
        advertise_address=a.advertise_address,
        peers=peers,
        mdns_interface=a.mdns_interface,
        model=a.model,
        dataset=a.dataset,
        split=a.split,
        shard=a.shard,
        num_shards=a.num_shards,
        samples_per_client=a.samples_per_client,
        eval_samples=a.eval_samples,
        eval_every=a.eval_every,
        method=a.method,
        switch_interval=a.switch_interval,
        lora=LoraSpec(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, target_modules=tuple(a.lora_targets)),
        train=TrainSpec(
            local_steps=a.local_steps,
            batch_size=a.batch_size,
            max_length=a.max_length,
            lr=a.lr,
            precision=a.precision,
            optimizer=a.optimizer,
            optimizer_state=a.optimizer_state,
        ),
        seed=a.seed,
        init=a.init,
        rounds=a.rounds,
        link_prob=a.link_prob,
        max_neighbors=a.max_neighbors,
        min_peers=a.min_peers,
        peer_wait=a.peer_wait,
        exchange_timeout=a.exchange_timeout,
        checkpoint_every=a.checkpoint_every,
        device=a.device,
        metrics_port=a.metrics_port,
        health_port=a.health_port,
        tls_dir=a.tls_dir,
        insecure=a.insecure,
        max_factor_norm=a.max_factor_norm,
        robust_mixing=a.robust_mixing,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the node id and round when known.

    The id is the node's (``node``, once it has one: a new node makes it up during its start-up), else
    ``node_id`` (the id the flags or the kept ``--out`` give, known before the start-up logs anything)."""

    node_id = ""
    node: Node | None = None

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "node_id": (self.node.node_id if self.node is not None else "") or self.node_id,
            "message": record.getMessage(),
        }
        if hasattr(record, "round"):
            doc["round"] = record.round
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL message``, one line per record (a traceback follows on lines of its own): the message with
    the characters a terminal acts on escaped (`printable`), as it carries what peers said (a refusal's detail)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup_logging(fmt: str, level: str) -> JsonFormatter | None:
    """Text on a terminal, JSON lines otherwise (or as asked). Returns the JSON formatter, if any."""
    handler = logging.StreamHandler(sys.stderr)
    json_fmt = None
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        json_fmt = JsonFormatter()
        handler.setFormatter(json_fmt)
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("tadlora").setLevel(level.upper())
    return json_fmt


# Open files a node asks for: each peer's connection (both ways), each caller's, the checkpoint and log writes, the
# model's files. systemd's default soft limit (1024; its hard one is 524288) leaves a node whose port many callers
# hold (a misconfigured fleet, a scan) failing its checkpoints with EMFILE; the hard limit is the administrator's.
WANTED_OPEN_FILES = 65536


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int] | None:
    """Raise this process's soft limit on open files towards ``wanted``, within its hard limit (which only the
    administrator can raise). Returns (before, after) when it raised it; None when it was high enough already or
    cannot be changed here."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
    except (OSError, ValueError):  # a sandbox that refuses it: the limit stays as the administrator set it
        pass
    return None


async def run_node(config: NodeConfig, json_fmt: JsonFormatter | None = None) -> int:
    """Run one node until done or signalled; 0 on a clean finish or graceful stop."""
    from tadlora.node.daemon import Node  # torch import: only once the flags are known to be good

    started = time.monotonic()

    loop = asyncio.get_running_loop()
    signals = 0
    stop_requested = asyncio.Event()
    node: Node | None = None

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: stopping after a checkpoint (send it again to force)", signal.Signals(signum).name)
            stop_requested.set()
            if node is not None:
                node.request_stop()
        else:
            log.warning("second signal: exiting now")
            os._exit(128 + signum)

    # Handlers go in before the (seconds-long) start-up, so a signal then still means a graceful stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        node = Node(config)
        if json_fmt is not None:
            json_fmt.node_id = config.node_id or kept_node_id(config.out) or ""
            json_fmt.node = node
        async with node:
            if stop_requested.is_set():
                node.request_stop()
            result = await node.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    acc = "n/a" if result.last_accuracy is None else f"{result.last_accuracy:.4f}"
    # The rounds done count those of earlier runs on --out and those a catch-up adopted: say which this run ran.
    sys.stdout.write(
        f"{result.node_id}: {result.rounds_completed} rounds done ({result.rounds_run} run by this process), last "
        f"accuracy {acc}, checkpoint and adapter in {result.out}\n"
    )
    if result.stopped:
        log.info("stopped at round %d after %.1f s; run it again with the same --out to resume",
                 result.rounds_completed, time.monotonic() - started)  # fmt: skip
    else:
        log.info("finished in %.1f s", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`tadlora-node` with all its subcommands (`tadlora.node.entry.main`), kept for `python -m tadlora.node.cli`."""
    from tadlora.node.entry import main as entry_main

    return entry_main(argv)


def run_main(args: list[str]) -> int:
    """`tadlora-node [FLAGS]`: run a node until its rounds are done or it is stopped; 0 when it finished, 1 when
    it failed, 2 for bad flags, TLS files it cannot use (missing, not this node's, expired) or an --out it must not
    use (`OutRefused`: a run of other settings, another node's or model's state, a damaged file): what no restart
    fixes, so that a supervisor that restarts on failure (systemd's RestartPreventExitStatus=2) stops there."""
    parser = build_run_parser()
    a = parser.parse_args(args)
    try:
        json_fmt = setup_logging(a.log_format, a.log_level)  # ValueError: a level --log-level's choices lack
        config = config_from_args(a)
        check_callable_back(config)  # flags alone decide it: exit 2 here, not 1 (restarted for ever) once running
        if problem := out_not_a_directory(config.out):
            raise ValueError(problem)
        if config.tls_dir is not None and config.node_id is not None:
            from tadlora.node.tls import TlsMaterial  # no torch: checked before the model loads

            TlsMaterial.from_dir(config.tls_dir, config.node_id)  # ValueError naming the file and the fix
    except ValueError as exc:
        sys.stderr.write(f"tadlora-node: error: {exc}{from_environment(parser, a, str(exc))}\n")
        return 2
    if raised := raise_open_file_limit():
        log.info("open-file limit raised from %d to %d (the hard limit allows it)", *raised)
    try:
        code = asyncio.run(run_node(config, json_fmt))
    except (RuntimeError, OSError, ValueError) as exc:
        text = error_text(exc, "a smaller --batch-size or --max-length, or --precision bf16 on a GPU that has it")
        if isinstance(exc, BindError):
            text += _why_unbound(config)
        text += from_environment(parser, a, text)  # as for the errors above: a flag it names may be a TADLORA_ one
        if json_fmt:  # a log collector reads the record; in text both would reach the same terminal, twice
            log.error("%s", text)
        sys.stderr.write(f"tadlora-node: error: {text}\n")
        # --out as it is, or settings the model cannot take (LoRA targets it lacks): every restart fails alike.
        return 2 if isinstance(exc, OutRefused | UnusableSettings) else 1
    return code


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
