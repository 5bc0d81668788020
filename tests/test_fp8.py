"""FP8 engines (build.py --enable_fp8): the per-token quantizer kernel and the FP8 linear
against their plain-PyTorch references, the engine's storage and accuracy, and the
flags and GPUs it refuses."""

from __future__ import annotations


import pytest
import torch

from conftest import (TINY_SHAPE_FLAGS, assert_one_line_error, cpu_sessions_run_kernels, needs_triton,
                      run_tool)
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig
from glm_engine.engine_format.engine import load_engine
from glm_engine.kernels import fp8, reference, weight_only_mma
from glm_engine.kernels.quantize import quantize_rows
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.tools.compare import relative_error
from test_model import build_engine, random_prompt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scaled_mm_runs() -> bool:
    """Whether torch._scaled_mm runs on DEVICE (on the CPU: recent torch)."""
    try:
        one = torch.ones(16, 16, device=DEVICE).to(torch.float8_e4m3fn)
        scale = torch.ones(16, 1, device=DEVICE)
        torch._scaled_mm(one, one.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def rows_with_outliers(rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Values over eight decades, a few large outliers, and (from 3 rows) a row of zeros."""
    x = torch.randn(rows, columns) * torch.logspace(-6, 2, columns)[torch.randperm(columns)]
    x[:, :: max(1, columns // 7)] *= 50
    if rows > 2:
        x[rows // 2] = 0
    return x.to(dtype).to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, columns", [(1, 64), (3, 100), (5, 4096), (2, 13696)])
def test_quantizer_kernel_rounds_as_the_reference(rows, columns, dtype):
    """Every FP8 value (ties to even, across exponent boundaries) and scale exactly (zeros of
    either sign alike: the GPU's conversion writes -0 as +0)."""
    x = rows_with_outliers(rows, columns, dtype)
    values, scales = quantize_rows(x, torch.float8_e4m3fn)
    expected_values, expected_scales = reference.quantize_rows_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (rows, 1)
    assert torch.equal(values.float(), expected_values.float())
    assert torch.equal(scales, expected_scales)
    largest = values.float().abs().amax(dim=1)  # each nonzero row's largest value maps to 448
    assert torch.equal(largest, torch.where(x.abs().amax(dim=1) > 0, reference.FP8_MAX, 0.0).to(largest))


def test_quantized_rows_stand_for_the_input_within_fp8_precision():
    x = rows_with_outliers(4, 512, torch.float32).cpu()
    values, scales = reference.quantize_rows_fp8(x)
    restored = values.float() * scales
    # E4M3 keeps 3 mantissa bits: half an ulp is 1/16 of the value, down to the subnormals' fixed step.
    assert ((restored - x).abs() <= x.abs() / 16 + scales * 2 ** -10).all()


@needs_triton
@pytest.mark.skipif(not scaled_mm_runs(), reason="torch._scaled_mm does not run here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, n, k, bias", [(17, 64, 64, True), (20, 96, 160, False), (33, 48, 256, True)])
def test_prompt_sized_fp8_linear_equals_its_reference(rows, n, k, bias, dtype):
    """More than WEIGHT_ONLY_ROWS rows: activations quantized per row, FP8 GEMM."""
    x = rows_with_outliers(rows, k, dtype)
    weight_values, weight_scales = reference.quantize_rows_fp8(torch.randn(n, k, device=DEVICE) / k ** 0.5)
    bias_values = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    out = fp8.make_linear(None)(x, weight_values, bias_values, weight_scales[:, 0])
    expected = reference.fp8_linear(x, weight_values, bias_values, weight_scales[:, 0])
    assert out.dtype == dtype and out.shape == (rows, n)
    # Only the accumulation differs (the CPU's in float32 order; Hopper's FP8 tensor cores keep ~14 bits between
    # promotions to float32: 8.5e-5 measured on an H100; emulating 13-14 truncated bits, promoted every 128
    # products, gives 1e-4 to 2.8e-4 on these shapes); half-precision outputs may round one ulp apart (float32
    # ones too where torch._scaled_mm returns only bfloat16 with per-row scales).
    tolerance = {torch.float32: 5e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}[fp8.product_dtype(dtype, x.device)]
    assert relative_error(out.float(), expected.float()) < tolerance


def test_fp8_engine_stores_a_byte_per_weight_and_stays_close_to_the_dense_engine(tiny_checkpoint_factory,
                                                                                   tmp_path):
    model_dir = tiny_checkpoint_factory("safetensors", seed=41)
    dense = build_engine(model_dir, tmp_path / "dense")
    quantized = build_engine(model_dir, tmp_path / "fp8", "float32", "--enable_fp8")
    engine = load_engine(tmp_path / "fp8")
    linears = [name for name in engine.weights if name + "_scales" in engine.weights]
    assert len(linears) == 4 * engine.model_config.num_layers
    for name in linears:
        assert engine.weights[name].dtype == torch.float8_e4m3fn
        assert engine.weights[name + "_scales"].shape == (engine.weights[name].shape[0],)
    prompt = random_prompt(24, 5)
    error = relative_error(quantized.prompt_logits(prompt), dense.prompt_logits(prompt))
    assert 1e-2 < error < 5e-2, error  # quantized (3.5e-2 here), and close


@cpu_sessions_run_kernels
@pytest.mark.skipif(not scaled_mm_runs(), reason="torch._scaled_mm does not run here")
def test_fp8_engine_on_its_kernels_gives_the_reference_engines_tokens(tiny_checkpoint_factory, tmp_path,
                                                                      monkeypatch):
    calls = []
    original = fp8.scaled_linear
    monkeypatch.setattr(fp8, "scaled_linear", lambda *args: calls.append(1) or original(*args))
    model_dir = tiny_checkpoint_factory("safetensors", seed=42)
    kernels = build_engine(model_dir, tmp_path / "kernels", "float32", "--enable_fp8")
    monkeypatch.delenv("TRITON_INTERPRET")
    references = build_engine(model_dir, tmp_path / "reference", "float32", "--enable_fp8")
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 19, 2])]
    sampling = SamplingConfig(max_new_tokens=12, end_id=-1)
    assert kernels.generate(prompts, sampling) == references.generate(prompts, sampling)
    assert calls


