"""Beam search against Hugging Face generate's: the same tokens and scores of every returned
beam for 2 and 4 beams (1 beam is greedy), with and without a length penalty, each
early_stopping setting."""

from __future__ import annotations

import pytest
import torch

from glm_engine.runtime.beam_search import BeamSearch
from test_scheduler import run_all
from test_model import oracle, random_prompt


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_factory):
    return oracle(tiny_checkpoint_factory("safetensors", seed=17))


def our_beam_search(model, prompt: list[int], search: BeamSearch) -> list[tuple[list[int], float]]:
    """BeamSearch driven by the reference model's log-probabilities (full recompute)."""
    with torch.no_grad():
        rows = model(torch.tensor([prompt])).logits[:, -1].float().log_softmax(-1)
        while True:
            search.step(rows)
            if search.done:
                return search.results(search.num_beams)
            batch = torch.tensor([prompt + beam.output for beam in search.beams])
            rows = model(batch).logits[:, -1].float().log_softmax(-1)


def hf_beam_search(model, prompt: list[int], num_beams: int, end_id: int, max_new_tokens: int, **setting):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=num_beams, num_return_sequences=num_beams,
                             do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=end_id if end_id >= 0 else None, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **setting)
    results = []
    for sequence, score in zip(out.sequences, out.sequences_scores):
        tokens = sequence[len(prompt):].tolist()
        if end_id in tokens:
            tokens = tokens[:tokens.index(end_id)]
        else:
            while tokens and tokens[-1] == 0 and len(tokens) > max_new_tokens:
                tokens.pop()
        results.append((tokens, float(score)))
    return results


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("setting", [{}, {"length_penalty": 0.0}, {"length_penalty": 2.0, "early_stopping": True},
                                     {"length_penalty": 1.5, "early_stopping": "never"}], ids=str)
def test_best_beams_and_scores_match_hugging_face(reference, num_beams, setting):
    for seed, length in ((1, 6), (2, 13)):
        prompt = random_prompt(length, seed)
        # An end token the model reaches within the limit for some beams: greedy's 5th token.
        with torch.no_grad():
            greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        end_id = greedy[4]
        search = BeamSearch(num_beams, setting.get("length_penalty", 1.0), setting.get("early_stopping", False),
                            end_id, len(prompt), 12)
        ours = our_beam_search(reference, prompt, search)
        theirs = hf_beam_search(reference, prompt, num_beams, end_id, 12, **setting)
        assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]
        assert torch.allclose(torch.tensor([score for _, score in ours]),
                              torch.tensor([score for _, score in theirs]), atol=1e-4)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("safetensors", seed=17)


def end_token(reference, prompt: list[int]) -> int:
    with torch.no_grad():
        greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                    eos_token_id=None)[0, len(prompt):].tolist()
    return greedy[4]


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_engine_beams_match_hugging_face_static_batch(model_dir, reference, tmp_path, num_beams, length_penalty):
    from glm_engine.runtime.sampling import SamplingConfig
    from test_model import build_engine

    session = build_engine(model_dir, tmp_path / "engine", "float32", "--max_batch_size", "8",
                           "--paged_kv_cache", "--tokens_per_block", "4")
    prompts = [random_prompt(6, 1), random_prompt(13, 2)]
    samplings = [SamplingConfig(max_new_tokens=12, end_id=end_token(reference, prompt), num_beams=num_beams,
                                length_penalty=length_penalty, num_return_sequences=num_beams) for prompt in prompts]
    results = [output.beams for output in session.generate(prompts, samplings)]
    for prompt, sampling, ours in zip(prompts, samplings, results):
        theirs = hf_beam_search(reference, prompt, num_beams, sampling.end_id, 12, length_penalty=length_penalty)
        assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]
        assert torch.allclose(torch.tensor([s for _, s in ours]), torch.tensor([s for _, s in theirs]), atol=1e-4)
    assert session.block_manager.free_blocks == session.block_manager.num_blocks


def test_engine_beams_in_flight_with_preemption(model_dir, reference, tmp_path):
    from glm_engine.runtime.sampling import SamplingConfig
    from model import load_session
    from test_model import build_engine

    build_engine(model_dir, tmp_path / "engine", "float32", "--use_inflight_batching", "--max_batch_size", "6",
                 "--tokens_per_block", "4")
    session = load_session(tmp_path / "engine", "cpu", max_tokens_in_paged_kv_cache=112)
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 13, 9, 11])]
    # Requests that never end early, so that the beams grow until the pool runs short.
    samplings = [SamplingConfig(max_new_tokens=12, end_id=-1, num_beams=(2, 4, 1, 2)[i])
                 for i, prompt in enumerate(prompts)]
    best, scheduler = run_all(session, prompts, samplings, max_in_flight=6)
    assert scheduler.preemptions > 0
    for prompt, sampling, tokens in zip(prompts, samplings, best):
        if sampling.num_beams == 1:
            with torch.no_grad():
                expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                              eos_token_id=None if sampling.end_id < 0 else sampling.end_id,
                                              pad_token_id=0)[0, len(prompt):].tolist()
            expected = expected[:expected.index(sampling.end_id)] if sampling.end_id in expected else expected
        else:
            expected = hf_beam_search(reference, prompt, sampling.num_beams, sampling.end_id, 12)[0][0]
        assert tokens == expected
    assert session.block_manager.free_blocks == session.block_manager.num_blocks


