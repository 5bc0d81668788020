"""The ChatGLM2 network (DESIGN.md §3) as torch modules, over packed token
streams and the block-addressed KV cache. Any size, float32/float16/bfloat16.

Parameter names are the engine's runtime layout (fused query_key_value, fused
dense_h_to_4h); weight.py maps Hugging Face checkpoints onto them. The build
flags choose the ops: plain PyTorch (glm_engine.kernels.reference) or the
Triton kernels ("plugins") that compute the same functions."""

from __future__ import annotations

import math

import torch
from torch import nn

from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.kernels import reference
from glm_engine.runtime.kv_cache import AttentionBatch, KVCache

# Parameters are created without storage and replaced by the engine's tensors in
# build_model. (A `with torch.device("meta")` block instead routes every factory call
# through torch._refs, whose first use imports torch._dynamo: seconds of start-up.)
UNLOADED = torch.device("meta")


class Table(nn.Module):
    """A weight [rows, columns] read as an embedding table (`embed`) or a bias-free linear
    layer (`forward`). Not nn.Embedding / nn.Linear: their random initialization, wasted
    on weights that are replaced, imports torch._dynamo, seconds of start-up."""

    def __init__(self, rows: int, columns: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, columns, device=UNLOADED), requires_grad=False)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(token_ids, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm that also adds a branch into the residual stream first;
    `fused` runs both in one Triton kernel (--use_layernorm_plugin)."""

    def __init__(self, size: int, eps: float, fused: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=UNLOADED), requires_grad=False)
        self.eps = eps
        self.fused = fused

    def forward(self, branch: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized residual + branch, residual + branch)."""
        if self.fused:
            from glm_engine.kernels.norm import add_rms_norm

            return add_rms_norm(branch, residual, self.weight, self.eps)
        return reference.add_rms_norm(branch, residual, self.weight, self.eps)


class DecoderLinear(nn.Module):
    """A linear layer of a decoder layer: weight [out, in] in the model dtype, or
    int8 / packed int4 with per-output-channel `weight_scales` (--use_weight_only).
    Decode-sized inputs (at most 16 rows) go through the Triton skinny-GEMM kernel
    when the layer is quantized or --use_gemm_plugin is on; larger ones through
    cuBLAS, on the weight dequantized by a Triton kernel when quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool, build: BuildConfig) -> None:
        super().__init__()
        self.quant_bits = {"int8": 8, "int4": 4}.get(build.weight_only_precision, 0)
        packed_in = in_features // 2 if self.quant_bits == 4 else in_features
        self.weight = nn.Parameter(torch.empty(out_features, packed_in, device=UNLOADED), requires_grad=False)
        self.weight_scales = nn.Parameter(torch.empty(out_features, device=UNLOADED), requires_grad=False) \
            if self.quant_bits else None
        self.bias = nn.Parameter(torch.empty(out_features, device=UNLOADED), requires_grad=False) if bias else None
        self.skinny_kernel = self.quant_bits != 0 or build.use_gemm_plugin is not None
        self.dtype = build.torch_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kernel modules import triton: only layers that use them import them.
        if self.skinny_kernel:
            from glm_engine.kernels import gemv

            if x.shape[0] <= gemv.MAX_ROWS:
                return gemv.gemv(x, self.weight, self.bias, self.weight_scales, self.quant_bits)
        weight = self.weight
        if self.quant_bits:
            from glm_engine.kernels.dequantize import dequantize

            weight = dequantize(weight, self.weight_scales, self.quant_bits, self.dtype)
        return reference.linear(x, weight, self.bias)


class SelfAttention(nn.Module):
    """Fused QKV projection, rotary on the first half of each head, grouped
    (multi-query) causal attention through the KV cache, output projection.
    With --use_gpt_attention_plugin, rotary and the cache write are one kernel
    and decode steps use the paged decode-attention kernel."""

    def __init__(self, config: ModelConfig, layer_index: int, build: BuildConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.plugin = build.use_gpt_attention_plugin is not None
        self.context_fmha = build.context_fmha
        self.query_key_value = DecoderLinear(config.hidden_size, config.qkv_size, config.add_qkv_bias, build)
        self.dense = DecoderLinear(config.q_size, config.hidden_size, False, build)

    def forward(self, hidden: torch.Tensor, rotary: torch.Tensor, batch: AttentionBatch,
                kv_cache: KVCache) -> torch.Tensor:
        """`rotary`: the rotary frequencies, inv_freq [rotary_dim // 2] for the plugin,
        exp(i * angle) per token (reference.rotary_frequencies) otherwise."""
        config = self.config
        heads, groups, head_dim = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
        keys, values = kv_cache.keys[self.layer_index], kv_cache.values[self.layer_index]
        scale = 1.0 / math.sqrt(head_dim)
        qkv = self.query_key_value(hidden)
        if self.plugin:
            from glm_engine.kernels.decode_attention import decode_attention
            from glm_engine.kernels.rotary_kv import rotary_kv_write

            query = rotary_kv_write(qkv, batch.positions, rotary, config.position_scale, batch.slot_mapping,
                                    keys, values, heads)
            if batch.decode:
                context = decode_attention(query, keys, values, batch.block_tables, batch.context_lengths,
                                           kv_cache.block_size, scale, batch.max_context)
                return self.dense(context.flatten(1))
            if self.context_fmha is not None:
                from glm_engine.kernels.context_attention import context_attention

                context = context_attention(query, keys, values, batch.block_tables, batch.context_lengths,
                                            batch.new_token_counts, batch.last_token_index, batch.max_new_tokens,
                                            kv_cache.block_size, scale, self.context_fmha == "enabled")
                return self.dense(context.flatten(1))
        else:
            qkv = qkv.view(-1, heads + 2 * groups, head_dim)
            # Query and key heads rotate together: one rotary pass instead of two.
            query_key = reference.apply_rotary(qkv[:, :heads + groups], rotary)
            query = query_key[:, :heads]
            kv_cache.write(self.layer_index, batch.slot_mapping, query_key[:, heads:], qkv[:, heads + groups:])
        # Without context FMHA the context phase runs the unfused reference.
        context = reference.paged_attention(query, keys, values, batch.query_index, batch.output_rows,
                                            batch.key_slots, batch.attention_bias, scale)
        return self.dense(context.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, build: BuildConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = DecoderLinear(config.hidden_size, 2 * config.ffn_hidden_size, False, build)
        self.dense_4h_to_h = DecoderLinear(config.ffn_hidden_size, config.hidden_size, False, build)
        self.fused_swiglu = build.use_layernorm_plugin is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_up = self.dense_h_to_4h(hidden)
        if self.fused_swiglu:
            from glm_engine.kernels.swiglu import swiglu

            return self.dense_4h_to_h(swiglu(gate_up))
        return self.dense_4h_to_h(reference.swiglu(gate_up))


class DecoderLayer(nn.Module):
    """h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h)). It takes RMSNorm(x) and x,
    and returns RMSNorm'(y) and y, where RMSNorm' is the next layer's input norm
    (or the final norm): each residual add is fused with the norm after it."""

    def __init__(self, config: ModelConfig, layer_index: int, build: BuildConfig) -> None:
        super().__init__()
        fused = build.use_layernorm_plugin is not None
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, fused)
        self.self_attention = SelfAttention(config, layer_index, build)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, fused)
        self.mlp = MLP(config, build)

    def forward(self, normed: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm, rotary: torch.Tensor,
                batch: AttentionBatch, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.self_attention(normed, rotary, batch, kv_cache)
        normed, residual = self.post_attention_layernorm(attention, residual)
        return next_norm(self.mlp(normed), residual)


class ChatGLM2Model(nn.Module):
    """Embedding, decoder layers, final RMSNorm and the (untied) output layer."""

    def __init__(self, config: ModelConfig, build: BuildConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = Table(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, build) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon,
                                       build.use_layernorm_plugin is not None)
        self.output_layer = Table(config.vocab_size, config.hidden_size)
        self.register_buffer("inv_freq", reference.rotary_inv_freq(config.rotary_dim, config.rotary_base),
                             persistent=False)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [N, hidden_size] of N packed new tokens, after the final norm;
        writes their K/V into `kv_cache`."""
        residual = self.word_embeddings.embed(input_ids)
        rotary = self.inv_freq
        if not self.layers[0].self_attention.plugin:  # angles once per step, not per layer
            rotary = reference.rotary_frequencies(batch.positions, self.inv_freq, self.config.position_scale)
        normed, residual = self.layers[0].input_layernorm(None, residual)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.final_layernorm]
        for layer, next_norm in zip(self.layers, next_norms):
            normed, residual = layer(normed, residual, next_norm, rotary, batch, kv_cache)
        return normed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab_size] of the given hidden states."""
        return self.output_layer(hidden).float()


def build_model(config: ModelConfig, build: BuildConfig, weights: dict[str, torch.Tensor],
                device: torch.device) -> ChatGLM2Model:
    """A ChatGLM2Model on `device` holding exactly `weights` (runtime-layout names),
    with the ops the build flags chose."""
    network = ChatGLM2Model(config, build)
    network.load_state_dict(weights, strict=True, assign=True)
    return network.to(device).eval()
