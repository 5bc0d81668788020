"""The weight-only tensor-core GEMM (glm_engine/kernels/weight_only_mma.py): its weight
layout on any machine, the CUDA kernels against the plain-PyTorch reference on a GPU,
and the op table's choice of it."""

from __future__ import annotations

import pytest
import torch
import torch.utils.deterministic

from glm_engine.tools.compare import relative_error
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.kernels import launch_configs, reference, weight_only_mma
from glm_engine.runtime.ops import select_ops, shuffle_quantized_weights, uses_mma_gemm
from glm_engine.quantization import quantize_symmetric

ON_GPU = torch.cuda.is_available() and weight_only_mma.runs_on(torch.device("cuda"))
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="the mma kernels are CUDA: they run on a GPU of sm_80 or later")


def quantized(n: int, k: int, bits: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(n, k, device=device) / k ** 0.5 * torch.linspace(0.2, 2.0, k, device=device)
    return quantize_symmetric(weight, bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k", [(16, 64), (48, 192), (32, 640)])
def test_shuffle_round_trips(bits, n, k):
    weight, _ = quantized(n, k, bits)
    shuffled = weight_only_mma.shuffle(weight, bits)
    assert shuffled.shape == weight.shape and shuffled.dtype == weight.dtype
    assert not torch.equal(shuffled, weight)
    assert torch.equal(weight_only_mma.unshuffle(shuffled, bits), weight)


@pytest.mark.parametrize("bits", [8, 4])
def test_shuffle_puts_each_lanes_fragment_in_its_words(bits):
    """The contract weight_only_mma.cu reads, for lane 4g + c, chunk q of tile t and step j:
    int4 word j holds in nibble i v + 8 of row 16t + g (+ 8 for odd i) at input channel
    64q + 16c + 4j + (0, 0, 2, 2, 1, 1, 3, 3)[i]; int8 words 2j (row 16t + g) and 2j + 1
    (row 16t + g + 8) hold v + 128 of channels 64q + 16c + 4j + 0..3 in bytes 0..3."""
    n, k = 32, 128
    weight, scales = quantized(n, k, bits)
    values = reference.dequantize(weight, torch.ones_like(scales), bits, torch.float32).round().to(torch.int64)
    words = weight_only_mma.shuffle(weight, bits).view(torch.int32).to(torch.int64).flatten() & 0xFFFFFFFF
    words_a_step = 1 if bits == 4 else 2
    chunks = k // 64
    for index, word in enumerate(words.tolist()):
        step_word, lane_chunk = index % (4 * words_a_step), index // (4 * words_a_step)
        j, upper_word = divmod(step_word, words_a_step)
        lane, chunk, tile = lane_chunk % 32, lane_chunk // 32 % chunks, lane_chunk // 32 // chunks
        g, c = divmod(lane, 4)
        first = 64 * chunk + 16 * c + 4 * j
        if bits == 4:
            found = [(word >> (4 * i) & 15) - 8 for i in range(8)]
            expected = [values[16 * tile + g + 8 * (i % 2), first + (0, 0, 2, 2, 1, 1, 3, 3)[i]] for i in range(8)]
        else:
            found = [(word >> (8 * i) & 255) - 128 for i in range(4)]
            expected = [values[16 * tile + g + 8 * upper_word, first + i] for i in range(4)]
        assert found == [int(value) for value in expected], index



def test_launch_configs_are_all_listed():
    """LAUNCH_CONFIGS, which the GPU tests run one by one, holds every config launch_config
    picks (ChatGLM2-6B's shapes, its halves at two ranks, small ones, the table's shapes;
    every width; every architecture of the launch table, and one it does not know)."""
    archs = [*launch_configs.table()["weight_only_mma"], "sm_00"]
    table_shapes = {(entry["n"], entry["k"]) for entries in launch_configs.table()["weight_only_mma"].values()
                    for entry in entries if "n" in entry}
    shapes = {(n, k) for n in (16, 64, 2304, 4096, 4608, 13696, 27392) for k in (64, 2048, 4096, 6848, 13696)}
    chosen = {weight_only_mma.launch_config(n, k, bits, swiglu, arch)
              for n, k in shapes | table_shapes for bits in (4, 8, 16) for swiglu in (False, True)
              for arch in archs if not swiglu or n % 32 == 0}
    assert chosen == set(weight_only_mma.LAUNCH_CONFIGS)


def test_compile_kernels_compiles_what_gemm_will_launch(monkeypatch):
    """At load the engine compiles, per linear, the config launch_config picks at one and two
    row blocks (two tiles for the SwiGLU up projection), and the dequantize kernel: the
    kernels a decode graph launches are never compiled while it is captured."""
    compiled = []
    monkeypatch.setattr(weight_only_mma, "_gemm_kernel", lambda *variant: compiled.append(variant))
    monkeypatch.setattr(weight_only_mma, "_dequantize_kernel", lambda *variant: compiled.append(("dequantize",
                                                                                               *variant)))
    linears = [(4608, 4096, False), (4096, 4096, False), (27392, 4096, True), (4096, 13696, False)]
    # fp16 and FP8 weights: nothing to dequantize (FP8 prompts multiply them on the FP8 tensor cores)
    for bits, fp8, dequantized in ((4, False, {("dequantize", 0, 4)}), (16, False, set()), (8, True, set())):
        compiled.clear()
        weight_only_mma.compile_kernels(torch.device("cuda", 0), bits, linears, fp8)
        expected = {(0, bits, *weight_only_mma.launch_config(n, k, bits, swiglu), row_blocks, 2 if swiglu else 1,
                     fp8) for n, k, swiglu in linears for row_blocks in (1, 2)}
        assert set(compiled) == expected | dequantized

def test_shuffle_refuses_weights_that_do_not_tile():
    with pytest.raises(ValueError, match="tiles 16 output by 64 input channels, got a 24x64 weight"):
        weight_only_mma.shuffle(quantized(24, 64, 4)[0], 4)
    with pytest.raises(ValueError, match="got a 16x96 weight"):
        weight_only_mma.shuffle(quantized(16, 96, 8)[0], 8)


def test_only_quantized_weights_are_shuffled():
    int4, scales = quantized(16, 64, 4)
    dense = torch.randn(16, 64)
    weights = {"a.weight": int4, "a.weight_scales": scales, "c.weight": dense, "d.weight": int4.clone()}
    shuffled = shuffle_quantized_weights(weight_only_mma.shuffle, 4, weights)
    assert torch.equal(shuffled["a.weight"], weight_only_mma.shuffle(int4, 4))
    for name in ("a.weight_scales", "c.weight", "d.weight"):  # d: no scales, so no quantized linear
        assert shuffled[name] is weights[name]


def test_op_table_keeps_the_triton_path_off_the_gpu():
    """On the CPU (or with group scales / bf16 / neither weight-only nor the GEMM plugin) the
    engine keeps its weights as they are and the Triton or reference linears."""
    config = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16,
                         multi_query_group_num=2, ffn_hidden_size=128, vocab_size=256, seq_length=256)
    int4 = BuildConfig(dtype="float16", weight_only_precision="int4")
    assert not uses_mma_gemm(config, int4, torch.device("cpu"))
    ops = select_ops(config, int4, torch.device("cpu"))
    weights = {"w.weight": quantized(16, 64, 4)[0]}
    assert ops.prepare_weights(weights) is weights
    for build in (BuildConfig(dtype="float16"), BuildConfig(dtype="bfloat16", use_gemm_plugin="bfloat16"),
                  BuildConfig(dtype="bfloat16", weight_only_precision="int8"),
                  BuildConfig(dtype="float16", weight_only_precision="int4", weight_only_group_size=32)):
        assert not uses_mma_gemm(config, build, torch.device("cuda"))


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 9, 16])
@pytest.mark.parametrize("n, k, with_bias", [(16, 64, True), (48, 192, False), (4608, 4096, True),
                                             (4096, 13696, False), (27392, 4096, False), (80, 8256, True)])
