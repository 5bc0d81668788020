"""Where build.py puts an engine directory, safely.

- An existing --output_dir is replaced only when it is empty or is an engine that this
  project wrote (the marker in its config.json) holding no file the engine does not
  list; never when it is, holds or lies inside a directory the build reads from.
- An engine is written into a hidden staging directory beside --output_dir and renamed
  into place; the builder holds a lock on its staging directory, so any staging
  directory whose lock is free belongs to a build that died, and is removed.
- The swap (old engine aside, new one in, old one removed) runs under a per-directory
  lock, so concurrent builds of one --output_dir take turns instead of failing each
  other; a build killed between the two renames leaves the complete old engine hidden
  beside it, which the next build restores first and loading names.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glm_engine import GlmEngineError

logger = logging.getLogger("engine")

ENGINE_MARKER = "glm_engine"  # config.json's "format" in every engine this project writes
CONFIG_NAME = "config.json"
# The kernels compiled for the engine at build (kernel_cache.py): their list, and Triton's files.
KERNELS_MANIFEST = "kernels.json"
KERNELS_DIR = "kernels"


def _hidden(output_dir: Path, kind: str) -> str:
    return f".{output_dir.name}.{kind}-"


def engine_files(directory: Path) -> set[str] | None:
    """The files of the engine this project wrote at `directory` (config.json, weights,
    tokenizer files, compiled kernels), or None when `directory` holds no such engine."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    # Version 1 engines predate the marker; they are recognized by what built them.
    built_with = config.get("built_with")
    ours = config.get("format") == ENGINE_MARKER or (
        config.get("format_version") == 1 and isinstance(built_with, dict) and "glm_engine" in built_with)
    checksums, tokenizer_files = config.get("checksums"), config.get("tokenizer_files", [])
    if not ours or not isinstance(checksums, dict) or not isinstance(tokenizer_files, list):
        return None
    kernels = {KERNELS_MANIFEST, KERNELS_DIR} if (directory / KERNELS_MANIFEST).is_file() else set()
    return {CONFIG_NAME, *map(str, checksums), *map(str, tokenizer_files), *kernels}


def _overlaps(first: Path, second: Path) -> bool:
    return first == second or first.is_relative_to(second) or second.is_relative_to(first)


def check_output_dir(output_dir: Path, sources: dict[str, Path]) -> None:
    """Raises GlmEngineError unless an engine may be written at `output_dir`: a new
    path under a writable directory, an empty directory, or an engine this project
    wrote; never one that is, holds or lies inside a `sources` directory
    (flag -> directory the build reads)."""
    target = output_dir.resolve()
    for flag, source in sources.items():
        if _overlaps(target, source.resolve()):
            raise GlmEngineError(f"--output_dir {output_dir} is, holds or lies inside {flag} {source}; "
                                 "write the engine to a directory of its own")
    if not target.exists():
        ancestor = next(parent for parent in target.parents if parent.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise GlmEngineError(f"--output_dir {output_dir} cannot be created ({ancestor} is not a writable "
                                 "directory); choose another --output_dir")
        return
    if not target.is_dir():
        raise GlmEngineError(f"--output_dir {output_dir} exists and is not a directory; choose another "
                             "--output_dir")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise GlmEngineError(f"--output_dir {output_dir}: its directory {target.parent} is not writable")
    present = set(os.listdir(target))
    if not present:
        return
    ours = engine_files(target)
    if ours is None:
        raise GlmEngineError(f"--output_dir {output_dir} exists and is not an engine that build.py wrote; "
                             "build.py replaces only its own engines: choose another --output_dir or empty it")
    extra = sorted(present - ours) or [f"{KERNELS_DIR}/{name}" for name in _unlisted_kernel_files(target)]
    if extra:
        raise GlmEngineError(f"--output_dir {output_dir} holds {extra[0]!r}, which build.py did not write; "
                             "move it out, or choose another --output_dir")


def _unlisted_kernel_files(engine_dir: Path) -> list[str]:
    """Files under the engine's kernels/ that its kernels.json does not list."""
    kernels = engine_dir / KERNELS_DIR
    if not kernels.is_dir():
        return []
    try:
        listed = set(json.loads((engine_dir / KERNELS_MANIFEST).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return sorted(str(path.relative_to(kernels)) for path in kernels.rglob("*")
                  if not path.is_dir() and str(path.relative_to(kernels)) not in listed)


def _try_lock(fd: int) -> bool:
    """Takes an exclusive lock on `fd` if free; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def build_lock(output_dir: Path) -> Iterator[None]:
    """One build at a time swaps engines at `output_dir`; others wait their turn. The
    lock file is removed on release; a waiter that locked a removed file tries again."""
    path = output_dir.with_name(f".{output_dir.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            logger.info("waiting for another build of %s to finish", output_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def staging_dir(output_dir: Path) -> Iterator[Path]:
    """A new hidden directory beside `output_dir`, locked while the build lives (a
    killed build's lock is freed by the kernel); removed on exit unless renamed away."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=_hidden(output_dir, "building"), dir=output_dir.parent))
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def clean_stale_staging(output_dir: Path) -> None:
    """Removes the staging directories of builds of `output_dir` that died."""
    for path in output_dir.parent.glob(_hidden(output_dir, "building") + "*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    logger.info("removed %s, left by an interrupted build", path)
        finally:
            os.close(fd)


def hidden_old_engines(output_dir: Path) -> list[Path]:
    """Engines set aside by a build that was killed before removing them."""
    return sorted(path for path in output_dir.parent.glob(_hidden(output_dir, "old") + "*")
                  if engine_files(path) is not None)


def _restore_or_clean_old(output_dir: Path) -> None:
    """Under the build lock: a killed swap's old engine goes back in place when none is
    there, and is removed when the new engine made it in."""
    for old in hidden_old_engines(output_dir):
        if not output_dir.exists():
            old.rename(output_dir)
            logger.info("restored the engine an interrupted build left at %s", old)
        else:
            shutil.rmtree(old, ignore_errors=True)


def move_into_place(staging: Path, output_dir: Path, sources: dict[str, Path]) -> None:
    """Renames the finished `staging` directory onto `output_dir`, replacing what
    check_output_dir allows (checked again under the lock)."""
    with build_lock(output_dir):
        _restore_or_clean_old(output_dir)
        check_output_dir(output_dir, sources)
        old = None
        if output_dir.exists() and any(output_dir.iterdir()):
            old = output_dir.with_name(f"{_hidden(output_dir, 'old')}{os.getpid()}")
            output_dir.rename(old)
        staging.rename(output_dir)  # an empty directory is replaced by the rename itself
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_build(output_dir: Path) -> None:
    """Before a build: clean what killed builds left and put a set-aside engine back,
    so that the old engine stays usable if this build fails."""
    if not output_dir.parent.is_dir():
        return
    clean_stale_staging(output_dir)
    if hidden_old_engines(output_dir):
        with build_lock(output_dir):
            _restore_or_clean_old(output_dir)
