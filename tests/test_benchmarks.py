"""The performance benchmarks under benchmarks/: what each compares with what, and when, on literal inputs or with
the expensive parts replaced; the full runs are not tests."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/NAME.py as a module (the scripts import their `_common` from their own folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ sim_throughput


def test_sim_engines_take_turns_per_m_in_alternating_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each configuration used to run once, all of one m's engines back to back in a fixed order.
    sim = load("sim_throughput", monkeypatch)
    order = sim.schedule([10, 32], ["sequential", "batched"], 3)
    assert order == [
        (10, 0, "sequential"), (10, 0, "batched"), (10, 1, "batched"), (10, 1, "sequential"),
        (10, 2, "sequential"), (10, 2, "batched"),
        (32, 0, "sequential"), (32, 0, "batched"), (32, 1, "batched"), (32, 1, "sequential"),
        (32, 2, "sequential"), (32, 2, "batched"),
    ]  # fmt: skip


def test_sim_speed_ratio_is_the_median_of_each_turns_own_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = load("sim_throughput", monkeypatch)

    def run(engine: str, turn: int, speed: float) -> dict[str, Any]:
        return {"engine": engine, "m": 10, "turn": turn, "client_steps_per_s": speed,
                "client_steps_per_s_train_only": 2 * speed, "maxrss_bytes": 100 + turn}  # fmt: skip

    # The machine slowed down in turn 1: each turn's ratio is 2, whatever the load.
    runs = [run("sequential", 0, 100), run("batched", 0, 200), run("batched", 1, 50), run("sequential", 1, 25),
            run("sequential", 2, 90), run("batched", 2, 180)]  # fmt: skip
    seq, bat = sim.summarize(runs, ["sequential", "batched"])
    assert (seq["engine"], seq["turns"], seq["speed_over_first_engine"]) == ("sequential", 3, 1.0)
    assert (bat["engine"], bat["turns"], bat["speed_over_first_engine"]) == ("batched", 3, 2.0)
    assert bat["speed_over_first_engine_all"] == [2.0, 2.0, 2.0]
    assert (bat["client_steps_per_s"], bat["client_steps_per_s_train_only"], bat["maxrss_bytes"]) == (180, 360, 101)


def test_sim_counts_the_shared_library_pages_of_m_processes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # "m x one-model RSS" counted the libraries' file-backed pages (libtorch's, about a quarter of a tiny-model
    # process's RSS) m times, though m processes share them through the page cache, and called that a lower bound.
    sim = load("sim_throughput", monkeypatch)
    mib = 2**20
    one = {"maxrss_bytes": 400 * mib, "rss_file_bytes": 100 * mib, "param_buffer_bytes": 8 * mib}
    assert sim.separate_processes_bytes(1, one) == 400 * mib
    assert sim.separate_processes_bytes(10, one) == (10 * 300 + 100) * mib
    row = {"engine": "batched", "m": 10, "turns": 3, "client_steps_per_s": 100.0,
           "client_steps_per_s_train_only": 110.0, "speed_over_first_engine": 1.5, "maxrss_bytes": 500 * mib,
           "m_params_buffers_bytes": 80 * mib, "m_processes_bytes": sim.separate_processes_bytes(10, one)}  # fmt: skip
    _, [cells] = sim.table({"summary": [row]})
    assert cells[-4:] == (500.0, 80.0, 3100.0, 3100 / 500)


def test_sim_s_table_adds_the_gpu_s_memory_for_a_run_on_one_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = load("sim_throughput", monkeypatch)
    mib = 2**20
    row = {"engine": "sequential", "m": 10, "turns": 1, "client_steps_per_s": 100.0,
           "client_steps_per_s_train_only": 110.0, "speed_over_first_engine": 1.0, "maxrss_bytes": 500 * mib,
           "m_params_buffers_bytes": 800 * mib, "m_processes_bytes": 3100 * mib}  # fmt: skip
    headers, [cells] = sim.table({"summary": [row]})
    assert len(headers) == len(cells) == 10 and headers[5] == "speed / sequential (same turn)"
    # --device auto on a machine without a GPU measured no GPU memory: the table used to look for it, and raise.
    assert sim.table({"device": "auto", "summary": [row]}) == (headers, [cells])
    headers, [cells] = sim.table({"device": "cuda", "summary": [{**row, "gpu_peak_bytes": 200 * mib}]})
    assert headers[-2:] == ["GPU peak MiB", "m x params+buffers / GPU peak"] and cells[-2:] == (200.0, 4.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("script", ["sim_throughput", "daemon_overhead"])
def test_a_gpu_the_machine_lacks_is_a_usage_error_before_anything_is_measured(script: str, tmp_path: Path) -> None:
    # sim_throughput's parent does not import torch: its first subprocess checks the device and says so.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--device", "cuda", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "device 'cuda' asked for, but torch sees no CUDA GPU" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_sim_reads_this_process_file_backed_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = load("sim_throughput", monkeypatch)
    # The interpreter's own libraries are mapped files: some of them are resident, and not more than the whole RSS.
    assert 0 < sim._rss_file_bytes() <= sim._maxrss_bytes()


def test_sim_refuses_an_engine_that_is_not_one() -> None:
    # "--engines model" used to run the one-model baseline as an engine and crash on its missing speed.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sim_throughput.py"), "--engines", "model"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'model'" in proc.stderr, proc.stderr


def test_sim_refuses_a_number_of_clients_the_split_cannot_serve_before_running_anything(tmp_path: Path) -> None:
    # --clients 10 130 used to run every m = 10 configuration, then crash in the m = 130 subprocess.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sim_throughput.py"), "--clients", "10", "130", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    expected = "--clients 130: the label-skewed split of builtin:sst2-small gives a client 20 examples, fewer than"
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("script", "flag", "value", "least"),
    [("sim_throughput", "--local-steps", "0", 1), ("sim_throughput", "--batch-size", "0", 1),
     ("sim_throughput", "--max-length", "7", 8), ("daemon_overhead", "--local-steps", "0", 1)],
)  # fmt: skip
def test_training_flags_a_train_spec_refuses_are_usage_errors_before_anything_runs(
    script: str, flag: str, value: str, least: int, tmp_path: Path
) -> None:
    # daemon_overhead died on TrainSpec's ValueError with a traceback (exit 1); sim_throughput ran its two baseline
    # subprocesses first, then died on the first engine's.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), flag, value, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and f"{flag} must be >= {least}, got {value}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_the_training_flags_bounds_are_train_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    # check_train_args restates TrainSpec's bounds (sim_throughput's parent must not import torch): they must agree.
    from tadlora.training import TrainSpec

    common = load("_common", monkeypatch)
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(parser, "error", lambda message: (_ for _ in ()).throw(ValueError(message)))
    for steps, batch, length in [(1, 1, 8), (0, 1, 8), (1, 0, 8), (1, 1, 7), (2, 4, 32)]:
        args = argparse.Namespace(local_steps=steps, batch_size=batch, max_length=length)
        try:
            TrainSpec(local_steps=steps, batch_size=batch, max_length=length)
            spec_ok = True
        except ValueError:
            spec_ok = False
        try:
            common.check_train_args(parser, args)
            args_ok = True
        except ValueError:
            args_ok = False
        assert args_ok == spec_ok, (steps, batch, length)


# ------------------------------------------------------------------------------------------------------ exchange


def test_exchange_times_encode_decode_and_sha_in_every_repetition_beside_the_exchange(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The share of an exchange spent encoding, decoding and hashing divided costs timed after all the exchanges
    # by the exchanges' own time; now each repetition times all five side by side.
    exchange = load("exchange", monkeypatch)
    result = asyncio.run(exchange.bench_size(0.3, 3))
    for key in ("exchange_s_all", "raw_s_all", "encode_s_all", "decode_validate_s_all", "sha256_s_all"):
        assert len(result[key]) == 3 and all(t > 0 for t in result[key]), key
    assert result["encode_s"] == sorted(result["encode_s_all"])[1]
    share = (2 * result["encode_s"] + 2 * result["decode_validate_s"] + 4 * result["sha256_s"]) / result[
        "exchange_s_median"
    ]
    assert result["share_of_exchange_in_encode_decode_sha"] == pytest.approx(share)


# ----------------------------------------------------------------------------------------------- daemon_overhead


def test_daemon_overhead_warms_up_before_the_first_timed_loop_and_does_not_count_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = load("daemon_overhead", monkeypatch)
    calls: list[tuple[int, bool]] = []
    times = iter([100.0, 10.0, 11.0, 12.0, 13.0])  # the first call is the cold one

    def bare_loop(args: Any, train: Any, threaded: bool) -> float:
        calls.append((args.rounds, threaded))
        return next(times)

    async def run_daemon(out: Path, args: Any, train: Any) -> tuple[float, list[list[dict[str, Any]]]]:
        calls.append((args.rounds, "daemon"))  # type: ignore[arg-type]
        row = {"seconds": 1.0, "exchange_latency_s": 0.1, "neighbours": ["a", "b"], "missed": [], "bytes_sent": 1}
        return 12.0, [[row] * args.rounds for _ in range(bench.M)]

    written: dict[str, Any] = {}
    monkeypatch.setattr(bench, "bare_loop", bare_loop)
    monkeypatch.setattr(bench, "run_daemon", run_daemon)
    monkeypatch.setattr(bench, "write_results", lambda name, data, *a, **k: written.update(data))
    monkeypatch.setattr(sys, "argv", ["daemon_overhead.py", "--model", "tiny", "--rounds", "4", "--out", str(tmp_path)])
    bench.main()
    assert calls == [(1, False), (4, False), (4, True), (4, "daemon"), (4, True), (4, False)]
    assert written["bare_sequential_s"] == [10.0, 13.0] and written["bare_threaded_s"] == [11.0, 12.0]
    assert written["ratio_daemon_over_sequential"] == pytest.approx(12.0 / 11.5)


def test_daemon_overhead_s_table_names_the_gpu_a_run_used_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("daemon_overhead", monkeypatch)
    data = json.loads((RESULTS / "daemon_overhead.json").read_text(encoding="utf-8"))
    assert bench.table(data)[1][0][0] == data["model"]  # the committed CPU run
    gpu = {**data, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    assert bench.table(gpu)[1][0][0] == f"{data['model']} on NVIDIA H100 80GB HBM3"
    # A run without a completed exchange has no latency: said so, not as 0 s.
    assert bench.table({**data, "exchange_latency_s_mean": None})[1][0][-2] == "n/a"


def test_daemon_overhead_threaded_loop_reports_a_nodes_failure_instead_of_waiting_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A node whose local steps raised left the other nodes' threads at the round's barrier for ever: the benchmark
    # hung. (The barrier gets a timeout here only so that a regression fails instead of hanging the test.)
    import functools
    import threading

    bench = load("daemon_overhead", monkeypatch)

    class Stub:  # a dataset, model or spec: bare_loop only passes them on to local_steps and evaluate
        label_names, tokenizer = (), None

        def subset(self, indices: Any) -> Stub:
            return self

    for name in ("resolve_dataset", "eval_subset", "ModelSpec", "AdapterModel", "encode", "evaluate"):
        monkeypatch.setattr(bench, name, lambda *a, **k: Stub())
    monkeypatch.setattr(bench, "client_shards", lambda *a, **k: [[0]] * bench.M)
    monkeypatch.setattr(bench.threading, "Barrier", functools.partial(threading.Barrier, timeout=20))

    def local_steps(model: Any, shard: Any, trained: Any, train: Any, seed: int, i: int, t: int) -> float:
        if i == 1:
            raise RuntimeError("node 1 failed")
        return 0.5

    monkeypatch.setattr(bench, "local_steps", local_steps)
    args = argparse.Namespace(model="tiny", rounds=3, device="cpu")
    with pytest.raises(RuntimeError, match="node 1 failed"):
        bench.bare_loop(args, argparse.Namespace(max_length=32), threaded=True)


# ----------------------------------------------------------------------------------------------------- discovery


def test_discovery_counts_a_peer_verified_twice_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # n1 was verified, dropped and verified again before n2 came: the second line of n1 is not "all peers".
    discovery = load("discovery", monkeypatch)
    records = [
        {"time": 10.0, "message": "peer n1-x verified at 127.0.0.1:5001 (mdns)"},
        {"time": 10.5, "message": "round 0 phase B: loss 0.6, 0/2 neighbours, 0.1 s"},
        {"time": 11.0, "message": "peer n1-x verified at 127.0.0.1:5001 (handshake)"},
        {"time": 12.0, "message": "peer n2-x verified at 127.0.0.1:5002 (mdns)"},
    ]
    assert discovery.peers_verified(records) == [10.0, 12.0]


def test_discovery_takes_the_first_round_that_mixed_even_when_round_0_did_not(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only "round 0" lines were read: a node whose round 0 exchanged with nobody had no first exchange at all, and
    # "every node exchanged" became n/a, though the docstring promises its first round that mixed.
    discovery = load("discovery", monkeypatch)
    records = [
        {"time": 10.0, "message": "[#####-----] 1/2 round 0 phase B: loss 0.6, 0/2 neighbours, 0.1 s"},
        {"time": 11.0, "message": "[##########] 2/2 round 1 phase B: loss 0.5, 1/2 neighbours, 0.1 s"},
        {"time": 12.0, "message": "[##########] 3/3 round 2 phase B: loss 0.5, 2/2 neighbours, 0.1 s"},
    ]
    assert discovery.first_mixed_round(records) == records[1]
    assert discovery.first_mixed_round(records[:1]) is None


# ----------------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("flag", ["--rounds", "--speed-blocks"])
def test_precision_refuses_zero_before_loading_anything(flag: str, tmp_path: Path) -> None:
    # --rounds 0 crashed on the missing first update after the speed part; --speed-blocks 0 on an empty median.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "precision.py"), flag, "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and f"{flag} must be >= 1, got 0" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------- _common


def test_markdown_table_writes_numbers_just_under_1000_without_an_exponent(monkeypatch: pytest.MonkeyPatch) -> None:
    # ".3g" below 1000 wrote 999.7 (a sha256 or encode rate in MB/s, say) as "1e+03".
    common = load("_common", monkeypatch)
    table = common.markdown_table(["a", "b", "c", "d"], [[999.4, 999.7, 1234.5, 0.0412]])
    assert table.splitlines()[-1] == "| 999 | 1,000 | 1,234 | 0.0412 |"


# The smallest run of each script: what a regression here would run before failing.
SMALLEST = {
    "exchange": ["--quick"],
    "daemon_overhead": ["--model", "tiny", "--rounds", "1", "--local-steps", "1"],
    "sim_throughput": ["--clients", "2", "--repeat", "1", "--rounds", "1"],
    "discovery": ["--repeat", "1"],
    "precision": ["--rounds", "1", "--speed-blocks", "1"],
}


@pytest.mark.parametrize("script", sorted(SMALLEST))
@pytest.mark.parametrize("where", ["file", "below a file", "empty"])
def test_an_out_that_cannot_be_a_directory_is_a_usage_error_before_anything_runs(
    script: str, where: str, tmp_path: Path
) -> None:
    # --out was first used by the mkdir at the end of the run: a file in the way cost the whole run and ended in a
    # FileExistsError traceback; an empty --out wrote NAME.json and NAME.md into the working directory.
    blocker = tmp_path / "results"
    blocker.write_text("not a directory\n", encoding="utf-8")
    out = {"file": str(blocker), "below a file": str(blocker / "sub"), "empty": ""}[where]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), *SMALLEST[script], "--out", out],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    expected = "an empty path" if where == "empty" else f"{blocker} is a file, not a directory"
    assert proc.returncode == 2 and f"argument --out: {expected}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def interrupted(script: str, *args: str, started: Callable[[subprocess.Popen[str]], None]) -> tuple[int, str]:
    """Run a benchmark ``script``, send it SIGINT once ``started(proc)`` returns (it is past its imports, inside its
    work); its exit status and stderr."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-u", str(BENCHMARKS / script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # whatever this process ignores
    )  # fmt: skip
    try:
        started(proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, stderr


def test_an_interrupted_run_says_so_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    # Ctrl-C during a run ended in a KeyboardInterrupt traceback through asyncio's frames (exit -2 from the signal).
    def first_size(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first size has started: the interrupt lands inside the measurements
            if line.startswith("-- 1 MB"):
                break

    code, stderr = interrupted("exchange.py", "--quick", "--out", str(tmp_path / "out"), started=first_size)
    assert code == 130, stderr
    assert "Traceback" not in stderr and stderr.strip() == "exchange.py: interrupted; no results written"
    assert not (tmp_path / "out").exists()


def test_paper_table_interrupted_says_how_to_resume_without_a_traceback(tmp_path: Path) -> None:
    """The longest-running script (hours per cell): a Ctrl-C once the grid runs says how to resume, no traceback."""
    import time

    out = tmp_path / "grid"

    def grid_started(proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 120
        while not (out / "methods" / "config.json").exists():  # the grid has started: past the imports
            assert proc.poll() is None and time.monotonic() < deadline, "the grid did not start"
            time.sleep(0.1)

    code, stderr = interrupted(
        "paper_table.py", "--preset", "smoke", "--out", str(out), "--quiet", started=grid_started
    )
    assert code == 130, stderr
    assert "Traceback" not in stderr and "paper_table: interrupted; run the same command again to resume" in stderr


def test_write_results_writes_both_files_and_names_them_for_an_interrupt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = load("_common", monkeypatch)
    common.write_results("demo", {"x": 1}, ["a"], [[1.5]], out=tmp_path)
    assert list(common.WRITTEN) == [tmp_path / "demo.json", tmp_path / "demo.md"]
    assert json.loads((tmp_path / "demo.json").read_text(encoding="utf-8"))["x"] == 1

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["demo.py"])
    assert common.run_main(interrupted) == 130
    assert (
        capsys.readouterr().err.strip()
        == f"demo.py: interrupted; {tmp_path / 'demo.json'}, {tmp_path / 'demo.md'} written"
    )


RESULTS = BENCHMARKS / "results"
DOCS = BENCHMARKS.parent / "docs" / "benchmarks.md"


def test_scale_counts_one_sided_pairs_degree_disagreements_missed_links_and_catch_up_jumps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scale = load("scale", monkeypatch)

    def line(t: int, degree: int, mixed: dict[str, int]) -> dict[str, Any]:
        return {"round": t, "degree": degree, "neighbours": [{"id": j, "degree": d} for j, d in mixed.items()]}

    # Three nodes, complete graph at p = 1: in round 1, a mixed b but b's line does not list a (one-sided), and c was
    # told b's degree 1 where b's own line says 2; c jumped from round 1 to 3 (a catch-up) and never logged round 2.
    by_id = {
        "a": [line(0, 2, {"b": 2, "c": 2}), line(1, 2, {"b": 2, "c": 2})],
        "b": [line(0, 2, {"a": 2, "c": 2}), line(1, 2, {"c": 2})],
        "c": [line(0, 2, {"a": 2, "b": 2}), line(1, 2, {"a": 2, "b": 1}), line(3, 2, {})],
    }
    counts = scale.agreement(by_id, 1.0, None)
    assert counts == {"rounds": 7, "catch_up_jumps": 1, "one_sided_pairs": 1, "degree_disagreements": 1,
                      "scheduled_links": 14, "scheduled_links_missed": 3, "unscheduled_links_mixed": 0}  # fmt: skip


def table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("exchange", "sizes"),
        ("daemon_overhead", None),
        ("discovery", "summary_s"),
        ("sim_throughput", None),
        ("scale", None),
    ],
)
def test_the_committed_markdown_table_is_the_scripts_table_of_the_committed_json(
    name: str, field: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing tied results/NAME.md to results/NAME.json: a table edited by hand, or a script whose table drifted
    # from what it stores, went unnoticed.
    bench = load(name, monkeypatch)
    common = load("_common", monkeypatch)
    data = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    headers, rows = bench.table(data if field is None else data[field])
    expected = table_lines((RESULTS / f"{name}.md").read_text(encoding="utf-8"))
    assert table_lines(common.markdown_table(headers, rows)) == expected


@pytest.mark.parametrize("name", ["exchange", "daemon_overhead", "sim_throughput", "discovery", "scale"])
def test_docs_benchmarks_shows_the_committed_table(name: str) -> None:
    # docs/benchmarks.md quotes each performance benchmark's committed table: a rerun whose results were committed
    # without the page (or the reverse) leaves the page's numbers those of another run.
    docs = DOCS.read_text(encoding="utf-8")
    markdown = (RESULTS / f"{name}.md").read_text(encoding="utf-8")
    table = "\n".join(table_lines(markdown))
    assert table in docs, f"docs/benchmarks.md does not show results/{name}.md's table"
    command = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))["command"]
    assert f"\n{command}\n" in docs, f"docs/benchmarks.md does not give results/{name}.json's command {command!r}"


