"""A node restarted on its --out resumes its own run and only that: never another node's checkpoint, another
cluster's or method's run, and never a round logged twice. One real node (tiny model) on the in-memory network."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from pathlib import Path

import pytest
import safetensors.torch

from tadlora.node import state
from tadlora.node.daemon import Node
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.node.peerspec import PeersOption
from test_daemon import NO_PEERS, node_config
from test_daemon_faults import lone_node, scripted_peer


async def run_rounds(tmp: Path, rounds: int, **changes: object) -> None:
    """node-0 runs ``rounds`` rounds into tmp/n0 and stops cleanly (a final checkpoint at round ``rounds``)."""
    async with lone_node(tmp, InMemoryNetwork(), rounds=rounds, **changes) as node:
        async with asyncio.timeout(60):
            await node.run()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        ({"cluster": "lab-a"}, {"cluster": "lab-b"}, "of other settings, --cluster 'lab-a' (now 'lab-b')"),
        ({"method": "tad"}, {"method": "lora"}, "--method 'tad' (now 'lora'), --switch-interval 5 (now none)"),
        ({"method": "tad", "switch_interval": 2}, {"switch_interval": 3}, "--switch-interval 2 (now 3)"),
        ({}, {"shard": 1}, "--shard 0 (now 1)"),
        ({}, {"link_prob": 0.5}, "--link-prob 1.0 (now 0.5)"),
        ({}, {"max_neighbors": 4}, "--max-neighbors all (now 4)"),
    ],
)
async def test_an_out_of_another_cluster_or_method_is_refused_not_resumed(
    tmp_path: Path, first: dict, then: dict, message: str
) -> None:
    await run_rounds(tmp_path, 1, **first)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, **then):
            pass
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, **first) as node:  # its own flags resume it
        assert node.round == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("field", ["node_id", "fingerprint"])
async def test_a_checkpoint_of_another_node_or_model_is_refused_not_loaded(tmp_path: Path, field: str) -> None:
    await run_rounds(tmp_path, 1)
    out = tmp_path / "n0"
    ckpt = state.load_checkpoint(out)
    assert ckpt is not None
    # Same factor shapes as this node's (another node of the cluster, or another seed of the model), so only
    # the checkpoint's own record of whose it is can tell.
    state.save_checkpoint(out, dataclasses.replace(ckpt, **{field: "node-7" if field == "node_id" else "ab" * 8}))
    with pytest.raises(RuntimeError, match=re.escape("checkpoint.safetensors is node")):
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2):
            pass


@pytest.mark.asyncio
async def test_an_out_of_another_model_fingerprint_is_refused_naming_the_part_that_changed(tmp_path: Path) -> None:
    """node.json keeps the fingerprint's parts, so a restart with another --seed (or --lora-r, ...) is told which;
    a node.json written before it kept them gets the fingerprint alone."""
    await run_rounds(tmp_path, 1, seed=3)
    identity_path = tmp_path / "n0" / "node.json"
    assert "seed=3" in json.loads(identity_path.read_text())["fingerprint_parts"]
    with pytest.raises(RuntimeError, match=re.escape("another model fingerprint")) as refused:
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, seed=7):
            pass
    assert "; it differs in seed (kept 3, now 7) and weights (kept #" in str(refused.value)
    older = {k: v for k, v in json.loads(identity_path.read_text()).items() if k != "fingerprint_parts"}
    identity_path.write_text(json.dumps(older))
    with pytest.raises(RuntimeError, match=re.escape("another model fingerprint")) as refused:
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, seed=7):
            pass
    assert "differs in" not in str(refused.value)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, seed=3) as node:  # its own seed resumes it
        assert node.round == 1
    assert "seed=3" in json.loads(identity_path.read_text())["fingerprint_parts"]  # kept again


@pytest.mark.asyncio
async def test_a_node_that_crashed_before_its_first_checkpoint_logs_each_round_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, checkpoint_every=5) as node:

        async def killed_before_any_checkpoint(next_round: int, export: bool) -> None:
            pass

        monkeypatch.setattr(node, "_save", killed_before_any_checkpoint)
        async with asyncio.timeout(60):
            await node.run()  # rounds 0 and 1 are logged, then the process dies
    assert state.load_checkpoint(tmp_path / "n0") is None
    await run_rounds(tmp_path, 2, checkpoint_every=5)  # from round 0 again
    assert [r["round"] for r in state.read_rounds(tmp_path / "n0")] == [0, 1]


@pytest.mark.asyncio
async def test_a_resumed_node_still_knows_the_last_round_it_mixed_in(tmp_path: Path) -> None:
    """A node resumed from its checkpoint has mixed as recently as before it stopped, and says so: claiming it never
    mixed makes it look like a newcomer, so a late joiner (which catches up only from a peer that mixed two or more
    rounds after it did) would never adopt its state, and the two would train alone side by side."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=2) as node, scripted_peer(node, net):
        async with asyncio.timeout(60):
            await node.run()
        assert node.last_mixed_round == 2  # it mixed with the peer in both rounds
    async with lone_node(tmp_path, net, rounds=4) as resumed:
        assert (resumed.round, resumed.last_mixed_round) == (2, 2)
        late_cfg = node_config(tmp_path, 1, 2, PeersOption(False, (resumed.address,), ()), min_peers=1, rounds=4)
        async with Node(late_cfg, net) as late:
            async with asyncio.timeout(60):
                await late._wait_for_peers()
                await late._catch_up_if_behind()
            assert (late.round, late.last_mixed_round) == (2, 2)


