"""`tadlora-node` as separate OS processes: mDNS discovery, training, status, crashes, restarts, signals, refusals.

Every node is a real `python -m tadlora.node.entry` process with one torch thread and the tiny model, serving on
127.0.0.1 and doing mDNS on 127.0.0.1 only (see nodeproc). Each test has its own cluster name and node ids, so
concurrent runs on this machine never mix. Waits poll a log file or a process, each with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

import tadlora
from nodeproc import (
    SMALL_RUN,
    STARTUP_S,
    NodeProcess,
    console_script,
    heavy_imports,
    node_args,
    node_env,
    running_node,
    unique_tag,
)
from tadlora.adapter import LoraSpec, ModelSpec, _load_base
from tadlora.node import state
from tadlora.node.cli import build_run_parser, config_from_args
from tadlora.node.discovery import Advertisement, MdnsDiscovery

log = logging.getLogger(__name__)

RUN_S = 90.0  # s a short run may take, startup included, with 3-4 nodes on two cores (they take 10-20 s)
EXCHANGE_TIMEOUT_S = 3.0  # s; --exchange-timeout in the crash test
GOODBYE_S = 5.0  # s for an mDNS goodbye to reach an observer after SIGTERM (it takes well under 1 s)
ROUND_LINE = r"\bround \d+ phase "  # the daemon's "[progress] round T phase X: loss ..." line


def neighbour_ids(record: dict[str, Any]) -> list[str]:
    return sorted(n["id"] for n in record["neighbours"])


def peers_verified_at(node: NodeProcess, count: int) -> float:
    """When (wall clock) the node's log shows its ``count``-th verified peer."""
    verified = sorted(r["time"] for r in node.find(r"^peer \S+ verified at "))
    assert len(verified) >= count, node.tail()
    return float(verified[count - 1])


# ---------------------------------------------------------------------------------------------------------------
# Three nodes meet by mDNS and train


def test_three_processes_find_each_other_by_mdns_train_every_round_together_and_export_a_peft_adapter(
    tmp_path: Path,
) -> None:
    rounds, tag = 4, unique_tag()
    ids = [f"n{i}-{tag}" for i in range(3)]
    extra = ["--rounds", str(rounds), "--min-peers", "2", "--eval-every", "2"]
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(running_node(
                tmp_path, f"n{i}", node_args(tag, ids[i], tmp_path / f"n{i}", shard=i, num_shards=3, extra=extra),
                tmp_path / f"n{i}",
            ))
            for i in range(3)
        ]  # fmt: skip
        for node in nodes:
            assert node.wait_exit(RUN_S) == 0, node.tail()
    launched, served = min(n.started for n in nodes), max(n.serving()["time"] for n in nodes)
    assert all(n.serving()["message"].endswith(f"; tadlora {tadlora.__version__})") for n in nodes)  # for reports
    formed = max(peers_verified_at(n, 2) for n in nodes)
    log.info("3 nodes: all serving %.1f s after launch; every node had both peers %.2f s after the last served",
             served - launched, formed - served)  # fmt: skip

    # The nodes ran with the CLI's LoRA defaults, which are LoraSpec()'s.
    assert config_from_args(build_run_parser().parse_args(["--out", str(tmp_path), "--insecure"])).lora == LoraSpec()
    base = _load_base(ModelSpec(model="tiny", label_names=("negative", "positive"), lora=LoraSpec(), seed=0))[0]
    by_id = {node.node_id: node.rounds() for node in nodes}
    for i, node in enumerate(nodes):
        others = sorted(set(ids) - {ids[i]})
        records = by_id[ids[i]]
        assert [r["round"] for r in records] == list(range(rounds)), node.tail()
        for r in records:
            assert (r["degree"], neighbour_ids(r), r["missed"]) == (2, others, []), r
            assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
        assert [r["round"] for r in records if "eval_accuracy" in r] == [1, 3]
        log.info("%s: round times %s s", ids[i], [round(r["seconds"], 3) for r in records])
        assert f"{ids[i]}: {rounds} rounds" in node.stdout()

        ckpt = node.checkpoint()
        identity = json.loads((node.out / "node.json").read_text())
        assert (ckpt.round, ckpt.node_id, ckpt.fingerprint) == (rounds, ids[i], identity["fingerprint"])
        assert "lora=r8/a16/d0/query+value seed=0 init=portable" in identity.pop("fingerprint_parts")
        assert identity == {
            "format": 1, "node_id": ids[i], "cluster": tag, "fingerprint": ckpt.fingerprint, "method": "tad",
            "switch_interval": 5, "dataset": "builtin:sst2-small", "split": "label-skew", "shard": i, "num_shards": 3,
            "link_prob": 1.0, "max_neighbors": None, "init": "portable",
        }  # fmt: skip
        assert_adapter_holds(node.out / "adapter", base, ckpt.factors)

    # Both ends of a link agree on its weight in every round (each computes it from the exchanged degrees).
    for i in ids:
        for r in by_id[i]:
            for n in r["neighbours"]:
                (theirs,) = [m for m in by_id[n["id"]][r["round"]]["neighbours"] if m["id"] == i]
                assert theirs["weight"] == n["weight"]


