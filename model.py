"""The ChatGLM2 network as torch modules, over packed token streams and the
block-addressed KV cache. Any size, float32/float16/bfloat16.

Parameter names are the engine's runtime layout (fused query_key_value, fused
dense_h_to_4h); weight.py maps Hugging Face checkpoints onto them. Each layer takes
its ops from the op table chosen once for the engine and device (glm_engine/ops.py):
plain PyTorch or the Triton kernels ("plugins") that compute the same functions.
load_session hands this network to the runtime (glm_engine/runtime)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glm_engine.config import ModelConfig
from glm_engine.engine import Engine
from glm_engine.ops import Ops
from glm_engine.quantization import BITS
from glm_engine.tensor_parallel import vocab_rows_per_rank
from glm_engine.runtime.kv_cache import KVCache
from glm_engine.runtime.session import Session

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
    """RMSNorm that also adds a branch into the residual stream first (one kernel
    with --use_layernorm_plugin)."""

    def __init__(self, size: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=UNLOADED), requires_grad=False)
        self.eps = eps
        self.add_rms_norm = ops.add_rms_norm

    def forward(self, branch: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized residual + branch, residual + branch)."""
        return self.add_rms_norm(branch, residual, self.weight, self.eps)


class DecoderLinear(nn.Module):
    """A linear layer of a decoder layer: weight [out, in] in the model dtype, or
    int8 / packed int4 with `weight_scales` per output channel, or per group of input
    channels of each (--use_weight_only, --weight_only_group_size),
    computed by the op table's linear (cuBLAS, or the skinny-GEMM kernel for
    decode-sized inputs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops) -> None:
        super().__init__()
        self.quant_bits = BITS.get(ops.build.weight_only_precision, 0)
        packed_in = in_features // 2 if self.quant_bits == 4 else in_features
        self.weight = nn.Parameter(torch.empty(out_features, packed_in, device=UNLOADED), requires_grad=False)
        group = ops.build.weight_only_group_size
        scale_shape = (out_features, in_features // group) if group else (out_features,)
        self.weight_scales = nn.Parameter(torch.empty(scale_shape, device=UNLOADED), requires_grad=False) \
            if self.quant_bits else None
        self.bias = nn.Parameter(torch.empty(out_features, device=UNLOADED), requires_grad=False) if bias else None
        self.linear = ops.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias, self.weight_scales, self.quant_bits)


class SelfAttention(nn.Module):
    """Fused QKV projection, then the op table's attention backend (rotary on the
    first half of each head, KV-cache write, grouped causal attention), then the
    output projection."""

    def __init__(self, config: ModelConfig, layer_index: int, ops: Ops) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attention = ops.attention
        self.query_key_value = DecoderLinear(config.hidden_size, config.qkv_size, config.add_qkv_bias, ops)
        self.dense = DecoderLinear(config.q_size, config.hidden_size, False, ops)
        self.all_reduce = ops.all_reduce

    def forward(self, hidden: torch.Tensor, metadata, kv_cache: KVCache) -> torch.Tensor:
        """`metadata`: the attention backend's for this step (glm_engine/attention.py)."""
        context = self.attention(self.query_key_value(hidden), self.layer_index, metadata, kv_cache)
        return self.all_reduce(self.dense(context))  # row-parallel: the ranks' partial sums


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.dense_h_to_4h = DecoderLinear(config.hidden_size, 2 * config.ffn_hidden_size, False, ops)
        self.dense_4h_to_h = DecoderLinear(config.ffn_hidden_size, config.hidden_size, False, ops)
        self.gated_linear = ops.gated_linear
        self.all_reduce = ops.all_reduce

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        up = self.dense_h_to_4h  # [gate, up] -> silu(gate) * up, in one kernel where the op table can
        activation = self.gated_linear(hidden, up.weight, up.bias, up.weight_scales, up.quant_bits)
        return self.all_reduce(self.dense_4h_to_h(activation))


class DecoderLayer(nn.Module):
    """h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h)). It takes RMSNorm(x) and x,
    and returns RMSNorm'(y) and y, where RMSNorm' is the next layer's input norm
    (or the final norm): each residual add is fused with the norm after it."""

    def __init__(self, config: ModelConfig, layer_index: int, ops: Ops) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, ops)
        self.self_attention = SelfAttention(config, layer_index, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, ops)
        self.mlp = MLP(config, ops)

    def forward(self, normed: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm, metadata,
                kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.self_attention(normed, metadata, kv_cache)
        normed, residual = self.post_attention_layernorm(attention, residual)
        return next_norm(self.mlp(normed), residual)


class ChatGLM2Model(nn.Module):
    """Embedding, decoder layers, final RMSNorm and the (untied) output layer. Under
    tensor parallelism, one rank's share (glm_engine/tensor_parallel.py): `config` is
    the shape the rank computes, the output layer holds its share of the vocabulary."""

    def __init__(self, config: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = Table(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, ops) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, ops)
        self.output_layer = Table(vocab_rows_per_rank(config, ops.build.world_size), config.hidden_size)
        self.gather_vocab = ops.gather_vocab
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, metadata, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [N, hidden_size] of N packed new tokens, after the final norm;
        writes their K/V into `kv_cache`. `metadata`: the attention backend's for this step."""
        normed, residual = self.layers[0].input_layernorm(None, self.word_embeddings.embed(input_ids))
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.final_layernorm]
        for layer, next_norm in zip(self.layers, next_norms):
            normed, residual = layer(normed, residual, next_norm, metadata, kv_cache)
        return normed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab_size] of the given hidden states."""
        return self.gather_vocab(self.output_layer(hidden)).float()


def build_model(config: ModelConfig, ops: Ops, weights: dict[str, torch.Tensor],
                device: torch.device) -> ChatGLM2Model:
    """A ChatGLM2Model on `device` holding exactly `weights` (runtime-layout names),
    computing with `ops`."""
    network = ChatGLM2Model(config, ops)
    network.load_state_dict(weights, strict=True, assign=True)
    return network.to(device).eval()


def load_session(engine: Engine | str | Path, device: str | torch.device | None = None,
                 **options) -> Session:
    """A generation session running this network on an engine (a directory or a loaded
    Engine); `options` as Session's (cuda_graphs, KV-pool sizing)."""
    return Session(engine, build_model, device, **options)
