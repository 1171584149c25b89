"""Command-line helpers shared by `tadlora-node` and `tadlora-sim`: every flag is also an environment variable."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tadlora import __version__

ENV_PREFIX = "TADLORA_"
_ON = ("1", "true", "yes", "on")  # what a switch's variable may say, in any case; anything else is refused
_OFF = ("0", "false", "no", "off", "")


VERSION_HELP = "print tadlora's release and those of Python and the libraries it runs on (for a bug report), and exit"
# What a bug report needs beside tadlora's own version: the libraries that build the model and carry the exchange.
_REPORTED = ("torch", "transformers", "peft", "safetensors", "grpcio", "zeroconf")


_interrupted = False  # a Ctrl-C came while `interrupts_kept` was on (`raise_if_interrupted`)


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on (an escape sequence, a line break, a carriage return)
    written as its Python escape (``\\x1b``, ``\\n``): for text shown on a terminal that a peer chose (a refusal's
    detail, a status reply), which could otherwise clear the screen or forge a line of its own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Within the block, a Ctrl-C (SIGINT) is a KeyboardInterrupt that is not lost. Python drops an exception raised
    where it cannot propagate: in a finalizer (``__del__``) the garbage collector runs, and in the init of some
    compiled modules (numpy.random's swallows it). A Ctrl-C landing there was lost, and a run went on to its end.
    The handler raises it and remembers it; `raise_if_interrupted` raises it again where it propagates (the
    simulator calls it after each round). The previous handler is back after the block. In the main thread only,
    where signal handlers run; elsewhere the block changes nothing."""
    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    _interrupted = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came within `interrupts_kept` (it may have been dropped where it landed)."""
    if _interrupted:
        raise KeyboardInterrupt


def releases() -> dict[str, str]:
    """This package's release, Python's, and the installed release of each library that builds the model or carries
    the exchange ("not installed" for one that is not). Read from the packages' metadata: nothing is imported (torch
    takes seconds)."""
    import platform
    from importlib import metadata

    found = {"tadlora": __version__, "python": platform.python_version()}
    for dist in _REPORTED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def version_text(prog: str) -> str:
    """``--version``'s line: `releases`, for a bug report."""
    found = releases()
    libraries = ", ".join(f"{dist} {found[dist]}" for dist in _REPORTED)
    return f"{prog} {found['tadlora']} (Python {found['python']}; {libraries})"


def env_name(dest: str) -> str:
    """The environment variable that sets a flag: ``--link-prob`` → ``TADLORA_LINK_PROB``."""
    return ENV_PREFIX + dest.upper()


_LINE_ONLY = "tadlora_command_line_only"


def command_line_only(action: argparse.Action) -> argparse.Action:
    """Mark an option that `apply_env_defaults` gives no ``TADLORA_`` variable: one that changes what a command
    does, not how it connects, which a variable set for a node's container or unit must not turn on for every
    command run there (`status --all` in a HEALTHCHECK would report the whole cluster's health as the node's)."""
    setattr(action, _LINE_ONLY, True)
    return action


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Let ``TADLORA_<FLAG>`` set each option's default (a flag given on the command line still wins), and
    say so in ``--help``, with the default (unless the help already names it). Boolean flags accept
    1/true/yes/on and 0/false/no/off (or empty). A value the flag would refuse (its type or its ``choices``, or
    another word for a switch) is refused the same way, by ``parser.error`` (exit 2). An option marked with
    `command_line_only` takes no variable."""
    env = os.environ if environ is None else environ
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version") or getattr(action, _LINE_ONLY, False):
            continue
        name = env_name(action.dest)
        if name in env:
            _default_from_env(parser, action, name, env[name])
        shown = _shown_default(action.default)
        default = f" (default: {shown})" if shown and "default" not in (action.help or "") else ""
        action.help = f"{action.help or ''}{default} [env: {name}]".strip()


def _shown_default(value: Any) -> str:
    """A default as ``--help`` shows it ('' for none), escaped for argparse's %-formatting of help texts."""
    if value is None or value is False or value == argparse.SUPPRESS:
        return ""
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    return str(value).replace("%", "%%")


