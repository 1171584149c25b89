"""A node much slower than its peers, and a node that freezes and thaws (a laptop suspended, `docker pause`,
SIGSTOP, a long stall on swap or I/O).

In one process first: a node whose local steps outlast --exchange-timeout. Then real `python -m
tadlora.node.entry` processes (see nodeproc): the tiny model, static peers on 127.0.0.1, one of them stopped with
SIGSTOP and continued with SIGCONT, or made slow with more --local-steps (a per-node setting).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import signal
import time
from pathlib import Path

import pytest

from nodeproc import STARTUP_S, NodeProcess
from tadlora.core.factors import Factors
from tadlora.node import daemon, peers
from tadlora.training import OptimizerState
from test_daemon import _rounds, cluster
from test_rolling_restart import Cluster

log = logging.getLogger(__name__)

SLOW_WARNING = "this node is too slow for the cluster"

# ------------------------------------------------------------------------------------------ in one process


@pytest.mark.asyncio
async def test_a_node_whose_local_steps_outlast_the_exchange_timeout_says_so_and_names_the_flags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """node-1's steps take longer than node-0 waits for its answer (--exchange-timeout): node-0 cuts each exchange
    at its deadline, and the two never mix. Both logs said only that exchanges timed out or were cut, which reads
    as a slow link; the slow node must say that its own steps are the cause, and which flags to change, once."""
    timeout_s, steps_s = 0.5, 1.0
    async with cluster(tmp_path, 2, rounds=3, exchange_timeout=timeout_s) as (fast, slow):
        steps = slow._train

        def slow_steps(t: int) -> tuple[float, Factors, OptimizerState]:
            time.sleep(steps_s)  # in the worker thread, as a slower machine's local steps
            return steps(t)

        slow._train = slow_steps  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="tadlora.node"):
            async with asyncio.timeout(90):
                await asyncio.gather(fast.run(), slow.run())
    assert all(r["neighbours"] == [] for r in _rounds(tmp_path / "n0") + _rounds(tmp_path / "n1"))
    said = [r.getMessage() for r in caplog.records if SLOW_WARNING in r.getMessage()]
    assert len(said) == 1, said  # the slow node, once (two rounds in a row); not the fast one
    assert "--local-steps" in said[0] and "--exchange-timeout" in said[0]


# ---------------------------------------------------------------------------------------------- processes

EXCHANGE_TIMEOUT_S = 3.0  # s; --exchange-timeout of every node here
SLACK_S = 3.0  # s a round or the time between two may take beyond its bound: its own work, on two busy cores
REJOIN_S = 45.0  # s from the thaw to the frozen node's first round mixed with every other node
_COMMIT_LOST = re.compile(r"^commit of the exchange with (?P<peer>\S+) in round (?P<round>\d+) got no answer")


def frozen_cluster(tmp: Path) -> Cluster:
    """Three nodes on static peers, as the rolling restart's, with a short --exchange-timeout; mixing with all."""
    c = Cluster(tmp, 3, min_peers=2, peer_wait=120.0)
    for args in c.args:
        args[args.index("--exchange-timeout") + 1] = str(EXCHANGE_TIMEOUT_S)
    for i in range(c.n):
        c.start(i)
    for node in c.nodes:
        node.serving()
    c.wait_all_mixing(0.0, STARTUP_S)
    return c


def freeze(node: NodeProcess, seconds: float) -> tuple[float, float]:
    """SIGSTOP ``node`` for ``seconds``, then SIGCONT; (when it stopped, when it went on), Unix time."""
    node.send(signal.SIGSTOP)
    stopped = time.time()
    try:
        time.sleep(seconds)
    finally:
        node.send(signal.SIGCONT)
    return stopped, time.time()


