"""Automatic prefix caching: requests that share a prefix reuse the K/V blocks of
that prefix, their tokens identical to computing it; the cache keys whole token
chains (the same block of tokens after a different prefix is not reused); freed
blocks keep their content until the pool needs them, least recently freed first,
and nothing is lost when they are evicted."""

from __future__ import annotations

import json
import random

import pytest

from conftest import TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import Session
from model import load_session

VOCAB = 1024
BLOCK = 4


def run_all(session: Session, prompts: list[list[int]], sampling: SamplingConfig,
            first_alone: bool = True) -> list[list[int]]:
    """Each prompt's tokens, all in flight (the first one alone first, so that its blocks
    are cached before the others arrive, when `first_alone`)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    waves = [[0], range(1, len(prompts))] if first_alone else [range(len(prompts))]
    for wave in waves:
        for index in wave:
            session.add_request(prompts[index], sampling, index)
        while session.has_work:
            for index, token in session.step().tokens:
                outputs[index].append(token)
    return outputs


@pytest.fixture(scope="module")
def engine(tiny_engine_factory):
    """A reference-path float32 engine with a paged cache of 4-token blocks."""
    return tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "8",
                               "--max_input_len", "1100", "--max_output_len", "8", "--paged_kv_cache",
                               "--remove_input_padding", "--tokens_per_block", str(BLOCK), "--random_seed", "7")


def shared_prefix_prompts(count: int, prefix_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 9))] for _ in range(count)]


@pytest.mark.parametrize("prefix_len, tokens_per_step", [(1000, None), (200, 64)])
def test_a_shared_prefix_is_computed_once_and_changes_no_token(engine, prefix_len, tokens_per_step):
    """32 requests sharing a prefix, read whole or in chunks of the step's token budget."""
    prompts = shared_prefix_prompts(32, prefix_len, seed=1)
    sampling = SamplingConfig(max_new_tokens=4, end_id=-1)
    options = {"tokens_per_step": tokens_per_step, "chunked_prefill": tokens_per_step is not None}
    plain = load_session(engine, "cpu", **options)
    cached = load_session(engine, "cpu", **options, prefix_caching=True)
    assert run_all(cached, prompts, sampling) == run_all(plain, prompts, sampling)
    manager = cached.block_manager
    # Every request after the first finds all the prefix's full blocks.
    assert manager.hit_tokens == 31 * prefix_len
    assert manager.queried_tokens == sum(map(len, prompts))
    assert manager.free_blocks == manager.num_blocks  # the pool is whole: cached blocks are free
    assert plain.block_manager.hit_tokens == 0


def test_evicted_blocks_lose_nothing_under_memory_pressure(engine):
    """A pool for about three requests, forty requests over five prefixes: cached blocks
    are evicted and taken again, requests are preempted, and every request gets the
    tokens it gets without caching."""
    rng = random.Random(3)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(24)] for _ in range(5)]
    prompts = [rng.choice(prefixes) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))]
               for _ in range(40)]
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    plain = load_session(engine, "cpu", max_tokens_in_paged_kv_cache=96)
    cached = load_session(engine, "cpu", max_tokens_in_paged_kv_cache=96, prefix_caching=True)
    assert run_all(cached, prompts, sampling, first_alone=False) == run_all(plain, prompts, sampling,
                                                                           first_alone=False)
    manager = cached.block_manager
    assert manager.evicted_blocks > 0 and manager.hit_tokens > 0
    assert manager.free_blocks == manager.num_blocks


def test_a_block_is_found_only_after_the_same_tokens_before_it():
    manager = BlockManager(8, BLOCK, prefix_caching=True)
    tokens = list(range(10, 22))  # three full blocks
    table: list[int] = []
    manager.grow(table, len(tokens))
    parent = 0
    for index in range(3):
        parent = manager.register(table[index], parent, tokens[index * BLOCK:(index + 1) * BLOCK])
    assert manager.cached_prefix(tokens + [1, 2], max_blocks=8)[0] == table
    assert manager.cached_prefix(tokens, max_blocks=2)[0] == table[:2]
    # The second block's tokens after another first block: not the cached K/V (positions and context differ).
    assert manager.cached_prefix([0, 0, 0, 0] + tokens[4:], max_blocks=8)[0] == []
    assert manager.cached_prefix(tokens[:4] + [0] + tokens[5:], max_blocks=8)[0] == table[:1]
    assert manager.cached_prefix(tokens[:3], max_blocks=8)[0] == []  # a part-filled block is never shared


def test_free_blocks_without_content_go_first_then_the_least_recently_freed():
    manager = BlockManager(4, BLOCK, prefix_caching=True)
    first, second = [], []
    manager.grow(first, 4)
    manager.grow(second, 4)
    manager.register(first[0], 0, [1, 2, 3, 4])
    manager.register(second[0], 0, [5, 6, 7, 8])
    manager.release(first)
    manager.release(second)
    assert manager.free_blocks == 4 and manager.cached_blocks == 2
    fresh: list[int] = []
    manager.grow(fresh, 8)  # the two blocks that never held content
    assert manager.cached_blocks == 2
    manager.grow(fresh, 12)  # then the first block freed: [1, 2, 3, 4] is gone, [5, 6, 7, 8] kept
    assert manager.cached_prefix([1, 2, 3, 4], 1)[0] == []
    assert len(manager.cached_prefix([5, 6, 7, 8], 1)[0]) == 1
    assert manager.evicted_blocks == 1


def test_benchmark_conversations_share_their_history_and_hit_the_cache(engine, tmp_path):
    """benchmark.py --turns/--shared_prefix_len: each turn's prompt is the system prompt, the
    conversation's earlier user texts and answers, then its own text; with
    --enable_prefix_caching the turns find their history in the cache, without it nothing."""
    import argparse

    from benchmark import serving_requests

    args = argparse.Namespace(num_requests=6, turns=3, shared_prefix_len=5, input_len_range=[2, 4], output_len=3)
    prompts = serving_requests(args, VOCAB)
    plain = serving_requests(argparse.Namespace(**{**vars(args), "turns": 1, "shared_prefix_len": 0}), VOCAB)
    system = prompts[0][:5]
    for index, prompt in enumerate(prompts):  # request = turn * 2 + conversation
        earlier = prompts[index - 2] if index >= 2 else system
        assert prompt[:len(earlier)] == earlier and prompt[-len(plain[index]):] == plain[index]
        answer_len = len(prompt) - len(earlier) - len(plain[index])
        assert answer_len == (3 if index >= 2 else 0)
    hits = {}
    for caching in ([], ["--enable_prefix_caching"]):
        result = run_tool("benchmark.py", "--engine_dir", engine, "--mode", "rate", "--request_rate", "20",
                          "--num_requests", "8", "--turns", "4", "--shared_prefix_len", "40", "--input_len_range",
                          "3", "9", "--output_len", "4", "--device", "cpu", "--output_json", tmp_path / "b.json",
                          *caching)
        assert result.returncode == 0, result.stderr
        row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
        hits[bool(caching)] = row["prefix_cache_hit_tokens"]
    assert hits[False] == 0 and hits[True] >= 40  # a later request found at least the system prompt


@pytest.mark.parametrize("flags, fragment", [
    (["--turns", "3"], "divides --num_requests"),
    (["--mode", "latency", "--shared_prefix_len", "4"], "add --mode throughput or rate"),
])
def test_benchmark_conversation_flags_are_checked(engine, flags, fragment):
    result = run_tool("benchmark.py", "--engine_dir", engine, "--mode", "throughput", "--num_requests", "8",
                      "--device", "cpu", *flags)
    assert_one_line_error(result, fragment)
