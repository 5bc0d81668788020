"""Speculative decoding's verification: one forward step fed a sequence's last token
and its draft d_0 .. d_{k-1} gives the target's logits at k + 1 positions; the draft's
longest accepted prefix and one more token are kept.
- Greedy rows accept d_i while it is the argmax at position i; the token after the
  accepted prefix is the argmax there. The output is the non-speculative one.
- Sampled rows use rejection sampling for a deterministic proposal (prompt lookup's,
  or a draft model's greedy guess): d_i is accepted with probability p_i(d_i) under
  the target's distribution p_i (temperature, top-k, top-p, min_p); at the first
  rejection the token is drawn from p_i without d_i, renormalized, and after a fully
  accepted draft from p_k. Each kept token is then distributed exactly as p, the
  target's (the standard argument: P(t) = p(d) [t = d] + (1 - p(d)) p(t) / (1 - p(d))
  [t != d] = p(t)). The draws and the acceptance tests take the request's seeded
  noise at the token's own output position (runtime/sampling.py), so a request's
  tokens depend on its seed and not on the batch.
All rows' verdicts reach the host in one read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glm_engine.runtime.sampling import (SamplingConfig, log_prob_columns, min_p_logits, nucleus_logits,
                                         on_device, read_log_prob, row_keys, sample_rows)

ACCEPT_SALT = 0x5BD1E9955BD1E995  # keys the acceptance tests' noise apart from the draws'
_FREE_DRAW = SamplingConfig(max_new_tokens=1, top_k=0)  # temperature 1, no filter: the logits as given


@dataclass
class DraftedRow:
    """One verified sequence: its logits rows start .. start + len(draft) (the last new
    token's, then each draft token's), its draft, sampling, seed and output length."""

    start: int
    draft: list[int]
    sampling: SamplingConfig
    seed: int
    output_length: int


def verify(logits: torch.Tensor, greedy: torch.Tensor,
           rows: list[DraftedRow]) -> tuple[list[list[int]], list[list[float]] | None]:
    """For each drafted row, its accepted draft tokens and the token after them, from a
    verify step's float32 `logits` [R, vocab] and their argmax `greedy` [R]; with them, when
    any row asks (output_log_probs), each kept token's log-probability under the
    distribution it is distributed as (the logits for greedy rows, the tempered nucleus for
    sampled ones: what plain decoding reports), a LogProb with the likeliest alternatives
    where asked."""
    device = logits.device
    index = on_device([row.start + i for row in rows for i in range(len(row.draft) + 1)], device)
    drafts = on_device([token for row in rows for token in row.draft + [0]], device)
    tokens = greedy[index].long()
    accepted = tokens == drafts
    owners = _positions(rows)
    sampled = [position for position, row in enumerate(owners) if not row.sampling.greedy]
    asking = any(row.sampling.output_log_probs for row in rows)
    # What each position's token is distributed as, as logits (a copy only sampled rows and log-probs need).
    distributions = logits[index] if sampled or asking else None
    if sampled:
        where = on_device(sampled, device)
        drawn, passed, target = _rejection_sample(distributions[where], drafts[where], [owners[p] for p in sampled],
                                                  _steps(rows, sampled), _is_last(rows, sampled))
        tokens = tokens.index_copy(0, where, drawn)
        accepted = accepted.index_copy(0, where, passed)
        tokens = torch.where(accepted, drafts, tokens)  # a passed draft token is kept as it is
        distributions = distributions.index_copy(0, where, target)
    top = min(max(row.sampling.top_log_probs for row in rows), logits.shape[1])
    columns = [tokens.double()[:, None], accepted.double()[:, None]]
    if asking:
        columns += log_prob_columns(distributions, tokens, top)
    table = torch.cat(columns, dim=1).tolist()  # the one read
    chosen, log_probs, position = [], [], 0
    for row in rows:
        kept: list[int] = []
        for entry in table[position:position + len(row.draft) + 1]:
            kept.append(int(entry[0]))
            if len(kept) == len(row.draft) + 1 or not entry[1]:
                break
        chosen.append(kept)
        log_probs.append([read_log_prob(entry[2:], row.sampling.top_log_probs, top) for entry in
                          table[position:position + len(kept)]] if asking else [])
        position += len(row.draft) + 1
    return chosen, log_probs if asking else None


def _positions(rows: list[DraftedRow]) -> list[DraftedRow]:
    """Each verified position's row, position by position."""
    return [row for row in rows for _ in range(len(row.draft) + 1)]


def _steps(rows: list[DraftedRow], positions: list[int]) -> list[int]:
    """The output position of each of the given verified positions' tokens."""
    steps = [row.output_length + i for row in rows for i in range(len(row.draft) + 1)]
    return [steps[position] for position in positions]


def _is_last(rows: list[DraftedRow], positions: list[int]) -> list[bool]:
    """Whether each of the given verified positions is its row's last (no draft token there)."""
    last = [i == len(row.draft) for row in rows for i in range(len(row.draft) + 1)]
    return [last[position] for position in positions]


def _rejection_sample(logits: torch.Tensor, drafts: torch.Tensor, rows: list[DraftedRow], steps: list[int],
                      last: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled positions: (the token drawn from the target without the draft token, or from
    the whole target at a row's last position; whether the draft token passed; the target
    as logits)."""
    device = logits.device
    samplings = [row.sampling for row in rows]
    if any(sampling.min_p > 0 for sampling in samplings):
        logits = min_p_logits(logits, samplings)
    target = nucleus_logits(logits, samplings)  # tempered, -inf outside each row's nucleus
    draft_probability = target.double().softmax(dim=-1).gather(1, drafts[:, None])[:, 0]
    seeds = [row.seed for row in rows]
    noise = row_keys([seed ^ ACCEPT_SALT for seed in seeds], steps).numpy().view(np.uint64) >> np.uint64(11)
    uniform = on_device(torch.from_numpy(noise.astype(np.float64) * 2.0**-53), device)
    not_last = ~on_device(last, device)
    passed = (uniform < draft_probability) & not_last
    # Without the draft token, unless it is all the target holds (then it always passes).
    remove = not_last & (draft_probability < 1.0)
    residual = target.clone()
    removed = remove.nonzero()[:, 0]
    residual[removed, drafts[removed]] = float("-inf")
    drawn = sample_rows(residual, [_FREE_DRAW] * len(rows), seeds, steps)
    return drawn.long(), passed, target
