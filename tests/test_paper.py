"""The paper's table: its two grids, the claim checks on known numbers, and benchmarks/paper_table.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tadlora.sim.config import ALL_METHODS, preset
from tadlora.sim.paper import SWEEP_INTERVALS, claims, entries, paper_grids
from tadlora.sim.summary import summarize
from test_benchmarks import load

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_table.py"


def row(method: str, p: float, t: int | None, mean: float, client_std: float = 0.05, seed_std: float = 0.0,
        seeds: int = 1) -> dict[str, Any]:  # fmt: skip
    return {"method": method, "topology": "er", "link_prob": p, "switch_interval": t, "seeds": seeds,
            "acc_mean": mean, "acc_client_std": client_std, "acc_seed_std": seed_std}  # fmt: skip


# The T of the paper's method grid (cpu-sst2's 10 clients): T = auto for tad and tad-nojoint, adf's own 5.
AUTO_T = {0.5: 1, 0.1: 3, 0.02: 12, 0.01: 15}  # 0.01: a p beyond the preset's (clipped to 15)


def paper_t(method: str, p: float) -> int | None:
    return AUTO_T[p] if method in ("tad", "tad-nojoint") else 5 if method == "adf" else None


def method_rows(p: float, tad: float, others: float, **kw: Any) -> list[dict[str, Any]]:
    return [row(m, p, paper_t(m, p), tad if m == "tad" else others, **kw) for m in ALL_METHODS]


def sweep_rows(p: float, best_t: int) -> list[dict[str, Any]]:
    return [row("tad", p, t, 0.9 if t == best_t else 0.7) for t in SWEEP_INTERVALS]


def statuses(grid: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> list[str]:
    return [c.status for c in claims(entries(grid), entries(sweep), [0.5, 0.02])]


def test_grids_cover_every_method_and_the_t_sweep_at_both_ends() -> None:
    methods, sweep = paper_grids(preset("cpu-sst2"))
    cells = list(methods.cells())
    assert {c.method for c in cells} == set(ALL_METHODS)
    assert {c.link_prob for c in cells} == {0.5, 0.1, 0.02} and {c.seed for c in cells} == {0, 1, 2}
    # T = auto: TAD-LoRA's interval grows as p falls; adf keeps its own T, methods without T run once.
    assert {(c.link_prob, c.switch_interval) for c in cells if c.method == "tad"} == {(0.5, 1), (0.1, 3), (0.02, 12)}
    assert {c.switch_interval for c in cells if c.method == "adf"} == {5}
    assert len(cells) == 7 * 3 * 3
    swept = list(sweep.cells())
    assert {(c.link_prob, c.switch_interval) for c in swept} == {(p, t) for p in (0.5, 0.02) for t in SWEEP_INTERVALS}
    assert {c.method for c in swept} == {"tad"}
    # The sizing study's cells are cells of the method grid: same key, same settings apart from the grid's extent.
    assert "tad__er__p0.02__T12__s0" in {c.key for c in cells}
    assert {c.key for c in cells} & {c.key for c in swept} == {f"tad__er__p0.5__T1__s{s}" for s in (0, 1, 2)}


def test_claims_reproduced_when_tad_leads_at_low_p_and_best_t_grows() -> None:
    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    sweep = sweep_rows(0.5, best_t=1) + sweep_rows(0.02, best_t=10)
    assert statuses(grid, sweep) == ["reproduced", "reproduced", "reproduced"]


def test_claims_not_reproduced_when_tad_trails_or_best_t_shrinks() -> None:
    grid = method_rows(0.5, tad=0.70, others=0.85) + method_rows(0.02, tad=0.72, others=0.70)
    sweep = sweep_rows(0.5, best_t=10) + sweep_rows(0.02, best_t=2)
    # At p = 0.5 tad is 0.15 behind (> client spread 0.05); at 0.02 it leads by 0.02 < 0.05: not "ahead".
    assert statuses(grid, sweep) == ["not reproduced", "not reproduced", "not reproduced"]


def test_best_t_grows_only_when_the_spread_cannot_have_ordered_the_two_best() -> None:
    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    # The best T is 2 at p = 0.5 and 10 at p = 0.02, but T = 1 at p = 0.02 is only 0.02 behind its best (< 0.05).
    high = [row("tad", 0.5, t, 0.9 if t == 2 else 0.7) for t in SWEEP_INTERVALS]
    low = [row("tad", 0.02, t, {10: 0.9, 1: 0.88}.get(t, 0.7)) for t in SWEEP_INTERVALS]
    claim = claims(entries(grid), entries(high + low), [0.5, 0.02])[2]
    assert claim.status == "not reproduced" and "not told apart" in claim.detail, claim.detail
    assert "T within the spread of it: [1, 10]" in claim.detail
    low[0] = row("tad", 0.02, 1, 0.7)  # now T = 10 is the only contender at p = 0.02, above every one at p = 0.5
    assert claims(entries(grid), entries(high + low), [0.5, 0.02])[2].status == "reproduced"
    shrinks = claims(entries(grid), entries(sweep_rows(0.5, 10) + sweep_rows(0.02, 2)), [0.5, 0.02])[2]
    assert shrinks.status == "not reproduced" and shrinks.detail.endswith("→ it shrinks")


def test_the_spread_is_over_seeds_once_there_are_two() -> None:
    # A 0.03 lead: inside a client spread of 0.05, outside a seed spread of 0.01.
    one = method_rows(0.5, tad=0.8, others=0.8) + method_rows(0.02, tad=0.73, others=0.70)
    two = method_rows(0.5, tad=0.8, others=0.8, seeds=2, seed_std=0.01) + method_rows(
        0.02, tad=0.73, others=0.70, seeds=2, seed_std=0.01
    )
    sweep = sweep_rows(0.5, 1) + sweep_rows(0.02, 5)
    assert statuses(one, sweep)[1] == "not reproduced"
    assert statuses(two, sweep)[1] == "reproduced"
    detail = claims(entries(two), entries(sweep), [0.5, 0.02])[1].detail
    assert "spread over seeds 0.010" in detail and "gap +0.030" in detail


def test_missing_cells_make_a_claim_incomplete_not_a_verdict() -> None:
    grid = [*method_rows(0.5, 0.85, 0.8), row("tad", 0.02, 12, 0.8), row("lora", 0.02, None, 0.6)]
    sweep = sweep_rows(0.5, 1) + sweep_rows(0.02, 10)[:3]
    result = claims(entries(grid), entries(sweep), [0.5, 0.02])
    assert [c.status for c in result] == ["reproduced", "incomplete", "incomplete"]
    assert "only 2 of 7 methods finished" in result[1].detail and "ahead" in result[1].detail
    assert "3 of 6 T finished" in result[2].detail
    assert claims(entries([]), entries([]), [0.5, 0.02])[0].status == "incomplete"


def test_missing_cells_are_counted_as_the_runs_they_still_need() -> None:
    from tadlora.sim.paper import distinct_computations

    keys = ["tad__er__p0.5__T1__s0", "tad__er__p0.5__T5__s0", "adf__er__p0.5__T5__s0", "lora__er__p0.5__T-__s0"]
    assert distinct_computations(keys) == 3  # adf with T = 5 is tad with T = 5
    assert distinct_computations([*keys, "tad-nojoint__er__p0.5__T1__s0", "rolora__er__p0.5__T-__s0"]) == 4
    assert distinct_computations(["tad__er__p0.5__T5__s0", "tad__er__p0.5__T5__s1", "tad__er__p0.02__T5__s0"]) == 3
    assert distinct_computations([]) == 0


def test_what_is_left_is_said_in_words_that_fit_its_numbers() -> None:
    """It said "1 cells not finished yet: 1 distinct runs (the others are copies)" for the grid's last cell."""
    from tadlora.sim.paper import left_to_run

    assert left_to_run(1, 1) == "1 cell not finished yet."
    assert left_to_run(3, 3) == "3 cells not finished yet, each a run of its own."
    assert left_to_run(4, 3) == "4 cells not finished yet: 3 distinct runs (the others are copies)."
    assert left_to_run(2, 1) == "2 cells not finished yet: 1 distinct run (the others are copies)."


