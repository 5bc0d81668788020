"""Plain-PyTorch reference ops of the ChatGLM2 network: RMSNorm, rotary
embedding, SwiGLU and attention over the slot-addressed KV cache.

They run on CPU and GPU. Each op is written with few kernel launches, because
at batch 1 an eager decode step is bound by launches, not by memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by `weight`, cast back to the input dtype."""
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps)
    return (weight * normed).to(hidden.dtype)


def add_rms_norm(branch: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + branch), residual + branch); without a branch, (rms_norm(residual), residual)."""
    if branch is not None:
        residual = residual + branch
    return rms_norm(residual, weight, eps), residual


def rotary_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """ChatGLM2's rotary frequencies theta_j = base^(-2j / rotary_dim), float32 [rotary_dim // 2]."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rotary_frequencies(positions: torch.Tensor, inv_freq: torch.Tensor, position_scale: float = 1.0) -> torch.Tensor:
    """exp(i * angle) [N, rotary_dim // 2] (complex64) of the rotary angles
    `positions * position_scale * inv_freq`."""
    angles = (positions.float() * position_scale)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of the first `2 * frequencies.shape[-1]`
    dims of each head, as complex numbers x[2j] + i x[2j+1]; the rest pass through.
    x: [N, heads, head_dim]; computed in float32."""
    rotary_dim = 2 * frequencies.shape[-1]
    pairs = torch.view_as_complex(x[..., :rotary_dim].float().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * frequencies[:, None, :]).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def scale_group_size(scales: torch.Tensor, columns: int) -> int:
    """Input channels per scale of a weight with `columns` input channels: 0 for scales [N]
    (one per output channel), K / G for scales [N, G]."""
    return columns // scales.shape[1] if scales.dim() == 2 else 0


def dequantize(quantized: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] that quantization.quantize_symmetric's output stands for, in
    `dtype` (the reference of kernels/dequantize.py). `scales`: [N], or [N, K / group]."""
    if bits == 4:
        packed = quantized.view(torch.int8)
        low, high = (packed << 4) >> 4, packed >> 4
        quantized = torch.stack((low, high), dim=-1).flatten(1)
    group = scale_group_size(scales, quantized.shape[1])
    expanded = scales.float().repeat_interleave(group, dim=1) if group else scales.float()[:, None]
    return (quantized.float() * expanded).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias."""
    return torch.nn.functional.linear(x, weight, bias)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] as float8_e4m3fn values [M, K] (round to nearest even) and a
    float32 scale [M, 1] = max|row| / 448 (a row of zeros: 1e-12 / 448), so that the
    row's largest magnitude maps to 448 (the reference of kernels/fp8.py quantize_rows)."""
    largest = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    # A tensor divisor: torch on a GPU divides by a Python number as a multiply by its reciprocal.
    scales = largest / torch.full_like(largest, FP8_MAX)
    return (x.float() / scales).to(torch.float8_e4m3fn), scales


