"""The runtime weight layout: the name, shape and dtype of every tensor an engine
holds, from the model config (its family's shapes) and the build flags (the linear
method's storage). weight.py converts checkpoints into it; loading checks an
engine's file against it before any tensor is used."""

from __future__ import annotations

import torch

from glm_engine.config import BuildConfig, ModelConfig, kv_cache_scale_name
from glm_engine.models import family
from glm_engine.quantization import linear_method
from glm_engine.engine_format.tensor_parallel import rank_model_config, vocab_rows_per_rank


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Runtime-layout parameter name -> shape, unquantized."""
    return family(config.model_type).weight_shapes(config)


def linear_weight_names(config: ModelConfig) -> list[str]:
    """The decoder linears' weights: those a linear method stores (and quantizes)."""
    linears = family(config.model_type).LINEARS
    return [f"layers.{i}.{linear}.weight" for i in range(config.num_layers) for linear in linears]


def rank_weight_shapes(config: ModelConfig, world_size: int) -> dict[str, tuple[int, ...]]:
    """Runtime-layout parameter name -> shape of one rank's slice (glm_engine/engine_format/tensor_parallel.py)."""
    shapes = weight_shapes(rank_model_config(config, world_size))
    shapes["output_layer.weight"] = (vocab_rows_per_rank(config, world_size), config.hidden_size)
    return shapes


def engine_tensor_specs(config: ModelConfig, build: BuildConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in each rank file of an engine built with
    `build`: the decoder linears as the linear method stores them (e.g. int8, or int4
    packed two per byte, with float32 `_scales`), the rest in the engine dtype."""
    dtype = build.torch_dtype
    specs = {name: (shape, dtype) for name, shape in rank_weight_shapes(config, build.world_size).items()}
    method = linear_method(build)
    for name in linear_weight_names(config):
        specs.update(method.tensor_specs(name, specs[name][0], dtype))
    if build.int8_kv_cache:  # each layer's K/V scales per group of the rank (runtime/kv_cache.py)
        groups = rank_model_config(config, build.world_size).multi_query_group_num
        for layer in range(config.num_layers):
            specs[kv_cache_scale_name(layer)] = ((2, groups), torch.float32)
    return specs


def parameter_bytes(config: ModelConfig, build: BuildConfig) -> int:
    """Bytes of an engine's weights in the engine dtype, from the shapes alone."""
    return family(config.model_type).parameter_count(config) * build.torch_dtype.itemsize