def test_missing_cells_on_a_topology_whose_key_holds_a_double_underscore_are_counted(tmp_path: Path) -> None:
    from tadlora.sim.config import SimConfig
    from tadlora.sim.paper import distinct_computations

    # ":/" of a file topology's path becomes "__" in a cell's key, the separator of its fields
    graph = tmp_path / "ring__4.txt"
    graph.write_text("0 1\n1 2\n2 3\n3 0\n", encoding="utf-8")
    config = SimConfig(
        num_clients=4, methods=("tad", "adf", "rolora", "tad-nojoint"), topologies=(f"file:{graph}", "ring"),
        switch_intervals=(1, 5), seeds=(0, 1),
    )  # fmt: skip
    keys = [cell.key for cell in config.cells()]
    assert any(key.count("__") > 4 for key in keys)
    # per topology and seed: tad T=1, tad T=5 (= adf), tad-nojoint T=1 (= rolora), tad-nojoint T=5
    assert distinct_computations(keys) == len({cell.computation for cell in config.cells()}) == 2 * 2 * 4


def test_the_summary_has_final_accuracy_spreads_and_the_area_under_the_curve() -> None:
    def run(seed: int, accs: list[float]) -> dict[str, Any]:
        rounds = [{"round": 10 * i + 9, "acc_mean": a, "acc_std": 0.1} for i, a in enumerate(accs)]
        return {"method": "tad", "topology": "er", "link_prob": 0.02, "switch_interval": 12, "seed": seed,
                "rounds": rounds, "final": {"acc_mean": accs[-1], "acc_std": 0.1}}  # fmt: skip

    (only,) = summarize([run(0, [0.5, 0.7, 0.9]), run(1, [0.6, 0.8, 1.0])])
    assert only["seeds"] == 2 and only["acc_mean"] == pytest.approx(0.95)
    assert only["acc_seed_std"] == pytest.approx(0.05) and only["acc_client_std"] == pytest.approx(0.1)
    assert only["acc_curve_mean"] == pytest.approx(0.75)
    assert entries([only])[("tad", 0.02, 12)].curve == pytest.approx(0.75)


