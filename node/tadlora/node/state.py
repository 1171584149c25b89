"""What a node keeps on disk: checkpoints (atomic, safetensors) and the per-round log; its id is `identity`'s.

Layout of ``OUT``: ``node.json`` (id, fingerprint, init and run settings: `tadlora.node.identity`),
``checkpoint.safetensors`` (the factors at the start of a round, with the round, the node's last mixing and its run
settings in its metadata, and with ``--optimizer-state persistent`` the optimizer's state under ``opt/KEY/moment``),
``rounds.jsonl`` (one JSON line per finished round) and ``adapter/`` (peft's format). Checkpoints are written to a
temp file, fsynced and renamed, so a crash or a full disk leaves the previous checkpoint intact; ``adapter/`` is
written beside it and swapped in by renames (`replace_adapter`). A checkpoint records how long ``rounds.jsonl`` was
when it was taken: a node resuming from it cuts the log back to that length (`truncate_rounds`), so the rounds it
redoes are not logged twice; a node that finds no checkpoint starts at round 0 and cuts it to nothing. While a node
runs it holds ``.node.lock`` (`hold_out`): a second node started on the same ``OUT`` is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from safetensors import SafetensorError
from safetensors.torch import load, save

from tadlora.core.factors import Factors
from tadlora.fsutil import atomic_write_bytes, naming
from tadlora.node.identity import OUT_FORMAT, OutRefused, check_format
from tadlora.training import MOMENTS, OptimizerState

log = logging.getLogger("tadlora.node")

CHECKPOINT = "checkpoint.safetensors"
ROUNDS = "rounds.jsonl"
ADAPTER = "adapter"
ADAPTER_NEW = ".adapter.tmp"  # the next adapter/ while it is written (a torn write, like any ".*.tmp")
ADAPTER_OLD = ".adapter.old"  # the previous adapter/ while the next one is renamed into its place
LOCK = ".node.lock"  # flocked by the node running on OUT (`hold_out`); the file stays, the lock goes with it
OPT_PREFIX = "opt/"  # checkpoint keys of the optimizer state; factor keys never hold a "/"
TAIL_BLOCK_BYTES = 64 * 1024  # bytes `last_numbers` reads at a time from the end of rounds.jsonl (~200 of its lines)


@dataclass(frozen=True)
class Checkpoint:
    """A node's state at the start of ``round``."""

    round: int
    node_id: str
    fingerprint: str
    factors: Factors
    optimizer: OptimizerState = field(default_factory=dict)  # empty unless the optimizer state persists
    rounds_bytes: int | None = None  # bytes of rounds.jsonl when it was taken; None: not recorded (older node)
    # 1 + the last round the node mixed with a neighbour (`RoundState.last_mixed`): catch-up compares it between
    # peers, so a resumed node must not pass for one that never mixed. None in a checkpoint that did not record it
    # (nodes before 2026-12-05): the resume reads it from rounds.jsonl instead (`last_mixed_logged`).
    last_mixed: int | None = 0
    # The run settings (`NodeConfig.run_settings`) it was taken under: a resume checks them against its own even
    # where node.json is gone. None in a checkpoint that did not record them.
    run: dict[str, Any] | None = None


