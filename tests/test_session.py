"""The generation session: limits, stopping, sampling."""

from __future__ import annotations

import pytest
import torch

from glm_engine import GlmEngineError
from glm_engine.runtime.sampling import SamplingConfig, nucleus_logits, sample_rows
from glm_engine.runtime.session import Session
from model import load_session
from conftest import TINY_SHAPE_FLAGS


@pytest.fixture(scope="module")
def session(tiny_engine_factory) -> Session:
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "3",
                                     "--max_input_len", "16", "--max_output_len", "12", "--random_seed", "5")
    return load_session(engine_dir, "cpu")


PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500], [9]]


def generate(session: Session, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    """Each prompt's generated ids (a static batch)."""
    return [output.token_ids for output in session.generate(prompts, sampling)]


def test_greedy_is_deterministic_and_runs_to_max_output_len(session):
    sampling = SamplingConfig(max_new_tokens=12, end_id=-1)  # -1: no end token
    first = generate(session, PROMPTS, sampling)
    assert first == generate(session, PROMPTS, sampling)
    assert [len(output) for output in first] == [12, 12, 12]


def test_stops_at_the_end_token_and_leaves_it_out(session):
    greedy = generate(session, PROMPTS, SamplingConfig(max_new_tokens=12))
    end_id = greedy[1][3]
    outputs = generate(session, PROMPTS, SamplingConfig(max_new_tokens=12, end_id=end_id))
    assert outputs[1] == greedy[1][:greedy[1].index(end_id)]
    for output, full in zip(outputs, greedy):
        assert end_id not in output
        assert output == full[:len(output)]


def test_a_batch_gives_each_prompt_its_own_output(session):
    batched = generate(session, PROMPTS, SamplingConfig(max_new_tokens=8))
    alone = [generate(session, [prompt], SamplingConfig(max_new_tokens=8))[0] for prompt in PROMPTS]
    assert batched == alone


def test_seeded_sampling_is_reproducible_and_seed_dependent(session):
    def run(seed):
        return generate(session, PROMPTS, SamplingConfig(max_new_tokens=12, top_k=0, temperature=1.5,
                                                         random_seed=seed))
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != generate(session, PROMPTS, SamplingConfig(max_new_tokens=12))


def test_streaming_yields_what_generate_returns(session):
    sampling = SamplingConfig(max_new_tokens=6)
    streamed = [[] for _ in PROMPTS]
    for step in session.stream(PROMPTS, sampling):
        assert len(step.tokens) <= len(PROMPTS)
        for index, token in step.tokens:
            streamed[index].append(token)
    assert streamed == generate(session, PROMPTS, sampling)


def test_top_k_and_top_p_keep_only_the_best_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, -2.0]]).repeat(200, 1)

    def drawn(**setting) -> set[int]:
        samplings = [SamplingConfig(max_new_tokens=1, **setting)] * 200
        return set(sample_rows(logits, samplings, list(range(200)), [0] * 200).tolist())

    assert drawn(top_k=2) == {1, 2}
    # Softmax mass of token 1 is about 0.71: top_p 0.5 keeps it alone, 0.8 adds token 2.
    assert drawn(top_k=0, top_p=0.5) == {1}
    assert drawn(top_k=0, top_p=0.8) == {1, 2}
    assert drawn(top_k=0) > {1, 2}  # no filter: rarer tokens come up too


def test_sampling_draws_from_the_softmax_reproducibly():
    """Each row's token depends on its seed and step alone; over many rows the tokens
    follow the softmax of logits / temperature."""
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(40000, 1)
    sampling = SamplingConfig(max_new_tokens=1, top_k=0, temperature=1.5)
    tokens = sample_rows(logits, [sampling] * 40000, list(range(40000)), [3] * 40000)
    shares = torch.bincount(tokens, minlength=4) / 40000
    assert torch.allclose(shares, (logits[0] / 1.5).softmax(-1), atol=0.01)
    again = sample_rows(logits[:7], [sampling] * 7, list(range(7)), [3] * 7)
    assert torch.equal(again, tokens[:7])
    moved = sample_rows(logits[:7], [sampling] * 7, list(range(7)), [4] * 7)
    assert not torch.equal(moved, tokens[:7]) or not torch.equal(
        sample_rows(logits[:7], [sampling] * 7, list(range(7)), [5] * 7), tokens[:7])


@pytest.mark.parametrize("setting, nucleus", [({"top_k": 3}, [1, 2, 3]), ({"top_k": 0, "top_p": 0.8}, [1, 2]),
                                              ({"top_k": 2, "top_p": 0.95}, [1, 2])])
def test_filtered_sampling_draws_from_the_renormalized_nucleus(setting, nucleus):
    """top-k/top-p rows follow the softmax restricted to the nucleus (the draw without
    sorting is exact), and nucleus_logits (log-probs' distribution) holds the same tokens."""
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, -2.0]]).repeat(40000, 1)
    samplings = [SamplingConfig(max_new_tokens=1, temperature=1.3, **setting)] * 40000
    tokens = sample_rows(logits, samplings, list(range(40000)), [1] * 40000)
    expected = torch.zeros(5)
    expected[nucleus] = (logits[0, nucleus] / 1.3).softmax(-1)
    assert torch.allclose(torch.bincount(tokens, minlength=5) / 40000, expected, atol=0.01)
    kept = nucleus_logits(logits[:1], samplings[:1]).isfinite()[0]
    assert kept.nonzero()[:, 0].tolist() == nucleus


@pytest.mark.parametrize("prompts, max_new, message", [
    ([list(range(3, 20))], 4, "17 tokens, over the engine's max_input_len 16"),
    ([[5], []], 4, "prompt 1 is empty"),
    ([[5, 1024]], 4, "token id 1024, outside the vocabulary"),
    ([[5, -1]], 4, "token id -1"),
    ([[5]], 13, "exceeds the engine's max_output_len 12"),
    ([], 4, "no prompts"),
])
def test_requests_outside_the_engine_limits_are_refused(session, prompts, max_new, message):
    with pytest.raises(GlmEngineError, match=message):
        session.generate(prompts, SamplingConfig(max_new_tokens=max_new))


@pytest.mark.parametrize("fields, message", [
    ({"max_new_tokens": 0}, "at least 1"), ({"temperature": 0.0}, "temperature must be positive"),
    ({"top_k": -1}, "top_k must be >= 0"), ({"top_p": 1.5}, r"top_p must be within \[0, 1\]"),
])
def test_bad_sampling_settings_are_refused(fields, message):
    with pytest.raises(GlmEngineError, match=message):
        SamplingConfig(**{"max_new_tokens": 4, **fields})


def test_decode_graph_buckets_cover_every_batch_size():
    from glm_engine.runtime.cuda_graphs import batch_buckets

    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    for size in range(1, 13):
        assert min(bucket for bucket in batch_buckets(12) if bucket >= size) - size < max(size, 4)


def test_a_live_request_id_is_not_given_twice(session):
    """add_request refuses the id of a queued or running request (their tokens would mix);
    once that request has finished, its id is free again."""
    sampling = SamplingConfig(max_new_tokens=3, end_id=-1)
    session.add_request([5, 6, 7], sampling, request_id=41)
    with pytest.raises(GlmEngineError, match="request id 41 is already queued or running"):
        session.add_request([8, 9], sampling, request_id=41)
    while session.has_work:
        session.step()
    assert session.add_request([8, 9], sampling, request_id=41) == 41
    while session.has_work:
        session.step()
