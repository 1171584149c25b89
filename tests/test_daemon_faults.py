"""The daemon against faults around its exchanges and its disk: a peer whose connection is replaced mid-call, a
peer that lies about its mixing or its round, an exchange that fails inside this node, a stop while a peer hangs,
an export or a run cut short, a close that fails midway, a cancellation that comes with a peer change, a payload
refused. One real node (tiny model) on the in-memory network, with a scripted peer (or a second node) beside it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import zeroconf

from tadlora.adapter import AdapterModel
from tadlora.node import daemon, state
from tadlora.node import peers as peers_module
from tadlora.node.daemon import Node
from tadlora.node.discovery import Advertisement
from tadlora.node.memory_transport import InMemoryClient, InMemoryNetwork
from tadlora.node.peers import DropCause, PeerManager
from tadlora.node.peerspec import PeersOption, parse_peers_option
from tadlora.node.rpc import ExchangeHeader, PeerInfo, PeerTimeout, PeerUnavailable, StatusInfo
from tadlora.node.wire import FactorSpec
from test_daemon import NO_PEERS, TRAIN, _rounds, node_config

PEER_ID = "node-9"  # sorts after the node's own id ("node-0"), so the node calls it


@contextlib.asynccontextmanager
async def lone_node(tmp: Path, net: InMemoryNetwork, **changes: Any) -> AsyncIterator[Node]:
    """node-0, started on ``net``, with no peers of its own and no wait for any."""
    async with Node(node_config(tmp, 0, 2, NO_PEERS, min_peers=0, **changes), net) as node:
        yield node


class ScriptedPeer:
    """A `NodeHandler` compatible with ``node``: it says what ``info`` says, echoes exchanges, and answers a
    fetch with ``fetch_round`` and the node's own factors."""

    def __init__(self, node: Node, *, round: int = 0, last_mixed_round: int = 0, fetch_round: int = 0) -> None:
        self.info = PeerInfo(
            node_id=PEER_ID, cluster=node.config.cluster, fingerprint=node.fingerprint, address="", round=round,
            degree=1, method=node.method.name, last_mixed_round=last_mixed_round, schedule=node.schedule,
        )  # fmt: skip
        self.factors = dict(node.factors)
        self.fetch_round = fetch_round

    def local_info(self) -> PeerInfo:
        return self.info

    def expected_spec(self) -> FactorSpec | None:
        return None

    def status(self) -> StatusInfo:
        return StatusInfo(node=self.info)

    async def async_handshake(self, remote: PeerInfo) -> None:
        pass

    async def async_exchange(self, header: ExchangeHeader, factors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return factors

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, dict[str, Any]]:
        return self.fetch_round, self.factors


class SilentPeer(ScriptedPeer):
    """A `ScriptedPeer` that takes exchanges and fetches and never answers them (its process hangs); ``called`` is
    set once one arrives."""

    def __init__(self, node: Node, **kwargs: int) -> None:
        super().__init__(node, **kwargs)
        self.called = asyncio.Event()

    async def async_exchange(self, header: ExchangeHeader, factors: dict[str, torch.Tensor]) -> dict[str, Any]:
        self.called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, dict[str, Any]]:
        self.called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def scripted_peer(
    node: Node, net: InMemoryNetwork, kind: type[ScriptedPeer] = ScriptedPeer, **kwargs: int
) -> AsyncIterator[ScriptedPeer]:
    """A ``kind`` of `ScriptedPeer` served on ``net`` and made a verified peer of ``node``."""
    peer = kind(node, **kwargs)
    async with net.serve(peer, "10.0.0.9:0") as server:
        peer.info = dataclasses.replace(peer.info, address=server.address)
        assert node._peers is not None
        await node._peers.add(peer.info, None, "static")
        yield peer


@contextlib.asynccontextmanager
async def calling_peer(node: Node, net: InMemoryNetwork, peer: ScriptedPeer) -> AsyncIterator[Any]:
    """``peer`` served as node-0, which sorts first and so is the end that calls ``node`` (node-1), made a verified
    peer of it; yields its server (close it to stop the peer without a word)."""
    peer.info = dataclasses.replace(peer.info, node_id="node-0")
    async with net.serve(peer, "10.0.0.9:0") as server:
        peer.info = dataclasses.replace(peer.info, address=server.address)
        assert node._peers is not None
        await node._peers.add(peer.info, None, "static")
        assert peer.info.node_id < node.node_id
        yield server


class HangingConnection:
    """A connection whose exchange waits until the connection is closed, then fails as a closed one does."""

    address = "10.0.0.8:7070"

    def __init__(self) -> None:
        self.called, self.closed = asyncio.Event(), asyncio.Event()

    async def exchange(self, *args: Any, **kwargs: Any) -> Any:
        self.called.set()
        await self.closed.wait()
        raise PeerUnavailable(self.address, "connection closed")

    async def aclose(self) -> None:
        self.closed.set()


# ------------------------------------------------------------------------------------------------ peers


@pytest.mark.asyncio
async def test_an_exchange_cut_by_the_peer_moving_does_not_drop_its_new_connection(tmp_path: Path) -> None:
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net) as node:
        assert node._peers is not None
        at_old = PeerInfo(node_id=PEER_ID, cluster=node.config.cluster, fingerprint=node.fingerprint,
                          address=HangingConnection.address)  # fmt: skip
        conn = HangingConnection()
        await node._peers.add(at_old, conn, "static")  # type: ignore[arg-type]
        cur = await node.rounds.open(dict(node.factors), frozenset({PEER_ID}))
        call = asyncio.ensure_future(node._exchange_with(PEER_ID, cur, asyncio.get_running_loop().time() + 30))
        async with asyncio.timeout(30):
            await conn.called.wait()
            # It restarted at another address and handshook with us: the old connection closes under the call.
            await node._peers.add(dataclasses.replace(at_old, address="10.0.0.9:7070"), None, "inbound")
            await call
        assert node._peers.peers[PEER_ID].info.address == "10.0.0.9:7070"
        assert node._peers.retry_at(PEER_ID) is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "change",
    [{"fingerprint": "ffff"}, {"cluster": "another-cluster"}, {"schedule": "lora T=none p=1.0 max-neighbors=all"}],
    ids=["another-model", "another-cluster", "another-schedule"],
)
async def test_a_peer_that_restarted_incompatible_under_its_id_is_dropped_not_waited_for(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """A peer that came back with the same id but another model, cluster or schedule (and no mDNS goodbye reached
    us, or it is a static peer) refuses every exchange and handshake: it can no longer be a neighbour. Kept, it
    would stay in every round's neighbour set, and a round waits for a neighbour that never calls."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=1) as node, scripted_peer(node, net) as peer:
        assert node._peers is not None
        peer.info = dataclasses.replace(peer.info, **change)  # its new self; it refuses our handshakes
        async with asyncio.timeout(60):
            await node.run()  # misses it, then asks it whether it is alive
        async with asyncio.timeout(10):
            await node.async_wait_until(lambda: PEER_ID not in node._peers.peers)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------- catch-up


@pytest.mark.parametrize(
    ("peer_round", "peer_last_mixed", "restored", "leads"),
    [
        (12, 12, False, True),  # a group that kept mixing, far ahead of a late joiner (t 2, last mixed 3)
        (3, 3, False, False),  # one round ahead: an exchange waits for it instead
        (12, 4, False, False),  # far ahead but alone since about our last mixing: its solo rounds are not adopted
        (0, 12, False, True),  # far behind in rounds (a healed partition) but mixed later: the group's state
        (12, 4, True, True),  # restored from a checkpoint: one far ahead that mixed no earlier than us leads
        (12, 2, True, False),  # ... but not one that mixed before our checkpoint's last mixing
        (0, 3, True, False),  # ... nor one behind
    ],
)
def test_a_catch_up_follows_a_peer_far_away_that_mixed_later_or_one_far_ahead_of_a_restored_node(
    peer_round: int, peer_last_mixed: int, restored: bool, leads: bool
) -> None:
    """`daemon.is_catch_up_leader` on literal numbers, for a node in round 2 that last mixed in round 2 (3)."""
    assert daemon.is_catch_up_leader(peer_round, peer_last_mixed, 2, 3, restored=restored) is leads


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("last_mixed_round", "fetch_round", "adopted"),
    [(3, 3, True), (4, 3, True), (10**12, 3, False), (3, 10**9, False), (4, 1, False)],
    ids=[
        "sane",
        "closed-its-round-not-yet-in-the-next",
        "mixed-a-round-it-never-reached",
        "fetch-past-the-last-round",
        "fetch-before-its-mixing",
    ],
)
async def test_catch_up_never_adopts_a_state_no_node_can_be_in(
    tmp_path: Path, last_mixed_round: int, fetch_round: int, adopted: bool
) -> None:
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=5) as node,
        scripted_peer(node, net, round=3, last_mixed_round=last_mixed_round, fetch_round=fetch_round),
    ):
        async with asyncio.timeout(30):
            await node._catch_up_if_behind()
        if adopted:  # the start of round 3 holds mixing up to round 2 (last_mixed_round 3), whatever was claimed
            assert (node.round, node.last_mixed_round) == (3, 3)
        else:
            assert (node.round, node.last_mixed_round) == (0, 0)


@pytest.mark.asyncio
async def test_catch_up_fetches_over_the_leader_s_connection_of_now_not_the_one_before_its_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the catch-up probes ran, a scan moved the leader to a new address (its advert changed), closing the
    old connection. A fetch over that one failed, and the leader was not asked again for FETCH_RETRY_S."""
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=5) as node,
        scripted_peer(node, net, round=3, last_mixed_round=3, fetch_round=3) as leader,
        net.serve(leader, "10.0.0.10:0") as moved,
    ):
        assert node._peers is not None
        pm, real_probe = node._peers, PeerManager.probe

        async def probe_then_moved(self: PeerManager, node_id: str, why: str) -> PeerInfo | None:
            info = await real_probe(self, node_id, why)
            # As a scan does when the advert names a new address: a new entry, the old connection closed.
            await self.add(dataclasses.replace(leader.info, address=moved.address), None, "mdns")
            return info

        monkeypatch.setattr(PeerManager, "probe", probe_then_moved)
        async with asyncio.timeout(30):
            await node._catch_up_if_behind()
        assert pm.peers[PEER_ID].info.address == moved.address
        assert (node.round, node.last_mixed_round) == (3, 3)


