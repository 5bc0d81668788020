"""The engine directory (DESIGN.md §4): config.json (format version, model
config, build flags, versions, device, checksums), rank{r}.safetensors in the
runtime layout, and the tokenizer files. Written to a temporary directory and
renamed into place, so a crashed build never leaves a half engine."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file

import glm_engine
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig

ENGINE_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
# Checksums are kept per chunk too, so that loading verifies chunks in parallel
# threads (hashlib releases the GIL) instead of one sequential pass over 12 GB.
CHECKSUM_CHUNK_BYTES = 64 << 20


@dataclass
class Engine:
    """A loaded engine: its configs and one rank's weights."""

    directory: Path
    model_config: ModelConfig
    build_config: BuildConfig
    weights: dict[str, torch.Tensor]


def weights_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def _chunk_digest(path: Path, offset: int) -> str:
    with open(path, "rb") as stream:
        stream.seek(offset)
        return hashlib.sha256(stream.read(CHECKSUM_CHUNK_BYTES)).hexdigest()


class _HashingWriter:
    """Writes a file while computing its sha256 and that of each chunk, so the
    weights are written and checksummed in one pass."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.size = 0
        self.whole = hashlib.sha256()
        self.chunk = hashlib.sha256()
        self.chunks: list[str] = []

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self.stream.write(data)
        self.whole.update(data)
        while len(data):
            room = CHECKSUM_CHUNK_BYTES - self.size % CHECKSUM_CHUNK_BYTES
            self.chunk.update(data[:room])
            self.size += min(room, len(data))
            if self.size % CHECKSUM_CHUNK_BYTES == 0:
                self.chunks.append(self.chunk.hexdigest())
                self.chunk = hashlib.sha256()
            data = data[room:]

    def checksums(self) -> dict:
        chunks = self.chunks + ([self.chunk.hexdigest()] if self.size % CHECKSUM_CHUNK_BYTES else [])
        return {"size": self.size, "sha256": self.whole.hexdigest(), "chunk_bytes": CHECKSUM_CHUNK_BYTES,
                "chunk_sha256": chunks}


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8",
                       torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Writes `tensors` in the safetensors format one tensor at a time (no second
    copy of the weights in memory) and returns the file's checksums."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which engines do not store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as stream:
        writer = _HashingWriter(stream)
        writer.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            writer.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return writer.checksums()


def verify_checksums(path: Path, expected: dict) -> None:
    """Raises GlmEngineError naming the file when it differs from `expected`."""
    if not path.is_file():
        raise GlmEngineError(f"engine file {path} is missing; rebuild the engine with build.py")
    if path.stat().st_size != expected["size"]:
        raise GlmEngineError(f"engine file {path} has {path.stat().st_size} bytes, its config.json says "
                             f"{expected['size']}: the engine is corrupted or truncated; rebuild it")
    offsets = range(0, expected["size"], expected["chunk_bytes"])
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda offset: _chunk_digest(path, offset), offsets))
    if digests != expected["chunk_sha256"]:
        raise GlmEngineError(f"engine file {path} fails its sha256 check: the engine is corrupted; "
                             "rebuild it with build.py")


def _environment() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"glm_engine": glm_engine.__version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(), "device": device}


def save_engine(output_dir: str | Path, model_config: ModelConfig, build_config: BuildConfig,
                rank_weights: list[dict[str, torch.Tensor]], tokenizer_files: list[Path],
                build_flags: dict) -> Path:
    """Writes the engine into a temporary sibling directory, then renames it onto
    `output_dir` (replacing an engine already there)."""
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        checksums = {}
        for rank, weights in enumerate(rank_weights):
            name = weights_file_name(rank)
            checksums[name] = write_safetensors(staging / name, weights,
                                                {"format_version": str(ENGINE_FORMAT_VERSION)})
        for path in tokenizer_files:
            shutil.copy2(path, staging / path.name)
        config = {"format_version": ENGINE_FORMAT_VERSION, "model": model_config.to_dict(),
                  "build": build_config.to_dict(), "build_flags": build_flags,
                  "tokenizer_files": [path.name for path in tokenizer_files],
                  "built_with": _environment(), "checksums": checksums}
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _apply_umask(staging)
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private directory; give the engine the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    if output_dir.exists() and not (output_dir / CONFIG_NAME).is_file() and any(output_dir.iterdir()):
        raise GlmEngineError(f"--output_dir {output_dir} exists and is not an engine; choose another "
                             "directory or empty it")
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
    staging.rename(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_engine_config(engine_dir: str | Path) -> dict:
    """The engine's config.json, checked for its format version."""
    engine_dir = Path(engine_dir)
    path = engine_dir / CONFIG_NAME
    if not path.is_file():
        raise GlmEngineError(f"{engine_dir} is not an engine directory (no {CONFIG_NAME}); build one "
                             "with build.py --output_dir")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GlmEngineError(f"{path} is not valid JSON ({error}); rebuild the engine") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != ENGINE_FORMAT_VERSION:
        raise GlmEngineError(f"engine {engine_dir} has format version {version!r}, this glm_engine reads "
                             f"version {ENGINE_FORMAT_VERSION}; rebuild it with this build.py")
    return config


def load_engine(engine_dir: str | Path, device: torch.device | str = "cpu", rank: int = 0) -> Engine:
    """Loads one rank of an engine onto `device` after verifying its checksums."""
    engine_dir = Path(engine_dir)
    config = read_engine_config(engine_dir)
    try:
        model_config = ModelConfig.from_dict(config["model"])
        build_config = BuildConfig.from_dict(config["build"])
        expected = config["checksums"][weights_file_name(rank)]
    except (KeyError, TypeError) as error:
        raise GlmEngineError(f"{engine_dir / CONFIG_NAME} lacks {error}; rebuild the engine") from None
    path = engine_dir / weights_file_name(rank)
    verify_checksums(path, expected)
    weights = load_file(path, device=str(device))
    return Engine(engine_dir, model_config, build_config, weights)