def test_beams_share_their_prompt_blocks(model_dir, tmp_path):
    """After the first step, 4 beams of a 13-token prompt hold its 3 full blocks once
    (a block of 4 tokens), plus one block each for the partial last block and new tokens."""
    from glm_engine.runtime.sampling import SamplingConfig
    from test_model import build_engine

    session = build_engine(model_dir, tmp_path / "engine", "float32", "--max_batch_size", "8", "--paged_kv_cache",
                           "--tokens_per_block", "4")
    scheduler = session.scheduler
    session.add_request(random_prompt(13, 2), SamplingConfig(max_new_tokens=12, end_id=-1, num_beams=4))
    session.step()  # the prompt, then the fork into 4 beams
    tables = [sequence.block_table for sequence in scheduler.running]
    assert len(tables) == 4 and all(table[:3] == tables[0][:3] for table in tables)
    shared = tables[0][3]
    plan = scheduler.schedule()  # each beam writes position 13, in the shared 4th block: copied for 3 of them
    assert len(plan.block_copies) == 3 and {source for source, _ in plan.block_copies} == {shared}
    tables = [sequence.block_table for sequence in scheduler.running]
    assert all(table[:3] == tables[0][:3] for table in tables) and len({table[3] for table in tables}) == 4
    manager = session.block_manager
    assert manager.num_blocks - manager.free_blocks == 3 + 4
    session.runner.kv_cache.copy_blocks(plan.block_copies)
    logits, greedy = session.runner.execute(plan.block_tables, plan.cached, plan.new_tokens)
    scheduler.postprocess(plan, scheduler.sampler.sample(plan, logits, greedy))
    scheduler.release_all()
    assert manager.free_blocks == manager.num_blocks


def test_run_py_and_summarize_with_beams(model_dir, reference, tmp_path):
    from conftest import REPO_ROOT, assert_one_line_error, run_tool
    from test_model import build_engine

    build_engine(model_dir, tmp_path / "engine", "float32", "--max_batch_size", "8", "--max_input_len", "64")
    prompt = random_prompt(9, 4)
    (tmp_path / "p.csv").write_text(",".join(map(str, prompt)) + "\n")
    common = ["--engine_dir", tmp_path / "engine", "--input_tokens", tmp_path / "p.csv", "--max_output_len", "10",
              "--output_csv", tmp_path / "o.csv", "--num_beams", "4"]
    result = run_tool("run.py", *common, "--num_return_sequences", "2")
    assert result.returncode == 0, result.stderr
    lines = [[int(token) for token in line.split(",")] for line in (tmp_path / "o.csv").read_text().split()]
    theirs = hf_beam_search(reference, prompt, 4, 2, 10)
    assert lines == [tokens for tokens, _ in theirs[:2]]
    assert "Output beam 1 (score" in result.stdout
    assert_one_line_error(run_tool("run.py", *common, "--streaming"), "drop --streaming or --num_beams")
    assert_one_line_error(run_tool("run.py", *common, "--top_k", "0"), "beam search with sampling")
    summary = run_tool("summarize.py", "--engine_dir", tmp_path / "engine", "--dataset_path",
                       REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl", "--batch_size", "2", "--max_ite", "1",
                       "--output_len", "8", "--max_input_len", "48", "--data_type", "fp32", "--test_hf",
                       "--num_beams", "2")
    assert summary.returncode == 0, summary.stderr
    assert "Token agreement: 100.0% of outputs identical" in summary.stdout


def test_benchmark_serving_with_beams(model_dir, tmp_path):
    import json

    from conftest import assert_one_line_error, run_tool
    from test_model import build_engine

    build_engine(model_dir, tmp_path / "engine", "float32", "--use_inflight_batching", "--max_batch_size", "4")
    common = ["benchmark.py", "--engine_dir", tmp_path / "engine", "--num_beams", "2", "--output_len", "5",
              "--device", "cpu"]
    result = run_tool(*common, "--mode", "throughput", "--num_requests", "5", "--input_len_range", "3", "12",
                      "--output_json", tmp_path / "beams.json")
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "beams.json").read_text())["rows"][0]
    assert row["requests"] == 5 and row["blocks_free_at_end"] == row["blocks_total"]
    assert_one_line_error(run_tool(*common, "--input_len", "8"), "latency mode")
