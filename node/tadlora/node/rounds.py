"""A node's position in the shared schedule, and the rules its round loop and incoming exchanges meet by.

`RoundState` holds the round the node is in, the factors it started that round from, each round's post-training
snapshot and what neighbours delivered, under one `asyncio.Condition`. The daemon's round loop publishes a
snapshot (`open`), collects replies (`deliver`), closes the round and moves on (`advance`, or `adopt` after a
catch-up); a neighbour's exchange waits here for the snapshot it must be answered with (`answer`), and what it sent
is held aside until the neighbour commits the exchange (`commit`): the callee mixes a pair only once the caller has
taken its reply, so a reply lost on the way or refused by the caller leaves the pair out at both ends. Keeping these
transitions in one small object is what lets them be tested without a network, a model or a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from tadlora.core.factors import Factors
from tadlora.node.wire import ExchangeRefused, Payload, Reason

# A caller up to this many rounds ahead is kept waiting (within its deadline) while we run the rounds between; one
# further ahead is refused and we catch up by Fetch. Refusing at once left a node that had just caught up with a
# fast group two rounds behind it forever: the group never waited, and each catch-up landed behind again.
WAIT_GAP_ROUNDS = 8  # rounds

Delivery = tuple[int, Factors]  # (the neighbour's degree in the round, its factors)


@dataclass
class Round:
    """One round's shared state: published by the round loop, read and filled by both sides of each exchange."""

    t: int
    snapshot: Factors | None = None  # the factors after this round's training; None while training
    neighbours: frozenset[str] = frozenset()
    degree: int = 0
    received: dict[str, Delivery] = field(default_factory=dict)  # what this round mixes
    pending: dict[str, Delivery] = field(default_factory=dict)  # answered callers' factors, until they commit
    ahead: set[str] = field(default_factory=set)  # neighbours in a later (or far earlier) round: no call for t
    refused: set[str] = field(default_factory=set)  # callers whose round-t exchange we refused: no call either
    closed: bool = False
    stats: list[tuple[str, int, int, float]] = field(default_factory=list)  # (peer, sent, received, seconds)
    # The snapshot's factors as sent, encoded once for all of the round's exchanges (the daemon fills it in when
    # the first needs it, under ``encoding``); None until then, and again once the round is closed.
    payload: Payload | None = None
    encoding: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