def test_the_summary_lists_a_t_sweep_and_the_link_probabilities_in_numeric_order() -> None:
    """Its rows were sorted as text: a T sweep read T = 1, 10, 15, 2, 3, 5 in results.json and tadlora-sim's table."""

    def run(method: str, p: float, t: int | None) -> dict[str, Any]:
        return {"method": method, "topology": "er", "link_prob": p, "switch_interval": t, "seed": 0,
                "rounds": [{"round": 0, "acc_mean": 0.5}], "final": {"acc_mean": 0.5, "acc_std": 0.0}}  # fmt: skip

    runs = [run("tad", p, t) for t in (15, 2, 10, 1) for p in (0.5, 0.02, 1.0)] + [run("lora", 0.1, None)]
    rows = [(r["method"], r["link_prob"], r["switch_interval"]) for r in summarize(runs)]
    tad = [(p, t) for p in (0.02, 0.5, 1.0) for t in (1, 2, 10, 15)]
    assert rows == [("lora", 0.1, None), *(("tad", p, t) for p, t in tad)]


def test_a_checkpointed_cell_is_reported_with_its_rounds_and_last_evaluation() -> None:
    from tadlora.sim.paper import checkpoint_progress

    records = [{"round": r, "train_loss": 1.0} for r in range(20)]
    records[9] |= {"acc_mean": 0.61, "acc_std": 0.05}
    records[19] |= {"acc_mean": 0.72, "acc_std": 0.04}
    where = checkpoint_progress({"records": records, "seconds": 1200.0})
    last = {"round": 20, "acc_mean": 0.72, "acc_std": 0.04}
    assert where == {"rounds_done": 20, "last_eval": last, "seconds": 1200.0}
    assert checkpoint_progress({"records": records[:5]})["last_eval"] is None
    assert checkpoint_progress({"records": []})["rounds_done"] == 0


