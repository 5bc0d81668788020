"""config.json's record of the engine's other files: `tokenizer_files` (their names)
and `checksums` (per file: its size, its sha256 and the sha256 of each chunk). These
fields steer the loader (what it opens, how it reads), so they are checked like every
other field before any file is read, even under a matching config checksum: a file
name stays inside the engine directory and a chunk is what build.py writes."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from glm_engine import GlmEngineError

# Checksums are kept per chunk too, so that loading verifies chunks in parallel
# threads (hashlib releases the GIL) instead of one sequential pass over 12 GB.
CHECKSUM_CHUNK_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _field_error(config_path: Path, field: str, value: object, want: str) -> GlmEngineError:
    return GlmEngineError(f"{config_path}: {field} is {_shown(value)}, {want}; the engine is damaged: rebuild "
                          "it with build.py")


def check_checksum_entry(config_path: Path, name: str, entry: object) -> None:
    """Raises GlmEngineError naming the field when file `name`'s checksums are not what
    build.py writes: a byte count, sha256 hex digests, one per chunk of the chunk size."""
    field = f"checksums[{name!r}]"
    if not isinstance(entry, dict):
        raise _field_error(config_path, field, entry, "not an object of size, sha256, chunk_bytes, chunk_sha256")
    size, chunk_bytes, chunks = entry.get("size"), entry.get("chunk_bytes"), entry.get("chunk_sha256")
    if not _is_integer(size) or size < 0:
        raise _field_error(config_path, f"{field}.size", size, "not a byte count")
    if not _is_digest(entry.get("sha256")):
        raise _field_error(config_path, f"{field}.sha256", entry.get("sha256"), "not a sha256 hex digest")
    # One size only: it sets how many reads a file takes, and a chunk size that is no count of
    # bytes would skip the check or queue one read per byte.
    if not _is_integer(chunk_bytes) or chunk_bytes != CHECKSUM_CHUNK_BYTES:
        raise _field_error(config_path, f"{field}.chunk_bytes", chunk_bytes,
                           f"but engines are checksummed in chunks of {CHECKSUM_CHUNK_BYTES} bytes")
    count = -(-size // CHECKSUM_CHUNK_BYTES)
    if not isinstance(chunks, list) or len(chunks) != count or not all(map(_is_digest, chunks)):
        raise _field_error(config_path, f"{field}.chunk_sha256", chunks,
                           f"not the {count} sha256 hex digest(s) of a {size}-byte file's chunks")


def check_file_records(config_path: Path, config: dict) -> None:
    """Raises GlmEngineError unless config.json's `checksums` and `tokenizer_files` are
    well formed: every entry as check_checksum_entry says, every tokenizer file a plain
    file name of the engine directory with checksums."""
    for key, kind in (("checksums", dict), ("tokenizer_files", list)):
        if key not in config:
            raise GlmEngineError(f"{config_path} has no {key!r}; the engine is damaged: rebuild it with build.py")
        if not isinstance(config[key], kind):
            raise _field_error(config_path, repr(key), config[key],
                               "not an object" if kind is dict else "not a list of file names")
    checksums = config["checksums"]
    for name, entry in checksums.items():
        check_checksum_entry(config_path, name, entry)
    for name in config["tokenizer_files"]:
        if not isinstance(name, str) or "\0" in name or name in ("", ".", "..") or Path(name).name != name:
            raise GlmEngineError(f"{config_path}: tokenizer file {_shown(name)} is not a file name of the "
                                 "engine directory; the engine is damaged: rebuild it with build.py")
        if name not in checksums:
            raise GlmEngineError(f"{config_path}: tokenizer file {name!r} has no checksums; the engine is "
                                 "damaged: rebuild it with build.py")


def check_size(path: Path, expected: dict) -> None:
    """Raises GlmEngineError when the file is missing or its size is not `expected`'s."""
    if not path.is_file():
        raise GlmEngineError(f"engine file {path} is missing; rebuild the engine with build.py")
    if path.stat().st_size != expected["size"]:
        raise GlmEngineError(f"engine file {path} has {path.stat().st_size} bytes, its config.json says "
                             f"{expected['size']}: the engine is corrupted or truncated; rebuild it")


def checksum_error(path: Path) -> GlmEngineError:
    """The error of a file whose bytes are not those its checksums describe."""
    return GlmEngineError(f"engine file {path} fails its sha256 check: the engine is corrupted; "
                          "rebuild it with build.py")


def _chunk_digest(path: Path, offset: int) -> str:
    with open(path, "rb") as stream:
        stream.seek(offset)
        return hashlib.sha256(stream.read(CHECKSUM_CHUNK_BYTES)).hexdigest()


def verify_checksums(path: Path, expected: dict) -> None:
    """Raises GlmEngineError naming the file when it differs from `expected` (an entry
    check_checksum_entry accepted)."""
    check_size(path, expected)
    offsets = range(0, expected["size"], CHECKSUM_CHUNK_BYTES)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda offset: _chunk_digest(path, offset), offsets))
    if digests != expected["chunk_sha256"]:
        raise checksum_error(path)
