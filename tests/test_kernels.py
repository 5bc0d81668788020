"""Each Triton kernel against its plain-PyTorch reference on fresh random
inputs of several shapes, ragged lengths and block sizes. On the CPU the
kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest)."""

from __future__ import annotations

import functools
import random

import pytest
import torch

import glm_engine.kernels.decode_attention as decode_attention_module
import glm_engine.kernels.norm as norm_module
import glm_engine.kernels.rotary_kv as rotary_kv_module
import glm_engine.kernels.swiglu as swiglu_module
from glm_engine.tools.compare import relative_error
from glm_engine.kernels import reference
from glm_engine.quantization import quantize_symmetric
from glm_engine.runtime.attention import ReferenceFields, StepLayout


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """torch.empty fills new tensors with NaN, so an output element a kernel does not write fails."""
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


def shuffled_block_tables(lengths: list[int], block_size: int, rng: random.Random) -> tuple[list[list[int]], int]:
    counts = [-(-length // block_size) for length in lengths]
    blocks = list(range(sum(counts) + 3))  # a few blocks nobody owns
    rng.shuffle(blocks)
    tables, start = [], 0
    for count in counts:
        tables.append(blocks[start:start + count])
        start += count
    return tables, len(blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, groups, head_dim, block_size, lengths", [
    (4, 2, 16, 4, [1, 7, 30]),
    (8, 2, 32, 16, [65, 3, 130, 16]),
    (32, 2, 128, 64, [200]),
    (6, 3, 24, 8, [9, 40]),
])
def test_decode_attention_matches_reference(dtype, heads, groups, head_dim, block_size, lengths):
    rng = random.Random(heads * 1000 + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    tables, num_blocks = shuffled_block_tables(lengths, block_size, rng)
    key_cache = torch.randn(num_blocks * block_size, groups, head_dim, dtype=dtype, device=DEVICE)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(len(lengths), heads, head_dim, dtype=dtype, device=DEVICE)
    batch = ReferenceFields.of(StepLayout.of(tables, [n - 1 for n in lengths], [1] * len(lengths), block_size), DEVICE,
                               dtype)
    expected = reference.paged_attention(query.float(), key_cache.float(), value_cache.float(),
                                         batch.query_index, batch.output_rows, batch.key_slots,
                                         batch.attention_bias.float(), head_dim ** -0.5)
    width = max(map(len, tables))
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    context = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    for num_splits in (None, 1, 3):
        out = torch.full_like(query, float("nan"))  # an element the kernel misses stays NaN
        decode_attention_module.decode_attention(query, key_cache, value_cache, table_tensor, context, block_size,
                                                 head_dim ** -0.5, max(lengths) + 5, num_splits, out=out)
        assert relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 2e-3)




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, with_branch", [(1, 64, True), (5, 100, True), (3, 4096, False)])
def test_add_rms_norm_matches_reference(dtype, rows, hidden, with_branch):
    residual = torch.randn(rows, hidden, dtype=dtype, device=DEVICE)
    branch = torch.randn_like(residual) if with_branch else None
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    expected_normed, expected_residual = reference.add_rms_norm(
        None if branch is None else branch.double(), residual.double(), weight.double(), 1e-5)
    normed, updated = norm_module.add_rms_norm(branch, residual, weight, 1e-5)
    bound = 1e-6 if dtype == torch.float32 else 1e-3 if dtype == torch.float16 else 8e-3
    assert relative_error(normed, expected_normed) < bound
    assert relative_error(updated, expected_residual) < bound
    assert not normed.isnan().any() and not updated.isnan().any()




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, heads, groups, head_dim, position_scale", [
    (1, 4, 2, 16, 1.0), (7, 8, 2, 32, 0.25), (3, 32, 2, 128, 1.0), (5, 6, 3, 24, 1.0), (37, 4, 2, 16, 1.0),
    (21, 6, 3, 24, 0.5)])
