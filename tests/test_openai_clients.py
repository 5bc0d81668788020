"""serve.py as OpenAI's clients use it: the openai client (sync, async fan-out, the
documented streaming loops, include_usage) and langchain-openai's ChatOpenAI and
OpenAI against a real serve.py on a tiny engine, each answer equal to the engine's own
tokens for the same request (an in-process session); the request fields of OpenAI's
current schemas and vLLM's extras, each implemented or refused with a 400 naming it;
log-probs, logit_bias, response_format, prefix caching and /tokenize, /detokenize."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from conftest import TINY_SHAPE_FLAGS
from test_server import Server

openai = pytest.importorskip("openai")

PROMPTS = ["北京市教育资源丰富", "hello world", "a", "今天天气很好，我们去公园"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "北京"}]


@pytest.fixture(scope="module")
def engine(tiny_engine_factory):
    # Blocks of 8 tokens: prompts of this size share whole blocks, which prefix caching reuses.
    return tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "8",
                               "--max_input_len", "64", "--max_output_len", "24", "--use_inflight_batching",
                               "--tokens_per_block", "8", "--random_seed", "3")


@pytest.fixture(scope="module")
def server(engine):
    running = Server(engine)
    yield running
    result = running.stop()
    assert result.returncode == 0, result.stderr


class Engine:
    """The engine in this process (no prefix caching): what every answer must equal. Its
    ops are the server's (the reference ops on the CPU, not Triton's interpreter)."""

    def __init__(self, engine_dir) -> None:
        from glm_engine.text.tokenizer import ChatGLMTokenizer
        from model import load_session

        self.tokenizer = ChatGLMTokenizer.from_dir(engine_dir)
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("TRITON_INTERPRET", raising=False)
            self.session = load_session(engine_dir, "cpu", tokenizer=self.tokenizer)

    def ids(self, prompt: str | list[dict]) -> list[int]:
        from glm_engine.text.prompts import chat_prompt_ids

        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return chat_prompt_ids(self.tokenizer, [(message["role"], message["content"]) for message in prompt])

    def outputs(self, prompts: list, max_tokens: int, **sampling) -> list:
        """The RequestOutputs of greedy (unless told) requests, run together."""
        from glm_engine.runtime.sampling import SamplingConfig

        ids = [prompt if prompt and isinstance(prompt[0], int) else self.ids(prompt) for prompt in prompts]
        config = SamplingConfig(max_new_tokens=max_tokens, end_id=self.session.limits.end_id, **sampling)
        return self.session.generate(ids, config)

    def output(self, prompt: str | list[dict] | list[int], max_tokens: int, **sampling):
        return self.outputs([prompt], max_tokens, **sampling)[0]

    def texts(self, prompts: list, max_tokens: int, **sampling) -> list[str]:
        return [self.tokenizer.decode(output.token_ids) for output in self.outputs(prompts, max_tokens, **sampling)]

    def text(self, prompt: str | list[dict] | list[int], max_tokens: int, **sampling) -> str:
        return self.texts([prompt], max_tokens, **sampling)[0]


@pytest.fixture(scope="module")
def local(engine) -> Engine:
    return Engine(engine)


def test_sync_client_completions_and_chat_equal_the_engine(server, local):
    client = server.client
    for prompt, text in zip(PROMPTS[:2], local.texts(PROMPTS[:2], 10)):
        assert client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                         temperature=0).choices[0].text == text
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=9, temperature=0)
    assert chat.choices[0].message.content == local.text(CHAT, 9)
    assert chat.usage.completion_tokens == len(local.output(CHAT, 9).token_ids)
    # OpenAI's newer shapes of the same chat: a developer message, content as text parts.
    parts = [{"role": "developer", "content": CHAT[0]["content"]},
             {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"][:1]},
                                          {"type": "text", "text": CHAT[1]["content"][1:]}]}]
    same = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=9, temperature=0)
    assert same.choices[0].message.content == chat.choices[0].message.content


def test_prompt_lists_give_a_choice_set_per_prompt(server, local):
    """prompt as a list of strings, a token list or a list of token lists; n choices per
    prompt, indexed prompt * n + choice; echo puts each prompt's text first."""
    ids = [local.ids(prompt) for prompt in PROMPTS[:3]]
    expected = local.texts(PROMPTS[:3], 6)
    for prompt in (PROMPTS[:3], ids):
        answer = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [choice.index for choice in answer.choices] == list(range(6))
        assert [choice.text for choice in answer.choices] == [text for text in expected for _ in range(2)]
        assert answer.usage.prompt_tokens == sum(map(len, ids))
    single = server.client.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0)
    assert single.choices[0].text == expected[1]
    echoed = server.client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=6, temperature=0,
                                              echo=True)
    assert [choice.text for choice in echoed.choices] == [p + t for p, t in zip(PROMPTS[:2], expected)]
    streamed = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                                echo=True, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == PROMPTS[1] + expected[1]


