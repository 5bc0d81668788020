"""Quantized K/V caches (build.py --fp8_kv_cache, --int8_kv_cache): the rotary kernels'
quantized stores against the reference, engines on their kernels against the reference
attention over the same cache, the pool's size, and the flags refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from checkpoints import tiny_config
from conftest import (TINY_SHAPE_FLAGS, assert_one_line_error, cpu_sessions_run_kernels, needs_triton,
                      run_tool)
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, kv_cache_scale_name
from glm_engine.engine_format.engine import load_engine
from glm_engine.kernels import reference
from glm_engine.models import read_model_config
from glm_engine.runtime.kv_cache import KVCache, block_bytes, from_cache_dtype, to_cache_dtype
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.tools.compare import relative_error
from test_model import build_engine, random_prompt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CACHES = {"fp8": (torch.float8_e4m3fn, ["--fp8_kv_cache"]), "int8": (torch.int8, ["--int8_kv_cache"])}


@needs_triton
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [3, 37])  # one token a program, and tiles of several with a ragged last one
def test_rotary_kernels_store_a_quantized_cache_as_the_reference(cache, dtype, tokens):
    """The quantized cache holds exactly to_cache_dtype of what an unquantized cache holds
    (FP8 saturated at +-448, zeros of either sign alike; INT8 by its group's scale within
    +-127), the query unchanged."""
    from glm_engine.kernels import rotary_kv

    cache_dtype = CACHES[cache][0]
    heads, groups, head_dim, num_slots = 4, 2, 64, 48
    qkv = torch.randn(tokens, (heads + 2 * groups) * head_dim, device=DEVICE) * torch.logspace(
        -3, 3, tokens, device=DEVICE)[:, None]
    qkv = qkv.to(dtype)
    positions, slots = torch.arange(tokens, device=DEVICE) * 7, torch.randperm(num_slots, device=DEVICE)[:tokens]
    inv_freq = reference.rotary_inv_freq(head_dim // 2, 10000.0).to(DEVICE)
    scales = (torch.tensor([[2.0, 0.5], [1.0, 4.0]], device=DEVICE) if cache == "int8" else torch.ones(2, 2))
    written = {}
    for kind in (dtype, cache_dtype):
        keys = torch.zeros(num_slots, groups, head_dim, device=DEVICE).to(kind)
        values = torch.zeros_like(keys)
        cache_scales = (scales[0], scales[1]) if kind == torch.int8 else (None, None)
        query = rotary_kv.rotary_kv_write(qkv, positions, inv_freq, 1.0, slots, keys, values, heads, *cache_scales)
        written[kind] = (query, keys, values)
    (query, keys, values), (quantized_query, quantized_keys, quantized_values) = written[dtype], written[cache_dtype]
    assert torch.equal(quantized_query, query)
    for index, (quantized, exact) in enumerate(((quantized_keys, keys), (quantized_values, values))):
        expected = to_cache_dtype(exact, cache_dtype, scales[index] if cache == "int8" else None)
        assert torch.equal(quantized.float(), expected.float())
    assert quantized_keys.float().abs().max() == (448.0 if cache == "fp8" else 127.0)  # the largest saturate


@pytest.mark.parametrize("cache", list(CACHES))
def test_a_quantized_cache_holds_twice_the_tokens(cache):
    config = read_model_config(tiny_config())
    build = BuildConfig(dtype="float16", paged_kv_cache=True)
    quantized = dataclasses.replace(build, **{f"{cache}_kv_cache": True})
    assert block_bytes(config, quantized) * 2 == block_bytes(config, build)


@cpu_sessions_run_kernels
@pytest.mark.parametrize("cache", list(CACHES))
def test_quantized_cache_engine_on_its_kernels_gives_the_reference_engines_tokens(tiny_checkpoint_factory, tmp_path,
                                                                                  monkeypatch, cache):
    """Rotary + quantized store, context FMHA and decode attention reading the cache, against
    the reference attention over the same cache; both close to the unquantized cache."""
    model_dir = tiny_checkpoint_factory("safetensors", seed=43)
    flags = CACHES[cache][1]
    kernels = build_engine(model_dir, tmp_path / "kernels", "float32", *flags, "--use_gpt_attention_plugin", "float32",
                           "--enable_context_fmha_fp32_acc")
    monkeypatch.delenv("TRITON_INTERPRET")
    references = build_engine(model_dir, tmp_path / "reference", "float32", *flags)
    plain = build_engine(model_dir, tmp_path / "plain", "float32")
    assert kernels.runner.kv_cache.keys.dtype == CACHES[cache][0]
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 19, 2])]
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    assert kernels.generate(prompts, sampling) == references.generate(prompts, sampling)
    prompt = random_prompt(24, 9)
    assert relative_error(kernels.decode_logits(prompt, 6), references.decode_logits(prompt, 6)) < 1e-4
    error = relative_error(references.prompt_logits(prompt), plain.prompt_logits(prompt))
    assert 0 < error < 5e-2, error


def test_int8_cache_scales_come_from_calibration_and_ride_in_the_engine(tiny_checkpoint_factory, tmp_path):
    model_dir = tiny_checkpoint_factory("safetensors", seed=44)
    session = build_engine(model_dir, tmp_path / "engine", "float32", "--int8_kv_cache")
    engine = load_engine(tmp_path / "engine")
    groups = engine.model_config.multi_query_group_num
    scales = [engine.weights[kv_cache_scale_name(layer)]
              for layer in range(engine.model_config.num_layers)]
    assert all(scale.shape == (2, groups) and scale.dtype == torch.float32 and (scale > 0).all() for scale in scales)
    assert torch.equal(session.runner.kv_cache.scales, torch.stack(scales))


def test_a_quantized_cache_copies_blocks_and_writes_slots():
    """Copy-on-write of a shared block (beam search) and the reference write, on the CPU,
    where indexing takes no float8."""
    for dtype, scales in ((torch.float8_e4m3fn, None), (torch.int8, torch.full((2, 2, 2), 0.5))):
        cache = KVCache(2, 4, 8, 2, 16, dtype, torch.device("cpu"), scales)
        key, value = torch.randn(3, 2, 16) * 300, torch.randn(3, 2, 16)
        cache.write(1, torch.tensor([8, 9, 15]), key, value)
        expected = to_cache_dtype(key[:2], dtype, None if scales is None else scales[1, 0])
        assert torch.equal(cache.keys[1, 8:10].view(torch.uint8), expected.view(torch.uint8))
        assert relative_error(from_cache_dtype(cache.values[1, 8:10], torch.float32, None if scales is None
                                               else scales[1, 1]), value[:2]) < 0.3
        cache.copy_blocks([(1, 3)])
        assert torch.equal(cache.keys[:, 24:32].view(torch.uint8), cache.keys[:, 8:16].view(torch.uint8))
        assert torch.equal(cache.values[:, 24:32].view(torch.uint8), cache.values[:, 8:16].view(torch.uint8))


def test_an_int8_cache_needs_its_scales():
    with pytest.raises(ValueError, match="INT8 K/V cache takes scales"):
        KVCache(1, 2, 8, 2, 16, torch.int8, torch.device("cpu"))


@pytest.mark.parametrize("flags, message", [
    (["--fp8_kv_cache", "--int8_kv_cache"], "two K/V cache formats"),
])
def test_kv_cache_flags_are_checked(tmp_path, flags, message):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "engine").exists()


def test_engines_written_before_quantized_caches_load_with_the_engine_dtype():
    fields = BuildConfig().to_dict()
    del fields["fp8_kv_cache"], fields["int8_kv_cache"]
    build = BuildConfig.from_dict(fields)
    assert not build.fp8_kv_cache and not build.int8_kv_cache
    with pytest.raises(GlmEngineError, match="two K/V cache formats"):
        BuildConfig(fp8_kv_cache=True, int8_kv_cache=True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_int8_cache_scales_split_with_the_groups_their_ranks_read(world_size):
    """Tiny: 4 heads, 2 groups; at 4 ranks each group's scales go to the two ranks reading it."""
    from glm_engine.engine_format.tensor_parallel import merge_weights, split_weights

    config = read_model_config(tiny_config())
    name = kv_cache_scale_name(0)
    scales = {name: torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    shards = [split_weights(scales, config, world_size, rank)[name] for rank in range(world_size)]
    expected = [[0], [1]] if world_size == 2 else [[0], [0], [1], [1]]
    assert [shard.tolist() for shard in shards] == [scales[name][:, groups].tolist() for groups in expected]
    assert torch.equal(merge_weights([{name: shard} for shard in shards], config)[name], scales[name])



def test_calibration_texts_set_the_int8_cache_scales(tiny_checkpoint_factory, tmp_path):
    """--calib_size and --calib_dataset choose what calibration runs over (here: the scales it gives)."""
    import json

    model_dir = tiny_checkpoint_factory("safetensors", seed=45)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"article": article, "highlights": ""}) + "\n" for article in
                             ("Numbers: 1 2 3 4 5 6 7 8 9 10 11 12.", "A short line of other words.")))
    scales = {}
    for name, flags in {"default": [], "one_text": ["--calib_size", "1"], "own_file": ["--calib_dataset", texts]}.items():
        build_engine(model_dir, tmp_path / name, "float32", "--int8_kv_cache", *map(str, flags))
        scales[name] = load_engine(tmp_path / name).weights[kv_cache_scale_name(0)]
    assert not torch.equal(scales["one_text"], scales["default"])
    assert not torch.equal(scales["own_file"], scales["default"])
