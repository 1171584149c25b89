"""What a node keeps on disk: its id, checkpoints (atomic, safetensors) and the per-round log.

Layout of ``OUT``: ``node.json`` (id, cluster, fingerprint), ``checkpoint.safetensors`` (the factors at the
start of a round, with the round in its metadata, and with ``--optimizer-state persistent`` the optimizer's state
under ``opt/KEY/moment``), ``rounds.jsonl`` (one JSON line per finished round) and
``adapter/`` (peft's format). Checkpoints are written to a temp file, fsynced and renamed, so a crash or a
full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from tadlora.core.factors import Factors
from tadlora.fsutil import atomic_write_bytes, atomic_write_json
from tadlora.training import OptimizerState

log = logging.getLogger("tadlora.node")

CHECKPOINT = "checkpoint.safetensors"
IDENTITY = "node.json"
ROUNDS = "rounds.jsonl"
ADAPTER = "adapter"
OPT_PREFIX = "opt/"  # checkpoint keys of the optimizer state; factor keys never hold a "/"


@dataclass(frozen=True)
class Checkpoint:
    """A node's state at the start of ``round``."""

    round: int
    node_id: str
    fingerprint: str
    factors: Factors
    optimizer: OptimizerState = field(default_factory=dict)  # empty unless the optimizer state persists


def save_checkpoint(out: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``out/checkpoint.safetensors``."""
    meta = {"round": str(ckpt.round), "node_id": ckpt.node_id, "fingerprint": ckpt.fingerprint}
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
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__", {})
        return Checkpoint(int(meta["round"]), meta["node_id"], meta["fingerprint"], factors, optimizer)
    except (SafetensorError, KeyError, ValueError) as exc:
        raise RuntimeError(f"checkpoint {path} is damaged ({exc}); move it away to start from scratch") from exc


def remove_torn_writes(out: Path) -> list[Path]:
    """Delete temp files of atomic writes cut short by a crash (SIGKILL, power loss); only the node that owns
    ``out`` may call it, at start-up, before it writes anything. Returns what was removed."""
    torn = sorted(out.glob(".*.tmp"))
    for path in torn:
        log.info("removing %s, left by an interrupted write", path.name)
        path.unlink(missing_ok=True)
    return torn


def load_identity(out: Path) -> dict[str, Any] | None:
    """``node.json`` if present."""
    path = out / IDENTITY
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def save_identity(out: Path, node_id: str, cluster: str, fingerprint: str) -> None:
    """Write ``node.json``."""
    atomic_write_json(out / IDENTITY, {"node_id": node_id, "cluster": cluster, "fingerprint": fingerprint})


class RoundLog:
    """Appends one JSON line per round to ``rounds.jsonl`` (flushed each line, so a crash loses nothing
    that was reported)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ROUNDS
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._file = self.path.open("a", encoding="utf-8")
        if torn:  # a crash mid-line: end that line, so the next record is not glued onto it
            self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


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
