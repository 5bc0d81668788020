"""The ChatGLM2 network (DESIGN.md §3) as torch modules, over packed token
streams and the block-addressed KV cache. Any size, float32/float16/bfloat16.

Parameter names are the engine's runtime layout (fused query_key_value, fused
dense_h_to_4h); weight.py maps Hugging Face checkpoints onto them."""

from __future__ import annotations

import math

import torch
from torch import nn

from glm_engine.config import ModelConfig
from glm_engine.kernels import reference
from glm_engine.runtime.kv_cache import AttentionBatch, KVCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(hidden, self.weight, self.eps)


class SelfAttention(nn.Module):
    """Fused QKV projection, rotary on the first half of each head, grouped
    (multi-query) causal attention through the KV cache, output projection."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(config.q_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, rotary: torch.Tensor, batch: AttentionBatch,
                kv_cache: KVCache) -> torch.Tensor:
        config = self.config
        heads, groups, head_dim = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
        qkv = self.query_key_value(hidden).view(-1, heads + 2 * groups, head_dim)
        # Query and key heads rotate together: one rotary pass instead of two.
        query_key = reference.apply_rotary(qkv[:, :heads + groups], rotary)
        query, key, value = query_key[:, :heads], query_key[:, heads:], qkv[:, heads + groups:]
        kv_cache.write(self.layer_index, batch.slot_mapping, key, value)
        context = reference.paged_attention(
            query, kv_cache.keys[self.layer_index], kv_cache.values[self.layer_index],
            batch.query_index, batch.output_rows, batch.key_slots, batch.attention_bias,
            scale=1.0 / math.sqrt(head_dim))
        return self.dense(context.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(reference.swiglu(self.dense_h_to_4h(hidden)))


class DecoderLayer(nn.Module):
    """h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, rotary: torch.Tensor, batch: AttentionBatch,
                kv_cache: KVCache) -> torch.Tensor:
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), rotary, batch, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class ChatGLM2Model(nn.Module):
    """Embedding, decoder layers, final RMSNorm and the (untied) output layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [N, hidden_size] of N packed new tokens, after the final norm;
        writes their K/V into `kv_cache`."""
        config = self.config
        rotary = reference.rotary_frequencies(batch.positions, config.rotary_dim, config.rotary_base,
                                              config.position_scale)
        hidden = self.word_embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, rotary, batch, kv_cache)
        return self.final_layernorm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab_size] of the given hidden states."""
        return self.output_layer(hidden).float()


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device) -> ChatGLM2Model:
    """A ChatGLM2Model on `device` holding exactly `weights` (runtime-layout names)."""
    with torch.device("meta"):
        network = ChatGLM2Model(config)
    network.load_state_dict(weights, strict=True, assign=True)
    return network.to(device).eval()
