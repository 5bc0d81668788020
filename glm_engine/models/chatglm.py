"""The ChatGLM family (ChatGLM2-6B, ChatGLM3-6B and their long-context versions;
model_type "chatglm"): its checkpoint config, the checkpoint's tensor names, the
runtime layout's shapes and tensor-parallel cuts, the network, and the Hugging Face
reference (transformers' GlmForCausalLM computes the same network).

The network runs over packed token streams and the block-addressed KV cache, in
any size, float32/float16/bfloat16. Its parameter names are the runtime layout
(fused query_key_value, fused [gate; up] dense_h_to_4h)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig, vocab_rows_per_rank
from glm_engine.models.layers import DecoderLinear, RMSNorm, Table
from glm_engine.presets import CHATGLM2_6B
from glm_engine.runtime.op_table import Ops
from glm_engine.runtime.kv_cache import KVCache

MODEL_TYPE = "chatglm"

# Fields whose other values describe a network this module does not compute.
_REQUIRED_VALUES = {
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "original_rope": True,
    "fp32_residual_connection": False,
    "tie_word_embeddings": False,
}
_REQUIRED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                    "ffn_hidden_size", "padded_vocab_size")


def model_config(hf_config: dict[str, Any], rope_ratio_mode: str | None = None) -> ModelConfig:
    """Reads a ChatGLM2/ChatGLM3 `config.json`; refuses, with the reason, a config this
    network cannot compute."""
    for name in _REQUIRED_FIELDS:
        if name not in hf_config:
            raise GlmEngineError(f"config.json lacks {name!r}: not a ChatGLM2/ChatGLM3 checkpoint "
                                 "(ChatGLM-6B v1 is not supported)")
    for name, required in _REQUIRED_VALUES.items():
        value = hf_config.get(name, CHATGLM2_6B[name])
        if not isinstance(value, bool):
            raise GlmEngineError(f"config.json: {name} must be true or false, got {value!r}")
        if value != required:
            raise GlmEngineError(f"config.json sets {name}={value!r}; this engine computes only "
                                 f"ChatGLM2's {name}={required}")
    heads = hf_config["num_attention_heads"]
    multi_query = hf_config.get("multi_query_attention", False)
    if not isinstance(multi_query, bool):
        raise GlmEngineError(f"config.json: multi_query_attention must be true or false, got {multi_query!r}")
    groups = hf_config.get("multi_query_group_num", heads) if multi_query else heads
    return ModelConfig(
        num_layers=hf_config["num_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=heads,
        kv_channels=hf_config["kv_channels"],
        multi_query_group_num=groups,
        ffn_hidden_size=hf_config["ffn_hidden_size"],
        vocab_size=hf_config["padded_vocab_size"],
        seq_length=hf_config.get("seq_length", 32768),
        layernorm_epsilon=hf_config.get("layernorm_epsilon", 1e-5),
        add_qkv_bias=hf_config.get("add_qkv_bias", True),
        rope_ratio=hf_config.get("rope_ratio", 1.0),
        rope_ratio_mode=rope_ratio_mode or default_rope_ratio_mode(hf_config),
        eos_token_id=first_id(hf_config.get("eos_token_id", 2)),
        eos_token_ids=end_id_list(hf_config.get("eos_token_id", 2)),
        pad_token_id=first_id(hf_config.get("pad_token_id", 0)),
        model_type=MODEL_TYPE,
    )


def default_rope_ratio_mode(hf_config: dict[str, Any]) -> str:
    """ChatGLM2-6B-32k scales positions; ChatGLM3 and GLM-4 scale the base."""
    name = str(hf_config.get("_name_or_path", "")).lower()
    return "positions" if "chatglm2" in name else "base" if "rope_ratio" in hf_config else "positions"


def first_id(value: Any) -> Any:
    """A token id, or the first of a list of them (ChatGLM3 and GLM-4 list several end ids);
    ModelConfig checks what it is."""
    return value[0] if isinstance(value, list) and value else value


def end_id_list(value: Any) -> tuple:
    """Every end id of a config's eos_token_id (one id, or a list: GLM-4 lists three);
    ModelConfig checks them."""
    return tuple(value) if isinstance(value, list) else ()


# --- the runtime layout -------------------------------------------------------------

# The decoder-layer linears (quantized by --use_weight_only), and the one computed
# through the op table's gated_linear.
LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
UP_PROJECTION = "mlp.dense_h_to_4h"


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


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the network, from the shapes alone (no loop over layers, so that a
    config with an absurd layer count is sized before anything is allocated)."""
    per_layer = (2 * config.hidden_size + config.qkv_size * (config.hidden_size + int(config.add_qkv_bias))
                 + config.hidden_size * config.q_size + 3 * config.ffn_hidden_size * config.hidden_size)
    return config.num_layers * per_layer + config.hidden_size * (2 * config.vocab_size + 1)


def tensor_split(name: str) -> str | None:
    """How tensor parallelism cuts runtime-layout tensor `name` (tensor_parallel.py):
    "qkv" (rows by query heads and the K/V groups they read), "gate_up" (rows of each
    half), "row_parallel" (input columns), "vocab" (output rows), or None (replicated)."""
    if name == "output_layer.weight":
        return "vocab"
    if ".query_key_value." in name:
        return "qkv"
    if ".dense_h_to_4h." in name:
        return "gate_up"
    if ".self_attention.dense." in name or ".dense_4h_to_h." in name:
        return "row_parallel"
    return None


