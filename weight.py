"""Fills a GLM network from a Hugging Face checkpoint directory (its tensor names
mapped by the model family, glm_engine/models), or with seeded dummy weights, and
loads a checkpoint as the Hugging Face reference model.
Reads `.bin` shards with `torch.load(weights_only=True)` and safetensors shards, one
shard in memory at a time; never runs code that came with the checkpoint (unless
the reference is asked for with trust_remote_code)."""

from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.tools.hf_reference import build_glm_model
from glm_engine.engine_format.layout import weight_shapes
from glm_engine.models import family, read_model_config
from glm_engine.engine_format.source_files import file_inside

# Index file, single file, in order of preference.
_CHECKPOINT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def load_hf_config(model_dir: str | Path) -> dict:
    """The checkpoint's config.json as a dict, with a clear error when it is not there."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GlmEngineError(f"--model_dir {model_dir} is not a directory; point it at a Hugging Face "
                             "ChatGLM2/ChatGLM3/GLM-4 checkpoint, or leave it out for dummy weights")
    path = model_dir / "config.json"
    if not path.is_file():
        raise GlmEngineError(f"{path} not found: --model_dir must hold a ChatGLM2/ChatGLM3/GLM-4 checkpoint's "
                             "config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise GlmEngineError(f"{path} is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(config, dict):
        raise GlmEngineError(f"{path} holds a JSON {type(config).__name__}, not the object of a model config")
    return config


def load_generation_config(model_dir: str | Path) -> dict:
    """The checkpoint's generation_config.json as a dict ({} when it has none): its
    eos_token_id may list end ids config.json lacks."""
    path = file_inside(Path(model_dir), "generation_config.json", "generation config")
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise GlmEngineError(f"{path} is not valid JSON ({str(error)[:200]}); fix or remove it") from None
    if not isinstance(config, dict):
        raise GlmEngineError(f"{path} holds a JSON {type(config).__name__}, not the object of a generation config")
    return config


def checkpoint_shards(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint: the shards its index names, or its single file;
    each a regular file inside the checkpoint directory."""
    model_dir = Path(model_dir)
    for index_name, single_name in _CHECKPOINT_LAYOUTS:
        index_path = model_dir / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, RecursionError, KeyError, TypeError) as error:
                raise GlmEngineError(f"{index_path} is not a valid index ({type(error).__name__}: {error})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                raise GlmEngineError(f"{index_path}: weight_map must map tensor names to shard file names")
            shards = []
            for name in dict.fromkeys(weight_map.values()):
                shard = file_inside(model_dir, name, "weights file")
                if shard is None:
                    raise GlmEngineError(f"{model_dir / name} is named in {index_name} but missing")
                shards.append(shard)
            return shards
        single = file_inside(model_dir, single_name, "weights file")
        if single is not None:
            return [single]
    raise GlmEngineError(f"no weights in {model_dir}: expected model.safetensors(.index.json) or "
                         "pytorch_model.bin(.index.json)")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard, on the CPU. Pickled .bin files are read with
    weights_only=True: anything but tensors is refused, never run."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "can still be loaded" in str(error):
            raise GlmEngineError(f"cannot read weights file {path}: it holds pickled objects other than "
                                 "tensors, which are not loaded because unpickling them could run code; "
                                 "convert the checkpoint to safetensors with the code that made it") from None
        raise GlmEngineError(f"cannot read weights file {path}: not a PyTorch or safetensors weights file "
                             "(damaged or truncated?)") from None
    except Exception as error:  # noqa: BLE001 - any parse failure means an unreadable file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GlmEngineError(f"cannot read weights file {path}: {message}") from None
    if not isinstance(tensors, dict) or not all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
                                                for name, tensor in tensors.items()):
        raise GlmEngineError(f"weights file {path} does not hold a dict of named tensors")
    return tensors


