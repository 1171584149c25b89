"""The simulator: engines agree, runs resume, the smoke preset runs end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tadlora
from conftest import TINY_TRAIN, sentence_pairs
from tadlora import cliutil
from tadlora.adapter import AdapterModel, LoraSpec, ModelSpec, resolve_model_path
from tadlora.core.factors import Factor, factor_key, factor_of
from tadlora.core.methods import make_method
from tadlora.core.topology import make_topology
from tadlora.data import resolve_dataset
from tadlora.sim.cli import build_parser, config_from_args, main
from tadlora.sim.config import ALL_METHODS, RESOLVED_KEY, Cell, SimConfig, config_from_json, override, preset
from tadlora.sim.engine import BatchedEngine, SequentialEngine
from tadlora.sim.progress import Progress
from tadlora.sim.rounds import mix_round
from tadlora.sim.runner import Simulator, simulate
from tadlora.training import INPUTS_VERSION, encode


@pytest.mark.parametrize(
    ("name", "optimizer", "state"),
    [("tad", "adamw", "fresh"), ("lora", "sgd", "fresh"), ("tad", "adamw", "persistent")],
)
def test_batched_engine_matches_the_sequential_reference(
    name, optimizer, state, tiny_model, tiny_shards, tiny_dev
) -> None:
    method = make_method(name, 1) if name == "tad" else make_method(name)
    topology = make_topology("er", 4, link_prob=0.5, seed=1)
    spec = dataclasses.replace(
        TINY_TRAIN, optimizer=optimizer, optimizer_state=state, lr=0.5 if optimizer == "sgd" else TINY_TRAIN.lr
    )
    seq = SequentialEngine(tiny_model, tiny_shards, tiny_dev, spec, seed=0)
    bat = BatchedEngine(tiny_model, tiny_shards, tiny_dev, spec, seed=0, max_group_sequences=8)  # 2 groups
    try:
        rec_seq = simulate(seq, method, topology, rounds=3, eval_every=3)
        rec_bat = simulate(bat, method, topology, rounds=3, eval_every=3)
        # the base, the frozen head and the model's own factors (the batched engine trains its stacks instead) stay
        # frozen through the batched engine's passes: no wasted gradients, and the shared model is left as it was
        assert not [n for n, p in tiny_model.model.named_parameters() if p.requires_grad]
        for i in range(4):
            a, b = seq.get_factors(i), bat.get_factors(i)
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=2e-3)
        assert rec_bat[-1]["acc_mean"] == pytest.approx(rec_seq[-1]["acc_mean"], abs=1 / 24 + 1e-9)
        for r_seq, r_bat in zip(rec_seq, rec_bat, strict=True):
            assert r_bat["train_loss"] == pytest.approx(r_seq["train_loss"], rel=1e-3)
        for i in range(4):  # the per-client slices of the stacked optimizer state are each client's own
            a, b = seq.get_optimizer_state(i), bat.get_optimizer_state(i)
            assert a.keys() == b.keys() and bool(a) == (state == "persistent")
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=2e-3)
    finally:
        bat.close()
        seq.close()  # gives the session's model its initial factors back


def test_batched_engine_trains_as_the_sequential_reference_does_round_by_round_under_decaf(
    tiny_model, tiny_shards, tiny_dev
) -> None:
    """DeCAF's rank-r truncation amplifies a float difference by about 1/(σ_r − σ_r+1)·σ_1, which is ~500 in these
    rounds, so ~1e-6 of summation order (the batched passes add in another order) grows past any tolerance that
    would still catch a bug within three rounds. The engines are compared where they differ: each round both train
    from the same factors (both factors, fresh AdamW, from the post-SVD states), and the mixed result goes to both."""
    method, topology = make_method("decaf"), make_topology("er", 4, link_prob=0.5, seed=1)
    seq = SequentialEngine(tiny_model, tiny_shards, tiny_dev, TINY_TRAIN, seed=0)
    bat = BatchedEngine(tiny_model, tiny_shards, tiny_dev, TINY_TRAIN, seed=0, max_group_sequences=8)  # 2 groups
    try:
        for t in range(3):
            trained = method.trained(t)
            loss_seq, loss_bat = seq.train_round(t, trained), bat.train_round(t, trained)
            assert loss_bat == pytest.approx(loss_seq, rel=1e-4)
            snapshots = [seq.get_factors(i) for i in range(4)]
            for i, a in enumerate(snapshots):
                b = bat.get_factors(i)
                for key in a:
                    torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=2e-4)
            mixed, _ = mix_round(method, t, topology, snapshots)
            assert any(not torch.equal(m[k], a[k]) for m, a in zip(mixed, snapshots, strict=True) for k in a)
            for i, factors in enumerate(mixed):
                seq.set_factors(i, factors)
                bat.set_factors(i, factors)
    finally:
        bat.close()
        seq.close()  # gives the session's model its initial factors back


def test_batched_engine_matches_the_sequential_reference_on_sentence_pairs(tiny_model) -> None:
    """Pairs carry segment ids, which the batched engine pads and stacks with the ids and masks."""
    enc = encode(tiny_model.tokenizer, sentence_pairs(32), 32)
    shards = [enc.subset(range(i * 6, (i + 1) * 6)) for i in range(4)]
    dev = enc.subset(range(24, 32))
    topology = make_topology("er", 4, link_prob=0.5, seed=1)
    seq = SequentialEngine(tiny_model, shards, dev, TINY_TRAIN, seed=0)
    bat = BatchedEngine(tiny_model, shards, dev, TINY_TRAIN, seed=0, max_group_sequences=8)  # 2 groups
    try:
        rec_seq = simulate(seq, make_method("tad", 1), topology, rounds=2, eval_every=2)
        rec_bat = simulate(bat, make_method("tad", 1), topology, rounds=2, eval_every=2)
        for i in range(4):
            a, b = seq.get_factors(i), bat.get_factors(i)
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=2e-3)
        for r_seq, r_bat in zip(rec_seq, rec_bat, strict=True):
            assert r_bat["train_loss"] == pytest.approx(r_seq["train_loss"], rel=1e-3)
    finally:
        bat.close()
        seq.close()


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_batched_engine_pads_a_joint_batch_as_the_tokenizer_does_for_a_decoder_classifier(tmp_path) -> None:
    """A decoder classifier pools at the last token that is not the pad id: a joint batch of clients whose
    sentences have other lengths must be padded with the tokenizer's pad id (here not 0), not with zeros."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.pad_token = tokenizer.unk_token  # a pad id other than 0, as GPT-2's (its eos) or RoBERTa's (1) is
    ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, **ids, **no_dropout)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AdapterModel(ModelSpec(model=str(tmp_path), lora=LoraSpec(r=2, alpha=4.0, target_modules=("c_attn",))))
    assert model.tokenizer.pad_token_id != 0
    enc = encode(model.tokenizer, resolve_dataset("builtin:sst2-small", "train").subset(range(40)), 32)
    shards = [enc.subset(range(i * 10, (i + 1) * 10)) for i in range(4)]  # sentences of many lengths
    trained = frozenset({Factor.A, Factor.B})
    seq = SequentialEngine(model, shards, enc.subset(range(8)), TINY_TRAIN, seed=0)
    loss_seq = seq.train_round(0, trained)
    seq.close()
    bat = BatchedEngine(model, shards, enc.subset(range(8)), TINY_TRAIN, seed=0)  # one joint pass of 4 clients
    try:
        assert bat.train_round(0, trained) == pytest.approx(loss_seq, rel=1e-4)
        for i in range(4):
            a, b = seq.get_factors(i), bat.get_factors(i)
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=2e-4)
    finally:
        bat.close()


def smoke_config(**changes) -> SimConfig:
    return override(preset("smoke"), {"rounds": 4, "methods": ["tad", "lora"], **changes})


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_a_run_started_on_a_full_disk_names_the_file_and_leaves_no_empty_gitignore(tmp_path) -> None:
    """A run started on a full disk failed with a bare "[Errno 28] No space left on device" and left .locks/
    .gitignore empty, so no later run wrote it and a committed grid's git status showed its lock files."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        sim = Simulator(smoke_config(), disk / "run", quiet=True)
        ignore = disk / "run" / ".locks" / ".gitignore"
        with pytest.raises(OSError, match=re.escape(f"No space left on device: '{ignore}'")):
            sim._lock_file("config")
        assert not ignore.exists()
        filler.unlink()
        os.close(sim._lock_file("config"))
        assert ignore.read_text() == "*\n"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_cell_another_process_is_running_is_skipped_and_run_once_it_is_free(tmp_path, capsys) -> None:
    import fcntl
    import os

    config = smoke_config(rounds=1, eval_every=1, methods=["tad", "lora"])
    busy = next(c for c in config.cells() if c.method == "lora")
    locks = tmp_path / ".locks"
    locks.mkdir()
    fd = os.open(locks / f"{busy.key}.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a second simulator process on this directory holds while it runs the cell
    try:
        results = Simulator(config, tmp_path, quiet=True).run()
    finally:
        os.close(fd)
    assert results["missing_cells"] == [busy.key]  # the other cell ran; this one was left to its holder
    assert f"skipping cell {busy.key}: process 4242 is running it" in capsys.readouterr().err
    assert not (tmp_path / "cells" / f"{busy.key}.json").exists()
    results = Simulator(config, tmp_path, quiet=True).run()  # the holder died (its flock went with it)
    assert results["missing_cells"] == []
    assert (locks / ".gitignore").read_text() == "*\n"  # a committed grid leaves the lock files out


def stopped_after_round_2(config: SimConfig, cell: Cell, out: Path) -> tuple[Simulator, Path]:
    """A simulator of ``config`` in ``out`` whose run of ``cell`` stopped (an exception) after round 2's checkpoint,
    and that checkpoint's path."""

    class Stop(Exception):
        pass

    def stop_after_round_2(t: int, _record: dict) -> None:
        if t == 2:
            raise Stop

    sim = Simulator(config, out, quiet=True)
    sim.cells_dir.mkdir(parents=True)
    with pytest.raises(Stop):
        sim.run_cell(cell, stop_after_round_2)
    return sim, sim.cells_dir / f"{cell.key}.ckpt.safetensors"


