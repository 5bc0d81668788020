"""GLM-4 checkpoints in each layout against transformers' own models (float32):
GLM-4-9B-chat-hf's (GlmForCausalLM) and GLM-4-9B-0414's (Glm4ForCausalLM), loaded by
transformers straight from the checkpoint directory, and THUDM's GLM-4-9B layout
(model_type chatglm, several end ids); every end id recorded; dummy engines of each
model's shape; tensor-parallel cuts of the new tensors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM

import build
from checkpoints import chatglm2_state_dict, tiny_config, write_checkpoint
from conftest import TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm4_checkpoints import GLM4_LAYOUTS, glm_state_dict, tiny_glm_config, write_glm_checkpoint
from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.engine_format.engine import engine_configs, load_engine
from glm_engine.engine_format.layout import weight_shapes
from glm_engine.engine_format.tensor_parallel import merge_weights, split_weights
from glm_engine.models import family, read_model_config
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.text.prompts import random_prompts
from glm_engine.text.tokenizer import load_tokenizer
from glm_engine.tools.compare import relative_error
from glm_engine.tools.hf_reference import build_glm_model, hf_generate
from model import load_session
from test_model import oracle
from weight import dummy_weights, load_hf_config, load_hf_weights

LIMITS = ["--max_input_len", "48", "--max_output_len", "16"]


def build_engine(model_dir, output_dir, *flags: str):
    args = build.parse_arguments(["--model_dir", str(model_dir), "--output_dir", str(output_dir), "--dtype",
                                  "float32", "--log_level", "error", *LIMITS, *flags])
    return build.build(args)


@pytest.fixture(scope="module", params=GLM4_LAYOUTS)
def glm_checkpoint(request, tmp_path_factory):
    """(model_dir, transformers' model loaded from it) of one transformers-layout checkpoint."""
    config = tiny_glm_config(request.param)
    model_dir = write_glm_checkpoint(tmp_path_factory.mktemp(request.param), config, glm_state_dict(config, 3),
                                     generation_config={"eos_token_id": [5, 11]})
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(reference).__name__ == config["architectures"][0]
    return model_dir, reference


def test_logits_equal_transformers_model_of_the_checkpoint(glm_checkpoint, tmp_path):
    model_dir, reference = glm_checkpoint
    session = load_session(build_engine(model_dir, tmp_path / "engine"), "cpu")
    for length, seed in [(1, 0), (9, 1), (40, 2)]:
        prompt = random_prompts([length], 1000, seed)[0]
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert relative_error(session.prompt_logits(prompt), expected) < 1e-5


def test_greedy_tokens_equal_transformers_generate(glm_checkpoint, tmp_path):
    model_dir, reference = glm_checkpoint
    session = load_session(build_engine(model_dir, tmp_path / "engine"), "cpu")
    prompts = random_prompts([3, 17, 30], 1000, 4)
    outputs = session.generate(prompts, SamplingConfig(max_new_tokens=12, end_id=-1))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.token_ids == expected


def test_beam_search_equals_transformers_generate(glm_checkpoint, tmp_path):
    """Beams, static and in flight, give the best beam transformers' generate(num_beams=3)
    gives (no end id: the full length)."""
    model_dir, reference = glm_checkpoint
    prompts = random_prompts([5, 14], 1000, 6)
    expected = [hf_generate(reference, [prompt], 10, -1, 0, num_beams=3)[0] for prompt in prompts]
    for flags in ([], ["--use_inflight_batching"]):
        session = load_session(build_engine(model_dir, tmp_path / f"engine{len(flags)}", *flags), "cpu")
        outputs = session.generate(prompts, SamplingConfig(max_new_tokens=10, end_id=-1, num_beams=3))
        assert [output.token_ids for output in outputs] == expected


def test_every_end_id_is_recorded(glm_checkpoint, tmp_path):
    model_dir, _ = glm_checkpoint
    model_config, _ = engine_configs(build_engine(model_dir, tmp_path / "engine"))
    assert (model_config.eos_token_id, model_config.eos_token_ids) == (5, (5, 7, 9, 11))


def test_every_end_id_ends_generation(glm_checkpoint, tmp_path):
    """With the model's end options every end id ends a request (not returned); without
    them the same biased request writes that token on."""
    model_dir, _ = glm_checkpoint
    session = load_session(build_engine(model_dir, tmp_path / "engine"), "cpu")
    for end in session.model_config.eos_token_ids:
        bias = ((end, 100.0),)  # the token every step chooses
        ended = session.generate([[3, 4, 5]], SamplingConfig(max_new_tokens=6, logit_bias=bias,
                                                             **session.model_config.end_options()))
        assert ended[0].token_ids == []
        endless = session.generate([[3, 4, 5]], SamplingConfig(max_new_tokens=6, end_id=-1, logit_bias=bias))
        assert endless[0].token_ids == [end] * 6


def test_weight_only_in_flight_engine_equals_the_reference_on_its_weights(tmp_path):
    """GLM-4-0414 with int8 weight-only, in-flight batching and every plugin: on the CPU the
    reference ops over the dequantized weights, whose Glm4ForCausalLM gives the same greedy tokens."""
    config = tiny_glm_config("glm4")
    model_dir = write_glm_checkpoint(tmp_path / "model", config, glm_state_dict(config, 9), sharded=False)
    engine_dir = build_engine(model_dir, tmp_path / "engine", "--use_weight_only", "--use_inflight_batching",
                              "--use_gemm_plugin", "float32", "--use_layernorm_plugin", "float32")
    session = load_session(engine_dir, "cpu")
    reference = build_glm_model(session.model_config, load_engine(engine_dir).weights, "cpu", torch.float32, "eager")
    prompts = random_prompts([5, 21], 1000, 5)
    outputs = session.generate(prompts, SamplingConfig(max_new_tokens=10, end_id=-1))
    assert [output.token_ids for output in outputs] == hf_generate(reference, prompts, 10, -1, 0)


def test_tensor_parallel_cuts_follow_the_family(glm_checkpoint):
    model_dir, _ = glm_checkpoint
    config = read_model_config(load_hf_config(model_dir))
    weights = load_hf_weights(model_dir, config, torch.float32)
    shards = [split_weights(weights, config, 2, rank) for rank in range(2)]
    split_of = family(config.model_type).tensor_split
    for name, tensor in weights.items():
        if split_of(name) is None:  # embedding and every norm, the GLM-4-0414 output norms included
            assert all(torch.equal(shard[name], tensor) for shard in shards), name
        else:
            assert all(shard[name].numel() < tensor.numel() for shard in shards), name
    query = config.q_size // 2
    qkv = weights["layers.1.self_attention.query_key_value.weight"]
    assert torch.equal(shards[1]["layers.1.self_attention.query_key_value.weight"][:query], qkv[query:2 * query])
    merged = merge_weights(shards, config)
    assert all(torch.equal(merged[name], weights[name]) for name in weights)


def test_a_missing_part_of_a_fused_tensor_is_named(tmp_path):
    config = tiny_glm_config("glm4")
    state = glm_state_dict(config, 0)
    del state["model.layers.1.self_attn.v_proj.bias"]
    model_dir = write_glm_checkpoint(tmp_path, config, state, sharded=False)
    with pytest.raises(GlmEngineError, match="'model.layers.1.self_attn.v_proj.bias' missing"):
        load_hf_weights(model_dir, read_model_config(load_hf_config(model_dir)), torch.float32)


@pytest.mark.parametrize("field, value, message", [
    ("partial_rotary_factor", 1.0, "partial_rotary_factor=1.0"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope scaling 'yarn'"),
])
def test_configs_of_another_network_are_refused(field, value, message):
    with pytest.raises(GlmEngineError, match=message):
        read_model_config(tiny_glm_config("glm", **{field: value}))


def test_rope_ratio_mode_is_refused_for_a_rope_theta_checkpoint():
    with pytest.raises(GlmEngineError, match="drop the flag"):
        read_model_config(tiny_glm_config("glm4"), "base")


def test_thudm_glm4_layout_keeps_every_end_id_and_matches_glm_for_causal_lm(tmp_path, tiny_tokenizer_dir):
    """THUDM's GLM-4-9B layout: ChatGLM2's names, rope_ratio scaling the base, three end ids."""
    config = tiny_config(rope_ratio=500, eos_token_id=[2, 7, 9], _name_or_path="THUDM/glm-4-9b-chat")
    model_dir = write_checkpoint(tmp_path / "glm4", config, chatglm2_state_dict(config, 6), "safetensors",
                                 tokenizer_dir=tiny_tokenizer_dir)
    session = load_session(build_engine(model_dir, tmp_path / "engine"), "cpu")
    assert session.model_config.eos_token_ids == (2, 7, 9)
    prompt = random_prompts([40], 1000, 7)[0]
    rope = {"rope_type": "default", "rope_theta": 10000.0 * 500, "partial_rotary_factor": 0.5}
    with torch.no_grad():
        expected = oracle(model_dir, rope)(torch.tensor([prompt])).logits[0]
    assert relative_error(session.prompt_logits(prompt), expected) < 1e-5


def test_an_engine_written_before_end_id_lists_loads_with_its_one_end_id():
    values = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, kv_channels=8, multi_query_group_num=1,
                         ffn_hidden_size=24, vocab_size=32, seq_length=64, eos_token_id=3).to_dict()
    del values["eos_token_ids"]
    assert ModelConfig.from_dict(values).eos_token_ids == (3,)
    assert ModelConfig.from_dict(json.loads(json.dumps({**values, "eos_token_ids": [3, 4]}))).eos_token_ids == (3, 4)
    with pytest.raises(GlmEngineError, match="must start with eos_token_id 3"):
        ModelConfig.from_dict({**values, "eos_token_ids": [4, 3]})


@pytest.mark.parametrize("model_name, model_type, vocab", [
    ("chatglm3_6b", "chatglm", 1024), ("glm_4_9b", "chatglm", 1024), ("glm_4_9b_0414", "glm4", 1024)])
def test_dummy_engines_of_each_model_name(tmp_path, model_name, model_type, vocab):
    result = run_tool("build.py", "--model_name", model_name, *TINY_SHAPE_FLAGS, "--output_dir", tmp_path / "e",
                      "--dtype", "float32", *LIMITS, "--log_level", "error")
    assert result.returncode == 0, result.stderr
    model_config, _ = engine_configs(tmp_path / "e")
    assert (model_config.model_type, model_config.vocab_size, model_config.num_layers) == (model_type, vocab, 2)
    tokenizer = load_tokenizer(tmp_path / "e")
    if model_name == "chatglm3_6b":  # ChatGLM2's demo tokenizer: end id 2
        assert model_config.eos_token_ids == (2,) and tokenizer.flavor == "chatglm2"
    else:  # GLM-4's kind: its <|endoftext|>, <|user|> and <|observation|> end generation
        specials = tokenizer.special_token_ids
        assert tokenizer.flavor == "glm4" and model_config.eos_token_ids == tuple(
            specials[name] for name in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert model_config.kv_channels == 16
    generated = run_tool("run.py", "--engine_dir", tmp_path / "e", "--max_output_len", "4", "--chat")
    assert generated.returncode == 0, generated.stderr


def test_model_name_shapes_a_dummy_engine_only(tmp_path):
    config = tiny_glm_config("glm4")
    model_dir = write_glm_checkpoint(tmp_path / "glm4", config, glm_state_dict(config, 0), sharded=False)
    result = run_tool("build.py", "--model_dir", model_dir, "--model_name", "glm_4_9b_0414", "--output_dir",
                      tmp_path / "e")
    assert_one_line_error(result, "--model_name sets a dummy engine's shape")


def test_full_size_presets_read_as_their_models():
    from glm_engine.presets import MODEL_NAMES

    glm4 = read_model_config(MODEL_NAMES["glm_4_9b_0414"])
    thudm = read_model_config(MODEL_NAMES["glm_4_9b"])
    assert (glm4.model_type, glm4.num_layers, glm4.vocab_size, glm4.eos_token_ids) == \
        ("glm4", 40, 151552, (151329, 151336, 151338))
    assert (thudm.rotary_base, thudm.eos_token_ids) == (5_000_000.0, (151329, 151336, 151338))
    assert set(weight_shapes(glm4)) - set(weight_shapes(thudm)) == {
        f"layers.{i}.{name}" for i in range(40) for name in ("post_self_attn_layernorm.weight",
                                                              "post_mlp_layernorm.weight")}
    assert dummy_weights(read_model_config({**MODEL_NAMES["glm_4_9b_0414"], "num_hidden_layers": 1,
                                            "vocab_size": 151552, "hidden_size": 32, "head_dim": 8,
                                            "intermediate_size": 16}), torch.float16, 0)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=4)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(GLM4_LAYOUTS),
       st.dictionaries(st.sampled_from(sorted(tiny_glm_config()) + ["rope_parameters", "rope_scaling"]), JSON_VALUES,
                       max_size=4))
