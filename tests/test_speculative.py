"""Speculative decoding (--speculative_decoding_mode): prompt lookup's drafts, greedy
output identical to plain decoding on static and in-flight engines (with preemption,
on the reference ops and the interpreted kernels), rejection sampling that keeps the
target's distribution, the KV pool whole afterwards, and the errors a user can meet."""

from __future__ import annotations

import random
from pathlib import Path
from collections import Counter

import pytest
import torch
from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, assert_one_line_error, cpu_sessions_run_kernels, run_tool

from glm_engine import GlmEngineError
from glm_engine.api import SamplingConfig, load_session
from glm_engine.runtime.cuda_graphs import VerifyGraphs
from glm_engine.runtime.drafting import DraftState, PromptLookup, SpeculativeConfig
from glm_engine.runtime.sampling import nucleus_logits
from glm_engine.runtime.verification import DraftedRow, verify

LOOKUP = SpeculativeConfig("prompt_lookup", 4)
SMALL = (*TINY_SHAPE_FLAGS[:-2], "--vocab_size", "64")  # a small vocabulary repeats itself: drafts get accepted


def repeating_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random span, as summaries copy their article."""
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        span = [rng.randrange(3, 64) for _ in range(rng.randrange(4, 12))]
        prompts.append((span * 4)[:rng.randrange(12, 30)] + [index + 3])
    return prompts


def brute_force_lookup(tokens: list[int], max_ngram: int, length: int) -> list[int]:
    """Prompt lookup by scanning: the latest earlier match of the longest tail n-gram."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + length]
    return []


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match() -> None:
    lookup = PromptLookup(max_ngram=3)
    assert lookup.propose([[1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]], [DraftState()], [3]) == [[7, 5, 1]]
    assert lookup.propose([[4, 5, 6]], [DraftState()], [2]) == [[]]  # no earlier match
    # --prompt_lookup_max_ngram: the trigram 1 2 3 matches at the start, the unigram 3 matches later.
    tokens = [1, 2, 3, 7, 9, 3, 8, 1, 2, 3]
    assert lookup.propose([tokens], [DraftState()], [2]) == [[7, 9]]
    assert PromptLookup(max_ngram=1).propose([tokens], [DraftState()], [2]) == [[8, 1]]
    from run import parse_arguments
    from glm_engine.tools.cli import speculative_options

    options = speculative_options(parse_arguments(["--speculative_decoding_mode", "prompt_lookup",
                                                   "--prompt_lookup_max_ngram", "1", "--max_draft_len", "2"]))
    assert options["speculative"] == SpeculativeConfig("prompt_lookup", 2, 1)
    rng = random.Random(1)
    state, tokens = DraftState(), [rng.randrange(5) for _ in range(6)]
    for _ in range(60):  # the index grows with the sequence, as the scheduler calls it
        assert lookup.propose([tokens], [state], [4]) == [brute_force_lookup(tokens, 3, 4)]
        tokens += [rng.randrange(5) for _ in range(rng.randrange(1, 4))]


def generate_both(engine_dir, prompts, sampling, **options):
    plain = load_session(engine_dir, "cpu", **options).generate(prompts, sampling)
    session = load_session(engine_dir, "cpu", speculative=LOOKUP, **options)
    drafted = session.generate(prompts, sampling)
    return plain, drafted, session


PAGED = ("--paged_kv_cache", "--remove_input_padding")  # the scheduler's pool on the reference ops


@pytest.mark.parametrize("engine_flags", [(), PAGED], ids=["static", "paged"])
def test_greedy_output_is_plain_decodings(tiny_engine_factory, engine_flags) -> None:
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "24",
                                     "--random_seed", "5", "--max_draft_len", "4", *engine_flags)
    prompts = repeating_prompts(6)
    sampling = SamplingConfig(max_new_tokens=24, end_id=-1)
    plain, drafted, session = generate_both(engine_dir, prompts, sampling)
    assert [output.token_ids for output in drafted] == [output.token_ids for output in plain]
    scheduler = session.scheduler
    assert scheduler.accepted_tokens > 0 and scheduler.verify_steps > 0  # drafts ran and some were kept
    assert session.block_manager.free_blocks == session.block_manager.num_blocks
    one = load_session(engine_dir, "cpu", speculative=SpeculativeConfig("prompt_lookup", 1))  # a run-time limit
    assert one.generate(prompts[:1], sampling)[0].token_ids == plain[0].token_ids
    assert 0 < one.scheduler.drafted_tokens <= one.scheduler.verify_steps < scheduler.drafted_tokens
    if engine_flags:  # prompts read in chunks beside the verify steps of the sequences decoding
        _, chunked, _ = generate_both(engine_dir, prompts, sampling, chunked_prefill=True, tokens_per_step=12)
        assert [output.token_ids for output in chunked] == [output.token_ids for output in plain]


