"""The KV cache's storage: one pool of fixed-size blocks for all layers, addressed
through per-sequence block tables (runtime/block_manager.py hands the blocks out),
and the pool's size. The attention metadata that addresses it is the attention
backends' (glm_engine/runtime/attention.py)."""

from __future__ import annotations

import torch

from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig, kv_cache_scale_name
from glm_engine.runtime.memory import check_fits


def kv_cache_dtype(build: BuildConfig) -> torch.dtype:
    """The dtype the K/V cache stores: FP8 E4M3 or INT8 with their flags, else the engine's."""
    return torch.float8_e4m3fn if build.fp8_kv_cache else torch.int8 if build.int8_kv_cache else build.torch_dtype


def to_cache_dtype(values: torch.Tensor, dtype: torch.dtype, scales: torch.Tensor | None = None) -> torch.Tensor:
    """K/V `values` [N, groups, D] as the cache stores them (the reference of the rotary
    kernels' cache stores): FP8 saturated to +-448 and rounded to nearest even; INT8 as
    round(value / its group's scale) (half to even) within +-127; else cast."""
    if dtype == torch.float8_e4m3fn:
        return values.float().clamp(-448.0, 448.0).to(dtype)
    if dtype == torch.int8:
        return torch.round(values.float() / scales[:, None]).clamp(-127, 127).to(dtype)
    return values.to(dtype)


def from_cache_dtype(stored: torch.Tensor, dtype: torch.dtype, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Cached K/V [..., groups, D] read as `dtype`: INT8 times its group's scale."""
    if stored.dtype == torch.int8:
        return (stored.float() * scales[:, None]).to(dtype)
    return stored.to(dtype)


def pop_kv_cache_scales(weights: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor | None:
    """An INT8 cache's scales [layers, 2, groups] (keys, values), taken out of the engine's
    weights (the network has no such parameter); None for other caches."""
    names = [kv_cache_scale_name(layer) for layer in range(num_layers)]
    if names[0] not in weights:
        return None
    return torch.stack([weights.pop(name).float() for name in names])


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An FP8 cache viewed as uint8 (indexing ops take no float8 on the CPU); others as they are."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


class KVCache:
    """K and V of every layer: [num_layers, num_blocks * block_size, groups, head_dim] each,
    so that a token's cache slot is `block * block_size + offset`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, groups: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, scales: torch.Tensor | None = None) -> None:
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, groups, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        if (dtype == torch.int8) != (scales is not None):
            raise ValueError("an INT8 K/V cache takes scales [layers, 2, groups]; other caches none")
        # INT8: [layers, 2, groups] float32, keys' then values' scale of each group
        self.scales = scales.to(device).contiguous() if scales is not None else None

    def layer_scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key scales [groups], value scales [groups]) of a layer of an INT8 cache, else Nones."""
        if self.scales is None:
            return None, None
        return self.scales[layer, 0], self.scales[layer, 1]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies the K/V of every layer from block `source` to block `copy`, per pair (a
        beam's copy-on-write of a block it shared)."""
        device = self.keys.device
        offsets = torch.arange(self.block_size, device=device)
        sources = (torch.tensor([source for source, _ in copies], device=device)[:, None] * self.block_size
                   + offsets).reshape(-1)
        targets = (torch.tensor([copy for _, copy in copies], device=device)[:, None] * self.block_size
                   + offsets).reshape(-1)
        for cache in (as_bytes(self.keys), as_bytes(self.values)):
            cache[:, targets] = cache[:, sources]

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores key/value [N, groups, head_dim] of N new tokens at their slots."""
        for cache, new, scales in zip((self.keys[layer], self.values[layer]), (key, value), self.layer_scales(layer)):
            as_bytes(cache).index_copy_(0, slot_mapping, as_bytes(to_cache_dtype(new, cache.dtype, scales)))


def block_bytes(config: ModelConfig, build: BuildConfig) -> int:
    """Bytes of one block of every layer's K and V."""
    return (2 * config.num_layers * build.tokens_per_block * config.multi_query_group_num * config.kv_channels
            * kv_cache_dtype(build).itemsize)


def pool_blocks(build: BuildConfig, config: ModelConfig, device: torch.device, free_fraction: float | None,
                max_tokens: int | None) -> int:
    """Blocks of the KV pool, checked to fit the memory left (one scratch block comes on
    top). Without --paged_kv_cache: a full sequence per batch row. Paged: `max_tokens`
    tokens when given, else `free_fraction` (default 0.9) of the GPU memory free now (on
    the CPU, as without paging; `free_fraction` is refused there)."""
    blocks = _pool_blocks(build, config, device, free_fraction, max_tokens)
    check_fits(f"the KV cache ({blocks + 1} blocks of {build.tokens_per_block} tokens)",
               (blocks + 1) * block_bytes(config, build), device,
               "lower --max_tokens_in_paged_kv_cache, or rebuild with a smaller --max_batch_size, --max_input_len "
               "or --max_output_len")
    return blocks


def blocks_per_sequence(build: BuildConfig) -> int:
    return -(-build.max_sequence_len // build.tokens_per_block)


def _pool_blocks(build: BuildConfig, config: ModelConfig, device: torch.device, free_fraction: float | None,
                 max_tokens: int | None) -> int:
    given = [name for name, value in (("--kv_cache_free_gpu_mem_fraction", free_fraction),
                                      ("--max_tokens_in_paged_kv_cache", max_tokens)) if value is not None]
    full = build.max_batch_size * blocks_per_sequence(build)
    if not build.paged_kv_cache:
        if given:
            raise GlmEngineError(f"{given[0]} sizes the paged KV cache; this engine was built without "
                                 "--paged_kv_cache")
        return full
    block_size = build.tokens_per_block
    if max_tokens is not None:
        if max_tokens < block_size:
            raise GlmEngineError(f"--max_tokens_in_paged_kv_cache {max_tokens} is under one block of "
                                 f"{block_size} tokens")
        return max_tokens // block_size
    if free_fraction is not None and not 0.0 < free_fraction <= 1.0:
        raise GlmEngineError(f"--kv_cache_free_gpu_mem_fraction must be within (0, 1], got {free_fraction}")
    if device.type != "cuda":
        if free_fraction is not None:
            raise GlmEngineError("--kv_cache_free_gpu_mem_fraction sizes the pool from free GPU memory; on the "
                                 "CPU use --max_tokens_in_paged_kv_cache")
        return full
    free_bytes, _ = torch.cuda.mem_get_info(device)
    blocks = int(free_bytes * (0.9 if free_fraction is None else free_fraction)) // block_bytes(config, build) - 1
    if blocks < blocks_per_sequence(build):
        raise GlmEngineError(f"only {blocks} KV-cache blocks fit in free GPU memory, fewer than one sequence's "
                             f"{blocks_per_sequence(build)}; raise --kv_cache_free_gpu_mem_fraction")
    return blocks
