"""Checks of this host for `tadlora-node doctor`: interfaces and multicast, the gRPC port, GPU and driver, --out,
and whether the model and dataset load. Each returns a `Check`; none changes anything."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ifaddr

from tadlora.node.config import NodeConfig, is_wildcard, loopback_told_to_others
from tadlora.node.netif import (
    IFF_UP,
    NO_LINK,
    SYS_NET,
    InterfaceError,
    interface_addresses,
    require_unicast_ipv4,
)

__all__ = [
    "Check",
    "Status",
    "check_device",
    "check_interfaces",
    "check_listen",
    "check_mdns_interface",
    "check_out",
    "check_training",
    "multicast_route_interfaces",
]

Status = Literal["OK", "WARN", "FAIL"]

_IFF_MULTICAST = 0x1000  # <linux/if.h>: the interface supports multicast
_ROUTE_TABLE = Path("/proc/net/route")  # Linux IPv4 routing table
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # present while the NVIDIA kernel driver is loaded
_MULTICAST_NET = ipaddress.IPv4Network("224.0.0.0/4")


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it went, what was seen, and how to fix it (unless OK)."""

    name: str
    status: Status
    detail: str
    fix: str = ""


# ------------------------------------------------------------------------------------------- network


def check_interfaces() -> Check:
    """This host's IPv4 interfaces. Only loopback means no other machine can reach the node, unless the host has
    IPv6 addresses beyond loopback and link-local: then peers reach it over IPv6 only (static or dns: peers, since
    mDNS here is IPv4 only), and the WARN says so."""
    adapters = ifaddr.get_adapters()
    found = {a.name: [ip.ip for ip in a.ips if isinstance(ip.ip, str)] for a in adapters}
    found = {name: ips for name, ips in found.items() if ips}
    listing = "; ".join(f"{name} {', '.join(ips)}" for name, ips in sorted(found.items())) or "none"
    if not any(not ipaddress.IPv4Address(ip).is_loopback for ips in found.values() for ip in ips):
        # ifaddr lists IPv6 addresses as (address, flowinfo, scope id). A link-local one cannot be given to a peer
        # (--listen and --peers take no scope), so it does not count.
        ipv6 = [
            f"{a.name} {ip.ip[0]}"
            for a in adapters
            for ip in a.ips
            if isinstance(ip.ip, tuple) and _routable_ipv6(ip.ip[0])
        ]
        if ipv6:
            return Check(
                "interfaces",
                "WARN",
                f"IPv4: {listing}; IPv6: {'; '.join(ipv6)}",
                "no IPv4 address beside loopback: mDNS (IPv4 only) reaches no other host, but peers can reach this "
                "node over IPv6: --listen [ADDRESS]:PORT with --peers [ADDRESS]:PORT or dns:NAME",
            )
        return Check(
            "interfaces",
            "WARN",
            f"IPv4: {listing}",
            "only loopback: nodes on other machines cannot "
            "reach this one; connect a network, or run every node on this host",
        )
    return Check("interfaces", "OK", f"IPv4: {listing}")


def _routable_ipv6(address: str) -> bool:
    """Whether an IPv6 address of this host can be given to a peer: not loopback, link-local or unspecified."""
    ip = ipaddress.IPv6Address(address.partition("%")[0])
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def multicast_route_interfaces(route_table: str) -> set[str]:
    """Interfaces with a route covering 224.0.0.0/4 (or the default route) in /proc/net/route text."""
    out: set[str] = set()
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or not int(fields[3], 16) & 0x1:  # RTF_UP
            continue
        # /proc/net/route prints addresses as little-endian hex
        dest = ipaddress.IPv4Address(bytes.fromhex(fields[1])[::-1])
        mask = ipaddress.IPv4Address(bytes.fromhex(fields[7])[::-1])
        net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        if _MULTICAST_NET.subnet_of(net):
            out.add(fields[0])
    return out