def iter_checkpoint_tensors(model_dir: str | Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one shard in memory at a time."""
    shards = checkpoint_shards(model_dir)
    for shard in tqdm(shards, desc="Loading checkpoint shards", unit="shard", disable=not progress):
        tensors = read_shard(shard)
        yield from tensors.items()
        del tensors


def load_hf_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Runtime-layout weights in `dtype` from a checkpoint; every expected tensor
    must be there with its shape, and nothing else. Tensors the runtime fuses (GLM-4's
    q/k/v projections) are joined, in the family's order, once all their parts are read."""
    model_family = family(config.model_type)
    expected = model_family.checkpoint_tensors(config)
    parts_of: dict[str, list[str]] = {}
    for name, (target, _) in expected.items():
        parts_of.setdefault(target, []).append(name)
    seen: set[str] = set()
    read: dict[str, torch.Tensor] = {}  # parts waiting for the rest of their runtime tensor
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_tensors(model_dir, progress):
        if name in model_family.IGNORED_TENSORS:
            continue
        read[name] = checked_tensor(name, tensor, expected, seen, model_dir, dtype)
        seen.add(name)
        target = expected[name][0]
        if all(part in read for part in parts_of[target]):
            parts = [read.pop(part) for part in parts_of[target]]
            weights[target] = parts[0] if len(parts) == 1 else torch.cat(parts).contiguous()
    missing = [name for name in expected if name not in seen]
    if missing:
        raise GlmEngineError(f"tensor {missing[0]!r} missing from {model_dir} ({len(missing)} missing in all)")
    return weights


def checked_tensor(name: str, tensor: torch.Tensor, expected: dict[str, tuple[str, tuple[int, ...]]],
                   seen: set[str], model_dir: str | Path, dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint tensor in `dtype`, checked to be expected, not `seen` before, of its
    shape and finite."""
    if name in seen:
        raise GlmEngineError(f"tensor {name!r} appears twice in {model_dir}; remove the extra copy")
    if name not in expected:
        raise GlmEngineError(f"unexpected tensor {name!r} in {model_dir}: not part of a network with "
                             "this config.json")
    if tuple(tensor.shape) != expected[name][1]:
        raise GlmEngineError(f"tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{expected[name][1]}")
    if not tensor.is_floating_point():
        raise GlmEngineError(f"tensor {name!r} has dtype {tensor.dtype}; expected floating-point "
                             "weights (quantized checkpoints are not supported)")
    converted = tensor.to(dtype).contiguous()
    if not torch.isfinite(converted).all():
        where = "holds NaN or Inf" if not torch.isfinite(tensor).all() else f"overflows {dtype} (Inf)"
        raise GlmEngineError(f"tensor {name!r} in {model_dir} {where}; the checkpoint is damaged or "
                             "needs a wider --dtype")
    return converted


def dummy_weights(config: ModelConfig, dtype: torch.dtype, seed: int | None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Seeded random weights with the network's shapes: norms near 1, matrices
    with std 1/sqrt(fan_in), so that every layer contributes at any model size
    and activations stay in range. Each tensor has its own generator, so they
    are made in parallel threads and do not depend on the device or thread count."""
    shapes = weight_shapes(config)

    def make(index: int, name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(((0 if seed is None else seed) * 1_000_003 + index) % 2**64)
        shape = shapes[name]
        if name.endswith("layernorm.weight"):
            values = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "word_embeddings.weight" or name.endswith(".bias"):
            values = torch.randn(shape, generator=generator) * (1.0 if "embeddings" in name else 0.1)
        else:
            values = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        return values.to(dtype)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {name: pool.submit(make, index, name) for index, name in enumerate(shapes)}
        return {name: future.result() for name, future in tqdm(futures.items(), desc="Generating dummy weights",
                                                              disable=not progress)}


def load_hf_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
                  config: ModelConfig | None = None, trust_remote_code: bool = False):
    """The Hugging Face model of a checkpoint: its family's transformers model (GlmForCausalLM,
    Glm4ForCausalLM for GLM-4-0414) filled with its tensors by default; the checkpoint's own modeling code only with `trust_remote_code`. `config`
    (default: read from the checkpoint) fixes how rope_ratio applies."""
    if trust_remote_code:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype)
        except Exception as error:  # noqa: BLE001 - remote code fails in many ways on new transformers
            raise GlmEngineError(f"the checkpoint's own modeling code failed to load ({error}); "
                                 "drop --hf_trust_remote_code to use GlmForCausalLM") from None
        return model.to(device).eval()
    config = config or read_model_config(load_hf_config(model_dir))
    return build_glm_model(config, load_hf_weights(model_dir, config, dtype), device)