class RoundState:
    """The round a node is in, the factors it started it from and its last mixing, for one node.

    ``stopping`` tells a waiting exchange to give up (the node is shutting down); call `notify` after it turns true.
    """

    def __init__(self, stopping: Callable[[], bool], t: int = 0, factors: Factors | None = None) -> None:
        self._stopping = stopping
        self._changed = asyncio.Condition()
        self.current = Round(t)
        self.factors: Factors = dict(factors or {})  # the start of round `current.t`
        self.last_mixed = 0  # 1 + the last round mixed with at least one neighbour; 0: never
        # A peer was seen two or more rounds away: the round loop should check whether to catch up.
        self.gap_seen = False

    @property
    def t(self) -> int:
        """The round the node is in (= rounds completed when idle)."""
        return self.current.t

    def restore(self, t: int, factors: Factors, last_mixed: int = 0) -> None:
        """Start from a checkpoint: round ``t`` from ``factors``, having last mixed in round ``last_mixed - 1``
        (before anything is served)."""
        self.current, self.factors, self.last_mixed = Round(t), dict(factors), last_mixed

    async def notify(self) -> None:
        """Wake every waiter to re-check its condition (a stop was requested, the peers changed)."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked whenever the state changes (bound it with a timeout)."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    # ------------------------------------------------------------------------------------- round loop

    async def open(self, snapshot: Factors, neighbours: frozenset[str]) -> Round:
        """Publish the current round's snapshot and neighbours: exchanges waiting for them are answered now."""
        async with self._changed:
            cur = self.current
            cur.snapshot, cur.neighbours, cur.degree = snapshot, neighbours, len(neighbours)
            self._changed.notify_all()
            return cur

    async def deliver(self, cur: Round, j: str, delivery: Delivery, stats: tuple[str, int, int, float]) -> bool:
        """Record neighbour ``j``'s reply to our call; False if the round closed meanwhile (then it is left out)."""
        async with self._changed:
            if cur.closed:
                return False
            cur.received[j] = delivery
            cur.stats.append(stats)
            self._changed.notify_all()
            return True

    async def close(self, cur: Round) -> dict[str, Delivery]:
        """End the exchanges of ``cur``: later callers and commits for it are refused, so both ends leave such a
        pair out (an answered exchange still uncommitted is left out too). Returns what arrived and counts."""
        async with self._changed:
            cur.closed = True
            cur.pending.clear()  # left out: a commit for a closed round is refused, so these factors are spent
            if cur.received:
                self.last_mixed = cur.t + 1
            return dict(cur.received)

    async def advance(self, mixed: Factors) -> None:
        """Move to the next round, starting from the ``mixed`` factors."""
        async with self._changed:
            self.factors = mixed
            self.current = Round(self.current.t + 1)
            self._changed.notify_all()

    async def adopt(self, t: int, factors: Factors, last_mixed: int) -> None:
        """Catch up: take a neighbour's round, the factors it starts it from and the mixing it reached."""
        async with self._changed:
            self.factors = factors
            self.current = Round(t)
            self.last_mixed = last_mixed
            self._changed.notify_all()

    # -------------------------------------------------------------------------------------- callee side

    async def refused(self, caller: str, r: int) -> None:
        """Note that ``caller``'s round-``r`` exchange was refused here (its payload, its size, a fault): the caller
        leaves the pair out on the refusal and will not call again for r, so the round loop need not wait for it."""
        async with self._changed:
            cur = self.current
            if r == cur.t and not cur.closed and caller not in cur.received:
                cur.pending.pop(caller, None)
                cur.refused.add(caller)
                self._changed.notify_all()

    async def note_round(self, peer: str, r: int) -> None:
        """``peer`` said (in a handshake) that it is in round ``r``: past the current round, it will not call for
        this one, so the round loop need not wait for it. One behind, however far, may still reach this round and
        call (a node restarted from its checkpoint runs its rounds up to its peers'), and is waited for."""
        async with self._changed:
            cur = self.current
            if r > cur.t and not cur.closed:
                cur.ahead.add(peer)
                self._changed.notify_all()

    async def commit(self, caller: str, r: int, accept: bool) -> None:
        """End ``caller``'s answered round-``r`` exchange: with ``accept`` its factors count in round r, else (the
        caller refused our reply) the pair is left out and the round stops waiting for it. Raises ROUND_MISMATCH
        when there is nothing to commit: round r is over here (closed: the pair was left out at its deadline) or
        no exchange of ``caller``'s awaits a commit in it; the caller then leaves the pair out too. SHUTTING_DOWN
        once the node is stopping: its round loop then ends the open round with the pairs committed before the
        stop, and this refusal is what keeps that set final (a commit accepted after `close` would count at the
        caller only)."""
        async with self._changed:
            if self._stopping():
                raise ExchangeRefused(Reason.SHUTTING_DOWN, "node is stopping")
            cur = self.current
            if r != cur.t or cur.closed:
                raise ExchangeRefused(Reason.ROUND_MISMATCH, f"round {r} is over here (at round {cur.t})")
            delivery = cur.pending.pop(caller, None)
            if delivery is None:
                raise ExchangeRefused(Reason.ROUND_MISMATCH, f"no exchange of {caller}'s awaits a commit in round {r}")
            if accept:
                cur.received[caller] = delivery
            else:
                cur.refused.add(caller)
            self._changed.notify_all()

    async def admit(self, caller: str, r: int) -> None:
        """Refuse at once, as `answer` would, a round-``r`` exchange from ``caller`` that no wait can make
        acceptable: round r over here or too far ahead, the node stopping, and, once round r's snapshot is
        published, a caller that is not a neighbour in it or has already exchanged in it. Notes the caller's round
        as `answer` does. Called with the header, before the payload is read, so a refused exchange costs no memory.
        """
        async with self._changed:
            cur = self._place(caller, r)
            if r == cur.t and cur.snapshot is not None:
                self._check_pair(cur, caller, r)

    async def answer(self, caller: str, r: int, degree: int, factors: Factors) -> Round:
        """A neighbour's round-``r`` exchange: wait for our round-r snapshot, then hold what it sent aside until
        the caller's `commit`, and return the round, whose snapshot answers it (the caller's deadline cancels the
        wait). ``degree`` and ``factors`` must already be checked fit to mix: the check is too slow to hold the lock
        for (the daemon runs it in a thread before calling).

        Refused with ROUND_MISMATCH when round r is over here or ``caller`` is more than `WAIT_GAP_ROUNDS` ahead,
        NOT_A_NEIGHBOR when its link is down in round r, SHUTTING_DOWN when the node stops. A caller two or more
        rounds behind us, or more than `WAIT_GAP_ROUNDS` ahead, sets `gap_seen`; one ahead by less is waited
        for, not caught up with.
        """
        async with self._changed:
            while True:
                cur = self._place(caller, r)
                if r == cur.t and cur.snapshot is not None:
                    break
                await self._changed.wait()
            self._check_pair(cur, caller, r)
            cur.pending[caller] = (degree, factors)
            return cur

    def _place(self, caller: str, r: int) -> Round:
        """With the lock held: the current round, after refusing a round-``r`` exchange that can never be answered
        and noting a caller in another round (it will not call us for ours)."""
        if self._stopping():
            raise ExchangeRefused(Reason.SHUTTING_DOWN, "node is stopping")
        cur = self.current
        if r < cur.t - 1:
            # The caller is far behind: it will not reach this round in time, so stop waiting for it,
            # and check at the next round whether one of us should catch up (we may have run alone).
            cur.ahead.add(caller)
            self._changed.notify_all()
            self.gap_seen = True
        if r < cur.t or (r == cur.t and cur.closed):
            raise ExchangeRefused(Reason.ROUND_MISMATCH, f"round {r} is over here (at round {cur.t})")
        if r > cur.t:
            # The caller has left round cur.t behind, so it will not call us for it: stop waiting for it.
            cur.ahead.add(caller)
            self._changed.notify_all()
        if r > cur.t + WAIT_GAP_ROUNDS:
            self.gap_seen = True
            raise ExchangeRefused(Reason.ROUND_MISMATCH, f"this node is behind (round {cur.t} < {r})")
        return cur

    @staticmethod
    def _check_pair(cur: Round, caller: str, r: int) -> None:
        """Refuse a caller that is not a neighbour in the published round ``cur`` or has exchanged in it already."""
        if caller not in cur.neighbours:
            raise ExchangeRefused(Reason.NOT_A_NEIGHBOR, f"{caller} is not a neighbour in round {r}")
        if caller in cur.received or caller in cur.pending:
            raise ExchangeRefused(Reason.ROUND_MISMATCH, f"already exchanged with {caller} in round {r}")