WEIGHT_ONLY_ROWS = 16  # FP8 and SmoothQuant steps of at most this many rows (decode) keep their activations


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
               quant_bits: int = 0) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) on W [N, K] float8_e4m3fn with float32 scales [N]. Over
    WEIGHT_ONLY_ROWS rows, x is quantized per row too (quantize_rows_fp8): the exact
    products summed in float32, scaled by both scales, cast to x's dtype, then the bias
    added, as torch._scaled_mm in kernels/fp8.py. Decode-sized steps multiply x as it is by
    the FP8 weights (weight-only), the bias added in float32 before the cast, as the
    tensor-core GEMM (kernels/weight_only_mma.py) does."""
    if x.shape[0] <= WEIGHT_ONLY_ROWS:
        product = (x.float() @ weight.float().t()) * weight_scales.float()[None, :]
        return (product + bias.float() if bias is not None else product).to(x.dtype)
    values, scales = quantize_rows_fp8(x)
    product = values.float() @ weight.float().t()
    out = (product * scales * weight_scales.float()[None, :]).to(x.dtype)
    return out + bias if bias is not None else out


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] as int8 values [M, K] (round half to even) and a float32 scale
    [M, 1] = max|row| / 127 (a row of zeros: 1e-12 / 127) (the reference of
    kernels/int8_gemm.py quantize_rows)."""
    largest = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    scales = largest / torch.full_like(largest, 127.0)  # a tensor divisor, as quantize_rows_fp8's
    return torch.round(x.float() / scales).clamp(-127, 127).to(torch.int8), scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
                quant_bits: int = 8) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) on W [N, K] int8 with float32 scales [N] (SmoothQuant). Over
    WEIGHT_ONLY_ROWS rows, x is quantized per row to int8 too: the exact integer sums,
    scaled by both scales, cast to x's dtype, then the bias added, as kernels/int8_gemm.py
    does. Decode-sized steps multiply x as it is (weight-only int8), the bias added in
    float32 before the cast, as the skinny GEMM (kernels/gemv.py) does."""
    if x.shape[0] <= WEIGHT_ONLY_ROWS:
        product = (x.float() @ weight.float().t()) * weight_scales.float()[None, :]
        return (product + bias.float() if bias is not None else product).to(x.dtype)
    values, scales = quantize_rows_int8(x)
    sums = (values.double() @ weight.double().t()).float()  # exact: |sums| < 2^53 (and CUDA has no int64 matmul)
    out = (sums * scales * weight_scales.float()[None, :]).to(x.dtype)
    return out + bias if bias is not None else out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(a) * b where gate_up = [a, b] along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, scales: torch.Tensor | None) -> torch.Tensor:
    """cache[slots] [B, L, G, D] in `dtype`: an FP8 cache gathered as bytes (the CPU indexes
    no float8), an INT8 one times its groups' `scales` [G]."""
    if cache.dtype == torch.int8:
        return (cache[slots].float() * scales[:, None]).to(dtype)
    if cache.dtype != torch.float8_e4m3fn:
        return cache[slots]
    return cache.view(torch.uint8)[slots].view(torch.float8_e4m3fn).to(dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_index: torch.Tensor, output_rows: torch.Tensor, key_slots: torch.Tensor,
                    attention_bias: torch.Tensor, scale: float, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention of packed queries over a slot-addressed cache.

    query: [N, heads, D] packed new tokens of B sequences.
    key_cache/value_cache: [num_slots, groups, D], already holding the new tokens, in the
    query's dtype, FP8, or INT8 with per-group `key_scales`/`value_scales` [groups] (read
    as the query's dtype).
    query_index: [B, T] index into the N packed queries (padding repeats a valid index).
    output_rows: [N] row of each packed query in the flattened [B * T] grid.
    key_slots: [B, L] cache slot of each key position (padding repeats a valid slot).
    attention_bias: [B, T, L] in the cache dtype, 0 where query t may attend to key l, -inf elsewhere.
    The products run in the cache dtype; the softmax accumulates in float32 (PyTorch's
    softmax does for half types) and writes the cache dtype, sparing a float32 copy
    of the scores.
    Returns [N, heads, D].
    """
    batch, max_queries = query_index.shape
    heads, head_dim = query.shape[1], query.shape[2]
    groups = key_cache.shape[1]
    # Decode steps (one new token per sequence) need no gather or scatter.
    one_token_each = max_queries == 1 and query.shape[0] == batch
    q = query.unsqueeze(1) if one_token_each else query[query_index]  # [B, T, H, D]
    q = (q * scale).view(batch, max_queries, groups, heads // groups, head_dim)
    k = _gather(key_cache, key_slots, query.dtype, key_scales)  # [B, L, G, D]
    v = _gather(value_cache, key_slots, query.dtype, value_scales)
    scores = torch.einsum("btgqd,blgd->bgqtl", q, k).add_(attention_bias[:, None, None])
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bgqtl,blgd->btgqd", probs, v).reshape(batch, max_queries, heads, head_dim)
    if one_token_each:
        return out.view(batch, heads, head_dim)
    return out.flatten(0, 1)[output_rows]


# splitmix64's constants as int64 bit patterns (torch has no uint64 arithmetic).
GOLDEN = 0x9E3779B97F4A7C15 - 2**64
MIX1 = 0xBF58476D1CE4E5B9 - 2**64
MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (>> on torch's int64 is arithmetic)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(state: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 values (multiplications wrap, as in the reference)."""
    state = (state ^ _shift_right(state, 30)) * MIX1
    state = (state ^ _shift_right(state, 27)) * MIX2
    return state ^ _shift_right(state, 31)


def uniform_noise(row_keys: torch.Tensor, vocab_size: int, draw: int = 0) -> torch.Tensor:
    """Float64 uniforms in (0, 1), [R, vocab], for a row's `draw`-th draw: splitmix64 of
    the row's key plus the counter (draw * vocab + token id + 1) times the golden ratio
    constant, so every (row, draw, token) has its own value."""
    counters = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=row_keys.device) + draw * vocab_size
    state = splitmix64(row_keys[:, None] + counters[None, :] * GOLDEN)
    return (_shift_right(state, 11).to(torch.float64) + 0.5) / 2.0**53


def draw_tokens(logits: torch.Tensor, row_keys: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 logits [R, vocab] (-inf: never drawn), drawn from the
    softmax restricted to the row's nucleus: the tokens with fewer than top_k [R] (0: no
    limit) tokens above them and less than top_p [R] (float64, 1.0: no limit) of the
    probability mass above them. Without sorting: a Gumbel-max draw among the tokens
    above a floor; a drawn token outside the nucleus raises the floor to its logit (every
    token at or below it is outside too) and the row draws again with fresh noise. The
    first token inside is an exact draw from the nucleus, as each draw's candidates
    hold the whole nucleus."""
    logits64 = logits.double()
    probs = torch.softmax(logits64, dim=-1)
    floor = torch.full_like(logits, float("-inf"))[:, :1]
    tokens = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    pending = torch.ones_like(tokens, dtype=torch.bool)
    draw = 0
    while pending.any():
        gumbel = -torch.log(-torch.log(uniform_noise(row_keys, logits.shape[1], draw)))
        scores = torch.where(logits > floor, logits64 + gumbel, float("-inf"))
        exhausted = scores.max(dim=-1).values == float("-inf")  # only if the logits hold NaN: the kernel stops too
        drawn = torch.where(exhausted, tokens, scores.argmax(dim=-1))
        value = logits.gather(1, drawn[:, None])
        above = logits > value
        inside = exhausted | (((top_k == 0) | (above.sum(dim=-1) < top_k))
                              & ((top_p >= 1.0) | ((probs * above).sum(dim=-1) < top_p)))
        tokens = torch.where(pending, drawn, tokens)
        floor = torch.where(inside[:, None], floor, value)
        pending &= ~inside
        draw += 1
    return tokens
