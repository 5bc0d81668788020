"""In-flight batching over the paged KV cache: outputs equal each prompt run
alone, preemption changes no token and leaks no block, limits are refused,
seeded sampling does not depend on the batch, and the serving flags change
what runs."""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.engine_format.engine import read_engine_config
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.scheduler import Scheduler
from glm_engine.runtime.session import Session
from model import load_session

VOCAB = 1024


def mixed_prompts(count: int, seed: int, longest: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def run_all(session: Session, prompts: list[list[int]], samplings: list[SamplingConfig],
            max_in_flight: int, **scheduler_options) -> tuple[list[list[int]], Scheduler]:
    session.configure_scheduler(max_in_flight, **scheduler_options)
    scheduler = session.scheduler
    scheduler.step_tokens = []  # tokens forwarded by each step
    for index, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        session.add_request(prompt, sampling, index)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = []
    while session.has_work:
        step = session.step()
        scheduler.step_tokens.append(step.forwarded_tokens)
        for index, token in step.tokens:
            outputs[index].append(token)
        finished += step.finished
    assert sorted(finished) == list(range(len(prompts)))  # every request ends, once
    return outputs, scheduler


def alone(session: Session, prompt: list[int], sampling: SamplingConfig) -> list[int]:
    """The ids one request generates alone."""
    return session.generate([prompt], sampling)[0].token_ids


@pytest.fixture(scope="module")
def paged_engine(tiny_engine_factory):
    """A reference-path (no Triton) float32 engine with a paged cache of 4-token blocks."""
    return tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "4",
                               "--max_input_len", "32", "--max_output_len", "16", "--paged_kv_cache",
                               "--remove_input_padding", "--tokens_per_block", "4", "--random_seed", "5")


def test_preempting_inflight_batching_gives_each_prompt_its_alone_tokens(paged_engine, caplog):
    prompts = mixed_prompts(14, seed=1)
    sampling = SamplingConfig(max_new_tokens=16, end_id=-1)
    with caplog.at_level(logging.INFO, logger="session"):
        small = load_session(paged_engine, "cpu", max_tokens_in_paged_kv_cache=96)  # 24 blocks: room for ~2 sequences
    assert "KV cache: 24 blocks of 4 tokens = 96 tokens" in caplog.text
    outputs, scheduler = run_all(small, prompts, [sampling] * len(prompts), max_in_flight=4)
    assert scheduler.preemptions > 0
    assert small.block_manager.free_blocks == small.block_manager.num_blocks  # no leak
    roomy = load_session(paged_engine, "cpu")
    assert outputs == [alone(roomy, prompt, sampling) for prompt in prompts]


def test_inflight_batching_engine_with_plugins_matches_alone(tiny_engine_factory):
    """--use_inflight_batching turns on the attention plugin, context FMHA, paging and
    packing; its mixed prefill/decode steps run the Triton kernels (interpreted here)."""
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "3",
                                     "--max_input_len", "24", "--max_output_len", "8", "--use_inflight_batching",
                                     "--tokens_per_block", "8", "--random_seed", "6")
    build = read_engine_config(engine_dir)["build"]
    assert build["use_gpt_attention_plugin"] == "float32" and build["context_fmha"] == "enabled_with_fp32_acc"
    assert build["paged_kv_cache"] and build["remove_input_padding"] and build["tokens_per_block"] == 8
    session = load_session(engine_dir, "cpu", max_tokens_in_paged_kv_cache=64)
    prompts = mixed_prompts(5, seed=2, longest=20)
    sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
    outputs, scheduler = run_all(session, prompts, [sampling] * len(prompts), max_in_flight=3)
    assert scheduler.preemptions > 0
    assert outputs == [alone(session, prompt, sampling) for prompt in prompts]
    assert session.block_manager.free_blocks == session.block_manager.num_blocks


