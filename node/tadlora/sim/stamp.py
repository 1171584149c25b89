"""A run directory's stamp (``config.json``), the one record of the settings its cells ran with: reading it, what
to do when it refuses a run, which settings may change under it (`_RESUMABLE_CHANGES`), how the grid it records
grows (`_grown`), and the digests of the ``file:`` topologies it keeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tadlora.core.methods import make_method, method_names, takes_switch_interval
from tadlora.core.topology import make_topology
from tadlora.sim.cell_files import _read_json
from tadlora.sim.config import SimConfig, override

# A run's stamp cannot be removed like a cell's file: it is the one record of the settings its cells ran with.
_STAMP_REMEDY = "repair it (resolve the merge conflict, or restore it from git): it records the settings of the cells"


def _read_stamp(path: Path) -> dict[str, Any]:
    """The settings a run directory's ``config.json`` records; ValueError naming the file where it holds no JSON
    object (a hand edit's ``null`` or list would otherwise end in a TypeError far from the file)."""
    stamp = _read_json(path, _STAMP_REMEDY)
    if not isinstance(stamp, dict):
        raise ValueError(f"{path} holds {json.dumps(stamp)[:40]}, not the object of a run's settings: {_STAMP_REMEDY}")
    return stamp


def _refusal_remedy(out: Path, computes: bool, kept: Sequence[str], *, own_settings_help: bool = True) -> str:
    """What to do about a run directory ``out`` whose stamp has other settings than ours, for the error that refuses
    it: ``computes`` is false for a report, ``kept`` the files in its cells/ folder, ``own_settings_help`` false
    when the contents of files it names, or how it read its inputs, differ (its own settings would be refused
    alike).

    "Use another --out" alone fits only a new run: a report, or a resume that left out the flags the run was started
    with, wants the directory's own settings, which its stamp gives back as a config file; and a directory where a
    run stopped before any cell finished or checkpointed (a mistyped --model, data too small for the split) holds
    nothing to keep, yet its stamp refuses the corrected command for good."""
    own = f"--config {out / 'config.json'}"
    if not kept:
        return (
            "no cell has finished or checkpointed there, so it holds no result: unless a process is running in it "
            f"now, remove it (rm -r {out}) and run again to start anew with these settings, or use another --out "
            "directory"
        )
    if not own_settings_help:
        if not computes:  # a report of those cells under the files' names would pass them off as of the new files
            return "to report it, restore the files it ran on"
        return "to start a new run on the files as they are now, use another --out directory"
    if not computes:
        return f"to report it, give its own settings: {own}"
    return f"to go on with that run, give its own settings ({own}); to start a new run, use another --out directory"


# Settings that may differ when a run is resumed, or between runs that share cells: the grid's axes (which cells
# it holds; growing it only adds cells), the device, and how often a cell is checkpointed (a checkpoint of any
# round resumes). None changes what a cell computes, but for the device's own draws: a cell resumed on another
# kind of device (precision and engine as computed are checked apart) goes on with that device's dropout masks,
# from the same distribution (`tadlora.training`).
_RESUMABLE_CHANGES = {
    "checkpoint_every",
    "methods",
    "link_probs",
    "switch_intervals",
    "sweep_methods",
    "seeds",
    "topologies",
    "device",
    "name",
}


# The axes among them: a directory's grid is the union, axis by axis, of the grids run in it.
_GRID_AXES = ("methods", "link_probs", "switch_intervals", "sweep_methods", "seeds", "topologies")


def _grown(mine: SimConfig, stamped: dict[str, Any]) -> SimConfig:
    """``mine`` with each grid axis the stamped grid's values followed by those of mine it lacks, and the stamped
    name (the directory's, e.g. a benchmark's, not that of the preset a part of it was run with). A stamp's axis
    that is not a list (hand-edited) is left out of the union rather than trusted. A stamped method that this
    process has not registered (one of a user's own, registered by the module the grid was run through) is refused
    as such: the grid's check would call it unknown, as if the run's own --methods had named it."""
    unregistered = [
        m
        for axis in ("methods", "sweep_methods")
        if isinstance(stamped.get(axis), list)
        for m in stamped[axis]
        if isinstance(m, str) and m not in method_names()
    ]
    if unregistered:
        names = ", ".join(map(repr, dict.fromkeys(unregistered)))
        raise ValueError(
            f"the directory's grid (its config.json) has method {names}, which this process has not registered "
            f"(known: {', '.join(method_names())}): a method of your own is registered by your module, so run this "
            "command through that module, as the run that stamped it was (docs/simulator.md#extending)"
        )
    changes: dict[str, Any] = {}
    for axis in _GRID_AXES:
        theirs = stamped.get(axis)
        if isinstance(theirs, list):
            changes[axis] = list(dict.fromkeys([*theirs, *getattr(mine, axis)]))
    # A method one grid runs at its own T and the other sweeps is swept in the union: its own T joins the T grid,
    # or the cells run at it would fall out of the directory's grid (and its results).
    swept = changes.get("sweep_methods", list(mine.sweep_methods))
    own_t = []
    for methods, sweep in ((mine.methods, mine.sweep_methods), (stamped.get("methods"), stamped.get("sweep_methods"))):
        if isinstance(methods, list | tuple) and isinstance(sweep, list | tuple):
            own_t += [
                make_method(m).switch_interval
                for m in methods
                if m in swept and m not in sweep and m in method_names() and takes_switch_interval(m)
            ]
    if own_t:
        grown = [*changes.get("switch_intervals", mine.switch_intervals), *own_t]
        changes["switch_intervals"] = list(dict.fromkeys(grown))
    if isinstance(stamped.get("name"), str):
        changes["name"] = stamped["name"]
    return override(mine, changes)


def _topology_files(config: SimConfig) -> dict[str, str]:
    """A digest of the graph (its edges, however the file writes them) that each ``file:`` topology of ``config``
    reads now. A cell's key names such a topology by its path only: an edited file would go on under it unseen."""
    return {
        spec: hashlib.blake2b(
            repr(sorted(make_topology(spec, config.num_clients).edges)).encode(), digest_size=8
        ).hexdigest()
        for spec in config.topologies
        if spec.startswith("file:")
    }