def test_a_ctrl_c_dropped_where_it_landed_still_stops_the_run_after_the_round_it_came_in(tmp_path) -> None:
    """Python drops an exception raised in a finalizer the garbage collector runs, and numpy.random's compiled init
    drops one too: a Ctrl-C landing there was lost, and the run went on to its end (the paper_table interrupt test
    failed so, about one run in six). Within `interrupts_kept` it is remembered and raised after the round."""
    config = smoke_config(methods=["lora"])
    cell = next(config.cells())
    sim = Simulator(config, tmp_path / "run", quiet=True)
    sim.cells_dir.mkdir(parents=True)
    rounds: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    with cliutil.interrupts_kept():
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler) and handler is not previous
        with contextlib.suppress(KeyboardInterrupt):  # what a finalizer, or that init, does with it
            handler(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            sim.run_cell(cell, lambda t, _record: rounds.append(t))
    assert rounds == []  # stopped after the round it came in, which is not kept
    assert not (sim.cells_dir / f"{cell.key}.json").exists()
    assert signal.getsignal(signal.SIGINT) is previous
    cliutil.raise_if_interrupted()  # the block is over: nothing is pending
    assert Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)["final"]  # and the run goes on after


def test_a_cell_records_the_releases_and_device_that_ran_it_once_per_process(tmp_path) -> None:
    from importlib import metadata

    config = smoke_config(methods=["lora"])
    cell = next(config.cells())
    record = Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)
    [ran] = record["ran_with"]
    assert ran["tadlora"] == tadlora.__version__ and ran["python"] == sys.version.split()[0]
    assert (ran["torch"], ran["transformers"], ran["peft"]) == tuple(
        metadata.version(d) for d in ("torch", "transformers", "peft")
    )
    assert ran["device"].startswith("cpu")
    # ...and results.json carries it, cell by cell, as the cell's file does.
    results = Simulator(config, tmp_path / "run", quiet=True).collect([cell])
    assert results["cells"][0]["ran_with"] == [ran]


@pytest.mark.parametrize("kept", [None, "null", "{not json", '["a string", {"tadlora": "0.0.9"}]'])
def test_a_checkpoint_without_a_readable_record_of_what_ran_it_resumes_all_the_same(tmp_path, kept) -> None:
    # None: one written before cells kept it. The record is where rounds ran, never a reason to refuse them.
    config = smoke_config(methods=["lora"])
    cell = next(config.cells())
    _, ckpt = stopped_after_round_2(config, cell, tmp_path / "run")
    with safe_open(str(ckpt), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "ran_with"}
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta if kept is None else {**meta, "ran_with": kept})
    resumed = Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)
    earlier = [{"tadlora": "0.0.9"}] if kept and kept.startswith("[") else []
    assert resumed["ran_with"][:-1] == earlier and resumed["ran_with"][-1]["tadlora"] == tadlora.__version__


@pytest.mark.parametrize(
    ("engine", "state"), [("sequential", "fresh"), ("sequential", "persistent"), ("batched", "persistent")]
)
def test_an_interrupted_cell_resumes_from_its_checkpoint_to_the_same_result(tmp_path, engine, state) -> None:
    # lora trains both factors every round, so the rounds after the checkpoint need the state saved in it
    config = smoke_config(engine=engine, methods=["lora"], train={"optimizer_state": state})
    cell = next(config.cells())
    reference = Simulator(config, tmp_path / "ref", quiet=True).run_cell(cell)

    sim, ckpt = stopped_after_round_2(config, cell, tmp_path / "run")
    assert ckpt.exists()
    assert any(k.startswith("opt/") for k in load_file(str(ckpt))) == (state == "persistent")
    partial = sim.cells_dir / f"{cell.key}.partial.json"  # a readable copy of the records the checkpoint carries
    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    copy = {"records": json.loads(meta["records"]), "seconds": float(meta["seconds"]),
            "ran_with": json.loads(meta["ran_with"])}  # fmt: skip
    assert json.loads(partial.read_text()) == copy
    assert float(meta["seconds"]) > 0 and meta["round"] == "2"
    # As if it had run for long, on another machine with another torch: the resumed cell keeps both on record.
    elsewhere = {**json.loads(meta["ran_with"])[0], "torch": "2.12.0", "device": "cuda:0: NVIDIA H100"}
    save_file(load_file(str(ckpt)), str(ckpt),
              metadata={**meta, "seconds": "1000.0", "ran_with": json.dumps([elsewhere])})  # fmt: skip
    resumed = Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)
    assert 1000.0 < resumed["seconds"] < 1000.0 + 300  # the cell's cost counts both processes
    assert resumed["ran_with"] == [elsewhere, reference["ran_with"][0]]
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    for got, want in zip(resumed["rounds"], reference["rounds"], strict=True):
        for field in ("train_loss", "consensus_a", "consensus_b", "cross_term_norm", "acc_mean"):
            if want.get(field) is None:  # acc_mean exists on evaluation rounds only
                assert got.get(field) is None
            else:
                assert got[field] == pytest.approx(want[field], rel=1e-6, abs=1e-12), field
    assert not (sim.cells_dir / f"{cell.key}.ckpt.safetensors").exists()


class _Stop(Exception):
    pass


def _stopped_after_round_4_keeping_round_2_records(config: SimConfig, sim: Simulator) -> tuple[Cell, Path, Path, str]:
    """Run ``config``'s first cell (checkpoint_every=2) in ``sim`` and stop it after its round-4 checkpoint: the
    cell, its checkpoint and records file, and the text the records file had at the round-2 checkpoint."""
    cell = next(config.cells())
    sim.cells_dir.mkdir(parents=True)
    ckpt, partial = (sim.cells_dir / f"{cell.key}.{ext}" for ext in ("ckpt.safetensors", "partial.json"))
    older: dict[str, str] = {}

    def keep_round_2_records_then_stop(t: int, _record: dict) -> None:
        if t == 3:  # the round-4 checkpoint is written after this call; the round-2 one is on disk
            older["text"] = partial.read_text()
        if t == 4:
            raise _Stop

    with pytest.raises(_Stop):
        sim.run_cell(cell, keep_round_2_records_then_stop)
    return cell, ckpt, partial, older["text"]


def test_a_process_killed_between_checkpoint_and_records_resumes_from_the_checkpoint_s_own_records(tmp_path) -> None:
    # lora with persistent AdamW: every round after the checkpoint depends on the state saved in it.
    config = smoke_config(methods=["lora"], rounds=6, checkpoint_every=2, train={"optimizer_state": "persistent"})
    reference = Simulator(config, tmp_path / "ref", quiet=True).run_cell(next(config.cells()))
    sim = Simulator(config, tmp_path / "run", quiet=True)
    cell, _ckpt, partial, round_2_records = _stopped_after_round_4_keeping_round_2_records(config, sim)
    # As if the process had died after writing the round-4 checkpoint and before rewriting the records file.
    partial.write_text(round_2_records)
    resumed = Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)
    assert [r["round"] for r in resumed["rounds"]] == list(range(6))
    for got, want in zip(resumed["rounds"], reference["rounds"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6), got["round"]
    assert resumed["final"]["acc_mean"] == pytest.approx(reference["final"]["acc_mean"])


def test_a_checkpoint_without_its_records_is_refused_when_its_records_file_is_behind(tmp_path) -> None:
    config = smoke_config(methods=["lora"], rounds=6, checkpoint_every=2)
    sim = Simulator(config, tmp_path / "run", quiet=True)
    cell, ckpt, partial, round_2_records = _stopped_after_round_4_keeping_round_2_records(config, sim)
    # A checkpoint in the format written before records travelled inside it, with records two rounds behind it.
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"round": "4"})
    partial.write_text(round_2_records)
    with pytest.raises(ValueError, match=r"holds round 4 but .* ends at round 2 .*delete both files"):
        Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)
    # With matching records (how such checkpoints were always written) it resumes.
    records = json.loads(round_2_records)["records"]
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"round": str(len(records))})
    resumed = Simulator(config, tmp_path / "run", quiet=True).run_cell(cell)
    assert [r["round"] for r in resumed["rounds"]] == list(range(6))


def test_a_refused_checkpoint_leaves_the_shared_model_without_the_batched_engine_s_hooks(tmp_path) -> None:
    config = smoke_config(methods=["lora"], rounds=6, checkpoint_every=2, engine="batched")
    sim = Simulator(config, tmp_path / "run", quiet=True)
    cell, ckpt, partial, round_2_records = _stopped_after_round_4_keeping_round_2_records(config, sim)
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"round": "4"})  # records two rounds behind: refused
    partial.write_text(round_2_records)
    refused = Simulator(config, tmp_path / "run", quiet=True)
    with pytest.raises(ValueError, match="delete both files"):
        refused.run_cell(cell)
    [model] = refused._models.values()
    assert not [name for name, module in model.model.named_modules() if module._forward_hooks]


def test_a_cell_whose_topology_fails_leaves_the_shared_model_without_the_batched_engine_s_hooks(tmp_path) -> None:
    ring = tmp_path / "ring.txt"
    ring.write_text("0 1\n1 2\n2 3\n3 0\n")
    config = smoke_config(methods=["lora"], rounds=1, engine="batched", topologies=[f"file:{ring}"])
    sim = Simulator(config, tmp_path / "run", quiet=True)
    sim.cells_dir.mkdir(parents=True)
    ring.unlink()  # gone since the grid was checked
    with pytest.raises(FileNotFoundError):
        sim.run_cell(next(config.cells()))
    [model] = sim._models.values()
    assert not [name for name, module in model.model.named_modules() if module._forward_hooks]