def test_rotary_kv_write_matches_reference(dtype, tokens, heads, groups, head_dim, position_scale):
    """Steps of one to a few tokens (one token a program) and prompts (several a program,
    token counts that leave a ragged last program)."""
    num_slots = 40
    qkv = torch.randn(tokens, (heads + 2 * groups) * head_dim, dtype=dtype, device=DEVICE)
    positions = torch.randint(0, 5000, (tokens,), device=DEVICE)
    slots = torch.randperm(num_slots, device=DEVICE)[:tokens]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=DEVICE)
                                  / (head_dim // 2)))
    key_cache = torch.full((num_slots, groups, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    value_cache = torch.full_like(key_cache, float("nan"))
    query = rotary_kv_module.rotary_kv_write(qkv, positions, inv_freq, position_scale, slots, key_cache,
                                             value_cache, heads)
    frequencies = reference.rotary_frequencies(positions, inv_freq, position_scale)
    heads_view = qkv.double().view(tokens, heads + 2 * groups, head_dim)
    rotated = reference.apply_rotary(heads_view[:, :heads + groups].float(), frequencies).double()
    bound = 1e-6 if dtype == torch.float32 else 1e-3 if dtype == torch.float16 else 8e-3
    assert relative_error(query, rotated[:, :heads]) < bound
    assert relative_error(key_cache[slots], rotated[:, heads:]) < bound
    assert torch.equal(value_cache[slots], qkv.view(tokens, heads + 2 * groups, head_dim)[:, heads + groups:])
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert key_cache[untouched].isnan().all() and value_cache[untouched].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(1, 96), (4, 1000), (2, 13696)])
def test_swiglu_matches_reference(dtype, rows, width):
    gate_up = torch.randn(rows, 2 * width, dtype=dtype, device=DEVICE)
    bound = 1e-6 if dtype == torch.float32 else 1e-3 if dtype == torch.float16 else 8e-3
    assert relative_error(swiglu_module.swiglu(gate_up), reference.swiglu(gate_up.double())) < bound


import glm_engine.kernels.gemv as gemv_module  # noqa: E402
import glm_engine.kernels.launch as launch_module  # noqa: E402


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_round_trip(bits):
    weight = torch.randn(37, 64)
    quantized, scales = quantize_symmetric(weight, bits)
    assert quantized.shape == (37, 64 if bits == 8 else 32)
    restored = reference.dequantize(quantized, scales, bits, torch.float32)
    limit = 127 if bits == 8 else 7
    # Every value within half a step of its channel's grid, extremes exact.
    assert ((restored - weight).abs() <= scales[:, None] / 2 + 1e-6).all()
    assert torch.allclose(restored.abs().amax(1), weight.abs().amax(1), rtol=1e-5)
    assert torch.equal(quantize_symmetric(restored, bits)[0], quantized)
    assert (restored / scales[:, None]).round().abs().max() == limit


@pytest.mark.parametrize("bits", [8, 4])
def test_group_quantization_round_trip(bits):
    """One scale per 32 input channels: each group's values within half a step of its
    grid, each group's extreme exact, so the error is below per-channel quantization's."""
    weight = torch.randn(37, 128) * torch.linspace(0.1, 3.0, 128)  # groups of very different ranges
    quantized, scales = quantize_symmetric(weight, bits, group_size=32)
    assert quantized.shape == (37, 128 if bits == 8 else 64) and scales.shape == (37, 4)
    restored = reference.dequantize(quantized, scales, bits, torch.float32)
    expanded = scales.repeat_interleave(32, dim=1)
    assert ((restored - weight).abs() <= expanded / 2 + 1e-6).all()
    groups = lambda w: w.view(37, 4, 32).abs().amax(2)  # noqa: E731
    assert torch.allclose(groups(restored), groups(weight), rtol=1e-5)
    assert torch.equal(quantize_symmetric(restored, bits, group_size=32)[0], quantized)
    per_channel = reference.dequantize(*quantize_symmetric(weight, bits), bits, torch.float32)
    assert relative_error(restored, weight) < 0.8 * relative_error(per_channel, weight)
    with pytest.raises(ValueError, match="group size 48 does not divide the 128 input channels"):
        quantize_symmetric(weight, bits, group_size=48)


def interpreter_misses_bfloat16_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes tl.dot on bfloat16 wrongly (checked: errors of 1e10 on
    16x16 inputs), so on the CPU bfloat16 tl.dot cases are left to the GPU run."""
    return dtype == torch.bfloat16 and DEVICE.type == "cpu"


def skip_bfloat16_dot_in_interpreter(dtype: torch.dtype, use_dot: bool) -> None:
    if use_dot and interpreter_misses_bfloat16_dot(dtype):
        pytest.skip("Triton's interpreter computes tl.dot on bfloat16 wrongly; bfloat16 is checked on the GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("rows, n, k, with_bias, use_dot, split_k", [
    (1, 48, 64, True, False, 1), (2, 20, 192, False, False, 3), (3, 100, 96, False, True, 1),
    (16, 32, 256, True, True, 2), (1, 40, 128, True, True, 4), (4, 24, 96, True, False, 2)])
def test_gemv_matches_reference(dtype, bits, rows, n, k, with_bias, use_dot, split_k):
    skip_bfloat16_dot_in_interpreter(dtype, use_dot)
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    weight = torch.randn(n, k, device=DEVICE) / k ** 0.5
    bias = torch.randn(n, dtype=dtype, device=DEVICE) if with_bias else None
    if bits:
        quantized, scales = quantize_symmetric(weight, bits)
        dense = reference.dequantize(quantized, scales, bits, torch.float64)
    else:
        quantized, scales, dense = weight.to(dtype), None, weight.to(dtype).double()
    config = gemv_module.GemvConfig(block_n=16, block_k=32, split_k=split_k, use_dot=use_dot)
    out = gemv_module.gemv(x, quantized, bias, scales, bits, config)
    expected = reference.linear(x.double(), dense, None if bias is None else bias.double())
    bound = 1e-6 if dtype == torch.float32 else 2e-3 if dtype == torch.float16 else 1e-2
    assert out.shape == (rows, n) and out.dtype == dtype
    assert relative_error(out, expected) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows, n, k, use_dot, split_k, group", [
    (1, 48, 128, False, 1, 32), (2, 20, 256, False, 2, 64), (3, 100, 128, True, 1, 32),
    (16, 32, 256, True, 2, 128), (1, 40, 512, True, 4, 128), (4, 24, 96, False, 3, 32)])
def test_gemv_group_scales_match_reference(dtype, bits, rows, n, k, use_dot, split_k, group):
    """Weights with one scale per `group` input channels, on the FMA and tl.dot paths, K
    split or not (the partial sums arrive scaled: the epilogue applies no scale)."""
    skip_bfloat16_dot_in_interpreter(dtype, use_dot)
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    weight = torch.randn(n, k, device=DEVICE) / k ** 0.5 * torch.linspace(0.2, 2.0, k, device=DEVICE)
    quantized, scales = quantize_symmetric(weight, bits, group_size=group)
    config = gemv_module.GemvConfig(block_n=16, block_k=32, split_k=split_k, use_dot=use_dot)
    expected = reference.linear(x.double(), reference.dequantize(quantized, scales, bits, torch.float64))
    bound = 1e-6 if dtype == torch.float32 else 2e-3 if dtype == torch.float16 else 1e-2
    # The explicit path, and the default choice (which may be tl.dot).
    for chosen in (config,) if interpreter_misses_bfloat16_dot(dtype) else (config, None):
        out = gemv_module.gemv(x, quantized, None, scales, bits, chosen)
        assert out.shape == (rows, n) and out.dtype == dtype
        assert relative_error(out, expected) < bound


@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_weights_not_whole_int32_words(bits):
    """K = 36 is no whole number of int32 words of int4 values (8) and is of int8 (4):
    the default choice still computes it (tl.dot path for int4), an explicit FMA
    config on int4 is refused in one line."""
    x = torch.randn(1, 36, device=DEVICE)
    quantized, scales = quantize_symmetric(torch.randn(24, 36, device=DEVICE), bits)
    expected = reference.linear(x.double(), reference.dequantize(quantized, scales, bits, torch.float64))
    assert relative_error(gemv_module.gemv(x, quantized, None, scales, bits), expected) < 1e-6
    fma = gemv_module.GemvConfig(block_n=16, block_k=32, split_k=1, use_dot=False)
    if bits == 4:
        with pytest.raises(ValueError, match="K must be a multiple of 8, got 36"):
            gemv_module.gemv(x, quantized, None, scales, bits, fma)
    else:
        assert relative_error(gemv_module.gemv(x, quantized, None, scales, bits, fma), expected) < 1e-6


@pytest.mark.skipif(DEVICE.type != "cuda" or not launch_module.compiled(gemv_module._gemv_kernel),
                    reason="the half2 path is PTX: it runs on a CUDA GPU, kernels compiled, only")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k, block_n, block_k, split_k, with_bias, offset, group", [
    (48, 64, 8, 64, 1, True, 0, 0), (100, 4096, 8, 512, 1, False, 1, 0), (37, 13696, 8, 512, 2, True, 0, 0),
    (20, 200, 16, 256, 1, False, 1, 0), (4608, 4096, 4, 1024, 1, True, 0, 0), (27392, 4096, 8, 1024, 1, False, 0, 0),
    (48, 64, 8, 64, 1, True, 1, 32), (37, 13696, 8, 512, 2, False, 0, 64), (4608, 4096, 4, 1024, 1, True, 0, 128)])
def test_gemv_half2_matches_reference(bits, n, k, block_n, block_k, split_k, with_bias, offset, group):
    """One fp16 row on int8/int4 weights in packed half2 arithmetic, ragged N and K, K
    split or not, an input row that starts at an odd element (`offset`), and scales per
    output channel or per `group` input channels."""
    x = torch.randn(1, k + offset, dtype=torch.float16, device=DEVICE)[:, offset:]
    weight = torch.randn(n, k, device=DEVICE) / k ** 0.5 * torch.linspace(0.2, 2.0, k, device=DEVICE)
    quantized, scales = quantize_symmetric(weight, bits, group_size=group)
    bias = torch.randn(n, dtype=torch.float16, device=DEVICE) if with_bias else None
    expected = reference.linear(x.double(), reference.dequantize(quantized, scales, bits, torch.float64),
                                None if bias is None else bias.double())
    config = gemv_module.GemvConfig(block_n, block_k, split_k, use_dot=False, half2=True)
    out = gemv_module.gemv(x, quantized, bias, scales, bits, config)
    assert out.shape == (1, n) and out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


def test_gemv_half2_refuses_what_it_cannot_run():
    """The half2 path is one float16 row on a CUDA GPU: anything else is refused in one line,
    and the default choice for one float16 row takes it only where it runs."""
    quantized, scales = quantize_symmetric(torch.randn(24, 64, device=DEVICE), 4)
    x = torch.randn(1, 64, dtype=torch.float16, device=DEVICE)
    expected = reference.linear(x.double(), reference.dequantize(quantized, scales, 4, torch.float64))
    assert relative_error(gemv_module.gemv(x, quantized, None, scales, 4), expected) < 2e-3
    half2 = gemv_module.GemvConfig(8, 64, 1, use_dot=False, half2=True)
    cases = [torch.randn(2, 64, dtype=torch.float16, device=DEVICE), torch.randn(1, 64, device=DEVICE)]
    if DEVICE.type == "cpu":
        cases.append(torch.randn(1, 64, dtype=torch.float16))
    for x in cases:
        with pytest.raises(ValueError, match="the half2 path takes one float16 row on int8/int4 weights"):
            gemv_module.gemv(x, quantized, None, scales, 4, half2)


def test_gemv_choices_follow_the_h100_measurements():
    """The tuned choices of docs/PERFORMANCE.md (launch_configs.json's sm_90 entries): cuBLAS
    for fp16 qkv-shaped weights at 2-16 rows and nowhere else; at two rows tl.dot on the
    large fp16 matrices and on int8, FMA in 8-column blocks on the small fp16 and int4 ones."""
    config = gemv_module.GemvConfig
    faster = functools.partial(gemv_module.cublas_is_faster, arch="sm_90")
    default_config = functools.partial(gemv_module.default_config, arch="sm_90")
    assert all(faster(rows, 4608, 4096, 0) for rows in (2, 4, 8, 16))
    assert not faster(1, 4608, 4096, 0) and not faster(17, 4608, 4096, 0)
    assert not any(faster(8, n, k, 0) for n, k in [(4096, 4096), (27392, 4096), (4096, 13696)])
    assert not any(faster(8, 4608, 4096, bits) for bits in (8, 4))
    assert default_config(2, 4096, 13696, 0) == config(32, 512, 1, use_dot=True)
    assert default_config(2, 4096, 4096, 0) == config(8, 512, 1, use_dot=False)
    assert default_config(2, 4608, 4096, 8) == config(32, 256, 4, use_dot=True)
    assert default_config(2, 4096, 4096, 4) == config(8, 512, 1, use_dot=False)
    assert default_config(1, 4096, 13696, 0) == config(4, 512, 1, use_dot=False)
    # Group scales (int4 g128): half2 in 4-column blocks with K split 2 on up; K split 4 on tl.dot but on up.
    assert default_config(1, 27392, 4096, 4, True) == config(32, 512, 1, False, half2=True)
    assert default_config(1, 27392, 4096, 4, True, grouped=True) == config(4, 1024, 2, False, half2=True)
    assert default_config(8, 4096, 13696, 4) == config(32, 256, 2, use_dot=True)
    assert default_config(8, 4096, 13696, 4, grouped=True) == config(32, 256, 4, use_dot=True)
    assert default_config(8, 27392, 4096, 4, grouped=True) == config(32, 256, 2, use_dot=True)


import glm_engine.kernels.dequantize as dequantize_module  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k", [(3, 64), (17, 2050), (5, 4096)])
@pytest.mark.parametrize("group", [0, 32])
def test_dequantize_matches_reference(dtype, bits, n, k, group):
    if group and k % group:
        k = k // group * group  # group-wise scales need whole groups
    quantized, scales = quantize_symmetric(torch.randn(n, k, device=DEVICE), bits, group_size=group)
    out = dequantize_module.dequantize(quantized, scales, bits, dtype)
    expected = reference.dequantize(quantized, scales, bits, dtype)
    if dtype == torch.bfloat16:  # Triton's interpreter truncates to bfloat16 where torch rounds: one ulp
        assert ((out.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7).all()
    else:
        assert torch.equal(out, expected)


import glm_engine.kernels.context_attention as context_attention_module  # noqa: E402


@pytest.mark.parametrize("dtype, fp16_accumulation", [(torch.float32, False), (torch.float16, False),
                                                      (torch.float16, True)])
@pytest.mark.parametrize("heads, groups, head_dim, block_size, cached, new, block_m, block_n", [
    (4, 2, 16, 4, [0, 0, 0], [1, 7, 30], None, 32),
    (8, 2, 32, 16, [0, 5, 40], [70, 3, 9], None, 64),
    (6, 3, 24, 8, [3], [21], 16, 16),
    (4, 1, 16, 8, [0, 9, 2, 0], [1, 1, 40, 2], 32, 64),
])
def test_context_attention_matches_reference(dtype, fp16_accumulation, heads, groups, head_dim, block_size,
                                             cached, new, block_m, block_n):
    rng = random.Random(sum(new) * 31 + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    lengths = [c + n for c, n in zip(cached, new)]
    tables, num_blocks = shuffled_block_tables(lengths, block_size, rng)
    key_cache = torch.randn(num_blocks * block_size, groups, head_dim, dtype=dtype, device=DEVICE)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(sum(new), heads, head_dim, dtype=dtype, device=DEVICE)
    layout = StepLayout.of(tables, cached, new, block_size)
    batch = ReferenceFields.of(layout, DEVICE, torch.float32)
    expected = reference.paged_attention(query.float(), key_cache.float(), value_cache.float(), batch.query_index,
                                         batch.output_rows, batch.key_slots, batch.attention_bias,
                                         head_dim ** -0.5)
    width = max(map(len, tables))
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    as_int = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out = context_attention_module.context_attention(
        query, key_cache, value_cache, table_tensor, as_int(lengths), as_int(new),
        (layout.starts + layout.new - 1).to(DEVICE),
        max(new), block_size, head_dim ** -0.5, fp16_accumulation, block_m=block_m, block_n=block_n)
    bound = 1e-5 if dtype == torch.float32 else 3e-3
    assert relative_error(out, expected) < bound


def test_kernels_take_strided_index_tensors():
    """Positions, slots, block tables and context lengths may be columns of one
    larger tensor, as in the decode graphs' static input block."""
    heads, groups, head_dim, block_size = 4, 2, 16, 4
    tokens = 3
    qkv = torch.randn(tokens, (heads + 2 * groups) * head_dim, device=DEVICE)
    inv_freq = reference.rotary_inv_freq(head_dim // 2, 10000.0).to(DEVICE)
    # Columns: position, slot, context length, then a block table of 4 blocks.
    addresses = torch.tensor([[5, 9, 6, 2, 0, 1, 3], [0, 30, 1, 7, 6, 5, 4], [2, 12, 3, 3, 2, 1, 0]], device=DEVICE)
    caches = [torch.zeros(8 * block_size, groups, head_dim, device=DEVICE) for _ in range(2)]
    expected_caches = [cache.clone() for cache in caches]
    query = rotary_kv_module.rotary_kv_write(qkv, addresses[:, 0], inv_freq, 1.0, addresses[:, 1], *caches, heads)
    expected = rotary_kv_module.rotary_kv_write(qkv, addresses[:, 0].clone(), inv_freq, 1.0,
                                                addresses[:, 1].clone(), *expected_caches, heads)
    assert torch.equal(query, expected)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected_caches))
    tables, contexts = addresses[:, 3:].to(torch.int32), addresses[:, 2].to(torch.int32)
    strided = torch.zeros(tokens, 5, dtype=torch.int32, device=DEVICE)
    strided[:, 0], strided[:, 1:] = contexts, tables
    out = decode_attention_module.decode_attention(query, *caches, strided[:, 1:], strided[:, 0], block_size,
                                                   0.25, 16)
    assert torch.equal(out, decode_attention_module.decode_attention(query, *caches, tables.clone(),
                                                                     contexts.clone(), block_size, 0.25, 16))


@pytest.mark.parametrize("rows, vocab, masked", [(1, 4096, False), (5, 5000, True), (3, 12000, False), (2, 100, False)])
def test_draw_tokens_matches_reference(rows, vocab, masked):
    """The kernel draws the reference's token for every row: no filter, top-k, top-p and
    both (peaked and flat rows, rows mostly at -inf, a row with one token left, a row whose
    first chunk is all -inf, a ragged last chunk, rows of a strided tensor), over several
    steps' noise."""
    from glm_engine.kernels.draw_tokens import draw_tokens
    from glm_engine.runtime.sampling import row_keys

    generator = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab + 3, generator=generator) * 3)[:, :vocab].to(DEVICE)  # stride vocab + 3
    if masked:
        logits[torch.rand(rows, vocab, generator=generator).to(DEVICE) < 0.9] = float("-inf")
        logits[0, :] = float("-inf")
        logits[0, vocab - 1] = 0.0  # one token left: it must come out
        logits[1, :4096] = float("-inf")  # the kernel's whole first chunk masked, tokens left after it
    logits[-1, 3] += 8.0 if rows > 1 else 0.0  # a peaked row
    settings = [(0, 1.0), (1, 1.0), (20, 1.0), (0, 0.5), (0, 0.95), (7, 0.9)]
    for step in range(1):
        for top_k, top_p in settings:
            keys = row_keys([0, 2**64 - 1, 12345, 7, 8, 9][:rows], [step] * rows).to(DEVICE)
            ks = torch.full((rows,), top_k, dtype=torch.int32, device=DEVICE)
            ps = torch.full((rows,), top_p, dtype=torch.float64, device=DEVICE)
            expected = reference.draw_tokens(logits, keys, ks, ps)
            assert torch.equal(draw_tokens(logits, keys, ks, ps), expected), (top_k, top_p, step)
            if masked:
                assert expected[0].item() == vocab - 1


