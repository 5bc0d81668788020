"""Repetition, presence and frequency penalties and min_length (issue 12's first
part): greedy tokens equal to Hugging Face generate with the same setting, in static
batches and under in-flight batching with preemption forced, mixed with plain
requests in one batch; penalty slots all given back."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from glm_engine import GlmEngineError
from glm_engine.runtime.sampling import SamplingConfig
from model import load_session
from test_model import build_engine, oracle, random_prompt
from test_scheduler import run_all

END = 2


def generate(session, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    """Each prompt's generated ids (a static batch)."""
    return [output.token_ids for output in session.generate(prompts, sampling)]


class OpenAIPenalties(LogitsProcessor):
    """Presence and frequency penalties over the generated tokens, as OpenAI defines them
    (Hugging Face has no such processor): the test's reference, one row at a time."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length:]):
            counts = torch.bincount(ids, minlength=scores.shape[1]).to(scores.dtype)
            scores[row] -= self.presence * (counts > 0) + self.frequency * counts
        return scores


def hf_greedy(model, prompt: list[int], sampling: SamplingConfig) -> list[int]:
    end = sampling.end_id
    processors = LogitsProcessorList()
    if sampling.presence_penalty or sampling.frequency_penalty:
        processors.append(OpenAIPenalties(len(prompt), sampling.presence_penalty, sampling.frequency_penalty))
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                   repetition_penalty=sampling.repetition_penalty,
                                   min_new_tokens=sampling.min_length or None, logits_processor=processors,
                                   eos_token_id=end, pad_token_id=0)[0, len(prompt):].tolist()
    return generated[:generated.index(end)] if end in generated else generated


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("safetensors", seed=11)


@pytest.fixture(scope="module")
def reference(model_dir):
    return oracle(model_dir)


SETTINGS = [dict(repetition_penalty=1.8), dict(repetition_penalty=0.7), dict(presence_penalty=1.5),
            dict(frequency_penalty=0.8), dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: ",".join(f"{k}={v}" for k, v in setting.items()))
def test_static_batch_matches_hugging_face(model_dir, reference, tmp_path, setting):
    session = build_engine(model_dir, tmp_path / "engine")
    prompts = [random_prompt(length, seed) for seed, length in enumerate([3, 17, 9])]
    sampling = SamplingConfig(max_new_tokens=24, end_id=END, **setting)
    outputs = generate(session, prompts, sampling)
    for prompt, output in zip(prompts, outputs):
        assert output == hf_greedy(reference, prompt, sampling)
    plain = generate(session, prompts, SamplingConfig(max_new_tokens=24, end_id=END))
    assert outputs != plain  # the setting changed the tokens


def test_min_length_holds_the_end_token_back(model_dir, reference, tmp_path):
    session = build_engine(model_dir, tmp_path / "engine")
    prompt = random_prompt(9, 3)
    end = generate(session, [prompt], SamplingConfig(max_new_tokens=8, end_id=-1))[0][3]  # greedy's 4th token
    assert len(generate(session, [prompt], SamplingConfig(max_new_tokens=24, end_id=end))[0]) <= 3
    sampling = SamplingConfig(max_new_tokens=24, end_id=end, min_length=12)
    output = generate(session, [prompt], sampling)[0]
    assert len(output) >= 12 and output == hf_greedy(reference, prompt, sampling)


def test_in_flight_with_preemption_mixes_penalized_and_plain_requests(model_dir, reference, tmp_path):
    build_engine(model_dir, tmp_path / "engine", "float32", "--use_inflight_batching", "--max_batch_size", "4",
                 "--tokens_per_block", "8")
    session = load_session(tmp_path / "engine", "cpu", max_tokens_in_paged_kv_cache=96)  # too small for 4 at once
    prompts = [random_prompt(length, seed) for seed, length in enumerate([5, 30, 12, 22, 8, 17])]
    samplings = [SamplingConfig(max_new_tokens=20, end_id=END, min_length=i, **SETTINGS[i % len(SETTINGS)]) if i % 2 else
                 SamplingConfig(max_new_tokens=20, end_id=END) for i in range(len(prompts))]
    outputs, scheduler = run_all(session, prompts, samplings, max_in_flight=4)
    assert scheduler.preemptions > 0
    assert outputs == [hf_greedy(reference, p, s) for p, s in zip(prompts, samplings)]
    assert session.block_manager.free_blocks == session.block_manager.num_blocks
    assert sorted(scheduler.sampler.history.free) == list(range(scheduler.max_in_flight))


def test_penalty_slots_are_given_back(model_dir, tmp_path):
    session = build_engine(model_dir, tmp_path / "engine")
    scheduler = session.scheduler
    for index in range(3):
        session.add_request(random_prompt(6, index), SamplingConfig(max_new_tokens=5, repetition_penalty=1.5))
    while session.has_work:
        session.step()
    assert sorted(scheduler.sampler.history.free) == list(range(scheduler.max_in_flight))


@pytest.mark.parametrize("setting, message", [(dict(repetition_penalty=0.0), "repetition_penalty"),
                                              (dict(presence_penalty=float("nan")), "presence_penalty"),
                                              (dict(frequency_penalty=float("inf")), "frequency_penalty"),
                                              (dict(min_length=-1), "min_length")])
def test_bad_settings_are_refused(setting, message):
    with pytest.raises(GlmEngineError, match=message):
        SamplingConfig(max_new_tokens=4, **setting)


def test_bad_words_match_hugging_face(model_dir, reference, tmp_path):
    """Single tokens are never generated; a longer word's last token is banned only
    after the rest of the word (across the prompt's end too)."""
    session = build_engine(model_dir, tmp_path / "engine")
    prompts = [random_prompt(length, seed) for seed, length in enumerate([4, 11])]
    plain = generate(session, prompts, SamplingConfig(max_new_tokens=16, end_id=END))
    words = ((plain[0][2],), (plain[1][4],), (plain[0][6], plain[0][7]), (prompts[1][-1], plain[1][0]))
    sampling = SamplingConfig(max_new_tokens=16, end_id=END, bad_words=words)
    outputs = generate(session, prompts, sampling)
    assert outputs != plain
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            generated = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                           bad_words_ids=[list(word) for word in words], eos_token_id=END,
                                           pad_token_id=0)[0, len(prompt):].tolist()
        assert output == (generated[:generated.index(END)] if END in generated else generated)