def test_greedy_with_preemption_end_tokens_and_stop_ids_matches(tiny_engine_factory) -> None:
    """A pool too small for all in flight (preemptions), end and stop tokens inside accepted drafts."""
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "24",
                                     "--random_seed", "5", "--max_draft_len", "4", *PAGED, "--tokens_per_block", "4")
    prompts = repeating_prompts(8, seed=2)
    plain_outputs = load_session(engine_dir, "cpu").generate(prompts, SamplingConfig(max_new_tokens=24, end_id=-1))
    common = Counter(token for output in plain_outputs for token in output.token_ids).most_common(2)
    sampling = SamplingConfig(max_new_tokens=24, end_id=common[0][0], stop_token_ids=(common[1][0],))
    plain, drafted, session = generate_both(engine_dir, prompts, sampling, max_tokens_in_paged_kv_cache=96)
    assert [output.token_ids for output in drafted] == [output.token_ids for output in plain]
    assert session.scheduler.preemptions > 0
    assert session.block_manager.free_blocks == session.block_manager.num_blocks
    # The engine drafting for itself: preempted sequences give their draft-side blocks back too.
    session = load_session(engine_dir, "cpu", max_tokens_in_paged_kv_cache=96,
                           speculative=SpeculativeConfig("draft_model", 4, draft_engine_dir=str(engine_dir)))
    assert [output.token_ids for output in session.generate(prompts, sampling)] == \
        [output.token_ids for output in plain]
    assert session.scheduler.preemptions > 0
    for manager in (session.block_manager, session.drafter.block_manager):
        assert manager.free_blocks == manager.num_blocks


@cpu_sessions_run_kernels
@pytest.mark.parametrize("cache_flags", [(), ("--fp8_kv_cache",)], ids=["cache_dtype", "fp8_cache"])
def test_greedy_output_on_the_interpreted_kernels(tiny_engine_factory, cache_flags) -> None:
    """The verify steps' attention (a row per token over its own prefix) and K/V writes, on an
    FP8 cache too, whose rejected slots hold quantized values until written over."""
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "12",
                                     "--random_seed", "5", "--max_draft_len", "4", "--use_inflight_batching",
                                     "--enable_context_fmha_fp32_acc", "--tokens_per_block", "8", *cache_flags)
    prompts = repeating_prompts(3, seed=4)
    plain, drafted, session = generate_both(engine_dir, prompts, SamplingConfig(max_new_tokens=12, end_id=-1))
    assert [output.token_ids for output in drafted] == [output.token_ids for output in plain]
    assert session.scheduler.accepted_tokens > 0


@pytest.mark.parametrize("sampling", [SamplingConfig(1, top_k=0, temperature=0.8),
                                      SamplingConfig(1, top_k=4, top_p=0.9), SamplingConfig(1, top_k=0, min_p=0.2)],
                         ids=["temperature", "top_k_top_p", "min_p"])