@pytest.mark.asyncio
async def test_a_node_that_caught_up_reports_the_round_it_reached_as_completed(tmp_path: Path) -> None:
    """`Node.round` is the rounds completed when the node is idle; its status and its run's result say the same
    after a catch-up (here: to the group's last round, so the run ends there) as after a resume."""
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=3) as node,
        scripted_peer(node, net, round=3, last_mixed_round=3, fetch_round=3),
    ):
        async with asyncio.timeout(60):
            result = await node.run()
        assert node.round == 3
        assert (result.rounds_completed, node.status().rounds_completed) == (3, 3)
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == result.rounds_completed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("last_mixed", "mixed_here", "peer_round", "peer_last_mixed", "adopted"),
    [
        (3, False, 5, 3, True),  # restored, a peer two rounds ahead that mixed as late: followed
        (3, False, 5, 4, True),
        (3, False, 4, 3, False),  # one round ahead: an exchange waits for it
        (3, False, 9, 2, False),  # it mixed earlier than we did: its rounds since are solo
        (0, False, 9, 0, False),  # never mixed: a fresh node never takes a lone node's rounds for the group's
        (3, True, 9, 3, False),  # it mixed here: its state is its own rounds', not a checkpoint's
    ],
    ids=["same-mixing", "later-mixing", "one-ahead", "earlier-mixing", "fresh", "mixed-here"],
)
async def test_a_restored_node_follows_a_peer_ahead_of_it_that_mixed_no_earlier(
    tmp_path: Path, last_mixed: int, mixed_here: bool, peer_round: int, peer_last_mixed: int, adopted: bool
) -> None:
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=20) as node:
        node.rounds.restore(3, node.factors, last_mixed)  # as from a checkpoint at round 3 (`Node.start`)
        node._from_checkpoint = last_mixed > 0 and not mixed_here
        node._ran_a_round = mixed_here
        async with scripted_peer(node, net, round=peer_round, last_mixed_round=peer_last_mixed, fetch_round=peer_round):
            async with asyncio.timeout(30):
                await node._catch_up_if_behind()
        if adopted:
            assert (node.round, node.last_mixed_round) == (peer_round, peer_last_mixed)
        else:
            assert (node.round, node.last_mixed_round) == (3, last_mixed)


@pytest.mark.asyncio
@pytest.mark.parametrize("min_peers", [1, 0], ids=["waits-for-its-peer", "trains-alone-first"])
async def test_a_node_restarted_from_its_checkpoint_follows_a_peer_that_mixed_as_late_and_went_on(
    tmp_path: Path, min_peers: int
) -> None:
    """node-1 and node-0 mix every round; node-1 stops (its checkpoint: the round after, and that mixing) and
    node-0 trains alone 12 rounds further, its last mixing still the same as node-1's. Restarted, node-1 found no
    leader (none mixed two rounds later than it), and the two, too far apart for an exchange to wait, each trained
    alone for ever. Its checkpoint is older than the state of a peer that mixed as late and went on: it adopts
    that peer's round, and they mix again; also when it ran a round alone first (--min-peers 0), before it found
    that peer."""
    net = InMemoryNetwork()
    common: dict[str, Any] = {"rounds": None, "min_peers": 1, "checkpoint_every": 1, "exchange_timeout": 10.0}
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, **common), net) as ahead:
        ahead_run = asyncio.ensure_future(ahead.run())
        try:
            restarted_cfg = node_config(tmp_path, 1, 2, PeersOption(False, (ahead.address,), ()), **common)
            async with Node(restarted_cfg, net) as node:
                run = asyncio.ensure_future(node.run())
                try:
                    async with asyncio.timeout(60):
                        await node.async_wait_until(lambda: node.last_mixed_round >= 3)
                finally:
                    node.request_stop()
                    await run
            ckpt = state.load_checkpoint(tmp_path / "n1")
            assert ckpt is not None and ckpt.last_mixed >= 3
            stopped_at, logged = ckpt.round, len(_rounds(tmp_path / "n1"))
            async with asyncio.timeout(60):  # node-0 drops node-1 and trains alone, far out of an exchange's wait
                await ahead.async_wait_for_round(stopped_at + 12)
            assert ahead.last_mixed_round == ckpt.last_mixed  # neither is a leader for the other
            async with Node(dataclasses.replace(restarted_cfg, min_peers=min_peers), net) as node:
                assert (node.round, node.last_mixed_round) == (stopped_at, ckpt.last_mixed)
                run = asyncio.ensure_future(node.run())
                try:
                    async with asyncio.timeout(30):
                        await node.async_wait_until(lambda: node.last_mixed_round > stopped_at + 12)
                        await ahead.async_wait_until(lambda: ahead.last_mixed_round > stopped_at + 12)
                finally:
                    node.request_stop()
                    await run
        finally:
            ahead.request_stop()
            await ahead_run
    resumed = _rounds(tmp_path / "n1")[logged:]
    here = [r["round"] for r in resumed]
    adopted = next((i for i, r in enumerate(here) if r >= stopped_at + 12), None)  # it adopted node-0's round...
    assert adopted is not None, here
    # ...at once, or after the rounds it ran alone before it found node-0 (--min-peers 0)
    assert here[:adopted] == list(range(stopped_at, stopped_at + adopted)) and (min_peers == 0 or adopted == 0), here
    for log in (resumed, _rounds(tmp_path / "n0")):  # ...and the two mixed again
        assert any(r["round"] >= stopped_at + 12 and r["neighbours"] and not r["missed"] for r in log), log[-3:]


