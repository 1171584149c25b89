"""The simulator loop: one cell = one method on one topology for one seed; a run = a grid of cells.

Each round, for every client: local steps on the factors its method trains; then every client mixes with its
live neighbours through `tadlora.core.mixing.apply_method_mixing` with Metropolis-Hastings weights from
this round's degrees — the same function, fed the same numbers, that the node daemon calls.

Results are written as they are made: a finished cell to ``cells/KEY.json``, an unfinished one to a
checkpoint every ``checkpoint_every`` rounds, so an interrupted run resumes where it stopped.

The run (`Simulator`) is here; its parts are in their own modules, whose names this one re-exports:
`tadlora.sim.rounds` (`simulate`, `mix_round`), `tadlora.sim.progress` (`Progress`), `tadlora.sim.cell_files` (a
cell's checkpoint and record read back), `tadlora.sim.stamp` (the run directory's config.json) and
`tadlora.sim.summary` (`summarize`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save

from tadlora.adapter import AdapterModel, ModelSpec, resolve_device
from tadlora.cliutil import raise_if_interrupted, releases
from tadlora.core.methods import make_method
from tadlora.core.robust import parse_robust_mixing
from tadlora.core.topology import make_topology
from tadlora.data import TextDataset, is_local_spec, resolve_dataset
from tadlora.fsutil import atomic_write_bytes, atomic_write_json
from tadlora.sim.cell_files import OPT_PREFIX as OPT_PREFIX
from tadlora.sim.cell_files import _read_cell, _read_checkpoint, _read_json
from tadlora.sim.config import RESOLVED_KEY, Cell, SimConfig, stamp_settings
from tadlora.sim.engine import make_engine, resolve_engine
from tadlora.sim.progress import Progress as Progress
from tadlora.sim.rounds import RoundRecord as RoundRecord
from tadlora.sim.rounds import mix_round as mix_round
from tadlora.sim.rounds import simulate as simulate
from tadlora.sim.stamp import _RESUMABLE_CHANGES, _grown, _read_stamp, _refusal_remedy, _topology_files
from tadlora.sim.summary import _final
from tadlora.sim.summary import summarize as summarize
from tadlora.training import INPUTS_VERSION, Encoded, device_name, encode, matmul_precision, precision_warning
from tadlora.workload import client_shards, eval_subset

log = logging.getLogger("tadlora.sim")


@dataclass
class PreparedData:
    """Tokenized data shared by every cell of a run."""

    train: TextDataset
    train_encoded: Encoded
    dev_encoded: Encoded


def _computation_lock_name(cell: Cell) -> str:
    """The lock of ``cell``'s computation (`Cell.computation`), shared by the cells that compute it (``adf`` and
    ``tad`` with T = 5, ``rolora`` and ``tad-nojoint`` with T = 1)."""
    digest = hashlib.blake2b(repr(cell.computation).encode(), digest_size=8).hexdigest()
    return f"computation-{digest}"


class Simulator:
    """Runs a SimConfig's grid into an output directory, resuming whatever is already there.

    A cell is run once per computation (`Cell.computation`): one whose computation a finished cell already ran,
    in this directory or in a ``share_from`` directory holding a run of the same settings, is copied from it (the
    copy names its source under ``same_as``) instead of being run again."""

    def __init__(
        self, config: SimConfig, out_dir: str | Path, quiet: bool = False, share_from: Sequence[str | Path] = ()
    ):
        self.config = config
        self.out = Path(out_dir)
        self.cells_dir = self.out / "cells"
        self.share_from = [Path(d) for d in share_from]
        self._noted: set[Path] = set()  # share_from directories already reported as of other settings
        self.device = resolve_device(config.device)
        slow = precision_warning(config.train.precision, self.device)
        if slow:
            log.warning("%s", slow)
        self.quiet = quiet
        self._models: dict[int, AdapterModel] = {}
        self._data: PreparedData | None = None

    def _prepare(self) -> PreparedData:
        if self._data is None:
            cfg = self.config
            train = resolve_dataset(cfg.dataset, "train")
            dev = resolve_dataset(cfg.dataset, "dev")
            dev = eval_subset(dev, cfg.eval_samples)
            tokenizer = self._model(cfg.seeds[0], train.label_names).tokenizer
            self._data = PreparedData(
                train=train,
                train_encoded=encode(tokenizer, train, cfg.train.max_length),
                dev_encoded=encode(tokenizer, dev, cfg.train.max_length),
            )
        return self._data

    def _model(self, seed: int, label_names: Sequence[str]) -> AdapterModel:
        if seed not in self._models:
            # One model at a time: seeds are the grid's outermost axis (`SimConfig.cells`), and every seed's copy of
            # the base weights kept would hold its (GPU) memory for the rest of the run.
            self._models.clear()
            spec = ModelSpec(
                model=self.config.model,
                label_names=tuple(label_names),
                lora=self.config.lora,
                seed=seed,
                init=self.config.init,
            )
            self._models[seed] = AdapterModel(spec, device=self.device)
        return self._models[seed]

    def shards(self, seed: int) -> list[Encoded]:
        """Client shards (tokenized) for ``seed``."""
        data = self._prepare()
        cfg = self.config
        return [
            data.train_encoded.subset(i)
            for i in client_shards(data.train, cfg.split, cfg.num_clients, seed, cfg.samples_per_client)
        ]

    def run(self, report_only: bool = False) -> dict[str, Any]:
        """Run (or resume) every cell, then write results.json and the plots; return the results.
        ``report_only`` runs nothing: it reports the cells finished so far (e.g. while a long grid runs)."""
        cfg = self.config
        for spec in cfg.topologies:
            _warn_of_isolated_clients(spec, cfg.num_clients)
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        grid = self._check_same_config(computes=not report_only)
        self._compatible_share_dirs()  # a share_from that is no run directory fails before any work
        cells = list(cfg.cells())
        progress = Progress(len(cells), quiet=self.quiet)
        deferred: list[tuple[int, Cell]] = []  # of a computation another process is running: copied once it is done
        for index, cell in enumerate(cells):
            if (self.cells_dir / f"{cell.key}.json").exists() or self._adopt_equivalent(cell) or report_only:
                continue
            if self._run_unless_busy(index, cell, progress) == "computation":
                deferred.append((index, cell))
        for index, cell in deferred:
            with self._locked(_computation_lock_name(cell)):  # wait for the other process's run of it to end
                pass
            if not self._adopt_equivalent(cell):  # it died before finishing: ours to run
                self._run_unless_busy(index, cell, progress)
        # Reported: the directory's whole grid, not only the cells this run was given, so that runs of its parts
        # (one per core, a seed at a time) add up in results.json instead of each overwriting the others'. The grid
        # is the stamp's now, not at our start: a process started since may have grown it, and finished before us.
        # Under a lock from reading the stamp to writing the report, so that the last report written is of the
        # last grid stamped.
        with self._locked("results"):
            # Ours stays in it: a report's is not stamped.
            grid = _grown(grid, _read_stamp(self.out / "config.json"))
            every = list(grid.cells())
            finished = [c for c in every if (self.cells_dir / f"{c.key}.json").exists()]
            results = self.collect(finished, grid)
            results["missing_cells"] = [c.key for c in every if c not in finished]
            results["plots"] = []  # none until a cell has finished: the key is there for readers all the same
            atomic_write_json(self.out / "results.json", results)
            if finished:
                from tadlora.sim.plots import write_plots  # matplotlib is slow to import; only needed here

                results["plots"] = [p.name for p in write_plots(results, self.out)]
                atomic_write_json(self.out / "results.json", results)
        progress.done(f"{len(finished)}/{len(every)} cells of the grid done; results in {self.out / 'results.json'}")
        return results

    def _check_same_config(self, computes: bool = True) -> SimConfig:
        """Refuse to mix results of different configs in one directory (resume only what was started), then stamp
        the directory's grid and return it: ours, each axis grown by the values the stamp's grid had (`_grown`), so
        that a run of some of the cells neither shrinks the record of what the directory holds nor needs a revert.
        The stamp also records what the run computes in on this host (`RESOLVED_KEY`). A run that ``computes``
        nothing leaves a stamp as it was (a report neither vouches for cells it did not run nor adds its axes to
        the directory's grid for good), and writes one without that record where there is none."""
        stamp = self.out / "config.json"
        record: dict[str, Any] = {RESOLVED_KEY: self._resolved()} if computes else {}
        grid = self.config
        # Two processes on one directory (one per core) stamp in turn: else one could write its grid over the
        # other's, which it had not read.
        with self._locked("config"):
            kept = sorted(p.name for p in self.cells_dir.iterdir() if not p.name.startswith("."))
            theirs = _read_stamp(stamp) if stamp.exists() else None
            changed = self._changed_settings(theirs) if theirs is not None else []
            contents = self._changed_contents(theirs, computes, bool(kept)) if theirs is not None else []
            if theirs is not None and changed and computes and RESOLVED_KEY not in theirs and not kept:
                # Only a report writes a stamp without the record, and no cell ran under this one: it vouches for
                # nothing, and refusing would strand a directory that a mistyped --report-only merely looked at.
                sys.stderr.write(f"replacing {stamp}: a report wrote it, and no cell has run under it\n")
                theirs = None
            if theirs is None:
                # Every run stamps before it writes a cell: cells without a stamp lost it (a merge, a removal), and
                # a new stamp would vouch for cells of settings no one can tell any more.
                if kept:
                    raise ValueError(
                        f"{self.out} holds {len(kept)} cell file{'s' if len(kept) > 1 else ''} (cells/{kept[0]}"
                        f"{', ...' if len(kept) > 1 else ''}) but no config.json, the record of the settings they "
                        "ran with: restore it (e.g. from git), or use another --out directory to start a new run"
                    )
            else:
                if changed or contents:
                    what = "different settings" if changed else "the same settings on other data or inputs"
                    raise ValueError(
                        f"{self.out} holds a run with {what} ({', '.join(changed + contents)}); "
                        # Its own settings would be refused for the contents too: offered only when they'd do.
                        + _refusal_remedy(self.out, computes, kept, own_settings_help=not contents)
                    )
                grid = _grown(self.config, theirs)
                if not computes:
                    return grid
                there = theirs.get(RESOLVED_KEY)
                ran = there.get("topology_files") if isinstance(there, dict) else None
                if isinstance(ran, dict) and ran:  # the graphs of the other parts' file topologies stay on record
                    record[RESOLVED_KEY]["topology_files"] = {**ran, **record[RESOLVED_KEY].get("topology_files", {})}
            atomic_write_json(stamp, {**grid.to_dict(), **record})
        return grid

    def _resolved(self) -> dict[str, Any]:
        """Settings as this host resolves them, where that changes what a cell computes: also the graph each
        ``file:`` topology reads now (`_topology_files`), where there is one, and the examples a dataset file holds
        now (`_dataset_digest`), where the dataset is one."""
        resolved: dict[str, Any] = {
            "matmul_precision": matmul_precision(self.device, self.config.train.precision),
            "engine": resolve_engine(self.config.engine, self.device),
            "inputs": INPUTS_VERSION,
        }
        files = _topology_files(self.config)
        if files:
            resolved["topology_files"] = files
        if self._dataset_digest is not None:
            resolved["dataset_digest"] = self._dataset_digest
        return resolved

    @functools.cached_property
    def _reads_pairs(self) -> bool:
        """Whether the dataset's examples are sentence pairs (MNLI, QNLI, RTE), whose inputs `INPUTS_VERSION` 2
        changed."""
        return resolve_dataset(self.config.dataset, "train").is_pair

    @functools.cached_property
    def _dataset_digest(self) -> str | None:
        """A digest of the examples (train and dev, texts and labels) that a dataset given as a file path reads now;
        None for named data (builtin:, glue:, hub:). The stamp names such a dataset by its path only: an edited file
        would go on under it unseen, its new cells summarised with the old data's as seeds of one row."""
        if not is_local_spec(self.config.dataset):
            return None
        digest = hashlib.blake2b(digest_size=8)
        for split in ("train", "dev"):
            data = resolve_dataset(self.config.dataset, split)
            digest.update(repr((data.text_a, data.text_b, data.labels.tolist(), data.label_names)).encode())
        return digest.hexdigest()

    def _changed_settings(self, theirs: dict[str, Any]) -> list[str]:
        """The settings in which a run's stamped config differs from ours, other than the grid's axes.

        Precision is compared as computed, where the stamp records it: "auto" is fp32 on a CPU and bf16 autocast on
        CUDA, so a grid started on one may not go on, or lend its cells, on the other unless the precision is
        pinned to the one its cells ran in; and "auto" and "fp32" are the same computation on a CPU. The engine
        likewise: "auto" is the batched engine on CUDA and the sequential one on a CPU, which agree only to float
        tolerance (and with dropout draw other masks)."""
        theirs = dict(theirs)
        resolved = theirs.pop(RESOLVED_KEY, None)
        mine = json.loads(json.dumps(self.config.to_dict()))
        theirs = stamp_settings(theirs)
        changed = []
        if isinstance(resolved, dict) and isinstance(theirs.get("train"), dict):
            ran, here = resolved.get("matmul_precision"), self._resolved()["matmul_precision"]
            if ran != here:
                changed.append(f"matmul precision: {ran} there, {here} here (pin it with --precision {ran})")
            theirs["train"] = {**theirs["train"], "precision": None}
            mine["train"] = {**mine["train"], "precision": None}
        if isinstance(resolved, dict) and "engine" in resolved:  # stamps before it was recorded compare the setting
            ran, here = resolved["engine"], self._resolved()["engine"]
            if ran != here:
                changed.append(f"engine: {ran} there, {here} here (pin it with --engine {ran})")
            theirs["engine"] = mine["engine"] = None
        changed += [k for k in mine if mine[k] != theirs.get(k) and k not in _RESUMABLE_CHANGES]
        return sorted(changed)

    def _changed_contents(self, theirs: dict[str, Any], computes: bool = True, cells_kept: bool = True) -> list[str]:
        """The files a run's stamp names (a dataset, a ``file:`` graph) whose contents are not those its cells ran
        on, and (for a run that ``computes``) inputs read otherwise than its cells read them (`INPUTS_VERSION`):
        the settings read alike, so the run's own settings (--config) would be refused alike; each says what to do
        instead. ``cells_kept``: whether the run's directory holds any cell or checkpoint."""
        resolved = theirs.get(RESOLVED_KEY)
        if not isinstance(resolved, dict):
            # No record: a report's stamp, under which nothing was computed, or one older than the record, whose
            # cells are older than the inputs' version too (every MNLI probe of docs/simulator.md).
            if not cells_kept:
                return []
            resolved = {}
        changed = []
        # A stamp without the record is older than it: its pairs were read as one sentence. Looked at only then,
        # since it loads the data; a report reads the cells as they were computed, which stays true.
        ran = resolved.get("inputs", 1)
        if computes and ran != INPUTS_VERSION and self._reads_pairs:
            how = (
                "read each sentence pair as one sentence, and this tadlora gives the model a pair's segment ids"
                if isinstance(ran, int) and ran < INPUTS_VERSION
                else f"were computed by a newer tadlora (inputs version {ran}, ours {INPUTS_VERSION})"
            )
            changed.append(
                f"inputs: its cells {how}: a cell resumed would go on reading the data otherwise than it started "
                "(start the run over)"
            )
        ran_data = resolved.get("dataset_digest")
        if ran_data is not None and ran_data != self._dataset_digest:
            changed.append(
                f"dataset {self.config.dataset}: its examples are not those the cells there ran on (restore the "
                "file, or give the new data a file of its own)"
            )
        ran_on = resolved.get("topology_files")
        if isinstance(ran_on, dict):
            for spec, graph in _topology_files(self.config).items():
                if ran_on.get(spec, graph) != graph:
                    changed.append(
                        f"topology {spec}: its edges are not those the cells there ran on (restore the file, or "
                        "give the new graph a file of its own)"
                    )
        return changed

    def _lock_file(self, name: str) -> int:
        """Open (creating) OUT/.locks/NAME.lock. Locks are flocks, so a process that dies drops them; their files
        stay in OUT/.locks, which holds a .gitignore so that a committed grid leaves them out."""
        locks = self.out / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        ignore = locks / ".gitignore"
        if not ignore.exists():  # atomic: a full disk left it empty, and no later run wrote it again
            atomic_write_bytes(ignore, b"*\n")
        return os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold the lock ``name`` for the block, waiting for another process that holds it."""
        fd = self._lock_file(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _run_unless_busy(self, index: int, cell: Cell, progress: Progress) -> str | None:
        """Run ``cell`` unless another process holds it ("cell": left to that process) or runs a cell of the same
        computation ("computation": its result is ours once it is done; `run` waits for it at the end). None when
        ``cell`` is done here (run, or finished meanwhile by another process)."""
        with self._try_lock(cell.key) as holder:
            if holder is not None:
                sys.stderr.write(f"skipping cell {cell.key}: process {holder} is running it in {self.out}\n")
                return "cell"
            # Both locks: processes of earlier versions take only the cell's, and must still see this one's.
            with self._try_lock(_computation_lock_name(cell)) as other:
                if other is not None:
                    sys.stderr.write(f"cell {cell.key} waits: process {other} is running the same computation in "
                                     f"{self.out}; its result is copied once it is done\n")  # fmt: skip
                    return "computation"
                if (self.cells_dir / f"{cell.key}.json").exists() or self._adopt_equivalent(cell):
                    return None  # another process finished it, or its computation, meanwhile
                progress.begin(index, cell, resuming=(self.cells_dir / f"{cell.key}.ckpt.safetensors").exists())
                on_round = functools.partial(_report, progress, index, cell, self.config.rounds)
                self.run_cell(cell, on_round, on_start=progress.rounds_start)
        return None

    @contextlib.contextmanager
    def _try_lock(self, name: str) -> Iterator[str | None]:
        """Hold the lock ``name`` (a cell's key, or `_computation_lock_name`) for the block without waiting; yields
        None when it is ours, else what the holder wrote (its pid).

        Two processes on one output directory (one per core, or a second started by mistake) would otherwise run
        the same cell, or two cells of one computation, side by side and write its checkpoint in turns.
        """
        fd = self._lock_file(name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
                return
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield None
        finally:
            os.close(fd)  # releases the flock

    def _adopt_equivalent(self, cell: Cell) -> bool:
        """Copy a finished cell of the same computation as ``cell`` to ``cell``'s file; whether there was one."""
        for cells_dir in [self.cells_dir, *self._compatible_share_dirs()]:
            for path in sorted(cells_dir.glob("*.json")):
                if path.name.endswith(".partial.json"):  # a checkpoint's records, not a finished cell
                    continue
                record = _read_json(path)
                try:
                    source = Cell.from_dict(record)
                    # A method this process has not registered (a user's own, of another module) has no policy here
                    # to compare: its cells are passed over, not the whole run refused as of an "unknown method".
                    if source.computation != cell.computation:
                        continue
                except ValueError:
                    continue
                if source != cell:
                    record = {**record, **cell.to_dict(), "key": cell.key, "same_as": record.get("same_as", source.key)}
                atomic_write_json(self.cells_dir / f"{cell.key}.json", record)
                return True
        return False

    def _compatible_share_dirs(self) -> list[Path]:
        """The ``share_from`` cell directories whose runs had our settings (their results would be ours); one
        that is no run directory is an error, one of other settings is passed over with a note on stderr."""
        dirs = []
        for out in self.share_from:
            stamp = out / "config.json"
            if not stamp.is_file():
                raise ValueError(f"cannot share cells from {out}: no simulator run there ({stamp} is missing)")
            theirs = _read_stamp(stamp)
            changed = self._changed_settings(theirs) + self._changed_contents(theirs)  # its cells are ours only so
            if changed:
                if out not in self._noted:
                    sys.stderr.write(
                        f"not sharing cells from {out}: its run has other settings ({', '.join(changed)})\n"
                    )
                    self._noted.add(out)
                continue
            dirs.append(out / "cells")
        return dirs

    def run_cell(
        self,
        cell: Cell,
        on_round: Callable[[int, RoundRecord], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Run one cell (resuming its checkpoint if any) and write ``cells/KEY.json``; ``on_round`` is called after
        each round, ``on_start`` once before the first, when the model, data and checkpoint are loaded."""
        cfg = self.config
        data = self._prepare()
        model = self._model(cell.seed, data.train.label_names)
        method = make_method(cell.method, cell.switch_interval)
        # Before the engine: the batched one hooks the shared model, and a topology that fails (a file: one whose
        # file went away since the grid was checked) would leave the hooks on it for the next cell.
        topology = make_topology(cell.topology, cfg.num_clients, link_prob=cell.link_prob, seed=cell.seed)
        engine = make_engine(
            cfg.engine, model, self.shards(cell.seed), data.dev_encoded, cfg.train, cell.seed, cfg.max_group_sequences
        )
        ckpt, partial = self.cells_dir / f"{cell.key}.ckpt.safetensors", self.cells_dir / f"{cell.key}.partial.json"
        records: list[RoundRecord] = []
        earlier = 0.0  # s the checkpointed rounds took in earlier processes
        # The releases and device of each process that ran the cell's rounds, in order: what `seconds` was spent on,
        # and what a result that differs from another machine's was computed with.
        ran_with: list[dict[str, str]] = []
        here = {**releases(), "device": device_name(self.device)}

        def after_round(t: int, record: RoundRecord) -> None:
            raise_if_interrupted()  # a Ctrl-C dropped where it landed stops the run here, before this round is kept
            records.append(record)
            if on_round is not None:
                on_round(t, record)
            if (t + 1) % cfg.checkpoint_every == 0 and t + 1 < cfg.rounds:
                # Client i's factors as "i/KEY", its persistent optimizer state (if any) as "opt/i/KEY/moment".
                state = {
                    f"{i}/{k}": v.contiguous() for i in range(cfg.num_clients) for k, v in engine.get_factors(i).items()
                }
                for i in range(cfg.num_clients):
                    state.update({f"{OPT_PREFIX}{i}/{k}": v.contiguous()
                                  for k, v in engine.get_optimizer_state(i).items()})  # fmt: skip
                # The records travel inside the checkpoint, so that state and records are one atomic write: a
                # process killed between two files would otherwise leave a state rounds ahead of its records.
                # KEY.partial.json is a readable copy for reports (benchmarks/paper_table.py), never resumed from
                # when the checkpoint carries its own.
                seconds = earlier + time.monotonic() - started
                meta = {"round": str(t + 1), "records": json.dumps(records), "seconds": repr(seconds),
                        "ran_with": json.dumps(ran_with)}  # fmt: skip
                atomic_write_bytes(ckpt, save(state, metadata=meta))
                atomic_write_json(partial, {"records": records, "seconds": seconds, "ran_with": ran_with})

        try:  # the engine is closed however the cell ends, a refused checkpoint included
            resume = _read_checkpoint(ckpt, partial) if ckpt.exists() else None
            if resume is not None:
                tensors, records, earlier, ran_with = resume
                for i in range(cfg.num_clients):
                    engine.set_factors(i, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}/")})
                    opt = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{OPT_PREFIX}{i}/")}
                    if opt:
                        engine.set_optimizer_state(i, opt)
            if not ran_with or ran_with[-1] != here:
                ran_with.append(here)
            started = time.monotonic()
            robust = parse_robust_mixing(cfg.robust_mixing)
            if on_start is not None:
                on_start()
            simulate(engine, method, topology, cfg.rounds, cfg.eval_every, len(records), after_round, robust)
        finally:
            engine.close()
        result = {
            **cell.to_dict(),
            "key": cell.key,
            "seconds": earlier + time.monotonic() - started,  # the rounds kept, over every process that ran them
            "ran_with": ran_with,
            "rounds": records,
            "final": _final(records),
        }
        atomic_write_json(self.cells_dir / f"{cell.key}.json", result)
        ckpt.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        return result

    def collect(self, cells: Sequence[Cell], grid: SimConfig | None = None) -> dict[str, Any]:
        """results.json: the config (``grid``'s, default ours), every cell's per-round records, and a summary."""
        runs = [_read_cell(self.cells_dir / f"{c.key}.json", c) for c in cells]
        return {"config": (grid or self.config).to_dict(), "cells": runs, "summary": summarize(runs)}


def _report(progress: Progress, index: int, cell: Cell, rounds: int, t: int, record: RoundRecord) -> None:
    progress.update(index, cell, t, rounds, record)


def _warn_of_isolated_clients(spec: str, num_clients: int) -> None:
    """Warn when the base graph of ``spec`` leaves clients without any link (an edge list written for fewer
    clients than the run has): they never mix, and the run would average them in unseen."""
    linked = {node for edge in make_topology(spec, num_clients).edges for node in edge}
    alone = [i for i in range(num_clients) if i not in linked]
    if alone and num_clients > 1:
        if len(alone) == 1:
            who, fate = f"client {alone[0]} has", "it never mixes: it trains on its own shard alone"
        else:
            who, fate = f"clients {', '.join(map(str, alone))} have", "they never mix: each trains on its own shard"
        log.warning(
            "topology %s: %s no link among the %d clients (nodes 0..%d), so %s", spec, who, num_clients,
            num_clients - 1, fate,
        )  # fmt: skip
