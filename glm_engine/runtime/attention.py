"""Attention backends. Each one prepares, once per step, the metadata its attention
reads (from the step's block tables and token counts), and computes a layer's
attention: rotary embedding, KV-cache write, attention over the cache. The network
calls `backend(qkv, layer_index, metadata, kv_cache)` and never asks which one it has.

- ReferenceAttention: plain PyTorch over the slot-addressed cache, on any device.
- PagedAttention (--use_gpt_attention_plugin): Triton kernels: rotary fused with the
  cache write, paged split-K decode attention, and for prompts context FMHA
  (--enable_context_fmha[_fp32_acc]) or, without it, the reference attention. With
  float32 accumulation, steps of fresh prompts (no cached tokens) of at least
  FLASH_MIN_TOKENS each run torch's fused attention (SDPA) instead, one call a
  prompt: faster than our FMHA there (docs/PERFORMANCE.md). Steps of 2..TOKEN_ROWS_MAX
  new tokens a sequence and at most TOKEN_ROWS_STEP_MAX in all (speculative verify
  steps, short chunks) run the decode kernel with a row per new token over its own
  prefix: the context FMHA's one program a head walks a long cache serially, the decode
  kernel splits it across the card; past 32 rows re-reading each sequence's cache a row
  costs more than that (docs/PERFORMANCE.md, speculative decoding).

A new backend is a new AttentionBackend subclass with metadata(), __call__ and, if
its kernels take fixed shapes, the CUDA-graph hooks (supports_cuda_graphs,
supports_prompt_graphs, graph_inputs), plus a line in ops.select_ops.

The KV storage itself is runtime/kv_cache.py's."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from glm_engine.config import ModelConfig
from glm_engine.kernels import reference
from glm_engine.runtime.kv_cache import KVCache, from_cache_dtype

FLASH_MIN_TOKENS = 1024  # shortest prompt SDPA takes: its host work a call is hidden from there on (PERFORMANCE.md)
TOKEN_ROWS_MAX = 16  # most new tokens a sequence that the decode kernel takes as rows of their own
TOKEN_ROWS_STEP_MAX = 32  # ... and most new tokens in the step
SEQUENCE_COLUMNS = 3  # a graph-input row's leading columns: context length, new tokens, last token's index


@dataclass
class StepLayout:
    """Where a step's packed new tokens sit, as host tensors: sequence i has cached[i]
    tokens in the cache and new[i] new tokens, packed after those of sequence i - 1."""

    tables: torch.Tensor  # [B, widest] block ids (short tables repeat their last block)
    cached: torch.Tensor  # [B]
    new: torch.Tensor  # [B]
    valid: torch.Tensor  # [B, T] bool: step t < new[b]
    query_positions: torch.Tensor  # [B, T] position of each new token (padding repeats the last)
    block_size: int

    @classmethod
    def of(cls, block_tables: list[list[int]], cached_lengths: list[int], new_token_counts: list[int],
           block_size: int) -> "StepLayout":
        cached, new = torch.tensor(cached_lengths), torch.tensor(new_token_counts)
        widest = max(map(len, block_tables))
        tables = torch.tensor([table + [table[-1]] * (widest - len(table)) for table in block_tables])
        steps = torch.arange(int(new.max()))[None, :]
        return cls(tables, cached, new, steps < new[:, None], cached[:, None] + torch.minimum(steps, new[:, None] - 1),
                   block_size)

    @property
    def total(self) -> torch.Tensor:
        return self.cached + self.new

    @property
    def starts(self) -> torch.Tensor:
        return torch.cumsum(self.new, 0) - self.new

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each position [B, P] of each sequence."""
        return self.tables.gather(1, positions // self.block_size) * self.block_size + positions % self.block_size


@dataclass
class ReferenceFields:
    """The unfused reference attention's inputs (large in prefill: [B, T, L] bias)."""

    query_index: torch.Tensor  # [B, T] packed index of each sequence's new tokens (padded)
    output_rows: torch.Tensor  # [N] row of each packed token in the flattened [B * T] grid
    key_slots: torch.Tensor  # [B, L] cache slot of every key position (padded)
    attention_bias: torch.Tensor  # [B, T, L] model dtype: 0 where attending is allowed, -inf elsewhere

    @classmethod
    def of(cls, layout: StepLayout, device: torch.device, dtype: torch.dtype) -> "ReferenceFields":
        total, (batch, max_new) = layout.total, layout.valid.shape
        max_keys = int(total.max())
        # Key positions past a sequence's end repeat its last position.
        key_positions = torch.minimum(torch.arange(max_keys)[None, :], total[:, None] - 1)
        query_index = layout.starts[:, None] + layout.query_positions - layout.cached[:, None]
        return cls(query_index=query_index.to(device, non_blocking=True),
                   output_rows=torch.arange(batch * max_new).view(batch, max_new)[layout.valid].to(device),
                   key_slots=layout.slots(key_positions).to(device, non_blocking=True),
                   attention_bias=causal_bias(layout.query_positions.to(device), layout.valid.to(device), max_keys,
                                              dtype))


def causal_bias(query_positions: torch.Tensor, valid: torch.Tensor, max_keys: int,
                dtype: torch.dtype) -> torch.Tensor:
    """[B, T, L] bias in `dtype`, built on the queries' device (it is large in prefill):
    0 where key l <= the query's position, -inf elsewhere; padding rows see key 0 only,
    so that their softmax stays finite."""
    key_range = torch.arange(max_keys, device=query_positions.device)
    allowed = (key_range <= query_positions[:, :, None]) & valid[:, :, None]
    allowed[:, :, 0] |= ~valid
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass
class ReferenceMetadata:
    positions: torch.Tensor  # [N] absolute position of each new token
    slot_mapping: torch.Tensor  # [N] cache slot each new token's K/V is written to
    rotary: torch.Tensor  # [N, rotary_dim // 2] complex64: exp(i * angle) of each new token
    fields: ReferenceFields


@dataclass
class PagedMetadata:
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lengths: torch.Tensor  # [B] int32, keys per sequence once the new tokens are in
    max_context: int  # bound on context_lengths, which sizes the decode kernel's splits
    new_token_counts: torch.Tensor | None = None  # [B] int32, for context FMHA
    last_token_index: torch.Tensor | None = None  # [B] packed index of each sequence's last new token
    max_new_tokens: int = 1  # the largest of new_token_counts: 1 in decode steps
    fresh_prompt_lengths: list[int] | None = None  # a step of fresh prompts that SDPA takes: their lengths
    reference: ReferenceFields | None = None  # prompts without context FMHA run the reference attention
    # Steps of 2..TOKEN_ROWS_MAX new tokens a sequence, TOKEN_ROWS_STEP_MAX in all: each token's block
    # table [N, max_blocks] int32 and keys [N] int32 (its position + 1), its decode-kernel row.
    token_tables: torch.Tensor | None = None
    token_context_lengths: torch.Tensor | None = None


class GraphInputs(Protocol):
    """A backend's part of the static inputs of one captured step (PagedGraphInputs is one):
    int64 values placed after the token ids in the graph's one static tensor, which one
    host-to-device copy fills each step."""

    # [B] packed index of each sequence's last new token on the device, once bound; None
    # where every sequence has one new token (the hidden rows are then the last tokens).
    last_token_index: torch.Tensor | None

    def append_step(self, inputs: list[int], block_tables: list[list[int]], cached: list[int],
                    new_token_counts: Iterable[int]) -> None:
        """Appends one step's values, padded to the graph's shape, to the host list `inputs`."""

    def bind(self, inputs: torch.Tensor) -> object:
        """The metadata the captured network reads, over `inputs` (the values on the device)."""

    def prepare(self) -> None:
        """Device work the captured step runs before the network (its kernels are captured)."""


class AttentionBackend:
    """What the network and the model runner ask of an attention backend:
    - metadata(layout): the metadata of an eager step, built once a step;
    - __call__(qkv, layer_index, metadata, kv_cache): a layer's rotary, cache write and
      attention of the step's N new tokens, [N, heads * head_dim];
    - supports_cuda_graphs: whether decode steps can be captured as CUDA graphs (the
      backend's kernels take fixed shapes and read the step's sizes from device tensors);
      supports_prompt_graphs: likewise one sequence's prompt step of a fixed token count;
    - graph_inputs(...): where either is True, its part of a captured step's static inputs."""

    supports_cuda_graphs = False
    supports_prompt_graphs = False

    def metadata(self, layout: StepLayout) -> object:
        """This backend's metadata of the step `layout` describes, on its device."""
        raise NotImplementedError

    def __call__(self, qkv: torch.Tensor, layer_index: int, meta: object, kv_cache: KVCache) -> torch.Tensor:
        """Layer `layer_index`'s attention context of the step's new tokens; writes their K/V."""
        raise NotImplementedError

    def graph_inputs(self, sequences: int, tokens: int, blocks_per_sequence: int, block_size: int,
                     scratch_block: int) -> GraphInputs:
        """The static inputs of a step captured for `sequences` rows of `tokens` packed new tokens
        (decode: one a sequence), tables of `blocks_per_sequence` blocks of `block_size` tokens;
        padding writes its K/V to `scratch_block`."""
        raise NotImplementedError(f"{type(self).__name__} does not run in CUDA graphs")


class PagedGraphInputs:
    """PagedAttention's part of a captured step's static inputs: the tokens' positions and
    cache slots, then a row per sequence (context length, new tokens, packed index of its
    last new token, block table). Padding tokens sit at position 0 of the scratch block;
    padding rows are one token long over that block."""

    def __init__(self, sequences: int, tokens: int, blocks_per_sequence: int, block_size: int, scratch_block: int,
                 max_context: int) -> None:
        self.sequences, self.tokens, self.block_size = sequences, tokens, block_size
        self.width, self.scratch, self.max_context = blocks_per_sequence, scratch_block, max_context
        self.decode = sequences == tokens  # one new token a sequence: the decode-attention kernel
        # Every sequence fed tokens // sequences tokens (verify graphs; prompt graphs are one sequence).
        self.token_rows = (not self.decode and tokens % sequences == 0 and tokens // sequences <= TOKEN_ROWS_MAX
                           and tokens <= TOKEN_ROWS_STEP_MAX)
        self.padding_row = [1, 1, 0] + [scratch_block] * blocks_per_sequence
        self.last_token_index: torch.Tensor | None = None
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dense tensor, static column), once bound

    def append_step(self, inputs: list[int], block_tables: list[list[int]], cached: list[int],
                    new_token_counts: Iterable[int]) -> None:
        """Appends one step's positions, slots and sequence rows, padded to the graph's shape,
        to the host list `inputs` (in place: no copies of the whole list)."""
        block_size, width, scratch = self.block_size, self.width, self.scratch
        positions, slots, rows = [], [], []
        for table, done, count in zip(block_tables, cached, new_token_counts):
            for position in range(done, done + count):
                positions.append(position)
                slots.append(table[position // block_size] * block_size + position % block_size)
            rows += [done + count, count, len(positions) - 1] + table
            rows += [scratch] * (width - len(table))
        spare_tokens, spare_rows = self.tokens - len(positions), self.sequences - len(block_tables)
        inputs += positions
        inputs += [0] * spare_tokens
        inputs += slots
        inputs += [scratch * block_size] * spare_tokens
        inputs += rows
        inputs += self.padding_row * spare_rows

    def bind(self, inputs: torch.Tensor) -> PagedMetadata:
        """The metadata over `inputs` (append_step()'s values on the device): positions and
        slots are views of it; the sequence columns get dense int32 tensors, which prepare() fills."""
        tokens, sequences, device = self.tokens, self.sequences, inputs.device
        positions, slots = inputs[:2 * tokens].view(2, tokens)
        rows = inputs[2 * tokens:].view(sequences, SEQUENCE_COLUMNS + self.width)
        context_lengths = torch.zeros(sequences, dtype=torch.int32, device=device)
        block_tables = torch.zeros(sequences, self.width, dtype=torch.int32, device=device)
        self.copies = [(context_lengths, rows[:, 0]), (block_tables, rows[:, SEQUENCE_COLUMNS:])]
        new_token_counts = None
        if not self.decode:  # the decode kernel reads neither
            new_token_counts = torch.zeros_like(context_lengths)
            self.last_token_index = torch.zeros(sequences, dtype=torch.int64, device=device)
            self.copies += [(new_token_counts, rows[:, 1]), (self.last_token_index, rows[:, 2])]
        meta = PagedMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                             context_lengths=context_lengths, max_context=self.max_context,
                             new_token_counts=new_token_counts, last_token_index=self.last_token_index,
                             max_new_tokens=1 if self.decode else tokens)
        if self.token_rows:
            self.token_sequence = torch.arange(tokens, device=device) // (tokens // sequences)
            meta.token_tables = torch.zeros(tokens, self.width, dtype=torch.int32, device=device)
            meta.token_context_lengths = torch.zeros(tokens, dtype=torch.int32, device=device)
            self.token_fields = (meta.token_tables, meta.token_context_lengths, block_tables, positions)
        return meta

    def prepare(self) -> None:
        """The kernels take dense int32 copies of the sequence columns, made inside the graph
        (with token rows, each token's table and keys too)."""
        for dense, column in self.copies:
            dense.copy_(column)
        if self.token_rows:
            token_tables, token_context_lengths, block_tables, positions = self.token_fields
            torch.index_select(block_tables, 0, self.token_sequence, out=token_tables)
            token_context_lengths.copy_(positions + 1)


class ReferenceAttention(AttentionBackend):
    """Rotary, cache write and unfused grouped-query attention in plain PyTorch."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.multi_query_group_num, \
            config.kv_channels
        self.scale = 1.0 / math.sqrt(config.kv_channels)
        self.dtype, self.device = dtype, device
        self.inv_freq = reference.rotary_inv_freq(config.rotary_dim, config.rotary_base).to(device)
        self.position_scale = config.position_scale

    def metadata(self, layout: StepLayout) -> ReferenceMetadata:
        positions = layout.query_positions[layout.valid].to(self.device, non_blocking=True)
        return ReferenceMetadata(
            positions=positions,
            slot_mapping=layout.slots(layout.query_positions)[layout.valid].to(self.device, non_blocking=True),
            # Angles once per step, not per layer.
            rotary=reference.rotary_frequencies(positions, self.inv_freq, self.position_scale),
            fields=ReferenceFields.of(layout, self.device, self.dtype))

    def __call__(self, qkv: torch.Tensor, layer_index: int, meta: ReferenceMetadata,
                 kv_cache: KVCache) -> torch.Tensor:
        heads, groups = self.heads, self.groups
        qkv = qkv.view(-1, heads + 2 * groups, self.head_dim)
        # Query and key heads rotate together: one rotary pass instead of two.
        query_key = reference.apply_rotary(qkv[:, :heads + groups], meta.rotary)
        kv_cache.write(layer_index, meta.slot_mapping, query_key[:, heads:], qkv[:, heads + groups:])
        return attend_reference(query_key[:, :heads], layer_index, meta.fields, kv_cache, self.scale)


def attend_reference(query: torch.Tensor, layer_index: int, fields: ReferenceFields, kv_cache: KVCache,
                     scale: float) -> torch.Tensor:
    context = reference.paged_attention(query, kv_cache.keys[layer_index], kv_cache.values[layer_index],
                                        fields.query_index, fields.output_rows, fields.key_slots,
                                        fields.attention_bias, scale, *kv_cache.layer_scales(layer_index))
    return context.flatten(1)


class PagedAttention(AttentionBackend):
    """The attention plugin's Triton kernels over block tables (kernels imported here
    only: engines without the plugin never import triton). They read block tables,
    context lengths and token counts from the device, so steps of fixed shapes can be
    captured as CUDA graphs."""

    supports_cuda_graphs = True

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, context_fmha: str | None,
                 max_sequence_len: int) -> None:
        from glm_engine.kernels import context_attention, decode_attention, rotary_kv

        self.rotary_kv_write = rotary_kv.rotary_kv_write
        self.decode_attention = decode_attention.decode_attention
        self.context_attention = context_attention.context_attention if context_fmha else None
        self.fp16_accumulation = context_fmha == "enabled"
        # Without context FMHA prompts take the reference attention, whose shapes follow the step.
        self.supports_prompt_graphs = self.context_attention is not None
        self.heads, self.scale = config.num_attention_heads, 1.0 / math.sqrt(config.kv_channels)
        self.dtype, self.device, self.max_sequence_len = dtype, device, max_sequence_len
        self.inv_freq = reference.rotary_inv_freq(config.rotary_dim, config.rotary_base).to(device)
        self.position_scale = config.position_scale

    def metadata(self, layout: StepLayout) -> PagedMetadata:
        to_device = lambda tensor: tensor.to(self.device, non_blocking=True)  # noqa: E731
        max_new = int(layout.new.max())
        meta = PagedMetadata(
            positions=to_device(layout.query_positions[layout.valid]),
            slot_mapping=to_device(layout.slots(layout.query_positions)[layout.valid]),
            block_tables=to_device(layout.tables.to(torch.int32)),
            context_lengths=to_device(layout.total.to(torch.int32)),
            max_context=self.max_sequence_len,
            new_token_counts=to_device(layout.new.to(torch.int32)),
            last_token_index=to_device(layout.starts + layout.new - 1),
            max_new_tokens=max_new,
            fresh_prompt_lengths=layout.new.tolist() if self._takes_flash(layout) else None,
            reference=ReferenceFields.of(layout, self.device, self.dtype)
            if max_new > 1 and self.context_attention is None else None)
        if (1 < max_new <= TOKEN_ROWS_MAX and int(layout.new.sum()) <= TOKEN_ROWS_STEP_MAX
                and self.context_attention is not None and meta.fresh_prompt_lengths is None):
            token_sequence = torch.repeat_interleave(torch.arange(len(layout.new)), layout.new)
            meta.token_tables = to_device(layout.tables[token_sequence].to(torch.int32))
            meta.token_context_lengths = to_device((layout.query_positions[layout.valid] + 1).to(torch.int32))
        return meta

    def graph_inputs(self, sequences: int, tokens: int, blocks_per_sequence: int, block_size: int,
                     scratch_block: int) -> PagedGraphInputs:
        """See AttentionBackend.graph_inputs."""
        return PagedGraphInputs(sequences, tokens, blocks_per_sequence, block_size, scratch_block,
                                self.max_sequence_len)

    def _takes_flash(self, layout: StepLayout) -> bool:
        """Whether SDPA runs the step: fresh prompts (nothing cached), each at least FLASH_MIN_TOKENS long,
        and context FMHA with float32 accumulation (SDPA accumulates in float32: not the fp16 variant)."""
        return (self.context_attention is not None and not self.fp16_accumulation and not bool(layout.cached.any())
                and int(layout.new.min()) >= FLASH_MIN_TOKENS)

    def __call__(self, qkv: torch.Tensor, layer_index: int, meta: PagedMetadata, kv_cache: KVCache) -> torch.Tensor:
        keys, values = kv_cache.keys[layer_index], kv_cache.values[layer_index]
        scales = kv_cache.layer_scales(layer_index)  # INT8 caches' per-group scales, else Nones
        query = self.rotary_kv_write(qkv, meta.positions, self.inv_freq, self.position_scale, meta.slot_mapping,
                                     keys, values, self.heads, *scales)
        if meta.fresh_prompt_lengths is not None:
            return self._flash_prompts(qkv, query, keys, values, scales, meta)
        cache_scales = {"key_scales": scales[0], "value_scales": scales[1]}
        if meta.max_new_tokens == 1:
            context = self.decode_attention(query, keys, values, meta.block_tables, meta.context_lengths,
                                            kv_cache.block_size, self.scale, meta.max_context, **cache_scales)
        elif meta.token_tables is not None:
            context = self.decode_attention(query, keys, values, meta.token_tables, meta.token_context_lengths,
                                            kv_cache.block_size, self.scale, meta.max_context, **cache_scales)
        elif self.context_attention is not None:
            context = self.context_attention(query, keys, values, meta.block_tables, meta.context_lengths,
                                             meta.new_token_counts, meta.last_token_index, meta.max_new_tokens,
                                             kv_cache.block_size, self.scale, self.fp16_accumulation, **cache_scales)
        else:
            return attend_reference(query, layer_index, meta.reference, kv_cache, self.scale)
        return context.flatten(1)

    def _flash_prompts(self, qkv: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       scales: tuple, meta: PagedMetadata) -> torch.Tensor:
        """Causal attention of fresh prompts packed one after another, each over its own tokens, by SDPA.
        The rotated keys come back from their cache slots; the values are the QKV rows' last heads
        (a quantized cache's values from their slots too: attention reads what the cache holds)."""
        tokens, heads, head_dim = query.shape
        groups = keys.shape[1]
        key_scales, value_scales = scales
        new_keys = from_cache_dtype(keys.index_select(0, meta.slot_mapping), query.dtype, key_scales).transpose(0, 1)
        if values.dtype == query.dtype:
            new_values = qkv.unflatten(1, (heads + 2 * groups, head_dim))[:, heads + groups:].transpose(0, 1)
        else:
            new_values = from_cache_dtype(values.index_select(0, meta.slot_mapping), query.dtype,
                                          value_scales).transpose(0, 1)
        queries = query.transpose(0, 1)  # [heads, N, D]: views, as SDPA's fused kernels read them
        parts, start = [], 0
        for length in meta.fresh_prompt_lengths:
            end = start + length
            attended = F.scaled_dot_product_attention(
                queries[None, :, start:end], new_keys[None, :, start:end], new_values[None, :, start:end],
                is_causal=True, scale=self.scale, enable_gqa=True)
            parts.append(attended[0].transpose(0, 1))  # [length, heads, D]
            start = end
        context = parts[0] if len(parts) == 1 else torch.cat(parts)
        return context.reshape(tokens, heads * head_dim)