def check_freeze(c: Cluster, k: int, stopped: float, thawed: float) -> None:
    """What must hold once node k, frozen from ``stopped`` to ``thawed``, has mixed with every other node again and
    the cluster has stopped (so that every log is complete: a running node may log a round its peer has yet to)."""
    for i, node in enumerate(c.nodes):
        assert node.proc.returncode == 0, node.tail()
        errors = [r for r in node.records() if r["level"] in ("ERROR", "CRITICAL")]
        assert not errors, (i, errors)
        numbers = [r["round"] for r in c.rounds(i)]
        assert all(b > a for a, b in itertools.pairwise(numbers)), numbers  # each round once; a jump is a catch-up
    # The others dropped it and went on: no round of theirs waited longer than the deadline, and the time between
    # two rounds (a catch-up's probes) was not a handshake's timeout: the frozen node, whose check is under way,
    # is waited for there only briefly (it held the round loop 5 s, and the other two then missed a round).
    for i in set(range(c.n)) - {k}:
        during = [r for r in c.rounds(i) if stopped < r["time"] <= thawed]
        assert all(r["seconds"] < EXCHANGE_TIMEOUT_S + SLACK_S for r in during), (i, during)
        lines = [r for r in c.rounds(i) if r["time"] > stopped]
        between = [b["time"] - b["seconds"] - a["time"] for a, b in itertools.pairwise(lines)]
        assert max(between, default=0.0) < daemon.SUSPECT_ANSWER_S + SLACK_S, (i, max(between))
        if thawed - stopped > EXCHANGE_TIMEOUT_S + peers.HANDSHAKE_TIMEOUT_S + SLACK_S:
            c.nodes[i].wait_for(rf"^peer {c.ids[k]} dropped: ", 0)
            assert any(r["neighbours"] for r in during), (i, during)  # it went on mixing with the one left
    # A pair counts at both ends or neither, but for a commit whose answer was lost (its caller says so).
    mixed: dict[tuple[str, str], set[int]] = {}
    lost: set[tuple[str, str, int]] = set()
    for i, node in enumerate(c.nodes):
        for r in c.rounds(i):
            for x in r["neighbours"]:
                mixed.setdefault((c.ids[i], x["id"]), set()).add(r["round"])
        for rec in node.find(_COMMIT_LOST.pattern):
            m = _COMMIT_LOST.match(rec["message"])
            assert m is not None
            lost.add((m["peer"], c.ids[i], int(m["round"])))
    for a, b in itertools.permutations(c.ids, 2):
        for t in mixed.get((a, b), set()) - mixed.get((b, a), set()):
            assert (a, b, t) in lost, f"{a} mixed {b} in round {t}, and {b} did not mix {a}, with no log of why"


@pytest.mark.parametrize(
    "frozen_s",
    [
        pytest.param(3 * EXCHANGE_TIMEOUT_S, id="a-few-deadlines"),
        # Past the peers' backoff cap and the time after which a drop no longer counts as a flap.
        pytest.param(2 * peers.STABLE_S + peers.RETRY_MAX_S, id="minutes", marks=pytest.mark.slow),
    ],
)
@pytest.mark.timeout(120 + 3 * peers.STABLE_S)
def test_a_node_frozen_past_the_deadline_is_dropped_then_rejoins_after_its_thaw(
    tmp_path: Path, frozen_s: float
) -> None:
    """SIGSTOP the middle node (it calls one peer and is called by the other) for a few deadlines, or minutes: the
    others leave it out for one deadline and drop it when it does not answer their probe; after SIGCONT it does not
    crash or wedge, its cut exchanges end, it catches up and mixes with both again, and every log keeps each round
    once."""
    c = frozen_cluster(tmp_path)
    try:
        k = 1
        stopped, thawed = freeze(c.nodes[k], frozen_s)
        c.wait_all_mixing(thawed, REJOIN_S)
        back = c.mixed_with_all(k, thawed)
        assert back is not None
        log.info("n%d frozen %.1f s, mixing with all %.1f s after the thaw", k, thawed - stopped, back["time"] - thawed)
        c.nodes[k].wait_for(r"^catching up: adopting round ", 0)  # it fell behind: the others ran on
        assert all(node.proc.poll() is None for node in c.nodes)  # none crashed or stopped
    finally:
        c.stop_all()
    check_freeze(c, k, stopped, thawed)
