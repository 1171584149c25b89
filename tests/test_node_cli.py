"""The node's command line: flags and TADLORA_ variables map onto the config; errors are clear; metrics serve."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import os
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2_grpc

from nodeproc import console_script, heavy_imports, node_env
from tadlora.node import cli
from tadlora.node import metrics as metrics_module
from tadlora.node.cli import build_run_parser, config_from_args, main
from tadlora.node.config import NodeConfig
from tadlora.node.daemon import Node
from tadlora.node.metrics import NodeMetrics
from tadlora.node.peerspec import PeersOption
from tadlora.training import TrainSpec
from test_daemon import NO_PEERS, node_config


def parse(argv: list[str], monkeypatch: pytest.MonkeyPatch, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return config_from_args(build_run_parser().parse_args([*argv, "--insecure"]))


def test_help_shows_each_flag_s_default_and_where_a_variable_set_it(monkeypatch) -> None:
    def flag_help(flag: str) -> str:
        entry: list[str] = []  # the option's lines: from its own to the next option's
        for line in build_run_parser().format_help().splitlines():
            if line.lstrip().startswith("-"):
                if entry:
                    break
                if line.lstrip().startswith(f"{flag} ") or line.strip() == flag:
                    entry.append(line)
            elif entry:
                entry.append(line)
        return " ".join(" ".join(entry).split())

    monkeypatch.delenv("TADLORA_LOCAL_STEPS", raising=False)
    assert flag_help("--local-steps").endswith("(default: 10) [env: TADLORA_LOCAL_STEPS]")
    assert "(default:" not in flag_help("--insecure")  # a switch that is off says nothing
    assert flag_help("--switch-interval").count("default") == 1  # its help names the default itself
    monkeypatch.setenv("TADLORA_LOCAL_STEPS", "3")
    assert flag_help("--local-steps").endswith("(default: 3) [env: TADLORA_LOCAL_STEPS]")


def test_help_says_what_each_flag_without_a_default_does_when_left_out(monkeypatch) -> None:
    """--metrics-port, --samples-per-client and --tls-dir used to say nothing of what their absence means."""
    for key in [k for k in os.environ if k.startswith("TADLORA_")]:
        monkeypatch.delenv(key)
    parser = build_run_parser()
    silent = [
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings
        and action.default is None
        and not isinstance(action, argparse.BooleanOptionalAction)
        and "default" not in (action.help or "")
    ]
    assert silent == []


def test_every_flag_reads_its_environment_variable_and_a_flag_wins(monkeypatch) -> None:
    cfg = parse([], monkeypatch, TADLORA_LINK_PROB="0.1", TADLORA_METHOD="rolora", TADLORA_ROUNDS="7",
                TADLORA_PEERS="auto,10.0.0.5:7070", TADLORA_LORA_TARGETS="query,key,value")  # fmt: skip
    assert (cfg.link_prob, cfg.method, cfg.rounds) == (0.1, "rolora", 7)
    assert cfg.peers.auto and cfg.peers.static == ("10.0.0.5:7070",)
    assert cfg.lora.target_modules == ("query", "key", "value")
    assert parse(["--link-prob", "0.5"], monkeypatch).link_prob == 0.5
    assert parse([], monkeypatch).train.precision == "auto"
    assert parse(["--precision", "bf16"], monkeypatch).train.precision == "bf16"
    assert parse([], monkeypatch).train.optimizer == "adamw"
    assert parse(["--optimizer", "sgd", "--lr", "0.1"], monkeypatch).train == TrainSpec(
        local_steps=10, batch_size=16, max_length=64, lr=0.1, optimizer="sgd"
    )
    assert parse([], monkeypatch).train.optimizer_state == "fresh"
    assert parse([], monkeypatch, TADLORA_OPTIMIZER_STATE="persistent").train.persistent
    with pytest.raises(ValueError, match="needs adamw"):
        parse(["--optimizer", "sgd", "--optimizer-state", "persistent"], monkeypatch)
    with pytest.raises(ValueError, match="'decaf' re-factors B and A every round"):
        parse(["--method", "decaf", "--optimizer-state", "persistent"], monkeypatch)
    # A misspelt split used to pass until the model and data had loaded, minutes later on an edge device.
    with pytest.raises(ValueError, match="--split: unknown shard scheme 'label-skw'"):
        parse(["--split", "label-skw"], monkeypatch)
    assert parse(["--split", "dirichlet:0.5"], monkeypatch).split == "dirichlet:0.5"


def test_the_schedule_is_canonical_so_that_equal_settings_agree_however_they_were_written(monkeypatch) -> None:
    """Peers compare it as a string: a default written out, or 0.10 for 0.1, must not refuse a peer."""
    assert parse([], monkeypatch).schedule() == "tad T=5 p=1.0 max-neighbors=all"
    assert parse(["--switch-interval", "5"], monkeypatch).schedule() == parse([], monkeypatch).schedule()
    assert parse(["--link-prob", "0.10"], monkeypatch).schedule() == "tad T=5 p=0.1 max-neighbors=all"
    assert parse(["--link-prob", "1"], monkeypatch).schedule() == parse([], monkeypatch).schedule()
    assert parse(["--method", "rolora"], monkeypatch).schedule() == "rolora T=1 p=1.0 max-neighbors=all"
    assert parse(["--method", "lora", "--max-neighbors", "4"], monkeypatch).schedule() == (
        "lora T=none p=1.0 max-neighbors=4"
    )
    # What may differ between the nodes of one cluster is left out: they may still mix.
    assert parse(["--shard", "1", "--num-shards", "2", "--split", "iid", "--exchange-timeout", "5"],
                 monkeypatch).schedule() == parse([], monkeypatch).schedule()  # fmt: skip
    assert parse([], monkeypatch, TADLORA_LINK_PROB="0.10").schedule() == "tad T=5 p=0.1 max-neighbors=all"


@pytest.mark.parametrize("address", ["", "not-an-ip", "10.0.0.5:7070", "0.0.0.0", "224.0.0.251"])  # noqa: S104 - refused, never bound
def test_an_advertise_address_peers_could_not_call_back_is_refused(monkeypatch, address: str) -> None:
    # with static peers too, not only when mDNS announces it: handshakes tell peers to call this address back
    with pytest.raises(ValueError, match="--advertise-address"):
        parse(["--peers", "10.0.0.7:7070", "--advertise-address", address], monkeypatch)
    with pytest.raises(ValueError, match="TADLORA_ADVERTISE_ADDRESS"):
        parse(["--peers", "10.0.0.7:7070"], monkeypatch, TADLORA_ADVERTISE_ADDRESS=address)
    assert parse(["--advertise-address", "10.0.0.5"], monkeypatch).advertise_address == "10.0.0.5"


def test_help_names_the_environment_variables(capsys) -> None:
    with pytest.raises(SystemExit):
        build_run_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("TADLORA_PEERS", "TADLORA_MDNS_INTERFACE", "TADLORA_LINK_PROB", "TADLORA_METRICS_PORT"):
        assert name in text
    # The first example is two lines joined by a shell continuation, so that it pastes into a shell as shown.
    assert "--out runs/n0 \\\n               --node-id n0" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shard", "3", "--num-shards", "2"], "--shard 3"),
        (["--link-prob", "0"], "--link-prob"),
        (["--method", "lora", "--switch-interval", "3"], "does not apply"),
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--peers", ""], "--peers"),
        # refused before the model loads: each would otherwise fail later, most as a traceback
        (["--metrics-port", "70000"], "--metrics-port 70000"),
        (["--metrics-port", "7071", "--health-port", "7071"], "--metrics-port 7071"),
        (["--metrics-port", "7070", "--listen", "127.0.0.1:7070"], "--metrics-port 7070"),
        (["--eval-samples", "0"], "--eval-samples must be >= 1"),
        (["--samples-per-client", "0", "--split", "iid"], "--samples-per-client must be >= 1"),
        (["--peer-wait", "nan"], "--peer-wait"),
        (["--exchange-timeout", "nan"], "--exchange-timeout"),
        (["--lr", "nan"], "learning rate must be > 0 and finite"),
        (["--lora-alpha", "nan"], "LoRA alpha must be > 0 and finite"),
        (["--cluster", ""], "--cluster must not be empty"),
        # each of these used to pass here and fail after the model had loaded: as a traceback, or exit 1 naming no flag
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--exchange-timeout", "inf"], "--exchange-timeout"),
        (["--exchange-timeout", "1e12"], "--exchange-timeout"),
        (["--listen", "::1:7070"], "IPv6 addresses need brackets"),
        # it is the address peers are told to dial back, and they refuse one that is no HOST:PORT
        (["--listen", "my_host:7070"], "'my_host' is neither an IPv4 address nor a host name"),
        (["--listen", "[fe80::1%eth0]:7070"], "peers would refuse it as this node's address: 'fe80::1%eth0' has"),
        (["--min-peers", "-1"], "--min-peers must be >= 0"),
        # each names the one flag that is wrong, and its value, as the others do
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--max-neighbors", "1"], "--max-neighbors must be >= 2 (a ring keeps the graph connected), got 1"),
        (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 1, got -1"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:x"], "--device must be"),
        # a --dataset whose form alone is wrong: it failed once the model had loaded, exit 1, restarted for ever
        (["--insecure", "--dataset", "glue:FOO"], "--dataset: unknown GLUE task 'FOO'; known tasks: MNLI"),
        (["--insecure", "--dataset", "builtin:sst3"], "--dataset: unknown builtin dataset 'sst3'"),
        (["--insecure", "--dataset", "hub:a//b"], "--dataset: dataset spec 'hub:a//b': expected hub:NAME"),
        (["--insecure", "--dataset", "train.txt"], "--dataset: unrecognised dataset spec 'train.txt'"),
        (["--insecure", "--dataset", "train.csv?txt=a"], "unknown option(s) ['txt']"),
    ],
)
def test_bad_settings_exit_2_with_a_reason(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-targets", "nosuchmodule"], "no module of 'tiny' matches LoRA targets nosuchmodule"),
        (["--max-length", "1000"], "max_length 1000 is past the 256 tokens the model takes"),
    ],
)
def test_settings_the_model_cannot_take_exit_2_once_it_has_loaded(tmp_path, argv, message, capsys) -> None:
    """Found only once the model is built, and then exit 1 (what a restart may fix): systemd and Compose restarted
    the node every few seconds for ever, loading the model each time. No restart fixes them: exit 2."""
    common = ["--insecure", "--model", "tiny", "--peers", "127.0.0.1:1", "--min-peers", "0", "--rounds", "1"]
    assert main([*common, "--out", str(tmp_path / "out"), "--log-format", "json", *argv]) == 2
    assert f"tadlora-node: error: {message}" in capsys.readouterr().err
    # whereas a dataset file not there (yet: a volume still to mount) is what a restart may fix
    missing = ["--dataset", str(tmp_path / "later" / "train.csv")]
    assert main([*common, "--out", str(tmp_path / "out2"), "--log-format", "json", *missing]) == 1


def test_tls_files_a_node_cannot_use_exit_2_before_the_model_loads(tmp_path, capsys) -> None:
    """Missing or foreign certificates are fixed by a person, not by a restart: exit 2, which the systemd unit's
    RestartPreventExitStatus=2 takes as "stop restarting" (exit 1 restarted it every 5 s for ever)."""
    assert main(["certs", "init", str(tmp_path / "certs"), "--cluster", "c"]) == 0
    assert main(["certs", "issue", "node-1", "--dir", str(tmp_path / "certs")]) == 0
    capsys.readouterr()
    # --model points nowhere: reaching the model would fail differently (exit 1), so exit 2 means "refused first".
    common = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--node-id", "node-0"]
    assert main([*common, "--tls-dir", str(tmp_path / "certs")]) == 2
    assert "TLS files missing" in capsys.readouterr().err  # node-0 has no certificate there
    (tmp_path / "certs" / "node-0.crt").write_bytes((tmp_path / "certs" / "node-1.crt").read_bytes())
    (tmp_path / "certs" / "node-0.key").write_bytes((tmp_path / "certs" / "node-1.key").read_bytes())
    assert main([*common, "--tls-dir", str(tmp_path / "certs")]) == 2
    assert "is issued to ['node-1'], not to node id 'node-0'" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """`main`'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--log-level", "verbose"], {}, "--log-level: invalid choice: 'VERBOSE'"),
        (["--help"], {"TADLORA_LORA_TARGETS": ","}, "TADLORA_LORA_TARGETS=',': expected a comma-separated list"),
        ([], {"TADLORA_LOG_FORMAT": "xml"}, "TADLORA_LOG_FORMAT='xml': invalid choice (choose from auto, json, text)"),
        ([], {"TADLORA_LOG_LEVEL": "verbose"}, "TADLORA_LOG_LEVEL='verbose': invalid choice"),
        # argparse prints "invalid parse_robust_mixing value" for a ValueError: the reason must get through
        (["--robust-mixing", "clip:x"], {}, "--robust-mixing: robust mixing 'clip:x': 'x' is not a number"),
        (["--robust-mixing", "clip:-1"], {}, "--robust-mixing: clip:TAU needs a finite TAU > 0"),
        # a switch's variable that is neither on nor off used to be read as off, silently
        ([], {"TADLORA_INSECURE": "y"}, "TADLORA_INSECURE='y': expected 1/true/yes/on or 0/false/no/off"),
        # the variable's flag is named too, as argparse names it for a value on the command line
        ([], {"TADLORA_ROUNDS": "ten"}, "error: argument --rounds: TADLORA_ROUNDS='ten': invalid literal for int()"),
        ([], {"TADLORA_LOG_FORMAT": "xml"}, "error: argument --log-format: TADLORA_LOG_FORMAT='xml'"),
        ([], {"TADLORA_INSECURE": "y"}, "error: argument --insecure/--no-insecure: TADLORA_INSECURE='y'"),
        # an empty path was the working directory: a blank TADLORA_OUT wrote the run wherever the process started
        ([], {"TADLORA_OUT": ""}, "error: argument --out: TADLORA_OUT='': an empty path"),
        (["--tls-dir", " "], {}, "error: argument --tls-dir: an empty path"),
    ],
)
def test_a_bad_flag_or_environment_value_exits_2_with_one_line_not_a_traceback(
    argv, env, message, monkeypatch, capsys
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # "--listen nonsense" exits 2 from config_from_args without that message, so a regression never starts a node
    assert exit_code([*argv, "--insecure", "--listen", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_empty_path_is_refused_by_status_and_the_simulator_too(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TADLORA_TLS_DIR", "")
    assert exit_code(["status", "127.0.0.1:1"]) == 2
    assert "argument --tls-dir: TADLORA_TLS_DIR='': an empty path" in capsys.readouterr().err
    from tadlora.sim.cli import main as sim_main

    with pytest.raises(SystemExit) as exited:
        sim_main(["--preset", "smoke", "--out", ""])
    assert exited.value.code == 2 and "argument --out: an empty path" in capsys.readouterr().err


def test_a_setting_refused_after_parsing_names_the_variable_that_set_it(monkeypatch, capsys) -> None:
    # In a container the flag named in the error is nowhere on the command line: say which variable it came from.
    monkeypatch.setenv("TADLORA_LINK_PROB", "2")
    monkeypatch.setenv("TADLORA_NUM_SHARDS", "2")
    assert main(["--insecure", "--shard", "3"]) == 2
    err = capsys.readouterr().err
    assert "--link-prob must be in (0, 1]" not in err  # the shard is checked first
    assert "--num-shards is TADLORA_NUM_SHARDS='2'" in err and "TADLORA_SHARD" not in err
    assert main(["--insecure"]) == 2
    assert "--link-prob is TADLORA_LINK_PROB='2'" in capsys.readouterr().err
    assert main(["--insecure", "--link-prob", "3"]) == 2  # the flag wins: the variable is not blamed
    assert "TADLORA_LINK_PROB" not in capsys.readouterr().err


def test_a_node_id_off_the_syntax_names_the_flag_and_the_variable_that_set_it(tmp_path, monkeypatch, capsys) -> None:
    """The refusal "node id 'Node-0' is not ..." named neither --node-id nor TADLORA_NODE_ID, the only place it is
    set in a container or unit; `status` said it as a TLS error after the certificate lookup."""
    monkeypatch.setenv("TADLORA_NODE_ID", "Node-0")
    for argv in (["--insecure"], ["status", "127.0.0.1:1", "--tls-dir", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--node-id: node id 'Node-0' is not" in err and "(--node-id is TADLORA_NODE_ID='Node-0')" in err, err


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_a_switch_s_variable_turns_it_on_and_off(monkeypatch, value: str) -> None:
    monkeypatch.setenv("TADLORA_INSECURE", value)
    assert build_run_parser().parse_args([]).insecure
    for off in ("0", "false", "No", "off", ""):
        monkeypatch.setenv("TADLORA_INSECURE", off)
        assert not build_run_parser().parse_args([]).insecure
        assert build_run_parser().parse_args(["--insecure"]).insecure


@pytest.mark.parametrize(
    ("build", "flag", "variable", "required"),
    [
        ("tadlora.node.cli:build_run_parser", "insecure", "TADLORA_INSECURE", []),
        ("tadlora.node.doctor:build_doctor_parser", "json", "TADLORA_JSON", []),
        ("tadlora.sim.cli:build_parser", "report_only", "TADLORA_REPORT_ONLY", ["--out", "grid"]),
        ("tadlora.sim.cli:build_parser", "quiet", "TADLORA_QUIET", ["--out", "grid"]),
    ],
)
def test_a_switch_turned_on_by_its_variable_can_be_turned_off_by_a_flag(
    monkeypatch, build: str, flag: str, variable: str, required: list[str]
) -> None:
    """A compose file or unit that sets TADLORA_INSECURE=1 for a demo must not leave one node unable to ask for TLS
    (or a grid's TADLORA_REPORT_ONLY=1 one run unable to compute) short of editing the environment."""
    import importlib

    module, _, name = build.partition(":")
    parser_of = getattr(importlib.import_module(module), name)
    monkeypatch.setenv(variable, "1")
    assert getattr(parser_of().parse_args(required), flag) is True
    negated = "--no-" + flag.replace("_", "-")
    assert getattr(parser_of().parse_args([*required, negated]), flag) is False


def test_a_listen_host_peers_never_see_need_not_be_one_they_would_accept(tmp_path) -> None:
    """With --advertise-address the peers are told that address, not the --listen host: a name only this host
    resolves (an /etc/hosts entry with an underscore) is then the node's own business."""
    from tadlora.node.peerspec import PeersOption

    told = NodeConfig(out=tmp_path, listen="my_host:7070", advertise_address="10.0.0.5",
                      peers=PeersOption(False, ("10.0.0.6:7070",), ()), insecure=True)  # fmt: skip
    assert told.advertised_host([]) == "10.0.0.5"


def test_status_all_and_table_are_never_turned_on_by_a_nodes_environment(monkeypatch) -> None:
    """The HEALTHCHECK runs `tadlora-node status` in the node's environment: a TADLORA_ALL there would make the
    node's health the whole cluster's (exit 1 for any neighbour down). The two take no variable."""
    from tadlora.node.admin import build_status_parser

    monkeypatch.setenv("TADLORA_ALL", "1")
    monkeypatch.setenv("TADLORA_TABLE", "1")
    parsed = build_status_parser().parse_args(["127.0.0.1:7070"])
    assert (parsed.all, parsed.table) == (False, False)
    assert build_status_parser().parse_args(["127.0.0.1:7070", "--all", "--table"]).all is True
    shown = build_status_parser().format_help()
    assert "TADLORA_ALL" not in shown and "TADLORA_TABLE" not in shown and "TADLORA_TIMEOUT" in shown


def test_log_level_takes_any_case_from_a_flag_or_the_environment(monkeypatch) -> None:
    assert build_run_parser().parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    monkeypatch.setenv("TADLORA_LOG_LEVEL", "warning")
    assert build_run_parser().parse_args([]).log_level == "WARNING"


def test_text_logs_escape_what_a_peer_said_that_a_terminal_would_act_on(capsys) -> None:
    """On a terminal the node logs text, and a refusal's detail is the peer's own words: a terminal escape (one that
    clears the screen) or a line break and a forged line in it is logged escaped, on the one line. A traceback still
    follows on lines of its own."""
    from tadlora.node.cli import setup_logging

    root, node_log = logging.getLogger(), logging.getLogger("tadlora")
    saved = (root.handlers[:], root.level, node_log.level)
    try:
        assert setup_logging("text", "INFO") is None
        capsys.readouterr()
        detail = "\x1b[2Jnot ours\n12:00:00 INFO    peer n9 verified at 10.0.0.9:7070 (static)"
        logging.getLogger("tadlora.node").info("exchange with %s in round %d refused: %s: %s", "n1", 4, "BAD", detail)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("tadlora.node").exception("with a traceback")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        node_log.setLevel(saved[2])
    first, second, *traceback = err.splitlines()
    assert first.endswith(" INFO    exchange with n1 in round 4 refused: BAD: \\x1b[2Jnot ours\\n12:00:00 INFO    "
                          "peer n9 verified at 10.0.0.9:7070 (static)"), first  # fmt: skip
    assert "\x1b" not in err and second.endswith(" ERROR   with a traceback")
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "RuntimeError: boom"


def test_certs_init_into_a_directory_it_cannot_create_exits_2_naming_it(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert main(["certs", "init", str(tmp_path / "file" / "certs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tadlora-node certs: error:") and str(tmp_path / "file") in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # gRPC dialled port 443 for a missing port and 99999 - 65536 = 34463 for one past the last
        (["127.0.0.1"], "expected HOST:PORT"),
        (["127.0.0.1:99999"], "port '99999' is not a number in 1..65535"),
        (["::1:7070"], "IPv6 addresses need brackets"),
        (["127.0.0.1:7070,127.0.0.1:7071"], "status asks one node"),
        (["127.0.0.1:7070", "--timeout", "0"], "--timeout must be > 0"),
        (["127.0.0.1:7070", "--timeout", "nan"], "--timeout must be > 0"),
        (["127.0.0.1:7070", "--timeout", "-1"], "--timeout must be > 0"),
    ],
)
def test_status_refuses_an_address_or_timeout_it_cannot_use_with_exit_2(argv, message, capsys) -> None:
    assert main(["status", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tadlora-node status: error:") and message in err, err


@pytest.mark.parametrize("kept", ['["n0"]', '"n0"', "null"])
def test_status_with_an_out_whose_node_json_is_not_an_object_asks_for_the_node_id(tmp_path, capsys, kept) -> None:
    (tmp_path / "node.json").write_text(kept)
    assert main(["status", "127.0.0.1:7070", "--tls-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "needs --node-id" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_status_pointed_at_a_health_port_says_to_use_the_listen_port_not_tls(capsys) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        code = await asyncio.to_thread(main, ["status", f"127.0.0.1:{port}", "--timeout", "5"])
    finally:
        await server.stop(None)
    assert code == 1
    err = capsys.readouterr().err
    assert "--health-port" in err and "--listen HOST:PORT" in err and "--tls-dir" not in err, err


def test_status_pointed_at_an_http_port_says_to_use_the_listen_port_not_tls(capsys) -> None:
    """The --metrics-port speaks HTTP/1: gRPC fails to parse its answer, and TLS flags would not help."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = main(["status", f"127.0.0.1:{server.server_address[1]}", "--timeout", "5"])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == 1 and "--metrics-port" in err and "--listen HOST:PORT" in err and "--tls-dir" not in err, err


@pytest.mark.parametrize("address", ["dns:localhost:7070", "auto"])
def test_status_given_a_peers_source_says_it_takes_one_host_port(address: str, capsys) -> None:
    assert main(["status", address]) == 2
    assert "status asks one node, at its HOST:PORT (not auto or dns:NAME)" in capsys.readouterr().err


def test_status_certs_and_version_start_without_importing_torch(tmp_path) -> None:
    """A HEALTHCHECK runs `status` every 30 s: the installed script must not pay torch's import (seconds) for it,
    with TLS neither (nor for `--version`). Run in fresh interpreters, as a container runs them;
    PYTHONPROFILEIMPORTTIME lists what each imported."""
    with socket.socket() as s:  # a port where nothing listens: status gets as far as connecting, then exits 1
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    certs = str(tmp_path / "certs")
    commands = [
        (["--version"], 0),
        (["certs", "init", certs], 0),
        (["certs", "issue", "n0", "--dir", certs], 0),
        (["status", address, "--timeout", "2", "--tls-dir", certs, "--node-id", "n0"], 1),
        (["status", address, "--timeout", "2"], 1),
    ]
    for argv, code in commands:
        result = subprocess.run(
            [console_script("tadlora-node"), *argv], capture_output=True, text=True, timeout=60, check=False,
            env=node_env({"PYTHONPROFILEIMPORTTIME": "1"}),
        )  # fmt: skip
        assert result.returncode == code, (argv, result.stderr[-2000:])
        assert heavy_imports(result.stderr) == set(), argv
        assert "import time:" in result.stderr  # the profile ran, so the check above saw the imports
    assert "nothing accepts connections there" in result.stderr


_EXEC_WITH_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def test_ctrl_c_in_the_installed_script_exits_130_without_a_traceback() -> None:
    """The console script calls `entry.main` itself (no `python -m` guard): a Ctrl-C before a run's own handlers
    are in (while it imports torch) or during `status` or `doctor`, which have none, used to print a traceback."""
    import signal

    with socket.socket() as listener:  # accepts the TCP connection, never answers: status waits for its --timeout
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        # Through an exec that gives SIGINT its default first: a suite started in the background of a
        # non-interactive shell (`pytest ... &`, nohup) hands its processes SIGINT ignored, which Python (and so
        # asyncio.run) keeps, as POSIX asks of a background job; the status would then rightly ignore the Ctrl-C.
        process = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_DEFAULT_SIGINT, console_script("tadlora-node"),
             "status", f"127.0.0.1:{listener.getsockname()[1]}", "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=node_env(),
        )  # fmt: skip
        try:
            connection, _ = listener.accept()  # status is past its imports, inside asyncio.run
            with connection:
                process.send_signal(signal.SIGINT)
                _, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGINT, err
    assert err == "tadlora-node: interrupted\n"


_SCRIPT_THEN = """
import atexit, sys, threading, time
from pathlib import Path
from tadlora.node import entry
here = Path(sys.argv[1])
atexit.register(lambda: (here / "torn-down").touch())  # the interpreter's own exit ran
returned = threading.Event()
real_main = entry.main
entry.main = lambda: (real_main(), returned.set())[0]
if sys.argv[2] == "thread":  # a thread still at work when main returns: it must not be cut short
    threading.Thread(target=lambda: (returned.wait(), time.sleep(0.5), (here / "thread-done").touch())).start()
sys.argv = ["tadlora-node", *sys.argv[3:]]
entry.script()
"""


@pytest.mark.parametrize("then", ["alone", "thread"])
def test_the_installed_script_skips_the_interpreter_s_teardown_unless_a_thread_is_still_at_work(tmp_path, then) -> None:
    """After a run, tearing torch and gRPC down object by object took 1 to 4.6 s between the node's last line and
    its exit, in the stop time that Docker and systemd count. `entry.script` (the console script's target, and
    ``python -m tadlora.node.entry``'s) flushes and ends the process at once: the output is whole, the exit code
    main's; but where another thread still runs, the exit is the usual one, which waits for it."""
    from importlib.metadata import entry_points

    [installed] = [e for e in entry_points(group="console_scripts") if e.name == "tadlora-node"]
    assert installed.value == "tadlora.node.entry:script"
    bad = ["--insecure", "--peers", "127.0.0.1:1", "--link-prob", "2"]  # main returns 2, before any heavy import
    for argv, code in ((["--version"], 0), (bad, 2)):
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT_THEN, str(tmp_path), then, *argv],
            capture_output=True, text=True, env=node_env(), timeout=120,
        )  # fmt: skip
        assert done.returncode == code, done.stderr
        assert done.stdout.startswith("tadlora-node ") if code == 0 else "--link-prob" in done.stderr, done
        for marker in ("torn-down", "thread-done"):
            assert (tmp_path / marker).exists() is (then == "thread")
            (tmp_path / marker).unlink(missing_ok=True)


def test_a_wildcard_listen_that_peers_could_not_call_back_exits_2_naming_the_flag_to_set(
    tmp_path, monkeypatch, capsys
) -> None:
    """The flags alone decide it, so no restart fixes it: exit 2 (RestartPreventExitStatus=2), not 1, before the
    model loads (--model points nowhere: reaching it would fail otherwise), naming where --listen came from."""
    argv = ["--peers", "127.0.0.1:1", "--insecure", "--model", str(tmp_path / "no-model"), "--rounds", "1",
            "--min-peers", "0", "--device", "cpu", "--out", str(tmp_path / "n0")]  # fmt: skip
    assert main(["--listen", "0.0.0.0:0", *argv]) == 2
    err = capsys.readouterr().err
    assert "--listen 0.0.0.0:0" in err and "--advertise-address" in err
    monkeypatch.setenv("TADLORA_LISTEN", "0.0.0.0:7070")  # as the image sets it
    assert main(argv) == 2
    assert "(--listen is TADLORA_LISTEN='0.0.0.0:7070')" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["localhost:0", "[::1]:0"])
def test_an_mdns_node_whose_listen_host_its_advert_cannot_name_exits_2_naming_the_flag(
    listen: str, tmp_path, capsys
) -> None:
    """mDNS announces the --listen host, as IPv4 only: a host name or an IPv6 one used to fail once the model had
    loaded, with exit 1 (restarted for ever) naming an internal field, "advertise_address 'localhost'". Now
    exit 2 before the model loads (--model points nowhere), naming --listen and the two ways out."""
    argv = ["--peers", "auto", "--mdns-interface", "127.0.0.1", "--insecure", "--model", str(tmp_path / "no-model"),
            "--rounds", "1", "--min-peers", "0", "--device", "cpu", "--out", str(tmp_path / "n0")]  # fmt: skip
    assert main(["--listen", listen, *argv]) == 2
    err = capsys.readouterr().err
    assert f"--listen {listen}: mDNS (--peers auto) announces the --listen host" in err
    assert "--advertise-address" in err and "advertise_address" not in err


@pytest.mark.parametrize(
    ("argv", "listen"),
    [
        (["--peers", "auto"], "0.0.0.0:7070"),  # on the default route's interface: the LAN
        (["--peers", "auto", "--mdns-interface", "eth9"], "0.0.0.0:7070"),  # a name this host lacks: not loopback
        (["--peers", "auto,10.0.0.5:7070"], "0.0.0.0:7070"),
        (["--peers", "auto", "--mdns-interface", "127.0.0.1"], "127.0.0.1:7070"),  # a cluster on this host
        (["--peers", "auto", "--mdns-interface", "lo"], "127.0.0.1:7070"),
        (["--peers", "10.0.0.5:7070"], "127.0.0.1:7070"),  # no mDNS to announce an address: the node warns
        (["--peers", "dns:tadlora.default.svc"], "127.0.0.1:7070"),
        (["--peers", "auto", "--listen", "127.0.0.1:7071"], "127.0.0.1:7071"),  # given: as given
    ],
)
def test_the_default_listen_serves_the_network_an_mdns_node_announces_itself_on(
    argv: list[str], listen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tadlora-node --peers auto` listened on 127.0.0.1 and announced that to the LAN: every other node dialled
    itself there, and none ever mixed (seen on two hosts of a testbed). Now it listens on every address and
    announces its interface's; a cluster on this host alone keeps loopback."""
    assert parse(argv, monkeypatch).listen == listen
    assert parse(argv, monkeypatch, TADLORA_LISTEN="127.0.0.1:7072").listen == (
        "127.0.0.1:7072" if "--listen" not in argv else listen
    )


@pytest.mark.asyncio
async def test_a_loopback_listen_given_to_static_peers_on_other_hosts_is_warned_of(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer on another host told 127.0.0.1:PORT dials itself there; the node used to say nothing of it (doctor's
    `listen` check did). Two static peers that cannot answer here: the node runs its round alone all the same."""
    peers = PeersOption(False, ("192.0.2.7:7070", "127.0.0.1:7999"), ())
    config = node_config(tmp_path, 0, 1, peers, rounds=1, min_peers=0, listen="127.0.0.1:0")
    with caplog.at_level(logging.WARNING, logger="tadlora.node"):
        async with Node(config) as node:
            await node.run()
    warned = [r.getMessage() for r in caplog.records if "is reachable from this host only" in r.getMessage()]
    assert warned == [
        "--listen 127.0.0.1:0 is reachable from this host only, but static peers on other hosts (192.0.2.7:7070) "
        "are told 127.0.0.1:0, which each of them dials on itself: --listen 0.0.0.0:0 (or this host's address on "
        "the peers' network), or set --advertise-address; keep a loopback --listen only when every node runs on "
        "this host"
    ], caplog.text
    caplog.clear()
    local = node_config(tmp_path / "b", 0, 1, PeersOption(False, ("127.0.0.1:7999",), ()), rounds=1, min_peers=0)
    with caplog.at_level(logging.WARNING, logger="tadlora.node"):
        async with Node(local) as node:
            await node.run()
    assert "is reachable from this host only" not in caplog.text  # every peer on this host: nothing to say


def test_an_mdns_interface_that_names_nothing_here_is_said_before_the_data_and_model_load(tmp_path, capsys) -> None:
    """It was said only once the dataset and the model had loaded (a minute for a large model). Exit 1 as before:
    an interface that comes up later (Wi-Fi, a lease at boot) is there for the restart. --dataset and --model point
    nowhere, so reaching either would fail with its own message; --out is not touched."""
    argv = ["--peers", "auto", "--mdns-interface", "nosuch0", "--listen", "127.0.0.1:0", "--insecure", "--model",
            str(tmp_path / "no-model"), "--dataset", str(tmp_path / "no-data.csv"), "--rounds", "1", "--device",
            "cpu", "--out", str(tmp_path / "n0")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--mdns-interface 'nosuch0': no such interface; have " in err and "lo" in err, err
    assert "--dataset" not in err and "no-model" not in err, err
    assert not (tmp_path / "n0").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_cuda_device_on_a_machine_without_one_is_said_before_the_data_loads(tmp_path, capsys) -> None:
    """--dataset points nowhere: the device was resolved after the data had been read (seconds for MNLI's
    400,000 lines), so it is reached first only if the device is checked first."""
    argv = ["--peers", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--insecure", "--dataset",
            str(tmp_path / "no-data.csv"), "--rounds", "1", "--device", "cuda",
            "--out", str(tmp_path / "n0")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu or auto)" in err, err
    assert "--dataset" not in err, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_prometheus_metrics_are_served(tmp_path) -> None:
    port = free_port()
    config = node_config(tmp_path, 0, 1, NO_PEERS, rounds=2, min_peers=0, metrics_port=port)
    async with Node(config) as node:
        await node.run()
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
    assert "tadlora_rounds_total 2.0" in body
    assert "tadlora_round " in body and "tadlora_train_loss" in body


def test_loss_and_accuracy_are_nan_until_there_is_one_not_zero() -> None:
    """A gauge starts at 0: an accuracy of 0 before the first evaluation would read as a broken model (and fire an
    alert on every restart); `status` says null then, and the metrics say NaN."""
    metrics = NodeMetrics()
    for name in ("tadlora_train_loss", "tadlora_eval_accuracy"):
        assert math.isnan(metrics.registry.get_sample_value(name)), name


@pytest.mark.asyncio
async def test_a_resumed_node_s_round_metric_is_its_checkpoint_s_round_before_its_first_round(tmp_path) -> None:
    async with Node(node_config(tmp_path, 0, 1, NO_PEERS, rounds=2, min_peers=0, checkpoint_every=1)) as node:
        await node.run()
    async with Node(node_config(tmp_path, 0, 1, NO_PEERS, rounds=4, min_peers=0)) as resumed:
        assert resumed.metrics.registry.get_sample_value("tadlora_round") == 2  # while it waits for peers


@pytest.mark.asyncio
async def test_closing_a_node_with_metrics_does_not_stall_the_event_loop(tmp_path) -> None:
    config = node_config(tmp_path, 0, 1, NO_PEERS, rounds=1, min_peers=0, metrics_port=0)
    async with Node(config) as node:
        await node.run()
        gaps: list[float] = []

        async def tick() -> None:
            loop = asyncio.get_running_loop()
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - before)

        ticker = asyncio.create_task(tick())
        try:
            await node.aclose()
        finally:
            ticker.cancel()
    # The HTTP server's shutdown waits for its poll loop (0.5 s); on the loop, that stalled every other task.
    assert gaps and max(gaps) < 0.25, max(gaps, default=None)


def test_metrics_serve_on_an_ipv6_listen_host_and_say_where(caplog) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    metrics = NodeMetrics()
    with caplog.at_level(logging.INFO, logger="tadlora.node"):
        metrics.serve(0, "[::1]")  # the host of --listen [::1]:7070, brackets and all
    try:
        port = metrics.port
        assert f"http://[::1]:{port}/metrics" in caplog.text  # port 0 picks one: the log is where to find it
        body = urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5).read().decode()
        assert "tadlora_rounds_total 0.0" in body
    finally:
        metrics.close()


WILDCARD = "0.0.0.0"  # noqa: S104 -- an ephemeral port of this test's own, closed at its end


def scrape(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=5).read().decode())  # noqa: S310 -- http://, built here


@pytest.mark.parametrize("wildcard", [WILDCARD, "[::]"])
def test_metrics_on_a_wildcard_listen_host_answer_ipv4_and_ipv6_alike(wildcard: str) -> None:
    """As gRPC serves a wildcard --listen: the shipped files' 0.0.0.0 must be scrapable on an IPv6 network too."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    metrics = NodeMetrics()
    metrics.serve(0, wildcard)
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert "tadlora_rounds_total 0.0" in scrape(f"http://{host}:{metrics.port}/metrics"), host
    finally:
        metrics.close()


def test_metrics_on_a_wildcard_fall_back_to_ipv4_on_a_host_without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel booted without IPv6 refuses the family (EAFNOSUPPORT): IPv4 alone is served, not an error."""

    def no_ipv6(self: object) -> None:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(metrics_module._DualStackServer, "server_bind", no_ipv6)
    metrics = NodeMetrics()
    metrics.serve(0, WILDCARD)
    try:
        assert "tadlora_rounds_total 0.0" in scrape(f"http://127.0.0.1:{metrics.port}/metrics")
    finally:
        metrics.close()


def test_a_wildcard_metrics_port_taken_on_ipv4_is_an_error_naming_the_flag() -> None:
    """Not served on IPv6 alone: the IPv4 scrapers would find another process's port."""
    with socket.socket() as taken:
        taken.bind((WILDCARD, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"--metrics-port {port}: cannot serve on 0.0.0.0:{port}"):
            NodeMetrics().serve(port, WILDCARD)


def test_a_metrics_port_in_use_is_an_error_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"--metrics-port {port}: cannot serve on 127.0.0.1:{port}"):
            NodeMetrics().serve(port, "127.0.0.1")


def test_a_node_out_of_gpu_memory_says_which_flags_shrink_a_step(tmp_path, monkeypatch, capsys) -> None:
    async def out_of_memory(config: object, json_fmt: object = None) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr("tadlora.node.cli.run_node", out_of_memory)
    argv = ["--node-id", "n0", "--out", str(tmp_path), "--listen", "127.0.0.1:0", "--model", "tiny"]
    assert main([*argv, "--peers", "127.0.0.1:1", "--insecure"]) == 1
    err = capsys.readouterr().err
    assert "CUDA out of memory" in err and "--batch-size" in err and "--max-length" in err


@pytest.mark.parametrize(("log_format", "times"), [("text", 1), ("json", 2)])
def test_a_fatal_error_is_said_once_on_a_terminal_and_also_as_a_record_in_json(
    tmp_path, monkeypatch, capsys, log_format: str, times: int
) -> None:
    """Text logs and the plain error line reach the same stderr: the error was printed twice there. JSON logs keep
    the record (a collector reads it) beside the line a person reads."""

    async def fails(config: object, json_fmt: object = None) -> int:
        raise RuntimeError("the model went away")

    monkeypatch.setattr("tadlora.node.cli.run_node", fails)
    argv = ["--node-id", "n0", "--out", str(tmp_path), "--listen", "127.0.0.1:0", "--model", "tiny", "--insecure"]
    assert main([*argv, "--peers", "127.0.0.1:1", "--log-format", log_format]) == 1
    err = capsys.readouterr().err
    assert err.count("the model went away") == times, err
    assert "tadlora-node: error: the model went away" in err


def test_a_dataset_that_fails_to_load_names_the_flag_and_the_variable_that_set_it(
    tmp_path, monkeypatch, capsys
) -> None:
    """A dataset is loaded once torch is (a mount may bring the file later: exit 1, retried). Its error named no flag,
    and in a container, where TADLORA_DATASET set it, no command line shows one."""
    monkeypatch.setenv("TADLORA_DATASET", str(tmp_path / "nope.csv"))
    argv = ["--listen", "127.0.0.1:0", "--peers", "127.0.0.1:1", "--model", "tiny", "--out", str(tmp_path / "o")]
    assert main([*argv, "--insecure", "--log-level", "error"]) == 1
    err = capsys.readouterr().err
    assert f"tadlora-node: error: --dataset: dataset spec '{tmp_path / 'nope.csv'}': file" in err, err
    assert f"(--dataset is TADLORA_DATASET='{tmp_path / 'nope.csv'}')" in err, err


def test_a_listen_port_in_use_says_what_holds_it_and_the_fix(tmp_path, capsys) -> None:
    """gRPC's own message ("Failed to bind ...; set GRPC_VERBOSITY=debug ...") named no cause; the node now says
    what `tadlora-node doctor` would."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--listen", f"127.0.0.1:{port}", "--peers", "127.0.0.1:1", "--model", "tiny", "--out", str(tmp_path)]
        assert main([*argv, "--insecure", "--log-level", "error"]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Address already in use" in err, err
    assert f"tadlora-node status 127.0.0.1:{port}" in err and "choose another --listen port" in err, err


@pytest.mark.parametrize("out", ["file", "file/run"])
def test_an_out_where_a_file_is_in_the_way_exits_2_naming_the_flag(tmp_path, monkeypatch, capsys, out) -> None:
    """It used to reach the node's mkdir, after torch had loaded: "[Errno 17] File exists: '...'" and exit 1."""
    (tmp_path / "file").write_text("")
    argv = ["--insecure", "--model", str(tmp_path / "no-model"), "--peers", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    assert main([*argv, "--out", str(tmp_path / out)]) == 2
    assert f"--out {tmp_path / out}: {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err
    monkeypatch.setenv("TADLORA_OUT", str(tmp_path / out))
    assert main(argv) == 2
    assert f"(--out is TADLORA_OUT='{tmp_path / out}')" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("limits", "wanted", "after"),
    [((64, 4096), 65536, (4096, 4096)), ((64, 4096), 1000, (1000, 4096)), ((2000, 4096), 1000, (2000, 4096))],
    ids=["to-the-hard-limit", "to-what-it-wants", "already-higher"],
)
def test_a_node_raises_its_open_file_limit_within_the_hard_one(limits, wanted, after) -> None:
    """A node at systemd's default soft limit (1024) failed its checkpoints with EMFILE while callers held its port;
    it raises the soft limit as far as the hard one lets it (run in a child: the limit is the process's)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    code = (
        "import resource; from tadlora.node.cli import raise_open_file_limit as r; "
        f"print(r({wanted}), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=limited, capture_output=True, text=True, timeout=120, check=True
    )
    raised = None if after == limits else (limits[0], after[0])
    assert proc.stdout.split("\n")[0] == f"{raised} {after}"


def test_an_out_that_cannot_be_created_names_the_flag(tmp_path, capsys) -> None:
    """A directory nobody can create in (procfs here; a read-only file system, a path outside the systemd unit's
    writable ones) failed as "[Errno 2] No such file or directory: '/proc/...'", naming no flag. Still exit 1: a
    mount that is not there yet may come."""
    out = "/proc/tadlora-no-such-dir/run"
    argv = ["--insecure", "--model", str(tmp_path / "no-model"), "--peers", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    assert main([*argv, "--out", out]) == 1
    assert f"tadlora-node: error: --out {out}: cannot create it: " in capsys.readouterr().err


def test_a_node_run_raises_its_open_file_limit_before_it_starts(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "raise_open_file_limit", lambda: calls.append(1))
    argv = ["--insecure", "--model", str(tmp_path / "no-model"), "--peers", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    assert main([*argv, "--out", "/proc/tadlora-no-such-dir/run"]) == 1
    assert calls == [1]


@pytest.mark.parametrize("kept", ["other-run", "damaged-checkpoint", "held"])
def test_an_out_no_restart_can_use_exits_2_and_one_held_by_a_running_node_exits_1(tmp_path, capsys, kept) -> None:
    """A supervisor restarts on failure (systemd: RestartPreventExitStatus=2): an --out that holds another run, or a
    damaged checkpoint, would be refused the same way by every restart, and looped on with exit 1. A held
    .node.lock clears once the node holding it stops: worth a restart."""
    from tadlora.node import state
    from tadlora.node.identity import save_identity

    out = tmp_path / "out"
    out.mkdir()
    argv = ["--node-id", "n0", "--out", str(out), "--listen", "127.0.0.1:0", "--model", "tiny", "--insecure",
            "--peers", "127.0.0.1:1", "--log-format", "text"]  # fmt: skip
    held = None
    if kept == "other-run":  # a run of another model (fingerprint)
        save_identity(out, "n0", "0" * 16, method="lora")
    elif kept == "damaged-checkpoint":
        (out / state.CHECKPOINT).write_bytes(b"not a checkpoint")
    else:
        held = state.hold_out(out)
    try:
        code = main(argv)
    finally:
        if held is not None:
            os.close(held)
    err = capsys.readouterr().err
    assert code == (1 if kept == "held" else 2), err
    assert {"other-run": "another model fingerprint", "damaged-checkpoint": "is damaged", "held": "in use"}[kept] in err


def test_version_names_the_release_python_and_the_libraries_alike_in_each_command(capsys) -> None:
    from importlib import metadata

    import tadlora
    from tadlora.node.entry import main as entry_main
    from tadlora.sim.cli import main as sim_main

    said = {}
    for name, run, argv in (
        ("fast", entry_main, ["--version"]),  # before any flag parsing: no torch import (test above)
        ("parser", entry_main, ["--insecure", "--version"]),  # from the run's own parser, among other flags
        ("sim", sim_main, ["--version"]),  # without the --out every other use of tadlora-sim needs
    ):
        try:
            code = run(argv)
        except SystemExit as exc:  # argparse's version action
            code = exc.code
        assert code in (0, None), name
        said[name] = capsys.readouterr().out.strip()
    expected = f"tadlora-node {tadlora.__version__} (Python {sys.version.split()[0]}; "
    assert said["fast"].startswith(expected), said
    assert f"torch {metadata.version('torch')}, transformers {metadata.version('transformers')}," in said["fast"]
    assert said["parser"] == said["fast"]
    assert said["sim"] == said["fast"].replace("tadlora-node", "tadlora-sim", 1)


def test_the_status_table_keeps_every_cell_within_64_characters_uptime_included() -> None:
    """A finite uptime can still be absurd (1e300 s from a node that lies): its cell is cut as the others are."""
    from tadlora.node.admin import status_table

    doc = {"node_id": "n0", "address": "10.0.0.5:7070", "round": 3, "state": "idle", "phase": "B", "release": "0.1.0",
           "neighbours": [], "candidates": [], "neighbours_total": 0, "candidates_total": 0, "last_loss": None,
           "last_accuracy": None, "uptime_seconds": 1e300}  # fmt: skip
    row = status_table([doc], []).splitlines()[1]
    assert len(row.split()[-1]) == 64 and row.split()[-1].endswith("...")
    assert status_table([{**doc, "uptime_seconds": 3725.0}], []).splitlines()[1].split()[-1] == "1h02m"