def check_mdns_interface(cfg: NodeConfig) -> tuple[Check, list[str]]:
    """Whether mDNS can run on the chosen interface; also returns its IPv4 addresses (none: mDNS unusable)."""
    if not cfg.peers.auto:
        return Check("mdns", "OK", "not used (--peers has no 'auto')"), []
    try:
        addresses = interface_addresses(cfg.mdns_interface)
    except InterfaceError as exc:
        return Check(
            "mdns",
            "FAIL",
            str(exc),
            "pick an interface on the peers' network: --mdns-interface NAME "
            "or ADDRESS (see 'interfaces'), or give peers without multicast: --peers HOST:PORT or "
            "dns:NAME",
        ), []
    by_address = {ip.ip: a.name for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)}
    name = by_address.get(addresses[0], "?")
    where = f"{name} {', '.join(addresses)}"
    if all(ipaddress.IPv4Address(a).is_loopback for a in addresses):
        return Check("mdns", "OK", f"{where}: loopback, so mDNS reaches nodes on this host only"), addresses
    flags_file = SYS_NET / name / "flags"
    flags = int(flags_file.read_text().strip(), 16) if flags_file.exists() else None
    if flags is not None and not flags & IFF_UP:
        # It keeps its address, so zeroconf binds there; but every send fails (Network is unreachable).
        return Check(
            "mdns",
            "FAIL",
            f"{where}: the interface is down, so mDNS can neither send nor receive there",
            f"ip link set {name} up (as root), or pick another --mdns-interface (see 'interfaces')",
        ), addresses
    operstate_file = SYS_NET / name / "operstate"
    operstate = operstate_file.read_text().strip() if operstate_file.exists() else None
    if operstate in NO_LINK:  # up, but the kernel drops what is sent: a link may come later, so a WARN
        return Check(
            "mdns",
            "WARN",
            f"{where}: no link (operstate {operstate}), so mDNS reaches no one until it has one",
            "plug in the cable or join the Wi-Fi network (for a veth: set its other end up), or pick another "
            "--mdns-interface (see 'interfaces')",
        ), addresses
    routes = multicast_route_interfaces(_ROUTE_TABLE.read_text()) if _ROUTE_TABLE.exists() else set()
    if (flags is not None and flags & _IFF_MULTICAST) or name in routes:
        return Check("mdns", "OK", f"{where}: multicast capable"), addresses
    if flags is None:
        return Check(
            "mdns",
            "WARN",
            f"{where}: cannot tell whether it does multicast",
            "if peers are not found, use --peers HOST:PORT or dns:NAME",
        ), addresses
    # A WARN, not a FAIL: zeroconf is given the interface's address, so the kernel sends and receives mDNS there
    # without the flag or a route; but interfaces without the flag (tun, WireGuard, PPP) often carry no multicast.
    return Check(
        "mdns",
        "WARN",
        f"{where}: no MULTICAST flag and no route for 224.0.0.0/4; the interface may carry no multicast",
        f"if peers are not found: ip link set {name} multicast on (as root), or use --peers HOST:PORT or "
        "dns:NAME; in Kubernetes multicast does not cross pods: use dns:",
    ), addresses


