"""The round rules a node's loop and its neighbours' exchanges meet by (tadlora.node.rounds), without a network."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from tadlora.core.factors import Factors
from tadlora.node.rounds import WAIT_GAP_ROUNDS, RoundState
from tadlora.node.wire import ExchangeRefused, Reason


def fac(v: float) -> Factors:
    return {"m.lora_B.weight": torch.full((2, 2), v)}


async def refused(coro: object) -> Reason:
    with pytest.raises(ExchangeRefused) as info:
        await coro  # type: ignore[misc]
    return info.value.reason


def state(t: int = 0, stopping: list[bool] | None = None) -> RoundState:
    flag = stopping if stopping is not None else [False]
    return RoundState(stopping=lambda: flag[0], t=t, factors=fac(0.0))


@pytest.mark.asyncio
async def test_a_caller_waits_for_the_snapshot_and_gets_it() -> None:
    rs = state()
    call = asyncio.ensure_future(rs.answer("b", 0, 1, fac(2.0)))
    await asyncio.sleep(0.01)
    assert not call.done()  # we are still training: the caller waits
    cur = await rs.open(fac(1.0), frozenset({"b"}))
    answered = await call  # the round, whose snapshot answers the caller
    assert answered is cur and torch.equal(answered.snapshot["m.lora_B.weight"], fac(1.0)["m.lora_B.weight"])
    assert cur.received == {} and set(cur.pending) == {"b"}  # answered: held aside until b commits
    await rs.commit("b", 0, accept=True)
    assert set(cur.received) == {"b"} and cur.received["b"][0] == 1 and cur.pending == {}
    assert await rs.close(cur) == cur.received and rs.last_mixed == 1
    await rs.advance(fac(1.5))
    assert rs.t == 1 and torch.equal(rs.factors["m.lora_B.weight"], fac(1.5)["m.lora_B.weight"])


@pytest.mark.asyncio
async def test_a_caller_a_few_rounds_ahead_waits_until_we_get_there() -> None:
    rs = state()
    call = asyncio.ensure_future(rs.answer("b", 2, 1, fac(2.0)))
    for _ in range(2):
        await asyncio.sleep(0.01)  # the waiting caller re-checks the new round
        assert "b" in rs.current.ahead  # it will not call us for this round: the loop stops waiting for it
        cur = await rs.open(fac(0.0), frozenset({"b"}))
        assert await rs.close(cur) == {} and rs.last_mixed == 0
        await rs.advance(fac(0.0))
    assert not call.done()
    cur = await rs.open(fac(3.0), frozenset({"b"}))
    assert (await call).snapshot["m.lora_B.weight"][0, 0] == 3.0 and "b" in cur.pending
    assert not rs.gap_seen


@pytest.mark.asyncio
async def test_a_caller_too_far_ahead_is_refused_and_we_look_for_a_catch_up() -> None:
    rs = state()
    assert await refused(rs.answer("b", WAIT_GAP_ROUNDS + 1, 1, fac(1.0))) is Reason.ROUND_MISMATCH
    assert rs.gap_seen


@pytest.mark.asyncio
async def test_a_closed_or_past_round_is_refused() -> None:
    rs = state(t=5)
    cur = await rs.open(fac(0.0), frozenset({"b", "c"}))
    await rs.close(cur)
    assert await refused(rs.answer("b", 5, 1, fac(1.0))) is Reason.ROUND_MISMATCH  # closed
    assert not await rs.deliver(cur, "c", (1, fac(1.0)), ("c", 0, 0, 0.0))  # a late reply is left out too
    assert cur.received == {}
    await rs.advance(fac(0.0))
    assert await refused(rs.answer("b", 5, 1, fac(1.0))) is Reason.ROUND_MISMATCH  # over
    assert not rs.gap_seen
    assert await refused(rs.answer("b", 3, 1, fac(1.0))) is Reason.ROUND_MISMATCH  # far behind
    assert rs.gap_seen and "b" in rs.current.ahead


@pytest.mark.asyncio
async def test_only_a_neighbour_of_this_round_is_mixed_and_only_once() -> None:
    rs = state()
    cur = await rs.open(fac(0.0), frozenset({"b", "c"}))
    assert await refused(rs.answer("x", 0, 1, fac(1.0))) is Reason.NOT_A_NEIGHBOR
    await rs.answer("b", 0, 1, fac(1.0))
    assert await refused(rs.answer("b", 0, 1, fac(1.0))) is Reason.ROUND_MISMATCH  # twice, before its commit
    await rs.commit("b", 0, accept=True)
    assert await refused(rs.answer("b", 0, 1, fac(1.0))) is Reason.ROUND_MISMATCH  # and after
    assert set(cur.received) == {"b"}


@pytest.mark.asyncio
async def test_an_answered_pair_counts_only_once_committed_in_its_open_round() -> None:
    """A reply lost on the way, or refused by the caller, must leave the pair out at this end too: the caller leaves
    it out, and mixing it here alone would move the network average."""
    rs = state()
    cur = await rs.open(fac(0.0), frozenset({"b", "c", "d"}))
    for caller in ("b", "c", "d"):
        await rs.answer(caller, 0, 1, fac(1.0))
    waiting = asyncio.ensure_future(rs.wait_until(lambda: {"b", "c", "d"} <= set(cur.received) | cur.refused))
    await rs.commit("b", 0, accept=True)
    await rs.commit("c", 0, accept=False)  # c refused our reply: it leaves the pair out, and so do we, at once
    assert "c" in cur.refused and "c" not in cur.received
    await asyncio.sleep(0.01)
    assert not waiting.done()  # d answered but has not committed (its reply may be on the way): the round waits
    assert await refused(rs.commit("x", 0, accept=True)) is Reason.ROUND_MISMATCH  # nothing of x's to commit
    assert await refused(rs.commit("b", 0, accept=True)) is Reason.ROUND_MISMATCH  # committed already
    assert set(await rs.close(cur)) == {"b"}  # d never committed: left out, as d leaves it out
    assert cur.pending == {}  # and its factors, which nothing can commit now, are let go of
    waiting.cancel()
    assert await refused(rs.commit("d", 0, accept=True)) is Reason.ROUND_MISMATCH  # too late: d leaves it out too
    assert set(cur.received) == {"b"}
    await rs.advance(fac(0.0))
    assert await refused(rs.commit("d", 0, accept=True)) is Reason.ROUND_MISMATCH  # and in the next round


@pytest.mark.asyncio
async def test_a_refused_exchange_drops_the_pair_it_had_answered() -> None:
    rs = state()
    cur = await rs.open(fac(0.0), frozenset({"b"}))
    await rs.answer("b", 0, 1, fac(1.0))
    await rs.refused("b", 0)  # e.g. our reply could not be sent
    assert cur.pending == {} and "b" in cur.refused
    assert await refused(rs.commit("b", 0, accept=True)) is Reason.ROUND_MISMATCH


@pytest.mark.asyncio
async def test_a_stop_releases_waiting_callers() -> None:
    flag = [False]
    rs = state(stopping=flag)
    call = asyncio.ensure_future(rs.answer("b", 1, 1, fac(1.0)))
    await asyncio.sleep(0.01)
    flag[0] = True
    await rs.notify()
    assert await refused(call) is Reason.SHUTTING_DOWN


@pytest.mark.asyncio
async def test_a_commit_that_comes_once_the_node_is_stopping_is_refused() -> None:
    """A stopping node ends its open round with the pairs committed before the stop; a commit answered "committed"
    after that would have the caller mix a pair that this end never mixes."""
    flag = [False]
    rs = state(stopping=flag)
    cur = await rs.open(fac(0.0), frozenset({"b"}))
    await rs.answer("b", 0, 1, fac(1.0))
    flag[0] = True
    await rs.notify()
    assert await refused(rs.commit("b", 0, accept=True)) is Reason.SHUTTING_DOWN
    assert cur.received == {}


@pytest.mark.asyncio
async def test_adopting_a_neighbours_state_moves_round_factors_and_mixing_together() -> None:
    rs = state(t=1)
    waiter = asyncio.ensure_future(rs.wait_until(lambda: rs.t >= 7))
    await rs.adopt(7, fac(4.0), last_mixed=7)
    await asyncio.wait_for(waiter, 1)
    assert (rs.t, rs.last_mixed, rs.factors["m.lora_B.weight"][0, 0].item()) == (7, 7, 4.0)


@pytest.mark.asyncio
async def test_a_caller_8_rounds_ahead_waits_and_one_9_ahead_is_refused_as_the_protocol_documents() -> None:
    """docs/protocol.md: an exchange more than 8 rounds ahead is refused ROUND_MISMATCH; up to 8 it waits. Literal
    numbers: the tests above count from `WAIT_GAP_ROUNDS`, so they pass whatever the window is."""
    rs = state()
    await rs.admit("b", 8)
    call = asyncio.ensure_future(rs.answer("b", 8, 1, fac(1.0)))
    await asyncio.sleep(0.01)
    assert not call.done() and not rs.gap_seen and "b" in rs.current.ahead
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    assert await refused(rs.admit("c", 9)) is Reason.ROUND_MISMATCH
    assert await refused(rs.answer("c", 9, 1, fac(1.0))) is Reason.ROUND_MISMATCH
    assert rs.gap_seen


@pytest.mark.asyncio
async def test_a_caller_two_rounds_behind_sets_gap_seen_and_one_round_behind_does_not() -> None:
    """Two or more rounds behind, a caller will not reach our round in time: we stop waiting for it and look for a
    catch-up (`gap_seen`). One behind is the ordinary race at a round's end."""
    rs = state(t=5)
    assert await refused(rs.answer("b", 4, 1, fac(1.0))) is Reason.ROUND_MISMATCH
    assert not rs.gap_seen and "b" not in rs.current.ahead
    assert await refused(rs.answer("b", 3, 1, fac(1.0))) is Reason.ROUND_MISMATCH
    assert rs.gap_seen and "b" in rs.current.ahead


