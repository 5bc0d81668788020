"""Engines built with the plugin flags run the Triton kernels (interpreted on
the CPU) and compute what the reference path computes."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

import glm_engine.kernels.context_attention as context_attention_module
import glm_engine.kernels.decode_attention as decode_attention_module
import glm_engine.kernels.gemv as gemv_module
import glm_engine.kernels.norm as norm_module
import glm_engine.kernels.rotary_kv as rotary_kv_module
import glm_engine.kernels.swiglu as swiglu_module
from checkpoints import tiny_config
from conftest import TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.runtime.attention import TOKEN_ROWS_MAX, PagedAttention, ReferenceAttention, StepLayout
from glm_engine.config import BuildConfig
from glm_engine.engine_format.engine import Engine
from glm_engine.engine_format.layout import weight_shapes
from glm_engine.models import read_model_config
from glm_engine.runtime.cuda_graphs import PromptGraphs
from glm_engine.runtime.model_runner import graphs_to_capture
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import Session
from model import load_session
from test_model import build_engine, random_prompt, relative_error

PLUGINS = {"attention": ["--use_gpt_attention_plugin"], "layernorm": ["--use_layernorm_plugin"],
           "gemm": ["--use_gemm_plugin"],
           "all": ["--use_gpt_attention_plugin", "--use_layernorm_plugin", "--use_gemm_plugin"],
           "context_fmha": ["--use_gpt_attention_plugin", "--enable_context_fmha"]}
SWITCHES = {"--enable_context_fmha", "--enable_context_fmha_fp32_acc"}  # flags that take no dtype
# The engines here run on the CPU, where their Triton kernels run only in Triton's interpreter (conftest turns it on
# where there is no GPU). On a GPU machine the CPU sessions take the reference ops, so these tests would compare the
# reference with itself and find no kernel calls: they are skipped there (the GPU runs the kernels in test_kernels.py,
# test_weight_only_mma.py and benchmarks/check_*_gpu.py).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU sessions run the Triton kernels only under TRITON_INTERPRET=1")


def with_dtype(flags: list[str], dtype: str) -> list[str]:
    return [part for flag in flags for part in ((flag,) if flag in SWITCHES else (flag, dtype))]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each Triton kernel wrapper; the real kernel still runs."""
    calls: dict[str, int] = {}
    for module, name in [(decode_attention_module, "decode_attention"), (rotary_kv_module, "rotary_kv_write"),
                         (context_attention_module, "context_attention"),
                         (norm_module, "add_rms_norm"), (swiglu_module, "swiglu"), (gemv_module, "gemv")]:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


@interpreted
@pytest.mark.parametrize("plugins", list(PLUGINS))
def test_plugin_engine_greedy_equals_reference_engine(tiny_checkpoint_factory, tmp_path, plugins, kernel_calls):
    model_dir = tiny_checkpoint_factory("safetensors", seed=31)
    reference_session = build_engine(model_dir, tmp_path / "reference")
    plugin_session = build_engine(model_dir, tmp_path / "plugin", "float32", *with_dtype(PLUGINS[plugins],
                                                                                         "float32"))
    prompts = [random_prompt(length, seed) for seed, length in enumerate([5, 12, 1])]
    sampling = SamplingConfig(max_new_tokens=10, end_id=-1)
    assert plugin_session.generate(prompts, sampling) == reference_session.generate(prompts, sampling)
    prompt = random_prompt(20, 9)
    assert relative_error(plugin_session.prompt_logits(prompt), reference_session.prompt_logits(prompt)) < 1e-5
    expected = {"attention": {"decode_attention", "rotary_kv_write"}, "layernorm": {"add_rms_norm", "swiglu"},
                "gemm": {"gemv"}, "context_fmha": {"decode_attention", "rotary_kv_write", "context_attention"}}
    all_plugins = {"attention", "layernorm", "gemm"}
    used = set().union(*(expected[name] for name in expected
                         if name == plugins or (plugins == "all" and name in all_plugins)))
    assert set(kernel_calls) == used


@interpreted
def test_half_precision_plugin_engine_is_close_to_reference(tiny_checkpoint_factory, tmp_path):
    model_dir = tiny_checkpoint_factory("safetensors", seed=32)
    reference_session = build_engine(model_dir, tmp_path / "reference", "float16")
    plugin_session = build_engine(model_dir, tmp_path / "plugin", "float16",
                                  *with_dtype(PLUGINS["all"], "float16"))
    prompt = random_prompt(20, 3)
    assert relative_error(plugin_session.prompt_logits(prompt), reference_session.prompt_logits(prompt)) < 3e-3


