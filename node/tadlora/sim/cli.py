"""`tadlora-sim`: run the paper's experiments in one process.

Examples:
  tadlora-sim --preset smoke --out runs/smoke
  tadlora-sim --preset cpu-sst2 --out runs/sst2 --seeds 0 --link-probs 0.02
  tadlora-sim --config my.json --out runs/mine          # JSON object of SimConfig overrides
A run writes DIR/results.json, DIR/cells/*.json (one per finished cell) and PNG plots. Running the same
command again resumes: finished cells are kept and an unfinished one continues from its last checkpoint.
A computation runs once: a cell whose policy equals a finished one's under another name (adf is tad with T=5;
tad-nojoint with T=1 is rolora) is copied from it, with "same_as" naming the source.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tadlora.adapter import INITS
from tadlora.cliutil import (
    VERSION_HELP,
    apply_env_defaults,
    csv_list,
    error_text,
    from_environment,
    int_or_auto,
    interrupts_kept,
    join,
    out_not_a_directory,
    path_arg,
    version_text,
)
from tadlora.core.methods import method_names, takes_switch_interval
from tadlora.sim.config import ENGINES, PRESET_CAVEATS, PRESETS, SimConfig, config_from_json, override, preset
from tadlora.training import OPTIMIZER_STATES, OPTIMIZERS, PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (documented in --help)."""
    parser = argparse.ArgumentParser(
        prog="tadlora-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_text("tadlora-sim"), help=VERSION_HELP)
    caveats = "".join(f"; {name} is {note}" for name, note in sorted(PRESET_CAVEATS.items()))
    base = SimConfig()
    parser.add_argument(
        "--preset",
        help=f"start from a named preset: {join(sorted(PRESETS))}{caveats}. Without one the run starts from the "
        f"defaults: {base.model} on {base.dataset}, {base.num_clients} clients, {base.rounds} rounds, "
        f"methods {join(base.methods)}, p = {join([str(p) for p in base.link_probs])}, "
        f"seed {join([str(s) for s in base.seeds])}",
    )
    parser.add_argument("--config", type=path_arg, help="JSON file of SimConfig settings applied on top of the preset")
    parser.add_argument("--out", type=path_arg, required=True, help="output directory (created; resumed if it exists)")

    def default(value: object) -> str:  # a setting's default: --config's value, else the preset's, else SimConfig's
        return f"; default: --config's, else the preset's, else {value}"

    parser.add_argument(
        "--methods", type=csv_list(str), help=f"comma list of: {join(method_names())}{default('all of them')}"
    )
    parser.add_argument(
        "--link-probs",
        type=csv_list(float),
        help="comma list of per-round link probabilities p, each in (0, 1]: every link of the base graph is up in a "
        f"round with probability p{default(join([f'{p:g}' for p in base.link_probs]))}",
    )
    parser.add_argument(
        "--switch-intervals",
        type=csv_list(int_or_auto),
        help="comma list of T (ints or auto: TAD-LoRA's topology-aware T) run by the methods in sweep_methods "
        f"({join(base.sweep_methods)} unless --config sets it); adf keeps its own T (5)"
        f"{default(join([str(t) for t in base.switch_intervals]))}",
    )
    parser.add_argument(
        "--topologies",
        type=topology_list,
        help="comma list of base graphs: complete (alias er: with p < 1, an Erdos-Renyi graph each round), ring, "
        "overlay:K, edges:0-1,1-2,... (its pairs are its own), file:PATH (one 'i j' pair per line, nodes 0..m-1)"
        f"{default(join(base.topologies))}",
    )
    parser.add_argument(
        "--seeds",
        type=csv_list(int),
        help=f"comma list of run seeds (ints >= 0){default(join([str(s) for s in base.seeds]))}",
    )
    parser.add_argument("--rounds", type=int, help=f"communication rounds per cell{default(base.rounds)}")
    parser.add_argument("--num-clients", type=int, help=f"number of simulated clients m{default(base.num_clients)}")
    parser.add_argument("--model", help=f"minilm (offline), tiny, a HF model id or a local path{default(base.model)}")
    parser.add_argument(
        "--dataset",
        help="builtin:sst2-small, glue:SST-2|MNLI|QNLI|RTE, a .tsv/.csv/.jsonl path, or hub:NAME"
        + default(base.dataset),
    )
    pinned = ", ".join(f"{name} {p.engine}" for name, p in sorted(PRESETS.items()) if p.engine != base.engine)
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help=f"auto (batched on CUDA, sequential on CPU), batched, or sequential; default {base.engine}, or the "
        f"preset's ({pinned})",
    )
    parser.add_argument("--device", help=f"auto, cpu, cuda or cuda:N{default(base.device)}")
    parser.add_argument(
        "--init",
        choices=INITS,
        help="how A and the classification head are drawn: portable (default; the same bits on every CPU, as the "
        "daemon draws them) or torch (torch's uniform_/normal_, whose bits depend on the CPU's vector instructions; "
        "what runs made before 'portable' existed used, cpu-sst2 among them)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="matmul precision: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 (also on the CPU: faster where "
        f"it has AVX512-BF16 or AMX, ~11x slower where it has not), fp32{default(base.train.precision)}",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="local optimizer: adamw (the paper's) or sgd (plain; set its lr in --config, "
        'e.g. {"train": {"optimizer": "sgd", "lr": 10}}: LoRA gradients are small)' + default(base.train.optimizer),
    )
    parser.add_argument(
        "--optimizer-state",
        choices=OPTIMIZER_STATES,
        help="AdamW's moments: fresh every round, or persistent: each client keeps its own across "
        f"rounds (never mixed; carried by the checkpoints; not with decaf){default(base.train.optimizer_state)}",
    )
    parser.add_argument(
        "--share-from",
        type=csv_list(Path),
        default=[],
        help="comma list of other run directories of the same settings: a cell whose computation one of them "
        "has finished (the same cell, or an equal policy under another name: adf is tad with T=5) is copied "
        "from there instead of being run",
    )
    parser.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress display")
    parser.add_argument(
        "--report-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run nothing: write results.json and plots of the finished cells",
    )
    apply_env_defaults(parser)
    return parser


_PAIR = re.compile(r"\s*\d+\s*-\s*\d+\s*")


def topology_list(text: str) -> tuple[str, ...]:
    """An argparse type for the comma list of topologies, in which ``edges:0-1,1-2`` is one item: a bare pair
    ``i-j`` after an ``edges:`` item belongs to that item's edge list (no topology spec is a bare pair)."""
    out: list[str] = []
    for item in csv_list(str)(text):
        if out and out[-1].startswith("edges:") and _PAIR.fullmatch(item):
            out[-1] += "," + item
        else:
            out.append(item)
    return tuple(out)


_FLAG_FIELDS = (
    "methods",
    "link_probs",
    "switch_intervals",
    "topologies",
    "seeds",
    "rounds",
    "num_clients",
    "model",
    "dataset",
    "engine",
    "device",
    "init",
)
_TRAIN_FLAG_FIELDS = ("precision", "optimizer", "optimizer_state")  # set under "train"


def _is_stamp_of(config_file: Path, out: Path) -> bool:
    """Whether ``config_file`` is the stamp of the run in ``out`` (``--config OUT/config.json``: go on with it)."""
    stamp = out / "config.json"
    with contextlib.suppress(OSError):
        return stamp.exists() and config_file.samefile(stamp)
    return False


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Preset, then config file, then flags."""
    config = preset(args.preset) if args.preset else SimConfig()
    if args.config is not None:
        try:
            text = args.config.read_text(encoding="utf-8")
            config = config_from_json(text, base=config, stamp=_is_stamp_of(args.config, args.out))
        except ValueError as exc:  # which file: the error names a setting, a line, or a key given twice
            raise ValueError(f"{args.config}: {exc}") from None
    changes: dict[str, Any] = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f) is not None}
    train = {f: getattr(args, f) for f in _TRAIN_FLAG_FIELDS if getattr(args, f) is not None}
    if train:
        changes["train"] = train
    config = override(config, changes) if changes else config
    if args.switch_intervals is not None and not any(
        takes_switch_interval(m) and m in config.sweep_methods for m in config.methods
    ):
        raise ValueError(
            f"--switch-intervals would be ignored: it sets T for the methods in sweep_methods "
            f"({join(config.sweep_methods) or 'none'}), and the methods to run ({join(config.methods)}) "
            "include none of them"
        )
    return config


def _environment_notes(parser: argparse.ArgumentParser, args: argparse.Namespace, message: str) -> str:
    """`from_environment` for a message that names settings (``different settings (rounds, train)``) as well as
    flags: the flags of the settings it names count as named. TADLORA_MODEL, TADLORA_ROUNDS, ... are also the
    node's: set for one in a container, they are on no command line of the simulator's."""
    named = [
        "--" + dest.replace("_", "-")
        for dest in (*_FLAG_FIELDS, *_TRAIN_FLAG_FIELDS)
        if re.search(rf"(?<![\w-]){'train' if dest in _TRAIN_FLAG_FIELDS else dest}(?![\w-])", message)
    ]
    return from_environment(parser, args, " ".join([message, *named]))


# What to try when a run runs out of memory (`error_text` adds it to such an error).
_MEMORY_HINT = (
    "--engine sequential (batched holds every client's batch at once), "
    'or a smaller batch_size or max_length under "train" in --config'
)


def run_grid(
    config: SimConfig,
    out: Path,
    *,
    prog: str = "tadlora-sim",
    quiet: bool = False,
    share_from: list[Path] | None = None,
    report_only: bool = False,
    notes: Callable[[str], str] = lambda text: "",
) -> tuple[int, dict[str, Any] | None]:
    """Run (or report) ``config``'s grid into ``out`` as `tadlora-sim` does, for a script of one's own: ``(0,
    results)``; or, after one line on stderr that starts with ``prog``, ``(2, None)`` for a run it refused or that
    failed (an --out of other settings, a model that does not load, out of memory) and ``(130, None)`` for a
    Ctrl-C, which is never lost wherever it lands (`interrupts_kept`): the same command again resumes. ``notes``
    adds to an error's text (the CLI's: which settings came from the environment)."""
    try:
        from tadlora.sim.runner import Simulator  # torch/transformers import: after the arguments are checked

        with interrupts_kept():  # one Ctrl-C stops the run, wherever it lands
            simulator = Simulator(config, out, quiet=quiet, share_from=share_from or [])
            return 0, simulator.run(report_only=report_only)
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: an --out path that cannot be used
        text = error_text(exc, _MEMORY_HINT)
        said = str(exc)  # a refusal's own remedy, not the memory hint `error_text` may add (another --out: no help)
        if prog != "tadlora-sim" and ("--config" in said or "--engine" in said):  # the remedy names tadlora-sim's
            text += f" (those are tadlora-sim's flags: {prog} takes another --out, or tadlora-sim that directory)"
        sys.stderr.write(f"{prog}: error: {text}{notes(text)}\n")
        return 2, None
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted; run the same command again to resume\n")
        return 130, None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `tadlora-sim`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    every_flag = " ".join(a.option_strings[0] for a in parser._actions if a.option_strings)
    taken = from_environment(parser, args, every_flag).strip()
    if taken:  # they replace a preset's values as flags would: never unseen
        logging.getLogger("tadlora.sim").warning("settings from the environment %s", taken)
    try:
        config = config_from_args(args)
        if problem := out_not_a_directory(args.out):
            raise ValueError(problem)
        if args.preset in PRESET_CAVEATS and not args.report_only:
            logging.getLogger("tadlora.sim").warning("preset %s is %s", args.preset, PRESET_CAVEATS[args.preset])
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: a --config or --out path that cannot be used
        text = error_text(exc, _MEMORY_HINT)
        sys.stderr.write(f"tadlora-sim: error: {text}{_environment_notes(parser, args, text)}\n")
        return 2
    code, results = run_grid(
        config, args.out, quiet=args.quiet, share_from=args.share_from, report_only=args.report_only,
        notes=lambda text: _environment_notes(parser, args, text),
    )  # fmt: skip
    if results is None:
        return code
    for row in results["summary"]:
        t = row["switch_interval"] if row["switch_interval"] is not None else "-"
        if row["acc_mean"] is None:
            continue
        sys.stdout.write(
            f"{row['method']:<12} {row['topology']:<8} p={row['link_prob']:<5g} T={t!s:<3} "
            f"acc {row['acc_mean']:.4f} ± {row['acc_client_std']:.4f} (clients)  ± {row['acc_seed_std']:.4f} "
            f"(seeds, n={row['seeds']})\n"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