def test_async_fan_out_equals_the_engine(server, local):
    jobs = [(prompt, 8) for prompt in PROMPTS * 2]

    async def fan_out() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        async with client:
            answers = await asyncio.gather(*(client.completions.create(model="tiny", prompt=prompt, max_tokens=tokens,
                                                                       temperature=0) for prompt, tokens in jobs))
        return [answer.choices[0].text for answer in answers]

    assert asyncio.run(fan_out()) == local.texts(PROMPTS, 8) * 2


def test_the_documented_streaming_loops_and_include_usage(server, local):
    """`for chunk in stream: chunk.choices[0].delta.content` (OpenAI's README) works: no
    chunk without choices unless include_usage asks for the last one, which has the usage."""
    text = ""
    for chunk in server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=9, temperature=0,
                                                       stream=True):
        text += chunk.choices[0].delta.content or ""
    assert text == local.text(CHAT, 9)
    text = ""
    for chunk in server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=9, temperature=0,
                                                  stream=True):
        text += chunk.choices[0].text
    assert text == local.text(PROMPTS[0], 9)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=9, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert all(chunk.choices and chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(local.output(CHAT, 9).token_ids)


def test_langchain_chat_openai_and_openai(server, local):
    langchain_openai = pytest.importorskip("langchain_openai")
    options = {"model": "tiny", "base_url": server.url + "/v1", "api_key": "none", "temperature": 0, "max_tokens": 8,
               "max_retries": 0}
    chat = langchain_openai.ChatOpenAI(**options)
    expected = local.texts([[{"role": "user", "content": prompt}] for prompt in PROMPTS[:2]], 8)
    assert chat.invoke(PROMPTS[0]).content == expected[0]
    assert "".join(chunk.content for chunk in chat.stream(PROMPTS[1])) == expected[1]
    assert [message.content for message in chat.batch(PROMPTS[:2])] == expected
    llm = langchain_openai.OpenAI(**options)
    expected = local.texts(PROMPTS[:2], 8)
    assert llm.invoke(PROMPTS[0]) == expected[0]
    assert "".join(llm.stream(PROMPTS[1])) == expected[1]
    assert llm.batch(PROMPTS[:2]) == expected


def test_log_probs_are_the_engines(server, local):
    """completions' logprobs (top 3) and chat's logprobs with top_logprobs (5): each
    token's log-prob and the alternatives are the engine's own, sampled rows included."""
    from glm_engine.serving.openai_server import TokenTexts

    texts = TokenTexts(local.tokenizer)
    expected = local.output(PROMPTS[0], 8, output_log_probs=True, top_log_probs=3)
    answer = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                              logprobs=3).choices[0].logprobs
    assert answer.tokens == [texts.text(token) for token in expected.token_ids]
    assert answer.token_logprobs == pytest.approx(expected.log_probs, abs=1e-5)
    assert answer.top_logprobs == [pytest.approx({texts.text(token): value, **{texts.text(other): v for other, v in
                                                                                 value.top}}, abs=1e-5)
                                   for token, value in zip(expected.token_ids, expected.log_probs)]
    assert all(len(value.top) == 3 for value in expected.log_probs)
    expected = local.output(CHAT, 8, output_log_probs=True, top_log_probs=5, temperature=0.8, top_k=0,
                            random_seed=11)
    chat = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0.8, seed=11,
                                                  logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    assert [entry.token for entry in content] == [texts.text(token) for token in expected.token_ids]
    assert [entry.logprob for entry in content] == pytest.approx(expected.log_probs, abs=1e-5)
    for entry, value in zip(content, expected.log_probs):
        assert [top.token for top in entry.top_logprobs] == [texts.text(token) for token, _ in value.top]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx([max(v, -9999.0) for _, v in value.top])
    streamed = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                                     logprobs=True, stream=True)
    values = [entry.logprob for chunk in streamed for entry in (chunk.choices[0].logprobs.content or [])
              if chunk.choices[0].logprobs]
    assert values == pytest.approx(local.output(CHAT, 8, output_log_probs=True).log_probs, abs=1e-5)


