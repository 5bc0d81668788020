"""FP8 engines (build.py --enable_fp8): the per-token quantizer kernel and the FP8 linear
against their plain-PyTorch references, the engine's storage and accuracy, and the
flags and GPUs it refuses."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from checkpoints import tiny_config
from conftest import TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig
from glm_engine.engine_format.engine import load_engine
from glm_engine.kernels import fp8, reference, weight_only_mma
from glm_engine.models import read_model_config
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.tools.compare import relative_error
from test_model import build_engine, random_prompt

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="the quantizer is a Triton kernel: a GPU or TRITON_INTERPRET=1")
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


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, columns", [(1, 64), (3, 100), (5, 4096), (2, 13696)])
def test_quantizer_kernel_rounds_as_the_reference(rows, columns, dtype):
    """Bit for bit: every FP8 value (ties to even, across exponent boundaries) and scale."""
    x = rows_with_outliers(rows, columns, dtype)
    values, scales = fp8.quantize_rows(x)
    expected_values, expected_scales = reference.quantize_rows_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (rows, 1)
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales, expected_scales)
    largest = values.float().abs().amax(dim=1)  # each nonzero row's largest value maps to 448
    assert torch.equal(largest, torch.where(x.abs().amax(dim=1) > 0, reference.FP8_MAX, 0.0).to(largest))


def test_quantized_rows_stand_for_the_input_within_fp8_precision():
    x = rows_with_outliers(4, 512, torch.float32).cpu()
    values, scales = reference.quantize_rows_fp8(x)
    restored = values.float() * scales
    # E4M3 keeps 3 mantissa bits: half an ulp is 1/16 of the value, down to the subnormals' fixed step.
    assert ((restored - x).abs() <= x.abs() / 16 + scales * 2 ** -10).all()


@interpreted
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
    # Only the float32 accumulation order differs; half-precision outputs may round one ulp apart (float32
    # ones too where torch._scaled_mm returns only bfloat16 with per-row scales).
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[fp8.product_dtype(dtype, x.device)]
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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not scaled_mm_runs(),
                    reason="CPU sessions run the quantizer only under TRITON_INTERPRET=1, with torch._scaled_mm")
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


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [3, 37])  # one token a program, and tiles of several with a ragged last one
def test_rotary_kernel_stores_an_fp8_cache_as_the_reference(dtype, tokens):
    """The FP8 cache holds exactly to_cache_dtype of what an unquantized cache holds
    (saturated at +-448, rounded to nearest even), and the query is unchanged."""
    from glm_engine.kernels import rotary_kv
    from glm_engine.runtime.kv_cache import to_cache_dtype

    heads, groups, head_dim, num_slots = 4, 2, 64, 48
    qkv = torch.randn(tokens, (heads + 2 * groups) * head_dim, device=DEVICE) * torch.logspace(-3, 3, tokens,
                                                                                               device=DEVICE)[:, None]
    qkv = qkv.to(dtype)
    positions, slots = torch.arange(tokens, device=DEVICE) * 7, torch.randperm(num_slots, device=DEVICE)[:tokens]
    inv_freq = reference.rotary_inv_freq(head_dim // 2, 10000.0).to(DEVICE)
    caches = {}
    for cache_dtype in (dtype, torch.float8_e4m3fn):
        keys = torch.zeros(num_slots, groups, head_dim, device=DEVICE).to(cache_dtype)
        values = torch.zeros_like(keys)
        query = rotary_kv.rotary_kv_write(qkv, positions, inv_freq, 1.0, slots, keys, values, heads)
        caches[cache_dtype] = (query, keys, values)
    (query, keys, values), (fp8_query, fp8_keys, fp8_values) = caches[dtype], caches[torch.float8_e4m3fn]
    assert torch.equal(fp8_query, query)
    for quantized, exact in ((fp8_keys, keys), (fp8_values, values)):
        assert torch.equal(quantized.view(torch.uint8), to_cache_dtype(exact, torch.float8_e4m3fn).view(torch.uint8))
    assert fp8_keys.float().abs().max() == 448.0  # the largest tokens saturate


def test_an_fp8_kv_cache_holds_twice_the_tokens():
    from glm_engine.runtime.kv_cache import block_bytes

    config = read_model_config(tiny_config())
    build = BuildConfig(dtype="float16", paged_kv_cache=True)
    assert block_bytes(config, dataclasses.replace(build, fp8_kv_cache=True)) * 2 == block_bytes(config, build)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU sessions run the kernels only under TRITON_INTERPRET=1")
def test_fp8_kv_cache_engine_on_its_kernels_gives_the_reference_engines_tokens(tiny_checkpoint_factory, tmp_path,
                                                                               monkeypatch):
    """Rotary + FP8 cache store, context FMHA and decode attention reading the FP8 cache,
    against the reference attention over the same cache; both close to the unquantized cache."""
    model_dir = tiny_checkpoint_factory("safetensors", seed=43)
    flags = ["--fp8_kv_cache", "--use_gpt_attention_plugin", "float32", "--enable_context_fmha_fp32_acc"]
    kernels = build_engine(model_dir, tmp_path / "kernels", "float32", *flags)
    monkeypatch.delenv("TRITON_INTERPRET")
    references = build_engine(model_dir, tmp_path / "reference", "float32", "--fp8_kv_cache")
    plain = build_engine(model_dir, tmp_path / "plain", "float32")
    assert kernels.runner.kv_cache.keys.dtype == torch.float8_e4m3fn
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 19, 2])]
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    assert kernels.generate(prompts, sampling) == references.generate(prompts, sampling)
    prompt = random_prompt(24, 9)
    assert relative_error(kernels.decode_logits(prompt, 6), references.decode_logits(prompt, 6)) < 1e-4
    error = relative_error(references.prompt_logits(prompt), plain.prompt_logits(prompt))
    assert 0 < error < 5e-2, error


def test_an_fp8_kv_cache_copies_blocks_and_writes_slots():
    """Copy-on-write of a shared block (beam search) and the reference write, on the CPU,
    where indexing takes no float8."""
    from glm_engine.runtime.kv_cache import KVCache, to_cache_dtype

    cache = KVCache(2, 4, 8, 2, 16, torch.float8_e4m3fn, torch.device("cpu"))
    key, value = torch.randn(3, 2, 16) * 300, torch.randn(3, 2, 16)
    cache.write(1, torch.tensor([8, 9, 15]), key, value)
    expected = to_cache_dtype(key[:2], cache.keys.dtype)
    assert torch.equal(cache.keys[1, 8:10].view(torch.uint8), expected.view(torch.uint8))
    cache.copy_blocks([(1, 3)])
    assert torch.equal(cache.keys[:, 24:32].view(torch.uint8), cache.keys[:, 8:16].view(torch.uint8))
    assert torch.equal(cache.values[:, 24:32].view(torch.uint8), cache.values[:, 8:16].view(torch.uint8))