def check_listen(cfg: NodeConfig) -> Check:
    """Whether the gRPC --listen address can be bound (by a plain socket: gRPC's SO_REUSEPORT would hide a
    running node), and the --health-port and --metrics-port beside it, and whether peers will be told a reachable
    address."""
    host, _, port_text = cfg.listen.rpartition(":")
    port = int(port_text)
    bind_host = host.strip("[]")
    try:
        bound = _bind(bind_host, port)
    except socket.gaierror as exc:
        return Check(
            "listen",
            "FAIL",
            f"{cfg.listen}: {exc.strerror}",
            "give HOST:PORT with an address of this host, or 0.0.0.0 for all",
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fix = (
                f"another process listens on port {port} (a node already running? try 'tadlora-node status "
                f"{host}:{port}'; 'ss -ltnp sport = :{port}' names it): stop it or choose another --listen port"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "use an address of this host (see 'interfaces') or 0.0.0.0"
        elif exc.errno == errno.EACCES:
            fix = "ports below 1024 need privileges: use a port >= 1024 (the default is 7070)"
        else:
            fix = "choose another --listen address"
        return Check("listen", "FAIL", f"cannot bind {cfg.listen}: {exc.strerror or exc}", fix)
    detail = f"{cfg.listen} can be bound" + (f" (port 0: any free port, e.g. {bound})" if port == 0 else "")
    wildcard = is_wildcard(bind_host)
    if wildcard and cfg.advertise_address is None and not cfg.peers.auto:
        return Check(
            "listen",
            "FAIL",  # the node refuses to start so: peers told 0.0.0.0:PORT would dial their own host
            f"{detail}, but peers would be told {cfg.listen}",
            "with a wildcard --listen and no mDNS, set --advertise-address to the IP peers reach "
            "this node at (in Kubernetes: the pod IP)",
        )
    if cfg.peers.auto and cfg.advertise_address is not None and ":" in cfg.advertise_address:
        return Check(
            "listen",
            "FAIL",  # the node refuses to start so (check_callable_back): an mDNS advert names IPv4 addresses only
            f"{detail}, but mDNS would announce --advertise-address {cfg.advertise_address}, an IPv6 address, and "
            "announces IPv4 addresses only",
            "find IPv6 peers with --peers [ADDRESS]:PORT or dns:NAME instead of auto, or advertise an IPv4 address",
        )
    announces_listen_host = cfg.peers.auto and cfg.advertise_address is None and not wildcard
    if announces_listen_host:
        try:  # the node refuses to start so: mDNS announces an IPv4 address only
            require_unicast_ipv4(bind_host, "--listen host")
        except ValueError as exc:
            return Check(
                "listen",
                "FAIL",
                f"{detail}, but mDNS announces the --listen host and cannot: {exc}",
                "--listen on an IPv4 address of this host (or 0.0.0.0:PORT), or set --advertise-address to the "
                "IPv4 address peers reach this node at",
            )
    # The node binds these beside --listen, and a taken one ends it once its model has loaded.
    for flag, extra in (("health", cfg.health_port), ("metrics", cfg.metrics_port)):
        if extra is None:
            continue
        try:
            _bind(bind_host, extra)
        except OSError as exc:  # the host resolved above: a bind error
            return Check(
                "listen",
                "FAIL",
                f"{detail}, but the --{flag}-port {extra} cannot be bound: {exc.strerror or exc}",
                f"choose a free --{flag}-port (TADLORA_{flag.upper()}_PORT), other than the --listen port",
            )
        detail += f"; {flag} port {extra} too"
    try:
        mdns = interface_addresses(cfg.mdns_interface) if announces_listen_host else []
    except InterfaceError:
        mdns = []  # the 'mdns' check says why
    if (told := loopback_told_to_others(cfg, mdns)) is not None:  # the node warns of it too, as it starts
        problem, fix = told
        return Check("listen", "WARN", f"{detail}; {problem}", fix)
    return Check("listen", "OK", detail)


def _bind(host: str, port: int) -> int:
    """Bind and listen a plain socket on host:port as gRPC would, then close it; the port bound (port 0: the free
    port the kernel chose). OSError (socket.gaierror included) if it cannot be bound."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        sock.bind(sockaddr)
        sock.listen()
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------- device and data


def _nvidia_driver() -> str | None:
    if not _NVIDIA_DRIVER.exists():
        return None
    text = _NVIDIA_DRIVER.read_text()
    words = text.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), text.strip()[:40])


def check_device(cfg: NodeConfig) -> Check:
    """GPU, driver and the torch build against --device."""
    import torch

    from tadlora.adapter import resolve_device

    driver = _nvidia_driver()
    build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        gpus = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
        detail = f"{gpus}; driver {driver or '?'}; {build}"
        try:  # the daemon's own check: a GPU index past the last, or a device string torch cannot read
            resolve_device(cfg.device)
        except (RuntimeError, ValueError) as exc:
            fix = f"use --device auto, cpu or cuda:0..cuda:{count - 1}"
            return Check("device", "FAIL", f"--device {cfg.device}: {exc} ({detail})", fix)
        if cfg.device == "cpu":
            return Check("device", "OK", f"--device cpu: training on CPU ({detail})")
        return Check("device", "OK", f"training on GPU: {detail}")
    if cfg.device.startswith("cuda"):
        return Check(
            "device",
            "FAIL",
            f"--device {cfg.device}, but no usable GPU ({build}, driver {driver or 'not loaded'})",
            "use --device auto or cpu, or install the NVIDIA driver and "
            "a CUDA build of torch (nvidia-smi must list the GPU)",
        )
    try:
        resolve_device(cfg.device)
    except (RuntimeError, ValueError) as exc:
        return Check("device", "FAIL", f"--device {cfg.device}: {exc}", "use --device auto or cpu")
    if driver is not None and not torch.version.cuda:
        return Check(
            "device",
            "WARN",
            f"NVIDIA driver {driver}, but {build}: training on CPU",
            "install a CUDA build of torch, e.g. pip install torch==VERSION --index-url "
            "https://download.pytorch.org/whl/cu128",
        )
    if driver is not None:  # a driver and a CUDA build, and still no GPU: the node falls back to the CPU silently
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={hidden!r} hides the GPUs" if hidden is not None else "the driver may be too old"
        return Check(
            "device",
            "WARN",
            f"NVIDIA driver {driver} and {build}, yet torch sees no GPU ({why}): training on CPU",
            "unset CUDA_VISIBLE_DEVICES or name a GPU in it; or update the driver to one that supports "
            f"CUDA {torch.version.cuda} (nvidia-smi shows the CUDA version the driver supports); or --device cpu",
        )
    return Check("device", "OK", f"no GPU: training on CPU ({build})")


def check_precision(cfg: NodeConfig, cpuinfo: str | None = None) -> Check:
    """--precision against what the device runs fast (bf16 autocast on a CPU without native bf16 is a WARN)."""
    from tadlora.adapter import resolve_device
    from tadlora.training import cpu_has_bf16, precision_warning

    precision = cfg.train.precision
    try:
        device = resolve_device(cfg.device)
    except (RuntimeError, ValueError) as exc:
        return Check("precision", "WARN", f"--precision {precision}: device unknown ({exc})", "see the 'device' check")
    slow = precision_warning(precision, device, cpuinfo)
    if slow:
        fix = (
            "--precision fp32" if device.type == "cuda" else "--precision auto (fp32 on the CPU, bf16 autocast on CUDA)"
        )
        return Check("precision", "WARN", slow, fix)
    note = ""
    if device.type == "cuda":
        runs = "fp32" if precision == "fp32" else "bf16 autocast"
    else:
        runs = "bf16 autocast" if precision == "bf16" else "fp32"
        native = cpu_has_bf16(cpuinfo)
        if native is not None:
            note = "; the CPU has native bf16" if native else "; the CPU has no native bf16"
    return Check("precision", "OK", f"--precision {precision}: {runs} on {device}{note}")


def check_out(cfg: NodeConfig, fingerprint: str | None, parts: str = "") -> Check:
    """--out is writable, not held by a running node and, if it holds a run, a run of this model (``fingerprint``;
    ``parts``, its `tadlora.adapter.fingerprint_parts`, name what differs) and of this --node-id. One this user
    cannot look into (a parent directory it may not search) is a FAIL too: the node's mkdir fails there."""
    from tadlora.node.identity import IDENTITY, load_identity, out_refusal
    from tadlora.node.state import LOCK, out_holder

    out = cfg.out
    try:
        existing = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), Path("."))
    except OSError as exc:
        # exists() raises (EACCES) below a directory this user may not search, e.g. the node user's own state
        # directory (mode 700) looked at by an administrator: the node, run so, fails the same way.
        return Check(
            "out",
            "FAIL",
            f"{out}: cannot look at {exc.filename or out}: {exc.strerror or exc}",
            "run doctor as the user the node runs as (or as root), give this user access to the directories "
            "above it, or choose another --out",
        )
    if not existing.exists():  # a symbolic link to nothing (a volume not mounted): the node's mkdir raises
        return Check(
            "out",
            "FAIL",
            f"{out}: {existing} is a symbolic link to {os.readlink(existing)}, which does not exist",
            "mount or create what it points to, or choose another --out",
        )
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return Check(
            "out",
            "FAIL",
            f"{out}: {existing} is not a writable directory",
            "choose another --out, or give this user write access to it",
        )
    if out.is_dir() and (holder := out_holder(out)) is not None:
        # The node refuses a held --out first of all (`hold_out`): it would be retried, and refused, for ever.
        return Check(
            "out",
            "FAIL",
            f"{out} is in use by a running node (process {holder} holds {out / LOCK})",
            "stop that node first, or give this node another --out",
        )
    try:
        identity = load_identity(out) if out.is_dir() else None
    except (OSError, ValueError) as exc:
        return Check("out", "FAIL", f"{out}: unreadable {IDENTITY}: {exc}", "use another --out")
    refusal = out_refusal(out, identity, fingerprint=fingerprint, parts=parts, node_id=cfg.node_id,
                          run=cfg.run_settings())  # fmt: skip
    if refusal is not None:  # as the node's own refusal at start (exit 2)
        return Check("out", "FAIL", *refusal)
    kept = (identity or {}).get("node_id")
    if identity:
        return Check("out", "OK", f"{out}: resumes node {kept!r}")
    return Check("out", "OK", f"{out}: " + ("writable" if out.is_dir() else "will be created"))