def save_checkpoint(out: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``out/checkpoint.safetensors``."""
    meta = {
        "format": str(OUT_FORMAT),
        "round": str(ckpt.round),
        "node_id": ckpt.node_id,
        "fingerprint": ckpt.fingerprint,
    }
    if ckpt.last_mixed is not None:
        meta["last_mixed"] = str(ckpt.last_mixed)
    if ckpt.rounds_bytes is not None:
        meta["rounds_bytes"] = str(ckpt.rounds_bytes)
    if ckpt.run is not None:
        meta["run"] = json.dumps(ckpt.run, allow_nan=False)
    path = out / CHECKPOINT
    tensors = {k: v.contiguous() for k, v in ckpt.factors.items()}
    tensors.update({f"{OPT_PREFIX}{k}": v.contiguous() for k, v in ckpt.optimizer.items()})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def load_checkpoint(out: Path) -> Checkpoint | None:
    """The checkpoint in ``out``, None if there is none. A damaged file is an error, never silently skipped:
    atomic writes mean it was damaged outside the node, and a person should look at it."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        tensors = load(data)  # safetensors: no code runs on load
        factors = {k: v for k, v in tensors.items() if not k.startswith(OPT_PREFIX)}
        optimizer = {k.removeprefix(OPT_PREFIX): v for k, v in tensors.items() if k.startswith(OPT_PREFIX)}
        _check_optimizer_state(optimizer)
        # The metadata from the bytes just loaded (safetensors' format: an 8-byte little-endian header length, then
        # the JSON header), not from a second read of a file that could have been replaced in between.
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}  # safetensors allows a null one
        if "format" in meta:
            check_format(path, int(meta["format"]) if meta["format"].isdigit() else meta["format"])
        round_ = _count(meta["round"], "round")
        rounds_bytes = _count(meta["rounds_bytes"], "rounds_bytes") if "rounds_bytes" in meta else None
        last_mixed = _count(meta["last_mixed"], "last_mixed") if "last_mixed" in meta else None
        run = json.loads(meta["run"]) if "run" in meta else None
        if not isinstance(run, dict | None):
            raise ValueError(f"its run settings are a JSON {type(run).__name__}, not an object")
        return Checkpoint(
            round_, meta["node_id"], meta["fingerprint"], factors, optimizer, rounds_bytes, last_mixed, run
        )
    except OutRefused:
        raise
    except (SafetensorError, KeyError, ValueError) as exc:
        raise OutRefused(f"checkpoint {path} is damaged ({exc}); move it away to start from scratch") from exc


def _count(text: str, name: str) -> int:
    """``text`` as a round or a byte count: ValueError if it is negative (a resume would start before round 0, or
    fail on truncate(2) of rounds.jsonl with an error that names the log instead of the checkpoint)."""
    value = int(text)
    if value < 0:
        raise ValueError(f"{name} {value} is negative")
    return value


def _check_optimizer_state(optimizer: OptimizerState) -> None:
    """ValueError unless every factor's entry in ``optimizer`` has each of AdamW's `MOMENTS` and nothing else: local
    steps would otherwise fail at the first round with a bare KeyError, or quietly restart a factor's moments."""
    names: dict[str, set[str]] = {}
    for key in optimizer:
        factor, _, name = key.rpartition("/")
        names.setdefault(factor, set()).add(name)
    if bad := sorted(f for f, got in names.items() if got != set(MOMENTS)):
        raise ValueError(f"optimizer state of {bad[0]!r} (and {len(bad) - 1} more) lacks or adds to {list(MOMENTS)}")


