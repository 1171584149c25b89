"""The CUDA path, checked on any machine: which generators a seeded block touches, how a GPU that is not there is
refused, what a GPU without native bf16 is warned about, what a grid keeps in (GPU) memory, what a node leaves
behind when the GPU runs out of memory. torch.cuda is stood in for where the code under test asks it something;
the tests that need a real GPU skip without one."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tadlora import rng
from tadlora.adapter import AdapterModel, resolve_device
from tadlora.node import state
from tadlora.node.hostcheck import check_device, check_precision
from tadlora.node.memory_transport import InMemoryNetwork
from tadlora.sim.runner import Simulator
from tadlora.training import matmul_precision, precision_warning
from test_daemon import NO_PEERS, node_config
from test_daemon_faults import lone_node
from test_sim import smoke_config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class FakeCuda:
    """What `rng.seeded` asks torch.cuda on a machine with GPUs, recorded: which device's generator is read,
    seeded and restored, and whether every GPU is seeded at once."""

    def __init__(self) -> None:
        self.current = 0
        self.seeded: list[tuple[int, int]] = []  # (device, seed)
        self.seeded_all: list[int] = []
        self.restored: list[int] = []

    def index(self, device: Any) -> int:
        index = torch.device(device).index if not isinstance(device, int) else device
        return self.current if index is None else index

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        return torch.tensor([self.index(device)], dtype=torch.uint8)

    def set_rng_state(self, new_state: torch.Tensor, device: Any = "cuda") -> None:
        self.restored.append(self.index(device))

    def manual_seed(self, seed: int) -> None:
        self.seeded.append((self.current, seed))

    def manual_seed_all(self, seed: int) -> None:
        self.seeded_all.append(seed)

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        before, self.current = self.current, self.index(device)
        try:
            yield
        finally:
            self.current = before


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


# ------------------------------------------------------------------------------------------- seeded RNG


def test_a_seeded_block_on_the_cpu_leaves_every_gpu_generator_alone(fake_cuda: FakeCuda) -> None:
    # A model is built in a CPU block: reseeding the GPUs there would move their generators for good (fork_rng
    # restores none of them), against the block's promise that the RNG is where it was before.
    before = torch.get_rng_state()
    with rng.seeded(torch.device("cpu"), 7):
        first = torch.rand(3)
    with rng.seeded(torch.device("cpu"), 7):
        again = torch.rand(3)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), before)
    assert fake_cuda.seeded_all == [] and fake_cuda.seeded == [] and fake_cuda.restored == []


def test_a_seeded_block_on_one_gpu_seeds_and_restores_that_gpu_alone(fake_cuda: FakeCuda) -> None:
    # Dropout on cuda:1 draws from cuda:1's generator: that one is seeded (so the masks are a function of the seed)
    # and restored; the other GPUs' are neither.
    with rng.seeded(torch.device("cuda:1"), 11):
        pass
    assert fake_cuda.seeded == [(1, 11)] and fake_cuda.restored == [1]
    assert fake_cuda.seeded_all == []
    with rng.seeded(torch.device("cuda"), 12):  # no index: the current GPU, as torch places the model
        pass
    assert fake_cuda.seeded[-1] == (0, 12) and fake_cuda.restored[-1] == 0


@CUDA
def test_on_a_gpu_seeded_blocks_draw_the_same_masks_and_put_every_generator_back() -> None:
    gpu = torch.device("cuda", torch.cuda.device_count() - 1)
    states = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    masks = []
    for _ in range(2):
        with rng.seeded(gpu, 3):
            masks.append(torch.nn.functional.dropout(torch.ones(64, device=gpu), p=0.5))
        with rng.seeded(torch.device("cpu"), 4):
            pass
    assert torch.equal(masks[0], masks[1])
    for i, before in enumerate(states):
        assert torch.equal(torch.cuda.get_rng_state(i), before)


# ------------------------------------------------------------------------------------------- device choice


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees one CUDA GPU, cuda:0 (as far as choosing a device asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")


def test_a_gpu_index_past_the_last_is_refused_naming_the_ones_there_are(one_gpu: None) -> None:
    # Otherwise the run starts and dies when the model moves there, on "CUDA error: invalid device ordinal".
    with pytest.raises(RuntimeError, match=r"'cuda:1'.*1 CUDA GPU.*cuda:0\.\.cuda:0"):
        resolve_device("cuda:1")
    for name in ("auto", "cuda", "cuda:0"):
        assert resolve_device(name).type == "cuda"
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda:1", "cuda:7"])
def test_the_doctor_fails_a_device_the_node_would_refuse_and_names_the_gpus(device: str, one_gpu: None) -> None:
    check = check_device(node_config(Path("/nonexistent"), 0, 1, NO_PEERS, device=device))
    assert check.status == "FAIL" and "cuda:0 Fake GPU" in check.detail and "cuda:0..cuda:0" in check.fix
    assert check_device(node_config(Path("/nonexistent"), 0, 1, NO_PEERS, device="cuda:0")).status == "OK"


@pytest.mark.parametrize("device", ["mps", "cuda:x", "tpu", "CPU"])
def test_a_device_string_no_node_runs_on_is_refused_with_the_settings(device: str) -> None:
    """Before the model loads (the node then exits 2, which its systemd unit does not restart), and so in doctor,
    whose settings are the node's."""
    with pytest.raises(ValueError, match=r"--device must be auto, cpu, cuda or cuda:N"):
        node_config(Path("/nonexistent"), 0, 1, NO_PEERS, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("hidden", [None, ""])
def test_a_driver_and_a_cuda_build_with_no_gpu_seen_warns_that_the_node_falls_back_to_the_cpu(
    hidden: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NVIDIA driver is loaded and torch is a CUDA build, yet torch sees no GPU (CUDA_VISIBLE_DEVICES empty, or a
    driver too old for torch's CUDA): --device auto trains on the CPU, hours slower, and doctor used to say OK. (No
    CUDA build or driver here: both are stood in for; the branch for a CPU build already had its WARN.)"""
    from tadlora.node import hostcheck

    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.57.02  Tue Jul 13 16:14:05 UTC 2021\n")
    monkeypatch.setattr(hostcheck, "_NVIDIA_DRIVER", version)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    if hidden is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    check = check_device(node_config(Path("/nonexistent"), 0, 1, NO_PEERS, device="auto"))
    assert check.status == "WARN" and "470.57.02" in check.detail and "training on CPU" in check.detail
    assert ("CUDA_VISIBLE_DEVICES=''" in check.detail) == (hidden == "")
    assert "CUDA 12.8" in check.fix


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(("capability", "warned"), [((7, 2), True), ((7, 5), True), ((8, 0), False), ((8, 7), False)])
def test_bf16_autocast_on_a_gpu_without_native_bf16_is_warned_about(
    capability: tuple[int, int], warned: bool, one_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jetson Xavier (7.2) and T4 (7.5) emulate bf16, slower than fp32; Ampere (8.0) and Jetson Orin (8.7) do not.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda:0")
    for precision in ("auto", "bf16"):
        assert matmul_precision(gpu, precision) == "bf16"  # what is computed does not change, only the warning
        warning = precision_warning(precision, gpu)
        assert (warning is not None) == warned
        if warning is not None:
            assert f"{capability[0]}.{capability[1]}" in warning and "--precision fp32" in warning
    assert precision_warning("fp32", gpu) is None
    check = check_precision(node_config(Path("/nonexistent"), 0, 1, NO_PEERS, device="cuda:0"))
    assert (check.status == "WARN") == warned
    if warned:
        assert check.fix == "--precision fp32"


# ---------------------------------------------------------------------------------------------- memory


def test_a_grid_holds_one_seed_s_model_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seeds are the grid's outermost axis: a seed's model (its copy of the base weights, on the GPU) is of no use
    # once the next seed's cells start, and keeping every one grows the run's memory by a model per seed.
    built: list[weakref.ref[AdapterModel]] = []

    class Tracked(AdapterModel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr("tadlora.sim.runner.AdapterModel", Tracked)
    config = smoke_config(rounds=1, eval_every=1, methods=["lora"], seeds=[0, 1], samples_per_client=8)
    sim = Simulator(config, tmp_path, quiet=True)
    sim.run()
    gc.collect()
    assert len(built) == 2  # one per seed: each built once
    assert built[0]() is None and built[1]() is not None


# ------------------------------------------------------------------------------------------------ OOM


@pytest.mark.asyncio
async def test_a_node_out_of_gpu_memory_in_its_local_steps_exits_with_the_round_s_start_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tadlora.node.daemon as daemon

    real = daemon.local_steps

    def out_of_memory_in_round_1(*args: Any, **kwargs: Any) -> float:
        if args[6] == 1:  # t
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(daemon, "local_steps", out_of_memory_in_round_1)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=3) as node:
        async with asyncio.timeout(60):
            with pytest.raises(torch.OutOfMemoryError):  # a RuntimeError: the CLI says it and exits 1
                await node.run()
        start_of_round_1 = dict(node.factors)
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 1
    for key, value in start_of_round_1.items():
        assert torch.equal(ckpt.factors[key], value)
    assert [r["round"] for r in state.read_rounds(tmp_path / "n0")] == [0]


@pytest.mark.asyncio
async def test_a_node_out_of_gpu_memory_in_its_evaluation_logs_the_round_it_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tadlora.node.daemon as daemon

    def out_of_memory(*args: Any, **kwargs: Any) -> tuple[float, float]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(daemon, "evaluate", out_of_memory)
    async with lone_node(tmp_path, InMemoryNetwork(), rounds=3, eval_every=2) as node:
        async with asyncio.timeout(60):
            with pytest.raises(torch.OutOfMemoryError):
                await node.run()
    # Rounds 0 and 1 have mixed, and the exit saved the start of round 2: a restart goes on from there, so the
    # log must already hold round 1 (without an accuracy: its evaluation did not happen).
    ckpt = state.load_checkpoint(tmp_path / "n0")
    assert ckpt is not None and ckpt.round == 2
    rounds = state.read_rounds(tmp_path / "n0")
    assert [r["round"] for r in rounds] == [0, 1]
    assert "eval_accuracy" not in rounds[1]