def test_chained_kernels_see_each_others_writes():
    """A decode layer's kernels back to back, each reading what the one before wrote: on a
    Hopper GPU they launch with programmatic dependent launch (each may start before the
    one ahead ends) and run inside a CUDA graph, as in decode steps; the graph's results
    equal the same kernels run one by one, and the reference ops."""
    torch.manual_seed(7)
    hidden, ffn, layers, eps = 128, 192, 2, 1e-5
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    norms = [torch.rand(hidden, device=DEVICE).to(dtype) + 0.5 for _ in range(layers + 1)]
    ups = [quantize_symmetric(torch.randn(2 * ffn, hidden, device=DEVICE) / hidden ** 0.5, 4) for _ in range(layers)]
    downs = [quantize_symmetric(torch.randn(hidden, ffn, device=DEVICE) / ffn ** 0.5, 4) for _ in range(layers)]

    def chain(residual: torch.Tensor, kernels: bool) -> torch.Tensor:
        add_rms_norm = norm_module.add_rms_norm if kernels else reference.add_rms_norm
        swiglu = swiglu_module.swiglu if kernels else reference.swiglu

        def linear(x, quantized, scales):
            if kernels:
                return gemv_module.gemv(x, quantized, None, scales, 4)
            return reference.linear(x, reference.dequantize(quantized, scales, 4, x.dtype))

        normed, residual = add_rms_norm(None, residual, norms[0], eps)
        for layer in range(layers):
            branch = linear(swiglu(linear(normed, *ups[layer])), *downs[layer])
            normed, residual = add_rms_norm(branch, residual, norms[layer + 1], eps)
        return normed

    hopper = DEVICE.type == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
    expected_pdl = hopper and launch_module.gdc_wait is not None and launch_module.compiled(gemv_module._gemv_kernel)
    assert launch_module.dependent_launch(gemv_module._gemv_kernel, DEVICE)["PDL"] == expected_pdl
    inputs = [torch.randn(1, hidden, device=DEVICE).to(dtype) for _ in range(3)]
    eager = [chain(x, kernels=True) for x in inputs]
    for x, out in zip(inputs, eager):
        assert relative_error(out, chain(x.double(), kernels=False)) < (1e-2 if dtype == torch.float16 else 1e-5)
    if DEVICE.type != "cuda":
        return
    static_input = inputs[0].clone()
    chain(static_input, kernels=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = chain(static_input, kernels=True)
    for x, out in zip(inputs, eager):
        static_input.copy_(x)
        graph.replay()
        assert torch.equal(static_output, out)


@pytest.mark.parametrize("context_fmha, lengths, cached, takes_flash", [
    ("enabled_with_fp32_acc", [5, 9], [0, 0], True),
    ("enabled_with_fp32_acc", [19, 2], [0, 0], False),  # a prompt under FLASH_MIN_TOKENS
    ("enabled_with_fp32_acc", [5, 18], [0, 4], False),  # a prompt with cached tokens (a later chunk)
    ("enabled", [5, 17], [0, 0], False),  # fp16 accumulation stays on our FMHA
    ("enabled_with_fp32_acc", [3, 16, 1], [9, 2, 5], False),  # <= TOKEN_ROWS_MAX a sequence: token rows
    ("enabled", [2, 5], [0, 7], False),
    ("enabled_with_fp32_acc", [16, 16, 3], [4, 0, 6], False),  # over TOKEN_ROWS_STEP_MAX in all: the FMHA
])
def test_prompt_attention_matches_reference(monkeypatch, context_fmha, lengths, cached, takes_flash):
    """A prompt step of the attention plugin (rotary, cache write, attention) equals the
    reference attention, whether SDPA takes it (fresh prompts of at least FLASH_MIN_TOKENS,
    lowered to 4 here, float32 accumulation), the Triton FMHA does, or (steps of at most
    TOKEN_ROWS_MAX new tokens a sequence and TOKEN_ROWS_STEP_MAX in all, as speculative verify
    steps) the decode kernel with a row a token; the cache holds the same keys and values
    either way."""
    from glm_engine.runtime.attention import PagedAttention, ReferenceAttention
    from glm_engine.config import ModelConfig
    from glm_engine.runtime.kv_cache import KVCache
    import glm_engine.runtime.attention as attention_module

    monkeypatch.setattr(attention_module, "FLASH_MIN_TOKENS", 4)
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    config = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16,
                         multi_query_group_num=2, ffn_hidden_size=32, vocab_size=32, seq_length=64)
    block_size = 4
    rng = random.Random(len(lengths) + sum(cached))
    torch.manual_seed(3)
    tables, num_blocks = shuffled_block_tables([c + n for c, n in zip(cached, lengths)], block_size, rng)
    layout = StepLayout.of(tables, cached, lengths, block_size)
    qkv = torch.randn(sum(lengths), (4 + 2 * 2) * 16, dtype=dtype, device=DEVICE)
    caches = [KVCache(1, num_blocks, block_size, 2, 16, dtype, DEVICE) for _ in range(2)]
    for cache in caches:  # the cached tokens' keys and values
        cache.keys.normal_(generator=torch.Generator(DEVICE).manual_seed(5))
        cache.values.normal_(generator=torch.Generator(DEVICE).manual_seed(6))
    paged = PagedAttention(config, dtype, DEVICE, context_fmha, 64)
    meta = paged.metadata(layout)
    assert (meta.fresh_prompt_lengths is not None) == takes_flash
    assert (meta.token_tables is not None) == (not takes_flash and max(lengths) <= attention_module.TOKEN_ROWS_MAX
                                               and sum(lengths) <= attention_module.TOKEN_ROWS_STEP_MAX)
    out = paged(qkv, 0, meta, caches[0])
    reference_backend = ReferenceAttention(config, dtype, DEVICE)
    expected = reference_backend(qkv, 0, reference_backend.metadata(layout), caches[1])
    assert relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 3e-3)
    assert torch.equal(caches[0].values, caches[1].values)
    assert relative_error(caches[0].keys, caches[1].keys) < (1e-6 if dtype == torch.float32 else 1e-3)
