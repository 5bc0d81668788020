"""The Hugging Face reference: transformers' own `GlmForCausalLM`, which computes
the ChatGLM2 network (DESIGN.md §3), filled from a ChatGLM2 checkpoint by
renaming and splitting tensors. No code from the checkpoint runs, unless the
user asks for its own modeling code with `trust_remote_code`."""

from __future__ import annotations

from pathlib import Path

import torch

from glm_engine import GlmEngineError
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
                    attn_implementation: str = "sdpa"):
    """GlmForCausalLM on `device` with exactly these weights, in their dtype
    (weight-only quantized linears dequantized to it)."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    dtype = weights["word_embeddings.weight"].dtype
    weights = dequantize_weights(weights, dtype)
    hf_config = glm_config(config)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = GlmForCausalLM(hf_config)
    model.load_state_dict(glm_state_dict(config, weights), strict=True, assign=True)
    # The rotary module's buffers are not in the state dict and were made on meta.
    model.model.rotary_emb = GlmRotaryEmbedding(config=hf_config)
    return model.to(device=device, dtype=dtype).eval()


def load_hf_reference(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
                      config: ModelConfig | None = None, trust_remote_code: bool = False):
    """The Hugging Face model of a checkpoint: GlmForCausalLM by default, the
    checkpoint's own modeling code only with `trust_remote_code`. `config`
    (default: read from the checkpoint) fixes how rope_ratio applies."""
    from weight import load_hf_config, load_hf_weights

    if trust_remote_code:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype)
        except Exception as error:  # noqa: BLE001 - remote code fails in many ways on new transformers
            raise GlmEngineError(f"the checkpoint's own modeling code failed to load ({error}); "
                                 "drop --hf_trust_remote_code to use GlmForCausalLM") from None
        return model.to(device).eval()
    config = config or ModelConfig.from_hf_config(load_hf_config(model_dir))
    return build_glm_model(config, load_hf_weights(model_dir, config, dtype), device)


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, end_id: int, pad_id: int) -> list[list[int]]:
    """Greedy outputs of the Hugging Face model for a batch (left-padded, with its
    attention mask), each cut before the first end token."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=pad_id,
                               num_beams=1, top_k=None, top_p=None, temperature=None)
    outputs = []
    for row in generated[:, width:].tolist():
        outputs.append(row[:row.index(end_id)] if end_id in row else row)
    return outputs