@interpreted
@pytest.mark.parametrize("flag, fp16_accumulation", [("--enable_context_fmha", True),
                                                     ("--enable_context_fmha_fp32_acc", False)])
def test_context_fmha_accumulates_as_its_flag_says(tiny_checkpoint_factory, tmp_path, monkeypatch, flag,
                                                   fp16_accumulation):
    seen = []
    original = context_attention_module.context_attention

    def spy(*args, **kwargs):
        seen.append(args[10])  # fp16_accumulation
        return original(*args, **kwargs)

    monkeypatch.setattr(context_attention_module, "context_attention", spy)  # before the ops are chosen
    model_dir = tiny_checkpoint_factory("safetensors", seed=35)
    reference_session = build_engine(model_dir, tmp_path / "reference", "float16")
    fmha_session = build_engine(model_dir, tmp_path / "fmha", "float16", "--use_gpt_attention_plugin", "float16",
                                flag)
    prompt = random_prompt(40, 4)
    assert relative_error(fmha_session.prompt_logits(prompt), reference_session.prompt_logits(prompt)) < 3e-3
    assert seen and set(seen) == {fp16_accumulation}


def test_context_fmha_needs_the_attention_plugin(tmp_path):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, "--enable_context_fmha")
    assert_one_line_error(result, "context FMHA runs inside the GPT attention plugin")
    assert list(tmp_path.iterdir()) == []


def test_plugin_dtype_must_match_the_engine_dtype(tmp_path):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, "--dtype", "float16",
                      "--use_gpt_attention_plugin", "float32")
    assert_one_line_error(result, "--use_gpt_attention_plugin float32 with --dtype float16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [
    ["--use_weight_only", "--weight_only_precision", "int8"],
    ["--use_weight_only", "--weight_only_precision", "int4", *with_dtype(PLUGINS["all"], "float32")],
    ["--use_inflight_batching", "--use_weight_only", "--weight_only_precision", "int4"],
    ["--use_weight_only", "--weight_only_precision", "int4", "--weight_only_group_size", "32"],
], ids=["int8", "int4_all_plugins", "inflight_int4", "int4_group_32"])
def test_kernel_engines_run_the_reference_ops_on_the_cpu(tiny_checkpoint_factory, tmp_path, monkeypatch, caplog,
                                                         kernel_calls, flags):
    """Without a GPU or Triton's interpreter, plugin, weight-only and in-flight engines
    give the greedy tokens of the network on their dequantized weights, with no kernel."""
    import logging

    import build as build_tool
    from glm_engine.config import BuildConfig
    from glm_engine.engine_format.engine import Engine, load_engine
    from glm_engine.quantization import dequantize_weights

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model_dir = tiny_checkpoint_factory("safetensors", seed=35)
    engine_dir = build_tool.build(build_tool.parse_arguments(
        ["--model_dir", str(model_dir), "--output_dir", str(tmp_path / "engine"), "--dtype", "float32",
         "--max_input_len", "64", "--max_output_len", "32", *flags]))
    with caplog.at_level(logging.INFO, logger="ops"):
        session = load_session(engine_dir, "cpu")
    assert "running the reference ops on the cpu, weight-only layers dequantized" in caplog.text
    engine = load_engine(engine_dir)
    oracle = load_session(Engine(tmp_path, engine.model_config, BuildConfig(dtype="float32", max_input_len=64,
                                                                       max_output_len=32),
                            dequantize_weights(engine.weights, torch.float32)), "cpu")
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 19, 2])]
    sampling = SamplingConfig(max_new_tokens=16, end_id=-1)
    assert session.generate(prompts, [sampling] * 3) == oracle.generate(prompts, sampling)
    assert kernel_calls == {}


