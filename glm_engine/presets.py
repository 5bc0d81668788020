"""Checkpoint configs of the reference sizes, for dummy engines (build.py without
--model_dir): each is the config.json its family reads. Kept apart from the family
modules so that the tools read them without importing torch."""

# ChatGLM2-6B's config.json: the default shape of dummy engines.
CHATGLM2_6B = {
    "model_type": "chatglm",
    "num_layers": 28,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 13696,
    "padded_vocab_size": 65024,
    "seq_length": 32768,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "add_qkv_bias": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "original_rope": True,
    "fp32_residual_connection": False,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# ChatGLM3-6B's config.json: ChatGLM2-6B's network with an 8K context.
CHATGLM3_6B = {**CHATGLM2_6B, "seq_length": 8192}

# GLM-4-9B(-chat)'s config.json in THUDM's layout (model_type "chatglm"): rotary base
# 10000 * rope_ratio, three end ids.
GLM_4_9B = {**CHATGLM2_6B, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072,
            "layernorm_epsilon": 1.5625e-07, "rope_ratio": 500, "eos_token_id": [151329, 151336, 151338],
            "pad_token_id": 151329}

# GLM-4-9B-0414's (and GLM-Z1-9B's) config.json: transformers' Glm4ForCausalLM, whose
# layers norm the attention and MLP outputs too.
GLM_4_9B_0414 = {
    "model_type": "glm4",
    "architectures": ["Glm4ForCausalLM"],
    "num_hidden_layers": 40,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "intermediate_size": 13696,
    "vocab_size": 151552,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
}

# TensorRT-LLM's --model_name values for dummy engines, by config.json.
MODEL_NAMES = {"chatglm2_6b": CHATGLM2_6B, "chatglm3_6b": CHATGLM3_6B, "glm_4_9b": GLM_4_9B,
               "glm_4_9b_0414": GLM_4_9B_0414}
# The ones whose dummy engines get GLM-4's kind of demo tokenizer (tiktoken BPE, role tokens).
GLM4_MODEL_NAMES = ("glm_4_9b", "glm_4_9b_0414")

# build.py's dummy-shape flags -> the config.json field each sets, in each layout.
CHATGLM_SHAPE_FIELDS = {"n_layer": "num_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                        "multi_query_group_num": "multi_query_group_num", "inter_size": "ffn_hidden_size",
                        "vocab_size": "padded_vocab_size"}
GLM_SHAPE_FIELDS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                    "multi_query_group_num": "num_key_value_heads", "inter_size": "intermediate_size",
                    "vocab_size": "vocab_size"}


def shape_fields(preset: dict) -> tuple[dict[str, str], str]:
    """(flag -> config.json field, the head-size field) of a preset's layout."""
    if preset["model_type"] == "chatglm":
        return CHATGLM_SHAPE_FIELDS, "kv_channels"
    return GLM_SHAPE_FIELDS, "head_dim"
