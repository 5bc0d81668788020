"""The engine directory: config.json (format marker and version, model config,
build flags, versions, device, checksums of every other file and of itself),
rank{r}.safetensors in the runtime layout, and the tokenizer files. Loading checks
it as a whole before any tensor is used; engine_dir.py says how it is put in place."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from tqdm import tqdm

import glm_engine
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine_format.checksums import (CHECKSUM_CHUNK_BYTES, check_file_records, check_size,
                                                verify_checksums)
from glm_engine.engine_format.engine_dir import (CONFIG_NAME, ENGINE_MARKER, clean_stale_staging, hidden_old_engines,
                                   move_into_place, staging_dir)
from glm_engine.engine_format.layout import engine_tensor_specs
from glm_engine.engine_format.tensor_parallel import merge_weights
from glm_engine.engine_format.weights_file import SAFETENSORS_DTYPES, read_weights

# 2: the format marker, and checksums of config.json and the tokenizer files.
ENGINE_FORMAT_VERSION = 2


@dataclass
class Engine:
    """A loaded engine: its configs and one rank's weights."""

    directory: Path
    model_config: ModelConfig
    build_config: BuildConfig
    weights: dict[str, torch.Tensor]


def weights_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


class _Checksums:
    """sha256 of a file and of each of its chunks, computed from the bytes as they pass."""

    def __init__(self) -> None:
        self.size = 0
        self.whole = hashlib.sha256()
        self.chunk = hashlib.sha256()
        self.chunks: list[str] = []

    def update(self, data: memoryview | bytes) -> None:
        data = memoryview(data).cast("B")
        self.whole.update(data)
        while len(data):
            room = CHECKSUM_CHUNK_BYTES - self.size % CHECKSUM_CHUNK_BYTES
            self.chunk.update(data[:room])
            self.size += min(room, len(data))
            if self.size % CHECKSUM_CHUNK_BYTES == 0:
                self.chunks.append(self.chunk.hexdigest())
                self.chunk = hashlib.sha256()
            data = data[room:]

    def result(self) -> dict:
        chunks = self.chunks + ([self.chunk.hexdigest()] if self.size % CHECKSUM_CHUNK_BYTES else [])
        return {"size": self.size, "sha256": self.whole.hexdigest(), "chunk_bytes": CHECKSUM_CHUNK_BYTES,
                "chunk_sha256": chunks}


def file_checksums(path: Path) -> dict:
    """The checksums verify_checksums expects of `path`."""
    checksums = _Checksums()
    with open(path, "rb") as stream:
        while data := stream.read(CHECKSUM_CHUNK_BYTES):
            checksums.update(data)
    return checksums.result()


