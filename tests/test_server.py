"""serve.py as a user runs it: a server process on a tiny in-flight engine, queried
with the openai client and plain HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, run_tool

openai = pytest.importorskip("openai")

PROMPTS = ["北京市教育资源丰富", "hello world", "a", "今天天气很好，我们去公园"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """serve.py in a subprocess, stopped with SIGTERM."""

    def __init__(self, engine: Path, *flags: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
        env.pop("TRITON_INTERPRET", None)
        self.process = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--engine_dir", str(engine),
                                         "--port", str(self.port), "--model_name", "tiny", "--log_level", "warning",
                                         *map(str, flags)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(self.process.stderr.read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def engine_pid(self) -> int:
        """The engine process's id (multiprocessing's resource tracker is the other child)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        engines = [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(engines) == 1, children
        return engines[0]

    def cancelled(self) -> float:
        metrics = httpx.get(self.url + "/metrics", timeout=5).text
        found = re.search(r'^glm_requests_total\{outcome="cancelled"\} (\S+)$', metrics, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def wait_idle(self) -> dict:
        for _ in range(100):
            health = self.health()
            if health["requests_running"] == 0 and health["kv_blocks_free"] == health["kv_blocks_total"]:
                return health
            time.sleep(0.1)
        return health

    def stop(self, timeout: float = 60) -> subprocess.CompletedProcess:
        self.process.send_signal(signal.SIGTERM)
        stdout, stderr = self.process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def engine(tiny_engine_factory) -> Path:
    return tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "8",
                               "--max_input_len", "64", "--max_output_len", "24", "--use_inflight_batching",
                               "--random_seed", "3")


@pytest.fixture(scope="module")
def server(engine):
    running = Server(engine)
    yield running
    result = running.stop()
    assert result.returncode == 0, result.stderr


def run_py_outputs(engine: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """run.py's greedy tokens for the prompts, decoded with the engine's tokenizer."""
    from glm_engine.text.prompts import read_token_csv
    from glm_engine.text.tokenizer import ChatGLMTokenizer

    csv = engine.parent / f"run_{max_tokens}.csv"
    result = run_tool("run.py", "--engine_dir", engine, "--input_text", *prompts, "--max_output_len", max_tokens,
                      "--output_csv", csv)
    assert result.returncode == 0, result.stderr
    tokenizer = ChatGLMTokenizer.from_dir(engine)
    return [tokenizer.decode(tokens) for tokens in read_token_csv(csv)]


def test_completions_equal_run_py_streamed_or_not(server, engine):
    expected = run_py_outputs(engine, PROMPTS, 12)
    for prompt, text in zip(PROMPTS, expected):
        whole = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert whole.choices[0].text == text
        assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
        chunks = list(server.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                       stream=True))
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == text
    assert server.client.models.list().data[0].id == "tiny"


def test_chat_follows_the_chatglm2_rounds(server, engine):
    from glm_engine.text.prompts import chat_prompt_ids
    from glm_engine.text.tokenizer import ChatGLMTokenizer
    from model import load_session
    from glm_engine.runtime.sampling import SamplingConfig

    tokenizer = ChatGLMTokenizer.from_dir(engine)
    messages = [("user", "你好"), ("assistant", "你好！"), ("user", "北京")]
    ids = chat_prompt_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：北京\n\n答："
    session = load_session(engine, "cpu")
    expected = tokenizer.decode(session.generate([ids], SamplingConfig(max_new_tokens=10))[0].token_ids)
    reply = server.client.chat.completions.create(model="tiny", max_tokens=10, temperature=0,
                                                  messages=[{"role": r, "content": c} for r, c in messages])
    assert reply.choices[0].message.content == expected
    streamed = server.client.chat.completions.create(model="tiny", max_tokens=10, temperature=0, stream=True,
                                                     messages=[{"role": r, "content": c} for r, c in messages])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected


def test_stop_strings_end_the_text_before_them(server):
    text = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    full = text.choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    cut = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    text = cut.choices[0].text  # cut at a token boundary: a token reaching into the stop text goes too
    assert full[:full.index(stop)].startswith(text) and stop not in text
    assert len(text) >= full.index(stop) - 8, (text, full, stop)
    assert cut.choices[0].finish_reason == "stop"


def test_many_concurrent_streams_each_equal_their_solo_run(server):
    """64 streaming clients with mixed prompts and lengths: all complete, each with the
    text it gets alone, and the KV pool is whole again."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + str(i % 5), 4 + i % 13) for i in range(64)]

    def solo(job):
        return server.client.completions.create(model="tiny", prompt=job[0], max_tokens=job[1],
                                                temperature=0).choices[0].text

    def streamed(job):
        chunks = server.client.completions.create(model="tiny", prompt=job[0], max_tokens=job[1], temperature=0,
                                                  stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    expected = {job: solo(job) for job in set(jobs)}
    with ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(streamed, jobs))
    assert texts == [expected[job] for job in jobs]
    health = server.wait_idle()
    assert health["kv_blocks_free"] == health["kv_blocks_total"]


def test_a_client_that_leaves_frees_its_blocks(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.7,
                            "stream": True}) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    health = server.wait_idle()
    assert health["kv_blocks_free"] == health["kv_blocks_total"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'glm_requests_total{outcome="cancelled"}' in metrics
    assert "glm_time_to_first_token_seconds_bucket" in metrics


def test_a_client_that_leaves_before_a_whole_answer_is_cancelled(server):
    """Not streamed: the server looks for the client's disconnect while it waits, and
    cancels the request (the engine is paused so that the answer cannot come first)."""
    before = server.cancelled()
    engine_pid = server.engine_pid()
    os.kill(engine_pid, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", timeout=1.0,
                       json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 24, "n": 2})
        for _ in range(30):
            if server.cancelled() == before + 2:
                break
            time.sleep(0.1)
    finally:
        os.kill(engine_pid, signal.SIGCONT)
    assert server.cancelled() == before + 2
    health = server.wait_idle()
    assert health["kv_blocks_free"] == health["kv_blocks_total"]


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "JSON"),
    ({"model": "tiny", "prompt": "a", "best_of": 2}, 400, "best_of"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 25}, 400, "max_output_len 24"),
    ({"model": "tiny", "prompt": "长" * 200}, 400, "max_input_len 64"),
    ({"model": "other", "prompt": "a"}, 404, "is not served here"),
    ({"model": "tiny", "prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens 5 is over max_tokens 4"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_tools_need_a_glm4_model(server):
    """Function calling follows GLM-4's chat format: a ChatGLM2 engine refuses tools by name."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": tools})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tools" and "follows GLM-4's chat format" in error["message"]
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "{}"}]
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={"model": "tiny", "messages": messages})
    assert response.status_code == 400 and "no function calls or tool results" in response.json()["error"]["message"]


