"""A node's ``OUT/node.json``: its id, its model fingerprint and the run settings a resumed run must share.

Kept apart from `tadlora.node.state` (checkpoints, torch) so that `tadlora-node status --out DIR` can read a
node's id without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tadlora.fsutil import atomic_write_json

IDENTITY = "node.json"
# The layout of what a node keeps in --out (node.json and the checkpoint's metadata), written into both. Raised when
# a change would make an older tadlora misread them, so that it refuses them instead (`check_format`); files from
# before it was written carry none and read as format 1.
OUT_FORMAT = 1


class OutRefused(RuntimeError, ValueError):
    """``--out`` holds what a node started with these flags must not use: a run of other settings, another node's
    or model's state, a damaged ``node.json`` or checkpoint. No restart changes that, so the node exits 2, which
    supervisors are told not to restart (`tadlora.node.cli.run_main`); a held ``.node.lock``, which goes with the
    node holding it, is not one. Both a RuntimeError (the node's start-up) and a ValueError (``node.json`` read as
    configuration), as the callers of each catch it."""


def load_identity(out: Path) -> dict[str, Any] | None:
    """``node.json`` if present; ValueError, naming the file, if it is not a JSON object (callers would fail on it
    as a traceback) or not JSON at all (the error would say only where in which file the parse stopped)."""
    path = out / IDENTITY
    if not path.exists():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise OutRefused(
            f"{path} is not readable JSON ({exc}); move it away or use another --out (a node whose node.json is "
            "moved away needs --node-id to resume its checkpoint)"
        ) from exc
    if not isinstance(loaded, dict):
        raise OutRefused(
            f"{path} is not a JSON object (a node's id and run settings); move it away or use another --out"
        )
    check_format(path, loaded.get("format"))
    return loaded


def check_format(path: Path, found: object) -> None:
    """Refuse a file of ``--out`` that a newer tadlora wrote in a layout this one does not know (`OUT_FORMAT`):
    read as this version's, it could resume a run wrongly. ``found`` None: written before the format was."""
    number = found if isinstance(found, int) and not isinstance(found, bool) else None
    if found is None or (number is not None and 1 <= number <= OUT_FORMAT):
        return
    if number is not None and number > OUT_FORMAT:
        raise OutRefused(
            f"{path} was written by a newer tadlora (format {found}; this one reads format {OUT_FORMAT} and older): "
            "run that version, or a newer one, on this --out; going back to an older version over the same --out is "
            "not supported"
        )
    raise OutRefused(f"{path} says it is in an unknown format {found!r} (this tadlora writes format {OUT_FORMAT}); "
                     "move it away or use another --out")  # fmt: skip


def kept_node_id(out: Path | None) -> str | None:
    """The node id a node saved in ``out`` (its node.json), if any; None also when node.json is unreadable or
    torn, so that a caller asks for the id instead."""
    if out is None:
        return None
    try:
        identity = load_identity(out)
    except (OSError, ValueError):
        return None
    node_id = (identity or {}).get("node_id")
    return node_id if isinstance(node_id, str) else None


def recorded_init(identity: dict[str, Any]) -> str:
    """The init (`tadlora.adapter.INITS`) the run a ``node.json`` describes was drawn with: the one it records, or
    ``torch`` for one written before it did."""
    init = identity.get("init", "torch")
    return init if isinstance(init, str) else "portable"  # not a name: the node then refuses the fingerprint


def fingerprint_change(identity: dict[str, Any], parts: str) -> str:
    """Which parts of the model fingerprint differ between the run a ``node.json`` describes and a node about to
    resume it with ``parts`` (`tadlora.adapter.fingerprint_parts`), as a refusal's clause, e.g. ``"; it differs in
    seed (kept 0, now 7) and weights (kept #21e9c55d, now #fbc811dc)"``; "" where that cannot be told (a node.json
    written before the parts were kept, or none differs by them)."""
    from tadlora.node.peer_checks import fingerprint_differences  # wire and torch: not for `status --out`

    kept = identity.get("fingerprint_parts")
    differ = fingerprint_differences(kept, parts, "kept", "now") if isinstance(kept, str) else ""
    return f"; it differs in {differ}" if differ else ""


