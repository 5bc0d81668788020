"""INT8 SmoothQuant engines (build.py --smoothquant ALPHA --per_channel --per_token): the
per-token int8 quantizer and the int8 linear against their plain-PyTorch references,
the smoothing on a checkpoint with activation outliers, and the flags it refuses."""

from __future__ import annotations


import pytest
import torch

from conftest import (TINY_SHAPE_FLAGS, assert_one_line_error, cpu_sessions_run_kernels, needs_triton,
                      run_tool)
from glm_engine.config import BuildConfig
from glm_engine.engine_format.engine import Engine, load_engine
from glm_engine.engine_format.layout import linear_weight_names
from glm_engine.kernels import int8_gemm, reference
from glm_engine.kernels.quantize import quantize_rows
from glm_engine.quantization import SmoothQuant, quantize_weights
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.tools.compare import relative_error
from model import load_session
from test_fp8 import rows_with_outliers
from test_model import build_engine, random_prompt

SMOOTHQUANT = ["--smoothquant", "0.5", "--per_channel", "--per_token"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, columns", [(1, 64), (3, 100), (5, 4096), (2, 13696)])
def test_quantizer_kernel_rounds_as_the_reference(rows, columns, dtype):
    x = rows_with_outliers(rows, columns, dtype)
    values, scales = quantize_rows(x, torch.int8)
    expected_values, expected_scales = reference.quantize_rows_int8(x)
    assert values.dtype == torch.int8 and torch.equal(values, expected_values)
    assert torch.equal(scales, expected_scales)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, n, k, bias", [(17, 64, 64, True), (33, 96, 160, False), (70, 200, 96, True)])
def test_prompt_sized_int8_linear_equals_its_reference(rows, n, k, bias, dtype):
    """More than WEIGHT_ONLY_ROWS rows: per-token int8 activations, exact int32 sums, scaled
    (and the bias added) by one kernel in the reference's order: equal to the bit."""
    x = rows_with_outliers(rows, k, dtype)
    weight = SmoothQuant().quantize(torch.randn(n, k, device=DEVICE) / k ** 0.5)
    bias_values = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    out = int8_gemm.make_linear(None)(x, weight[""], bias_values, weight["_scales"])
    expected = reference.int8_linear(x, weight[""], bias_values, weight["_scales"])
    assert out.dtype == dtype and torch.equal(out, expected)  # integer sums: no order to differ in


FUSED_CHOICES = [  # small blocks for the interpreter; ragged in M, N and K against them
    {"fused": True, "block_m": 16, "block_n": 32, "block_k": 32, "group_m": 2, "num_warps": 4, "num_stages": 2},
    {"fused": True, "block_m": 64, "block_n": 64, "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 3},
]


@needs_triton
@pytest.mark.parametrize("choice", FUSED_CHOICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, n, k, bias", [(17, 64, 64, True), (70, 200, 160, False), (130, 48, 96, True)])
def test_fused_int8_gemm_equals_the_reference(rows, n, k, bias, dtype, choice):
    """The Triton GEMM with the scaling in its epilogue: equal to the bit, over row blocks
    walked in groups, a last group, column block and K step that are cut short."""
    x = rows_with_outliers(rows, k, dtype)
    weight = SmoothQuant().quantize(torch.randn(n, k, device=DEVICE) / k ** 0.5)
    bias_values = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    values, scales = quantize_rows(x, torch.int8)
    out = int8_gemm.fused_gemm(values, weight[""], scales, weight["_scales"], bias_values, dtype, choice)
    expected = reference.int8_linear(x, weight[""], bias_values, weight["_scales"])
    assert out.dtype == dtype and torch.equal(out, expected)


@needs_triton
def test_a_fused_choice_in_the_launch_table_runs_prompts_on_the_fused_gemm(monkeypatch):
    calls = []
    original = int8_gemm.fused_gemm
    monkeypatch.setattr(int8_gemm, "fused_gemm", lambda *args: calls.append(args[-1]) or original(*args))
    monkeypatch.setattr(int8_gemm.launch_configs, "choice", lambda kernel, arch, **key: FUSED_CHOICES[0])
    x = rows_with_outliers(40, 96, torch.float16)
    weight = SmoothQuant().quantize(torch.randn(80, 96, device=DEVICE) / 10)
    out = int8_gemm.make_linear(None)(x, weight[""], None, weight["_scales"])
    assert calls == [FUSED_CHOICES[0]]
    assert torch.equal(out, reference.int8_linear(x, weight[""], None, weight["_scales"]))


def test_smoothing_beats_plain_int8_on_activation_outliers(outlier_checkpoint, tmp_path):
    """Against W8A8 on the unsmoothed weights (the same runtime), relative logits error."""
    dense = build_engine(outlier_checkpoint, tmp_path / "dense")
    smoothed = build_engine(outlier_checkpoint, tmp_path / "sq", "float32", *SMOOTHQUANT)
    engine = load_engine(tmp_path / "dense")
    build = BuildConfig(dtype="float32", max_input_len=64, max_output_len=32, smoothquant=0.5)
    plain_weights = quantize_weights(dict(engine.weights), linear_weight_names(engine.model_config), SmoothQuant())
    plain = load_session(Engine(tmp_path, engine.model_config, build, plain_weights), "cpu")
    errors = []
    for seed in range(3):
        prompt = random_prompt(30, seed)  # more than 16 tokens: activations quantized
        reference_logits = dense.prompt_logits(prompt)
        errors.append((relative_error(smoothed.prompt_logits(prompt), reference_logits),
                       relative_error(plain.prompt_logits(prompt), reference_logits)))
    smoothed_error, plain_error = (sum(column) / len(errors) for column in zip(*errors))
    assert smoothed_error < 0.8 * plain_error, errors


def test_smoothing_keeps_the_dense_function(outlier_checkpoint, tmp_path):
    from glm_engine.tools.calibration import smooth_for_smoothquant

    build_engine(outlier_checkpoint, tmp_path / "dense")
    engine = load_engine(tmp_path / "dense")
    smoothed = dict(engine.weights)
    smooth_for_smoothquant(smoothed, engine.model_config, [random_prompt(40, seed) for seed in range(3)], 0.5,
                           torch.device("cpu"))
    norm = "layers.0.input_layernorm.weight"
    assert not torch.equal(smoothed[norm], engine.weights[norm])
    build = BuildConfig(dtype="float32", max_input_len=64, max_output_len=32)
    before = load_session(Engine(tmp_path, engine.model_config, build, engine.weights), "cpu")
    after = load_session(Engine(tmp_path, engine.model_config, build, smoothed), "cpu")
    prompt = random_prompt(25, 7)
    assert relative_error(after.prompt_logits(prompt), before.prompt_logits(prompt)) < 1e-5


@cpu_sessions_run_kernels
def test_smoothquant_engine_on_its_kernels_gives_the_reference_engines_tokens(outlier_checkpoint, tmp_path,
                                                                             monkeypatch):
    calls = []
    original = int8_gemm.scaled_linear
    monkeypatch.setattr(int8_gemm, "scaled_linear", lambda *args: calls.append(1) or original(*args))
    kernels = build_engine(outlier_checkpoint, tmp_path / "kernels", "float32", *SMOOTHQUANT)
    monkeypatch.delenv("TRITON_INTERPRET")
    references = build_engine(outlier_checkpoint, tmp_path / "reference", "float32", *SMOOTHQUANT)
    prompts = [random_prompt(20, 1), random_prompt(3, 2)]
    sampling = SamplingConfig(max_new_tokens=3, end_id=-1)
    assert kernels.generate(prompts, sampling) == references.generate(prompts, sampling)
    assert calls


@pytest.mark.parametrize("flags, message", [
    (["--smoothquant", "0.5"], "add --per_channel --per_token"),
    (["--per_token"], "--per_token sets SmoothQuant's scales"),
    (["--smoothquant", "1.5", "--per_channel", "--per_token"], "alpha in [0, 1]"),
    ([*SMOOTHQUANT, "--enable_fp8"], "are two ways to store the decoder linears"),
    ([*SMOOTHQUANT, "--use_weight_only"], "are two ways to store the decoder linears"),
    ([*SMOOTHQUANT, "--world_size", "2", "--parallel_build"], "drop --parallel_build"),
])
def test_smoothquant_flags_are_checked(tmp_path, flags, message):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "engine").exists()