@pytest.mark.asyncio
async def test_a_delivered_reply_counts_in_its_round_with_its_stats_for_the_round_log() -> None:
    rs = state()
    cur = await rs.open(fac(0.0), frozenset({"b"}))
    assert await rs.deliver(cur, "b", (3, fac(1.0)), ("b", 10, 20, 0.5))
    assert cur.received["b"][0] == 3 and cur.stats == [("b", 10, 20, 0.5)]


@pytest.mark.asyncio
async def test_a_refusal_for_another_round_leaves_the_current_round_waiting_for_the_caller() -> None:
    """A caller one round behind may still reach this round and call: refusing its exchange for the round it is in
    says nothing of ours."""
    rs = state(t=5)
    cur = await rs.open(fac(0.0), frozenset({"b"}))
    await rs.refused("b", 4)
    await rs.refused("b", 6)
    assert cur.refused == set()


@pytest.mark.asyncio
async def test_only_a_peer_past_the_current_round_is_noted_as_ahead() -> None:
    rs = state(t=5)
    cur = await rs.open(fac(0.0), frozenset({"b", "c", "d"}))
    await rs.note_round("b", 5)  # in our round: it will call for it
    await rs.note_round("c", 4)  # behind: it may still reach our round and call
    await rs.note_round("d", 6)  # one ahead: it left our round behind
    assert cur.ahead == {"d"}


