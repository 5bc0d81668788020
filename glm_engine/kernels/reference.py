"""Plain-PyTorch reference ops of the ChatGLM2 network: RMSNorm, rotary
embedding, SwiGLU and attention over the block-addressed KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled by `weight`, cast back to the input dtype."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(hidden.dtype)


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float,
                   position_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, rotary_dim // 2] (float32) of ChatGLM2's rotary angles
    theta_j = base^(-2j / rotary_dim) at `positions * position_scale`."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device) / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    angles = (positions.float() * position_scale)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of the first `2 * cos.shape[-1]`
    dims of each head; the rest pass through. x: [N, heads, head_dim]."""
    rotary_dim = 2 * cos.shape[-1]
    rot = x[..., :rotary_dim].float().unflatten(-1, (-1, 2))
    even, odd = rot[..., 0], rot[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(a) * b where gate_up = [a, b] along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    query_index: torch.Tensor, query_positions: torch.Tensor,
                    key_slots: torch.Tensor, context_lengths: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal grouped-query attention of packed queries over a slot-addressed cache.

    query: [N, heads, D] packed new tokens of B sequences.
    key_cache/value_cache: [num_slots, groups, D], already holding the new tokens.
    query_index: [B, T] index into the N packed queries (padding rows repeat a valid index).
    query_positions: [B, T] absolute position of each query; -1 marks padding.
    key_slots: [B, L] cache slot of each key position (padding repeats a valid slot).
    context_lengths: [B] number of valid keys of each sequence.
    Returns [N, heads, D].
    """
    batch, max_queries = query_index.shape
    heads, head_dim = query.shape[1], query.shape[2]
    groups = key_cache.shape[1]
    q = query[query_index].float()  # [B, T, H, D]
    q = q.view(batch, max_queries, groups, heads // groups, head_dim)
    k = key_cache[key_slots].float()  # [B, L, G, D]
    v = value_cache[key_slots].float()
    scores = torch.einsum("btgqd,blgd->bgqtl", q, k) * scale
    key_positions = torch.arange(key_slots.shape[1], device=query.device)
    allowed = (key_positions[None, None, :] <= query_positions[:, :, None]) \
        & (key_positions[None, None, :] < context_lengths[:, None, None])
    scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    # Padding query rows have no allowed key; give them a harmless distribution.
    scores = scores.masked_fill(~allowed.any(-1)[:, None, None, :, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bgqtl,blgd->btgqd", probs, v).reshape(batch, max_queries, heads, head_dim)
    valid = query_positions >= 0
    packed = torch.empty_like(query)
    packed[query_index[valid]] = out[valid].to(query.dtype)
    return packed
