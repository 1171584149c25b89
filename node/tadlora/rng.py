"""Torch's global RNG, seeded for a block of work and restored after it, one block at a time per process.

Dropout and Hugging Face's weight initialization draw from torch's global RNG, which every thread of a process
shares. Two blocks that each seed it must not overlap: a model being built in one thread (its head seeded from
the run seed, so every node builds the same model) would otherwise draw from the seed that local steps in
another thread just set. Daemons run one node per process, but tests and examples run several in one, each
with its own torch worker thread; the lock makes those blocks take turns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Inside the block torch's global RNG (CPU, and ``device``'s if CUDA) starts from ``seed``; after it the
    RNG is where it was before. Blocks of the process run one at a time (they hold a lock)."""
    devices = [device] if device.type == "cuda" else []
    with _LOCK, torch.random.fork_rng(devices=devices, device_type=device.type):
        # Only the generators fork_rng restores: torch.manual_seed would reseed every GPU and leave the others so
        # (fork_rng has initialised CUDA, so the device's seed is set now, not queued for a later init).
        torch.default_generator.manual_seed(seed)
        for gpu in devices:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield
