"""The network against transformers' GlmForCausalLM filled straight from the
checkpoint's tensors (an oracle independent of weight.py's renaming)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

import build
from glm_engine.config import ModelConfig
from glm_engine.models import read_model_config
from glm_engine.tools.compare import relative_error
from glm_engine.kernels import reference
from glm_engine.runtime.attention import StepLayout
from glm_engine.runtime.kv_cache import KVCache
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import Session
from model import load_session
from glm_engine.text.prompts import random_prompts
from weight import iter_checkpoint_tensors, load_hf_model


def oracle(model_dir, rope: dict | None = None) -> GlmForCausalLM:
    """GlmForCausalLM (float32, eager) with the checkpoint's tensors split by hand."""
    config = json.loads((model_dir / "config.json").read_text())
    heads, groups, head_dim = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    hf_config = GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
        rms_norm_eps=config["layernorm_epsilon"], attention_bias=True, tie_word_embeddings=False,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=0, eos_token_id=2)
    hf_config._attn_implementation = "eager"
    model = GlmForCausalLM(hf_config).eval()
    raw = dict(iter_checkpoint_tensors(model_dir))
    state = {"model.embed_tokens.weight": raw["transformer.embedding.word_embeddings.weight"],
             "model.norm.weight": raw["transformer.encoder.final_layernorm.weight"],
             "lm_head.weight": raw["transformer.output_layer.weight"]}
    for i in range(config["num_layers"]):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = raw[src + "self_attention.query_key_value.weight"].split(
            [heads * head_dim, groups * head_dim, groups * head_dim])
        qb, kb, vb = raw[src + "self_attention.query_key_value.bias"].split(
            [heads * head_dim, groups * head_dim, groups * head_dim])
        state.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                      dst + "self_attn.v_proj.weight": v, dst + "self_attn.q_proj.bias": qb,
                      dst + "self_attn.k_proj.bias": kb, dst + "self_attn.v_proj.bias": vb,
                      dst + "self_attn.o_proj.weight": raw[src + "self_attention.dense.weight"],
                      dst + "mlp.gate_up_proj.weight": raw[src + "mlp.dense_h_to_4h.weight"],
                      dst + "mlp.down_proj.weight": raw[src + "mlp.dense_4h_to_h.weight"],
                      dst + "input_layernorm.weight": raw[src + "input_layernorm.weight"],
                      dst + "post_attention_layernorm.weight": raw[src + "post_attention_layernorm.weight"]})
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    return model


def build_engine(model_dir, output_dir, dtype: str = "float32", *extra: str) -> Session:
    args = build.parse_arguments(["--model_dir", str(model_dir), "--output_dir", str(output_dir), "--dtype", dtype,
                                  "--max_input_len", "64", "--max_output_len", "32", *extra])
    return load_session(build.build(args), "cpu")


def random_prompt(length: int, seed: int) -> list[int]:
    return random_prompts([length], 1000, seed)[0]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_float32_logits_match_glm_for_causal_lm(tiny_checkpoint_factory, tmp_path, fmt):
    model_dir = tiny_checkpoint_factory(fmt, seed=1)
    session = build_engine(model_dir, tmp_path / "engine")
    reference_model = oracle(model_dir)
    for length, seed in [(1, 0), (7, 1), (40, 2)]:
        prompt = random_prompt(length, seed)
        with torch.no_grad():
            expected = reference_model(torch.tensor([prompt])).logits[0]
        assert relative_error(session.prompt_logits(prompt), expected) < 1e-5


def test_greedy_batch_of_mixed_lengths_matches_glm_for_causal_lm(tiny_checkpoint_factory, tmp_path):
    model_dir = tiny_checkpoint_factory("safetensors", seed=2)
    session = build_engine(model_dir, tmp_path / "engine")
    reference_model = oracle(model_dir)
    prompts = [random_prompt(length, seed) for seed, length in enumerate([3, 17, 9, 30])]
    outputs = [output.token_ids for output in session.generate(prompts, SamplingConfig(max_new_tokens=24))]
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            generated = reference_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                 eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        expected = generated[:generated.index(2)] if 2 in generated else generated
        assert output == expected
    assert sum(map(len, outputs)) >= 20 * len(prompts)


