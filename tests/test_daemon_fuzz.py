"""A seeded differential test: daemons that lose no exchange end on exactly the simulator's factors.

One integer seed draws a scenario (`draw`): 2-4 nodes, a method, a link probability, 4-8 rounds, uneven speeds (a
delay per node and round), up to two clean stops (a node stopped before it trains round k, or whose run of k rounds
ends, restarted from its checkpoint once its peers have run on, or while they lag behind it) and in-memory or real
gRPC transport. The scenario stays inside what docs/protocol.md promises: no exchange is lost, because nobody calls
a node while it is down. Each peer is held before the first round in which its link to the stopped node is up (or
earlier, as the seed says); holds are events, not sleeps; the restart waits until every peer is where the holds
leave it (`Scenario.reach`), and the restarted node is verified by everyone before they go on. Exchange waits
stay under `WAIT_GAP_ROUNDS` (at most 8 rounds are run) and far under the exchange timeout. Then every node must
end on the simulator's factors, with each of its own rounds logged once, no neighbour missed and nothing logged as
an error; a step that does not finish within `STEP_S` fails as a stall, naming every node's round and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tadlora.core.topology import client_name, link_up
from tadlora.node.daemon import Node
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.peerspec import PeersOption
from tadlora.node.rounds import WAIT_GAP_ROUNDS
from test_daemon import TRAIN, _rounds, node_config, simulated

METHODS = ("tad", "lora", "rolora", "tad-nojoint", "ffa", "decaf", "adf")
ALTERNATING = ("tad", "tad-nojoint", "adf")  # the methods that take a switch interval T
DELAYS = (0.0, 0.0, 0.0, 0.02, 0.05, 0.1, 0.25)  # s of extra local-step time in a round: uneven speeds
STEP_S = 60.0  # s a scenario's step (a node reaching a hold, a restart, the last rounds) may take before it stalls
EXCHANGE_TIMEOUT_S = 120.0  # s: never the bound in these runs (every wait ends within a scenario's few seconds)

# The seeds of the default run, a few seconds each: two restarts of one node at p = 0.5 with persistent optimizer
# state, first at the end of a 1-round run while its peer is held behind it, then on a stop request (2); the end of
# a run and its resumption at p = 0.3 over gRPC (7); two stop requests at p = 0.5 on four nodes, one peer run two
# rounds ahead of the restarted node and another waiting for it (12).
QUICK_SEEDS = (2, 7, 12)
# The seeds of the slow run: 0:200, or TADLORA_FUZZ_SEEDS=FIRST:END for another range.
SLOW_SEEDS = range(*(int(x) for x in os.environ.get("TADLORA_FUZZ_SEEDS", "0:200").split(":")))


@dataclass(frozen=True)
class Restart:
    """Node ``node`` stops cleanly before training round ``at`` (it finished round at - 1) and is started again
    from its checkpoint once each peer has run up to round ``at + advance`` (behind it when negative) or to its
    first round with a link up to it. With ``ends_run`` the stop is the end of a run of ``at`` rounds (--rounds),
    else a stop requested while it waits to train round ``at``."""

    node: int
    at: int
    advance: int
    ends_run: bool = False


@dataclass(frozen=True)
class Scenario:
    seed: int
    m: int
    method: str
    interval: int | None
    link_prob: float
    rounds: int
    optimizer_state: str
    delays: tuple[tuple[float, ...], ...]  # [node][round], seconds
    restarts: tuple[Restart, ...]
    grpc: bool = False  # real gRPC on loopback (a restarted node's peers reconnect to it), else in memory

    @property
    def names(self) -> list[str]:
        return [client_name(i) for i in range(self.m)]

    def up(self, t: int, i: int, j: int) -> bool:
        return link_up(self.seed, t, client_name(i), client_name(j), self.link_prob)

    def holds(self, e: int) -> dict[int, int]:
        """Restart ``e``'s holds: node -> the round it may not train before the restart (its own stop included)."""
        r = self.restarts[e]
        held = {r.node: r.at}
        for j in range(self.m):
            if j != r.node:
                linked = [t for t in range(r.at, self.rounds) if self.up(t, j, r.node)]
                held[j] = max(0, min([r.at + r.advance, *linked[:1]]))
        return held

    def reach(self, phase: int) -> list[int]:
        """The round each node reaches while restarts ``phase``.. hold it, the ones before done: a node completes
        round t once every neighbour it has in round t is in round t and may train it (the exchange waits for the
        neighbour's snapshot, not for the neighbour's other exchanges)."""
        limit = [self.rounds] * self.m
        for e in range(phase, len(self.restarts)):
            for j, h in self.holds(e).items():
                limit[j] = min(limit[j], h)
        done = [0] * self.m  # rounds completed, in order
        moved = True
        while moved:
            moved = False
            for j in range(self.m):
                t = done[j]
                if t < limit[j] and all(
                    done[k] >= t and t < limit[k] for k in range(self.m) if k != j and self.up(t, j, k)
                ):
                    done[j], moved = t + 1, True
        return done