def test_a_checkpointed_cell_s_line_gives_its_pace_and_the_time_left_at_it() -> None:
    from tadlora.sim.paper import _pace

    where = {"rounds_done": 20, "last_eval": None, "seconds": 1200.0}  # 60 s a round, 80 rounds left: 80 minutes
    assert _pace(where, 100) == "; 60 s a round so far, about 1.3 h to go at that pace"
    assert _pace(where, 50) == "; 60 s a round so far, about 30 min to go at that pace"
    assert _pace(where | {"seconds": None}, 100) == ""  # a checkpoint from before cells kept their seconds
    assert _pace(where | {"rounds_done": 0}, 100) == ""


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_paper_table_script_runs_resumes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "table"
    run_script("--preset", "smoke", "--rounds", "2", "--out", str(out), "--quiet")
    table = json.loads((out / "table.json").read_text())
    assert table["missing_cells"] == {"methods": [], "T-sweep": []}
    assert table["claims"][0]["name"] == "competitive at p = 0.5"
    text = (out / "table.md").read_text()
    # final accuracy, the learning curve, then (every method but tad) the gap to tad seed by seed
    assert all(text.count(f"| {m} |") == (2 if m == "tad" else 3) for m in ALL_METHODS)
    assert (out / "methods" / "accuracy_vs_round.png").exists() and (out / "T-sweep" / "accuracy_vs_T.png").exists()
    # smoke's T = auto at p = 0.5 with 4 clients is 2: that cell is shared, run once, copied to the sweep.
    shared = "tad__er__p0.5__T2__s0.json"
    assert (out / "methods" / "cells" / shared).read_bytes() == (out / "T-sweep" / "cells" / shared).read_bytes()
    # adf is tad with T = 5: the sweep's T = 5 cell is the method grid's adf cell, not a second run.
    adf = json.loads((out / "methods" / "cells" / "adf__er__p0.5__T5__s0.json").read_text())
    tad5 = json.loads((out / "T-sweep" / "cells" / "tad__er__p0.5__T5__s0.json").read_text())
    assert tad5["same_as"] == adf["key"] and tad5["rounds"] == adf["rounds"] and tad5["method"] == "tad"

    # A lost cell is rerun; --report-only runs nothing and reports it missing, and where its checkpoint stands
    # (the checkpoint's records here are the lost cell's first round, as the runner writes them).
    lora = out / "methods" / "cells" / "lora__er__p0.5__T-__s0.json"
    first_round = json.loads(lora.read_text())["rounds"][:1]
    lora.unlink()
    partial = out / "methods" / "cells" / "lora__er__p0.5__T-__s0.partial.json"
    partial.write_text(json.dumps({"records": first_round, "seconds": 1.5}))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "methods" / "cells").glob("*.json")}
    run_script("--preset", "smoke", "--rounds", "2", "--out", str(out), "--quiet", "--report-only")
    table = json.loads((out / "table.json").read_text())
    assert table["missing_cells"]["methods"] == ["lora__er__p0.5__T-__s0"]
    assert table["in_progress"]["lora__er__p0.5__T-__s0"]["rounds_done"] == 1
    # smoke evaluates at its last round alone: the checkpoint's one round has no evaluation to report
    line = "* `lora__er__p0.5__T-__s0`: 1 of 2 rounds; 2 s a round so far, about 0 min to go at that pace\n"
    assert line in (out / "table.md").read_text()
    partial.unlink()  # no checkpoint to resume from: the cell reruns from the start
    del stamps[partial]
    run_script("--preset", "smoke", "--rounds", "2", "--out", str(out), "--quiet")
    assert json.loads((out / "table.json").read_text())["missing_cells"]["methods"] == []
    assert all(p.stat().st_mtime_ns == ns for p, ns in stamps.items())  # the others were not rerun

    # Another budget in the same directory is refused instead of mixed in.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--rounds", "3", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "different settings (rounds)" in proc.stderr


def test_tad_is_judged_against_every_other_method_not_only_the_best_one() -> None:
    sweep = sweep_rows(0.5, 1) + sweep_rows(0.02, 10)
    # At p = 0.5 the best other (lora) is within its wide spread, but ffa, a little lower, is ahead of tad by more
    # than its own narrow one: some method is ahead of tad, so tad is not "competitive".
    high = method_rows(0.5, tad=0.80, others=0.70, client_std=0.01)
    high[ALL_METHODS.index("lora")] = row("lora", 0.5, None, 0.83, client_std=0.05)
    high[ALL_METHODS.index("ffa")] = row("ffa", 0.5, None, 0.82, client_std=0.005)
    # At p = 0.02 tad is ahead of the best other (lora) by more than the spread, but not of ffa, whose clients
    # spread widely: tad is not ahead of every method.
    low = method_rows(0.02, tad=0.80, others=0.70, client_std=0.01)
    low[ALL_METHODS.index("lora")] = row("lora", 0.02, None, 0.78, client_std=0.01)
    low[ALL_METHODS.index("ffa")] = row("ffa", 0.02, None, 0.77, client_std=0.05)
    competitive, ahead, _ = claims(entries(high + low), entries(sweep), [0.5, 0.02])
    assert competitive.status == "not reproduced" and "ffa 0.820" in competitive.detail, competitive.detail
    assert ahead.status == "not reproduced" and "ffa 0.770" in ahead.detail, ahead.detail
    assert "best other lora" in competitive.detail and "best other lora" in ahead.detail