def test_gemm_matches_reference(bits, rows, n, k, with_bias):
    """The launch configuration of each shape, one and two row blocks, ragged row counts."""
    weight, scales = quantized(n, k, bits, "cuda")
    x = torch.randn(rows, k, dtype=torch.float16, device="cuda")
    bias = torch.randn(n, dtype=torch.float16, device="cuda") if with_bias else None
    expected = reference.linear(x.double(), reference.dequantize(weight, scales, bits, torch.float64),
                                None if bias is None else bias.double())
    out = weight_only_mma.gemm(x, weight_only_mma.shuffle(weight, bits), bias, scales, bits)
    assert out.shape == (rows, n) and out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("config", weight_only_mma.LAUNCH_CONFIGS)
@pytest.mark.parametrize("swiglu", [False, True])
def test_every_launch_config_matches_reference(bits, rows, config, swiglu):
    """Every config, with and without the SwiGLU epilogue."""
    weight, scales = quantized(64, 1216, bits, "cuda")  # 19 chunks: no warp count divides them
    x = torch.randn(rows, 1216, dtype=torch.float16, device="cuda")
    expected = reference.linear(x.double(), reference.dequantize(weight, scales, bits, torch.float64))
    expected = reference.swiglu(expected) if swiglu else expected
    out = weight_only_mma.gemm(x, weight_only_mma.shuffle(weight, bits), None, scales, bits, config, swiglu=swiglu)
    assert relative_error(out, expected) < 2e-3