def test_any_glm_config_gives_a_model_config_or_a_clear_error(model_type, overrides):
    try:
        config = read_model_config({**tiny_glm_config(model_type), **overrides})
    except GlmEngineError:
        return
    assert sum(map(len, weight_shapes(config).values())) > 0


def test_two_ranks_give_the_one_rank_tokens_and_logits(tmp_path):
    """GLM-4-0414, int8 weight-only, split over 2 ranks (gloo, torchrun): its output norms
    replicated, the rest cut as ChatGLM's; the same greedy tokens and logits as one rank."""
    from test_tensor_parallel import run_worker

    config = tiny_glm_config("glm4", vocab_size=1022)  # 2 ranks hold 511 output rows each
    model_dir = write_glm_checkpoint(tmp_path / "model", config, glm_state_dict(config, 8), sharded=False)
    results = []
    for world_size in (1, 2):
        engine_dir = build_engine(model_dir, tmp_path / f"engine{world_size}", "--world_size", str(world_size),
                                  "--max_batch_size", "4", "--use_weight_only")
        results.append(run_worker(engine_dir, world_size, tmp_path))
    assert results[1]["tokens"] == results[0]["tokens"]
    assert torch.allclose(results[1]["logits"], results[0]["logits"], rtol=0, atol=1e-5)


def test_the_reference_generation_stops_at_any_end_id(glm_checkpoint):
    _, reference = glm_checkpoint
    prompts = random_prompts([6, 11], 1000, 10)
    free = hf_generate(reference, prompts, 8, -1, 0)
    ends = [free[0][3], free[1][5]]
    cut = [row[:min([i for i, token in enumerate(row) if token in ends] + [len(row)])] for row in free]
    assert hf_generate(reference, prompts, 8, ends, 0) == cut
    assert len(cut[0]) <= 3 and len(cut[1]) <= 5