def test_a_grid_run_alone_is_reported_with_what_the_other_grid_can_copy_from_it(tmp_path: Path, monkeypatch) -> None:
    # --only T-sweep used to report the method grid before the sweep ran: its tad (T = auto = 2) and adf (tad with
    # T = 5) cells, computed by the sweep, were listed as not finished until the next run.
    out = tmp_path / "table"
    argv = ["--preset", "smoke", "--rounds", "2", "--out", str(out), "--quiet", "--only", "T-sweep"]
    assert load("paper_table", monkeypatch).main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["missing_cells"]["T-sweep"] == []
    missing = set(table["missing_cells"]["methods"])
    assert "tad__er__p0.5__T2__s0" not in missing and "adf__er__p0.5__T5__s0" not in missing
    assert (out / "methods" / "cells" / "adf__er__p0.5__T5__s0.json").exists()


def test_a_finished_cell_is_not_listed_as_checkpointed(tmp_path: Path, monkeypatch) -> None:
    # A cell copied from the other grid while its own run had a checkpoint, or a process stopped between writing a
    # finished cell and deleting its checkpoint, leaves KEY.partial.json beside KEY.json: it is finished.
    argv = ["--preset", "smoke", "--rounds", "2", "--out", str(tmp_path / "table"), "--quiet", "--report-only"]
    assert load("paper_table", monkeypatch).main(argv) == 0  # stamps the grids: cells without a stamp are refused
    cells = tmp_path / "table" / "methods" / "cells"
    records = [{"round": r, "train_loss": 0.7, "acc_mean": 0.5, "acc_std": 0.1, "cross_term_norm": 0.1} for r in (0, 1)]
    for key, method in (("lora__er__p0.5__T-__s0", "lora"), ("ffa__er__p0.5__T-__s0", "ffa")):
        (cells / f"{key}.partial.json").write_text(json.dumps({"records": records[:1], "seconds": 1.0}))
        if method == "lora":
            cell = {"method": method, "topology": "er", "link_prob": 0.5, "switch_interval": None, "seed": 0,
                    "key": key, "rounds": records, "final": {"acc_mean": 0.5, "acc_std": 0.1, "round": 1}}  # fmt: skip
            (cells / f"{key}.json").write_text(json.dumps(cell))
    assert load("paper_table", monkeypatch).main(argv) == 0
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    assert "lora__er__p0.5__T-__s0" not in table["missing_cells"]["methods"]
    assert list(table["in_progress"]) == ["ffa__er__p0.5__T-__s0"]
    assert "`lora__er__p0.5__T-__s0`" not in (tmp_path / "table" / "table.md").read_text()


def test_paper_table_refuses_bad_arguments_and_stops_with_a_message(tmp_path: Path, monkeypatch, capsys) -> None:
    script = load("paper_table", monkeypatch)
    out = ["--preset", "smoke", "--out", str(tmp_path / "table"), "--quiet"]
    for rounds in ("0", "-1"):  # 0 used to be ignored (the preset's rounds ran), -1 a traceback
        assert script.main([*out, "--rounds", rounds, "--report-only"]) == 2
        assert "paper_table: error: " in capsys.readouterr().err
    assert not (tmp_path / "table").exists()

    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(script.Simulator, "run", interrupted)
    assert script.main(out) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err


def test_a_claim_waiting_for_a_seed_is_incomplete_not_a_verdict() -> None:
    # Every method and T has seed 0 but the grids hold seeds 0 and 1: the cells are not all finished, so no claim
    # is "reproduced" or "not reproduced" yet (the second seed moves every mean and spread), only what they say so far.
    from tadlora.sim.paper import markdown

    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    sweep = sweep_rows(0.5, best_t=1) + sweep_rows(0.02, best_t=10)
    assert statuses(grid, sweep) == ["reproduced", "reproduced", "reproduced"]  # with one seed, all finished
    config = {"link_probs": [0.5, 0.02], "rounds": 100, "methods": list(ALL_METHODS), "seeds": [0, 1]}
    _text, verdict = markdown({"config": config, "summary": grid}, {"config": config, "summary": sweep}, "t")
    assert [c.status for c in verdict] == ["incomplete"] * 3, verdict
    assert "7 of 14 cells not finished" in verdict[1].detail and "ahead" in verdict[1].detail
    assert "6 of 12 cells not finished" in verdict[2].detail and "best T = 10" in verdict[2].detail
    # A claim waits only for its own cells: seed 1 finished at p = 0.5 makes the first claim a verdict.
    both = [{**r, "seeds": 2, "acc_seed_std": 0.02} if r["link_prob"] == 0.5 else r for r in grid]
    _text, verdict = markdown({"config": config, "summary": both}, {"config": config, "summary": sweep}, "t")
    assert [c.status for c in verdict] == ["reproduced", "incomplete", "incomplete"], verdict