# ------------------------------------------------------------------------------------------- exchanges


@pytest.mark.asyncio
async def test_an_exchange_failing_inside_the_node_is_logged_counted_and_the_rounds_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=2) as node, scripted_peer(node, net):

        def broken(*args: Any) -> None:
            raise RuntimeError("injected fault")

        monkeypatch.setattr(node, "_check_neighbour", broken)  # runs on every reply the node gets
        with caplog.at_level(logging.ERROR, logger="tadlora.node"):
            async with asyncio.timeout(60):
                result = await node.run()
    assert result.rounds_completed == 2
    errors = [r for r in caplog.records if "failed inside this node" in r.getMessage()]
    assert [r.exc_info[1].args for r in errors if r.exc_info] == [("injected fault",)] * 2
    assert node.metrics.registry.get_sample_value("tadlora_exchanges_total", {"result": "error"}) == 2
    assert [r["missed"] for r in state.read_rounds(tmp_path / "n0")] == [[PEER_ID]] * 2  # the pair left out


@pytest.mark.asyncio
async def test_a_peer_whose_address_reaches_another_node_is_refused_not_mixed(tmp_path: Path) -> None:
    """A peer that announced an address where another node answers (0.0.0.0:PORT reaches the dialler's own host):
    the node calls it there, refuses the other node's reply (IDENTITY_MISMATCH) and mixes nothing."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=1) as node, scripted_peer(node, net) as other:
        elsewhere = dataclasses.replace(other.info, node_id="node-7")  # node-9 answers at node-7's address
        assert node._peers is not None
        await node._peers.add(elsewhere, None, "inbound")  # as a node-7 that called us would be added
        await node._peers.drop(PEER_ID, "only node-7 is meant to be a peer", cause="refused")
        assert list(node._peers.peers) == ["node-7"]
        async with asyncio.timeout(60):
            result = await node.run()
    assert result.rounds_completed == 1
    assert node.metrics.registry.get_sample_value("tadlora_refusals_total", {"reason": "IDENTITY_MISMATCH"}) == 1
    [record] = state.read_rounds(tmp_path / "n0")
    assert record["neighbours"] == [] and record["missed"] == ["node-7"]


# -------------------------------------------------------------------------------------------- stopping

STOP_S = 10.0  # s a stop may take here: a round's tiny-model checkpoint and export, on a loaded 2-core machine
SILENT_DEADLINE_S = 60.0  # s, the default --exchange-timeout and FETCH_TIMEOUT_S: what a stop must not wait out


@pytest.mark.asyncio
async def test_a_stop_during_an_exchange_with_a_silent_peer_does_not_wait_out_the_rounds_deadline(
    tmp_path: Path,
) -> None:
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=None, exchange_timeout=SILENT_DEADLINE_S) as node,
        scripted_peer(node, net, SilentPeer) as peer,
    ):
        run = asyncio.ensure_future(node.run())
        async with asyncio.timeout(30):
            await cast(SilentPeer, peer).called.wait()  # round 0's exchange with it is in flight
        node.request_stop()
        async with asyncio.timeout(STOP_S):
            result = await run
    # The round ends where the stop found it: trained, mixed with no one (the silent peer never answered).
    assert result.rounds_completed == 1
    [record] = _rounds(tmp_path / "n0")
    assert record["stopped"] is True and record["neighbours"] == [] and record["missed"] == [PEER_ID]
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 1


@pytest.mark.asyncio
async def test_a_stop_during_a_catch_up_from_a_silent_peer_does_not_wait_out_the_fetch(tmp_path: Path) -> None:
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=None) as node,
        scripted_peer(node, net, SilentPeer, round=10, last_mixed_round=10) as peer,
    ):
        run = asyncio.ensure_future(node.run())
        async with asyncio.timeout(30):
            await cast(SilentPeer, peer).called.wait()  # the node is behind it and fetching its state
        node.request_stop()
        async with asyncio.timeout(STOP_S):
            result = await run
    assert result.rounds_completed == 0 and node.round == 0
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 0


# --------------------------------------------------------------------------------------------- on disk


@pytest.mark.asyncio
async def test_an_export_that_fails_midway_leaves_the_previous_adapter_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with lone_node(tmp_path, InMemoryNetwork()) as node:
        await node._save(0, export=True)
        adapter = node.config.out / state.ADAPTER
        before = {p.name: p.read_bytes() for p in adapter.iterdir()}

        def disk_full(directory: Path, **_: object) -> Path:  # as `AdapterModel.export` (max_length=...)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "adapter_model.safetensors").write_bytes(b"torn")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(node._model, "export", disk_full)
        with pytest.raises(OSError, match="No space"):
            await node._save(0, export=True)
        assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
        assert not [p.name for p in node.config.out.iterdir() if p.name.startswith(".") and p.name != state.LOCK]


@pytest.mark.asyncio
async def test_an_export_the_disk_refuses_ends_the_run_with_an_os_error_naming_the_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors writes an export's weights in Rust and raises its own SafetensorError for a full disk, which the
    CLI (catching OSError) let through as a traceback, with no word of which file system was full."""
    import peft.peft_model
    from safetensors import SafetensorError

    def disk_full(tensors: object, filename: str, metadata: object = None) -> None:
        # safetensors 0.8's own words for it: it writes a temp file beside the target, then renames it
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28) at path "
            f'"{Path(filename).parent / ".tmpAbC123"}"'
        )

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    weights = tmp_path / "n0" / state.ADAPTER_NEW / "adapter_model.safetensors"
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=1) as node:
        with pytest.raises(OSError, match=re.escape(f"No space left on device: '{weights}'")) as failed:
            async with asyncio.timeout(60):
                await node.run()
    assert failed.value.errno == errno.ENOSPC
    ckpt = state.load_checkpoint(node.config.out)
    assert ckpt is not None and ckpt.round == 1  # written before the export: a restart resumes, and exports again
    assert not (node.config.out / state.ADAPTER_NEW).exists()


@pytest.mark.asyncio
@pytest.mark.parametrize("replaced", [False, True], ids=["removed", "replaced"])
async def test_a_node_whose_out_is_removed_or_replaced_while_it_runs_writes_nothing_there_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, replaced: bool
) -> None:
    """`rm -r OUT` under a running node: its next checkpoint silently made OUT again, holding that checkpoint alone
    (no node.json, no rounds.jsonl, no lock, so a second node could start there), and a restart resumed from it with
    its log begun anew. Replaced by another directory, OUT may be another node's by then."""
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=None, checkpoint_every=1) as node:
        out = node.config.out
        run = asyncio.ensure_future(node.run())
        try:
            async with asyncio.timeout(60):
                await node.async_wait_for_round(2)

            def remove() -> None:
                shutil.rmtree(out)
                if replaced:  # as by another node started there meanwhile, or a restore from a backup
                    out.mkdir()
                    (out / state.LOCK).write_text("4242\n")

            # In the node's worker, between two of its jobs: not while a checkpoint is being written there.
            await node._in_worker(remove)
            failures = node.metrics.registry.get_sample_value("tadlora_checkpoint_failures_total") or 0
            async with asyncio.timeout(60):
                await node.async_wait_for_round(node.round + 3)  # training goes on
            assert node.metrics.registry.get_sample_value("tadlora_checkpoint_failures_total") > failures
        finally:
            node.request_stop()
            with pytest.raises(OSError, match=re.escape(f"--out {out} was removed or replaced while this node ran")):
                await run  # the stop's checkpoint is refused too: exit 1, saying why
    if replaced:
        assert [p.name for p in out.iterdir()] == [state.LOCK]
    else:
        assert not out.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"--out {out} was removed or replaced" in message for message in errors)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose every write(2) fails with ENOSPC")
