"""The int4 tensor-core GEMM (glm_engine/kernels/int4_mma.py): its weight layout on
any machine, the CUDA kernels against the plain-PyTorch reference on a GPU, and the
op table's choice of it."""

from __future__ import annotations

import pytest
import torch

from glm_engine.compare import relative_error
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.kernels import int4_mma, reference
from glm_engine.ops import select_ops, shuffle_int4_weights, uses_int4_mma
from glm_engine.quantization import quantize_symmetric

ON_GPU = torch.cuda.is_available() and int4_mma.runs_on(torch.device("cuda"))
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="the int4 mma kernels are CUDA: they run on a GPU of sm_80 or later")


def packed_int4(n: int, k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(n, k, device=device) / k ** 0.5 * torch.linspace(0.2, 2.0, k, device=device)
    return quantize_symmetric(weight, 4)


@pytest.mark.parametrize("n, k", [(16, 64), (48, 192), (32, 640)])
def test_shuffle_round_trips(n, k):
    packed, _ = packed_int4(n, k)
    shuffled = int4_mma.shuffle(packed)
    assert shuffled.shape == packed.shape and shuffled.dtype == torch.uint8
    assert not torch.equal(shuffled, packed)
    assert torch.equal(int4_mma.unshuffle(shuffled), packed)


def test_shuffle_puts_each_lanes_fragment_in_its_word():
    """The contract int4_mma.cu reads: word j of lane 4g + c in chunk q of tile t holds, in
    nibble i, v + 8 of row 16t + g (+ 8 for odd i) at input channel 64q + 16c + 4j + offset,
    offsets 0, 0, 2, 2, 1, 1, 3, 3 for i = 0..7."""
    n, k = 32, 128
    packed, scales = packed_int4(n, k)
    values = reference.dequantize(packed, torch.ones_like(scales), 4, torch.float32).round().to(torch.int64)
    words = int4_mma.shuffle(packed).view(torch.int32).to(torch.int64).flatten() & 0xFFFFFFFF
    offsets = [0, 0, 2, 2, 1, 1, 3, 3]
    chunks = k // 64
    for index, word in enumerate(words.tolist()):
        j, lane, chunk, tile = index % 4, index // 4 % 32, index // 128 % chunks, index // 128 // chunks
        g, c = divmod(lane, 4)
        for i in range(8):
            row = 16 * tile + g + 8 * (i % 2)
            column = 64 * chunk + 16 * c + 4 * j + offsets[i]
            assert (word >> (4 * i) & 15) - 8 == values[row, column], (index, i)


def test_shuffle_refuses_weights_that_do_not_tile():
    with pytest.raises(ValueError, match="tiles 16 output by 64 input channels, got a 24x64 weight"):
        int4_mma.shuffle(packed_int4(24, 64)[0])
    with pytest.raises(ValueError, match="got a 16x96 weight"):
        int4_mma.shuffle(packed_int4(16, 96)[0])


def test_only_int4_weights_are_shuffled():
    packed, scales = packed_int4(16, 64)
    int8, int8_scales = quantize_symmetric(torch.randn(16, 64), 8)
    dense = torch.randn(16, 64)
    weights = {"a.weight": packed, "a.weight_scales": scales, "b.weight": int8, "b.weight_scales": int8_scales,
               "c.weight": dense, "d.weight": packed.clone()}  # d: uint8 without scales is no int4 linear
    shuffled = shuffle_int4_weights(int4_mma.shuffle, weights)
    assert torch.equal(shuffled["a.weight"], int4_mma.shuffle(packed))
    for name in ("a.weight_scales", "b.weight", "c.weight", "d.weight"):
        assert shuffled[name] is weights[name]


def test_op_table_keeps_the_triton_path_off_the_gpu():
    """On the CPU (or without int4 / with group scales / bf16) the engine keeps its packed
    weights and the Triton or reference linears."""
    config = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16,
                         multi_query_group_num=2, ffn_hidden_size=128, vocab_size=256, seq_length=256)
    int4 = BuildConfig(dtype="float16", weight_only_precision="int4")
    assert not uses_int4_mma(config, int4, torch.device("cpu"))
    ops = select_ops(config, int4, torch.device("cpu"))
    weights = {"w.weight": packed_int4(16, 64)[0]}
    assert ops.prepare_weights(weights) is weights
    for build in (BuildConfig(dtype="float16", weight_only_precision="int8"),
                  BuildConfig(dtype="bfloat16", weight_only_precision="int4"),
                  BuildConfig(dtype="float16", weight_only_precision="int4",
                              weight_only_group_size=32)):
        assert not uses_int4_mma(config, build, torch.device("cuda"))