def test_logit_bias_changes_the_output_as_it_must(server, local):
    """+100 makes a token the only choice; -100 on the greedy answer's first tokens makes
    another first token, the engine's own answer under that bias."""
    forced = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                              logit_bias={"300": 100})
    assert forced.choices[0].text == local.tokenizer.decode([300] * 6)
    plain = local.output(CHAT, 6).token_ids
    banned = dict.fromkeys(plain[:2], -100.0)
    answer = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                                   logit_bias={str(token): bias for token, bias in banned.items()})
    expected = local.output(CHAT, 6, logit_bias=tuple(banned.items())).token_ids
    assert expected[0] not in banned and answer.choices[0].message.content == local.tokenizer.decode(expected)


def test_vllm_sampling_fields_equal_the_engine(server, local):
    """top_k, min_p, repetition_penalty, min_tokens and stop_token_ids over HTTP give the
    engine's tokens for the same SamplingConfig; a stop token ends the answer unshown."""
    sampled = dict(temperature=0.9, seed=5, top_k=20, min_p=0.05, repetition_penalty=1.3)
    answer = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, extra_body=sampled)
    assert answer.choices[0].text == local.text(PROMPTS[0], 10, temperature=0.9, random_seed=5, top_k=20, min_p=0.05,
                                                repetition_penalty=1.3)
    plain = local.output(PROMPTS[2], 10).token_ids
    only_the_likeliest = server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10,
                                                          temperature=1.5, seed=5, extra_body={"min_p": 1.0})
    assert only_the_likeliest.choices[0].text == local.tokenizer.decode(plain)  # min_p 1 keeps the top token alone
    stop = plain[4]
    stopped = server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                               extra_body={"stop_token_ids": [stop]})
    assert stopped.choices[0].text == local.tokenizer.decode(plain[:plain.index(stop)])
    assert stopped.choices[0].finish_reason == "stop"
    held = server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                            extra_body={"stop_token_ids": [stop], "min_tokens": 8})
    assert held.choices[0].text == local.text(PROMPTS[2], 10, stop_token_ids=(stop,), min_length=8)
    assert held.usage.completion_tokens >= 8


def test_beam_search_equals_the_engines_best_beam(server, local):
    answer = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                              extra_body={"use_beam_search": True, "best_of": 3})
    best = local.output(PROMPTS[0], 8, num_beams=3).token_ids
    assert answer.choices[0].text == local.tokenizer.decode(best)


def test_response_format_gives_parseable_json(server):
    """json_object: the answer is JSON text from its first character, an object once it
    ends by itself; a json_schema whose objects are short ends and validates."""
    for temperature in (0, 1):
        answer = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24,
                                                       temperature=temperature, seed=1,
                                                       response_format={"type": "json_object"}).choices[0]
        assert answer.message.content.startswith("{")
        if answer.finish_reason == "stop":
            assert isinstance(json.loads(answer.message.content), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    answer = server.client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=24, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}).choices[0]
    assert answer.finish_reason == "stop" and isinstance(json.loads(answer.message.content)["ok"], bool)