@needs_gpu
def test_gemm_takes_a_row_at_an_odd_element():
    weight, scales = quantized(48, 192, 4, "cuda")
    x = torch.randn(2, 193, dtype=torch.float16, device="cuda")[:, 1:]
    expected = reference.linear(x.double(), reference.dequantize(weight, scales, 4, torch.float64))
    assert relative_error(weight_only_mma.gemm(x, weight_only_mma.shuffle(weight, 4), None, scales, 4),
                          expected) < 2e-3


@needs_gpu
def test_gemm_refuses_what_it_cannot_run():
    weight, scales = quantized(16, 64, 4, "cuda")
    shuffled = weight_only_mma.shuffle(weight, 4)
    with pytest.raises(ValueError, match="up to 16 fp16 rows"):
        weight_only_mma.gemm(torch.randn(17, 64, dtype=torch.float16, device="cuda"), shuffled, None, scales, 4)
    with pytest.raises(ValueError, match="up to 16 fp16 rows"):
        weight_only_mma.gemm(torch.randn(1, 64, dtype=torch.bfloat16, device="cuda"), shuffled, None, scales, 4)


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k", [(16, 64), (48, 192), (4096, 13696)])
def test_dequantize_matches_reference(bits, n, k):
    """Every element written (new tensors are NaN-filled here). Its bounds are checked by
    running this test under compute-sanitizer (docs/PERFORMANCE.md)."""
    weight, scales = quantized(n, k, bits, "cuda")
    shuffled = weight_only_mma.shuffle(weight, bits)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = weight_only_mma.dequantize(shuffled, scales, bits, torch.float16)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(out, reference.dequantize(weight, scales, bits, torch.float16))


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gemm_in_a_cuda_graph_sees_the_kernel_ahead(bits):
    """Launched with programmatic dependent launch after a Triton kernel that writes its
    input, captured in a CUDA graph and replayed on new inputs: equal to eager calls."""
    from glm_engine.kernels import norm

    weight, scales = quantized(4608, 4096, bits, "cuda")
    shuffled = weight_only_mma.shuffle(weight, bits)
    residual = torch.randn(2, 4096, dtype=torch.float16, device="cuda")
    norm_weight = torch.rand(4096, dtype=torch.float16, device="cuda") + 0.5

    def step() -> torch.Tensor:
        normed, _ = norm.add_rms_norm(None, residual, norm_weight, 1e-5)
        return weight_only_mma.gemm(normed, shuffled, None, scales, bits)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        residual.copy_(torch.randn_like(residual))
        graph.replay()
        assert torch.equal(captured, step())