def hold_out(out: Path) -> int:
    """Make ``out`` this process's: an exclusive flock on ``out/.node.lock``, held until the returned descriptor is
    closed or the process ends (SIGKILL included, so a crash leaves nothing to clean). RuntimeError if another
    process holds it: two nodes on one ``OUT`` would delete each other's writes in flight as torn
    (`remove_torn_writes`), overwrite each other's checkpoint and log their rounds into one file."""
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with naming(path):  # a file system without locks (NFS without its lock daemon: ENOLCK) is named
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # named or not, EWOULDBLOCK is still a BlockingIOError
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise RuntimeError(
            f"{out} is in use by another node (process {holder} holds {path}): stop that one first, or give this "
            "node another --out"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:  # who holds it, for the message above (a pid on another host, if OUT is shared over NFS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the lock is what counts
    return fd


def check_out_held(out: Path, lock: int) -> None:
    """OSError unless ``out/.node.lock`` is still the file that ``lock`` (`hold_out`'s descriptor) holds. Once it
    is not (--out removed, moved away, or replaced by a copy while the node ran), the lock no longer keeps anyone
    out: another node may have started on ``out``, and writing there would recreate (with only a checkpoint, and
    no node.json or log for it) or clobber a directory that is no longer this node's."""
    held = os.fstat(lock)
    try:
        there = os.stat(out / LOCK)
    except FileNotFoundError:
        there = None
    if there is not None and (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
        return
    raise OSError(  # one argument: str() is the message alone
        f"--out {out} was removed or replaced while this node ran ({out / LOCK} is not the lock file it holds): "
        "nothing more is written there, lest it recreate the directory in part or overwrite another node's; "
        "restart the node to take --out anew (it resumes from what is there, if anything)"
    )


def out_holder(out: Path) -> str | None:
    """Who holds ``out``'s lock (`hold_out`): the pid its holder wrote ("?" if none), or None when no process holds
    it (or there is no lock file). Creates nothing, and holds the lock only for the moment of asking."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no lock file, or none this user may open: hold_out then says why, if anything
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
    except OSError:
        return None  # a file system without locks: not held by anyone here
    finally:
        os.close(fd)  # releases the lock, if this took it
    return None


def remove_torn_writes(out: Path) -> list[Path]:
    """Delete temp files (and the temp adapter directory) of atomic writes cut short by a crash (SIGKILL, power
    loss), and finish an interrupted adapter swap; only the node that owns ``out`` may call it, at start-up,
    before it writes anything. Returns what was removed."""
    removed = _settle_adapter(out)
    for path in sorted(out.glob(".*.tmp")):
        log.info("removing %s, left by an interrupted write", path.name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _settle_adapter(out: Path) -> list[Path]:
    """Undo a swap cut short between its renames: ``adapter/`` missing means ``.adapter.old`` is the last complete
    adapter, so it goes back; with ``adapter/`` in place, the old one is stale. Returns what was removed."""
    old, final = out / ADAPTER_OLD, out / ADAPTER
    if not old.exists():
        return []
    if not final.exists():
        log.info("restoring %s from %s, left by an interrupted export", final.name, old.name)
        old.rename(final)
        return []
    log.info("removing %s, left by an interrupted export", old.name)
    shutil.rmtree(old)
    return [old]


def replace_adapter(out: Path, write: Callable[[Path], object]) -> Path:
    """Export with ``write(directory)`` into ``out/.adapter.tmp``, fsync it, and swap it in for ``out/adapter``
    by renames. At every instant a complete adapter exists: ``adapter/`` (the old one, then the new one), or,
    between the two renames, ``.adapter.old`` (which `remove_torn_writes` puts back after a crash there). If
    ``write`` fails, the old ``adapter/`` stays and the temp directory is removed."""
    new, old, final = out / ADAPTER_NEW, out / ADAPTER_OLD, out / ADAPTER
    _settle_adapter(out)  # a rename onto a leftover .adapter.old would fail
    shutil.rmtree(new, ignore_errors=True)
    try:
        write(new)
        for path in [*sorted(new.rglob("*")), new]:
            if path.is_file() or path.is_dir():
                _fsync(path)  # the data is on disk before a rename can publish it
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    if final.exists():
        final.rename(old)
    new.rename(final)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RoundLog:
    """Appends one JSON line per round to ``rounds.jsonl`` (flushed each line, so a crash of the process loses
    nothing that was reported; `sync` before a checkpoint, so a power loss does not either)."""

    def __init__(self, out: Path) -> None:
        """Open (or create) ``out/rounds.jsonl`` for appending. Blocking file I/O: open it in a worker thread."""
        self.path = out / ROUNDS
        self._file = self.path.open("a", encoding="utf-8")
        if not _ends_a_line(self.path):  # a crash mid-line: end that line, so the next record is not glued onto it
            self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as a line; OSError naming the file if the disk refuses it (full, I/O error)."""
        with naming(self.path):
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    @property
    def size(self) -> int:
        """Bytes in the file now: every record written so far, whole (what a checkpoint records)."""
        with naming(self.path):
            self._file.flush()  # the newline that ends a torn line is written, unflushed, before any record
        return os.fstat(self._file.fileno()).st_size

    def sync(self) -> None:
        """fsync the records flushed so far (all of them, once `size` was read). Call it before writing a
        checkpoint that records `size`: after a power loss the log must not be shorter than a checkpoint says,
        or the rounds between would never be logged. Blocking; safe in a worker thread while the loop is not
        writing, as no Python buffer is touched."""
        with naming(self.path):
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (even if the flush of a record the disk refused fails again: OSError naming it)."""
        if not self._file.closed:
            with naming(self.path):
                self._file.close()


def _ends_a_line(path: Path) -> bool:
    """Whether ``path`` is empty or ends with a newline; reads its last byte only (the log grows for ever)."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return True
        f.seek(end - 1)
        return f.read(1) == b"\n"


def truncate_rounds(out: Path, size: int) -> int:
    """Cut ``rounds.jsonl`` back to its first ``size`` bytes (a checkpoint's `Checkpoint.rounds_bytes`), before a
    `RoundLog` opens it. The lines past it are the rounds a crash undid: the node resumes from the checkpoint
    and runs them again, so they would otherwise appear twice. One truncate(2): a crash sees the file before or
    after it. A file already as short is left alone (e.g. moved away meanwhile). Returns the lines removed."""
    path = out / ROUNDS
    if not path.exists() or path.stat().st_size <= size:
        return 0
    with path.open("rb") as f:
        f.seek(size)
        undone = f.read().count(b"\n")
    os.truncate(path, size)
    log.info("removed the last %d line(s) of %s: rounds after the checkpoint, to be run again", undone, path.name)
    return undone


def read_rounds(out: Path) -> list[dict[str, Any]]:
    """All records of ``rounds.jsonl`` (a torn last line from a crash is skipped)."""
    path = out / ROUNDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a torn line in %s", path)
    return records


def last_numbers(out: Path, keys: Collection[str]) -> dict[str, float]:
    """The last number each of ``keys`` has in ``rounds.jsonl`` (a key no record gives a number is left out), read
    backwards from the end, `TAIL_BLOCK_BYTES` at a time, until every key is found. The log grows by a line a round
    for as long as the run lasts, so a resume must not hold all of it, as `read_rounds` does: with an evaluation
    every few rounds this reads one block. A torn line from a crash is skipped."""
    path = out / ROUNDS
    found: dict[str, float] = {}
    if not path.exists():
        return found
    with path.open("rb") as f:
        for line in _lines_from_the_end(f):
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError from a line cut inside a character
                log.warning("skipping a torn line in %s", path)
                continue
            if not isinstance(record, dict):
                continue
            for key in keys:
                value = record.get(key)
                if key not in found and isinstance(value, int | float):
                    found[key] = float(value)
            if found.keys() >= set(keys):
                break
    return found


def last_mixed_logged(out: Path) -> int:
    """1 + the last round ``rounds.jsonl`` logs as mixed with a neighbour (0: none), read backwards from the end:
    the last mixing of a node whose checkpoint did not record it (`Checkpoint.last_mixed` None, nodes before
    2026-12-05). Read once the log is cut back to the checkpoint (`truncate_rounds`): a round logged after it is
    run again. A state adopted by a catch-up after that round is not in the log, so this may say earlier, never
    later: the node then follows a group that mixed since rather than pass for a newcomer that never did."""
    path = out / ROUNDS
    if not path.exists():
        return 0
    with path.open("rb") as f:
        for line in _lines_from_the_end(f):
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError from a line cut inside a character
                continue
            t = record.get("round") if isinstance(record, dict) else None
            if isinstance(t, int) and t >= 0 and record.get("neighbours"):
                return t + 1
    return 0


def _lines_from_the_end(f: BinaryIO) -> Iterator[bytes]:
    """The non-empty lines of ``f``, last first, read `TAIL_BLOCK_BYTES` at a time (at most that plus the longest
    line is held at once)."""
    end = f.seek(0, os.SEEK_END)
    head = b""  # the start of the earliest line read so far, whose beginning is in a block not yet read
    while end > 0:
        start = max(0, end - TAIL_BLOCK_BYTES)
        f.seek(start)
        head, *lines = (f.read(end - start) + head).split(b"\n")
        end = start
        yield from (line for line in reversed(lines) if line.strip())
    if head.strip():
        yield head
