"""Shared by the benchmark scripts: the machine description and the results files (JSON + a Markdown table)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tadlora.cliutil import out_not_a_directory

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and load: enough to tell two runs' machines apart."""
    import grpc
    import torch

    from tadlora.training import cpuinfo_field

    mem_gib = None
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu_model": cpuinfo_field("model name") or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "load_average_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def command() -> str:
    """The command that produced the results, as one would type it from the repository root."""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join([".venv/bin/python", script, *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            # 999.5 and up round to 4 digits: ".3g" would write them as "1e+03"
            return f"{v:.3g}" if abs(v) < 999.5 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def out_dir(text: str) -> Path:
    """An argparse type for ``--out``, checked when the flag is read, not when the results are written at the end
    of a run (minutes later; a file in the way made the mkdir fail with a traceback, and an empty value wrote the
    results into the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: leave --out out for its default")
    out = Path(text)
    if problem := out_not_a_directory(out):
        raise argparse.ArgumentTypeError(problem.removeprefix(f"--out {out}: "))
    return out


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where `write_results` writes (default: benchmarks/results, the committed results)."""
    parser.add_argument(
        "--out",
        type=out_dir,
        default=RESULTS,
        help="directory for NAME.json and NAME.md (default: benchmarks/results, which holds the committed results: "
        "give another one for trial runs)",
    )


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--local-steps``, ``--batch-size`` or ``--max-length`` that `tadlora.training.TrainSpec` would refuse,
    as a usage error (exit 2) before anything runs. Its bounds, restated: importing it imports torch, which
    sim_throughput's parent process must not (its subprocesses' peak RSS starts from the parent's)."""
    for flag, value, least in (("--local-steps", args.local_steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--max-length", args.max_length, 8)):  # fmt: skip
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")


WRITTEN: list[Path] = []  # what write_results wrote in this process, for run_main's word on an interrupted run


def run_main(main: Callable[[], object]) -> int:
    """A script's ``main()`` and its exit status: 0, or 130 after a Ctrl-C, said in one line (which results, if
    any, were written) instead of a KeyboardInterrupt traceback through asyncio's or a thread pool's frames."""
    try:
        main()
    except KeyboardInterrupt:
        done = f"{', '.join(map(str, WRITTEN))} written" if WRITTEN else "no results written"
        sys.stderr.write(f"\n{Path(sys.argv[0]).name}: interrupted; {done}\n")
        return 130
    return 0


def write_results(
    name: str,
    data: dict[str, Any],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    notes: str = "",
    out: Path = RESULTS,
) -> None:
    """OUT/NAME.json (data + machine + command) and OUT/NAME.md (the table and the notes); OUT defaults to
    benchmarks/results."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **data}  # fmt: skip
    m = doc["machine"]
    text = (
        f"# {name}\n\n`{doc['command']}`\n\n"
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
        f"grpcio {m['grpcio']}, load average {m['load_average_1_5_15'][0]:.2f} at the end.\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + (f"\n{notes}\n" if notes else "")
    )
    # Both texts are made before either file is written: a run interrupted in between would leave one run's JSON
    # beside another's table.
    for path, content in ((out / f"{name}.json", json.dumps(doc, indent=2) + "\n"), (out / f"{name}.md", text)):
        path.write_text(content, encoding="utf-8")
        WRITTEN.append(path)
    print(text)


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` where it is a GPU, so that a clock read next counts it (torch is
    imported here, not at the top: sim_throughput's parent process must not load it)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
