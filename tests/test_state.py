"""Node state on disk: checkpoints round-trip, a damaged one is refused loudly, a failed write keeps the old one."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import struct
import tracemalloc

import pytest
import torch

from tadlora.fsutil import atomic_write_bytes, atomic_write_json, os_error_of
from tadlora.node import state
from tadlora.node.identity import OUT_FORMAT, OutRefused, load_identity, run_conflict, save_identity


def ckpt(round_: int) -> state.Checkpoint:
    g = torch.Generator().manual_seed(round_)
    return state.Checkpoint(round_, "node-0", "ab" * 16, {"m.lora_A.weight": torch.randn(2, 3, generator=g)})


def test_checkpoint_round_trips_bit_exactly(tmp_path) -> None:
    state.save_checkpoint(tmp_path, ckpt(7))
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and (loaded.round, loaded.node_id, loaded.fingerprint) == (7, "node-0", "ab" * 16)
    assert torch.equal(loaded.factors["m.lora_A.weight"], ckpt(7).factors["m.lora_A.weight"])
    assert state.load_checkpoint(tmp_path / "nothing-here") is None
    assert loaded.optimizer == {}


def test_a_checkpoint_carries_the_optimizer_state_apart_from_the_factors(tmp_path) -> None:
    moments = {
        "m.lora_A.weight/exp_avg": torch.randn(2, 3),
        "m.lora_A.weight/exp_avg_sq": torch.rand(2, 3),
        "m.lora_A.weight/step": torch.tensor(4.0),
    }
    state.save_checkpoint(tmp_path, dataclasses.replace(ckpt(3), optimizer=moments))
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and loaded.factors.keys() == ckpt(3).factors.keys()
    assert loaded.optimizer.keys() == moments.keys()
    assert all(torch.equal(loaded.optimizer[k], v) for k, v in moments.items())


def test_a_damaged_checkpoint_is_an_error_that_names_the_file(tmp_path) -> None:
    state.save_checkpoint(tmp_path, ckpt(1))
    path = tmp_path / state.CHECKPOINT
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RuntimeError, match="damaged"):
        state.load_checkpoint(tmp_path)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch) -> None:
    state.save_checkpoint(tmp_path, ckpt(3))

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        state.save_checkpoint(tmp_path, ckpt(4))
    monkeypatch.undo()
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 3
    assert [p.name for p in tmp_path.iterdir()] == [state.CHECKPOINT]


def test_atomic_write_replaces_whole_files(tmp_path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path, umask: int) -> None:
    """mkstemp creates its files 0600: node.json, checkpoints and a simulator's results.json came out readable by
    their owner alone, so `tadlora-node status` run by another user could not read the node's id."""
    old = os.umask(umask)
    try:
        plain = tmp_path / f"plain-{umask:o}"
        plain.write_bytes(b"x")
        atomic = tmp_path / f"atomic-{umask:o}"
        atomic_write_bytes(atomic, b"x")
    finally:
        os.umask(old)
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_without_proc_the_umask_is_still_read_and_left_as_it_was(monkeypatch) -> None:
    import builtins

    from tadlora import fsutil

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    old = os.umask(0o027)
    try:
        assert fsutil._umask() == 0o027
        assert os.umask(0o027) == 0o027  # restored
    finally:
        os.umask(old)


def test_round_log_skips_a_torn_last_line(tmp_path) -> None:
    log = state.RoundLog(tmp_path)
    log.write({"round": 0})
    log.write({"round": 1})
    log.close()
    with (tmp_path / state.ROUNDS).open("a") as f:
        f.write('{"round": 2, "los')
    assert [r["round"] for r in state.read_rounds(tmp_path)] == [0, 1]
    resumed = state.RoundLog(tmp_path)  # after a restart, the next record is not glued onto the torn line
    resumed.write({"round": 2})
    resumed.close()
    assert [r["round"] for r in state.read_rounds(tmp_path)] == [0, 1, 2]