@pytest.mark.asyncio
async def test_a_resumed_node_rejoins_a_peer_running_ahead_but_waits_for_min_peers_beside_one_in_step(
    tmp_path: Path,
) -> None:
    """--min-peers makes a cluster start, and restart, together. But a node restarted while another was down (a
    rolling restart, a host in maintenance) waited --peer-wait for it beside a live peer running rounds without it,
    which trained alone meanwhile. A peer two or more rounds ahead says the cluster runs on: rejoin it at once. One in
    the node's own round is restarting with it (the whole cluster was stopped), and they wait for the rest, in step."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=2) as node, scripted_peer(node, net):
        async with asyncio.timeout(60):
            await node.run()
    waited = {}
    for name, out, peer_round in (("ahead", tmp_path, 4), ("in step", tmp_path, 2), ("new", tmp_path / "new", 4)):
        config = node_config(out, 0, 2, NO_PEERS, min_peers=2, peer_wait=2.0, rounds=6)
        async with Node(config, net) as again, scripted_peer(again, net, round=peer_round):
            assert again.round == (0 if name == "new" else 2)
            started = time.monotonic()
            async with asyncio.timeout(10):
                await again._wait_for_peers()
            waited[name] = time.monotonic() - started
    assert waited["ahead"] < 1.0 <= 2.0 <= min(waited["in step"], waited["new"]), waited


@pytest.mark.asyncio
async def test_a_resumed_node_reports_the_last_loss_and_accuracy_its_log_holds(tmp_path: Path) -> None:
    """Status, the metrics and the result said NaN / "n/a" until the resumed node's next round or evaluation, and
    for ever when its rounds were all done, though rounds.jsonl held both."""
    await run_rounds(tmp_path, 2)
    [*_, last] = state.read_rounds(tmp_path / "n0")
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as resumed:
        status = resumed.status()
        assert (status.last_loss, status.last_accuracy) == (last["loss"], last["eval_accuracy"])
        assert resumed.metrics.accuracy._value.get() == last["eval_accuracy"]
        async with asyncio.timeout(60):
            result = await resumed.run()
    assert (result.rounds_completed, result.last_accuracy, result.last_loss) == (2, last["eval_accuracy"], last["loss"])


@pytest.mark.asyncio
async def test_a_resume_past_its_rounds_says_there_is_nothing_to_run_and_waits_for_no_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--rounds is the round a run stops at, not rounds to add. A resume whose checkpoint has reached it ran
    nothing, said only "finished", and first waited --peer-wait (10 min here: the test's bound fails a node that
    waits) for --min-peers it had no round to run with. The result says how many rounds this process ran."""
    await run_rounds(tmp_path, 2)
    with caplog.at_level(logging.INFO, logger="tadlora.node"):
        waiting = node_config(tmp_path, 0, 2, NO_PEERS, rounds=2, min_peers=1, peer_wait=600.0)
        async with Node(waiting, InMemoryNetwork()) as resumed:
            async with asyncio.timeout(60):
                result = await resumed.run()
    assert (result.rounds_completed, result.rounds_run, result.stopped) == (2, 0, False)
    said = [r.getMessage() for r in caplog.records if "nothing to run" in r.getMessage()]
    assert said == [
        "round 2 is reached already (--rounds 2: the round a run stops at, counted across resumes, not a number of "
        "rounds to add): nothing to run; give a larger --rounds to go on"
    ]
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=3) as resumed:
        async with asyncio.timeout(60):
            result = await resumed.run()
    assert (result.rounds_completed, result.rounds_run, result.stopped) == (3, 1, False)
    assert len(state.read_rounds(tmp_path / "n0")) == 3