@pytest.mark.parametrize("path, body, param, fragment", [
    ("chat", {"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "differ"),
    ("chat", {"max_completion_tokens": 25}, "max_completion_tokens", "max_output_len 24"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("chat", {"tools": []}, "tools", "at least 1"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "follows GLM-4's chat format"),
    ("completions", {"logprobs": 6}, "logprobs", "5"),
    ("completions", {"echo": True, "logprobs": 1}, "echo", "log-probs"),
    ("completions", {"suffix": "x"}, "suffix", "does not implement"),
    ("completions", {"best_of": 3}, "best_of", "not implemented"),
    ("completions", {"use_beam_search": True, "n": 2}, "n", "n must be 1"),
    ("completions", {"use_beam_search": True, "best_of": 2, "temperature": 0.5}, None, "beam search with sampling"),
    ("completions", {"logit_bias": {"1024": 1}}, "logit_bias", "outside the vocabulary"),
    ("completions", {"logit_bias": {"5": -101}}, "logit_bias.5", "greater than or equal to -100"),
    ("completions", {"stop_token_ids": [-1]}, "stop_token_ids", "outside the vocabulary"),
    ("completions", {"response_format": {"type": "xml"}}, "response_format", "json_object"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options", "set stream true"),
    ("completions", {"prompt": []}, "prompt", "empty"),
    ("completions", {"min_p": 1.5}, "min_p", "min_p"),
])
def test_fields_are_implemented_or_refused_by_name(server, path, body, param, fragment):
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"prompt": "a"} if path == "completions" else {"messages": CHAT})
    if "max_completion_tokens" in body:
        base.pop("max_tokens")
    response = httpx.post(f"{server.url}/v1/{'chat/' if path == 'chat' else ''}completions", json={**base, **body},
                          timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"] and error["type"] == "invalid_request_error"


def test_hint_fields_are_accepted_and_change_nothing(server, local):
    hints = {"user": "someone", "metadata": {"app": "test"}, "store": False, "service_tier": "auto"}
    answer = server.client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, **hints)
    assert answer.choices[0].message.content == local.text(CHAT, 6)


def test_tokenize_and_detokenize(server, local):
    tokens = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": PROMPTS[0]}).json()
    assert tokens == {"tokens": local.ids(PROMPTS[0]), "count": len(local.ids(PROMPTS[0])), "max_model_len": 88,
                      "max_input_len": 64}
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == local.ids(CHAT)
    bare = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[0], "add_special_tokens": False}).json()
    assert bare["tokens"] == local.tokenizer.encode(PROMPTS[0], add_prefix=False)
    assert httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPTS[0]}
    for path, body, param in (("/detokenize", {"tokens": [1024]}, "tokens"), ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model")):
        response = httpx.post(server.url + path, json=body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, response.text


def prefix_cache(server: Server) -> dict[str, float]:
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    return {name: float(value) for name, value in re.findall(r"^glm_prefix_cache_(\w+) (\S+)$", metrics, re.M)}


def test_prefix_caching_on_and_off_give_the_same_tokens_and_hits_show(server, engine, local):
    """A shared system prompt: served with prefix caching (the default) and without, the
    same answers as the engine alone; /metrics shows the hits only with it."""
    shared = [{"role": "system", "content": "be brief and precise, answer in one line"}]  # 3 blocks of 8 tokens
    chats = [shared + [{"role": "user", "content": question}] for question in ("北京", "上海", "广州")]
    expected = local.texts(chats, 8)
    before = prefix_cache(server)
    answers = [server.client.chat.completions.create(model="tiny", messages=chat, max_tokens=8,
                                                     temperature=0).choices[0].message.content for chat in chats]
    assert answers == expected
    after = prefix_cache(server)
    assert after["hit_tokens"] - before["hit_tokens"] >= 2 * 16 and after["cached_blocks"] > 0
    assert after["hit_rate"] == pytest.approx(after["hit_tokens"] / after["queried_tokens"])
    off = Server(engine, "--no_prefix_caching")
    try:
        assert [off.client.chat.completions.create(model="tiny", messages=chat, max_tokens=8,
                                                   temperature=0).choices[0].message.content
                for chat in chats] == expected
        assert prefix_cache(off)["hit_tokens"] == 0 and prefix_cache(off)["cached_blocks"] == 0
    finally:
        assert off.stop().returncode == 0


def test_speculative_serving_gives_the_same_answers_and_metrics_count_drafts(tiny_engine_factory, local):
    """serve.py --speculative_decoding_mode prompt_lookup answers a prompt that repeats itself
    as the engine alone does, and /metrics counts the drafts it verified."""
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "8",
                                     "--max_input_len", "64", "--max_output_len", "24", "--use_inflight_batching",
                                     "--tokens_per_block", "8", "--random_seed", "3", "--max_draft_len", "4")
    prompt = "hello world, hello world, hello world, hello"
    expected = local.text(prompt, 16)  # the same weights (--random_seed 3) without --max_draft_len
    served = Server(engine_dir, "--speculative_decoding_mode", "prompt_lookup")
    try:
        answer = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert answer.choices[0].text == expected
        metrics = httpx.get(served.url + "/metrics", timeout=5).text
        counts = {name: float(value) for name, value in re.findall(r"^glm_speculative_(\w+) (\S+)$", metrics, re.M)}
        assert counts["drafted_tokens"] > 0 and counts["verify_steps"] > 0, counts
    finally:
        assert served.stop().returncode == 0
