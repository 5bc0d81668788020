"""The runtime weight layout: the name, shape and dtype of every tensor an engine
holds, from the model config and the build flags. weight.py converts checkpoints
into it; loading checks an engine's file against it before any tensor is used."""

from __future__ import annotations

import torch

from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.tensor_parallel import rank_model_config, vocab_rows_per_rank

# The decoder-layer linears that --use_weight_only quantizes.
QUANTIZED_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Runtime-layout parameter name -> shape, unquantized."""
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


def quantized_weight_names(config: ModelConfig) -> list[str]:
    return [f"layers.{i}.{linear}.weight" for i in range(config.num_layers) for linear in QUANTIZED_LINEARS]


def rank_weight_shapes(config: ModelConfig, world_size: int) -> dict[str, tuple[int, ...]]:
    """Runtime-layout parameter name -> shape of one rank's slice (glm_engine/tensor_parallel.py)."""
    shapes = weight_shapes(rank_model_config(config, world_size))
    shapes["output_layer.weight"] = (vocab_rows_per_rank(config, world_size), config.hidden_size)
    return shapes


def engine_tensor_specs(config: ModelConfig, build: BuildConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in each rank file of an engine built with
    `build`: int8 weights, or int4 packed two per byte (uint8, half the columns), with
    float32 `_scales` per output channel ([rows]) or per group of input channels
    ([rows, columns / group]) under --use_weight_only; the rest in the engine dtype."""
    specs = {name: (shape, build.torch_dtype) for name, shape in rank_weight_shapes(config, build.world_size).items()}
    if build.weight_only_precision is not None:
        int4 = build.weight_only_precision == "int4"
        for name in quantized_weight_names(config):
            rows, columns = specs[name][0]
            specs[name] = ((rows, columns // 2), torch.uint8) if int4 else ((rows, columns), torch.int8)
            group = build.weight_only_group_size
            specs[name + "_scales"] = ((rows, columns // group) if group else (rows,), torch.float32)
    return specs


def parameter_bytes(config: ModelConfig, build: BuildConfig) -> int:
    """Bytes of an engine's weights, from the shapes alone (no loop over layers, so that
    a config with an absurd layer count is sized before anything is allocated)."""
    per_layer = (2 * config.hidden_size + config.qkv_size * (config.hidden_size + int(config.add_qkv_bias))
                 + config.hidden_size * config.q_size + 3 * config.ffn_hidden_size * config.hidden_size)
    return (config.num_layers * per_layer + config.hidden_size * (2 * config.vocab_size + 1)) \
        * build.torch_dtype.itemsize