def config_digest(config: dict) -> str:
    """sha256 of config.json's content other than this digest (canonical JSON)."""
    content = {key: value for key, value in config.items() if key != "config_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      progress: bool = False) -> dict:
    """Writes `tensors` in the safetensors format one tensor at a time (no second
    copy of the weights in memory) and returns the file's checksums; `progress`
    shows a bar of the bytes written."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which engines do not store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes
    checksums = _Checksums()
    with open(path, "wb") as stream, tqdm(total=offset, unit="B", unit_scale=True, desc=f"Writing {path.name}",
                                          disable=not progress) as bar:
        def emit(data: memoryview | bytes) -> None:  # written and checksummed in one pass
            stream.write(data)
            checksums.update(data)
            bar.update(len(data) if isinstance(data, bytes) else data.nbytes)

        emit(len(header_bytes).to_bytes(8, "little") + header_bytes)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            emit(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return checksums.result()


def _environment() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"glm_engine": glm_engine.__version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(), "device": device}


def write_rank_file(staging: Path, rank: int, weights: dict[str, torch.Tensor],
                    progress: bool = False) -> tuple[str, dict]:
    """Writes one rank's weights into the staging directory; (file name, checksums)."""
    name = weights_file_name(rank)
    return name, write_safetensors(staging / name, weights, {"format_version": str(ENGINE_FORMAT_VERSION)}, progress)


def save_engine(output_dir: str | Path, model_config: ModelConfig, build_config: BuildConfig,
                write_weights: Callable[[Path], dict[str, dict]], tokenizer_files: list[Path],
                build_flags: dict, sources: dict[str, Path] | None = None,
                finish: Callable[[Path], None] | None = None) -> Path:
    """Writes the engine into a staging directory beside `output_dir`, then renames it
    into place, replacing only what engine_dir.check_output_dir allows; `sources`
    (flag -> directory read by the build) are never replaced or written into.
    `write_weights(staging)` writes the rank files there (write_rank_file) and returns
    their checksums by file name; `finish(staging)`, given, runs on the complete engine
    before it moves into place (build.py compiles its kernels there)."""
    output_dir = Path(output_dir).resolve()
    with staging_dir(output_dir) as staging:
        checksums = write_weights(staging)
        expected = [weights_file_name(rank) for rank in range(build_config.world_size)]
        if sorted(checksums) != sorted(expected):
            raise ValueError(f"the build wrote {sorted(checksums)}, an engine of this world size holds {expected}")
        for path in tokenizer_files:
            shutil.copyfile(path, staging / path.name)
            checksums[path.name] = file_checksums(staging / path.name)
        config = {"format": ENGINE_MARKER, "format_version": ENGINE_FORMAT_VERSION,
                  "model": model_config.to_dict(), "build": build_config.to_dict(), "build_flags": build_flags,
                  "tokenizer_files": [path.name for path in tokenizer_files],
                  "built_with": _environment(), "checksums": checksums}
        config["config_sha256"] = config_digest(config)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        if finish is not None:
            finish(staging)
        _apply_umask(staging)
        move_into_place(staging, output_dir, sources or {})
    return output_dir


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private directory; give the engine the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _missing_engine_error(engine_dir: Path) -> GlmEngineError:
    hidden = hidden_old_engines(engine_dir) if engine_dir.parent.is_dir() else []
    if hidden and not engine_dir.exists():
        return GlmEngineError(f"no engine at {engine_dir}: a build was interrupted while replacing it and left "
                              f"the previous engine at {hidden[0]}; run build.py again (it restores that "
                              f"engine first) or move it back: mv {hidden[0]} {engine_dir}")
    return GlmEngineError(f"{engine_dir} is not an engine directory (no {CONFIG_NAME}); build one "
                          "with build.py --output_dir")


def read_engine_config(engine_dir: str | Path) -> dict:
    """The engine's config.json, checked for its marker, format version and checksum,
    with the tokenizer files it lists verified."""
    engine_dir = Path(engine_dir)
    path = engine_dir / CONFIG_NAME
    if not path.is_file():
        raise _missing_engine_error(engine_dir)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise GlmEngineError(f"{path} is not valid JSON ({str(error)[:200]}); rebuild the engine") from None
    if not isinstance(config, dict) or config.get("format") != ENGINE_MARKER:
        version = config.get("format_version") if isinstance(config, dict) else None
        if version == 1:
            raise GlmEngineError(f"engine {engine_dir} has format version 1, this glm_engine reads version "
                                 f"{ENGINE_FORMAT_VERSION}; rebuild it with this build.py")
        raise GlmEngineError(f"{engine_dir} is not an engine built by build.py (its {CONFIG_NAME} lacks the "
                             f"\"format\": \"{ENGINE_MARKER}\" marker); build one with build.py --output_dir")
    version = config.get("format_version")
    if version != ENGINE_FORMAT_VERSION:
        raise GlmEngineError(f"engine {engine_dir} has format version {version!r}, this glm_engine reads "
                             f"version {ENGINE_FORMAT_VERSION}; rebuild it with this build.py")
    if config.get("config_sha256") != config_digest(config):
        raise GlmEngineError(f"{path} fails its sha256 check: it was edited or damaged after the build; "
                             "rebuild the engine with build.py")
    check_file_records(path, config)
    for name in config["tokenizer_files"]:
        verify_checksums(engine_dir / name, config["checksums"][name])
    _check_rank_files(engine_dir, config)
    return config


def _check_rank_files(engine_dir: Path, config: dict) -> None:
    """Every rank's weights file is there with its size (its checksum is verified by the
    rank that loads it): a tensor-parallel run fails on every rank, before any of them
    waits for the others, when one file is missing."""
    _, build_config = _configs_of(config)
    for rank in range(build_config.world_size):
        name = weights_file_name(rank)
        if name not in config["checksums"]:
            raise GlmEngineError(f"engine {engine_dir} lists no {name} for its world size "
                                 f"{build_config.world_size}; rebuild it")
        check_size(engine_dir / name, config["checksums"][name])


def engine_configs(engine_dir: str | Path) -> tuple[ModelConfig, BuildConfig]:
    """The model and build configs of an engine (its config.json checked as a whole)."""
    return _configs_of(read_engine_config(engine_dir))


def _configs_of(config: dict) -> tuple[ModelConfig, BuildConfig]:
    return ModelConfig.from_dict(config.get("model")), BuildConfig.from_dict(config.get("build"))


def load_engine(engine_dir: str | Path, device: torch.device | str = "cpu", rank: int = 0) -> Engine:
    """Loads one rank of an engine onto `device` after checking it as a whole: config
    checksum, file checksums, configs against the weights' names, shapes and dtypes. The
    weights are read into memory of their own (weights_file.py), so no later change of
    the files reaches them; on a GPU they pass through host memory, the rank file's size."""
    engine_dir = Path(engine_dir)
    if engine_dir.parent.is_dir():
        clean_stale_staging(engine_dir.resolve())
    config = read_engine_config(engine_dir)
    model_config, build_config = _configs_of(config)
    if not 0 <= rank < build_config.world_size:
        raise GlmEngineError(f"engine {engine_dir} was built for {build_config.world_size} rank(s); there is "
                             f"no rank {rank}")
    path = engine_dir / weights_file_name(rank)
    weights = read_weights(path, config["checksums"][path.name], engine_tensor_specs(model_config, build_config))
    if torch.device(device).type != "cpu":
        for name in list(weights):  # one at a time: each host copy goes as its device copy comes
            weights[name] = weights[name].to(device)
    return Engine(engine_dir, model_config, build_config, weights)


def load_whole_engine(engine_dir: str | Path, device: torch.device | str = "cpu") -> Engine:
    """An engine with every rank's weights loaded (each checked) and merged back into the
    whole model's: what the Hugging Face reference of a tensor-parallel engine is built
    from. Its build config keeps the world size the engine was built with."""
    first = load_engine(engine_dir, device, 0)
    ranks = [first.weights] + [load_engine(engine_dir, device, rank).weights
                               for rank in range(1, first.build_config.world_size)]
    first.weights = merge_weights(ranks, first.model_config)
    return first