def draw(seed: int) -> Scenario:
    """The scenario of ``seed``: every choice comes from it, so a failing seed is a reproducible case."""
    rng = random.Random(seed)
    m = rng.choice((2, 3, 3, 4))
    method = rng.choice(METHODS)
    interval = rng.choice((1, 2, 3)) if method in ALTERNATING else None
    link_prob = rng.choice((1.0, 0.5, 0.5, 0.3))
    rounds = rng.randint(4, 8)
    optimizer_state = "fresh" if method == "decaf" or rng.random() < 0.5 else "persistent"
    slow = rng.randrange(m)
    delays = tuple(
        tuple(rng.choice(DELAYS) + (0.15 if i == slow and rng.random() < 0.5 else 0.0) for _ in range(rounds))
        for i in range(m)
    )
    base = Scenario(seed, m, method, interval, link_prob, rounds, optimizer_state, delays, ())
    restarts: list[Restart] = []
    for _ in range(rng.choice((0, 1, 1, 2, 2))):
        for _try in range(4):  # a stop its node can reach while the restarts before it hold the others
            # A negative advance holds peers behind the stopped node (slow ones), a positive one lets them run ahead.
            restart = Restart(rng.randrange(m), rng.randint(1, rounds - 1), rng.randint(-3, 5))
            candidate = dataclasses.replace(base, restarts=(*restarts, restart))
            if all(_feasible(candidate, e) for e in range(len(candidate.restarts))):
                restarts.append(restart)
                break
    grpc = rng.random() < 0.25
    ends_run = [rng.random() < 0.5 for _ in restarts]
    restarts = [dataclasses.replace(r, ends_run=end) for r, end in zip(restarts, ends_run, strict=True)]
    return dataclasses.replace(base, restarts=tuple(restarts), grpc=grpc)


def _feasible(s: Scenario, e: int) -> bool:
    """Whether restart ``e``'s node reaches its stop while the restarts ``e``.. hold the network."""
    r = s.restarts[e]
    return s.reach(e)[r.node] == r.at


class Gates:
    """Holds, as events: node i may not train round t while a restart in ``gates[(i, t)]`` is not released."""

    def __init__(self, s: Scenario) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], set[int]] = {}
        self._open: dict[tuple[int, int], threading.Event] = {}
        self.arrived: dict[tuple[int, int], threading.Event] = {}
        for e in range(len(s.restarts)):
            for j, h in s.holds(e).items():
                if h < s.rounds:
                    self._waiting.setdefault((j, h), set()).add(e)
                    self._open.setdefault((j, h), threading.Event())
                    self.arrived.setdefault((j, h), threading.Event())

    def release(self, e: int) -> None:
        with self._lock:
            for key, waiting in self._waiting.items():
                waiting.discard(e)
                if not waiting:
                    self._open[key].set()

    def wait(self, i: int, t: int, stopping: threading.Event) -> None:
        """In the worker thread: until (i, t) is released or the node is stopping (its steps then stop at once)."""
        gate = self._open.get((i, t))
        if gate is None:
            return
        self.arrived[(i, t)].set()
        while not gate.wait(0.02) and not stopping.is_set():
            pass