@pytest.mark.asyncio
async def test_a_resumed_node_takes_its_last_loss_and_accuracy_from_the_end_of_its_log_without_reading_all_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log grows by a line a round for as long as the run lasts: a start that read it all took memory and time
    in proportion to the run's length, at every restart."""
    await run_rounds(tmp_path, 2)
    [*_, last] = state.read_rounds(tmp_path / "n0")

    def whole_log(out: Path) -> list[dict]:
        raise AssertionError(f"a resume read all of {out / state.ROUNDS}")

    monkeypatch.setattr(state, "read_rounds", whole_log)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as resumed:
        status = resumed.status()
    assert (status.last_loss, status.last_accuracy) == (last["loss"], last["eval_accuracy"])


@pytest.mark.asyncio
async def test_a_run_kept_from_before_the_portable_init_resumes_with_the_init_it_was_drawn_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node upgraded in place must resume its run: that run's head was drawn with torch's init, and its
    node.json and checkpoint carry the fingerprint of that model. A new --out draws portably and records it."""
    from tadlora.node import config as config_module

    out = tmp_path / "n0"
    monkeypatch.setattr(config_module, "kept_init", lambda _out: "torch")  # as an earlier version built it
    await run_rounds(tmp_path, 1)
    monkeypatch.undo()
    identity = json.loads((out / "node.json").read_text())
    assert identity.pop("init") == "torch"
    old_fingerprint = identity["fingerprint"]
    (out / "node.json").write_text(json.dumps(identity))  # as an earlier version wrote it: no "init"
    with caplog.at_level("INFO", logger="tadlora.node"):
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as node:
            assert node.round == 1 and node.fingerprint == old_fingerprint
    assert "resumed with init 'torch'" in caplog.text
    await run_rounds(tmp_path / "new", 1)
    fresh = json.loads((tmp_path / "new" / "n0" / "node.json").read_text())
    assert fresh["init"] == "portable" and fresh["fingerprint"] != old_fingerprint


@pytest.mark.asyncio
async def test_a_new_node_joins_a_cluster_of_torch_s_init_with_init_torch_and_a_kept_run_refuses_another_init(
    tmp_path: Path,
) -> None:
    """An upgraded cluster resumes with torch's init (above); a node added to it later has no kept run, so it must be
    told: with --init torch it builds that cluster's model. A kept run resumed with another init is refused, and
    the error names the init it was drawn with."""
    await run_rounds(tmp_path / "old", 1, init="torch")
    await run_rounds(tmp_path / "new", 1)
    old, new = (json.loads((tmp_path / d / "n0" / "node.json").read_text()) for d in ("old", "new"))
    assert (old["init"], new["init"]) == ("torch", "portable") and old["fingerprint"] != new["fingerprint"]
    with pytest.raises(RuntimeError, match=re.escape("(drawn with --init torch, now portable)")):
        async with lone_node(tmp_path / "old", InMemoryNetwork(), rounds=2, init="portable"):
            pass
    async with lone_node(tmp_path / "old", InMemoryNetwork(), rounds=2) as node:  # auto: the kept run's
        assert node.round == 1 and node.fingerprint == old["fingerprint"]


@pytest.mark.asyncio
async def test_a_second_node_on_an_out_in_use_is_refused_and_leaves_the_first_ones_writes_alone(tmp_path: Path) -> None:
    """One --out holds one running node: a second one started on it (a duplicated unit, a restart while the old
    process still stops) would delete the first one's writes in flight as torn, overwrite its checkpoint and
    interleave its rounds into the same log. It is refused, and the --out is free again once the first one stops."""
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=1) as first:
        in_flight = first.config.out / ".checkpoint.safetensors.abcd1234.tmp"  # the first one's write, mid-way
        in_flight.write_bytes(b"half a checkpoint")
        with pytest.raises(RuntimeError, match=re.escape(f"{first.config.out} is in use by another node")):
            async with lone_node(tmp_path, InMemoryNetwork(), rounds=1):
                pass
        assert in_flight.exists()
        in_flight.unlink()
        async with asyncio.timeout(60):
            await first.run()
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as resumed:
        assert resumed.round == 1


@pytest.mark.asyncio
async def test_a_refused_start_leaves_node_json_as_it_was(tmp_path: Path) -> None:
    """A checkpoint restored without its node.json is refused to a node that draws a new id, and that refusal must
    not write node.json: with the new id kept there, the node the checkpoint names could not resume it either."""
    await run_rounds(tmp_path, 1)
    out = tmp_path / "n0"
    (out / "node.json").unlink()  # only the checkpoint came back from a backup
    with pytest.raises(RuntimeError, match=re.escape("checkpoint.safetensors is node 'node-0'")):
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, node_id=None):
            pass
    assert not (out / "node.json").exists()
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as node:  # --node-id node-0: its own checkpoint
        assert node.round == 1


@pytest.mark.asyncio
async def test_an_out_of_another_node_id_is_refused_even_without_a_checkpoint(tmp_path: Path) -> None:
    """node.json names the node an --out belongs to. With a checkpoint the checkpoint's own id refuses another node
    as well; without one (a crash before the first, or moved away) node.json is the only record, and another
    --node-id must not take over the run's log and directory."""
    await run_rounds(tmp_path, 1)
    out = tmp_path / "n0"
    (out / state.CHECKPOINT).unlink()
    kept = (out / "node.json").read_bytes()
    said = f"{out} belongs to node 'node-0', not 'node-7': use another --out for node 'node-7', or --node-id node-0"
    with pytest.raises(RuntimeError, match=re.escape(said)):
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, node_id="node-7"):
            pass
    assert (out / "node.json").read_bytes() == kept


