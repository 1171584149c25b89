"""Real `tadlora-node` processes for tests: start one, read its JSON log, always stop it at teardown.

mDNS SAFETY: every node started here gets ``--mdns-interface 127.0.0.1`` on its command line (a flag beats any
``TADLORA_`` variable), so no node multicasts on a real interface, whatever else a test passes. Only a node run
inside a network namespace of the test's own (``netns=``, see netns.py) may be given another interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tadlora.node import state

LOOPBACK = "127.0.0.1"
POLL_S = 0.05  # s between looks at a log file or a process
STARTUP_S = 90.0  # s for a node to serve: importing torch and building the tiny model, other nodes on 2 cores
STOP_GRACE_S = 10.0  # s a node gets after SIGTERM at teardown before it is killed
# Small and fast everywhere: the tiny 2-layer BERT, two local steps of four 32-token examples.
SMALL_RUN = (
    "--model", "tiny", "--local-steps", "2", "--batch-size", "4", "--max-length", "32", "--eval-samples", "32",
)  # fmt: skip
_SERVING = re.compile(r"^node (?P<id>\S+) serving on (?P<address>\S+) ")


def unique_tag() -> str:
    """A tag for cluster names and node ids: other test runs on this machine share 127.0.0.1:5353."""
    return uuid.uuid4().hex[:10]


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any TADLORA_ variable, one torch thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TADLORA_")}
    env["OMP_NUM_THREADS"] = "1"  # nodes share two cores with pytest and each other
    env.update(extra or {})
    return env


HEAVY_MODULES = ("torch", "peft", "transformers")  # what `tadlora-node status` and `certs` must never import


def console_script(name: str) -> str:
    """The path of console script ``name`` installed beside this interpreter (the venv's bin/)."""
    return str(Path(sys.executable).parent / name)


def heavy_imports(importtime_stderr: str) -> set[str]:
    """The top-level packages of `HEAVY_MODULES` that a process run with PYTHONPROFILEIMPORTTIME=1 imported,
    read from its stderr's "import time: self | cumulative | module" lines."""
    names = {
        line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")
    }
    return {n.split(".")[0] for n in names} & set(HEAVY_MODULES)


_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")  # where the kernel takes ephemeral ports from


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of 127.0.0.1 free a moment ago (bound together, so never the same twice), below the
    kernel's ephemeral range where it can tell it: a node restarted on its port found it taken (Address already in
    use) by another test's outgoing connection or port-0 bind, which the kernel draws from that range while the
    node is down."""
    try:
        low = int(_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = random.sample(range(10_000, low), min(low - 10_000, 64 * count)) if low > 10_000 + 64 * count else []
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (another worker's node): the next one
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]  # no such range here: any free port
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class NodeProcess:
    """One running `tadlora-node`; its stderr (JSON log lines) and stdout go to files under ``logs``."""

    def __init__(
        self,
        args: Sequence[str],
        out: Path,
        logs: Path,
        name: str,
        env: Mapping[str, str],
        *,
        netns: str | None = None,
        mdns_interface: str | None = LOOPBACK,
    ) -> None:
        if mdns_interface != LOOPBACK and netns is None:
            # None (the node's own choice) too: outside a namespace that is the machine's real network.
            raise ValueError(f"mDNS on {mdns_interface or 'the default'} only inside a test's own namespace (netns=)")
        self.out = out
        self.name = name
        self.netns = netns
        self.stderr_path = logs / f"{name}.stderr"
        self.stdout_path = logs / f"{name}.stdout"
        # Last: wins over anything before it. None: the node chooses, as it does with no flag (in a namespace).
        self.args = [*args, "--mdns-interface", mdns_interface] if mdns_interface is not None else [*args]
        # `ip netns exec` execs the node after entering the namespace: proc.pid is the node, signals reach it.
        enter = ["ip", "netns", "exec", netns] if netns is not None else []
        self._records: list[dict[str, Any]] = []
        self._offset = 0
        self._address = ""
        self._node_id = ""
        self.started = time.time()
        with self.stderr_path.open("wb") as err, self.stdout_path.open("wb") as stdout:
            self.proc = subprocess.Popen(
                [*enter, sys.executable, "-m", "tadlora.node.entry", *self.args],
                cwd=logs,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=err,
            )

    # ---------------------------------------------------------------------------------------------- the log

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other stderr lines, such as library warnings, are skipped)."""
        with self.stderr_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        self._offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    self._records.append(json.loads(line))
        return list(self._records)

    def messages(self) -> list[str]:
        return [r["message"] for r in self.records()]

    def find(self, pattern: str) -> list[dict[str, Any]]:
        """Records whose message matches the regex ``pattern``."""
        rx = re.compile(pattern)
        return [r for r in self.records() if rx.search(r["message"])]

    def wait_for(self, pattern: str, timeout: float) -> dict[str, Any]:
        """The first record whose message matches ``pattern``, waiting up to ``timeout`` s; fails with the log
        tail when the time is up or the process ends without it."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # looked at before the log, so its last lines are read
            found = self.find(pattern)
            if found:
                return found[0]
            if exited:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) without logging {pattern!r}\n"
                                     f"{self.tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {pattern!r} within {timeout} s\n{self.tail()}")
            time.sleep(POLL_S)

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``predicate`` up to ``timeout`` s (fails with the log tail)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what} not within {timeout} s\n{self.tail()}")
            time.sleep(POLL_S)

    def serving(self, timeout: float = STARTUP_S) -> dict[str, Any]:
        """The "node X serving on HOST:PORT" record (it sets ``node_id`` and ``address``)."""
        record = self.wait_for(_SERVING.pattern, timeout)
        match = _SERVING.match(record["message"])
        assert match is not None
        self._node_id, self._address = match["id"], match["address"]
        return record

    @property
    def address(self) -> str:
        """HOST:PORT the node serves on, from its log (waits for it)."""
        if not self._address:
            self.serving()
        return self._address

    @property
    def node_id(self) -> str:
        """The node's id, from its log (waits for it)."""
        if not self._node_id:
            self.serving()
        return self._node_id

    def tail(self, lines: int = 40) -> str:
        text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        return f"--- last stderr lines of {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------------------------------- the state

    def rounds(self) -> list[dict[str, Any]]:
        """OUT/rounds.jsonl so far."""
        return state.read_rounds(self.out)

    def checkpoint(self) -> state.Checkpoint:
        ckpt = state.load_checkpoint(self.out)
        assert ckpt is not None, f"{self.name} has no checkpoint in {self.out}"
        return ckpt

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    # --------------------------------------------------------------------------------------- the process

    def wait_exit(self, timeout: float) -> int:
        """The exit code, waiting up to ``timeout`` s (fails with the log tail)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s\n{self.tail()}") from None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM (so it says goodbye on mDNS), then SIGKILL if it lingers; reaps it. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def running_node(
    logs: Path,
    name: str,
    args: Sequence[str],
    out: Path,
    env: Mapping[str, str] | None = None,
    *,
    netns: str | None = None,
    mdns_interface: str | None = LOOPBACK,
) -> Iterator[NodeProcess]:
    """Start `tadlora-node ARGS` (with ``--mdns-interface 127.0.0.1``) and stop it at exit, whatever happens.
    ``out`` is where the node's ``--out`` (flag or TADLORA_OUT) points; logs go to ``logs/NAME.std{err,out}``.
    With ``netns`` the node runs inside that namespace, and only then may ``mdns_interface`` be another one, or
    None (no flag: the node chooses, as on a real host)."""
    logs.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(args, out, logs, name, node_env(env), netns=netns, mdns_interface=mdns_interface)
    try:
        yield node
    finally:
        node.stop()


def node_args(
    cluster: str,
    node_id: str,
    out: Path,
    *,
    shard: int = 0,
    num_shards: int = 1,
    listen: str = f"{LOOPBACK}:0",
    extra: Sequence[str] = (),
) -> list[str]:
    """The flags of a small, fast node (on loopback unless ``listen`` says otherwise) that finds peers by mDNS."""
    return [
        "--peers", "auto", "--listen", listen, "--cluster", cluster, "--node-id", node_id,
        "--out", str(out), "--shard", str(shard), "--num-shards", str(num_shards), "--log-format", "json",
        "--insecure", *SMALL_RUN, *extra,
    ]  # fmt: skip