@interpreted
@pytest.mark.parametrize("precision, group", [("int8", 0), ("int4", 0), ("int4", 32), ("int8", 32)])
def test_weight_only_engine_equals_reference_network_on_dequantized_weights(tiny_checkpoint_factory, tmp_path,
                                                                           precision, group, kernel_calls):
    """The quantized engine's greedy tokens are those of the unquantized network run on the
    quantized-then-dequantized weights; its file stores 1 (int8) or 1/2 (int4) byte per weight
    and a float32 scale per output channel or per `group` input channels of each."""
    import build as build_tool
    from glm_engine.config import BuildConfig
    from glm_engine.engine_format.engine import Engine, load_engine
    from glm_engine.quantization import dequantize_weights

    model_dir = tiny_checkpoint_factory("safetensors", seed=33)
    quantized = build_engine(model_dir, tmp_path / precision, "float32", "--use_weight_only",
                             "--weight_only_precision", precision, "--weight_only_group_size", str(group))
    engine = load_engine(tmp_path / precision)
    dense = dequantize_weights(engine.weights, torch.float32)
    oracle_session = load_session(Engine(tmp_path, engine.model_config, BuildConfig(dtype="float32", max_input_len=64,
                                                                              max_output_len=32), dense), "cpu")
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 19, 2])]
    sampling = SamplingConfig(max_new_tokens=16, end_id=-1)
    assert quantized.generate(prompts, sampling) == oracle_session.generate(prompts, sampling)
    assert kernel_calls.get("gemv", 0) > 0
    plain = build_tool.build(build_tool.parse_arguments(["--model_dir", str(model_dir), "--dtype", "float32",
                                                         "--output_dir", str(tmp_path / "plain")]))
    saved = 0  # float32 bytes minus quantized bytes and scales, over every decoder linear
    for name, tensor in engine.weights.items():
        if name + "_scales" in engine.weights:
            assert tensor.dtype == (torch.int8 if precision == "int8" else torch.uint8)
            rows, columns = dense[name].shape
            scales = engine.weights[name + "_scales"]
            assert scales.shape == ((rows, columns // group) if group else (rows,))
            saved += rows * columns * 4 - tensor.numel() - scales.numel() * 4
    shrink = (plain / "rank0.safetensors").stat().st_size - (tmp_path / precision / "rank0.safetensors").stat().st_size
    assert abs(shrink - saved) < 8192  # the rest is the safetensors header


def test_weight_only_precision_needs_use_weight_only(tmp_path):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS,
                      "--weight_only_precision", "int4")
    assert_one_line_error(result, "--weight_only_precision applies to --use_weight_only")


def test_group_wise_int4_is_closer_to_the_weights_than_per_channel(tiny_checkpoint_factory, tmp_path):
    """--weight_only_group_size 32: one scale per 32 input channels, so every decoder
    linear's dequantized weight is closer to the float weight than per-channel int4's."""
    import build as build_tool
    from glm_engine.tools.compare import relative_error
    from glm_engine.engine_format.engine import load_engine
    from glm_engine.quantization import dequantize_weights

    model_dir = tiny_checkpoint_factory("safetensors", seed=36)
    engines = {}
    for label, flags in {"plain": [], "channel": ["--use_weight_only", "--weight_only_precision", "int4"],
                         "group": ["--use_weight_only", "--weight_only_precision", "int4",
                                   "--weight_only_group_size", "32"]}.items():
        engine_dir = build_tool.build(build_tool.parse_arguments(
            ["--model_dir", str(model_dir), "--output_dir", str(tmp_path / label), "--dtype", "float32", *flags]))
        engines[label] = dequantize_weights(load_engine(engine_dir).weights, torch.float32)
    names = [name for name in engines["plain"] if name.endswith(("query_key_value.weight", "dense.weight",
                                                                  "dense_h_to_4h.weight", "dense_4h_to_h.weight"))]
    assert len(names) >= 8
    for name in names:
        plain = engines["plain"][name]
        assert relative_error(engines["group"][name], plain) < relative_error(engines["channel"][name], plain)


@pytest.mark.parametrize("flags, message", [
    (["--weight_only_group_size", "32"], "--weight_only_group_size applies to --use_weight_only"),
    (["--use_weight_only", "--weight_only_group_size", "48"],
     "--weight_only_group_size must be 0 (per output channel) or a power of two of at least 32, got 48"),
    (["--use_weight_only", "--weight_only_group_size", "16"],
     "--weight_only_group_size must be 0 (per output channel) or a power of two of at least 32, got 16"),
    (["--use_weight_only", "--weight_only_group_size", "128"],
     "--weight_only_group_size 128 does not divide the 64 input channels (hidden_size)"),
    (["--use_weight_only", "--weight_only_group_size", "64", "--world_size", "2"],
     "--weight_only_group_size 64 does not divide the 32 input channels (attention channels per rank)"),
])
def test_bad_weight_only_group_size_is_refused(tmp_path, flags, message):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, *flags)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []


