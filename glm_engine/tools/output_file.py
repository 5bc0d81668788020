"""The files the tools write (--output_csv, --output_json, --plot): checked before any
work, so a bad path costs nothing; a regular file (or a new path) is written to a
temporary file beside it and renamed over it, so no reader sees half a file; a
character device or FIFO (/dev/null, a pipe, /dev/stdout) is written straight,
never replaced. New files get the umask's mode, replaced ones keep theirs."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from glm_engine import GlmEngineError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _written_in_place(path: Path, mode: int | None) -> bool:
    """Devices and FIFOs, and any path under /dev or /proc (/dev/stdout names this
    process's descriptor, whatever file the shell opened behind it)."""
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return True
    return mode is not None and Path(os.path.abspath(path)).parts[1:2] in (("dev",), ("proc",))


def check_output_file(path: str | Path, flag: str) -> None:
    """Raises GlmEngineError unless `path` can be written as an output file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise GlmEngineError(f"{flag} {path}: {error.strerror}") from None
    if mode is None:
        parent = path.resolve().parent
        if not parent.is_dir():
            raise GlmEngineError(f"{flag} {path}: directory {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise GlmEngineError(f"{flag} {path}: directory {parent} is not writable")
    elif stat.S_ISDIR(mode):
        raise GlmEngineError(f"{flag} {path} is a directory; give the path of a file")
    elif _written_in_place(path, mode):
        if not os.access(path, os.W_OK):
            raise GlmEngineError(f"{flag} {path} is not writable")
    elif not stat.S_ISREG(mode):
        raise GlmEngineError(f"{flag} {path} is not a regular file, character device or FIFO")
    elif not os.access(path.resolve().parent, os.W_OK | os.X_OK):
        raise GlmEngineError(f"{flag} {path}: its directory is not writable, so the file cannot be replaced")


@contextmanager
def output_stream(path: str | Path, flag: str, binary: bool = False) -> Iterator[IO]:
    """A stream whose content becomes `path` when the block ends without an error."""
    check_output_file(path, flag)
    path = Path(path)
    mode = os.stat(path).st_mode if path.exists() else None
    open_mode = "wb" if binary else "w"
    text = {} if binary else {"encoding": "utf-8", "newline": ""}
    if _written_in_place(path, mode):
        with open(path, open_mode, **text) as stream:
            yield stream
        return
    target = path.resolve()
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, open_mode, **text) as stream:
            yield stream
        os.chmod(temporary, stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
