"""Atomic file writes: a reader (or a restart after a crash) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard


def _umask() -> int:
    """The process's umask, read from /proc without setting it (Linux): `os.umask` can only be read by changing it,
    and a file another thread created meanwhile would get the temporary one. Elsewhere that is the fallback, with
    the most restrictive temporary mask, so that such a file is at worst private."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o777)
    os.umask(mask)
    return mask


def _plain_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def give_plain_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have (`_plain_mode`): for a file that a library
    wrote through a private temp file of its own (safetensors' writer leaves 0600)."""
    os.chmod(path, _plain_mode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same directory, fsync it, rename it over ``path``, fsync the dir. The
    file gets the mode a plain ``open(path, "w")`` would give it (0666 less the umask), not mkstemp's 0600: a
    node's node.json, checkpoints and a simulator's results are read by other users as any of its files are."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    with naming(target):
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _plain_mode())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError of the block that names no file (`_names_no_file`) as the same error naming ``path``."""
    try:
        yield
    except OSError as exc:
        if _names_no_file(exc):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _names_no_file(exc: BaseException) -> TypeGuard[OSError]:
    """An OSError with an errno and no file name, as write(2) and fsync(2) fail (ENOSPC, EDQUOT, EIO): raised
    again as the same error (same errno, so the same subclass) naming the file, which is what a person has to go
    on ("[Errno 28] No space left on device" alone says neither which file nor which file system)."""
    return isinstance(exc, OSError) and exc.filename is None and exc.errno is not None


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error ends its text


def os_error_of(exc: Exception, path: str | Path) -> OSError | None:
    """The OSError that a library in Rust (safetensors' file writer) hit, as a Python OSError naming ``path``, or
    None if ``exc`` says of none: such a library raises its own exception type, which callers that catch a full
    or read-only disk as an OSError miss, with the error number in its text ("I/O error: No space left on device
    (os error 28) at path .../.tmpXXXXXX", a temp file that is gone by then)."""
    found = _RUST_OS_ERROR.search(str(exc))
    if found is None:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), str(path))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_bytes` of ``obj`` as indented, standard JSON: NaN and ±inf (which json.dumps would write as
    NaN and Infinity, which strict parsers refuse) are written as null."""
    atomic_write_bytes(path, (json.dumps(_non_finite_to_none(obj), indent=1, allow_nan=False) + "\n").encode())


def _non_finite_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _non_finite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_non_finite_to_none(v) for v in obj]
    return obj