def assert_adapter_holds(adapter: Path, base: torch.nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """OUT/adapter loads with peft onto a fresh base, and its LoRA weights are the checkpoint's factors."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    lora = {
        name.replace(".default.", "."): p.detach()
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }
    assert set(lora) == set(factors)
    for key, value in factors.items():
        assert torch.equal(lora[key], value), key
    assert any(v.abs().sum() > 0 for k, v in factors.items() if ".lora_B." in k)  # it trained


# ---------------------------------------------------------------------------------------------------------------
# `tadlora-node status`


def status_cli(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """The installed `tadlora-node status`, as a HEALTHCHECK runs it; it must not have imported torch."""
    result = subprocess.run(
        [console_script("tadlora-node"), "status", address, "--timeout", "10", *flags],
        capture_output=True, text=True, timeout=60, env=node_env({"PYTHONPROFILEIMPORTTIME": "1"}), check=False,
    )  # fmt: skip
    assert heavy_imports(result.stderr) == set(), "`tadlora-node status` imported torch, peft or transformers"
    return result


def test_status_prints_a_running_nodes_id_cluster_round_and_state_as_json_and_sigint_stops_it(
    tmp_path: Path,
) -> None:
    tag = unique_tag()
    args = node_args(tag, f"solo-{tag}", tmp_path / "out", extra=["--min-peers", "0"])  # no --rounds: runs on
    with running_node(tmp_path, "solo", args, tmp_path / "out") as node:
        node.wait_for(ROUND_LINE, STARTUP_S)
        result = status_cli(node.address)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        walked = status_cli(node.address, "--all", "--table")  # a node alone: a cluster of one
        assert walked.returncode == 0, walked.stderr
        assert walked.stdout.splitlines()[-1].startswith("1 node answered; round ")
        node.send(signal.SIGINT)
        assert node.wait_exit(30) == 0, node.tail()
        # Every JSON log line names the node, the start-up's first lines (before the model loads) included.
        assert {r["node_id"] for r in node.records()} == {f"solo-{tag}"}
    identity = json.loads((tmp_path / "out" / "node.json").read_text())
    assert doc["node_id"] == f"solo-{tag}"
    assert doc["cluster"] == tag
    assert doc["fingerprint"] == identity["fingerprint"]
    assert doc["address"] == node.address
    assert isinstance(doc["round"], int) and doc["round"] >= 1  # it had finished a round before we asked
    assert doc["state"] in {"idle", "training", "exchanging", "evaluating"}
    assert doc["method"] == "tad" and doc["insecure"] is True and doc["neighbours"] == []
    assert doc["release"] == tadlora.__version__

    gone = status_cli(node.address)  # nothing serves there any more: a clear error, exit 1
    assert gone.returncode == 1 and "unavailable" in gone.stderr, gone.stderr
    assert "nothing accepts connections there" in gone.stderr and "--tls-dir" not in gone.stderr, gone.stderr


def test_a_signal_during_start_up_still_stops_gracefully(tmp_path: Path) -> None:
    tag = unique_tag()
    args = node_args(tag, f"early-{tag}", tmp_path / "out", extra=["--min-peers", "0"])
    with running_node(tmp_path, "early", args, tmp_path / "out") as node:
        node.wait_until(lambda: (tmp_path / "out").exists(), "the node to create --out", STARTUP_S)
        node.send(signal.SIGTERM)  # while the model is still being built
        assert node.wait_exit(60) == 0, node.tail()
    assert state.load_checkpoint(tmp_path / "out") is not None


# ---------------------------------------------------------------------------------------------------------------
# A crash stalls no one; a restart resumes


def test_a_node_killed_mid_run_stalls_its_neighbours_at_most_a_deadline_and_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    """Kill the node with the smallest id: it is the caller on both its links, so its neighbours only notice
    that no call came (a crashed callee would fail the caller's call at once, the easier case)."""
    rounds, tag = 12, unique_tag()
    ids = [f"n{i}-{tag}" for i in range(3)]
    extra = [
        "--rounds", str(rounds), "--min-peers", "2", "--exchange-timeout", str(EXCHANGE_TIMEOUT_S),
        "--checkpoint-every", "1", "--eval-every", "100",
        "--local-steps", "20",  # ~0.2 s rounds, so the kill lands mid-run
    ]  # fmt: skip
    args = [node_args(tag, ids[i], tmp_path / f"n{i}", shard=i, num_shards=3, extra=extra) for i in range(3)]
    with contextlib.ExitStack() as stack:
        victim, *survivors = [
            stack.enter_context(running_node(tmp_path, f"n{i}", args[i], tmp_path / f"n{i}")) for i in range(3)
        ]
        victim.wait_for(r"\bround 3 phase ", RUN_S)
        victim.proc.kill()
        killed_at = time.time()
        assert victim.wait_exit(10) == -signal.SIGKILL
        for node in survivors:
            assert node.wait_exit(RUN_S) == 0, node.tail()
    ckpt = victim.checkpoint()
    logged_before = len(victim.rounds())
    assert ckpt.round >= 3 and logged_before >= ckpt.round

    for node, other in ((survivors[0], survivors[1]), (survivors[1], survivors[0])):
        records = node.rounds()
        assert [r["round"] for r in records] == list(range(rounds))
        after = [r for r in records if r["time"] > killed_at]
        assert after, "the survivors finished before the kill: nothing was tested"
        missed = [r["round"] for r in after if victim.node_id in r["missed"]]
        assert len(missed) <= 2, (missed, after)
        if missed:  # once missed, dropped: never a neighbour (nor waited for) again
            assert all(victim.node_id not in neighbour_ids(r) + r["missed"] for r in records if r["round"] > missed[-1])
        assert (after[-1]["degree"], neighbour_ids(after[-1]), after[-1]["missed"]) == (1, [other.node_id], [])
        # No round waited for the dead node longer than the exchange deadline. A round's own work comes on top:
        # bounded by the slowest round before the kill (plus 2 s), not by a constant, as the machine may be loaded.
        work = max((r["seconds"] for r in records if r["time"] <= killed_at), default=0.0)
        for r in after:
            assert r["seconds"] < EXCHANGE_TIMEOUT_S + work + 2.0, (r, work)
        recovered = next(r["time"] for r in after if r["degree"] == 1)
        log.info("%s: missed the killed node in rounds %s; degree 1 %.2f s after the kill", node.node_id, missed,
                 recovered - killed_at)  # fmt: skip

    # The survivors are done, so the restarted node finds no one: it waits --peer-wait, then runs alone.
    with running_node(tmp_path, "n0-restart", [*args[0], "--peer-wait", "1"], tmp_path / "n0") as again:
        assert again.wait_exit(RUN_S) == 0, again.tail()
    again.wait_for(rf"^resuming at round {ckpt.round} from ", 0)
    new = again.rounds()[logged_before:]
    assert new and new[0]["round"] >= ckpt.round > 0, new
    assert [r["round"] for r in new] == list(range(new[0]["round"], rounds))
    assert again.checkpoint().round == rounds
    assert json.loads((tmp_path / "n0" / "node.json").read_text())["node_id"] == ids[0]


# ---------------------------------------------------------------------------------------------------------------
# Graceful shutdown


@pytest.mark.asyncio
async def test_sigterm_checkpoints_exits_0_and_says_goodbye_on_mdns(tmp_path: Path) -> None:
    tag = unique_tag()
    node_id = f"term-{tag}"
    observer_advert = Advertisement(
        node_id=f"observer-{tag}", port=9, cluster=f"observer-{tag}", fingerprint="00", protocol_version=1,
        secure=False,
    )  # fmt: skip
    args = node_args(tag, node_id, tmp_path / "out", extra=["--min-peers", "0"])  # no --rounds: runs on
    async with MdnsDiscovery(observer_advert, ["127.0.0.1"]) as observer:
        with running_node(tmp_path, "term", args, tmp_path / "out") as node:
            seen = await observer.async_wait_for(lambda c: node_id in c, STARTUP_S)
            assert seen[node_id].cluster == tag
            assert seen[node_id].address == await asyncio.to_thread(lambda: node.address)
            # The CLI installs its signal handlers right after the node starts serving; after a round, surely.
            await asyncio.to_thread(node.wait_for, ROUND_LINE, 30)
            node.send(signal.SIGTERM)
            sent = time.monotonic()
            await observer.async_wait_for(lambda c: node_id not in c, GOODBYE_S)
            gone_after = time.monotonic() - sent
            code = await asyncio.to_thread(node.wait_exit, 30)
    log.info("mDNS goodbye seen %.2f s after SIGTERM", gone_after)
    assert code == 0, node.tail()
    assert node.find(r"^SIGTERM: stopping after a checkpoint")
    # A stop is said to be one (it read "finished in N s", as if the run were done), and stdout says the rounds
    # done are this process's own (none came from a resume or a catch-up here). Its last line: written (and
    # flushed) before the process ends.
    assert node.find(r"^stopped at round \d+ after [\d.]+ s; run it again with the same --out to resume$")
    assert not node.find(r"^finished in ")
    done = node.rounds()[-1]["round"] + 1
    said = re.fullmatch(rf"{node_id}: {done} rounds done \({done} run by this process\), last accuracy (n/a|[\d.]+), "
                        rf"checkpoint and adapter in {re.escape(str(tmp_path / 'out'))}\n", node.stdout())  # fmt: skip
    assert said, node.stdout()

    path = tmp_path / "out" / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["node_id"] == node_id and keys
    # The checkpoint holds the start of the round that was cut short: every finished round, none invented.
    assert int(meta["round"]) == node.rounds()[-1]["round"] + 1 == node.checkpoint().round


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_nodes_of_another_cluster_or_another_model_fingerprint_are_never_mixed_with(tmp_path: Path) -> None:
    """Two good nodes train together (until stopped) beside a node of another cluster and one of another seed
    (so another model fingerprint); all four start at once and run until every refusal has been logged."""
    tag = unique_tag()
    good_ids = [f"good{i}-{tag}" for i in range(2)]
    other_cluster, other_seed = f"cluster-{tag}", f"seed-{tag}"
    idle = ["--min-peers", "1", "--peer-wait", "600"]  # wait for a peer that never comes (idle: no CPU used)
    good_extra = ["--min-peers", "1", "--eval-every", "1000"]  # no --rounds: trains until stopped
    args = {
        good_ids[0]: node_args(tag, good_ids[0], tmp_path / good_ids[0], shard=0, num_shards=2, extra=good_extra),
        good_ids[1]: node_args(tag, good_ids[1], tmp_path / good_ids[1], shard=1, num_shards=2, extra=good_extra),
        other_cluster: node_args(f"{tag}-other", other_cluster, tmp_path / other_cluster, num_shards=2, extra=idle),
        other_seed: node_args(tag, other_seed, tmp_path / other_seed, num_shards=2, extra=[*idle, "--seed", "1"]),
    }
    with contextlib.ExitStack() as stack:
        nodes = {i: stack.enter_context(running_node(tmp_path, i, a, tmp_path / i)) for i, a in args.items()}
        # Every node saw every other one, and says why it will not mix with those it refuses.
        for g in good_ids:
            nodes[g].wait_for(rf"^not a neighbour: {other_cluster}: cluster '{tag}-other' is not ours", RUN_S)
            nodes[g].wait_for(rf"^not a neighbour: {other_seed}: model fingerprint \w+ differs from ours", RUN_S)
            nodes[other_cluster].wait_for(rf"^not a neighbour: {g}: cluster '{tag}' is not ours", RUN_S)
            nodes[other_seed].wait_for(rf"^not a neighbour: {g}: model fingerprint \w+ differs from ours", RUN_S)
        for g in good_ids:
            nodes[g].wait_until(lambda g=g: len(nodes[g].rounds()) >= 3, "3 rounds", RUN_S)
        for node in nodes.values():
            node.send(signal.SIGTERM)
        for node in nodes.values():
            assert node.wait_exit(30) == 0, node.tail()

    for g in good_ids:
        (other,) = set(good_ids) - {g}
        records = nodes[g].rounds()
        assert all(neighbour_ids(r) in ([other], []) for r in records), records  # [] only once it stopped
        assert sum(neighbour_ids(r) == [other] for r in records) >= 3
        assert not nodes[g].find(rf"^peer ({other_cluster}|{other_seed}) verified"), nodes[g].tail()
    for i in (other_cluster, other_seed):
        assert nodes[i].rounds() == []  # it never found a peer, so never trained, let alone mixed


# ---------------------------------------------------------------------------------------------------------------
# Configuration from the environment

# One valid, non-default value per flag of `tadlora-node` (run).
BOOLEAN_FLAGS = {"insecure"}  # store_true: given bare on the command line, as 1 in the environment
FLAG_VALUES = {
    "insecure": "1",
    "tls_dir": "/etc/tadlora/certs",
    "peers": "auto,10.0.0.5:7070",
    "listen": "127.0.0.1:7171",
    "mdns_interface": "127.0.0.1",
    "advertise_address": "10.0.0.9",
    "cluster": "lab",
    "node_id": "from-env",
    "link_prob": "0.5",
    "max_neighbors": "4",
    "min_peers": "3",
    "peer_wait": "7.5",
    "exchange_timeout": "9",
    "metrics_port": "9100",
    "health_port": "9101",
    "model": "tiny",
    "dataset": "glue:sst2",
    "split": "iid",
    "shard": "2",
    "num_shards": "4",
    "samples_per_client": "50",
    "method": "rolora",
    "switch_interval": "3",
    "rounds": "11",
    "local_steps": "4",
    "batch_size": "8",
    "max_length": "48",
    "lr": "0.01",
    "lora_r": "4",
    "lora_alpha": "8",
    "lora_dropout": "0.1",
    "lora_targets": "query,key",
    "seed": "5",
    "init": "torch",
    "device": "cpu",
    "precision": "bf16",
    "optimizer": "sgd",
    "optimizer_state": "persistent",
    "eval_every": "2",
    "eval_samples": "64",
    "out": "runs/x",
    "checkpoint_every": "3",
    "log_format": "text",
    "log_level": "DEBUG",
    "max_factor_norm": "500",
    "robust_mixing": "clip:0.5",
}


def test_every_run_flag_reads_its_tadlora_variable_and_a_flag_still_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_run_parser()
    dests = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")}
    assert set(dests) == set(FLAG_VALUES), "a flag was added or removed: give it a value in FLAG_VALUES"
    flags = [
        x
        for dest, value in FLAG_VALUES.items()
        for x in ((dests[dest].option_strings[0],) if dest in BOOLEAN_FLAGS else (dests[dest].option_strings[0], value))
    ]
    from_flags = vars(parser.parse_args(flags))
    for dest, value in FLAG_VALUES.items():
        monkeypatch.setenv(f"TADLORA_{dest.upper()}", value)
    from_env = build_run_parser()
    assert vars(from_env.parse_args([])) == from_flags
    assert vars(from_env.parse_args(["--rounds", "2"]))["rounds"] == 2
    for action in from_env._actions:
        if action.dest in FLAG_VALUES:
            assert f"[env: TADLORA_{action.dest.upper()}]" in (action.help or ""), action.dest


def test_a_node_configured_only_by_tadlora_variables_runs_as_they_say(tmp_path: Path) -> None:
    tag = unique_tag()
    out = tmp_path / "env-out"
    small = dict(zip(SMALL_RUN[::2], SMALL_RUN[1::2], strict=True))
    env = {f"TADLORA_{flag[2:].upper().replace('-', '_')}": value for flag, value in small.items()}
    env.update(
        TADLORA_ROUNDS="1",
        TADLORA_MIN_PEERS="0",  # the default (1) would wait --peer-wait (60 s) for a peer
        TADLORA_PEERS="auto",
        TADLORA_LISTEN="127.0.0.1:0",
        TADLORA_MDNS_INTERFACE="127.0.0.1",
        TADLORA_CLUSTER=tag,
        TADLORA_NODE_ID=f"env-{tag}",
        TADLORA_OUT=str(out),
        TADLORA_LOG_FORMAT="json",
        TADLORA_INSECURE="1",
    )
    # No flags but the one nodeproc always adds (--mdns-interface 127.0.0.1) and --node-id, which beats its variable.
    with running_node(tmp_path, "env", ["--node-id", f"flag-{tag}"], out, env=env) as node:
        assert node.wait_exit(RUN_S) == 0, node.tail()
    (record,) = node.rounds()
    assert (record["round"], record["degree"], record["neighbours"]) == (0, 0, [])
    assert json.loads((out / "node.json").read_text())["node_id"] == f"flag-{tag}"
    assert json.loads((out / "node.json").read_text())["cluster"] == tag
    assert node.checkpoint().round == 1
    assert json.loads((out / "adapter" / "tadlora.json").read_text())["spec"]["model"] == "tiny"
    assert not node.find(r"peers after")  # it did not wait for a peer