@needs_gpu
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n, k, with_bias", [(16, 64, True), (48, 192, False), (4608, 4096, True),
                                             (4096, 13696, False), (27392, 4096, False), (80, 8256, True)])
def test_gemm_matches_reference(rows, n, k, with_bias):
    """Every launch configuration (by shape), one and two row blocks, ragged row counts."""
    packed, scales = packed_int4(n, k, "cuda")
    x = torch.randn(rows, k, dtype=torch.float16, device="cuda")
    bias = torch.randn(n, dtype=torch.float16, device="cuda") if with_bias else None
    expected = reference.linear(x.double(), reference.dequantize(packed, scales, 4, torch.float64),
                                None if bias is None else bias.double())
    out = int4_mma.gemm(x, int4_mma.shuffle(packed), bias, scales, 4)
    assert out.shape == (rows, n) and out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


@needs_gpu
def test_gemm_takes_a_row_at_an_odd_element():
    packed, scales = packed_int4(48, 192, "cuda")
    x = torch.randn(2, 193, dtype=torch.float16, device="cuda")[:, 1:]
    expected = reference.linear(x.double(), reference.dequantize(packed, scales, 4, torch.float64))
    assert relative_error(int4_mma.gemm(x, int4_mma.shuffle(packed), None, scales, 4), expected) < 2e-3


@needs_gpu
def test_gemm_refuses_what_it_cannot_run():
    packed, scales = packed_int4(16, 64, "cuda")
    shuffled = int4_mma.shuffle(packed)
    with pytest.raises(ValueError, match="up to 16 fp16 rows"):
        int4_mma.gemm(torch.randn(17, 64, dtype=torch.float16, device="cuda"), shuffled, None, scales, 4)
    with pytest.raises(ValueError, match="up to 16 fp16 rows"):
        int4_mma.gemm(torch.randn(1, 64, dtype=torch.bfloat16, device="cuda"), shuffled, None, scales, 4)


@needs_gpu
@pytest.mark.parametrize("n, k", [(16, 64), (48, 192), (4096, 13696)])
def test_dequantize_matches_reference(n, k):
    packed, scales = packed_int4(n, k, "cuda")
    out = int4_mma.dequantize(int4_mma.shuffle(packed), scales, 4, torch.float16)
    assert torch.equal(out, reference.dequantize(packed, scales, 4, torch.float16))


@needs_gpu
def test_gemm_in_a_cuda_graph_sees_the_kernel_ahead():
    """Launched with programmatic dependent launch after a Triton kernel that writes its
    input, captured in a CUDA graph and replayed on new inputs: equal to eager calls."""
    from glm_engine.kernels import norm

    packed, scales = packed_int4(4608, 4096, "cuda")
    shuffled = int4_mma.shuffle(packed)
    residual = torch.randn(2, 4096, dtype=torch.float16, device="cuda")
    norm_weight = torch.rand(4096, dtype=torch.float16, device="cuda") + 0.5

    def step() -> torch.Tensor:
        normed, _ = norm.add_rms_norm(None, residual, norm_weight, 1e-5)
        return int4_mma.gemm(normed, shuffled, None, scales, 4)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        residual.copy_(torch.randn_like(residual))
        graph.replay()
        assert torch.equal(captured, step())