def test_a_method_grid_grown_to_more_than_one_t_judges_tad_at_t_auto() -> None:
    # A run of the preset's own T axis in the method grid's directory (paper-mnli's is 1..15) grows its grid: tad has
    # several T at a p. The claims judge the paper's tad, T = auto (1 at p = 0.5, 12 at p = 0.02 with 10 clients),
    # not whichever T the summary happened to list last.
    import dataclasses

    from tadlora.sim.paper import markdown

    config = dataclasses.replace(
        preset("cpu-sst2"), link_probs=(0.5, 0.02), switch_intervals=("auto", 5), seeds=(0,)
    ).to_dict()
    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    grid = [{**r, "switch_interval": 12} if r["method"] in ("tad", "tad-nojoint") and r["link_prob"] == 0.02 else r
            for r in grid]  # fmt: skip
    grid += [row("tad", 0.5, 5, 0.70), row("tad", 0.02, 5, 0.60)]  # far behind: a T the paper's table does not judge
    sweep = sweep_rows(0.5, best_t=1) + sweep_rows(0.02, best_t=10)
    _text, verdict = markdown({"config": config, "summary": grid}, {"config": config, "summary": sweep}, "t")
    assert [c.status for c in verdict] == ["reproduced", "reproduced", "reproduced"], verdict
    assert "tad 0.850" in verdict[0].detail and "tad 0.800" in verdict[1].detail


def test_a_method_whose_t_auto_cell_is_unfinished_is_not_judged_by_another_t() -> None:
    # The directory's grid grew to T = 5 (a run of another T axis there) and only that T of tad has finished at
    # p = 0.5: tad at T = auto (1) is unfinished there, so the first claim waits; it used to judge tad by its T = 5
    # cell, the only one at that p ("not reproduced": 0.16 behind).
    import dataclasses

    from tadlora.sim.paper import markdown

    config = dataclasses.replace(
        preset("cpu-sst2"), link_probs=(0.5, 0.02), switch_intervals=("auto", 5), seeds=(0,)
    ).to_dict()
    grid = [r for r in method_rows(0.5, tad=0.85, others=0.86) if r["method"] != "tad"]
    grid += [row("tad", 0.5, 5, 0.70), *method_rows(0.02, tad=0.80, others=0.70)]
    sweep = sweep_rows(0.5, best_t=1) + sweep_rows(0.02, best_t=10)
    text, verdict = markdown({"config": config, "summary": grid}, {"config": config, "summary": sweep}, "t")
    assert [c.status for c in verdict] == ["incomplete", "reproduced", "reproduced"], verdict
    assert "0.700" not in verdict[0].detail, verdict[0].detail
    assert "T=5: 0.700" in text  # the table still shows the cell


def test_a_t_sweep_grown_to_another_t_is_judged_on_the_papers_six() -> None:
    # A run of another T axis in the sweep's directory added T = 20 at p = 0.02: the table shows the six T of the
    # paper's sweep, and the claim is judged on those. It used to count T = 20 as one of them ("7 of 6 T finished"),
    # take it for the best T (so that "best T grows" read as reproduced where the six say it shrinks), and, with
    # its seeds unfinished, hold the claim back as incomplete.
    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    sweep = sweep_rows(0.5, best_t=10) + sweep_rows(0.02, best_t=2)
    claim = claims(entries(grid), entries([*sweep, row("tad", 0.02, 20, 0.99)]), [0.5, 0.02])[2]
    assert claim.status == "not reproduced" and claim.detail.endswith("→ it shrinks"), claim.detail
    assert "7 of 6" not in claim.detail and "best T = 2 " in claim.detail
    two_seeds = [{**r, "seeds": 2} for r in sweep]
    claim = claims(entries(grid), entries([*two_seeds, row("tad", 0.02, 20, 0.5)]), [0.5, 0.02], 7, 1, 2)[2]
    assert claim.status == "not reproduced", claim


