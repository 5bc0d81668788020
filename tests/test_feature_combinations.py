"""Random workloads -- shared prefixes, staggered arrivals, greedy and seeded sampled
requests, penalties, minimum lengths, log-probs, logit bias and bad words, beams, end
and stop tokens, length limits -- through the scheduler's features at once (prefix
caching, chunked prefill, a pool small enough to preempt, prompt lookup) give every
request the tokens it gets with none of them, and leave the pool whole. A greedy
divergence is excused only where the plain run's two likeliest tokens are a float32 tie
(the batch's shapes change the rounding)."""

from __future__ import annotations

import random

import pytest

from conftest import TINY_SHAPE_FLAGS
from glm_engine.runtime.drafting import SpeculativeConfig
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import Session
from model import load_session

VOCAB = 64  # a small vocabulary repeats itself: prompt lookup's drafts get accepted
BLOCK = 4
Request = tuple[list[int], SamplingConfig, int]  # prompt, sampling, the step it arrives at


def random_sampling(rng: random.Random) -> SamplingConfig:
    """One request's sampling: greedy, or one of the controls, with random limits and end tokens."""
    options: dict = {"max_new_tokens": rng.randrange(1, 24), "end_id": rng.choice([-1, -1, rng.randrange(3, VOCAB)])}
    if rng.random() < 0.3:
        options["stop_token_ids"] = (rng.randrange(3, VOCAB),)
    kind = rng.random()
    if kind < 0.5:  # greedy
        return SamplingConfig(**options)
    if kind < 0.65:
        options.update(top_k=0, temperature=0.8, random_seed=rng.randrange(1000))
    elif kind < 0.75:
        options.update(repetition_penalty=1.3)
    elif kind < 0.82:
        options.update(min_length=rng.randrange(1, 6))
    elif kind < 0.88:
        options.update(output_log_probs=True)
    elif kind < 0.94:
        options.update(logit_bias=((rng.randrange(3, VOCAB), 5.0),), bad_words=((rng.randrange(3, VOCAB),),))
    else:
        options.update(num_beams=2, end_id=-1, stop_token_ids=())
    return SamplingConfig(**options)


def workload(seed: int) -> list[Request]:
    """6-13 requests, most starting with one of three shared prefixes, arriving over 10 steps."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    requests = []
    for _ in range(rng.randrange(6, 14)):
        span = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 8))]
        prompt = (rng.choice(prefixes) if rng.random() < 0.7 else []) + (span * 5)[:rng.randrange(1, 20)]
        requests.append((prompt or [5], random_sampling(rng), rng.randrange(10)))
    return requests


def run(session: Session, requests: list[Request]) -> dict[int, list[int]]:
    """Each request's tokens, requests added at their arrival steps; the pool whole after."""
    outputs: dict[int, list[int]] = {index: [] for index in range(len(requests))}
    pending = sorted(range(len(requests)), key=lambda index: requests[index][2])
    step = 0
    while pending or session.has_work:
        while pending and requests[pending[0]][2] <= step:
            index = pending.pop(0)
            session.add_request(requests[index][0], requests[index][1], index)
        if session.has_work:
            for index, token in session.step().tokens:
                outputs[index].append(token)
        step += 1
    assert session.block_manager.free_blocks == session.block_manager.num_blocks
    return outputs


def is_tie(session: Session, prompt: list[int], output: list[int], position: int) -> bool:
    """Whether the two likeliest tokens after prompt + output[:position] are within float32 rounding."""
    top = session.prompt_logits(prompt + output[:position])[-1].topk(2).values
    return float(top[0] - top[1]) < 1e-5


@pytest.fixture(scope="module")
def engine(tiny_engine_factory):
    """A reference-path float32 engine with a paged pool of 4-token blocks."""
    return tiny_engine_factory(*TINY_SHAPE_FLAGS[:-2], "--vocab_size", str(VOCAB), "--dtype", "float32",
                               "--max_batch_size", "8", "--max_input_len", "64", "--max_output_len", "24",
                               "--max_draft_len", "4", "--paged_kv_cache", "--remove_input_padding",
                               "--tokens_per_block", str(BLOCK), "--random_seed", "5")


LOOKUP = SpeculativeConfig("prompt_lookup", 4)
VARIANTS = {  # a pool of 144 tokens holds a beam request of the longest prompt, not all 8 in flight: preemption
    "caching_chunked_preempting": {"prefix_caching": True, "chunked_prefill": True, "tokens_per_step": 12,
                                   "max_tokens_in_paged_kv_cache": 144},
    "all_with_prompt_lookup": {"prefix_caching": True, "chunked_prefill": True, "tokens_per_step": 12,
                               "max_tokens_in_paged_kv_cache": 144, "speculative": LOOKUP},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_workloads_through_every_feature_give_plain_tokens(engine, variant):
    plain = load_session(engine, "cpu")
    session = load_session(engine, "cpu", **VARIANTS[variant])
    speculative = "speculative" in VARIANTS[variant]
    compared = 0
    for seed in range(8):
        requests = workload(seed)
        if speculative:  # beams are refused with speculative decoding
            requests = [request for request in requests if request[1].num_beams == 1]
        expected, got = run(plain, requests), run(session, requests)
        for index, (prompt, sampling, _) in enumerate(requests):
            if speculative and not sampling.greedy:  # rejection sampling keeps the distribution, not the draws
                continue
            compared += 1
            if got[index] != expected[index]:
                position = next(i for i, (a, b) in enumerate(zip(got[index], expected[index])) if a != b)
                assert sampling.greedy and is_tie(plain, prompt, expected[index], position), (seed, index, sampling)
    scheduler = session.scheduler
    assert compared > 40 and scheduler.preemptions > 0 and session.block_manager.hit_tokens > 0
    assert not speculative or scheduler.accepted_tokens > 0
