"""A node much slower than its peers, and a node that freezes and thaws (a laptop suspended, `docker pause`,
SIGSTOP, a long stall on swap or I/O).

In one process first: a node whose local steps outlast --exchange-timeout. Then real `python -m
tadlora.node.entry` processes (see nodeproc): the tiny model, static peers on 127.0.0.1, one of them stopped with
SIGSTOP and continued with SIGCONT, or made slow with more --local-steps (a per-node setting).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from tadlora.core.factors import Factors
from tadlora.training import OptimizerState
from test_daemon import _rounds, cluster

SLOW_WARNING = "this node is too slow for the cluster"

# ------------------------------------------------------------------------------------------ in one process


@pytest.mark.asyncio
async def test_a_node_whose_local_steps_outlast_the_exchange_timeout_says_so_and_names_the_flags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """node-1's steps take longer than node-0 waits for its answer (--exchange-timeout): node-0 cuts each exchange
    at its deadline, and the two never mix. Both logs said only that exchanges timed out or were cut, which reads
    as a slow link; the slow node must say that its own steps are the cause, and which flags to change, once."""
    timeout_s, steps_s = 0.5, 1.0
    async with cluster(tmp_path, 2, rounds=3, exchange_timeout=timeout_s) as (fast, slow):
        steps = slow._train

        def slow_steps(t: int) -> tuple[float, Factors, OptimizerState]:
            time.sleep(steps_s)  # in the worker thread, as a slower machine's local steps
            return steps(t)

        slow._train = slow_steps  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="tadlora.node"):
            async with asyncio.timeout(90):
                await asyncio.gather(fast.run(), slow.run())
    assert all(r["neighbours"] == [] for r in _rounds(tmp_path / "n0") + _rounds(tmp_path / "n1"))
    said = [r.getMessage() for r in caplog.records if SLOW_WARNING in r.getMessage()]
    assert len(said) == 1, said  # the slow node, once (two rounds in a row); not the fast one
    assert "--local-steps" in said[0] and "--exchange-timeout" in said[0]
