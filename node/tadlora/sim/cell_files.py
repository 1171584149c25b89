"""A cell's files in a run directory's ``cells/``, read back: the JSON reader every file of a run goes through, a
checkpoint (its tensors, records and seconds; `OPT_PREFIX` names its optimizer state) and a finished cell's record.
Each file that holds what it should not is a ValueError naming it and what to do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from tadlora.sim.config import Cell
from tadlora.sim.rounds import RoundRecord

log = logging.getLogger("tadlora.sim")

# A cell checkpoint's keys of the persistent optimizer state, "opt/CLIENT/KEY/MOMENT" (factor keys start with the
# client index); spelt with its "/" as a node checkpoint's `tadlora.node.state.OPT_PREFIX` is.
OPT_PREFIX = "opt/"


def _read_json(path: Path, remedy: str = "repair or remove it") -> Any:
    """The JSON document in ``path``. One that holds none (a hand edit, a merge conflict) is a ValueError naming the
    file and ``remedy``: json's own error names a line and a column, not the file among the run's many."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} holds no valid JSON ({exc}): {remedy}") from None


def _read_checkpoint(
    ckpt: Path, partial: Path
) -> tuple[dict[str, Any], list[RoundRecord], float, list[dict[str, str]]] | None:
    """A cell's checkpoint as (tensors, records so far, seconds they took, what ran them: the ``ran_with`` of a
    cell's record, empty for a checkpoint written before it was kept); None when there is nothing to resume.

    A checkpoint carries its records in its metadata. One written before it did has them in ``partial`` beside it;
    without that file it is ignored (the cell restarts), and if the two disagree on the round (the process died
    between writing them) the cell cannot resume consistently: ValueError, naming the files to delete.
    """
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (the handle is not a mapping)
    except SafetensorError as exc:  # not a ValueError: it would end the CLI with a traceback naming no file
        raise ValueError(
            f"{ckpt} is not a readable checkpoint ({exc}): delete it and {partial.name} to run this cell from the start"
        ) from None
    if "records" in meta:
        return tensors, json.loads(meta["records"]), float(meta.get("seconds", "0")), _ran_with(meta.get("ran_with"))
    if not partial.exists():
        log.warning("%s has no records beside it: its cell starts over", ckpt)
        return None
    saved = _read_json(partial)
    records = saved["records"]
    if "round" in meta and int(meta["round"]) != len(records):
        raise ValueError(
            f"{ckpt} holds round {meta['round']} but {partial.name} ends at round {len(records)} (the process was "
            "stopped between writing them): delete both files to run this cell from the start"
        )
    return tensors, records, float(saved.get("seconds", 0.0)), _ran_with(saved.get("ran_with"))


def _ran_with(kept: object) -> list[dict[str, str]]:
    """A checkpoint's ``ran_with`` (JSON text in its metadata, a list in a partial file) as a list of entries; an
    empty one where it is missing or unreadable: it is a record of where rounds ran, never a reason to refuse them."""
    if isinstance(kept, str):
        try:
            kept = json.loads(kept)
        except ValueError:
            return []
    if not isinstance(kept, list):
        return []
    return [entry for entry in kept if isinstance(entry, dict)]


def _read_cell(path: Path, cell: Cell) -> dict[str, Any]:
    """The finished ``cell``'s record in ``path``; ValueError naming the file if it holds JSON of another shape (a
    hand edit, a merge resolved by hand), which would otherwise end the report in a KeyError."""
    record = _read_json(path)
    try:
        same = isinstance(record, dict) and Cell.from_dict(record) == cell
    except ValueError:
        same = False
    if not (same and isinstance(record.get("rounds"), list) and isinstance(record.get("final"), dict)):
        raise ValueError(f"{path} holds no finished record of cell {cell.key}: remove it to run the cell again")
    return dict(record)