def test_the_learning_curve_table_says_which_t_each_number_is_of_where_a_method_has_several() -> None:
    # A method grid grown to T = 5 beside T = auto: the curve table used to list tad's two numbers at a p as
    # "0.780 0.650", with nothing to say which T each is of; one T per cell stays unlabelled, as before.
    import dataclasses

    from tadlora.sim.paper import markdown

    config = dataclasses.replace(
        preset("cpu-sst2"), link_probs=(0.5, 0.02), switch_intervals=("auto", 5), seeds=(0,)
    ).to_dict()
    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    grid += [row("tad", 0.5, 5, 0.70), row("tad", 0.02, 5, 0.60)]
    curves = {(0.5, 1): 0.78, (0.5, 5): 0.65, (0.02, 12): 0.71, (0.02, 5): 0.55}
    grid = [{**r, "acc_curve_mean": curves[r["link_prob"], r["switch_interval"]] if r["method"] == "tad" else 0.5}
            for r in grid]  # fmt: skip
    sweep = sweep_rows(0.5, best_t=1) + sweep_rows(0.02, best_t=10)
    text, _verdict = markdown({"config": config, "summary": grid}, {"config": config, "summary": sweep}, "t")
    curve_table = text.split("Mean accuracy over the run's evaluations")[1].split("T sweep")[0]
    (tad,) = [line for line in curve_table.splitlines() if line.startswith("| tad |")]
    assert tad == "| tad | T=1: 0.780 T=5: 0.650 | T=12: 0.710 T=5: 0.550 |", tad
    assert "| lora | 0.500 | 0.500 |" in curve_table and "| adf | 0.500 | 0.500 |" in curve_table


def test_the_claims_judge_the_papers_p_and_seeds_where_other_runs_grew_the_directory() -> None:
    # Another run put p = 0.01 and seed 1 into the method grid's directory (its stamp is the union of the runs'):
    # the table shows the p = 0.01 column, but the claims are about the paper's grids (p 0.5 and 0.02, seed 0), so
    # TAD-LoRA leading at 0.02 is "reproduced"; judged from the stamp they moved to p = 0.01, where TAD-LoRA trails
    # and the sweep has no cells (so "best T grows" could never finish), and waited for seed 1.
    import dataclasses

    from tadlora.sim.paper import markdown

    paper = dataclasses.replace(preset("cpu-sst2"), link_probs=(0.5, 0.02), seeds=(0,))
    methods, sweep_grid = paper_grids(paper)
    grown = dataclasses.replace(methods, link_probs=(0.5, 0.02, 0.01), seeds=(0, 1)).to_dict()
    grid = method_rows(0.5, tad=0.85, others=0.86) + method_rows(0.02, tad=0.80, others=0.70)
    grid += method_rows(0.01, tad=0.50, others=0.70)
    sweep = sweep_rows(0.5, best_t=1) + sweep_rows(0.02, best_t=10)
    results = {"config": grown, "summary": grid}, {"config": sweep_grid.to_dict(), "summary": sweep}
    text, verdict = markdown(*results, "t", paper=(methods, sweep_grid))
    assert [c.status for c in verdict] == ["reproduced"] * 3, verdict
    assert "p = 0.01" in text.splitlines()[4]  # the table's header: the grown column is shown
    _text, unpinned = markdown(*results, "t")  # without the paper's grids: judged from the grown stamp
    assert [c.status for c in unpinned] == ["incomplete"] * 3, unpinned


def finished(method: str, p: float, t: int | None, seed: int, acc: float) -> dict[str, Any]:
    """A finished cell's record as results.json holds it (one evaluation, at the last of 100 rounds)."""
    final = {"acc_mean": acc, "acc_std": 0.05, "round": 99}
    return {"method": method, "topology": "er", "link_prob": p, "switch_interval": t, "seed": seed,
            "rounds": [{"round": 99, "acc_mean": acc, "acc_std": 0.05}], "final": final}  # fmt: skip


def test_the_claims_judge_the_papers_seeds_only_where_another_run_finished_other_seeds_in_the_directory() -> None:
    # A run of seed 1 (paper_table.py --seeds 1) shares the directories with the paper's seed 0, whose lora cell at
    # p = 0.5 has not finished. The summary rows count seed 1 as a finished seed: lora at p = 0.5 looked finished,
    # and tad at p = 0.02 was judged by the mean of seeds 0 and 1, neither of which is the paper's grid.
    import dataclasses

    from tadlora.sim.paper import markdown

    paper = dataclasses.replace(preset("cpu-sst2"), link_probs=(0.5, 0.02), seeds=(0,))
    methods, sweep_grid = paper_grids(paper)

    def accuracy(method: str, p: float, seed: int) -> float:  # seed 1 puts tad level with the others at p = 0.02
        if method != "tad":
            return 0.80 if p == 0.5 else 0.70
        return 0.85 if p == 0.5 else 0.80 if seed == 0 else 0.60

    grid_cells = [
        finished(m, p, paper_t(m, p), seed, accuracy(m, p, seed))
        for seed in (0, 1)
        for p in (0.5, 0.02)
        for m in ALL_METHODS
        if (m, p, seed) != ("lora", 0.5, 0)
    ]
    sweep_cells = [
        finished("tad", p, t, seed, 0.9 if t == (1 if p == 0.5 else 10) else 0.7)
        for seed in (0, 1)
        for p in (0.5, 0.02)
        for t in SWEEP_INTERVALS
    ]
    grown = dataclasses.replace(methods, seeds=(0, 1)).to_dict()
    grown_sweep = dataclasses.replace(sweep_grid, seeds=(0, 1)).to_dict()
    results = (
        {"config": grown, "cells": grid_cells, "summary": summarize(grid_cells)},
        {"config": grown_sweep, "cells": sweep_cells, "summary": summarize(sweep_cells)},
    )
    _text, verdict = markdown(*results, "t", paper=(methods, sweep_grid))
    assert [c.status for c in verdict] == ["incomplete", "reproduced", "reproduced"], verdict
    assert "only 6 of 7 methods finished" in verdict[0].detail, verdict[0].detail
    assert "tad 0.800" in verdict[1].detail, verdict[1].detail