@pytest.mark.parametrize("name", ["exchange", "daemon_overhead", "sim_throughput", "discovery", "scale"])
def test_docs_benchmarks_caveats_name_the_machine_of_each_committed_run(name: str) -> None:
    # The caveats put section 3 on the AMD EPYC with grpcio 1.85.3 after its rerun on an Intel Xeon (grpcio 1.85.4,
    # 23.6 GiB) had been committed.
    caveats = DOCS.read_text(encoding="utf-8").split("\n## 1.", 1)[0]
    machine = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))["machine"]
    cpu = " ".join(w for w in machine["cpu_model"].replace("(R)", "").split() if w != "Processor")
    for fact in (cpu, f"{machine['memory_gib']} GiB", f"grpcio {machine['grpcio']}", f"torch {machine['torch']}"):
        assert fact in caveats, f"docs/benchmarks.md's caveats do not say {fact!r} of results/{name}.json's machine"


@pytest.mark.parametrize("where", ["file", "empty"])
def test_paper_table_refuses_an_out_that_cannot_be_a_directory_as_a_usage_error(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty --out ran (or reported) the grids into the working directory (methods/, T-sweep/, table.md); a file
    # in the way was said as "[Errno 20] Not a directory: 'FILE/methods/cells'".
    script = load("paper_table", monkeypatch)
    blocker = tmp_path / "table"
    blocker.write_text("not a directory\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        script.main(["--preset", "smoke", "--report-only", "--quiet", "--out", str(blocker) if where == "file" else ""])
    expected = "an empty path" if where == "empty" else f"{blocker} is a file, not a directory"
    assert exc.value.code == 2 and f"argument --out: {expected}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["table"]


@pytest.mark.parametrize("script", ["daemon_overhead", "sim_throughput"])
def test_a_model_that_does_not_load_is_a_usage_error_before_anything_is_measured(script: str, tmp_path: Path) -> None:
    # daemon_overhead died in its warm-up loop with a RuntimeError traceback (exit 1); sim_throughput's parent
    # raised "model m=1 failed:" with the subprocess's traceback inside its own.
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), *SMALLEST[script], "--model", str(missing),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    expected = f"error: --model: cannot load model '{missing}': no such directory"
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