def test_hf_reference_loader_equals_oracle(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("bin", seed=3)
    prompt = torch.tensor([random_prompt(12, 5)])
    with torch.no_grad():
        loaded = load_hf_model(model_dir, torch.float32, "cpu")(prompt).logits
        expected = oracle(model_dir)(prompt).logits
    assert relative_error(loaded, expected) < 1e-6


@pytest.mark.parametrize("dtype, bound", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_logits_near_float32(tiny_checkpoint_factory, tmp_path, dtype, bound):
    model_dir = tiny_checkpoint_factory("safetensors", seed=4)
    session = build_engine(model_dir, tmp_path / "engine", dtype)
    prompt = random_prompt(33, 6)
    with torch.no_grad():
        expected = oracle(model_dir)(torch.tensor([prompt])).logits[0]
    error = relative_error(session.prompt_logits(prompt), expected)
    assert 0 < error < bound


@pytest.mark.parametrize("mode, rope", [
    ("positions", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ("base", {"rope_type": "default", "rope_theta": 40000.0, "partial_rotary_factor": 0.5}),
])
def test_rope_ratio_readings(tiny_checkpoint_factory, tmp_path, mode, rope):
    model_dir = tiny_checkpoint_factory("safetensors", seed=5, rope_ratio=4.0)
    session = build_engine(model_dir, tmp_path / mode, "float32", "--rope_ratio_mode", mode)
    plain = build_engine(model_dir, tmp_path / "plain", "float32", "--rope_ratio_mode",
                         "base" if mode == "positions" else "positions")
    prompt = random_prompt(40, 7)
    with torch.no_grad():
        expected = oracle(model_dir, rope)(torch.tensor([prompt])).logits[0]
    assert relative_error(session.prompt_logits(prompt), expected) < 1e-5
    assert relative_error(plain.prompt_logits(prompt), expected) > 1e-3


def test_rope_ratio_mode_defaults():
    base = {"model_type": "chatglm", "num_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
            "kv_channels": 4, "ffn_hidden_size": 8, "padded_vocab_size": 16}
    assert read_model_config({**base, "rope_ratio": 16, "_name_or_path": "THUDM/chatglm2-6b-32k"}) \
        .position_scale == 1 / 16
    glm3 = read_model_config({**base, "rope_ratio": 50, "_name_or_path": "THUDM/chatglm3-6b-32k"})
    assert (glm3.position_scale, glm3.rotary_base) == (1.0, 500000.0)


def test_rotary_pairs_are_interleaved_on_the_first_half():
    x = torch.randn(3, 2, 8)
    frequencies = reference.rotary_frequencies(torch.tensor([0, 1, 5]), reference.rotary_inv_freq(4, 10000.0))
    out = reference.apply_rotary(x, frequencies)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.allclose(out[0], x[0])  # position 0: no rotation
    angle = 5 * 10000.0 ** (-2 / 4)  # pair j=1 at position 5
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    assert torch.allclose(out[2, :, 2], x[2, :, 2] * c - x[2, :, 3] * s, atol=1e-6)
    assert torch.allclose(out[2, :, 3], x[2, :, 3] * c + x[2, :, 2] * s, atol=1e-6)


def test_scattered_cache_blocks_give_the_same_hidden_states(tiny_checkpoint_factory, tmp_path):
    """A cache of small blocks in shuffled order computes what one block per sequence does."""
    session = build_engine(tiny_checkpoint_factory("bin", seed=6), tmp_path / "engine")
    config, model = session.model_config, session.runner.network
    prompts = [random_prompt(13, 8), random_prompt(6, 9)]
    input_ids = torch.tensor(prompts[0] + prompts[1])

    def hidden(block_tables, block_size, num_blocks):
        cache = KVCache(config.num_layers, num_blocks, block_size, config.multi_query_group_num,
                        config.kv_channels, torch.float32, torch.device("cpu"))
        batch = session.runner.attention.metadata(StepLayout.of(block_tables, [0, 0], [13, 6], block_size))
        with torch.no_grad():
            return model(input_ids, batch, cache)

    contiguous = hidden([[0], [1]], 16, 2)
    scattered = hidden([[5, 0, 3, 7], [2, 6]], 4, 8)
    assert relative_error(scattered, contiguous) < 1e-6
