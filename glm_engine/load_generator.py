"""An open-loop load generator for serve.py (benchmark.py --server_url): each request
is sent at its arrival time whatever the server's state, streamed, and timed at the
client: time to the first streamed text, time per later token, output tokens/s over
the whole run. Requests ask for exactly `output_len` tokens (`min_tokens`), as the
in-process serving modes do, so the two measure the same work."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from glm_engine import GlmEngineError


async def _one_request(client: httpx.AsyncClient, url: str, body: dict, delay: float, start: float) -> dict:
    await asyncio.sleep(max(0.0, delay - (time.perf_counter() - start)))
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
               sampling: dict) -> tuple[list[dict], float]:
    url = server_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = [_one_request(client, url, {"model": model, "prompt": prompt, "max_tokens": output_len,
                                            "min_tokens": output_len, "stream": True, **sampling}, arrival, start)
                 for prompt, arrival in zip(prompts, arrivals)]
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def server_model(server_url: str) -> str:
    """The id of the one model a server lists."""
    try:
        return httpx.get(server_url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise GlmEngineError(f"--server_url {server_url}: no OpenAI-compatible server answers there ({error})") \
            from None


def run_http_load(server_url: str, prompts: list[list[int]], arrivals: list[float], output_len: int,
                  sampling: dict) -> tuple[list[dict], float]:
    """Per request its TTFT, TPOT and token count, and the run's seconds."""
    return asyncio.run(_run(server_url, server_model(server_url), prompts, arrivals, output_len, sampling))
