"""The examples run as written (the fast ones here; the paper cell through its smoke path)."""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_example(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout, env=ENV,
        cwd=EXAMPLES,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_sim_on_your_own_model_and_data(tmp_path: Path) -> None:
    out = run_example("sim_own_model_and_data.py", "--out", str(tmp_path)).stdout
    assert "tad" in out and "lora" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {c["method"] for c in results["cells"]} == {"tad", "lora"}


def test_a_method_of_your_own_runs_in_the_simulator_and_the_node_takes_it(tmp_path: Path) -> None:
    """docs/simulator.md#extending: a module registers a method, then runs tadlora-sim or tadlora-node through it."""
    out = run_example("own_method.py", "sim", "--preset", "smoke", "--methods", "tad,lora-bmix", "--rounds", "2",
                      "--out", str(tmp_path), "--quiet").stdout  # fmt: skip
    assert "lora-bmix" in out
    cells = {c["method"]: c for c in json.loads((tmp_path / "results.json").read_text())["cells"]}
    bmix, tad = cells["lora-bmix"]["rounds"], cells["tad"]["rounds"]
    assert [r["phase"] for r in bmix] == ["AB", "AB"]
    assert bmix[-1]["consensus_a"] > 0  # A trains and is never mixed
    # B alone crosses a link: half of tad's A and B (A and B have the same size for square layers)
    assert [r["bytes"] / r["live_links"] for r in bmix] == [r["bytes"] / r["live_links"] / 2 for r in tad]
    plot = run_example("plot_results.py", str(tmp_path)).stdout.strip()
    assert Path(plot) == tmp_path / "consensus_ba_vs_round.png" and Path(plot).stat().st_size > 0
    assert "lora-bmix" in run_example("own_method.py", "node", "--help").stdout  # a choice of --method
    # Plain tadlora-sim on the directory: refused, naming the method it lacks and what to do.
    plain = [sys.executable, "-m", "tadlora.sim.cli", "--preset", "smoke", "--methods", "tad", "--rounds", "2"]
    proc = subprocess.run([*plain, "--report-only", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=ENV)  # fmt: skip
    assert proc.returncode == 2 and "has method 'lora-bmix', which this process has not registered" in proc.stderr


def test_a_link_pattern_and_a_diagnostic_of_your_own_through_the_python_api() -> None:
    lines = [json.loads(line) for line in run_example("own_topology.py", "--rounds", "3").stdout.splitlines()]
    assert [r["live_links"] for r in lines] == [2, 2, 2]  # a perfect matching of 4 clients each round
    assert lines[0]["max_client_distance_b"] > 0 and lines[1]["max_client_distance_b"] == 0  # 2 matchings: all mixed


def test_the_link_pattern_example_refuses_a_client_count_its_matching_does_not_fit() -> None:
    # 6 clients: round 0 links client 5 to client 7, which does not exist (a traceback from deep in the mixing).
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "own_topology.py"), "--clients", "6"],
        capture_output=True, text=True, timeout=120, env=ENV, cwd=EXAMPLES,
    )  # fmt: skip
    assert proc.returncode == 2 and "--clients must be a power of two" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_paper_cell_runs_through_its_smoke_path(tmp_path: Path) -> None:
    out = run_example("paper_cell.py", "--preset", "smoke", "--out", str(tmp_path)).stdout
    assert "rolora" in out and (tmp_path / "accuracy_vs_round.png").exists()
    # Another preset on that --out: refused in one line that says what this script can do, not a traceback that
    # named tadlora-sim's --config and --engine.
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "paper_cell.py"), "--preset", "cpu-sst2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=ENV, cwd=EXAMPLES,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("paper_cell.py: error: ") and "holds a run with different settings" in proc.stderr
    assert "(those are tadlora-sim's flags: paper_cell.py takes another --out" in proc.stderr


def test_paper_cell_refuses_an_unknown_preset_with_the_choices() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "paper_cell.py"), "--preset", "smok", "--out", "unused"],
        capture_output=True, text=True, timeout=120, env=ENV, cwd=EXAMPLES,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "invalid choice: 'smok'" in proc.stderr and "smoke" in proc.stderr and "Traceback" not in proc.stderr