def test_decode_sized_steps_keep_their_activations():
    """Up to WEIGHT_ONLY_ROWS rows the reference is x times the dequantized weight."""
    weight_values, weight_scales = reference.quantize_rows_fp8(torch.randn(48, 64))
    dense = weight_values.float() * weight_scales
    for rows in (1, reference.WEIGHT_ONLY_ROWS, reference.WEIGHT_ONLY_ROWS + 1):
        x = torch.randn(rows, 64)
        out = reference.fp8_linear(x, weight_values, None, weight_scales[:, 0])
        weight_only = relative_error(out, x @ dense.t()) < 1e-6
        assert weight_only == (rows <= reference.WEIGHT_ONLY_ROWS)


@pytest.mark.skipif(not (torch.cuda.is_available() and weight_only_mma.runs_on(torch.device("cuda"))
                         and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="the tensor-core GEMM's FP8 weights need a GPU of compute capability 8.9 or later")
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_tensor_core_gemm_reads_fp8_weights_as_the_reference(rows, swiglu):
    n, k = (256, 1024) if swiglu else (4608, 4096)
    weight_values, weight_scales = reference.quantize_rows_fp8(torch.randn(n, k, device="cuda") / k ** 0.5)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    for config in weight_only_mma.LAUNCH_CONFIGS:
        out = weight_only_mma.gemm(x, weight_values, bias, weight_scales[:, 0], 0, config=config, swiglu=swiglu)
        expected = reference.fp8_linear(x, weight_values, bias, weight_scales[:, 0])
        if swiglu:
            expected = reference.swiglu(expected)
        assert relative_error(out.float(), expected.float()) < 2e-3, config


def test_fp8_and_weight_only_are_refused_together(tmp_path):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, "--enable_fp8",
                      "--use_weight_only")
    assert_one_line_error(result, "--enable_fp8 and --use_weight_only")
    assert not (tmp_path / "engine").exists()


def test_a_gpu_without_fp8_tensor_cores_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(GlmEngineError, match="FP8 tensor cores .* this GPU has 8.0"):
        fp8.check_device(torch.device("cuda"))


def test_engines_written_before_fp8_load_as_not_fp8():
    fields = BuildConfig().to_dict()
    del fields["enable_fp8"]
    assert BuildConfig.from_dict(fields).enable_fp8 is False