def test_round_log_reopened_whole_adds_no_blank_line(tmp_path) -> None:
    for r in range(3):  # a fresh file, then two restarts on a log whose lines are whole
        log = state.RoundLog(tmp_path)
        log.write({"round": r})
        log.close()
    assert (tmp_path / state.ROUNDS).read_text().splitlines() == [f'{{"round":{r}}}' for r in range(3)]


def test_a_checkpoint_records_how_long_the_round_log_was(tmp_path) -> None:
    state.save_checkpoint(tmp_path, dataclasses.replace(ckpt(2), rounds_bytes=123))
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and loaded.rounds_bytes == 123
    state.save_checkpoint(tmp_path, ckpt(2))  # as a node before this field wrote it
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and loaded.rounds_bytes is None


def test_resuming_cuts_the_round_log_back_to_the_checkpoint_so_redone_rounds_appear_once(tmp_path) -> None:
    log = state.RoundLog(tmp_path)
    for t in range(5):
        log.write({"round": t})
    at_checkpoint = log.size  # checkpoint of round 5 ...
    for t in range(5, 8):
        log.write({"round": t})  # ... then rounds 5-7 and a SIGKILL before the next checkpoint
    log.close()
    assert state.truncate_rounds(tmp_path, at_checkpoint) == 3
    resumed = state.RoundLog(tmp_path)
    for t in range(5, 9):
        resumed.write({"round": t})
    resumed.close()
    assert [r["round"] for r in state.read_rounds(tmp_path)] == list(range(9))
    whole = (tmp_path / state.ROUNDS).read_bytes()
    assert state.truncate_rounds(tmp_path, len(whole) + 100) == 0  # a shorter log (e.g. moved away) is left alone:
    assert (tmp_path / state.ROUNDS).read_bytes() == whole  # not padded out to the size given (truncate(2) would)


def _oracle_last_numbers(out, keys) -> dict[str, float]:
    """`state.last_numbers` by way of the whole log (`read_rounds`): what it must agree with."""
    found: dict[str, float] = {}
    for record in reversed(state.read_rounds(out)):
        for key in keys:
            if key not in found and isinstance(record.get(key), int | float):
                found[key] = float(record[key])
    return found


@pytest.mark.parametrize("block", [1, 2, 3, 7, 16, 64, 4096])
def test_the_last_numbers_of_the_round_log_are_those_the_whole_log_gives_whatever_the_block_size(
    tmp_path, monkeypatch, block: int
) -> None:
    log = state.RoundLog(tmp_path)
    for t in range(12):  # an evaluation every 5 rounds, lines of several lengths, one far longer than a small block
        record: dict[str, object] = {"round": t, "loss": 1.0 / (t + 1), "note": "x" * (t * 7 % 23)}
        if t % 5 == 4:
            record["eval_accuracy"] = t / 100
        log.write(record)
    log.close()
    with (tmp_path / state.ROUNDS).open("a") as f:
        f.write('{"round": 12, "loss": 9')  # torn by a crash: skipped
    monkeypatch.setattr(state, "TAIL_BLOCK_BYTES", block)
    keys = ("loss", "eval_accuracy", "absent")
    expected = {"loss": 1.0 / 12, "eval_accuracy": 0.09}
    assert state.last_numbers(tmp_path, keys) == _oracle_last_numbers(tmp_path, keys) == expected
    assert state.last_numbers(tmp_path / "nothing-here", keys) == {}