def _default_from_env(parser: argparse.ArgumentParser, action: argparse.Action, name: str, raw: str) -> None:
    """Set ``action``'s default from the environment variable ``name`` (value ``raw``), or exit 2 naming the flag
    as argparse does for a command-line value (``argument --rounds: TADLORA_ROUNDS='x': ...``): the variable alone
    does not say which flag of ``--help`` it is."""
    where = f"argument {'/'.join(action.option_strings)}: {name}={raw!r}"
    if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
        word = raw.strip().lower()
        if word not in _ON + _OFF:
            # Read as off, TADLORA_REPORT_ONLY=y would start a whole grid and TADLORA_INSECURE=y refuse to start.
            parser.error(f"{where}: expected {'/'.join(_ON)} or {'/'.join(_OFF[:-1])} (or empty)")
        action.default = word in _ON
    elif action.type is not None and callable(action.type):
        try:
            action.default = action.type(raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{where}: {exc}")
    else:
        action.default = raw
    # argparse checks choices only for values given on the command line, never for a default.
    if action.choices is not None and action.default not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{where}: invalid choice (choose from {choices})")
    action.required = False


def from_environment(parser: argparse.ArgumentParser, args: argparse.Namespace, message: str) -> str:
    """A line to add to an error ``message`` about parsed ``args``, naming the flags it mentions that took their
    value from a ``TADLORA_`` variable (``(--link-prob is TADLORA_LINK_PROB='2')``), or '' for none: in a container
    the flag an error names is on no command line. A variable is named only while the value is still the one it
    set (a flag given on the command line wins)."""
    notes = []
    for action in parser._actions:
        name = env_name(action.dest)
        value = getattr(args, action.dest, None)
        # `is` first: a NaN the variable set is not == itself, yet it is still the variable's.
        if (
            not action.option_strings
            or name not in os.environ
            or (value is not action.default and value != action.default)
        ):
            continue
        if any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message) for flag in action.option_strings):
            notes.append(f"{action.option_strings[0]} is {name}={os.environ[name]!r}")
    return f"\n  ({'; '.join(notes)})" if notes else ""


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for comma-separated lists of ``kind``."""

    def parse(text: str) -> tuple[Any, ...]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return tuple(kind(x) for x in items)

    parse.__name__ = f"list of {getattr(kind, '__name__', 'values')}"
    return parse


def path_arg(text: str) -> Path:
    """An argparse type for a file or directory: an empty value is refused, not read as the working directory
    (``TADLORA_OUT=`` from a template left blank would otherwise write the run wherever the process started)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (leave the variable unset for the default)")
    return Path(text)


def int_or_auto(text: str) -> int | str:
    """An int, or the word ``auto``."""
    return "auto" if text == "auto" else int(text)


def join(items: Sequence[str]) -> str:
    """Comma-joined, for help texts."""
    return ", ".join(items)


def error_text(exc: BaseException, memory_hint: str) -> str:
    """What a CLI prints for a run that failed with ``exc``: its message, and for a GPU out of memory (torch's
    `OutOfMemoryError`, told by name so that this module does not import torch) ``memory_hint``, the flags that
    shrink what a step holds."""
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError":
        text = f"{text.rstrip()}\n  the GPU ran out of memory: {memory_hint}"
    return text


def out_not_a_directory(out: Path) -> str | None:
    """Why an --out ``out`` cannot be made a directory, when a file is in the way (it, or one above it); else None.
    The mkdir would say only "File exists" or "Not a directory" (the node's after torch loaded, and exit 1 to be
    retried; the simulator's naming a path inside --out)."""
    with contextlib.suppress(OSError):  # a path this user cannot look at: the mkdir itself then says why
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            return f"--out {out}: {existing} is a file, not a directory: choose another --out"
    return None