@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n, k, with_bias", [(64, 192, True), (27392, 4096, False), (13696, 4096, False)])
def test_swiglu_gemm_matches_reference(bits, rows, n, k, with_bias):
    """The up projection with SwiGLU in its epilogue: the engine's shape and its half (two
    ranks), one and two row blocks, ragged row counts."""
    weight, scales = quantized(n, k, bits, "cuda")
    x = torch.randn(rows, k, dtype=torch.float16, device="cuda")
    bias = torch.randn(n, dtype=torch.float16, device="cuda") if with_bias else None
    expected = reference.swiglu(reference.linear(x.double(), reference.dequantize(weight, scales, bits, torch.float64),
                                                 None if bias is None else bias.double()))
    out = weight_only_mma.gemm(x, weight_only_mma.shuffle(weight, bits), bias, scales, bits, swiglu=True)
    assert out.shape == (rows, n // 2) and out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


def test_swiglu_gemm_refuses_halves_that_split_a_tile():
    """SwiGLU pairs gate tile t with up tile t + n / 32: n must be a multiple of 32."""
    weight, scales = quantized(48, 64, 4)
    assert not weight_only_mma.swiglu_fits(48) and weight_only_mma.swiglu_fits(64)
    with pytest.raises(ValueError, match="48 outputs are not 32 x m"):
        weight_only_mma.gemm(torch.randn(1, 64, dtype=torch.float16), weight_only_mma.shuffle(weight, 4), None,
                             scales, 4, swiglu=True)



@needs_gpu
@pytest.mark.parametrize("rows", [1, 20])
def test_op_table_gated_linear_is_swiglu_of_linear(rows):
    """The engine's up projection on the GPU: SwiGLU in the GEMM's epilogue for decode rows,
    linear then the SwiGLU kernel past 16 rows (prefill); both equal SwiGLU of the linear."""
    from glm_engine.kernels import swiglu

    config = ModelConfig(num_layers=1, hidden_size=128, num_attention_heads=4, kv_channels=32,
                         multi_query_group_num=2, ffn_hidden_size=192, vocab_size=256, seq_length=256)
    build = BuildConfig(dtype="float16", weight_only_precision="int4", use_layernorm_plugin="float16")
    assert uses_mma_gemm(config, build, torch.device("cuda"))
    ops = select_ops(config, build, torch.device("cuda"))
    weight, scales = quantized(2 * 192, 128, 4, "cuda")
    shuffled = weight_only_mma.shuffle(weight, 4)
    x = torch.randn(rows, 128, dtype=torch.float16, device="cuda")
    expected = reference.swiglu(reference.linear(x.double(), reference.dequantize(weight, scales, 4, torch.float64)))
    out = ops.gated_linear(x, shuffled, None, scales, 4)
    assert out.shape == (rows, 192)
    assert relative_error(out, expected) < 2e-3
    assert relative_error(swiglu.swiglu(ops.linear(x, shuffled, None, scales, 4)), expected) < 2e-3


@needs_gpu
@pytest.mark.parametrize("rows", [1, 3, 9, 16])
@pytest.mark.parametrize("n, k, with_bias", [(16, 64, True), (4608, 4096, True), (4096, 13696, False),
                                             (80, 8256, False)])
def test_fp16_gemm_matches_reference(rows, n, k, with_bias):
    """fp16 weights read as they are (row-major), no scales: one and two row blocks."""
    weight = torch.randn(n, k, dtype=torch.float16, device="cuda") / k ** 0.5
    x = torch.randn(rows, k, dtype=torch.float16, device="cuda")
    bias = torch.randn(n, dtype=torch.float16, device="cuda") if with_bias else None
    expected = reference.linear(x.double(), weight.double(), None if bias is None else bias.double())
    out = weight_only_mma.gemm(x, weight, bias, None, 0)
    assert out.shape == (rows, n) and out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


@needs_gpu
@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("config", weight_only_mma.LAUNCH_CONFIGS)
@pytest.mark.parametrize("swiglu", [False, True])
def test_fp16_gemm_every_launch_config_matches_reference(rows, config, swiglu):
    weight = torch.randn(64, 1216, dtype=torch.float16, device="cuda") / 1216 ** 0.5  # 19 chunks
    x = torch.randn(rows, 1216, dtype=torch.float16, device="cuda")
    expected = reference.linear(x.double(), weight.double())
    out = weight_only_mma.gemm(x, weight, None, None, 0, config, swiglu=swiglu)
    assert relative_error(out, reference.swiglu(expected) if swiglu else expected) < 2e-3


@needs_gpu
def test_op_table_puts_fp16_gemm_plugin_linears_on_the_mma_gemm():
    config = ModelConfig(num_layers=1, hidden_size=128, num_attention_heads=4, kv_channels=32,
                         multi_query_group_num=2, ffn_hidden_size=192, vocab_size=256, seq_length=256)
    build = BuildConfig(dtype="float16", use_gemm_plugin="float16")
    assert uses_mma_gemm(config, build, torch.device("cuda"))
    ops = select_ops(config, build, torch.device("cuda"))
    weights = {"w.weight": torch.randn(16, 64, dtype=torch.float16)}
    assert ops.prepare_weights(weights) is weights  # read as they are
    weight = torch.randn(384, 128, dtype=torch.float16, device="cuda") / 128 ** 0.5
    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    expected = reference.linear(x.double(), weight.double())
    assert relative_error(ops.linear(x, weight, None, None, 0), expected) < 2e-3
    assert relative_error(ops.gated_linear(x, weight, None, None, 0), reference.swiglu(expected)) < 2e-3


def test_fp16_gemm_refuses_a_weight_it_cannot_read():
    x = torch.randn(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="contiguous and 16-byte aligned"):
        weight_only_mma.gemm(x, torch.randn(16, 128, dtype=torch.float16)[:, :64], None, None, 0)
    with pytest.raises(ValueError, match="or on fp16 weights, got 1 torch.float16 rows, 0-bit torch.bfloat16"):
        weight_only_mma.gemm(x, torch.randn(16, 64, dtype=torch.bfloat16), None, None, 0)
    with pytest.raises(ValueError, match="scales \\(16,\\)"):
        weight_only_mma.gemm(x, torch.randn(16, 64, dtype=torch.float16), None, torch.ones(16), 0)
