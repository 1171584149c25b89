"""What a run says while it runs: `Progress`, a one-line display of the cell, round, loss, accuracy and the time
left, on stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tadlora.sim.config import Cell
from tadlora.sim.rounds import RoundRecord


class Progress:
    """A one-line progress display on a terminal, plain lines otherwise (stderr, never stdout): off a terminal, a
    line when a cell starts, after its first round here and at each evaluation.

    Each line ends with the time since the start and an estimate of the time left in the current cell, from the
    rounds this process has run of it (a resumed cell's earlier rounds do not count)."""

    def __init__(
        self, total_cells: int, stream: Any = None, quiet: bool = False, clock: Callable[[], float] = time.monotonic
    ):
        self.total, self.stream, self.quiet, self.clock = total_cells, stream or sys.stderr, quiet, clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = clock()
        self._cell_begun, self._cell_first_round = self.started, -1  # the current cell: when, from which round

    def begin(self, index: int, cell: Cell, resuming: bool = False) -> None:
        """Cell ``index`` starts (or, ``resuming``, goes on from its checkpoint) now: said on a line of its own, since
        off a terminal the next line comes only with the cell's first evaluation (minutes of silence otherwise)."""
        self._cell_begun, self._cell_first_round = self.clock(), -1
        if not self.quiet:
            what = "resuming from its checkpoint" if resuming else "starting"
            line = f"[{index + 1}/{self.total}] {self._name(cell)}: {what}"
            self.stream.write(("\r\x1b[2K" + line) if self.tty else line + "\n")
            self.stream.flush()

    def rounds_start(self) -> None:
        """The current cell's rounds start now, its model, data and checkpoint loaded: the estimate of the time left
        counts from here, since the loading, however long, is not a round's time (on a cell's first round it made the
        estimate the loading's time times the rounds left)."""
        self._cell_begun = self.clock()

    @staticmethod
    def _name(cell: Cell) -> str:
        return f"{cell.method} {cell.topology} p={cell.link_prob:g} T={cell.switch_interval or '-'} seed={cell.seed}"

    def update(self, index: int, cell: Cell, t: int, rounds: int, record: RoundRecord) -> None:
        """Round ``t`` of cell ``index`` is done (``record``: its numbers)."""
        now = self.clock()
        if self._cell_first_round < 0:
            self._cell_first_round = t
        # Off a terminal: a line per evaluation, and one after the first round run here, with the first estimate of
        # the time left (else minutes to an hour of silence until the first evaluation).
        if self.quiet or not (self.tty or "acc_mean" in record or t == self._cell_first_round):
            return
        left = (now - self._cell_begun) / (t + 1 - self._cell_first_round) * (rounds - t - 1)
        acc = f" acc {record['acc_mean']:.3f}±{record['acc_std']:.3f}" if "acc_mean" in record else ""
        line = (
            f"[{index + 1}/{self.total}] {self._name(cell)} round {t + 1}/{rounds} "
            f"loss {record['train_loss']:.3f}{acc} ({now - self.started:.0f}s, cell done in ~{_duration(left)})"
        )
        self.stream.write(("\r\x1b[2K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def done(self, message: str) -> None:
        if not self.quiet:
            self.stream.write(("\r\x1b[2K" if self.tty else "") + message + "\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    """``42s``, ``17m`` or ``2h05m``: the precision an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