@pytest.mark.asyncio
async def test_a_node_stopped_by_a_full_disk_reports_the_file_it_could_not_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The round log's record the disk refused stays in its buffer, so closing the log fails on it again: that
    close's bare "[Errno 28] No space left on device" used to replace the run's error, which names the file."""
    out = tmp_path / "n0"
    out.mkdir()
    (out / state.ROUNDS).symlink_to("/dev/full")  # every write(2) fails with ENOSPC, as on a full disk
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{out / state.ROUNDS}'")) as failed:
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as node, asyncio.timeout(60):
            await node.run()
    assert failed.value.errno == errno.ENOSPC
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("while closing")]
    assert closing and str(out / state.ROUNDS) in closing[0]  # said too, and naming the file
    assert node._round_log is not None and node._round_log._file.closed  # closed even though its flush failed


@pytest.mark.asyncio
async def test_a_node_resumed_after_a_crash_logs_each_round_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=4, checkpoint_every=3) as node:
        save = node._save

        async def killed_before_the_final_save(next_round: int, export: bool) -> None:
            if not export:
                await save(next_round, export)

        # Checkpoint at round 3, round 3 runs and is logged, then the process dies (no final checkpoint).
        monkeypatch.setattr(node, "_save", killed_before_the_final_save)
        async with asyncio.timeout(60):
            await node.run()
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 3
    async with lone_node(tmp_path, net, rounds=4, checkpoint_every=3) as node:
        assert node.round == 3
        async with asyncio.timeout(60):
            await node.run()  # round 3 again
    assert [r["round"] for r in state.read_rounds(tmp_path / "n0")] == [0, 1, 2, 3]


@pytest.mark.asyncio
async def test_closing_runs_every_step_when_one_fails_and_then_raises_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = InMemoryNetwork()
    with pytest.raises(RuntimeError, match="goodbye lost"):
        async with lone_node(tmp_path, net) as node:
            assert node._peers is not None
            address = node.address

            async def failing_close() -> None:
                raise RuntimeError("goodbye lost")

            node._peers.aclose = failing_close  # type: ignore[method-assign]
    # the steps after the failing one ran: nobody is served at the address, and the worker thread is gone
    async with net.connect(address) as client:
        with pytest.raises(PeerUnavailable):
            await client.handshake(ScriptedPeer(node).info, timeout=5.0)
    assert node._executor._shutdown  # type: ignore[attr-defined]
    assert any("closing peer connections failed" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_a_stop_requested_after_close_leaves_no_task_that_no_one_owns(tmp_path: Path) -> None:
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net) as node:
        pass
    node.request_stop()  # a second signal's handler, say, after the node has closed
    assert not node._tasks, "a task spawned after aclose is never cancelled or awaited"


class FrozenPeer(ScriptedPeer):
    """A `ScriptedPeer` whose process is stopped (SIGSTOP, a suspended laptop): a handshake reaches it and is never
    answered."""

    async def async_handshake(self, remote: PeerInfo) -> None:
        await asyncio.Event().wait()


@pytest.mark.asyncio
@pytest.mark.parametrize("suspects", [{"node-8"}, {"node-8", "node-9"}], ids=["the-frozen-one", "all"])
async def test_a_catch_up_does_not_wait_out_a_handshake_timeout_for_a_peer_whose_check_is_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suspects: set[str]
) -> None:
    """A peer that missed a round is being checked (`_check_alive`) when the next round's catch-up asks the far
    peers their rounds. A frozen one answers neither question: the catch-up waited for it the handshake's whole
    timeout, holding the round loop, and a healthy neighbour's exchange in the next round ran into its deadline
    (a soak of 3 processes, one SIGSTOPped). Now the catch-up waits for such a peer briefly, follows the leader
    that answered, and leaves the frozen one to its own check (not dropped here). A suspect that does answer is
    still followed: a node that was itself frozen missed, and checks, all its peers. The handshake timeout is made
    10 min, so the old wait fails the test's bound instead of costing 5 s."""
    monkeypatch.setattr(peers_module, "HANDSHAKE_TIMEOUT_S", 600.0)
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=None) as node:
        leader = ScriptedPeer(node, round=3, last_mixed_round=3, fetch_round=3)
        frozen = FrozenPeer(node, round=2, last_mixed_round=0)
        frozen.info = dataclasses.replace(frozen.info, node_id="node-8")
        async with net.serve(leader, "10.0.0.9:0") as a, net.serve(frozen, "10.0.0.8:0") as b:
            assert node._peers is not None
            for peer, server in ((leader, a), (frozen, b)):
                peer.info = dataclasses.replace(peer.info, address=server.address)
                await node._peers.add(peer.info, None, "static")
            # Its check under way, as `_run_round` starts one for a neighbour it missed.
            node._probing.update(suspects)
            async with asyncio.timeout(30):
                await node._catch_up_if_behind()
            assert (node.round, node.last_mixed_round) == (3, 3)  # the leader followed
            assert set(node._peers.peers) == {"node-8", "node-9"}  # the frozen one is its check's to drop


@pytest.mark.asyncio
async def test_a_peer_whose_catch_up_fetch_failed_is_not_fetched_from_ahead_of_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon, "FETCH_TIMEOUT_S", 0.2)
    net = InMemoryNetwork()
    async with (
        lone_node(tmp_path, net, rounds=None) as node,
        scripted_peer(node, net, SilentPeer, round=10, last_mixed_round=10) as peer,
    ):
        fetches = 0
        hang = peer.async_fetch

        async def counted(remote: PeerInfo) -> tuple[int, dict[str, Any]]:
            nonlocal fetches
            fetches += 1
            return await hang(remote)

        peer.async_fetch = counted  # type: ignore[method-assign]
        async with asyncio.timeout(30):
            await node._catch_up_if_behind()  # ahead of round 0: it answers the handshake, then hangs on Fetch
            await node._catch_up_if_behind()  # ahead of round 1: the same again would cost another timeout
        assert fetches == 1 and node.round == 0
        node._fetch_failed = dict.fromkeys(node._fetch_failed, 0.0)  # its time is up: it is asked again
        async with asyncio.timeout(30):
            await node._catch_up_if_behind()
        assert fetches == 2


@pytest.mark.asyncio
async def test_a_neighbour_whose_exchange_was_refused_is_not_waited_for_until_the_deadline(tmp_path: Path) -> None:
    """node-1 refuses node-0's payload (over node-1's norm cap). node-0 leaves the pair out on the refusal and does
    not call again, so node-1 must close the round then, not wait out the exchange deadline (600 s here: the
    test's own bound of 120 s fails a node that waits). Both log the pair as missed; neither mixed."""
    net, slow = InMemoryNetwork(), {"rounds": 1, "exchange_timeout": 600.0}
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, **slow), net) as caller:
        strict = node_config(tmp_path, 1, 2, PeersOption(False, (caller.address,), ()), max_factor_norm=1e-6, **slow)
        async with Node(strict, net) as callee:
            assert caller.node_id < callee.node_id  # the caller is the end that calls
            async with asyncio.timeout(120):
                await asyncio.gather(caller.run(), callee.run())
    [called], [refused] = _rounds(tmp_path / "n0"), _rounds(tmp_path / "n1")
    assert (called["missed"], refused["missed"]) == ([callee.node_id], [caller.node_id])
    assert called["neighbours"] == refused["neighbours"] == []


