"""A rolling restart: the cluster's nodes restarted one at a time while the others run on, as `kubectl rollout
restart statefulset/tadlora` (highest ordinal first, each once its new pod is Ready), a systemd restart host by
host, or `docker compose restart` service by service do it.

Real `python -m tadlora.node.entry` processes (see nodeproc): the tiny model, static peers on 127.0.0.1, a plaintext
health port that a probe asks as the StatefulSet's does. Every restart must resume from its own checkpoint and log
each round once, rejoin and mix again; the others must never wait longer than the exchange deadline a round; and
after the rollout every node mixes with every other.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodeproc import SMALL_RUN, STARTUP_S, NodeProcess, free_ports, node_env, unique_tag

log = logging.getLogger(__name__)

EXCHANGE_TIMEOUT_S = 10.0  # s; a restart that takes longer is caught up by a fetch, one that takes less waited for
REJOIN_S = 60.0  # s from a restarted node serving to its first round mixed with every other node
SLACK_S = 3.0  # s a round may take beyond its wait for a restarting node: its own work, on two busy cores
STOP_S = 30.0  # s for a SIGTERM to end a node (a checkpoint; it takes under a second here)


def health(port: int) -> str | None:
    """What the kubelet's gRPC probe reads on a node's --health-port (None: nothing answers)."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
    except grpc.RpcError:
        return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Cluster:
    """``n`` nodes that list each other as static peers, each with a fixed port and health port, so that a node
    restarted with the same flags is found where it was."""

    def __init__(self, tmp: Path, n: int, *, min_peers: int, peer_wait: float) -> None:
        self.tmp, self.n, tag = tmp, n, unique_tag()
        ports = free_ports(2 * n)
        self.ports, self.health_ports = ports[:n], ports[n:]
        self.ids = [f"n{i}-{tag}" for i in range(n)]
        peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)  # one list for all: a node skips its own address
        self.args = [
            [
                "--peers", peers, "--listen", f"127.0.0.1:{self.ports[i]}", "--health-port", str(self.health_ports[i]),
                "--cluster", tag, "--node-id", self.ids[i], "--out", str(self.out(i)), "--shard", str(i),
                "--num-shards", str(n), "--log-format", "json", "--insecure", *SMALL_RUN,
                "--min-peers", str(min_peers), "--peer-wait", str(peer_wait),
                "--exchange-timeout", str(EXCHANGE_TIMEOUT_S), "--eval-every", "1000",
            ]
            for i in range(n)
        ]  # fmt: skip
        self.nodes: list[NodeProcess] = []
        self.generation = [0] * n

    def out(self, i: int) -> Path:
        return self.tmp / f"n{i}"

    def start(self, i: int) -> NodeProcess:
        node = NodeProcess(self.args[i], self.out(i), self.tmp, f"n{i}.{self.generation[i]}", node_env())
        self.generation[i] += 1
        if i < len(self.nodes):
            self.nodes[i] = node
        else:
            self.nodes.append(node)
        return node

    def rounds(self, i: int) -> list[dict[str, Any]]:
        return self.nodes[i].rounds()

    def mixed_with(self, i: int, since: float, ids: list[str]) -> dict[str, Any] | None:
        """Node i's first round logged after ``since`` (Unix time) that mixed with exactly the nodes ``ids``."""
        return next(
            (
                r
                for r in self.rounds(i)
                if r["time"] > since and sorted(x["id"] for x in r["neighbours"]) == sorted(ids)
            ),
            None,
        )

    def mixed_with_all(self, i: int, since: float) -> dict[str, Any] | None:
        """Node i's first round logged after ``since`` that mixed with every other node."""
        return self.mixed_with(i, since, [j for j in self.ids if j != self.ids[i]])

    def wait_all_mixing(self, since: float, timeout: float) -> None:
        for i, node in enumerate(self.nodes):
            node.wait_until(lambda i=i: self.mixed_with_all(i, since) is not None, "a round mixed with all", timeout)

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def cluster(tmp: Path, n: int, *, min_peers: int, peer_wait: float = 120.0) -> Iterator[Cluster]:
    c = Cluster(tmp, n, min_peers=min_peers, peer_wait=peer_wait)
    try:
        for i in range(n):
            c.start(i)
        for node in c.nodes:
            node.serving()
        c.wait_all_mixing(0.0, STARTUP_S)
        yield c
    finally:
        c.stop_all()


