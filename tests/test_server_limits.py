"""serve.py at its edges, over real HTTP to a serve.py subprocess on a tiny engine:
queue accounting, the engine process's death or a stop while it loads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


LONG = {"model": "tiny", "prompt": "a", "max_tokens": 4096, "min_tokens": 4096}  # minutes on the CPU


# --- queue accounting -------------------------------------------------------------------


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


# --- the engine process's death, a stop while it loads ----------------------------------------


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
