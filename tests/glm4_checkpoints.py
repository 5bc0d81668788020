"""Write tiny GLM-4 checkpoints in transformers' layout for tests: GLM-4-9B-chat-hf's
(model_type "glm", GlmForCausalLM) and GLM-4-9B-0414's (model_type "glm4",
Glm4ForCausalLM). config.json has the fields of the published checkpoints' files;
tensor names and shapes are those transformers' models load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

GLM4_LAYOUTS = ("glm", "glm4")


def tiny_glm_config(model_type: str = "glm", **overrides: object) -> dict:
    """A GLM-4-9B-chat-hf (glm) or GLM-4-9B-0414 (glm4) config.json with tiny sizes."""
    config = {
        "architectures": ["GlmForCausalLM" if model_type == "glm" else "Glm4ForCausalLM"],
        "model_type": model_type,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": [5, 7, 9],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 5,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07 if model_type == "glm" else 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "use_cache": True,
        "vocab_size": 1024,
    }
    config.update(overrides)
    return config


def glm_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 weights with every parameter name and shape transformers' model of
    `config` has, scaled as checkpoints.chatglm2_state_dict scales ChatGLM2's (norms 1 +
    noise, matrices 1/sqrt(fan_in), a wide output layer)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, heads, groups = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, ffn, vocab = config["head_dim"], config["intermediate_size"], config["vocab_size"]

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    state = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config["model_type"] == "glm4":
        norms += ["post_self_attn_layernorm", "post_mlp_layernorm"]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", groups * head_dim), ("v_proj", groups * head_dim)):
            state[prefix + f"self_attn.{name}.weight"] = normal(rows, hidden, std=1 / math.sqrt(hidden))
            state[prefix + f"self_attn.{name}.bias"] = normal(rows, std=0.1)
        state[prefix + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim, std=0.5 / math.sqrt(hidden))
        state[prefix + "mlp.gate_up_proj.weight"] = normal(2 * ffn, hidden, std=1 / math.sqrt(hidden))
        state[prefix + "mlp.down_proj.weight"] = normal(hidden, ffn, std=0.5 / math.sqrt(ffn))
        for norm in norms:
            state[prefix + f"{norm}.weight"] = normal(hidden, std=0.1, mean=1.0)
    state["model.norm.weight"] = normal(hidden, std=0.1, mean=1.0)
    state["lm_head.weight"] = normal(vocab, hidden, std=3 / math.sqrt(hidden))
    return state


def write_glm_checkpoint(model_dir: str | Path, config: dict, state_dict: dict[str, torch.Tensor],
                         sharded: bool = True, generation_config: dict | None = None) -> Path:
    """config.json and model.safetensors, or (sharded) two shards cut inside the first
    layer's attention, so that its q and k projections lie in different files."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if not sharded:
        save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(state_dict)
    cut = names.index("model.layers.0.self_attn.k_proj.weight")
    weight_map = {}
    for number, group in enumerate((names[:cut], names[cut:]), start=1):
        file_name = f"model-{number:05d}-of-00002.safetensors"
        save_file({name: state_dict[name] for name in group}, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in group})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state_dict.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