def test_log_probs_are_those_of_the_chosen_tokens(model_dir, reference, tmp_path):
    session = build_engine(model_dir, tmp_path / "engine")
    prompt = random_prompt(7, 2)
    greedy = SamplingConfig(max_new_tokens=6, end_id=-1, output_log_probs=True)
    sampled = SamplingConfig(max_new_tokens=6, end_id=-1, output_log_probs=True, top_k=0, temperature=0.7,
                             random_seed=3)
    results = session.generate([prompt, prompt], [greedy, sampled])
    outputs, log_probs = [result.token_ids for result in results], [result.log_probs for result in results]
    for output, values, temperature in zip(outputs, log_probs, (1.0, 0.7)):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1] / temperature
        expected = logits.log_softmax(-1).gather(1, torch.tensor(output)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(values), expected, atol=1e-4)
    assert session.generate([prompt], [SamplingConfig(max_new_tokens=3, end_id=-1)])[0].log_probs == []


def test_run_py_flags_reach_the_runtime(model_dir, tmp_path):
    """run.py's penalty, bad-word and log-prob flags: the ids change as the API's do, and
    --output_log_probs writes one object per prompt."""
    import json

    from conftest import assert_one_line_error, run_tool

    session = build_engine(model_dir, tmp_path / "engine")
    (tmp_path / "p.csv").write_text("5,6,7,8\n")

    def run(*flags):
        result = run_tool("run.py", "--engine_dir", tmp_path / "engine", "--input_tokens", tmp_path / "p.csv",
                          "--max_output_len", "10", "--output_csv", tmp_path / "o.csv", *flags)
        assert result.returncode == 0, result.stderr
        return [int(token) for token in (tmp_path / "o.csv").read_text().strip().split(",")]

    expected = generate(session, [[5, 6, 7, 8]], SamplingConfig(max_new_tokens=10, repetition_penalty=1.7,
                                                                presence_penalty=0.4))[0]
    assert run("--repetition_penalty", "1.7", "--presence_penalty", "0.4") == expected
    plain = run("--output_log_probs", tmp_path / "lp.json")
    records = json.loads((tmp_path / "lp.json").read_text())
    assert len(records) == 1 and len(records[0]["log_probs"]) == len(plain)
    assert abs(records[0]["cum_log_prob"] - sum(records[0]["log_probs"])) < 1e-9
    from glm_engine.text.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_dir(tmp_path / "engine")
    words = [tokenizer.decode([token]) for token in plain]
    word = next(text for token, text in zip(plain, words) if text and tokenizer.encode(text, add_prefix=False) == [token])
    banned = tokenizer.encode(word, add_prefix=False)[0]
    assert banned in plain and banned not in run("--bad_words", word)
    bad = run_tool("run.py", "--engine_dir", tmp_path / "engine", "--input_tokens", tmp_path / "p.csv",
                   "--repetition_penalty", "0")
    assert_one_line_error(bad, "repetition_penalty must be a positive finite number")


def test_every_sampling_flag_reaches_the_sampling_config():
    """run.py's (and benchmark.py's) generation flags, each to its SamplingConfig field."""
    import run
    from glm_engine.tools.cli import sampling_options

    class Words:  # a tokenizer stand-in: one id per character
        @staticmethod
        def encode(text: str, add_prefix: bool = True) -> list[int]:
            return [ord(character) for character in text]

    args = run.parse_arguments(["--temperature", "0.5", "--top_k", "7", "--top_p", "0.3", "--repetition_penalty", "1.2",
                                "--presence_penalty", "0.4", "--frequency_penalty", "0.6", "--min_length", "3",
                                "--bad_words", "ab", "--stop_words", "xy", "--num_beams", "3", "--length_penalty",
                                "0.5", "--early_stopping", "never", "--num_return_sequences", "2"])
    assert sampling_options(args, Words()) == {
        "temperature": 0.5, "top_k": 7, "top_p": 0.3, "repetition_penalty": 1.2, "presence_penalty": 0.4,
        "frequency_penalty": 0.6, "min_length": 3, "bad_words": ((97, 98),), "stop_words": ("xy",), "num_beams": 3,
        "length_penalty": 0.5, "early_stopping": "never", "num_return_sequences": 2}