@pytest.mark.asyncio
@pytest.mark.parametrize("gone", [True, False], ids=["stopped", "already-in-a-later-round"])
async def test_a_neighbour_that_should_call_and_does_not_is_asked_in_the_round_not_waited_for_until_the_deadline(
    tmp_path: Path, gone: bool
) -> None:
    """node-0 sorts first, so it is the end that calls node-1. Stopped without a goodbye (a static peer stopped
    or killed: nothing tells its callee), or alive but already past round 0 (it will not call for it), it was waited
    for the whole exchange deadline (600 s here; the test's own bound of 120 s fails a node that waits): at 16 nodes
    such waits pushed the cluster out of step for tens of seconds. node-1 asks it in the round instead, drops the
    stopped one and stops waiting for the one that is ahead, which stays a peer."""
    net = InMemoryNetwork()
    cfg = node_config(tmp_path, 1, 2, NO_PEERS, min_peers=0, rounds=1, exchange_timeout=600.0)
    async with Node(cfg, net) as node, calling_peer(node, net, ScriptedPeer(node, round=0 if gone else 5)) as server:
        if gone:
            await server.aclose()
        async with asyncio.timeout(120):
            await node.run()
        assert node._peers is not None and ("node-0" in node._peers.peers) is not gone
    [record] = _rounds(tmp_path / "n1")
    assert (record["neighbours"], record["missed"]) == ([], ["node-0"])


class SlowCaller(ScriptedPeer):
    """A `ScriptedPeer` that says it is in round 0 to every handshake and never calls: a neighbour whose local steps
    take longer than the round's exchanges have so far (a slower machine), alive and in step; ``asked`` counts the
    handshakes it was asked."""

    def __init__(self, node: Node) -> None:
        super().__init__(node, round=0)
        self.asked = 0

    async def async_handshake(self, remote: PeerInfo) -> None:
        self.asked += 1


class CatchingUpPeer(SlowCaller):
    """A `SlowCaller` that says round 0 to the first handshake it is asked and round 5 to every later one: a
    neighbour in the round, still training at the first question, that then skips the round by a catch-up (it adopts
    a later round from another peer) and never calls for it."""

    def local_info(self) -> PeerInfo:
        return dataclasses.replace(self.info, round=0 if self.asked <= 1 else 5)


@pytest.mark.asyncio
async def test_a_quiet_caller_that_skips_the_round_after_the_first_question_is_not_waited_for_until_the_deadline(
    tmp_path: Path,
) -> None:
    """node-0 calls node-1. Asked 2 s into the round, it is still in round 0 (training), so node-1 waits for it; then
    it jumps past round 0 by a catch-up, which nothing tells node-1. Asked only once, node-1 waited out the whole
    deadline (600 s here; the test's bound of 120 s fails it), and at 16 nodes those waits chained from neighbour to
    neighbour; it asks again every 2 s while the caller stays quiet, sees round 5 and stops waiting."""
    net = InMemoryNetwork()
    cfg = node_config(tmp_path, 1, 2, NO_PEERS, min_peers=0, rounds=1, exchange_timeout=600.0)
    async with Node(cfg, net) as node, calling_peer(node, net, peer := CatchingUpPeer(node)):
        async with asyncio.timeout(120):
            await node.run()
        assert node._peers is not None and "node-0" in node._peers.peers and peer.asked >= 2
    [record] = _rounds(tmp_path / "n1")
    assert (record["neighbours"], record["missed"]) == ([], ["node-0"])


@pytest.mark.asyncio
async def test_a_slow_caller_that_answers_is_asked_a_few_times_a_round_not_every_quiet_caller_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node-0 calls node-1 and is slow: it answers every question in round 0 and has not called by the deadline.
    Asked every `QUIET_CALLER_S`, each of its callees sent it deadline / 2 s handshakes a round (14 for steps of 30 s),
    for nothing: it was in step each time. The questions come after as long as the round has waited, up to
    `QUIET_CALLER_MAX_S`; it is asked again (a catch-up could still take it past the round), and not dropped."""
    first, longest, deadline = 0.05, 0.4, 4.0  # s: the constants shrunk (2 s, 16 s, a 160 s deadline)
    monkeypatch.setattr(daemon, "QUIET_CALLER_S", first)
    monkeypatch.setattr(daemon, "QUIET_CALLER_MAX_S", longest)
    net = InMemoryNetwork()
    cfg = node_config(tmp_path, 1, 2, NO_PEERS, min_peers=0, rounds=1, exchange_timeout=deadline)
    async with Node(cfg, net) as node, calling_peer(node, net, peer := SlowCaller(node)):
        async with asyncio.timeout(120):
            await node.run()
        assert node._peers is not None and "node-0" in node._peers.peers  # waited for, never dropped
    # At 0.05, 0.1, 0.2, 0.4, then every 0.4 s up to the deadline: 4 + 9. Every 0.05 s it was 80.
    assert 2 <= peer.asked <= 4 + deadline / longest, peer.asked
    [record] = _rounds(tmp_path / "n1")
    assert (record["neighbours"], record["missed"]) == ([], ["node-0"])


def test_a_handshake_from_a_neighbour_in_a_later_round_ends_the_wait_for_its_call_and_one_behind_does_not() -> None:
    """`RoundState.note_round`: a neighbour past the round will not call for it; one in it or behind, however far,
    may still (a node restarted from its checkpoint runs its rounds up to its peers': test_daemon_fuzz's restart
    scenarios fail if it is not waited for)."""
    from tadlora.node.rounds import RoundState

    async def main() -> None:
        rs = RoundState(lambda: False, t=10)
        for r in (0, 8, 9, 10):
            await rs.note_round(f"p{r}", r)
        assert rs.current.ahead == set()
        await rs.note_round("later", 11)
        assert rs.current.ahead == {"later"}

    asyncio.run(main())


@pytest.mark.asyncio
async def test_a_stop_during_the_exchange_mixes_the_pairs_already_committed_as_their_other_ends_did(
    tmp_path: Path,
) -> None:
    """node-1 has committed node-0's pair of round 0 (node-0 has mixed it) and is still waiting for a silent
    neighbour when it is stopped. Abandoning the round, as a stop used to, left the pair mixed at node-0 only,
    moving the network average; the round ends instead with that pair, and is checkpointed as done."""
    net = InMemoryNetwork()
    slow = {"exchange_timeout": 60.0, "rounds": None}
    async with (
        Node(node_config(tmp_path, 1, 2, NO_PEERS, min_peers=2, **slow), net) as callee,
        scripted_peer(callee, net, SilentPeer),
    ):
        caller_cfg = node_config(tmp_path, 0, 2, PeersOption(False, (callee.address,), ()), min_peers=1, **slow)
        async with Node(caller_cfg, net) as caller:
            runs = [asyncio.ensure_future(n.run()) for n in (callee, caller)]
            try:
                async with asyncio.timeout(60):
                    await callee.rounds.wait_until(lambda: "node-0" in callee.rounds.current.received)
                    callee.request_stop()
                    await runs[0]
                    await caller.rounds.wait_until(lambda: caller.rounds.t >= 1)
            finally:
                caller.request_stop()
                await asyncio.gather(*runs, return_exceptions=True)
    [stopped] = _rounds(tmp_path / "n1")
    assert stopped["round"] == 0 and stopped.get("stopped") is True
    assert [n["id"] for n in stopped["neighbours"]] == ["node-0"] and stopped["missed"] == [PEER_ID]
    first = _rounds(tmp_path / "n0")[0]
    assert [n["id"] for n in first["neighbours"]] == ["node-1"]
    assert first["neighbours"][0]["weight"] == stopped["neighbours"][0]["weight"] == pytest.approx(1 / 3)
    checkpoint = state.load_checkpoint(tmp_path / "n1")
    assert checkpoint is not None and checkpoint.round == 1  # resumes after the round it mixed


@pytest.mark.asyncio
async def test_an_exchange_whose_commit_never_arrives_is_left_out_at_both_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callee answered and the caller took the reply, but the caller's Commit is lost (its deadline passed, the
    link broke). The caller leaves the pair out; the callee must too: mixing it alone would move the network
    average by w_ij times the difference of the two snapshots. (Before Commit existed the callee mixed every pair
    it answered.)"""
    lost: list[int] = []

    async def lost_commit(self: Any, header: ExchangeHeader, accept: bool, timeout: float) -> None:
        lost.append(header.round)
        raise PeerTimeout(self.address, "no answer before the deadline")

    monkeypatch.setattr(InMemoryClient, "commit", lost_commit)
    net, quick = InMemoryNetwork(), {"rounds": 2, "exchange_timeout": 3.0}
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, **quick), net) as caller:
        callee_cfg = node_config(tmp_path, 1, 2, PeersOption(False, (caller.address,), ()), **quick)
        async with Node(callee_cfg, net) as callee:
            assert caller.node_id < callee.node_id  # the caller is the end that calls
            async with asyncio.timeout(120):
                await asyncio.gather(caller.run(), callee.run())
    assert lost  # the exchange itself went through: only its commit was lost
    for out, other in ((tmp_path / "n0", callee), (tmp_path / "n1", caller)):
        records = _rounds(out)
        assert [r["round"] for r in records] == [0, 1]  # the lost rounds among them
        for record in records:
            if record["round"] in lost:
                assert record["neighbours"] == [] and record["missed"] == [other.node_id], record