def test_a_finished_run_is_not_recomputed_and_a_changed_config_is_refused(tmp_path) -> None:
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path, quiet=True).run()
    cell_file = next((tmp_path / "cells").glob("*.json"))
    stamp = cell_file.stat().st_mtime_ns
    Simulator(dataclasses.replace(config, methods=("lora", "ffa")), tmp_path, quiet=True).run()  # grid grows
    assert cell_file.stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2
    with pytest.raises(ValueError, match="different settings"):
        Simulator(dataclasses.replace(config, rounds=3), tmp_path, quiet=True).run()


@pytest.mark.parametrize(("first", "second"), [(("adf", 2), ("tad", 2)), (("rolora", None), ("tad-nojoint", 1))])
def test_cells_of_one_computation_compute_the_same_run(tmp_path, first, second) -> None:
    """The premise of sharing cells: policies equal but for their names give the same records, bit for bit."""
    config = smoke_config(rounds=3, engine="sequential")
    a, b = (Cell(m, "er", 0.5, t, 0) for m, t in (first, second))
    assert a.computation == b.computation and a.computation != Cell("lora", "er", 0.5, None, 0).computation
    run_a = Simulator(config, tmp_path / "a", quiet=True)
    run_b = Simulator(config, tmp_path / "b", quiet=True)
    for sim in (run_a, run_b):
        sim.cells_dir.mkdir(parents=True)
    assert run_a.run_cell(a)["rounds"] == run_b.run_cell(b)["rounds"]


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_a_cell_run_after_another_in_the_same_process_computes_what_it_computes_alone(tmp_path, engine) -> None:
    """Cells of one seed share one model; each starts from the seed's init, never from what the last one left."""
    config = smoke_config(rounds=2, engine=engine)
    lora, tad = Cell("lora", "er", 0.5, None, 0), Cell("tad", "er", 0.5, 1, 0)
    after = Simulator(config, tmp_path / "after", quiet=True)
    alone = Simulator(config, tmp_path / "alone", quiet=True)
    for sim in (after, alone):
        sim.cells_dir.mkdir(parents=True)
    after.run_cell(lora)
    assert after.run_cell(tad)["rounds"] == alone.run_cell(tad)["rounds"]


def test_a_computation_runs_once_and_is_shared_only_from_a_run_of_the_same_settings(tmp_path) -> None:
    config = smoke_config(rounds=2, methods=["tad", "adf", "rolora", "tad-nojoint"], switch_intervals=[1])
    Simulator(config, tmp_path / "grid", quiet=True).run()
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "grid" / "cells").glob("*.json")}
    # adf keeps its own T = 5; tad-nojoint with T = 1 is rolora: copied, not run, and saying from where.
    assert cells["tad-nojoint__er__p0.5__T1__s0"]["same_as"] == "rolora__er__p0.5__T-__s0"
    assert cells["tad-nojoint__er__p0.5__T1__s0"]["rounds"] == cells["rolora__er__p0.5__T-__s0"]["rounds"]
    assert cells["tad-nojoint__er__p0.5__T1__s0"]["method"] == "tad-nojoint"
    assert "same_as" not in cells["adf__er__p0.5__T5__s0"] and "same_as" not in cells["tad__er__p0.5__T1__s0"]

    # Another run directory takes tad T = 5 from the grid's adf, and nothing else runs there ...
    sweep = smoke_config(rounds=2, methods=["tad"], switch_intervals=[5])
    results = Simulator(sweep, tmp_path / "sweep", quiet=True, share_from=[tmp_path / "grid"]).run(report_only=True)
    assert [c["same_as"] for c in results["cells"]] == ["adf__er__p0.5__T5__s0"]
    # ... but never from a run of other settings, whose results would not be this run's.
    other = Simulator(
        dataclasses.replace(sweep, rounds=3), tmp_path / "other", quiet=True, share_from=[tmp_path / "grid"]
    )
    assert other.run(report_only=True)["missing_cells"] == ["tad__er__p0.5__T5__s0"]


def test_runs_of_parts_of_a_grid_add_up_in_its_stamp_and_results_instead_of_overwriting_them(tmp_path) -> None:
    """A long grid is run in parts (a seed at a time, one process per core). Each part used to stamp config.json
    and write results.json with its own few cells: the directory's record shrank to whichever part ended last."""
    first = smoke_config(rounds=1, methods=["lora"], seeds=[0], name="the-grid")
    Simulator(first, tmp_path, quiet=True).run()
    part = smoke_config(rounds=1, methods=["ffa"], seeds=[1])  # the preset's name, another method and seed
    results = Simulator(part, tmp_path, quiet=True).run()
    stamp = json.loads((tmp_path / "config.json").read_text())
    assert (stamp["name"], stamp["methods"], stamp["seeds"]) == ("the-grid", ["lora", "ffa"], [0, 1])
    assert sorted(c["key"] for c in results["cells"]) == ["ffa__er__p0.5__T-__s1", "lora__er__p0.5__T-__s0"]
    assert sorted(results["missing_cells"]) == ["ffa__er__p0.5__T-__s0", "lora__er__p0.5__T-__s1"]
    assert list(results["config"]["methods"]) == ["lora", "ffa"]
    assert json.loads((tmp_path / "results.json").read_text())["missing_cells"] == results["missing_cells"]
    # A report of one cell reports the whole grid too, and a stamp is still a config file that runs the grid.
    again = Simulator(part, tmp_path, quiet=True).run(report_only=True)
    assert sorted(again["missing_cells"]) == sorted(results["missing_cells"])
    assert config_from_json((tmp_path / "config.json").read_text()).methods == ("lora", "ffa")


def test_the_results_of_the_last_process_to_finish_cover_the_grid_a_later_started_process_grew(
    tmp_path, capsys
) -> None:
    """Two processes on one directory, one per core: A starts (stamping lora), B starts while A runs (growing the
    stamp to lora and ffa) and finishes first. A, finishing last, used to write results.json from the grid it read
    when it started: B's cell vanished from the report, not even listed as missing."""
    first = smoke_config(rounds=1, methods=["lora"])
    second = smoke_config(rounds=1, methods=["ffa"])
    a = Simulator(first, tmp_path, quiet=False)
    run_cell = a.run_cell

    def b_starts_and_finishes_while_a_runs(cell, on_round=None, on_start=None):
        Simulator(second, tmp_path, quiet=True).run()
        return run_cell(cell, on_round, on_start)

    a.run_cell = b_starts_and_finishes_while_a_runs  # type: ignore[method-assign]
    results = a.run()
    keys = ["ffa__er__p0.5__T-__s0", "lora__er__p0.5__T-__s0"]
    assert sorted(c["key"] for c in results["cells"]) == keys and results["missing_cells"] == []
    assert list(results["config"]["methods"]) == ["lora", "ffa"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert sorted(c["key"] for c in written["cells"]) == keys
    assert "2/2 cells of the grid done" in capsys.readouterr().err  # not "2/1": the grid, not this run's part


def test_a_run_stamped_before_a_setting_existed_resumes_with_that_setting_at_its_default(tmp_path) -> None:
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path, quiet=True).run()
    stamp = json.loads((tmp_path / "config.json").read_text())
    for name in ("precision", "optimizer", "optimizer_state"):  # as before they existed
        del stamp["train"][name]
    del stamp["robust_mixing"], stamp[RESOLVED_KEY]
    (tmp_path / "config.json").write_text(json.dumps(stamp))
    assert Simulator(config, tmp_path, quiet=True).run(report_only=True)["missing_cells"] == []
    bf16 = override(config, {"train": {"precision": "bf16"}})
    with pytest.raises(ValueError, match=r"different settings \(train\)"):
        Simulator(bf16, tmp_path, quiet=True).run()


def test_a_grid_goes_on_only_in_the_precision_its_cells_computed_in(tmp_path, capsys) -> None:
    """The stamp records the matmul precision the host resolved; "auto" means fp32 on a CPU but bf16 on CUDA, so a
    grid stamped bf16 (as on a GPU) is refused here unless pinned, and auto and fp32 are one computation on a CPU."""
    from tadlora.sim.config import config_from_json

    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path, quiet=True).run()
    stamp = json.loads((tmp_path / "config.json").read_text())
    assert stamp[RESOLVED_KEY] == {"matmul_precision": "fp32", "engine": "batched", "inputs": INPUTS_VERSION}
    assert config_from_json(json.dumps(stamp)) == config  # a stamp is still a config file
    fp32 = override(config, {"train": {"precision": "fp32"}})
    assert Simulator(fp32, tmp_path, quiet=True).run()["missing_cells"] == []  # the same computation here
    on_gpu = {**stamp, RESOLVED_KEY: {"matmul_precision": "bf16"}}  # as a CUDA host stamps precision auto
    (tmp_path / "config.json").write_text(json.dumps(on_gpu))
    with pytest.raises(ValueError, match=r"matmul precision: bf16 there, fp32 here \(pin it with --precision bf16\)"):
        Simulator(config, tmp_path, quiet=True).run(report_only=True)
    Simulator(config, tmp_path / "other", quiet=True, share_from=[tmp_path]).run()  # nor lend its cells here
    assert not any("same_as" in json.loads(p.read_text()) for p in (tmp_path / "other" / "cells").glob("*.json"))
    assert "matmul precision: bf16 there" in capsys.readouterr().err
    # A stamp from before the record: a report leaves it without one, a run that computes adds it.
    legacy = {k: v for k, v in stamp.items() if k != RESOLVED_KEY}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    Simulator(config, tmp_path, quiet=True).run(report_only=True)
    assert RESOLVED_KEY not in json.loads((tmp_path / "config.json").read_text())
    Simulator(config, tmp_path, quiet=True).run()
    assert json.loads((tmp_path / "config.json").read_text())[RESOLVED_KEY]["matmul_precision"] == "fp32"