def test_two_nodes_on_your_own_model_and_data(tmp_path: Path) -> None:
    run_example("node_own_model_and_data.py", "--out", str(tmp_path), "--rounds", "2")
    for i in range(2):
        records = [json.loads(line) for line in (tmp_path / f"own-{i}" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1]
        assert all(r["degree"] == 1 for r in records)
        assert (tmp_path / f"own-{i}" / "adapter" / "adapter_config.json").exists()
    # What the nodes trained, put to use: each text gets one of the dataset's labels and its probability.
    adapter = str(tmp_path / "own-0" / "adapter")
    info = json.loads((tmp_path / "own-0" / "adapter" / "tadlora.json").read_text())
    assert info["max_length"] == 16  # the nodes' --max-length
    lines = run_example("classify_with_adapter.py", adapter, "good fine great", "bad awful dull").stdout.splitlines()
    assert [line.split()[0] in ("0", "1") and 0.5 <= float(line.split()[1]) <= 1 for line in lines] == [True, True]
    assert lines[1].endswith("  bad awful dull")
    # On the dev set the node evaluated on at its last round (all 60 rows), it scores what the node said it did:
    # the export holds the factors that evaluation used, and classify reads texts as training did. The loss tells
    # (tiny is at chance either way): the factors the run started from give 0.69356 here, the trained ones 0.69308.
    dev = [json.loads(line) for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines()]
    said = run_example("classify_with_adapter.py", adapter, "--json", *(row["sentence"] for row in dev)).stdout
    docs = [json.loads(line) for line in said.splitlines()]
    assert [d["text"] for d in docs] == [row["sentence"] for row in dev]
    assert all(sum(d["probabilities"].values()) == pytest.approx(1.0) for d in docs)
    accuracy = sum(d["label"] == str(row["label"]) for d, row in zip(docs, dev, strict=True)) / len(dev)
    last = json.loads((tmp_path / "own-0" / "rounds.jsonl").read_text().splitlines()[-1])
    loss = -sum(math.log(d["probabilities"][str(row["label"])]) for d, row in zip(docs, dev, strict=True)) / len(dev)
    assert accuracy == last["eval_accuracy"] and loss == pytest.approx(last["eval_loss"], abs=1e-6)
    classify = [sys.executable, str(EXAMPLES / "classify_with_adapter.py")]
    odd = subprocess.run([*classify, adapter, "a", "b", "c", "--pairs"], capture_output=True, text=True, env=ENV,
                         timeout=120)  # fmt: skip
    assert odd.returncode == 2 and "--pairs takes the texts two by two, and 3 is odd" in odd.stderr
    elsewhere = subprocess.run([*classify, str(tmp_path), "a"], capture_output=True, text=True, env=ENV,
                               timeout=120)  # fmt: skip
    assert elsewhere.returncode == 2 and "is no tadlora export" in elsewhere.stderr
    for length, said in (("4", "--max-length must be >= 8"), ("300", "max_length 300 is past the 256 tokens")):
        proc = subprocess.run([*classify, adapter, "good", "--max-length", length], capture_output=True, text=True,
                              env=ENV, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # An export older than the length's record: a node's default, said.
    (tmp_path / "own-0" / "adapter" / "tadlora.json").write_text(json.dumps({k: v for k, v in info.items()
                                                                             if k != "max_length"}))  # fmt: skip
    old = subprocess.run([*classify, adapter, "good"], capture_output=True, text=True, env=ENV, timeout=120)
    assert old.returncode == 0 and "64, a node's default" in old.stderr, old.stderr


def test_local_cluster_quickstart(tmp_path: Path) -> None:
    # --out relative (to the example's working directory): the command it prints for another shell names it whole.
    relative = os.path.relpath(tmp_path, EXAMPLES)
    out = run_example("local_cluster.py", "--out", relative, "--rounds", "3", "--model", "tiny", "--eval-every", "3",
                      timeout=600).stdout  # fmt: skip
    assert out.count("3 rounds, 2 neighbours") == 3
    # Progress while it runs (the real demo is minutes of silence otherwise): node-0's every round, once.
    progress = [line for line in out.splitlines() if line.startswith("node-0 round ")]
    assert [line.split()[2] for line in progress] == ["1/3", "2/3", "3/3"], out
    assert "dev accuracy" in progress[-1]
    # Before node-0's first round: how to see them all, at node-0's address, with its certificate.
    [hint] = [i for i, line in enumerate(out.splitlines()) if line.startswith("to see every node while they run")]
    assert hint < out.splitlines().index(progress[0])
    command = shlex.split(out.splitlines()[hint].split(": ", 1)[1])
    [address] = re.findall(r"node node-0 serving on (\S+) ", (tmp_path / "node-0.log").read_text())
    assert command == [str(Path(sys.executable).parent / "tadlora-node"), "status", address, "--all", "--table",
                       "--tls-dir", str((tmp_path / "certs").resolve()), "--node-id", "node-0"]  # fmt: skip
    # After the run: a command that puts node-0's adapter to use, which runs as printed, from anywhere.
    [classify] = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("to classify with it: ")]
    proc = subprocess.run(shlex.split(classify), capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] in (
        [a, b] for a in ("negative", "positive") for b in ("negative", "positive")
    )


class FakeNode:
    """A stand-in for a node process that never exits on its own: what each example is left holding when it fails
    partway. It records the signals it gets, and exits on one (SIGINT included, as a node does)."""

    started: ClassVar[list[FakeNode]] = []

    def __init__(self, cmd: list[str], **kwargs: object) -> None:
        self.signals: list[int] = []
        self.returncode: int | None = None
        FakeNode.started.append(self)

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("node", timeout or 0)
        return self.returncode


def fail_partway(monkeypatch: pytest.MonkeyPatch, module: str, argv: list[str], where: str) -> list[FakeNode]:
    """Run ``module``'s main with its nodes faked and ``where`` (a function of it, or '' for none) raising; return
    the nodes it started."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module(module)
    FakeNode.started = []
    monkeypatch.setattr(subprocess, "Popen", FakeNode)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: None)  # certificates: not needed by fakes
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the example's handlers stay out of pytest's process
    monkeypatch.setattr(sys, "argv", [module, *argv])

    def broken(*args: object) -> None:
        raise RuntimeError("failed partway")

    if where:
        monkeypatch.setattr(example, where, broken)
    with pytest.raises((RuntimeError, subprocess.TimeoutExpired)):
        example.main()
    return FakeNode.started


def test_local_cluster_stops_its_nodes_when_it_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The nodes run in sessions of their own (Ctrl-C reaches the script only): an error other than Ctrl-C used
    to leave them running, training and holding their ports, after the script had exited."""
    nodes = fail_partway(monkeypatch, "local_cluster", ["--out", str(tmp_path)], "wait_with_progress")
    assert len(nodes) == 3 and all(n.signals == [signal.SIGINT] for n in nodes)


def test_two_nodes_example_stops_its_nodes_when_they_overrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nodes that outlive its 10-minute wait used to be left running when the timeout ended the script."""
    nodes = fail_partway(monkeypatch, "node_own_model_and_data", ["--out", str(tmp_path)], "")
    assert len(nodes) == 2 and all(n.poll() is not None for n in nodes)


def test_local_cluster_replaces_only_its_own_output(tmp_path: Path) -> None:
    """--out was deleted whatever it held (``--out .``, ``--out runs``); now only a previous run's output is."""
    (tmp_path / "keep.txt").write_text("not the script's")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "local_cluster.py"), "--nodes", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert proc.returncode == 2 and "did not write" in proc.stderr
    assert (tmp_path / "keep.txt").exists()
    (tmp_path / "keep.txt").unlink()
    (tmp_path / "node-0.log").write_text("a previous run's")
    run_example("local_cluster.py", "--nodes", "0", "--out", str(tmp_path))  # no nodes: only the certificates
    assert not (tmp_path / "node-0.log").exists() and (tmp_path / "certs" / "ca.crt").exists()


