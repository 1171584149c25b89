"""Entry point of `tadlora-node`: dispatches a subcommand before anything heavy is imported.

`status` and `certs` (`tadlora.node.admin`) start in a fraction of a second; `doctor` and a run import torch,
peft and transformers (`tadlora.node.doctor`, `tadlora.node.cli`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn


def script() -> NoReturn:
    """The installed `tadlora-node` (and ``python -m tadlora.node.entry``): `main`, then the process ends at once.

    Once a run has returned, its checkpoint, export and goodbyes are done and every resource is closed; what the
    interpreter's own exit still did was tear down torch, transformers and gRPC, object by object: 1 s on an idle
    machine and 2.5 to 4.6 s on a busy one, after the node's last line, between a SIGTERM and the end that Docker,
    systemd and Kubernetes time (a stop is otherwise under a second). So the streams are flushed and the process
    exits without that teardown, unless a thread other than this one is still running (none is after a run): then
    it is waited for, as usual, so that nothing it does is cut short."""
    code = main()
    if any(t is not threading.current_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`), a closed stream
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run `tadlora-node` with ``argv`` (default: the process's arguments); its exit code (128 + SIGINT for a
    Ctrl-C that no handler of a running node took)."""
    args = sys.argv[1:] if argv is None else argv
    # Before gRPC's core starts: it writes its own INFO lines to stderr (a TLS handshake that failed, at each try),
    # in its own format between the node's JSON lines, repeating what the node logs of it. A user's setting wins
    # (GRPC_VERBOSITY=debug to see them).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        # The installed script calls main() itself: without this, a Ctrl-C while a run still imports torch (before
        # its own handlers are in), or during `status`, `doctor` or a passphrase prompt, ends in a traceback.
        sys.stderr.write("tadlora-node: interrupted\n")
        return 128 + signal.SIGINT


def _dispatch(args: list[str]) -> int:
    command, rest = (args[0], args[1:]) if args else ("", [])
    if args == ["--version"]:  # what the run's parser says too, without its imports
        from tadlora.cliutil import version_text

        sys.stdout.write(version_text("tadlora-node") + "\n")
        return 0
    if command == "status":
        from tadlora.node.admin import status_main

        return status_main(rest)
    if command == "certs":
        from tadlora.node.admin import certs_main

        return certs_main(rest)
    if command == "doctor":
        from tadlora.node.doctor import doctor_main

        return doctor_main(rest)
    from tadlora.node.cli import run_main

    return run_main(args)


if __name__ == "__main__":  # pragma: no cover
    script()