def test_a_grid_of_sentence_pairs_read_as_one_sentence_is_not_resumed_under_segment_ids(tmp_path, capsys) -> None:
    """Since inputs version 2 a sentence pair's segment ids reach the model; a checkpoint of the rounds before
    (every MNLI probe of docs/simulator.md) resumed under them without a word, its cell read one way, then the
    other. A stamp without the record is such a run: refused for a dataset of pairs (a report, which reads the
    cells as computed, goes on), and its cells are not lent; a grid of single sentences, read alike by both, goes
    on."""
    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(f"a dog {i}\tan animal {i}\t1\na cat {i}\ta car {i}\t0\n" for i in range(40))
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("premise\thypothesis\tlabel\n" + rows)
    spec = f"{data / 'train.tsv'}?text=premise,hypothesis&label=label"
    pairs = smoke_config(methods=["lora"], rounds=1, dataset=spec, samples_per_client=8, eval_samples=None)
    singles = smoke_config(methods=["lora"], rounds=1)
    for config, name in ((pairs, "pairs"), (singles, "singles")):
        Simulator(config, tmp_path / name, quiet=True).run()
        stamp = json.loads((tmp_path / name / "config.json").read_text())
        del stamp[RESOLVED_KEY]["inputs"]  # as written before the record
        (tmp_path / name / "config.json").write_text(json.dumps(stamp))
    # Older still: no record of the host at all, as the MNLI probes' stamps; cells there, so computed by such a run.
    shutil.copytree(tmp_path / "pairs", tmp_path / "older")
    stamp = json.loads((tmp_path / "older" / "config.json").read_text())
    del stamp[RESOLVED_KEY]
    (tmp_path / "older" / "config.json").write_text(json.dumps(stamp))
    with pytest.raises(ValueError, match=r"inputs: its cells read each sentence pair as one sentence"):
        Simulator(override(pairs, {"seeds": [0, 1]}), tmp_path / "older", quiet=True).run()
    # A report's stamp (no record) over no cell vouches for nothing: a run goes on there.
    Simulator(pairs, tmp_path / "reported", quiet=True).run(report_only=True)
    assert Simulator(pairs, tmp_path / "reported", quiet=True).run()["missing_cells"] == []
    grown = override(pairs, {"seeds": [0, 1]})
    with pytest.raises(ValueError, match=r"inputs: its cells read each sentence pair as one sentence") as e:
        Simulator(grown, tmp_path / "pairs", quiet=True).run()
    assert "--config" not in str(e.value)  # its own settings would be refused alike
    assert Simulator(pairs, tmp_path / "pairs", quiet=True).run(report_only=True)["missing_cells"] == []
    lent = Simulator(pairs, tmp_path / "new", quiet=True, share_from=[tmp_path / "pairs"]).run(report_only=True)
    assert lent["missing_cells"] and "not sharing cells from" in capsys.readouterr().err
    grown_singles = override(singles, {"seeds": [0, 1]})
    assert Simulator(grown_singles, tmp_path / "singles", quiet=True).run()["missing_cells"] == []


def test_a_grid_goes_on_only_with_the_engine_its_cells_computed_with(tmp_path) -> None:
    """Engine "auto" is the batched engine on CUDA and the sequential one on a CPU, which agree only to float
    tolerance: a grid stamped as run by the batched engine (as a GPU host stamps "auto") is refused here unless
    pinned."""
    config = smoke_config(methods=["lora"], rounds=2, engine="auto")
    on_gpu = {"matmul_precision": "fp32", "engine": "batched"}
    stamp = {**json.loads(json.dumps(config.to_dict())), RESOLVED_KEY: on_gpu}
    (tmp_path / "config.json").write_text(json.dumps(stamp))
    with pytest.raises(ValueError, match=r"engine: batched there, sequential here \(pin it with --engine batched\)"):
        Simulator(config, tmp_path, quiet=True).run(report_only=True)
    Simulator(dataclasses.replace(config, engine="batched"), tmp_path, quiet=True).run(report_only=True)
    # A stamp of "auto" run sequentially here and a pinned "sequential" are one computation.
    stamp[RESOLVED_KEY] = {"matmul_precision": "fp32", "engine": "sequential"}
    (tmp_path / "config.json").write_text(json.dumps(stamp))
    Simulator(dataclasses.replace(config, engine="sequential"), tmp_path, quiet=True).run(report_only=True)


def test_a_report_vouches_for_no_host_it_did_not_compute_on(tmp_path) -> None:
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path / "new", quiet=True).run(report_only=True)  # a new directory: nothing was computed
    assert RESOLVED_KEY not in json.loads((tmp_path / "new" / "config.json").read_text())
    # results.json has every key docs/simulator.md lists, "plots" included (none to list yet)
    report = json.loads((tmp_path / "new" / "results.json").read_text())
    assert set(report) == {"config", "cells", "summary", "missing_cells", "plots"} and report["plots"] == []
    stamp = {**json.loads(json.dumps(config.to_dict())), RESOLVED_KEY: {"matmul_precision": "fp32"}}
    (tmp_path / "old" / "config.json").parent.mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(stamp))
    Simulator(config, tmp_path / "old", quiet=True).run(report_only=True)  # the record is kept as the run wrote it
    assert json.loads((tmp_path / "old" / "config.json").read_text())[RESOLVED_KEY] == {"matmul_precision": "fp32"}


def test_a_run_replaces_the_stamp_of_a_report_under_which_nothing_ran(tmp_path, capsys) -> None:
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(dataclasses.replace(config, rounds=3), tmp_path, quiet=True).run(report_only=True)  # a mistyped look
    with pytest.raises(ValueError, match="different settings"):  # a report of other settings is still refused
        Simulator(dataclasses.replace(config, rounds=4), tmp_path, quiet=True).run(report_only=True)
    assert Simulator(config, tmp_path, quiet=True).run()["missing_cells"] == []
    assert "replacing" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["rounds"] == 2
    # Once a cell ran under a stamp, another run's settings are refused, as before.
    with pytest.raises(ValueError, match="different settings"):
        Simulator(dataclasses.replace(config, rounds=3), tmp_path, quiet=True).run()


def test_cli_precision_and_optimizer_set_the_training_spec_and_keep_the_rest() -> None:
    from tadlora.sim.cli import build_parser, config_from_args

    args = build_parser().parse_args(["--preset", "cpu-sst2", "--out", "x", "--precision", "bf16"])
    config = config_from_args(args)
    assert config.train.precision == "bf16" and config.train.local_steps == preset("cpu-sst2").train.local_steps
    assert config.train.optimizer == "adamw"
    flags = ["--preset", "cpu-sst2", "--out", "x", "--optimizer", "sgd", "--precision", "fp32"]
    config = config_from_args(build_parser().parse_args(flags))
    assert (config.train.optimizer, config.train.precision) == ("sgd", "fp32")
    assert config.train.lr == preset("cpu-sst2").train.lr
    assert config.train.optimizer_state == "fresh"
    flags = ["--preset", "cpu-sst2", "--out", "x", "--optimizer-state", "persistent"]
    with pytest.raises(ValueError, match="'decaf' re-factors B and A every round"):  # its moments cannot carry over
        config_from_args(build_parser().parse_args(flags))
    assert config_from_args(build_parser().parse_args([*flags, "--methods", "tad,lora"])).train.persistent


