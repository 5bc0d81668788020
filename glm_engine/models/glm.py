"""The GLM family in transformers' layout (GLM-4-9B(-chat)-hf; model_type "glm",
GlmForCausalLM): ChatGLM2's network under other names. Its config.json is read here
and its tensors mapped onto the runtime layout (q/k/v projections fused into
query_key_value, gate_up_proj is dense_h_to_4h); the network, its layout, its
tensor-parallel cuts and its Hugging Face reference are ChatGLM's (models/chatglm.py).
glm4.py reads its config and names through the functions here."""

from __future__ import annotations

from typing import Any

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig, is_integer
from glm_engine.models.chatglm import (LINEARS, UP_PROJECTION, build_network, end_id_list, first_id,  # noqa: F401
                                       parameter_count, reference_config, reference_model, reference_state_dict,
                                       tensor_split, weight_shapes)

MODEL_TYPE = "glm"

# transformers' GlmConfig defaults, which a config.json without the field gets there.
DEFAULTS = {"num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 131072,
            "rms_norm_eps": 1.5625e-07, "attention_bias": True, "hidden_act": "silu", "tie_word_embeddings": False,
            "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338]}
_REQUIRED_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def model_config(hf_config: dict[str, Any], rope_ratio_mode: str | None = None) -> ModelConfig:
    """Reads a GlmForCausalLM `config.json`; refuses, with the reason, a config this
    network cannot compute."""
    return read_config(hf_config, rope_ratio_mode, MODEL_TYPE)


def read_config(hf_config: dict[str, Any], rope_ratio_mode: str | None, model_type: str) -> ModelConfig:
    """A transformers-layout GLM config.json (GlmConfig's or Glm4Config's fields) as the
    ModelConfig of family `model_type`."""
    if rope_ratio_mode is not None:
        raise GlmEngineError("--rope_ratio_mode applies to ChatGLM checkpoints' rope_ratio; this checkpoint "
                             "gives its rotary base as rope_theta, so drop the flag")
    for name in _REQUIRED_FIELDS:
        if name not in hf_config:
            raise GlmEngineError(f"config.json lacks {name!r}: not a transformers GLM-4 checkpoint")
    value = {name: hf_config.get(name, DEFAULTS.get(name)) for name in (*_REQUIRED_FIELDS, *DEFAULTS)}
    _check_network(value, hf_config)
    heads = value["num_attention_heads"]
    hidden = value["hidden_size"]
    head_dim = value["head_dim"] if value["head_dim"] is not None else _divided(hidden, heads)
    groups = value["num_key_value_heads"] if value["num_key_value_heads"] is not None else heads
    pad = value["pad_token_id"] if value["pad_token_id"] is not None else 0
    return ModelConfig(
        num_layers=value["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        kv_channels=head_dim, multi_query_group_num=groups, ffn_hidden_size=value["intermediate_size"],
        vocab_size=value["vocab_size"], seq_length=value["max_position_embeddings"],
        layernorm_epsilon=value["rms_norm_eps"], add_qkv_bias=value["attention_bias"], rope_ratio=1.0,
        rope_ratio_mode="base", rope_base=_rope_theta(hf_config), eos_token_id=first_id(value["eos_token_id"]),
        eos_token_ids=end_id_list(value["eos_token_id"]), pad_token_id=first_id(pad), model_type=model_type)


def _divided(hidden: Any, heads: Any) -> Any:
    """hidden // heads, as transformers derives a missing head_dim (ModelConfig checks the types)."""
    return hidden // heads if is_integer(hidden) and is_integer(heads) and heads > 0 else hidden


def _check_network(value: dict[str, Any], hf_config: dict[str, Any]) -> None:
    """Refuses the fields whose values describe another network."""
    if value["hidden_act"] != "silu":
        raise GlmEngineError(f"config.json sets hidden_act={value['hidden_act']!r}; this engine computes only "
                             "SwiGLU (silu)")
    if value["tie_word_embeddings"] is not False:
        raise GlmEngineError(f"config.json sets tie_word_embeddings={value['tie_word_embeddings']!r}; this engine "
                             "computes only an untied output layer (false)")
    rope = _rope_parameters(hf_config)
    factor = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 0.5))
    if factor != 0.5:
        raise GlmEngineError(f"config.json sets partial_rotary_factor={factor!r}; this engine rotates half of "
                             "each head (0.5)")
    if rope.get("rope_type", "default") != "default":
        raise GlmEngineError(f"config.json's rope scaling {rope.get('rope_type')!r} is not supported; only the "
                             "default rotary embedding is")


def _rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling (before), or {} when neither is set."""
    for name in ("rope_parameters", "rope_scaling"):
        rope = hf_config.get(name)
        if rope is not None:
            if not isinstance(rope, dict):
                raise GlmEngineError(f"config.json: {name} must be an object, got {rope!r}")
            return {key: value for key, value in rope.items() if key != "type"} | (
                {"rope_type": rope["type"]} if "type" in rope and "rope_type" not in rope else {})
    return {}


def _rope_theta(hf_config: dict[str, Any]) -> Any:
    return _rope_parameters(hf_config).get("rope_theta", hf_config.get("rope_theta", DEFAULTS["rope_theta"]))


# --- the checkpoint's tensor names ----------------------------------------------------

IGNORED_TENSORS: frozenset[str] = frozenset()

# Runtime-layout name in a layer -> the checkpoint's names of its parts, in row order.
_LAYER_PARTS = {
    "self_attention.query_key_value.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                              "self_attn.v_proj.weight"),
    "self_attention.query_key_value.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                            "self_attn.v_proj.bias"),
    "self_attention.dense.weight": ("self_attn.o_proj.weight",),
    "mlp.dense_h_to_4h.weight": ("mlp.gate_up_proj.weight",),
    "mlp.dense_4h_to_h.weight": ("mlp.down_proj.weight",),
}
_TOP_LEVEL = {"word_embeddings.weight": "model.embed_tokens.weight", "final_layernorm.weight": "model.norm.weight",
              "output_layer.weight": "lm_head.weight"}


def layout_tensors(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (runtime-layout name, shape) for the runtime `shapes` of a
    transformers-layout GLM network: fused tensors have one entry per part, in row order."""
    part_rows = {"self_attn.q_proj": config.q_size, "self_attn.k_proj": config.kv_size,
                 "self_attn.v_proj": config.kv_size}
    tensors = {}
    for name, shape in shapes.items():
        if name in _TOP_LEVEL:
            tensors[_TOP_LEVEL[name]] = (name, shape)
            continue
        _, index, inner = name.split(".", 2)  # "layers", i, the name in the layer
        for part in _LAYER_PARTS.get(inner, (inner,)):
            rows = part_rows.get(part.rsplit(".", 1)[0], shape[0])
            tensors[f"model.layers.{index}.{part}"] = (name, (rows, *shape[1:]))
    return tensors


def checkpoint_tensors(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (runtime-layout name, shape); q/k/v are three parts of
    query_key_value."""
    return layout_tensors(config, weight_shapes(config))