@interpreted
def test_prompt_graph_inputs_give_the_eager_step(tiny_checkpoint_factory, tmp_path):
    """The prompt graphs' static-input step (run eagerly on the CPU), padded to its token
    bucket, equals the eager step and leaves the same K/V in the sequence's blocks: a
    fresh prompt, and a chunk after cached tokens."""
    session = build_engine(tiny_checkpoint_factory("safetensors", seed=35), tmp_path / "engine", "float32",
                           *with_dtype(PLUGINS["attention"], "float32"), "--enable_context_fmha_fp32_acc")
    runner = session.runner
    graphs = PromptGraphs(runner.network, runner.attention, runner.kv_cache, 40, runner.blocks_per_sequence,
                          runner.scratch_block, session.device)
    assert sorted(graphs.graphs) == [16, 32, 64]
    assert graphs.takes([[1, 2]]) and graphs.takes([[1] * 64])
    assert not graphs.takes([[1]]) and not graphs.takes([[1] * 65]) and not graphs.takes([[1, 2], [3, 4]])
    prompt = random_prompt(50, 3)
    table: list[int] = []
    assert session.block_manager.grow(table, len(prompt))
    cache = runner.kv_cache
    for cached, end in ((0, 11), (11, 50)):  # buckets 16 (5 padding tokens) and 64 (25)
        chunk = prompt[cached:end]
        logits, greedy = graphs.run([table], [cached], [chunk])
        graph_keys, graph_values = cache.keys.clone(), cache.values.clone()
        eager = runner.forward([table], [cached], [chunk])
        assert relative_error(logits, eager) < 1e-5
        assert torch.equal(greedy, eager.argmax(-1))
        slots = torch.tensor([table[p // cache.block_size] * cache.block_size + p % cache.block_size
                              for p in range(end)])
        assert torch.allclose(graph_keys[:, slots], cache.keys[:, slots], atol=1e-6)
        assert torch.allclose(graph_values[:, slots], cache.values[:, slots], atol=1e-6)


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are captured on a GPU")


@on_gpu
def test_prompt_graphs_give_the_eager_tokens(monkeypatch, tmp_path):
    """On a GPU, a session with the prompt graphs generates the tokens of one without CUDA
    graphs, for a prompt in every token bucket, and runs the graphs for them."""
    config = read_model_config(tiny_config())
    generator = torch.Generator().manual_seed(36)
    weights = {name: (torch.randn(shape, generator=generator) * 0.1).half() for name, shape in
               weight_shapes(config).items()}
    build = BuildConfig(dtype="float16", max_batch_size=2, max_input_len=150, max_output_len=16,
                        use_gpt_attention_plugin="float16", context_fmha="enabled_with_fp32_acc")
    graphed = load_session(Engine(tmp_path, config, build, dict(weights)), "cuda")
    eager = load_session(Engine(tmp_path, config, build, dict(weights)), "cuda", cuda_graphs=False)
    assert sorted(graphed.runner.prompt_graphs.graphs) == [16, 32, 64, 128, 256]
    assert eager.runner.prompt_graphs is None
    runs = []
    original = PromptGraphs.run
    monkeypatch.setattr(PromptGraphs, "run", lambda self, *args: runs.append(1) or original(self, *args))
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    for length in (2, 9, 16, 17, 100, 150):
        prompt = random_prompt(length, length)
        assert graphed.generate([prompt], sampling) == eager.generate([prompt], sampling)
    assert len(runs) == 6


@interpreted
def test_decode_graph_inputs_give_the_eager_step(tiny_checkpoint_factory, tmp_path):
    """The graphs' static-input step (run eagerly on the CPU) equals the eager decode
    step for several rows of different lengths, a padded bucket included."""
    from glm_engine.runtime.cuda_graphs import DecodeGraphs

    session = build_engine(tiny_checkpoint_factory("safetensors", seed=34), tmp_path / "engine", "float32",
                           *with_dtype(PLUGINS["attention"], "float32"))
    runner = session.runner
    graphs = DecodeGraphs(runner.network, runner.attention, runner.kv_cache, session.build_config.max_batch_size,
                          runner.blocks_per_sequence, runner.scratch_block, session.device)
    prompts = [random_prompt(length, seed) for seed, length in enumerate([3, 70, 11])]  # bucket 4: one padding row
    cached = [len(p) - 1 for p in prompts]
    tables = [[], [], []]
    for table, prompt in zip(tables, prompts):
        assert session.block_manager.grow(table, len(prompt))
    for count in (3, 1):
        runner.forward(tables[:count], [0] * count, [p[:-1] for p in prompts[:count]])
        logits, greedy = graphs.run(tables[:count], cached[:count], [[p[-1]] for p in prompts[:count]])
        eager = runner.forward(tables[:count], cached[:count], [[p[-1]] for p in prompts[:count]])
        assert relative_error(logits, eager) < 1e-5
        assert torch.equal(greedy, eager.argmax(-1))


def test_graphs_only_for_backends_that_support_them():
    """The reference attention (per-step shapes) gets no CUDA graphs; the plugin's gets decode
    graphs, and prompt graphs with context FMHA on engines of one rank."""
    config = read_model_config(tiny_config())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # the backends live on the CPU; only the choice sees cuda
    build = BuildConfig(dtype="float32", use_gpt_attention_plugin="float32", context_fmha="enabled_with_fp32_acc")
    reference = ReferenceAttention(config, torch.float32, cpu)
    assert not reference.supports_cuda_graphs and not reference.supports_prompt_graphs
    assert graphs_to_capture(reference, build, cuda, True) == (False, False)
    with pytest.raises(NotImplementedError, match="ReferenceAttention does not run in CUDA graphs"):
        reference.graph_inputs(1, 1, 4, 16, 0)
    paged = PagedAttention(config, torch.float32, cpu, build.context_fmha, build.max_sequence_len)
    assert graphs_to_capture(paged, build, cuda, True) == (True, True)
    assert graphs_to_capture(paged, build, cuda, False) == (False, False)
    assert graphs_to_capture(paged, build, cpu, True) == (False, False)
    assert graphs_to_capture(paged, dataclasses.replace(build, world_size=2), cuda, True) == (True, False)
    without_fmha = PagedAttention(config, torch.float32, cpu, None, build.max_sequence_len)
    assert graphs_to_capture(without_fmha, build, cuda, True) == (True, False)


@pytest.mark.parametrize("sequences, tokens", [(1, 1), (4, 4), (1, 16), (1, 64)])
def test_graph_metadata_equals_the_eager_metadata(sequences, tokens):
    """The plugin's graph metadata, its static inputs filled for random steps (decode rows, or
    one sequence's prompt or chunk), holds the eager metadata's values for the step; padding
    tokens and rows address the scratch block."""
    config = read_model_config(tiny_config())
    backend = PagedAttention(config, torch.float32, torch.device("cpu"), "enabled_with_fp32_acc", 256)
    block_size, width, scratch = 4, 20, 90
    graph_inputs = backend.graph_inputs(sequences, tokens, width, block_size, scratch)
    empty: list[int] = []
    graph_inputs.append_step(empty, [], [], [])
    inputs = torch.tensor(empty)
    meta = graph_inputs.bind(inputs)
    assert graph_inputs.last_token_index is meta.last_token_index
    rng = random.Random(sequences * 1000 + tokens)
    for _ in range(20):
        rows = rng.randint(1, sequences)
        new = [1] * rows if sequences == tokens else [rng.randint(2, tokens)]
        cached = [rng.randint(0, width * block_size - count) for count in new]
        tables = [rng.sample(range(scratch), -(-(done + count) // block_size)) for done, count in zip(cached, new)]
        step: list[int] = []
        graph_inputs.append_step(step, tables, cached, new)
        inputs.copy_(torch.tensor(step))
        graph_inputs.prepare()
        eager = backend.metadata(StepLayout.of(tables, cached, new, block_size))
        packed = sum(new)
        assert torch.equal(meta.positions[:packed], eager.positions)
        assert torch.equal(meta.slot_mapping[:packed], eager.slot_mapping)
        assert torch.equal(meta.context_lengths[:rows], eager.context_lengths)
        for row, table in enumerate(tables):
            assert meta.block_tables[row, :len(table)].tolist() == eager.block_tables[row, :len(table)].tolist()
        assert meta.max_context == eager.max_context
        assert meta.fresh_prompt_lengths is None and eager.fresh_prompt_lengths is None
        assert meta.reference is None and eager.reference is None
        if sequences == tokens:  # decode: the decode kernel reads no token counts
            assert meta.new_token_counts is None and meta.last_token_index is None
            assert meta.max_new_tokens == eager.max_new_tokens == 1
        else:
            assert torch.equal(meta.new_token_counts[:rows], eager.new_token_counts)
            assert torch.equal(meta.last_token_index[:rows], eager.last_token_index)
            assert meta.max_new_tokens == tokens >= eager.max_new_tokens
        assert meta.positions[packed:].eq(0).all() and meta.slot_mapping[packed:].eq(scratch * block_size).all()
        assert meta.context_lengths[rows:].eq(1).all() and meta.block_tables[rows:].eq(scratch).all()
        assert (meta.token_tables is not None) == (sequences < tokens <= TOKEN_ROWS_MAX)  # a token a decode-kernel row
        if meta.token_tables is not None:
            assert torch.equal(meta.token_context_lengths[:packed], eager.token_context_lengths)
            for token, table in enumerate(eager.token_tables.tolist()):
                used = -(-int(eager.token_context_lengths[token]) // block_size)
                assert meta.token_tables[token, :used].tolist() == table[:used]
