"""The examples run as written (the fast ones here; the paper cell through its smoke path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_paper_cell_runs_through_its_smoke_path(tmp_path: Path) -> None:
    out = run_example("paper_cell.py", "--preset", "smoke", "--out", str(tmp_path)).stdout
    assert "rolora" in out and (tmp_path / "accuracy_vs_round.png").exists()


def test_two_nodes_on_your_own_model_and_data(tmp_path: Path) -> None:
    run_example("node_own_model_and_data.py", "--out", str(tmp_path), "--rounds", "2")
    for i in range(2):
        records = [json.loads(line) for line in (tmp_path / f"own-{i}" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1]
        assert all(r["degree"] == 1 for r in records)
        assert (tmp_path / f"own-{i}" / "adapter" / "adapter_config.json").exists()


def test_local_cluster_quickstart(tmp_path: Path) -> None:
    out = run_example("local_cluster.py", "--out", str(tmp_path), "--rounds", "3", "--model", "tiny",
                      "--eval-every", "3", timeout=600).stdout  # fmt: skip
    assert out.count("3 rounds, 2 neighbours") == 3
    # Progress while it runs (the real demo is minutes of silence otherwise): node-0's every round, once.
    progress = [line for line in out.splitlines() if line.startswith("node-0 round ")]
    assert [line.split()[2] for line in progress] == ["1/3", "2/3", "3/3"], out
    assert "dev accuracy" in progress[-1]