def test_smoke_preset_runs_every_method_end_to_end(tmp_path, capsys) -> None:
    assert main(["--preset", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {c["method"] for c in results["cells"]} == set(ALL_METHODS)
    assert list(tmp_path.glob("*.png"))
    rounds = results["config"]["rounds"]
    for cell in results["cells"]:
        assert len(cell["rounds"]) == rounds
        last = cell["rounds"][-1]
        for field in (
            "acc_mean",
            "acc_std",
            "train_loss",
            "consensus_a",
            "consensus_b",
            "consensus_ba",
            "cross_term_norm",
            "bytes",
        ):
            assert last[field] is not None, field
    out = capsys.readouterr().out
    assert "tad" in out and "acc" in out


def test_report_only_reports_the_finished_cells_and_runs_nothing(tmp_path) -> None:
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path, quiet=True).run()
    stamp = (tmp_path / "config.json").read_bytes()
    bigger = dataclasses.replace(config, methods=("lora", "ffa"))
    results = Simulator(bigger, tmp_path, quiet=True).run(report_only=True)
    assert [c["method"] for c in results["cells"]] == ["lora"]
    assert results["missing_cells"] and "ffa" in results["missing_cells"][0]
    # ... and leaves the directory's record of its grid as it was: a report asked of a larger grid does not make
    # its cells missing from the directory for good.
    assert (tmp_path / "config.json").read_bytes() == stamp
    assert Simulator(config, tmp_path, quiet=True).run(report_only=True)["missing_cells"] == []
    assert (tmp_path / "accuracy_vs_round.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(tmp_path.glob(".*.tmp"))  # plots are written through a temp file, renamed over the old one


def test_a_method_has_one_colour_in_every_panel_and_the_legend_names_every_line() -> None:
    """A grid still running (a report) can have finished lora and rolora at p = 0.5 but only rolora at p = 0.02:
    each panel used to colour its own lines in turn, so rolora took lora's colour there, in the one panel whose
    lines the legend named."""
    import matplotlib.pyplot as plt

    from tadlora.sim.plots import _round_figure
    from tadlora.sim.summary import summarize

    def run(method: str, p: float) -> dict:
        rounds = [{"round": 0, "acc_mean": 0.5, "acc_std": 0.1, "cross_term_norm": None}]  # NaN norms: null
        final = {"acc_mean": 0.5, "acc_std": 0.1, "round": 0}
        return {"method": method, "topology": "er", "link_prob": p, "switch_interval": None, "seed": 0,
                "rounds": rounds, "final": final}  # fmt: skip

    cells = [run("lora", 0.5), run("rolora", 0.5), run("rolora", 0.02)]
    results = {"config": {"name": "partial"}, "cells": cells, "summary": summarize(cells)}
    fig = _round_figure(results, "acc_mean", "accuracy")
    try:
        colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes]
        assert [sorted(c) for c in colours] == [["lora", "rolora"], ["rolora"]]
        assert colours[1]["rolora"] == colours[0]["rolora"] != colours[0]["lora"]
        assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["lora (n=1)", "rolora (n=1)"]
    finally:
        plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend without lines
        empty = _round_figure(results, "cross_term_norm", "norm")  # nothing to draw: no legend
    plt.close(empty)
    assert all(ax.get_legend() is None for ax in empty.axes)


def test_cli_refuses_bad_input_with_a_message(tmp_path, capsys) -> None:
    assert main(["--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--methods", "tad,bogus", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_cli_says_what_to_change_when_the_gpu_runs_out_of_memory(tmp_path, capsys, monkeypatch) -> None:
    def out_of_memory(self: Simulator, report_only: bool = False) -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # what a too-large grid meets

    monkeypatch.setattr(Simulator, "run", out_of_memory)
    assert main(["--preset", "smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CUDA out of memory" in err and "--engine sequential" in err and "batch_size" in err


def test_cli_shares_cells_from_another_run_and_says_when_it_cannot(tmp_path, capsys) -> None:
    base = ["--preset", "smoke", "--rounds", "2", "--quiet", "--methods", "adf"]
    assert main([*base, "--out", str(tmp_path / "grid")]) == 0
    sweep = ["--preset", "smoke", "--rounds", "2", "--quiet", "--methods", "tad", "--switch-intervals", "5"]
    assert (
        main([*sweep, "--out", str(tmp_path / "sweep"), "--share-from", str(tmp_path / "grid"), "--report-only"]) == 0
    )
    [cell] = json.loads((tmp_path / "sweep" / "results.json").read_text())["cells"]
    assert cell["same_as"] == "adf__er__p0.5__T5__s0"
    capsys.readouterr()
    assert main([*sweep, "--out", str(tmp_path / "x"), "--share-from", str(tmp_path / "nothing")]) == 2
    assert "no simulator run there" in capsys.readouterr().err
    longer = [*sweep, "--rounds", "3", "--report-only", "--out", str(tmp_path / "y")]
    assert main([*longer, "--share-from", str(tmp_path / "grid")]) == 0
    err = capsys.readouterr().err
    assert "not sharing cells from" in err and "other settings (rounds)" in err


def test_bytes_count_only_what_the_method_sends() -> None:
    from tadlora.core.factors import Factor, factor_key
    from tadlora.sim.rounds import mix_round

    snap = {factor_key("m", Factor.A): torch.zeros(2, 3), factor_key("m", Factor.B): torch.zeros(3, 2)}
    topo = make_topology("complete", 3)  # 3 links, 6 messages
    _, both = mix_round(make_method("lora"), 0, topo, [snap] * 3)
    _, only_b = mix_round(make_method("ffa"), 0, topo, [snap] * 3)
    assert both == 6 * 12 * 4 and only_b == 6 * 6 * 4


def test_progress_estimates_the_time_left_in_a_cell_from_the_rounds_run_here() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress(2, stream=out, clock=lambda: now[0])
    cell = Cell(method="tad", topology="er", link_prob=0.02, switch_interval=12, seed=0)
    evaluated = {"train_loss": 0.5, "acc_mean": 0.7, "acc_std": 0.1}
    progress.begin(0, cell)
    for t in range(10):  # 10 s a round, 100 rounds: 900 s left after round 10
        now[0] += 10
        progress.update(0, cell, t, 100, {"train_loss": 0.5} if t < 9 else evaluated)
    # A resumed cell: its 60 earlier rounds (another process) do not count; 30 s a round from here.
    progress.begin(1, cell, resuming=True)
    for t in range(60, 70):
        now[0] += 30
        progress.update(1, cell, t, 100, {"train_loss": 0.5} if t < 69 else evaluated)
    # Not a terminal: a line per cell's start, after its first round here (the first estimate), and per evaluation.
    lines = out.getvalue().splitlines()
    assert len(lines) == 6
    assert lines[0] == "[1/2] tad er p=0.02 T=12 seed=0: starting"
    assert "round 1/100 loss 0.500 (10s, cell done in ~16m)" in lines[1]
    assert lines[3] == "[2/2] tad er p=0.02 T=12 seed=0: resuming from its checkpoint"
    assert "round 61/100 loss 0.500 (130s, cell done in ~20m)" in lines[4]
    lines = [lines[2], lines[5]]
    assert "round 10/100" in lines[0] and "acc 0.700±0.100" in lines[0] and "(100s, cell done in ~15m)" in lines[0]
    assert "[2/2]" in lines[1] and "round 70/100" in lines[1] and "(400s, cell done in ~15m)" in lines[1]
    quiet = io.StringIO()
    Progress(1, stream=quiet, quiet=True).begin(0, cell)
    assert quiet.getvalue() == ""


def test_progress_leaves_a_cell_s_loading_out_of_its_first_estimate(tmp_path) -> None:
    """The first estimate of a cell divided everything since its "starting" line by one round: the model and data
    loading (tokenizing a GLUE train set) and a checkpoint's reading counted as a round's time, times the rounds left
    (a tiny resumed cell said "~12m" for 8 s of rounds)."""
    now = [0.0]
    out = io.StringIO()
    progress = Progress(1, stream=out, clock=lambda: now[0])
    cell = Cell(method="lora", topology="er", link_prob=0.5, switch_interval=None, seed=0)
    progress.begin(0, cell)
    now[0] += 60  # loading
    progress.rounds_start()
    now[0] += 2  # round 1
    progress.update(0, cell, 0, 31, {"train_loss": 0.5})
    assert "round 1/31 loss 0.500 (62s, cell done in ~60s)" in out.getvalue(), out.getvalue()
    # The simulator calls it once its cell is loaded and before the first round, resumed or not.
    sim = Simulator(smoke_config(methods=["lora"], rounds=4, checkpoint_every=2), tmp_path, quiet=True)
    events: list[str] = []

    def started() -> None:
        events.append("start" if sim._data is not None and sim._models else "start before loading")

    def stop_in_round_2(t: int, _record: dict) -> None:  # after the checkpoint of rounds 0-1, as a Ctrl-C would
        events.append(f"round {t}")
        if t == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim.run_cell(cell, stop_in_round_2, on_start=started)
    sim.run_cell(cell, lambda t, _r: events.append(f"round {t}"), on_start=started)
    assert events == ["start", "round 0", "round 1", "round 2", "start", "round 2", "round 3"]


def test_an_unsized_preset_says_so_in_help_and_when_a_run_starts(tmp_path, capsys, caplog) -> None:
    assert "cpu-mnli is not sized" in " ".join(build_parser().format_help().split())
    # Refused right after the warning (nothing to share from), so that no MiniLM is loaded here.
    argv = ["--preset", "cpu-mnli", "--out", str(tmp_path / "run"), "--share-from", str(tmp_path / "nothing")]
    with caplog.at_level(logging.WARNING, logger="tadlora.sim"):
        assert main(argv) == 2
    assert "no simulator run there" in capsys.readouterr().err
    [warning] = [r.getMessage() for r in caplog.records if r.name == "tadlora.sim"]
    assert warning.startswith("preset cpu-mnli is not sized") and "paper-mnli on a GPU" in warning
    caplog.clear()
    assert main(["--preset", "cpu-sst2", *argv[2:]]) == 2  # a sized preset runs without it
    assert not [r for r in caplog.records if r.name == "tadlora.sim"]


def test_a_grid_axis_value_given_twice_is_one_cell_not_two_seeds() -> None:
    # `--seeds 0,0` or `--link-probs 0.5,0.50` used to yield the same cell twice: run once, but collected twice,
    # so the summary reported n=2 seeds with a seed std of 0 (which then made every gap "more than the spread").
    config = smoke_config(methods=["lora", "lora"], seeds=[0, 0], link_probs=[0.5, 0.50], topologies=["er", "er"])
    assert [c.key for c in config.cells()] == ["lora__er__p0.5__T-__s0"]


def test_axis_values_that_a_cell_s_file_name_would_not_tell_apart_are_refused(tmp_path) -> None:
    # Each would have made the second cell "finished" with the first one's file, then counted it twice.
    with pytest.raises(ValueError, match=r"link_probs 0.1 and 0.1000001 would share result files"):
        smoke_config(link_probs=[0.1, 0.1000001])
    for name in ("ring-4.txt", "ring_4.txt"):
        (tmp_path / name).write_text("0 1\n1 2\n2 3\n3 0\n")
    dash, underscore = f"file:{tmp_path / 'ring-4.txt'}", f"file:{tmp_path / 'ring_4.txt'}"
    with pytest.raises(ValueError, match="would share result files"):
        smoke_config(topologies=[dash, underscore])
    assert len({c.key for c in smoke_config(topologies=[dash, "ring"], link_probs=[0.1, 0.2]).cells()}) == 8


def test_cli_refuses_switch_intervals_that_no_method_it_runs_would_use(tmp_path, capsys) -> None:
    from tadlora.sim.cli import config_from_args

    argv = ["--preset", "smoke", "--switch-intervals", "1,2", "--out", str(tmp_path), "--report-only", "--quiet"]
    assert main([*argv, "--methods", "adf,lora"]) == 2  # adf keeps T = 5; the T grid used to be dropped silently
    err = capsys.readouterr().err
    assert "--switch-intervals would be ignored" in err and "tad, tad-nojoint" in err
    config = config_from_args(build_parser().parse_args([*argv, "--methods", "tad,adf"]))
    assert [(c.method, c.switch_interval) for c in config.cells()] == [("tad", 1), ("tad", 2), ("adf", 5)]


def test_cli_help_says_what_a_run_without_a_preset_starts_from() -> None:
    help_text = " ".join(build_parser().format_help().split())
    assert "Without one the run starts from the defaults: minilm on builtin:sst2-small, 10 clients" in help_text


def test_cli_help_names_the_engine_a_preset_runs_with() -> None:
    """The help called auto the default, but the presets pin theirs: smoke runs batched, the CPU presets sequential."""
    help_text = " ".join(build_parser().format_help().split())
    assert "auto (default" not in help_text
    assert "default auto, or the preset's (cpu-mnli sequential, cpu-sst2 sequential, smoke batched)" in help_text


def test_cli_takes_the_edge_list_topology_its_help_shows() -> None:
    from tadlora.sim.cli import config_from_args

    help_text = " ".join(build_parser().format_help().split())
    assert "edges:0-1,1-2,..." in help_text  # a comma list whose items may hold commas themselves
    args = build_parser().parse_args(["--preset", "smoke", "--out", "x", "--topologies", "edges:0-1,1-2,2-3,ring"])
    assert config_from_args(args).topologies == ("edges:0-1,1-2,2-3", "ring")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"train": {"bogus": 1}}, "unknown train settings"),
        # a flat "lr" named only the top-level settings, where it is not; the message says where it goes
        ({"lr": 0.1}, """unknown simulator settings: ['lr'] ('lr' is a train setting: {"train": {"lr": ...}})"""),
        # and the other way round: a top-level setting inside a group, or one group's setting in the other
        (
            {"train": {"rounds": 5}},
            """unknown train settings: ['rounds'] ('rounds' is a top-level setting: {"rounds": ...})""",
        ),
        ({"lora": {"lr": 0.1}}, """unknown lora settings: ['lr'] ('lr' is a train setting: {"train": {"lr": ...}})"""),
        ({"lora": 5}, "lora must be"),
        ({"rounds": "5"}, "rounds must be"),
        ({"seeds": 0}, "seeds must be"),
        ({"lora": {"target_modules": "query"}}, "target_modules must be"),
        ({"checkpoint_every": 0}, "checkpoint_every"),  # used to die after the first round: modulo by zero
        ({"eval_samples": 0}, "eval_samples"),  # used to die at the first evaluation
        ({"seeds": [-1]}, "seeds must be >= 0"),  # used to die in the data split, after loading model and data
        ({"switch_intervals": []}, "switch_intervals must name"),  # used to drop every tad cell without a word
        ({"seeds": []}, "seeds must name"),  # used to run nothing and report success
        ({"sweep_methods": ["tad-lora"]}, "unknown method 'tad-lora'"),  # used to run tad at its default T only
        ({"split": "label-skw"}, "unknown shard scheme 'label-skw'"),  # used to pass until the data had loaded
        ({"split": "dirichlet:0"}, "dirichlet alpha must be a positive number"),
    ],
)
def test_cli_refuses_a_malformed_config_file_with_a_message(tmp_path, capsys, settings, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(settings))
    argv = ["--preset", "smoke", "--config", str(path), "--out", str(tmp_path / "run"), "--report-only", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tadlora-sim: error:") and message in err, err


def test_cli_refuses_unusable_paths_with_a_message(tmp_path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["--preset", "smoke", "--config", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("tadlora-sim: error:")
    assert main(["--preset", "smoke", "--methods", "lora", "--out", str(a_file), "--report-only", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("tadlora-sim: error:")


def test_a_refused_run_directory_says_how_to_go_on_with_it(tmp_path, capsys) -> None:
    """The refusal of a directory of other settings used to say only "use another --out directory to start a new
    run": no way to report or resume it (its stamp is a config file), and a run that stopped before any cell (a
    mistyped --model) left a directory that refused the corrected command, although it held no result."""
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--methods", "lora", "--rounds", "2", "--out", str(out), "--quiet"]
    assert main([*argv, "--model", str(tmp_path / "no-such-model")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different settings (model)" in err and f"rm -r {out}" in err, err
    shutil.rmtree(out)
    assert main(argv) == 0
    # With a finished cell: a report (or a resume) without the run's flags is told how to give its settings.
    capsys.readouterr()
    assert main(["--out", str(out), "--report-only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--config {out / 'config.json'}" in err and "rm -r" not in err, err
    assert main(["--config", str(out / "config.json"), "--out", str(out), "--report-only", "--quiet"]) == 0
    assert main(["--preset", "smoke", "--rounds", "3", "--out", str(out), "--quiet"]) == 2
    assert f"to go on with that run, give its own settings (--config {out / 'config.json'})" in capsys.readouterr().err


def test_a_grid_stamped_before_the_init_setting_existed_goes_on_only_with_torch_s_init(tmp_path) -> None:
    """Runs before `init` existed drew A and the head with torch's own init: their directory resumes with that,
    and a portable run is refused instead of mixed in (its cells would start elsewhere)."""
    config = override(smoke_config(methods=["lora"], rounds=2), {"init": "torch"})
    Simulator(config, tmp_path, quiet=True).run()
    stamp = json.loads((tmp_path / "config.json").read_text())
    assert stamp.pop("init") == "torch"
    (tmp_path / "config.json").write_text(json.dumps(stamp))
    assert Simulator(config, tmp_path, quiet=True).run(report_only=True)["missing_cells"] == []
    with pytest.raises(ValueError, match=r"different settings \(init\)"):
        Simulator(override(config, {"init": "portable"}), tmp_path, quiet=True).run()
    # Its stamp given back (what the refusal advises) is read as that run's settings, init included; another file
    # without "init" is a user's own config and takes today's default.
    stamp_file = str(tmp_path / "config.json")
    assert main(["--config", stamp_file, "--out", str(tmp_path), "--report-only", "--quiet"]) == 0
    assert (
        config_from_args(build_parser().parse_args(["--config", stamp_file, "--out", "elsewhere"])).init == "portable"
    )


def test_the_committed_cpu_sst2_grid_goes_on_with_its_preset() -> None:
    """The grid in benchmarks/paper was stamped before `init` existed; the preset keeps its init (torch), so the
    documented commands resume it instead of being refused."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "paper" / "cpu-sst2"
    for grid in ("methods", "T-sweep"):
        stamp = json.loads((root / grid / "config.json").read_text())
        assert Simulator(preset("cpu-sst2"), root / grid, quiet=True)._changed_settings(stamp) == []


def _documented_sim_commands() -> list[tuple[str, str]]:
    """(document, arguments) of every `tadlora-sim` command that names its settings (--preset or --config) in the
    README, docs/ and the benchmarks' READMEs: in fenced blocks (a line, with its backslash continuations) and in
    inline code (which may wrap). A bare mention of a flag ("`tadlora-sim --report-only` cannot ...") is no command."""
    root = Path(__file__).resolve().parents[1]
    found = []
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(root.glob("benchmarks/**/README.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        lines = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
        for line in [*lines, *(span.replace("\n", " ") for span in inline)]:
            command = re.search(r"tadlora-sim\s+(--.*)", line)
            if command:
                arguments = command.group(1).split(" #")[0].strip().rstrip('"')  # a comment; a shell variable's quote
                if re.search(r"--(preset|config)\b", arguments):
                    found.append((str(doc.relative_to(root)), arguments))
    return found


def test_every_documented_simulator_command_runs_and_resumes_the_directory_it_names(monkeypatch) -> None:
    """The docs' commands are what a reader copies: each must parse, read a config file that exists, and, where its
    --out is a committed run, go on with that run instead of being refused. docs/simulator.md gave the MNLI
    segment-id probe's command without its --out, which the simulator requires."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the commands are written from the repository's root
    commands = _documented_sim_commands()
    assert len(commands) >= 8, commands  # the extraction still finds them
    for doc, arguments in commands:
        try:
            args = build_parser().parse_args(shlex.split(arguments))
        except SystemExit:
            pytest.fail(f"{doc}: tadlora-sim {arguments}: refused by the parser")
        # A file of the repository's, not a reader's own (my.json, FILE): one in a folder.
        if args.config is not None and args.config.parent != Path("."):
            assert args.config.is_file(), f"{doc}: {arguments}: no {args.config}"
        stamp = args.out / "config.json"
        if stamp.is_file():
            config = config_from_args(args)
            changed = Simulator(config, args.out, quiet=True)._changed_settings(json.loads(stamp.read_text()))
            assert changed == [], f"{doc}: tadlora-sim {arguments}: refused by {stamp} ({changed})"


@pytest.mark.parametrize("out", ["file", "file/run"])
def test_cli_refuses_an_out_that_a_file_is_in_the_way_of_as_the_node_does(tmp_path, capsys, out: str) -> None:
    """It said "[Errno 20] Not a directory: '.../file/cells'", naming a path inside --out, after the model loaded."""
    (tmp_path / "file").write_text("not a run")
    assert main(["--preset", "smoke", "--out", str(tmp_path / out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / out}: {tmp_path / 'file'} is a file, not a directory: choose another --out" in err, err


def test_cli_names_the_file_of_a_run_directory_that_cannot_be_read(tmp_path, capsys) -> None:
    """A damaged file of a run used to end it with json's bare "Expecting value: line 1 column 1", or, for a
    checkpoint, a traceback; which of the directory's many files was meant, the user had to find out."""
    argv = ["--preset", "smoke", "--methods", "lora", "--rounds", "2", "--out", str(tmp_path), "--quiet"]
    assert main([*argv, "--report-only"]) == 0
    for name in ("config.json", "cells/lora__er__p0.5__T-__s0.ckpt.safetensors"):
        damaged = tmp_path / name
        original = damaged.read_bytes() if damaged.exists() else None
        damaged.write_bytes(b"{\x00 not what was written")
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tadlora-sim: error: ") and str(damaged) in err, err
        if original is None:
            damaged.unlink()
        else:
            damaged.write_bytes(original)
    assert main(argv) == 0
    (tmp_path / "cells" / "lora__er__p0.5__T-__s0.json").write_text('{"rounds": [')  # a finished cell, cut short
    assert main([*argv, "--methods", "lora,ffa", "--report-only"]) == 2
    assert "lora__er__p0.5__T-__s0.json holds no valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("other_finishes", [True, False])
def test_a_cell_whose_computation_another_process_runs_waits_for_it_and_copies_it(
    tmp_path, capsys, monkeypatch, other_finishes: bool
) -> None:
    """rolora and tad-nojoint with T = 1 are one computation: a process given one while another runs the other
    (one process per core) must not run it a second time, but copy it once it is done; and run it itself if the
    other died before it finished."""
    import fcntl
    import os
    import shutil

    from tadlora.sim import runner

    config = smoke_config(rounds=1, eval_every=1, methods=["rolora"], sweep_methods=["tad-nojoint"])
    rolora = next(config.cells())
    Simulator(config, tmp_path / "ref", quiet=True).run()
    mine = dataclasses.replace(config, methods=("tad-nojoint",), switch_intervals=(1,))
    cell = next(mine.cells())
    assert cell.computation == rolora.computation and cell.key != rolora.key
    out = tmp_path / "run"
    (out / ".locks").mkdir(parents=True)
    fd = os.open(out / ".locks" / f"{runner._computation_lock_name(cell)}.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what the other process holds while it runs rolora
    waited = []
    locked = Simulator._locked

    @contextlib.contextmanager
    def the_other_ends_while_we_wait(self, name):  # the wait ends when the other process's run does
        if name.startswith("computation-"):
            waited.append(name)
            if other_finishes:
                (out / "cells").mkdir(exist_ok=True)
                shutil.copy(tmp_path / "ref" / "cells" / f"{rolora.key}.json", out / "cells")
            os.close(fd)
        with locked(self, name):
            yield

    monkeypatch.setattr(Simulator, "_locked", the_other_ends_while_we_wait)
    ran = []
    run_cell = Simulator.run_cell
    monkeypatch.setattr(Simulator, "run_cell", lambda self, c, *a, **k: ran.append(c.key) or run_cell(self, c, *a, **k))
    results = Simulator(mine, out, quiet=True).run()
    assert waited and f"cell {cell.key} waits: process 4242 is running the same computation" in capsys.readouterr().err
    assert results["missing_cells"] == []
    (record,) = results["cells"]
    if other_finishes:
        assert ran == [] and record["same_as"] == rolora.key
    else:
        assert ran == [cell.key] and "same_as" not in record


def test_a_directory_of_cells_without_its_stamp_is_refused_instead_of_stamped_anew(tmp_path) -> None:
    """config.json is the only record of the settings a directory's cells ran with. Lost (a merge conflict removed
    as the damaged-file error advised), the next run stamped its own settings and mixed its cells with the old."""
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path, quiet=True).run()
    stamp = tmp_path / "config.json"
    stamp.write_text("<<<<<<< HEAD\n" + stamp.read_text() + "=======\n>>>>>>> theirs\n")
    with pytest.raises(ValueError, match=r"config.json holds no valid JSON .*repair it"):
        Simulator(config, tmp_path, quiet=True).run()
    for edited in ("null", "[]"):  # JSON, but no settings: a TypeError in the comparison before
        stamp.write_text(edited)
        with pytest.raises(ValueError, match=rf"config.json holds {re.escape(edited)}, not the object .*repair it"):
            Simulator(config, tmp_path, quiet=True).run()
    stamp.unlink()
    other = override(config, {"seeds": [0, 1], "train": {"lr": 0.05}})
    for report_only in (True, False):
        with pytest.raises(ValueError, match=r"holds 1 cell file \(cells/lora__.*\) but no config.json.*restore it"):
            Simulator(other, tmp_path, quiet=True).run(report_only=report_only)
    assert not stamp.exists() and len(list((tmp_path / "cells").iterdir())) == 1


def test_a_grid_on_a_topology_file_goes_on_only_while_the_file_holds_the_graph_its_cells_ran_on(
    tmp_path, capsys
) -> None:
    """A cell's key names a file topology by its path: an edited file used to go on in the same directory, its
    new cells summarised with the old graph's as seeds of one row."""
    graph = tmp_path / "graph.txt"
    graph.write_text("0 1\n1 2\n2 3\n3 0\n")  # a ring
    config = smoke_config(methods=["lora"], rounds=1, topologies=[f"file:{graph}"])
    Simulator(config, tmp_path / "run", quiet=True).run()
    graph.write_text("# the same ring\n3-0\n2 1\n0 1\n2 3\n")  # written otherwise: the same graph, goes on
    assert Simulator(config, tmp_path / "run", quiet=True).run(report_only=True)["missing_cells"] == []
    graph.write_text("0 1\n0 2\n0 3\n")  # a star now
    both = override(config, {"seeds": [0, 1]})
    with pytest.raises(ValueError, match=rf"topology file:{graph}: .*not those the cells there ran on"):
        Simulator(both, tmp_path / "run", quiet=True).run()
    with pytest.raises(ValueError, match="not those the cells there ran on"):
        Simulator(both, tmp_path / "run", quiet=True).run(report_only=True)
    # Nor are that directory's cells lent to a run of the new graph.
    results = Simulator(config, tmp_path / "star", quiet=True, share_from=[tmp_path / "run"]).run(report_only=True)
    assert results["missing_cells"] and "not sharing cells from" in capsys.readouterr().err


def test_a_grid_on_a_dataset_file_goes_on_only_while_the_file_holds_the_examples_its_cells_ran_on(
    tmp_path, capsys
) -> None:
    """The stamp names a dataset given as a file by its path: a file edited since (labels fixed, rows added) used
    to go on in the same directory, its new cells summarised with the old data's as seeds of one row."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [f"good movie {i}\t1\nbad film {i}\t0\n" for i in range(40)]
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows))
    (data / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[:10]))
    config = smoke_config(
        methods=["lora"], rounds=1, dataset=str(data / "train.tsv"), samples_per_client=8, eval_samples=None
    )
    Simulator(config, tmp_path / "run", quiet=True).run()
    assert Simulator(config, tmp_path / "run", quiet=True).run(report_only=True)["missing_cells"] == []
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows).replace("\t1\n", "\tX\n")
                                    .replace("\t0\n", "\t1\n").replace("\tX\n", "\t0\n"))  # fmt: skip
    both = override(config, {"seeds": [0, 1]})
    changed = r"dataset .*train.tsv: its examples are not those the cells there ran on"
    with pytest.raises(ValueError, match=changed) as e:
        Simulator(both, tmp_path / "run", quiet=True).run()
    # Its own settings would be refused alike: not offered (they were, as "--config .../config.json").
    assert "the same settings on other data or inputs" in str(e.value) and "--config" not in str(e.value)
    assert str(e.value).endswith("to start a new run on the files as they are now, use another --out directory")
    with pytest.raises(ValueError, match=changed) as e:  # a report names the files, as if the cells were of them
        Simulator(config, tmp_path / "run", quiet=True).run(report_only=True)
    assert str(e.value).endswith("to report it, restore the files it ran on")
    # Nor are that directory's cells lent to a run of the new data.
    results = Simulator(config, tmp_path / "new", quiet=True, share_from=[tmp_path / "run"]).run(report_only=True)
    assert results["missing_cells"] and "not sharing cells from" in capsys.readouterr().err


def test_a_method_one_part_runs_at_its_own_t_and_another_part_sweeps_keeps_its_cell_in_the_results(tmp_path) -> None:
    """The directory's grid is the union of its parts' grids, axis by axis; a part that sweeps tad-nojoint's T made
    the cell another part had run at tad-nojoint's own T (5) fall out of the union, and so out of results.json."""
    own = smoke_config(rounds=1, methods=["tad-nojoint"], sweep_methods=[])
    Simulator(own, tmp_path, quiet=True).run()
    swept = smoke_config(rounds=1, methods=["tad-nojoint"], switch_intervals=[3])
    results = Simulator(swept, tmp_path, quiet=True).run()
    keys = ["tad-nojoint__er__p0.5__T3__s0", "tad-nojoint__er__p0.5__T5__s0"]
    assert sorted(c["key"] for c in results["cells"]) == keys
    assert not set(keys) & set(results["missing_cells"])


def test_a_topology_whose_cell_files_would_have_names_too_long_is_refused_before_any_work(tmp_path) -> None:
    """A file system takes names of up to 255 bytes. A long topology spec (a file at a deep path, an edge list of a
    larger graph) passed, ran a checkpoint interval, and died writing the checkpoint: File name too long."""
    base = smoke_config(methods=["lora"])
    key_room = 255 - len(".ckpt.safetensors") - len("..12345678.tmp")  # the longest name a cell writes

    def file_topology(key_length: int) -> str:
        fixed = len(Cell("lora", "x", 0.5, None, 0).key) - 1  # the key but its topology
        graph = tmp_path / f"{key_length}" / ("g" * (key_length - fixed - len(f"file:{tmp_path}/{key_length}/")))
        graph.parent.mkdir()
        graph.write_text("0 1\n1 2\n2 3\n3 0\n")
        return f"file:{graph}"

    fits = override(base, {"topologies": [file_topology(key_room)]})
    assert len(next(fits.cells()).key) == key_room
    with pytest.raises(ValueError, match=r"topology 'file:.*' makes cell file names of 256 bytes, over the 255"):
        override(base, {"topologies": [file_topology(key_room + 1)]})


def test_a_grid_goes_on_with_another_checkpoint_interval(tmp_path) -> None:
    """How often a cell is checkpointed changes nothing it computes: a grid may go on checkpointing more often."""
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path, quiet=True).run()
    assert Simulator(override(config, {"checkpoint_every": 1}), tmp_path, quiet=True).run()["missing_cells"] == []


def test_cli_names_the_environment_variables_behind_the_settings_it_refuses_or_takes(
    tmp_path, capsys, monkeypatch, caplog
) -> None:
    """TADLORA_ROUNDS, TADLORA_MODEL, ... are also the node's: set for a node in a container, they silently
    replaced a preset's values, and a refusal named settings the command line never gave."""
    argv = ["--preset", "smoke", "--methods", "lora", "--out", str(tmp_path), "--quiet", "--report-only"]
    assert main(argv) == 0
    capsys.readouterr()
    monkeypatch.setenv("TADLORA_ROUNDS", "150")
    with caplog.at_level(logging.WARNING, logger="tadlora.sim"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different settings (rounds)" in err and "--rounds is TADLORA_ROUNDS='150'" in err, err
    assert main([*argv, "--out", str(tmp_path / "new")]) == 0  # a run that takes it says so
    assert any("--rounds is TADLORA_ROUNDS='150'" in r.getMessage() for r in caplog.records)


def test_cli_refuses_a_config_file_that_gives_a_setting_twice(tmp_path, capsys) -> None:
    """json keeps the last of two equal keys: the first "train" object (its lr and steps) was dropped unseen."""
    path = tmp_path / "twice.json"
    path.write_text('{"train": {"lr": 0.001, "local_steps": 10},\n "rounds": 100,\n "train": {"batch_size": 16}}')
    argv = ["--preset", "smoke", "--config", str(path), "--out", str(tmp_path / "run"), "--report-only", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gives 'train' twice" in err and str(path) in err, err


def test_a_finished_cell_s_file_of_another_shape_is_refused_naming_it(tmp_path, capsys) -> None:
    """Valid JSON that is no cell's record (a hand edit, a conflict resolved by hand) ended a report in a KeyError
    traceback, naming neither the file nor what to do."""
    argv = ["--preset", "smoke", "--methods", "lora", "--rounds", "1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    cell_file = tmp_path / "cells" / "lora__er__p0.5__T-__s0.json"
    record = json.loads(cell_file.read_text())
    for damaged in ({"rounds": []}, {**record, "seed": 1}, [record]):
        cell_file.write_text(json.dumps(damaged))
        capsys.readouterr()
        assert main([*argv, "--report-only"]) == 2
        err = capsys.readouterr().err
        assert f"{cell_file} holds no finished record of cell lora__er__p0.5__T-__s0: remove it" in err, err


def test_a_topology_error_names_the_topology_and_the_clients(tmp_path) -> None:
    """An edge list's error said only "edge (1, 7) names a node outside 0..4" or "bad edge '0'": not which of the
    grid's topologies (nor which file) it came from, nor that the nodes are the run's clients 0..m-1."""
    out_of_range = tmp_path / "big.txt"
    out_of_range.write_text("0 1\n1 7\n")
    with pytest.raises(ValueError, match=rf"topology file:{out_of_range} \(4 clients, nodes 0\.\.3\): edge \(1, 7\)"):
        smoke_config(topologies=["ring", f"file:{out_of_range}"])
    commas = tmp_path / "commas.csv"
    commas.write_text("0,1\n")  # commas separate edges, not the two ends of one
    with pytest.raises(ValueError, match=rf"topology file:{commas} .*bad edge '0'"):
        smoke_config(topologies=[f"file:{commas}"])
    with pytest.raises(ValueError, match=rf"topology file:{tmp_path / 'gone.txt'} .*No such file"):
        smoke_config(topologies=[f"file:{tmp_path / 'gone.txt'}"])
    with pytest.raises(ValueError, match=r"topology edges:0-9 \(4 clients, nodes 0\.\.3\)"):
        smoke_config(topologies=["edges:0-9"])


def test_clients_that_an_edge_list_leaves_without_a_link_are_warned_of(tmp_path, caplog) -> None:
    """A file of 3 nodes for a 4-client run left client 3 without any link: it never mixed, silently."""
    edges = tmp_path / "three.txt"
    edges.write_text("0 1\n1 2\n")
    config = smoke_config(topologies=["ring", f"file:{edges}"])
    with caplog.at_level(logging.WARNING, logger="tadlora.sim"):
        Simulator(config, tmp_path / "run", quiet=True).run(report_only=True)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "tadlora.sim"]
    assert f"topology file:{edges}" in warning and "client 3 has no link" in warning and "never mix" in warning


def test_a_setting_below_one_is_named_with_its_value() -> None:
    # The message listed five settings without saying which one was wrong.
    with pytest.raises(ValueError, match=r"^rounds must be >= 1, got 0$"):
        smoke_config(rounds=0)


def test_cli_help_gives_the_default_of_every_setting_flag() -> None:
    """--link-probs, --topologies, --seeds, --rounds, ... said what they take but not what a run without them uses."""
    parser = build_parser()
    no_default = {"-h", "--preset", "--config", "--out", "--share-from", "--quiet", "--report-only", "--version"}
    lacking = [
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings and action.option_strings[0] not in no_default
        and "default" not in " ".join((action.help or "").split())
    ]  # fmt: skip
    assert lacking == []


class _ScriptedEngine:
    """A ClientEngine without a model: a round adds i + 1 to client i's trained factors and records what it was asked
    to train, so a test sees what `simulate` trains and what it reports, exactly."""

    def __init__(self, m: int) -> None:
        self.num_clients = m
        self.factors = [
            {factor_key("m", Factor.A): torch.ones(2, 3), factor_key("m", Factor.B): torch.zeros(3, 2)}
            for _ in range(m)
        ]
        self.asked: list[frozenset[Factor]] = []

    def get_factors(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.factors[i].items()}

    def set_factors(self, i: int, factors: dict[str, torch.Tensor]) -> None:
        self.factors[i] = {k: v.clone() for k, v in factors.items()}

    def train_round(self, t: int, trained: frozenset[Factor]) -> list[float]:
        self.asked.append(trained)
        for i, factors in enumerate(self.factors):
            for key in factors:
                if factor_of(key) in trained:
                    factors[key] = factors[key] + (i + 1)
        return [0.0] * self.num_clients

    def evaluate(self) -> list[tuple[float, float]]:
        return [(0.5, 1.0)] * self.num_clients

    def get_optimizer_state(self, i: int) -> dict[str, torch.Tensor]:
        return {}

    def set_optimizer_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass


def test_simulate_trains_only_the_factor_the_schedule_names_while_it_mixes_both() -> None:
    # The engine comparisons run both engines through `simulate`, so they agree whatever `simulate` asks them to
    # train; here the request itself is checked: tad with T = 2 trains B, B, A, A, B, B (not A and B, as it mixes).
    engine = _ScriptedEngine(4)
    records = simulate(engine, make_method("tad", 2), make_topology("ring", 4), rounds=6, eval_every=6)
    assert engine.asked == [frozenset({Factor(f)}) for f in "BBAABB"]
    assert [r["phase"] for r in records] == list("BBAABB")


def test_simulate_reports_the_diagnostics_of_the_mixed_factors() -> None:
    # docs/simulator.md: consensus distances and the cross term are taken after mixing. On the complete graph of 4,
    # MH mixing is the exact average (every weight 1/4), so after each round the clients agree exactly, though the
    # round's training left them apart (client i moved by i + 1).
    engine = _ScriptedEngine(4)
    records = simulate(engine, make_method("lora"), make_topology("complete", 4), rounds=3, eval_every=3)
    for record in records:
        assert record["consensus_a"] == 0.0 and record["consensus_b"] == 0.0 and record["consensus_ba"] == 0.0
        assert record["cross_term_norm"] == 0.0
    assert all(torch.equal(engine.factors[0][k], f[k]) for f in engine.factors for k in f)
    assert not torch.equal(engine.factors[0][next(iter(engine.factors[0]))], torch.ones(2, 3))  # they did train


def test_a_grid_stamped_with_a_method_this_process_has_not_registered_says_so(tmp_path) -> None:
    """A method of a user's own exists only in the processes that register it. Reporting or growing its directory
    from one that does not (plain tadlora-sim) used to fail as "unknown method 'own-m'", as if --methods had named
    it, though the run named only lora."""
    config = smoke_config(methods=["lora"], rounds=2)
    stamp = {**json.loads(json.dumps(config.to_dict())), "methods": ["lora", "own-m"]}
    (tmp_path / "config.json").write_text(json.dumps(stamp))
    (tmp_path / "cells").mkdir()
    with pytest.raises(ValueError, match=r"config.json\) has method 'own-m', which this process has not registered"):
        Simulator(config, tmp_path, quiet=True).run(report_only=True)
    # The directory's own config.json as --config, as docs/simulator.md says to report a run: said there too.
    with pytest.raises(ValueError, match=r"unknown method 'own-m'; .* known only to a run made through the module"):
        config_from_json(json.dumps(stamp), stamp=True)


def test_cells_of_a_method_this_process_has_not_registered_are_passed_over_when_shared(tmp_path) -> None:
    """A --share-from directory may hold cells of a user's own method (registered by the module it was run through):
    a plain run sharing from it used to stop on them with "unknown method 'own-m'", naming none of its own methods."""
    config = smoke_config(methods=["lora"], rounds=2)
    Simulator(config, tmp_path / "theirs", quiet=True).run()
    [cell] = (tmp_path / "theirs" / "cells").glob("*.json")
    record = json.loads(cell.read_text())
    own = {**record, "method": "own-m", "key": "own-m__er__p0.5__T-__s0"}
    (cell.parent / "own-m__er__p0.5__T-__s0.json").write_text(json.dumps(own))
    cell.unlink()  # what is left to share: the unknown method's cell alone
    results = Simulator(config, tmp_path / "mine", quiet=True, share_from=[tmp_path / "theirs"]).run()
    [mine] = results["cells"]
    assert mine["method"] == "lora" and "same_as" not in mine
