"""An open-loop load generator for serve.py (benchmark.py --server_url): each request
is sent at its arrival time whatever the server's state, streamed, and timed at the
client: time to the first streamed text, time per later token, output tokens/s over
the whole run. Requests ask for exactly `output_len` tokens (`min_tokens`), as the
in-process serving modes do, so the two measure the same work.

The requests are dealt round-robin to several client processes that start together:
one Python process reading 512 streams was measured saturated (19.4 s of CPU in a
15.3 s run on the H100 box) and timed itself, not the server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from multiprocessing.connection import Connection

import httpx

from glm_engine import GlmEngineError

MAX_CLIENT_PROCESSES = 8


async def _one_request(client: httpx.AsyncClient, url: str, body: dict, delay: float, start: float) -> dict:
    await asyncio.sleep(max(0.0, delay - (time.time() - start)))
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise GlmEngineError(f"the server answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is not None and '"usage"' not in line and '"error"' not in line:
                continue  # a later text chunk: parsing it would time the client, not the server
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise GlmEngineError(f"the server ended a request: {chunk['error']['message']}")
            if first is None and chunk.get("choices"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    return {"ttft": (first or done) - sent, "tokens": tokens, "tpot": (done - (first or done)) / max(1, tokens - 1)}


async def _run(server_url: str, model: str, prompts: list[list[int]], arrivals: list[float], output_len: int,
               sampling: dict, start: float) -> list[dict]:
    """This process's requests, each sent `arrivals[i]` seconds after the wall-clock `start`."""
    url = server_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        tasks = [_one_request(client, url, {"model": model, "prompt": prompt, "max_tokens": output_len,
                                            "min_tokens": output_len, "stream": True,
                                            "stream_options": {"include_usage": True}, **sampling}, arrival, start)
                 for prompt, arrival in zip(prompts, arrivals)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _client_process(connection: Connection, server_url: str, model: str, prompts: list[list[int]],
                    arrivals: list[float], output_len: int, sampling: dict) -> None:
    """One client process: says it is ready, waits for the common start time, sends its
    share, and answers ("done", results, wall-clock end) or ("failed", message)."""
    connection.send(("ready",))
    start = connection.recv()
    try:
        results = asyncio.run(_run(server_url, model, prompts, arrivals, output_len, sampling, start))
        connection.send(("done", results, time.time()))
    except Exception as error:  # noqa: BLE001 - the parent prints it as its one-line error
        connection.send(("failed", str(error) if isinstance(error, GlmEngineError) else
                         f"a client process failed: {type(error).__name__}: {error}"))


def server_model(server_url: str) -> str:
    """The id of the one model a server lists."""
    try:
        return httpx.get(server_url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise GlmEngineError(f"--server_url {server_url}: no OpenAI-compatible server answers there ({error})") \
            from None


def run_http_load(server_url: str, prompts: list[list[int]], arrivals: list[float], output_len: int,
                  sampling: dict) -> tuple[list[dict], float]:
    """Per request its TTFT, TPOT and token count, and the run's seconds (from the common
    start to the last answer), the requests sent from up to MAX_CLIENT_PROCESSES processes."""
    model = server_model(server_url)
    count = max(1, min(MAX_CLIENT_PROCESSES, (os.cpu_count() or 1) // 2, len(prompts)))
    context = multiprocessing.get_context("spawn")
    workers = []
    for share in range(count):
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_client_process, daemon=True,
                                  args=(child_end, server_url, model, prompts[share::count], arrivals[share::count],
                                        output_len, sampling))
        process.start()
        workers.append((process, parent_end))
    try:
        for _, connection in workers:
            connection.recv()  # ready: imports done
        start = time.time() + 0.05
        for _, connection in workers:
            connection.send(start)
        answers = [connection.recv() for _, connection in workers]
    except EOFError:
        raise GlmEngineError("a client process exited before it answered") from None
    finally:
        for process, _ in workers:
            process.join(5)
            if process.is_alive():
                process.kill()
    failed = [answer[1] for answer in answers if answer[0] == "failed"]
    if failed:
        raise GlmEngineError(failed[0])
    results: list[dict] = [{}] * len(prompts)
    for share, (_, share_results, _) in enumerate(answers):
        results[share::count] = share_results
    return results, max(end for _, _, end in answers) - start