@pytest.mark.parametrize("ended_by", ["a stop", "the round's deadline"])
@pytest.mark.asyncio
async def test_a_commit_on_its_way_when_the_round_ends_is_seen_through_so_both_ends_count_the_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ended_by: str
) -> None:
    """The callee committed the pair (and mixes it), but the commit's answer was still on its way back when the
    caller's round ended: a stop (SIGTERM), or the round's deadline. The caller cancelled the call there and left
    the pair out, with nothing logged at either end: seen as "n2 mixed n1 in round 142, and n1 did not mix n2" in
    the freeze test (1 run in 5 on two busy cores). The commit is now seen through, bounded by its own timeout."""
    real_commit = InMemoryClient.commit
    committed = asyncio.Event()
    # s the answer takes to come back: past the round's 3 s deadline for the second (the transport's own clock,
    # which would say PeerTimeout, runs late: a busy loop)
    slow = {"a stop": 1.0, "the round's deadline": 3.5}[ended_by]

    async def answer_on_its_way(self: Any, header: ExchangeHeader, accept: bool, timeout: float) -> None:
        await real_commit(self, header, accept, timeout)  # the callee has committed
        if header.round == 1:
            committed.set()
            await asyncio.sleep(slow)

    monkeypatch.setattr(InMemoryClient, "commit", answer_on_its_way)
    net, quick = InMemoryNetwork(), {"exchange_timeout": 3.0, "checkpoint_every": 1000}
    rounds = 2 if ended_by == "a stop" else 3
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, rounds=None if ended_by == "a stop" else rounds,
                                **quick), net) as caller:  # fmt: skip
        callee_cfg = node_config(tmp_path, 1, 2, PeersOption(False, (caller.address,), ()), rounds=rounds, **quick)
        async with Node(callee_cfg, net) as callee:
            assert caller.node_id < callee.node_id  # the caller is the end that calls and commits

            async def stop_once_committed() -> None:
                await committed.wait()
                if ended_by == "a stop":
                    caller.request_stop()

            async with asyncio.timeout(120):
                await asyncio.gather(caller.run(), callee.run(), stop_once_committed())
    by_end = {n: {r["round"]: r for r in _rounds(tmp_path / n)} for n in ("n0", "n1")}
    assert [x["id"] for x in by_end["n1"][1]["neighbours"]] == [caller.node_id]  # the callee mixed it
    assert [x["id"] for x in by_end["n0"][1]["neighbours"]] == [callee.node_id], by_end["n0"][1]  # and the caller


@pytest.mark.asyncio
async def test_a_commit_that_times_out_with_the_round_s_time_nearly_spent_does_not_drop_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that arrives just before the deadline leaves its commit next to no time, and the commit times out.
    That says the round's time ran out, not that the peer is gone: it used to be dropped (re-handshaken, and missing
    the rounds until verified again). The pair is left out, at both ends."""
    real_exchange, real_commit = InMemoryClient.exchange, InMemoryClient.commit
    late: list[int] = []
    drops: list[str] = []

    async def answered_at_the_deadline(self: Any, header: ExchangeHeader, factors: Any, timeout: float, *a: Any) -> Any:
        result = await real_exchange(self, header, factors, timeout, *a)
        if header.round == 0:
            await asyncio.sleep(max(timeout - 0.3, 0.0))  # the reply took almost all of the round's time
        return result

    async def commit(self: Any, header: ExchangeHeader, accept: bool, timeout: float) -> None:
        if timeout < daemon.COMMIT_SLACK_S:
            late.append(header.round)
            raise PeerTimeout(self.address, "DEADLINE_EXCEEDED: no answer before the deadline")
        await real_commit(self, header, accept, timeout)

    real_drop = PeerManager.drop

    async def recording_drop(
        self: PeerManager, node_id: str, why: str, expected: Any = None, *, cause: DropCause
    ) -> None:
        drops.append(f"{node_id}: {why}")
        await real_drop(self, node_id, why, expected, cause=cause)

    monkeypatch.setattr(InMemoryClient, "exchange", answered_at_the_deadline)
    monkeypatch.setattr(InMemoryClient, "commit", commit)
    monkeypatch.setattr(PeerManager, "drop", recording_drop)
    net, quick = InMemoryNetwork(), {"rounds": 2, "exchange_timeout": 3.0}
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, **quick), net) as caller:
        callee_cfg = node_config(tmp_path, 1, 2, PeersOption(False, (caller.address,), ()), **quick)
        async with Node(callee_cfg, net) as callee:
            async with asyncio.timeout(120):
                await asyncio.gather(caller.run(), callee.run())
            during_the_run = list(drops)  # the close that follows drops each end for the other's Leave
    assert late == [0] and during_the_run == []
    for out, other in ((tmp_path / "n0", "node-1"), (tmp_path / "n1", "node-0")):
        first, second = _rounds(out)
        assert first["neighbours"] == [] and first["missed"] == [other]  # left out at both ends
        assert [n["id"] for n in second["neighbours"]] == [other]  # and still a peer in the next round


@pytest.mark.asyncio
async def test_a_run_that_fails_reports_its_own_error_even_when_the_final_checkpoint_fails_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that fails (here a round, as a torch error would) still saves a checkpoint on its way out; if that fails
    too (the disk the first error filled), the save's error used to replace the run's, and the operator was told
    about the disk, not about what stopped the node."""

    async def broken_round(self: Node, t: int) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def full_disk(self: Node, next_round: int, export: bool) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Node, "_run_round", broken_round)
    monkeypatch.setattr(Node, "_save", full_disk)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=None) as node:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await node.run()
    assert any("final checkpoint (round 0) failed too" in r.getMessage() and r.exc_info for r in caplog.records)