@pytest.mark.asyncio
async def test_a_commit_naming_another_round_commits_nothing() -> None:
    """The caller's answered exchange is held for the round it was answered in; a commit for any other round is
    refused and leaves it uncommitted."""
    rs = state(t=1)
    cur = await rs.open(fac(0.0), frozenset({"b"}))
    await rs.answer("b", 1, 1, fac(1.0))
    assert await refused(rs.commit("b", 0, accept=True)) is Reason.ROUND_MISMATCH
    assert await refused(rs.commit("b", 2, accept=True)) is Reason.ROUND_MISMATCH
    assert cur.received == {} and set(cur.pending) == {"b"}


@pytest.mark.asyncio
async def test_a_commit_wakes_the_round_loop_waiting_for_its_pair() -> None:
    rs = state()
    cur = await rs.open(fac(0.0), frozenset({"b", "c"}))
    await rs.answer("b", 0, 1, fac(1.0))
    await rs.answer("c", 0, 1, fac(1.0))
    accepted = asyncio.ensure_future(rs.wait_until(lambda: "b" in cur.received))
    rejected = asyncio.ensure_future(rs.wait_until(lambda: "c" in cur.refused))
    await asyncio.sleep(0.01)
    await rs.commit("b", 0, accept=True)
    await asyncio.wait_for(accepted, 1)
    await rs.commit("c", 0, accept=False)
    await asyncio.wait_for(rejected, 1)


@pytest.mark.asyncio
async def test_admitting_a_header_refuses_a_non_neighbour_or_a_repeat_once_the_round_is_published() -> None:
    """`admit` runs before the payload is read: what `answer` would refuse for the pair is refused here already,
    so that a refused exchange costs this node no memory."""
    rs = state()
    await rs.admit("b", 0)  # before the snapshot the neighbours are not known yet: nothing to refuse
    await rs.admit("x", 0)
    await rs.open(fac(0.0), frozenset({"b"}))
    await rs.admit("b", 0)
    assert await refused(rs.admit("x", 0)) is Reason.NOT_A_NEIGHBOR
    await rs.answer("b", 0, 1, fac(1.0))
    assert await refused(rs.admit("b", 0)) is Reason.ROUND_MISMATCH


@pytest.mark.asyncio
async def test_a_published_round_has_as_degree_its_number_of_neighbours() -> None:
    rs = state()
    cur = await rs.open(fac(0.0), frozenset({"b", "c", "d"}))
    assert cur.degree == 3


def test_a_restore_takes_the_checkpoints_round_factors_and_last_mixing() -> None:
    rs = state()
    rs.restore(4, fac(2.0), last_mixed=3)
    assert (rs.t, rs.last_mixed, rs.factors["m.lora_B.weight"][0, 0].item()) == (4, 3, 2.0)