@pytest.mark.parametrize("plugins", [False, True])
def test_chunked_prefill_keeps_every_token_within_the_step_budget(paged_engine, tiny_engine_factory, plugins):
    """--enable_chunked_context: prompts of up to 30 tokens read in chunks of a 6- or 12-token
    step budget (decode tokens first; a chunk continues on cached K/V: the context FMHA
    kernel with the plugins, the reference attention without). Greedy, seeded-sampled
    and penalized requests give their tokens alone; a small pool still preempts and
    leaks no block."""
    engine_dir = paged_engine if not plugins else tiny_engine_factory(
        *TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "4", "--max_input_len", "32",
        "--max_output_len", "8", "--use_inflight_batching", "--tokens_per_block", "4", "--random_seed", "6")
    session = load_session(engine_dir, "cpu", max_tokens_in_paged_kv_cache=64)
    prompts = mixed_prompts(5, seed=6) if plugins else mixed_prompts(12, seed=4)
    samplings = [SamplingConfig(max_new_tokens=8, end_id=-1),
                 SamplingConfig(max_new_tokens=8, top_k=0, temperature=1.2, random_seed=11, end_id=-1),
                 SamplingConfig(max_new_tokens=8, presence_penalty=0.8, repetition_penalty=1.3, end_id=-1)]
    samplings = [samplings[i % 3] for i in range(len(prompts))]
    budget = 12 if plugins else 6  # fewer steps where the kernels are interpreted
    outputs, scheduler = run_all(session, prompts, samplings, max_in_flight=4, tokens_per_step=budget,
                                 chunked_prefill=True)
    assert max(scheduler.step_tokens) <= budget + 3  # plus at most one token per other prefilling sequence
    assert sum(scheduler.step_tokens) >= sum(map(len, prompts))
    assert scheduler.preemptions > 0 and session.block_manager.free_blocks == session.block_manager.num_blocks
    assert outputs == [alone(session, prompt, sampling) for prompt, sampling in zip(prompts, samplings)]


def test_seeded_sampling_does_not_depend_on_the_batch(paged_engine):
    session = load_session(paged_engine, "cpu")
    prompts = mixed_prompts(6, seed=3)
    samplings = [SamplingConfig(max_new_tokens=12, top_k=0, temperature=1.3, random_seed=100 + i, end_id=-1)
                 for i in range(len(prompts))]
    together, _ = run_all(session, prompts, samplings, max_in_flight=4)
    assert together == [alone(session, prompt, sampling) for prompt, sampling in zip(prompts, samplings)]
    reseeded = [SamplingConfig(max_new_tokens=12, top_k=0, temperature=1.3, random_seed=7, end_id=-1)] * 6
    assert run_all(session, prompts, reseeded, max_in_flight=4)[0] != together


def test_a_stream_stopped_early_frees_its_blocks(paged_engine):
    session = load_session(paged_engine, "cpu", max_in_flight=2)  # two of the four requests still wait
    stream = session.stream(mixed_prompts(4, seed=4), [SamplingConfig(max_new_tokens=10, end_id=-1)] * 4)
    next(stream)
    next(stream)
    assert session.block_manager.free_blocks < session.block_manager.num_blocks
    stream.close()
    assert session.block_manager.free_blocks == session.block_manager.num_blocks
    assert not session.has_work


def test_requests_beyond_the_limits_are_refused(paged_engine):
    session = load_session(paged_engine, "cpu", max_tokens_in_paged_kv_cache=32)
    sampling = SamplingConfig(max_new_tokens=16, end_id=-1)
    with pytest.raises(GlmEngineError, match="over the engine's max_input_len 32"):
        session.generate([[5] * 33], sampling)
    with pytest.raises(GlmEngineError, match="more than the pool's 32"):
        session.generate([[5] * 20], sampling)
    with pytest.raises(GlmEngineError, match="exceeds the engine's max_output_len 16"):
        session.generate([[5]], SamplingConfig(max_new_tokens=17))
    assert session.block_manager.free_blocks == session.block_manager.num_blocks