def test_a_resume_reads_the_end_of_a_long_round_log_not_all_of_it(tmp_path) -> None:
    """rounds.jsonl grows by a line a round for as long as the run lasts (~350 bytes; 20,000 rounds here): a resume
    that parsed all of it held every record in memory at once (~10x the file), more with each restart."""
    record = {"round": 0, "phase": "A", "node_id": "node-0", "degree": 2, "self_weight": 0.3333333333333333,
              "neighbours": [{"id": "node-1", "degree": 2, "weight": 0.3333333333333333},
                             {"id": "node-2", "degree": 2, "weight": 0.3333333333333333}],
              "missed": [], "bytes_sent": 24576, "bytes_received": 24576, "exchange_latency_s": 0.0123456789,
              "loss": 0.6931471805599453, "seconds": 1.234567890123, "time": 1796582616.3860188}  # fmt: skip
    with (tmp_path / state.ROUNDS).open("w") as f:
        for t in range(20_000):
            extra = {"eval_accuracy": t / 20_000, "eval_loss": 0.5} if t % 5 == 4 else {}
            f.write(json.dumps({**record, "round": t, "loss": t / 10, **extra}, separators=(",", ":")) + "\n")
    size = (tmp_path / state.ROUNDS).stat().st_size
    tracemalloc.start()
    try:
        last = state.last_numbers(tmp_path, ("loss", "eval_accuracy"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last == {"loss": 1999.9, "eval_accuracy": 19_999 / 20_000}
    assert size > 6_000_000 and peak < 4 * state.TAIL_BLOCK_BYTES, (size, peak)


def test_a_resume_conflicts_on_each_setting_the_kept_run_recorded_and_on_nothing_else() -> None:
    kept = {"node_id": "n0", "cluster": "a", "fingerprint": "ab", "method": "tad", "switch_interval": 5}
    assert run_conflict(kept, cluster="a", method="tad", switch_interval=5) is None
    assert run_conflict(kept, cluster="b", method="lora", switch_interval=None) == (
        "--cluster 'a' (now 'b'), --method 'tad' (now 'lora'), --switch-interval 5 (now none)"
    )
    older = {"node_id": "n0", "cluster": "a", "fingerprint": "ab"}  # node.json of a node that kept no method
    assert run_conflict(older, cluster="a", method="lora", switch_interval=None) is None


def test_save_identity_keeps_the_run_settings_it_is_given(tmp_path) -> None:
    save_identity(tmp_path, "n0", "ab", cluster="a", method="tad", switch_interval=5)
    kept = load_identity(tmp_path)
    run = {"cluster": "a", "fingerprint": "ab", "method": "tad", "switch_interval": 5}
    assert kept == {"format": OUT_FORMAT, "node_id": "n0", **run}


@pytest.mark.parametrize("content", [b"", b'{"node_id": "n0",', b"\xff\xfe{}"], ids=["empty", "cut", "not UTF-8"])
def test_an_unreadable_node_json_is_an_error_that_names_the_file(tmp_path, content: bytes) -> None:
    # The node fails on it at start: the error line must say which file, not only "Expecting value: line 1".
    (tmp_path / "node.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "node.json"))):
        load_identity(tmp_path)


def adapter_files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_adapter(content: bytes):
    def write(directory) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_model.safetensors").write_bytes(content)
        (directory / "adapter_config.json").write_text("{}")

    return write


def test_an_adapter_export_swaps_in_whole_and_leaves_no_temp_directory(tmp_path) -> None:
    state.replace_adapter(tmp_path, write_adapter(b"old"))
    state.replace_adapter(tmp_path, write_adapter(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == [state.ADAPTER]
    want = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"new"}
    assert adapter_files(tmp_path / state.ADAPTER) == want


def test_a_failed_adapter_export_keeps_the_previous_adapter_and_no_temp_directory(tmp_path) -> None:
    state.replace_adapter(tmp_path, write_adapter(b"old"))

    def disk_full(directory) -> None:
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        state.replace_adapter(tmp_path, disk_full)
    assert [p.name for p in tmp_path.iterdir()] == [state.ADAPTER]
    assert adapter_files(tmp_path / state.ADAPTER)["adapter_model.safetensors"] == b"old"


@pytest.mark.parametrize("cut", ["while writing", "between the renames", "before removing the old one"])
def test_an_export_cut_short_by_a_crash_is_settled_at_start_with_one_complete_adapter(tmp_path, cut) -> None:
    old, new = write_adapter(b"old"), write_adapter(b"new")
    if cut == "while writing":
        old(tmp_path / state.ADAPTER)
        (tmp_path / state.ADAPTER_NEW).mkdir()
        (tmp_path / state.ADAPTER_NEW / "adapter_model.safetensors").write_bytes(b"ne")
    elif cut == "between the renames":
        old(tmp_path / state.ADAPTER_OLD)
        new(tmp_path / state.ADAPTER_NEW)
    else:
        old(tmp_path / state.ADAPTER_OLD)
        new(tmp_path / state.ADAPTER)
    state.save_checkpoint(tmp_path, ckpt(1))
    state.remove_torn_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.ADAPTER, state.CHECKPOINT]
    want = b"new" if cut == "before removing the old one" else b"old"
    assert adapter_files(tmp_path / state.ADAPTER)["adapter_model.safetensors"] == want


def test_json_files_are_standard_json_with_every_non_finite_number_as_null(tmp_path) -> None:
    """A diverged run's loss (inf) or an empty evaluation (NaN) must not make results.json unreadable to strict
    parsers (JavaScript, jq), which refuse the NaN and Infinity that json.dumps writes by default."""
    path = tmp_path / "results.json"
    atomic_write_json(path, {"loss": float("inf"), "rows": [float("-inf"), (float("nan"), 1.5)], "n": 3})

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"loss": None, "rows": [None, [None, 1.5]], "n": 3}


@pytest.mark.parametrize(
    "moments",
    [
        {"m.lora_A.weight/step": torch.tensor(4.0)},  # its moments lost
        {"m.lora_A.weight/exp_avg": torch.zeros(2, 3), "m.lora_A.weight/exp_avg_sq": torch.zeros(2, 3)},  # no step
        {"m.lora_A.weight/momentum": torch.zeros(2, 3)},  # not one of AdamW's
    ],
    ids=["moments missing", "step missing", "unknown entry"],
)
def test_a_checkpoint_with_incomplete_optimizer_state_is_damaged_not_a_key_error_in_the_first_round(
    tmp_path, moments: dict[str, torch.Tensor]
) -> None:
    # Loaded as it was, it would pass until the first round's local steps, and fail there with a bare KeyError.
    state.save_checkpoint(tmp_path, dataclasses.replace(ckpt(3), optimizer=moments))
    with pytest.raises(RuntimeError, match=r"damaged \(optimizer state of"):
        state.load_checkpoint(tmp_path)


def with_metadata(data: bytes, metadata: object) -> bytes:
    """A safetensors file ``data`` with its header's __metadata__ replaced (hand-edited, or damaged on disk)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


@pytest.mark.parametrize(
    "change",
    [None, {"round": "-1"}, {"rounds_bytes": "-5"}, {"last_mixed": "-2"}, {"run": "[1]"}, {"run": "{"}],
    ids=["metadata null", "negative round", "negative log size", "negative last mixing", "run a list", "run cut"],
)
def test_a_checkpoint_with_null_or_negative_metadata_is_damaged_not_a_traceback(tmp_path, change) -> None:
    # Loaded as they are, a null __metadata__ fails as a TypeError and a negative log size as truncate(2)'s
    # EINVAL on rounds.jsonl: neither says that the checkpoint is the file to look at.
    state.save_checkpoint(tmp_path, dataclasses.replace(ckpt(3), rounds_bytes=10))
    path = tmp_path / state.CHECKPOINT
    data = path.read_bytes()
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    path.write_bytes(with_metadata(data, None if change is None else {**meta, **change}))
    with pytest.raises(RuntimeError, match=re.escape(f"checkpoint {path} is damaged")):
        state.load_checkpoint(tmp_path)


def test_files_a_newer_tadlora_wrote_in_another_format_are_refused_as_such_and_older_ones_read(tmp_path) -> None:
    """A downgrade over the same --out: an older version would read a newer layout as its own and could resume the
    run wrongly. Both files say their format; one without it (written before it was) reads as format 1."""
    save_identity(tmp_path, "n0", "ab", cluster="a")
    state.save_checkpoint(tmp_path, ckpt(3))
    path = tmp_path / state.CHECKPOINT
    data = path.read_bytes()
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert meta["format"] == str(OUT_FORMAT) and load_identity(tmp_path)["format"] == OUT_FORMAT  # type: ignore[index]
    for newer, said in ((str(OUT_FORMAT + 1), "was written by a newer tadlora (format"), ("2.0", "unknown format")):
        path.write_bytes(with_metadata(data, {**meta, "format": newer}))
        with pytest.raises(OutRefused, match=re.escape(f"{path} ") + ".*" + re.escape(said)) as caught:
            state.load_checkpoint(tmp_path)
        assert "damaged" not in str(caught.value)
    path.write_bytes(with_metadata(data, {k: v for k, v in meta.items() if k != "format"}))
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 3
    identity = tmp_path / "node.json"
    for newer, said in ((OUT_FORMAT + 1, "a newer tadlora"), ("1", "an unknown format '1'"), (True, "unknown")):
        identity.write_text(json.dumps({"format": newer, "node_id": "n0", "fingerprint": "ab"}))
        with pytest.raises(OutRefused, match=re.escape(said)):
            load_identity(tmp_path)
    identity.write_text(json.dumps({"node_id": "n0", "fingerprint": "ab"}))
    assert load_identity(tmp_path) == {"node_id": "n0", "fingerprint": "ab"}


def test_a_checkpoint_keeps_the_run_settings_it_was_taken_with(tmp_path) -> None:
    run = {"cluster": "a", "method": "tad", "switch_interval": 5, "link_prob": 0.5, "dataset": None}
    state.save_checkpoint(tmp_path, dataclasses.replace(ckpt(3), run=run))
    loaded = state.load_checkpoint(tmp_path)
    assert loaded is not None and loaded.run == run
    state.save_checkpoint(tmp_path, ckpt(4))  # as a node that did not record them wrote it
    older = state.load_checkpoint(tmp_path)
    assert older is not None and older.run is None


def test_a_failed_atomic_write_names_the_file_it_was_writing(tmp_path, monkeypatch) -> None:
    # write(2) and fsync(2) fail with an errno alone: "[Errno 28] No space left on device" is all a node that
    # stops on it would print, with no word of which file (and so which file system) it was writing.
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    target = tmp_path / "checkpoint.safetensors"
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{target}'")) as failed:
        atomic_write_bytes(target, b"data")
    assert failed.value.errno == errno.ENOSPC  # callers that tell a full disk by its errno still can
    assert list(tmp_path.iterdir()) == []


def test_a_rust_writers_io_error_becomes_an_os_error_naming_the_file_and_nothing_else_does(tmp_path) -> None:
    target = tmp_path / "adapter_model.safetensors"
    full = os_error_of(ValueError('I/O error: No space left on device (os error 28) at path "/x/.tmpAbC"'), target)
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC and full.filename == str(target)
    assert os_error_of(ValueError("Some tensors share memory, this will lead to duplicate memory"), target) is None


def test_a_round_log_the_disk_refuses_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    # A full disk mid-run stopped the node with "[Errno 28] No space left on device" and no word of the file.
    log = state.RoundLog(tmp_path)
    log.write({"round": 0})

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match=re.escape(f"No space left on device: '{log.path}'")) as failed:
            log.sync()
    assert failed.value.errno == errno.ENOSPC
    log.close()
    assert state.read_rounds(tmp_path) == [{"round": 0}]
    if not os.path.exists("/dev/full"):
        return
    full = tmp_path / "full"
    full.mkdir()
    (full / state.ROUNDS).symlink_to("/dev/full")  # every write(2) fails with ENOSPC, as on a full disk
    log = state.RoundLog(full)
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{log.path}'")) as failed:
        log.write({"round": 1})
    assert failed.value.errno == errno.ENOSPC


def test_an_out_whose_file_system_refuses_locks_is_an_error_naming_the_lock_file(tmp_path, monkeypatch) -> None:
    # NFS without its lock daemon answers flock(2) with ENOLCK: "[Errno 37] No locks available" alone was all a node
    # refused on it printed, with no word of which file (so which mount) it was locking.
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError, match=re.escape(f"No locks available: '{tmp_path / state.LOCK}'")) as failed:
        state.hold_out(tmp_path)
    assert failed.value.errno == errno.ENOLCK
