"""serve.py against requests meant to hold it up and at its edges, over real HTTP to a
serve.py subprocess on a tiny engine: limits on bodies, prompt text and stop strings
(checked before any work), types as strict as OpenAI's, OpenAI's error body for every
error, queue accounting, graceful shutdown, the engine process's death or a stop while
it loads, a taken port, and one worst-case client beside a short request."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS

MAX_INPUT_LEN = 64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(engine: Path, port: int, *flags: object) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "serve.py"), "--engine_dir", str(engine), "--port", str(port),
            "--model_name", "tiny", "--log_level", "warning", *map(str, flags)]


def serve_env() -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TRITON_INTERPRET", None)
    return env


def engine_child(pid: int) -> int | None:
    """serve.py's engine process, once started (multiprocessing's resource tracker is its other child)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with_cmdline = Path(f"/proc/{child}/cmdline")
        if with_cmdline.exists() and b"spawn_main" in with_cmdline.read_bytes():
            return int(child)
    return None


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """serve.py in a subprocess, stopped with SIGTERM."""

    def __init__(self, engine: Path, *flags: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.terminated = False
        self.process = subprocess.Popen(serve_command(engine, self.port, *flags), env=serve_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(self.process.stderr.read())
            try:
                if self.http.get("/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("serve.py did not start")

    def post(self, body: object, path: str = "/v1/completions", **options) -> httpx.Response:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.http.post(path, content=content, headers={"content-type": "application/json"}, **options)

    def health(self) -> httpx.Response:
        return self.http.get("/health", timeout=5)

    def wait_for(self, ready, seconds: float = 30) -> dict:
        """The /health body once `ready(body)` holds."""
        deadline = time.monotonic() + seconds
        while not ready(body := self.health().json()):
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
        return body

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.terminated = True

    def stop(self, timeout: float = 60) -> subprocess.CompletedProcess:
        """SIGTERM (unless sent already); the exited process."""
        if not self.terminated and self.process.poll() is None:
            self.terminate()
        stdout, stderr = self.process.communicate(timeout=timeout)
        self.http.close()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)


def assert_openai_error(response: httpx.Response, status: int, fragment: str = "", param: object = "any") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert fragment in body["error"]["message"], body
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


class OpenStream:
    """A streamed completion, taken (its status read) and, with `first_event`, running
    (its first event read); the client stays until close()."""

    def __init__(self, server: Server, body: dict, first_event: bool = True) -> None:
        self.context = server.http.stream("POST", "/v1/completions", json={**body, "stream": True}, timeout=120)
        response = self.context.__enter__()
        assert response.status_code == 200, response.read()
        self.lines = (line for line in response.iter_lines() if line)
        self.seen = [next(self.lines)] if first_event else []

    def rest(self) -> list[str]:
        """Every event line, once the stream has ended."""
        self.seen += list(self.lines)
        return self.seen

    def close(self) -> None:
        self.context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def engine(tiny_engine_factory) -> Path:
    # Room for one request's 16 choices and more beside them; long answers for the long-running requests.
    return tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "32", "--max_input_len",
                               str(MAX_INPUT_LEN), "--max_output_len", "4096", "--use_inflight_batching",
                               "--random_seed", "3")


@pytest.fixture(scope="module")
def limits(engine):
    from glm_engine.serving.openai_server import RequestLimits
    from glm_engine.text.tokenizer import ChatGLMTokenizer

    return RequestLimits.of(ChatGLMTokenizer.from_dir(engine), MAX_INPUT_LEN)


@pytest.fixture(scope="module")
def server(engine):
    running_server = Server(engine)
    yield running_server
    result = running_server.stop()
    assert result.returncode == 0, result.stderr


LONG = {"model": "tiny", "prompt": "a", "max_tokens": 4096, "min_tokens": 4096}  # minutes on the CPU


# --- limits checked before any work -------------------------------------------------------


def test_a_body_over_the_limit_gets_413_and_health_answers_meanwhile(server, limits):
    """A 20 MB body (declared, or chunked without a length) is refused with 413 at once;
    /health answers while it is sent."""
    huge = json.dumps({"model": "tiny", "prompt": "长" * ((20 << 20) // 3)}, ensure_ascii=False).encode()
    assert len(huge) > limits.max_body_bytes
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(server.post, huge, timeout=120)
        health = []
        while not sent.done():
            started = time.perf_counter()
            assert server.health().status_code == 200
            health.append(time.perf_counter() - started)
        assert_openai_error(sent.result(), 413, f"{limits.max_body_bytes} bytes")
    assert max(health, default=0) < 2, health
    chunked = server.http.post("/v1/completions", content=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
                               headers={"content-type": "application/json"})
    assert_openai_error(chunked, 413, f"{limits.max_body_bytes} bytes")
    assert server.health().json()["requests_running"] == 0


@pytest.mark.parametrize("path, field", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_text_longer_than_max_input_len_tokens_can_hold_is_refused_untokenized(server, limits, path, field):
    """One character over max_input_len x the most characters a token stands for: 400
    naming the characters (the longest text allowed is tokenized, and refused for its
    tokens)."""
    def body(chars: int) -> dict:
        if field == "prompt":
            return {"model": "tiny", "prompt": "x" * chars}
        half = chars // 2
        return {"model": "tiny", "messages": [{"role": "system", "content": "x" * half},
                                              {"role": "user", "content": "x" * (chars - half)}]}

    assert len(json.dumps(body(limits.max_prompt_chars + 1))) < limits.max_body_bytes
    assert_openai_error(server.post(body(limits.max_prompt_chars + 1), path), 400,
                        f"{limits.max_prompt_chars + 1} characters, more than the engine's max_input_len", field)
    assert_openai_error(server.post(body(limits.max_prompt_chars), path), 400, f"max_input_len {MAX_INPUT_LEN}")


@pytest.mark.parametrize("stop, fragment", [
    (["a", "b", "c", "d", "e"], "stop holds 5 strings; at most 4"),
    ("x" * 257, "stop string 0 has 257 characters"),
    (["a", "y" * 257], "stop string 1 has 257 characters"),
    ([""], "stop string 0 has 0 characters"),
])
def test_stop_strings_have_limits(server, stop, fragment):
    assert_openai_error(server.post({"model": "tiny", "prompt": "a", "max_tokens": 2, "stop": stop}), 400, fragment,
                        "stop")


def test_stop_strings_at_their_limits_are_taken(server):
    from glm_engine.serving.openai_server import MAX_STOP_CHARS, MAX_STOP_STRINGS

    stop = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    response = server.post({"model": "tiny", "prompt": "a", "max_tokens": 3, "stop": stop})
    assert response.status_code == 200, response.text


# --- OpenAI's error body, strict types ----------------------------------------------------


@pytest.mark.parametrize("path, content, fragment", [
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800"}', "not valid JSON"),  # a lone surrogate
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
     "not valid JSON"),
    ("/v1/completions", '{"model": "tiny", "prompt": ' + "[" * 5000 + "]" * 5000 + "}", "not valid JSON"),
    ("/v1/completions", '{"model": "tiny", "prompt": "a", "seed": ' + "9" * 5000 + "}", "number out of range"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
    ("/v1/completions", '{"model": "tiny", "prompt": "a",', "not valid JSON"),
    ("/v1/completions", '{"model": "tiny"} {}', "not valid JSON"),
    ("/v1/completions", "[1, 2]", "body: Input should be an object"),
])
def test_unparsable_bodies_get_openai_errors(server, path, content, fragment):
    """400 with OpenAI's body, a JSON syntax error's place in the message and never in param."""
    assert_openai_error(server.post(content, path), 400, fragment, None)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", 8.0), ("prompt", [True, 2]), ("prompt", [1.0, 2]), ("stream", "yes"),
    ("stream", 1), ("n", "2"), ("temperature", "0"), ("stop", [1]), ("seed", 1.5), ("model", 5),
])
def test_wrong_types_are_refused_as_openai_does(server, field, value):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2, field: value}
    assert_openai_error(server.post(body), 400, field, field)


def test_integer_temperature_and_chat_content_types(server):
    assert server.post({"model": "tiny", "prompt": "a", "max_tokens": 2, "temperature": 0}).status_code == 200
    chat = server.post({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions")
    assert_openai_error(chat, 400, "messages.0.content", "messages.0.content")


def test_a_tiny_temperature_samples_what_greedy_chooses(server):
    """temperature 1e-45 is sampling in the limit of greedy: the greedy text, never "" from NaN logits."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 6, "seed": 1}
    greedy = server.post({**body, "temperature": 0})
    tiny = server.post({**body, "temperature": 1e-45})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"] != ""


@pytest.mark.parametrize("method, path, status", [("GET", "/nowhere", 404), ("GET", "/v1/completions", 405),
                                                  ("POST", "/health", 405)])
def test_unknown_paths_and_methods_get_openai_errors(server, method, path, status):
    assert_openai_error(server.http.request(method, path), status, path)


# --- queue accounting and graceful shutdown -------------------------------------------------


@pytest.fixture(scope="module")
def small_server(engine):
    """8 sequences in flight, 4 may wait; SIGTERM gives running requests 1 s."""
    running_server = Server(engine, "--max_in_flight", "8", "--max_queue", "4", "--shutdown_timeout", "1")
    yield running_server
    running_server.stop()


def test_an_idle_server_takes_whatever_fits_its_slots_and_queue(small_server):
    """n choices count as sequences; on an idle server, what fits 8 slots and a queue of 4
    is always taken and what does not, always refused."""
    for _ in range(5):
        for n in (5, 12):
            response = small_server.post({"model": "tiny", "prompt": "a", "max_tokens": 2, "n": n})
            assert response.status_code == 200, (n, response.text)
        assert_openai_error(small_server.post({"model": "tiny", "prompt": "a", "max_tokens": 2, "n": 13}), 400,
                            "13 choices are more than the 8 sequences in flight and the 4 of the queue")


def test_the_queue_counts_waiting_sequences(small_server):
    """With every slot taken, 4 more sequences may wait; a fifth is refused with 429."""
    full = OpenStream(small_server, {**LONG, "n": 8})
    try:
        small_server.wait_for(lambda health: health["requests_running"] == 8)
        assert_openai_error(small_server.post({**LONG, "n": 5}), 429, "4 sequences may wait")
        waiting = OpenStream(small_server, {**LONG, "n": 4}, first_event=False)
        try:
            small_server.wait_for(lambda health: health["queue_length"] == 4)
            assert_openai_error(small_server.post({**LONG, "n": 1}), 429, "retry later")
        finally:
            waiting.close()
    finally:
        full.close()
    small_server.wait_for(lambda health: health["requests_running"] == 0 and health["queue_length"] == 0)


def test_sigterm_ends_every_running_request_as_promised(small_server):
    """--shutdown_timeout 1: a whole answer and a stream still running get, within about
    that second, a 503 in OpenAI's body and an error event per open choice followed by
    the usage chunk and [DONE]; the process exits 0."""
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(small_server.post, LONG, timeout=120)
        stream = OpenStream(small_server, {**LONG, "n": 2, "stream_options": {"include_usage": True}})
        small_server.wait_for(lambda health: health["requests_running"] == 3)
        stopped_at = time.monotonic()
        small_server.terminate()
        seen = stream.rest()
        stream.close()
        response = whole.result()
    assert time.monotonic() - stopped_at < 1 + 10
    assert_openai_error(response, 503, "the server shut down before the request finished")
    assert seen[-1] == "data: [DONE]", seen[-3:]
    events = [json.loads(line.removeprefix("data: ")) for line in seen[:-1]]
    errors = [event["error"] for event in events if "error" in event]
    assert len(errors) == 2 and all(error["message"] == "the server shut down before the request finished"
                                    and set(error) == {"message", "type", "param", "code"} for error in errors)
    assert "usage" in events[-1] and events[-1]["usage"]["completion_tokens"] > 0
    result = small_server.stop()
    assert result.returncode == 0, result.stderr


# --- the engine process's death, a stop while it loads, a taken port --------------------------


def test_a_dead_engine_is_reported_with_its_signal_reaped_and_idle(engine):
    """SIGKILL the engine process while a request runs: the request ends with an error
    naming the signal, /health turns 503 with nothing running or waiting and the same
    reason, the process is reaped (no zombie), and SIGTERM still exits 0."""
    server = Server(engine)
    try:
        stream = OpenStream(server, LONG)
        server.wait_for(lambda health: health["requests_running"] == 1)
        engine_pid = engine_child(server.process.pid)
        os.kill(engine_pid, signal.SIGKILL)
        seen = stream.rest()
        stream.close()
        errors = [json.loads(line[6:])["error"] for line in seen if '"error"' in line]
        assert errors and "exited unexpectedly (killed by SIGKILL)" in errors[0]["message"], seen[-3:]
        health = server.health()
        assert health.status_code == 503
        assert health.json()["requests_running"] == 0 and health.json()["queue_length"] == 0, health.json()
        assert "killed by SIGKILL" in health.json()["reason"]
        deadline = time.monotonic() + 5
        while Path(f"/proc/{engine_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{engine_pid}").exists(), "the dead engine process is left a zombie"
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr


def test_sigterm_while_the_engine_loads_stops_it_at_once(engine):
    """The engine process is stopped with the server: no loading on, no traceback."""
    process = subprocess.Popen(serve_command(engine, free_port()), env=serve_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (child := engine_child(process.pid)) is None:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert "Traceback" not in stderr, stderr
    assert not running(child), "the engine process outlived the server"
    assert process.returncode == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr


@pytest.mark.parametrize("flags, message", [
    ([], "cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port or stop what uses it"),
    (["--shutdown_timeout", "nan"], "--shutdown_timeout must be a finite number of seconds, 0 or more, got nan"),
])
def test_a_server_that_cannot_start_says_why_before_loading(engine, flags, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(serve_command(engine, port, *flags), env=serve_env(), capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "serve.py: error: " + message.format(port=port), result.stderr
    assert "startup complete" not in result.stderr + result.stdout
    assert time.monotonic() - started < 30


# --- one request cannot hold up the others -------------------------------------------------


def test_a_worst_case_request_does_not_hold_up_a_short_one(server, limits):
    """While one client's worst request within the limits runs (a body of the most bytes,
    its prompt max_input_len tokens, 16 choices of max_output_len tokens, 4 stop strings
    of the most characters that never match, streamed and read), another client's
    4-token request takes at most twice its idle time (medians of 7; 0.1 s of slack for
    a busy box)."""
    from glm_engine.serving.openai_server import MAX_STOP_CHARS, MAX_STOP_STRINGS

    short = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "min_tokens": 4, "temperature": 0}

    def latency() -> float:
        started = time.perf_counter()
        assert server.post(short).status_code == 200
        return time.perf_counter() - started

    for _ in range(3):
        latency()
    idle = statistics.median(latency() for _ in range(7))
    stop = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    worst = json.dumps({**LONG, "prompt": list(range(5, 5 + MAX_INPUT_LEN)), "n": 16, "stop": stop, "stream": True})
    worst += " " * (limits.max_body_bytes - len(worst))  # JSON allows the padding: the largest body taken
    measured = threading.Event()

    def read_worst() -> int:
        """Reads the worst request's events until the short requests are measured; how many."""
        with server.http.stream("POST", "/v1/completions", content=worst,
                                headers={"content-type": "application/json"}) as response:
            assert response.status_code == 200, response.read()
            for count, _ in enumerate(response.iter_lines()):
                if measured.is_set():
                    return count

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_worst)
        server.wait_for(lambda health: health["requests_running"] == 16)
        busy = statistics.median(latency() for _ in range(7))
        measured.set()
        assert reading.result() > 16  # it ran all along
    server.wait_for(lambda health: health["requests_running"] == 0)  # it left: cancelled
    assert busy <= 2 * idle + 0.1, (busy, idle)
