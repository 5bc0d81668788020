"""How an engine is split over `world_size` GPUs (Megatron-style tensor parallelism):
which world sizes a model allows, the shape each rank computes, and each rank's
slice of the runtime-layout weights. Each family names how each of its tensors is
cut (its tensor_split); for ChatGLM:

- query_key_value: column-parallel by heads, num_attention_heads / N query heads per
  rank with the K/V groups they use; ChatGLM2 has 2 K/V groups, so past N = 2 each
  group is replicated on the N / 2 ranks whose heads read it.
- dense, dense_4h_to_h: row-parallel (input columns split; each rank's output is a
  partial sum, all-reduced by the runtime). Weight-only scales per output row are
  kept whole by every rank; scales per group of input columns are split with them.
- dense_h_to_4h: column-parallel, its gate and up halves split alike.
- output_layer: vocab-parallel, ceil(vocab / N) rows per rank (the last padded with
  zero rows; the runtime gathers the logits and drops the padding).
- embedding and norms: replicated.
- an INT8 K/V cache's scales [2, groups] (every family): the columns of the groups the
  rank's heads read, as query_key_value's K/V rows.
The slices are taken after quantization, so a rank holds exactly the bytes of the
one-rank engine's rows and columns."""

from __future__ import annotations

import dataclasses

import torch

from glm_engine import GlmEngineError
from glm_engine.config import KV_CACHE_SCALE, ModelConfig, vocab_rows_per_rank
from glm_engine.models import family


