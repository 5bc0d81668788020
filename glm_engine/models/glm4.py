"""The GLM-4-0414 family (GLM-4-9B-0414, GLM-Z1-9B; model_type "glm4", transformers'
Glm4ForCausalLM): ChatGLM2's network with two more RMSNorms per layer, on the attention
output before its residual add (post_self_attn_layernorm) and on the MLP output before
its residual add (post_mlp_layernorm):

    h = x + N_sa(Attn(N_in(x)));  y = h + N_mlp(MLP(N_post(h)))

The config.json and checkpoint names are transformers' GLM layout (models/glm.py);
attention, MLP, the linears' runtime layout and tensor-parallel cuts are ChatGLM's
(the two norms are replicated on every rank)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glm_engine.config import ModelConfig
from glm_engine.models import chatglm, glm
from glm_engine.models.chatglm import LINEARS, MLP, UP_PROJECTION, ChatGLM2Model, SelfAttention, tensor_split  # noqa: F401
from glm_engine.models.layers import RMSNorm
from glm_engine.runtime.kv_cache import KVCache
from glm_engine.runtime.op_table import Ops

MODEL_TYPE = "glm4"
IGNORED_TENSORS = glm.IGNORED_TENSORS
_OUTPUT_NORMS = ("post_self_attn_layernorm.weight", "post_mlp_layernorm.weight")


def model_config(hf_config: dict[str, Any], rope_ratio_mode: str | None = None) -> ModelConfig:
    """Reads a Glm4ForCausalLM `config.json` (GlmForCausalLM's fields)."""
    return glm.read_config(hf_config, rope_ratio_mode, MODEL_TYPE)


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Runtime-layout parameter name -> shape, unquantized: ChatGLM's and the two output norms."""
    shapes = chatglm.weight_shapes(config)
    for i in range(config.num_layers):
        for name in _OUTPUT_NORMS:
            shapes[f"layers.{i}.{name}"] = (config.hidden_size,)
    return shapes


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the network, from the shapes alone."""
    return chatglm.parameter_count(config) + config.num_layers * 2 * config.hidden_size


def checkpoint_tensors(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (runtime-layout name, shape)."""
    return glm.layout_tensors(config, weight_shapes(config))


# --- the network ----------------------------------------------------------------------

class DecoderLayer(nn.Module):
    """ChatGLM's decoder layer with each branch normed before its residual add. Like
    ChatGLM's, it takes N_in(x) and x and returns the next layer's N_in(y) and y; the
    branch norms are plain RMSNorms (no residual of their own)."""

    def __init__(self, config: ModelConfig, layer_index: int, ops: Ops) -> None:
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops)
        self.self_attention = SelfAttention(config, layer_index, ops)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops)
        self.mlp = MLP(config, ops)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps, ops)

    def forward(self, normed: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm, metadata,
                kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        attention, _ = self.post_self_attn_layernorm(None, self.self_attention(normed, metadata, kv_cache))
        normed, residual = self.post_attention_layernorm(attention, residual)
        mlp, _ = self.post_mlp_layernorm(None, self.mlp(normed))
        return next_norm(mlp, residual)


def build_network(config: ModelConfig, ops: Ops, weights: dict[str, torch.Tensor],
                  device: torch.device) -> ChatGLM2Model:
    """The network on `device` holding exactly `weights` (runtime-layout names), computing with `ops`."""
    network = ChatGLM2Model(config, ops, DecoderLayer)
    network.load_state_dict(weights, strict=True, assign=True)
    return network.to(device).eval()


# --- the Hugging Face reference ---------------------------------------------------------

def reference_config(config: ModelConfig):
    """transformers' Glm4Config of the same network."""
    from transformers import Glm4Config

    return Glm4Config(**chatglm.reference_arguments(config))


def reference_model(hf_config) -> nn.Module:
    """transformers' Glm4ForCausalLM of `hf_config`."""
    from transformers import Glm4ForCausalLM

    return Glm4ForCausalLM(hf_config)


def reference_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Glm4ForCausalLM parameters from dense runtime-layout weights."""
    state = chatglm.reference_state_dict(config, weights)
    for i in range(config.num_layers):
        for name in _OUTPUT_NORMS:
            state[f"model.layers.{i}.{name}"] = weights[f"layers.{i}.{name}"]
    return state
