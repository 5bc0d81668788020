"""Sampling in Triton: one program per row draws its token from the softmax restricted
to the row's top-k/top-p nucleus, without sorting the vocabulary (a sort of the whole
vocabulary would cost more than the step's other work at hundreds of rows): Gumbel-max draws above a rising floor until a drawn token
is inside the nucleus, the noise hashed from the row's key, the draw and the token id
(splitmix64), never stored. Reference and the method: `reference.draw_tokens`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GOLDEN: tl.constexpr = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1: tl.constexpr = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2: tl.constexpr = tl.constexpr(0x94D049BB133111EB)


@triton.jit
def _gumbel_scores(values, tokens, inside, floor, key, draw, VOCAB: tl.constexpr):
    """logit + Gumbel noise of (key, draw, token) in float64; -inf at or below the floor."""
    counters = (draw.to(tl.int64) * VOCAB + tokens + 1).to(tl.uint64)
    state = key + counters * _GOLDEN
    state = (state ^ (state >> 30)) * _MIX1
    state = (state ^ (state >> 27)) * _MIX2
    state = state ^ (state >> 31)
    uniform = ((state >> 11).to(tl.float64) + 0.5) / 9007199254740992.0  # 2**53
    scores = values.to(tl.float64) - tl.log(-tl.log(uniform))
    return tl.where(inside & (values > floor), scores, float("-inf"))


@triton.jit
def _draw_tokens_kernel(logits, row_stride, row_keys, top_ks, top_ps, tokens_out,
                        VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    key = tl.load(row_keys + row).to(tl.uint64, bitcast=True)
    top_k = tl.load(top_ks + row)
    top_p = tl.load(top_ps + row)
    filtered = (top_k > 0) | (top_p < 1.0)
    offsets = tl.arange(0, BLOCK)
    top = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros((BLOCK,), tl.float64), axis=0)
    if filtered:  # the softmax's max and normalizer, online, in float64
        for first in range(0, VOCAB, BLOCK):
            values = tl.load(start + first + offsets, mask=first + offsets < VOCAB, other=float("-inf"))
            new_top = tl.maximum(top, tl.max(values, axis=0))
            # -inf - -inf is NaN: while every logit so far is -inf, subtract 0 instead (nothing to add or keep).
            shift = tl.where(new_top == float("-inf"), 0.0, new_top).to(tl.float64)
            total = total * tl.exp(top.to(tl.float64) - shift) + tl.sum(tl.exp(values.to(tl.float64) - shift), axis=0)
            top = new_top
    floor = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
    chosen = tl.program_id(0) * 0
    draw = tl.program_id(0) * 0
    pending = tl.program_id(0) >= 0
    while pending:
        best = tl.max(tl.full((BLOCK,), float("-inf"), tl.float64), axis=0)
        for first in range(0, VOCAB, BLOCK):
            tokens = first + offsets
            inside = tokens < VOCAB
            values = tl.load(start + tokens, mask=inside, other=float("-inf"))
            scores = _gumbel_scores(values, tokens, inside, floor, key, draw, VOCAB)
            chunk_best = tl.max(scores, axis=0)
            chosen = tl.where(chunk_best > best, first + tl.argmax(scores, axis=0, tie_break_left=True), chosen)
            best = tl.maximum(best, chunk_best)
        pending = tl.program_id(0) < 0
        if filtered:  # inside the nucleus? count and mass of the tokens above the drawn one
            value = tl.load(start + chosen)
            count = draw * 0
            mass = tl.sum(tl.zeros((BLOCK,), tl.float64), axis=0)
            for first in range(0, VOCAB, BLOCK):
                values = tl.load(start + first + offsets, mask=first + offsets < VOCAB, other=float("-inf"))
                above = values > value
                count += tl.sum(above.to(tl.int32), axis=0)
                mass += tl.sum(tl.where(above, tl.exp(values.to(tl.float64) - top.to(tl.float64)), 0.0), axis=0)
            inside_k = (top_k == 0) | (count < top_k)
            inside_p = (top_p >= 1.0) | (mass / total < top_p)
            # No candidate left (only if the logits hold NaN): stop rather than spin.
            pending = ((inside_k & inside_p) == 0) & (best > float("-inf"))
            floor = value
        draw += 1
    tl.store(tokens_out + row, chosen.to(tl.int64))


def draw_tokens(logits: torch.Tensor, row_keys: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """Token ids [R] (int64) drawn as `reference.draw_tokens` draws them: float32 logits
    [R, vocab], int64 row keys [R], top_k [R] (int32, 0: none), top_p [R] (float64, 1.0: none)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _draw_tokens_kernel[(rows,)](logits, logits.stride(0), row_keys.contiguous(), top_k.to(torch.int32).contiguous(),
                                 top_p.to(torch.float64).contiguous(), tokens, VOCAB=vocab,
                                 BLOCK=min(4096, triton.next_power_of_2(vocab)))
    return tokens