def test_chat_without_a_final_user_message_is_refused(server):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]})
    assert response.status_code == 400 and "end with a user message" in response.json()["error"]["message"]


def test_queue_limit_and_sigterm(engine):
    """One slot and a queue of one: requests beyond get 429; SIGTERM lets the running
    request finish and the process exits 0."""
    server = Server(engine, "--max_in_flight", "1", "--max_queue", "1")
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0.5}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body,
                                                      timeout=60).status_code, range(8)))
    assert 429 in statuses and 200 in statuses, statuses
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60)
        time.sleep(0.5)
        result = server.stop()
        response = pending.result()
    assert result.returncode == 0, result.stderr
    assert response.status_code in (200, 503), response.text
    if response.status_code == 200:
        assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_an_engine_process_that_dies_ends_its_requests_and_health(engine):
    """The engine runs in a child process (here with chunked prefill, which changes no
    token): if it dies, a waiting request gets a 503 with the reason, /health turns 503,
    new requests are refused, and SIGTERM still exits 0."""
    server = Server(engine, "--enable_chunked_context", "--max_tokens_per_step", "3")
    expected = run_py_outputs(engine, PROMPTS[:1], 12)
    assert server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                            temperature=0).choices[0].text == expected[0]
    engine_pid = server.engine_pid()
    os.kill(engine_pid, signal.SIGSTOP)  # the request below waits in the pipe
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8})
        time.sleep(0.5)
        os.kill(engine_pid, signal.SIGKILL)
        response = pending.result()
    assert response.status_code == 503 and "exited unexpectedly" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 503
    refused = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": "tiny", "prompt": "a"})
    assert refused.status_code == 503 and "engine has stopped" in refused.json()["error"]["message"]
    result = server.stop()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--max_tokens_per_step", "0"], "--max_tokens_per_step must be at least 1, got 0"),  # from the engine process
    (["--tokenizer_dir", "{engine}/nowhere"], "no tokenizer.model or tokenizer.json in {engine}/nowhere: the API "
                                              "takes text; pass --tokenizer_dir"),
])
def test_a_server_that_cannot_start_says_why_in_one_line(engine, flags, message):
    flags = [flag.format(engine=engine) for flag in flags]
    result = subprocess.run([sys.executable, str(REPO_ROOT / "serve.py"), "--engine_dir", str(engine), *flags,
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"serve.py: error: {message.format(engine=engine)}", result.stderr


def test_chat_formats_of_both_flavors(tiny_tokenizer_dir):
    """ChatGLM3: [gMASK] sop, a role token and "\\n" + content per message, then
    <|assistant|>; ChatGLM2 refuses chats its rounds cannot hold."""
    from glm_engine import GlmEngineError
    from glm_engine.text.prompts import chat_prompt_ids
    from glm_engine.text.tokenizer import ChatGLMTokenizer

    three = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir, flavor="chatglm3")
    role = three.special_token_ids
    ids = chat_prompt_ids(three, [("system", "be brief"), ("user", "hi")])
    assert ids[:2] == [role["[gMASK]"], role["sop"]] and ids[-1] == role["<|assistant|>"]
    assert ids[2] == role["<|system|>"] and ids.index(role["<|user|>"]) > 2
    # As ChatGLM3's build_chat_input: "\n" and the content encoded apart, each after SentencePiece's space.
    assert ids[3:ids.index(role["<|user|>"])] == (three.encode("\n", add_prefix=False)
                                                  + three.encode("be brief", add_prefix=False))
    assert three.decode(ids[3:ids.index(role["<|user|>"])]) == "\n be brief"
    two = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir, flavor="chatglm2")
    assert two.decode(chat_prompt_ids(two, [("system", "S"), ("user", "Q")])) == "[Round 1]\n\n问：S\nQ\n\n答："
    for messages, fragment in (([("user", "a"), ("user", "b")], "two user messages"),
                               ([("assistant", "a"), ("user", "b")], "must answer a user message"),
                               ([("user", "a"), ("assistant", "b")], "end with a user message")):
        with pytest.raises(GlmEngineError, match=fragment):
            chat_prompt_ids(two, messages)