class FailsOnce:
    """A stand-in for the node's MdnsDiscovery whose first move fails with ``error``, as when the new address went
    again in between (a DHCP client that retries): no kernel lets a test make a bind fail on cue. The real move is
    tested in test_multihost.py."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.moves: list[list[str]] = []
        self.moved_again = asyncio.Event()

    async def async_rebind(self, interfaces: list[str], advert: Advertisement) -> None:
        self.moves.append(interfaces)
        if len(self.moves) == 1:
            raise self.error
        self.moved_again.set()


async def moves_of_a_node_following(
    tmp_path: Path, interfaces: list[str], error: Exception | None = None, listen: str | None = None
) -> list[list[str]]:
    """The moves a lone node's interface watcher makes from ``interfaces`` (the looks are the caller's to patch
    into ``daemon.interface_addresses``), the first of which fails (with ``error``, default a bind's OSError):
    until a second move, then twenty more looks. ``listen``: the --listen the watcher sees (a wildcard makes the
    node's own address follow the interface's)."""
    mdns = FailsOnce(error or OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    async with lone_node(tmp_path, InMemoryNetwork()) as node:
        if listen is not None:
            node.config = dataclasses.replace(node.config, listen=listen)
        advert = Advertisement(node_id=node.node_id, port=7070, cluster="c", fingerprint="ab", protocol_version=2,
                               secure=False)  # fmt: skip
        follow = asyncio.ensure_future(node._follow_interface(cast(Any, mdns), advert, interfaces))
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await mdns.moved_again.wait()
            await asyncio.sleep(0.2)  # twenty more looks: the move is done, nothing more to do
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
    return mdns.moves


@pytest.mark.asyncio
async def test_a_node_whose_address_follows_its_interface_retries_the_addresses_it_had_found_to_be_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renumbered, the node's old address may go to another node: the peer manager is told once the move has
    succeeded (not for the failed first try), so that the addresses it had found to reach this node are dialled
    again."""
    monkeypatch.setattr(daemon, "INTERFACE_POLL_S", 0.01)
    monkeypatch.setattr(daemon, "interface_addresses", lambda spec: ["10.9.0.2"])
    told: list[bool] = []
    monkeypatch.setattr(PeerManager, "own_address_changed", lambda self: told.append(True))
    moves = await moves_of_a_node_following(tmp_path, ["10.9.0.1"], listen="0.0.0.0:7070")
    assert moves == [["10.9.0.2"], ["10.9.0.2"]] and told == [True]


@pytest.mark.asyncio
async def test_a_move_of_mdns_to_a_new_address_that_fails_is_tried_again_at_the_next_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interface got a new address, and moving zeroconf there failed. The node must try again at its next
    look, not take the move as done and stay unbound, announcing nothing, until the address changes once more."""
    monkeypatch.setattr(daemon, "INTERFACE_POLL_S", 0.01)
    monkeypatch.setattr(daemon, "interface_addresses", lambda spec: ["10.9.0.2"])  # the new lease, at every look
    assert await moves_of_a_node_following(tmp_path, ["10.9.0.1"]) == [["10.9.0.2"], ["10.9.0.2"]]


@pytest.mark.asyncio
async def test_a_move_of_mdns_failing_inside_zeroconf_is_tried_again_not_the_end_of_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """zeroconf's own errors (a name conflict while registering, a busy loop) are not OSErrors. One of them used to
    end the watcher's task: discovery stayed unbound for the rest of the run and nothing tried again."""
    monkeypatch.setattr(daemon, "INTERFACE_POLL_S", 0.01)
    monkeypatch.setattr(daemon, "interface_addresses", lambda spec: ["10.9.0.2"])
    error = zeroconf.NonUniqueNameException("node-0._tadlora._tcp.local.")
    assert await moves_of_a_node_following(tmp_path, ["10.9.0.1"], error) == [["10.9.0.2"], ["10.9.0.2"]]
    assert any("moving to 10.9.0.2 failed" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.asyncio
async def test_a_background_task_that_fails_stops_the_node_with_an_error_and_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose peer manager died would go on training alone, its peers never refreshed, with one log line to
    show for it. It stops instead, saving its checkpoint, and `run` raises naming the task: the CLI exits 1, and a
    supervisor's restart resumes from the checkpoint."""

    async def broken(self: Any) -> None:
        await asyncio.sleep(0.5)
        raise KeyError("a bug in the peer manager")

    monkeypatch.setattr(PeerManager, "run", broken)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=None) as node:
        with pytest.raises(RuntimeError, match="background task peer-manager failed") as failed:
            async with asyncio.timeout(60):
                await node.run()
    assert isinstance(failed.value.__cause__, KeyError)
    assert (tmp_path / "n0" / state.CHECKPOINT).exists()


@pytest.mark.asyncio
async def test_a_failed_move_of_mdns_is_undone_when_the_interface_gets_its_old_address_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed move has closed the old binding already (it leaves first, then binds anew), so the interface getting
    its old address back (a DHCP lease that flapped) is a move too: taken as "nothing changed", discovery would stay
    unbound, announcing nothing and seeing no one, for the rest of the run."""
    monkeypatch.setattr(daemon, "INTERFACE_POLL_S", 0.01)
    looks = iter([["10.9.0.2"]])  # the new lease at the first look, the old address at every later one
    monkeypatch.setattr(daemon, "interface_addresses", lambda spec: next(looks, ["10.9.0.1"]))
    assert await moves_of_a_node_following(tmp_path, ["10.9.0.1"]) == [["10.9.0.2"], ["10.9.0.1"]]


@pytest.mark.asyncio
async def test_every_checkpoint_follows_the_round_log_lines_it_counts_onto_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint records how long rounds.jsonl was; after a power loss the log must not be shorter than that,
    or the rounds in between would never be logged again. So the log is fsynced before each checkpoint is."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as node:
        async with asyncio.timeout(60):
            await node.run()
    checkpoints = [i for i, name in enumerate(synced) if name.startswith(f".{state.CHECKPOINT}.")]  # its temp file
    logged = [i for i, name in enumerate(synced) if name == state.ROUNDS]
    assert checkpoints and logged, synced
    for previous, i in zip([-1, *checkpoints], checkpoints, strict=False):
        assert any(previous < j < i for j in logged), synced  # the log, since the last checkpoint, before this one


# ------------------------------------------------------------------------------------------ cancelling


@pytest.mark.asyncio
async def test_a_close_that_comes_with_a_discovery_change_still_ends_the_peer_manager(tmp_path: Path) -> None:
    """Discovery reports a change (a peer's goodbye, say) in the moment the node closes. The close cancels the peer
    manager's task and waits for it: a task that took the change and dropped the cancellation would scan on for
    ever, and the node would never exit."""
    async with lone_node(tmp_path, InMemoryNetwork()) as node:
        assert node._peers is not None
        for _ in range(3):
            await asyncio.sleep(0)  # the peer manager scans (no candidates) and waits for the next change
        node._peers.wake()
        async with asyncio.timeout(STOP_S):
            await node.aclose()
    assert not node._tasks


@pytest.mark.asyncio
async def test_a_run_cancelled_as_a_peer_arrives_is_cancelled_not_carried_on(tmp_path: Path) -> None:
    """The run is cancelled (by whoever owns it) while it waits for its first peer, in the moment that peer is
    verified: it must end cancelled, not take the peer and start training."""
    net = InMemoryNetwork()
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, min_peers=1, rounds=None), net) as node:
        run = asyncio.ensure_future(node.run())
        for _ in range(3):
            await asyncio.sleep(0)  # into its wait for peers
        try:
            async with scripted_peer(node, net):  # verified: the wait for peers is over
                run.cancel()
                done, _ = await asyncio.wait({run}, timeout=STOP_S)
                assert run in done and run.cancelled(), f"still running in state {node._state!r}"
        finally:
            node.request_stop()
            await asyncio.gather(run, return_exceptions=True)
    assert node.round == 0


@pytest.mark.asyncio
async def test_a_run_cancelled_during_local_steps_ends_them_and_checkpoints_the_rounds_start(tmp_path: Path) -> None:
    """The run is cancelled while the worker thread runs the round's local steps (here 10^5 of them, minutes of
    work). The steps must end too: their result is thrown away, the final checkpoint waits behind them in the
    one worker thread, and the owner that cancelled the run would wait out the whole round."""
    long_round = dataclasses.replace(TRAIN, local_steps=10**5)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=None, train=long_round) as node:
        loop, training = asyncio.get_running_loop(), asyncio.Event()
        train = node._train

        def observed(t: int) -> Any:
            loop.call_soon_threadsafe(training.set)
            return train(t)

        node._train = observed  # type: ignore[method-assign]
        run = asyncio.ensure_future(node.run())
        try:
            async with asyncio.timeout(30):
                await training.wait()  # the worker thread is in round 0's local steps
            run.cancel()
            done, _ = await asyncio.wait({run}, timeout=STOP_S)
            assert run in done and run.cancelled(), "the cancelled run is still waiting for its local steps"
        finally:
            node.request_stop()
            await asyncio.gather(run, return_exceptions=True)
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 0  # the round it was in is run again after a restart


@pytest.mark.asyncio
async def test_a_start_cancelled_while_the_model_loads_closes_without_blocking_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start is cancelled while the worker thread loads the model (a download can take minutes). Closing waits
    for that thread, but off the event loop: other nodes and servers in the process go on meanwhile. Here the
    load finishes only when the loop gets to release it; a close that blocked the loop would see it time out."""
    loop, loading, release = asyncio.get_running_loop(), asyncio.Event(), threading.Event()
    released: list[bool] = []
    build = Node._build

    def slow_build(self: Node) -> None:
        loop.call_soon_threadsafe(loading.set)
        released.append(release.wait(timeout=30))  # False: the loop never got to release it
        build(self)

    monkeypatch.setattr(Node, "_build", slow_build)
    node = Node(node_config(tmp_path, 0, 2, NO_PEERS, min_peers=0), InMemoryNetwork())
    start = asyncio.ensure_future(node.__aenter__())
    async with asyncio.timeout(30):
        await loading.wait()
    start.cancel()

    async def release_once_the_close_waits() -> None:
        await asyncio.sleep(0)
        release.set()

    async with asyncio.timeout(60):
        await asyncio.gather(start, release_once_the_close_waits(), return_exceptions=True)
    assert start.cancelled() and node._executor._shutdown  # type: ignore[attr-defined]
    assert released == [True], "closing blocked the event loop while it waited for the worker thread"


@pytest.mark.asyncio
async def test_a_close_cancelled_during_the_mdns_goodbye_still_closes_everything_after_it(tmp_path: Path) -> None:
    """The close is cancelled while zeroconf sends the goodbyes (its first step, hundreds of ms). The steps after it
    must run all the same: a second close returns at once (the node counts itself closed), so nothing else would
    ever stop the server, the peer manager, the metrics endpoint or close the round log."""
    net = InMemoryNetwork()
    node = Node(node_config(tmp_path, 0, 2, parse_peers_option("auto"), min_peers=0, metrics_port=0), net)
    await node.__aenter__()
    address, round_log, discovery = node.address, node._round_log, node._discovery
    assert round_log is not None and discovery is not None and node._tasks and node.metrics._server is not None
    goodbye, say_goodbye = asyncio.Event(), discovery.aclose

    async def observed_goodbye() -> None:
        goodbye.set()
        await say_goodbye()

    discovery.aclose = observed_goodbye  # type: ignore[method-assign]
    closing = asyncio.ensure_future(node.aclose())
    async with asyncio.timeout(STOP_S):
        await goodbye.wait()  # the close is in the goodbye now: it set the event, then awaited zeroconf's
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
    assert closing.cancelled()  # the cancellation still reaches the one who closes
    async with net.connect(address) as client:
        with pytest.raises(PeerUnavailable):
            await client.handshake(ScriptedPeer(node).info, timeout=5.0)
    assert not node._tasks, node._tasks
    assert node.metrics._server is None
    assert round_log._file.closed
    assert node._executor._shutdown  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ the event loop


def loop_thread_probe(on_loop: list[str], name_call: Callable[[str, tuple[Any, ...]], str] = lambda n, _: n) -> Any:
    """A factory of wrappers that append ``name_call(name, args)`` to ``on_loop`` for each call made on this thread
    (the test's, the event loop's), then call the wrapped function."""
    loop_thread = threading.get_ident()

    def probe(name: str, real: Any) -> Any:
        def probed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread:
                on_loop.append(name_call(name, args))
            return real(*args, **kwargs)

        return probed

    return probe


def on_the_loop_recorder(monkeypatch: pytest.MonkeyPatch, within: Path) -> list[str]:
    """Record (in the returned list) each fsync, each open of a file under ``within`` and each torch read or write
    of the model's factors that runs on this thread, the event loop's: each belongs in a worker thread."""
    loop_thread, on_loop = threading.get_ident(), list[str]()
    probe = loop_thread_probe(on_loop)
    real_open = io.open

    def probed_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == loop_thread and isinstance(file, str | Path) and Path(file).is_relative_to(within):
            on_loop.append(f"open {Path(file).name}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", probe("fsync", os.fsync))
    monkeypatch.setattr(io, "open", probed_open)
    monkeypatch.setattr(AdapterModel, "load_factors", probe("AdapterModel.load_factors", AdapterModel.load_factors))
    monkeypatch.setattr(AdapterModel, "factors", probe("AdapterModel.factors", AdapterModel.factors))
    return on_loop


@pytest.mark.asyncio
async def test_a_start_fresh_or_resumed_leaves_the_disk_and_torch_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting, a node reads and writes node.json (written atomically: two fsyncs) and takes its first factors from
    the model, or loads its checkpoint's into it. None of it may run on the event loop: other nodes and servers of
    the process (and, from the same loop, its own server once it serves) would stall behind a busy disk, and the
    model is the worker thread's alone."""
    net = InMemoryNetwork()
    on_loop = on_the_loop_recorder(monkeypatch, tmp_path)
    async with lone_node(tmp_path, net) as node:
        await node._save(0, export=False)
    async with lone_node(tmp_path, net) as node:
        assert node._resumed
    assert not on_loop, on_loop


@pytest.mark.asyncio
async def test_serving_metrics_resolves_no_name_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binding /metrics looks its host up (getaddrinfo) and, as Python's HTTP server does, its name by reverse DNS
    (getfqdn): with a resolver that does not answer, seconds in which the loop, already serving the node's peers,
    would stall."""
    on_loop = list[str]()
    probe = loop_thread_probe(on_loop, lambda name, args: f"{name}{args[:1]}")
    monkeypatch.setattr(socket, "getaddrinfo", probe("getaddrinfo", socket.getaddrinfo))
    monkeypatch.setattr(socket, "getfqdn", probe("getfqdn", socket.getfqdn))
    async with lone_node(tmp_path, InMemoryNetwork(), metrics_port=0) as node:
        assert node.metrics.port
    assert not on_loop, on_loop


@pytest.mark.asyncio
async def test_the_round_log_is_written_and_closed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round appends (and flushes) a line to rounds.jsonl, each checkpoint reads its size, and the close closes
    it: file I/O, which on a busy or network disk stalls whatever thread does it. Not the loop's: it serves the
    node's peers meanwhile."""
    on_loop = list[str]()
    probe = loop_thread_probe(on_loop)
    monkeypatch.setattr(state.RoundLog, "write", probe("write", state.RoundLog.write))
    monkeypatch.setattr(state.RoundLog, "size", property(probe("size", state.RoundLog.size.fget)))
    monkeypatch.setattr(state.RoundLog, "close", probe("close", state.RoundLog.close))
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, checkpoint_every=1) as node:
        async with asyncio.timeout(60):
            await node.run()
    assert [r["round"] for r in _rounds(tmp_path / "n0")] == [0, 1]
    assert not on_loop, on_loop
