"""The Hugging Face reference: transformers' own `GlmForCausalLM`, which computes
the ChatGLM2 network, filled with runtime-layout weights (an engine's, or a
checkpoint's through weight.py) by renaming and splitting tensors, and its
batched greedy generation."""

from __future__ import annotations

import torch

from glm_engine.config import ModelConfig
from glm_engine.quantization import dequantize_weights


def glm_config(config: ModelConfig):
    """transformers' GlmConfig of the same network."""
    from transformers import GlmConfig

    rope = {"rope_type": "default", "rope_theta": config.rotary_base, "partial_rotary_factor": 0.5}
    if config.position_scale != 1.0:
        # Dividing positions by rope_ratio equals dividing every frequency by it.
        rope = {**rope, "rope_type": "linear", "factor": 1.0 / config.position_scale}
    return GlmConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.multi_query_group_num,
        head_dim=config.kv_channels, max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layernorm_epsilon, attention_bias=config.add_qkv_bias,
        rope_parameters=rope, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=False)


def glm_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GlmForCausalLM parameters from runtime-layout weights (fused qkv split into q/k/v)."""
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


def build_glm_model(config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device | str,
                    dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """GlmForCausalLM on `device` with exactly these weights, in `dtype` (default: the
    embedding's); weight-only quantized linears are dequantized to it here, once."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    dtype = dtype or weights["word_embeddings.weight"].dtype
    weights = {name: tensor.to(dtype) for name, tensor in dequantize_weights(weights, dtype).items()}
    hf_config = glm_config(config)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = GlmForCausalLM(hf_config)
    model.load_state_dict(glm_state_dict(config, weights), strict=True, assign=True)
    # The rotary module's buffers are not in the state dict and were made on meta.
    model.model.rotary_emb = GlmRotaryEmbedding(config=hf_config)
    return model.to(device=device, dtype=dtype).eval()


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest] of prompts padded on the left, as
    Hugging Face's generate() takes a batch."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention_mask


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, end_id: int, pad_id: int,
                num_beams: int = 1) -> list[list[int]]:
    """Greedy (or, with num_beams, the best beam's) outputs of the Hugging Face model for
    a batch (left-padded, with its attention mask), each cut before the first end token."""
    input_ids, attention_mask = left_padded(prompts, pad_id, next(model.parameters()).device)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=pad_id,
                               num_beams=num_beams, top_k=None, top_p=None, temperature=None)
    outputs = []
    for row in generated[:, input_ids.shape[1]:].tolist():
        outputs.append(row[:row.index(end_id)] if end_id in row else row)
    return outputs