def test_rejection_sampling_keeps_the_target_distribution(sampling) -> None:
    """The first kept token of a verified one-token draft, over many seeds, is distributed
    as the target's (the draft token itself, likely or not, and the others)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, generator=generator) * 1.5  # the last token's position, then the draft's
    target = nucleus_logits(logits[:1], [sampling])
    if sampling.min_p:
        target = nucleus_logits(logits[:1].masked_fill(logits[:1].softmax(-1) < 0.2 * logits[:1].softmax(-1).max(),
                                                       float("-inf")), [sampling])
    expected = target.softmax(dim=-1)[0]
    draws = 6000
    for draft in (int(expected.argmax()), int(expected.argsort()[-3])):
        rows = [DraftedRow(2 * i, [draft], sampling, seed, 0) for i, seed in enumerate(range(draws))]
        chosen, _ = verify(logits.repeat(draws, 1), logits.argmax(dim=-1).repeat(draws), rows)
        first = Counter(tokens[0] for tokens in chosen)
        observed = torch.tensor([first[token] / draws for token in range(8)])
        assert (observed - expected).abs().max() < 0.025, (draft, observed, expected)
        assert all(len(tokens) == 2 for tokens in chosen if tokens[0] == draft)  # accepted: the bonus token follows


def test_log_probs_with_drafts_are_plain_decodings(tiny_engine_factory) -> None:
    """Greedy requests asking for log-probs (and the likeliest alternatives) draft too, and
    report the log-probs plain decoding reports."""
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "24",
                                     "--random_seed", "5", "--max_draft_len", "4", *PAGED)
    sampling = SamplingConfig(max_new_tokens=24, end_id=-1, output_log_probs=True, top_log_probs=2)
    plain, drafted, session = generate_both(engine_dir, repeating_prompts(4, seed=13), sampling)
    assert session.scheduler.accepted_tokens > 0
    for ours, theirs in zip(drafted, plain):
        assert ours.token_ids == theirs.token_ids
        assert ours.log_probs == pytest.approx(theirs.log_probs, abs=1e-4)
        assert [[token for token, _ in value.top] for value in ours.log_probs] == \
            [[token for token, _ in value.top] for value in theirs.log_probs]


def test_sampled_requests_run_with_drafts_and_are_reproducible(tiny_engine_factory) -> None:
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "24",
                                     "--random_seed", "5", "--max_draft_len", "4", *PAGED)
    prompts = repeating_prompts(4, seed=3)
    sampling = SamplingConfig(max_new_tokens=24, end_id=-1, top_k=0, temperature=0.3, random_seed=11,
                              output_log_probs=True)
    session = load_session(engine_dir, "cpu", speculative=LOOKUP)
    outputs = session.generate(prompts, sampling)
    first = [output.token_ids for output in outputs]
    assert [output.token_ids for output in session.generate(prompts, sampling)] == first
    assert all(len(tokens) == 24 for tokens in first)
    assert all(len(output.log_probs) == 24 and all(-100 < value <= 0 for value in output.log_probs)
               for output in outputs)
    assert session.scheduler.accepted_tokens > 0
    assert session.block_manager.free_blocks == session.block_manager.num_blocks


def test_speculative_decoding_errors(tiny_engine_factory, tmp_path) -> None:
    plain_engine = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "8")
    with pytest.raises(GlmEngineError, match="--max_draft_len"):
        load_session(plain_engine, "cpu", speculative=LOOKUP)
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "8",
                                     "--max_draft_len", "2")
    with pytest.raises(GlmEngineError, match="exceeds the engine's 2"):
        load_session(engine_dir, "cpu", speculative=LOOKUP)
    session = load_session(engine_dir, "cpu", speculative=SpeculativeConfig("prompt_lookup"))
    assert session.speculative.max_draft_len == 2
    with pytest.raises(GlmEngineError, match="beam search"):
        session.add_request([5, 6, 7], SamplingConfig(4, num_beams=2))
    with pytest.raises(GlmEngineError, match="--max_draft_len must be"):
        SpeculativeConfig("prompt_lookup", 0)
    (tmp_path / "prompt.csv").write_text("5,6,7\n")
    result = run_tool("run.py", "--engine_dir", engine_dir, "--input_tokens", tmp_path / "prompt.csv",
                      "--max_output_len", "4", "--device", "cpu", "--max_draft_len", "2")
    assert_one_line_error(result, "--speculative_decoding_mode")


def test_run_py_prints_the_same_tokens_with_prompt_lookup(tiny_engine_factory, tmp_path) -> None:
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "16",
                                     "--random_seed", "5", "--max_draft_len", "4")
    prompt_csv = tmp_path / "prompt.csv"
    prompt_csv.write_text(",".join(map(str, repeating_prompts(1, seed=6)[0])) + "\n")
    outputs = []
    for flags in ((), ("--speculative_decoding_mode", "prompt_lookup", "--prompt_lookup_max_ngram", "2")):
        output_csv = tmp_path / f"out{len(flags)}.csv"
        result = run_tool("run.py", "--engine_dir", engine_dir, "--input_tokens", prompt_csv, "--max_output_len", "16",
                          "--device", "cpu", "--output_csv", output_csv, *flags)
        assert result.returncode == 0, result.stderr
        outputs.append(output_csv.read_text())
    assert outputs[0] == outputs[1] and outputs[0].strip()


@cpu_sessions_run_kernels
def test_verify_graph_inputs_give_the_eager_step(tiny_engine_factory) -> None:
    """The verify graphs' static-input step (run eagerly on the CPU), its sequences padded
    to the draft bucket and the batch to the batch bucket, gives the eager verify step's
    logits at every drafted position and the same K/V in the sequences' slots."""
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "12",
                                     "--random_seed", "5", "--max_draft_len", "4", "--use_inflight_batching",
                                     "--enable_context_fmha_fp32_acc", "--tokens_per_block", "8")
    session = load_session(engine_dir, "cpu")
    runner, manager = session.runner, session.block_manager
    graphs = VerifyGraphs(runner.network, runner.attention, runner.kv_cache, 4, 4, runner.blocks_per_sequence,
                          runner.scratch_block, session.device)
    assert sorted(graphs.graphs) == [(s, t) for s in (1, 2, 4) for t in (2, 3, 5)]
    assert graphs.takes([[1, 2, 3]] * 4) and not graphs.takes([[1] * 6]) and not graphs.takes([[1, 2]] * 5)
    prompts = repeating_prompts(3, seed=8)
    tables = []
    for prompt in prompts:  # the prompts' K/V cached but their last token
        table: list[int] = []
        assert manager.grow(table, len(prompt) + 4)
        runner.forward([table], [0], [prompt[:-1]])
        tables.append(table)
    cached = [len(prompt) - 1 for prompt in prompts]
    fed = [[prompts[0][-1], 5, 6], [prompts[1][-1]], [prompts[2][-1], 7, 8, 9, 10]]  # drafts of 2, 0 and 4
    counts = [len(tokens) for tokens in fed]
    logits, greedy = graphs.run(tables, cached, fed, counts)
    cache = runner.kv_cache
    graph_keys = cache.keys.clone()
    eager = runner.forward(tables, cached, fed, [list(range(count)) for count in counts])
    assert logits.shape == eager.shape == (sum(counts), 64)
    assert (logits - eager).abs().max() < 1e-4 * eager.abs().max()
    assert torch.equal(greedy, eager.argmax(-1))
    slots = torch.tensor([table[p // cache.block_size] * cache.block_size + p % cache.block_size
                          for table, done, tokens in zip(tables, cached, fed) for p in range(done + len(tokens))])
    assert torch.allclose(graph_keys[:, slots], cache.keys[:, slots], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are captured on a GPU")
def test_verify_graphs_give_plain_decodings_tokens_on_a_gpu(tiny_engine_factory, monkeypatch) -> None:
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "24",
                                     "--random_seed", "5", "--max_draft_len", "4", "--use_inflight_batching")
    runs = []
    original = VerifyGraphs.run
    monkeypatch.setattr(VerifyGraphs, "run", lambda self, *args: runs.append(1) or original(self, *args))
    prompts = repeating_prompts(6, seed=9)
    sampling = SamplingConfig(max_new_tokens=24, end_id=-1)
    plain = load_session(engine_dir, "cuda").generate(prompts, sampling)
    session = load_session(engine_dir, "cuda", speculative=LOOKUP)
    drafted = session.generate(prompts, sampling)
    assert [output.token_ids for output in drafted] == [output.token_ids for output in plain]
    assert runs and session.scheduler.accepted_tokens > 0
    assert session.block_manager.free_blocks == session.block_manager.num_blocks


@pytest.fixture(scope="module")
def copying_engine(tmp_path_factory) -> Path:
    """A float32 engine of the tiny ChatGLM2 trained to copy (scripts/train_copying_checkpoint.py)."""
    from train_copying_checkpoint import write_copying_checkpoint

    checkpoint = write_copying_checkpoint(tmp_path_factory.mktemp("copying") / "checkpoint", steps=700)
    engine_dir = checkpoint.parent / "engine"
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", engine_dir, "--dtype", "float32",
                      "--max_input_len", "64", "--max_output_len", "32", "--max_draft_len", "6", *PAGED,
                      "--log_level", "error")
    assert result.returncode == 0, result.stderr
    return engine_dir