def restart(c: Cluster, k: int) -> dict[str, Any]:
    """SIGTERM node k, check its exit and checkpoint, start it again with the same flags and wait until its health
    port says SERVING (Ready, to the StatefulSet). What was seen, for the checks after the rollout."""
    old = c.nodes[k]
    old.send(signal.SIGTERM)
    stopped_at = time.time()
    assert old.wait_exit(STOP_S) == 0, old.tail()
    kept = c.rounds(k)
    ckpt = old.checkpoint()
    # A graceful stop checkpoints the start of the round after the last one logged: no round lost, none to redo.
    assert ckpt.round == kept[-1]["round"] + 1, (ckpt.round, kept[-1])
    new = c.start(k)
    started = time.time()
    new.serving()
    new.wait_until(lambda: health(c.health_ports[k]) == "SERVING", "health SERVING", 10)
    ready = time.time()
    new.wait_for(rf"^resuming at round {ckpt.round} from ", 0)
    return {"k": k, "stopped_at": stopped_at, "started": started, "ready": ready, "kept": kept, "ckpt": ckpt.round}


def check_rollout(c: Cluster, restarts: list[dict[str, Any]], *, one_at_a_time: bool) -> None:
    """What must hold once every restart is done and every node mixes with every other again; ``one_at_a_time``:
    each node had rejoined before the next went down."""
    for r in restarts:
        k, lines = r["k"], c.rounds(r["k"])
        kept = r["kept"]
        # Later restarts of the same node append; each kept its log so far, cut nowhere.
        assert lines[: len(kept)] == kept
        new = lines[len(kept) :]
        assert new and new[0]["round"] >= r["ckpt"], (new[:1], r["ckpt"])
        back = c.mixed_with_all(k, r["started"])
        assert back is not None
        log.info("n%d: ready %.1f s after its start, mixing with all %.1f s after ready (round %d; checkpoint %d)",
                 k, r["ready"] - r["started"], back["time"] - r["ready"], back["round"], r["ckpt"])  # fmt: skip
    for i in range(c.n):
        numbers = [r["round"] for r in c.rounds(i)]
        # Each round once and in order; a jump forward is a catch-up (a restart longer than the deadline).
        assert all(b > a for a, b in itertools.pairwise(numbers)), numbers
        slowest = max(c.rounds(i), key=lambda r: r["seconds"])
        log.info("n%d: %d rounds, slowest %.1f s (round %d)", i, len(numbers), slowest["seconds"], slowest["round"])
    # No round waited longer than the deadline, plus its own work. One at a time, while node k was down and until
    # the next node went down, none waited longer than k was away either: a restart within the deadline is waited
    # for, one beyond it caught up with by a fetch. (A peer that came back and was dropped again cost a deadline.)
    ends = [r["stopped_at"] for r in restarts[1:]] + [time.time()]
    for r, end in zip(restarts, ends, strict=True):
        away = r["ready"] - r["stopped_at"] if one_at_a_time else EXCHANGE_TIMEOUT_S
        bound = min(away, EXCHANGE_TIMEOUT_S) + SLACK_S
        for i in set(range(c.n)) - {r["k"]}:
            waits = [x for x in c.rounds(i) if r["stopped_at"] < x["time"] <= end]
            assert all(x["seconds"] < bound for x in waits), (i, r["k"], bound, max(waits, key=lambda x: x["seconds"]))


def test_a_rolling_restart_resumes_each_node_which_rejoins_and_no_one_waits_longer_than_the_deadline(
    tmp_path: Path,
) -> None:
    """Three nodes, restarted highest first, the next once the previous has mixed with both others again."""
    with cluster(tmp_path, 3, min_peers=2) as c:
        restarts = []
        for k in (2, 1, 0):
            restarts.append(restart(c, k))
            c.nodes[k].wait_until(lambda k=k: c.mixed_with_all(k, restarts[-1]["started"]) is not None,
                                  "mixing with all again", REJOIN_S)  # fmt: skip
        done = time.time()
        c.wait_all_mixing(done, REJOIN_S)
        check_rollout(c, restarts, one_at_a_time=True)