@pytest.mark.asyncio
async def test_a_checkpoint_claiming_to_have_mixed_past_its_round_resumes_claiming_at_most_its_round(
    tmp_path: Path,
) -> None:
    """A node reports ``last_mixed_round`` <= its round + 1, or every peer refuses it (ROUND_MISMATCH); a damaged
    checkpoint claiming more is read as having mixed up to its round, as the daemon documents."""
    await run_rounds(tmp_path, 1)
    out = tmp_path / "n0"
    ckpt = state.load_checkpoint(out)
    assert ckpt is not None and ckpt.round == 1
    state.save_checkpoint(out, dataclasses.replace(ckpt, last_mixed=9))
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as node:
        assert (node.round, node.last_mixed_round) == (1, 1)


@pytest.mark.asyncio
async def test_a_checkpoint_is_resumed_only_under_the_run_settings_it_was_taken_with(tmp_path: Path) -> None:
    """node.json is not the only record of the run: a checkpoint kept without it (node.json deleted as "just the
    node id", or the checkpoint copied from another --out of the same node and model) must not carry its factors
    and round into another cluster's or method's run."""
    await run_rounds(tmp_path, 1, method="tad")
    out = tmp_path / "n0"
    (out / "node.json").unlink()
    with pytest.raises(RuntimeError, match=re.escape("--method 'tad' (now 'lora')")):
        async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, method="lora"):
            pass
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=2, method="tad") as node:
        assert node.round == 1


