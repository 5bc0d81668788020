"""The kernels' launch choices (gemv.py's block sizes, K splits and path, and whether
cuBLAS serves the shape instead; weight_only_mma.py's warps and loads; int8_gemm.py's
prompt GEMM, cuBLAS or fused, and its blocks) per GPU architecture and shape, read from
launch_configs.json.

benchmarks/tune_gemv.py (`--write`, and `--mma` for the tensor-core GEMM) and
benchmarks/tune_int8_gemm.py time the candidates on the GPU they run on and merge the
fastest into that file under the GPU's architecture ("sm_90" for compute capability
9.0); the file's "provenance" says what was measured where.

The file holds, per kernel, a list of entries per architecture and a "default" list.
An entry's fields but "rows" and "choice" are its key: the weight's shape (n, k) and the
variant (bits, and per kernel grouped scales, the half2 path, the SwiGLU epilogue);
"choice" is the launch choice. An entry with "rows" R is a row bucket: it serves every
row count above the next smaller R listed for its key, up to R. A shape the architecture
does not list, any shape on an architecture the file does not know, and every call off
the GPU take the default entry of the same variant (its key has no n, k)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("launch_configs.json")
DEFAULT = "default"  # the entries any (architecture, shape) not listed takes
NO_GPU = "cpu"  # the architecture of a call off the GPU: no table section, so the default
SHAPE_FIELDS = ("n", "k")  # the key fields the default entries leave out
_NOT_KEY = ("rows", "choice")

Key = tuple[tuple[str, object], ...]


@functools.cache
def table() -> dict:
    """launch_configs.json as read once."""
    return json.loads(TABLE.read_text())


def entry_key(fields: dict) -> Key:
    """The key of an entry (or of a lookup's fields): its fields but rows and choice, in name order."""
    return tuple(sorted((name, value) for name, value in fields.items() if name not in _NOT_KEY))


@functools.cache
def _index(kernel: str) -> dict[str, dict[Key, list[tuple[int, dict]]]]:
    """architecture -> key -> [(rows, choice)] in ascending rows (0 for entries without rows)."""
    index: dict[str, dict[Key, list[tuple[int, dict]]]] = {}
    for arch, entries in table()[kernel].items():
        by_key = index.setdefault(arch, {})
        for entry in entries:
            by_key.setdefault(entry_key(entry), []).append((entry.get("rows", 0), entry["choice"]))
    for by_key in index.values():
        for buckets in by_key.values():
            buckets.sort(key=lambda bucket: bucket[0])
    return index


def _in_bucket(buckets: list[tuple[int, dict]] | None, rows: int | None) -> dict | None:
    if not buckets:
        return None
    if rows is None:
        return buckets[0][1]
    return next((choice for bucket_rows, choice in buckets if bucket_rows >= rows), None)


def choice(kernel: str, arch: str, rows: int | None = None, **fields: object) -> dict:
    """The launch choice of `kernel` ("gemv", "weight_only_mma") on `arch` for the key
    `fields` (n, k and the kernel's variant fields) at `rows` rows (None for kernels whose
    choice does not depend on them): the architecture's entry, else the default's."""
    index = _index(kernel)
    found = _in_bucket(index.get(arch, {}).get(entry_key(fields)), rows)
    if found is None:
        variant = {name: value for name, value in fields.items() if name not in SHAPE_FIELDS}
        found = _in_bucket(index[DEFAULT].get(entry_key(variant)), rows)
    if found is None:
        raise LookupError(f"{TABLE.name} has no default {kernel} choice for {fields} at {rows} rows")
    return found


def choices(kernel: str) -> list[dict]:
    """Every choice the table holds for `kernel`, on every architecture and the default."""
    return [entry["choice"] for entries in table()[kernel].values() for entry in entries]


@functools.cache
def _cuda_architecture(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def architecture(device: torch.device | None = None) -> str:
    """The table's name for `device`'s architecture ("sm_90"), None meaning the current CUDA
    device; NO_GPU for a CPU device or where CUDA is not available."""
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return NO_GPU
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _cuda_architecture(index)