def check_training(cfg: NodeConfig) -> tuple[list[Check], str | None, str]:
    """Load --dataset and --model as a run would (on CPU); returns the checks, the model fingerprint (None if the
    model did not load) and its `tadlora.adapter.fingerprint_parts` ("" then)."""
    from tadlora.adapter import AdapterModel
    from tadlora.data import resolve_dataset
    from tadlora.workload import client_shards

    try:
        train = resolve_dataset(cfg.dataset, "train")
        dev = resolve_dataset(cfg.dataset, "dev")
        shard = client_shards(train, cfg.split, cfg.num_shards, cfg.seed, cfg.samples_per_client)[cfg.shard]
    except Exception as exc:  # a user's dataset can fail in many ways; say how, whatever it is
        failed = Check(
            "dataset",
            "FAIL",
            f"{cfg.dataset}: {exc}",
            "give builtin:sst2-small, glue:TASK (with the "
            "GLUE files in $TADLORA_GLUE_DIR), a .tsv/.csv/.jsonl file (path.csv?text=COL&label=COL), or "
            "hub:NAME with the hub reachable",
        )
        return [failed], None, ""
    checks = [
        Check(
            "dataset",
            "OK",
            f"{cfg.dataset}: {len(train)} train / {len(dev)} dev examples, labels "
            f"{', '.join(train.label_names)}; shard {cfg.shard}/{cfg.num_shards}: {len(shard)} examples",
        )
    ]
    if len(shard) == 0:
        checks[0] = dataclasses.replace(checks[0], status="FAIL", fix="fewer --num-shards or another --split")
    try:
        model = AdapterModel(cfg.model_spec(train.label_names))
    except Exception as exc:  # as above: any failure to load is this check's finding
        failed = Check(
            "model",
            "FAIL",
            f"{cfg.model}: {exc}",
            "give a local directory with config.json, "
            "tokenizer and weights, a Hugging Face id with the hub reachable (or cached, "
            "HF_HUB_OFFLINE=1), or minilm (packaged) / tiny",
        )
        return [*checks, failed], None, ""
    trainable = sum(v.numel() for v in model.factors().values())
    detail = f"{cfg.model}: fingerprint {model.fingerprint}, {trainable} LoRA parameters (r={cfg.lora.r})"
    return [*checks, Check("model", "OK", detail)], model.fingerprint, model.fingerprint_parts