@pytest.mark.asyncio
async def test_an_out_is_free_again_after_a_close_that_was_cancelled(tmp_path: Path) -> None:
    """A close cut short (a second Ctrl-C in a notebook, an outer timeout) still gives --out back once the worker has
    ended: the process goes on, and a node it starts on the same --out was refused as "in use by another node
    (process <its own pid>)" for as long as the process lived."""
    node = Node(node_config(tmp_path, 0, 2, PeersOption(False, (), ()), min_peers=0, rounds=1), InMemoryNetwork())
    await node.start()
    assert node._peers is not None
    stalled = asyncio.Event()

    async def stalls() -> None:  # a peer connection that takes its time to close
        stalled.set()
        await asyncio.sleep(3600)

    node._peers.aclose = stalls  # type: ignore[method-assign]
    closing = asyncio.ensure_future(node.aclose())
    await stalled.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(15):
        while True:  # the lock goes once the worker thread has ended, in a thread of its own
            try:
                async with lone_node(tmp_path, InMemoryNetwork(), rounds=2) as resumed:
                    assert resumed.round == 0
                break
            except RuntimeError as exc:
                assert "is in use by another node" in str(exc)
                await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_a_checkpoint_that_did_not_record_its_last_mixing_resumes_with_the_last_one_its_log_shows(
    tmp_path: Path,
) -> None:
    """Checkpoints written before nodes kept their last mixing (2026-12-05, c3d18ba; f9c940b, the last node of
    protocol 1, wrote them) have no ``last_mixed`` in their metadata. Read as 0, a node upgraded onto such an --out
    resumed as a newcomer: two of them resumed rounds apart (a rolling upgrade across a protocol change splits the
    cluster) never adopted each other's state, and trained alone side by side. Its rounds.jsonl, cut back to the
    checkpoint, says when it last mixed."""
    net = InMemoryNetwork()
    async with lone_node(tmp_path, net, rounds=2) as node, scripted_peer(node, net):
        async with asyncio.timeout(60):
            await node.run()  # rounds 0 and 1 mixed with the peer
    await run_rounds(tmp_path, 3)  # round 2 alone: the checkpoint is at round 3, its last mixing round 1's
    out = tmp_path / "n0"
    ckpt = state.load_checkpoint(out)
    assert ckpt is not None and (ckpt.round, ckpt.last_mixed) == (3, 2)
    # The checkpoint as f9c940b wrote it: its metadata held the round, ids and the log's length, nothing else.
    old_meta = {"round": "3", "node_id": ckpt.node_id, "fingerprint": ckpt.fingerprint}
    old_meta["rounds_bytes"] = str(ckpt.rounds_bytes)
    (out / state.CHECKPOINT).write_bytes(safetensors.torch.save(dict(ckpt.factors), metadata=old_meta))
    with (out / state.ROUNDS).open("a") as f:  # a round mixed after the checkpoint, then SIGKILL: to be run again
        f.write(json.dumps({"round": 3, "neighbours": [{"id": "node-1", "degree": 1, "weight": 0.5}]}) + "\n")
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=4) as resumed:
        assert (resumed.round, resumed.last_mixed_round) == (3, 2)