def check_world_size(config: ModelConfig, world_size: int, weight_only_precision: str | None = None,
                     weight_only_group_size: int = 0) -> None:
    """Raises GlmEngineError when the model cannot be split over `world_size` ranks, or
    its linears' input channels (each rank's share) into weight-only groups."""
    heads, groups, ffn = config.num_attention_heads, config.multi_query_group_num, config.ffn_hidden_size
    if world_size < 1:
        raise GlmEngineError(f"--world_size must be positive, got {world_size}")
    if heads % world_size:
        raise GlmEngineError(f"--world_size {world_size} does not divide the model's {heads} attention heads; "
                             f"use a divisor of {heads}")
    if groups % world_size and world_size % groups:
        raise GlmEngineError(f"--world_size {world_size} and the model's {groups} K/V groups: one must divide the "
                             "other, so that each rank's query heads read whole groups")
    if ffn % world_size:
        raise GlmEngineError(f"--world_size {world_size} does not divide the MLP's {ffn} channels "
                             "(ffn_hidden_size); choose another world size")
    if weight_only_precision in ("int4", "int4_awq") and (config.q_size // world_size % 2 or ffn // world_size % 2):
        raise GlmEngineError(f"int4 weight-only packs two input channels per byte: each of the {world_size} ranks "
                             "needs an even share of the attention and MLP channels; choose another world size")
    group = weight_only_group_size
    per_rank = " per rank" if world_size > 1 else ""
    inputs = {"hidden_size": config.hidden_size, "attention channels" + per_rank: config.q_size // world_size,
              "MLP channels" + per_rank: ffn // world_size}
    for name, size in inputs.items():
        if group and size % group:
            raise GlmEngineError(f"--weight_only_group_size {group} does not divide the {size} input channels "
                                 f"({name}) of a quantized linear; choose a group size that divides it")


def rank_model_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The shape one rank computes: its query heads, K/V groups and MLP channels (the
    vocabulary stays whole: the embedding is replicated)."""
    if world_size == 1:
        return config
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // world_size,
                               multi_query_group_num=max(1, config.multi_query_group_num // world_size),
                               ffn_hidden_size=config.ffn_hidden_size // world_size)


def _rank_groups(config: ModelConfig, world_size: int, rank: int) -> slice:
    """The K/V groups that rank `rank`'s query heads read."""
    heads, groups = config.num_attention_heads, config.multi_query_group_num
    first_group = rank * (heads // world_size) // (heads // groups)  # the group of this rank's first query head
    return slice(first_group, first_group + max(1, groups // world_size))


def _qkv_rows(config: ModelConfig, world_size: int, rank: int) -> torch.Tensor:
    """Rows of the fused [query; key; value] projection that rank `rank` holds."""
    head_dim, rank_heads = config.kv_channels, config.num_attention_heads // world_size
    groups = _rank_groups(config, world_size, rank)
    query = torch.arange(rank * rank_heads * head_dim, (rank + 1) * rank_heads * head_dim)
    key = config.q_size + torch.arange(groups.start * head_dim, groups.stop * head_dim)
    return torch.cat([query, key, key + config.kv_size])


def _split(config: ModelConfig, name: str) -> str | None:
    """How tensor parallelism cuts `name`: its family's tensor_split, or "kv_groups" for an
    INT8 K/V cache's scales [2, groups] (columns by the K/V groups each rank reads)."""
    if name.endswith("." + KV_CACHE_SCALE):
        return "kv_groups"
    return family(config.model_type).tensor_split(name)


def _gate_up_rows(config: ModelConfig, world_size: int, rank: int) -> torch.Tensor:
    share = config.ffn_hidden_size // world_size
    gate = torch.arange(rank * share, (rank + 1) * share)
    return torch.cat([gate, gate + config.ffn_hidden_size])


def _columns(tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s share of the input columns (int4: of the packed bytes, which hold
    adjacent column pairs, so an even share splits them alike)."""
    share = tensor.shape[1] // world_size
    return tensor[:, rank * share:(rank + 1) * share].contiguous()


def _vocab_rows(tensor: torch.Tensor, config: ModelConfig, world_size: int, rank: int) -> torch.Tensor:
    rows = vocab_rows_per_rank(config, world_size)
    shard = tensor[rank * rows:(rank + 1) * rows]
    padding = tensor.new_zeros((rows - shard.shape[0], tensor.shape[1]))
    return torch.cat([shard, padding]).contiguous()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A one-byte tensor viewed as uint8; others as they are."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


def split_weights(weights: dict[str, torch.Tensor], config: ModelConfig, world_size: int,
                  rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s runtime-layout weights (quantized or not) out of the whole model's,
    each cut as its family's tensor_split says."""
    if world_size == 1:
        return weights
    rows = {"qkv": _qkv_rows(config, world_size, rank), "gate_up": _gate_up_rows(config, world_size, rank)}
    shard = {}
    for name, tensor in weights.items():
        split = _split(config, name)
        if split == "kv_groups":
            shard[name] = tensor[:, _rank_groups(config, world_size, rank)].contiguous()
        elif split == "vocab":
            shard[name] = _vocab_rows(tensor, config, world_size, rank)
        elif split in rows:
            shard[name] = tensor.index_select(0, rows[split])
        elif split == "row_parallel" and tensor.dim() == 2:  # per-row tensors (bias, scales) stay whole
            shard[name] = _columns(tensor, world_size, rank)
        else:  # embedding, norms
            shard[name] = tensor
    return shard


def merge_weights(rank_weights: list[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole model's weights from every rank's slice (the inverse of split_weights),
    for the Hugging Face reference of a tensor-parallel engine."""
    world_size = len(rank_weights)
    if world_size == 1:
        return rank_weights[0]
    whole = {}
    for name, first in rank_weights[0].items():
        slices = [weights[name] for weights in rank_weights]
        split = _split(config, name)
        if split == "kv_groups":  # replicated groups are written once per rank holding them, with equal values
            whole[name] = first.new_empty((first.shape[0], config.multi_query_group_num))
            for rank, part in enumerate(slices):
                whole[name][:, _rank_groups(config, world_size, rank)] = part
        elif split == "vocab":
            whole[name] = torch.cat(slices)[:config.vocab_size]
        elif split in ("qkv", "gate_up"):
            rows = _qkv_rows if split == "qkv" else _gate_up_rows
            # Replicated K/V groups are written once per rank holding them, with equal values.
            size = config.qkv_size if split == "qkv" else 2 * config.ffn_hidden_size
            tensor = first.new_empty((size, *first.shape[1:]))
            for rank, part in enumerate(slices):  # (as bytes: index_copy_ takes no float8 on the CPU)
                _bytes(tensor).index_copy_(0, rows(config, world_size, rank), _bytes(part))
            whole[name] = tensor
        elif split == "row_parallel" and first.dim() == 2:
            whole[name] = torch.cat(slices, dim=1)
        else:
            whole[name] = first
    return whole