def test_prompt_lookup_accepts_most_drafts_of_a_model_that_copies(copying_engine) -> None:
    """On its task (continuing a repeated span) the copying model's greedy tokens are prompt
    lookup's drafts: most are accepted, and the output is plain decoding's."""
    prompts = [prompt[:-1] for prompt in repeating_prompts(6, seed=10)]  # spans repeated, unbroken
    sampling = SamplingConfig(max_new_tokens=32, end_id=-1)
    plain, drafted, session = generate_both(copying_engine, prompts, sampling)
    assert [output.token_ids for output in drafted] == [output.token_ids for output in plain]
    counts = session.scheduler.speculative_counts()
    assert counts["acceptance"] > 0.5, counts
    assert counts["forward_steps_per_token"] < 0.5, counts  # over two tokens a forward step


def test_lead_task_rows_are_summarize_prompts_followed_by_their_article() -> None:
    """The lead task's training rows (scripts/train_copying_checkpoint.py --task lead): summarize.py's
    prompt of an article, then the article again from its start; labels from the marker's last token."""
    from summarize import summarize_prompt
    from train_copying_checkpoint import IGNORED, LeadTask

    from glm_engine.text.tokenizer import ChatGLMTokenizer

    tokenizer_dir = REPO_ROOT / "data" / "demo_tokenizer"
    task = LeadTask.from_tokenizer(tokenizer_dir, 1024)
    prompt = summarize_prompt("A storm hit the town.", ChatGLMTokenizer.from_dir(tokenizer_dir), 800)
    assert prompt[:len(task.prefix)] == task.prefix and prompt[-len(task.marker):] == task.marker
    tokens, labels = task.batch(torch.Generator().manual_seed(0), 8, 96)
    for row, row_labels in zip(tokens.tolist(), labels.tolist()):
        assert row[:len(task.prefix)] == task.prefix
        end = next(i for i in range(len(task.prefix) + 1, len(row)) if row[i - len(task.marker):i] == task.marker)
        article = row[len(task.prefix):end - len(task.marker)]
        assert len(article) >= 4 and row[end:end + len(article)] == article[:len(row) - end]
        assert set(row_labels[:end - 1]) == {IGNORED} and row_labels[end - 1:-1] == row[end:]


