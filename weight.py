"""Fills the ChatGLM2 network from a Hugging Face checkpoint directory, or with
seeded dummy weights. Reads `.bin` shards with `torch.load(weights_only=True)`
and safetensors shards, one shard in memory at a time; never runs code that
came with the checkpoint."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.kernels import reference

# Index file, single file, in order of preference.
_CHECKPOINT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# Derivable from the config; present in ChatGLM2 checkpoints, not used.
_IGNORED = {"transformer.rotary_pos_emb.inv_freq"}


def load_hf_config(model_dir: str | Path) -> dict:
    """The checkpoint's config.json as a dict, with a clear error when it is not there."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GlmEngineError(f"--model_dir {model_dir} is not a directory; point it at a Hugging Face "
                             "ChatGLM2 checkpoint, or leave it out for dummy weights")
    path = model_dir / "config.json"
    if not path.is_file():
        raise GlmEngineError(f"{path} not found: --model_dir must hold a ChatGLM2 checkpoint's config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GlmEngineError(f"{path} is not valid JSON ({error})") from None


def checkpoint_shards(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint: the shards its index names, or its single file."""
    model_dir = Path(model_dir)
    for index_name, single_name in _CHECKPOINT_LAYOUTS:
        index_path = model_dir / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise GlmEngineError(f"{index_path} is not a valid index ({error})") from None
            shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            for shard in shards:
                if not shard.is_file():
                    raise GlmEngineError(f"{shard} is named in {index_name} but missing")
            return shards
        if (model_dir / single_name).is_file():
            return [model_dir / single_name]
    raise GlmEngineError(f"no weights in {model_dir}: expected model.safetensors(.index.json) or "
                         "pytorch_model.bin(.index.json)")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard, on the CPU."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any parse failure means an unreadable file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GlmEngineError(f"cannot read weights file {path}: {message}") from None


def iter_checkpoint_tensors(model_dir: str | Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one shard in memory at a time."""
    shards = checkpoint_shards(model_dir)
    for shard in tqdm(shards, desc="Loading checkpoint shards", unit="shard", disable=not progress):
        tensors = read_shard(shard)
        yield from tensors.items()
        del tensors


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Runtime-layout parameter name -> shape."""
    shapes = {"word_embeddings.weight": (config.vocab_size, config.hidden_size),
              "final_layernorm.weight": (config.hidden_size,),
              "output_layer.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (config.hidden_size,)
        shapes[prefix + "self_attention.query_key_value.weight"] = (config.qkv_size, config.hidden_size)
        if config.add_qkv_bias:
            shapes[prefix + "self_attention.query_key_value.bias"] = (config.qkv_size,)
        shapes[prefix + "self_attention.dense.weight"] = (config.hidden_size, config.q_size)
        shapes[prefix + "post_attention_layernorm.weight"] = (config.hidden_size,)
        shapes[prefix + "mlp.dense_h_to_4h.weight"] = (2 * config.ffn_hidden_size, config.hidden_size)
        shapes[prefix + "mlp.dense_4h_to_h.weight"] = (config.hidden_size, config.ffn_hidden_size)
    return shapes


def runtime_name(hf_name: str) -> str:
    """Hugging Face ChatGLM2 parameter name -> runtime-layout name."""
    name = hf_name.removeprefix("transformer.")
    name = name.replace("embedding.word_embeddings.", "word_embeddings.", 1)
    return name.removeprefix("encoder.")


def hf_name(runtime: str) -> str:
    """Runtime-layout name -> Hugging Face ChatGLM2 parameter name."""
    if runtime.startswith("word_embeddings."):
        return "transformer.embedding." + runtime
    if runtime.startswith(("layers.", "final_layernorm.")):
        return "transformer.encoder." + runtime
    return "transformer." + runtime


def load_hf_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Runtime-layout weights in `dtype` from a checkpoint; every expected tensor
    must be there with its shape, and nothing else."""
    shapes = expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_tensors(model_dir, progress):
        if name in _IGNORED:
            continue
        target = runtime_name(name)
        if target not in shapes:
            raise GlmEngineError(f"unexpected tensor {name!r} in {model_dir}: not part of a ChatGLM2 "
                                 "network with this config.json")
        if tuple(tensor.shape) != shapes[target]:
            raise GlmEngineError(f"tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                                 f"{shapes[target]}")
        if not tensor.is_floating_point():
            raise GlmEngineError(f"tensor {name!r} has dtype {tensor.dtype}; expected floating-point "
                                 "weights (quantized checkpoints are not supported)")
        weights[target] = tensor.to(dtype).contiguous()
    missing = [name for name in shapes if name not in weights]
    if missing:
        raise GlmEngineError(f"tensor {hf_name(missing[0])!r} missing from {model_dir} "
                             f"({len(missing)} missing in all)")
    return weights


def dummy_weights(config: ModelConfig, dtype: torch.dtype, seed: int | None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Seeded random weights with the network's shapes: norms near 1, matrices
    with std 1/sqrt(fan_in), so that every layer contributes at any model size
    and activations stay in range. Each tensor has its own generator, so they
    are made in parallel threads and do not depend on the device or thread count."""
    shapes = expected_shapes(config)

    def make(index: int, name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed((0 if seed is None else seed) * 1_000_003 + index)
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


QUANTIZED_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")


def quantize_weights(weights: dict[str, torch.Tensor], config: ModelConfig, precision: str,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Weight-only quantization of every decoder-layer linear weight (int8, or int4
    packed two per byte) with float32 per-output-channel `weight_scales`; the
    embedding, norms, biases and output layer stay as they are."""
    bits = {"int8": 8, "int4": 4}[precision]
    if bits == 4 and config.hidden_size % 2 + config.q_size % 2 + config.ffn_hidden_size % 2:
        raise GlmEngineError("int4 weight-only needs even input sizes (hidden, heads * kv_channels, ffn)")
    names = [f"layers.{i}.{linear}.weight" for i in range(config.num_layers) for linear in QUANTIZED_LINEARS]
    for name in tqdm(names, desc=f"Quantizing to {precision}", disable=not progress):
        weights[name], weights[name + "_scales"] = reference.quantize_per_channel(weights[name], bits)
    return weights


def dequantize_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights with every quantized linear replaced by the dense weight it stands for
    (int4 is recognized by its halved input width); others unchanged."""
    dense = {}
    for name, tensor in weights.items():
        if name.endswith("_scales"):
            continue
        scales = weights.get(name + "_scales")
        if scales is None:
            dense[name] = tensor
        else:
            bits = 4 if tensor.dtype == torch.uint8 else 8
            dense[name] = reference.dequantize(tensor, scales, bits, dtype)
    return dense
