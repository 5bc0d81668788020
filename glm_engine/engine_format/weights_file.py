"""One rank's weights file read into the process's own memory and verified from the
bytes read. The file is never memory-mapped: a mapping would let a later change of the
file (another engine copied over it) reach a running engine, and its truncation kill
the process with SIGBUS. Each tensor is allocated for itself and filled with pread;
the chunk checksums are computed from those same bytes, so what was verified is what
runs, whatever happens to the file meanwhile. The file's header (names, shapes,
dtypes, offsets) must be exactly the layout the engine's configs imply."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from glm_engine import GlmEngineError
from glm_engine.engine_format.checksums import CHECKSUM_CHUNK_BYTES, checksum_error, verify_checksums

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8",
                      torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3"}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fills `view` with the file's bytes from `offset` on."""
    while len(view):
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise GlmEngineError(f"engine file {path} became shorter while it was read; rebuild the engine "
                                 "with build.py, then start again")
        view, offset = view[count:], offset + count


def _header(fd: int, path: Path, size: int) -> tuple[bytes, dict] | None:
    """The file's first bytes up to its tensors (length prefix and JSON header) and the
    header, or None when they are not a safetensors header."""
    if size < 8:
        return None
    prefix = bytearray(8)
    _read_into(fd, memoryview(prefix), 0, path)
    length = int.from_bytes(prefix, "little")
    if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
        return None
    text = bytearray(length)
    _read_into(fd, memoryview(text), 8, path)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return (bytes(prefix + text), header) if isinstance(header, dict) else None


def _tensor_offsets(header: dict, specs: TensorSpecs, data_bytes: int) -> dict[str, int] | str:
    """Each tensor's offset in the data section when the header holds exactly `specs`'
    names, shapes and dtypes and its tensors tile the `data_bytes` after it; else what differs."""
    found = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name in sorted(set(specs) | set(found)):
        entry = found.get(name)
        have = (entry.get("shape"), entry.get("dtype")) if isinstance(entry, dict) else None
        want = (list(specs[name][0]), SAFETENSORS_DTYPES[specs[name][1]]) if name in specs else None
        if have != want:
            have_text = "absent" if name not in found else f"{have[1]} {have[0]}" if have else "not a tensor entry"
            want_text = "no such tensor" if want is None else f"{want[1]} {want[0]}"
            return f"tensor {name!r} is {have_text} but its config.json implies {want_text}"
    spans = {name: entry.get("data_offsets") for name, entry in found.items()}
    if not all(isinstance(span, list) and len(span) == 2 and all(type(value) is int for value in span)
               for span in spans.values()):
        return "a tensor's data offsets are not two byte offsets"
    offsets, end = {}, 0
    for name, span in sorted(spans.items(), key=lambda item: item[1]):
        shape, dtype = specs[name]
        if span != [end, end + dtype.itemsize * torch.Size(shape).numel()]:
            return f"tensor {name!r} lies at bytes {span}, not where its shape puts it"
        offsets[name], end = span[0], span[1]
    return offsets if end == data_bytes else f"its tensors end {data_bytes - end} bytes before the file does"


def _chunk_pieces(segments: list[tuple[int, memoryview]], start: int, end: int) -> list[tuple[int, memoryview]]:
    """The parts of `segments` (file offset, bytes; contiguous, in file order) within [start, end)."""
    pieces = []
    for offset, view in segments:
        low, high = max(start, offset), min(end, offset + len(view))
        if low < high:
            pieces.append((low, view[low - offset:high - offset]))
    return pieces


def _read_and_digest(fd: int, path: Path, pieces: list[tuple[int, memoryview]], read_from: int) -> str:
    """Reads one chunk's pieces from `read_from` on (those before it are in memory already)
    and returns the chunk's sha256, computed from the bytes in memory."""
    digest = hashlib.sha256()
    for offset, view in pieces:
        if offset >= read_from:
            _read_into(fd, view, offset, path)
        digest.update(view)
    return digest.hexdigest()


def read_weights(path: Path, expected: dict, specs: TensorSpecs) -> dict[str, torch.Tensor]:
    """The tensors of weights file `path`, in memory of their own on the CPU, after their
    bytes matched the chunk checksums `expected` (a checked config.json entry) and the
    header matched `specs` (name -> shape, dtype). Raises GlmEngineError otherwise."""
    with open(path, "rb") as stream:
        fd, size = stream.fileno(), os.fstat(stream.fileno()).st_size
        if size != expected["size"]:
            raise GlmEngineError(f"engine file {path} has {size} bytes, its config.json says {expected['size']}: "
                                 "the engine is corrupted or truncated; rebuild it")
        found = _header(fd, path, size)
        offsets = (_tensor_offsets(found[1], specs, size - len(found[0])) if found
                   else "its header is not a safetensors header")
        if isinstance(offsets, str):  # damaged, or a file of other configs: the checksum tells which
            verify_checksums(path, expected)
            raise GlmEngineError(f"engine {path.parent}: {offsets}; the engine's files do not belong together: "
                                 "rebuild it")
        header = found[0]
        tensors = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}
        segments = [(0, memoryview(header))] + sorted(
            ((len(header) + offsets[name], memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
             for name, tensor in tensors.items()), key=lambda segment: segment[0])
        chunks = [_chunk_pieces(segments, start, min(size, start + CHECKSUM_CHUNK_BYTES))
                  for start in range(0, size, CHECKSUM_CHUNK_BYTES)]
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda pieces: _read_and_digest(fd, path, pieces, len(header)), chunks))
    if digests != expected["chunk_sha256"]:
        raise checksum_error(path)
    return tensors