@pytest.mark.timeout(240)  # three nodes' start and one restart, on two busy cores
def test_a_node_stopped_gracefully_is_dropped_by_its_static_peers_at_once_and_rejoins_them_when_restarted(
    tmp_path: Path,
) -> None:
    """Node 0 has the smallest id, so both others wait for its call in every round. Stopped without a word to its
    static peers, it was waited for until --exchange-timeout, then probed and dropped ("missed round T and does not
    answer"), once per stop. Now it tells them as it stops (Leave): each drops it at once, goes on with the other
    alone, and takes it back when it starts again."""
    with cluster(tmp_path, 3, min_peers=2) as c:
        old, others = c.nodes[0], (1, 2)
        old.send(signal.SIGTERM)
        stopped_at = time.time()
        assert old.wait_exit(STOP_S) == 0, old.tail()
        for i in others:
            # Dropped however it happened: the reason says whether the leave did it or a round's deadline and a probe.
            drop = c.nodes[i].wait_for(rf"^peer {c.ids[0]} dropped: ", EXCHANGE_TIMEOUT_S + 3 * SLACK_S)
            assert drop["message"].endswith("dropped: left (it said so as it stopped)"), drop
            # ... and its next rounds are with the other node alone.
            j = 3 - i
            c.nodes[i].wait_until(lambda i=i, j=j: c.mixed_with(i, stopped_at, [c.ids[j]]) is not None,
                                  "a round with the other node alone", REJOIN_S)  # fmt: skip
            # No round waited out its deadline for it: none logs a cut exchange with it or a probe it failed.
            assert not c.nodes[i].find(rf"{c.ids[0]}.*(did not finish within|does not answer)")
        told = old.wait_for(r"^told 2 peer\(s\) that this node is leaving: ", 0)["message"]
        assert all(f"{c.ids[i]}: dropped this node" in told for i in others), told
        started = time.time()
        c.start(0).serving()
        c.wait_all_mixing(started, REJOIN_S)


@pytest.mark.slow
@pytest.mark.timeout(480)  # four starts, nine restarts: 95 s alone on two busy cores, over 120 s beside other tests
def test_a_fast_rollout_twice_over_four_nodes_and_a_restart_beside_a_node_that_is_down(tmp_path: Path) -> None:
    """As Kubernetes does it: the next node goes down as soon as the previous one is Ready (its health port SERVING,
    which it is once its model is loaded, before it has rejoined), two passes with no pause. Then a node restarted
    while another is down must rejoin the ones that are up once they run on without it (a round's deadline), not
    wait --peer-wait for --min-peers."""
    with cluster(tmp_path, 4, min_peers=3, peer_wait=300) as c:
        restarts = [restart(c, k) for _ in range(2) for k in (3, 2, 1, 0)]
        c.wait_all_mixing(time.time(), REJOIN_S)
        check_rollout(c, restarts, one_at_a_time=False)

        c.nodes[1].send(signal.SIGTERM)
        assert c.nodes[1].wait_exit(STOP_S) == 0
        r = restart(c, 3)
        up = [c.ids[0], c.ids[2]]
        c.nodes[3].wait_until(lambda: c.mixed_with(3, r["started"], up) is not None, "mixing with the two up", REJOIN_S)


def test_a_whole_cluster_stopped_and_started_at_once_resumes_each_node_and_mixes_again(tmp_path: Path) -> None:
    """`docker compose restart`, a power cut with graceful stops, a host reboot: every node stops, then all start
    together. Each resumes from its own checkpoint (the nodes stopped within a round of each other), none waits
    for --min-peers as a new cluster would, and all mix with all again, each round logged once."""
    with cluster(tmp_path, 3, min_peers=2) as c:
        for node in c.nodes:
            node.send(signal.SIGTERM)
        kept, ckpts = [], []
        for i, node in enumerate(c.nodes):
            assert node.wait_exit(STOP_S) == 0, node.tail()
            kept.append(c.rounds(i))
            ckpts.append(node.checkpoint().round)
            assert ckpts[i] == kept[i][-1]["round"] + 1, (i, ckpts[i], kept[i][-1])
        started = time.time()
        for i in range(c.n):
            c.start(i)
        for i, node in enumerate(c.nodes):
            node.serving()
            node.wait_for(rf"^resuming at round {ckpts[i]} from ", 0)
        c.wait_all_mixing(started, REJOIN_S)
        for i in range(c.n):
            lines = c.rounds(i)
            assert lines[: len(kept[i])] == kept[i]
            numbers = [r["round"] for r in lines]
            assert all(b > a for a, b in itertools.pairwise(numbers)), numbers
            # In step when they stopped (they stop within a round of each other: a round waits for every
            # neighbour), in step after: no node adopted another's state to rejoin. One that had run on 2 rounds
            # past another would rightly be caught up with: that is the rolling restart's case, not this one.
            if max(ckpts) - min(ckpts) <= 1:
                resumed = [r["round"] for r in lines[len(kept[i]) :]]
                assert resumed == list(range(ckpts[i], ckpts[i] + len(resumed))), (ckpts, resumed)