def test_remove_input_padding_packs_what_padding_would_compute(tiny_engine_factory, monkeypatch):
    prompts = mixed_prompts(3, seed=5)
    sampling = SamplingConfig(max_new_tokens=6, end_id=-1)
    results = {}
    for flag in ([], ["--remove_input_padding"]):
        engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_input_len", "32",
                                         "--max_output_len", "8", "--random_seed", "7", *flag)
        session = load_session(engine_dir, "cpu")
        forwarded = []
        original = session.runner.forward

        def spy(block_tables, cached, new_tokens, logit_rows=None, _original=original, _seen=forwarded):
            _seen.append(sum(map(len, new_tokens)))
            return _original(block_tables, cached, new_tokens, logit_rows)

        monkeypatch.setattr(session.runner, "forward", spy)
        results[bool(flag)] = (session.generate(prompts, sampling), forwarded[0])
    assert results[False][0] == results[True][0]
    assert results[True][1] == sum(map(len, prompts))
    assert results[False][1] == len(prompts) * max(map(len, prompts))


@pytest.mark.parametrize("flags, message", [
    (["--tokens_per_block", "16"], "--tokens_per_block sets the paged KV cache's block size"),
    (["--paged_kv_cache", "--tokens_per_block", "12"], "--tokens_per_block must be a power of two"),
])
def test_bad_serving_flags_are_refused(tmp_path, flags, message):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, *flags)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_pool_size_flags_need_a_paged_engine(tiny_engine_factory):
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "8")
    with pytest.raises(GlmEngineError, match="this engine was built without --paged_kv_cache"):
        load_session(engine_dir, "cpu", max_tokens_in_paged_kv_cache=64)


@pytest.mark.parametrize("mode", ["throughput", "rate"])
def test_benchmark_serving_modes_complete_every_request(paged_engine, tmp_path, mode):
    sampled = ["--top_k", "0", "--temperature", "0.8", "--top_p", "0.9", "--repetition_penalty", "1.1"]
    result = run_tool("benchmark.py", "--engine_dir", paged_engine, "--mode", mode, "--num_requests", "9",
                      "--input_len_range", "3", "20", "--output_len", "5",
                      *(["--request_rate", "200"] if mode == "rate" else sampled),
                      "--max_tokens_in_paged_kv_cache", "64", "--hf", "--hf_num_requests", "4", "--hf_batch_size",
                      "2", "--device", "cpu", "--output_json", tmp_path / "serving.json")
    assert result.returncode == 0, result.stderr
    engine_row, hf_row = json.loads((tmp_path / "serving.json").read_text())["rows"]
    assert engine_row["requests"] == 9 and engine_row["output_tokens_per_s"] > 0
    assert engine_row["blocks_free_at_end"] == engine_row["blocks_total"] == 16
    assert engine_row["ttft_s"]["p99"] >= engine_row["ttft_s"]["p50"] > 0
    assert hf_row["side"] == "hf_eager_static" and hf_row["requests"] == 4
    assert "output tok/s" in result.stdout