def test_benchmark_measures_a_server_over_http(server, engine, tmp_path):
    """benchmark.py --server_url: the serving modes' requests (exactly --output_len tokens
    each, min_tokens holding the end token back) streamed to the server."""
    result = run_tool("benchmark.py", "--engine_dir", engine, "--mode", "rate", "--request_rate", "50",
                      "--num_requests", "12", "--input_len_range", "4", "12", "--output_len", "6", "--server_url",
                      server.url, "--output_json", tmp_path / "http.json")
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "http.json").read_text())["rows"][0]
    assert row["side"] == "serve.py over HTTP" and row["requests"] == 12 and row["output_tokens_per_s"] > 0
    sampled = run_tool("benchmark.py", "--engine_dir", engine, "--mode", "throughput", "--num_requests", "2",
                       "--input_len_range", "4", "8", "--output_len", "4", "--repetition_penalty", "1.1",
                       "--top_k", "5", "--temperature", "0.8", "--server_url", server.url)
    assert sampled.returncode == 0, sampled.stderr
    refused = run_tool("benchmark.py", "--engine_dir", engine, "--mode", "throughput", "--num_requests", "2",
                       "--input_len_range", "4", "8", "--output_len", "4", "--num_beams", "2",
                       "--server_url", server.url)
    assert refused.returncode != 0 and "--num_beams is not sent over HTTP" in refused.stderr


def test_streamed_text_adds_up_to_the_whole_text(tiny_tokenizer_dir):
    """The streamed deltas (each choice's tokens decoded once, as they come) join into
    exactly the text of all the tokens, for random token streams (byte pieces, spaces,
    special ids) cut into random steps, two choices interleaved; the whole answer has
    the same texts and counts every token."""
    import random

    from glm_engine.serving.openai_server import _Answer
    from glm_engine.text.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    rng = random.Random(0)
    for _ in range(200):
        choices = [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))] for _ in range(2)]
        answer = _Answer("text_completion", "tiny", 1, 2, 100, tokenizer)
        whole = _Answer("text_completion", "tiny", 1, 2, 100, tokenizer)
        streamed, starts = ["", ""], [0, 0]
        while starts != [len(ids) for ids in choices]:
            choice = rng.choice([i for i in range(2) if starts[i] < len(choices[i])])
            ids, start = choices[choice], starts[choice]
            end = min(len(ids), start + rng.randrange(1, 4))
            chunk = answer.add(choice, ids[start:end], end == len(ids), streaming=True)
            assert whole.add(choice, ids[start:end], end == len(ids), streaming=False) is None
            streamed[choice] += chunk["choices"][0]["text"] if chunk else ""
            starts[choice] = end
        for ids, text in zip(choices, streamed):
            assert text == tokenizer.decode(ids), ids
        body = whole.whole()
        assert [choice["text"] for choice in body["choices"]] == streamed
        assert [choice["finish_reason"] for choice in body["choices"]] == ["stop", "stop"]
        assert body["usage"]["completion_tokens"] == sum(len(ids) for ids in choices)