def test_draft_model_drafting_gives_plain_decodings_tokens(tiny_engine_factory) -> None:
    """A different, smaller draft engine: plain decoding's tokens; the target drafting for
    itself: every guess accepted. Both pools whole afterwards."""
    flags = (*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "24", *PAGED)
    engine_dir = tiny_engine_factory(*flags, "--random_seed", "5", "--max_draft_len", "4")
    draft_dir = tiny_engine_factory(*flags, "--random_seed", "6", "--n_layer", "1")
    prompts = repeating_prompts(5, seed=12)
    sampling = SamplingConfig(max_new_tokens=24, end_id=-1)
    plain = [output.token_ids for output in load_session(engine_dir, "cpu").generate(prompts, sampling)]
    for draft, all_accepted in ((draft_dir, False), (engine_dir, True)):
        session = load_session(engine_dir, "cpu", speculative=SpeculativeConfig("draft_model", 4,
                                                                                draft_engine_dir=str(draft)))
        assert [output.token_ids for output in session.generate(prompts, sampling)] == plain
        counts = session.scheduler.speculative_counts()
        assert counts["drafted_tokens"] > 0
        if all_accepted:
            assert counts["accepted_tokens"] == counts["drafted_tokens"], counts
        for manager in (session.block_manager, session.drafter.block_manager):
            assert manager.free_blocks == manager.num_blocks


def test_a_draft_engine_of_another_vocabulary_is_refused(tiny_engine_factory) -> None:
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "8",
                                     "--max_draft_len", "2")
    other = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_input_len", "32",
                                "--max_output_len", "8")
    with pytest.raises(GlmEngineError, match="same tokenizer"):
        load_session(engine_dir, "cpu", speculative=SpeculativeConfig("draft_model", draft_engine_dir=str(other)))


def test_prefix_caching_reuses_blocks_that_verify_steps_filled(tiny_engine_factory) -> None:
    """serve.py's default pairing: a second turn (the first turn's prompt, its answer and
    more) starts from blocks the first turn's verify steps filled with accepted draft
    tokens; both turns give plain decoding's tokens without caching, and the pool is whole."""
    engine_dir = tiny_engine_factory(*SMALL, "--dtype", "float32", "--max_input_len", "64", "--max_output_len", "24",
                                     "--random_seed", "5", "--max_draft_len", "4", *PAGED, "--tokens_per_block", "4")
    sampling = SamplingConfig(max_new_tokens=24, end_id=-1)
    # Prompt lengths of every remainder by the block size: some answers end a block with a token never fed.
    first_turns = [prompt[:len(prompt) - (len(prompt) + index) % 4]
                   for index, prompt in enumerate(repeating_prompts(4, seed=3))]
    plain = load_session(engine_dir, "cpu")
    cached = load_session(engine_dir, "cpu", speculative=LOOKUP, prefix_caching=True)
    answers = [output.token_ids for output in plain.generate(first_turns, sampling)]
    assert [output.token_ids for output in cached.generate(first_turns, sampling)] == answers
    assert cached.scheduler.accepted_tokens > 0
    second_turns = [prompt + answer + [7, 8, 9] for prompt, answer in zip(first_turns, answers)]
    hits_before = cached.block_manager.hit_tokens
    assert [output.token_ids for output in cached.generate(second_turns, sampling)] == \
        [output.token_ids for output in plain.generate(second_turns, sampling)]
    # Each second turn finds its first turn's prompt and answer, as far as full blocks reach.
    reusable = sum((len(prompt) + len(answer) - 1) // 4 * 4 for prompt, answer in zip(first_turns, answers))
    assert cached.block_manager.hit_tokens - hits_before == reusable
    assert cached.block_manager.free_blocks == cached.block_manager.num_blocks