def test_run_py_takes_more_prompts_than_max_batch_size(paged_engine, tmp_path):
    """6 prompts on engines of max_batch_size 4 (static) and 2 (in flight): the prompts
    beyond the batch wait in the queue, and each gets its alone tokens."""
    prompts = mixed_prompts(6, seed=8)
    (tmp_path / "prompts.csv").write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    static = run_tool("run.py", "--engine_dir", paged_engine, "--input_tokens", tmp_path / "prompts.csv",
                      "--max_output_len", "4", "--device", "cpu", "--output_csv", tmp_path / "static.csv")
    assert static.returncode == 0, static.stderr
    roomy = load_session(paged_engine, "cpu")
    sampling = SamplingConfig(max_new_tokens=4, end_id=roomy.model_config.eos_token_id)
    written = [list(map(int, line.split(","))) for line in (tmp_path / "static.csv").read_text().split()]
    assert written == [alone(roomy, prompt, sampling) for prompt in prompts]
    engine_dir = tmp_path / "inflight"
    built = run_tool("build.py", "--output_dir", engine_dir, *TINY_SHAPE_FLAGS, "--dtype", "float32",
                     "--max_batch_size", "2", "--max_input_len", "32", "--max_output_len", "8",
                     "--use_inflight_batching", "--random_seed", "5", "--log_level", "error")
    assert built.returncode == 0, built.stderr
    result = run_tool("run.py", "--engine_dir", engine_dir, "--input_tokens", tmp_path / "prompts.csv",
                      "--max_output_len", "4", "--device", "cpu", "--output_csv", tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    written = [list(map(int, line.split(","))) for line in (tmp_path / "out.csv").read_text().split()]
    session = load_session(engine_dir, "cpu")
    sampling = SamplingConfig(max_new_tokens=4, end_id=session.model_config.eos_token_id)
    assert written == [alone(session, prompt, sampling) for prompt in prompts]


@pytest.mark.parametrize("options, message", [
    ({"kv_cache_free_gpu_mem_fraction": 0.5}, "on the CPU use --max_tokens_in_paged_kv_cache"),
    ({"kv_cache_free_gpu_mem_fraction": 1.5}, "must be within (0, 1]"),
    ({"max_tokens_in_paged_kv_cache": 3}, "under one block of 4 tokens"),
])
def test_bad_pool_sizes_are_refused(paged_engine, options, message):
    with pytest.raises(GlmEngineError, match=re.escape(message)):
        load_session(paged_engine, "cpu", **options)


def test_scheduler_limits_must_be_positive(paged_engine):
    session = load_session(paged_engine, "cpu")
    for options in ({"max_in_flight": 0}, {"tokens_per_step": 0}):
        with pytest.raises(GlmEngineError, match="must be at least 1"):
            session.configure_scheduler(**options)


def test_max_tokens_per_step_bounds_the_prompts_admitted_per_step(paged_engine, tmp_path):
    steps = {}
    for budget in ("1", "1000"):
        result = run_tool("benchmark.py", "--engine_dir", paged_engine, "--mode", "throughput", "--num_requests",
                          "6", "--input_len_range", "3", "10", "--output_len", "3", "--max_tokens_per_step", budget,
                          "--device", "cpu", "--output_json", tmp_path / f"{budget}.json")
        assert result.returncode == 0, result.stderr
        steps[budget] = json.loads((tmp_path / f"{budget}.json").read_text())["rows"][0]["prefill_steps"]["count"]
    assert steps["1"] == 6  # a prompt over the budget runs alone: one per step
    assert steps["1000"] < 6


# Run with torch unimportable: the scheduler plans, records tokens and retires sequences in
# plain Python (a stand-in sampler takes back the penalty slot; namespaces stand in for
# SamplingConfig, whose module imports torch).
WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None
from types import SimpleNamespace
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.scheduler import SampledTokens, Scheduler, Sequence

class Slots:
    given_back = []
    def give_back(self, slot):
        self.given_back.append(slot)

def sampling(**options):
    return SimpleNamespace(**{"end_id": 2, "max_new_tokens": 3, "output_log_probs": False, **options})

manager = BlockManager(16, 4)
scheduler = Scheduler(manager, 4, tokens_per_step=8, chunked_prefill=True, sampler=Slots())
scheduler.add(Sequence(0, [5] * 10, sampling(output_log_probs=True), seed=0))
scheduler.add(Sequence(1, [6] * 3, sampling(), seed=0))
steps = []
for tokens in ([9], [7, 2], [8], [9]):
    plan = scheduler.schedule()
    for sequence in plan.sequences:
        if sequence.index == 1:
            sequence.penalty_slot = 3  # as the sampler gives a penalized sequence
    result = scheduler.postprocess(plan, SampledTokens(tokens, [-float(t) for t in tokens]))
    steps.append([plan.reading, result.tokens, result.log_probs, result.finished])
print(json.dumps({"steps": steps, "slots": Slots.given_back, "free": manager.free_blocks,
                  "torch": [name for name, module in sys.modules.items() if module and name.startswith("torch")]}))
"""


def test_the_scheduler_runs_without_torch():
    """A 10-token prompt read in chunks of an 8-token budget, then decoded to its length
    limit; a second request ends at its end token, its blocks and penalty slot given back."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True)
    seen = json.loads(result.stdout)
    assert seen["torch"] == []
    assert seen["steps"] == [[[True], [], [], []],
                             [[False, False], [[0, 7]], [[0, -7.0]], [1]],
                             [[False], [[0, 8]], [[0, -8.0]], []],
                             [[False], [[0, 9]], [[0, -9.0]], [0]]]
    assert seen["slots"] == [3] and seen["free"] == 16