def test_local_cluster_refuses_an_unknown_method_before_starting_anything(tmp_path: Path) -> None:
    """A typo'd --method used to start three nodes that each exited 2, and the script printed only their exit
    codes; the script now knows the names, and they are the ones the node takes."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "local_cluster.py"), "--method", "tadd", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'tadd'" in proc.stderr
    assert not (tmp_path / "run").exists()
    sys.path.insert(0, str(EXAMPLES))
    try:
        local_cluster = importlib.import_module("local_cluster")
    finally:
        sys.path.remove(str(EXAMPLES))
    from tadlora.core.methods import method_names

    assert list(local_cluster.METHODS) == method_names()


def test_local_cluster_shows_why_a_node_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node that exits with an error has its log's last lines printed, not just its exit code."""

    class FailingNode(FakeNode):
        def __init__(self, cmd: list[str], **kwargs: object) -> None:
            super().__init__(cmd, **kwargs)
            log = kwargs["stdout"]
            assert isinstance(log, io.TextIOBase)  # the node's log file, as the script opened it
            log.write("tadlora-node: error: --listen '127.0.0.1:0' is taken\n")
            log.flush()
            self.returncode = 1

    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module("local_cluster")
    monkeypatch.setattr(subprocess, "Popen", FailingNode)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(example.time, "sleep", lambda s: None)
    monkeypatch.setattr(sys, "argv", ["local_cluster", "--nodes", "2", "--out", str(tmp_path / "run")])
    assert example.main() == 1
    out = capsys.readouterr().out
    assert out.count("failed (exit code 1)") == 2, out
    assert "    tadlora-node: error: --listen '127.0.0.1:0' is taken" in out