def test_paired_gaps_are_tad_minus_the_other_on_each_common_seed_then_their_mean() -> None:
    from tadlora.sim.paper import paired_gaps

    assert paired_gaps({0: 0.80, 1: 0.70}, {0: 0.81, 1: 0.66}) == "s0 +0.010, s1 −0.040 → −0.015"
    assert paired_gaps({0: 0.80, 1: 0.70}, {1: 0.75, 2: 0.90}) == "s1 +0.050"  # seed 2 has no pair
    assert paired_gaps({0: 0.80}, {1: 0.75}) == "—"


def test_the_table_pairs_tad_with_each_method_seed_by_seed_at_the_papers_t() -> None:
    # The docs compared seeds by hand from the cell files, and twice quoted a stale gap; the pairs also cancel the
    # seeds' spread, which the mean ± spread cannot.
    import dataclasses

    from tadlora.sim.paper import markdown

    paper = dataclasses.replace(preset("cpu-sst2"), link_probs=(0.5, 0.02), seeds=(0, 1))
    methods, sweep_grid = paper_grids(paper)
    base = {"tad": 0.80, "lora": 0.75}
    grid_cells = [
        finished(m, p, paper_t(m, p), seed, base.get(m, 0.70) - 0.1 * seed + (0.02 if (m, seed) == ("tad", 1) else 0))
        for seed in (0, 1)
        for p in (0.5, 0.02)
        for m in ALL_METHODS
    ]
    grid_cells.append(finished("tad", 0.5, 2, 0, 0.99))  # another T of tad in the directory: not the paper's
    sweep_cells = [finished("tad", 0.5, t, 0, 0.70 + t / 100) for t in SWEEP_INTERVALS]
    results = (
        {"config": methods.to_dict(), "cells": grid_cells, "summary": summarize(grid_cells)},
        {"config": sweep_grid.to_dict(), "cells": sweep_cells, "summary": summarize(sweep_cells)},
    )
    text, _verdict = markdown(*results, "t", paper=(methods, sweep_grid))
    assert "| lora | s0 +0.050, s1 +0.070 → +0.060 | s0 +0.050, s1 +0.070 → +0.060 |" in text
    assert "| ffa | s0 +0.100, s1 +0.120 → +0.110 |" in text
    assert "| tad |" not in text.split("seed by seed, then their mean")[1].split("T sweep")[0]
    assert "| 10 | s0 0.800 |" in text and "| 15 | s0 0.850 |" in text


def test_a_claim_so_far_says_where_its_means_are_over_different_seeds() -> None:
    # tad's third seed finished before the others': its mean then moves by a seed no other method has yet, and the
    # check read it like for like (p = 0.5's best T moved from 2 to 1 on that one seed).
    grid = [r if r["method"] != "tad" else {**r, "seeds": 3} for r in method_rows(0.5, tad=0.8, others=0.8, seeds=2)]
    grid += method_rows(0.02, tad=0.8, others=0.7, seeds=2)
    sweep = [r if r["switch_interval"] != 1 else {**r, "seeds": 3} for r in sweep_rows(0.5, 1)] + sweep_rows(0.02, 5)
    high, low, best_t = claims(entries(grid), entries(sweep), [0.5, 0.02], seeds=3)
    assert "gap +0.000 (seeds: tad 3, adf 2)" in high.detail, high.detail
    assert "(seeds:" not in low.detail, low.detail
    assert "best T = 1 (0.900, 3 seeds; the T have 1 to 3)" in best_t.detail, best_t.detail
    assert "best T = 5 (0.900);" in best_t.detail, best_t.detail