def kept_init(out: Path | None) -> str:
    """How a node resuming from ``out`` draws its model: as the run kept there was (`recorded_init`), so that its
    head and fingerprint stay that run's; a new run (no node.json, or none readable: the node then refuses it itself)
    is ``portable``."""
    try:
        identity = load_identity(out) if out is not None else None
    except (OSError, ValueError):
        identity = None
    return "portable" if identity is None else recorded_init(identity)


def save_identity(out: Path, node_id: str, fingerprint: str, **run: str | int | float | None) -> None:
    """Write ``node.json``: the node's id and model fingerprint, and ``run``, the other settings a node resuming
    from ``out`` must share (`run_conflict`; `NodeConfig.run_settings`), e.g. ``cluster="lab", method="tad"``."""
    atomic_write_json(out / IDENTITY, {"format": OUT_FORMAT, "node_id": node_id, "fingerprint": fingerprint, **run})


# A run setting's flag, by its node.json key (`NodeConfig.run_settings`): a refusal names what the user typed.
_FLAGS = {
    "cluster": "--cluster",
    "method": "--method",
    "switch_interval": "--switch-interval",
    "dataset": "--dataset",
    "split": "--split",
    "shard": "--shard",
    "num_shards": "--num-shards",
    "link_prob": "--link-prob",
    "max_neighbors": "--max-neighbors",
}
# What a setting's None means, by key, as the schedule spells it ("lora T=none ... max-neighbors=all").
_NONE = {"switch_interval": "none", "max_neighbors": "all"}


def _setting(key: str, value: object) -> str:
    """A run setting's value as a refusal shows it: a text quoted, a number as it is, None as what it means."""
    if value is None:
        return _NONE.get(key, "none")
    return repr(value) if isinstance(value, str) else str(value)


def run_conflict(identity: dict[str, Any], **ours: str | int | float | None) -> str | None:
    """How the run kept in ``node.json`` (``identity``) differs from ``ours`` (the settings of the node about to
    resume it, by node.json key), by flag, e.g. ``"--method 'tad' (now 'lora'), --switch-interval 5 (now none)"``;
    None when nothing differs. A key that ``identity`` lacks (written by an older node) is not compared."""
    diffs = [
        f"{_FLAGS.get(k, k)} {_setting(k, identity[k])} (now {_setting(k, v)})"
        for k, v in ours.items()
        if k in identity and identity[k] != v
    ]
    return ", ".join(diffs) or None


def out_refusal(
    out: Path,
    identity: dict[str, Any] | None,
    *,
    fingerprint: str | None,
    parts: str,
    node_id: str | None,
    run: dict[str, str | int | float | None],
    init: str | None = None,
) -> tuple[str, str] | None:
    """Why a node must not resume the run kept in ``out`` (its ``node.json``, ``identity``), and the fix; None when
    it may, or when ``out`` keeps no run (``identity`` None or empty). The node's settings: its model
    ``fingerprint`` and ``parts`` (`tadlora.adapter.fingerprint_parts`; a fingerprint of None is not compared: the
    model did not load), its ``--node-id`` (None takes the kept one), its ``run`` settings
    (`NodeConfig.run_settings`) and, where known, the ``init`` it draws its model with. One wording for the node's
    refusal (`Node.start`, which exits 2) and doctor's ``out`` check."""
    if not identity:
        return None
    if fingerprint is not None and identity.get("fingerprint") != fingerprint:
        kept = recorded_init(identity)
        hint = f" (drawn with --init {kept}, now {init})" if init is not None and kept != init else ""
        return (
            f"{out} belongs to a run with another model fingerprint ({identity.get('fingerprint')}){hint}"
            f"{fingerprint_change(identity, parts)}",
            "use another --out to start a new run, or the flags that run was started with",
        )
    kept_id = identity.get("node_id")
    if kept_id and node_id and kept_id != node_id:
        return (
            f"{out} belongs to node {kept_id!r}, not {node_id!r}",
            f"use another --out for node {node_id!r}, or --node-id {kept_id} to resume that node",
        )
    if conflict := run_conflict(identity, **run):
        # The fingerprint covers model, LoRA, labels and seed; a resume under another cluster, method, data or
        # topology would carry this run's factors and round into another run, and append its rounds to its log.
        return (
            f"{out} holds a run of other settings, {conflict}",
            "use another --out to start a new run, or the flags that run was started with",
        )
    return None