def instrument(node: Node, i: int, s: Scenario, gates: Gates) -> None:
    """Node ``i`` trains round t after its gate opens and its delay: a slower machine, held by events."""
    train = node._train

    def run(t: int) -> Any:  # in the worker thread
        gates.wait(i, t, node._stop_training)
        time.sleep(s.delays[i][t])
        return train(t)

    node._train = run  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def at_rounds(nodes: list[Node], want: dict[int, int]) -> Callable[[], bool]:
    """Whether each node ``j`` of ``want`` is in round ``want[j]``."""
    return lambda: all(nodes[j].round == t for j, t in want.items())


async def until(what: str, predicate: Callable[[], bool], describe: Callable[[], str]) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` and the network's state after `STEP_S`."""
    deadline = time.monotonic() + STEP_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"stalled waiting for {what}: {describe()}")
        await asyncio.sleep(0.02)


async def run_scenario(s: Scenario, tmp: Path) -> list[dict[str, torch.Tensor]]:
    """Run ``s`` on in-memory daemons; return each node's final factors."""
    net = None if s.grpc else InMemoryNetwork()
    addresses = (
        [f"127.0.0.1:{free_port()}" for _ in range(s.m)] if s.grpc else [f"10.0.0.{i + 1}:7070" for i in range(s.m)]
    )
    train = dataclasses.replace(TRAIN, optimizer_state=s.optimizer_state)

    def config(i: int, after: int) -> Any:
        """Node i's config for its run after restart ``after`` (-1: its first run)."""
        peers = PeersOption(auto=False, static=tuple(a for a in addresses if a != addresses[i]), dns=())
        stop = next((r for r in s.restarts[after + 1 :] if r.node == i), None)  # the one that ends this run
        rounds = stop.at if stop is not None and stop.ends_run else s.rounds
        return node_config(
            tmp, i, s.m, peers, method=s.method, switch_interval=s.interval, link_prob=s.link_prob, seed=s.seed,
            rounds=rounds, listen=addresses[i], train=train, exchange_timeout=EXCHANGE_TIMEOUT_S,
            checkpoint_every=2,
        )  # fmt: skip

    gates = Gates(s)
    nodes: list[Node] = []
    tasks: list[asyncio.Task[Any]] = []

    def describe() -> str:
        return ", ".join(
            f"{n.node_id} round {n.round} (last mixed {n.last_mixed_round}, {n._state}, peers "
            f"{sorted(n._peers.peers) if n._peers else []}, run {'done' if t.done() else 'running'})"
            for n, t in zip(nodes, tasks, strict=True)
        )

    async def start(i: int, after: int = -1) -> tuple[Node, asyncio.Task[Any]]:
        node = Node(config(i, after), net)
        await node.__aenter__()
        instrument(node, i, s, gates)
        return node, asyncio.ensure_future(node.run())

    async def stop(node: Node, task: Awaitable[Any]) -> None:
        node.request_stop()
        try:
            await task
        finally:
            await node.aclose()

    try:
        for i in range(s.m):
            node, task = await start(i)
            nodes.append(node)
            tasks.append(task)
        for e, r in enumerate(s.restarts):
            reach = s.reach(e)
            stopped = tasks[r.node].done if r.ends_run else gates.arrived[(r.node, r.at)].is_set
            await until(f"node-{r.node} to finish round {r.at - 1}", stopped, describe)
            await stop(nodes[r.node], tasks[r.node])
            want = {j: reach[j] for j in range(s.m) if j != r.node}
            await until(f"restart {e}'s holds ({reach})", at_rounds(nodes, want), describe)
            nodes[r.node], tasks[r.node] = await start(r.node, e)
            assert nodes[r.node].round == r.at  # resumed from the stop's checkpoint
            # Clean: everyone knows everyone again before anyone trains a round with a link up to it.
            await until(
                f"node-{r.node} verified both ways",
                lambda: all(n._peers is not None and len(n._peers.peers) == s.m - 1 for n in nodes),
                describe,
            )
            gates.release(e)
        await until("every node's last round", lambda: all(t.done() for t in tasks), describe)
        for task in tasks:
            task.result()
        return [n.factors for n in nodes]
    finally:
        for e in range(len(s.restarts)):
            gates.release(e)
        for node, task in zip(nodes, tasks, strict=True):
            with contextlib.suppress(Exception):
                await stop(node, task)


async def check(s: Scenario, tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Run ``s`` and check every node against the simulator, its round log and the errors logged."""
    with caplog.at_level(logging.INFO, logger="tadlora"):
        try:
            got = await run_scenario(s, tmp)
        except BaseException as exc:
            exc.add_note(f"scenario: {s}")
            raise
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, (s, errors)
    caught_up = [r.getMessage() for r in caplog.records if r.getMessage().startswith("catching up")]
    assert not caught_up, (s, caught_up)
    for i in range(s.m):
        records = _rounds(tmp / f"n{i}")
        assert [r["round"] for r in records] == list(range(s.rounds)), (s, i)  # each of its own rounds, once
        assert not any(r["missed"] for r in records), (s, i, [r["missed"] for r in records])
    train = dataclasses.replace(TRAIN, optimizer_state=s.optimizer_state)
    want = await asyncio.to_thread(simulated, s.m, s.method, s.interval, s.link_prob, s.rounds, "er", train, s.seed)
    for i in range(s.m):
        for key in want[i]:
            torch.testing.assert_close(got[i][key], want[i][key], atol=1e-5, rtol=1e-4, msg=f"{s}: node {i} {key}")


def test_the_drawn_scenarios_stay_inside_what_the_docs_promise() -> None:
    """Every restart of a drawn scenario is reachable, and holds leave no exchange waiting on a stopped node."""
    for seed in range(300):
        s = draw(seed)
        assert 2 <= s.m <= 4 and 4 <= s.rounds <= 8
        assert s.rounds <= WAIT_GAP_ROUNDS  # no node can be so far ahead of a neighbour that its call is refused
        for e, r in enumerate(s.restarts):
            assert _feasible(s, e)
            reach = s.reach(e)
            for j in range(s.m):  # no peer completes a round with a link up to the stopped node
                assert j == r.node or not any(s.up(t, j, r.node) for t in range(r.at, reach[j]))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "seed", [*QUICK_SEEDS, *(pytest.param(x, marks=pytest.mark.slow) for x in SLOW_SEEDS if x not in QUICK_SEEDS)]
)
async def test_daemons_that_lose_no_exchange_end_on_the_simulators_factors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    await check(draw(seed), tmp_path, caplog)


@pytest.mark.asyncio
async def test_a_node_restarted_while_one_peer_ran_ahead_and_another_waits_for_it_resumes_its_own_rounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Link seed 18, p = 0.3 (found by this harness): links node-0/node-2 in rounds 0, 1 and 3, node-1/node-2 in
    round 2, node-0/node-1 in round 5. node-0 stops after round 2 (it last mixed in round 1) and is restarted while
    node-1 has run on to round 5 (its next link to node-0) and node-2 waits in round 3 (its link to node-0). Nothing
    was lost: node-2 has yet to run round 3, and waits for node-0 there. node-0 took that link for one a peer had
    run without it, because node-1 had gone past round 3, and adopted node-1's round 5 and factors: node-2 waited
    for it in round 3 until its deadline, and both left the simulator's factors."""
    no_delays = ((0.0,) * 6,) * 3
    s = Scenario(18, 3, "lora", None, 0.3, 6, "fresh", no_delays, (Restart(node=0, at=3, advance=2),))
    assert s.reach(0) == [3, 5, 3]
    await check(s, tmp_path, caplog)