# --- the checkpoint's tensor names ----------------------------------------------------

def checkpoint_tensors(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (runtime-layout name, shape): ChatGLM2 checkpoints hold
    the runtime layout itself, one tensor for each."""
    return {checkpoint_name(name): (name, shape) for name, shape in weight_shapes(config).items()}


# Derivable from the config; present in ChatGLM2 checkpoints, not used.
IGNORED_TENSORS = frozenset({"transformer.rotary_pos_emb.inv_freq"})


def runtime_name(checkpoint_name: str) -> str:
    """Hugging Face ChatGLM2 parameter name -> runtime-layout name."""
    name = checkpoint_name.removeprefix("transformer.")
    name = name.replace("embedding.word_embeddings.", "word_embeddings.", 1)
    return name.removeprefix("encoder.")


def checkpoint_name(runtime: str) -> str:
    """Runtime-layout name -> Hugging Face ChatGLM2 parameter name."""
    if runtime.startswith("word_embeddings."):
        return "transformer.embedding." + runtime
    if runtime.startswith(("layers.", "final_layernorm.")):
        return "transformer.encoder." + runtime
    return "transformer." + runtime


# --- the network ----------------------------------------------------------------------

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
        """`metadata`: the attention backend's for this step (glm_engine/runtime/attention.py)."""
        context = self.attention(self.query_key_value(hidden), self.layer_index, metadata, kv_cache)
        return self.all_reduce(self.dense(context))  # row-parallel: the ranks' partial sums


class MLP(nn.Module):
    """SwiGLU(gate, up) of the fused [gate; up] projection, then the down projection."""

    def __init__(self, config: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.dense_h_to_4h = DecoderLinear(config.hidden_size, 2 * config.ffn_hidden_size, False, ops, gated=True)
        self.dense_4h_to_h = DecoderLinear(config.ffn_hidden_size, config.hidden_size, False, ops)
        self.all_reduce = ops.all_reduce

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(self.dense_4h_to_h(self.dense_h_to_4h(hidden)))


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
    tensor parallelism, one rank's share (glm_engine/engine_format/tensor_parallel.py): `config` is
    the shape the rank computes, the output layer holds its share of the vocabulary. A decoder
    layer class takes (config, layer_index, ops) and is called as DecoderLayer is."""

    def __init__(self, config: ModelConfig, ops: Ops, layer_class: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = Table(config.vocab_size, config.hidden_size)
        layer_class = layer_class or DecoderLayer  # another family's decoder layer (glm4.py)
        self.layers = nn.ModuleList(layer_class(config, i, ops) for i in range(config.num_layers))
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


def build_network(config: ModelConfig, ops: Ops, weights: dict[str, torch.Tensor],
                  device: torch.device) -> ChatGLM2Model:
    """A ChatGLM2Model on `device` holding exactly `weights` (runtime-layout names),
    computing with `ops`."""
    network = ChatGLM2Model(config, ops)
    network.load_state_dict(weights, strict=True, assign=True)
    return network.to(device).eval()


# --- the Hugging Face reference ---------------------------------------------------------

def reference_config(config: ModelConfig):
    """transformers' GlmConfig of the same network."""
    from transformers import GlmConfig

    return GlmConfig(**reference_arguments(config))


def reference_arguments(config: ModelConfig) -> dict:
    """The GlmConfig (or Glm4Config) arguments of `config`'s shape and constants."""
    rope = {"rope_type": "default", "rope_theta": config.rotary_base, "partial_rotary_factor": 0.5}
    if config.position_scale != 1.0:
        # Dividing positions by rope_ratio equals dividing every frequency by it.
        rope = {**rope, "rope_type": "linear", "factor": 1.0 / config.position_scale}
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.multi_query_group_num,
        head_dim=config.kv_channels, max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layernorm_epsilon, attention_bias=config.add_qkv_bias,
        rope_parameters=rope, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=False)


def reference_model(hf_config) -> nn.Module:
    """transformers' model of `hf_config` (reference_config's), its parameters where torch's
    default device puts them."""
    from transformers import GlmForCausalLM

    return GlmForCausalLM(hf_config)


def reference_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GlmForCausalLM parameters from dense runtime-layout weights (fused qkv split into q/k/v)."""
    state = {"model.embed_tokens.weight": weights["word_embeddings.weight"],
             "model.norm.weight": weights["final_layernorm.weight"],
             "lm_head.weight": weights["output_layer.weight"]}
    sizes = [config.q_size, config.kv_size, config.kv_size]
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        state[theirs + "input_layernorm.weight"] = weights[ours + "input_layernorm.weight"]
        state[theirs + "post_attention_layernorm.weight"] = weights[ours + "post_attention_layernorm.weight"]
        qkv = weights[ours + "self_attention.query_key_value.weight"].split(sizes)
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), qkv):
            state[theirs + f"self_attn.{name}.weight"] = tensor
        if config.add_qkv_bias:
            bias = weights[ours + "self_attention.query_key_value.bias"].split(sizes)
            for name, tensor in zip(("q_proj", "k_proj", "v_proj"), bias):
                state[theirs + f"self_attn.{name}.bias"] = tensor
        state[theirs + "self_attn.o_proj.weight"] = weights[ours + "self_attention.dense.weight"]
        state[theirs + "mlp.gate_up_proj.weight"] = weights[ours + "mlp.dense_h_to_4h.weight"]
        state[theirs + "mlp.down_proj.weight"] = weights[ours + "mlp.dense_4h_to_h.weight"]
    return state
